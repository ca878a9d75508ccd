"""What a demo base model can draw, before any finetune: `python -m magic_align.demo.validity MODEL_DIR`.

Two markdown tables for a model folder in diffusers format (the shipped `demo/demo-base/` or a rebuild):

- **reconstruction**: fresh procedural images of each condition through the autoencoder (encode, decode), no
  diffusion: what the latent space can carry at best (docs/method.md section 11.2: every item should survive
  it). Per condition: mean items met under its own checklist (rules judge), the mean under the other
  conditions' checklists, and the share the recognition probe assigns to the condition;
- **text to image**: N images per condition from the base model (DDIM, the demo's steps, guidance and eta, fixed
  seeds), prompted with the condition's full *look* (every part of `demo.model.LESION_LOOKS`, the first wording
  of each, and the region phrase): the base model was never told the conditions' names, only how lesions look.
  The same columns, plus the correlation r of items met with recognition over all images, with a bootstrap
  interval: the rules judge's validity on this model's generated images.

The recognition probe is the evaluate harness's (`evaluate.recognition`: a linear probe on the demo preset's
backbone, with its `recognition_augment`), trained on fresh procedural images of the six conditions, never
on a verdict. Everything is seeded, so two model folders are compared on the same captions, seeds and probe.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from magic_align.backbones import Backbone, load_backbone
from magic_align.checklists.schema import ChecklistSet, load_checklists
from magic_align.config import RunConfig, load_config
from magic_align.demo.model import LESION_LOOKS, REGION_PHRASES
from magic_align.demo.procedural import CONDITIONS, REGION_OF, render_arrays
from magic_align.diffusion.loading import ModelLoadError, load_local_folder
from magic_align.diffusion.sampler import (SampleRequest, SamplingSettings, decode_latents, derived_seed,
                                           prepare_sources, sample_batch)
from magic_align.errors import MagicError
from magic_align.evaluate.classifier import LinearProbes, Schedule
from magic_align.evaluate.recognition import fit_probe, probe_probabilities, target_recognition
from magic_align.evaluate.validity import GradedImage, validity_table as recognition_validity_table
from magic_align.judges.rules import RulesJudge, make_rules_judge, validity_table

# seeds of the three image sets, apart from each other and from the demo dataset's (seed 0)
PROBE_SEED = 3000
RECONSTRUCTION_SEED = 2000
GENERATION_SEED = 4000
PROBE_PER_CONDITION = 40  # about the demo split's real training images per condition


class ModelValidityError(MagicError, ValueError):
    """The model folder cannot be measured; the message names it and what is missing."""


def full_look_caption(condition: str) -> str:
    """The caption of a condition's whole look in the base model's training words: the first wording of every
    part of `LESION_LOOKS[condition]` (as `describe_lesion` orders them) and its region phrase."""
    looks = LESION_LOOKS[condition]
    first = lambda part: looks[part][0] if looks[part] else ""  # noqa: E731
    phrase = " ".join(word for word in (first("shape"), first("size"), first("colour"), first("noun")) if word)
    detail = first("detail")
    return f"a photo of {phrase}{' ' + detail if detail else ''} on skin {REGION_PHRASES[REGION_OF[condition]]}"


def cut_words(tokenizer, caption: str) -> str:
    """The words of `caption` beyond the tokenizer's length, which the model never reads ("" when it fits); the
    demo model's 16 tokens cut the longest full looks, as they cut its training captions."""
    ids = tokenizer(caption, truncation=True, max_length=tokenizer.model_max_length).input_ids
    read = tokenizer.decode(ids, skip_special_tokens=True).split()
    words = caption.split()
    return " ".join(words[len(read):]) if len(read) < len(words) else ""


# ------------------------------------------------------------------------------------------------ images
@torch.no_grad()
def reconstructions(pipe, per_condition: int, seed: int = RECONSTRUCTION_SEED) -> dict[str, list[Image.Image]]:
    """Fresh procedural images of each condition after one encode + decode (the posterior's mode), through the
    pipeline's own image processor and decoder, as I2I sees its sources."""
    vae, images = pipe.vae, {}
    for condition in CONDITIONS:
        arrays, _ = render_arrays([condition] * per_condition, seed=seed)
        pixels = prepare_sources(pipe, [Image.fromarray(array) for array in arrays], arrays.shape[1])
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        images[condition] = decode_latents(pipe, latents * vae.config.scaling_factor)
    return images


