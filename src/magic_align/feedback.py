"""From verdicts to training signal: preference pairs for DPO, rewards for RFT, and the file formats around them.

Pair rules are pure functions from two scores (or two item lists) to two outcomes, 1 = win and 0 = lose:

- `paper_pair_rule` (docs/method.md section 4), with S the number of items met out of n = 5:
  max(S_a, S_b) <= 2: both lose [0, 0]; min(S_a, S_b) = 5 or S_a = S_b > 2: both win [1, 1];
  otherwise the higher sum wins. For checklists of another length the thresholds scale: "<= 2" is
  "<= 40 % of the items" and "5" is "every item".
- `margin_rule`: the higher score wins when it leads by at least `margin`, otherwise a tie.
- `weighted_rule`: `margin_rule` on per-item weighted sums (`weighted_score`).

Equal outcomes ([1, 1] or [0, 0]) are ties: they are kept and marked (`PairRow.tie`), and give no gradient
in MAGIC-DPO (h = 0 for both samples). A child item counts as failed when its parent failed
(`Checklist.apply_requires`) before anything is scored. A verdict or review that still has an undecided item
(None) after that never feeds a pair or a reward: an unknown item would change the score. Such grades are left
out and counted (`PairsSummary.undecided`, `undecided_counts`); the pure score functions below still count
None as not met.

`run_pairs(config, round_index)` builds the pairs of a round: within each unit (one source, one target, K
samples) every two samples make a pair (K = 2: one pair; K = 3: three pairs). Each pair records the ids of
the verdicts (source 'judge') or reviews (source 'human') it came from.

File formats (docs/formats.md):

- Authors' feedback JSON: a list with one entry per prompt (unit, in unit-id order), each a list with one item
  list per image (sample, in k order): `[[[1, 0, 1, 0, 0], [0, 0, 1, 0, 0]], ...]`.
- Diffusion-DPO export: a folder with `images/` and `metadata.jsonl` + `metadata.csv`, one row per pair with
  the columns of the Pick-a-Pic layout the diffusers Diffusion-DPO example reads: `jpg_0`, `jpg_1` (image
  paths relative to the folder), `label_0` (1: jpg_0 preferred, 0: jpg_1 preferred, 0.5: tie) and `caption`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rich.table import Table

from magic_align.checklists.schema import Checklist, ChecklistSet, load_checklists
from magic_align.config import PairsConfig, RunConfig
from magic_align.judges import judge_identity
from magic_align.judges.agreement import compare
from magic_align.judges.base import Verdict
from magic_align.ledger import Ledger, PairRow, SampleRow
from magic_align.run import RunPaths, atomic_path, atomic_write_text
from magic_align.errors import MagicError

Outcome = tuple[int, int]
AUTHORS_IMPORT_PREFIX = "import:"


class FeedbackError(MagicError, ValueError):
    """Pairs cannot be built or a feedback file is malformed; the message names the place and the fix."""


# ---------------------------------------------------------------------------------------------- rules
def paper_pair_rule(score_a: float, score_b: float, n_items: int = 5) -> Outcome:
    """The paper's rule on two item counts (docs/method.md section 4); see the module docstring."""
    low = 0.4 * n_items  # 2 of 5
    high, lowest = max(score_a, score_b), min(score_a, score_b)
    if high <= low:
        return 0, 0
    if lowest >= n_items or (score_a == score_b and score_a > low):
        return 1, 1
    return (1, 0) if score_a > score_b else (0, 1)


def margin_rule(score_a: float, score_b: float, margin: float = 1.0) -> Outcome:
    """The higher score wins if it leads by at least `margin` (and by something); otherwise a tie [0, 0].

    Weighted scores are float sums (0.1 + 0.2 is not 0.3), so differences within a rounding tolerance of the
    scores count as equal: equal weights met give a tie, and a lead of exactly `margin` wins.
    """
    difference = score_a - score_b
    tolerance = 1e-9 * max(1.0, abs(score_a), abs(score_b), margin)
    if abs(difference) <= tolerance or abs(difference) < margin - tolerance:
        return 0, 0
    return (1, 0) if difference > 0 else (0, 1)


