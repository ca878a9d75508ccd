"""Pixel rules for the procedural demo domain (`demo/demo.yaml`, `demo/procedural.py`).

Every image is brought to 64 x 64 and measured once:

1. skin tone = per-channel median of a thin frame just inside the region bands (after a small blur);
2. quality gate: the frame must look like skin (red above blue) and be smooth, since the generator's skin is
   smooth and noise is how a policy fools a pixel judge (roughness = median |Laplacian| of lightness there);
3. masks relative to the skin tone: red (red minus green well above the skin's), dark (lightness <= 0.72 of the
   skin's, not red), light (far towards white, nearly colourless);
4. connected components of each mask with area, equivalent diameter, elongation and solidity (convex hull);
5. the region cue from the outer strips: hair on top (head), a blue garment at the bottom (trunk), a green sheet
   at the left and right (extremities).

The item rules then compare measurements with thresholds chosen from the generator's geometry with margins
(docs/demo.md has the validity table). Bump VERSION when a rule changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from magic_align.checklists.schema import load_checklists
from magic_align.demo.procedural import CONDITIONS, render_arrays
from magic_align.judges.rules import ItemResult, RulesDomain, RulesJudge, validity_table

VERSION = "v2"
SIZE = 64

# geometry (64 px units), matching demo/procedural.py: bands <= 8.5 px, lesions >= 11.5 px from the edge
FRAME = (9, 11)  # distance-to-edge range of the skin-tone frame
LESION_AREA_INSET = 9  # lesions are looked for inside the bands

ROUGHNESS_MAX = 4.0  # median |Laplacian| of lightness in the frame (0-255 scale); generator images ~1.5
SKIN_RED_MINUS_BLUE = 8.0  # every skin tone has R - B of ~30-45

# red: (R - G) above the skin's, relative to the skin's lightness (the codec and the model draw erythema at a
# fraction of the generator's strength, and on dark skin its absolute contrast is small); seeds at RED_SEED x
# skin lightness (at least RED_MIN), grown over pixels at RED_GROW of that, so a soft ring stays one ring
RED_SEED = 0.16
RED_MIN = 9.0
RED_GROW = 0.55
RED_CORE_GROW = 0.85  # papules: grown only a little, so papules a few px apart stay apart
DARK_RATIO = 0.72  # lightness at most this fraction of the skin's
LIGHT_SHARE = 0.35  # lightness at least this share of the way from the skin to white
LIGHT_CHROMA = 30.0  # max - min channel of a white pixel
SHEET_SHIFT = 25.0  # (G - R) of the side strips above the skin's; the generator's sheet is ~60-90 above
MIN_COMPONENT = 4  # px; smaller components are noise


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def edge_distance(size: int = SIZE) -> np.ndarray:
    index = np.arange(size)
    along = np.minimum(index, size - 1 - index)
    return np.minimum(along[:, None], along[None, :])


def roughness(lightness: np.ndarray, mask: np.ndarray) -> float:
    """Median absolute 4-neighbour Laplacian over `mask` (borders excluded)."""
    laplacian = np.zeros_like(lightness)
    laplacian[1:-1, 1:-1] = (
        4 * lightness[1:-1, 1:-1] - lightness[:-2, 1:-1] - lightness[2:, 1:-1] - lightness[1:-1, :-2] - lightness[1:-1, 2:]
    )
    inner = mask.copy()
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    return float(np.median(np.abs(laplacian[inner]))) if inner.any() else 0.0


def solidity(mask: np.ndarray) -> float:
    """Area over convex-hull area, the hull taken over pixel corners (so a filled square has solidity 1)."""
    area = int(mask.sum())
    if area < 3:
        return 1.0
    # the hull of a shape is the hull of its boundary pixels: fewer points for Qhull
    ys, xs = np.nonzero(mask & ~ndimage.binary_erosion(mask))
    corners = np.concatenate(
        [np.stack([xs + dx, ys + dy], axis=1) for dx in (0.0, 1.0) for dy in (0.0, 1.0)]
    ).astype(np.float64)
    try:
        hull = ConvexHull(corners)
    except QhullError:
        return 1.0
    return float(area / hull.volume)  # in 2-D, `volume` is the area


@dataclass
class Component:
    mask: np.ndarray  # bool [64, 64]

    @cached_property
    def area(self) -> int:
        return int(self.mask.sum())

    @cached_property
    def filled(self) -> np.ndarray:
        return ndimage.binary_fill_holes(self.mask)

    @cached_property
    def centroid(self) -> tuple[float, float]:
        ys, xs = np.nonzero(self.filled)
        return float(xs.mean() + 0.5), float(ys.mean() + 0.5)

    @cached_property
    def diameter(self) -> float:
        """Equivalent diameter of the filled component."""
        return float(2 * np.sqrt(self.filled.sum() / np.pi))

    @cached_property
    def axes(self) -> tuple[float, float]:
        """Major and minor axis lengths of the ellipse with the same second moments (filled)."""
        ys, xs = np.nonzero(self.filled)
        if len(xs) < 3:
            return 1.0, 1.0
        covariance = np.cov(np.stack([xs, ys]).astype(np.float64)) + np.eye(2) / 12.0  # pixel extent
        minor, major = np.sqrt(np.maximum(np.linalg.eigvalsh(covariance), 1e-9)) * 4
        return float(major), float(minor)

    @cached_property
    def elongation(self) -> float:
        major, minor = self.axes
        return major / minor

    @cached_property
    def solidity(self) -> float:
        return solidity(self.filled)


def hysteresis(weak: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The 8-connected parts of `weak` that hold at least one `strong` pixel."""
    labels, count = ndimage.label(weak, structure=np.ones((3, 3)))
    if count == 0:
        return weak
    kept = np.zeros(count + 1, bool)
    kept[np.unique(labels[weak & strong])] = True
    kept[0] = False
    return kept[labels]


