"""Pixel rules for the tiny preset's checklists (`demo/tiny.yaml`): plumbing checks, not dermatology.

The tiny preset samples with a random-init model whose images are noise. The demo rules refuse noise at their
quality gate, so every tiny sample scored 0 of 5, every pair tied and DPO had nothing to learn. These items
compare the lightness (and warmth) of halves and quarters of an image. On noise each holds about half the
time, independently of the others, so the K samples of a unit get different scores and the paper's pair rule
finds winners. Every condition has the same five items; the gate passes every image (noise is all there is).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from magic_align.demo.procedural import CONDITIONS
from magic_align.judges.rules import ItemResult, RulesDomain

VERSION = "v1"


@dataclass(frozen=True)
class Halves:
    """Mean lightness (and red minus blue) of the parts of an image the items compare."""

    top: float
    bottom: float
    left: float
    right: float
    centre: float
    whole: float
    diagonal: float  # top-left + bottom-right quarters
    anti_diagonal: float  # top-right + bottom-left quarters
    warmth_top: float
    warmth_bottom: float


def analyse(image: Image.Image) -> Halves:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    lightness = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    warmth = rgb[..., 0] - rgb[..., 2]
    height, width = lightness.shape
    h, w = height // 2, width // 2
    quarters = [lightness[:h, :w], lightness[:h, w:], lightness[h:, :w], lightness[h:, w:]]
    return Halves(
        top=float(lightness[:h].mean()), bottom=float(lightness[h:].mean()),
        left=float(lightness[:, :w].mean()), right=float(lightness[:, w:].mean()),
        centre=float(lightness[height // 4: height - height // 4, width // 4: width - width // 4].mean()),
        whole=float(lightness.mean()),
        diagonal=float(quarters[0].mean() + quarters[3].mean()),
        anti_diagonal=float(quarters[1].mean() + quarters[2].mean()),
        warmth_top=float(warmth[:h].mean()), warmth_bottom=float(warmth[h:].mean()),
    )


def gate(halves: Halves) -> ItemResult:
    return ItemResult(True, "no gate: the tiny checklists grade any image")


def _greater(name: str, a: float, b: float, what: tuple[str, str]) -> ItemResult:
    return ItemResult(a > b, f"{name}: {what[0]} {a:.2f} {'>' if a > b else '<='} {what[1]} {b:.2f}")


RULES = {
    "top_lighter": lambda h: _greater("lightness", h.top, h.bottom, ("top", "bottom")),
    "left_lighter": lambda h: _greater("lightness", h.left, h.right, ("left", "right")),
    "centre_lighter": lambda h: _greater("lightness", h.centre, h.whole, ("centre", "whole")),
    "diagonal_lighter": lambda h: _greater("lightness", h.diagonal, h.anti_diagonal, ("diagonal", "anti-diagonal")),
    "warm_top": lambda h: _greater("red - blue", h.warmth_top, h.warmth_bottom, ("top", "bottom")),
}

# registered as the rules domain "tiny" by `magic_align.demo.register`
TINY_DOMAIN = RulesDomain(
    name="tiny", version=VERSION, analyse=analyse, gate=gate,
    items={(condition, item): rule for condition in CONDITIONS for item, rule in RULES.items()},
    describe=lambda halves: {key: round(value, 2) for key, value in halves.__dict__.items()},
)