def weighted_score(items: Sequence[int | None], weights: Sequence[float]) -> float:
    """Sum of the weights of the items met (unknown items count as not met)."""
    if len(items) != len(weights):
        raise FeedbackError(f"{len(weights)} item weights for a checklist of {len(items)} items; give one weight per item")
    return float(sum(weight for value, weight in zip(items, weights) if value == 1))


def weighted_rule(
    items_a: Sequence[int | None], items_b: Sequence[int | None], weights: Sequence[float], margin: float = 0.0
) -> Outcome:
    """`margin_rule` on the weighted scores of two item lists."""
    return margin_rule(weighted_score(items_a, weights), weighted_score(items_b, weights), margin)


def is_tie(outcome: Outcome) -> bool:
    """Equal outcomes carry no preference: no gradient in DPO."""
    return outcome[0] == outcome[1]


def items_met(items: Sequence[int | None]) -> int:
    return sum(1 for value in items if value == 1)


def reward(items: Sequence[int | None]) -> float:
    """RFT reward of one image: the fraction of its checklist's items met, in [0, 1]."""
    return items_met(items) / len(items) if len(items) else 0.0


def score_pair(items_a: list[int | None], items_b: list[int | None], config: PairsConfig) -> tuple[float, float, Outcome]:
    """(score_a, score_b, outcome) of two item lists (requires already applied) under the configured rule."""
    if config.rule == "weighted":
        if config.item_weights is None:
            raise FeedbackError("pairs.rule = 'weighted' needs pairs.item_weights (one weight per checklist item)")
        score_a, score_b = weighted_score(items_a, config.item_weights), weighted_score(items_b, config.item_weights)
        return score_a, score_b, margin_rule(score_a, score_b, config.margin)
    score_a, score_b = float(items_met(items_a)), float(items_met(items_b))
    if config.rule == "margin":
        return score_a, score_b, margin_rule(score_a, score_b, config.margin)
    return score_a, score_b, paper_pair_rule(score_a, score_b, len(items_a))


# ------------------------------------------------------------------------------------- grades per sample
UNDECIDED = "verdict with an undecided item"
UNDECIDED_REVIEW = "review with an undecided item"


def decided(items: Sequence[int | None]) -> bool:
    """Every item answered 1 or 0 (requires already applied): only such grades feed pairs and rewards."""
    return all(value is not None for value in items)


@dataclass
class Grade:
    """The answer a pair is built from: items (requires applied), where it came from, and its ledger id."""

    items: list[int | None]
    source: str  # 'judge' | 'human'
    ledger_id: int


def _grades(
    ledger: Ledger,
    samples: list[SampleRow],
    checklists: ChecklistSet,
    judge_id: str | None,
    prompt_version: str | None,
    use_reviews: bool,
    use_verdicts: bool,
) -> tuple[dict[str, Grade], dict[str, Grade], dict[str, str]]:
    """Judge grades and human grades per sample id, and why a sample has neither (for the summary)."""
    judged: dict[str, Grade] = {}
    reviewed: dict[str, Grade] = {}
    missing: dict[str, str] = {}
    reviews = ledger.latest_reviews(round=samples[0].round) if use_reviews and samples else {}
    for sample in samples:
        checklist = _checklist_for(checklists, sample)
        review = reviews.get(sample.sample_id)
        undecided_review = False
        if review is not None and review.checklist_version == checklist.version and len(review.items) == len(checklist.items):
            items = checklist.apply_requires(list(review.items))
            if decided(items):
                reviewed[sample.sample_id] = Grade(items, "human", review.id)
            else:
                undecided_review = True
        if not use_verdicts:
            if sample.sample_id not in reviewed:
                missing[sample.sample_id] = UNDECIDED_REVIEW if undecided_review else "no review"
            continue
        verdict = ledger.find_verdict(sample.image_sha256, judge_id, checklist.version, prompt_version)
        if verdict is None:
            missing[sample.sample_id] = "not judged"
        elif not verdict.answered:
            missing[sample.sample_id] = f"verdict {verdict.parse_status}"
        elif len(verdict.items) != len(checklist.items):
            missing[sample.sample_id] = f"verdict has {len(verdict.items)} items, checklist {len(checklist.items)}"
        else:
            items = checklist.apply_requires(list(verdict.items))
            if decided(items):
                judged[sample.sample_id] = Grade(items, "judge", verdict.id)
            else:
                missing[sample.sample_id] = UNDECIDED
    return judged, reviewed, missing


