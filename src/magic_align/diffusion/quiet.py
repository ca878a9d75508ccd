"""Quieting third-party notices about things magic-align does not use, only around the calls that cause them.

Nothing here changes a library's logging for the whole process: each helper drops the named messages (matched by
a piece of their text) while its block runs, so every other warning of the same libraries still shows.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

# transformers' image processors fall back to their PIL versions without torchvision (never installed here, see
# DEVELOPERS.md); diffusers imports them for the safety checker and IP adapters, which we never load.
NO_TORCHVISION = "requires torchvision (not installed)"
# peft, when a second LoRA goes onto a UNet that has one (stacking run LoRA + aligned LoRA is what we want).
STACKED_ADAPTER = "Already found a `peft_config` attribute in the model"
# transformers, when token embeddings grow with its mean-resizing default (diffusers' textual-inversion loader).
MEAN_RESIZING = "The new embeddings will be initialized from a multivariate normal distribution"
# diffusers, when a module with `_keep_in_fp32_modules` is cast as a whole; we cast each module on purpose.
KEEP_IN_FP32 = "that should be kept in float32"


class _DropMessages(logging.Filter):
    def __init__(self, pieces: tuple[str, ...]) -> None:
        super().__init__()
        self.pieces = pieces

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(piece in message for piece in self.pieces)


@contextmanager
def without_log_messages(logger_name: str, *pieces: str) -> Iterator[None]:
    """Drop records of the logger `logger_name` whose message contains one of `pieces`, inside the block."""
    logger = logging.getLogger(logger_name)
    dropper = _DropMessages(pieces)
    logger.addFilter(dropper)
    try:
        yield
    finally:
        logger.removeFilter(dropper)


@contextmanager
def stacking_adapters() -> Iterator[None]:
    """Inside the block, peft does not warn that the model already has an adapter (we stack them on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=STACKED_ADAPTER)
        yield


def stable_diffusion_pipeline_class():
    """diffusers' `StableDiffusionPipeline`, imported without transformers' torchvision fallback notices."""
    with without_log_messages("transformers.utils.import_utils", NO_TORCHVISION):
        from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline
