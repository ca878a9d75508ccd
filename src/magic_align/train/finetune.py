"""Preliminary fine-tuning (docs/method.md section 1): textual inversion, then a UNet LoRA. Entry: `run_finetune`.

1. **Textual inversion.** One new token per condition of the checklist set (`checklist.token`), initialised from
   the embedding of `finetune.ti_init_word`. Captions are object-style templates ("a photo of a {}", ...) plus the
   run's prompt template. Only the new embedding rows learn: they live in a small trainable matrix that a forward
   hook writes into the token-embedding output at the new tokens' positions, so the rows of every other token
   receive no gradient and no optimizer update (weight decay included) and stay bit-identical.
   The learning rate is scaled by batch x accumulation when `ti_scale_lr` (as the paper's scripts do).
   `ti_schedule = "per_token"` (the paper, whose authors ran textual inversion once per condition) gives every
   token its own budget: the tokens are trained one after the other, each for `ti_steps_per_token` optimizer
   steps on batches of its own condition's images only, and the optimizer state is cleared between tokens. With
   AdamW, no weight decay and a cleared state, a row whose gradient is zero does not move, so this is exactly N
   separate runs (in one process, one checkpoint stream). `"joint"` trains all tokens together for `ti_steps`
   steps on batches mixing every condition (about N times fewer updates per token; the tiny and demo presets).
2. **UNet LoRA.** Rank/alpha on to_q, to_k, to_v, to_out.0 of every attention; AdamW, LR schedule (cosine by
   default), gradient clipping; text encoder (with the learned tokens) and VAE frozen; captions = the prompt
   template with the condition's token; centre crop + random horizontal flip; epsilon-prediction MSE with DDPM
   noise (v-prediction models get the velocity target).

Outputs in `run/model/`: `tokens/` (diffusers textual-inversion files that plain `pipe.load_textual_inversion`
loads), `lora/` (diffusers LoRA for `pipe.load_lora_weights`), `model.json` (base model, tokens, file hashes,
steps, losses). Checkpoints go to `run/checkpoints/finetune/`; a rerun resumes from the latest one and ends with
exactly the weights an uninterrupted run gives, because every random draw of a step (batch, caption, noise,
timestep, flip) comes from a generator seeded by (seed, phase, step) rather than from a running RNG state
(`session.step_seed`, `session.batch_indices`).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from magic_align.checklists.schema import load_checklists
from magic_align.config import FinetuneConfig, RunConfig
from magic_align.data.images import load_image, sha256_file
from magic_align.data.split import run_split
from magic_align.diffusion.loading import load_pipeline
from magic_align.diffusion.lora import LORA_TARGETS, attach_lora, save_lora
from magic_align.diffusion.sampler import tokenize_prompts
from magic_align.diffusion.tokens import add_tokens, save_tokens
from magic_align.run import RunPaths, atomic_write_text, prepare_run
from magic_align.errors import MagicError
from magic_align.train.diffusion_losses import denoising_loss, encode_images
from magic_align.train.session import (
    batch_indices,
    make_accelerator,
    optimizer_step,
    phase_epoch_seed,
    read_metrics,
    refuse_other_settings,
    settings_digest,
    start_training,
    step_seed,
    training_progress,
    weight_dtype,
)

# Object-style captions for textual inversion, written for this project; "{}" is the condition's token.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a close-up photo of a {}",
    "a clinical photo of a {}",
    "a cropped photo of a {}",
    "a bright photo of a {}",
    "a dark photo of a {}",
    "a good photo of a {}",
    "a photo of the {}",
    "a close-up photo of the {}",
    "a photo of a small {}",
    "a photo of a large {}",
    "an image of a {}",
    "a picture of a {}",
    "a dermatology photo of a {}",
)

class FinetuneError(MagicError, RuntimeError):
    """The fine-tuning stage cannot run as configured; the message says what to change."""


# ------------------------------------------------------------------------------------------ pure pieces
def caption_templates(prompt_template: str) -> list[str]:
    """The textual-inversion captions: the object templates plus the run's prompt template ({token} -> {})."""
    if "{token}" not in prompt_template:
        raise FinetuneError(f"model.prompt_template = {prompt_template!r} must contain {{token}}")
    run_template = prompt_template.replace("{token}", "{}")
    return [*OBJECT_TEMPLATES, *([run_template] if run_template not in OBJECT_TEMPLATES else [])]


