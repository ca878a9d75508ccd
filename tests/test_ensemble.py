"""Ensembles: per-item majority and mean, against hand-computed tables; and `make_judge` wiring."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from checklist_builders import gated_checklist
from fake_openai_server import FakeChatServer
from magic_align.config import JudgeConfig
from magic_align.judges import make_judge, member_config
from magic_align.judges.base import JudgeCallError, Verdict
from magic_align.judges.ensemble import EnsembleJudge, combine_items, combine_verdicts, majority_item, mean_item
from magic_align.judges.openai_judge import OpenAIJudge

CHECKLIST = gated_checklist(
    "eczema",
    ("lesion", "lesion", "A patch of eczema is visible."),
    ("color", "color", "The patch is red."),
    ("texture", "texture", "The patch is dry and flaky."),
)


class FixedJudge:
    """A member that always gives the same verdict."""

    def __init__(self, name: str, verdict: Verdict) -> None:
        self.id = f"fixed:{name}"
        self.prompt_version = "none"
        self.verdict = verdict
        self.calls = 0

    async def judge(self, image, checklist) -> Verdict:
        self.calls += 1
        return Verdict(**{**self.verdict.__dict__, "items": list(self.verdict.items)})


def answered(items, **extra) -> Verdict:
    status = "ok" if all(value is not None for value in items) else "partial"
    return Verdict(items=list(items), raw=json.dumps(items), parse_status=status, **extra)


@pytest.mark.parametrize(
    ("values", "expected"),
    [([1, 1, 0], 1), ([0, 0, 1], 0), ([1, 0], None), ([1, None, None], 1), ([None, None], None), ([1, 0, None, 0], 0)],
)
def test_majority_item(values, expected):
    assert majority_item(values) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [([1, 1, 0], (1, 2 / 3)), ([1, 0], (0, 0.5)), ([1, None], (0, 0.5)), ([1, 1, None], (1, 2 / 3)), ([0, 0, 0], (0, 0.0))],
)
def test_mean_item(values, expected):
    value, mean = mean_item(values)
    assert value == expected[0]
    assert mean == pytest.approx(expected[1])


def test_combine_items_by_rule():
    members = [[1, 0, 1, None], [1, 1, 0, None], [0, 1, 0, 1]]
    assert combine_items(members, "majority") == [1, 1, 0, 1]
    assert combine_items(members, "mean") == [1, 1, 0, 0]  # last: 1 of 3 met (unknown counts as not met)
    assert combine_items([[1, 0], [0, 0]], "majority") == [None, 0]  # a tie is unknown under majority
    assert combine_items([[1, 0], [0, 0]], "mean") == [0, 0]  # and not met under mean
    with pytest.raises(ValueError, match="different numbers"):
        combine_items([[1, 0], [1]], "majority")


def test_combine_verdicts_leaves_out_failed_members_and_adds_costs():
    verdicts = [
        answered([1, 0, 1], input_tokens=10, output_tokens=2, cost_usd=0.01, latency_s=0.5),
        answered([1, 1, 0], input_tokens=20, output_tokens=3, cost_usd=0.02, latency_s=1.5),
        Verdict(items=[None] * 3, raw="??", parse_status="failed", error="unreadable", input_tokens=5, cost_usd=0.005),
    ]
    combined = combine_verdicts(verdicts, ["a", "b", "c"], "majority")
    assert combined.items == [1, None, None]
    assert combined.parse_status == "partial"
    assert combined.input_tokens == 35 and combined.output_tokens == 5
    assert combined.cost_usd == pytest.approx(0.035)
    assert combined.latency_s == 1.5
    assert json.loads(combined.raw) == {"a": "[1, 0, 1]", "b": "[1, 1, 0]", "c": "??"}
    assert "c: unreadable" in combined.error and "2 of 3 items undecided" in combined.error


def test_combine_verdicts_when_nobody_answered():
    refused = Verdict(items=[None] * 3, parse_status="refused", error="no")
    failed = Verdict(items=[None] * 3, parse_status="failed", error="bad")
    assert combine_verdicts([refused, refused], ["a", "b"]).parse_status == "refused"
    both = combine_verdicts([refused, failed], ["a", "b"])
    assert both.parse_status == "failed" and both.items == [None] * 3 and "no member answered" in both.error


async def test_ensemble_judge_applies_requires_after_combining():
    members = [
        FixedJudge("a", answered([0, 1, 1])),
        FixedJudge("b", answered([0, 1, 1])),
        FixedJudge("c", answered([1, 1, 0])),
    ]
    ensemble = EnsembleJudge(members, "majority")
    verdict = await ensemble.judge(Image.new("RGB", (8, 8)), CHECKLIST)
    assert [member.calls for member in members] == [1, 1, 1]
    assert verdict.items == [0, 0, 1]  # majority [0, 1, 1], then colour requires a lesion
    assert verdict.parse_status == "ok"
    assert ensemble.id == "ensemble:majority(fixed:a+fixed:b+fixed:c)"
    other = EnsembleJudge(members[:2], "majority")
    assert other.prompt_version != ensemble.prompt_version


def test_ensemble_rejects_bad_members():
    with pytest.raises(ValueError, match="at least one"):
        EnsembleJudge([])
    member = FixedJudge("a", answered([1, 1, 1]))
    with pytest.raises(ValueError, match="repeated"):
        EnsembleJudge([member, member])


def test_member_config():
    cfg = JudgeConfig(backend="ensemble", members=["openai:gpt-4o-mini", "rules"], model="gpt-4o")
    first = member_config(cfg, "openai:gpt-4o-mini")
    assert first.backend == "openai" and first.model == "gpt-4o-mini" and first.members == []
    assert member_config(cfg, "rules").model == "gpt-4o"
    with pytest.raises(ValueError, match="backend one of"):
        member_config(cfg, "ensemble")


async def test_make_judge_builds_an_ensemble_of_http_judges():
    with FakeChatServer(answer=lambda request: "[1, 1, 0]") as first, FakeChatServer(answer=lambda request: "[1, 0, 0]") as second:
        # two servers stand for two models; each member gets its own base_url through its own section
        cfg = JudgeConfig(backend="ensemble", base_url=first.base_url, members=["openai:model-a", "openai:model-b"], ensemble_rule="mean")
        judge = make_judge(cfg, checklists=None)
        assert isinstance(judge, EnsembleJudge)
        assert [type(member) for member in judge.members] == [OpenAIJudge, OpenAIJudge]
        judge.members[1] = OpenAIJudge(member_config(cfg.model_copy(update={"base_url": second.base_url}), "openai:model-b"))
        verdict = await judge.judge(Image.new("RGB", (8, 8), (200, 50, 50)), CHECKLIST)
        await judge.aclose()
    assert verdict.items == [1, 0, 0]  # means 1.0, 0.5 (tie: not met), 0.0
    assert verdict.rationales == ["mean 1.00 of 2", "mean 0.50 of 2", "mean 0.00 of 2"]
    assert first.total_calls == 1 and second.total_calls == 1


def test_make_judge_errors_are_clear():
    with pytest.raises(ValueError, match="judge.members"):
        make_judge(JudgeConfig(backend="ensemble"), checklists=None)
    with pytest.raises(ValueError, match="review page"):
        make_judge(JudgeConfig(backend="human"), checklists=None)


class SilentJudge(FixedJudge):
    """A member whose call gets no answer (`JudgeCallError`), systematic or not."""

    def __init__(self, name: str, systematic: bool = False) -> None:
        super().__init__(name, answered([1, 1, 1]))
        self.systematic = systematic

    async def judge(self, image, checklist) -> Verdict:
        self.calls += 1
        raise JudgeCallError("no answer after 3 attempt(s): HTTP 503", cause="HTTP 503", requests=3,
                             systematic=self.systematic)


@pytest.mark.parametrize("systematic", [False, True])
async def test_a_member_without_an_answer_gives_no_ensemble_verdict(systematic):
    members = [FixedJudge("a", answered([1, 1, 1], requests=2)), SilentJudge("b", systematic), FixedJudge("c", answered([1, 0, 0]))]
    ensemble = EnsembleJudge(members, "majority")
    with pytest.raises(JudgeCallError) as raised:  # the others alone would be another judge's verdict
        await ensemble.judge(Image.new("RGB", (8, 8)), CHECKLIST)
    assert raised.value.cause == "fixed:b: HTTP 503" and raised.value.systematic is systematic
    assert raised.value.requests == 2 + 3 + 0
    assert [member.calls for member in members] == [1, 1, 1]
