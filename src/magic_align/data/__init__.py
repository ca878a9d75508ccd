"""Datasets as records: `load_records(config.data, run_paths)` reads whichever dataset the config names.

Kinds: fitzpatrick17k (CSV + `<md5hash>.jpg` folder), scin and pad-ufes-20 (their CSVs), folder (one folder
per class, or a flat folder of unlabeled images) and procedural (the demo domain, generated into
`run/data/procedural/` on first use and read with the Fitzpatrick loader). See docs/data.md.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from magic_align.data.records import DataError, LoadProblems, Record, match_labels

if TYPE_CHECKING:
    from magic_align.config import DataConfig
    from magic_align.run import RunPaths

__all__ = ["DataError", "LoadProblems", "Record", "load_records", "procedural_csv"]

_NEEDS = {
    "fitzpatrick17k": "data.csv (the Fitzpatrick17k CSV) and data.images (the folder of <md5hash>.jpg files)",
    "scin": "data.csv (columns case_id, image_path, label); data.images is the folder image_path is relative to",
    "pad-ufes-20": "data.csv (the PAD-UFES-20 metadata.csv) and data.images (the folder holding the images)",
    "folder": "data.images (one sub-folder per class, or a flat folder of unlabeled images)",
}


def load_records(data_cfg: "DataConfig", paths: "RunPaths | None" = None, *,
                 conditions: Collection[str] | None = None, problems: LoadProblems | None = None) -> list[Record]:
    """Read the configured dataset as records.

    `conditions` (the checklist's condition names), when given, renames labels that differ from them only in
    case, underscores or hyphens. Rows that had to be skipped are added to `problems` (when given).
    """
    from magic_align.data.fitzpatrick import load_fitzpatrick
    from magic_align.data.folder import load_folder
    from magic_align.data.padufes import load_padufes
    from magic_align.data.scin import load_scin

    problems = problems if problems is not None else LoadProblems()
    kind = data_cfg.kind
    if kind == "procedural":
        csv_path = procedural_csv(data_cfg, paths)
        images = data_cfg.images or (csv_path.parent / "images" if (csv_path.parent / "images").is_dir() else csv_path.parent)
        records = load_fitzpatrick(csv_path, Path(images), problems)
    elif kind == "folder":
        _require(data_cfg, kind, images=True)
        records = load_folder(Path(data_cfg.images), problems)
    elif kind == "fitzpatrick17k":
        _require(data_cfg, kind, csv=True, images=True)
        records = load_fitzpatrick(Path(data_cfg.csv), Path(data_cfg.images), problems)
    elif kind == "scin":
        _require(data_cfg, kind, csv=True)
        records = load_scin(Path(data_cfg.csv), Path(data_cfg.images) if data_cfg.images else None, problems)
    elif kind == "pad-ufes-20":
        _require(data_cfg, kind, csv=True, images=True)
        records = load_padufes(Path(data_cfg.csv), Path(data_cfg.images), problems)
    else:  # the config's Literal rules this out; kept for a config built by hand
        raise DataError(f"data.kind = {kind!r} is not one of fitzpatrick17k, scin, pad-ufes-20, folder, procedural")
    if not records:
        raise DataError(f"the {kind} dataset has no usable rows ({len(problems)} skipped); see `magic data check`")
    if conditions is not None:
        records = match_labels(records, conditions)
    return records


def _require(data_cfg: "DataConfig", kind: str, csv: bool = False, images: bool = False) -> None:
    missing = [name for name, needed, value in (("data.csv", csv, data_cfg.csv), ("data.images", images, data_cfg.images))
               if needed and value is None]
    if missing:
        raise DataError(f"data.kind = {kind!r} needs {' and '.join(missing)} to be set: {_NEEDS[kind]}")


def procedural_csv(data_cfg: "DataConfig", paths: "RunPaths | None") -> Path:
    """The demo domain's CSV: `data.csv` when set, else generated into run/data/procedural/ once.

    A stamp file records what was generated (images per class and seed); a changed setting regenerates.
    """
    if data_cfg.csv is not None:
        return Path(data_cfg.csv)
    if paths is None:
        raise DataError("data.kind = 'procedural' needs a run directory to generate the demo images into "
                        "(or data.csv pointing at an already generated procedural CSV)")
    out_dir = paths.data / "procedural"
    stamp_path = out_dir / "generated.json"
    wanted = {"per_class": data_cfg.procedural_per_class, "seed": data_cfg.procedural_seed}
    if stamp_path.is_file():
        stamp = json.loads(stamp_path.read_text())
        csv_path = out_dir / stamp.get("csv", "")
        if {k: stamp.get(k) for k in wanted} == wanted and csv_path.is_file():
            return csv_path
    from magic_align.data.procedural import generate_dataset  # written separately; heavy imports stay lazy
    from magic_align.run import atomic_write_text

    csv_path = Path(generate_dataset(out_dir, data_cfg.procedural_per_class, data_cfg.procedural_seed))
    atomic_write_text(stamp_path, json.dumps({**wanted, "csv": csv_path.name}))
    return csv_path
