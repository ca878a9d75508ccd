"""Stable Diffusion 2.1 architectures built from their published configurations, with random weights.

Four named models, selected with `model.source = "architecture"` and `model.pretrained = <name>`:

- `sd21-base`: the components of `stable-diffusion-2-1-base` (the paper's model: 512 px, epsilon prediction,
  shipped with a PNDM scheduler configuration), at full size (UNet 866 M, text encoder 340 M, VAE 84 M parameters);
- `sd21-768-v`: the components of `stable-diffusion-2-1` (768 px, v-prediction, DDIM configuration, attention
  upcast to fp32);
- `sd21-base-reduced`, `sd21-768-v-reduced`: the same structure at small width and depth, for CPU tests.

The weights are random: these models exist to exercise the code paths of the real architecture (shapes, attention
layout, LoRA targets, schedules) without a download, on a CPU in the tests and at full size on a GPU in
`benchmarks/bench_sd21.py`. Their images are noise.

What the reduced models keep from the full ones: the block types (three cross-attention levels and a plain one,
down and up), per-block attention head counts (5, 10, 20, 20; with widths (40, 80, 160, 160) every head is 8 wide,
as every full-size head is 64 wide), `use_linear_projection`, the `upcast_attention` flag of each model,
cross-attention width 1024, a `CLIPTextModel` 1024 wide with 16 heads, gelu, a 4x MLP, projection 512 and a
77-token context behind a `CLIPTokenizer` that pads with "!" as SD 2.x's does, an 8x VAE (four levels, 4 latent
channels, scaling factor 0.18215), and each model's scheduler class and configuration (steps_offset 1, scaled-linear
betas, epsilon or v_prediction). What they reduce: channel widths, layers per block (1 instead of 2), text encoder
depth (2 instead of 23 layers), the vocabulary (the small word list of the tiny model instead of 49,408 entries) and
the resolution (64 or 128 px instead of 512 or 768).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from magic_align.diffusion.architecture_specs import ARCHITECTURES, CONTEXT_LENGTH, TOKENIZER_PAD, Architecture
from magic_align.diffusion.loading import ModelLoadError, ModelSource, build_tiny_tokenizer
from magic_align.diffusion.quiet import stable_diffusion_pipeline_class

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


def get_architecture(name: str) -> Architecture:
    """The architecture called `name`; an unknown name is a `ModelLoadError` listing the known ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ModelLoadError(
            f"model.pretrained = {name!r} is not a built-in architecture (model.source = 'architecture'); "
            f"expected one of {', '.join(ARCHITECTURES)}"
        ) from None


# ---------------------------------------------------------------------------------------- components
def build_tokenizer(architecture: Architecture):
    """A `CLIPTokenizer` with SD 2.x's context and padding on the tiny model's small vocabulary (no download)."""
    return build_tiny_tokenizer(max_length=CONTEXT_LENGTH, pad_token=TOKENIZER_PAD)


def build_unet(architecture: Architecture, resolution: int | None = None):
    from diffusers import UNet2DConditionModel

    config = dict(architecture.unet)
    config["sample_size"] = (resolution or architecture.resolution) // vae_scale_factor(architecture)
    return UNet2DConditionModel(**config)


def build_vae(architecture: Architecture, resolution: int | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**architecture.vae, "sample_size": resolution or architecture.resolution})


def build_text_encoder(architecture: Architecture, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = dict(architecture.text_encoder)
    if config["vocab_size"] is None:
        config["vocab_size"] = len(tokenizer)
    return CLIPTextModel(CLIPTextConfig(
        **config,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def build_scheduler(architecture: Architecture):
    """The scheduler class and configuration the published model ships with (the loader turns it into DDIM)."""
    import diffusers

    return getattr(diffusers, architecture.scheduler_class).from_config(dict(architecture.scheduler))


def vae_scale_factor(architecture: Architecture) -> int:
    return 2 ** (len(architecture.vae["block_out_channels"]) - 1)


def build_architecture_pipeline(
    name: str, seed: int = 0, resolution: int | None = None, device: str | torch.device | None = None
) -> "StableDiffusionPipeline":
    """A random-init `StableDiffusionPipeline` of the architecture `name`, the same for the same seed and device.

    `resolution` sets the UNet's and VAE's default image size (the architecture's own when None); `device` builds
    the modules there directly (a full-size model initialises in seconds on a GPU instead of tens on a CPU).
    """
    architecture = get_architecture(name)
    resolution = resolution or architecture.resolution
    if resolution % vae_scale_factor(architecture):
        raise ModelLoadError(
            f"model.resolution = {resolution}: {name} needs a multiple of {vae_scale_factor(architecture)} (its VAE "
            f"downsamples 8x); its native resolution is {architecture.resolution}"
        )
    tokenizer = build_tokenizer(architecture)
    target = torch.device(device) if device is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[target.index or 0] if target.type == "cuda" else []):
        torch.manual_seed(seed)
        with target:
            unet = build_unet(architecture, resolution)
            vae = build_vae(architecture, resolution)
            text_encoder = build_text_encoder(architecture, tokenizer)
    StableDiffusionPipeline = stable_diffusion_pipeline_class()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(architecture),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters per component (unet, vae, text_encoder)."""
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae", "text_encoder")}



# registered by reference as the model source "architecture" in diffusion/loading.py
ARCHITECTURE_SOURCE = ModelSource(
    load=lambda model_cfg, dtype: build_architecture_pipeline(
        model_cfg.pretrained, seed=model_cfg.seed, resolution=model_cfg.resolution),
    identity=lambda model_cfg: f"architecture:{model_cfg.pretrained}:{model_cfg.seed}:{model_cfg.resolution}".encode(),
)