def _checklist_for(checklists: ChecklistSet, sample: SampleRow) -> Checklist:
    if sample.target_label not in checklists:
        raise FeedbackError(
            f"sample {sample.sample_id}: target label {sample.target_label!r} has no checklist in {checklists.id!r}; "
            f"known: {', '.join(checklists.condition_names)}"
        )
    return checklists[sample.target_label]


def _units(samples: list[SampleRow]) -> dict[str, list[SampleRow]]:
    units: dict[str, list[SampleRow]] = defaultdict(list)
    for sample in samples:
        units[sample.unit_id].append(sample)
    return {unit_id: sorted(rows, key=lambda row: (row.k, row.sample_id)) for unit_id, rows in sorted(units.items())}


def build_pairs(
    samples: list[SampleRow],
    judged: dict[str, Grade],
    reviewed: dict[str, Grade],
    config: PairsConfig,
    prefer_human: bool,
) -> list[PairRow]:
    """All pairs within each unit. A pair takes both grades from the reviews when both samples have one and
    reviews are preferred (or are all there is), else both from the judge: one pair, one grader."""
    rows: list[PairRow] = []
    for unit_id, members in _units(samples).items():
        for first, second in itertools.combinations(members, 2):
            if prefer_human and first.sample_id in reviewed and second.sample_id in reviewed:
                grade_a, grade_b = reviewed[first.sample_id], reviewed[second.sample_id]
            elif first.sample_id in judged and second.sample_id in judged:
                grade_a, grade_b = judged[first.sample_id], judged[second.sample_id]
            else:
                continue
            score_a, score_b, outcome = score_pair(grade_a.items, grade_b.items, config)
            rows.append(
                PairRow(
                    pair_id=f"{first.sample_id}~{second.sample_id}",
                    round=first.round,
                    unit_id=unit_id,
                    sample_a=first.sample_id,
                    sample_b=second.sample_id,
                    outcome_a=outcome[0],
                    outcome_b=outcome[1],
                    tie=is_tie(outcome),
                    score_a=score_a,
                    score_b=score_b,
                    verdict_a=grade_a.ledger_id,
                    verdict_b=grade_b.ledger_id,
                    rule=config.rule,
                    source=grade_a.source,  # type: ignore[arg-type]
                )
            )
    return rows


# ------------------------------------------------------------------------------------------ the stage
@dataclass
class PairsSummary:
    round: int
    judge_id: str
    rule: str
    samples: int = 0
    units: int = 0
    pairs: int = 0
    one_wins: int = 0
    both_win: int = 0
    both_lose: int = 0
    from_human: int = 0
    missing: dict[str, str] = field(default_factory=dict)  # sample id -> why it has no grade
    kappa_note: str | None = None
    mean_reward: float = float("nan")

    @property
    def ties(self) -> int:
        return self.both_win + self.both_lose

    @property
    def undecided(self) -> int:
        """Verdicts (or reviews) left out because an item stayed undecided."""
        return sum(reason in (UNDECIDED, UNDECIDED_REVIEW) for reason in self.missing.values())

    @property
    def undecided_note(self) -> str | None:
        if not self.undecided:
            return None
        return f"{self.undecided} verdicts with an undecided item left out (they feed no pair and no reward)"

    def table(self) -> Table:
        table = Table(title=f"pairs, round {self.round} ({self.rule} rule, judge {self.judge_id})")
        table.add_column("what")
        table.add_column("value", justify="right")
        for name, value in (
            ("samples / units", f"{self.samples} / {self.units}"),
            ("pairs", self.pairs),
            ("one wins (training signal)", self.one_wins),
            ("both win (tie)", self.both_win),
            ("both lose (tie)", self.both_lose),
            ("pairs from human reviews", self.from_human),
            ("samples without a usable grade", len(self.missing)),
            ("verdicts with an undecided item left out", self.undecided),
            ("mean reward (RFT)", "-" if math.isnan(self.mean_reward) else f"{self.mean_reward:.3f}"),
        ):
            table.add_row(name, str(value))
        if self.kappa_note:
            table.add_row("agreement check", self.kappa_note)
        return table


