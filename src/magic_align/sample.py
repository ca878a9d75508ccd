"""The sample stage: image-to-image trajectories from real training images towards other conditions.

`run_sample(config, round_index, policy_lora)` draws `sample.num_sources` (source, target) units from the train split
(its few-shot subset in the few-shot setting, plus MAGIC-A's unlabeled sources when configured: `sampling_sources`),
K = `sample.samples_per_unit` samples each, and writes, under `run/samples/round-<k>/`:

    images/<sample_id>.png            the decoded samples (metadata-free PNG)
    trajectories/p<proc>-<n>.safetensors   latents, log-probs, timesteps, prompt ids (diffusion/trajectories.py)

and one ledger row per sample (`SampleRow`). Units, targets and seeds are functions of (sample.seed, round, unit), so
a rerun skips the units whose samples are recorded and draws exactly the remaining ones; under `accelerate launch`
process i takes units i, i + n, i + 2n, ... and writes its own shards.

A shard is written before its ledger rows, and carries the rows in its header: if the process dies between the
two, the next run recovers the rows from the shard instead of sampling the units again.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from magic_align.checklists.schema import load_checklists
from magic_align.config import RunConfig
from magic_align.data.images import BadImageError, encode_png, load_image, sha256_file
from magic_align.data.split import run_split
from magic_align.data.targets import choose_target
from magic_align.diffusion.loading import load_run_policy, model_hash, policy_files
from magic_align.diffusion.sampler import (SampleRequest, SamplingSettings, derived_seed, process_state, sample_batch,
                                           wait_for_every_process)
from magic_align.diffusion.trajectories import TrajectoryStore, next_shard_number, shard_name, write_shard
from magic_align.errors import MagicError
from magic_align.ledger import Ledger, SampleRow
from magic_align.progress import StageProgress
from magic_align.run import RunPaths, atomic_write_bytes, prepare_run, set_aside
from magic_align.synthesize import extra_sources

logger = logging.getLogger(__name__)


class SampleError(MagicError, RuntimeError):
    """A sample round that cannot go on as configured (its stored samples were made otherwise and carry reviews)."""


@dataclass(frozen=True)
class Unit:
    """One (source image, target condition) unit; its K samples are compared with each other."""

    unit_id: str
    index: int
    source_id: str
    source_path: Path
    source_row: int
    source_label: str
    target_label: str
    prompt: str


@dataclass
class SampleSummary:
    round: int
    units_planned: int = 0
    units_already_done: int = 0
    units_sampled: int = 0
    units_skipped: int = 0  # unreadable source images (data.on_bad_image = "skip")
    samples_written: int = 0
    samples_recovered: int = 0  # in a shard but not yet in the ledger (a crash in between)
    shards: list[str] = field(default_factory=list)
    model_hash: str = ""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    set_aside: str | None = None  # where samples made under other settings went (relative to the run)
    set_aside_because: list[str] = field(default_factory=list)


def sample_id(unit_id: str, k: int) -> str:
    return f"{unit_id}-k{k}"


def sampling_sources(config: RunConfig, split) -> list:
    """The images alignment samples from: the few-shot subset when `data.few_shot_fraction` is set (the rest of the
    train split is then not labelled data the run may use), else the whole train split; plus the unlabeled images
    of `synthesize.extra_sources` (MAGIC-A), whose targets may be any condition."""
    labelled = split.few_shot if config.data.few_shot_fraction else split.train
    return list(labelled) + extra_sources(config)


def source_skin_types(config: RunConfig, split) -> dict[str, int]:
    """Source id -> Fitzpatrick type (-1: unknown) of every image units are drawn from."""
    return {record.id: record.skin_type for record in sampling_sources(config, split)}


def of_source_skin_types(items: list, skin_type_of: dict[str, int], types) -> list:
    """The items (pairs, samples: anything with a `source_id`) whose source image has one of the Fitzpatrick
    `types` (`dpo.source_skin_types`, `rft.source_skin_types`); a source of unknown type is left out."""
    return [item for item in items if skin_type_of.get(item.source_id, -1) in types]


def plan_units(config: RunConfig, train, classes: list[str], checklists, round_index: int) -> list[Unit]:
    """The round's units, the same for the same seed: sources drawn without replacement (cycling through a
    shuffled train split when more units than images are asked), targets by `choose_target`."""
    if not train:
        raise ValueError("the train split is empty: nothing to sample from")
    sample_cfg = config.sample
    order = sorted(train, key=lambda record: record.id)
    random.Random(f"sources:{sample_cfg.seed}:{round_index}").shuffle(order)
    region_of = {checklist.condition: checklist.region for checklist in checklists.conditions}
    units = []
    for index in range(sample_cfg.num_sources):
        record = order[index % len(order)]
        rng = random.Random(f"target:{sample_cfg.seed}:{round_index}:{index}")
        target = choose_target(record.label, classes, rng, sample_cfg.target_selection, region_of, record.region)
        units.append(
            Unit(
                unit_id=f"r{round_index}-u{index:05d}",
                index=index,
                source_id=record.id,
                source_path=Path(record.path),
                source_row=record.row,
                source_label=record.label or "",
                target_label=target,
                prompt=config.model.prompt_template.format(token=checklists[target].token),
            )
        )
    return units


def stale_round(config: RunConfig, paths: RunPaths, units: list[Unit], round_index: int,
                policy_lora: Path | None, ledger: Ledger) -> list[str]:
    """What differs between the round's stored samples and the ones this configuration makes (empty: nothing).

    Units are resumed by id, so without this a changed `sample.strength`, seed, source set, target rule or
    sampling policy (a retrained earlier round) would keep the old samples and train on them as if new. The shard
    headers record the settings and the policy's model hash, the ledger rows each unit's source, target, prompt and
    seed; the expected model hash is computed from the weight files, without loading the model. More or fewer units
    or samples per unit are not a change: the units are a prefix of one plan."""
    shards = TrajectoryStore(paths.trajectories(round_index))
    expected = {
        **SamplingSettings.from_config(config.sample, config.model).choices(),
        "model_hash": model_hash(config.model, policy_files(paths, policy_lora)),
        "resolution": config.model.resolution,
        "model_dtype": config.model.dtype,
    }
    reasons = []
    for key, value in expected.items():
        recorded = {header[key] for header in shards.headers.values() if key in header} - {value}
        if recorded:
            what = "the sampling policy (model hash)" if key == "model_hash" else key
            reasons.append(f"{what} {', '.join(sorted(map(repr, recorded)))} -> {value!r}")
    planned = {unit.unit_id: unit for unit in units}
    # the ledger's rows and the shards' own records (a shard written just before a crash has no rows yet)
    stored = [vars(row) for row in ledger.samples(round_index)]
    stored += [record for header in shards.headers.values() for record in header.get("samples", [])]
    for record in stored:
        unit = planned.get(record["unit_id"])
        if unit is not None and (
            (record["source_id"], record["target_label"], record["prompt"]) != (unit.source_id, unit.target_label,
                                                                                unit.prompt)
            or record["seed"] != derived_seed(config.sample.seed, round_index, unit.index, record["k"])
        ):
            reasons.append(f"the units (unit {record['unit_id']}: source {record['source_id']}, target "
                           f"{record['target_label']}, seed {record['seed']} stored; sample.seed, the sources or the "
                           "target rule changed)")
            break
    return reasons


def refuse_reviewed_round(ledger: Ledger, round_index: int, reasons: list[str]) -> None:
    """A round whose samples carry expert reviews is never replaced: reviews name samples by id, and the new
    samples would reuse the ids (and inherit the reviews)."""
    reviewed = ledger.reviews(round=round_index)
    if reviewed:
        raise SampleError(
            f"round {round_index} was sampled under other settings ({'; '.join(reasons)}), and {len(reviewed)} of its "
            "samples carry expert reviews, which would be attached to the new samples of the same ids; restore the "
            "settings, or use a new run directory (runs_dir or name) for the new ones"
        )


def set_aside_stale_round(paths: RunPaths, ledger: Ledger, round_index: int) -> Path | None:
    """Forget the round's sample and pair rows and move `samples/round-<k>/` to `.other-settings[-N]` (None: there
    was no folder), so the round is sampled again; verdicts stay (keyed by image content). The pipeline's records
    of this round's stages and of everything after them are marked stale, so `magic run` redoes them."""
    # rows first: a crash before the move leaves shards whose records the stale check compares on the next run
    ledger.forget_round(round_index)
    ledger.mark_stale(downstream_stages(ledger, round_index), f"round {round_index} was sampled again")
    folder = paths.samples(round_index)
    return set_aside(folder) if folder.exists() else None


