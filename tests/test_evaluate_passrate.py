"""Checklist pass rate against hand computations; judged verdicts go through the ledger cache."""

import numpy as np
import pytest
from PIL import Image

from magic_align.evaluate.passrate import items_needed, judge_images, parse_manifest_items, pass_rate_summary


def test_items_needed():
    assert items_needed(5) == 3 and items_needed(9) == 6 and items_needed(1) == 1 and items_needed(10) == 6


def test_pass_rate_by_hand():
    conditions = ["acne", "acne", "acne", "vitiligo", "vitiligo"]
    verdicts = [
        [1, 1, 1, 0, 0],  # 3 met: passes
        [1, 0, 0, 0, 0],  # 1
        [1, 1, None, 1, 1],  # 4 (unknown counts as not met): passes
        [0, 0, 0, 0, 0],  # 0
        [None] * 5,  # unanswered: left out
    ]
    result = pass_rate_summary(conditions, verdicts, {"acne": list("abcde")}, resamples=100)
    assert result["n"] == 4 and result["unanswered"] == 1
    assert result["mean_items_met"]["value"] == pytest.approx((3 + 1 + 4 + 0) / 4)
    assert result["pass_share"]["value"] == pytest.approx(2 / 4)
    acne = result["per_condition"]["acne"]
    assert acne["n"] == 3 and acne["pass_share"]["value"] == pytest.approx(2 / 3)
    assert result["per_item"]["acne"]["a"]["value"] == pytest.approx(1.0)
    assert result["per_item"]["acne"]["c"]["value"] == pytest.approx(1 / 3)
    assert result["per_item"]["vitiligo"]["item1"]["value"] == 0.0
    entry = result["mean_items_met"]
    assert entry["low"] <= entry["value"] <= entry["high"]


def test_parse_manifest_items():
    assert parse_manifest_items("", "m.csv row 2") is None
    assert parse_manifest_items("[1, 0, null]", "m.csv row 2") == [1, 0, None]
    with pytest.raises(ValueError, match="m.csv row 3"):
        parse_manifest_items("1,0,1", "m.csv row 3")


class CountingJudge:
    id = "test:brightness"
    prompt_version = "none"

    def __init__(self):
        self.calls = 0

    async def judge(self, image, checklist):
        from magic_align.judges.base import Verdict

        self.calls += 1
        bright = int(np.asarray(image).mean() > 128)
        return Verdict(items=[bright] * len(checklist.items))


def test_judge_images_uses_the_ledger_cache(tmp_path):
    from magic_align.checklists.schema import ChecklistSet
    from magic_align.ledger import Ledger

    items = [{"id": f"i{k}", "aspect": "colour", "text": f"criterion {k}"} for k in range(5)]
    items[4]["requires"] = "i0"
    checklists = ChecklistSet.model_validate({"id": "t", "conditions": [
        {"condition": "bright", "display_name": "Bright", "token": "<bright>", "items": items}]})
    condition = checklists.conditions[0].condition
    paths = []
    for index, value in enumerate((30, 220, 240)):
        path = tmp_path / f"s{index}.png"
        Image.new("RGB", (16, 16), (value,) * 3).save(path)
        paths.append(path)
    judge = CountingJudge()
    ledger = Ledger(tmp_path / "ledger.sqlite")
    first = judge_images(judge, ledger, paths, [condition] * 3, checklists)
    assert judge.calls == 3
    again = judge_images(judge, ledger, paths, [condition] * 3, checklists)
    assert judge.calls == 3 and again == first
    n_items = len(checklists[condition].items)
    assert pass_rate_summary([condition] * 3, first, resamples=0)["pass_share"]["value"] == pytest.approx(2 / 3)
    assert first[1] == checklists[condition].apply_requires([1] * n_items)


class DarkFailsJudge(CountingJudge):
    """Answers bright images; a dark image's call gets no answer (a JudgeCallError, as a dropped connection)."""

    async def judge(self, image, checklist):
        from magic_align.judges.base import JudgeCallError

        if np.asarray(image).mean() < 128:
            self.calls += 1
            raise JudgeCallError("no answer from the test judge", cause="connection error")
        return await super().judge(image, checklist)


def test_a_call_without_an_answer_fails_only_after_the_others_are_stored(tmp_path):
    from magic_align.checklists.schema import ChecklistSet
    from magic_align.judges.base import JudgeCallError
    from magic_align.ledger import Ledger

    items = [{"id": f"i{k}", "aspect": "colour", "text": f"criterion {k}"} for k in range(5)]
    checklists = ChecklistSet.model_validate({"id": "t", "conditions": [
        {"condition": "bright", "display_name": "Bright", "token": "<bright>", "items": items}]})
    condition = checklists.conditions[0].condition
    paths = []
    for index, value in enumerate((30, 220, 240, 250)):
        path = tmp_path / f"s{index}.png"
        Image.new("RGB", (16, 16), (value,) * 3).save(path)
        paths.append(path)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    failing = DarkFailsJudge()
    with pytest.raises(JudgeCallError):
        judge_images(failing, ledger, paths, [condition] * 4, checklists, concurrency=1)
    # The three answered images were stored although the first job failed; the rerun asks only the failed one.
    rerun = CountingJudge()
    verdicts = judge_images(rerun, ledger, paths, [condition] * 4, checklists)
    assert rerun.calls == 1
    assert verdicts[1:] == [[1] * 5] * 3 and verdicts[0] == [0] * 5
