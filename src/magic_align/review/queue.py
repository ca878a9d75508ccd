"""What the reviewer sees, and in which order: the samples with their judges' verdicts, and the review queue.

`collect_views` joins each sample of the ledger with its checklist (by target label) and the newest verdict of
each judge for that checklist version. `build_queue` then picks up to `per_condition` samples per condition
(a stratified sample: every condition gets its share however unbalanced the run is) and orders them by the
`review.queue` mode:

- `stratified`: no priority; a seeded random order within each condition.
- `disagreements`: samples on which the judges disagree come first, most disputed items first (one judge
  alone never disagrees, so with one judge this is `stratified`).
- `uncertain`: samples whose verdicts failed, were refused or left items unknown (parse status not `ok`, or
  no verdict at all) come first.

Conditions are interleaved (one of each in turn) at every priority level, so a short session already covers
them all. The order depends only on the ledger's verdicts and the seed, never on the reviews, so it stays put
while reviews come in.

`condition_agreement` is the per-item agreement table of one condition: the primary judge against the
latest review of each sample, with Cohen's kappa and percent agreement from `judges.agreement`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Literal

from magic_align.checklists.schema import Checklist, ChecklistSet
from magic_align.judges.agreement import cohen_kappa, percent_agreement
from magic_align.ledger import Ledger, SampleRow, StoredReview, StoredVerdict

QueueMode = Literal["stratified", "disagreements", "uncertain"]


@dataclass
class SampleView:
    sample: SampleRow
    checklist: Checklist
    verdicts: list[StoredVerdict] = field(default_factory=list)  # one per judge, the primary judge first

    @property
    def condition(self) -> str:
        return self.checklist.condition

    def verdict_of(self, judge_id: str | None) -> StoredVerdict | None:
        return next((v for v in self.verdicts if v.judge_id == judge_id), None)


@dataclass
class QueueEntry:
    sample_id: str
    condition: str
    priority: int  # higher comes first: disputed items (disagreements) or 1 for uncertain samples
    reason: str  # shown in the queue, e.g. "judges differ on 2 items"


# ---------------------------------------------------------------------------------------- pure helpers
def disputed_items(verdicts: list[StoredVerdict], checklist: Checklist) -> int:
    """Items on which the answered verdicts give different values (requires applied; unknowns ignored)."""
    answers = [
        checklist.apply_requires(list(v.items))
        for v in verdicts
        if v.answered and len(v.items) == len(checklist.items)
    ]
    if len(answers) < 2:
        return 0
    return sum(1 for column in zip(*answers) if len({value for value in column if value is not None}) > 1)


def uncertainty(verdicts: list[StoredVerdict], n_items: int) -> str | None:
    """Why the judges' answer about a sample is uncertain, or None when every verdict is a clean answer."""
    if not verdicts:
        return "not judged"
    for verdict in verdicts:
        if verdict.parse_status != "ok":
            return f"{verdict.judge_id}: {verdict.parse_status}"
        if len(verdict.items) != n_items or any(value is None for value in verdict.items):
            return f"{verdict.judge_id}: items unknown"
    return None


def _priority(view: SampleView, mode: QueueMode) -> tuple[int, str]:
    if mode == "disagreements":
        disputed = disputed_items(view.verdicts, view.checklist)
        if disputed:
            return disputed, f"judges differ on {disputed} item{'s' if disputed > 1 else ''}"
        return 0, "judges agree" if len(view.verdicts) > 1 else "one judge"
    if mode == "uncertain":
        why = uncertainty(view.verdicts, len(view.checklist.items))
        return (1, why) if why else (0, "answered")
    if mode == "stratified":
        return 0, "stratified sample"
    raise ValueError(f"review.queue = {mode!r}; expected 'stratified', 'disagreements' or 'uncertain'")


