"""The published configurations of the Stable Diffusion 2.1 architectures, as plain data.

Each `Architecture` holds the constructor arguments of its components and its native resolution; `ARCHITECTURES`
names the four built-in ones (`diffusion/architectures.py` builds them with random weights). Nothing here imports
torch or the rest of the package, so the configuration can check `model.pretrained` against these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping

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
