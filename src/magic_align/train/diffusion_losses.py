"""The diffusion losses the trainers share: noise a clean latent to a timestep, predict, compare.

`denoising_loss` is the standard epsilon (or velocity) MSE of fine-tuning, also RFT's real-image term and its
reward-weighted denoising objective; `noised_with_target` and `prediction_error` are its parts, which
Diffusion-DPO uses to compare two samples on one shared draw; `encode_images` turns pixels into the latents they
are trained on.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from magic_align.train.session import TrainingError


def noise_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon models) or the velocity (v-prediction models)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise TrainingError(f"the model's prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")


def denoising_draw(noise_scheduler, latents: torch.Tensor, generator: torch.Generator, max_timestep: int | None = None,
                   groups: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One draw of the diffusion loss: (the latents noised to random DDPM timesteps from 0 to `max_timestep`, all of
    them by default; what the UNet must predict for them; the timesteps). Noise first, then timesteps, from
    `generator`. Rows with the same entry in `groups` share their noise and timestep, so a contrast between them is
    not buried in the spread of the draws."""
    count = latents.shape[0]
    rows = torch.arange(count) if groups is None else torch.unique(torch.as_tensor(groups), return_inverse=True)[1]
    draws = int(rows.max()) + 1
    noise = torch.randn((draws, *latents.shape[1:]), generator=generator, dtype=torch.float32)
    noise = noise[rows].to(latents.device, latents.dtype)
    high = noise_scheduler.config.num_train_timesteps if max_timestep is None else max_timestep + 1
    timesteps = torch.randint(0, high, (draws,), generator=generator)[rows].to(latents.device)
    noisy, target = noised_with_target(noise_scheduler, latents, noise, timesteps)
    return noisy, target, timesteps


def denoising_loss(
    unet: nn.Module,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator,
    weights: torch.Tensor | None = None,
    max_timestep: int | None = None,
    groups: Sequence[int] | None = None,
) -> torch.Tensor:
    """The standard diffusion loss on one `denoising_draw`: MSE between the UNet's output and the target, averaged per
    sample and then over the batch (weighted by `weights` when given)."""
    noisy, target, timesteps = denoising_draw(noise_scheduler, latents, generator, max_timestep, groups)
    prediction = unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states).sample
    return weighted_error(prediction, target, weights)


def weighted_error(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over the batch of each sample's squared error, weighted by `weights` when given."""
    per_sample = prediction_error(prediction, target)
    return per_sample.mean() if weights is None else (per_sample * weights.to(per_sample)).mean()


def noised_with_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """(the latents noised to `timesteps`, what the UNet must predict for them)."""
    return noise_scheduler.add_noise(latents, noise, timesteps), noise_target(noise_scheduler, latents, noise, timesteps)


def prediction_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean squared error of each sample's prediction, in fp32: [N]."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def encode_images(vae, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images in [-1, 1] -> scaled VAE latents, sampled from the posterior with `generator`."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator, dtype=torch.float32).to(posterior.mean)
    latents = posterior.mean + posterior.std * noise
    return latents * vae.config.scaling_factor
