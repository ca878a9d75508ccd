"""A training session: what every trainer sets up around its loop (accelerator, optimizer, LR schedule,
checkpoints with exact resume, metrics, progress).

The trainers (`finetune`, `dpo`, `rft`) own their loops; this module gives them the parts that must behave
the same everywhere:

- `make_accelerator`: accelerate with mixed precision, gradient accumulation and one seed for every process
  (the same seed on every rank, so freshly initialised adapters start identical under DDP);
- `make_optimizer`: AdamW, or bitsandbytes' 8-bit AdamW when asked (imported only then, with a clear error
  when the package is missing);
- `make_lr_scheduler`: diffusers' `get_scheduler`, stepped once per optimizer step by `optimizer_step`;
- `Checkpoints`: `accelerator.save_state` / `load_state` under `RunPaths.checkpoints(stage)`, holding only the
  trainable parameters (a LoRA, not the 3.4 GB UNet), the optimizer, the schedule, the RNG states of every
  process and the step counter, written atomically (a killed save never leaves a checkpoint that looks done);
- `MetricsLogger`: CSV + TensorBoard (wandb optional) under `run/logs/<stage>/`; on resume it drops rows
  logged after the checkpoint, so the curves have no duplicated steps;
- `step_seed` and `batch_indices`: the seeded, resumable draws (which items a batch holds, the noise of a
  step) that make a resumed run see exactly the batches an uninterrupted one would;
- `start_training`: the common start of a trainer (optimizer, schedule, `prepare`, resume, logger), and
  `TrainingSession.close` its end (a later phase of the same stage then trains other weights on the same
  accelerator, as fine-tuning's textual inversion and LoRA phases do);
- `training_progress`: the progress of a training loop (`magic_align.progress`), whose Ctrl-C line names the
  step reached and the checkpoint a rerun resumes from.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from magic_align.errors import MagicError
from magic_align.progress import StageProgress
from magic_align.run import atomic_path, set_aside
from magic_align.train.weight_average import WeightAverage

CHECKPOINT_PREFIX = "step-"
TRAINING_STATE = "training_state.json"  # written last: its presence marks a complete checkpoint
TRAINABLE_FILE = "trainable_{index}.safetensors"


class TrainingError(MagicError, RuntimeError):
    """A training problem phrased for the user (missing input, impossible batch layout, missing package)."""


# ------------------------------------------------------------------------------------------ accelerator
def make_accelerator(
    *,
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    seed: int = 0,
    cpu: bool | None = None,
) -> Accelerator:
    """An `Accelerator` for one training stage, seeded identically on every process.

    `mixed_precision` is "no", "fp16" or "bf16"; on a CPU without bf16 support use "no". `cpu=None` lets
    accelerate decide (it honours `accelerate launch --cpu`).
    """
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state and refuses a second precision in it; one process may run stages
    # with different `mixed_precision` settings (`magic run`, the tests), so a change starts a fresh state (the
    # distributed setup, accelerate's PartialState, is kept)
    if AcceleratorState._shared_state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()
    kwargs = {"mixed_precision": mixed_precision, "gradient_accumulation_steps": gradient_accumulation_steps}
    if cpu is not None:
        kwargs["cpu"] = cpu
    accelerator = Accelerator(**kwargs)
    set_seed(seed)
    return accelerator


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype for frozen weights under the accelerator's mixed precision (trainable ones stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


# ------------------------------------------------------------------------------------- seeded schedules
def step_seed(seed: int, phase: str, step: int, micro: int = 0) -> int:
    """A seed for the random draws of one (micro-)step, independent of everything that ran before it."""
    digest = hashlib.sha256(f"{seed}:{phase}:{step}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def phase_epoch_seed(seed: int, phase: str) -> Callable[[int], int]:
    """`epoch_seed` for `batch_indices`: the permutation of each epoch seeded by (seed, phase, epoch)."""
    return lambda epoch: step_seed(seed, phase + "-epoch", epoch)


def batch_indices(num_items: int, batch_size: int, draw: int, epoch_seed: Callable[[int], int]) -> list[int]:
    """The items of the `draw`-th batch (0-based): consecutive slices of a stream of permutations of
    range(num_items), one per epoch, seeded by `epoch_seed(epoch)`.

    Every item is seen once per epoch (a batch may run into the next epoch), and any batch is a pure function
    of its arguments, so a resumed run (or another number of processes) draws exactly the same batches without
    replaying the ones before it.
    """
    if num_items < 1:
        raise TrainingError("no items to draw a batch from")
    chosen: list[int] = []
    position = draw * batch_size
    permutation, permutation_epoch = None, -1
    while len(chosen) < batch_size:
        epoch, offset = divmod(position, num_items)
        if epoch != permutation_epoch:
            generator = torch.Generator().manual_seed(epoch_seed(epoch))
            permutation, permutation_epoch = torch.randperm(num_items, generator=generator).tolist(), epoch
        take = min(batch_size - len(chosen), num_items - offset)
        chosen.extend(permutation[offset : offset + take])
        position += take
    return chosen


# --------------------------------------------------------------------------------- optimizer and schedule
def make_optimizer(
    parameters: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    use_8bit: bool = False,
) -> torch.optim.Optimizer:
    """AdamW over `parameters` (only those that require grad); 8-bit AdamW from bitsandbytes if `use_8bit`."""
    trainable = [parameter for parameter in parameters if parameter.requires_grad]
    if not trainable:
        raise TrainingError("no trainable parameters: the adapter was not attached or every weight is frozen")
    if use_8bit:
        try:
            import bitsandbytes
        except ImportError:
            raise TrainingError(
                "use_8bit_adam = true needs bitsandbytes: pip install 'magic-align[bnb]' (or set it to false)"
            ) from None
        return bitsandbytes.optim.AdamW8bit(trainable, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.AdamW(trainable, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def make_lr_scheduler(
    name: str, optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' `get_scheduler` ("constant", "cosine", "linear", "constant_with_warmup", ...).

    `total_steps` counts optimizer steps. Do not pass the result to `accelerator.prepare` (accelerate would
    step it once per process); `optimizer_step` steps it once per update and `Checkpoints` saves it.
    """
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    except ValueError as error:
        raise TrainingError(f"lr_scheduler = {name!r}: {error}") from None


