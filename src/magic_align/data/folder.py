"""Image folders: one sub-folder per class (`root/<condition>/*.jpg`), or a flat folder of unlabeled images.

A flat folder (images directly under the root, no class folders) gives unlabeled records (label None), the
extra I2I sources of MAGIC-A. Class folder names are labels (underscores and hyphens are matched to the
checklist's spelling). Hidden files and files that are not images by extension are ignored.
"""

from __future__ import annotations

from pathlib import Path

from magic_align.data.records import DataError, LoadProblems, Record, find_duplicate_ids, normalise_label, safe_id

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        path for path in pattern
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def load_folder(root: Path, problems: LoadProblems | None = None) -> list[Record]:
    """Class folders if there are any, else the flat folder's images as unlabeled records."""
    problems = problems if problems is not None else LoadProblems()
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (set data.images to a folder with one "
                        "sub-folder per class, or to a flat folder of images)")
    class_folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_folders:
        return load_unlabeled_folder(root, problems)
    loose = _images_in(root, recursive=False)
    if loose:
        problems.add(str(root), 0, f"{len(loose)} image(s) directly in the root, outside any class folder; ignored")
    records = []
    for folder in class_folders:
        label = normalise_label(folder.name)
        for path in _images_in(folder, recursive=True):
            record_id = safe_id(f"{folder.name}-{path.relative_to(folder).with_suffix('')}")
            records.append(Record(id=record_id, path=path, label=label, group=record_id, source=str(root)))
    if not records:
        raise DataError(f"{root}: the class folders {[f.name for f in class_folders][:5]} hold no images "
                        f"(expected files ending in {', '.join(sorted(IMAGE_SUFFIXES))})")
    return find_duplicate_ids(records, problems)


def load_unlabeled_folder(root: Path, problems: LoadProblems | None = None) -> list[Record]:
    """Every image directly in `root` as an unlabeled record (label None), e.g. MAGIC-A's extra sources."""
    problems = problems if problems is not None else LoadProblems()
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    records = [
        Record(id=safe_id(path.stem), path=path, label=None, group=safe_id(path.stem), source=str(root))
        for path in _images_in(root, recursive=False)
    ]
    if not records:
        raise DataError(f"{root} holds no images (expected files ending in {', '.join(sorted(IMAGE_SUFFIXES))})")
    return find_duplicate_ids(records, problems)
