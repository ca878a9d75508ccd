"""The DDIM step with its log-probability (docs/method.md section 5): the one implementation the sampler and the
trainers share.

A DDIM step with eta > 0 is a Gaussian transition x_{t'} ~ N(mu, sigma^2) with

    x0    = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    sigma = eta sqrt((1 - a_t') / (1 - a_t) (1 - a_t / a_t'))
    mu    = sqrt(a_t') x0 + sqrt(1 - a_t' - sigma^2) eps

so the sampler can record log p(x_{t'} | x_t, c) for the sample it draws, and a trainer can score a stored
x_{t'} under another set of weights. The arithmetic follows `diffusers.DDIMScheduler.step` term by term, so for
the same noise the sample is the same; t' = t - num_train_timesteps // num_inference_steps and, below 0, the
scheduler's `final_alpha_cumprod` (1 with `set_alpha_to_one`, else a_0), as diffusers does. With a_t' = 1 the
step has sigma = 0 whatever eta: it is deterministic, and its log-prob is defined as 0 (no term in any ratio).

`timestep` may be an int or a tensor with one value per batch row, so the T steps of a stored trajectory can be
scored in one batched UNet call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

Reduction = Literal["mean", "sum"]
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class DDIMStepOutput:
    prev_sample: torch.Tensor  # x_{t'}: drawn, or the `prev_latents` that were scored
    log_prob: torch.Tensor  # [B], log p(x_{t'} | x_t) reduced over the latent elements
    mean: torch.Tensor  # mu, same shape as the sample
    std: torch.Tensor  # sigma, broadcastable to the sample ([B, 1, 1, 1] or a 0-d tensor)


# ---------------------------------------------------------------------------------------- pure math
def gaussian_log_prob(value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """log N(value; mean, std^2) per element, then averaged (paper) or summed over all but the batch dimension."""
    log_density = -((value - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    dims = tuple(range(1, log_density.ndim))
    if reduction == "mean":
        return log_density.mean(dim=dims)
    if reduction == "sum":
        return log_density.sum(dim=dims)
    raise ValueError(f"log-prob reduction {reduction!r}: expected 'mean' or 'sum'")


def previous_timestep(scheduler, timestep: torch.Tensor) -> torch.Tensor:
    """t' for each t, as DDIMScheduler.step computes it (a fixed stride, whatever the timestep spacing)."""
    if scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no steps yet: call scheduler.set_timesteps(steps) first")
    return timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def alpha_products(scheduler, timestep: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_t, a_t') as float32 tensors of the timestep's shape; t' < 0 takes `final_alpha_cumprod`."""
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=device)
    timestep = timestep.to(device=device, dtype=torch.long)
    prev = previous_timestep(scheduler, timestep)
    alpha_t = alphas[timestep]
    alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)
    return alpha_t, alpha_prev


