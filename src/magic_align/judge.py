"""The judge stage: grade every sample of a round against its target condition's checklist.

`run_judge(config, round_index)` reads the round's samples from the ledger, builds the configured judge
(`judges.make_judge`), and asks it about every image whose ledger key (image hash, judge id, checklist
version, prompt version) is not present yet. Each answer is committed to the ledger the moment it arrives,
so a rerun asks nothing already answered and a killed run resumes where it stopped without paying twice.
Calls run concurrently (`judge.concurrency`); the budget cap (`judge.budget_usd`, counted over everything
this judge has spent in the ledger) stops new calls before they could exceed it, keeping what was answered.

Only an answer is a verdict. A call that got none (`JudgeCallError`: unreachable server, timeouts or 5xx
after every retry, rejected key, unknown model, exhausted quota) is recorded in the ledger's `attempts` table
and its image stays pending. A systematic failure stops the stage at once, and so do
`STOP_AFTER_FAILED_CALLS` calls in a row without an answer. The stage is `done` only when every image of the
round has a verdict; otherwise it ends `failed` with a `JudgeStageError` whose one line says why, how many
images are left and how many answers were stored, and a rerun asks the rest. `retry_failed` asks again the
answers stored as `failed` (unreadable), replacing them.

Only synthetic images are sent to judges that talk to a server (judges/privacy.py: `openai`, and an ensemble
with an `openai` member) unless `judge.send_real_images` is set; a non-loopback endpoint needs
`judge.allow_remote`. The `human` backend asks nothing: its verdicts are the reviews written by
the review page, which `magic pairs` reads (see docs/judging.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

from magic_align.checklists.schema import Checklist, ChecklistSet, load_checklists
from magic_align.config import JudgeConfig, RunConfig
from magic_align.data.images import sha256_file
from magic_align.judges import make_judge
from magic_align.judges.base import Judge, JudgeCallError, Verdict
from magic_align.judges.costs import cost_usd, estimate_image_tokens, estimate_text_tokens, price_usd, sent_size
from magic_align.judges.privacy import OPENAI_API_URL, check_endpoint, may_send, sends_images
from magic_align.judges.prompts import render_prompt
from magic_align.ledger import Ledger, SampleRow
from magic_align.progress import StageProgress
from magic_align.run import RunPaths
from magic_align.errors import MagicError

# Rough answer lengths for the dry-run estimate: the paper style answers one short list, the structured
# style one verdict and one sentence per item.
OUTPUT_TOKENS_PAPER = 20
OUTPUT_TOKENS_STRUCTURED_PER_ITEM = 35
# Calls in a row (in the order they end) without an answer after which the stage stops: the server is down
# or refuses everything, and retrying each remaining image would only repeat the failure.
STOP_AFTER_FAILED_CALLS = 3


class JudgeStageError(MagicError, RuntimeError):
    """The judge stage cannot start or did not grade every image; the message says why and what to do.
    `summary` is the run's `JudgeSummary` when the stage had started asking."""

    def __init__(self, message: str, summary: "JudgeSummary | None" = None):
        super().__init__(message)
        self.summary = summary


# ------------------------------------------------------------------------------------------ estimates
def prompt_text_for(judge: Judge | None, checklist: Checklist, style: str = "paper") -> str:
    """The prompt a judge would send for this checklist: the judge's own `prompt_text(checklist)` where it
    has one, else the shared prompt templates (judges/prompts.py) in the configured style."""
    render = getattr(judge, "prompt_text", None)
    if callable(render):
        return str(render(checklist))
    return render_prompt(checklist, style)


# ------------------------------------------------------------------------------------------- summary
@dataclass
class ItemTally:
    met: int = 0
    known: int = 0

    @property
    def rate(self) -> float:
        return self.met / self.known if self.known else float("nan")


@dataclass
class ConditionTally:
    images: int = 0
    items_met: int = 0
    items_total: int = 0
    all_met: int = 0

    @property
    def item_rate(self) -> float:
        return self.items_met / self.items_total if self.items_total else float("nan")

    @property
    def all_rate(self) -> float:
        return self.all_met / self.images if self.images else float("nan")


