"""`magic report`: one self-contained HTML page, `run/report/index.html`, about everything a run has made so far.

The page reads only the run directory, never a model: the ledger (samples, verdicts, reviews, pairs, stage
status), `eval/metrics.json` (the evaluate stage), `eval/alignment.json` (the alignment comparison, format
in docs/formats.md), the synthetic manifests, the training logs (`logs/<stage>/.../metrics.csv`) and the
resolved `config.toml`. Every image and plot is embedded as base64 (images as small JPEG thumbnails,
plots as PNG drawn with matplotlib's Agg backend), and the CSS is inline, so the one file works when mailed
or opened without network.

Each section is collected on its own. A section whose input does not exist yet says so; a section whose
input is malformed says what is wrong (file and field) in a "problems" box at the top, and the other
sections are still written, so a partial or damaged run still gets a useful report.
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import math
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from magic_align.config import RunConfig, dump_config
from magic_align.run import RunPaths, atomic_write_text
from magic_align.errors import MagicError

THUMBNAIL_SIDE = 192  # px; big enough to judge a lesion, small enough that 20 conditions x 4 units mail well
THUMBNAIL_QUALITY = 85
MAX_AGREEMENT_PAIRS = 6  # judge-vs-judge comparisons shown (every pair of judges grows quadratically)
MAX_CURVE_METRICS = 9  # subplots per training log
STAGE_ORDER = ("finetune", "dpo", "rft")  # training logs in pipeline order; others follow alphabetically

# Friendly names for the synthetic settings of the evaluate stage and of the alignment comparison.
SETTING_LABELS = {
    "real": "real",
    "t2i": "+ T2I",
    "i2i": "I2I, before alignment",
    "unaligned": "before alignment",
    "magic-dpo": "MAGIC-DPO",
    "dpo": "MAGIC-DPO",
    "magic-rft": "MAGIC-RFT",
    "rft": "MAGIC-RFT",
    "aligned": "aligned (synthesize stage)",
}
BEFORE_SETTINGS = ("i2i", "unaligned", "t2i")  # "before alignment" columns, most comparable first
AFTER_SETTINGS = ("magic-dpo", "dpo", "magic-rft", "rft", "aligned")
SETTING_ORDER = ("real", "t2i", "i2i", "unaligned", "magic-dpo", "dpo", "magic-rft", "rft", "aligned")


class ReportError(MagicError, ValueError):
    """An input of the report that cannot be read; the message names the file and field."""


# =========================================================================================== formatting
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_number(value: Any, digits: int = 2, percent: bool = False) -> str:
    """A number for a table cell: fixed digits, as a percentage when asked, an en dash when unknown."""
    if not _finite(value):
        return "–"
    return f"{value * 100:.{digits}f}" if percent else f"{value:.{digits}f}"


def format_estimate(estimate: Mapping | None, digits: int = 2, percent: bool = False) -> str:
    """{"value", "low", "high"} as "0.52 [0.48, 0.55]" (percent: "52.0 [48.0, 55.0]"); the interval is left
    out when it is unknown (one seed, no resamples), the whole cell is an en dash when the value is."""
    if not isinstance(estimate, Mapping):
        return "–"
    value = format_number(estimate.get("value"), digits, percent)
    if value == "–":
        return value
    low, high = estimate.get("low"), estimate.get("high")
    if not (_finite(low) and _finite(high)):
        return value
    return f"{value} [{format_number(low, digits, percent)}, {format_number(high, digits, percent)}]"


def parse_seconds(detail: str) -> float | None:
    """The duration `pipeline.run_all` writes as a stage's detail ("12.3 s"); None for any other detail."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*s\s*", detail or "")
    return float(match.group(1)) if match else None


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)} min {rest:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes)} min"


def setting_label(name: str) -> str:
    return SETTING_LABELS.get(name, name)


def _setting_rank(name: str) -> tuple[int, str]:
    base = name.split("+")[0]
    return (SETTING_ORDER.index(base) if base in SETTING_ORDER else len(SETTING_ORDER), name)