def scaled_lr(lr: float, batch_size: int, grad_accum: int, scale: bool) -> float:
    """The textual-inversion learning rate: lr x batch x accumulation when scaling is on."""
    return lr * batch_size * grad_accum if scale else lr


def center_crop_resize(image: Image.Image, size: int, center_crop: bool = True) -> Image.Image:
    """Centre-crop to a square (or squash when `center_crop` is off) and resize to size x size (bicubic)."""
    if center_crop:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), Image.Resampling.BICUBIC)


def image_to_tensor(image: Image.Image, flip: bool = False) -> torch.Tensor:
    """RGB PIL image -> float tensor [3, H, W] in [-1, 1], mirrored left-right when `flip`."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return tensor.flip(-1) if flip else tensor


# ---------------------------------------------------------------------------------- textual inversion
class TokenRows(nn.Module):
    """The trainable embedding rows of the new tokens, spliced into the text encoder's token-embedding output.

    A forward hook on the embedding module replaces the output at every position holding a new token id with the
    matching trainable row; the embedding matrix itself is never touched during training (`write_into` copies
    the rows in at the end), so the other tokens' rows stay bit-identical by construction.
    """

    def __init__(self, token_ids: Sequence[int], initial: torch.Tensor):
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(list(token_ids), dtype=torch.long), persistent=False)
        self.rows = nn.Parameter(initial.detach().clone().float())
        self._handle = None

    def attach(self, embedding: nn.Embedding) -> None:
        self.detach_hook()
        self._handle = embedding.register_forward_hook(self._splice)

    def detach_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _splice(self, module, inputs, output):
        input_ids = inputs[0]
        match = input_ids.unsqueeze(-1) == self.token_ids.to(input_ids.device)  # [B, L, k]
        if not match.any():
            return output
        slot = match.float().argmax(-1)  # which new token, where any matches
        replaced = self.rows.to(output.dtype)[slot]
        return torch.where(match.any(-1, keepdim=True), replaced, output)

    @torch.no_grad()
    def write_into(self, embedding: nn.Embedding) -> None:
        embedding.weight[self.token_ids.to(embedding.weight.device)] = self.rows.to(embedding.weight)


# ----------------------------------------------------------------------------------------- training data
@dataclass
class TrainingImage:
    path: Path
    condition: str
    row: int | None = None


def training_images(config: RunConfig, paths: RunPaths) -> list[TrainingImage]:
    """The train split of the run's dataset (its few-shot subset when `data.few_shot_fraction` is set) as
    (path, condition) pairs; the split is the run's one split (`data.split.run_split`)."""
    split = run_split(config, paths)
    train = split.few_shot if config.data.few_shot_fraction else split.train
    return [TrainingImage(Path(record.path), record.label, record.row or None) for record in train]


def load_batch(
    images: Sequence[TrainingImage], indices: Sequence[int], size: int, config: RunConfig, generator: torch.Generator
) -> tuple[torch.Tensor, list[str]]:
    """Pixels [B, 3, size, size] in [-1, 1] (centre crop, random flip) and the conditions of the chosen items."""
    tensors, conditions = [], []
    for index in indices:
        item = images[index]
        image = load_image(item.path, config.data.max_image_pixels, row=item.row)
        image = center_crop_resize(image, size, config.finetune.center_crop)
        flip = bool(config.finetune.random_flip) and bool(torch.rand((), generator=generator) < 0.5)
        tensors.append(image_to_tensor(image, flip))
        conditions.append(item.condition)
    return torch.stack(tensors), conditions


