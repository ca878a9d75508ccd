"""Token and dollar estimates for judge calls: the one implementation the OpenAI backend (rate limits,
per-call cost) and the judge stage (`magic judge --dry-run`, `magic run --dry-run`) share."""

from __future__ import annotations

import math

from magic_align.config import JudgeConfig


def estimate_image_tokens(width: int, height: int, detail: str = "high") -> int:
    """Input tokens GPT-4o bills for one image: 85 at low detail; at high detail the image is fitted into
    2048 x 2048, its shortest side scaled down to 768, and each 512-px tile costs 170 on top of 85."""
    if detail == "low":
        return 85
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width} x {height}")
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = min(1.0, 768 / min(width, height))
    width, height = width * scale, height * scale
    return 85 + 170 * math.ceil(width / 512) * math.ceil(height / 512)


def estimate_text_tokens(text: str) -> int:
    return math.ceil(len(text) / 4) + 4  # about four characters per token, plus the message framing


def sent_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """The size of an image as sent: longest side at most `image_size` (never enlarged)."""
    scale = min(1.0, image_size / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def price_usd(cfg: JudgeConfig, input_tokens: int, output_tokens: int) -> float | None:
    """Dollars at `judge.prices[model]`; None when the model has no price (an estimate cannot be given)."""
    price = cfg.prices.get(cfg.model)
    if price is None:
        return None
    return input_tokens * price.input_per_mtok / 1e6 + output_tokens * price.output_per_mtok / 1e6


def cost_usd(cfg: JudgeConfig, input_tokens: int, output_tokens: int) -> float:
    """Cost of a call actually made: models without a price (local servers) cost nothing."""
    return price_usd(cfg, input_tokens, output_tokens) or 0.0
