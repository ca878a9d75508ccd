"""Fitzpatrick17k: the public CSV plus a folder of images named `<md5hash>.jpg`.

Columns of the public CSV: md5hash, fitzpatrick_scale, fitzpatrick_centaur, label, nine_partition_label,
three_partition_label, qc, url, url_alphanum. Only md5hash and label are required; fitzpatrick_scale gives the
skin type and an optional `region` column the body site. The procedural demo domain writes the same layout
(with `.png` images), so it is read here too.
"""

from __future__ import annotations

from pathlib import Path

from magic_align.data.records import (
    LoadProblems, Record, find_duplicate_ids, normalise_label, normalise_region, parse_skin_type, read_csv_rows,
    safe_id,
)

REQUIRED = ("md5hash", "label")
OPTIONAL = ("fitzpatrick_scale", "region")


def image_path(images: Path, md5hash: str) -> Path:
    """`<md5hash>.jpg`, or `<md5hash>.png` when only that exists (the .jpg path when neither does)."""
    jpg = images / f"{md5hash}.jpg"
    if jpg.exists():
        return jpg
    png = images / f"{md5hash}.png"
    return png if png.exists() else jpg


def load_fitzpatrick(csv_path: Path, images: Path, problems: LoadProblems | None = None) -> list[Record]:
    problems = problems if problems is not None else LoadProblems()
    source = str(csv_path)
    records = []
    for row, fields in read_csv_rows(csv_path, REQUIRED, "Fitzpatrick17k", OPTIONAL):
        md5hash, label = fields["md5hash"], normalise_label(fields["label"])
        if not md5hash:
            problems.add(source, row, "empty md5hash; skipped")
            continue
        if not label:
            problems.add(source, row, "empty label; skipped")
            continue
        skin_type = parse_skin_type(fields.get("fitzpatrick_scale"))
        if skin_type is None:
            problems.note(source, row, f"fitzpatrick_scale {fields['fitzpatrick_scale']!r} is not 1-6 or -1; "
                                      "taken as unknown (-1)")
            skin_type = -1
        record_id = safe_id(md5hash)
        records.append(Record(
            id=record_id, path=image_path(images, md5hash), label=label, skin_type=skin_type,
            region=normalise_region(fields.get("region")), group=record_id, row=row, source=source,
        ))
    return find_duplicate_ids(records, problems)
