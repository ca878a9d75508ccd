"""Agreement between two graders of the same images: a judge and the expert reviews, or two judges.

Per checklist aspect (the items of every condition that share an aspect, e.g. all "color" items), and over
all items together: Cohen's kappa, percent agreement, and, taking the second grader as the reference, the
true-positive rate (judge says met where the reference says met) and the true-negative rate. Each comes with
a percentile-bootstrap 95 % interval (`magic_align.stats.bootstrap`, resampling item answers).

Both graders' answers go through the checklist's `requires` rule first, so the comparison is about what
the pairs are built from. Unknown answers (None) on either side drop that item for that image.

Kappa is undefined (NaN) when both graders gave one and the same answer throughout (expected agreement 1);
the percent agreement row still shows how they agreed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
from rich.table import Table

from magic_align.checklists.schema import Checklist, ChecklistSet, load_checklists
from magic_align.config import RunConfig
from magic_align.judges import judge_identity
from magic_align.ledger import Ledger
from magic_align.run import RunPaths
from magic_align.stats import Estimate, bootstrap

ALL_ITEMS = "all items"


# ------------------------------------------------------------------------------------------ statistics
def percent_agreement(first: Sequence[int], second: Sequence[int]) -> float:
    a, b = np.asarray(first), np.asarray(second)
    return float(np.mean(a == b)) if len(a) else float("nan")


def cohen_kappa(first: Sequence[int], second: Sequence[int]) -> float:
    """Cohen's kappa for binary answers: (p_o - p_e) / (1 - p_e), with p_e from each grader's own rate of 1s.
    NaN when undefined (no answers, or both graders constant and equal so that p_e = 1).

    Written out rather than torchmetrics' `binary_cohen_kappa` (the tests check the two agree): that one computes
    in float32, off by up to about 1e-7, enough to move a value at the `pairs.min_kappa` gate or at a rounding
    boundary of the report, and costs several times more per call in a 1000-resample bootstrap."""
    a, b = np.asarray(first, float), np.asarray(second, float)
    if len(a) == 0:
        return float("nan")
    observed = float(np.mean(a == b))
    rate_a, rate_b = float(np.mean(a)), float(np.mean(b))
    expected = rate_a * rate_b + (1 - rate_a) * (1 - rate_b)
    if math.isclose(expected, 1.0):
        return float("nan")
    return (observed - expected) / (1 - expected)


def true_positive_rate(judged: Sequence[int], reference: Sequence[int]) -> float:
    """P(judged = 1 | reference = 1); NaN when the reference never says 1."""
    j, r = np.asarray(judged), np.asarray(reference)
    positives = r == 1
    return float(np.mean(j[positives] == 1)) if positives.any() else float("nan")


def true_negative_rate(judged: Sequence[int], reference: Sequence[int]) -> float:
    """P(judged = 0 | reference = 0); NaN when the reference never says 0."""
    j, r = np.asarray(judged), np.asarray(reference)
    negatives = r == 0
    return float(np.mean(j[negatives] == 0)) if negatives.any() else float("nan")


@dataclass
class ItemAgreement:
    item: str  # the aspect, or ALL_ITEMS
    n: int  # item answers compared
    kappa: Estimate
    agreement: Estimate
    tpr: Estimate
    tnr: Estimate


def item_agreement(
    item: str, judged: Sequence[int], reference: Sequence[int], resamples: int = 1000, seed: int = 0
) -> ItemAgreement:
    judged_array, reference_array = np.asarray(judged, int), np.asarray(reference, int)
    options = {"resamples": resamples, "seed": seed}
    return ItemAgreement(
        item=item,
        n=len(judged_array),
        kappa=bootstrap(cohen_kappa, judged_array, reference_array, **options),
        agreement=bootstrap(percent_agreement, judged_array, reference_array, **options),
        tpr=bootstrap(true_positive_rate, judged_array, reference_array, **options),
        tnr=bootstrap(true_negative_rate, judged_array, reference_array, **options),
    )


# ------------------------------------------------------------------------------------------ collection
@dataclass
class AgreementReport:
    judge_id: str
    against: str  # "human" or the other judge's id
    images: int = 0  # images graded by both
    skipped: int = 0  # images with a review or verdict that could not be compared (old checklist, failed answer)
    items: list[ItemAgreement] = field(default_factory=list)  # one per aspect, then ALL_ITEMS

    def lowest_kappa(self) -> ItemAgreement | None:
        """The aspect with the lowest defined kappa (ALL_ITEMS excluded)."""
        defined = [row for row in self.items if row.item != ALL_ITEMS and not math.isnan(row.kappa.value)]
        return min(defined, key=lambda row: row.kappa.value) if defined else None

    def table(self) -> Table:
        table = Table(title=f"agreement: {self.judge_id} vs {self.against} ({self.images} images)")
        table.add_column("item (aspect)")
        table.add_column("n", justify="right")
        for column in ("Cohen's kappa", "agreement", "TPR", "TNR"):
            table.add_column(f"{column} [95 % CI]", justify="right")
        for row in self.items:
            table.add_row(
                row.item, str(row.n), _show(row.kappa), _show(row.agreement), _show(row.tpr), _show(row.tnr)
            )
        return table


def _show(estimate: Estimate) -> str:
    if math.isnan(estimate.value):
        return "undefined"
    if math.isnan(estimate.low):
        return f"{estimate.value:.2f}"
    return f"{estimate.value:.2f} [{estimate.low:.2f}, {estimate.high:.2f}]"


def _answers(checklist: Checklist, items: list[int | None]) -> list[int | None] | None:
    if len(items) != len(checklist.items):
        return None
    return checklist.apply_requires(list(items))


def compare(
    ledger: Ledger,
    checklists: ChecklistSet,
    judge_id: str,
    prompt_version: str | None,
    against: str = "human",
    against_prompt_version: str | None = None,
    round_index: int | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> AgreementReport:
    """Agreement of `judge_id` with the latest human review of each sample (`against = "human"`) or with
    another judge's verdicts on the same images (`against` = that judge's id)."""
    report = AgreementReport(judge_id=judge_id, against=against)
    by_aspect: dict[str, tuple[list[int], list[int]]] = {}
    reviews = ledger.latest_reviews(round=round_index) if against == "human" else {}
    seen: set[tuple[str, str]] = set()
    for sample in ledger.samples(round_index):
        if sample.target_label not in checklists:
            continue
        checklist = checklists[sample.target_label]
        if against == "human":
            review = reviews.get(sample.sample_id)
            if review is None:
                continue
            if review.checklist_version != checklist.version:
                report.skipped += 1  # reviewed against another version of the checklist
                continue
            reference_items = review.items
        else:
            if (sample.image_sha256, checklist.version) in seen:
                continue  # the same image twice is one comparison
            seen.add((sample.image_sha256, checklist.version))
            other = ledger.find_verdict(sample.image_sha256, against, checklist.version, against_prompt_version)
            if other is None:
                continue
            if not other.answered:
                report.skipped += 1
                continue
            reference_items = other.items
        verdict = ledger.find_verdict(sample.image_sha256, judge_id, checklist.version, prompt_version)
        if verdict is None:
            continue
        judged, reference = _answers(checklist, verdict.items), _answers(checklist, reference_items)
        if not verdict.answered or judged is None or reference is None:
            report.skipped += 1
            continue
        report.images += 1
        for item, mine, theirs in zip(checklist.items, judged, reference):
            if mine is None or theirs is None:
                continue
            columns = by_aspect.setdefault(item.aspect, ([], []))
            columns[0].append(mine)
            columns[1].append(theirs)
    everything: tuple[list[int], list[int]] = ([], [])
    for aspect, (judged, reference) in by_aspect.items():
        report.items.append(item_agreement(aspect, judged, reference, resamples, seed))
        everything[0].extend(judged)
        everything[1].extend(reference)
    if everything[0]:
        report.items.append(item_agreement(ALL_ITEMS, *everything, resamples=resamples, seed=seed))
    return report


def run_agreement(
    config: RunConfig,
    against: str | Literal["human"] = "human",
    judge_id: str | None = None,
    round_index: int | None = None,
) -> AgreementReport:
    """`magic agreement`: the configured judge (or `judge_id`) against human reviews or another judge."""
    paths = RunPaths(config.run_dir)
    if not paths.ledger.exists():
        raise FileNotFoundError(f"{paths.ledger} does not exist; run `magic sample` and `magic judge` first")
    ledger = Ledger(paths.ledger)
    checklists = load_checklists(config.judge.checklist)
    judge_id, prompt_version = judge_identity(config, checklists, judge_id)
    known = ledger.judge_ids()
    for name in [judge_id] + ([] if against == "human" else [against]):
        if name not in known:
            raise ValueError(f"judge {name!r} has no verdicts in {paths.ledger}; judges present: {known or 'none'}")
    resamples = config.evaluate.bootstrap
    return compare(ledger, checklists, judge_id, prompt_version, against, None, round_index, resamples, config.seed)
