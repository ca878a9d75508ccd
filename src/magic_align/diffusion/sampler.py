"""The trajectory sampler: batched image-to-image (and text-to-image) DDIM sampling that keeps what training needs.

For each request (source image, prompt, seed) it returns the decoded image and, when asked, the trajectory: the
latents actually visited, each with the timestep it was made at (the authors' code paired latents with the wrong
timesteps), and the log-prob of every step under the sampling policy (they recomputed these with a second UNet in
memory). Every sample drawn is returned; nothing is drawn to be thrown away. Why: docs/method.md section 11.1.

Randomness is per sample: each request has its own `torch.Generator(seed)`, used in the same order as diffusers'
`StableDiffusionImg2ImgPipeline` with a list of generators (VAE posterior sample, initial noise, then one draw per
DDIM step). So a sample depends only on its seed, not on its batch, and with `latent_dtype="float32"` it is the
image diffusers' own pipeline makes for the same generator.

Storage dtype: latents are rounded to the storage dtype (fp16 by default) *as they are visited*, and each step's
log-prob is that of the rounded latent. The stored trajectory is then exactly the one sampled, and a trainer that
recomputes log-probs from the stored latents under the same weights gets the stored values back.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from PIL import Image

from magic_align.config import ConfigError
from magic_align.diffusion.ddim import ddim_step_with_log_prob, guided_noise_prediction
from magic_align.diffusion.trajectories import LATENT_DTYPES


@dataclass(frozen=True)
class SamplingSettings:
    steps: int = 100
    strength: float = 0.3  # 1.0: text-to-image from pure noise
    eta: float = 1.0
    guidance: float = 5.0
    negative_prompt: str = ""
    reduction: Literal["mean", "sum"] = "mean"
    latent_dtype: str = "float16"
    keep_trajectory: bool = True

    @classmethod
    def from_config(cls, sample_cfg, model_cfg, keep_trajectory: bool = True) -> "SamplingSettings":
        return cls(
            steps=sample_cfg.steps,
            strength=sample_cfg.strength,
            eta=sample_cfg.eta,
            guidance=sample_cfg.guidance,
            negative_prompt=model_cfg.negative_prompt,
            reduction=sample_cfg.log_prob_reduction,
            latent_dtype=sample_cfg.latent_dtype,
            keep_trajectory=keep_trajectory,
        )

    @property
    def text_to_image(self) -> bool:
        return self.strength >= 1.0

    def choices(self) -> dict:
        """The settings that decide what a sample is, as shard headers record them (the scheduler aside)."""
        return {
            "steps": self.steps,
            "strength": self.strength,
            "eta": self.eta,
            "guidance": self.guidance,
            "negative_prompt": self.negative_prompt,
            "log_prob_reduction": self.reduction,
        }

    def header(self, scheduler) -> dict:
        """The settings as recorded in trajectory shard headers."""
        return {
            **self.choices(),
            "scheduler": {"class": type(scheduler).__name__, **{k: _jsonable(v) for k, v in dict(scheduler.config).items()}},
        }


@dataclass
class SampleRequest:
    sample_id: str
    prompt: str
    seed: int
    source: Image.Image | None = None  # None (or strength 1): text-to-image


@dataclass
class SampleResult:
    sample_id: str
    image: Image.Image
    prompt_ids: torch.Tensor  # [L] int64
    latents: torch.Tensor | None = None  # [T+1, C, h, w] in the storage dtype
    log_probs: torch.Tensor | None = None  # [T] float32
    timesteps: torch.Tensor | None = None  # [T] int64
    extras: dict = field(default_factory=dict)


def _jsonable(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return str(value)


# ------------------------------------------------------------------------------------------ timesteps
def sampling_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The timesteps an I2I run of `steps` at `strength` visits, as diffusers' img2img computes them: the last
    min(int(steps x strength), steps) of the full schedule (100 steps at 0.3: 291, 281, ..., 1 with SD's offset 1).
    Sets the scheduler's steps as a side effect (the DDIM step needs them)."""
    scheduler.set_timesteps(steps)
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ConfigError(f"strength {strength} with {steps} steps runs no step; raise sample.strength or sample.steps")
    return scheduler.timesteps[steps - kept :].to(torch.int64)


# -------------------------------------------------------------------------------------------- prompts
def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids [N, L] padded to the tokenizer's context, as diffusers' pipelines tokenize prompts."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def embed_prompt_ids(text_encoder, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Text embeddings [N, L, D] for stored token ids (the trainers call this with the frozen text encoder)."""
    if getattr(text_encoder.config, "use_attention_mask", False):
        raise ValueError("text encoders that need an attention mask are not supported by the trajectory format")
    return text_encoder(prompt_ids.to(text_encoder.device), attention_mask=None)[0]