# =========================================================================================== pure parts
def pair_outcome_counts(pairs: Iterable, undecided: Mapping[int, int] | None = None) -> list[dict]:
    """Per round: pairs, one wins (the training signal), both win, both lose, ties, pairs from human reviews,
    and the verdicts left out because an item stayed undecided (`undecided`: round -> count).

    `pairs` are `ledger.PairRow`s (anything with round, outcome_a, outcome_b, tie, source)."""
    rounds: dict[int, dict] = {}

    def round_counts(round_index: int) -> dict:
        return rounds.setdefault(round_index, {"round": round_index, "pairs": 0, "one_wins": 0, "both_win": 0,
                                               "both_lose": 0, "human": 0, "undecided": 0})

    for round_index, count in (undecided or {}).items():
        round_counts(int(round_index))["undecided"] = int(count)
    for pair in pairs:
        counts = round_counts(int(pair.round))
        counts["pairs"] += 1
        if not pair.tie:
            counts["one_wins"] += 1
        elif pair.outcome_a == 1:
            counts["both_win"] += 1
        else:
            counts["both_lose"] += 1
        counts["human"] += int(pair.source == "human")
    result = []
    for round_index in sorted(rounds):
        counts = rounds[round_index]
        counts["ties"] = counts["both_win"] + counts["both_lose"]
        counts["signal_share"] = counts["one_wins"] / counts["pairs"] if counts["pairs"] else float("nan")
        result.append(counts)
    return result


def read_log_columns(path: Path) -> dict[str, list[float]]:
    """A trainer's `metrics.csv` (train/loop.py `MetricsLogger`) as numeric columns, "step" included.

    Unlike `train.loop.read_metrics` this tolerates what a live run can leave behind (a half-written last
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


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average that skips NaN and is debiased at the start (the first value is itself)."""
    result, average, norm = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average = weight * average + (1 - weight) * value
            norm = weight * norm + (1 - weight)
        result.append(average / norm if norm else math.nan)
    return result


def _curve_metric_order(names: Iterable[str]) -> list[str]:
    """Loss first, then the method's own statistics, then the optimizer's (grad norm, learning rate)."""
    names = [name for name in names if name != "step"]
    tail = [name for name in ("grad_norm", "lr") if name in names]
    head = [name for name in names if name == "loss"]
    middle = [name for name in names if name not in head and name not in tail]
    return (head + middle + tail)[:MAX_CURVE_METRICS]