def components(mask: np.ndarray, minimum: int = MIN_COMPONENT) -> list[Component]:
    """4-connected components of at least `minimum` px, largest first."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return []
    sizes = np.bincount(labels.ravel())[1:]
    order = [int(i) for i in np.argsort(-sizes, kind="stable") if sizes[i] >= minimum]
    return [Component(labels == i + 1) for i in order]


@dataclass
class Analysis:
    rgb: np.ndarray  # blurred float [64, 64, 3]
    tone: np.ndarray  # skin tone [3]
    skin_lightness: float
    roughness: float
    lightness: np.ndarray
    red_excess: np.ndarray
    red: np.ndarray
    red_core: np.ndarray  # the seeds grown only to RED_CORE_GROW: papules a few px apart stay apart
    dark: np.ndarray
    light: np.ndarray
    strips: dict[str, np.ndarray]  # mean colour of the outer strips

    @cached_property
    def red_components(self) -> list[Component]:
        return components(self.red)

    @cached_property
    def red_core_components(self) -> list[Component]:
        return components(self.red_core)

    @cached_property
    def dark_components(self) -> list[Component]:
        return components(self.dark)

    @cached_property
    def light_components(self) -> list[Component]:
        return components(self.light)

    @cached_property
    def region_cues(self) -> dict[str, bool]:
        return {
            "face": is_hair(self.strips["top"], self.tone),
            "trunk": is_garment(self.strips["bottom"]),
            "extremities": is_sheet(self.strips["left"], self.tone) and is_sheet(self.strips["right"], self.tone),
        }


def is_hair(colour: np.ndarray, tone: np.ndarray) -> bool:
    lightness = float(luma(colour))
    dark = lightness <= 50.0 and lightness <= 0.7 * float(luma(tone))
    return dark and not is_garment(colour) and not is_sheet(colour, tone)


def is_garment(colour: np.ndarray) -> bool:
    r, g, b = (float(v) for v in colour)
    return b - r >= 35.0 and b - g >= 20.0


def is_sheet(colour: np.ndarray, tone: np.ndarray) -> bool:
    """Green against the skin: the codec mixes the narrow band with the skin beside it (on dark skin it turns
    olive-grey), so the band's green is judged by how far it has moved from the skin's red-green balance."""
    r, g, b = (float(v) for v in colour)
    shift = (g - r) - float(tone[1] - tone[0])
    return shift >= SHEET_SHIFT and g - r >= 0.0 and g - b >= -15.0 and float(luma(colour)) > 50.0  # hair is darker


def analyse(image: Image.Image) -> Analysis:
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.Resampling.BOX if image.width > SIZE else Image.Resampling.BILINEAR)
    raw = np.asarray(image, dtype=np.float32)
    rgb = ndimage.gaussian_filter(raw, sigma=(0.7, 0.7, 0))
    distance = edge_distance()
    frame = (distance >= FRAME[0]) & (distance <= FRAME[1])
    tone = np.median(rgb[frame], axis=0)
    skin_lightness = float(luma(tone))
    lightness = luma(rgb)
    red_excess = (rgb[..., 0] - rgb[..., 1]) - float(tone[0] - tone[1])
    inside = distance >= LESION_AREA_INSET
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)
    red_seed = max(RED_MIN, RED_SEED * skin_lightness)
    red_core = hysteresis(inside & (red_excess >= RED_CORE_GROW * red_seed), red_excess >= red_seed)
    red = hysteresis(inside & (red_excess >= RED_GROW * red_seed), red_core)
    dark = inside & (lightness <= DARK_RATIO * skin_lightness) & ~red
    light = inside & (lightness >= skin_lightness + LIGHT_SHARE * (255.0 - skin_lightness)) & (chroma <= LIGHT_CHROMA)
    strips = {
        "top": rgb[1:5, 12:52].reshape(-1, 3).mean(axis=0),
        "bottom": rgb[59:63, 12:52].reshape(-1, 3).mean(axis=0),
        "left": rgb[12:52, 1:5].reshape(-1, 3).mean(axis=0),
        "right": rgb[12:52, 59:63].reshape(-1, 3).mean(axis=0),
    }
    return Analysis(
        rgb=rgb,
        tone=tone,
        skin_lightness=skin_lightness,
        roughness=roughness(luma(raw), frame),
        lightness=lightness,
        red_excess=red_excess,
        red=red,
        red_core=red_core,
        dark=dark,
        light=light,
        strips=strips,
    )


def gate(analysis: Analysis) -> ItemResult:
    red_minus_blue = float(analysis.tone[0] - analysis.tone[2])
    if red_minus_blue < SKIN_RED_MINUS_BLUE:
        return ItemResult(False, f"background is not skin-coloured: red - blue {red_minus_blue:.1f} < {SKIN_RED_MINUS_BLUE}")
    if analysis.roughness > ROUGHNESS_MAX:
        return ItemResult(False, f"background roughness {analysis.roughness:.2f} > {ROUGHNESS_MAX} (noise or artefacts)")
    return ItemResult(True, f"background roughness {analysis.roughness:.2f} <= {ROUGHNESS_MAX}, skin red - blue {red_minus_blue:.1f}")


def describe(analysis: Analysis) -> dict:
    return {
        "skin_tone": [round(float(v), 1) for v in analysis.tone],
        "roughness": round(analysis.roughness, 3),
        "red_px": int(analysis.red.sum()),
        "dark_px": int(analysis.dark.sum()),
        "light_px": int(analysis.light.sum()),
        "region_cues": analysis.region_cues,
    }


def check(passed: bool, text: str) -> ItemResult:
    return ItemResult(bool(passed), text)


# -------------------------------------------------------------------------------------------- location
def location_rule(region: str):
    names = {"face": "hair margin on top", "trunk": "garment at the bottom", "extremities": "sheet left and right"}

    def rule(analysis: Analysis) -> ItemResult:
        cues = analysis.region_cues
        seen = [r for r, present in cues.items() if present]
        text = f"cues seen: {', '.join(names[r] for r in seen) or 'none'}; expected only the {names[region]}"
        return check(seen == [region], text)

    return rule


# ------------------------------------------------------------------------------------------- melanoma
MELANOMA_MIN_AREA = 150
MELANOMA_MIN_DIAMETER = 19.0
MELANOMA_MAX_SOLIDITY = 0.9
VARIEGATION_MIN = 0.14  # (p90 - p10) of lesion lightness over skin lightness
NEVUS_MIN_AREA = 25
NEVUS_DIAMETER = (7.0, 18.0)
NEVUS_MIN_SOLIDITY = 0.85
NEVUS_MAX_ELONGATION = 1.45
UNIFORM_MAX = 0.18  # of skin lightness; a melanoma's core spreads over >= 0.25
NEVUS_CORE_DEPTH = 0.5


def largest(items: list[Component]) -> Component | None:
    return items[0] if items else None


def lightness_spread(analysis: Analysis, where: np.ndarray) -> float:
    """The 10th-90th percentile range of lightness over the pixels `where`, as a share of the skin's lightness."""
    values = analysis.lightness[where]
    return float((np.percentile(values, 90) - np.percentile(values, 10)) / analysis.skin_lightness)