@dataclass(frozen=True)
class TokenPhase:
    """A stretch of textual-inversion steps: the images it draws batches from and how many steps it runs."""

    condition: str | None  # the one token it trains (None: the joint schedule, every token)
    images: tuple[int, ...]  # indices into the training images
    steps: int


def ti_phases(images: Sequence[TrainingImage], conditions: Sequence[str], ft) -> list[TokenPhase]:
    """The textual-inversion schedule (`finetune.ti_schedule`): one phase per condition with training images, in
    checklist order (`per_token`), or one phase over every image (`joint`)."""
    if ft.ti_schedule == "joint":
        return [TokenPhase(None, tuple(range(len(images))), ft.ti_steps)]
    return [TokenPhase(condition, members, ft.ti_steps_per_token) for condition in conditions
            if (members := tuple(i for i, item in enumerate(images) if item.condition == condition))]


def phase_at(phases: Sequence[TokenPhase], step: int) -> tuple[int, int]:
    """(phase index, step within that phase) of global textual-inversion step `step`."""
    for index, phase in enumerate(phases):
        if step < phase.steps:
            return index, step
        step -= phase.steps
    raise ValueError(f"step {step} is past the textual-inversion schedule")


def forget_optimizer_state(optimizer) -> None:
    """Start a token's phase with a fresh AdamW state, as its own run would: with zero moments, the rows of the
    other tokens (zero gradient, no weight decay) get a zero update, and the bias correction restarts."""
    getattr(optimizer, "optimizer", optimizer).state.clear()  # accelerate wraps the torch optimizer


class TokenTextEncoder(nn.Module):
    """The frozen text encoder with the trainable token rows spliced in: the module phase 1 trains (and the one
    accelerate wraps, so DDP sees a forward pass and averages the rows' gradients)."""

    def __init__(self, text_encoder: nn.Module, token_rows: TokenRows):
        super().__init__()
        self.text_encoder = text_encoder
        self.token_rows = token_rows
        token_rows.attach(text_encoder.get_input_embeddings())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]


# ------------------------------------------------------------------------------------------------ the stage
# data settings that choose only the locked validation set (data/split.py), never a training image
LOCKED_SET_SETTINGS = ("locked_fraction", "procedural_locked_seed", "procedural_locked_per_class")


CHANGED = "model, data, checklist or finetune section"  # what a finetune checkpoint's fingerprint covers


def settings_fingerprint(config: RunConfig) -> str:
    """What a checkpoint depends on: model, data, checklist set and fine-tuning settings (not checkpoint_every,
    not the loggers). A checkpoint written under other settings is refused rather than silently continued."""
    unchanging = {"checkpoint_every", "log_with"}
    if config.finetune.lora_weight_decay == FinetuneConfig.model_fields["lora_weight_decay"].default:
        # a setting added after the first runs: at its default it leaves their fingerprint (and checkpoints) valid
        unchanging.add("lora_weight_decay")
    settings = {
        "model": config.model.model_dump(mode="json"),
        # the settings that only choose the locked set (from the test side or another seed) never change the
        # training images; leaving them out keeps the checkpoints of runs made before data roles existed valid
        "data": config.data.model_dump(mode="json", exclude=set(LOCKED_SET_SETTINGS)),
        "checklist": config.judge.checklist,
        "finetune": config.finetune.model_dump(mode="json", exclude=unchanging),
    }
    return settings_digest(settings)


def _checkpoint(checkpoints, done: int, total: int, every: int, budget_spent: bool, fingerprint: str) -> bool:
    """Save a checkpoint every `every` steps, at the end of the phase and when this call's budget is spent;
    True when the call must stop before the phase ends."""
    if done % every == 0 or done == total or budget_spent:
        checkpoints.save(done, {"fingerprint": fingerprint})
    return budget_spent and done < total