def optimizer_step(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    parameters: Sequence[torch.nn.Parameter],
    grad_clip: float | None,
) -> float:
    """Clip, step, advance the schedule (unless fp16 skipped the step), zero the gradients.

    Returns the gradient norm before clipping (all processes agree on it: gradients are already reduced).
    """
    if grad_clip is not None:
        norm = accelerator.clip_grad_norm_(parameters, grad_clip)
    else:
        norm = torch.linalg.vector_norm(
            torch.stack([p.grad.detach().float().norm() for p in parameters if p.grad is not None])
        )
    optimizer.step()
    if scheduler is not None and not getattr(optimizer, "step_was_skipped", False):
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


# ---------------------------------------------------------------------------------------------- checkpoints
def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


class Checkpoints:
    """Checkpoints of one stage under `directory` (use `RunPaths.checkpoints(stage)`), named `step-<N>`.

    Register it right after `accelerator.prepare(...)`, and register any other stateful object (the LR
    scheduler) with `accelerator.register_for_checkpointing` before the first `save`/`resume`.

    Only the trainable parameters of the prepared models are stored (by parameter name, safetensors), so a
    checkpoint of a LoRA run is megabytes. `resume()` restores them with the optimizer, schedule, RNG states
    of every process, gradient scaler and `accelerator.step`, and returns the dict given to `save` (with
    "step"), so the caller continues from exactly that step.
    """

    def __init__(self, accelerator: Accelerator, directory: Path, *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.keep = keep
        self._hooks = (accelerator.register_save_state_pre_hook(self._save_trainable),
                       accelerator.register_load_state_pre_hook(self._load_trainable))

    def close(self) -> None:
        """Stop saving and loading through this accelerator (its next phase registers its own `Checkpoints`)."""
        for hook in self._hooks:
            hook.remove()

    # accelerate calls these with the prepared (maybe DDP-wrapped) models.
    def _save_trainable(self, models: list, weights: list, output_dir: str) -> None:
        if self.accelerator.is_main_process:
            for index, model in enumerate(models):
                state = _trainable_state(self.accelerator.unwrap_model(model))
                save_file(state, os.path.join(output_dir, TRAINABLE_FILE.format(index=index)))
        weights.clear()  # accelerate would otherwise write every frozen weight too

    def _load_trainable(self, models: list, input_dir: str) -> None:
        for index, model in enumerate(models):
            path = Path(input_dir) / TRAINABLE_FILE.format(index=index)
            if not path.exists():
                raise TrainingError(f"checkpoint {input_dir} has no {path.name}; it was written by another stage")
            unwrapped = self.accelerator.unwrap_model(model)
            state = load_file(str(path))
            expected = set(_trainable_state(unwrapped))
            if set(state) != expected:
                missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
                raise TrainingError(
                    f"checkpoint {path} does not match the model being trained "
                    f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                    f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}); the settings changed since it "
                    "was written: delete the checkpoint folder to start over"
                )
            parameters = dict(unwrapped.named_parameters())
            with torch.no_grad():
                for name, value in state.items():
                    parameters[name].copy_(value.to(parameters[name].device, parameters[name].dtype))
        models.clear()

    def all(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, folder), oldest first."""
        return Checkpoints.all_in(self.directory)

    @staticmethod
    def latest_in(directory: Path) -> Path | None:
        """The latest complete checkpoint folder under `directory` (None: there is none)."""
        found = Checkpoints.all_in(directory)
        return found[-1][1] if found else None

    @staticmethod
    def all_in(directory: Path) -> list[tuple[int, Path]]:
        """Complete checkpoints under `directory` as (step, folder), oldest first."""
        found = []
        if directory.is_dir():
            for folder in directory.iterdir():
                name = folder.name
                if name.startswith(CHECKPOINT_PREFIX) and (folder / TRAINING_STATE).exists():
                    try:
                        found.append((int(name[len(CHECKPOINT_PREFIX) :]), folder))
                    except ValueError:
                        continue
        return sorted(found)

    def latest(self) -> Path | None:
        return Checkpoints.latest_in(self.directory)

    def save(self, step: int, state: Mapping | None = None) -> Path:
        """Save everything at optimizer step `step` (call on every process). `state`: extra JSON-able values."""
        accelerator = self.accelerator
        final = self.directory / f"{CHECKPOINT_PREFIX}{step:07d}"
        partial = self.directory / f".{final.name}.partial"
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            payload = {"step": step, **(dict(state) if state else {})}
            (partial / TRAINING_STATE).write_text(json.dumps(payload, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for _, old in self.all()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def resume(self) -> dict | None:
        """Load the latest complete checkpoint; returns its state dict (with "step"), or None to start fresh."""
        folder = self.latest()
        if folder is None:
            return None
        self.accelerator.load_state(str(folder))
        return json.loads((folder / TRAINING_STATE).read_text())


# ------------------------------------------------------------------------------------------------ metrics
class MetricsLogger:
    """Scalars per optimizer step to `directory/metrics.csv`, TensorBoard (`directory/tensorboard`) and wandb.

    Only the main process writes (pass `enabled=accelerator.is_main_process`). With `resume_step`, rows
    after that step (logged by the interrupted run after its last checkpoint) are dropped first.
    """

    def __init__(
        self,
        directory: Path,
        log_with: Sequence[str] = ("csv", "tensorboard"),
        *,
        enabled: bool = True,
        resume_step: int | None = None,
        run_name: str | None = None,
        config: Mapping | None = None,
    ) -> None:
        unknown = set(log_with) - {"csv", "tensorboard", "wandb"}
        if unknown:
            raise TrainingError(f"log_with: unknown logger(s) {sorted(unknown)}; expected csv, tensorboard, wandb")
        self.enabled = enabled
        self.directory = Path(directory)
        self.csv_path = self.directory / "metrics.csv" if "csv" in log_with else None
        self._columns: list[str] | None = None
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.csv_path is not None and self.csv_path.exists():
            self._trim_csv(resume_step or 0)
        if "tensorboard" in log_with:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tensorboard = SummaryWriter(str(self.directory / "tensorboard"), purge_step=purge)
        if "wandb" in log_with:
            try:
                import wandb
            except ImportError:
                raise TrainingError("log_with contains 'wandb' but wandb is not installed: pip install wandb") from None
            self._wandb = wandb.init(
                name=run_name, dir=str(self.directory), config=dict(config or {}), resume="allow"
            )

    def _trim_csv(self, keep_through: int) -> None:
        with open(self.csv_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
            columns = rows and list(rows[0].keys())
        kept = [row for row in rows if row.get("step") and int(row["step"]) <= keep_through]
        if not kept:
            self.csv_path.unlink()
            return
        self._columns = list(columns)
        self._write_csv(kept)

    def _write_csv(self, rows: list[dict]) -> None:
        with atomic_path(self.csv_path) as temporary:
            with open(temporary, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=self._columns)
                writer.writeheader()
                writer.writerows(rows)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {key: float(value) for key, value in metrics.items()}
        if self.csv_path is not None:
            row = {"step": step, **{key: ("" if math.isnan(v) else repr(v)) for key, v in values.items()}}
            if self._columns is None and self.csv_path.exists():
                with open(self.csv_path, newline="") as handle:
                    self._columns = next(csv.reader(handle), None)
            if self._columns is None or not set(row) <= set(self._columns):
                # A new metric: rewrite the file with the wider header (rare; keeps the CSV rectangular).
                old_rows = []
                if self.csv_path.exists():
                    with open(self.csv_path, newline="") as handle:
                        old_rows = list(csv.DictReader(handle))
                self._columns = list(dict.fromkeys([*(self._columns or ["step"]), *row]))
                self._write_csv(old_rows + [row])
            else:
                with open(self.csv_path, "a", newline="") as handle:
                    csv.DictWriter(handle, fieldnames=self._columns).writerow(row)
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a `metrics.csv` as floats (empty cells are NaN)."""
    with open(path, newline="") as handle:
        return [
            {key: (float(value) if value != "" else math.nan) for key, value in row.items()}
            for row in csv.DictReader(handle)
        ]