def shade_spread(analysis: Analysis, component: Component) -> float:
    """Spread of lightness inside a lesion (one pixel eroded, so the blurred rim does not count)."""
    interior = ndimage.binary_erosion(component.mask)
    return lightness_spread(analysis, interior if interior.sum() >= 5 else component.mask)


def core_spread(analysis: Analysis, component: Component) -> float:
    """Spread of lightness in a small lesion's core (depth >= NEVUS_CORE_DEPTH of its deepest point): the codec
    softens a small dot's rim over 2-3 px, a ramp that is no second shade."""
    depth = ndimage.distance_transform_edt(component.filled)
    return lightness_spread(analysis, depth >= min(float(depth.max()), max(1.5, NEVUS_CORE_DEPTH * float(depth.max()))))


def melanoma_dark_lesion(a: Analysis) -> ItemResult:
    lesion = largest(a.dark_components)
    area = lesion.area if lesion else 0
    return check(area >= MELANOMA_MIN_AREA, f"largest dark lesion {area} px (>= {MELANOMA_MIN_AREA} needed)")


def melanoma_size(a: Analysis) -> ItemResult:
    lesion = largest(a.dark_components)
    diameter = lesion.diameter if lesion else 0.0
    return check(diameter >= MELANOMA_MIN_DIAMETER, f"dark lesion diameter {diameter:.1f} px (>= {MELANOMA_MIN_DIAMETER} needed)")


