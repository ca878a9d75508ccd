"""Agreement statistics against hand-computed values, and judge-vs-human / judge-vs-judge collection."""

from __future__ import annotations

import math

import pytest

from magic_align.checklists.schema import load_checklists
from magic_align.judges.agreement import (
    ALL_ITEMS,
    cohen_kappa,
    compare,
    item_agreement,
    percent_agreement,
    true_negative_rate,
    true_positive_rate,
)
from magic_align.judges.base import Verdict

A = [1, 1, 0, 0, 1, 0, 1, 0, 1, 1]
B = [1, 0, 0, 0, 1, 0, 1, 1, 1, 1]


@pytest.mark.parametrize(
    "first, second, kappa",
    [
        (A, B, (0.8 - 0.52) / 0.48),  # p_o = 8/10, p_e = .6 * .6 + .4 * .4
        ([1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], 0.4),  # p_o = 2/3, p_e = 4/9
        ([1, 0], [0, 1], -1.0),  # complete disagreement with balanced rates
        ([1, 1, 0, 0], [1, 1, 0, 0], 1.0),
        ([1, 1, 1], [1, 1, 0], 0.0),  # p_o = p_e = 2/3
    ],
)
def test_cohen_kappa_hand_values(first, second, kappa):
    assert cohen_kappa(first, second) == pytest.approx(kappa)
    assert cohen_kappa(second, first) == pytest.approx(kappa)  # symmetric


def test_kappa_degenerate_all_same_is_undefined():
    assert math.isnan(cohen_kappa([1, 1, 1], [1, 1, 1]))
    assert math.isnan(cohen_kappa([0, 0], [0, 0]))
    assert math.isnan(cohen_kappa([], []))
    assert percent_agreement([1, 1, 1], [1, 1, 1]) == 1.0


def test_kappa_with_one_constant_grader_is_zero_not_undefined():
    assert cohen_kappa([1, 1], [0, 0]) == 0.0  # p_o = 0, p_e = 1 * 0 + 0 * 1 = 0
    assert cohen_kappa([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0  # p_o = p_e = 1/2


def test_kappa_matches_torchmetrics():
    """torchmetrics (float32) as an independent check of the float64 formula; they agree where kappa is defined
    and both call the both-constant-and-equal case undefined."""
    import numpy as np
    import torch
    from torchmetrics.functional.classification import binary_cohen_kappa

    rng = np.random.default_rng(0)
    cases = [(np.ones(5, int), np.ones(5, int)), (np.ones(4, int), np.zeros(4, int))]
    for _ in range(200):
        n = int(rng.integers(2, 40))
        first = rng.integers(0, 2, n)
        cases.append((first, np.where(rng.random(n) < rng.random(), first, 1 - first)))
    for first, second in cases:
        ours = cohen_kappa(first, second)
        theirs = float(binary_cohen_kappa(torch.from_numpy(first), torch.from_numpy(second)))
        assert (math.isnan(ours) and math.isnan(theirs)) or ours == pytest.approx(theirs, abs=1e-6), (first, second)


def test_rates_hand_values():
    assert percent_agreement(A, B) == pytest.approx(0.8)
    assert true_positive_rate(A, B) == pytest.approx(5 / 6)  # reference positives at 6 places, judge says 1 at 5
    assert true_negative_rate(A, B) == pytest.approx(3 / 4)
    assert math.isnan(true_positive_rate([0, 1], [0, 0]))
    assert math.isnan(true_negative_rate([0, 1], [1, 1]))


def test_item_agreement_bootstrap_interval_contains_value():
    row = item_agreement("color", A * 5, B * 5, resamples=200, seed=1)
    assert row.n == 50
    assert row.kappa.value == pytest.approx((0.8 - 0.52) / 0.48)
    assert row.kappa.low <= row.kappa.value <= row.kappa.high
    assert row.kappa.low < row.kappa.high
    assert row.agreement.value == pytest.approx(0.8)


def test_item_agreement_interval_leaves_undefined_resamples_out():
    # The reference always says 1: resamples without the judge's one 0 have no defined kappa, the others have
    # kappa 0 (p_o = p_e = the judge's rate of 1s); the interval is over those.
    row = item_agreement("color", [1] * 9 + [0], [1] * 10, resamples=200, seed=0)
    assert (row.kappa.value, row.kappa.low, row.kappa.high) == (0.0, 0.0, 0.0)
    assert math.isnan(row.tnr.value) and math.isnan(row.tnr.low)  # the reference never says 0


def _put(ledger, sample, judge_id, items, checklist):
    return ledger.put_verdict(sample.image_sha256, judge_id, checklist.version, "p", Verdict(items=items), checklist.condition)


def test_judge_against_human_reviews(feedback_run):
    config, ledger, samples = feedback_run(units=3, k=2)
    checklists = load_checklists(config.judge.checklist)
    judge_answers = [[1, 1, 0, 1, 0], [1, 0, 0, 0, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 1, 0, 1]]
    human_answers = [[1, 1, 0, 0, 0], [1, 0, 1, 0, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], None, [0, 0, 1, 0, 1]]
    for sample, mine, theirs in zip(samples, judge_answers, human_answers):
        checklist = checklists[sample.target_label]
        _put(ledger, sample, "judge-a", mine, checklist)
        if theirs is not None:
            ledger.add_review(sample.sample_id, checklist.version, [1 - v for v in theirs], "dr. a")  # replaced below
            ledger.add_review(sample.sample_id, checklist.version, theirs, "dr. a")
    report = compare(ledger, checklists, "judge-a", "p", "human", resamples=0)
    assert report.images == 5
    # 'round' requires 'red' in alpha: applied on both sides before comparing
    expected_judged, expected_human = [], []
    for sample, mine, theirs in zip(samples, judge_answers, human_answers):
        if theirs is None:
            continue
        checklist = checklists[sample.target_label]
        expected_judged += checklist.apply_requires(mine)
        expected_human += checklist.apply_requires(theirs)
    overall = next(row for row in report.items if row.item == ALL_ITEMS)
    assert overall.n == 25
    assert overall.kappa.value == pytest.approx(cohen_kappa(expected_judged, expected_human))
    color = next(row for row in report.items if row.item == "color")
    # color is item 1 of both checklists
    assert color.agreement.value == pytest.approx(percent_agreement([1, 1, 0, 1, 1], [1, 1, 0, 1, 0]))


def test_judge_against_judge_and_stale_reviews(feedback_run):
    config, ledger, samples = feedback_run(units=2, k=2)
    checklists = load_checklists(config.judge.checklist)
    for index, sample in enumerate(samples):
        checklist = checklists[sample.target_label]
        _put(ledger, sample, "judge-a", [1, 0, 1, 0, index % 2], checklist)
        _put(ledger, sample, "judge-b", [1, 0, 1, 1, 0], checklist)
    ledger.add_review(samples[0].sample_id, "an-old-version", [1, 1, 1, 1, 1], "dr. a")
    report = compare(ledger, checklists, "judge-a", "p", "judge-b", "p", resamples=0)
    assert report.images == 4
    texture = next(row for row in report.items if row.item == "texture")
    assert texture.agreement.value == 0.0
    human = compare(ledger, checklists, "judge-a", "p", "human", resamples=0)
    assert human.images == 0 and human.skipped == 1
