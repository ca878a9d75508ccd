"""PAD-UFES-20: smartphone images of skin lesions with a metadata CSV (one row per image).

Columns used: img_id (the image file name), patient_id (the leakage group: a patient never straddles the
split), diagnostic (a code, below), and when present region (body site) and fitspatrick (the dataset's own
spelling of the skin type column). Images are looked up by file name anywhere under `data.images`, since the
dataset ships them in several `imgs_part_*` folders.
"""

from __future__ import annotations

import os
from pathlib import Path

from magic_align.data.records import (
    LoadProblems, Record, find_duplicate_ids, normalise_region, parse_skin_type, read_csv_rows, safe_id,
)

REQUIRED = ("img_id", "patient_id", "diagnostic")
OPTIONAL = ("region", "fitspatrick")

# Diagnostic codes -> checklist condition names. The paper's 4-class task keeps ACK, BCC, MEL and SCC
# (the N largest classes rule picks them by count, NEV and SEK being present but less used).
DIAGNOSES = {
    "ACK": "actinic keratosis",
    "BCC": "basal cell carcinoma",
    "MEL": "melanoma",
    "SCC": "squamous cell carcinoma",
    "NEV": "melanocytic nevus",
    "SEK": "seborrheic keratosis",
}


def index_images(images: Path) -> dict[str, Path]:
    """File name -> path for every file under `images` (first one wins)."""
    found: dict[str, Path] = {}
    for folder, _, names in os.walk(images):
        for name in names:
            found.setdefault(name, Path(folder) / name)
    return found


def load_padufes(csv_path: Path, images: Path, problems: LoadProblems | None = None) -> list[Record]:
    problems = problems if problems is not None else LoadProblems()
    source = str(csv_path)
    files = index_images(images) if images.is_dir() else {}
    records = []
    for row, fields in read_csv_rows(csv_path, REQUIRED, "PAD-UFES-20", OPTIONAL):
        img_id, patient, code = fields["img_id"], fields["patient_id"], fields["diagnostic"].upper()
        if not img_id or not patient:
            problems.add(source, row, "empty img_id or patient_id; skipped")
            continue
        if code not in DIAGNOSES:
            problems.add(source, row, f"diagnostic {fields['diagnostic']!r} is not one of {', '.join(DIAGNOSES)}; skipped")
            continue
        skin_type = parse_skin_type(fields.get("fitspatrick"))
        if skin_type is None:
            problems.note(source, row, f"fitspatrick {fields['fitspatrick']!r} is not 1-6; taken as unknown")
            skin_type = -1
        records.append(Record(
            id=safe_id(Path(img_id).stem), path=files.get(img_id, images / img_id), label=DIAGNOSES[code],
            skin_type=skin_type, region=normalise_region(fields.get("region")), group=patient,
            row=row, source=source,
        ))
    return find_duplicate_ids(records, problems)
