"""GPU check: the paper's path on the Stable Diffusion 2.1 base architecture, with random weights (no download).

What it measures, on one device, with the `paper` preset's settings:

- the trajectory sampler at 512 px, 100 DDIM steps at strength 0.3 (30 run), guidance 5, in `model.dtype`:
  images/s and peak memory;
- two MAGIC-DPO optimizer steps (8 pairs of 30 steps each) of both designs, this project's (stored reference log-probs,
  batched steps) and the authors' loop structure (a second reference UNet, one step at a time), in bf16, each in a
  fresh process (benchmarks/bench_dpo.py): seconds, peak memory and the largest loss difference;
- one MAGIC-RFT optimizer step (reward-weighted log-likelihood of `rft.batch_size` trajectories plus beta_r times
  the denoising loss of `rft.real_batch_size` real latents) in `rft.mixed_precision`;
- one finetune LoRA step (denoising loss on `finetune.lora_batch_size` images) in `finetune.mixed_precision`;

and projects the preset's wall time on one such device from its step counts, and the judge's cost
(`pipeline.judge_estimate`). On a CUDA machine it builds the full-size `sd21-base`; elsewhere the reduced
`sd21-base-reduced` at 64 px on the CPU (the tests run it so), and the section says which size and device ran.

    python -m benchmarks.run sd21                                  # writes the section into RESULTS.md
    python -m benchmarks.bench_sd21 --size reduced --device cpu    # prints it only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import queue
import resource
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

PAPER_TRAIN_IMAGES = 3100  # Fitzpatrick17k, 20 largest conditions, 50/50 split (docs/reproducing-the-paper.md section 1)
PAPER_CONDITIONS = 20


@dataclass(frozen=True)
class Size:
    """What one run of the check builds and how much work each measurement does."""

    name: str  # "full" or "reduced"
    architecture: str
    resolution: int
    sampler_batch: int | None  # None: the preset's sample.batch_size
    sampler_repeats: int
    dpo_steps: int  # denoising steps per trajectory in the DPO comparison (30: the paper's I2I steps)
    dpo_pairs: int  # pairs per optimizer step; two steps run, so the second step's losses show the first update
    dpo_rank: int
    rft_trajectories: int | None  # None: the preset's rft.batch_size
    rft_steps: int
    real_batch: int | None  # None: the preset's rft.real_batch_size / finetune.lora_batch_size
    rank: int | None  # None: the preset's LoRA ranks
    steps_per_forward: int  # denoising steps per UNet pass in the training steps (bounds the activations)
    fresh_processes: bool  # the DPO designs each in its own process (clean peak memory) or in this one


FULL = Size("full", "sd21-base", 512, None, 2, 30, 8, 32, None, 30, None, None, 4, True)
REDUCED = Size("reduced", "sd21-base-reduced", 64, 1, 1, 2, 1, 4, 2, 4, 1, 4, 2, False)
DPO_OPTIMIZER_STEPS = 2


# ---------------------------------------------------------------------------------------------- devices
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS, kB on Linux


def _autocast(device: torch.device, mixed_precision: str):
    if mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# ------------------------------------------------------------------------------------------- measurements
def measure_sampler(pipe, config, size: Size, device: torch.device) -> dict:
    """Images/s of the trajectory sampler (I2I at the preset's steps, strength, guidance and eta) and peak memory."""
    from PIL import Image

    from magic_align.diffusion.sampler import SampleRequest, SamplingSettings, sample_batch

    settings = SamplingSettings.from_config(config.sample, config.model)
    batch = size.sampler_batch or config.sample.batch_size
    rng = np.random.default_rng(0)
    sources = [Image.fromarray(rng.integers(0, 256, (size.resolution, size.resolution, 3), dtype=np.uint8))
               for _ in range(batch)]

    def one_batch(seed: int):
        requests = [SampleRequest(f"s{seed}-{i}", "an image of a red patch on human skin", seed * 100 + i, source)
                    for i, source in enumerate(sources)]
        return sample_batch(pipe, requests, settings, resolution=size.resolution)

    if device.type == "cuda":
        one_batch(0)  # warm-up: kernels chosen, memory pools filled
    _reset_peak(device)
    _sync(device)
    started = time.perf_counter()
    for repeat in range(size.sampler_repeats):
        results = one_batch(repeat + 1)
    _sync(device)
    seconds = time.perf_counter() - started
    return {
        "images_per_s": batch * size.sampler_repeats / seconds, "seconds_per_batch": seconds / size.sampler_repeats,
        "batch": batch, "peak_mib": _peak_mib(device), "kept_steps": int(results[0].timesteps.shape[0]),
        "dtype": config.model.dtype,
    }


def _lora_unet(pipe, rank: int, adapter_name: str):
    """A private copy of the pipeline's UNet with one fresh trainable LoRA (the pipeline's stays untouched)."""
    from magic_align.diffusion.lora import attach_lora

    unet = copy.deepcopy(pipe.unet)
    unet.requires_grad_(False)
    parameters = attach_lora(unet, rank, rank, adapter_name=adapter_name)
    for parameter in parameters:
        parameter.data = parameter.data.float()
    return unet, parameters


def measure_rft_step(pipe, config, size: Size, device: torch.device) -> dict:
    """One reward-weighted optimizer step on random stored trajectories, as train/rft.py takes it."""
    from magic_align.diffusion.sampler import embed_prompt_ids, tokenize_prompts
    from magic_align.train.diffusion_losses import denoising_loss
    from magic_align.train.rft import reward_weighted_nll
    from magic_align.train.trajectory_likelihood import step_chunks, trajectory_log_probs

    rft = config.rft
    count = size.rft_trajectories or rft.batch_size
    real = size.real_batch or rft.real_batch_size
    rank = size.rank or rft.lora_rank
    scheduler, timesteps = _i2i_schedule(pipe, config, size.rft_steps)
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latent = size.resolution // pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(count, size.rft_steps + 1, 4, latent, latent, generator=generator)
    real_latents = torch.randn(real, 4, latent, latent, generator=generator).to(device)
    weights = torch.rand(count, generator=generator).to(device)
    with torch.no_grad():
        cond = embed_prompt_ids(pipe.text_encoder, tokenize_prompts(pipe.tokenizer, ["an image of a red patch"] * count))
        uncond = embed_prompt_ids(pipe.text_encoder, tokenize_prompts(pipe.tokenizer, [config.model.negative_prompt]))
    guidance = rft.guidance if rft.guidance is not None else config.sample.guidance
    unet, parameters = _lora_unet(pipe, rank, "rft")
    optimizer = torch.optim.AdamW(parameters, lr=rft.lr, weight_decay=rft.weight_decay)
    chunk = rft.steps_per_forward or size.steps_per_forward

    def step() -> float:
        total = 0.0
        for row in range(count):  # one trajectory at a time, its steps in passes of `chunk`
            for steps in step_chunks(size.rft_steps, chunk):
                with _autocast(device, rft.mixed_precision):
                    log_probs = trajectory_log_probs(
                        unet, scheduler, latents[row : row + 1].to(device), timesteps, cond[row : row + 1], uncond,
                        guidance=guidance, eta=config.sample.eta, reduction=rft.log_prob_reduction, step_indices=steps,
                    )
                    loss = reward_weighted_nll(log_probs, weights[row : row + 1]) * len(steps) / size.rft_steps / count
                loss.backward()
                total += float(loss.detach())
        if rft.beta_real > 0 and real:
            with _autocast(device, rft.mixed_precision):
                real_loss = rft.beta_real * denoising_loss(unet, noise_scheduler, real_latents.to(unet.dtype),
                                                           cond[:1].expand(real, -1, -1), generator)
            real_loss.backward()
            total += float(real_loss.detach())
        torch.nn.utils.clip_grad_norm_(parameters, rft.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    # no warm-up: a full-size step takes long enough that kernel selection is noise (the LoRA step warmed up)
    result = _timed_step(step, device, warm_up=False)
    result.update({"trajectories": count, "steps": size.rft_steps, "real": real, "rank": rank, "chunk": chunk,
                   "precision": rft.mixed_precision})
    return result


def measure_lora_step(pipe, config, size: Size, device: torch.device) -> dict:
    """One finetune LoRA optimizer step: VAE-encode a batch, then the denoising loss (train/finetune.py)."""
    from diffusers import DDPMScheduler

    from magic_align.diffusion.sampler import embed_prompt_ids, tokenize_prompts
    from magic_align.train.diffusion_losses import denoising_loss, encode_images

    ft = config.finetune
    batch = size.real_batch or ft.lora_batch_size
    rank = size.rank or ft.lora_rank
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(batch, 3, size.resolution, size.resolution, generator=generator) * 2 - 1
    unet, parameters = _lora_unet(pipe, rank, "default")
    optimizer = torch.optim.AdamW(parameters, lr=ft.lora_lr)

    def step() -> float:
        with torch.no_grad():
            latents = encode_images(pipe.vae, pixels, generator)
            ids = tokenize_prompts(pipe.tokenizer, ["a photo of a red patch on human skin"] * batch)
            hidden = embed_prompt_ids(pipe.text_encoder, ids)
        with _autocast(device, ft.mixed_precision):
            loss = denoising_loss(unet, noise_scheduler, latents.to(unet.dtype), hidden, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, ft.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    result = _timed_step(step, device)
    result.update({"batch": batch, "rank": rank, "precision": ft.mixed_precision})
    return result


def _timed_step(step, device: torch.device, warm_up: bool = True) -> dict:
    """Seconds and peak memory of one call of `step` (after one warm-up call on a GPU when `warm_up`); out of memory
    is reported, not raised, so the other measurements still run."""
    try:
        if warm_up and device.type == "cuda":
            step()
        _reset_peak(device)
        _sync(device)
        started = time.perf_counter()
        loss = step()
        _sync(device)
        return {"seconds": time.perf_counter() - started, "peak_mib": _peak_mib(device), "loss": loss, "error": None}
    except RuntimeError as error:
        if not _out_of_memory(error):
            raise
        _reset_peak(device)
        return {"seconds": None, "peak_mib": None, "loss": None, "error": "out of memory"}


def _i2i_schedule(pipe, config, kept: int):
    """The sampling scheduler (with the preset's step count set) and the last `kept` of its timesteps."""
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(config.sample.steps)
    return scheduler, scheduler.timesteps[config.sample.steps - kept :].clone()


def measure_dpo(size: Size, device: torch.device) -> tuple[object, dict]:
    """Both DPO designs on the same pairs and updates (benchmarks/bench_dpo.py's comparison), in bf16."""
    from benchmarks import bench_dpo

    case = bench_dpo.Case(
        f"{size.architecture}, {size.resolution} px, bf16, {DPO_OPTIMIZER_STEPS} steps", size.architecture,
        size.resolution // 8, size.dpo_steps, DPO_OPTIMIZER_STEPS * size.dpo_pairs, size.dpo_pairs, size.dpo_rank, 77,
        "bfloat16", steps_per_forward=size.steps_per_forward,
    )
    if size.fresh_processes:
        return case, bench_dpo.run_case(case)
    results = {}
    for design in ("ours", "authors"):
        answer = queue.SimpleQueue()
        bench_dpo.measure(asdict(case), design, answer)
        results[design] = answer.get()
    return case, results


# --------------------------------------------------------------------------------------------- projection
def project(config, figures: dict) -> list[tuple[str, str, float | None]]:
    """(stage, work, seconds) of the preset on one device of the kind measured; None where a figure is missing."""
    ft, sample, dpo, rft, evaluate = config.finetune, config.sample, config.dpo, config.rft, config.evaluate
    lora_step = figures["lora"]["seconds"]
    # a textual-inversion micro-batch runs the UNet forward and backward like a LoRA step (into the text encoder
    # instead of the LoRA), so it is projected at the LoRA step's time per image
    per_image = lora_step / figures["lora"]["batch"] if lora_step else None
    if getattr(ft, "ti_schedule", "joint") == "per_token":
        ti_images = PAPER_CONDITIONS * ft.ti_steps_per_token * ft.ti_batch_size * ft.ti_grad_accum
        ti_work = f"{PAPER_CONDITIONS} tokens x {ft.ti_steps_per_token} steps x {ft.ti_batch_size} x {ft.ti_grad_accum} images"
    else:
        ti_images = ft.ti_steps * ft.ti_batch_size * ft.ti_grad_accum
        ti_work = f"{ft.ti_steps} joint steps x {ft.ti_batch_size} x {ft.ti_grad_accum} images"
    images_per_s = figures["sampler"]["images_per_s"]
    samples = sample.num_sources * sample.samples_per_unit * config.rounds
    compared = evaluate.alignment_units * evaluate.alignment_per_source * (1 + len(config.align))
    synthetic_sets = [setting for setting in evaluate.settings if setting != "real"]
    # text-to-image runs all steps instead of strength x steps
    i2i_equivalent = sum(1 / sample.strength if setting == "t2i" else 1 for setting in synthetic_sets)
    # measured on trajectories of fewer steps than the preset keeps (the reduced check): scaled per step
    kept = int(sample.steps * sample.strength)
    dpo_case = figures["dpo_case"]
    dpo_ours = figures["dpo"]["ours"]["seconds"] * kept / dpo_case.steps  # for all dpo_case.pairs pairs
    rft_step = figures["rft"]["seconds"] * kept / figures["rft"]["steps"] if figures["rft"]["seconds"] else None

    def times(count, unit):
        return count * unit if unit else None

    rows = [
        ("finetune: textual inversion", ti_work, times(ti_images, per_image)),
        ("finetune: LoRA", f"{ft.lora_steps} steps x {ft.lora_batch_size} images", times(ft.lora_steps * ft.lora_batch_size, per_image)),
        ("sample", f"{samples} images", samples / images_per_s),
        ("dpo", f"{dpo.iterations} steps x {dpo.pairs_per_step} pairs (bf16)", times(dpo.iterations * dpo.pairs_per_step / dpo_case.pairs, dpo_ours)),
        ("rft", f"{rft.steps} steps x {rft.batch_size} trajectories", times(rft.steps * rft.batch_size / figures["rft"]["trajectories"], rft_step)),
        ("compare", f"{compared} images (unaligned + {len(config.align)} aligned models)", compared / images_per_s),
        ("synthesize", f"{PAPER_TRAIN_IMAGES} x {config.synthesize.per_image} images x {len(synthetic_sets)} sets "
         f"({', '.join(synthetic_sets)}; t2i at {sample.steps} steps)", PAPER_TRAIN_IMAGES * config.synthesize.per_image * i2i_equivalent / images_per_s),
    ]
    return rows


# ----------------------------------------------------------------------------------------------- report
def _mib(value) -> str:
    return f"{value:,.0f}" if value is not None else "n/a"


def _seconds(value) -> str:
    if value is None:
        return "n/a"
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 60:
        return f"{value / 60:.1f} min"
    return f"{value:.2f} s"


def choose(size: str | None, device: str | None) -> tuple[Size, torch.device]:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if size is None:
        size = "full" if device.type == "cuda" else "reduced"
    if size not in ("full", "reduced"):
        raise ValueError(f"size {size!r}: expected 'full' or 'reduced'")
    return (FULL if size == "full" else REDUCED), device


def run(size: str | None = None, device: str | None = None) -> str:
    """The markdown section: full size on a CUDA device, reduced on the CPU unless told otherwise."""
    from magic_align.config import load_config
    from magic_align.diffusion.architectures import build_architecture_pipeline, parameter_counts
    from magic_align.diffusion.loading import DTYPES, ddim_scheduler_from
    from magic_align.pipeline import judge_estimate

    chosen, device = choose(size, device)
    config = load_config("paper")
    started = time.perf_counter()

    def progress(text: str) -> None:
        print(f"  [{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    if device.type == "cpu":
        torch.set_num_threads(1)  # one thread: the figures of a shared 2-core machine mean little either way
    progress(f"building {chosen.architecture} on {device}")
    pipe = build_architecture_pipeline(chosen.architecture, resolution=chosen.resolution, device=device)
    pipe.scheduler = ddim_scheduler_from(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    dtype = DTYPES[config.model.dtype]
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        if module.dtype != dtype:
            module.to(dtype=dtype)
        module.to(device).eval().requires_grad_(False)
    counts = parameter_counts(pipe)
    figures: dict = {}
    progress("sampler")
    figures["sampler"] = measure_sampler(pipe, config, chosen, device)
    progress("finetune LoRA step")
    figures["lora"] = measure_lora_step(pipe, config, chosen, device)
    progress("RFT step")
    figures["rft"] = measure_rft_step(pipe, config, chosen, device)
    del pipe
    _reset_peak(device)
    progress("DPO step, both designs")
    figures["dpo_case"], figures["dpo"] = measure_dpo(chosen, device)
    progress("done")
    judge = judge_estimate(config)
    return report(chosen, device, counts, figures, config, judge, time.perf_counter() - started)


def report(size: Size, device: torch.device, counts: dict, figures: dict, config, judge, total_seconds: float) -> str:
    from benchmarks import bench_dpo

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    where = f"{gpu} (CUDA)" if gpu else "CPU"
    if size.name == "full":
        ran = f"**Ran: the full-size SD 2.1 base architecture at {size.resolution} px on {where}.**"
    else:
        ran = (f"**Ran: the REDUCED SD 2.1 base architecture ({size.resolution} px, small widths and depth) on {where}; "
               "these are not GPU figures.** The code path is the one a GPU runs; the projection below only shows the "
               "arithmetic. Run `python -m benchmarks.run sd21` on a CUDA machine for the real figures.")
    sampler, rft, lora = figures["sampler"], figures["rft"], figures["lora"]
    memory = "GPU max_memory_allocated" if device.type == "cuda" else "process peak RSS (includes the runtime)"
    lines = [
        "## GPU check: the paper's path on Stable Diffusion 2.1 base (random weights)",
        "",
        f"Command: `python -m benchmarks.run sd21` (`python -m benchmarks.bench_sd21 --size reduced --device cpu` "
        f"prints the CPU check). {ran} Whole check: {total_seconds:.0f} s.",
        "",
        f"Model: `{size.architecture}` built from its published configuration (UNet {counts['unet'] / 1e6:.1f} M, "
        f"text encoder {counts['text_encoder'] / 1e6:.1f} M, VAE {counts['vae'] / 1e6:.1f} M parameters), "
        f"{size.resolution} px, weights in {config.model.dtype} (`model.dtype` of the paper preset). Memory: {memory}.",
        "",
        "| measurement | work | seconds | throughput | peak MiB |",
        "|---|---|---|---|---|",
        f"| sampler (I2I, {config.sample.steps} steps at strength {config.sample.strength} = {sampler['kept_steps']} run, "
        f"guidance {config.sample.guidance}) | batch of {sampler['batch']} | {sampler['seconds_per_batch']:.2f} per batch | "
        f"{sampler['images_per_s']:.2f} images/s | {_mib(sampler['peak_mib'])} |",
        f"| finetune LoRA step ({lora['precision']}) | {lora['batch']} images, rank {lora['rank']} | "
        f"{_seconds(lora['seconds'])} | | {_mib(lora['peak_mib'])} |",
        f"| RFT step ({rft['precision']}) | {rft['trajectories']} trajectories x {rft['steps']} steps "
        f"({rft['chunk']} per pass) + {rft['real']} real, rank {rft['rank']} | {_seconds(rft['seconds'])} | | "
        f"{_mib(rft['peak_mib'])} |",
    ]
    for name, figure in (("finetune LoRA step", lora), ("RFT step", rft)):
        if figure["error"]:
            lines.append(f"| {name} | | {figure['error']} | | |")
    lines += [
        "",
        f"DPO, {DPO_OPTIMIZER_STEPS} optimizer steps of {figures['dpo_case'].pairs_per_step} pairs with both designs "
        "on the same pairs and updates (benchmarks/bench_dpo.py, each design "
        + ("in its own process" if size.fresh_processes else "in this process") + "; the seconds are for all "
        f"{figures['dpo_case'].pairs} pairs; the loss difference covers the second step, after an update):",
        "",
        bench_dpo.table([(figures["dpo_case"], figures["dpo"])]),
        "",
    ]
    projection = project(config, figures)
    known = [seconds for _, _, seconds in projection if seconds is not None]
    lines += [
        f"Projection of the `paper` preset on one {where} from its step counts (model download, judge latency, the "
        "reward model fit and the evaluate stage's classifiers and FID are not included):",
        "",
        "| stage | work | projected |",
        "|---|---|---|",
        *[f"| {stage} | {work} | {_seconds(seconds)} |" for stage, work, seconds in projection],
        f"| **total** | | **{_seconds(sum(known))}**{' (some stages n/a)' if len(known) < len(projection) else ''} |",
        "",
    ]
    if judge.remote:
        cost = f"${judge.cost_usd:,.2f}" if judge.cost_usd is not None else f"unknown (no price for {config.judge.model})"
        lines.append(
            f"Judge ({config.judge.backend}:{config.judge.model}): {judge.calls:,} calls of about "
            f"{judge.per_call_input_tokens:,} input + {judge.per_call_output_tokens:,} output tokens, {cost} "
            "(judges/costs.py prices)."
        )
    else:
        lines.append(f"Judge ({config.judge.backend}): {judge.calls:,} images graded locally, no cost.")
    notes = []
    if config.dpo.steps_per_forward is None:
        notes.append("the preset's `dpo.steps_per_forward` is unset (a whole pair, 2 x 30 x 2 UNet rows, per pass); "
                     f"the DPO row runs {figures['dpo_case'].steps_per_forward or 'all'} steps per pass")
    if config.rft.steps_per_forward is None:
        notes.append("the preset's `rft.steps_per_forward` is unset (a whole trajectory, 30 x 2 UNet rows, per pass); "
                     f"the RFT row runs {rft['chunk']} steps per pass")
    if config.dpo.mixed_precision != "bf16":
        notes.append(f"DPO is measured in bf16; the preset's `dpo.mixed_precision` is {config.dpo.mixed_precision!r}")
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("full", "reduced"), default=None,
                        help="full SD 2.1 base (default on CUDA) or the reduced model (default elsewhere)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    arguments = parser.parse_args(argv)
    print(run(arguments.size, arguments.device))


if __name__ == "__main__":
    main()