# ------------------------------------------------------------------------------------ a training session
def freeze_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen weights of `model` to `dtype` (mixed precision); trainable ones stay as they are (fp32)."""
    for parameter in model.parameters():
        if not parameter.requires_grad:
            parameter.data = parameter.data.to(dtype)


class ModelWithDtype:
    """A prepared (maybe DDP-wrapped) model plus the `.dtype` that DDP hides; calls go through the wrapper so
    DDP's gradient hooks stay in charge (e.g. for `ddim.guided_noise_prediction`, which reads `unet.dtype`)."""

    def __init__(self, model, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)


@dataclass
class TrainingSession:
    """What `start_training` prepared: the model to call, its optimizer and schedule, checkpoints, metrics,
    and the optimizer step to start from (0, or the step of the checkpoint it resumed)."""

    accelerator: Accelerator
    model: object  # the prepared model (DDP-wrapped under several processes)
    unwrapped: torch.nn.Module
    parameters: list
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None
    checkpoints: Checkpoints
    logger: MetricsLogger
    start_step: int
    resumed: dict | None
    average: WeightAverage | None = None  # the weights' running mean over the last steps, when asked for

    def add_to_weight_average(self, step: int) -> None:
        """After optimizer step `step` (before its checkpoint): add the weights to their running mean, if kept."""
        if self.average is not None:
            self.average.update(step)

    def use_averaged_weights(self) -> None:
        """After the last step, before saving what was trained: the weights become their mean, if kept."""
        if self.average is not None:
            self.average.copy_to_parameters()

    def close(self) -> None:
        """End the session: close the logger and release the model, optimizer and checkpoint hooks from the
        accelerator, so another phase can train other weights on it (accelerate's `free_memory`)."""
        self.logger.close()
        self.checkpoints.close()
        self.accelerator.free_memory()