# --------------------------------------------------------------------------------------------- images
def prepare_sources(pipe, images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """Sources as a [-1, 1] tensor [N, 3, H, W] at the model's resolution (diffusers' image processor)."""
    return pipe.image_processor.preprocess(list(images), height=resolution, width=resolution)


def encode_sources(pipe, pixels: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Scaled VAE latents, each row drawn from its posterior with its own generator (as diffusers does)."""
    from diffusers.utils.torch_utils import randn_tensor

    vae = pipe.vae
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    noise = randn_tensor(posterior.mean.shape, generator=list(generators), device=vae.device, dtype=posterior.mean.dtype)
    latents = posterior.mean + posterior.std * noise
    return vae.config.scaling_factor * latents


def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    vae = pipe.vae
    pixels = vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels, output_type="pil", do_denormalize=[True] * pixels.shape[0])


# --------------------------------------------------------------------------------------------- sample
@torch.no_grad()
def sample_batch(
    pipe,
    requests: Sequence[SampleRequest],
    settings: SamplingSettings,
    resolution: int | None = None,
) -> list[SampleResult]:
    """Sample every request in one batch (I2I, or T2I at strength 1 / without a source)."""
    from diffusers.utils.torch_utils import randn_tensor

    if not requests:
        return []
    device = pipe.unet.device
    resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    store_dtype = LATENT_DTYPES[settings.latent_dtype]
    text_to_image = settings.text_to_image or all(request.source is None for request in requests)
    if not text_to_image and any(request.source is None for request in requests):
        raise ValueError("a batch mixes requests with and without a source image at strength < 1")

    scheduler = copy.deepcopy(pipe.scheduler)  # set_timesteps mutates; the pipeline's scheduler stays untouched
    steps_full = settings.steps
    timesteps = sampling_timesteps(scheduler, steps_full, 1.0 if text_to_image else settings.strength)
    generators = [torch.Generator(device="cpu").manual_seed(int(request.seed)) for request in requests]

    prompt_ids = tokenize_prompts(pipe.tokenizer, [request.prompt for request in requests])
    cond = embed_prompt_ids(pipe.text_encoder, prompt_ids)
    uncond = None
    if settings.guidance > 1:
        negative_ids = tokenize_prompts(pipe.tokenizer, [settings.negative_prompt] * len(requests))
        uncond = embed_prompt_ids(pipe.text_encoder, negative_ids)

    latent_size = resolution // pipe.vae_scale_factor
    shape = (len(requests), pipe.unet.config.in_channels, latent_size, latent_size)
    if text_to_image:
        latents = randn_tensor(shape, generator=generators, device=torch.device("cpu"), dtype=torch.float32).to(device)
        latents = latents * scheduler.init_noise_sigma
    else:
        pixels = prepare_sources(pipe, [request.source for request in requests], resolution)
        clean = encode_sources(pipe, pixels, generators).to(torch.float32)
        noise = randn_tensor(clean.shape, generator=generators, device=torch.device("cpu"), dtype=torch.float32).to(device)
        latents = scheduler.add_noise(clean, noise, timesteps[:1].repeat(len(requests)))
    latents = latents.to(store_dtype).to(torch.float32)  # the visited latent is the stored one

    trajectory = [latents.to(store_dtype).cpu()] if settings.keep_trajectory else None
    log_probs = []
    for timestep in timesteps:
        noise_pred = guided_noise_prediction(pipe.unet, latents, timestep, cond, uncond, settings.guidance)
        # noise drawn on the CPU generators, then moved: the same numbers on every device
        variance_noise = randn_tensor(latents.shape, generator=generators, device=torch.device("cpu"), dtype=torch.float32)
        step = ddim_step_with_log_prob(
            scheduler, noise_pred, timestep, latents, settings.eta,
            variance_noise=variance_noise.to(device), reduction=settings.reduction,
        )
        visited = step.prev_sample.to(store_dtype).to(torch.float32)
        if store_dtype != torch.float32:  # score the rounded latent we keep, not the one we rounded away
            step = ddim_step_with_log_prob(
                scheduler, noise_pred, timestep, latents, settings.eta, prev_latents=visited, reduction=settings.reduction
            )
        log_probs.append(step.log_prob.cpu())
        latents = visited
        if trajectory is not None:
            trajectory.append(latents.to(store_dtype).cpu())

    images = decode_latents(pipe, latents)
    results = []
    stacked = torch.stack(trajectory, dim=1) if trajectory is not None else None
    step_log_probs = torch.stack(log_probs, dim=1)
    for row, request in enumerate(requests):
        results.append(
            SampleResult(
                sample_id=request.sample_id,
                image=images[row],
                prompt_ids=prompt_ids[row],
                latents=stacked[row] if stacked is not None else None,
                log_probs=step_log_probs[row] if settings.keep_trajectory else None,
                timesteps=timesteps.clone() if settings.keep_trajectory else None,
            )
        )
    return results


# ------------------------------------------------------------------------------------- determinism
def derived_seed(*parts) -> int:
    """A 31-bit seed from a key such as (run seed, round, unit, k): the same key always gives the same sample,
    whatever ran before it, so a resumed or re-sharded run draws exactly what an uninterrupted one would."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def process_state():
    """(process index, process count, device) under `accelerate launch`, or (0, 1, best device) alone."""
    try:
        from accelerate import PartialState

        state = PartialState()
        return state.process_index, state.num_processes, state.device
    except Exception:  # noqa: BLE001 - accelerate missing or misconfigured: run as one process
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def wait_for_every_process(process_count: int) -> None:
    """A barrier under `accelerate launch` (nothing alone), e.g. after the main process changed the run folder."""
    if process_count > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()
