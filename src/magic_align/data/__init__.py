"""Datasets as records: `load_records(config.data, run_paths)` reads whichever dataset `data.kind` names.

Each kind is a `DataKind` in the `data_kinds` registry (`magic_align.plugins`). Built in: fitzpatrick17k
(CSV + `<md5hash>.jpg` folder), scin and pad-ufes-20 (their CSVs) and folder (one folder per class, or a flat
folder of unlabeled images). Plug-ins add their own (the demo's `procedural` draws its dataset into
`run/data/procedural/`). See docs/data.md and docs/extending.md.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from magic_align import plugins
from magic_align.data.fitzpatrick import load_fitzpatrick
from magic_align.data.folder import load_folder
from magic_align.data.padufes import load_padufes
from magic_align.data.records import DataError, LoadProblems, Record, match_labels, safe_id
from magic_align.data.scin import load_scin

if TYPE_CHECKING:
    from magic_align.config import DataConfig
    from magic_align.run import RunPaths

__all__ = ["DataError", "DataKind", "LoadProblems", "Record", "load_records", "require_settings"]

# The columns of a published split file that name an image, and the record id they give (data/split.py).
SplitKey = tuple[tuple[str, ...], Callable[[dict[str, str]], str]]


@dataclass(frozen=True)
class DataKind:
    """How one dataset layout becomes records.

    `load(data_cfg, run_paths, problems)` returns the records (`run_paths` is None outside a run; rows it
    skips go to `problems`). `split_key(header)`, when the kind reads published split files (`data.split_dir`),
    gives the columns of a split file with that header which name an image, and the record id they give.
    `locked_set(data_cfg, run_paths, problems)`, when given, returns a locked validation set of the kind's own,
    drawn apart from the dataset (the demo: another procedural seed); the whole test split is then the tuning set
    (data/split.py, docs/evaluate.md). `given_split(data_cfg, run_paths, problems)`, when given, returns the
    dataset's own (train, test) records when the configuration asks for one (the demo's skewed, scarce task), or
    None to draw the split as usual; `load` must return the records of both sides."""

    load: Callable[["DataConfig", "RunPaths | None", LoadProblems], list[Record]]
    split_key: Callable[[set[str]], SplitKey] | None = None
    locked_set: Callable[["DataConfig", "RunPaths | None", LoadProblems], list[Record]] | None = None
    given_split: Callable[["DataConfig", "RunPaths | None", LoadProblems],
                          tuple[list[Record], list[Record]] | None] | None = None


def load_records(data_cfg: "DataConfig", paths: "RunPaths | None" = None, *,
                 conditions: Collection[str] | None = None, problems: LoadProblems | None = None) -> list[Record]:
    """Read the configured dataset as records.

    `conditions` (the checklist's condition names), when given, renames labels that differ from them only in
    case, underscores or hyphens. Rows that had to be skipped are added to `problems` (when given).
    """
    problems = problems if problems is not None else LoadProblems()
    records = data_kind(data_cfg.kind).load(data_cfg, paths, problems)
    if not records:
        raise DataError(f"the {data_cfg.kind} dataset has no usable rows ({len(problems)} skipped); "
                        "see `magic data check`")
    if conditions is not None:
        records = match_labels(records, conditions)
    return records


def data_kind(name: str) -> DataKind:
    kind = plugins.data_kinds.find(name)
    if kind is None:
        raise DataError(f"data.kind = {name!r} is not a known data kind; expected one of {plugins.data_kinds.names()}")
    return kind


def require_settings(data_cfg: "DataConfig", needs: str, csv: bool = False, images: bool = False) -> None:
    """Refuse a configuration that leaves `data.csv` / `data.images` unset when the kind needs them."""
    missing = [name for name, needed, value in (("data.csv", csv, data_cfg.csv), ("data.images", images, data_cfg.images))
               if needed and value is None]
    if missing:
        raise DataError(f"data.kind = {data_cfg.kind!r} needs {' and '.join(missing)} to be set: {needs}")


# ----------------------------------------------------------------------------------------- built-in kinds
def _fitzpatrick(data_cfg: "DataConfig", paths: "RunPaths | None", problems: LoadProblems) -> list[Record]:
    require_settings(data_cfg, "data.csv (the Fitzpatrick17k CSV) and data.images (the folder of <md5hash>.jpg files)",
                     csv=True, images=True)
    return load_fitzpatrick(Path(data_cfg.csv), Path(data_cfg.images), problems)


def _scin(data_cfg: "DataConfig", paths: "RunPaths | None", problems: LoadProblems) -> list[Record]:
    require_settings(data_cfg, "data.csv (columns case_id, image_path, label); data.images is the folder "
                     "image_path is relative to", csv=True)
    return load_scin(Path(data_cfg.csv), Path(data_cfg.images) if data_cfg.images else None, problems)


def _padufes(data_cfg: "DataConfig", paths: "RunPaths | None", problems: LoadProblems) -> list[Record]:
    require_settings(data_cfg, "data.csv (the PAD-UFES-20 metadata.csv) and data.images (the folder holding the "
                     "images)", csv=True, images=True)
    return load_padufes(Path(data_cfg.csv), Path(data_cfg.images), problems)


def _folder(data_cfg: "DataConfig", paths: "RunPaths | None", problems: LoadProblems) -> list[Record]:
    require_settings(data_cfg, "data.images (one sub-folder per class, or a flat folder of unlabeled images)",
                     images=True)
    return load_folder(Path(data_cfg.images), problems)


def md5hash_split_key(header: set[str]) -> SplitKey:
    """Split files in the Fitzpatrick17k layout: the `md5hash` column names the image."""
    return ("md5hash",), lambda row: safe_id(row["md5hash"])


def _padufes_split_key(header: set[str]) -> SplitKey:
    if "img_id" in header:  # the dataset's own metadata.csv spelling
        return ("img_id",), lambda row: safe_id(Path(row["img_id"]).stem)
    return ("image_path",), lambda row: safe_id(Path(row["image_path"]).stem)


def _scin_split_key(header: set[str]) -> SplitKey:
    return ("case_id", "image_path"), lambda row: safe_id(f"{row['case_id']}-{Path(row['image_path']).stem}")


plugins.data_kinds.register("fitzpatrick17k", DataKind(_fitzpatrick, md5hash_split_key))
plugins.data_kinds.register("scin", DataKind(_scin, _scin_split_key))
plugins.data_kinds.register("pad-ufes-20", DataKind(_padufes, _padufes_split_key))
plugins.data_kinds.register("folder", DataKind(_folder))