@dataclass
class JudgeSummary:
    judge_id: str
    round: int
    samples: int = 0  # samples in the round
    images: int = 0  # distinct ledger keys the round needs
    cached: int = 0  # keys already answered before this run
    asked: int = 0  # answers stored by this run (one per image)
    answered: int = 0  # of those, answers with at least some items (ok / partial)
    failed: int = 0  # of those, failed or refused answers (stored, items unknown)
    requests: int = 0  # calls to the model (HTTP requests with retries and repairs), answered or not
    call_failures: dict[str, int] = field(default_factory=dict)  # calls without an answer (attempts), by cause
    retried: int = 0  # stored failed answers asked again (retry_failed)
    skipped_real: int = 0  # real images not sent (send_real_images = false)
    not_readable: list[str] = field(default_factory=list)  # samples whose image is missing, unreadable or changed
    remaining: int = 0  # keys still unanswered when the run ended (budget, error)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0  # this run
    spent_usd: float = 0.0  # this judge in the whole ledger, after the run
    stopped: str | None = None  # why the run stopped early, if it did
    parse_status: dict[str, int] = field(default_factory=dict)  # over every verdict of the round
    conditions: dict[str, ConditionTally] = field(default_factory=dict)
    items: dict[tuple[str, str], ItemTally] = field(default_factory=dict)  # (condition, item id)
    aspects: dict[str, ItemTally] = field(default_factory=dict)
    dry_run: bool = False
    estimated_input_tokens: int = 0
    estimated_output_tokens: int = 0
    estimated_cost_usd: float | None = None

    def tables(self) -> list[Table]:
        """The closing summary as rich tables (the CLI prints them)."""
        overview = Table(title=f"judge {self.judge_id}, round {self.round}" + (" (dry run)" if self.dry_run else ""))
        overview.add_column("what")
        overview.add_column("value", justify="right")
        rows = [
            ("samples in the round", self.samples),
            ("distinct images to grade", self.images),
            ("already in the ledger", self.cached),
        ]
        if self.dry_run:
            cost = "unknown (no price)" if self.estimated_cost_usd is None else f"${self.estimated_cost_usd:.4f}"
            rows += [
                ("calls needed", self.remaining),
                ("estimated input tokens", self.estimated_input_tokens),
                ("estimated output tokens", self.estimated_output_tokens),
                ("estimated cost", cost),
            ]
        else:
            rows += [
                ("calls made (requests, retries included)", self.requests),
                ("answers stored", self.asked),
                ("answered", self.answered),
                ("failed or refused (stored)", self.failed),
                ("calls without an answer (attempts)", sum(self.call_failures.values())),
                ("still unanswered", self.remaining),
                ("input / output tokens", f"{self.input_tokens} / {self.output_tokens}"),
                ("cost of this run", f"${self.cost_usd:.4f}"),
                ("spent by this judge (ledger)", f"${self.spent_usd:.4f}"),
            ]
        if self.retried:
            rows.append(("failed answers asked again", self.retried))
        if self.skipped_real:
            rows.append(("real images not sent", self.skipped_real))
        if self.not_readable:
            rows.append(("images missing or changed", len(self.not_readable)))
        for status, count in sorted(self.parse_status.items()):
            rows.append((f"verdicts {status}", count))
        for name, value in rows:
            overview.add_row(name, str(value))
        tables = [overview]
        if self.conditions:
            per_condition = Table(title="pass rate per condition")
            for column in ("condition", "images", "items met", "all items met"):
                per_condition.add_column(column, justify="left" if column == "condition" else "right")
            per_condition.add_column("per item")
            for condition, tally in sorted(self.conditions.items()):
                items = ", ".join(
                    f"{item_id} {item.rate:.0%}" for (name, item_id), item in self.items.items() if name == condition
                )
                per_condition.add_row(
                    condition, str(tally.images), _percent(tally.item_rate), _percent(tally.all_rate), items
                )
            tables.append(per_condition)
        if self.aspects:
            per_aspect = Table(title="pass rate per aspect (all conditions)")
            per_aspect.add_column("aspect")
            per_aspect.add_column("met / known", justify="right")
            per_aspect.add_column("rate", justify="right")
            for aspect, tally in self.aspects.items():
                per_aspect.add_row(aspect, f"{tally.met} / {tally.known}", _percent(tally.rate))
            tables.append(per_aspect)
        return tables


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1%}"