# ============================================================================================ embedding
def image_data_uri(path: Path, max_side: int = THUMBNAIL_SIDE) -> str:
    """A JPEG thumbnail of an image as a data URI (raises `BadImageError` naming the file when unreadable)."""
    from PIL import Image

    from magic_align.data.images import load_image

    image = load_image(path)
    image.thumbnail((max_side, max_side), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_data_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: the report is written on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def plot_training_log(name: str, columns: Mapping[str, Sequence[float]]) -> str | None:
    """One PNG (data URI) with a small plot per metric of a training log; None when nothing can be drawn."""
    metrics = [m for m in _curve_metric_order(columns) if any(math.isfinite(v) for v in columns[m])]
    if not metrics or not columns.get("step"):
        return None
    plt = _pyplot()
    per_row = min(3, len(metrics))
    rows = math.ceil(len(metrics) / per_row)
    figure, axes = plt.subplots(rows, per_row, figsize=(3.6 * per_row, 2.5 * rows), squeeze=False)
    steps = list(columns["step"])
    for axis, metric in zip(axes.flat, metrics):
        values = list(columns[metric])
        points = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if len(points) > 50:  # noisy per-step curves: the raw values faint, a moving average on top
            axis.plot(xs, ys, color="#4c78a8", alpha=0.3, linewidth=0.8)
            axis.plot(xs, smooth(ys, 0.9), color="#1f4e79", linewidth=1.6)
        else:
            axis.plot(xs, ys, color="#1f4e79", linewidth=1.6, marker="o" if len(points) < 20 else None, markersize=3)
        axis.set_title(metric, fontsize=9)
        axis.tick_params(labelsize=7)
        axis.grid(True, alpha=0.3)
        axis.set_xlabel("step", fontsize=7)
        if metric == "lr":
            axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    figure.suptitle(name, fontsize=10)
    figure.tight_layout()
    uri = figure_data_uri(figure)
    plt.close(figure)
    return uri


# ============================================================================================ collection
@dataclass
class ReportContext:
    """Everything the template shows: `sections` holds the sections that have data; a section whose input
    does not exist yet is absent there and `missing[key]` says what would fill it."""

    title: str
    run_dir: str
    generated_at: str
    sections: dict[str, Any] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    headline: list[dict] = field(default_factory=list)


class _Images:
    """Embeds images, each file once, and remembers the ones that could not be read (no broken <img>)."""

    def __init__(self, root: Path, problems: list[str]) -> None:
        self.root = root
        self.problems = problems
        self._cache: dict[Path, str | None] = {}

    def resolve(self, path: str | Path) -> Path:
        path = Path(path)
        return path if path.is_absolute() else self.root / path

    def uri(self, path: str | Path | None, where: str) -> str | None:
        if not path:
            return None
        resolved = self.resolve(path)
        if resolved not in self._cache:
            try:
                self._cache[resolved] = image_data_uri(resolved)
            except Exception as error:  # a missing or broken image must not cost the page
                self._cache[resolved] = None
                self.problems.append(f"{where}: image {path} could not be embedded ({error})")
        return self._cache[resolved]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{path} is not valid JSON: {error}") from None


def _checklists(config: RunConfig, problems: list[str]):
    try:
        from magic_align.checklists.schema import load_checklists

        return load_checklists(config.judge.checklist)
    except Exception as error:
        problems.append(f"checklists {config.judge.checklist!r} could not be loaded ({error}); "
                        "item names and agreement tables are left out")
        return None


def _display_name(checklists, condition: str) -> str:
    if checklists is not None and condition in checklists:
        return checklists[condition].display_name
    return condition


# ------------------------------------------------------------------------------------ image grids
def _expect(condition: bool, where: str, expected: str) -> None:
    if not condition:
        raise ReportError(f"{where}: expected {expected}")


def read_alignment(path: Path) -> dict:
    """`eval/alignment.json`, checked against the format in docs/formats.md (errors name the field)."""
    data = _read_json(path)
    _expect(isinstance(data, dict), str(path), "a JSON object with 'settings', 'differences' and 'units'")
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


def grid_from_alignment(data: dict, images: _Images, checklists, per_condition: int) -> dict:
    """Grids per target condition from the alignment comparison: source, then each setting's image."""
    settings = sorted({name for unit in data.get("units", []) for name in unit.get("images", {})} |
                      set(data.get("settings", {})), key=_setting_rank)
    conditions: dict[str, list] = {}
    for index, unit in enumerate(data.get("units", [])):
        rows = conditions.setdefault(unit["target"], [])
        if len(rows) >= per_condition:
            continue
        where = f"eval/alignment.json units[{index}]"
        cells = []
        for name in settings:
            score = unit.get("scores", {}).get(name)
            cells.append({"uri": images.uri(unit.get("images", {}).get(name), where),
                          "score": score if _finite(score) else None})
        rows.append({"source": images.uri(unit.get("source"), where), "source_label": unit.get("source_label"),
                     "cells": cells})
    return {"origin": "eval/alignment.json (held-out sources, paired)", "columns": [setting_label(s) for s in settings],
            "n_items": data.get("n_items"),
            "conditions": [{"condition": c, "name": _display_name(checklists, c), "rows": rows}
                           for c, rows in sorted(conditions.items())]}


def _manifests(paths: RunPaths) -> dict[str, Path]:
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


def _read_manifest_rows(path: Path) -> list[dict]:
    """The rows of a synthetic manifest (only the columns the grids use are required; synthesize.read_manifest
    would pull in the sampler, and torch with it, for a CSV read)."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("synthetic_id", "path", "source_id", "target_label") if c not in (reader.fieldnames or [])]
        if missing:
            raise ReportError(f"{path}: missing column(s) {', '.join(missing)}; expected a synthetic manifest")
        return list(reader)


def _source_paths(config: RunConfig, paths: RunPaths, problems: list[str]) -> dict[str, Path]:
    """Source image paths by record id. Only once the run has its split (synthesis makes it): before that,
    reading the records could mean generating the demo dataset, which a report must never do."""
    if not (paths.data / "split.csv").is_file():
        return {}
    try:
        from magic_align.data import load_records

        return {record.id: Path(record.path) for record in load_records(config.data, paths)}
    except Exception as error:
        problems.append(f"source images for the grids could not be found ({error}); the source column is empty")
        return {}


def grid_from_manifests(config: RunConfig, paths: RunPaths, manifests: dict[str, Path], images: _Images,
                        checklists, per_condition: int, problems: list[str]) -> dict | None:
    """Grids from the synthetic sets: one before-alignment set and the after-alignment sets, matched by
    synthetic id (the same source and target: targets are drawn from the source id and index alone)."""
    before = [name for name in BEFORE_SETTINGS if name in manifests][:1]
    after = [name for name in AFTER_SETTINGS if name in manifests]
    chosen = before + after
    if not chosen:
        return None
    tables = {}
    for name in chosen:
        try:
            tables[name] = {row["synthetic_id"]: row for row in _read_manifest_rows(manifests[name])}
        except ReportError as error:
            problems.append(str(error))
    chosen = [name for name in chosen if name in tables]
    if not chosen:
        return None
    ids = [i for i in tables[chosen[0]] if all(i in tables[name] for name in chosen)]
    sources = _source_paths(config, paths, problems)
    conditions: dict[str, list] = {}
    for synthetic_id in ids:
        first = tables[chosen[0]][synthetic_id]
        rows = conditions.setdefault(first["target_label"], [])
        if len(rows) >= per_condition:
            continue
        cells = []
        for name in chosen:
            row = tables[name][synthetic_id]
            score = row.get("verdict_score")
            cells.append({"uri": images.uri(row["path"], f"{manifests[name].relative_to(paths.root)} {synthetic_id}"),
                          "score": float(score) if score not in (None, "") else None})
        source = sources.get(first["source_id"])
        rows.append({"source": images.uri(source, f"source {first['source_id']}") if source else None,
                     "source_label": first.get("source_label") or None, "cells": cells})
    origin = ", ".join(str(manifests[name].relative_to(paths.root)) for name in chosen)
    return {"origin": f"synthetic manifests ({origin}), matched by synthetic id",
            "columns": [setting_label(name) for name in chosen], "n_items": None,
            "conditions": [{"condition": c, "name": _display_name(checklists, c), "rows": rows}
                           for c, rows in sorted(conditions.items())]}


def alignment_summary(data: dict) -> dict:
    settings = [{"name": name, "label": setting_label(name), "mean_items": entry.get("mean_items"),
                 "pass_share": entry.get("pass_share"), "n": entry.get("n", len(entry.get("images", [])) or None)}
                for name, entry in sorted(data.get("settings", {}).items(), key=lambda kv: _setting_rank(kv[0]))]
    differences = [{"name": name, "estimate": entry, "units": entry.get("units"),
                    "excludes_zero": _finite(entry.get("low")) and _finite(entry.get("high"))
                    and (entry["low"] > 0 or entry["high"] < 0)}
                   for name, entry in data.get("differences", {}).items()]
    return {"settings": settings, "differences": differences, "units": len(data.get("units", [])),
            "judge": data.get("judge"), "notes": [str(note) for note in data.get("notes", [])]}


# ------------------------------------------------------------------------------------ pass rates
def pass_rates_from_metrics(pass_rate: Mapping, checklists) -> list[dict]:
    """metrics.json's {setting: {grader: summary}} pivoted to one table per grader: settings as columns,
    overall and per-condition rows, and per-item rows."""
    graders: dict[str, dict[str, Mapping]] = {}
    for setting, by_grader in pass_rate.items():
        for grader, summary in (by_grader or {}).items():
            graders.setdefault(grader, {})[setting] = summary
    tables = []
    for grader, by_setting in graders.items():
        settings = sorted(by_setting, key=_setting_rank)
        conditions = sorted({c for s in settings for c in by_setting[s].get("per_condition", {})})
        rows = [{"name": "all conditions", "strong": True,
                 "cells": [_pass_cell(by_setting[s]) for s in settings]}]
        for condition in conditions:
            rows.append({"name": _display_name(checklists, condition), "strong": False,
                         "cells": [_pass_cell(by_setting[s].get("per_condition", {}).get(condition)) for s in settings]})
        items = []
        for condition in conditions:
            names = list(dict.fromkeys(name for s in settings
                                       for name in by_setting[s].get("per_item", {}).get(condition, {})))
            for name in names:
                items.append({"condition": _display_name(checklists, condition), "item": name,
                              "text": _item_text(checklists, condition, name),
                              "cells": [by_setting[s].get("per_item", {}).get(condition, {}).get(name) for s in settings]})
        tables.append({"grader": grader, "settings": [setting_label(s) for s in settings], "rows": rows, "items": items})
    return tables


def _pass_cell(summary: Mapping | None) -> dict | None:
    if not summary:
        return None
    return {"n": summary.get("n"), "mean": summary.get("mean_items_met"), "share": summary.get("pass_share")}


def _item_text(checklists, condition: str, item_id: str) -> str:
    if checklists is None or condition not in checklists:
        return ""
    return next((item.text for item in checklists[condition].items if item.id == item_id), "")


def pass_rates_from_ledger(ledger, checklists, resamples: int, seed: int) -> list[dict]:
    """Pass rates of the sampled images per round and grader (each judge, and the expert reviews): round 0
    comes from the preliminary model, later rounds from the policy after each DPO round."""
    from magic_align.evaluate.passrate import pass_rate_summary

    item_ids = {c.condition: [item.id for item in c.items] for c in checklists.conditions} if checklists else None

    def lined_up(condition: str, items: list) -> list:
        if checklists is not None and condition in checklists and len(items) == len(checklists[condition].items):
            return checklists[condition].apply_requires(list(items))
        return list(items)

    per_grader: dict[str, dict[int, tuple[list, list]]] = {}
    for round_index in ledger.rounds():
        latest: dict[tuple[str, str], Any] = {}
        for joined in ledger.verdicts(round=round_index):
            if not joined.sample.synthetic:
                continue
            key = (joined.verdict.judge_id, joined.sample.sample_id)
            if key not in latest or joined.verdict.created_at >= latest[key].verdict.created_at:
                latest[key] = joined
        for (judge_id, _), joined in sorted(latest.items()):
            condition = joined.verdict.condition or joined.sample.target_label
            columns = per_grader.setdefault(judge_id, {}).setdefault(round_index, ([], []))
            columns[0].append(condition)
            columns[1].append(lined_up(condition, joined.verdict.items))
        samples = {s.sample_id: s for s in ledger.samples(round_index)}
        for sample_id, review in ledger.latest_reviews(round=round_index).items():
            sample = samples.get(sample_id)
            if sample is None or not sample.synthetic:
                continue
            columns = per_grader.setdefault("human reviews", {}).setdefault(round_index, ([], []))
            columns[0].append(sample.target_label)
            columns[1].append(lined_up(sample.target_label, review.items))
    tables = []
    for grader, by_round in per_grader.items():
        summaries = {r: pass_rate_summary(c, v, item_ids, resamples, seed) for r, (c, v) in sorted(by_round.items())}
        pivot = {f"round {r}": {grader: summary} for r, summary in summaries.items()}
        table = pass_rates_from_metrics(pivot, checklists)[0]
        table["settings"] = [f"round {r}" + (" (preliminary model)" if r == 0 else f" (after DPO round {r - 1})")
                             for r in summaries]
        tables.append(table)
    return tables


# ------------------------------------------------------------------------------------ ledger tables
def _query(ledger_path: Path, sql: str, parameters: Sequence = ()) -> list[sqlite3.Row]:
    """A read of the documented ledger schema (ledger.py) that `Ledger` has no method for (aggregates)."""
    connection = sqlite3.connect(ledger_path, timeout=60)
    connection.row_factory = sqlite3.Row
    try:
        return connection.execute(sql, tuple(parameters)).fetchall()
    finally:
        connection.close()


def judge_usage(ledger_path: Path) -> list[dict]:
    """Calls, answer statuses, tokens, cost and latency per judge, over every verdict in the ledger."""
    rows = _query(
        ledger_path,
        "SELECT judge_id, COUNT(*) AS calls, SUM(parse_status = 'ok') AS ok, SUM(parse_status = 'partial') AS partial, "
        "SUM(parse_status = 'failed') AS failed, SUM(parse_status = 'refused') AS refused, "
        "SUM(input_tokens) AS input_tokens, SUM(output_tokens) AS output_tokens, SUM(cost_usd) AS cost_usd, "
        "AVG(latency_s) AS latency_s, MIN(created_at) AS first, MAX(created_at) AS last "
        "FROM verdicts GROUP BY judge_id ORDER BY judge_id",
    )
    return [dict(row) for row in rows]


def stage_table(ledger_path: Path) -> list[dict]:
    """Every row of the ledger's stage table, oldest update first, with the duration where the detail has one."""
    rows = _query(ledger_path, "SELECT stage, config_hash, status, detail, updated_at FROM stages ORDER BY updated_at")
    result = []
    for row in rows:
        seconds = parse_seconds(row["detail"])
        result.append({"stage": row["stage"], "status": row["status"], "detail": row["detail"],
                       "seconds": seconds, "duration": format_duration(seconds),
                       "updated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(row["updated_at"]))})
    longest = max((r["seconds"] for r in result if r["seconds"]), default=0.0)
    for row in result:
        row["bar"] = round(100 * row["seconds"] / longest, 1) if row["seconds"] and longest else 0.0
    return result


def agreement_tables(ledger, checklists, configured: str | None, resamples: int, seed: int) -> list[dict]:
    """Each judge against the expert reviews (when there are reviews), and judges against each other."""
    from magic_align.judges.agreement import compare

    judges = ledger.judge_ids()
    if configured in judges:  # the judge the model was trained on first
        judges = [configured] + [j for j in judges if j != configured]
    comparisons = []
    if ledger.reviews():
        comparisons += [(judge, "human") for judge in judges]
    comparisons += list(itertools.combinations(judges, 2))[:MAX_AGREEMENT_PAIRS]
    tables = []
    for judge_id, against in comparisons:
        report = compare(ledger, checklists, judge_id, None, against, None, None, resamples, seed)
        if not report.items:
            continue
        tables.append({
            "judge": judge_id, "against": "expert reviews" if against == "human" else against,
            "images": report.images, "skipped": report.skipped,
            "rows": [{"item": row.item, "n": row.n, "kappa": row.kappa.as_dict(), "agreement": row.agreement.as_dict(),
                      "tpr": row.tpr.as_dict(), "tnr": row.tnr.as_dict()} for row in report.items],
        })
    return tables


# ------------------------------------------------------------------------------------ evaluate stage
def classifier_tables(metrics: Mapping) -> list[dict]:
    """metrics.json's classifier rows grouped by (backbone, mode, group): one table each, settings as rows,
    metrics as columns (best value in bold), and accuracy per Fitzpatrick skin type where known."""
    from magic_align.evaluate.metrics import METRICS

    groups: dict[tuple, list] = {}
    for index, row in enumerate(metrics.get("classifier", [])):
        if not isinstance(row, Mapping) or "setting" not in row:
            raise ReportError(f"eval/metrics.json: classifier[{index}] is not a classifier row (no 'setting')")
        groups.setdefault((row.get("backbone", "?"), row.get("mode", "?"), row.get("group", "full")), []).append(row)
    tables = []
    for (backbone, mode, group), rows in groups.items():
        best = {}
        for name in METRICS:
            values = [r.get(name, {}).get("value") for r in rows if isinstance(r.get(name), Mapping)]
            values = [v for v in values if _finite(v)]
            best[name] = max(values) if len(set(values)) > 1 else None  # all equal: nothing stands out
        skin_types = sorted({k for r in rows for k in (r.get("by_skin_type") or {})}, key=lambda k: int(k))
        table_rows = []
        for row in rows:
            cells = []
            for name in METRICS:
                entry = row.get(name) if isinstance(row.get(name), Mapping) else None
                value = entry.get("value") if entry else None
                cells.append({"text": format_estimate(entry, 1, percent=True),
                              "best": best[name] is not None and _finite(value) and value == best[name]})
            skins = [format_estimate((row.get("by_skin_type") or {}).get(k), 1, percent=True) for k in skin_types]
            table_rows.append({"label": row.get("label") or setting_label(row["setting"]), "setting": row["setting"],
                               "n_real": row.get("n_real"), "n_synthetic": row.get("n_synthetic"),
                               "seeds": row.get("seeds"), "cells": cells, "skins": skins})
        first = rows[0].get("by_skin_type") or {}
        tables.append({
            "backbone": backbone, "mode": str(mode).replace("_", " "), "group": group,
            "metrics": list(METRICS), "rows": table_rows,
            "skin_types": [{"key": k, "name": "unknown" if int(k) < 0 else f"type {k}", "n": first.get(k, {}).get("n")}
                           for k in skin_types],
        })
    return tables


def distance_rows(distances: Mapping) -> list[dict]:
    rows = []
    for setting, entry in sorted(distances.items(), key=lambda kv: _setting_rank(kv[0])):
        if not isinstance(entry, Mapping):
            raise ReportError(f"eval/metrics.json: distances.{setting} is not an object {{fid, kid, ...}}")
        rows.append({"setting": setting_label(setting), "features": entry.get("features", "?"),
                     "n_real": entry.get("n_real"), "n_fake": entry.get("n_fake"),
                     "fid": format_estimate(entry.get("fid"), 2), "kid": format_estimate(entry.get("kid"), 4)})
    return rows


# ------------------------------------------------------------------------------------ training curves
def training_curves(paths: RunPaths, problems: list[str]) -> list[dict]:
    logs = sorted(paths.logs.glob("**/metrics.csv")) if paths.logs.is_dir() else []

    def order(path: Path) -> tuple:
        stage = path.relative_to(paths.logs).parts[0]
        return (STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER), str(path))

    curves = []
    for path in sorted(logs, key=order):
        name = path.parent.relative_to(paths.logs).as_posix()
        try:
            columns = read_log_columns(path)
        except (ReportError, OSError, UnicodeDecodeError, csv.Error) as error:
            problems.append(str(error))
            continue
        steps = columns.get("step", [])
        if not steps:
            continue
        last = {}
        for metric in _curve_metric_order(columns):
            finite = [v for v in columns[metric] if math.isfinite(v)]
            if finite:
                last[metric] = finite[-1]
        curves.append({"name": name, "stage": name.split("/")[0], "steps": int(max(steps)), "rows": len(steps),
                       "plot": plot_training_log(name, columns),
                       "last": [{"metric": m, "value": _format_general(v)} for m, v in last.items()]})
    return curves


def _format_general(value: float) -> str:
    return f"{value:.4g}"


# ============================================================================================== assembly
def collect_report(config: RunConfig, max_units_per_condition: int = 4,
                   progress: Callable[[str], None] | None = None) -> ReportContext:
    """Read everything the run directory holds so far into a `ReportContext` (nothing is written)."""
    say = progress or (lambda _text: None)
    paths = RunPaths(config.run_dir)
    context = ReportContext(title=f"magic-align report: {config.name}", run_dir=str(paths.root.resolve()),
                            generated_at=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    problems = context.problems
    images = _Images(paths.root, problems)
    checklists = _checklists(config, problems)
    resamples, seed = config.evaluate.bootstrap, config.seed

    def section(key: str, build: Callable[[], Any], missing: str) -> Any:
        """Build one section; its failure becomes a problem line and leaves the others intact."""
        say(f"report: {key}")
        try:
            value = build()
        except Exception as error:
            problems.append(f"{key}: {error}")
            value = None
            missing = f"could not be read: {error}"
        if value in (None, [], {}):
            context.missing[key] = missing
            return None
        context.sections[key] = value
        return value

    # -- evaluate-stage outputs
    def read_input(path: Path, reader: Callable[[Path], Any]) -> Any:
        if not path.is_file():
            return None
        try:
            return reader(path)
        except (ReportError, OSError, UnicodeDecodeError) as error:
            problems.append(str(error))
            return None

    metrics = read_input(paths.eval / "metrics.json", _read_json)
    if metrics is not None and not isinstance(metrics, dict):
        problems.append(f"{paths.eval / 'metrics.json'}: expected a JSON object, not {type(metrics).__name__}")
        metrics = None
    alignment = read_input(paths.eval / "alignment.json", read_alignment)

    def grids():
        if alignment is not None and alignment.get("units"):
            return grid_from_alignment(alignment, images, checklists, max_units_per_condition)
        manifests = _manifests(paths)
        return grid_from_manifests(config, paths, manifests, images, checklists, max_units_per_condition, problems)

    section("grids", grids, "no alignment comparison (eval/alignment.json) and no synthetic sets before and after "
            "alignment yet (synthetic/<setting>/manifest.csv)")
    section("alignment", lambda: alignment_summary(alignment) if alignment is not None else None,
            "no alignment comparison yet (eval/alignment.json)")
    section("pass_rates", lambda: pass_rates_from_metrics(metrics.get("pass_rate") or {}, checklists) if metrics else None,
            "no checklist pass rates of synthetic sets yet (magic evaluate writes them to eval/metrics.json)")
    section("classifier", lambda: classifier_tables(metrics) if metrics else None,
            "no classifier results yet (magic evaluate)")
    section("distances", lambda: distance_rows(metrics.get("distances") or {}) if metrics else None,
            "no FID / KID yet (magic evaluate)")
    if metrics:
        context.sections["evaluate_notes"] = [str(n) for n in metrics.get("notes", [])]
        skipped = [f"{setting_label(name)}: {info.get('note', 'skipped')}"
                   for name, info in (metrics.get("settings") or {}).items()
                   if isinstance(info, Mapping) and info.get("status") == "skipped"]
        context.sections["evaluate_notes"] = skipped + context.sections["evaluate_notes"]
        context.sections["counts"] = metrics.get("counts")

    # -- the ledger
    ledger = None
    if paths.ledger.is_file():
        try:
            from magic_align.ledger import Ledger

            ledger = Ledger(paths.ledger)
        except Exception as error:
            problems.append(f"{paths.ledger}: {error}")
    no_ledger = f"no ledger yet ({paths.ledger.relative_to(paths.root)}: magic sample, magic judge, magic pairs)"
    configured = identity = None
    if ledger is not None and config.judge.backend != "human":
        try:
            from magic_align.judge import judge_identity

            identity = judge_identity(config, checklists) if checklists is not None else None
            configured = identity[0] if identity is not None else None
        except Exception:
            configured = None  # the report still shows every judge; it just cannot say which one trained
    context.sections["configured_judge"] = configured
    section("round_pass_rates",
            lambda: pass_rates_from_ledger(ledger, checklists, resamples, seed) if ledger else None,
            no_ledger if ledger is None else "no verdicts or reviews of sampled images yet (magic judge, magic review)")
    def pair_counts():
        from magic_align.feedback import undecided_counts

        undecided = undecided_counts(ledger, checklists, *identity) if identity and checklists is not None else None
        return pair_outcome_counts(ledger.pairs(), undecided)

    section("pairs", lambda: pair_counts() if ledger else None,
            no_ledger if ledger is None else "no preference pairs yet (magic pairs)")
    section("judge_usage", lambda: judge_usage(paths.ledger) if ledger else None,
            no_ledger if ledger is None else "no judge verdicts yet (magic judge)")
    section("agreement",
            lambda: agreement_tables(ledger, checklists, configured, resamples, seed) if ledger and checklists else None,
            "no two graders of the same images yet (expert reviews from magic review, or a second judge)")
    section("stages", lambda: stage_table(paths.ledger) if ledger else None,
            no_ledger if ledger is None else "no stage has recorded its status yet")
    if ledger is not None:
        context.sections["ledger_counts"] = {"samples": len(ledger.samples()), "rounds": len(ledger.rounds()),
                                             "reviews": len(ledger.reviews())}
        ledger.close()

    # -- training logs, configuration
    section("curves", lambda: training_curves(paths, problems),
            "no training logs yet (logs/<stage>/.../metrics.csv: magic finetune, magic train dpo / rft)")

    def config_text() -> dict:
        if paths.config.is_file():
            text, origin = paths.config.read_text(encoding="utf-8"), str(paths.config.relative_to(paths.root))
        else:
            text, origin = dump_config(config), "the configuration given to magic report (no config.toml in the run)"
        earlier = sorted(p.name for p in paths.root.glob("config.*.toml")) if paths.root.is_dir() else []
        return {"text": text, "origin": origin, "earlier": earlier}

    section("config", config_text, "")
    context.headline = _headline(context)
    return context


def _headline(context: ReportContext) -> list[dict]:
    """A few figures for the top of the page, each from a section that exists."""
    cards = []
    alignment = context.sections.get("alignment")
    if alignment and alignment["differences"]:
        first = alignment["differences"][0]
        cards.append({"label": f"items met, {first['name']}", "value": format_estimate(first["estimate"], 2),
                      "note": "95 % bootstrap interval, paired held-out sources"})
    classifier = context.sections.get("classifier") or []
    if classifier:  # the first table: the first backbone on the full training set
        table = classifier[0]
        real = next((r for r in table["rows"] if r["setting"] == "real"), None)
        others = [r for r in table["rows"] if r["setting"] != "real"]
        if real and others:  # cells[0] is accuracy (METRICS order)
            best = max(others, key=lambda r: _leading_number(r["cells"][0]["text"]))
            cards.append({"label": f"accuracy, {table['backbone']} ({table['group']})",
                          "value": f"{real['cells'][0]['text'].split(' ')[0]} → {best['cells'][0]['text'].split(' ')[0]} %",
                          "note": f"real → {best['label']}"})
    pairs = context.sections.get("pairs")
    if pairs:
        total = sum(r["pairs"] for r in pairs)
        signal = sum(r["one_wins"] for r in pairs)
        cards.append({"label": "pairs with a winner", "value": f"{signal} / {total}",
                      "note": f"over {len(pairs)} round(s); ties give no gradient"})
    usage = context.sections.get("judge_usage")
    if usage:
        cost = sum(r["cost_usd"] or 0 for r in usage)
        calls = sum(r["calls"] for r in usage)
        cards.append({"label": "judge calls", "value": f"{calls:,}",
                      "note": f"${cost:.2f} in total" if cost >= 1 else f"${cost:.4f} in total"})
    return cards


def _leading_number(text: str) -> float:
    try:
        return float(text.split(" ")[0])
    except ValueError:
        return -math.inf


# ============================================================================================== rendering
def render_report(context: ReportContext) -> str:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    environment = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,  # a template typo is an error in the tests, not a silently empty cell
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["est"] = format_estimate
    environment.filters["num"] = format_number
    environment.filters["general"] = lambda v: _format_general(v) if _finite(v) else "–"
    environment.filters["thousands"] = lambda v: f"{int(v):,}" if _finite(v) else "–"
    return environment.get_template("report.html").render(c=context, s=context.sections, m=context.missing)


def run_report(config: RunConfig, max_units_per_condition: int = 4,
               progress: Callable[[str], None] | None = None) -> Path:
    """Write `run/report/index.html` from what the run directory holds now; returns its path.

    `progress` receives one line per section and, at the end, each problem found (the page lists them too)."""
    paths = RunPaths(config.run_dir)
    if not paths.root.is_dir():
        raise ReportError(f"the run directory {paths.root} does not exist; run a stage first (or check runs_dir / name)")
    context = collect_report(config, max_units_per_condition, progress)
    output = paths.report / "index.html"
    atomic_write_text(output, render_report(context))
    if progress is not None:
        for problem in context.problems:
            progress(f"problem: {problem}")
    return output


__all__ = ["ReportContext", "ReportError", "collect_report", "render_report", "run_report"]
