"""The procedural dermatology domain of the built-in demo.

Offline there is no skin dataset, so the demo draws one: skin at Fitzpatrick types 1-6 with texture and
lighting variation, six conditions whose look follows the five items of their checklist
(`demo/demo.yaml`), and a body-region cue. The `rules` judge (`demo/rules.py`) measures the same
items from pixels. `data.kind = "procedural"` (the `PROCEDURAL` data kind at the end) draws the dataset into
`run/data/procedural/` on first use and reads it with the Fitzpatrick loader.

Design choices, all made so that a 4x-downsampling VAE at 64 px keeps every item visible (docs/method.md
section 11.2: in the CPU prototype thin rings and tiny papules faded):

- Every structure is at least ~4 px wide at 64 px; papules are ~6 px across with gaps of >= 4 px.
- Lesion colours are defined relative to the skin tone, so contrast survives on dark skin.
- The body region is a bold band along the image edge: a dark hair margin at the top (head), a blue garment
  at the bottom (trunk), a green examination sheet left and right (extremities, a limb seen from above).
- Pixel noise is small: the judge's quality gate rejects rough backgrounds (noise is how a policy fools a
  pixel judge), so real images must be smooth there.

Geometry is written in units of a 64 px image and scaled to `size`. Every image has its own random stream
`default_rng([seed, stream, index])`, so an image does not depend on how many others are drawn.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from magic_align.data import DataKind, md5hash_split_key
from magic_align.data.fitzpatrick import load_fitzpatrick
from magic_align.data.records import DataError, LoadProblems, Record
from magic_align.run import atomic_path, atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from magic_align.config import DataConfig
    from magic_align.run import RunPaths

CONDITIONS = ("melanoma", "nevus", "acne", "erythema-multiforme", "psoriasis", "vitiligo")
REGION_OF = {
    "melanoma": "trunk",
    "nevus": "face",
    "acne": "face",
    "erythema-multiforme": "trunk",
    "psoriasis": "extremities",
    "vitiligo": "extremities",
}
REGIONS = ("face", "trunk", "extremities")
GENERIC_KINDS = ("healthy", "generic-lesion")

# sRGB base tones for Fitzpatrick types 1-6 (light to dark); each image jitters its own.
SKIN_TONES = np.array(
    [
        [241, 214, 196],
        [228, 190, 162],
        [205, 160, 125],
        [170, 122, 88],
        [125, 85, 58],
        [85, 57, 42],
    ],
    dtype=np.float32,
)
HAIR = np.array([28, 20, 16], dtype=np.float32)
GARMENT = np.array([45, 75, 150], dtype=np.float32)
SHEET = np.array([70, 130, 95], dtype=np.float32)

# Geometry in 64 px units: region bands are at most BAND_MAX wide; lesions stay at least LESION_INSET from
# the edge, so the judge's skin-tone frame (between the two) sees skin.
BAND_MAX = 8.5
LESION_INSET = 11.5

CSV_COLUMNS = (
    "md5hash",
    "fitzpatrick_scale",
    "label",
    "region",
    "count",
    "size",
    "center_x",
    "center_y",
    "kind",
    "seed",
)

_STREAM_CONDITION = 1
_STREAM_FREE = 2
# the training and test parts of a dataset that comes with its own split (data.procedural_train_per_class)
_STREAM_TRAIN = 3
_STREAM_TEST = 4


@dataclass
class Drawing:
    """One rendered image and its true attributes (geometry in 64 px units)."""

    image: np.ndarray  # float32 [size, size, 3], 0-255
    label: str
    skin_type: int
    region: str
    count: int = 0
    size: float = 0.0  # lesion diameter (largest lesion; major axis for plaques; cluster diameter for papules)
    center: tuple[float, float] = (32.0, 32.0)
    kind: str = ""
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- drawing
class Canvas:
    """Coordinates of the pixel centres in 64 px units plus the image being painted."""

    def __init__(self, size: int):
        self.size = size
        self.scale = size / 64.0
        coords = (np.arange(size, dtype=np.float32) + 0.5) / self.scale
        self.x = coords[None, :].repeat(size, 0)
        self.y = coords[:, None].repeat(size, 1)
        self.image = np.zeros((size, size, 3), dtype=np.float32)

    def paint(self, alpha: np.ndarray, colour: np.ndarray) -> None:
        alpha = alpha[..., None]
        self.image = self.image * (1.0 - alpha) + np.asarray(colour, dtype=np.float32) * alpha


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a cells x cells random grid, bicubically upsampled."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    image = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32)


def blob_alpha(
    canvas: Canvas,
    center: tuple[float, float],
    axes: tuple[float, float],
    angle: float = 0.0,
    harmonics: tuple[tuple[int, float, float], ...] = (),
) -> np.ndarray:
    """Anti-aliased coverage of a (possibly wobbly) ellipse.

    The boundary is at normalised radius 1 + sum(a * cos(k * theta + phase)); coverage ramps over one
    64-px pixel, so edges are crisp but not aliased.
    """
    dx = canvas.x - center[0]
    dy = canvas.y - center[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u = (dx * cos + dy * sin) / axes[0]
    v = (-dx * sin + dy * cos) / axes[1]
    radius = np.hypot(u, v)
    boundary = np.ones_like(radius)
    if harmonics:
        theta = np.arctan2(v, u)
        for k, amplitude, phase in harmonics:
            boundary = boundary + amplitude * np.cos(k * theta + phase)
    return np.clip((boundary - radius) * min(axes) + 0.5, 0.0, 1.0)


def ring_alpha(canvas: Canvas, center: tuple[float, float], inner: float, outer: float) -> np.ndarray:
    radius = np.hypot(canvas.x - center[0], canvas.y - center[1])
    return np.clip(np.minimum(outer - radius, radius - inner) + 0.5, 0.0, 1.0)


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def red_colour(skin: np.ndarray) -> np.ndarray:
    """Erythema relative to the skin: red kept (a little brighter), green and blue removed."""
    return np.array([min(255.0, 0.95 * skin[0] + 30.0), 0.45 * skin[1], 0.5 * skin[2]], dtype=np.float32)


def dark_colour(skin: np.ndarray, factor: float) -> np.ndarray:
    """Melanin relative to the skin: darker and slightly browner."""
    return skin * np.array([factor, factor * 0.92, factor * 0.85], dtype=np.float32)


def draw_skin(canvas: Canvas, rng: np.random.Generator, skin_type: int) -> np.ndarray:
    """Skin background: jittered base tone, two scales of mottling, a lighting gradient, faint pixel noise.

    Returns the base tone (the tone lesion colours are defined against)."""
    tone = SKIN_TONES[skin_type - 1] * rng.uniform(0.95, 1.05) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    tone = np.clip(tone, 0, 250).astype(np.float32)
    size = canvas.size
    mottling = 0.035 * smooth_noise(rng, size, 5) + 0.02 * smooth_noise(rng, size, 9)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(0.0, 0.08) * ((canvas.x - 32) * np.cos(angle) + (canvas.y - 32) * np.sin(angle)) / 32
    shade = 1.0 + mottling + gradient
    # a faint redness variation (vascular tone), independent of the lightness mottling
    redness = 0.02 * smooth_noise(rng, size, 4)
    canvas.image = tone[None, None, :] * shade[..., None]
    canvas.image[..., 0] *= 1.0 + redness
    # pixel noise from its own stream: its length depends on the size, and the layout drawn next must not
    noise = np.random.default_rng(int(rng.integers(0, 2**63)))
    canvas.image += noise.normal(0.0, 0.5, canvas.image.shape).astype(np.float32)
    return tone


def draw_region(canvas: Canvas, rng: np.random.Generator, region: str) -> None:
    """The body-region cue: a bold band along one or two edges, with a wavy inner edge."""
    width = rng.uniform(6.0, 7.5)
    phase = rng.uniform(0, 2 * np.pi)
    frequency = rng.uniform(0.15, 0.3)

    def band(distance: np.ndarray, along: np.ndarray) -> np.ndarray:
        edge = width + 0.8 * np.sin(along * frequency + phase)
        return np.clip(edge - distance + 0.5, 0.0, 1.0)

    if region == "face":  # hair margin: near-black with strands
        strands = 1.0 + 0.25 * np.sin(canvas.x * rng.uniform(1.8, 2.4) + rng.uniform(0, 6))
        colour = HAIR * rng.uniform(0.8, 1.15) * strands[..., None]
        canvas.paint(band(canvas.y, canvas.x), colour)
    elif region == "trunk":  # garment
        colour = GARMENT * rng.uniform(0.85, 1.15) * (1.0 + 0.04 * smooth_noise(rng, canvas.size, 6))[..., None]
        canvas.paint(band(64.0 - canvas.y, canvas.x), colour)
    elif region == "extremities":  # limb on an examination sheet: sheet visible on both sides
        colour = SHEET * rng.uniform(0.85, 1.15) * (1.0 + 0.04 * smooth_noise(rng, canvas.size, 6))[..., None]
        canvas.paint(band(canvas.x, canvas.y), colour)
        canvas.paint(band(64.0 - canvas.x, canvas.y), colour)
    else:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")


def place(rng: np.random.Generator, extent: float) -> tuple[float, float]:
    """A lesion centre such that a lesion reaching `extent` from it stays inside the lesion area."""
    low, high = LESION_INSET + extent, 64.0 - LESION_INSET - extent
    if low >= high:
        return (32.0, 32.0)
    return (float(rng.uniform(low, high)), float(rng.uniform(low, high)))


def wobble(rng: np.random.Generator, amplitudes: tuple[float, float], orders=(2, 3, 5)) -> tuple:
    return tuple((k, float(rng.uniform(*amplitudes)), float(rng.uniform(0, 2 * np.pi))) for k in orders)


# ------------------------------------------------------------------------------------------ conditions
def draw_melanoma(canvas: Canvas, rng: np.random.Generator, skin: np.ndarray) -> dict:
    """Large asymmetric two-tone dark lesion with a lobed, irregular border."""
    radius = rng.uniform(11.0, 13.0)
    harmonics = wobble(rng, (0.12, 0.18), orders=(2, 3, 4, 5))
    extent = radius * (1 + sum(a for _, a, _ in harmonics))
    center = place(rng, min(extent, 19.0))
    canvas.paint(blob_alpha(canvas, center, (radius, radius), 0.0, harmonics), dark_colour(skin, rng.uniform(0.5, 0.58)))
    # an eccentric very dark core makes it asymmetric and multi-shade
    direction = rng.uniform(0, 2 * np.pi)
    offset = radius * rng.uniform(0.2, 0.35)
    core_center = (center[0] + offset * np.cos(direction), center[1] + offset * np.sin(direction))
    core = blob_alpha(canvas, core_center, (radius * 0.5, radius * 0.42), rng.uniform(0, np.pi), wobble(rng, (0.05, 0.1)))
    canvas.paint(core, dark_colour(skin, rng.uniform(0.22, 0.3)))
    return {"count": 1, "size": 2 * radius, "center": center}


def draw_nevus(canvas: Canvas, rng: np.random.Generator, skin: np.ndarray) -> dict:
    """Small round uniform dark lesion with a smooth border."""
    radius = rng.uniform(4.8, 6.3)
    ratio = rng.uniform(1.0, 1.12)
    center = place(rng, radius * ratio)
    alpha = blob_alpha(canvas, center, (radius * ratio, radius), rng.uniform(0, np.pi))
    canvas.paint(alpha, dark_colour(skin, rng.uniform(0.36, 0.46)))
    return {"count": 1, "size": 2 * radius * np.sqrt(ratio), "center": center}


def draw_acne(canvas: Canvas, rng: np.random.Generator, skin: np.ndarray) -> dict:
    """A cluster of 4-7 discrete red papules, each ~6 px across, with gaps of at least 4 px."""
    count = int(rng.integers(4, 8))
    spread = rng.uniform(12.0, 14.0)
    center = place(rng, spread + 3.0)
    papules: list[tuple[float, float, float]] = []
    attempts = 0
    while len(papules) < count and attempts < 400:
        attempts += 1
        radius = rng.uniform(2.7, 3.3)
        angle, distance = rng.uniform(0, 2 * np.pi), spread * np.sqrt(rng.uniform(0, 1))
        point = (center[0] + distance * np.cos(angle), center[1] + distance * np.sin(angle))
        if all(np.hypot(point[0] - p[0], point[1] - p[1]) >= radius + p[2] + 4.0 for p in papules):
            papules.append((point[0], point[1], radius))
    colour = red_colour(skin)
    for x, y, radius in papules:
        canvas.paint(blob_alpha(canvas, (x, y), (radius, radius)), colour)
        # a slightly paler summit: papules are raised
        canvas.paint(0.35 * blob_alpha(canvas, (x - 0.5, y - 0.5), (radius * 0.4, radius * 0.4)), colour * 1.08)
    points = np.array([(x, y) for x, y, _ in papules])
    middle = points.mean(axis=0)
    diameter = 2 * float(np.max(np.hypot(*(points - middle).T))) + 7.0
    return {"count": len(papules), "size": diameter, "center": (float(middle[0]), float(middle[1]))}


def draw_erythema_multiforme(canvas: Canvas, rng: np.random.Generator, skin: np.ndarray) -> dict:
    """A target lesion: dusky centre, pale middle ring, red outer ring (each ring >= 4 px wide)."""
    radius = rng.uniform(12.5, 14.5)
    center = place(rng, radius)
    inner, middle = radius * rng.uniform(0.28, 0.32), radius * rng.uniform(0.58, 0.62)
    canvas.paint(blob_alpha(canvas, center, (radius, radius)), red_colour(skin))
    pale = np.minimum(skin + 0.3 * (255.0 - skin), 255.0) * np.array([1.0, 0.94, 0.94], dtype=np.float32)
    canvas.paint(blob_alpha(canvas, center, (middle, middle)), pale)
    dusky = np.array([0.62 * skin[0] + 8.0, 0.28 * skin[1], 0.38 * skin[2]], dtype=np.float32)
    canvas.paint(blob_alpha(canvas, center, (inner, inner)), dusky)
    return {"count": 1, "size": 2 * radius, "center": center}


def draw_psoriasis(canvas: Canvas, rng: np.random.Generator, skin: np.ndarray) -> dict:
    """A well-demarcated oval red plaque carrying bold silvery-white scale streaks."""
    major, minor = rng.uniform(17.0, 20.0), rng.uniform(9.5, 11.5)
    angle = rng.uniform(0, np.pi)
    center = place(rng, 0.5 * (major + minor) + 1)
    plaque = np.array([min(255.0, 0.95 * skin[0] + 25.0), 0.55 * skin[1], 0.55 * skin[2]], dtype=np.float32)
    canvas.paint(blob_alpha(canvas, center, (major, minor), angle, wobble(rng, (0.0, 0.03))), plaque)
    scale = np.array([248, 248, 250], dtype=np.float32) * rng.uniform(0.985, 1.0)
    streaks = int(rng.integers(3, 5))
    cos, sin = np.cos(angle), np.sin(angle)
    for along in np.linspace(-0.45, 0.45, streaks) * major:
        # across the plaque, well inside its rim, so the red border stays closed around the scale
        along = along + rng.uniform(-0.6, 0.6)
        across = rng.uniform(-0.2, 0.2) * minor
        point = (center[0] + along * cos - across * sin, center[1] + along * sin + across * cos)
        axes = (rng.uniform(3.2, 3.8), rng.uniform(1.8, 2.0))
        canvas.paint(blob_alpha(canvas, point, axes, angle + np.pi / 2 + rng.uniform(-0.3, 0.3)), scale)
    return {"count": streaks, "size": 2 * major, "center": center}


def draw_vitiligo(canvas: Canvas, rng: np.random.Generator, skin: np.ndarray) -> dict:
    """1-3 milky-white, well-defined depigmented patches on otherwise normal skin."""
    count = int(rng.integers(1, 4))
    white = np.array([246, 243, 238], dtype=np.float32) * rng.uniform(0.98, 1.02)
    radius = rng.uniform(8.0, 10.5)
    center = place(rng, radius * 1.1)
    canvas.paint(blob_alpha(canvas, center, (radius, radius * rng.uniform(0.8, 1.0)), rng.uniform(0, np.pi), wobble(rng, (0.02, 0.07))), white)
    placed = [(center, radius)]
    for _ in range(count - 1):
        for _attempt in range(40):
            small = rng.uniform(4.5, 6.0)
            point = place(rng, small)
            if all(np.hypot(point[0] - c[0], point[1] - c[1]) > r + small + 4 for c, r in placed):
                canvas.paint(blob_alpha(canvas, point, (small, small), 0.0, wobble(rng, (0.02, 0.06))), white)
                placed.append((point, small))
                break
    return {"count": len(placed), "size": 2 * radius, "center": center}


DRAWERS = {
    "melanoma": draw_melanoma,
    "nevus": draw_nevus,
    "acne": draw_acne,
    "erythema-multiforme": draw_erythema_multiforme,
    "psoriasis": draw_psoriasis,
    "vitiligo": draw_vitiligo,
}


def draw_generic_lesions(canvas: Canvas, rng: np.random.Generator, skin: np.ndarray) -> dict:
    """1-3 unlabeled lesions of low to medium contrast: tan macules, faint pink patches, pale spots.

    Their contrast stays below every colour threshold of the demo checklists, so the base model learns
    what a lesion on skin looks like without learning any condition."""
    count = int(rng.integers(1, 4))
    largest, first_center = 0.0, (32.0, 32.0)
    for index in range(count):
        radius = rng.uniform(3.5, 11.0)
        center = place(rng, radius * 1.15)
        alpha = blob_alpha(
            canvas, center, (radius, radius * rng.uniform(0.6, 1.0)), rng.uniform(0, np.pi), wobble(rng, (0.0, 0.1))
        )
        kind = rng.integers(0, 3)
        if kind == 0:  # tan macule: darker, but lighter than the dark-lesion threshold
            colour = dark_colour(skin, rng.uniform(0.8, 0.9))
        elif kind == 1:  # faint pink patch: below the redness threshold
            colour = skin * np.array([1.0, rng.uniform(0.84, 0.9), rng.uniform(0.84, 0.9)], dtype=np.float32)
        else:  # pale spot: lighter, but below the depigmentation threshold
            colour = skin + rng.uniform(0.08, 0.18) * (255.0 - skin)
        canvas.paint(alpha * rng.uniform(0.7, 1.0), colour)
        if radius > largest:
            largest, first_center = radius, center
    return {"count": count, "size": 2 * largest, "center": first_center}


def render(label: str, rng: np.random.Generator, size: int = 64, skin_type: int | None = None, region: str | None = None) -> Drawing:
    """Draw one image of `label` (a condition, 'healthy' or 'generic-lesion')."""
    if label not in DRAWERS and label not in GENERIC_KINDS:
        raise ValueError(f"unknown procedural label {label!r}; expected one of {CONDITIONS + GENERIC_KINDS}")
    canvas = Canvas(size)
    skin_type = int(rng.integers(1, 7)) if skin_type is None else skin_type
    if region is None:
        region = REGION_OF[label] if label in REGION_OF else REGIONS[int(rng.integers(0, len(REGIONS)))]
    skin = draw_skin(canvas, rng, skin_type)
    if label in DRAWERS:
        attributes = DRAWERS[label](canvas, rng, skin)
    elif label == "generic-lesion":
        attributes = draw_generic_lesions(canvas, rng, skin)
    else:
        attributes = {"count": 0, "size": 0.0, "center": (32.0, 32.0)}
    draw_region(canvas, rng, region)
    return Drawing(
        image=canvas.image,
        label=label,
        skin_type=skin_type,
        region=region,
        count=int(attributes["count"]),
        size=float(attributes["size"]),
        center=(float(attributes["center"][0]), float(attributes["center"][1])),
        kind=label if label in GENERIC_KINDS else "condition",
    )


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), mode="RGB")


def png_bytes(image: Image.Image) -> bytes:
    """PNG without metadata; identical pixels give identical bytes, so the md5 is a stable id."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- datasets
