"""A LoRA to stand in for a trained one in tests: every B matrix filled with one value, so two values give two
different models whose files have the same name."""

from pathlib import Path

import torch

from magic_align.diffusion.loading import load_pipeline
from magic_align.diffusion.lora import attach_lora, save_lora


def save_constant_lora(model_cfg, value: float, folder: Path) -> Path:
    """A rank-4 LoRA on the model of `model_cfg` with every lora_B entry = `value`, saved in `folder`."""
    pipe = load_pipeline(model_cfg)
    attach_lora(pipe.unet, rank=4, alpha=4)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.fill_(value)
    save_lora(pipe.unet, folder)
    return Path(folder)
