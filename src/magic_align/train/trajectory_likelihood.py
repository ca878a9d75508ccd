"""What both trainers on stored trajectories (`dpo`, `rft`) share: the policy and the likelihood of a trajectory.

- `prepare_policy_unet`: the preliminary model (its LoRA fused into the UNet weights, never dropped: docs/method.md
  section 11.1) plus one trainable LoRA under the trainer's own adapter name ("dpo", "rft");
- `TrajectorySettings`: what a round's trajectories were sampled with (their shard header), which every
  trajectory trained on together must share (`check_trajectory_settings`);
- `trajectory_log_probs`: log p(x_{t'} | x_t, c) of the stored transitions under a model, all chosen steps of
  N trajectories in one batched UNet pass, each row at the timestep its latent was made at (docs/method.md
  section 2);
  `step_chunks` splits a trajectory's steps into passes of `steps_per_forward`;
- `start_policy_training`: the common start of both trainers (policy, mixed precision, `session.start_training`,
  the sampling schedule and negative prompt), returning a `PolicyTraining` whose `log_probs` scores trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from accelerate import PartialState
from rich.console import Console

from magic_align.config import digest_values
from magic_align.diffusion.ddim import ddim_step_with_log_prob, guided_noise_prediction
from magic_align.diffusion.loading import weights_digest
from magic_align.diffusion.lora import LORA_TARGETS, adapter_parameters, attach_lora, lora_weights_file, merge_lora
from magic_align.diffusion.sampler import embed_prompt_ids, tokenize_prompts
from magic_align.sample import of_source_skin_types
from magic_align.train.session import (
    ModelWithDtype,
    TrainingError,
    TrainingSession,
    freeze_to,
    set_aside_other_checkpoints,
    settings_digest,
    start_training,
    weight_dtype,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from magic_align.config import RunConfig
    from magic_align.run import RunPaths


# ------------------------------------------------------------------------------------------ the model
def prepare_policy_unet(pipe, rank: int, alpha: float, init_lora: Path | None = None, *, adapter_name: str,
                        targets: Sequence[str] | None = None):
    """Fuse whatever LoRA the pipeline carries (the preliminary one) into its weights, then attach the trainable
    adapter `adapter_name` on the projections `targets` (default `lora.LORA_TARGETS`): fresh (B = 0, so the policy
    starts as the preliminary model) or from `init_lora`. Only that adapter's LoRA weights train; returns the UNet."""
    targets = tuple(targets or LORA_TARGETS)

    unet = pipe.unet
    if getattr(unet, "peft_config", None):
        # Fusing then unloading keeps the preliminary LoRA in the weights for good (docs/method.md 11.1) and leaves
        # the trainer's adapter as the only one, so "adapter disabled" means exactly "the preliminary model".
        merge_lora(pipe)
    unet.requires_grad_(False)
    if init_lora is None:
        try:
            attach_lora(unet, rank, alpha, adapter_name=adapter_name, targets=targets, init=True)
        except ValueError as error:  # peft: no module matches a target
            raise TrainingError(
                f"lora_targets {list(targets)}: no attention layer matched ({error}); use projection names such as "
                "to_q, to_k, to_v, to_out.0, optionally prefixed by attn1. (self) or attn2. (cross-attention)"
            ) from None
    else:
        try:
            weights = lora_weights_file(Path(init_lora))
        except FileNotFoundError as error:
            raise TrainingError(f"init_lora: {error}") from None
        unet.load_lora_adapter(str(weights), adapter_name=adapter_name, prefix="unet")
        unet.set_adapter(adapter_name)
    trainable = adapter_parameters(unet, adapter_name)
    for parameter in trainable:
        parameter.requires_grad_(True)
    if not trainable:
        raise TrainingError(
            f"the {adapter_name} adapter has no parameters: no attention layer matched {'/'.join(targets)}"
        )
    return unet


# ------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class TrajectorySettings:
    """What a round's trajectories were sampled with (their shard header); trajectories trained on together
    must agree on it."""

    steps: int
    eta: float
    guidance: float
    negative_prompt: str
    reduction: str

    @classmethod
    def from_header(cls, header: dict, where: str) -> "TrajectorySettings":
        try:
            return cls(
                steps=int(header["steps"]),
                eta=float(header["eta"]),
                guidance=float(header["guidance"]),
                negative_prompt=str(header.get("negative_prompt", "")),
                reduction=str(header["log_prob_reduction"]),
            )
        except KeyError as missing:
            raise TrainingError(f"trajectory shard of {where}: its header has no {missing} field") from None