def _check_kappa(
    config: RunConfig, ledger: Ledger, checklists: ChecklistSet, judge_id: str, prompt_version: str | None
) -> str | None:
    """Refuse a judge whose kappa against the human reviews present is below `pairs.min_kappa`."""
    minimum = config.pairs.min_kappa
    if minimum is None:
        return None
    report = compare(ledger, checklists, judge_id, prompt_version, "human", resamples=0)
    if report.images == 0:
        return f"pairs.min_kappa = {minimum} not checked: no human review overlaps the judge's verdicts yet"
    for row in report.items:
        if row.item != "all items" and not math.isnan(row.kappa.value) and row.kappa.value < minimum:
            raise FeedbackError(
                f"judge {judge_id} agrees too little with the human reviews: item {row.item!r} has Cohen's kappa "
                f"{row.kappa.value:.2f} < pairs.min_kappa = {minimum} over {row.n} answers ({report.images} reviewed "
                "images); review more images, change the judge, or lower pairs.min_kappa"
            )
    lowest = report.lowest_kappa()
    return f"lowest kappa {lowest.kappa.value:.2f} ({lowest.item}) >= {minimum}" if lowest else None


def run_pairs(config: RunConfig, round_index: int = 0, judge_id: str | None = None) -> PairsSummary:
    """Build and store the preference pairs of a round (replacing earlier pairs of that round)."""
    paths = RunPaths(config.run_dir)
    ledger = _open_ledger(paths)
    samples = ledger.samples(round_index)
    if not samples:
        raise FeedbackError(f"the ledger {paths.ledger} has no samples for round {round_index}; run `magic sample` first")
    checklists = load_checklists(config.judge.checklist)
    human_only = config.judge.backend == "human" and judge_id is None
    if human_only:
        judge_id, prompt_version = "human", None
    else:
        judge_id, prompt_version = judge_identity(config, checklists, judge_id)
    summary = PairsSummary(round=round_index, judge_id=judge_id, rule=config.pairs.rule, samples=len(samples))
    if not human_only:
        summary.kappa_note = _check_kappa(config, ledger, checklists, judge_id, prompt_version)
    judged, reviewed, missing = _grades(
        ledger, samples, checklists, judge_id, prompt_version,
        use_reviews=human_only or config.pairs.prefer_human, use_verdicts=not human_only,
    )
    if human_only:
        judged = {}
    rows = build_pairs(samples, judged, reviewed, config.pairs, prefer_human=human_only or config.pairs.prefer_human)
    ledger.replace_pairs(round_index, rows)
    summary.units = len(_units(samples))
    summary.pairs = len(rows)
    summary.missing = missing
    for row in rows:
        summary.one_wins += int(not row.tie)
        summary.both_win += int(row.tie and row.outcome_a == 1)
        summary.both_lose += int(row.tie and row.outcome_a == 0)
        summary.from_human += int(row.source == "human")
    grades = {**judged, **(reviewed if (human_only or config.pairs.prefer_human) else {})}
    if grades:
        summary.mean_reward = sum(reward(g.items) for g in grades.values()) / len(grades)
    settings = hashlib.sha256((config.pairs.model_dump_json() + judge_id).encode()).hexdigest()[:12]
    detail = f"{summary.pairs} pairs, {summary.one_wins} with a winner"
    if summary.undecided:
        detail += f", {summary.undecided} verdicts with an undecided item left out"
    ledger.set_stage(f"pairs:{round_index}", settings, "done", detail)
    return summary


