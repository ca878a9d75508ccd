"""MAGIC-DPO: DPO on the stored denoising trajectories of preference pairs (docs/method.md sections 6 and 7).

The policy is the preliminary model (the base model with the run's textual-inversion tokens and its preliminary
LoRA *fused into the UNet weights*, never dropped) plus a fresh trainable LoRA (adapter "dpo"), whose B matrices
start at zero, so at step 0 the policy is exactly the preliminary model. That model is also the reference.

`dpo.objective` chooses the step function, once, before the loop:

- `trajectory_dpo_step` ("trajectory", the paper): the per-step DPO loss on the log-probs of each pair's stored
  transitions, `steps_per_forward` denoising steps of both samples per UNet pass (each row at its own
  timestep), all `pairs_per_step` pairs accumulated before one AdamW update, which is the same gradient as one
  step at a time. The reference log-probs are the ones the sampler stored when they are the preliminary model's
  (`stored_log_probs_are_reference`: round 0, fp32): no second UNet is held or run. Otherwise (later rounds,
  bf16 or fp16 training, where the policy's log-probs carry the low precision) they are recomputed once per
  sample by the same UNet with the DPO adapter off, under the same autocast, and cached.
- `diffusion_dpo_step` ("denoising", Diffusion-DPO, Wallace et al. 2024): the preference acts on the noise-
  prediction errors of each pair's two final latents, re-noised together to a random timestep the sampler
  visited, against the same errors of the preliminary model (the DPO adapter off); four UNet rows per pair.
  `reference_weight` > 0 adds the distance of the policy's predictions from that model's on the same draws, a KL
  penalty: the sigmoid of DPO stops pulling once a pair is won, and nothing else holds the policy near the model
  it started from. `preservation_weight` > 0 adds the same distance on the samples of the units where every sample
  won (`preserved_samples`), which give no pair: the LoRA serves every condition, and without it the pairs of some
  conditions change what the model already drew right for others.

Only informative pairs are trained on: a pair both samples of which win, or both lose, has h = (0, 0) and no
gradient (`dpo_loss.preference_signs`), so spending UNet passes on it would only dilute the batch.
The output names its objective: `aligned/dpo/dpo.json` (`SUMMARY_FILE`) holds "objective".
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from magic_align.config import DPOConfig, RunConfig
from magic_align.data.split import run_split
from magic_align.diffusion.loading import load_run_policy
from magic_align.diffusion.lora import adapters_disabled, save_lora
from magic_align.diffusion.sampler import embed_prompt_ids
from magic_align.diffusion.trajectories import TrajectoryError, TrajectoryStore
from magic_align.feedback import run_pairs
from magic_align.judge import run_judge
from magic_align.ledger import Ledger
from magic_align.run import RunPaths, atomic_write_text, prepare_run
from magic_align.sample import run_sample, source_skin_types
from magic_align.train.diffusion_losses import noised_with_target, prediction_error, weighted_error
from magic_align.train.dpo_loss import controlled_signs, denoising_dpo_loss, dpo_loss, preference_signs
from magic_align.train.session import (
    ModelWithDtype,
    TrainingError,
    batch_indices,
    make_accelerator,
    optimizer_step,
    settings_digest,
    step_seed,
    training_progress,
)
from magic_align.train.trajectory_likelihood import (
    PolicyTraining,
    TrajectorySettings,
    check_trajectory_settings,
    of_chosen_skin_types,
    start_policy_training,
    step_chunks,
)

ADAPTER_NAME = "dpo"
SUMMARY_FILE = "dpo.json"


# ------------------------------------------------------------------------------------------------ pairs
@dataclass(frozen=True)
class PairExample:
    """One informative pair: its two sample ids and their signs h."""

    pair_id: str
    sample_ids: tuple[str, str]
    signs: tuple[int, int]
    condition: str = ""  # the target condition of the pair's unit
    source_id: str = ""  # the source image of the pair's unit


def informative_pairs(ledger: "Ledger", paths: RunPaths, round_index: int, control: str = "none",
                      seed: int = 0) -> tuple[list[PairExample], int]:
    """The pairs of `round_index` with a preference (swapped as the negative `control` asks), and how many ties
    (both win / both lose) were left out."""
    examples: list[PairExample] = []
    ties = 0
    for pair in ledger.pairs(round_index):
        signs = controlled_signs(preference_signs(pair.outcome_a, pair.outcome_b), control, seed, pair.pair_id)
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
            condition, source_id = sample.target_label, sample.source_id
        examples.append(PairExample(pair.pair_id, (pair.sample_a, pair.sample_b), signs, condition, source_id))
    return examples, ties


def preserved_samples(ledger: "Ledger", round_index: int) -> list[str]:
    """The samples of the units of `round_index` in which every sample won (all their pairs are both-win ties):
    what the model already draws as the judge asks, which the pairs never show DPO."""
    pairs_of_unit: dict[str, list] = {}
    for pair in ledger.pairs(round_index):
        pairs_of_unit.setdefault(pair.unit_id, []).append(pair)
    samples = []
    for unit_pairs in pairs_of_unit.values():
        if all(pair.outcome_a == 1 and pair.outcome_b == 1 for pair in unit_pairs):
            samples.extend(sorted({sample_id for pair in unit_pairs for sample_id in (pair.sample_a, pair.sample_b)}))
    return samples


def pair_epoch_seed(seed: int) -> Callable[[int], int]:
    """`epoch_seed` of DPO's pair schedule (`session.batch_indices`): pass `epoch` over the pairs is permuted with
    seed * 1_000_003 + epoch (kept as it was, so existing checkpoints resume on the same pairs)."""
    return lambda epoch: seed * 1_000_003 + epoch


# ------------------------------------------------------------------------------------------ the model
def save_dpo_lora(unet, folder: Path) -> Path:
    """The DPO adapter in the diffusers LoRA format (`folder/pytorch_lora_weights.safetensors`, rank and
    alpha in its metadata), written atomically; loads with plain `load_lora_weights`."""
    return save_lora(unet, Path(folder), adapter_name=ADAPTER_NAME)


# ------------------------------------------------------------------------------------------- inputs
def round_output(paths: RunPaths, round_index: int) -> Path:
    return paths.aligned / "dpo" / f"round-{round_index}"


def load_pair(store, example: PairExample, expected: TrajectorySettings):
    """Both trajectories of a pair (a `TrajectoryBatch` of 2), checked to share the schedule and settings."""
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


# -------------------------------------------------------------------------------------------- the round
def training_pairs(paths: RunPaths, round_index: int, settings: DPOConfig,
                   skin_type_of: Mapping[str, int] | None = None) -> tuple[list[PairExample], int]:
    """The informative pairs of the round (of the sources `dpo.source_skin_types` names, by `skin_type_of`: source
    id -> Fitzpatrick type) and the number of ties left out; a clear error when there are none."""
    examples, ties = informative_pairs(Ledger(paths.ledger), paths, round_index, settings.preference_control,
                                       settings.seed)
    if examples and settings.source_skin_types is not None:
        examples = of_chosen_skin_types(examples, skin_type_of or {}, settings.source_skin_types,
                                        "dpo.source_skin_types", "informative pairs", round_index)
    if examples:
        return examples, ties
    if not ties:
        raise TrainingError(f"round {round_index} has no pairs in {paths.ledger}; run `magic pairs` first")
    raise TrainingError(
        f"round {round_index} has no informative pair: all {ties} pairs tied (both samples won or both lost), so "
        "DPO has nothing to learn from; to get pairs whose samples differ, sample more units or more samples per "
        "unit (sample.num_sources, sample.samples_per_unit), sample at a higher strength (sample.strength), or "
        "use a rule with a smaller margin (pairs.rule = \"margin\"); `magic pairs` shows the score of each pair"
    )


def round_trajectories(paths: RunPaths, round_index: int, examples: list[PairExample]):
    """The round's TrajectoryStore, the shard header of its first pair's sample, and the sampling settings."""
    store = TrajectoryStore(paths.trajectories(round_index))
    first_id = examples[0].sample_ids[0]
    if first_id not in store:
        raise TrainingError(f"no trajectory shard in {paths.trajectories(round_index)} holds sample {first_id}")
    header = store.header(first_id)
    return store, header, TrajectorySettings.from_header(header, first_id)


def stored_log_probs_are_reference(settings: DPOConfig, round_index: int, header: dict) -> bool:
    """Whether the log-probs the sampler stored are the reference's as the trajectory objective computes them:
    the round was sampled by the preliminary model itself (round 0, no aligned LoRA stacked), sampling ran in
    fp32 (shards from before the header recorded it did) and training runs in fp32. Under bf16/fp16 on either
    side the two log-probs carry different rounding, so the first step's log-ratio would be the rounding gap,
    not 0: the reference is recomputed."""
    return (round_index == 0 and not header.get("policy_lora") and settings.mixed_precision == "no"
            and header.get("model_dtype", "float32") == "float32")


def check_stored_reference(settings: DPOConfig, sampling: TrajectorySettings, header: dict, model_hash: str | None,
                           round_index: int) -> None:
    """Refuse stored log-probs that cannot be the reference: another reduction, or another model since sampling."""
    if sampling.reduction != settings.log_prob_reduction:
        raise TrainingError(
            f"the stored log-probs use reduction {sampling.reduction!r} but dpo.log_prob_reduction = "
            f"{settings.log_prob_reduction!r}; set them equal"
        )
    stored_hash = header.get("model_hash")
    if stored_hash and model_hash and stored_hash != model_hash:
        raise TrainingError(
            f"round {round_index} was sampled by model {stored_hash}, but the run's model is now {model_hash} (the "
            "base model, tokens or preliminary LoRA changed since), so the stored log-probs are not the reference's: "
            "sample the round again"
        )


@dataclass
class PairTraining:
    """What a DPO step reads: the policy being trained, the round's pairs and trajectories, and the settings."""

    accelerator: object
    training: PolicyTraining
    text_encoder: object
    store: object  # the round's TrajectoryStore
    examples: list[PairExample]
    sampling: TrajectorySettings
    settings: DPOConfig
    stored_reference: bool  # the stored log-probs are the reference's (else recomputed, once per sample)
    noise_scheduler: object = None  # DDPM noising of the denoising objective
    preserved: list[str] = field(default_factory=list)  # `preserved_samples`, when dpo.preservation_weight > 0
    reference_cache: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def per_process(self) -> int:
        return self.settings.pairs_per_step // self.accelerator.num_processes