def check_trajectory_settings(header: dict, sample_id: str, expected: TrajectorySettings) -> None:
    """Refuse a trajectory sampled with other settings than the rest of the round."""
    found = TrajectorySettings.from_header(header, sample_id)
    if found != expected:
        raise TrainingError(
            f"sample {sample_id}: sampled with {found}, other samples of the round with {expected}; "
            "train one sampling configuration at a time"
        )


# ------------------------------------------------------------------------------------------- the math
def trajectory_log_probs(
    unet,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond_embeds: torch.Tensor,
    uncond_embeds: torch.Tensor | None,
    *,
    guidance: float,
    eta: float,
    reduction: str,
    step_indices: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """log p(x_{t'} | x_t, c) of stored transitions, for N trajectories and a set of steps, in ONE UNet pass.

    latents [N, T+1, C, h, w]; timesteps [T]; cond_embeds [N, L, D]; uncond_embeds [1 or N, L, D] (or None
    without guidance). Returns [N, S] for the S chosen steps (all T by default). Each batch row carries the
    timestep its latent was made at (docs/method.md section 2). `scheduler` must have had
    `set_timesteps(steps)` with the sampling step count (it fixes t').
    """
    count, length = latents.shape[0], timesteps.shape[0]
    if latents.shape[1] != length + 1:
        raise ValueError(f"latents hold {latents.shape[1]} states for {length} timesteps; expected T + 1")
    steps = torch.arange(length) if step_indices is None else torch.as_tensor(step_indices, dtype=torch.long)
    device = cond_embeds.device
    chosen = steps.to(latents.device)
    current = latents[:, chosen].flatten(0, 1).to(device)  # [N*S, C, h, w], rows ordered (sample, step)
    following = latents[:, chosen + 1].flatten(0, 1).to(device)
    row_timesteps = timesteps.to(device)[steps.to(device)].repeat(count)
    cond = cond_embeds.repeat_interleave(len(steps), dim=0)
    uncond = None
    if uncond_embeds is not None:
        uncond = uncond_embeds.expand(count, *uncond_embeds.shape[1:]).repeat_interleave(len(steps), dim=0)
    noise = guided_noise_prediction(unet, current, row_timesteps, cond, uncond, guidance)
    out = ddim_step_with_log_prob(
        scheduler, noise, row_timesteps, current, eta, prev_latents=following, reduction=reduction
    )
    return out.log_prob.reshape(count, len(steps))


def step_chunks(length: int, steps_per_forward: int | None) -> list[list[int]]:
    """The step indices 0..length-1 in consecutive passes of `steps_per_forward` (None or 0: one pass)."""
    chunk = steps_per_forward or length
    return [list(range(begin, min(begin + chunk, length))) for begin in range(0, length, chunk)]


# ------------------------------------------------------------------------------------ a training start
@dataclass
class PolicyTraining:
    """What `start_policy_training` set up: the training session, the prepared policy with its frozen dtype,
    the pipeline's scheduler set to the sampling steps, and the likelihood settings of `log_probs`."""

    session: TrainingSession
    fingerprint: str  # what the checkpoints were written under: save it in every checkpoint's state
    policy: ModelWithDtype
    frozen_dtype: torch.dtype
    scheduler: object
    negative: torch.Tensor | None  # the sampling negative prompt's embedding; None without guidance
    guidance: float
    eta: float
    reduction: str

    def log_probs(self, latents, timesteps, cond, *, step_indices=None, model=None) -> torch.Tensor:
        """`trajectory_log_probs` under the policy (or `model`) with the round's sampling settings."""
        return trajectory_log_probs(
            self.policy if model is None else model, self.scheduler, latents, timesteps, cond, self.negative,
            guidance=self.guidance, eta=self.eta, reduction=self.reduction, step_indices=step_indices,
        )


def of_chosen_skin_types(items: list, skin_type_of: Mapping[str, int], types: Sequence[int], setting: str,
                         what: str, round_index: int) -> list:
    """The `items` (pairs or samples) whose source image is of one of the Fitzpatrick `types` (the stage's
    `setting`, `dpo.source_skin_types` or `rft.source_skin_types`), with one line saying how many remain; a clear
    error when none does."""
    kept = of_source_skin_types(items, skin_type_of, types)
    if not kept:
        raise TrainingError(f"{setting} = {list(types)} leaves none of the {len(items)} {what} of round {round_index}: "
                            f"their sources are of types {sorted({skin_type_of.get(i.source_id, -1) for i in items})} "
                            "(-1: unknown)")
    if PartialState().is_main_process:  # every process filters alike; one of them says so
        Console(stderr=True).print(f"{setting.split('.')[0]} round {round_index}: {len(kept)} of {len(items)} {what}, "
                                   f"those whose source is of skin type {list(types)}", highlight=False, markup=False,
                                   soft_wrap=True)
    return kept


def start_policy_training(
    accelerator: "Accelerator",
    pipe,
    config: "RunConfig",
    paths: "RunPaths",
    sampling: TrajectorySettings,
    *,
    stage: str,
    adapter_name: str,
    round_index: int,
    total_steps: int,
    training_data: str,
    guidance: float | None = None,
    warmup_steps: int = 0,
    init_lora: Path | None = None,
) -> PolicyTraining:
    """The common start of a trainer on stored trajectories (`stage` "dpo" or "rft", whose config section gives
    lora_rank, lora_alpha, lr, weight_decay, use_8bit_adam, lr_scheduler, log_with and log_prob_reduction):
    the policy UNet (`prepare_policy_unet`), frozen weights and text encoder in the mixed-precision dtype,
    `session.start_training` (with the section's `average_from`) with checkpoints in `checkpoints/<stage>/round-<k>/`
    and logs in `logs/<stage>/round-<k>/`, the scheduler set to the sampling steps, and the negative prompt's
    embedding.
    `guidance` None: the guidance the trajectories were sampled with.

    `training_data` is a digest of what the stage trains on (its pairs, or its samples and weights). With the
    stage's settings, the policy and the LoRA it continues, it forms the fingerprint the checkpoints carry.
    Checkpoints written under anything else (another seed, learning rate, new pairs) are moved aside to
    `round-<k>.other-settings/` and the round trains from the start: resuming them would hand back the earlier
    run's LoRA as this one's."""
    section = getattr(config, stage)
    guidance = sampling.guidance if guidance is None else guidance
    checkpoint_dir = paths.checkpoints(stage) / f"round-{round_index}"
    fingerprint = settings_digest({
        # not the knobs that change only when checkpoints are written, what is logged, or memory (steps_per_forward)
        "settings": digest_values(stage, section.model_dump(mode="json", exclude={"checkpoint_every", "log_with",
                                                                                   "steps_per_forward"})),
        "round": round_index,
        "policy": getattr(pipe, "magic_model_hash", None),
        "continues": weights_digest(lora_weights_file(init_lora)).hex() if init_lora is not None else None,
        "guidance": guidance,
        "training_data": training_data,
    })
    log_dir = paths.logs / stage / f"round-{round_index}"
    swap = set_aside_other_checkpoints(accelerator, checkpoint_dir, fingerprint, logs=log_dir)
    if (swap.moved or swap.restored) and accelerator.is_main_process:
        said = [f"the checkpoints in {checkpoint_dir} were written with other settings or data; kept in "
                f"{swap.moved.name} (their metrics beside them)"] if swap.moved else []
        said.append(f"resuming the checkpoints of these settings set aside earlier in {swap.restored.name}"
                    if swap.restored else "training from the start")
        Console(stderr=True).print(f"{stage} round {round_index}: {', '.join(said)}",
                                   highlight=False, markup=False, soft_wrap=True)
    unet = prepare_policy_unet(pipe, section.lora_rank, section.lora_alpha, init_lora, adapter_name=adapter_name,
                               targets=section.lora_targets)
    frozen_dtype = weight_dtype(accelerator)
    freeze_to(unet, frozen_dtype)
    pipe.text_encoder.to(frozen_dtype)
    session = start_training(
        accelerator, unet, lr=section.lr, weight_decay=section.weight_decay, use_8bit=section.use_8bit_adam,
        lr_scheduler=section.lr_scheduler, total_steps=total_steps, warmup_steps=warmup_steps,
        checkpoint_dir=checkpoint_dir,
        log_dir=log_dir, log_with=section.log_with,
        run_name=f"{config.name}-{stage}-round-{round_index}", log_config=section.model_dump(mode="json"),
        average_from=section.average_from,
    )
    scheduler = pipe.scheduler
    scheduler.set_timesteps(sampling.steps, device=accelerator.device)
    negative = None
    if guidance > 1:
        with torch.no_grad():
            negative = embed_prompt_ids(pipe.text_encoder, tokenize_prompts(pipe.tokenizer, [sampling.negative_prompt]))
    return PolicyTraining(
        session, fingerprint, ModelWithDtype(session.model, frozen_dtype), frozen_dtype, scheduler, negative,
        guidance=guidance, eta=sampling.eta, reduction=section.log_prob_reduction,
    )