def run_finetune(config: RunConfig, stop_after: int | None = None) -> Path:
    """Textual inversion, then the UNet LoRA, on the train split of the run's dataset; returns `run/model/`.

    A rerun resumes from the latest checkpoint in `run/checkpoints/finetune/` (a finished run only rewrites its
    outputs). `stop_after` stops after that many optimizer steps of this call (both phases counted), with a
    checkpoint, leaving `model/` incomplete; the next call continues exactly there.
    """
    from diffusers import DDPMScheduler

    if stop_after is not None and stop_after < 1:
        raise FinetuneError(f"stop_after = {stop_after}: expected at least 1 optimizer step (or None for no limit)")
    ft = config.finetune
    accelerator = make_accelerator(mixed_precision=ft.mixed_precision, seed=ft.seed)
    if accelerator.is_main_process:  # the run folder and the split are made once, then read by every process
        training_images(config, prepare_run(config))
    accelerator.wait_for_everyone()
    paths = RunPaths(config.run_dir)
    checklists = load_checklists(config.judge.checklist)
    images = training_images(config, paths)
    if not images:
        raise FinetuneError("the train split is empty: check data.csv / data.images and data.num_classes")
    unknown = sorted({item.condition for item in images} - set(checklists.condition_names))
    if unknown:
        raise FinetuneError(
            f"train labels {unknown} have no checklist in {config.judge.checklist!r}; dataset labels must be "
            "checklist condition names"
        )
    size = ft.resolution or config.model.resolution
    templates = caption_templates(config.model.prompt_template)
    token_of = {c.condition: c.token for c in checklists.conditions}
    fingerprint = settings_fingerprint(config)
    steps_done = [0]  # optimizer steps taken by this call, both phases

    def spend_step() -> bool:
        """Count one optimizer step; True when this call's `stop_after` budget is used up."""
        steps_done[0] += 1
        return stop_after is not None and steps_done[0] >= stop_after

    # ------------------------------------------------------------------ phase 1: textual inversion
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    pipe = load_pipeline(config.model, device=device, dtype=weight_dtype(accelerator))
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    tokens = [token_of[c] for c in checklists.condition_names]
    try:
        token_ids = add_tokens(tokenizer, text_encoder, tokens, ft.ti_init_word)
    except ValueError as error:
        raise FinetuneError(f"textual inversion cannot start: {error}") from None
    text_encoder.requires_grad_(False)
    initial = text_encoder.get_input_embeddings().weight[token_ids[0]].detach().float()
    token_rows = TokenRows(token_ids, initial.unsqueeze(0).repeat(len(token_ids), 1)).to(device)
    encoder = TokenTextEncoder(text_encoder, token_rows)
    ti_lr = scaled_lr(ft.ti_lr, ft.ti_batch_size, ft.ti_grad_accum, ft.ti_scale_lr)
    # No weight decay: the rows are word embeddings, and decay would pull them towards zero, not towards "skin".
    phases = ti_phases(images, checklists.condition_names, ft)
    ti_total = sum(phase.steps for phase in phases)
    ti_checkpoint_dir = paths.checkpoints("finetune") / "ti"
    ti = start_training(  # a constant learning rate: no schedule
        accelerator, encoder, lr=ti_lr, weight_decay=0.0, use_8bit=False, lr_scheduler=None, total_steps=ti_total,
        checkpoint_dir=ti_checkpoint_dir, log_dir=paths.logs / "finetune" / "ti", log_with=ft.log_with,
        check_resumed=refuse_other_settings(fingerprint, ti_checkpoint_dir, CHANGED, FinetuneError),
    )
    encoder, ti_start = ti.model, ti.start_step
    ti_progress = training_progress(accelerator, "finetune textual inversion", total=ti_total, start=ti_start,
                                    checkpoints=ti.checkpoints)
    for step in ti_progress.steps(range(ti_start, ti_total)):
        phase_index, local = phase_at(phases, step)
        phase = phases[phase_index]
        if local == 0 and phase.condition is not None:
            forget_optimizer_state(ti.optimizer)
        # the joint schedule keeps its original draws (and so its checkpoints); a token's phase has its own stream
        stream = "ti" if phase.condition is None else f"ti:{phase.condition}"
        loss_total = 0.0
        for micro in range(ft.ti_grad_accum):
            draw = (local * ft.ti_grad_accum + micro) * world + rank
            generator = torch.Generator().manual_seed(step_seed(ft.seed, stream, local, micro * world + rank))
            picks = batch_indices(len(phase.images), ft.ti_batch_size, draw, phase_epoch_seed(ft.seed, stream))
            pixels, conditions = load_batch(images, [phase.images[i] for i in picks], size, config, generator)
            choices = torch.randint(len(templates), (len(conditions),), generator=generator)
            captions = [templates[int(i)].format(token_of[c]) for i, c in zip(choices, conditions)]
            sync = accelerator.no_sync(encoder) if micro < ft.ti_grad_accum - 1 else nullcontext()
            with sync, accelerator.autocast():
                with torch.no_grad():
                    latents = encode_images(vae, pixels.to(device), generator)
                hidden = encoder(tokenize_prompts(tokenizer, captions).to(device))
                loss = denoising_loss(unet, noise_scheduler, latents, hidden, generator) / ft.ti_grad_accum
                accelerator.backward(loss)
            loss_total += float(accelerator.reduce(loss.detach(), "mean"))
        grad_norm = optimizer_step(accelerator, ti.optimizer, None, ti.parameters, grad_clip=None)
        ti.logger.log(step + 1, {"loss": loss_total, "grad_norm": grad_norm, "lr": ti_lr, "token": phase_index})
        ti_progress.advance(loss=loss_total)
        if _checkpoint(ti.checkpoints, step + 1, ti_total, ft.checkpoint_every, spend_step(), fingerprint):
            ti.close()
            ti_progress.finish()
            return paths.model
    ti.close()  # the LoRA phase trains other weights on the same accelerator
    if stop_after is not None and steps_done[0] >= stop_after and ft.lora_steps > 0:
        return paths.model  # the budget ended exactly with textual inversion; phase 2 starts on the next call
    token_rows.detach_hook()
    token_rows.write_into(text_encoder.get_input_embeddings())
    tokens_dir = paths.model / "tokens"
    if accelerator.is_main_process:
        save_tokens(tokenizer, text_encoder, tokens, tokens_dir)

    # ------------------------------------------------------------------ phase 2: UNet LoRA
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ft.seed)  # the LoRA's initial A matrices, the same on every process and every rerun
        lora_parameters = attach_lora(unet, ft.lora_rank, ft.lora_alpha, targets=LORA_TARGETS)
    for parameter in lora_parameters:  # trainable weights stay fp32 under mixed precision
        parameter.data = parameter.data.float()
    lora_checkpoint_dir = paths.checkpoints("finetune") / "lora"
    lora = start_training(
        accelerator, unet, lr=ft.lora_lr, weight_decay=ft.lora_weight_decay, use_8bit=False,
        lr_scheduler=ft.lr_scheduler, total_steps=max(ft.lora_steps, 1), checkpoint_dir=lora_checkpoint_dir,
        log_dir=paths.logs / "finetune" / "lora", log_with=ft.log_with,
        check_resumed=refuse_other_settings(fingerprint, lora_checkpoint_dir, CHANGED, FinetuneError),
    )
    unet, lora_start = lora.model, lora.start_step
    with torch.no_grad():  # the text encoder is frozen now: one embedding per condition caption, computed once
        caption_states = {
            condition: text_encoder(tokenize_prompts(tokenizer, [config.model.prompt_template.format(token=token)]).to(device))[0]
            for condition, token in token_of.items()
        }
    unet.train()
    lora_progress = training_progress(accelerator, "finetune lora", total=ft.lora_steps, start=lora_start,
                                      checkpoints=lora.checkpoints)
    for step in lora_progress.steps(range(lora_start, ft.lora_steps)):
        generator = torch.Generator().manual_seed(step_seed(ft.seed, "lora", step, rank))
        indices = batch_indices(len(images), ft.lora_batch_size, step * world + rank, phase_epoch_seed(ft.seed, "lora"))
        pixels, conditions = load_batch(images, indices, size, config, generator)
        with accelerator.autocast():
            with torch.no_grad():
                latents = encode_images(vae, pixels.to(device), generator)
            hidden = torch.cat([caption_states[c] for c in conditions])
            loss = denoising_loss(unet, noise_scheduler, latents, hidden, generator)
            accelerator.backward(loss)
        learning_rate = lora.lr_scheduler.get_last_lr()[0]
        grad_norm = optimizer_step(accelerator, lora.optimizer, lora.lr_scheduler, lora.parameters, ft.grad_clip)
        loss_value = float(accelerator.reduce(loss.detach(), "mean"))
        lora.logger.log(step + 1, {"loss": loss_value, "grad_norm": grad_norm, "lr": learning_rate})
        lora_progress.advance(loss=loss_value)
        if _checkpoint(lora.checkpoints, step + 1, ft.lora_steps, ft.checkpoint_every, spend_step(), fingerprint):
            lora.close()
            lora_progress.finish()
            return paths.model
    lora.close()
    unet = accelerator.unwrap_model(unet).eval()
    if accelerator.is_main_process:
        lora_dir = paths.model / "lora"
        save_lora(unet, lora_dir)
        _write_model_json(config, paths, checklists, tokens_dir, lora_dir)
    accelerator.wait_for_everyone()
    return paths.model