def melanoma_border(a: Analysis) -> ItemResult:
    lesion = largest(a.dark_components)
    if lesion is None:
        return check(False, "no dark lesion")
    return check(lesion.solidity <= MELANOMA_MAX_SOLIDITY, f"solidity {lesion.solidity:.2f} (<= {MELANOMA_MAX_SOLIDITY} means lobed/irregular)")


def melanoma_variegation(a: Analysis) -> ItemResult:
    lesion = largest(a.dark_components)
    if lesion is None:
        return check(False, "no dark lesion")
    spread = shade_spread(a, lesion)
    return check(spread >= VARIEGATION_MIN, f"shade spread {spread:.2f} of skin lightness (>= {VARIEGATION_MIN} needed)")


def nevus_dark_lesion(a: Analysis) -> ItemResult:
    lesions = [c for c in a.dark_components if c.area >= NEVUS_MIN_AREA]
    return check(len(lesions) == 1, f"{len(lesions)} dark lesion(s) of >= {NEVUS_MIN_AREA} px (exactly 1 needed)")


def nevus_size(a: Analysis) -> ItemResult:
    lesion = largest(a.dark_components)
    diameter = lesion.diameter if lesion else 0.0
    low, high = NEVUS_DIAMETER
    return check(low <= diameter <= high, f"dark lesion diameter {diameter:.1f} px ({low}-{high} needed)")


def nevus_shape(a: Analysis) -> ItemResult:
    lesion = largest(a.dark_components)
    if lesion is None:
        return check(False, "no dark lesion")
    ok = lesion.solidity >= NEVUS_MIN_SOLIDITY and lesion.elongation <= NEVUS_MAX_ELONGATION
    return check(
        ok,
        f"solidity {lesion.solidity:.2f} (>= {NEVUS_MIN_SOLIDITY}), elongation {lesion.elongation:.2f} (<= {NEVUS_MAX_ELONGATION})",
    )


def nevus_uniform_colour(a: Analysis) -> ItemResult:
    lesion = largest(a.dark_components)
    if lesion is None:
        return check(False, "no dark lesion")
    spread = core_spread(a, lesion)
    return check(spread <= UNIFORM_MAX,
                 f"shade spread {spread:.2f} of skin lightness in the core (<= {UNIFORM_MAX} needed)")


# ----------------------------------------------------------------------------------------------- acne
PAPULE_AREA = (6, 110)
PAPULES_MIN = 2
PAPULE_COUNT_MIN = 4
PAPULE_MEDIAN_MAX = 75
PLAQUE_AREA = 150
CLUSTER_RADIUS_MAX = 19.0


def papules(a: Analysis) -> list[Component]:
    low, high = PAPULE_AREA
    return [c for c in a.red_core_components if low <= c.area <= high]


