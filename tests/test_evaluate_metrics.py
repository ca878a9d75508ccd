"""Metrics against hand computations on fixed predictions."""

import numpy as np
import pytest

from magic_align.evaluate.metrics import (
    accuracy,
    accuracy_by_skin_type,
    classification_metrics,
    confusion_matrix,
    macro_f1,
    macro_precision,
    macro_recall,
    mean_over_seeds,
)

# Three classes, eight images.
#   class 0: true 3 times; predicted 0, 0, 1
#   class 1: true 3 times; predicted 1, 2, 2
#   class 2: true 2 times; predicted 2, 0
Y_TRUE = [0, 0, 0, 1, 1, 1, 2, 2]
Y_PRED = [0, 0, 1, 1, 2, 2, 2, 0]
# By hand: correct = 0,0,1,2 -> 4 of 8.
# class 0: TP 2, predicted 3 (two 0s + the last), actual 3 -> P 2/3, R 2/3, F1 2/3
# class 1: TP 1, predicted 2, actual 3 -> P 1/2, R 1/3, F1 2*(1/6)/(5/6) = 2/5
# class 2: TP 1, predicted 3, actual 2 -> P 1/3, R 1/2, F1 2*(1/6)/(5/6) = 2/5


def test_confusion_matrix_by_hand():
    expected = np.array([[2, 1, 0], [0, 1, 2], [1, 0, 1]])
    assert (confusion_matrix(Y_TRUE, Y_PRED, 3) == expected).all()
    assert confusion_matrix(Y_TRUE, Y_PRED, 4).shape == (4, 4)


def test_scores_by_hand():
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(0.5)
    assert macro_precision(Y_TRUE, Y_PRED) == pytest.approx((2 / 3 + 1 / 2 + 1 / 3) / 3)
    assert macro_recall(Y_TRUE, Y_PRED) == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert macro_f1(Y_TRUE, Y_PRED) == pytest.approx((2 / 3 + 2 / 5 + 2 / 5) / 3)


def test_never_predicted_class_counts_as_zero():
    # Class 1 is never predicted: precision 0 (not undefined), recall 0; class 0: P 1/2, R 1.
    assert macro_precision([0, 1], [0, 0]) == pytest.approx(0.25)
    assert macro_recall([0, 1], [0, 0]) == pytest.approx(0.5)
    assert macro_f1([0, 1], [0, 0]) == pytest.approx((2 / 3 + 0) / 2)


def test_accuracy_by_skin_type_by_hand():
    skin = [1, 1, 2, 2, 2, 6, 6, -1]
    result = accuracy_by_skin_type(Y_TRUE, Y_PRED, skin)
    # type 1: images 0, 1 both right; type 2: images 2, 3, 4 -> 1 right; type 6: 5, 6 -> 1 right; -1: wrong
    assert result == {
        -1: {"accuracy": 0.0, "n": 1},
        1: {"accuracy": 1.0, "n": 2},
        2: {"accuracy": pytest.approx(1 / 3), "n": 3},
        6: {"accuracy": 0.5, "n": 2},
    }


def test_classification_metrics_intervals_contain_the_value():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 4, 200))
    result = classification_metrics(y_true, y_pred, 4, skin_types=rng.integers(1, 7, 200), resamples=200)
    for name in ("accuracy", "f1", "precision", "recall"):
        entry = result[name]
        assert entry["low"] <= entry["value"] <= entry["high"]
        assert entry["high"] - entry["low"] < 0.3
    assert result["accuracy"]["value"] == pytest.approx(accuracy(y_true, y_pred))
    assert sum(entry["n"] for entry in result["by_skin_type"].values()) == 200
    assert np.array(result["confusion"]).sum() == 200


def test_mean_over_seeds():
    summary = mean_over_seeds([0.2, 0.4, 0.6], resamples=200)
    assert summary["value"] == pytest.approx(0.4)
    assert summary["std"] == pytest.approx(0.2)
    assert 0.2 <= summary["low"] <= 0.4 <= summary["high"] <= 0.6
    assert mean_over_seeds([0.3])["std"] == 0.0


