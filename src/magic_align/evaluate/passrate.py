"""Checklist pass rate of synthetic images: how many expert criteria their target condition's checklist says
they meet (paper: dermatologists found >= 3 of 5 met for 2.0 % T2I, 18.5 % I2I, 38.9 % RFT, 55.5 % DPO).

Reported overall, per condition and per item, with bootstrap intervals over images. Verdicts come from the
synthetic manifest (when synthesis judged its images) or from a judge run here; a held-out judge, one that
was not used for training, exposes reward hacking (the trained-on judge is easier to please than another).
Verdicts asked here are stored in the ledger under the usual key, so a rerun costs nothing.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from magic_align.data.images import load_image, sha256_file
from magic_align.stats import bootstrap

PASS_SHARE = 0.6  # "at least 3 of 5": the share of a checklist's items an image must meet to pass


def items_needed(n_items: int, share: float = PASS_SHARE) -> int:
    """Items an image must meet to pass: 3 of 5, 6 of 9 (ceil, with a little slack for float rounding)."""
    return max(1, math.ceil(share * n_items - 1e-9))


def answered(items: Sequence[int | None]) -> bool:
    """A verdict that answered at least one item (a failed parse answers none and is left out of the rates)."""
    return any(value is not None for value in items)


def items_met(items: Sequence[int | None]) -> int:
    return sum(1 for value in items if value == 1)


def pass_rate_summary(
    conditions: Sequence[str],
    verdicts: Sequence[Sequence[int | None]],
    item_ids: dict[str, Sequence[str]] | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Summarise verdicts (one item list per image, graded against the checklist of `conditions[i]`).

    Unknown items (None) count as not met; verdicts with no answered item are counted apart ("unanswered")
    and left out of every rate. Returns overall, per-condition and per-item figures with intervals.
    """
    if len(conditions) != len(verdicts):
        raise ValueError(f"{len(conditions)} conditions but {len(verdicts)} verdicts")
    kept = [(condition, list(items)) for condition, items in zip(conditions, verdicts) if answered(items)]

    def summary(rows: list[tuple[str, list]]) -> dict:
        met = np.array([items_met(items) for _, items in rows], float)
        passed = np.array([items_met(items) >= items_needed(len(items)) for _, items in rows], float)
        return {
            "n": len(rows),
            "mean_items_met": bootstrap(np.mean, met, resamples=resamples, seed=seed).as_dict(),
            "pass_share": bootstrap(np.mean, passed, resamples=resamples, seed=seed).as_dict(),
        }

    result = {**summary(kept), "unanswered": len(verdicts) - len(kept), "per_condition": {}, "per_item": {}}
    for condition in sorted({c for c, _ in kept}):
        rows = [row for row in kept if row[0] == condition]
        result["per_condition"][condition] = summary(rows)
        width = max(len(items) for _, items in rows)
        names = list(item_ids[condition]) if item_ids and condition in item_ids else [f"item{i + 1}" for i in range(width)]
        per_item = {}
        for index, name in enumerate(names):
            values = np.array([items[index] == 1 for _, items in rows if index < len(items)], float)
            per_item[name] = {**bootstrap(np.mean, values, resamples=resamples, seed=seed).as_dict(), "n": len(values)}
        result["per_item"][condition] = per_item
    return result


def parse_manifest_items(text: str, where: str) -> list[int | None] | None:
    """The manifest's verdict_items cell: empty (not judged) or a JSON list of 1 / 0 / null."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{where}: verdict_items = {text!r} is not a JSON list like [1, 0, 1, 0, 0]") from None
    if not isinstance(items, list) or any(value not in (0, 1, None) for value in items):
        raise ValueError(f"{where}: verdict_items = {text!r}; expected a list of 1, 0 or null")
    return items


async def _judge_all(judge, ledger, jobs: list[tuple[Path, str, object]], concurrency: int) -> list[list[int | None]]:
    """Verdicts for (image path, sha256, checklist) jobs: from the ledger when present, else asked and stored."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(path: Path, digest: str, checklist) -> list[int | None]:
        stored = ledger.get_verdict(digest, judge.id, checklist.version, judge.prompt_version)
        if stored is not None:
            return checklist.apply_requires(list(stored.items))
        async with semaphore:
            verdict = await judge.judge(load_image(path), checklist)
        ledger.put_verdict(digest, judge.id, checklist.version, judge.prompt_version, verdict,
                           condition=checklist.condition)
        return checklist.apply_requires(list(verdict.items))

    # Every call runs to its end before a failure is raised, so the answers that did arrive are stored (and paid
    # for once) rather than cancelled with the rest.
    results = await asyncio.gather(*(one(*job) for job in jobs), return_exceptions=True)
    failures = [result for result in results if isinstance(result, BaseException)]
    if failures:
        raise failures[0]
    return list(results)


def judge_images(judge, ledger, paths: Sequence[Path], conditions: Sequence[str], checklists,
                 concurrency: int = 8) -> list[list[int | None]]:
    """Grade each image against its condition's checklist with `judge`, through the ledger's verdict cache."""
    jobs = [(Path(path), sha256_file(path), checklists[condition]) for path, condition in zip(paths, conditions)]
    return asyncio.run(_judge_all(judge, ledger, jobs, concurrency))