def _write_dataset(out_dir: Path, jobs: list[tuple], seed: int, size: int, csv_name: str) -> Path:
    """Render (label, stream, index[, skin type]) jobs into out_dir/images and write the CSV atomically (no skin
    type: the image's own stream draws one)."""
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, stream, index, *skin_type in jobs:
        rng = np.random.default_rng([seed, stream, CONDITIONS.index(label) if label in CONDITIONS else 0, index])
        drawing = render(label, rng, size=size, skin_type=skin_type[0] if skin_type else None)
        data = png_bytes(to_pil(drawing.image))
        digest = hashlib.md5(data).hexdigest()
        path = images_dir / f"{digest}.png"
        if not path.exists():
            atomic_write_bytes(path, data)
        rows.append(
            {
                "md5hash": digest,
                "fitzpatrick_scale": drawing.skin_type,
                "label": drawing.label,
                "region": drawing.region,
                "count": drawing.count,
                "size": f"{drawing.size:.2f}",
                "center_x": f"{drawing.center[0]:.2f}",
                "center_y": f"{drawing.center[1]:.2f}",
                "kind": drawing.kind,
                "seed": seed,
            }
        )
    csv_path = out_dir / csv_name
    with atomic_path(csv_path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return csv_path


def generate_dataset(out_dir: Path, per_class: int, seed: int, size: int = 64, conditions: tuple[str, ...] = CONDITIONS) -> Path:
    """Draw `per_class` images of each demo condition into `out_dir/images/<md5>.png` and write
    `out_dir/procedural.csv` (Fitzpatrick17k-style: md5hash, fitzpatrick_scale, label, region, plus the
    true attributes). Deterministic for a seed; returns the CSV path."""
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown conditions {unknown}; the demo domain has {list(CONDITIONS)}")
    jobs = [(label, _STREAM_CONDITION, index) for label in conditions for index in range(per_class)]
    return _write_dataset(Path(out_dir), jobs, seed, size, "procedural.csv")


def generate_condition_free(out_dir: Path, count: int, seed: int, size: int = 64, lesion_fraction: float = 0.6) -> Path:
    """Draw `count` condition-free images (healthy skin, or skin with generic low-contrast lesions that
    match no condition's checklist) for pretraining the demo base model. Returns `out_dir/condition_free.csv`
    (label is 'healthy' or 'generic-lesion')."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    labels = condition_free_labels(count, seed, lesion_fraction)
    jobs = [(label, _STREAM_FREE, index) for index, label in enumerate(labels)]
    return _write_dataset(Path(out_dir), jobs, seed, size, "condition_free.csv")


def render_arrays(labels: list[str], seed: int, size: int = 64, stream: int = _STREAM_CONDITION) -> tuple[np.ndarray, list[Drawing]]:
    """Render without writing files: uint8 [N, size, size, 3] and the drawings' attributes (their `image`
    field dropped to save memory). Used for model training and validity checks."""
    out = np.empty((len(labels), size, size, 3), dtype=np.uint8)
    drawings = []
    for index, label in enumerate(labels):
        rng = np.random.default_rng([seed, stream, CONDITIONS.index(label) if label in CONDITIONS else 0, index])
        drawing = render(label, rng, size=size)
        out[index] = np.clip(np.rint(drawing.image), 0, 255).astype(np.uint8)
        drawing.image = np.empty(0, dtype=np.float32)
        drawings.append(drawing)
    return out, drawings


def condition_free_labels(count: int, seed: int, lesion_fraction: float = 0.6) -> list[str]:
    chooser = np.random.default_rng([seed, _STREAM_FREE])
    return [str(label) for label in np.where(chooser.uniform(0, 1, count) < lesion_fraction, "generic-lesion", "healthy")]


# ------------------------------------------------------------------------------------- a split of its own
def skin_type_counts(weights: list[float], count: int) -> list[int]:
    """How many of `count` images fall on Fitzpatrick types 1..6 for these weights: the largest-remainder
    apportionment (ties to the lighter type), so the counts follow the weights as closely as whole images can
    and a weight of 0 gets none."""
    weights = np.asarray(weights, dtype=float)
    shares = weights / weights.sum() * count
    counts = np.floor(shares).astype(int)
    remainders = shares - counts
    for position in sorted(range(6), key=lambda k: (-remainders[k], k))[: count - int(counts.sum())]:
        counts[position] += 1
    return [int(n) for n in counts]


def balanced_skin_types(count: int) -> list[int]:
    """Types 1..6 in turn: equal numbers of each when `count` is a multiple of 6, else at most one apart."""
    return [index % 6 + 1 for index in range(count)]


def condition_skin_weights(data_cfg: "DataConfig", condition: str) -> list[float]:
    return data_cfg.procedural_condition_skin_weights.get(condition, data_cfg.procedural_skin_weights)


def generate_split_dataset(out_dir: Path, train_counts: dict[str, list[int]], test_per_class: int, seed: int,
                           size: int = 64) -> tuple[Path, Path]:
    """A dataset that comes with its own split: `train_counts[condition][t - 1]` training images of type t, and a
    test part of `test_per_class` images per condition balanced over types 1..6, each part from its own streams
    (`default_rng([seed, stream, condition, index])`). Writes `train.csv` and `test.csv` (the `procedural.csv`
    layout) beside one images/ folder; returns their paths."""
    unknown = [c for c in train_counts if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown conditions {unknown}; the demo domain has {list(CONDITIONS)}")
    train_jobs = [(label, _STREAM_TRAIN, index, skin_type) for label, counts in train_counts.items()
                  for index, skin_type in enumerate(t for t, n in enumerate(counts, start=1) for _ in range(n))]
    test_jobs = [(label, _STREAM_TEST, index, skin_type) for label in train_counts
                 for index, skin_type in enumerate(balanced_skin_types(test_per_class))]
    return (_write_dataset(Path(out_dir), train_jobs, seed, size, "train.csv"),
            _write_dataset(Path(out_dir), test_jobs, seed, size, "test.csv"))


def generate_balanced_dataset(out_dir: Path, per_class: int, seed: int, size: int = 64) -> Path:
    """`per_class` images per condition balanced over types 1..6 (the test part's streams; for a locked set drawn
    from its own seed); returns `out_dir/procedural.csv`."""
    jobs = [(label, _STREAM_TEST, index, skin_type) for label in CONDITIONS
            for index, skin_type in enumerate(balanced_skin_types(per_class))]
    return _write_dataset(Path(out_dir), jobs, seed, size, "procedural.csv")


# ------------------------------------------------------------------------------------------ data kind
def procedural_csv(data_cfg: "DataConfig", paths: "RunPaths | None") -> Path:
    """The demo domain's CSV: `data.csv` when set, else generated into run/data/procedural/ once.

    A stamp file records what was generated (images per class and seed); a changed setting regenerates.
    """
    if data_cfg.csv is not None:
        return Path(data_cfg.csv)
    if paths is None:
        raise DataError("data.kind = 'procedural' needs a run directory to generate the demo images into "
                        "(or data.csv pointing at an already generated procedural CSV)")
    return _generated_once(paths.data / "procedural", data_cfg.procedural_per_class, data_cfg.procedural_seed)


# stamp keys added later, with the value a stamp written before them stands for
_LATER_STAMP_KEYS = {"balanced": False}


def _stamped(out_dir: Path, wanted: dict, names: tuple[str, ...]) -> list[Path] | None:
    """The CSVs of a dataset generated into `out_dir` when its stamp names these settings, else None."""
    stamp_path = out_dir / "generated.json"
    if not stamp_path.is_file():
        return None
    stamp = json.loads(stamp_path.read_text())
    if {k: stamp.get(k, _LATER_STAMP_KEYS.get(k)) for k in wanted} != wanted:
        return None
    stored = stamp.get("csvs", [stamp.get("csv", "")])
    paths = [out_dir / name for name in stored]
    return paths if [p.name for p in paths] == list(names) and all(p.is_file() for p in paths) else None


def _generated_once(out_dir: Path, per_class: int, seed: int, balanced: bool = False) -> Path:
    """The CSV of a dataset generated into `out_dir`, drawn again only when its stamp names other settings."""
    wanted = {"per_class": per_class, "seed": seed, "balanced": balanced}
    found = _stamped(out_dir, wanted, ("procedural.csv",))
    if found is not None:
        return found[0]
    csv_path = Path(generate_balanced_dataset(out_dir, per_class, seed) if balanced
                    else generate_dataset(out_dir, per_class, seed))
    atomic_write_text(out_dir / "generated.json", json.dumps({**wanted, "csv": csv_path.name}))
    return csv_path


def _read_generated(csv_path: Path, images: Path | None, problems: LoadProblems) -> list[Record]:
    folder = images or (csv_path.parent / "images" if (csv_path.parent / "images").is_dir() else csv_path.parent)
    return load_fitzpatrick(csv_path, Path(folder), problems)


def _own_split_csvs(data_cfg: "DataConfig", paths: "RunPaths | None") -> tuple[Path, Path]:
    """train.csv and test.csv of the dataset with its own split, generated into run/data/procedural-split/ once."""
    if data_cfg.csv is not None:
        raise DataError("data.procedural_train_per_class draws the demo dataset with its own split; leave data.csv "
                        "unset (it names one already generated CSV, split by train_fraction)")
    if paths is None:
        raise DataError("data.kind = 'procedural' needs a run directory to generate the demo images into")
    unknown = sorted(set(data_cfg.procedural_condition_skin_weights) - set(CONDITIONS))
    if unknown:  # a misspelt condition would silently fall back to procedural_skin_weights
        raise DataError(f"data.procedural_condition_skin_weights names {', '.join(map(repr, unknown))}, not a demo "
                        f"condition; expected some of {', '.join(CONDITIONS)}")
    train_counts = {condition: skin_type_counts(condition_skin_weights(data_cfg, condition),
                                                data_cfg.procedural_train_per_class)
                    for condition in CONDITIONS}
    out_dir = paths.data / "procedural-split"
    wanted = {"train_counts": train_counts, "test_per_class": data_cfg.procedural_test_per_class,
              "seed": data_cfg.procedural_seed}
    found = _stamped(out_dir, wanted, ("train.csv", "test.csv"))
    if found is not None:
        return found[0], found[1]
    train_csv, test_csv = generate_split_dataset(out_dir, train_counts, data_cfg.procedural_test_per_class,
                                                 data_cfg.procedural_seed)
    atomic_write_text(out_dir / "generated.json", json.dumps({**wanted, "csvs": [train_csv.name, test_csv.name]}))
    return train_csv, test_csv


def given_split_procedural(data_cfg: "DataConfig", paths: "RunPaths | None",
                           problems: LoadProblems) -> tuple[list[Record], list[Record]] | None:
    """(train, test) of the dataset with its own split (`procedural_train_per_class` set), else None: the
    dataset is then split by train_fraction like any other."""
    if data_cfg.procedural_train_per_class is None:
        return None
    train_csv, test_csv = _own_split_csvs(data_cfg, paths)
    return _read_generated(train_csv, None, problems), _read_generated(test_csv, None, problems)


def load_procedural(data_cfg: "DataConfig", paths: "RunPaths | None", problems: LoadProblems) -> list[Record]:
    """The demo dataset as records: generated on first use, read with the Fitzpatrick loader."""
    sides = given_split_procedural(data_cfg, paths, problems)
    if sides is not None:
        return sides[0] + sides[1]
    return _read_generated(procedural_csv(data_cfg, paths), data_cfg.images, problems)


def locked_seed(data_cfg: "DataConfig") -> int:
    """The seed of the demo's locked set: its own, never the dataset's."""
    return data_cfg.procedural_seed + 1 if data_cfg.procedural_locked_seed is None else data_cfg.procedural_locked_seed


def load_locked_procedural(data_cfg: "DataConfig", paths: "RunPaths | None", problems: LoadProblems) -> list[Record]:
    """The demo's locked validation set: a second procedural dataset from its own seed, generated into
    run/data/procedural-locked/, so no image of it was seen in training or in tuning (data/split.py checks).
    With a split of its own (`procedural_train_per_class`) it is balanced over skin types like the test part."""
    if paths is None:
        raise DataError("the procedural locked set needs a run directory to generate its images into")
    own_split = data_cfg.procedural_train_per_class is not None
    per_class = data_cfg.procedural_locked_per_class
    if per_class is None:  # as many as the test split holds per condition
        per_class = (data_cfg.procedural_test_per_class if own_split else
                     data_cfg.procedural_per_class - round(data_cfg.train_fraction * data_cfg.procedural_per_class))
    csv_path = _generated_once(paths.data / "procedural-locked", max(1, per_class), locked_seed(data_cfg),
                               balanced=own_split)
    return _read_generated(csv_path, None, problems)


PROCEDURAL = DataKind(load_procedural, md5hash_split_key, locked_set=load_locked_procedural,
                      given_split=given_split_procedural)