def downstream_stages(ledger: Ledger, round_index: int) -> list[str]:
    """The pipeline's stage records (`run:<stage>`) that depend on round `round_index`'s samples: every stage after
    fine-tuning except those of earlier rounds."""
    names = []
    for status in ledger.stages():
        if not status.stage.startswith("run:") or status.stage == "run:finetune":
            continue
        found = re.search(r"/round-(\d+)$", status.stage)
        if found is None or int(found.group(1)) >= round_index:
            names.append(status.stage)
    return names


def _recover_from_shards(ledger, store: TrajectoryStore, done: set[str]) -> int:
    """Register samples that a shard holds but the ledger lacks (written just before a crash)."""
    rows = []
    for shard_path, header in store.headers.items():
        for row_index, record in enumerate(header.get("samples", [])):
            if record["sample_id"] not in done and store.locate(record["sample_id"])[0] == shard_path:
                rows.append(SampleRow(**record, shard=header["shard"], shard_index=row_index))
    if rows:
        ledger.add_samples(rows)
    return len(rows)


def run_sample(
    config: RunConfig,
    round_index: int = 0,
    policy_lora: Path | None = None,
    progress: bool = True,
) -> SampleSummary:
    """Sample round `round_index` (resumable); `policy_lora` stacks an aligned LoRA on the run's model (later rounds)."""
    if round_index > 0 and policy_lora is None:
        raise SampleError(f"round {round_index} is sampled by the policy aligned in round {round_index - 1}: pass "
                          f"--lora runs/<name>/aligned/dpo/round-{round_index - 1} (what `magic run` does)")
    if policy_lora is not None and not Path(policy_lora).exists():  # checked before anything, also on a finished round
        raise FileNotFoundError(f"policy LoRA {policy_lora} does not exist; expected a LoRA folder or file such as "
                                "runs/<name>/aligned/dpo")
    started = time.perf_counter()
    paths = prepare_run(config)
    process_index, process_count, device = process_state()
    summary = SampleSummary(round=round_index)
    checklists = load_checklists(config.judge.checklist)
    split = run_split(config, paths)
    units = plan_units(config, sampling_sources(config, split), split.classes, checklists, round_index)
    summary.units_planned = len(units)
    mine = units[process_index::process_count]

    ledger = Ledger(paths.ledger)
    # every process reads the same state and refuses alike; only then does the main process change anything
    reasons = stale_round(config, paths, units, round_index, policy_lora, ledger)
    if reasons:
        refuse_reviewed_round(ledger, round_index, reasons)
    wait_for_every_process(process_count)
    if reasons and process_index == 0:
        moved = set_aside_stale_round(paths, ledger, round_index)
        summary.set_aside = moved.relative_to(paths.root).as_posix() if moved else None
        summary.set_aside_because = reasons
        kept = f"kept in {summary.set_aside}" if moved else "their rows forgotten"
        Console(stderr=True).print(
            f"sample round {round_index}: its samples were made under other settings ({'; '.join(reasons)}); "
            f"{kept} (their judge answers stay in the ledger), sampling again",
            highlight=False, markup=False, soft_wrap=True)
    wait_for_every_process(process_count)  # the others resume from what the main process left
    images_dir = paths.sample_images(round_index)
    shards_dir = paths.trajectories(round_index)
    images_dir.mkdir(parents=True, exist_ok=True)
    shards_dir.mkdir(parents=True, exist_ok=True)
    done = {row.sample_id for row in ledger.samples(round_index)}
    # every process recovers (re-adding an identical row is a no-op), so none re-samples a recovered unit
    summary.samples_recovered = _recover_from_shards(ledger, TrajectoryStore(shards_dir), done)
    done = {row.sample_id for row in ledger.samples(round_index)}
    per_unit = config.sample.samples_per_unit
    todo = [unit for unit in mine if not all(sample_id(unit.unit_id, k) in done for k in range(per_unit))]
    summary.units_already_done = len(mine) - len(todo)
    if not todo:
        summary.seconds = time.perf_counter() - started
        return summary

    pipe = load_run_policy(config, paths, extra_lora=policy_lora, device=device)
    summary.model_hash = pipe.magic_model_hash
    settings = SamplingSettings.from_config(config.sample, config.model)
    header = {
        **settings.header(pipe.scheduler),
        "model_hash": summary.model_hash,
        "round": round_index,
        "resolution": config.model.resolution,
        "policy_lora": str(policy_lora) if policy_lora else None,
        "model_dtype": config.model.dtype,  # the precision the log-probs were computed in
    }
    units_per_batch = max(1, config.sample.batch_size // per_unit)
    pending: list[tuple[dict, object]] = []  # (sample record, SampleResult) not yet in a shard
    shard_number = next_shard_number(shards_dir, process_index)

    def flush() -> None:
        nonlocal shard_number
        if not pending:
            return
        name = shard_name(process_index, shard_number)
        shard_number += 1
        relative = (shards_dir / name).relative_to(paths.root).as_posix()
        records = [record for record, _ in pending]
        results = [result for _, result in pending]
        write_shard(
            shards_dir / name,
            [record["sample_id"] for record in records],
            torch.stack([result.latents for result in results]),
            torch.stack([result.log_probs for result in results]),
            results[0].timesteps,
            torch.stack([result.prompt_ids for result in results]),
            header={**header, "shard": relative, "samples": records},
            latent_dtype=settings.latent_dtype,
        )
        ledger.add_samples([SampleRow(**record, shard=relative, shard_index=i) for i, record in enumerate(records)])
        summary.shards.append(relative)
        summary.samples_written += len(records)
        pending.clear()

    # Ctrl-C stores the finished samples still waiting for a shard (flush) before the stage ends.
    with StageProgress(f"sampling round {round_index}", len(mine) * per_unit, unit="image",
                       completed=summary.units_already_done * per_unit, enabled=progress and process_index == 0,
                       resume="rerun the same command: units already in the ledger are skipped",
                       on_interrupt=flush) as bar:
        for start in range(0, len(todo), units_per_batch):
            batch_units = todo[start : start + units_per_batch]
            reqs, owners = [], []
            for unit in batch_units:
                try:
                    source = load_image(unit.source_path, config.data.max_image_pixels, unit.source_row)
                except BadImageError as error:
                    if config.data.on_bad_image == "stop":
                        flush()  # keep what is done before stopping
                        raise
                    summary.units_skipped += 1
                    summary.problems.append(str(error))
                    bar.advance(per_unit)
                    continue
                for k in range(per_unit):
                    seed = derived_seed(config.sample.seed, round_index, unit.index, k)
                    reqs.append(SampleRequest(sample_id(unit.unit_id, k), unit.prompt, seed, source))
                    owners.append((unit, k, seed))
            if not reqs:
                continue
            for result, (unit, k, seed) in zip(sample_batch(pipe, reqs, settings, config.model.resolution), owners):
                image_path = images_dir / f"{result.sample_id}.png"
                atomic_write_bytes(image_path, encode_png(result.image))
                record = {
                    "sample_id": result.sample_id,
                    "round": round_index,
                    "unit_id": unit.unit_id,
                    "k": k,
                    "image_path": image_path.relative_to(paths.root).as_posix(),
                    "image_sha256": sha256_file(image_path),
                    "source_id": unit.source_id,
                    "source_label": unit.source_label,
                    "target_label": unit.target_label,
                    "prompt": unit.prompt,
                    "seed": seed,
                    "synthetic": True,
                }
                pending.append((record, result))
                if len(pending) >= config.sample.shard_size:
                    flush()
            summary.units_sampled += len({unit.unit_id for unit, _, _ in owners})
            bar.advance(len(reqs))
        flush()
    summary.seconds = time.perf_counter() - started
    return summary