def _as_timestep_tensor(timestep: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A [B, 1, 1, 1]-broadcastable long tensor, or 0-d for one timestep for the whole batch."""
    timestep = torch.as_tensor(timestep, device=device)
    if timestep.ndim == 0:
        return timestep
    if timestep.shape != (batch,):
        raise ValueError(f"timestep has shape {tuple(timestep.shape)}; expected a scalar or one value per row ({batch},)")
    return timestep


# ------------------------------------------------------------------------------------------ the step
def ddim_step_with_log_prob(
    scheduler,
    noise_pred: torch.Tensor,
    timestep: int | torch.Tensor,
    latents: torch.Tensor,
    eta: float,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    prev_latents: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    variance_noise: torch.Tensor | None = None,
) -> DDIMStepOutput:
    """One DDIM step from `latents` (x_t) with the model output `noise_pred`, and the log-prob of its result.

    Without `prev_latents`, draws x_{t'} = mu + sigma z with z from `generator` (one generator per row is allowed,
    as in diffusers) or `variance_noise`. With `prev_latents`, draws nothing and scores them. Computed in float32
    whatever the model's dtype, so stored log-probs do not depend on fp16 rounding of the arithmetic.
    """
    if eta <= 0:
        raise ValueError(f"eta = {eta}: the log-prob of a DDIM step needs eta > 0 (eta = 0 is deterministic)")
    config = scheduler.config
    if config.thresholding:
        raise ValueError("DDIM schedulers with thresholding=True are not supported: the step would not be Gaussian in x0")
    device = latents.device
    sample = latents.to(torch.float32)
    model_output = noise_pred.to(torch.float32)
    timestep = _as_timestep_tensor(timestep, sample.shape[0], device)
    alpha_t, alpha_prev = alpha_products(scheduler, timestep, device)
    if timestep.ndim == 1:  # per-row values broadcast over the latent dimensions
        shape = (-1,) + (1,) * (sample.ndim - 1)
        alpha_t, alpha_prev = alpha_t.reshape(shape), alpha_prev.reshape(shape)
    beta_t = 1 - alpha_t

    if config.prediction_type == "epsilon":
        pred_original = (sample - beta_t ** (0.5) * model_output) / alpha_t ** (0.5)
        pred_epsilon = model_output
    elif config.prediction_type == "sample":
        pred_original = model_output
        pred_epsilon = (sample - alpha_t ** (0.5) * pred_original) / beta_t ** (0.5)
    elif config.prediction_type == "v_prediction":
        pred_original = (alpha_t**0.5) * sample - (beta_t**0.5) * model_output
        pred_epsilon = (alpha_t**0.5) * model_output + (beta_t**0.5) * sample
    else:
        raise ValueError(f"scheduler prediction_type {config.prediction_type!r}: expected epsilon, sample or v_prediction")
    if config.clip_sample:
        pred_original = pred_original.clamp(-config.clip_sample_range, config.clip_sample_range)

    variance = ((1 - alpha_prev) / beta_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance ** (0.5)
    direction = (1 - alpha_prev - std**2) ** (0.5) * pred_epsilon
    mean = alpha_prev ** (0.5) * pred_original + direction

    if prev_latents is None:
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        if variance_noise is None:
            from diffusers.utils.torch_utils import randn_tensor

            variance_noise = randn_tensor(model_output.shape, generator=generator, device=device, dtype=torch.float32)
        prev_sample = mean + std * variance_noise.to(device=device, dtype=torch.float32)
    else:
        prev_sample = prev_latents.to(device=device, dtype=torch.float32)
    # sigma = 0 where a_t' = 1 (the last step under set_alpha_to_one): the step is deterministic and has no density.
    # Its log-prob is 0, so it adds nothing to a likelihood ratio; the Gaussian is evaluated with a stand-in sigma
    # there so neither the value nor the gradient through the unused branch is NaN.
    # (no branch on the values: that would wait for the device at every step)
    degenerate = std <= 0
    log_prob = gaussian_log_prob(prev_sample, mean, torch.where(degenerate, torch.ones_like(std), std), reduction)
    per_row = degenerate.reshape(-1) if degenerate.ndim else degenerate  # [B, 1, 1, 1] -> [B]; 0-d stays
    log_prob = torch.where(per_row, torch.zeros_like(log_prob), log_prob)
    return DDIMStepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)


# ------------------------------------------------------------------------------------- model output
def guided_noise_prediction(
    unet,
    latents: torch.Tensor,
    timesteps: int | torch.Tensor,
    cond_embeds: torch.Tensor,
    uncond_embeds: torch.Tensor | None,
    guidance: float,
) -> torch.Tensor:
    """Classifier-free guided eps = eps_u + w (eps_c - eps_u), in one UNet call on [uncond; cond].

    As in diffusers' pipelines, guidance applies only when w > 1 (w <= 1 uses the conditional prediction alone).
    `timesteps` may be one value or one per row. Returns the prediction in float32.
    """
    batch = latents.shape[0]
    timesteps = torch.as_tensor(timesteps, device=latents.device)
    if timesteps.ndim == 1 and timesteps.shape[0] != batch:
        raise ValueError(f"timesteps has {timesteps.shape[0]} values for a batch of {batch}")
    model_input = latents.to(unet.dtype)
    if guidance > 1:
        if uncond_embeds is None:
            raise ValueError(f"guidance = {guidance} needs unconditional (negative prompt) embeddings")
        if uncond_embeds.shape[0] == 1 and batch > 1:
            uncond_embeds = uncond_embeds.expand(batch, *uncond_embeds.shape[1:])
        model_input = torch.cat([model_input, model_input])
        if timesteps.ndim == 1:
            timesteps = torch.cat([timesteps, timesteps])
        embeds = torch.cat([uncond_embeds, cond_embeds]).to(unet.dtype)
        noise_uncond, noise_cond = unet(model_input, timesteps, encoder_hidden_states=embeds).sample.chunk(2)
        noise_pred = noise_uncond + guidance * (noise_cond - noise_uncond)
    else:
        noise_pred = unet(model_input, timesteps, encoder_hidden_states=cond_embeds.to(unet.dtype)).sample
    return noise_pred.to(torch.float32)
