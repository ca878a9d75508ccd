"""Did alignment help? The same held-out source images, targets and seeds through each model, graded by a judge.

Every model (unaligned I2I, MAGIC-DPO, MAGIC-RFT) turns the same test-split images into the same target
conditions with the same noise, because synthesis derives targets and seeds from (seed, source id, index)
only. The comparison is therefore paired per unit, and the bootstrap interval of the mean difference in items
met resamples source images (with `evaluate.alignment_per_source` > 1 each source gives several units, with
their own targets and seeds). Sources come from the test split, so no image the models were aligned on is graded.

Written to `eval/alignment.json` (format in docs/formats.md) and shown in the report.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import numpy as np
from rich.console import Console

from magic_align.config import RunConfig
from magic_align.evaluate.labels import SettingLabels
from magic_align.run import RunPaths, atomic_write_text, prepare_run
from magic_align.stats import bootstrap, mean_difference
from magic_align.errors import MagicError

# the models compared, named as in `magic evaluate`; the first is the baseline of every difference
ALIGNMENT_SETTINGS = ("i2i", "magic-dpo", "magic-rft")


class AlignmentError(MagicError, ValueError):
    """The comparison cannot run as asked; the message says why."""


def held_out_sources(split, count: int, seed: int) -> list:
    """A seeded sample of `count` test-split records (all of them when there are fewer)."""
    records = sorted(split.test, key=lambda record: record.id)
    random.Random(f"alignment-sources:{seed}").shuffle(records)
    return records[:count]


def per_source_means(by_unit: dict[str, float], units: Sequence[str], source_of: dict[str, str] | None) -> np.ndarray:
    """The mean score of each source's units (one value per unit when `source_of` is None): the bootstrap then
    resamples sources, so several images of one source are never counted as independent evidence."""
    if source_of is None:
        return np.array([by_unit[unit] for unit in units], float)
    groups: dict[str, list[float]] = {}
    for unit in units:
        groups.setdefault(source_of[unit], []).append(by_unit[unit])
    return np.array([np.mean(values) for _, values in sorted(groups.items())], float)


def paired_summary(scores: dict[str, dict[str, int]], baseline: str, resamples: int, seed: int,
                   source_of: dict[str, str] | None = None) -> dict:
    """Per-setting mean items met with intervals, and each setting minus `baseline` over the units both have.

    `source_of` maps a unit to its source image: intervals then resample sources (a cluster bootstrap)."""
    settings = {
        name: bootstrap(np.mean, per_source_means(by_unit, sorted(by_unit), source_of), resamples=resamples,
                        seed=seed).as_dict()
        for name, by_unit in scores.items()
    }
    differences = {}
    for name, by_unit in scores.items():
        if name == baseline or baseline not in scores:
            continue
        units = sorted(set(by_unit) & set(scores[baseline]))
        if not units:
            continue
        after = per_source_means(by_unit, units, source_of)
        before = per_source_means(scores[baseline], units, source_of)
        differences[f"{name} - {baseline}"] = {
            **mean_difference(after, before, resamples=resamples, seed=seed).as_dict(),
            "units": len(units),
        }
    return {"settings": settings, "differences": differences}


def run_alignment_comparison(
    config: RunConfig,
    settings: Sequence[str] | None = None,
    units: int | None = None,
    console: Console | None = None,
) -> Path:
    """Synthesize from held-out sources with each available model, grade, and write `eval/alignment.json`."""
    from magic_align.checklists.schema import load_checklists
    from magic_align.data.split import run_split
    from magic_align.evaluate.passrate import answered, judge_images
    from magic_align.evaluate.stage import setting_model
    from magic_align.judges import make_judge
    from magic_align.ledger import Ledger
    from magic_align.synthesize import read_manifest, run_synthesize

    console = console or Console(stderr=True)
    paths = prepare_run(config)
    evaluate = config.evaluate
    chosen = list(settings or ALIGNMENT_SETTINGS)
    unknown = [name for name in chosen if name not in ALIGNMENT_SETTINGS]
    if unknown:
        raise AlignmentError(f"unknown setting(s) {unknown}; expected some of {', '.join(ALIGNMENT_SETTINGS)}")
    _require_models(chosen, paths)
    split = run_split(config, paths)
    sources = held_out_sources(split, units or evaluate.alignment_units, config.seed)
    if not sources:
        raise AlignmentError(f"the test split of {paths.root} has no images to use as held-out sources")
    checklists = load_checklists(config.judge.checklist)
    judge_config = evaluate.held_out_judge or config.judge
    judge = make_judge(judge_config, checklists)
    compare_config = config.model_copy(deep=True)  # n images per source, each with its own target and seed
    compare_config.synthesize.per_image = evaluate.alignment_per_source

    scores: dict[str, dict[str, int]] = {}
    images: dict[str, dict[str, str]] = {}
    targets: dict[str, tuple[str, str]] = {}
    notes: list[str] = []
    for name in chosen:
        needed, lora = setting_model(name, paths)
        if not needed.exists():
            notes.append(f"{name}: no model at {needed.relative_to(paths.root)} (train it first); left out")
            continue
        console.print(f"alignment comparison: {len(sources)} held-out sources through the {name} model")
        manifest = run_synthesize(compare_config, lora, out_dir=_output_dir(config, paths, name, lora), sources=sources)
        rows = read_manifest(manifest)
        with Ledger(paths.ledger) as ledger:
            verdicts = judge_images(
                judge,
                ledger,
                [paths.root / row["path"] for row in rows],
                [row["target_label"] for row in rows],
                checklists,
                concurrency=judge_config.concurrency,
            )
        scores[name] = {}
        images[name] = {}
        unreadable = 0
        for row, items in zip(rows, verdicts):
            unit = row["synthetic_id"]
            if not answered(items):  # an answer the judge gave but nobody could read is no score, not 0 items
                unreadable += 1
                continue
            scores[name][unit] = sum(1 for value in items if value == 1)
            images[name][unit] = row["path"]
            targets[unit] = (row["source_id"], row["target_label"])
        if unreadable:
            notes.append(f"{name}: {unreadable} of {len(rows)} answers could not be read and are left out "
                         "(they stay stored as failed answers; they are not scored as 0 items met)")

    source_of = {unit: source_id for unit, (source_id, _) in targets.items()}
    summary = paired_summary(scores, ALIGNMENT_SETTINGS[0], evaluate.bootstrap, config.seed, source_of)
    source_paths = {record.id: record.path for record in sources}
    labels = SettingLabels.of_run(paths)  # each aligned model named with the objective it was trained with
    result = {
        "judge": judge.id,
        "sources": len(sources),
        "settings": {
            name: {**labels.describe(name), "mean_items": summary["settings"][name], "images": sorted(images[name].values())}
            for name in scores
        },
        "differences": summary["differences"],
        "units": [
            {
                "unit": unit,
                "source": _relative(source_paths.get(source_id), paths.root),
                "target": target,
                "images": {name: images[name][unit] for name in scores if unit in images[name]},
                "scores": {name: scores[name][unit] for name in scores if unit in scores[name]},
            }
            for unit, (source_id, target) in sorted(targets.items())
        ],
        "notes": notes,
    }
    output = paths.eval / "alignment.json"
    atomic_write_text(output, json.dumps(result, indent=2))
    for name, estimate in summary["settings"].items():
        console.print(f"  {labels(name)}: mean items met {estimate['value']:.2f} [{estimate['low']:.2f}, {estimate['high']:.2f}]")
    for name, estimate in summary["differences"].items():
        console.print(f"  {name}: {estimate['value']:+.2f} [{estimate['low']:+.2f}, {estimate['high']:+.2f}]")
    for note in notes:
        console.print(f"  [yellow]note[/yellow]: {note}")
    return output


def _require_models(chosen: Sequence[str], paths: RunPaths) -> None:
    """Refuse, naming the stage to run, when there is nothing to compare: no unaligned model for the baseline, or
    none of the aligned models asked for. One aligned model of two is enough (the other is noted as left out)."""
    from magic_align.evaluate.stage import setting_model

    baseline = ALIGNMENT_SETTINGS[0]
    if baseline in chosen and not setting_model(baseline, paths)[0].exists():
        raise AlignmentError(f"no preliminary model in {paths.model} to compare against: run `magic finetune` first "
                             "(then `magic train dpo` or `magic train rft`)")
    aligned = [name for name in chosen if name != baseline]
    if aligned and not any(setting_model(name, paths)[0].exists() for name in aligned):
        commands = " or ".join(f"`magic train {name.removeprefix('magic-')}`" for name in aligned)
        raise AlignmentError(f"no aligned model in {paths.aligned} to compare ({', '.join(aligned)}): run {commands} "
                             "first")


def _output_dir(config: RunConfig, paths: RunPaths, name: str, lora: Path | None) -> Path:
    """One folder per model version and sampling settings, so a retrained model or a changed strength never mixes
    with (or silently reuses) the images of the previous one."""
    from magic_align.diffusion.loading import model_hash, policy_files
    from magic_align.synthesize import synthesis_settings_hash

    model = model_hash(config.model, policy_files(paths, lora))
    return paths.eval / "alignment" / f"{name}-{model}-{synthesis_settings_hash(config)}"


def _relative(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)