def acne_papules(a: Analysis) -> ItemResult:
    found = papules(a)
    return check(len(found) >= PAPULES_MIN, f"{len(found)} red papule(s) of {PAPULE_AREA[0]}-{PAPULE_AREA[1]} px (>= {PAPULES_MIN} needed)")


def acne_count(a: Analysis) -> ItemResult:
    found = papules(a)
    return check(len(found) >= PAPULE_COUNT_MIN, f"{len(found)} separate papules (>= {PAPULE_COUNT_MIN} needed)")


def acne_papule_size(a: Analysis) -> ItemResult:
    found = papules(a)
    median = float(np.median([c.area for c in found])) if found else 0.0
    biggest = a.red_core_components[0].area if a.red_core_components else 0
    ok = bool(found) and median <= PAPULE_MEDIAN_MAX and biggest < PLAQUE_AREA
    return check(ok, f"median papule {median:.0f} px (<= {PAPULE_MEDIAN_MAX}), largest red area {biggest} px (< {PLAQUE_AREA})")


def acne_clustered(a: Analysis) -> ItemResult:
    found = papules(a)
    if len(found) < 2:
        return check(False, f"{len(found)} papule(s): no cluster")
    points = np.array([c.centroid for c in found])
    radius = float(np.max(np.hypot(*(points - points.mean(axis=0)).T)))
    return check(radius <= CLUSTER_RADIUS_MAX, f"papules within {radius:.1f} px of their centre (<= {CLUSTER_RADIUS_MAX} needed)")


# -------------------------------------------------------------------------------- erythema multiforme
TARGET_MIN_AREA = 250
TARGET_RED_SHARE = 0.3
CENTRE_CONTRAST = 0.12  # pale zone minus centre, over skin lightness
RING_CONTRAST = 0.08  # pale zone minus outer ring, over skin lightness
TARGET_DIAMETER = (18.0, 34.0)
TARGET_MIN_SOLIDITY = 0.88
TARGET_MAX_ELONGATION = 1.3


@dataclass
class TargetProfile:
    centre: float
    middle: float
    outer: float


def target_lesion(a: Analysis) -> Component | None:
    return largest(a.red_components)


def radial_profile(a: Analysis, lesion: Component) -> TargetProfile:
    """Median lightness (over skin lightness) of the centre, middle and outer zones of a round lesion."""
    cx, cy = lesion.centroid
    radius = lesion.diameter / 2
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    distance = np.hypot(xs + 0.5 - cx, ys + 0.5 - cy) / max(radius, 1e-6)

    def zone(low: float, high: float) -> float:
        selected = (distance >= low) & (distance <= high)
        if not selected.any():
            return float("nan")
        return float(np.median(a.lightness[selected]) / a.skin_lightness)

    return TargetProfile(centre=zone(0.0, 0.2), middle=zone(0.36, 0.54), outer=zone(0.72, 0.9))


def target_red_lesion(a: Analysis) -> ItemResult:
    lesion = target_lesion(a)
    if lesion is None:
        return check(False, "no red lesion")
    filled = int(lesion.filled.sum())
    share = lesion.area / filled
    ok = filled >= TARGET_MIN_AREA and share >= TARGET_RED_SHARE
    return check(ok, f"red lesion {filled} px with holes filled (>= {TARGET_MIN_AREA}), red share {share:.2f} (>= {TARGET_RED_SHARE})")


def target_dusky_centre(a: Analysis) -> ItemResult:
    lesion = target_lesion(a)
    if lesion is None:
        return check(False, "no red lesion")
    p = radial_profile(a, lesion)
    contrast = p.middle - p.centre
    return check(contrast >= CENTRE_CONTRAST, f"middle zone minus centre lightness {contrast:.2f} (>= {CENTRE_CONTRAST} needed)")


def target_pale_ring(a: Analysis) -> ItemResult:
    lesion = target_lesion(a)
    if lesion is None:
        return check(False, "no red lesion")
    p = radial_profile(a, lesion)
    inner, outer = p.middle - p.centre, p.middle - p.outer
    ok = inner >= CENTRE_CONTRAST and outer >= RING_CONTRAST
    return check(ok, f"ring contrast {outer:.2f} vs outer ring (>= {RING_CONTRAST}), {inner:.2f} vs centre (>= {CENTRE_CONTRAST})")


