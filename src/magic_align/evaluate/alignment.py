"""Did alignment help? The same held-out source images, targets and seeds through each model, graded by a judge.

Every model (unaligned I2I, MAGIC-DPO, MAGIC-RFT) turns the same test-split images into the same target
conditions with the same noise, because synthesis derives targets and seeds from (seed, source id, index)
only. The comparison is therefore paired per unit, and the bootstrap interval of the mean difference in items
met resamples source images (with `evaluate.alignment_per_source` > 1 each source gives several units, with
their own targets and seeds). Sources come from the test split, so no image the models were aligned on is graded.

Which part of it is a choice (data/split.py, docs/evaluate.md): the tuning set (the default) for choosing settings,
written to `eval/alignment-tuning.json`; or the locked set, for the figures a report states, written to
`eval/alignment.json`. Each file says its set ("set"), and `read_locked_alignment` refuses a file made from
another set where a locked figure is expected (the report, `magic run`'s closing figures).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

import numpy as np
from rich.console import Console

from magic_align.backbones import BackboneError
from magic_align.checklists.schema import load_checklists
from magic_align.config import RunConfig
from magic_align.data.split import check_roles, run_split
from magic_align.diffusion.loading import model_hash, policy_files
from magic_align.evaluate.labels import SettingLabels
from magic_align.evaluate.metrics import SKIN_TYPE_GROUPS, skin_group
from magic_align.evaluate.passrate import answered, judge_images
from magic_align.evaluate.recognition import RecognitionError, artefact_measure, recognition_accuracy, run_recognizer
from magic_align.evaluate.stage import _device, setting_model
from magic_align.evaluate.validity import GradedImage, confirmation, validity_table
from magic_align.judges import make_judge
from magic_align.ledger import Ledger
from magic_align.run import RunPaths, atomic_write_text, prepare_run
from magic_align.stats import bootstrap, mean_difference
from magic_align.errors import MagicError
from magic_align.synthesize import extra_sources, read_manifest, run_synthesize, synthesis_settings_hash

# the models compared, named as in `magic evaluate`; the first is the baseline of every difference
ALIGNMENT_SETTINGS = ("i2i", "magic-dpo", "magic-rft")


# the sets a comparison can grade (data roles, data/split.py) and the file each one's figures go to
ALIGNMENT_SETS = ("tuning", "locked")
ALIGNMENT_FILES = {"tuning": "alignment-tuning.json", "locked": "alignment.json"}


class AlignmentError(MagicError, ValueError):
    """The comparison cannot run as asked; the message says why."""


def alignment_path(paths: RunPaths, set_name: str) -> Path:
    """Where the comparison on `set_name` is written: eval/alignment.json holds locked-set figures only."""
    if set_name not in ALIGNMENT_SETS:
        raise AlignmentError(f"unknown comparison set {set_name!r}; expected {' or '.join(ALIGNMENT_SETS)}")
    return paths.eval / ALIGNMENT_FILES[set_name]


def require_locked(data: dict, path: Path) -> dict:
    """`data` (a comparison file) when it was made on the locked set; else an AlignmentError naming the file, the
    set it was made from and the command that makes a locked one."""
    made_on = data.get("set") if isinstance(data, dict) else None
    if made_on != "locked":
        found = f"the {made_on} set" if isinstance(made_on, str) else "no recorded set (made before data roles existed)"
        raise AlignmentError(f"{path} holds figures from {found}, where locked-set figures are required; make them "
                             "with: magic compare CONFIG --set-name locked")
    return data


def read_locked_alignment(path: Path) -> dict:
    """A comparison file that must hold locked-set figures (`require_locked`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AlignmentError(f"{path} is not valid JSON: {error}") from None
    return require_locked(data, Path(path))


def held_out_sources(split, count: int, seed: int, set_name: str = "tuning") -> list:
    """A seeded sample of `count` records of one set of the test split, tuning or locked (all of them when there
    are fewer)."""
    records = sorted(split.role(set_name), key=lambda record: record.id)
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


def grouped_summaries(scores: dict[str, dict[str, int]], baseline: str, group_of: dict[str, str], order: Sequence[str],
                      resamples: int, seed: int, source_of: dict[str, str]) -> dict[str, dict]:
    """`paired_summary` within each group of units (the source's skin-type group, the target condition), groups in
    `order` first, then any other in name order; each with the number of its sources. Where the gain comes from:
    a mean gain can hide a loss on one skin type or one condition."""
    named = list(order) + sorted(set(group_of.values()) - set(order))
    result = {}
    for group in named:
        members = {unit for unit, its_group in group_of.items() if its_group == group}
        part = {name: {unit: score for unit, score in by_unit.items() if unit in members} for name, by_unit in scores.items()}
        part = {name: by_unit for name, by_unit in part.items() if by_unit}
        if part:
            result[group] = {"sources": len({source_of[unit] for unit in members}),
                             **paired_summary(part, baseline, resamples, seed, source_of)}
    return result


def run_alignment_comparison(
    config: RunConfig,
    settings: Sequence[str] | None = None,
    units: int | None = None,
    console: Console | None = None,
    set_name: str = "tuning",
) -> Path:
    """Synthesize from held-out sources of `set_name` (tuning or locked) with each available model, grade, and write
    `eval/alignment-tuning.json` or (locked) `eval/alignment.json`."""
    console = console or Console(stderr=True)
    paths = prepare_run(config)
    output = alignment_path(paths, set_name)
    evaluate = config.evaluate
    chosen = list(settings or ALIGNMENT_SETTINGS)
    unknown = [name for name in chosen if name not in ALIGNMENT_SETTINGS]
    if unknown:
        raise AlignmentError(f"unknown setting(s) {unknown}; expected some of {', '.join(ALIGNMENT_SETTINGS)}")
    _require_models(chosen, paths)
    split = run_split(config, paths)
    if set_name == "locked":  # the stated figures: no locked source may be a training or tuning image, even as a copy
        check_roles(split, extra_train=extra_sources(config))  # MAGIC-A's extra images are training sources too
    sources = held_out_sources(split, units or evaluate.alignment_units, config.seed, set_name)
    if not sources:
        raise AlignmentError(f"the {set_name} set of {paths.root} has no images to use as held-out sources")
    checklists = load_checklists(config.judge.checklist)
    judge_config = evaluate.held_out_judge or config.judge
    judge = make_judge(judge_config, checklists)
    compare_config = config.model_copy(deep=True)  # n images per source, each with its own target and seed
    compare_config.synthesize.per_image = evaluate.alignment_per_source

    scores: dict[str, dict[str, int]] = {}
    images: dict[str, dict[str, str]] = {}
    answers: dict[str, dict[str, list]] = {}  # the judge's item answers, for the validity table
    targets: dict[str, tuple[str, str]] = {}
    notes: list[str] = []
    for name in chosen:
        needed, lora = setting_model(name, paths)
        if not needed.exists():
            notes.append(f"{name}: no model at {needed.relative_to(paths.root)} (train it first); left out")
            continue
        console.print(f"alignment comparison: {len(sources)} held-out {set_name}-set sources through the {name} model")
        manifest = run_synthesize(compare_config, lora, out_dir=_output_dir(config, paths, name, lora, set_name),
                                  sources=sources)
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
        answers[name] = {}
        unreadable = 0
        for row, items in zip(rows, verdicts):
            unit = row["synthetic_id"]
            if not answered(items):  # an answer the judge gave but nobody could read is no score, not 0 items
                unreadable += 1
                continue
            scores[name][unit] = sum(1 for value in items if value == 1)
            images[name][unit] = row["path"]
            answers[name][unit] = list(items)
            targets[unit] = (row["source_id"], row["target_label"])
        if unreadable:
            notes.append(f"{name}: {unreadable} of {len(rows)} answers could not be read and are left out "
                         "(they stay stored as failed answers; they are not scored as 0 items met)")

    source_of = {unit: source_id for unit, (source_id, _) in targets.items()}
    summary = paired_summary(scores, ALIGNMENT_SETTINGS[0], evaluate.bootstrap, config.seed, source_of)
    item_ids = {c.condition: [item.id for item in c.items] for c in checklists.conditions}
    independent = independent_measures(config, paths, split, set_name, sources, images, answers, targets, source_of,
                                       item_ids, notes, summary["differences"])
    recognition = independent.pop("recognition", {})
    source_paths = {record.id: record.path for record in sources}
    skin_of = {record.id: record.skin_type for record in sources}
    by_skin = grouped_summaries(scores, ALIGNMENT_SETTINGS[0], {unit: skin_group(skin_of[source]) for unit, source
                                                                in source_of.items()}, list(SKIN_TYPE_GROUPS),
                                evaluate.bootstrap, config.seed, source_of)
    by_target = grouped_summaries(scores, ALIGNMENT_SETTINGS[0], {unit: target for unit, (_, target) in targets.items()},
                                  checklists.condition_names, evaluate.bootstrap, config.seed, source_of)
    labels = SettingLabels.of_run(paths)  # each aligned model named with the objective it was trained with
    result = {
        "set": set_name,  # tuning: for choosing settings; locked: the figures a report states
        "judge": judge.id,
        "sources": len(sources),
        "settings": {
            name: {**labels.describe(name), "mean_items": summary["settings"][name], "images": sorted(images[name].values())}
            for name in scores
        },
        "differences": summary["differences"],
        "by_source_skin_group": by_skin,  # where the source image's Fitzpatrick type is known; else "unknown"
        "by_target": by_target,
        "units": [
            {
                "unit": unit,
                "source": _relative(source_paths.get(source_id), paths.root),
                "target": target,
                "images": {name: images[name][unit] for name in scores if unit in images[name]},
                "scores": {name: scores[name][unit] for name in scores if unit in scores[name]},
                "items": {name: answers[name][unit] for name in scores if unit in answers[name]},
                "recognition": {name: recognition[name][unit] for name in recognition if unit in recognition[name]},
            }
            for unit, (source_id, target) in sorted(targets.items())
        ],
        "item_ids": item_ids,
        **independent,
        "notes": notes,
    }
    atomic_write_text(output, json.dumps(result, indent=2))
    console.print(f"alignment comparison on the {set_name} set ({len(sources)} sources):")
    for name, estimate in summary["settings"].items():
        console.print(f"  {labels(name)}: mean items met {estimate['value']:.2f} [{estimate['low']:.2f}, {estimate['high']:.2f}]")
    for name, estimate in summary["differences"].items():
        console.print(f"  {name}: {estimate['value']:+.2f} [{estimate['low']:+.2f}, {estimate['high']:+.2f}]")
    for title, groups in (("source skin types", by_skin), ("target", by_target)):
        shown = groups_to_print(groups)
        for group in shown:
            part = groups[group]
            gains = ", ".join(f"{name} {e['value']:+.2f} [{e['low']:+.2f}, {e['high']:+.2f}]"
                              for name, e in part["differences"].items())
            if gains:
                console.print(f"    {title} {group} ({part['sources']} sources): {gains}")
        if len(shown) < len(groups):
            console.print(f"    {len(groups) - len(shown)} other {title} groups not shown (their differences' "
                          f"intervals include zero, or they are smaller): every group is in {output.name} and the report")
    _print_independent(console, labels, independent)
    for note in notes:
        console.print(f"  [yellow]note[/yellow]: {note}")
    return output


GROUP_LINES = 8  # a breakdown by 20 or 100 target conditions would bury the printed summary


def groups_to_print(groups: dict[str, dict], limit: int = GROUP_LINES) -> list[str]:
    """The groups of a breakdown worth a printed line, in their own order: all of them up to `limit`; beyond it, the
    `limit` whose largest difference is furthest from zero among those with an interval that excludes zero."""
    if len(groups) <= limit:
        return list(groups)

    decided = {}  # group -> its largest difference whose interval excludes zero
    for group, part in groups.items():
        clear = [abs(e["value"]) for e in part["differences"].values() if e["low"] > 0 or e["high"] < 0]
        if clear:
            decided[group] = max(clear)
    kept = set(sorted(decided, key=decided.get, reverse=True)[:limit])
    return [group for group in groups if group in kept]


def grader_images(split, set_name: str, recognition_images: str, sources: Sequence) -> tuple[list, list]:
    """The real images the recognition probe trains on and those its accuracy is checked on, for a comparison of
    `sources` from `set_name`. With `evaluate.recognition_images = "train+tuning"` the tuning set's images join the
    training split, except the sources being graded: all of them when the locked set is graded, the rest of the
    tuning set when the tuning set is. The probe is checked on real images it never saw (the graded set's)."""
    if recognition_images != "train+tuning":
        return list(split.train), list(split.test)
    graded = {record.id for record in sources}
    extra = [record for record in split.tuning if record.id not in graded]
    check = list(split.locked) if set_name == "locked" else [record for record in split.tuning if record.id in graded]
    return list(split.train) + extra, check


def independent_measures(config: RunConfig, paths: RunPaths, split, set_name: str, sources: Sequence,
                          images: dict[str, dict[str, str]],
                          answers: dict[str, dict[str, list]], targets: dict[str, tuple[str, str]],
                          source_of: dict[str, str], item_ids: dict[str, list[str]], notes: list[str],
                          judge_differences: dict) -> dict:
    """Beside the judge: target recognition by a probe trained on real images (paired against the baseline with
    the same cluster bootstrap), KID to real images of each target condition, and the judge's validity on these
    images. Marks each judge difference as confirmed or not. Empty, with a note, when the probe cannot be built
    (the judge's figures are still written)."""
    evaluate = config.evaluate
    try:
        grader_train, grader_check = grader_images(split, set_name, evaluate.recognition_images, sources)
        recognizer = run_recognizer(config, paths, grader_train, _device(evaluate.device))
        recognition = {}
        for name, by_unit in images.items():
            units = sorted(by_unit)
            graded = recognizer.grade([paths.root / by_unit[unit] for unit in units], [targets[unit][1] for unit in units])
            recognition[name] = {unit: {"recognised": hit, "target_probability": probability}
                                 for unit, (hit, probability) in zip(units, graded)}
    except (BackboneError, RecognitionError) as error:
        notes.append(f"independent measure left out: {error}")
        return {}
    baseline, resamples = ALIGNMENT_SETTINGS[0], evaluate.bootstrap

    def paired(field: str) -> dict:
        values = {name: {unit: entry[field] for unit, entry in by_unit.items()} for name, by_unit in recognition.items()}
        return paired_summary(values, baseline, resamples, config.seed, source_of)

    recognised, probability = paired("recognised"), paired("target_probability")
    for name, difference in judge_differences.items():
        difference["independent"] = confirmation(recognised["differences"].get(name))
    conditions = {unit: target for unit, (_, target) in targets.items()}
    graded_images = [GradedImage(conditions[unit], tuple(items), recognition[name][unit]["recognised"], source_of[unit])
                     for name, by_unit in answers.items() for unit, items in sorted(by_unit.items())]
    return {
        "recognition": recognition,
        "independent": {
            "grader": f"linear probe on {recognizer.backbone} features, trained on {recognizer.n_train} real "
                      + ("training and tuning-set images (none of them graded here)"
                         if len(grader_train) > len(split.train) else "training images")
                      + (f" and {recognizer.augment} degraded copies of each" if recognizer.augment else "")
                      + " (never on verdicts)",
            "real_test": recognition_accuracy(recognizer, grader_check, resamples, config.seed),
            "settings": {name: {"recognised": recognised["settings"][name],
                                "target_probability": probability["settings"][name]} for name in recognition},
            "differences": {name: {"recognised": recognised["differences"][name],
                                   "target_probability": probability["differences"].get(name)}
                            for name in recognised["differences"]},
        },
        "artefacts": {"measure": f"KID to the real images of each target condition the grader learned from "
                                 f"({recognizer.backbone} features), mean over conditions weighted by images",
                      **artefact_measure(recognizer, grader_train, images, conditions, paths.root, source_of, baseline,
                                         resamples, config.seed)},
        "validity": validity_table(graded_images, item_ids, resamples, config.seed, evaluate.validity_min_r),
    }


def _print_independent(console: Console, labels: SettingLabels, independent: dict) -> None:
    measure = independent.get("independent")
    if not measure:
        return
    real_test = measure.get("real_test") or {}
    if real_test.get("n"):  # how far the grader itself can be trusted, on clean and on blurred real images
        clean, degraded = real_test["accuracy"], real_test["degraded_accuracy"]
        console.print(f"  recognition probe on {real_test['n']} real test images: {clean['value']:.1%} clean, "
                      f"{degraded['value']:.1%} degraded (blur, down/up-sampling, noise)")
    for name, entry in measure["settings"].items():
        share = entry["recognised"]
        console.print(f"  {labels(name)}: recognised as its target {share['value']:.1%} "
                      f"[{share['low']:.1%}, {share['high']:.1%}]")
    for name, entry in measure["differences"].items():
        share = entry["recognised"]
        console.print(f"  {name}: recognised {share['value']:+.1%} [{share['low']:+.1%}, {share['high']:+.1%}]")
    for name, change in (independent.get("artefacts") or {}).get("differences", {}).items():
        console.print(f"  {name}: KID to the target's real images {change['value']:+.4f} "
                      f"[{change['low']:+.4f}, {change['high']:+.4f}] (positive: further from real)")
    validity = independent["validity"]
    r = validity["r"]
    console.print(f"  judge validity on these images: r(items met, recognised) = {r['value']:.2f} "
                  f"[{r['low']:.2f}, {r['high']:.2f}] over {validity['n']} images"
                  + ("  [red]LOW[/red]" if validity["low"] else ""))


def _require_models(chosen: Sequence[str], paths: RunPaths) -> None:
    """Refuse, naming the stage to run, when there is nothing to compare: no unaligned model for the baseline, or
    none of the aligned models asked for. One aligned model of two is enough (the other is noted as left out)."""
    baseline = ALIGNMENT_SETTINGS[0]
    if baseline in chosen and not setting_model(baseline, paths)[0].exists():
        raise AlignmentError(f"no preliminary model in {paths.model} to compare against: run `magic finetune` first "
                             "(then `magic train dpo` or `magic train rft`)")
    aligned = [name for name in chosen if name != baseline]
    if aligned and not any(setting_model(name, paths)[0].exists() for name in aligned):
        commands = " or ".join(f"`magic train {name.removeprefix('magic-')}`" for name in aligned)
        raise AlignmentError(f"no aligned model in {paths.aligned} to compare ({', '.join(aligned)}): run {commands} "
                             "first")


def _output_dir(config: RunConfig, paths: RunPaths, name: str, lora: Path | None, set_name: str) -> Path:
    """One folder per set, model version and sampling settings, so a retrained model or a changed strength never
    mixes with (or silently reuses) the images of the previous one, nor one set's images with the other's."""
    model = model_hash(config.model, policy_files(paths, lora))
    return paths.eval / "alignment" / set_name / f"{name}-{model}-{synthesis_settings_hash(config)}"


def _relative(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)