def _open_ledger(paths: RunPaths) -> Ledger:
    if not paths.ledger.exists():
        raise FeedbackError(f"{paths.ledger} does not exist; run `magic sample` and `magic judge` first")
    return Ledger(paths.ledger)


def sample_rewards(config: RunConfig, round_index: int = 0, judge_id: str | None = None) -> dict[str, float]:
    """RFT rewards per sample id of a round (the fraction of items met), from the
    judge's verdicts, or from the latest review where `pairs.prefer_human` is set and one exists. Samples
    without a usable grade (no verdict, a failed one, or one with an undecided item) are left out."""
    ledger = _open_ledger(RunPaths(config.run_dir))
    samples = ledger.samples(round_index)
    checklists = load_checklists(config.judge.checklist)
    human_only = config.judge.backend == "human" and judge_id is None
    identity = ("human", None) if human_only else judge_identity(config, checklists, judge_id)
    judged, reviewed, _ = _grades(
        ledger, samples, checklists, identity[0], identity[1],
        use_reviews=human_only or config.pairs.prefer_human, use_verdicts=not human_only,
    )
    grades = {**judged, **reviewed} if (human_only or config.pairs.prefer_human) else judged
    return {sample_id: reward(grade.items) for sample_id, grade in grades.items()}


def undecided_counts(ledger: Ledger, checklists: ChecklistSet, judge_id: str, prompt_version: str | None) -> dict[int, int]:
    """Per round: the samples whose verdict from this judge has an undecided item (requires applied), so
    feeds no pair and no reward. Rounds without one are left out."""
    counts: dict[int, int] = {}
    for round_index in ledger.rounds():
        samples = [s for s in ledger.samples(round_index) if s.target_label in checklists]
        if not samples:
            continue
        _, _, missing = _grades(ledger, samples, checklists, judge_id, prompt_version, use_reviews=False, use_verdicts=True)
        left_out = sum(reason == UNDECIDED for reason in missing.values())
        if left_out:
            counts[round_index] = left_out
    return counts


# ----------------------------------------------------------------------------------- authors' feedback
def parse_authors_feedback(data: object, source: str = "feedback") -> list[list[list[int]]]:
    """Validate the authors' JSON layout: prompts -> images -> item values (0/1; true/false accepted)."""
    if not isinstance(data, list):
        raise FeedbackError(f"{source}: expected a list with one entry per prompt, got {type(data).__name__}")
    parsed: list[list[list[int]]] = []
    for p, prompt in enumerate(data):
        if not isinstance(prompt, list) or not prompt:
            raise FeedbackError(f"{source}: prompt {p} should be a non-empty list of per-image item lists")
        images = []
        for i, items in enumerate(prompt):
            if not isinstance(items, list) or not items:
                raise FeedbackError(f"{source}: prompt {p}, image {i} should be a list of 0/1 item values, got {items!r}")
            values = []
            for j, value in enumerate(items):
                if isinstance(value, bool):
                    value = int(value)
                if isinstance(value, float) and value in (0.0, 1.0):
                    value = int(value)
                if value not in (0, 1) or not isinstance(value, int):
                    raise FeedbackError(f"{source}: prompt {p}, image {i}, item {j} is {value!r}; expected 0 or 1")
                values.append(value)
            images.append(values)
        parsed.append(images)
    return parsed


