"""MAGIC-DPO on the tiny model: the batched stored-reference design against the authors' loop structure,
ties, resume, two processes, and the saved LoRA in plain diffusers."""

import copy

import pytest
import torch

from magic_align.config import ModelConfig
from magic_align.diffusion.ddim import ddim_step_with_log_prob, guided_noise_prediction
from magic_align.diffusion.loading import load_pipeline
from magic_align.train.dpo import pair_schedule, prepare_policy_unet, trajectory_log_probs
from magic_align.train.dpo_loss import dpo_loss

STEPS, STRENGTH, GUIDANCE, ETA = 10, 0.5, 3.0, 1.0


def tiny_pipe(folder):
    return load_pipeline(ModelConfig(source="local", pretrained=str(folder), resolution=64))


def tokenize(pipe, prompts):
    tokenizer = pipe.tokenizer
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def sample_trajectories(pipe, prompt_ids, seed, steps=STEPS, strength=STRENGTH, guidance=GUIDANCE, eta=ETA):
    """Trajectories drawn with the shared DDIM step (what the sampler stores): latents [N, T+1, ...], log-probs."""
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps[steps - int(steps * strength):]
    generator = torch.Generator().manual_seed(seed)
    cond = pipe.text_encoder(prompt_ids)[0]
    uncond = pipe.text_encoder(tokenize(pipe, [""]))[0]
    x = torch.randn(prompt_ids.shape[0], 4, 16, 16, generator=generator)
    latents, log_probs = [x], []
    for t in timesteps:
        eps = guided_noise_prediction(pipe.unet, x, int(t), cond, uncond, guidance)
        out = ddim_step_with_log_prob(scheduler, eps, int(t), x, eta, generator=generator)
        x = out.prev_sample
        latents.append(x)
        log_probs.append(out.log_prob)
    return torch.stack(latents, 1), torch.stack(log_probs, 1), timesteps.clone(), cond, uncond


def perturb_lora(unet, seed=1, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def lora_grads(unet):
    return {name: p.grad.clone() for name, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("clip", [None, 0.3])
def test_stored_reference_equals_a_frozen_reference_unet_stepwise(tiny_model_dir, clip):
    pipe = tiny_pipe(tiny_model_dir)
    ids = tokenize(pipe, ["a photo of red skin", "a photo of red skin"])
    latents, stored, timesteps, cond, uncond = sample_trajectories(pipe, ids, seed=3)
    reference_unet = copy.deepcopy(pipe.unet)  # the authors' design: a frozen copy of the initial model
    unet = prepare_policy_unet(pipe, rank=4, alpha=4)
    perturb_lora(unet)
    scheduler = pipe.scheduler
    signs = torch.tensor([[1, -1]])
    beta = 2.0
    length = timesteps.shape[0]

    # ours: all T steps of both samples in one pass, reference = the stored log-probs
    policy = trajectory_log_probs(unet, scheduler, latents, timesteps, cond, uncond, guidance=GUIDANCE, eta=ETA,
                                  reduction="mean")
    loss, _ = dpo_loss(policy[None], stored[None], signs, beta, clip)
    loss.backward()
    ours = lora_grads(unet)
    unet.zero_grad(set_to_none=True)

    # the authors' structure: one step at a time, policy and reference forwards at every step
    total = 0.0
    for i in range(length):
        t = int(timesteps[i])
        with torch.no_grad():
            eps_ref = guided_noise_prediction(reference_unet, latents[:, i], t, cond, uncond, GUIDANCE)
            ref = ddim_step_with_log_prob(scheduler, eps_ref, t, latents[:, i], ETA, prev_latents=latents[:, i + 1]).log_prob
        eps = guided_noise_prediction(unet, latents[:, i], t, cond, uncond, GUIDANCE)
        lp = ddim_step_with_log_prob(scheduler, eps, t, latents[:, i], ETA, prev_latents=latents[:, i + 1]).log_prob
        step_loss, _ = dpo_loss(lp[None, :, None], ref[None, :, None], signs, beta, clip)
        (step_loss / length).backward()
        total += step_loss.item() / length
    theirs = lora_grads(unet)

    assert loss.item() == pytest.approx(total, abs=1e-5)
    assert set(ours) == set(theirs) and ours
    moved = 0
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-5, rtol=1e-4), name
        moved += int(ours[name].abs().max() > 0)
    assert moved > 0  # the comparison is not between two zero gradients


def test_disabled_adapter_reproduces_the_stored_log_probs(tiny_model_dir):
    pipe = tiny_pipe(tiny_model_dir)
    ids = tokenize(pipe, ["a photo of red skin"])
    latents, stored, timesteps, cond, uncond = sample_trajectories(pipe, ids, seed=5)
    unet = prepare_policy_unet(pipe, rank=4, alpha=4)
    perturb_lora(unet)
    kwargs = dict(guidance=GUIDANCE, eta=ETA, reduction="mean")
    with torch.no_grad():
        moved = trajectory_log_probs(unet, pipe.scheduler, latents, timesteps, cond, uncond, **kwargs)
        unet.disable_adapters()
        recomputed = trajectory_log_probs(unet, pipe.scheduler, latents, timesteps, cond, uncond, **kwargs)
        unet.enable_adapters()
    assert torch.allclose(recomputed, stored, atol=1e-5)
    assert not torch.allclose(moved, stored, atol=1e-3)


def test_pair_schedule_is_a_seeded_stream_of_permutations():
    first_pass = pair_schedule(5, 0, 3, seed=0) + pair_schedule(5, 1, 3, seed=0)[:2]
    assert sorted(first_pass) == [0, 1, 2, 3, 4]
    assert pair_schedule(5, 7, 3, seed=0) == pair_schedule(5, 7, 3, seed=0)
    assert [pair_schedule(5, s, 3, seed=1) for s in range(4)] != [pair_schedule(5, s, 3, seed=2) for s in range(4)]
    assert len(pair_schedule(2, 0, 5, seed=0)) == 5  # more pairs per step than pairs: wraps into the next pass
