"""MAGIC-RFT (docs/method.md section 8): a reward model, then reward-weighted likelihood on the stored trajectories.

1. **Reward model** R(x, c) in [0, 1] (`reward_model.py`): a head on frozen image features, conditioned on the
   condition, fitted with MSE on
   - every judged synthetic image of rounds 0 .. k: label = fraction of its *target* checklist's items met
     (`feedback.sample_rewards`, the same grades the pair rule reads);
   - every real training image: label 1 for its own condition, and `rft.reward_real_negative_label` (default 0)
     for one other condition drawn at random (None: no negatives; see docs/training.md for the trade-off).
2. **Reward-weighted likelihood.** Every stored trajectory of round k (judged or not: the reward model scores
   them all) gets the weight w = R(final image, target condition) ** `reward_power` (minus its unit's mean with
   `rft.baseline = "unit"`). `rft.objective` chooses the step function, once, before the loop:

   - `trajectory_rft_step` ("trajectory", the paper's wording):  -mean_i w_i * mean_t log p_theta(x_{t'} | x_t, c_i)
     over the stored transitions, with guidance, all T steps of a trajectory in one batched UNet pass
     (`trajectory_likelihood.trajectory_log_probs`, shared with DPO), each latent at the timestep it was made at;
   - `denoising_rft_step` ("denoising"): the likelihood of a sample bounded by the diffusion loss on its final
     latent (reward-weighted epsilon MSE with its target caption, one UNet row per sample instead of 2 T),
     re-noised to timesteps up to the highest one the sampler visited (I2I never starts higher).

   Both add beta_r times the denoising loss on a batch of real training images with their own condition's
   caption (`real_image_loss`).

The policy is the preliminary model with its LoRA fused in (never dropped) plus a fresh trainable LoRA (adapter
"rft"), built as for DPO (`trajectory_likelihood.prepare_policy_unet`). Outputs in `aligned/rft/`: the LoRA
(`pytorch_lora_weights.safetensors`, diffusers format; stack it on the run's tokens and preliminary LoRA, as
`load_run_policy(..., extra_lora=...)` does), `reward/` (the reward model) and `rft.json` (a summary naming the
"objective" and "baseline"). Checkpoints in `checkpoints/rft/round-<k>/`; a rerun resumes exactly where it stopped.
"""

from __future__ import annotations

import json
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from magic_align.backbones import load_backbone
from magic_align.checklists.schema import load_checklists
from magic_align.config import RFTConfig, RunConfig
from magic_align.data.images import load_image
from magic_align.data.split import run_split
from magic_align.diffusion.loading import load_run_policy, weights_digest
from magic_align.diffusion.lora import adapters_disabled, save_lora
from magic_align.diffusion.sampler import embed_prompt_ids, tokenize_prompts
from magic_align.diffusion.trajectories import TrajectoryError, TrajectoryStore
from magic_align.feedback import sample_rewards
from magic_align.ledger import Ledger
from magic_align.progress import StageProgress
from magic_align.run import RunPaths, atomic_write_text, prepare_run
from magic_align.sample import source_skin_types
from magic_align.train.diffusion_losses import denoising_draw, denoising_loss, encode_images, weighted_error
from magic_align.train.finetune import TrainingImage, load_batch, training_images
from magic_align.train.reward_model import HEAD_FILE, META_FILE, RewardModel, fit_reward_head, load_reward_model
from magic_align.train.session import (
    TrainingError,
    batch_indices,
    make_accelerator,
    optimizer_step,
    phase_epoch_seed,
    settings_digest,
    step_seed,
    training_progress,
)
from magic_align.train.trajectory_likelihood import (PolicyTraining, TrajectorySettings, check_trajectory_settings,
                                                     of_chosen_skin_types, start_policy_training, step_chunks)

OUTPUT = "rft"
ADAPTER_NAME = "rft"
REWARD_DIR = "reward"
SUMMARY_FILE = "rft.json"
REWARD_RESUME = "the reward model is saved only once fitted: a rerun fits it again, then trains the policy"


# ------------------------------------------------------------------------------------------------ math
def trajectory_weight(reward: torch.Tensor, power: float) -> torch.Tensor:
    """The weight of a trajectory in the likelihood: R ** power, R clamped to [0, 1].

    power = 1 weighs by the reward itself; a larger power concentrates the update on the best samples
    (the demo prototype used (S/5) ** 2).
    """
    if power <= 0:
        raise ValueError(f"rft.reward_power must be > 0, got {power}")
    return reward.clamp(0.0, 1.0) ** power


