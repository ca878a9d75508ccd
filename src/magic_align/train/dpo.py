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
- `dpo.recompute_reference = true` always recomputes them (trajectories sampled by some other policy).

Each pair's two trajectories are scored in batched UNet passes (`steps_per_forward` denoising steps of both
samples per pass; each row carries its own timestep), the log-prob of the stored next latent comes from the
shared `ddim_step_with_log_prob(prev_latents=...)`, and the per-step losses of all `pairs_per_step` pairs
are accumulated before one AdamW update. That is the same gradient as one step at a time (method.md 4).

Only informative pairs are trained on: a pair both samples of which win, or both lose, has h = (0, 0) and no
gradient (`dpo_loss.preference_signs`), so spending UNet passes on it would only dilute the batch.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from magic_align.config import RunConfig
from magic_align.diffusion.ddim import ddim_step_with_log_prob, guided_noise_prediction
from magic_align.run import RunPaths, prepare_run
from magic_align.train.dpo_loss import dpo_loss, preference_signs
from magic_align.train.loop import (
    Checkpoints,
    MetricsLogger,
    TrainingError,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    optimizer_step,
    weight_dtype,
)

if TYPE_CHECKING:
    from magic_align.ledger import Ledger

ADAPTER_NAME = "dpo"


# ------------------------------------------------------------------------------------------------ pairs
@dataclass(frozen=True)
class PairExample:
    """One informative pair: the two samples, their signs h, and where their trajectories are stored."""

    pair_id: str
    sample_ids: tuple[str, str]
    signs: tuple[int, int]
    shards: tuple[Path, Path]
    shard_indices: tuple[int, int]


def informative_pairs(ledger: "Ledger", paths: RunPaths, round_index: int) -> tuple[list[PairExample], int]:
    """The pairs of `round_index` with a preference, and how many ties (both win / both lose) were left out."""
    examples: list[PairExample] = []
    ties = 0
    for pair in ledger.pairs(round_index):
        signs = preference_signs(pair.outcome_a, pair.outcome_b)
        if signs == (0, 0):
            ties += 1
            continue
        shards, indices = [], []
        for sample_id in (pair.sample_a, pair.sample_b):
            sample = ledger.sample(sample_id)
            if sample is None:
                raise TrainingError(f"pair {pair.pair_id} (round {round_index}) names sample {sample_id!r}, "
                                    f"which is not in the ledger {paths.ledger}")
            if sample.shard is None or sample.shard_index is None:
                raise TrainingError(
                    f"sample {sample_id} of pair {pair.pair_id} has no stored trajectory (shard is empty in the "
                    "ledger); DPO needs the trajectories: rerun `magic sample` for this round"
                )
            shards.append(paths.root / sample.shard)
            indices.append(int(sample.shard_index))
        examples.append(PairExample(pair.pair_id, (pair.sample_a, pair.sample_b), signs, tuple(shards), tuple(indices)))
    return examples, ties


def pair_schedule(num_pairs: int, step: int, pairs_per_step: int, seed: int) -> list[int]:
    """Indices of the pairs of optimizer step `step` (0-based): a stream of seeded permutations, one per pass.

    A pure function of its arguments, so a resumed run (or another number of processes) sees the same pairs.
    """
    if num_pairs < 1:
        raise ValueError("no pairs to schedule")
    chosen: list[int] = []
    position = step * pairs_per_step
    permutation, permutation_epoch = None, -1
    while len(chosen) < pairs_per_step:
        epoch, offset = divmod(position, num_pairs)
        if epoch != permutation_epoch:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            permutation, permutation_epoch = torch.randperm(num_pairs, generator=generator).tolist(), epoch
        take = min(pairs_per_step - len(chosen), num_pairs - offset)
        chosen.extend(permutation[offset : offset + take])
        position += take
    return chosen


# ------------------------------------------------------------------------------------------ trajectories
@dataclass
class Trajectory:
    """One stored sample, as DPO needs it."""

    latents: torch.Tensor  # [T+1, C, h, w]; latents[i] is denoised at timesteps[i] into latents[i+1]
    log_probs: torch.Tensor  # [T] under the sampling policy
    timesteps: torch.Tensor  # [T]
    prompt_ids: torch.Tensor  # [L]
    header: dict


