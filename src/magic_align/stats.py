"""Bootstrap confidence intervals, shared by agreement statistics, evaluation metrics and the demo's proof."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


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
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        index = rng.integers(0, n, size=n)
        draw = float(statistic(*(array[index] for array in arrays)))
        if not np.isnan(draw):
            draws.append(draw)
    if not draws:
        return Estimate(value, float("nan"), float("nan"))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Estimate(value, float(low), float(high))


def mean_difference(after: Sequence[float], before: Sequence[float], **kwargs) -> Estimate:
    """Paired mean difference after - before with a bootstrap interval over the pairs."""
    return bootstrap(lambda a, b: float(np.mean(a - b)), np.asarray(after, float), np.asarray(before, float), **kwargs)
