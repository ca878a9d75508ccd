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

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

import torch

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

# Written out from the configuration files of the published models (their `unet/`, `vae/`, `text_encoder/` and
# `scheduler/` folders), so that nothing needs the hub.
SD21_UNET = MappingProxyType({
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    # diffusers' historical name: these are the numbers of heads per block (each head 64 wide)
    "attention_head_dim": (5, 10, 20, 20),
    "dual_cross_attention": False,
    "use_linear_projection": True,
    "num_class_embeds": None,
    "upcast_attention": False,
})
SD21_VAE = MappingProxyType({
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
})
# OpenCLIP ViT-H/14's text tower without its last layer (SD 2.x conditions on the penultimate layer's output)
SD21_TEXT_ENCODER = MappingProxyType({
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 512,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
})
SD21_SCHEDULE = MappingProxyType({
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "prediction_type": "epsilon",
})
TOKENIZER_PAD = "!"  # SD 2.x pads prompts with "!" (OpenCLIP's id 0), not with the end-of-text token
CONTEXT_LENGTH = 77

# The reduced models' widths: the head counts stay (5, 10, 20, 20), so every head is 8 wide.
REDUCED_UNET = {"block_out_channels": (40, 80, 160, 160), "layers_per_block": 1, "norm_num_groups": 8}
REDUCED_VAE = {"block_out_channels": (16, 32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8}
REDUCED_TEXT_LAYERS = 2


@dataclass(frozen=True)
class Architecture:
    """One named model: the constructor arguments of each component and its native resolution."""

    name: str
    summary: str
    resolution: int
    unet: Mapping = field(repr=False)
    vae: Mapping = field(repr=False)
    text_encoder: Mapping = field(repr=False)  # CLIPTextConfig arguments; vocab_size None = the tokenizer's size
    scheduler_class: str = "PNDMScheduler"
    scheduler: Mapping = field(default_factory=lambda: SD21_SCHEDULE, repr=False)

    @property
    def prediction_type(self) -> str:
        return self.scheduler["prediction_type"]


def _reduced(full: Architecture, resolution: int) -> Architecture:
    return replace(
        full,
        name=f"{full.name}-reduced",
        summary=f"{full.summary}; reduced widths and depth, {resolution} px",
        resolution=resolution,
        unet={**full.unet, **REDUCED_UNET},
        vae={**full.vae, **REDUCED_VAE},
        text_encoder={**full.text_encoder, "num_hidden_layers": REDUCED_TEXT_LAYERS, "vocab_size": None},
    )


SD21_BASE = Architecture(
    name="sd21-base",
    summary="Stable Diffusion 2.1 base: 512 px, epsilon prediction",
    resolution=512,
    unet=SD21_UNET,
    vae=SD21_VAE,
    text_encoder=SD21_TEXT_ENCODER,
)
SD21_768_V = Architecture(
    name="sd21-768-v",
    summary="Stable Diffusion 2.1 (768-v): 768 px, v-prediction",
    resolution=768,
    unet={**SD21_UNET, "sample_size": 96, "upcast_attention": True},
    vae={**SD21_VAE, "sample_size": 768},
    text_encoder=SD21_TEXT_ENCODER,
    scheduler_class="DDIMScheduler",
    scheduler={**SD21_SCHEDULE, "prediction_type": "v_prediction"},
)
ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType({
    architecture.name: architecture
    for architecture in (SD21_BASE, SD21_768_V, _reduced(SD21_BASE, 64), _reduced(SD21_768_V, 128))
})


def get_architecture(name: str) -> Architecture:
    """The architecture called `name`; an unknown name is a `ModelLoadError` listing the known ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        from magic_align.diffusion.loading import ModelLoadError

        raise ModelLoadError(
            f"model.pretrained = {name!r} is not a built-in architecture (model.source = 'architecture'); "
            f"expected one of {', '.join(ARCHITECTURES)}"
        ) from None


# ---------------------------------------------------------------------------------------- components
def build_tokenizer(architecture: Architecture):
    """A `CLIPTokenizer` with SD 2.x's context and padding on the tiny model's small vocabulary (no download)."""
    from magic_align.diffusion.loading import build_tiny_tokenizer

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
    from magic_align.diffusion.quiet import stable_diffusion_pipeline_class

    architecture = get_architecture(name)
    resolution = resolution or architecture.resolution
    if resolution % vae_scale_factor(architecture):
        from magic_align.diffusion.loading import ModelLoadError

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
