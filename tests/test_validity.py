"""The judge's validity on generated images: items met against the independent recognition, on a tiny set whose
answer is computed by hand; the low-validity rule; how an independent difference confirms a judge's gain; and
`magic agreement --against recognition` reading eval/alignment.json."""

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from magic_align.evaluate.validity import (
    GradedImage,
    confirmation,
    graded_images,
    is_low,
    pearson_r,
    validity_table,
)


def test_pearson_r_by_hand():
    # deviations x: -1.5 -0.5 0.5 1.5, y: -0.5 -0.5 0.5 0.5 -> sum xy = 2, sum x^2 = 5, sum y^2 = 1
    assert pearson_r([0, 1, 2, 3], [0, 0, 1, 1]) == pytest.approx(2 / math.sqrt(5))
    assert pearson_r([3, 2, 1, 0], [0, 0, 1, 1]) == pytest.approx(-2 / math.sqrt(5))
    assert math.isnan(pearson_r([1, 1, 1], [0, 1, 0]))  # a constant side: undefined, not 0
    assert math.isnan(pearson_r([1], [1]))


# alpha: recognised images meet 4 and 5 items, unrecognised 1 and 2; beta: the judge says the opposite
TINY = [
    GradedImage("alpha", (1, 1, 1, 1, 0), 1),
    GradedImage("alpha", (1, 1, 1, 1, 1), 1),
    GradedImage("alpha", (1, 0, 0, 0, 0), 0),
    GradedImage("alpha", (1, 1, 0, 0, None), 0),
    GradedImage("beta", (1, 1, 1, 1, 1), 0),
    GradedImage("beta", (0, 0, 0, 0, 0), 1),
]
ITEMS = {"alpha": ["a1", "a2", "a3", "a4", "a5"], "beta": ["b1", "b2", "b3", "b4", "b5"]}


def test_validity_table_on_a_tiny_set_with_a_known_answer():
    table = validity_table(TINY, ITEMS, resamples=200, seed=0, min_r=0.3)
    met = [4, 5, 1, 2, 5, 0]
    recognised = [1, 1, 0, 0, 0, 1]
    # by hand: mean met 17/6, mean recognised 1/2; sum of products of deviations = 9/2 - 17/4 ... via the formula
    mx, my = sum(met) / 6, 0.5
    sxy = sum((x - mx) * (y - my) for x, y in zip(met, recognised))
    sxx = sum((x - mx) ** 2 for x in met)
    assert table["n"] == 6
    assert table["r"]["value"] == pytest.approx(sxy / math.sqrt(sxx * 1.5))
    assert table["recognised"] == pytest.approx(0.5)
    assert table["items_met_recognised"] == pytest.approx((4 + 5 + 0) / 3)
    assert table["items_met_not_recognised"] == pytest.approx((1 + 2 + 5) / 3)
    alpha, beta = table["per_condition"]
    assert (alpha["condition"], alpha["n"], alpha["recognised"]) == ("alpha", 4, 0.5)
    assert (alpha["items_met_recognised"], alpha["items_met_not_recognised"]) == (4.5, 1.5)
    assert alpha["r"]["value"] == pytest.approx(pearson_r([4, 5, 1, 2], [1, 1, 0, 0]))
    assert alpha["r"]["value"] > 0.8
    assert beta["r"]["value"] == pytest.approx(-1.0)  # the judge meets items exactly where recognition fails
    rows = {(row["condition"], row["item"]): row for row in table["per_item"]}
    # a2 is met by both recognised images and by 1 of 2 unrecognised ones
    assert (rows["alpha", "a2"]["rate_recognised"], rows["alpha", "a2"]["rate_not_recognised"]) == (1.0, 0.5)
    assert math.isnan(rows["alpha", "a1"]["r"]["value"])  # always met: no correlation to speak of
    assert rows["alpha", "a5"]["n"] == 3  # the unknown answer is left out
    assert rows["alpha", "a5"]["r"]["value"] == pytest.approx(pearson_r([0, 1, 0], [1, 1, 0]))
    assert table["low"] is True  # r over all images is negative here