def lora_targets() -> tuple[str, ...]:
    return LORA_TARGETS


def _final_loss(path: Path) -> float | None:
    if not path.exists():
        return None
    rows = read_metrics(path)
    return rows[-1]["loss"] if rows else None


def _write_model_json(config: RunConfig, paths: RunPaths, checklists, tokens_dir: Path, lora_dir: Path) -> None:
    ft = config.finetune
    files = sorted(tokens_dir.glob("*.safetensors")) + sorted(lora_dir.glob("*.safetensors"))
    info = {
        "base_model": {
            "source": config.model.source,
            "pretrained": config.model.pretrained,
            "revision": config.model.revision,
            "seed": config.model.seed,
            "resolution": config.model.resolution,
        },
        "checklist_set": checklists.id,
        "tokens": {c.condition: c.token for c in checklists.conditions},
        "prompt_template": config.model.prompt_template,
        "textual_inversion": {
            "init_word": ft.ti_init_word,
            "schedule": ft.ti_schedule,
            "steps": ft.ti_steps_per_token if ft.ti_schedule == "per_token" else ft.ti_steps,
            "lr": scaled_lr(ft.ti_lr, ft.ti_batch_size, ft.ti_grad_accum, ft.ti_scale_lr),
            "batch_size": ft.ti_batch_size,
            "grad_accum": ft.ti_grad_accum,
            "final_loss": _final_loss(paths.logs / "finetune" / "ti" / "metrics.csv"),
        },
        "lora": {
            "rank": ft.lora_rank,
            "alpha": ft.lora_alpha,
            "targets": list(lora_targets()),
            "steps": ft.lora_steps,
            "lr": ft.lora_lr,
            "lr_scheduler": ft.lr_scheduler,
            "batch_size": ft.lora_batch_size,
            "final_loss": _final_loss(paths.logs / "finetune" / "lora" / "metrics.csv"),
        },
        "settings_fingerprint": settings_fingerprint(config),
        "files": {path.relative_to(paths.model).as_posix(): sha256_file(path) for path in files},
    }
    atomic_write_text(paths.model / "model.json", json.dumps(info, indent=2) + "\n")
