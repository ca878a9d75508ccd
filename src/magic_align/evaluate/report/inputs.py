"""The report's readers of run files other than the ledger: JSON outputs, `eval/alignment.json`, the synthetic
manifests and the trainers' `metrics.csv`. They tolerate what a live run leaves behind and raise `ReportError`
naming the file and field for anything malformed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from magic_align.checklists.schema import load_checklists
from magic_align.config import RunConfig
from magic_align.data import load_records
from magic_align.errors import MagicError
from magic_align.evaluate.alignment import AlignmentError, require_locked
from magic_align.run import RunPaths


class ReportError(MagicError, ValueError):
    """An input of the report that cannot be read; the message names the file and field."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path} is not valid JSON: {error}") from None


def _expect(condition: bool, where: str, expected: str) -> None:
    if not condition:
        raise ReportError(f"{where}: expected {expected}")


def read_alignment(path: Path) -> dict:
    """`eval/alignment.json`, checked against the format in docs/formats.md (errors name the field). The report
    states its figures, so a file made from any set but the locked one is refused."""
    data = read_json(path)
    _expect(isinstance(data, dict), str(path), "a JSON object with 'settings', 'differences' and 'units'")
    try:
        require_locked(data, path)
    except AlignmentError as error:
        raise ReportError(str(error)) from None
    settings = data.get("settings", {})
    _expect(isinstance(settings, dict), f"{path}: settings", "an object {setting: {mean_items, images}}")
    for name, entry in settings.items():
        _expect(isinstance(entry, dict), f"{path}: settings.{name}", "an object")
        if "mean_items" in entry:
            _expect(isinstance(entry["mean_items"], dict), f"{path}: settings.{name}.mean_items",
                    "an object {value, low, high}")
    differences = data.get("differences", {})
    _expect(isinstance(differences, dict), f"{path}: differences", "an object {\"dpo - i2i\": {value, low, high}}")
    for name, entry in differences.items():
        _expect(isinstance(entry, dict), f"{path}: differences.{name}", "an object {value, low, high}")
    units = data.get("units", [])
    _expect(isinstance(units, list), f"{path}: units", "a list of {source, target, images, scores}")
    for index, unit in enumerate(units):
        where = f"{path}: units[{index}]"
        _expect(isinstance(unit, dict), where, "an object {source, target, images, scores}")
        _expect(isinstance(unit.get("target"), str), f"{where}.target", "the target condition (a string)")
        _expect(isinstance(unit.get("images", {}), dict), f"{where}.images", "an object {setting: image path}")
        _expect(isinstance(unit.get("scores", {}), dict), f"{where}.scores", "an object {setting: items met}")
    return data


def find_manifests(paths: RunPaths) -> dict[str, Path]:
    """Synthetic manifests by setting: synthetic/<setting>/manifest.csv, and synthetic/manifest.csv (the
    pipeline's synthesize stage, made with the aligned model) as "aligned"."""
    found = {}
    if (paths.synthetic / "manifest.csv").is_file():
        found["aligned"] = paths.synthetic / "manifest.csv"
    if paths.synthetic.is_dir():
        for folder in sorted(paths.synthetic.iterdir()):
            if (folder / "manifest.csv").is_file():
                found[folder.name] = folder / "manifest.csv"
    return found


def read_manifest_rows(path: Path) -> list[dict]:
    """The rows of a synthetic manifest (only the columns the grids use are required; synthesize.read_manifest
    would pull in the sampler, and torch with it, for a CSV read)."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("synthetic_id", "path", "source_id", "target_label") if c not in (reader.fieldnames or [])]
        if missing:
            raise ReportError(f"{path}: missing column(s) {', '.join(missing)}; expected a synthetic manifest")
        return list(reader)


def read_log_columns(path: Path) -> dict[str, list[float]]:
    """A trainer's `metrics.csv` (train/session.py `MetricsLogger`) as numeric columns, "step" included.

    Unlike `train.session.read_metrics` this tolerates what a live run can leave behind (a half-written last
    row, an empty cell, a non-numeric column) by reading such cells as NaN, and it does not import torch."""
    columns: dict[str, list[float]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        names = [name for name in (reader.fieldnames or []) if name]
        if "step" not in names:
            raise ReportError(f"{path}: no 'step' column (header {names}); expected a MetricsLogger metrics.csv")
        for name in names:
            columns[name] = []
        for row in reader:
            try:
                step = float(row.get("step") or "nan")
            except ValueError:
                continue
            if not math.isfinite(step):
                continue  # a row cut off before its step cannot be placed on the curve
            for name in names:
                text = row.get(name)
                try:
                    columns[name].append(float(text) if text not in (None, "") else math.nan)
                except ValueError:
                    columns[name].append(math.nan)
    return columns


def load_report_checklists(config: RunConfig, problems: list[str]):
    try:
        return load_checklists(config.judge.checklist)
    except Exception as error:
        problems.append(f"checklists {config.judge.checklist!r} could not be loaded ({error}); "
                        "item names and agreement tables are left out")
        return None


def source_paths(config: RunConfig, paths: RunPaths, problems: list[str]) -> dict[str, Path]:
    """Source image paths by record id. Only once the run has its split (synthesis makes it): before that,
    reading the records could mean generating the demo dataset, which a report must never do."""
    if not (paths.data / "split.csv").is_file():
        return {}
    try:
        return {record.id: Path(record.path) for record in load_records(config.data, paths)}
    except Exception as error:
        problems.append(f"source images for the grids could not be found ({error}); the source column is empty")
        return {}
