"""Is the judge valid on generated images? Its verdicts on the models' outputs against an independent grader.

The independent grader is the recognition probe (`evaluate.recognition`): an image counts as *recognised* when a
classifier trained on real images of the domain assigns it to its target condition. A judge that tracks what a
viewer sees should give recognised images more items than unrecognised ones, per condition and per item. Three
views, each from the graded images of `eval/alignment.json` (every model's outputs, pooled):

- overall: Pearson r between items met and recognition (0/1) over images, with a percentile-bootstrap interval
  that resamples source images (every model's output of one source moves together, as in the comparison);
- per condition: images, share recognised, mean items met among recognised and among unrecognised images, and r;
- per item: the item's rate among recognised and among unrecognised images, and r (the point-biserial, here the
  phi coefficient of two binary answers).

The validity is *low* when the overall r is below `evaluate.validity_min_r` or its interval reaches 0; the report
then warns on its first screen and `magic agreement --against recognition` says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from rich.table import Table

from magic_align.config import RunConfig
from magic_align.errors import MagicError
from magic_align.run import RunPaths
from magic_align.stats import Estimate, cluster_bootstrap


class ValidityError(MagicError, ValueError):
    """The validity table cannot be computed from what the run holds; the message names the file and command."""


@dataclass(frozen=True)
class GradedImage:
    """One generated image graded twice: the judge's item answers and the independent recognition (0/1)."""

    condition: str
    items: tuple[int | None, ...]
    recognised: int
    source: str = ""  # the source image it was made from: the bootstrap's cluster ("": the image is its own)

    @property
    def items_met(self) -> int:
        return sum(1 for value in self.items if value == 1)


def pearson_r(first: Sequence[float], second: Sequence[float]) -> float:
    """Pearson's r; NaN when either side is constant (or there are fewer than 2 values)."""
    a, b = np.asarray(first, float), np.asarray(second, float)
    if len(a) < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    scale = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))
    return float(np.sum(a * b)) / scale if scale > 0 else float("nan")


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def split_means(values: Sequence[float], recognised: Sequence[int]) -> tuple[float, float]:
    """(mean of `values` over recognised images, mean over unrecognised ones); NaN for an empty side."""
    v, r = np.asarray(values, float), np.asarray(recognised, int)
    return _mean(v[r == 1]), _mean(v[r == 0])


def correlation(images: Sequence[GradedImage], values: Sequence[float], resamples: int, seed: int) -> Estimate:
    """Pearson r of `values` (one per image) and the images' recognition, with a percentile-bootstrap interval
    that resamples source images (an image without a source is its own cluster)."""
    clusters = [image.source or f"image {index}" for index, image in enumerate(images)]
    recognised = [image.recognised for image in images]
    return cluster_bootstrap(pearson_r, clusters, np.asarray(values, float), np.asarray(recognised, float),
                             resamples=resamples, seed=seed)


def is_low(estimate: dict | Estimate | None, min_r: float) -> bool:
    """Low validity: r below `min_r`, undefined, or an interval that reaches 0."""
    if estimate is None:
        return True
    found = estimate.as_dict() if isinstance(estimate, Estimate) else estimate
    value, low = found.get("value"), found.get("low")
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < min_r:
        return True
    return isinstance(low, (int, float)) and math.isfinite(low) and low <= 0


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def confirmation(independent: dict | None) -> str:
    """How the independent measure's paired difference ({value, low, high}) stands beside the judge's:
    "confirmed" (it rises: its interval lies above 0), "contradicted" (it falls: its interval lies below 0, or,
    without an interval, its value is negative), "not confirmed" (no clear change either way), or "unmeasured".
    A judge gain is shown as a gain only where this is not "contradicted"."""
    if not independent or not _finite(independent.get("value")):
        return "unmeasured"
    low, high = independent.get("low"), independent.get("high")
    if _finite(low) and _finite(high):
        if high < 0:
            return "contradicted"
        return "confirmed" if low > 0 else "not confirmed"
    return "contradicted" if independent["value"] < 0 else "not confirmed"


