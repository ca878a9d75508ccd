"""The judge stage with an in-process counting judge: cache, resume after a crash, budget cap, dry run, and
calls without an answer (attempts, never verdicts)."""

from __future__ import annotations

import asyncio

import pytest

from magic_align.judge import STOP_AFTER_FAILED_CALLS, JudgeStageError, run_judge
from magic_align.judges.costs import estimate_image_tokens, estimate_text_tokens, sent_size
from magic_align.judges.base import JudgeCallError, Verdict


class CountingJudge:
    """Answers from the image itself (bits of the red channel), counts calls, can blow up after N answers."""

    def __init__(self, cost: float = 0.01, fail_after: int | None = None, prompt_version: str = "p1"):
        self.id = "fake:counting"
        self.prompt_version = prompt_version
        self.cost = cost
        self.fail_after = fail_after
        self.calls = 0
        self.seen: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def judge(self, image, checklist) -> Verdict:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise ConnectionError("injected failure")
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0)  # let other workers run, as a network call would
        self.in_flight -= 1
        red = image.getpixel((0, 0))[0]
        self.seen.append(red)
        items = [(red >> bit) & 1 for bit in range(len(checklist.items))]
        return Verdict(items=items, raw=str(items), input_tokens=300, output_tokens=15, cost_usd=self.cost)


def test_second_run_asks_nothing(feedback_run):
    config, ledger, samples = feedback_run(units=5, k=2)
    judge = CountingJudge()
    summary = run_judge(config, judge=judge, show_progress=False)
    assert judge.calls == 10
    assert (summary.asked, summary.answered, summary.failed, summary.cached, summary.remaining) == (10, 10, 0, 0, 0)
    assert summary.cost_usd == pytest.approx(0.10)
    assert summary.input_tokens == 3000
    for sample in samples:
        stored = ledger.get_verdict(sample.image_sha256, judge.id, _version(config, sample), "p1")
        red = (17 * int(sample.image_path[-8:-4])) % 256
        assert stored.items == [(red >> bit) & 1 for bit in range(5)]
        assert stored.condition == sample.target_label
    again = CountingJudge()
    summary = run_judge(config, judge=again, show_progress=False)
    assert again.calls == 0
    assert summary.cached == 10 and summary.asked == 0
    assert ledger.stage("judge:0").status == "done"
    # a new prompt version is a new key: everything is asked again
    changed = CountingJudge(prompt_version="p2")
    run_judge(config, judge=changed, show_progress=False)
    assert changed.calls == 10


def test_interrupted_run_resumes_without_repeating(feedback_run):
    config, ledger, samples = feedback_run(units=6, k=2)
    first = CountingJudge(fail_after=5)
    with pytest.raises(JudgeStageError, match="injected failure") as raised:
        run_judge(config, judge=first, show_progress=False)
    assert "rerun to continue" in str(raised.value)
    assert first.calls == 5
    assert len(ledger.answered_keys(first.id, "p1")) == 5  # every answer given before the crash is stored
    assert ledger.stage("judge:0").status == "failed"
    assert ledger.attempts(first.id) and all(a.cause == "ConnectionError" for a in ledger.attempts(first.id))
    second = CountingJudge()
    summary = run_judge(config, judge=second, show_progress=False)
    assert second.calls == 7
    assert not set(first.seen) & set(second.seen)  # no image asked twice
    assert summary.cached == 5 and summary.remaining == 0
    assert ledger.spent_usd(first.id) == pytest.approx(0.12)