def reference_log_probs(run: PairTraining, example: PairExample, batch, cond: torch.Tensor) -> torch.Tensor:
    """[2, T]: the stored log-probs, or the preliminary model's, recomputed once with the DPO adapter off."""
    if run.stored_reference:
        return batch.log_probs
    accelerator, training = run.accelerator, run.training
    missing = [i for i, sample_id in enumerate(example.sample_ids) if sample_id not in run.reference_cache]
    if missing:
        unwrapped = training.session.unwrapped
        with adapters_disabled(unwrapped), torch.no_grad(), accelerator.autocast():
            values = training.log_probs(
                batch.latents[missing].to(accelerator.device), batch.timesteps[0], cond[missing],
                model=ModelWithDtype(unwrapped, training.frozen_dtype),
            )
        for row, i in enumerate(missing):
            run.reference_cache[example.sample_ids[i]] = values[row].float().cpu()
    return torch.stack([run.reference_cache[sample_id] for sample_id in example.sample_ids])


# ------------------------------------------------------------------------------------ the step functions
def trajectory_dpo_step(run: PairTraining, chosen: list[int], step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """The per-step DPO loss of the chosen pairs, backpropagated; returns (loss, what to log) over all processes."""
    accelerator, training, settings = run.accelerator, run.training, run.settings
    policy_rows, reference_rows, sign_rows = [], [], []
    for position, pair_index in enumerate(chosen):
        example = run.examples[pair_index]
        batch = load_pair(run.store, example, run.sampling)
        latents = batch.latents.to(accelerator.device)
        timesteps = batch.timesteps[0]
        with torch.no_grad():
            cond = embed_prompt_ids(run.text_encoder, batch.prompt_ids)
        reference = reference_log_probs(run, example, batch, cond).to(accelerator.device)  # [2, T]
        signs = torch.tensor([example.signs], device=accelerator.device)
        length = timesteps.shape[0]
        values = []
        for steps in step_chunks(length, settings.steps_per_forward):
            last = position == len(chosen) - 1 and steps[-1] == length - 1
            # Only the last backward of the optimizer step all-reduces the gradients under DDP.
            with (nullcontext() if last else accelerator.no_sync(training.session.model)):
                with accelerator.autocast():
                    log_probs = training.log_probs(latents, timesteps, cond, step_indices=steps)  # [2, S]
                    loss, _ = dpo_loss(log_probs[None], reference[None, :, steps], signs, settings.beta, settings.clip)
                # Mean over the steps of a pair and over the pairs of the global batch (DDP averages ranks).
                accelerator.backward(loss * (len(steps) / length) / run.per_process)
            values.append(log_probs.detach().float())
        policy_rows.append(torch.cat(values, dim=1))
        reference_rows.append(reference.float())
        sign_rows.append(signs[0])
    gathered = [accelerator.gather(torch.stack(rows)) for rows in (policy_rows, reference_rows, sign_rows)]
    loss, stats = dpo_loss(*gathered, settings.beta, settings.clip)
    return loss, stats.as_dict()


def diffusion_dpo_step(run: PairTraining, chosen: list[int], step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Diffusion-DPO on the chosen pairs' final latents (plus `reference_weight` x the policy's distance from the
    initial model on the same draws, and `preservation_weight` x that distance on the preserved samples),
    backpropagated; returns (loss, what to log) over all processes. Both samples of a pair get the same noise and
    timestep, so their errors compare fairly."""
    accelerator, training, settings = run.accelerator, run.training, run.settings
    pairs = [load_pair(run.store, run.examples[index], run.sampling) for index in chosen]
    final = torch.stack([batch.latents[:, -1] for batch in pairs]).to(accelerator.device)  # [P, 2, C, h, w]
    prompt_ids = torch.cat([batch.prompt_ids for batch in pairs]).to(accelerator.device)  # [2P, L]
    signs = torch.tensor([run.examples[index].signs for index in chosen], device=accelerator.device)
    # One draw per pair, seeded by (step, pair): the same whichever process takes the pair, so N processes
    # train exactly as one. Timesteps only up to where the I2I sampler starts: it never denoises from higher.
    noises, timesteps = [], []
    for index, batch in zip(chosen, pairs):
        generator = torch.Generator().manual_seed(step_seed(settings.seed, "dpo-denoising", step, index))
        noises.append(torch.randn(final.shape[2:], generator=generator))
        timesteps.append(renoising_timestep(batch.timesteps[0], settings.timestep_range, generator))
    noise = torch.stack(noises)[:, None].expand_as(final)
    row_timesteps = torch.tensor(timesteps).repeat_interleave(2).to(accelerator.device)
    clean = final.flatten(0, 1)
    noisy, target = noised_with_target(run.noise_scheduler, clean, noise.to(clean).flatten(0, 1), row_timesteps)
    with torch.no_grad():
        cond = embed_prompt_ids(run.text_encoder, prompt_ids)
    prediction, reference = policy_and_reference(run, noisy, row_timesteps, cond)
    reference_error = prediction_error(reference, target).reshape(-1, 2)
    error = prediction_error(prediction, target).reshape(-1, 2)
    loss, _ = denoising_dpo_loss(error, reference_error, signs, settings.denoising_beta, settings.winner_penalty)
    # the penalties: (name, weight, distance from the preliminary model's predictions), those switched on
    penalties = []
    if settings.reference_weight > 0:
        penalties.append(("reference_distance", settings.reference_weight, weighted_error(prediction, reference)))
    if settings.preservation_weight > 0:
        penalties.append(("preservation_distance", settings.preservation_weight, preservation_distance(run, step)))
    accelerator.backward(loss + sum(weight * distance for _, weight, distance in penalties))
    gathered = [accelerator.gather(rows) for rows in (error.detach().float(), reference_error, signs)]
    preference_loss, stats = denoising_dpo_loss(*gathered, settings.denoising_beta, settings.winner_penalty)
    logged = stats.as_dict()
    if not penalties:
        return preference_loss, logged
    logged["preference_loss"] = float(preference_loss)
    for name, _, distance in penalties:
        logged[name] = float(accelerator.reduce(distance.detach().float(), reduction="mean"))
    total = logged["preference_loss"] + sum(weight * logged[name] for name, weight, _ in penalties)
    return torch.tensor(total), logged


def renoising_timestep(visited: torch.Tensor, timestep_range: tuple[float, float], generator: torch.Generator) -> int:
    """A timestep drawn uniformly within `timestep_range`, as fractions of the highest of the `visited` ones: only
    up to where the I2I sampler started, since it never denoises from higher."""
    low, high = (int(fraction * int(visited.max())) for fraction in timestep_range)
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def policy_and_reference(run: PairTraining, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor):
    """(the policy's noise predictions, with gradient; the preliminary model's, the DPO adapter off, without)."""
    accelerator, training = run.accelerator, run.training
    noisy = noisy.to(training.frozen_dtype)
    unwrapped = training.session.unwrapped
    with torch.no_grad(), adapters_disabled(unwrapped), accelerator.autocast():
        reference = unwrapped(noisy, timesteps, encoder_hidden_states=cond).sample
    with accelerator.autocast():
        prediction = training.session.model(noisy, timesteps, encoder_hidden_states=cond).sample
    return prediction, reference


def share_of_the_mean(values: torch.Tensor, count: int, processes: int) -> torch.Tensor:
    """This process's part of the mean of `count` values spread over `processes` (`values`: its share, possibly
    empty): scaled so that the mean over the processes, which DDP takes of the gradients and `reduce` of the logged
    values, is the mean over all `count`, however unevenly they split."""
    return values.sum() * processes / count


def preservation_distance(run: PairTraining, step: int) -> torch.Tensor:
    """The distance between the policy's and the preliminary model's noise predictions on
    `dpo.preservation_per_step` samples of `run.preserved` (at most all of them), each re-noised to its own timestep
    within `dpo.timestep_range`: this process's part of their mean (`share_of_the_mean`). Drawn by (seed, step), so
    N processes draw and train as one."""
    accelerator, settings = run.accelerator, run.settings
    generator = torch.Generator().manual_seed(step_seed(settings.seed, "dpo-preservation", step))
    count = min(settings.preservation_per_step, len(run.preserved))
    drawn = torch.randperm(len(run.preserved), generator=generator)[:count].tolist()
    sample_ids = [run.preserved[index] for index in drawn]
    batch = run.store.get(sample_ids)  # checked once before training (`training_preserved_samples`)
    clean = batch.latents[:, -1]
    noises, timesteps = [], []
    for visited in batch.timesteps:
        noises.append(torch.randn(clean.shape[1:], generator=generator))
        timesteps.append(renoising_timestep(visited, settings.timestep_range, generator))
    noise, timesteps = torch.stack(noises), torch.tensor(timesteps)
    world = accelerator.num_processes
    mine = slice(accelerator.process_index, None, world)  # every process draws all, keeps its share
    if not sample_ids[mine]:
        return torch.zeros((), device=accelerator.device)
    clean, noise, timesteps = (tensor[mine].to(accelerator.device) for tensor in (clean, noise, timesteps))
    noisy, _ = noised_with_target(run.noise_scheduler, clean, noise.to(clean), timesteps)
    with torch.no_grad():
        cond = embed_prompt_ids(run.text_encoder, batch.prompt_ids[mine].to(accelerator.device))
    prediction, reference = policy_and_reference(run, noisy, timesteps, cond)
    return share_of_the_mean(prediction_error(prediction, reference), count, world)


def training_preserved_samples(paths: RunPaths, round_index: int, settings: DPOConfig, store,
                               expected: TrajectorySettings) -> list[str]:
    """The round's `preserved_samples` when `dpo.preservation_weight` > 0 (else none), refused before training when
    there are none, or one has no stored trajectory or was made with other sampling settings than the pairs'
    (`load_pair` checks the pairs' samples the same way)."""
    if settings.preservation_weight == 0:
        return []
    preserved = preserved_samples(Ledger(paths.ledger), round_index)
    if not preserved:
        raise TrainingError(f"dpo.preservation_weight = {settings.preservation_weight}, but no unit of round "
                            f"{round_index} has every sample winning; set it to 0.0")
    for sample_id in preserved:
        if sample_id not in store:
            raise TrainingError(f"dpo.preservation_weight: no trajectory shard in {paths.trajectories(round_index)} "
                                f"holds sample {sample_id} (a sample of a unit where every sample won); rerun "
                                "`magic sample` for this round")
        check_trajectory_settings(store.header(sample_id), sample_id, expected)
    return preserved


DPO_STEPS = {"trajectory": trajectory_dpo_step, "denoising": diffusion_dpo_step}


# ----------------------------------------------------------------------------------------- entry point
def run_dpo(config: RunConfig, round_index: int = 0, init_lora: Path | None = None) -> Path:
    """Train the DPO LoRA on the pairs of `round_index` and return the folder of the LoRA it wrote.

    The result goes to `aligned/dpo/round-<k>/` and, for the last round (`config.rounds - 1`), also to
    `aligned/dpo/`: the DPO adapter alone, which stacks on the run's tokens and preliminary LoRA (what
    `load_run_policy(..., extra_lora=...)` does), with `dpo.json` naming its objective. A rerun resumes from the
    latest checkpoint in `checkpoints/dpo/round-<k>/`. `init_lora` continues an earlier DPO LoRA (the previous
    round's).
    """
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

    skin_type_of = source_skin_types(config, run_split(config, paths)) if settings.source_skin_types else None
    examples, ties = training_pairs(paths, round_index, settings, skin_type_of)
    store, header, sampling = round_trajectories(paths, round_index, examples)
    preserved = training_preserved_samples(paths, round_index, settings, store, sampling)
    # the denoising objective runs the preliminary model itself: the stored log-probs play no part in it
    stored_reference = settings.objective == "trajectory" and stored_log_probs_are_reference(settings, round_index,
                                                                                              header)
    pipe = load_run_policy(config, paths, device=accelerator.device, dtype=torch.float32)
    if stored_reference:
        check_stored_reference(settings, sampling, header, getattr(pipe, "magic_model_hash", None), round_index)
    training = start_policy_training(
        accelerator, pipe, config, paths, sampling, stage="dpo", adapter_name=ADAPTER_NAME, round_index=round_index,
        total_steps=settings.iterations, warmup_steps=settings.lr_warmup_steps, init_lora=init_lora,
        # the preserved samples join the digest only when used, so the digest of a run without them is as before
        training_data=settings_digest([[e.pair_id, list(e.sample_ids), list(e.signs)] for e in examples]
                                      + ([["preserved", preserved]] if preserved else [])),
    )
    run = PairTraining(accelerator, training, pipe.text_encoder, store, examples, sampling, settings, stored_reference,
                       preserved=preserved)
    if settings.objective == "denoising":
        from diffusers import DDPMScheduler

        run.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    train_step = DPO_STEPS[settings.objective]

    session = training.session
    session.model.train()
    progress = training_progress(accelerator, f"dpo round {round_index}", total=settings.iterations,
                                 start=session.start_step, checkpoints=session.checkpoints)
    for step in progress.steps(range(session.start_step, settings.iterations)):
        chosen = batch_indices(len(examples), settings.pairs_per_step, step, pair_epoch_seed(settings.seed))[rank::world]
        loss, logged = train_step(run, chosen, step)
        grad_norm = optimizer_step(accelerator, session.optimizer, session.lr_scheduler, session.parameters,
                                   settings.grad_clip)
        done = step + 1
        session.add_to_weight_average(done)
        session.logger.log(done, {"loss": float(loss), **logged, "grad_norm": grad_norm,
                                  "lr": session.lr_scheduler.get_last_lr()[0]})
        # The last step is checkpointed too, so rerunning a finished round trains nothing again.
        if done % settings.checkpoint_every == 0 or done == settings.iterations:
            session.checkpoints.save(done, {"round": round_index, "pairs": len(examples), "ties_skipped": ties,
                                             "fingerprint": training.fingerprint})
        progress.advance(loss=float(loss))
    session.logger.close()
    session.use_averaged_weights()

    summary = {"round": round_index, "objective": settings.objective, "iterations": settings.iterations,
               "pairs": len(examples), "ties_skipped": ties, "preference_control": settings.preference_control,
               "source_skin_types": settings.source_skin_types, "reference_weight": settings.reference_weight,
               "preservation_weight": settings.preservation_weight, "preserved_samples": len(preserved),
               "preservation_per_step": settings.preservation_per_step, "winner_penalty": settings.winner_penalty,
               "average_from": settings.average_from}
    outputs = [round_output(paths, round_index)] + ([paths.aligned / "dpo"] if round_index == config.rounds - 1 else [])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for output in outputs:
            save_dpo_lora(session.unwrapped, output)
            atomic_write_text(output / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return outputs[-1]


# ---------------------------------------------------------------------------------------------- rounds
def run_rounds(config: RunConfig, console=None) -> Path:
    """`config.rounds` rounds of DPO: round 0 trains on the pairs already built (sample, judge and pairs ran
    before); each later round k samples with the current policy (preliminary model + round k-1's DPO LoRA),
    judges, builds pairs, and continues training that LoRA. Returns the final LoRA folder (`aligned/dpo`).

    The reference stays the preliminary model in every round: rounds after the first recompute its log-probs
    with the DPO adapter off (the log-probs the sampler stored in round k are the round-k policy's).
    """
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