def target_round_shape(a: Analysis) -> ItemResult:
    lesion = target_lesion(a)
    if lesion is None:
        return check(False, "no red lesion")
    low, high = TARGET_DIAMETER
    ok = low <= lesion.diameter <= high and lesion.solidity >= TARGET_MIN_SOLIDITY and lesion.elongation <= TARGET_MAX_ELONGATION
    return check(
        ok,
        f"diameter {lesion.diameter:.1f} px ({low}-{high}), solidity {lesion.solidity:.2f} (>= {TARGET_MIN_SOLIDITY}), "
        f"elongation {lesion.elongation:.2f} (<= {TARGET_MAX_ELONGATION})",
    )


# ------------------------------------------------------------------------------------------ psoriasis
PLAQUE_MIN_AREA = 250
SCALE_MIN_SHARE = 0.01
SCALE_SKIN_SHARE = 0.36
SCALE_CHROMA = 60.0
PLAQUE_MIN_ELONGATION = 1.35
PLAQUE_MIN_SOLIDITY = 0.85
PLAQUE_MIN_MAJOR = 28.0


def psoriasis_plaque(a: Analysis) -> ItemResult:
    plaque = largest(a.red_components)
    filled = int(plaque.filled.sum()) if plaque else 0
    return check(filled >= PLAQUE_MIN_AREA, f"largest red plaque {filled} px with holes filled (>= {PLAQUE_MIN_AREA} needed)")


def psoriasis_scale(a: Analysis) -> ItemResult:
    plaque = largest(a.red_components)
    if plaque is None:
        return check(False, "no red plaque")
    filled = plaque.filled
    # scale is judged against the plaque: pixels at least halfway from the plaque's lightness to white and nearly
    # colourless; and against the skin: further towards white than a target's pale zone (0.3 of the way), so a
    # pale ring is no scale. One pixel beyond the filled plaque counts, for scale cut off at the rim. The codec
    # shrinks the thin streaks to their brightest few pixels, hence the small share.
    plaque_lightness = float(np.median(a.lightness[plaque.mask]))
    chroma = a.rgb.max(axis=-1) - a.rgb.min(axis=-1)
    scale = (
        (a.lightness >= (plaque_lightness + 255.0) / 2)
        & (a.lightness >= a.skin_lightness + SCALE_SKIN_SHARE * (255.0 - a.skin_lightness))
        & (chroma <= SCALE_CHROMA)
    )
    share = float((scale & ndimage.binary_dilation(filled)).sum() / max(1, filled.sum()))
    return check(share >= SCALE_MIN_SHARE, f"white scale covers {share:.2f} of the plaque (>= {SCALE_MIN_SHARE} needed)")


def psoriasis_oval_shape(a: Analysis) -> ItemResult:
    plaque = largest(a.red_components)
    if plaque is None:
        return check(False, "no red plaque")
    ok = plaque.elongation >= PLAQUE_MIN_ELONGATION and plaque.solidity >= PLAQUE_MIN_SOLIDITY
    return check(
        ok, f"elongation {plaque.elongation:.2f} (>= {PLAQUE_MIN_ELONGATION}), solidity {plaque.solidity:.2f} (>= {PLAQUE_MIN_SOLIDITY})"
    )


def psoriasis_plaque_size(a: Analysis) -> ItemResult:
    plaque = largest(a.red_components)
    major = plaque.axes[0] if plaque else 0.0
    return check(major >= PLAQUE_MIN_MAJOR, f"plaque length {major:.1f} px (>= {PLAQUE_MIN_MAJOR} needed)")


# ------------------------------------------------------------------------------------------- vitiligo
PATCH_MIN_AREA = 60
MILKY_SHARE = 0.5  # patch lightness at least this share of the way from skin to white
MILKY_CHROMA = 25.0
SURROUND_MAX_RED = 15.0
EXTENT_MIN_AREA = 130


def patches(a: Analysis) -> list[Component]:
    return [c for c in a.light_components if c.area >= 20]


def vitiligo_patch(a: Analysis) -> ItemResult:
    patch = largest(a.light_components)
    area = patch.area if patch else 0
    return check(area >= PATCH_MIN_AREA, f"largest white patch {area} px (>= {PATCH_MIN_AREA} needed)")