def import_authors_feedback(config: RunConfig, path: str | Path, round_index: int = 0) -> str:
    """Store the authors' feedback file as verdicts of a judge named `import:<file stem>` and return that id.

    Prompt p is the p-th unit of the round in unit-id order and image i its i-th sample in k order (the
    order `export_authors_feedback` writes). One file is one judge: files are never averaged together."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeedbackError(f"feedback file {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise FeedbackError(f"{path} is not valid JSON: {error}") from None
    feedback = parse_authors_feedback(data, str(path))
    ledger = _open_ledger(RunPaths(config.run_dir))
    checklists = load_checklists(config.judge.checklist)
    units = _units(ledger.samples(round_index))
    if len(feedback) != len(units):
        raise FeedbackError(
            f"{path} has {len(feedback)} prompts but round {round_index} has {len(units)} units; prompt p must be "
            "the p-th unit in unit-id order"
        )
    judge_id = f"{AUTHORS_IMPORT_PREFIX}{path.stem}"
    for p, (prompt, (unit_id, members)) in enumerate(zip(feedback, units.items())):
        if len(prompt) != len(members):
            raise FeedbackError(f"{path}: prompt {p} has {len(prompt)} images but unit {unit_id} has {len(members)} samples")
        for i, (items, sample) in enumerate(zip(prompt, members)):
            checklist = _checklist_for(checklists, sample)
            if len(items) != len(checklist.items):
                raise FeedbackError(
                    f"{path}: prompt {p}, image {i} has {len(items)} items but the {checklist.condition!r} "
                    f"checklist has {len(checklist.items)}"
                )
            verdict = Verdict(items=list(items), raw=json.dumps(items), parse_status="ok")
            ledger.put_verdict(
                sample.image_sha256, judge_id, checklist.version, "none", verdict, checklist.condition, replace=True
            )
    return judge_id


def export_authors_feedback(
    config: RunConfig, path: str | Path, round_index: int = 0, judge_id: str | None = None
) -> int:
    """Write the round's verdicts in the authors' layout; unknown or missing answers are written as 0 (the
    format has no "unknown"). Returns the number of prompts written."""
    ledger = _open_ledger(RunPaths(config.run_dir))
    checklists = load_checklists(config.judge.checklist)
    judge_id, prompt_version = judge_identity(config, checklists, judge_id)
    feedback = []
    for members in _units(ledger.samples(round_index)).values():
        prompt = []
        for sample in members:
            checklist = _checklist_for(checklists, sample)
            verdict = ledger.find_verdict(sample.image_sha256, judge_id, checklist.version, prompt_version)
            items = verdict.items if verdict is not None and len(verdict.items) == len(checklist.items) else []
            items = checklist.apply_requires(list(items)) if items else [None] * len(checklist.items)
            prompt.append([1 if value == 1 else 0 for value in items])
        feedback.append(prompt)
    atomic_write_text(Path(path), json.dumps(feedback))
    return len(feedback)


# ------------------------------------------------------------------------------------- Diffusion-DPO export
DPO_COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption", "pair_id", "score_0", "score_1", "source")


def export_dpo_dataset(config: RunConfig, folder: str | Path, round_index: int = 0, include_ties: bool = False) -> int:
    """Write the round's pairs as a Diffusion-DPO dataset folder (see the module docstring); returns rows written.
    Ties are left out unless `include_ties` (then label_0 = 0.5, as in Pick-a-Pic)."""
    paths = RunPaths(config.run_dir)
    ledger = _open_ledger(paths)
    pairs = ledger.pairs(round_index)
    if not pairs:
        raise FeedbackError(f"round {round_index} has no pairs; run `magic pairs` first")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for pair in pairs:
        if pair.tie and not include_ties:
            continue
        names = []
        for sample_id in (pair.sample_a, pair.sample_b):
            sample = ledger.sample(sample_id)
            if sample is None:
                raise FeedbackError(f"pair {pair.pair_id}: sample {sample_id} is not in the ledger")
            source = paths.root / sample.image_path
            name = f"images/{sample_id}{source.suffix or '.png'}"
            if not (folder / name).exists():
                with atomic_path(folder / name) as temporary:
                    shutil.copyfile(source, temporary)
            names.append(name)
        label = 0.5 if pair.tie else float(pair.outcome_a)
        caption = ledger.sample(pair.sample_a).prompt
        rows.append(
            {
                "jpg_0": names[0], "jpg_1": names[1], "label_0": label, "caption": caption, "pair_id": pair.pair_id,
                "score_0": pair.score_a, "score_1": pair.score_b, "source": pair.source,
            }
        )
    atomic_write_text(folder / "metadata.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(DPO_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "metadata.csv", buffer.getvalue())
    return len(rows)