class ClosingJudge(CountingJudge):
    """Records whether `aclose` ran, and in which event loop (the one that graded must close)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.closed_in_loop = None
        self.judged_in_loop = None

    async def judge(self, image, checklist) -> Verdict:
        self.judged_in_loop = asyncio.get_running_loop()
        return await super().judge(image, checklist)

    async def aclose(self) -> None:
        self.closed_in_loop = asyncio.get_running_loop()


def test_run_judge_closes_the_judge_even_on_failure(feedback_run):
    config, _, _ = feedback_run(units=2, k=2)
    judge = ClosingJudge()
    run_judge(config, judge=judge, show_progress=False)
    assert judge.closed_in_loop is not None and judge.closed_in_loop is judge.judged_in_loop
    failing = ClosingJudge(prompt_version="p2", fail_after=1)
    with pytest.raises(JudgeStageError, match="injected failure"):
        run_judge(config, judge=failing, show_progress=False)
    assert failing.closed_in_loop is not None and failing.closed_in_loop is failing.judged_in_loop


def test_budget_cap_stops_cleanly_and_rerun_continues(feedback_run):
    config, ledger, _ = feedback_run(units=5, k=2, extra=["judge.budget_usd=0.05", "judge.concurrency=1"])
    judge = CountingJudge(cost=0.01)
    with pytest.raises(JudgeStageError, match="budget reached") as raised:  # not done: images are left
        run_judge(config, judge=judge, show_progress=False)
    summary = raised.value.summary
    assert judge.calls == 5
    assert summary.stopped and "budget" in summary.stopped
    assert summary.remaining == 5 and "5 of 10 images not graded" in str(raised.value)
    assert ledger.spent_usd(judge.id) <= 0.05 + 1e-9
    assert ledger.stage("judge:0").status == "failed"
    config.judge.budget_usd = 1.0
    more = CountingJudge(cost=0.01)
    summary = run_judge(config, judge=more, show_progress=False)
    assert more.calls == 5 and summary.remaining == 0 and summary.stopped is None


def test_budget_holds_with_concurrent_calls(feedback_run):
    # a local backend has no price, so the first wave of calls is not reserved: the cap must still hold once
    # the real cost is known, counting calls in flight
    config, ledger, _ = feedback_run(units=10, k=2, extra=["judge.budget_usd=0.1", "judge.concurrency=4"])
    judge = CountingJudge(cost=0.01)
    with pytest.raises(JudgeStageError, match="budget reached"):
        run_judge(config, judge=judge, show_progress=False)
    assert ledger.spent_usd(judge.id) <= 0.1 + 0.04  # at most the first wave overshoots the estimate
    assert judge.calls < 20, (judge.calls, ledger.spent_usd(judge.id))


class OverlapJudge(CountingJudge):
    """Holds its first call open until a second call arrives, so overlap never depends on thread timing.

    A stage that asks one image at a time never sends the second call: the first one gives up waiting and
    the test sees one call in flight at most.
    """

    def __init__(self):
        super().__init__()
        self.second_call = asyncio.Event()

    async def judge(self, image, checklist) -> Verdict:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.in_flight >= 2:
            self.second_call.set()
        try:
            await asyncio.wait_for(self.second_call.wait(), timeout=5.0)
        except asyncio.TimeoutError:
            self.second_call.set()  # one wait is enough to tell; the later calls go straight through
        self.in_flight -= 1
        return await CountingJudge.judge(self, image, checklist)


def test_concurrency_is_used(feedback_run):
    config, _, _ = feedback_run(units=8, k=2, extra=["judge.concurrency=4"])
    judge = OverlapJudge()
    run_judge(config, judge=judge, show_progress=False)
    assert judge.calls == 16
    assert judge.most_in_flight > 1
    assert judge.most_in_flight <= 4


def test_real_images_are_not_sent_by_default(feedback_run):
    config, _, samples = feedback_run(
        units=2, k=2, real=2, extra=["judge.backend='openai'", "judge.base_url='http://127.0.0.1:9/v1'"]
    )
    judge = CountingJudge()
    summary = run_judge(config, judge=judge, show_progress=False)
    assert judge.calls == 4 and summary.skipped_real == 2
    config.judge.send_real_images = True
    judge = CountingJudge()
    run_judge(config, judge=judge, show_progress=False)
    assert judge.calls == 2


def test_remote_endpoint_needs_allow_remote(feedback_run):
    from magic_align.judges.privacy import PrivacyError

    config, ledger, _ = feedback_run(units=1, k=2, extra=["judge.backend='openai'", "judge.base_url='https://judge.example.org/v1'"])
    judge = CountingJudge()
    with pytest.raises(PrivacyError, match="allow_remote"):
        run_judge(config, judge=judge, show_progress=False)
    assert judge.calls == 0
    config.judge.allow_remote = True
    run_judge(config, judge=judge, show_progress=False)
    assert judge.calls == 2


def test_changed_image_is_not_graded(feedback_run):
    config, ledger, samples = feedback_run(units=2, k=2)
    (config.run_dir / samples[1].image_path).write_bytes(b"not the image that was sampled")
    judge = CountingJudge()
    with pytest.raises(JudgeStageError, match=samples[1].sample_id) as raised:
        run_judge(config, judge=judge, show_progress=False)
    summary = raised.value.summary
    assert judge.calls == 3
    assert len(summary.not_readable) == 1 and samples[1].sample_id in summary.not_readable[0]
    assert summary.remaining == 1 and "changed since sampling" in str(raised.value)


def test_unknown_target_label_is_a_clear_error(feedback_run):
    config, ledger, samples = feedback_run(units=1, k=2)
    bad = samples[0]
    bad.sample_id, bad.target_label = "odd", "gamma"
    ledger.add_samples([bad])
    with pytest.raises(JudgeStageError, match="sample odd: target label 'gamma' has no checklist"):
        run_judge(config, judge=CountingJudge(), show_progress=False)


def test_summary_pass_rates(feedback_run):
    config, _, samples = feedback_run(units=4, k=2)
    summary = run_judge(config, judge=CountingJudge(), show_progress=False)
    # expected from the same rule the fake judge follows, with 'round' requiring 'red' for alpha
    met = {"alpha": 0, "beta": 0}
    for index, sample in enumerate(samples):
        items = [((17 * index) % 256 >> bit) & 1 for bit in range(5)]
        if sample.target_label == "alpha" and items[0] == 0:
            items[1] = 0
        met[sample.target_label] += sum(items)
    for condition in ("alpha", "beta"):
        assert summary.conditions[condition].items_met == met[condition]
        assert summary.conditions[condition].images == 4
    assert summary.parse_status == {"ok": 8}
    assert len(summary.tables()) == 3


def test_dry_run_estimates_and_asks_nothing(feedback_run):
    config, _, samples = feedback_run(
        units=3, k=2, extra=["judge.backend='openai'", "judge.base_url='http://127.0.0.1:9/v1'"]
    )
    judge = CountingJudge()
    summary = run_judge(config, dry_run=True, judge=judge, show_progress=False)
    assert judge.calls == 0
    assert summary.remaining == 6
    from magic_align.checklists.schema import load_checklists
    from magic_align.judges.prompts import render_prompt

    checklists = load_checklists(config.judge.checklist)
    expected_in = sum(estimate_text_tokens(render_prompt(checklists[s.target_label], "paper")) + estimate_image_tokens(8, 8) for s in samples)
    assert summary.estimated_input_tokens == expected_in
    price = config.judge.prices["gpt-4o"]
    expected_cost = expected_in * price.input_per_mtok / 1e6 + summary.estimated_output_tokens * price.output_per_mtok / 1e6
    assert summary.estimated_cost_usd == pytest.approx(expected_cost)
    run_judge(config, judge=judge, show_progress=False)
    assert run_judge(config, dry_run=True, judge=CountingJudge(), show_progress=False).remaining == 0
    config.judge.model = "no-such-model"
    assert run_judge(config, dry_run=True, judge=CountingJudge(prompt_version="p9"), show_progress=False).estimated_cost_usd is None
    config.judge.backend = "rules"  # local judges cost nothing
    assert run_judge(config, dry_run=True, judge=CountingJudge(prompt_version="p9"), show_progress=False).estimated_cost_usd == 0.0


@pytest.mark.parametrize(
    "size, tokens",
    [
        ((512, 512), 85 + 170 * 1),
        ((1024, 1024), 85 + 170 * 4),  # shortest side to 768: 2 x 2 tiles
        ((2048, 4096), 85 + 170 * 6),  # fit 1024 x 2048, then 768 x 1536: 2 x 3 tiles
        ((100, 60), 85 + 170 * 1),
        ((513, 100), 85 + 170 * 2),
    ],
)
def test_estimate_image_tokens(size, tokens):
    assert estimate_image_tokens(*size) == tokens
    assert estimate_image_tokens(*size, detail="low") == 85


def test_sent_size_never_enlarges():
    assert sent_size(1024, 512, 512) == (512, 256)
    assert sent_size(64, 32, 512) == (64, 32)


def test_no_samples_is_a_clear_error(feedback_run):
    config, ledger, _ = feedback_run(units=1, k=2)
    with pytest.raises(JudgeStageError, match="no samples for round 3"):
        run_judge(config, round_index=3, judge=CountingJudge(), show_progress=False)


def test_human_backend_asks_nothing(feedback_run):
    config, ledger, samples = feedback_run(units=2, k=2, extra=["judge.backend='human'"])
    from magic_align.checklists.schema import load_checklists

    version = load_checklists(config.judge.checklist)["alpha"].version
    ledger.add_review(samples[0].sample_id, version, [1, 1, 1, 1, 1], "dr. a")
    with pytest.raises(JudgeStageError, match="3 samples have no review yet") as raised:
        run_judge(config, show_progress=False)
    summary = raised.value.summary
    assert summary.cached == 1 and summary.remaining == 3
    assert summary.conditions["alpha"].items_met == 5
    for sample in samples[1:]:  # once every sample has its review, the stage is done
        ledger.add_review(sample.sample_id, _version(config, sample), [0, 1, 0, 1, 0], "dr. a")
    summary = run_judge(config, show_progress=False)
    assert summary.cached == 4 and summary.remaining == 0 and not summary.stopped


def _version(config, sample):
    from magic_align.checklists.schema import load_checklists

    return load_checklists(config.judge.checklist)[sample.target_label].version


class NoAnswerJudge(CountingJudge):
    """Raises `JudgeCallError` (no answer) for the images whose red value is in `down`, or for every call once
    `down_after` answers were given; answers the others like CountingJudge. `systematic` errors are remembered
    and raised again for every later call, as the OpenAI judge does."""

    def __init__(self, down=(), down_after=None, systematic=False, requests=3, **kwargs):
        super().__init__(**kwargs)
        self.down, self.down_after, self.systematic, self.requests = set(down), down_after, systematic, requests
        self.failed_calls = 0
        self.fatal = None

    async def judge(self, image, checklist) -> Verdict:
        if self.fatal is not None:
            raise self.fatal
        red = image.getpixel((0, 0))[0]
        if red in self.down or (self.down_after is not None and self.calls >= self.down_after):
            self.failed_calls += 1
            error = JudgeCallError(f"no answer from http://judge.test/v1 after {self.requests} attempt(s): HTTP 503",
                                   cause="HTTP 503", requests=self.requests, systematic=self.systematic)
            if self.systematic:
                self.fatal = error
            await asyncio.sleep(0)  # other calls run meanwhile, as over a network
            raise error
        verdict = await super().judge(image, checklist)
        verdict.requests = 2  # e.g. one retry
        return verdict


def _red(sample) -> int:
    return (17 * int(sample.image_path[-8:-4])) % 256


def test_a_call_without_an_answer_is_an_attempt_and_the_rerun_asks_again(feedback_run):
    config, ledger, samples = feedback_run(units=5, k=2)
    down = {_red(samples[2]), _red(samples[7])}
    judge = NoAnswerJudge(down=down)
    with pytest.raises(JudgeStageError) as raised:
        run_judge(config, judge=judge, show_progress=False)
    message = str(raised.value)
    assert "2 of 10 images not graded" in message and "2 x HTTP 503" in message and "rerun to continue" in message
    assert "\n" not in message
    summary = raised.value.summary
    assert (summary.asked, summary.remaining, summary.call_failures) == (8, 2, {"HTTP 503": 2})
    assert summary.requests == 8 * 2 + 2 * 3  # requests, not images: retries of answered and failed calls
    for index in (2, 7):  # no verdict of any kind for the failed calls, only attempts
        assert ledger.get_verdict(samples[index].image_sha256, judge.id, _version(config, samples[index]), "p1") is None
        (attempt,) = ledger.attempts(judge.id, samples[index].image_sha256)
        assert (attempt.cause, attempt.requests, attempt.systematic) == ("HTTP 503", 3, False)
    assert ledger.stage("judge:0").status == "failed" and "2 of 10 images not graded" in ledger.stage("judge:0").detail

    back = CountingJudge()
    summary = run_judge(config, judge=back, show_progress=False)
    assert back.calls == 2 and sorted(back.seen) == sorted(down)  # exactly the two pending images
    assert summary.remaining == 0 and ledger.stage("judge:0").status == "done"
    assert len(ledger.attempts(judge.id)) == 2  # the audit trail stays


def test_a_systematic_failure_stops_at_the_first_call(feedback_run):
    config, ledger, samples = feedback_run(units=5, k=2)
    judge = NoAnswerJudge(down_after=0, systematic=True)
    with pytest.raises(JudgeStageError, match="HTTP 503") as raised:
        run_judge(config, judge=judge, show_progress=False)
    assert judge.failed_calls == 1  # the other workers got the remembered error without a call
    assert len(ledger.attempts(judge.id)) == 1 and ledger.attempts(judge.id)[0].systematic
    assert ledger.judge_ids() == []  # no verdict left behind
    assert "10 of 10 images not graded" in str(raised.value)


def test_calls_failing_in_a_row_stop_the_stage(feedback_run):
    config, ledger, samples = feedback_run(units=10, k=2, extra=["judge.concurrency=1"])
    judge = NoAnswerJudge(down_after=4)
    with pytest.raises(JudgeStageError, match=f"{STOP_AFTER_FAILED_CALLS} calls in a row got no answer"):
        run_judge(config, judge=judge, show_progress=False)
    assert judge.calls == 4 and judge.failed_calls == STOP_AFTER_FAILED_CALLS  # not one failed call per image
    assert len(ledger.attempts(judge.id)) == STOP_AFTER_FAILED_CALLS


def test_an_answer_resets_the_count_of_failed_calls(feedback_run):
    config, ledger, samples = feedback_run(units=5, k=2, extra=["judge.concurrency=1"])
    down = {_red(samples[index]) for index in (0, 1, 3, 4, 6, 7)}  # never three in a row
    judge = NoAnswerJudge(down=down)
    with pytest.raises(JudgeStageError, match="6 of 10 images not graded"):
        run_judge(config, judge=judge, show_progress=False)
    assert judge.failed_calls == 6 and judge.calls == 4


class UnreadableJudge(CountingJudge):
    """Gives an unreadable (failed) answer for the images whose red value is in `unreadable`."""

    def __init__(self, unreadable=(), **kwargs):
        super().__init__(**kwargs)
        self.unreadable = set(unreadable)

    async def judge(self, image, checklist) -> Verdict:
        verdict = await super().judge(image, checklist)
        if image.getpixel((0, 0))[0] in self.unreadable:
            return Verdict(items=[None] * len(checklist.items), raw="I think it looks fine", parse_status="failed",
                           error="no list in the answer", cost_usd=self.cost)
        return verdict


def test_retry_failed_asks_the_unreadable_answers_again(feedback_run):
    config, ledger, samples = feedback_run(units=3, k=2)
    first = UnreadableJudge(unreadable={_red(samples[1]), _red(samples[4])})
    summary = run_judge(config, judge=first, show_progress=False)
    assert summary.failed == 2 and summary.remaining == 0  # a paid answer, stored as failed: the stage is done
    assert run_judge(config, judge=CountingJudge(), show_progress=False).asked == 0  # kept, not asked again
    again = CountingJudge()
    summary = run_judge(config, judge=again, show_progress=False, retry_failed=True)
    assert again.calls == 2 and sorted(again.seen) == sorted({_red(samples[1]), _red(samples[4])})
    assert summary.retried == 2 and summary.remaining == 0
    stored = ledger.get_verdict(samples[1].image_sha256, again.id, _version(config, samples[1]), "p1")
    assert stored.parse_status == "ok" and stored.items == [(_red(samples[1]) >> bit) & 1 for bit in range(5)]
    assert ledger.spent_usd(again.id) == pytest.approx(0.08)  # both calls for the retried images are counted
    assert run_judge(config, judge=CountingJudge(), show_progress=False, retry_failed=True).asked == 0


def test_a_judge_that_cannot_call_fails_before_any_call(feedback_run):
    config, ledger, _ = feedback_run(units=2, k=2)

    class KeylessJudge(CountingJudge):
        def check_ready(self):
            raise JudgeCallError("the environment variable OPENAI_API_KEY is not set", systematic=True)

    judge = KeylessJudge()
    with pytest.raises(JudgeStageError, match="OPENAI_API_KEY is not set.*nothing was sent"):
        run_judge(config, judge=judge, show_progress=False)
    assert judge.calls == 0 and ledger.stage("judge:0").status == "failed"
    assert run_judge(config, judge=KeylessJudge(), dry_run=True, show_progress=False).remaining == 4


class RejectingJudge(CountingJudge):
    """The server rejects every request for `rejected` images (a 4xx for one image: a failed verdict without
    any answer text), answers the others."""

    def __init__(self, rejected=None, **kwargs):
        super().__init__(**kwargs)
        self.rejected = rejected  # None: every image

    async def judge(self, image, checklist) -> Verdict:
        red = image.getpixel((0, 0))[0]
        if self.rejected is None or red in self.rejected:
            self.calls += 1
            return Verdict(items=[None] * len(checklist.items), raw="", parse_status="failed",
                           error="HTTP 400: image input is not supported by this model", requests=1)
        return await super().judge(image, checklist)


def test_every_request_rejected_stops_the_stage_after_the_first_few(feedback_run):
    config, ledger, samples = feedback_run(units=10, k=2, extra=["judge.concurrency=1"])
    judge = RejectingJudge()
    with pytest.raises(JudgeStageError, match="requests were all rejected.*image input is not supported"):
        run_judge(config, judge=judge, show_progress=False)
    assert judge.calls == STOP_AFTER_FAILED_CALLS  # not one rejected request per image


def test_a_rejected_image_among_answers_is_its_own_failed_verdict(feedback_run):
    config, ledger, samples = feedback_run(units=4, k=2, extra=["judge.concurrency=1"])
    judge = RejectingJudge(rejected={_red(samples[index]) for index in (1, 2, 3, 4)})
    summary = run_judge(config, judge=judge, show_progress=False)  # the first answer came before the rejections
    assert summary.failed == 4 and summary.answered == 4 and summary.remaining == 0