def unit_baselined_weights(weights: torch.Tensor, unit_ids: Sequence[str]) -> torch.Tensor:
    """Each weight minus the mean weight of its unit's samples (same source image, same target): [N].

    The samples of a unit share the source's look, and a positive weight on every one of them teaches the
    target's token that look too; with the unit's mean subtracted the weights of a unit sum to zero, so what its
    samples share cancels and only what sets the better ones apart is learned (a per-prompt baseline, as in
    policy-gradient methods). A unit with a single sample gets weight 0: there is nothing to compare it with.
    """
    if weights.ndim != 1 or len(unit_ids) != weights.shape[0]:
        raise ValueError(f"weights {tuple(weights.shape)} and {len(unit_ids)} unit ids: expected [N] and N ids")
    centred = weights.clone()
    for indices in positions_by_key(unit_ids):
        centred[indices] = weights[indices] - weights[indices].mean()
    return centred


def condition_balanced_weights(weights: torch.Tensor, conditions: Sequence[str]) -> torch.Tensor:
    """Each target condition's weights scaled so that its mean weight is the mean over all samples: [N].

    Plain weights follow the rewards, so a condition the model draws badly (low rewards everywhere) gets little
    of the update and the shared LoRA drifts towards the look of the well-drawn ones; balanced, every condition
    carries the same share, and within a condition the better samples still weigh more. A condition whose
    weights are all 0 stays 0 (nothing of it to prefer)."""
    if weights.ndim != 1 or len(conditions) != weights.shape[0]:
        raise ValueError(f"weights {tuple(weights.shape)} and {len(conditions)} conditions: expected [N] and N")
    overall = weights.mean()
    balanced = weights.clone()
    for indices in positions_by_key(conditions):
        mean = weights[indices].mean()
        if mean > 0:
            balanced[indices] = weights[indices] * (overall / mean)
    return balanced


def positions_by_key(keys: Sequence[str]) -> list[list[int]]:
    """The positions of each key's entries (a unit's samples, a condition's), keys in order of first appearance."""
    members: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        members.setdefault(key, []).append(index)
    return list(members.values())