def build_queue(views: list[SampleView], mode: QueueMode, per_condition: int, seed: int = 0) -> list[QueueEntry]:
    """Up to `per_condition` samples per condition, highest priority first, conditions interleaved."""
    by_condition: dict[str, list[SampleView]] = {}
    for view in views:
        by_condition.setdefault(view.condition, []).append(view)
    ranked: list[tuple[int, int, int, QueueEntry]] = []
    for condition_index, (condition, members) in enumerate(sorted(by_condition.items())):
        members = sorted(members, key=lambda v: v.sample.sample_id)  # ledger order must not matter
        random.Random(f"{seed}:{condition}").shuffle(members)
        scored = [(view, *_priority(view, mode)) for view in members]
        scored.sort(key=lambda row: -row[1])  # stable: the shuffled order breaks ties
        for rank, (view, priority, reason) in enumerate(scored[:per_condition]):
            entry = QueueEntry(view.sample.sample_id, condition, priority, reason)
            ranked.append((-priority, rank, condition_index, entry))
    ranked.sort(key=lambda row: row[:3])
    return [row[3] for row in ranked]


@dataclass
class ItemRow:
    number: int  # 1-based item number
    item_id: str
    aspect: str
    n: int  # reviewed images where both judge and reviewer answered this item
    agreement: float
    kappa: float

    @property
    def kappa_text(self) -> str:
        return "–" if math.isnan(self.kappa) else f"{self.kappa:.2f}"

    @property
    def agreement_text(self) -> str:
        return "–" if math.isnan(self.agreement) else f"{100 * self.agreement:.0f} %"


def condition_agreement(
    views: list[SampleView], reviews: dict[str, StoredReview], judge_id: str | None, checklist: Checklist
) -> tuple[list[ItemRow], int]:
    """Per item of `checklist`: the primary judge against the latest review of each sample (requires applied
    on both sides, unknowns dropped). Returns the rows and the number of images compared."""
    columns: list[tuple[list[int], list[int]]] = [([], []) for _ in checklist.items]
    images = 0
    for view in views:
        if view.condition != checklist.condition:
            continue
        review = reviews.get(view.sample.sample_id)
        verdict = view.verdict_of(judge_id)
        if review is None or verdict is None or not verdict.answered:
            continue
        if review.checklist_version != checklist.version or len(review.items) != len(checklist.items):
            continue
        if len(verdict.items) != len(checklist.items):
            continue
        images += 1
        judged = checklist.apply_requires(list(verdict.items))
        reviewed = checklist.apply_requires(list(review.items))
        for index, (mine, theirs) in enumerate(zip(judged, reviewed)):
            if mine is not None and theirs is not None:
                columns[index][0].append(mine)
                columns[index][1].append(theirs)
    rows = [
        ItemRow(
            number=index + 1,
            item_id=item.id,
            aspect=item.aspect,
            n=len(judged),
            agreement=percent_agreement(judged, reviewed),
            kappa=cohen_kappa(judged, reviewed),
        )
        for index, (item, (judged, reviewed)) in enumerate(zip(checklist.items, columns))
    ]
    return rows, images


# ------------------------------------------------------------------------------------------ from ledger
def collect_views(
    ledger: Ledger, checklists: ChecklistSet, primary_judge: str | None, primary_prompt_version: str | None = None
) -> list[SampleView]:
    """Every sample whose target label has a checklist, with the newest verdict of each judge for that
    checklist's version (for the primary judge, of `primary_prompt_version` when given), primary judge first."""
    views: dict[str, SampleView] = {}
    for sample in ledger.samples():
        if sample.target_label in checklists:
            views[sample.sample_id] = SampleView(sample, checklists[sample.target_label])
    chosen: dict[tuple[str, str], StoredVerdict] = {}
    for row in ledger.verdicts():
        view = views.get(row.sample.sample_id)
        verdict = row.verdict
        if view is None or verdict.checklist_version != view.checklist.version:
            continue
        if (
            verdict.judge_id == primary_judge
            and primary_prompt_version is not None
            and verdict.prompt_version != primary_prompt_version
        ):
            continue
        key = (view.sample.sample_id, verdict.judge_id)
        current = chosen.get(key)
        if current is None or (verdict.created_at, verdict.id) > (current.created_at, current.id):
            chosen[key] = verdict
    for (sample_id, _), verdict in chosen.items():
        views[sample_id].verdicts.append(verdict)
    for view in views.values():
        view.verdicts.sort(key=lambda v: (v.judge_id != primary_judge, v.judge_id))
    return list(views.values())


def verdict_counts(ledger: Ledger) -> dict[str, int]:
    """Verdicts per judge id (to pick a primary judge when the configured one has none)."""
    counts: dict[str, int] = {}
    for row in ledger.verdicts():
        counts[row.verdict.judge_id] = counts.get(row.verdict.judge_id, 0) + 1
    return counts