def settings_digest(settings: Mapping) -> str:
    """A short, stable digest of JSON-able settings: what a checkpoint was written under (stored in its state)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def refuse_other_settings(fingerprint: str, folder: Path, changed: str,
                          error: type[MagicError] = TrainingError) -> Callable[[dict], None]:
    """A `check_resumed` for `start_training`: a checkpoint whose state names another fingerprint (or none) was
    written under other settings, and continuing it would hand back that run's result as this one's."""

    def check(state: dict) -> None:
        if state.get("fingerprint") != fingerprint:
            raise error(
                f"the checkpoint in {folder} was written with other settings ({changed} changed since); delete "
                "that folder to train again from the start, or restore the settings"
            )

    return check


def checkpoint_fingerprint(directory: Path) -> str | None:
    """The fingerprint the latest checkpoint under `directory` was written under (None: no checkpoint, or none named)."""
    latest = Checkpoints.latest_in(directory)
    return json.loads((latest / TRAINING_STATE).read_text()).get("fingerprint") if latest is not None else None


@dataclass(frozen=True)
class CheckpointSwap:
    """What `set_aside_other_checkpoints` did: where another fingerprint's checkpoints went, and which set-aside
    folder of this fingerprint came back (None: nothing moved / nothing restored)."""

    moved: Path | None = None
    restored: Path | None = None


def set_aside_other_checkpoints(accelerator: Accelerator, directory: Path, fingerprint: str,
                                logs: Path | None = None) -> CheckpointSwap:
    """Move `directory` (and the metrics in `logs`, with the same suffix) aside when its latest checkpoint was written
    under another fingerprint (or none), so the stage does not resume (or hand back) a run of other settings, and
    nothing trained is lost; then bring back a folder set aside earlier under this very fingerprint (settings A, then
    B, then A again resume A's checkpoints instead of training A again), else the stage trains from the start. Call
    on every process: the main one decides and moves, the others wait (they get an empty `CheckpointSwap`), so all
    of them resume from the same folder."""
    directory = Path(directory)
    logs = Path(logs) if logs is not None else None
    moved = restored = None
    if accelerator.is_main_process:
        if Checkpoints.latest_in(directory) is not None and checkpoint_fingerprint(directory) != fingerprint:
            moved = set_aside(directory, *([logs] if logs is not None else []))
        if Checkpoints.latest_in(directory) is None:
            earlier = [folder for folder in directory.parent.glob(f"{directory.name}.other-settings*")
                       if folder.is_dir() and checkpoint_fingerprint(folder) == fingerprint]
            if earlier:  # the one furthest along
                restored = max(earlier, key=lambda folder: Checkpoints.all_in(folder)[-1][0])
                # what a start under these settings left without a checkpoint (a partial save, early metrics)
                leftovers = [folder for folder in (directory, logs) if folder is not None and folder.exists()]
                if any(any(folder.iterdir()) for folder in leftovers):
                    set_aside(*leftovers)
                for folder in leftovers:
                    if folder.exists():
                        folder.rmdir()  # empty
                suffix = restored.name[len(directory.name):]
                os.replace(restored, directory)
                if logs is not None and logs.with_name(logs.name + suffix).is_dir():
                    os.replace(logs.with_name(logs.name + suffix), logs)
    accelerator.wait_for_everyone()
    return CheckpointSwap(moved, restored)


def start_training(
    accelerator: Accelerator,
    model: torch.nn.Module,
    *,
    lr: float,
    weight_decay: float,
    use_8bit: bool,
    lr_scheduler: str | None,
    total_steps: int,
    warmup_steps: int = 0,
    checkpoint_dir: Path,
    log_dir: Path,
    log_with: Sequence[str],
    run_name: str | None = None,
    log_config: Mapping | None = None,
    check_resumed: Callable[[dict], None] | None = None,
    average_from: int | None = None,
) -> TrainingSession:
    """The common start of a trainer: AdamW over the trainable parameters, the LR schedule (None: a constant
    learning rate, no schedule), `prepare`, checkpoints (resuming the latest one) and the metrics logger (trimmed
    to the resumed step). `average_from`: also keep the trainable weights' mean from that optimizer step on
    (`WeightAverage`, checkpointed with the rest); the trainer updates it after each step and saves it.

    `check_resumed(state)` may refuse a resumed checkpoint (raise) before the logger touches the old metrics.
    """
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = make_optimizer(parameters, lr=lr, weight_decay=weight_decay, use_8bit=use_8bit)
    schedule = None
    if lr_scheduler is not None:
        schedule = make_lr_scheduler(lr_scheduler, optimizer, total_steps=total_steps, warmup_steps=warmup_steps)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    if schedule is not None:
        accelerator.register_for_checkpointing(schedule)
    average = None
    if average_from is not None:
        average = WeightAverage(parameters, start=average_from)
        accelerator.register_for_checkpointing(average)
    checkpoints = Checkpoints(accelerator, checkpoint_dir)
    resumed = checkpoints.resume()
    if resumed is not None and check_resumed is not None:
        check_resumed(resumed)
    start = int(resumed["step"]) if resumed else 0
    logger = MetricsLogger(
        log_dir, log_with, enabled=accelerator.is_main_process, resume_step=start if resumed else None,
        run_name=run_name, config=log_config,
    )
    return TrainingSession(accelerator, prepared, accelerator.unwrap_model(prepared), parameters, optimizer, schedule,
                           checkpoints, logger, start, resumed, average)


def training_progress(
    accelerator: Accelerator, description: str, *, total: int, start: int, checkpoints: Checkpoints
) -> StageProgress:
    """The progress of a training loop of `total` optimizer steps resumed at `start` (shown by the main process):
    `for step in progress.steps(range(start, total))`, then `progress.advance(loss=...)` after each step.

    After Ctrl-C it says which checkpoint a rerun resumes from, looked up at that moment."""

    def resume() -> str:
        saved = checkpoints.all()
        if saved:
            return f"its checkpoint at step {saved[-1][0]} is kept: rerun the same command to resume from it"
        return "no checkpoint was written yet: a rerun starts this phase again from step 0"

    return StageProgress(description, total, completed=start, resume=resume, enabled=accelerator.is_main_process)
