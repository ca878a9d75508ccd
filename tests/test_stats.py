"""Percentile bootstrap: hand-computed intervals, and the resamples of one seed pinned against a reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from magic_align import stats
from magic_align.stats import Estimate, bootstrap, mean_difference, percentile_interval


def reference_bootstrap(statistic, *columns, resamples: int, seed: int, confidence: float = 0.95) -> Estimate:
    """The resamples reported figures were made with: one generator, n row indices per resample, resample after
    resample; the interval over the defined draws."""
    arrays = [np.asarray(column) for column in columns]
    n = len(arrays[0])
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        index = rng.integers(0, n, size=n)
        draws.append(float(statistic(*(array[index] for array in arrays))))
    return percentile_interval(float(statistic(*arrays)), draws, confidence)


def kappa_like(first: np.ndarray, second: np.ndarray) -> float:
    """Undefined (NaN) on resamples where both columns are constant, as Cohen's kappa is."""
    if len(set(first.tolist())) == 1 and len(set(second.tolist())) == 1:
        return float("nan")
    return float(np.mean(first == second))


RNG = np.random.default_rng(7)
SCORES = RNG.normal(size=37) * 3 + 1
LABELS = RNG.integers(0, 4, 37)
SPARSE = (RNG.random(12) < 0.15).astype(int)


@pytest.mark.parametrize(
    "statistic, columns",
    [
        (np.mean, (SCORES,)),
        (lambda after, before: float(np.mean(after - before)), (SCORES, SCORES[::-1] * 0.5)),
        (lambda labels, scores: float(np.mean(scores[labels == 0])) if (labels == 0).any() else float("nan"),
         (LABELS, SCORES)),  # columns of different dtypes, NaN on some resamples
        (kappa_like, (SPARSE, np.zeros(12, int))),  # most resamples undefined
        (np.mean, (np.array([3.0, 5.0]),)),
    ],
)
@pytest.mark.parametrize("seed", [0, 11])
def test_resamples_of_a_seed_are_the_reference_ones(statistic, columns, seed):
    assert bootstrap(statistic, *columns, resamples=300, seed=seed) == reference_bootstrap(
        statistic, *columns, resamples=300, seed=seed
    )


def test_batching_does_not_change_the_resamples(monkeypatch):
    whole = bootstrap(np.mean, SCORES, resamples=250, seed=3)
    monkeypatch.setattr(stats, "RESAMPLES_PER_BATCH", 7)
    assert bootstrap(np.mean, SCORES, resamples=250, seed=3) == whole


def test_two_values_by_hand():
    # Resample means of [0, 1] are 0, 1/2 or 1 with chances 1/4, 1/2, 1/4: of 1000 resamples far more than 25
    # are 0 and far more than 25 are 1, so the 2.5th and 97.5th percentiles are the extremes.
    assert bootstrap(np.mean, [0.0, 1.0], resamples=1000, seed=5) == Estimate(0.5, 0.0, 1.0)
    # paired: the difference of each pair is 2, whatever the resample
    assert mean_difference([3.0, 4.0], [1.0, 2.0], resamples=50) == Estimate(2.0, 2.0, 2.0)


def test_one_row_and_no_resamples():
    assert bootstrap(np.mean, [0.25], resamples=100) == Estimate(0.25, 0.25, 0.25)
    no_interval = bootstrap(np.mean, [0.25, 0.75], resamples=0)
    assert no_interval.value == 0.5 and math.isnan(no_interval.low) and math.isnan(no_interval.high)
    empty = bootstrap(np.mean, [])
    assert math.isnan(empty.value) and math.isnan(empty.low)


def test_undefined_resamples_are_left_out():
    # Resamples holding only 1s are undefined; the rest have the value 1/2 whatever mix they hold.
    def rate_of_ones_when_mixed(column):
        return 0.5 if len(set(column.tolist())) == 2 else float("nan")

    assert bootstrap(rate_of_ones_when_mixed, [1, 1, 1, 0], resamples=200) == Estimate(0.5, 0.5, 0.5)


def test_bad_columns_are_refused():
    with pytest.raises(ValueError, match="at least one column"):
        bootstrap(np.mean)
    with pytest.raises(ValueError, match="same length"):
        bootstrap(lambda a, b: 0.0, [1, 2], [1])


def test_percentile_interval_by_hand():
    draws = np.arange(101.0)  # the p-th percentile of 0..100 is p
    for with_undefined in (draws, np.append(draws, [np.nan] * 30)):
        interval = percentile_interval(50.0, with_undefined, 0.9)
        assert (interval.value, interval.low, interval.high) == (50.0, pytest.approx(5.0), pytest.approx(95.0))
    undefined = percentile_interval(1.0, [float("nan")])
    assert undefined.value == 1.0 and math.isnan(undefined.low) and math.isnan(undefined.high)


def test_cluster_bootstrap_resamples_whole_clusters():
    from magic_align.stats import cluster_bootstrap

    # two clusters of two equal rows: a resample holds 0, 1 or 2 copies of each cluster, never half of one
    draws_seen = cluster_bootstrap(np.mean, ["a", "a", "b", "b"], np.array([1.0, 1.0, 3.0, 3.0]), resamples=200, seed=0)
    assert draws_seen.value == 2.0
    assert draws_seen.low in (1.0, 2.0, 3.0) and draws_seen.high in (1.0, 2.0, 3.0)
    assert draws_seen.low < draws_seen.high
    with pytest.raises(ValueError):
        cluster_bootstrap(np.mean, ["a"], np.array([1.0, 2.0]))


def test_cluster_bootstrap_is_wider_than_a_row_bootstrap_when_rows_repeat_within_clusters():
    from magic_align.stats import bootstrap, cluster_bootstrap

    values = np.random.default_rng(3).normal(size=50)
    rows = np.repeat(values, 10)  # every source gives 10 identical rows: 50 pieces of evidence, not 500
    labels = np.repeat(np.arange(50), 10)
    clustered = cluster_bootstrap(np.mean, labels, rows, resamples=500, seed=1)
    by_row = bootstrap(np.mean, rows, resamples=500, seed=1)
    alone = bootstrap(np.mean, values, resamples=500, seed=1)
    assert clustered.high - clustered.low > 2 * (by_row.high - by_row.low)
    assert clustered.high - clustered.low == pytest.approx(alone.high - alone.low, rel=0.35)
