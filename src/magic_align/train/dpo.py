"""MAGIC-DPO: per-step DPO on the stored denoising trajectories (method.md sections 4 and 5).

The policy is the preliminary model, i.e. the base model with the run's textual-inversion tokens and its
preliminary LoRA *fused into the UNet weights* (never dropped: pitfall 1 of the authors' code), plus a fresh
trainable LoRA (`dpo.lora_rank`, `dpo.lora_alpha`, to_q/to_k/to_v/to_out.0 of every attention). Its B
matrices start at zero, so at step 0 the policy is exactly the preliminary model.

The reference of the loss is, by default (`dpo.reference = "initial"`), the model DPO starts from:

- in round 0 the trajectories were sampled by that very model, so its log-probs are the ones the sampler
  stored; no second UNet is held or run (pitfall 4);
- in later rounds the trajectories come from the round's current policy, so the initial model's log-probs
  are recomputed once per sample with the DPO adapter disabled (and cached);
- `dpo.reference = "sampling"` uses the stored log-probs in every round (the reference is then the policy
  that sampled the round: the online variant that worked best in the demo prototype);
- `dpo.recompute_reference = true` always recomputes them (trajectories sampled by some other policy);
- under `dpo.mixed_precision = "bf16"` (or fp16) they are recomputed too, once per sample under the same autocast
  as the policy, so the first step's log-ratio is 0 (the stored ones carry the sampler's precision).

Each pair's two trajectories are scored in batched UNet passes (`steps_per_forward` denoising steps of both
samples per pass; each row carries its own timestep: `trajectory_likelihood.trajectory_log_probs`), the log-prob
of the stored next latent comes from the shared `ddim_step_with_log_prob(prev_latents=...)`, and the per-step
losses of all `pairs_per_step` pairs are accumulated before one AdamW update. That is the same gradient as one step at a time (method.md 4).

`dpo.objective = "denoising"` is Diffusion-DPO instead (Wallace et al. 2024): the preference acts on the noise-
prediction errors of each pair's two final latents, re-noised together to a random timestep the sampler visited,
against the same errors of the initial model (the DPO adapter off); four UNet rows per pair instead of 2T.

Only informative pairs are trained on: a pair both samples of which win, or both lose, has h = (0, 0) and no
gradient (`dpo_loss.preference_signs`), so spending UNet passes on it would only dilute the batch.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from magic_align.config import RunConfig
from magic_align.diffusion.lora import adapters_disabled
from magic_align.run import RunPaths, prepare_run
from magic_align.train.dpo_loss import denoising_dpo_loss, dpo_loss, preference_signs
from magic_align.train.loop import (
    ModelWithDtype,
    TrainingError,
    balanced_batch_indices,
    batch_indices,
    make_accelerator,
    optimizer_step,
    step_seed,
    training_progress,
)
from magic_align.train.trajectory_likelihood import (
    TrajectorySettings,
    check_trajectory_settings,
    start_policy_training,
    step_chunks,
)

if TYPE_CHECKING:
    from magic_align.ledger import Ledger

ADAPTER_NAME = "dpo"


# ------------------------------------------------------------------------------------------------ pairs
@dataclass(frozen=True)
class PairExample:
    """One informative pair: its two sample ids and their signs h."""

    pair_id: str
    sample_ids: tuple[str, str]
    signs: tuple[int, int]
    condition: str = ""  # the target condition of the pair's unit


def informative_pairs(ledger: "Ledger", paths: RunPaths, round_index: int) -> tuple[list[PairExample], int]:
    """The pairs of `round_index` with a preference, and how many ties (both win / both lose) were left out."""
    examples: list[PairExample] = []
    ties = 0
    for pair in ledger.pairs(round_index):
        signs = preference_signs(pair.outcome_a, pair.outcome_b)
        if signs == (0, 0):
            ties += 1
            continue
        condition = ""
        for sample_id in (pair.sample_a, pair.sample_b):
            sample = ledger.sample(sample_id)
            if sample is None:
                raise TrainingError(f"pair {pair.pair_id} (round {round_index}) names sample {sample_id!r}, "
                                    f"which is not in the ledger {paths.ledger}")
            if sample.shard is None:
                raise TrainingError(
                    f"sample {sample_id} of pair {pair.pair_id} has no stored trajectory (shard is empty in the "
                    "ledger); DPO needs the trajectories: rerun `magic sample` for this round"
                )
            condition = sample.target_label
        examples.append(PairExample(pair.pair_id, (pair.sample_a, pair.sample_b), signs, condition))
    return examples, ties


def pair_epoch_seed(seed: int) -> Callable[[int], int]:
    """`epoch_seed` of DPO's pair schedule (`loop.batch_indices`): pass `epoch` over the pairs is permuted with
    seed * 1_000_003 + epoch (kept as it was, so existing checkpoints resume on the same pairs)."""
    return lambda epoch: seed * 1_000_003 + epoch


# ------------------------------------------------------------------------------------------ the model
def save_dpo_lora(unet, folder: Path) -> Path:
    """The DPO adapter in the diffusers LoRA format (`folder/pytorch_lora_weights.safetensors`, rank and
    alpha in its metadata), written atomically; loads with plain `load_lora_weights`."""
    from magic_align.diffusion.lora import save_lora

    return save_lora(unet, Path(folder), adapter_name=ADAPTER_NAME)


# ------------------------------------------------------------------------------------------- inputs
def round_output(paths: RunPaths, round_index: int) -> Path:
    return paths.aligned / "dpo" / f"round-{round_index}"


def load_pair(store, example: PairExample, expected: TrajectorySettings):
    """Both trajectories of a pair (a `TrajectoryBatch` of 2), checked to share the schedule and settings."""
    from magic_align.diffusion.trajectories import TrajectoryError

    try:
        batch = store.get(list(example.sample_ids))
    except TrajectoryError as error:
        raise TrainingError(f"pair {example.pair_id}: {error}") from None
    if not torch.equal(batch.timesteps[0], batch.timesteps[1]):
        raise TrainingError(f"pair {example.pair_id}: its samples were made at different timesteps "
                            f"({batch.timesteps[0].tolist()} vs {batch.timesteps[1].tolist()})")
    for sample_id, header in zip(example.sample_ids, batch.headers):
        check_trajectory_settings(header, sample_id, expected)
    return batch


# ----------------------------------------------------------------------------------------- entry point
def run_dpo(config: RunConfig, round_index: int = 0, init_lora: Path | None = None) -> Path:
    """Train the DPO LoRA on the pairs of `round_index` and return the folder of the LoRA it wrote.

    The result goes to `aligned/dpo/round-<k>/` and, for the last round (`config.rounds - 1`), also to
    `aligned/dpo/`: the DPO adapter alone, which stacks on the run's tokens and preliminary LoRA (what
    `load_run_policy(..., extra_lora=...)` does). A rerun resumes from the latest checkpoint in
    `checkpoints/dpo/round-<k>/`. `init_lora` continues an earlier DPO LoRA (the previous round's).
    """
    from magic_align.diffusion.loading import load_run_policy
    from magic_align.diffusion.sampler import embed_prompt_ids
    from magic_align.diffusion.trajectories import TrajectoryStore
    from magic_align.ledger import Ledger

    settings = config.dpo
    accelerator = make_accelerator(mixed_precision=settings.mixed_precision, seed=settings.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    if settings.pairs_per_step % world:
        raise TrainingError(
            f"dpo.pairs_per_step = {settings.pairs_per_step} does not split over {world} processes; make it a "
            "multiple of the number of processes (the global batch is pairs_per_step pairs)"
        )
    if accelerator.is_main_process:
        prepare_run(config)
    accelerator.wait_for_everyone()
    paths = RunPaths(config.run_dir)

    examples, ties = informative_pairs(Ledger(paths.ledger), paths, round_index)
    if not examples:
        if not ties:
            raise TrainingError(f"round {round_index} has no pairs in {paths.ledger}; run `magic pairs` first")
        raise TrainingError(
            f"round {round_index} has no informative pair: all {ties} pairs tied (both samples won or both lost), so "
            "DPO has nothing to learn from; to get pairs whose samples differ, sample more units or more samples per "
            "unit (sample.num_sources, sample.samples_per_unit), sample at a higher strength (sample.strength), or "
            "use a rule with a smaller margin (pairs.rule = \"margin\"); `magic pairs` shows the score of each pair"
        )
    store = TrajectoryStore(paths.trajectories(round_index))
    first_id = examples[0].sample_ids[0]
    if first_id not in store:
        raise TrainingError(f"no trajectory shard in {paths.trajectories(round_index)} holds sample {first_id}")
    sampling = TrajectorySettings.from_header(store.header(first_id), first_id)
    guidance = sampling.guidance if settings.guidance is None else settings.guidance
    header = store.header(first_id)
    # Stored log-probs are the initial model's only if the initial model sampled (no aligned LoRA stacked).
    sampled_by_initial = round_index == 0 and not header.get("policy_lora")
    recompute = settings.recompute_reference or (settings.reference == "initial" and not sampled_by_initial)
    if settings.objective == "trajectory" and settings.mixed_precision != "no" and not recompute:
        # The policy's log-probs come out of the UNet under bf16/fp16 autocast, the stored ones from the sampler's
        # precision: compared as they are, the first step's log-ratio would be the rounding gap, not 0. The
        # reference is recomputed once per sample under the same autocast, where it equals the starting policy.
        if settings.reference == "sampling" and not sampled_by_initial:
            raise TrainingError(
                f"dpo.mixed_precision = {settings.mixed_precision!r} with dpo.reference = 'sampling' in round "
                f"{round_index}: the sampling policy's stored log-probs were computed in another precision and that "
                "policy cannot be rerun here; set dpo.mixed_precision = 'no' or dpo.reference = 'initial'"
            )
        recompute = True
    # the denoising objective runs the initial model itself, so the stored log-probs need not match it
    if settings.objective == "trajectory" and not recompute:
        if sampling.reduction != settings.log_prob_reduction:
            raise TrainingError(
                f"the stored log-probs use reduction {sampling.reduction!r} but dpo.log_prob_reduction = "
                f"{settings.log_prob_reduction!r}; set them equal or set dpo.recompute_reference = true"
            )
        if not math.isclose(guidance, sampling.guidance):
            raise TrainingError(
                f"dpo.guidance = {guidance} differs from the sampling guidance {sampling.guidance}, so the stored "
                "log-probs are not the reference's; leave dpo.guidance unset or set dpo.recompute_reference = true"
            )

    pipe = load_run_policy(config, paths, device=accelerator.device, dtype=torch.float32)
    stored_hash, current_hash = header.get("model_hash"), getattr(pipe, "magic_model_hash", None)
    stale = stored_hash and current_hash and stored_hash != current_hash
    if settings.objective == "trajectory" and not recompute and settings.reference == "initial" and stale:
        raise TrainingError(
            f"round {round_index} was sampled by model {stored_hash}, but the run's model is now {current_hash} (the "
            "base model, tokens or preliminary LoRA changed since), so the stored log-probs are not the reference's: "
            "sample the round again, or set dpo.recompute_reference = true"
        )
    training = start_policy_training(
        accelerator, pipe, config, paths, sampling, stage="dpo", adapter_name=ADAPTER_NAME, round_index=round_index,
        total_steps=settings.iterations, guidance=guidance, warmup_steps=settings.lr_warmup_steps, init_lora=init_lora,
    )
    session = training.session
    unet, unwrapped, parameters = session.model, session.unwrapped, session.parameters
    optimizer, lr_scheduler, checkpoints, logger = session.optimizer, session.lr_scheduler, session.checkpoints, session.logger
    reference_cache: dict[str, torch.Tensor] = {}
    per_process = settings.pairs_per_step // world
    clip = settings.clip or None  # 0 disables the clamp (TOML has no null)

    def reference_log_probs(example: PairExample, batch, cond: torch.Tensor) -> torch.Tensor:
        """[2, T]: the stored log-probs, or the initial model's, recomputed once with the DPO adapter off."""
        if not recompute:
            return batch.log_probs
        missing = [i for i, sample_id in enumerate(example.sample_ids) if sample_id not in reference_cache]
        if missing:
            with adapters_disabled(unwrapped), torch.no_grad(), accelerator.autocast():
                values = training.log_probs(
                    batch.latents[missing].to(accelerator.device), batch.timesteps[0], cond[missing],
                    model=ModelWithDtype(unwrapped, training.frozen_dtype),
                )
            for row, i in enumerate(missing):
                reference_cache[example.sample_ids[i]] = values[row].float().cpu()
        return torch.stack([reference_cache[sample_id] for sample_id in example.sample_ids])

    by_condition: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_condition.setdefault(example.condition, []).append(index)
    groups = [by_condition[condition] for condition in sorted(by_condition)]

    if settings.objective == "denoising":
        from diffusers import DDPMScheduler

        from magic_align.train.finetune import noised_with_target, prediction_error

        noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def trajectory_step(chosen: list[int]):
        """The per-step DPO loss of the chosen pairs, backpropagated; returns (loss, stats) over all processes."""
        policy_rows, reference_rows, sign_rows = [], [], []
        for position, pair_index in enumerate(chosen):
            example = examples[pair_index]
            batch = load_pair(store, example, sampling)
            latents = batch.latents.to(accelerator.device)
            timesteps = batch.timesteps[0]
            with torch.no_grad():
                cond = embed_prompt_ids(pipe.text_encoder, batch.prompt_ids)
            reference = reference_log_probs(example, batch, cond).to(accelerator.device)  # [2, T]
            signs = torch.tensor([example.signs], device=accelerator.device)
            length = timesteps.shape[0]
            values = []
            for steps in step_chunks(length, settings.steps_per_forward):
                last = position == len(chosen) - 1 and steps[-1] == length - 1
                # Only the last backward of the optimizer step all-reduces the gradients under DDP.
                with (nullcontext() if last else accelerator.no_sync(unet)):
                    with accelerator.autocast():
                        log_probs = training.log_probs(latents, timesteps, cond, step_indices=steps)  # [2, S]
                        loss, _ = dpo_loss(log_probs[None], reference[None, :, steps], signs, settings.beta, clip)
                    # Mean over the steps of a pair and over the pairs of the global batch (DDP averages ranks).
                    accelerator.backward(loss * (len(steps) / length) / per_process)
                values.append(log_probs.detach().float())
            policy_rows.append(torch.cat(values, dim=1))
            reference_rows.append(reference.float())
            sign_rows.append(signs[0])
        gathered = [accelerator.gather(torch.stack(rows)) for rows in (policy_rows, reference_rows, sign_rows)]
        return dpo_loss(*gathered, settings.beta, clip)

    def denoising_step(chosen: list[int], step: int):
        """Diffusion-DPO on the chosen pairs' final latents, backpropagated; returns (loss, stats) over all
        processes. Both samples of a pair get the same noise and timestep, so their errors compare fairly."""
        pairs = [load_pair(store, examples[index], sampling) for index in chosen]
        final = torch.stack([batch.latents[:, -1] for batch in pairs]).to(accelerator.device)  # [P, 2, C, h, w]
        prompt_ids = torch.cat([batch.prompt_ids for batch in pairs]).to(accelerator.device)  # [2P, L]
        signs = torch.tensor([examples[index].signs for index in chosen], device=accelerator.device)
        # One draw per pair, seeded by (step, pair): the same whichever process takes the pair, so N processes
        # train exactly as one. Timesteps only up to where the I2I sampler starts: it never denoises from higher.
        noises, timesteps = [], []
        for index, batch in zip(chosen, pairs):
            generator = torch.Generator().manual_seed(step_seed(settings.seed, "dpo-denoising", step, index))
            noises.append(torch.randn(final.shape[2:], generator=generator))
            timesteps.append(int(torch.randint(0, int(batch.timesteps[0].max()) + 1, (1,), generator=generator)))
        noise = torch.stack(noises)[:, None].expand_as(final)
        row_timesteps = torch.tensor(timesteps).repeat_interleave(2).to(accelerator.device)
        clean = final.flatten(0, 1)
        noisy, target = noised_with_target(noise_scheduler, clean, noise.to(clean).flatten(0, 1), row_timesteps)
        noisy = noisy.to(training.frozen_dtype)
        with torch.no_grad():
            cond = embed_prompt_ids(pipe.text_encoder, prompt_ids)
            with adapters_disabled(unwrapped), accelerator.autocast():
                reference = unwrapped(noisy, row_timesteps, encoder_hidden_states=cond).sample
            reference_error = prediction_error(reference, target).reshape(-1, 2)
        with accelerator.autocast():
            prediction = unet(noisy, row_timesteps, encoder_hidden_states=cond).sample
            error = prediction_error(prediction, target).reshape(-1, 2)
            loss, _ = denoising_dpo_loss(error, reference_error, signs, settings.denoising_beta)
        accelerator.backward(loss)  # the mean over this process's pairs; DDP averages the processes
        gathered = [accelerator.gather(rows) for rows in (error.detach().float(), reference_error, signs)]
        return denoising_dpo_loss(*gathered, settings.denoising_beta)

    unet.train()
    progress = training_progress(accelerator, f"dpo round {round_index}", total=settings.iterations,
                                 start=session.start_step, checkpoints=checkpoints)
    for step in progress.steps(range(session.start_step, settings.iterations)):
        if settings.balance == "condition":
            chosen = balanced_batch_indices(groups, settings.pairs_per_step, step, settings.seed)[rank::world]
        else:
            chosen = batch_indices(len(examples), settings.pairs_per_step, step, pair_epoch_seed(settings.seed))[rank::world]
        if settings.objective == "denoising":
            loss_value, stats = denoising_step(chosen, step)
        else:
            loss_value, stats = trajectory_step(chosen)
        grad_norm = optimizer_step(accelerator, optimizer, lr_scheduler, parameters, settings.grad_clip)
        done = step + 1
        logger.log(done, {"loss": float(loss_value), **stats.as_dict(), "grad_norm": grad_norm,
                          "lr": lr_scheduler.get_last_lr()[0]})
        # The last step is checkpointed too, so rerunning a finished round trains nothing again.
        if done % settings.checkpoint_every == 0 or done == settings.iterations:
            checkpoints.save(done, {"round": round_index, "pairs": len(examples), "ties_skipped": ties})
        progress.advance(loss=float(loss_value))
    logger.close()

    output = round_output(paths, round_index)
    final = round_index == config.rounds - 1
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_dpo_lora(unwrapped, output)
        if final:
            save_dpo_lora(unwrapped, paths.aligned / "dpo")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return paths.aligned / "dpo" if final else output


# ---------------------------------------------------------------------------------------------- rounds
def run_rounds(config: RunConfig, console=None) -> Path:
    """`config.rounds` rounds of DPO: round 0 trains on the pairs already built (sample, judge and pairs ran
    before); each later round k samples with the current policy (preliminary model + round k-1's DPO LoRA),
    judges, builds pairs, and continues training that LoRA. Returns the final LoRA folder (`aligned/dpo`).

    Reference per round: see the module docstring (`dpo.reference`). With the default "initial", rounds after
    the first recompute the reference log-probs with the DPO adapter off, i.e. the preliminary model; the
    log-probs the sampler stored in round k are those of the round-k policy and serve as the reference only
    with `dpo.reference = "sampling"`.
    """
    from magic_align.feedback import run_pairs
    from magic_align.judge import run_judge
    from magic_align.sample import run_sample

    paths = RunPaths(config.run_dir)
    output = paths.aligned / "dpo"
    for round_index in range(config.rounds):
        previous = round_output(paths, round_index - 1) if round_index else None
        if round_index:
            run_sample(config, round_index=round_index, policy_lora=previous)
            run_judge(config, round_index=round_index, console=console)
            run_pairs(config, round_index=round_index)
        output = run_dpo(config, round_index=round_index, init_lora=previous)
    return output
