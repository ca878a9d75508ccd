"""Everything the report draws or embeds: image thumbnails and matplotlib plots as base64 data URIs."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from PIL import Image

from magic_align.data.images import load_image

THUMBNAIL_SIDE = 192  # px; big enough to judge a lesion, small enough that 20 conditions x 4 units mail well
THUMBNAIL_QUALITY = 85
MAX_CURVE_METRICS = 9  # subplots per training log


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average that skips NaN and is debiased at the start (the first value is itself)."""
    result, average, norm = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average = weight * average + (1 - weight) * value
            norm = weight * norm + (1 - weight)
        result.append(average / norm if norm else math.nan)
    return result


def curve_metric_order(names: Iterable[str]) -> list[str]:
    """Loss first, then the method's own statistics, then the optimizer's (grad norm, learning rate)."""
    names = [name for name in names if name != "step"]
    tail = [name for name in ("grad_norm", "lr") if name in names]
    head = [name for name in names if name == "loss"]
    middle = [name for name in names if name not in head and name not in tail]
    return (head + middle + tail)[:MAX_CURVE_METRICS]


def image_data_uri(path: Path, max_side: int = THUMBNAIL_SIDE) -> str:
    """A JPEG thumbnail of an image as a data URI (raises `BadImageError` naming the file when unreadable)."""
    image = load_image(path)
    image.thumbnail((max_side, max_side), Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def figure_data_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: the report is written on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def plot_training_log(name: str, columns: Mapping[str, Sequence[float]]) -> str | None:
    """One PNG (data URI) with a small plot per metric of a training log; None when nothing can be drawn."""
    metrics = [m for m in curve_metric_order(columns) if any(math.isfinite(v) for v in columns[m])]
    if not metrics or not columns.get("step"):
        return None
    plt = _pyplot()
    per_row = min(3, len(metrics))
    rows = math.ceil(len(metrics) / per_row)
    figure, axes = plt.subplots(rows, per_row, figsize=(3.6 * per_row, 2.5 * rows), squeeze=False)
    steps = list(columns["step"])
    for axis, metric in zip(axes.flat, metrics):
        values = list(columns[metric])
        points = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        if len(points) > 50:  # noisy per-step curves: the raw values faint, a moving average on top
            axis.plot(xs, ys, color="#4c78a8", alpha=0.3, linewidth=0.8)
            axis.plot(xs, smooth(ys, 0.9), color="#1f4e79", linewidth=1.6)
        else:
            axis.plot(xs, ys, color="#1f4e79", linewidth=1.6, marker="o" if len(points) < 20 else None, markersize=3)
        axis.set_title(metric, fontsize=9)
        axis.tick_params(labelsize=7)
        axis.grid(True, alpha=0.3)
        axis.set_xlabel("step", fontsize=7)
        if metric == "lr":
            axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for axis in list(axes.flat)[len(metrics):]:
        axis.set_visible(False)
    figure.suptitle(name, fontsize=10)
    figure.tight_layout()
    uri = figure_data_uri(figure)
    plt.close(figure)
    return uri


class EmbeddedImages:
    """Embeds images, each file once, and remembers the ones that could not be read (no broken <img>)."""

    def __init__(self, root: Path, problems: list[str]) -> None:
        self.root = root
        self.problems = problems
        self._cache: dict[Path, str | None] = {}

    def resolve(self, path: str | Path) -> Path:
        path = Path(path)
        return path if path.is_absolute() else self.root / path

    def uri(self, path: str | Path | None, where: str) -> str | None:
        if not path:
            return None
        resolved = self.resolve(path)
        if resolved not in self._cache:
            try:
                self._cache[resolved] = image_data_uri(resolved)
            except Exception as error:  # a missing or broken image must not cost the page
                self._cache[resolved] = None
                self.problems.append(f"{where}: image {path} could not be embedded ({error})")
        return self._cache[resolved]