def _tally(summary: JudgeSummary, work: list["_Work"], ledger: Ledger, judge_id: str, prompt_version: str) -> None:
    """Pass rates over every stored verdict of the round's images (cached ones included)."""
    for unit in work:
        stored = ledger.get_verdict(unit.sha, judge_id, unit.checklist.version, prompt_version)
        if stored is None:
            continue
        summary.parse_status[stored.parse_status] = summary.parse_status.get(stored.parse_status, 0) + 1
        if not stored.answered:
            continue
        _add_to_tally(summary, unit.checklist, stored.items)


def _add_to_tally(summary: JudgeSummary, checklist: Checklist, items: list[int | None]) -> None:
    if len(items) != len(checklist.items):
        return  # an answer of the wrong length cannot be lined up with the items
    items = checklist.apply_requires(list(items))
    tally = summary.conditions.setdefault(checklist.condition, ConditionTally())
    tally.images += 1
    tally.items_met += sum(1 for value in items if value == 1)
    tally.items_total += len(items)
    tally.all_met += int(all(value == 1 for value in items))
    for item, value in zip(checklist.items, items):
        if value is None:
            continue
        for tallies, key in ((summary.items, (checklist.condition, item.id)), (summary.aspects, item.aspect)):
            entry = tallies.setdefault(key, ItemTally())
            entry.known += 1
            entry.met += int(value == 1)


# ------------------------------------------------------------------------------------------ the stage
@dataclass
class _Work:
    """One ledger key to grade, with the samples that share its image."""

    sha: str
    checklist: Checklist
    sample: SampleRow
    replace: bool = False  # a stored failed answer asked again (retry_failed): the new answer replaces it