def test_validity_is_high_when_items_follow_recognition():
    images = [GradedImage("alpha", (1,) * met + (0,) * (5 - met), int(met >= 3)) for met in [0, 1, 2, 3, 4, 5] * 5]
    table = validity_table(images, None, resamples=200, seed=0, min_r=0.3)
    assert table["r"]["value"] > 0.8 and table["r"]["low"] > 0.3
    assert table["low"] is False
    assert [row["item"] for row in table["per_item"]][:2] == ["item 1", "item 2"]  # no checklist: positions


def test_low_validity_rule():
    assert is_low({"value": 0.2, "low": 0.1, "high": 0.3}, 0.3)  # below the threshold
    assert is_low({"value": 0.5, "low": -0.05, "high": 0.9}, 0.3)  # interval touches 0
    assert is_low({"value": float("nan"), "low": float("nan"), "high": float("nan")}, 0.3)  # undefined
    assert not is_low({"value": 0.5, "low": 0.2, "high": 0.7}, 0.3)
    assert not is_low({"value": 0.5, "low": float("nan"), "high": float("nan")}, 0.3)  # no interval: the value


def test_confirmation_of_a_judge_gain():
    assert confirmation({"value": 0.1, "low": 0.02, "high": 0.2}) == "confirmed"
    assert confirmation({"value": 0.0, "low": -0.05, "high": 0.05}) == "not confirmed"
    assert confirmation({"value": -0.1, "low": -0.2, "high": -0.01}) == "contradicted"
    assert confirmation({"value": -0.1, "low": float("nan"), "high": float("nan")}) == "contradicted"
    assert confirmation(None) == "unmeasured"


def alignment_with_recognition() -> dict:
    units = []
    for index, image in enumerate(TINY):
        units.append({"unit": f"u{index}", "target": image.condition, "scores": {"i2i": image.items_met},
                      "items": {"i2i": list(image.items)},
                      "recognition": {"i2i": {"recognised": image.recognised, "target_probability": 0.5}}})
    units.append({"unit": "old", "target": "alpha", "scores": {"i2i": 3}})  # no recognition recorded: left out
    return {"units": units, "item_ids": ITEMS}


def test_graded_images_from_alignment_json():
    assert graded_images(alignment_with_recognition()) == TINY


def test_agreement_against_recognition_command(tmp_path):
    from magic_align.cli import app

    runs = f"runs_dir='{tmp_path}'"
    runner = CliRunner()
    missing = runner.invoke(app, ["agreement", "tiny", "--against", "recognition", "--set", runs])
    assert missing.exit_code == 2 and "magic compare" in missing.output
    eval_dir = tmp_path / "tiny" / "eval"
    eval_dir.mkdir(parents=True)
    (eval_dir / "alignment.json").write_text(json.dumps(alignment_with_recognition()))
    result = runner.invoke(app, ["agreement", "tiny", "--against", "recognition", "--set", runs], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "6 images" in result.output and "LOW" in result.output
    assert "alpha" in result.output and "a2" in result.output


def test_validity_intervals_resample_source_images():
    from magic_align.evaluate.validity import GradedImage, validity_table

    rng = np.random.default_rng(0)
    images = []
    for source in range(30):  # three models' outputs of one source are alike: they move together
        met, seen = int(rng.integers(0, 6)), int(rng.integers(0, 2))
        images += [GradedImage("acne", tuple([1] * met + [0] * (5 - met)), seen, f"s{source}") for _ in range(3)]
    clustered = validity_table(images, None, resamples=400, seed=0, min_r=0.3)["r"]
    unclustered = validity_table([GradedImage(i.condition, i.items, i.recognised) for i in images], None,
                                 resamples=400, seed=0, min_r=0.3)["r"]
    assert clustered["value"] == pytest.approx(unclustered["value"])
    assert clustered["high"] - clustered["low"] > 1.3 * (unclustered["high"] - unclustered["low"])
