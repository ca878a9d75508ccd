"""How the report writes numbers, intervals and durations (table cells and the template's filters)."""

from __future__ import annotations

import math
import re
from typing import Any, Mapping


def finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_number(value: Any, digits: int = 2, percent: bool = False) -> str:
    """A number for a table cell: fixed digits, as a percentage when asked, an en dash when unknown."""
    if not finite_number(value):
        return "–"
    return f"{value * 100:.{digits}f}" if percent else f"{value:.{digits}f}"


def format_estimate(estimate: Mapping | None, digits: int = 2, percent: bool = False) -> str:
    """{"value", "low", "high"} as "0.52 [0.48, 0.55]" (percent: "52.0 [48.0, 55.0]"); the interval is left
    out when it is unknown (one seed, no resamples), the whole cell is an en dash when the value is."""
    if not isinstance(estimate, Mapping):
        return "–"
    value = format_number(estimate.get("value"), digits, percent)
    if value == "–":
        return value
    low, high = estimate.get("low"), estimate.get("high")
    if not (finite_number(low) and finite_number(high)):
        return value
    return f"{value} [{format_number(low, digits, percent)}, {format_number(high, digits, percent)}]"


def format_difference(estimate: Mapping | None, digits: int = 1, percent: bool = True) -> str:
    """A paired difference as "+3.0 [-1.0, +7.0]": every number signed, so a gain and a loss read apart."""
    if not isinstance(estimate, Mapping) or not finite_number(estimate.get("value")):
        return "–"

    def signed(value: float) -> str:
        text = format_number(value, digits, percent)
        return text if text.startswith("-") else f"+{text}"

    low, high = estimate.get("low"), estimate.get("high")
    if not (finite_number(low) and finite_number(high)):
        return signed(estimate["value"])
    return f"{signed(estimate['value'])} [{signed(low)}, {signed(high)}]"


def parse_seconds(detail: str) -> float | None:
    """The duration `pipeline.run_all` writes as a stage's detail ("12.3 s"); None for any other detail."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*s\s*", detail or "")
    return float(match.group(1)) if match else None


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)} min {rest:.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes)} min"


def format_general(value: float) -> str:
    return f"{value:.4g}"