def load_model(folder: Path):
    try:
        return load_local_folder(Path(folder))
    except ModelLoadError as error:
        raise ModelValidityError(str(error)) from None


def reconstruction_validity_table(folder: Path, per_condition: int = 50, seed: int = RECONSTRUCTION_SEED):
    """The rules judge's `ValidityTable` on the autoencoder reconstructions of fresh condition images of the model
    in `folder` (own items per item, cross-checklist means, quality gate)."""
    checklists = load_checklists("demo")
    return validity_table(make_rules_judge(None, checklists), checklists,
                          reconstructions(load_model(folder), per_condition, seed))


def generations(pipe, per_condition: int, config: RunConfig, seed: int = GENERATION_SEED) -> dict[str, list[Image.Image]]:
    """`per_condition` text-to-image samples per condition from `full_look_caption`, one batch per condition."""
    settings = SamplingSettings(steps=config.sample.steps, strength=1.0, eta=config.sample.eta,
                                guidance=config.sample.guidance, negative_prompt=config.model.negative_prompt,
                                keep_trajectory=False)
    images = {}
    for condition in CONDITIONS:
        caption = full_look_caption(condition)
        requests = [SampleRequest(f"{condition}-{k}", caption, derived_seed(seed, condition, k)) for k in range(per_condition)]
        images[condition] = [result.image for result in sample_batch(pipe, requests, settings, config.model.resolution)]
    return images


# ------------------------------------------------------------------------------------------------ grading
@dataclass
class ProceduralProbe:
    """The recognition probe trained on fresh procedural images (classes in `CONDITIONS` order)."""

    backbone: Backbone
    probe: LinearProbes
    augment: int

    def grade(self, images: Sequence[Image.Image], condition: str) -> list[int]:
        probabilities = probe_probabilities(self.probe, self.backbone.features(list(images)))
        return [hit for hit, _ in target_recognition(probabilities, [CONDITIONS.index(condition)] * len(images))]


def procedural_probe(config: RunConfig, per_condition: int = PROBE_PER_CONDITION, seed: int = PROBE_SEED) -> ProceduralProbe:
    """The harness's recognition probe (the config's backbone, schedule and `recognition_augment`), trained on
    `per_condition` fresh procedural images of each condition."""
    evaluate = config.evaluate
    name = evaluate.recognition_backbone or evaluate.backbones[0]
    backbone = load_backbone(name, image_size=evaluate.image_size, pretrained=evaluate.backbone_paths.get(name),
                             seed=config.seed)
    images, labels = [], []
    for index, condition in enumerate(CONDITIONS):
        arrays, _ = render_arrays([condition] * per_condition, seed=seed)
        images += [Image.fromarray(array) for array in arrays]
        labels += [index] * per_condition
    clean = backbone.features(images, batch_size=evaluate.batch_size)
    probe = fit_probe(backbone, clean, labels, images.__getitem__, [f"{seed}-{i}" for i in range(len(images))],
                      len(CONDITIONS), Schedule.from_config(evaluate), config.seed, evaluate.recognition_augment)
    return ProceduralProbe(backbone, probe.eval(), evaluate.recognition_augment)


def grade_images(images: dict[str, list[Image.Image]], judge: RulesJudge, checklists: ChecklistSet,
                 probe: ProceduralProbe) -> tuple[list[dict], list[GradedImage]]:
    """Per condition: mean items met under its own checklist and under the others', share recognised; and every
    image as a `GradedImage` (own items, recognised). Each image is analysed once for all checklists."""
    rows, graded = [], []
    for condition, batch in images.items():
        recognised = probe.grade(batch, condition)
        own, others = [], []
        for image, hit in zip(batch, recognised):
            analysis = judge.domain.analyse(image)
            verdicts = {c: judge.grade_analysis(analysis, checklists[c]) for c in images}
            own.append(verdicts[condition].score)
            others.append(float(np.mean([verdicts[c].score for c in images if c != condition])))
            graded.append(GradedImage(condition, tuple(verdicts[condition].items), hit))
        rows.append({"condition": condition, "n": len(batch), "own": float(np.mean(own)), "others": float(np.mean(others)),
                     "recognised": float(np.mean(recognised))})
    return rows, graded


