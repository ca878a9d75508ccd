"""Bootstrap confidence intervals, shared by agreement statistics, evaluation metrics and the demo's proof.

scipy.stats.bootstrap draws the resamples and evaluates the statistic on each; the percentile interval is taken
here over the resamples where the statistic is defined, because scipy's own interval is undefined as soon as
one resample is (a kappa on a resample where both graders always say 1). For a given seed the resamples are
those of one `numpy.random.default_rng(seed)` drawing `n` row indices per resample, resample after resample;
tests/test_stats.py holds that reference, so a scipy that drew differently would fail there, not move a figure.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import scipy.stats

RESAMPLES_PER_BATCH = 100  # scipy holds batch x rows indices (and each column's resample) in memory at once


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def percentile_interval(value: float, draws: Sequence[float] | np.ndarray, confidence: float = 0.95) -> Estimate:
    """`value` with the central `confidence` percentile interval of its bootstrap `draws`, leaving out
    undefined (NaN) draws; no interval (NaN) when no draw is defined."""
    draws = np.asarray(draws, float)
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return Estimate(value, float("nan"), float("nan"))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Estimate(value, float(low), float(high))


def bootstrap(
    statistic: Callable[..., float],
    *columns: Sequence | np.ndarray,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap of `statistic(*columns)`, resampling rows (the same rows in every column, so a
    paired comparison stays paired). Resamples where the statistic is undefined (NaN) are dropped."""
    arrays = [np.asarray(column) for column in columns]
    if not arrays:
        raise ValueError("bootstrap needs at least one column")
    n = len(arrays[0])
    if any(len(array) != n for array in arrays):
        raise ValueError("all columns must have the same length")
    value = float(statistic(*arrays)) if n else float("nan")
    if n == 0 or resamples == 0:
        return Estimate(value, float("nan"), float("nan"))
    if n == 1:  # every resample is the one row (scipy wants two)
        return percentile_interval(value, [value], confidence)

    def each_resample(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        # columns are [batch, n]; the statistic sees one resample's rows at a time, with their own dtypes
        return np.array([float(statistic(*rows)) for rows in zip(*resampled)])

    with warnings.catch_warnings():  # scipy warns when its own interval is undefined; ours leaves NaN draws out
        warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
        result = scipy.stats.bootstrap(
            arrays, each_resample, n_resamples=resamples, batch=RESAMPLES_PER_BATCH, vectorized=True, paired=True,
            confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed),
        )
    return percentile_interval(value, result.bootstrap_distribution, confidence)


def cluster_bootstrap(
    statistic: Callable[..., float],
    clusters: Sequence,
    *columns: Sequence | np.ndarray,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Percentile bootstrap of `statistic(*columns)` that resamples whole clusters (rows sharing a `clusters`
    label, e.g. every image made from one source image), so rows of one cluster never count as independent
    evidence. Resamples where the statistic is undefined (NaN) are dropped."""
    arrays = [np.asarray(column) for column in columns]
    labels = np.asarray(clusters)
    if not arrays or any(len(array) != len(labels) for array in arrays):
        raise ValueError("cluster_bootstrap needs columns as long as the cluster labels")
    value = float(statistic(*arrays)) if len(labels) else float("nan")
    if len(labels) == 0 or resamples == 0:
        return Estimate(value, float("nan"), float("nan"))
    _, cluster_of_row = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(cluster_of_row == k) for k in range(cluster_of_row.max() + 1)]
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for index in range(resamples):
        rows = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        draws[index] = float(statistic(*(array[rows] for array in arrays)))
    return percentile_interval(value, draws, confidence)


def mean_difference(after: Sequence[float], before: Sequence[float], **kwargs) -> Estimate:
    """Paired mean difference after - before with a bootstrap interval over the pairs."""
    return bootstrap(lambda a, b: float(np.mean(a - b)), np.asarray(after, float), np.asarray(before, float), **kwargs)
