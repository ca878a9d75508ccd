"""The synthesize stage: image-to-image augmentation of the training set with the (aligned) model.

`run_synthesize(config, lora)` turns every real training image into `synthesize.per_image` synthetic images of other
conditions (the same body region when `sample.target_selection = "same_region"`), through the same sampler and
I2I settings as the sample stage (`config.sample`: steps, strength, eta, guidance) without keeping trajectories,
saved at `synthesize.size` px. Unlabeled images in `synthesize.extra_sources` are used as sources too (MAGIC-A),
with any condition as target.

Output: `<out_dir>/images/<synthetic_id>.png` and `<out_dir>/manifest.csv` (columns `MANIFEST_COLUMNS`, paths relative
to the run directory). Seeds and targets are functions of (synthesize.seed, source id, n): a rerun skips what the
manifest already lists and draws the rest exactly as an uninterrupted run would.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from PIL import Image

from magic_align.checklists.schema import load_checklists
from magic_align.config import RunConfig
from magic_align.data.folder import load_folder
from magic_align.data.images import BadImageError, encode_png, load_image
from magic_align.data.split import run_split
from magic_align.data.targets import choose_target
from magic_align.diffusion.loading import load_run_policy, model_hash, policy_files
from magic_align.diffusion.sampler import SampleRequest, SamplingSettings, derived_seed, process_state, sample_batch
from magic_align.progress import StageProgress
from magic_align.run import atomic_write_bytes, atomic_write_text, prepare_run
from magic_align.errors import MagicError

MANIFEST_COLUMNS = (
    "synthetic_id", "path", "source_id", "source_label", "source_group", "source_skin_type", "target_label",
    "prompt", "strength", "seed", "model_hash", "verdict_score", "verdict_items", "settings_hash",
)
# Manifests written before `settings_hash` existed are still read (their sets count as stale).
REQUIRED_COLUMNS = MANIFEST_COLUMNS[:-1]


class SynthesizeError(MagicError, RuntimeError):
    """The synthesis cannot go on as asked; the message says what to change."""


@dataclass
class SynthesizeSummary:
    manifest: Path
    written: int = 0
    already_done: int = 0
    replaced: int = 0  # images of an older model removed first (replace_stale)
    skipped_sources: int = 0
    problems: list[str] = field(default_factory=list)


def read_manifest(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in REQUIRED_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise SynthesizeError(f"{path}: not a synthetic manifest (missing columns {missing})")
        return list(reader)


def write_manifest(path: Path, rows: Sequence[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: row.get(column, "") for column in MANIFEST_COLUMNS})
    atomic_write_text(Path(path), buffer.getvalue())


def synthetic_id(source_id: str, n: int) -> str:
    return f"syn-{source_id}-{n}"


def synthesis_settings_hash(config: RunConfig) -> str:
    """Names everything besides the model that decides a synthetic image: the I2I sampling settings, the prompt
    template, the target rule, the output size and the seed. A set made with other settings is stale, so a
    changed `sample.strength` (say) never silently reuses the images of the old one."""
    settings = SamplingSettings.from_config(config.sample, config.model, keep_trajectory=False)
    key = {
        "steps": settings.steps, "strength": settings.strength, "eta": settings.eta, "guidance": settings.guidance,
        "negative_prompt": settings.negative_prompt, "prompt_template": config.model.prompt_template,
        "target_selection": config.sample.target_selection, "size": config.synthesize.size,
        "seed": config.synthesize.seed,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def run_synthesize(
    config: RunConfig,
    lora: Path | None,
    out_dir: Path | None = None,
    sources: list | None = None,
    progress: bool = True,
    replace_stale: bool = False,
) -> Path:
    """Synthesize (resumably) and return the manifest path. `sources` (records) defaults to the train split plus
    `synthesize.extra_sources`; `lora` is the aligned LoRA stacked on the run's model (None: the run's model).

    A folder whose manifest lists images of another model (e.g. the LoRA was retrained) is refused with a
    `SynthesizeError`, or, with `replace_stale`, emptied (old images and manifest) and made again."""
    return synthesize(config, lora, out_dir, sources, progress, replace_stale).manifest


def synthesize(config: RunConfig, lora: Path | None, out_dir: Path | None = None, sources: list | None = None,
               progress: bool = True, replace_stale: bool = False) -> SynthesizeSummary:
    """`run_synthesize` returning counts as well (the CLI prints them)."""
    paths = prepare_run(config)
    out_dir = Path(out_dir) if out_dir is not None else paths.synthetic
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.csv"
    checklists = load_checklists(config.judge.checklist)
    split = run_split(config, paths)
    if sources is None:
        sources = list(split.train) + extra_sources(config)
    # The model's hash from its files alone (no model load), so a finished set of an older model is caught too.
    expected_hash = model_hash(config.model, policy_files(paths, lora))
    expected_settings = synthesis_settings_hash(config)
    rows = read_manifest(manifest_path)
    stale_models = sorted({row["model_hash"] for row in rows} - {expected_hash})
    stale_settings = sorted({row.get("settings_hash") or "(none)" for row in rows} - {expected_settings})
    replaced = 0
    if stale_models or stale_settings:
        if not replace_stale:
            why = (f"model {stale_models}, not {expected_hash} (the model or LoRA changed since)" if stale_models else
                   f"sampling settings {stale_settings}, not {expected_settings} (sample.strength, steps, guidance, "
                   "eta, the prompt template, target rule, synthesize.size or seed changed since)")
            raise SynthesizeError(
                f"{manifest_path} lists images made with {why}; write to another folder (--out) or delete it to "
                "start over"
            )
        replaced = _remove_set(manifest_path, images_dir)
        rows = []
    summary = SynthesizeSummary(manifest=manifest_path, already_done=len(rows), replaced=replaced)
    done = {row["synthetic_id"] for row in rows if (paths.root / row["path"]).is_file()}
    rows = [row for row in rows if row["synthetic_id"] in done]

    per_image = config.synthesize.per_image
    todo = [(record, n) for record in sources for n in range(per_image) if synthetic_id(record.id, n) not in done]
    if not todo:
        write_manifest(manifest_path, rows)
        return summary
    _, _, device = process_state()
    pipe = load_run_policy(config, paths, extra_lora=lora, device=device)
    if pipe.magic_model_hash != expected_hash:  # the files changed while loading: the check above was wrong
        raise SynthesizeError(
            f"the model's files changed while it was loading (hash {expected_hash} before, {pipe.magic_model_hash} "
            "after); rerun when the training that writes them has finished"
        )
    settings = SamplingSettings.from_config(config.sample, config.model, keep_trajectory=False)
    region_of = {checklist.condition: checklist.region for checklist in checklists.conditions}
    classes = list(split.classes)
    size = config.synthesize.size
    total = len(sources) * per_image
    # Ctrl-C writes the manifest of the images finished so far before the stage ends.
    with StageProgress("synthesizing", total, unit="image", completed=total - len(todo), enabled=progress,
                       resume="rerun the same command: images already in the manifest are skipped",
                       on_interrupt=lambda: write_manifest(manifest_path, rows)) as bar:
        for start in range(0, len(todo), config.synthesize.batch_size):
            chunk = todo[start : start + config.synthesize.batch_size]
            reqs, meta = [], []
            for record, n in chunk:
                try:
                    image = load_image(record.path, config.data.max_image_pixels, record.row or None)
                except BadImageError as error:
                    if config.data.on_bad_image == "stop":
                        write_manifest(manifest_path, rows)
                        raise
                    summary.skipped_sources += 1
                    summary.problems.append(str(error))
                    bar.advance()
                    continue
                key = (config.synthesize.seed, record.id, n)
                target = choose_target(record.label, classes, random.Random(f"synthesize-target:{key}"),
                                       config.sample.target_selection, region_of, record.region)
                prompt = config.model.prompt_template.format(token=checklists[target].token)
                seed = derived_seed("synthesize", *key)
                reqs.append(SampleRequest(synthetic_id(record.id, n), prompt, seed, image))
                meta.append((record, target, seed, prompt))
            for result, (record, target, seed, prompt) in zip(sample_batch(pipe, reqs, settings, config.model.resolution), meta):
                image = result.image if result.image.size == (size, size) else result.image.resize((size, size), Image.LANCZOS)
                image_path = images_dir / f"{result.sample_id}.png"
                atomic_write_bytes(image_path, encode_png(image))
                rows.append({
                    "synthetic_id": result.sample_id,
                    "path": Path(os.path.relpath(image_path, paths.root)).as_posix(),
                    "source_id": record.id,
                    "source_label": record.label or "",
                    "source_group": record.group,
                    "source_skin_type": record.skin_type,
                    "target_label": target,
                    "prompt": prompt,
                    "strength": settings.strength,
                    "seed": seed,
                    "model_hash": expected_hash,
                    "settings_hash": expected_settings,
                    "verdict_score": "",
                    "verdict_items": "",
                })
                summary.written += 1
            write_manifest(manifest_path, rows)  # after every batch: a crash loses at most one batch
            bar.advance(len(reqs))
    return summary


def _remove_set(manifest_path: Path, images_dir: Path) -> int:
    """Delete a stale set: the manifest and the PNGs in its images/ folder (nothing else in the folder)."""
    removed = 0
    for image_path in images_dir.glob("*.png"):
        image_path.unlink()
        removed += 1
    manifest_path.unlink(missing_ok=True)
    return removed


def extra_sources(config: RunConfig) -> list:
    """Unlabeled images of `synthesize.extra_sources` (MAGIC-A): any condition may be their target."""
    if config.synthesize.extra_sources is None:
        return []
    records = load_folder(Path(config.synthesize.extra_sources))
    # ids prefixed so an extra image can never collide with a training image's synthetic id
    return [replace(record, id=f"extra-{record.id}", label=None) for record in records]