def validity_table(images: Sequence[GradedImage], item_ids: dict[str, list[str]] | None, resamples: int, seed: int,
                   min_r: float) -> dict:
    """The overall, per-condition and per-item views (module docstring) as plain dicts for JSON and the report."""
    met = [image.items_met for image in images]
    recognised = [image.recognised for image in images]
    overall = correlation(images, met, resamples, seed)
    with_recognition, without = split_means(met, recognised)
    conditions = []
    items = []
    for condition in sorted({image.condition for image in images}):
        mine = [image for image in images if image.condition == condition]
        mine_met = [image.items_met for image in mine]
        mine_recognised = [image.recognised for image in mine]
        high, low = split_means(mine_met, mine_recognised)
        conditions.append({"condition": condition, "n": len(mine), "recognised": _mean(mine_recognised),
                           "items_met_recognised": high, "items_met_not_recognised": low,
                           "r": correlation(mine, mine_met, resamples, seed).as_dict()})
        names = (item_ids or {}).get(condition) or [f"item {k + 1}" for k in range(max(len(i.items) for i in mine))]
        for position, name in enumerate(names):
            answered = [image for image in mine if position < len(image.items) and image.items[position] is not None]
            if not answered:
                continue
            answers, flags = [image.items[position] for image in answered], [image.recognised for image in answered]
            rate_recognised, rate_not = split_means(answers, flags)
            items.append({"condition": condition, "item": name, "n": len(answered), "rate_recognised": rate_recognised,
                          "rate_not_recognised": rate_not,
                          "r": correlation(answered, answers, resamples, seed).as_dict()})
    return {"grader": "recognition", "n": len(images), "r": overall.as_dict(), "recognised": _mean(recognised),
            "items_met_recognised": with_recognition, "items_met_not_recognised": without, "min_r": min_r,
            "low": is_low(overall, min_r), "per_condition": conditions, "per_item": items}


def graded_images(alignment: dict) -> list[GradedImage]:
    """Every image of `eval/alignment.json` that has both the judge's items and the recognition."""
    graded = []
    for unit in alignment.get("units", []):
        items = unit.get("items") or {}
        recognition = unit.get("recognition") or {}
        for name, answers in items.items():
            entry = recognition.get(name)
            if entry is None or answers is None:
                continue
            graded.append(GradedImage(unit["target"], tuple(answers), int(entry["recognised"]), str(unit.get("source") or "")))
    return graded


def show_table(table: dict) -> list[Table]:
    """The validity table for the terminal (`magic agreement --against recognition`)."""

    def number(value, digits: int = 2) -> str:
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"

    def interval(entry: dict) -> str:
        low, high = entry.get("low"), entry.get("high")
        if isinstance(low, float) and math.isfinite(low):
            return f"{number(entry['value'])} [{number(low)}, {number(high)}]"
        return number(entry.get("value"))

    overall = Table(title=f"judge validity on generated images: items met vs recognition ({table['n']} images)")
    for column in ("condition", "images", "recognised", "items met | recognised", "items met | not", "r [95 % CI]"):
        overall.add_column(column, justify="left" if column == "condition" else "right")
    overall.add_row("all conditions", str(table["n"]), number(table["recognised"]),
                    number(table["items_met_recognised"]), number(table["items_met_not_recognised"]),
                    interval(table["r"]))
    for row in table["per_condition"]:
        overall.add_row(row["condition"], str(row["n"]), number(row["recognised"]), number(row["items_met_recognised"]),
                        number(row["items_met_not_recognised"]), interval(row["r"]))
    per_item = Table(title="per item: the item's rate among recognised and unrecognised images")
    for column in ("condition", "item", "n", "rate | recognised", "rate | not", "r [95 % CI]"):
        per_item.add_column(column, justify="left" if column in ("condition", "item") else "right")
    for row in table["per_item"]:
        per_item.add_row(row["condition"], row["item"], str(row["n"]), number(row["rate_recognised"]),
                         number(row["rate_not_recognised"]), interval(row["r"]))
    return [overall, per_item]


def run_recognition_agreement(config: RunConfig) -> dict:
    """`magic agreement --against recognition`: the validity table stored by `magic compare` in
    eval/alignment.json (recomputed from its units, so a changed `evaluate.validity_min_r` applies)."""
    path = RunPaths(config.run_dir).eval / "alignment.json"
    if not path.is_file():
        raise ValidityError(f"{path} does not exist; run `magic compare` first (it grades the models' outputs with "
                            "the judge and with the recognition probe)")
    try:
        alignment = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValidityError(f"{path} is not valid JSON ({error}); run `magic compare` again") from None
    images = graded_images(alignment)
    if not images:
        raise ValidityError(f"{path} has no image graded by both the judge and the recognition probe; run "
                            "`magic compare` again (older comparisons did not record the recognition)")
    item_ids = alignment.get("item_ids")
    return validity_table(images, item_ids, config.evaluate.bootstrap, config.seed, config.evaluate.validity_min_r)


def describe(table: dict) -> str:
    """One line: the overall r and whether it is low."""
    r = table["r"]
    text = f"r = {r['value']:.2f}" if isinstance(r.get("value"), float) and math.isfinite(r["value"]) else "r undefined"
    if isinstance(r.get("low"), float) and math.isfinite(r["low"]):
        text += f" [{r['low']:.2f}, {r['high']:.2f}]"
    verdict = "LOW: the judge's items met do not track the independent recognition on generated images" \
        if table["low"] else "the judge's items met track the independent recognition"
    return f"{text} over {table['n']} images; {verdict}"