def _open_image(path: Path, expected_sha: str) -> Image.Image:
    """Read the sample's PNG, checking it is the image the ledger recorded (else the cache key would lie)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    actual = sha256_file(path)
    if actual != expected_sha:
        raise ValueError(f"{path} changed since sampling (sha256 {actual[:12]}, ledger says {expected_sha[:12]})")
    with Image.open(path) as image:
        return image.convert("RGB")


def _collect_work(
    samples: list[SampleRow], checklists: ChecklistSet, config: RunConfig, summary: JudgeSummary
) -> list[_Work]:
    work: dict[tuple[str, str], _Work] = {}
    for sample in samples:
        if sample.target_label not in checklists:
            raise JudgeStageError(
                f"sample {sample.sample_id}: target label {sample.target_label!r} has no checklist in "
                f"{checklists.id!r} (judge.checklist = {config.judge.checklist!r}); known: "
                f"{', '.join(checklists.condition_names)}"
            )
        if not may_send(sample.synthetic, config.judge):
            summary.skipped_real += 1
            continue
        checklist = checklists[sample.target_label]
        work.setdefault((sample.image_sha256, checklist.version), _Work(sample.image_sha256, checklist, sample))
    return list(work.values())


def estimate_call_tokens(
    judge: Judge | None, checklist: Checklist, width: int, height: int, config: JudgeConfig
) -> tuple[int, int]:
    """(input, output) tokens of one call grading a `width` x `height` image against `checklist`."""
    input_tokens = estimate_text_tokens(prompt_text_for(judge, checklist, config.prompt_style))
    input_tokens += estimate_image_tokens(*sent_size(width, height, config.image_size))
    if config.prompt_style == "structured":
        return input_tokens, OUTPUT_TOKENS_STRUCTURED_PER_ITEM * len(checklist.items) + 20
    return input_tokens, OUTPUT_TOKENS_PAPER


def _estimate(
    pending: list[_Work], judge: Judge | None, config: RunConfig, paths: RunPaths, summary: JudgeSummary
) -> None:
    total_in = total_out = 0
    for unit in pending:
        try:
            with Image.open(paths.root / unit.sample.image_path) as image:
                width, height = image.size
        except (OSError, ValueError):
            width = height = config.judge.image_size  # missing file: assume the configured size
        call_in, call_out = estimate_call_tokens(judge, unit.checklist, width, height, config.judge)
        total_in += call_in
        total_out += call_out
    summary.estimated_input_tokens = total_in
    summary.estimated_output_tokens = total_out
    # local backends (hf, rules) are free; HTTP ones are priced by judge.prices[judge.model]
    summary.estimated_cost_usd = price_usd(config.judge, total_in, total_out) if sends_images(config.judge) else 0.0


def run_judge(
    config: RunConfig,
    round_index: int = 0,
    dry_run: bool = False,
    judge: Judge | None = None,
    show_progress: bool = True,
    console: Console | None = None,
    retry_failed: bool = False,
) -> JudgeSummary:
    """Grade the round's samples; see the module docstring. `judge` replaces the configured one (tests).
    Returns the summary when every image has a verdict; raises `JudgeStageError` (with the summary) otherwise."""
    paths = RunPaths(config.run_dir)
    if not paths.ledger.exists():
        raise JudgeStageError(f"{paths.ledger} does not exist; run `magic sample` first")
    ledger = Ledger(paths.ledger)
    samples = ledger.samples(round_index)
    if not samples:
        raise JudgeStageError(f"the ledger {paths.ledger} has no samples for round {round_index}; run `magic sample` first")
    checklists = load_checklists(config.judge.checklist)

    if config.judge.backend == "human" and judge is None:
        summary = _human_summary(ledger, samples, checklists, round_index)
        if summary.remaining:  # the stage is done only when every sample has its review
            raise JudgeStageError(summary.stopped, summary)
        return summary

    if judge is None:
        judge = make_judge(config.judge, checklists)
    summary = JudgeSummary(judge_id=judge.id, round=round_index, samples=len(samples), dry_run=dry_run)
    work = _collect_work(samples, checklists, config, summary)
    answered = ledger.answered_keys(judge.id, judge.prompt_version)
    unreadable = ledger.failed_keys(judge.id, judge.prompt_version) if retry_failed else set()
    pending = []
    for unit in work:
        key = (unit.sha, unit.checklist.version)
        unit.replace = key in unreadable
        if unit.replace or key not in answered:
            pending.append(unit)
    summary.images = len(work)
    summary.cached = len(work) - len(pending)
    summary.remaining = len(pending)

    if dry_run:
        _estimate(pending, judge, config, paths, summary)
        _tally(summary, work, ledger, judge.id, judge.prompt_version)
        return summary

    if sends_images(config.judge) and pending:
        check_endpoint(config.judge.base_url or OPENAI_API_URL, config.judge.allow_remote)
    stage, config_hash = f"judge:{round_index}", _config_hash(config)
    try:
        ledger.set_stage(stage, config_hash, "running", f"{len(pending)} images to grade")
        ready = getattr(judge, "check_ready", None)  # e.g. no API key: fail before the first call
        if ready is not None and pending:
            try:
                ready()
            except JudgeCallError as error:
                raise JudgeStageError(f"{error}; {len(pending)} of {len(work)} images not graded, nothing was sent",
                                      summary) from error
        asyncio.run(_grade_then_close(pending, judge, ledger, config, paths, summary, show_progress, console))
    except JudgeStageError as error:
        summary.spent_usd = ledger.spent_usd(judge.id)
        _tally(summary, work, ledger, judge.id, judge.prompt_version)
        error.summary = summary
        ledger.set_stage(stage, config_hash, "failed", str(error))
        raise
    except BaseException as error:
        ledger.set_stage(stage, config_hash, "failed", f"{type(error).__name__}: {error}")
        raise
    summary.spent_usd = ledger.spent_usd(judge.id)
    ledger.set_stage(
        stage, config_hash, "done",
        f"{summary.images} images graded, {summary.asked} answers and {summary.requests} calls this run",
    )
    _tally(summary, work, ledger, judge.id, judge.prompt_version)
    return summary


def _config_hash(config: RunConfig) -> str:
    text = config.judge.model_dump_json() + config.sample.model_dump_json()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class _PoolState:
    """What the judging workers share while they grade (one event loop, so no lock is needed)."""

    reserved: float = 0.0  # money reserved by the calls in flight
    largest: float = 0.0  # the largest cost of one answer so far: what the next call reserves
    error: BaseException | None = None  # what stops the stage (systematic or unexpected); the first one is kept
    # failed-call errors already recorded: a judge raises its systematic error again, without a request, for
    # every later call, and that repeat is not another attempt
    seen: list[BaseException] = field(default_factory=list)
    in_a_row: int = 0  # calls without an answer since the last answer
    # Requests the server rejected (a 4xx for one image: a failed verdict without any answer text). One is the
    # image's problem; the first few all rejected before any answer is the endpoint's (e.g. a model that takes
    # no images), so the stage stops rather than storing a failed verdict for every image.
    rejected: int = 0
    any_answer: bool = False

    def stop(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error


async def _grade_then_close(pending: list[_Work], judge: Judge, *args) -> None:
    """Grade, then release the judge's connections (OpenAIJudge, EnsembleJudge have `aclose`) inside the
    same event loop that opened them, even when grading stopped on an error."""
    try:
        await _grade(pending, judge, *args)
    finally:
        close = getattr(judge, "aclose", None)
        if close is not None:
            await close()


async def _grade(
    pending: list[_Work],
    judge: Judge,
    ledger: Ledger,
    config: RunConfig,
    paths: RunPaths,
    summary: JudgeSummary,
    show_progress: bool,
    console: Console | None,
) -> None:
    budget = config.judge.budget_usd
    spent_before = ledger.spent_usd(judge.id)
    # The first calls are reserved at the priced estimate of one call; once answers arrive, at the largest
    # cost seen so far, so concurrent calls in flight can never push the total past the budget.
    # Only HTTP judges are priced; local ones (hf, rules) cost nothing unless their verdicts say otherwise.
    paid = sends_images(config.judge)
    one_call = _estimate_one_call(pending, judge, config, paths) if paid else None
    state = _PoolState()
    queue: asyncio.Queue[_Work] = asyncio.Queue()
    for unit in pending:
        queue.put_nowait(unit)

    progress = StageProgress(
        f"judging {judge.id} round {summary.round}", summary.images, unit="image", completed=summary.cached,
        resume="rerun the same command: images already graded are not asked again",
        enabled=show_progress, console=console,
    )

    def reservation() -> float:
        return max(state.largest, one_call or 0.0)

    async def failed_call(unit: _Work, error: Exception) -> bool:
        """Record a call that got no answer as an attempt (never a verdict); True when the stage must stop."""
        if any(error is seen for seen in state.seen):
            return True  # the systematic error once more, for a call that sent nothing
        state.seen.append(error)
        call_error = error if isinstance(error, JudgeCallError) else None
        systematic = call_error is None or call_error.systematic  # an unexpected exception stops too
        if systematic:
            state.stop(error)
        cause = call_error.cause if call_error is not None else type(error).__name__
        requests = call_error.requests if call_error is not None else 1
        summary.requests += requests
        summary.call_failures[cause] = summary.call_failures.get(cause, 0) + 1
        await asyncio.to_thread(
            ledger.add_attempt, unit.sha, judge.id, unit.checklist.version, judge.prompt_version, cause,
            str(error) if call_error is not None else f"{type(error).__name__}: {error}", requests, systematic,
            unit.checklist.condition,
        )
        if systematic:
            return True
        state.in_a_row += 1
        if state.in_a_row >= STOP_AFTER_FAILED_CALLS and not summary.stopped:
            summary.stopped = f"{state.in_a_row} calls in a row got no answer, the last: {error}"
        return bool(summary.stopped)

    async def worker() -> None:
        while True:
            if state.error is not None or summary.stopped:
                return
            try:
                unit = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            reserve = reservation()
            if budget is not None:
                committed = spent_before + summary.cost_usd + state.reserved
                if committed + reserve > budget + 1e-12:
                    summary.stopped = (
                        f"budget reached: ${spent_before + summary.cost_usd:.4f} spent by {judge.id}, "
                        f"${state.reserved:.4f} in flight, the next call would pass judge.budget_usd = "
                        f"${budget:.2f}; answered images are kept, raise the budget and rerun to continue"
                    )
                    return
            state.reserved += reserve
            try:
                image_path = paths.root / unit.sample.image_path
                try:
                    image = await asyncio.to_thread(_open_image, image_path, unit.sha)
                except (OSError, ValueError) as error:
                    summary.not_readable.append(f"{unit.sample.sample_id}: {error}")
                    continue
                started = time.perf_counter()
                try:
                    verdict = await judge.judge(image, unit.checklist)
                except Exception as error:  # no answer: an attempt, and the image stays pending
                    if await failed_call(unit, error):
                        return
                    continue
                if not verdict.latency_s:
                    verdict.latency_s = time.perf_counter() - started
                if paid and not verdict.cost_usd and (verdict.input_tokens or verdict.output_tokens):
                    verdict.cost_usd = cost_usd(config.judge, verdict.input_tokens, verdict.output_tokens)
                # stored before anything else happens: this answer was paid for. The commit waits for the
                # disk (synchronous = FULL), so it runs in a thread and the other calls keep going meanwhile.
                await asyncio.to_thread(
                    ledger.put_verdict, unit.sha, judge.id, unit.checklist.version, judge.prompt_version, verdict,
                    unit.checklist.condition, unit.replace,
                )
            except Exception as error:  # e.g. a lost disk: stop asking, keep what others are finishing
                state.stop(error)
                return
            finally:
                state.reserved -= reserve
            _count(summary, verdict)
            summary.retried += int(unit.replace)
            if verdict.parse_status == "failed" and not verdict.raw:
                state.rejected += 1
            else:
                state.any_answer = True
            if not state.any_answer and state.rejected >= STOP_AFTER_FAILED_CALLS and not summary.stopped:
                summary.stopped = (
                    f"the first {state.rejected} requests were all rejected, the last: {verdict.error}; check "
                    "judge.model and judge.base_url (does the model take images?), then rerun with --retry-failed "
                    "to ask the rejected images again"
                )
            state.in_a_row = 0
            state.largest = max(state.largest, verdict.cost_usd)
            progress.advance(cost=f"${summary.cost_usd:.4f}")

    with progress:
        await asyncio.gather(*(worker() for _ in range(min(config.judge.concurrency, max(1, len(pending))))))
    summary.remaining = len(pending) - summary.asked
    error = state.error
    if error is not None:
        reason = str(error) if isinstance(error, JudgeCallError) else f"judge {judge.id} raised {type(error).__name__}: {error}"
        raise JudgeStageError(incomplete_line(summary, reason), summary) from error
    if summary.remaining or (summary.stopped and not state.any_answer):
        failures = sum(summary.call_failures.values())
        reason = summary.stopped or (
            f"{failures} call(s) got no answer" if failures else f"{len(summary.not_readable)} image(s) could not be read"
        )
        raise JudgeStageError(incomplete_line(summary, reason), summary)


def incomplete_line(summary: JudgeSummary, reason: str) -> str:
    """The one line a stage that did not grade every image ends with: why, what is left, what was kept."""
    parts = [reason, f"{summary.remaining} of {summary.images} images not graded"]
    if summary.call_failures:
        causes = ", ".join(f"{count} x {cause}" for cause, count in sorted(summary.call_failures.items()))
        parts.append(f"calls without an answer (recorded as attempts, not verdicts): {causes}")
    if summary.not_readable:
        parts.append(f"{len(summary.not_readable)} image(s) missing or changed since sampling, first {summary.not_readable[0]}")
    parts.append(f"{summary.asked} answer(s) stored this run in {summary.requests} call(s); rerun to continue")
    return "; ".join(parts)


def _count(summary: JudgeSummary, verdict: Verdict) -> None:
    summary.asked += 1
    summary.requests += verdict.requests or 1  # a backend that does not count its calls made one
    if verdict.answered:
        summary.answered += 1
    else:
        summary.failed += 1
    summary.input_tokens += verdict.input_tokens
    summary.output_tokens += verdict.output_tokens
    summary.cost_usd += verdict.cost_usd


def _estimate_one_call(pending: list[_Work], judge: Judge, config: RunConfig, paths: RunPaths) -> float | None:
    if not pending:
        return None
    probe = JudgeSummary(judge_id=judge.id, round=0)
    _estimate(pending[:1], judge, config, paths, probe)
    return probe.estimated_cost_usd


def _human_summary(ledger: Ledger, samples: list[SampleRow], checklists: ChecklistSet, round_index: int) -> JudgeSummary:
    """Backend `human`: nothing to ask; report how many samples have a review so far."""
    summary = JudgeSummary(judge_id="human", round=round_index, samples=len(samples))
    latest = ledger.latest_reviews(round=round_index)
    summary.images = len(samples)
    summary.cached = sum(1 for sample in samples if sample.sample_id in latest)
    summary.remaining = summary.images - summary.cached
    for sample in samples:
        review = latest.get(sample.sample_id)
        if review is None or sample.target_label not in checklists:
            continue
        _add_to_tally(summary, checklists[sample.target_label], review.items)
    if summary.remaining:
        summary.stopped = (
            f"backend 'human' asks nothing: {summary.remaining} samples have no review yet; open the review page "
            "(`magic review`) to grade them"
        )
    return summary