def model_validity(folder: Path, per_condition: int = 24, config: RunConfig | None = None,
                   log=lambda message: None) -> dict:
    """Both tables' numbers for the model in `folder` (module docstring); `config` defaults to the demo preset."""
    folder = Path(folder)
    config = config or load_config("demo")
    checklists = load_checklists(config.judge.checklist)
    judge = make_rules_judge(None, checklists)
    started = time.perf_counter()
    pipe = load_model(folder)
    probe = procedural_probe(config)
    log(f"probe trained ({time.perf_counter() - started:.0f} s)")
    reconstruction, _ = grade_images(reconstructions(pipe, per_condition), judge, checklists, probe)
    log(f"reconstructions graded ({time.perf_counter() - started:.0f} s)")
    generated, graded = grade_images(generations(pipe, per_condition, config), judge, checklists, probe)
    for row in generated:
        row["caption"] = full_look_caption(row["condition"])
        row["cut"] = cut_words(pipe.tokenizer, row["caption"])
    log(f"generations graded ({time.perf_counter() - started:.0f} s)")
    validity = recognition_validity_table(graded, None, config.evaluate.bootstrap, config.seed,
                                          config.evaluate.validity_min_r)
    r_of = {entry["condition"]: entry["r"]["value"] for entry in validity["per_condition"]}
    for row in generated:
        row["r"] = r_of.get(row["condition"], float("nan"))
    return {"model": str(folder), "per_condition": per_condition, "augment": probe.augment,
            "reconstruction": reconstruction, "text_to_image": generated, "validity": validity,
            "seconds": round(time.perf_counter() - started, 1)}


def _number(value: float) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"


def markdown(result: dict) -> str:
    """The two tables and the overall r as markdown."""
    n = result["per_condition"]
    lines = [f"Model `{result['model']}`; {n} images per condition; recognition probe trained on "
             f"{PROBE_PER_CONDITION} procedural images per condition (recognition_augment = {result['augment']}).", "",
             "**Reconstruction** (fresh procedural images, encode + decode): items met of 5",
             "", "| condition | own checklist | other checklists (mean) | recognised |", "|---|---|---|---|"]
    for row in result["reconstruction"]:
        lines.append(f"| {row['condition']} | {_number(row['own'])} | {_number(row['others'])} | {_number(row['recognised'])} |")
    lines += ["", "**Text to image** (base model, full-look caption): items met of 5", "",
              "| condition | caption | own checklist | other checklists (mean) | recognised | r |", "|---|---|---|---|---|---|"]
    for row in result["text_to_image"]:
        caption = f"{row['caption']} (not read: *{row['cut']}*)" if row["cut"] else row["caption"]
        lines.append(f"| {row['condition']} | {caption} | {_number(row['own'])} | {_number(row['others'])} | "
                     f"{_number(row['recognised'])} | {_number(row['r'])} |")
    validity = result["validity"]
    r = validity["r"]
    lines += ["", f"Judge validity on the generated images: r(items met, recognised) = {_number(r['value'])} "
              f"[{_number(r['low'])}, {_number(r['high'])}] over {validity['n']} images; items met "
              f"{_number(validity['items_met_recognised'])} when recognised, {_number(validity['items_met_not_recognised'])} "
              f"when not ({result['seconds']:.0f} s)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m magic_align.demo.validity",
                                     description="What a demo base model can draw (markdown tables).")
    parser.add_argument("model_dir", type=Path, help="a diffusers model folder (e.g. src/magic_align/demo/demo-base)")
    parser.add_argument("--per-condition", type=int, default=24, help="images per condition (default 24)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default; 1 is faster on a machine busy with other work)")
    arguments = parser.parse_args(argv)
    if arguments.per_condition < 2:
        parser.error("--per-condition must be at least 2 (a correlation needs two images)")
    if arguments.threads < 0:
        parser.error("--threads must be 0 or more")
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    try:
        result = model_validity(arguments.model_dir, arguments.per_condition,
                                log=lambda message: print(message, file=sys.stderr, flush=True))
    except MagicError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