def vitiligo_milky_white(a: Analysis) -> ItemResult:
    patch = largest(a.light_components)
    if patch is None:
        return check(False, "no white patch")
    colour = np.median(a.rgb[patch.mask], axis=0)
    share = (float(luma(colour)) - a.skin_lightness) / max(1.0, 255.0 - a.skin_lightness)
    chroma = float(colour.max() - colour.min())
    ok = share >= MILKY_SHARE and chroma <= MILKY_CHROMA
    return check(ok, f"patch {share:.2f} of the way from skin to white (>= {MILKY_SHARE}), chroma {chroma:.0f} (<= {MILKY_CHROMA:.0f})")


def vitiligo_normal_surround(a: Analysis) -> ItemResult:
    found = patches(a)
    if not found:
        return check(False, "no white patch")
    union = np.any([c.mask for c in found], axis=0)
    ring = ndimage.binary_dilation(union, iterations=4) & ~ndimage.binary_dilation(union, iterations=1)
    ring &= edge_distance() >= LESION_AREA_INSET
    if not ring.any():
        return check(False, "no skin around the patches")
    redness = float(np.median(a.red_excess[ring]))
    return check(redness <= SURROUND_MAX_RED, f"redness around the patches {redness:.1f} (<= {SURROUND_MAX_RED:.0f} needed)")


def vitiligo_extent(a: Analysis) -> ItemResult:
    total = sum(c.area for c in patches(a))
    return check(total >= EXTENT_MIN_AREA, f"white patches cover {total} px (>= {EXTENT_MIN_AREA} needed)")


ITEMS = {
    ("melanoma", "dark_lesion"): melanoma_dark_lesion,
    ("melanoma", "location"): location_rule("trunk"),
    ("melanoma", "size"): melanoma_size,
    ("melanoma", "border"): melanoma_border,
    ("melanoma", "variegation"): melanoma_variegation,
    ("nevus", "dark_lesion"): nevus_dark_lesion,
    ("nevus", "location"): location_rule("face"),
    ("nevus", "size"): nevus_size,
    ("nevus", "shape"): nevus_shape,
    ("nevus", "uniform_colour"): nevus_uniform_colour,
    ("acne", "papules"): acne_papules,
    ("acne", "location"): location_rule("face"),
    ("acne", "count"): acne_count,
    ("acne", "papule_size"): acne_papule_size,
    ("acne", "clustered"): acne_clustered,
    ("erythema-multiforme", "red_lesion"): target_red_lesion,
    ("erythema-multiforme", "location"): location_rule("trunk"),
    ("erythema-multiforme", "dusky_centre"): target_dusky_centre,
    ("erythema-multiforme", "pale_ring"): target_pale_ring,
    ("erythema-multiforme", "round_shape"): target_round_shape,
    ("psoriasis", "plaque"): psoriasis_plaque,
    ("psoriasis", "location"): location_rule("extremities"),
    ("psoriasis", "scale"): psoriasis_scale,
    ("psoriasis", "oval_shape"): psoriasis_oval_shape,
    ("psoriasis", "plaque_size"): psoriasis_plaque_size,
    ("vitiligo", "patch"): vitiligo_patch,
    ("vitiligo", "location"): location_rule("extremities"),
    ("vitiligo", "milky_white"): vitiligo_milky_white,
    ("vitiligo", "normal_surround"): vitiligo_normal_surround,
    ("vitiligo", "extent"): vitiligo_extent,
}

# registered as the rules domain "demo" by `magic_align.demo.register`
DEMO_DOMAIN = RulesDomain(name="demo", version=VERSION, analyse=analyse, gate=gate, items=ITEMS, describe=describe)


def demo_validity_table(per_condition: int = 200, seed: int = 1000):
    """The validity table of docs/demo.md: `per_condition` freshly drawn images per condition, each judged
    under every demo checklist. Run `python -m magic_align.demo.rules 200`."""
    checklists = load_checklists("demo")
    images = {c: [Image.fromarray(a) for a in render_arrays([c] * per_condition, seed=seed)[0]] for c in CONDITIONS}
    return validity_table(RulesJudge(DEMO_DOMAIN), checklists, images)


if __name__ == "__main__":
    import sys

    print(demo_validity_table(int(sys.argv[1]) if len(sys.argv) > 1 else 200).markdown())