class TrajectoryCache:
    """Reads samples from the trajectory shards (through the shared shard reader), a few shards kept open."""

    def __init__(self) -> None:
        self._shards: dict[Path, object] = {}

    def _shard(self, path: Path):
        from magic_align.diffusion.trajectories import read_shard

        if path not in self._shards:
            if len(self._shards) >= 8:
                self._shards.pop(next(iter(self._shards)))
            if not path.exists():
                raise TrainingError(f"trajectory shard {path} (named in the ledger) does not exist")
            self._shards[path] = read_shard(path)
        return self._shards[path]

    def get(self, path: Path, index: int) -> Trajectory:
        shard = self._shard(path)
        return shard_trajectory(shard, index, path)


def shard_trajectory(shard, index: int, path: Path) -> Trajectory:
    """Sample `index` of a shard read by `trajectories.read_shard`."""
    count = shard.latents.shape[0]
    if not 0 <= index < count:
        raise TrainingError(f"trajectory shard {path} has {count} samples; the ledger asks for row {index}")
    return Trajectory(
        latents=shard.latents[index],
        log_probs=shard.log_probs[index],
        timesteps=shard.timesteps,
        prompt_ids=shard.prompt_ids[index],
        header=shard.header,
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
    timestep its latent was made at (pitfall 2 of the authors' code). `scheduler` must have had
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


class _CallableWithDtype:
    """A DDP-wrapped UNet has no `.dtype`; the guided prediction reads it. Calls go through the wrapper so
    DDP's gradient hooks stay in charge."""

    def __init__(self, model, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


# ------------------------------------------------------------------------------------------ the model
def prepare_policy_unet(pipe, rank: int, alpha: float, init_lora: Path | None = None):
    """Fuse whatever LoRA the pipeline carries (the preliminary one) into its weights, then attach the
    trainable DPO adapter: fresh (B = 0, so the policy starts as the preliminary model) or from `init_lora`."""
    from magic_align.diffusion.lora import attach_lora, lora_weights_file, merge_lora

    unet = pipe.unet
    if getattr(unet, "peft_config", None):
        # Fusing then unloading keeps the preliminary LoRA in the weights for good (pitfall 1) and leaves
        # the DPO adapter as the only one, so "adapter disabled" means exactly "the preliminary model".
        merge_lora(pipe)
    unet.requires_grad_(False)
    if init_lora is None:
        attach_lora(unet, rank, alpha, adapter_name=ADAPTER_NAME, init=True)
    else:
        try:
            weights = lora_weights_file(Path(init_lora))
        except FileNotFoundError as error:
            raise TrainingError(f"init_lora: {error}") from None
        unet.load_lora_adapter(str(weights), adapter_name=ADAPTER_NAME, prefix="unet")
        unet.set_adapter(ADAPTER_NAME)
    trainable = 0
    for name, parameter in unet.named_parameters():
        if "lora_" in name and f".{ADAPTER_NAME}." in name:
            parameter.requires_grad_(True)
            trainable += parameter.numel()
    if trainable == 0:
        raise TrainingError("the DPO adapter has no parameters: no attention layer matched to_q/to_k/to_v/to_out.0")
    return unet


def save_dpo_lora(unet, folder: Path) -> Path:
    """The DPO adapter in the diffusers LoRA format (`folder/pytorch_lora_weights.safetensors`, rank and
    alpha in its metadata), written atomically; loads with plain `load_lora_weights`."""
    from magic_align.diffusion.lora import save_lora

    return save_lora(unet, Path(folder), adapter_name=ADAPTER_NAME)


def encode_prompt_ids(text_encoder, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Embeddings of stored token ids from the frozen text encoder (as diffusers' SD pipelines do, no mask)."""
    with torch.no_grad():
        return text_encoder(prompt_ids.to(text_encoder.device))[0]


def negative_embeddings(pipe, negative_prompt: str) -> torch.Tensor:
    tokenizer = pipe.tokenizer
    ids = tokenizer(
        [negative_prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return encode_prompt_ids(pipe.text_encoder, ids)


# ------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SamplingSettings:
    """What the trajectories were sampled with (shard header), checked to agree across the pairs."""

    steps: int
    eta: float
    guidance: float
    negative_prompt: str
    reduction: str

    @classmethod
    def from_header(cls, header: dict, shard: Path) -> "SamplingSettings":
        try:
            return cls(
                steps=int(header["steps"]),
                eta=float(header["eta"]),
                guidance=float(header["guidance"]),
                negative_prompt=str(header.get("negative_prompt", "")),
                reduction=str(header["log_prob_reduction"]),
            )
        except KeyError as missing:
            raise TrainingError(f"trajectory shard {shard}: its header has no {missing} field") from None


def round_output(paths: RunPaths, round_index: int) -> Path:
    return paths.aligned / "dpo" / f"round-{round_index}"


# ----------------------------------------------------------------------------------------- entry point
def run_dpo(config: RunConfig, round_index: int = 0, init_lora: Path | None = None) -> Path:
    """Train the DPO LoRA on the pairs of `round_index` and return the folder of the LoRA it wrote.

    The result goes to `aligned/dpo/round-<k>/` and, for the last round (`config.rounds - 1`), also to
    `aligned/dpo/` (the aligned model: load the run's tokens and preliminary LoRA, then this LoRA). A rerun
    resumes from the latest checkpoint in `checkpoints/dpo/round-<k>/`. `init_lora` continues training an
    earlier DPO LoRA (the previous round's) instead of starting from zero.
    """
    from magic_align.diffusion.loading import load_run_policy
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
        raise TrainingError(
            f"round {round_index} has no informative pair ({ties} ties: both win or both lose) in {paths.ledger}; "
            "run `magic pairs` first, or sample more / at a higher strength"
        )
    trajectories = TrajectoryCache()
    first = trajectories.get(examples[0].shards[0], examples[0].shard_indices[0])
    sampling = SamplingSettings.from_header(first.header, examples[0].shards[0])
    guidance = sampling.guidance if settings.guidance is None else settings.guidance
    recompute = settings.recompute_reference or (settings.reference == "initial" and round_index > 0)
    if not recompute:
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
    unet = prepare_policy_unet(pipe, settings.lora_rank, settings.lora_alpha, init_lora)
    frozen_dtype = weight_dtype(accelerator)
    for parameter in unet.parameters():
        if not parameter.requires_grad:
            parameter.data = parameter.data.to(frozen_dtype)
    pipe.text_encoder.to(frozen_dtype)
    parameters = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    optimizer = make_optimizer(
        parameters, lr=settings.lr, weight_decay=settings.weight_decay, use_8bit=settings.use_8bit_adam
    )
    lr_scheduler = make_lr_scheduler(
        settings.lr_scheduler, optimizer, total_steps=settings.iterations, warmup_steps=settings.lr_warmup_steps
    )
    unet, optimizer = accelerator.prepare(unet, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    checkpoints = Checkpoints(accelerator, paths.checkpoints("dpo") / f"round-{round_index}")
    resumed = checkpoints.resume()
    start = int(resumed["step"]) if resumed else 0
    logger = MetricsLogger(
        paths.logs / "dpo" / f"round-{round_index}",
        settings.log_with,
        enabled=accelerator.is_main_process,
        resume_step=start if resumed else None,
        run_name=f"{config.name}-dpo-round-{round_index}",
        config=settings.model_dump(mode="json"),
    )
    scheduler = pipe.scheduler
    scheduler.set_timesteps(sampling.steps, device=accelerator.device)
    unwrapped = accelerator.unwrap_model(unet)
    policy = _CallableWithDtype(unet, frozen_dtype)
    negative = negative_embeddings(pipe, sampling.negative_prompt) if guidance > 1 else None
    reference_cache: dict[str, torch.Tensor] = {}
    per_process = settings.pairs_per_step // world

    def reference_log_probs(sample_id: str, trajectory: Trajectory, cond: torch.Tensor) -> torch.Tensor:
        if not recompute:
            return trajectory.log_probs.float()
        if sample_id not in reference_cache:
            unwrapped.disable_adapters()
            try:
                with torch.no_grad(), accelerator.autocast():
                    values = trajectory_log_probs(
                        _CallableWithDtype(unwrapped, frozen_dtype), scheduler, trajectory.latents[None],
                        trajectory.timesteps, cond, negative, guidance=guidance, eta=sampling.eta,
                        reduction=settings.log_prob_reduction,
                    )[0]
            finally:
                unwrapped.enable_adapters()
            reference_cache[sample_id] = values.float().cpu()
        return reference_cache[sample_id]

    unet.train()
    for step in range(start, settings.iterations):
        batch = pair_schedule(len(examples), step, settings.pairs_per_step, settings.seed)
        local = batch[rank::world]
        policy_rows, reference_rows, sign_rows = [], [], []
        for position, pair_index in enumerate(local):
            example = examples[pair_index]
            pair = [trajectories.get(shard, index) for shard, index in zip(example.shards, example.shard_indices)]
            _check_pair(example, pair, sampling)
            latents = torch.stack([trajectory.latents for trajectory in pair]).to(accelerator.device)
            cond = encode_prompt_ids(pipe.text_encoder, torch.stack([t.prompt_ids for t in pair]))
            reference = torch.stack(
                [reference_log_probs(sid, t, cond[i : i + 1]) for i, (sid, t) in enumerate(zip(example.sample_ids, pair))]
            ).to(accelerator.device)  # [2, T]
            signs = torch.tensor(example.signs, device=accelerator.device)
            length = pair[0].timesteps.shape[0]
            chunk = settings.steps_per_forward or length
            values = []
            for begin in range(0, length, chunk):
                steps = list(range(begin, min(begin + chunk, length)))
                last = position == len(local) - 1 and steps[-1] == length - 1
                # Only the last backward of the optimizer step all-reduces the gradients under DDP.
                with (nullcontext() if last else accelerator.no_sync(unet)), accelerator.autocast():
                    log_probs = trajectory_log_probs(
                        policy, scheduler, latents, pair[0].timesteps, cond, negative, guidance=guidance,
                        eta=sampling.eta, reduction=settings.log_prob_reduction, step_indices=steps,
                    )  # [2, S]
                    loss, _ = dpo_loss(log_probs[None], reference[None, :, steps], signs[None], settings.beta, settings.clip)
                    # Mean over the steps of a pair and over the pairs of the global batch (DDP averages ranks).
                    accelerator.backward(loss * (len(steps) / length) / per_process)
                values.append(log_probs.detach().float())
            policy_rows.append(torch.cat(values, dim=1))
            reference_rows.append(reference.float())
            sign_rows.append(signs)
        grad_norm = optimizer_step(accelerator, optimizer, lr_scheduler, parameters, settings.grad_clip)
        gathered = [accelerator.gather(torch.stack(rows)) for rows in (policy_rows, reference_rows, sign_rows)]
        loss_value, stats = dpo_loss(*gathered, settings.beta, settings.clip)
        logger.log(
            step + 1,
            {"loss": float(loss_value), **stats.as_dict(), "grad_norm": grad_norm, "lr": lr_scheduler.get_last_lr()[0]},
        )
        done = step + 1
        if done % settings.checkpoint_every == 0 and done < settings.iterations:
            checkpoints.save(done, {"round": round_index, "pairs": len(examples), "ties_skipped": ties})
    logger.close()

    output = round_output(paths, round_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_dpo_lora(unwrapped, output)
        if round_index == config.rounds - 1:
            save_dpo_lora(unwrapped, paths.aligned / "dpo")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return paths.aligned / "dpo" if round_index == config.rounds - 1 else output


def _check_pair(example: PairExample, pair: list[Trajectory], sampling: SamplingSettings) -> None:
    a, b = pair
    if not torch.equal(a.timesteps, b.timesteps):
        raise TrainingError(f"pair {example.pair_id}: its samples were made at different timesteps "
                            f"({a.timesteps.tolist()} vs {b.timesteps.tolist()}); a pair must share one schedule")
    for trajectory, shard in zip(pair, example.shards):
        if int(trajectory.header.get("steps", sampling.steps)) != sampling.steps or not math.isclose(
            float(trajectory.header.get("eta", sampling.eta)), sampling.eta
        ):
            raise TrainingError(f"trajectory shard {shard}: steps/eta differ from the other shards of the round; "
                                "train one sampling configuration at a time")