def test_mean_over_two_seeds_by_hand():
    # Resampled means of two seeds are 0.2, 0.4 or 0.6 (chances 1/4, 1/2, 1/4): of 1000 resamples well over 25 are
    # each extreme, so the 95 % interval spans both seeds' values.
    summary = mean_over_seeds([0.2, 0.6], resamples=1000, seed=3)
    assert (summary["value"], summary["low"], summary["high"]) == (pytest.approx(0.4), 0.2, 0.6)
    assert summary["std"] == pytest.approx(0.4 / 2**0.5) and summary["seeds"] == 2


def test_accuracy_by_skin_group_by_hand():
    from magic_align.evaluate.metrics import accuracy_by_skin_group

    y_true = [0, 0, 1, 1, 2, 2, 0, 1]
    y_pred = [0, 1, 1, 1, 2, 0, 0, 0]
    skin = [1, 2, 3, 4, 3, -1, 6, 6]  # -1 (unknown) belongs to no group
    result = accuracy_by_skin_group(y_true, y_pred, skin)
    assert result == {"1-2": {"accuracy": 0.5, "n": 2}, "3-4": {"accuracy": 1.0, "n": 3},
                      "5-6": {"accuracy": 0.5, "n": 2}}
    assert accuracy_by_skin_group([0], [0], [3]) == {"3-4": {"accuracy": 1.0, "n": 1}}  # empty groups left out
    full = classification_metrics(y_true, y_pred, 3, skin, resamples=50)
    assert {k: v["value"] for k, v in full["by_skin_group"].items()} == {"1-2": 0.5, "3-4": 1.0, "5-6": 0.5}


def test_paired_difference_by_hand():
    from magic_align.evaluate.metrics import paired_difference

    result = paired_difference([0.8, 0.9, 1.0], [0.7, 0.7, 0.9], resamples=200)
    assert result["value"] == pytest.approx(0.4 / 3)
    assert result["std"] == pytest.approx(np.std([0.1, 0.2, 0.1], ddof=1))
    assert 0.1 - 1e-9 <= result["low"] <= result["value"] <= result["high"] <= 0.2 + 1e-9
    assert result["seeds"] == 3
    with pytest.raises(ValueError, match="one baseline value per seed"):
        paired_difference([0.8, 0.9], [0.7])


def test_paired_differences_against_real_per_group_by_hand():
    from magic_align.evaluate.classifier import RunResult
    from magic_align.evaluate.stage import add_paired_differences, summarise_runs

    y_true = np.array([0, 1, 0, 1, 0, 1])
    skin = np.array([1, 2, 3, 4, 5, 6])

    def results(predictions):
        return [RunResult(seed, y_true, np.array(pred), skin, 6, 0) for seed, pred in enumerate(predictions)]

    # real: seed 0 right on 1-2 only, seed 1 right on 1-4; synthetic: seed 0 right everywhere, seed 1 on 5-6 only
    real = results([[0, 1, 1, 0, 1, 0], [0, 1, 0, 1, 1, 0]])
    synthetic = results([[0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 0, 1]])
    rows = [{"backbone": "b", "mode": "m", "group": "full", "setting": setting,
             **summarise_runs(runs, 2, 50)} for setting, runs in (("real", real), ("i2i", synthetic))]
    for row, runs in zip(rows, (real, synthetic)):
        row["locked"] = summarise_runs([r for r in runs], 2, 50)
    add_paired_differences(rows, 50)
    assert "vs_real" not in rows[0]
    versus = rows[1]["vs_real"]
    # accuracy: real 2/6 and 4/6, synthetic 6/6 and 2/6: differences +4/6 and -2/6
    assert versus["accuracy"]["value"] == pytest.approx((4 / 6 - 2 / 6) / 2)
    assert rows[0]["by_skin_group"]["3-4"]["value"] == pytest.approx(0.5)
    # per group: 1-2: (1-1, 0-1) -> -0.5; 3-4: (1-0, 0-1) -> 0; 5-6: (1-0, 1-0) -> +1
    assert {g: d["value"] for g, d in versus["by_skin_group"].items()} == pytest.approx(
        {"1-2": -0.5, "3-4": 0.0, "5-6": 1.0})
    assert rows[1]["locked"]["vs_real"]["accuracy"]["value"] == pytest.approx(1 / 6)
