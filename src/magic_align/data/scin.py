"""SCIN (Skin Condition Image Network): a CSV with one row per image, case_id, image_path and label.

Several images of one case share its `case_id`, which is the leakage group (a case never straddles the
split). `image_path` is relative to `data.images` (or to the CSV's folder when that is not set). Optional
columns: a Fitzpatrick skin type (`fitzpatrick_skin_type`, values like FST3 or 3), a body site (`region` or
`body_part`) or SCIN's yes/no `body_parts_*` columns (e.g. body_parts_arm = YES).
"""

from __future__ import annotations

from pathlib import Path

from magic_align.data.records import (
    LoadProblems, Record, find_duplicate_ids, normalise_label, normalise_region, parse_skin_type, read_csv_rows,
    safe_id,
)

REQUIRED = ("case_id", "image_path", "label")
OPTIONAL = ("fitzpatrick_skin_type", "region", "body_part", "body_parts_*")
_SKIN_TYPE_COLUMNS = ("fitzpatrick_skin_type", "fitzpatrick", "skin_type", "fst")
_YES = {"yes", "y", "true", "1"}


def resolve_path(text: str, images: Path, csv_dir: Path) -> Path:
    path = Path(text)
    if path.is_absolute():
        return path
    for base in (images, csv_dir):
        if (base / path).exists():
            return base / path
    return images / path


def region_of_row(fields: dict[str, str]) -> str | None:
    """The row's body region: a `region`/`body_part` column, else the body_parts_* flags when they agree."""
    for column in ("region", "body_part"):
        if fields.get(column):
            return normalise_region(fields[column])
    flagged = {
        normalise_region(column.removeprefix("body_parts_"))
        for column, value in fields.items()
        if column.startswith("body_parts_") and value.strip().lower() in _YES
    } - {None}
    return flagged.pop() if len(flagged) == 1 else None  # several regions: none of them is "the" region


def load_scin(csv_path: Path, images: Path | None, problems: LoadProblems | None = None) -> list[Record]:
    problems = problems if problems is not None else LoadProblems()
    source = str(csv_path)
    images = images if images is not None else csv_path.parent
    records = []
    for row, fields in read_csv_rows(csv_path, REQUIRED, "SCIN", OPTIONAL):
        case_id, relative, label = fields["case_id"], fields["image_path"], normalise_label(fields["label"])
        missing = [name for name, value in (("case_id", case_id), ("image_path", relative), ("label", label)) if not value]
        if missing:
            problems.add(source, row, f"empty {', '.join(missing)}; skipped")
            continue
        skin_type = -1
        column = next((name for name in _SKIN_TYPE_COLUMNS if fields.get(name)), None)
        if column is not None:
            parsed = parse_skin_type(fields[column])
            if parsed is None:
                problems.note(source, row, f"{column} {fields[column]!r} is not a skin type 1-6; taken as unknown")
            skin_type = parsed if parsed is not None else -1
        records.append(Record(
            id=safe_id(f"{case_id}-{Path(relative).stem}"), path=resolve_path(relative, images, csv_path.parent),
            label=label, skin_type=skin_type, region=region_of_row(fields), group=case_id, row=row,
            source=source,
        ))
    return find_duplicate_ids(records, problems)