def reward_weighted_nll(log_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-mean_i w_i mean_t log p_i,t for log_probs [N, T] and weights [N].

    Averaged over trajectories rather than normalised by the sum of weights, so a batch of low-reward samples
    moves the model little instead of being scaled up to a full step.
    """
    if log_probs.ndim != 2 or weights.shape != log_probs.shape[:1]:
        raise ValueError(f"log_probs {tuple(log_probs.shape)} and weights {tuple(weights.shape)}: expected [N, T] and [N]")
    return -(weights.to(log_probs)[:, None] * log_probs).mean()


# ----------------------------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class LabelledImage:
    path: Path
    condition: str
    label: float
    kind: str  # synthetic | real | real-negative
    row: int | None = None


def real_labels(
    images: Sequence[tuple[Path, str, int | None]],
    conditions: Sequence[str],
    negative_label: float | None,
    seed: int,
) -> list[LabelledImage]:
    """Real training images: label 1 for their own condition, and `negative_label` for one other condition
    drawn at random (seeded) when it is not None."""
    rng = random.Random(seed)
    labelled: list[LabelledImage] = []
    for path, condition, row in images:
        labelled.append(LabelledImage(Path(path), condition, 1.0, "real", row))
        others = [c for c in conditions if c != condition]
        if negative_label is not None and others:
            labelled.append(LabelledImage(Path(path), rng.choice(others), float(negative_label), "real-negative", row))
    return labelled


def synthetic_labels(
    config: RunConfig, paths: RunPaths, round_index: int, judge_id: str | None = None
) -> list[LabelledImage]:
    """Judged synthetic images of rounds 0 .. round_index with their reward as a fraction of items met."""
    if not paths.ledger.exists():
        return []
    ledger = Ledger(paths.ledger)
    try:
        labelled = []
        for index in [r for r in ledger.rounds() if r <= round_index]:
            rewards = sample_rewards(config, index, judge_id)
            for sample in ledger.samples(index):
                if sample.sample_id not in rewards:
                    continue
                labelled.append(LabelledImage(paths.root / sample.image_path, sample.target_label,
                                              rewards[sample.sample_id], "synthetic"))
        return labelled
    finally:
        ledger.close()


def image_features(backbone, images: Sequence[LabelledImage], max_pixels: int, batch_size: int = 32,
                   show_progress: bool = False) -> torch.Tensor:
    """Frozen features [N, D] of the images, read from disk a batch at a time (never all in memory). An image that
    appears under several labels (a real image and its negative) goes through the backbone once."""
    unique = list(dict.fromkeys((item.path, item.row) for item in images))
    chunks = []
    progress = StageProgress("rft reward-model features", len(unique), unit="image", enabled=show_progress,
                             resume=REWARD_RESUME)
    for start in progress.steps(range(0, len(unique), batch_size)):
        batch = [load_image(path, max_pixels, row=row) for path, row in unique[start : start + batch_size]]
        chunks.append(backbone.features(batch))
        progress.advance(len(batch))
    if not chunks:
        return torch.zeros((0, backbone.dim))
    features = torch.cat(chunks)
    position = {key: index for index, key in enumerate(unique)}
    return features[[position[(item.path, item.row)] for item in images]]


def reward_fingerprint(config: RunConfig, labelled: Sequence[LabelledImage], root: Path) -> str:
    """What a fitted reward model depends on: its settings and its labelled images. Images inside the run directory
    `root` are named relative to it, so a copied or moved run reuses its reward model."""
    rft = config.rft

    def name(path: Path) -> str:
        path = Path(path)
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)

    return settings_digest({
        "settings": [rft.reward_backbone, rft.reward_epochs, rft.reward_lr, rft.reward_batch_size, rft.reward_hidden,
                     rft.reward_real_negative_label, rft.seed],
        "labels": [[name(item.path), item.condition, item.label] for item in labelled],
    })


def fit_reward_model(config: RunConfig, paths: RunPaths, round_index: int, judge_id: str | None, device,
                     show_progress: bool = True):
    """Fit (or reuse, when the same labels and settings already gave one) the reward model in aligned/rft/reward/.

    Returns (model, summary, features of the synthetic images it was fitted on, by path): scoring the round's
    trajectories then reuses them instead of running the backbone on the same images twice."""
    rft = config.rft
    conditions = load_checklists(config.judge.checklist).condition_names
    real = [(item.path, item.condition, item.row) for item in training_images(config, paths)]
    labelled = synthetic_labels(config, paths, round_index, judge_id) + real_labels(
        real, conditions, rft.reward_real_negative_label, rft.seed
    )
    if not any(item.kind == "synthetic" for item in labelled):
        raise TrainingError(
            f"no judged sample in rounds 0..{round_index} of {paths.ledger}: the reward model needs the judge's "
            "verdicts (run `magic sample` and `magic judge` first)"
        )
    folder = paths.aligned / OUTPUT / REWARD_DIR
    fingerprint = reward_fingerprint(config, labelled, paths.root)
    meta_path = folder / META_FILE
    summary = json.loads(meta_path.read_text()).get("summary", {}) if meta_path.exists() else {}
    if summary.get("fingerprint") == fingerprint:
        return load_reward_model(folder, device), summary, {}
    backbone = load_backbone(rft.reward_backbone, device)
    features = image_features(backbone, labelled, config.data.max_image_pixels, show_progress=show_progress)
    index = {name: i for i, name in enumerate(conditions)}
    with StageProgress("rft reward model", rft.reward_epochs, unit="epoch", enabled=show_progress,
                       resume=REWARD_RESUME) as epochs:
        fit = fit_reward_head(
        features,
            torch.tensor([index[item.condition] for item in labelled]),
            torch.tensor([item.label for item in labelled]),
            len(conditions),
            epochs=rft.reward_epochs,
            lr=rft.reward_lr,
            batch_size=rft.reward_batch_size,
            hidden=rft.reward_hidden,
            seed=rft.seed,
            on_epoch=lambda mse: epochs.advance(mse=mse),
        )
    model = RewardModel(backbone, fit.head, conditions, rft.reward_backbone)
    kinds = {kind: sum(1 for item in labelled if item.kind == kind) for kind in ("synthetic", "real", "real-negative")}
    summary = {"fingerprint": fingerprint, "images": kinds, "final_mse": fit.final_mse, "epoch_mse": fit.losses}
    synthetic_features = {Path(item.path): row for item, row in zip(labelled, features) if item.kind == "synthetic"}
    return model, summary, synthetic_features


# ------------------------------------------------------------------------------------------ the stage
@dataclass(frozen=True)
class WeightedTrajectory:
    sample_id: str
    condition: str
    reward: float
    weight: float
    unit_id: str  # the (source, target) unit the sample belongs to


def score_trajectories(config: RunConfig, paths: RunPaths, round_index: int, reward_model, store,
                       known_features: dict[Path, torch.Tensor] | None = None) -> list[WeightedTrajectory]:
    """Every sample of the round with a stored trajectory, scored by the reward model on its final image
    (`known_features[path]`, when given, instead of running the backbone again)."""
    ledger = Ledger(paths.ledger)
    try:
        samples = [s for s in ledger.samples(round_index) if s.shard is not None and s.sample_id in store]
    finally:
        ledger.close()
    if not samples:
        raise TrainingError(
            f"round {round_index} has no sample with a stored trajectory in {paths.trajectories(round_index)}; "
            "run `magic sample` (trajectories are kept by default)"
        )
    if config.rft.source_skin_types is not None:
        samples = of_chosen_skin_types(samples, source_skin_types(config, run_split(config, paths)),
                                       config.rft.source_skin_types, "rft.source_skin_types", "samples", round_index)
    features_of = dict(known_features or {})  # image path -> backbone features
    rewards = []
    for start in range(0, len(samples), 32):
        chunk = samples[start : start + 32]
        unknown = []
        for sample in chunk:
            path = paths.root / sample.image_path
            if path in features_of:
                continue
            if not path.is_file():
                raise TrainingError(f"sample {sample.sample_id}: its image {path} is missing (ledger row image_path)")
            unknown.append(path)
        if unknown:
            images = [load_image(path, config.data.max_image_pixels) for path in unknown]
            features_of.update(zip(unknown, reward_model.backbone.features(images)))
        features = torch.stack([features_of[paths.root / sample.image_path] for sample in chunk])
        rewards.append(reward_model.score_features(features, [s.target_label for s in chunk]))
    reward = torch.cat(rewards)
    weight = trajectory_weight(reward, config.rft.reward_power)
    if config.rft.baseline == "unit":
        weight = unit_baselined_weights(weight, [s.unit_id for s in samples])
    if config.rft.balance == "condition":
        weight = condition_balanced_weights(weight, [s.target_label for s in samples])
    return [
        WeightedTrajectory(s.sample_id, s.target_label, float(r), float(w), s.unit_id)
        for s, r, w in zip(samples, reward, weight)
    ]


def weigh_round(config: RunConfig, paths: RunPaths, round_index: int, judge_id: str | None, accelerator):
    """Fit (or reuse) the reward model, save it, and weigh every stored trajectory of the round by it.

    Returns (the round's TrajectoryStore, the weighted trajectories, their sampling settings, the reward model's
    summary)."""
    if not paths.ledger.exists():
        raise TrainingError(f"{paths.ledger} does not exist; run `magic sample` and `magic judge` first")
    reward_model, reward_summary, known_features = fit_reward_model(
        config, paths, round_index, judge_id, accelerator.device, show_progress=accelerator.is_main_process)
    folder = paths.aligned / OUTPUT / REWARD_DIR
    if accelerator.is_main_process:
        reward_model.save(folder, reward_summary)
    accelerator.wait_for_everyone()  # every process then names the saved head (the checkpoints' fingerprint)
    try:
        store = TrajectoryStore(paths.trajectories(round_index))
    except TrajectoryError as error:
        raise TrainingError(str(error)) from None
    trajectories = score_trajectories(config, paths, round_index, reward_model, store, known_features)
    if any(math.isnan(t.weight) for t in trajectories):
        raise TrainingError(f"the reward model gave NaN rewards; see its training summary in {folder}")
    first = trajectories[0].sample_id
    return store, trajectories, TrajectorySettings.from_header(store.header(first), first), reward_summary


def training_data_digest(reward_folder: Path, trajectories: Sequence[WeightedTrajectory]) -> str:
    """What an RFT round trains on, for its checkpoints' fingerprint: the samples and the saved reward head's tensors
    that weigh them. Not the weights themselves: features computed again on a resume (other batches, other
    kernels) can move a weight's last bits, which would make the round's own checkpoints look foreign."""
    return settings_digest({"reward_head": weights_digest(reward_folder / HEAD_FILE).hex(),
                            "samples": [[t.sample_id, t.unit_id] for t in trajectories]})


# ----------------------------------------------------------------------------------- the step functions
@dataclass
class RealImages:
    """The beta_r term's data: the train split, the embedded caption of each condition, the image size."""

    images: list[TrainingImage]
    caption_states: dict[str, torch.Tensor]
    size: int


@dataclass
class WeightedTraining:
    """What an RFT step reads: the policy being trained, the round's weighted trajectories, the real images."""

    accelerator: object
    training: PolicyTraining
    pipe: object  # its text encoder embeds prompts, its VAE encodes the real images
    store: object  # the round's TrajectoryStore
    trajectories: list[WeightedTrajectory]
    sampling: TrajectorySettings
    settings: RFTConfig
    config: RunConfig
    real: RealImages | None  # None: no real-image term (beta_real = 0 or real_batch_size = 0)
    noise_scheduler: object = None  # DDPM noising of the denoising objective and the real-image term
    units: list[list[int]] | None = None  # whole units per step: the denoising objective with the unit baseline

    @property
    def per_process(self) -> int:
        return self.settings.batch_size // self.accelerator.num_processes


def choose_batch(run: WeightedTraining, step: int) -> tuple[list[int], list[int] | None]:
    """This process's trajectories of step `step`, and the unit of each when whole units share their draws.

    With the unit baseline, the denoising form trains on whole units whose samples share noise and timestep:
    their weights sum to zero, and only on a shared draw does that contrast what sets the samples apart."""
    rank, world, seed = run.accelerator.process_index, run.accelerator.num_processes, run.settings.seed
    if run.units is None:
        return batch_indices(len(run.trajectories), run.settings.batch_size, step, phase_epoch_seed(seed, "rft"))[rank::world], None
    units_per_step = max(world, run.settings.batch_size // max(len(unit) for unit in run.units))
    picked = batch_indices(len(run.units), units_per_step, step, phase_epoch_seed(seed, "rft-units"))[rank::world]
    return [index for unit in picked for index in run.units[unit]], [unit for unit in picked for _ in run.units[unit]]


def trajectory_rft_step(run: WeightedTraining, chosen: list[int], groups, step: int) -> dict[str, torch.Tensor]:
    """-mean_i w_i mean_t log p of the chosen trajectories, backpropagated; returns this process's mean term
    ({"weighted_nll": ...})."""
    accelerator, training, device = run.accelerator, run.training, run.accelerator.device
    weighted_terms = []
    for position, index in enumerate(chosen):
        item = run.trajectories[index]
        batch = run.store.get([item.sample_id])
        check_trajectory_settings(batch.headers[0], item.sample_id, run.sampling)
        latents, timesteps = batch.latents.to(device), batch.timesteps[0]
        with torch.no_grad():
            cond = embed_prompt_ids(run.pipe.text_encoder, batch.prompt_ids)
        weight = torch.tensor([item.weight], device=device)
        length = timesteps.shape[0]
        for steps in step_chunks(length, run.settings.steps_per_forward):
            # Only the step's last backward all-reduces the gradients under DDP (the real-image term's, if any).
            last = position == len(chosen) - 1 and steps[-1] == length - 1 and run.real is None
            with nullcontext() if last else accelerator.no_sync(training.session.model):
                with accelerator.autocast():
                    log_probs = training.log_probs(latents, timesteps, cond, step_indices=steps)  # [1, S]
                    term = reward_weighted_nll(log_probs, weight)
                # mean over the steps of a trajectory and the trajectories of the global batch
                accelerator.backward(term * (len(steps) / length) / run.per_process)
            weighted_terms.append(term.detach().float() * len(steps) / length)
    return {"weighted_nll": torch.stack(weighted_terms).sum() / run.per_process}


def denoising_rft_step(run: WeightedTraining, chosen: list[int], groups, step: int) -> dict[str, torch.Tensor]:
    """Reward-weighted diffusion loss on the chosen samples' final latents (plus `reference_weight` x the distance
    to the preliminary model's predictions on the same draws), backpropagated; returns the means over this process's
    batch ({"weighted_nll": ..., and "reference_distance" when reference_weight > 0})."""
    accelerator, device, settings = run.accelerator, run.accelerator.device, run.settings
    items = [run.trajectories[index] for index in chosen]
    batch = run.store.get([item.sample_id for item in items])
    for header, item in zip(batch.headers, items):
        check_trajectory_settings(header, item.sample_id, run.sampling)
    weight = torch.tensor([item.weight for item in items], device=device)
    generator = torch.Generator().manual_seed(step_seed(settings.seed, "rft-final", step, accelerator.process_index))
    model, unwrapped = run.training.session.model, run.training.session.unwrapped
    with nullcontext() if run.real is None else accelerator.no_sync(model):
        with accelerator.autocast():
            with torch.no_grad():
                cond = embed_prompt_ids(run.pipe.text_encoder, batch.prompt_ids.to(device))
            # re-noised only as far as the sampler started (I2I: about strength x 1000), where the aligned model
            # will be used
            noisy, target, timesteps = denoising_draw(run.noise_scheduler, batch.latents[:, -1].to(device), generator,
                                                      max_timestep=int(batch.timesteps.max()), groups=groups)
            prediction = model(noisy, timesteps, encoder_hidden_states=cond).sample
            terms = {"weighted_nll": weighted_error(prediction, target, weight)}
            if settings.reference_weight > 0:
                with torch.no_grad(), adapters_disabled(unwrapped):
                    initial = unwrapped(noisy, timesteps, encoder_hidden_states=cond).sample
                terms["reference_distance"] = weighted_error(prediction, initial)
            loss = terms["weighted_nll"] + settings.reference_weight * terms.get("reference_distance", 0.0)
        accelerator.backward(loss)
    return {name: value.detach().float() for name, value in terms.items()}


RFT_STEPS = {"trajectory": trajectory_rft_step, "denoising": denoising_rft_step}


def real_image_loss(run: WeightedTraining, step: int) -> torch.Tensor:
    """beta_r x the denoising loss on this step's real training images (own-condition captions), backpropagated;
    returns the loss before beta_r."""
    accelerator, device, real, settings = run.accelerator, run.accelerator.device, run.real, run.settings
    generator = torch.Generator().manual_seed(step_seed(settings.seed, "rft-real", step, accelerator.process_index))
    indices = batch_indices(len(real.images), settings.real_batch_size, step, phase_epoch_seed(settings.seed, "rft-real"))
    pixels, conditions = load_batch(real.images, indices[accelerator.process_index::accelerator.num_processes],
                                    real.size, run.config, generator)
    with accelerator.autocast():
        with torch.no_grad():
            real_latents = encode_images(run.pipe.vae, pixels.to(device), generator)
        hidden = torch.cat([real.caption_states[c] for c in conditions])
        loss = denoising_loss(run.training.session.model, run.noise_scheduler, real_latents, hidden, generator)
        accelerator.backward(settings.beta_real * loss)
    return loss


def real_images(config: RunConfig, paths: RunPaths, pipe) -> RealImages | None:
    """The beta_r term's real images with their conditions' embedded captions (None when the term is off)."""
    rft = config.rft
    if not (rft.beta_real > 0 and rft.real_batch_size > 0):
        return None
    images = training_images(config, paths)
    if not images:
        raise TrainingError("the train split is empty, but rft.beta_real > 0 needs real training images: check the "
                            "data section, or set rft.beta_real = 0")
    token_of = {c.condition: c.token for c in load_checklists(config.judge.checklist).conditions}
    with torch.no_grad():
        caption_states = {
            condition: embed_prompt_ids(pipe.text_encoder, tokenize_prompts(
                pipe.tokenizer, [config.model.prompt_template.format(token=token)]))
            for condition, token in token_of.items()
        }
    return RealImages(images, caption_states, config.finetune.resolution or config.model.resolution)


# ------------------------------------------------------------------------------------------ entry point
def run_rft(
    config: RunConfig, round_index: int = 0, judge_id: str | None = None, init_lora: Path | None = None
) -> Path:
    """Fit the reward model, then train the RFT LoRA on the trajectories of `round_index`; returns aligned/rft/.

    `judge_id` names the judge whose verdicts label the reward model (default: the configured judge);
    `init_lora` continues an earlier aligned LoRA instead of starting a fresh one.
    """
    rft = config.rft
    accelerator = make_accelerator(mixed_precision=rft.mixed_precision, seed=rft.seed)
    world = accelerator.num_processes
    if rft.batch_size % world or rft.real_batch_size % world:
        raise TrainingError(
            f"rft.batch_size = {rft.batch_size} and rft.real_batch_size = {rft.real_batch_size} must be multiples of "
            f"the {world} processes (they are global batches)"
        )
    if accelerator.is_main_process:
        prepare_run(config)
    accelerator.wait_for_everyone()
    paths = RunPaths(config.run_dir)
    store, trajectories, sampling, reward_summary = weigh_round(config, paths, round_index, judge_id, accelerator)

    pipe = load_run_policy(config, paths, device=accelerator.device, dtype=torch.float32)
    training = start_policy_training(
        accelerator, pipe, config, paths, sampling, stage="rft", adapter_name=ADAPTER_NAME, round_index=round_index,
        total_steps=rft.steps, guidance=rft.guidance, init_lora=init_lora,
        training_data=training_data_digest(paths.aligned / OUTPUT / REWARD_DIR, trajectories),
    )
    if training.frozen_dtype != torch.float32:  # the VAE only encodes the real images of the beta_r term
        pipe.vae.to(training.frozen_dtype)
    run = WeightedTraining(accelerator, training, pipe, store, trajectories, sampling, rft, config,
                           real_images(config, paths, pipe))
    if run.real is not None or rft.objective == "denoising":
        from diffusers import DDPMScheduler

        run.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if rft.baseline == "unit" and rft.objective == "denoising":
        run.units = positions_by_key([item.unit_id for item in trajectories])
    train_step = RFT_STEPS[rft.objective]

    session = training.session
    session.model.train()
    progress = training_progress(accelerator, f"rft round {round_index}", total=rft.steps, start=session.start_step,
                                 checkpoints=session.checkpoints)
    for step in progress.steps(range(session.start_step, rft.steps)):
        chosen, groups = choose_batch(run, step)
        terms = train_step(run, chosen, groups, step)
        real_term = torch.zeros(()) if run.real is None else real_image_loss(run, step)
        learning_rate = session.lr_scheduler.get_last_lr()[0]
        grad_norm = optimizer_step(accelerator, session.optimizer, session.lr_scheduler, session.parameters,
                                   rft.grad_clip)
        logged = {name: float(accelerator.reduce(value.to(accelerator.device), "mean"))
                  for name, value in terms.items()}
        real_value = float(accelerator.reduce(real_term.detach().float().to(accelerator.device), "mean"))
        mean_weight = sum(trajectories[index].weight for index in chosen) / len(chosen)
        done = step + 1
        session.add_to_weight_average(done)
        # reference_distance: the denoising objective's distance to the preliminary model, when reference_weight > 0
        loss = (logged["weighted_nll"] + rft.beta_real * real_value
                + rft.reference_weight * logged.get("reference_distance", 0.0))
        session.logger.log(done, {
            "loss": loss,
            **logged,
            "real_denoising": real_value,
            "mean_weight": float(accelerator.reduce(torch.tensor(mean_weight, device=accelerator.device), "mean")),
            "grad_norm": grad_norm,
            "lr": learning_rate,
        })
        if done % rft.checkpoint_every == 0 or done == rft.steps:
            session.checkpoints.save(done, {"round": round_index, "trajectories": len(trajectories),
                                             "fingerprint": training.fingerprint})
        progress.advance(loss=loss)
    session.logger.close()
    session.use_averaged_weights()

    output = paths.aligned / OUTPUT
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_lora(session.unwrapped, output, adapter_name=ADAPTER_NAME)
        write_summary(output / SUMMARY_FILE, config, round_index, trajectories, reward_summary, training.guidance)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output


def write_summary(path: Path, config: RunConfig, round_index: int, trajectories: Sequence[WeightedTrajectory],
                  reward_summary: dict, guidance: float) -> None:
    """`rft.json`: the objective and baseline the LoRA was trained with, the rewards and weights of the round."""
    rft = config.rft
    rewards = [t.reward for t in trajectories]
    summary = {
        "round": round_index,
        "objective": rft.objective,
        "baseline": rft.baseline,
        "balance": rft.balance,
        "source_skin_types": rft.source_skin_types,
        "steps": rft.steps,
        "trajectories": len(trajectories),
        "reward_mean": sum(rewards) / len(rewards),
        "reward_min": min(rewards),
        "reward_max": max(rewards),
        "weight_mean": sum(t.weight for t in trajectories) / len(trajectories),
        "reward_power": rft.reward_power,
        "beta_real": rft.beta_real,
        "reference_weight": rft.reference_weight,
        "average_from": rft.average_from,
        "guidance": guidance,
        "reward_model": reward_summary,
        "weights": {t.sample_id: round(t.weight, 6) for t in trajectories},
    }
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
