"""`magic evaluate`: the paper's comparison in one command, written to `run/eval/metrics.json`.

Settings (each adds one synthetic set to the real training images, at share rho per batch):

    real        the real training images only (always evaluated: it is the baseline)
    t2i         + text-to-image images of the preliminary model (synthesis at strength 1.0)
    i2i         + image-to-image images of the preliminary (unaligned) model
    magic-dpo   + I2I images of the DPO-aligned model (run/aligned/dpo)
    magic-rft   + I2I images of the RFT-aligned model (run/aligned/rft)

A setting's images are read from `run/synthetic/<setting>/manifest.csv`; a missing set is synthesized
through `synthesize.synthesize` when its model exists, and skipped with a note when it does not. For
every backbone of `evaluate.backbones` and every setting, `evaluate.seeds` classifiers are trained
(linear probe on cached features, or full fine-tuning) and tested on the real test split (the tuning figures)
and, apart, on the run's locked set (the figures to state: no choice was made on it), each overall, per skin
type and per group of types (1-2, 3-4, 5-6), with every synthetic setting's paired difference against real
only (the same seeds). With
`data.few_shot_fraction` the few-shot setting is added: the seeded subset of the training set, with the
synthetic images made from it, and with those made from every training image (the rest used as unlabeled
sources: the paper's MAGIC-A). Also: FID/KID of each synthetic set against the real training images, and the
checklist pass rate of each set (verdicts from the manifest, the run's judge, and the held-out judge).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from magic_align.backbones import BackboneError, load_backbone
from magic_align.checklists.schema import load_checklists
from magic_align.config import RunConfig
from magic_align.data.images import load_image, sha256_file
from magic_align.data.split import run_split
from magic_align.evaluate.classifier import (
    Example,
    FeatureCache,
    RunResult,
    Schedule,
    run_finetune,
    restrict,
    run_linear_probe,
    select_synthetic,
)
from magic_align.evaluate.fid import extract_features, image_distances, load_feature_module
from magic_align.evaluate.metrics import (
    METRICS,
    SKIN_TYPE_GROUPS,
    classification_metrics,
    mean_over_seeds,
    paired_difference,
)
from magic_align.evaluate.passrate import judge_images, parse_manifest_items, pass_rate_summary
from magic_align.judges import make_judge
from magic_align.ledger import Ledger
from magic_align.progress import StageProgress
from magic_align.run import RunPaths, atomic_write_text, prepare_run
from magic_align.errors import MagicError
from magic_align.synthesize import synthesize

SETTINGS = ("real", "t2i", "i2i", "magic-dpo", "magic-rft")
LABELS = {"real": "real", "t2i": "+ T2I", "i2i": "+ I2I (unaligned)", "magic-dpo": "+ MAGIC-DPO",
          "magic-rft": "+ MAGIC-RFT"}
# what evaluate reads of a synthetic manifest (synthesize.MANIFEST_COLUMNS has more; a hand-built one needs these)
NEEDED_COLUMNS = ("synthetic_id", "path", "source_id", "source_group", "target_label")


class EvaluateError(MagicError, ValueError):
    """Bad evaluation input (a manifest row, a setting name); the message names the file, row and field."""


class EvaluateIncomplete(MagicError, RuntimeError):
    """Some of what evaluate was asked to do failed; the rest is written. A rerun tries the failed parts again."""

    def __init__(self, failures: list[str], metrics_path: Path):
        self.failures = failures
        super().__init__(
            f"evaluate did not finish: {len(failures)} part(s) failed ({'; '.join(failures)}); the rest is in "
            f"{metrics_path}; fix the cause and rerun `magic evaluate` (or `magic run`, which retries the stage)"
        )


def _reason(error: BaseException) -> str:
    """An exception as one line: its type and message, whitespace runs folded."""
    return f"{type(error).__name__}: {' '.join(str(error).split()) or 'no detail'}"


# -------------------------------------------------------------------------------------------- inputs
def parse_settings(settings: Sequence[str] | None) -> list[str]:
    """The settings to evaluate, in the paper's order, "real" always first."""
    chosen = list(SETTINGS) if not settings else [s.strip().lower() for s in settings]
    unknown = [s for s in chosen if s not in SETTINGS]
    if unknown:
        raise EvaluateError(f"unknown setting(s) {unknown}; expected some of {', '.join(SETTINGS)}")
    return [s for s in SETTINGS if s == "real" or s in chosen]


def read_manifest(manifest: Path, run_dir: Path, classes: Sequence[str], hash_file: Callable[[Path], str]) -> list[Example]:
    """Synthetic images of a manifest as harness examples (label = target condition, group = the source's)."""
    index = {name: i for i, name in enumerate(classes)}
    examples = []
    with open(manifest, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in NEEDED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise EvaluateError(f"{manifest} lacks column(s) {', '.join(missing)}; expected {', '.join(NEEDED_COLUMNS)}")
        for row, fields in enumerate(reader, start=2):  # row 1 is the header
            target = fields["target_label"]
            if target not in index:
                raise EvaluateError(f"{manifest} row {row}: target_label {target!r} is not a class of the split "
                                    f"({', '.join(classes)})")
            path = run_dir / fields["path"]
            if not path.is_file():
                raise EvaluateError(f"{manifest} row {row}: path {fields['path']!r} does not exist under {run_dir}")
            try:
                skin_type = int(float(fields.get("source_skin_type") or -1))
            except ValueError:
                raise EvaluateError(f"{manifest} row {row}: source_skin_type {fields['source_skin_type']!r} is not "
                                    "a number (1-6, or -1 when unknown)") from None
            examples.append(Example(
                id=fields["synthetic_id"], path=path, label=index[target], key=hash_file(path), skin_type=skin_type,
                group=fields["source_group"] or "", source_id=fields["source_id"], synthetic=True,
            ))
    return examples


def manifest_verdicts(manifest: Path) -> tuple[list[str], list[list[int | None]]] | None:
    """(target conditions, verdict items) when every row of the manifest was judged, else None."""
    conditions, verdicts = [], []
    with open(manifest, newline="", encoding="utf-8") as handle:
        for row, fields in enumerate(csv.DictReader(handle), start=2):
            items = parse_manifest_items(fields.get("verdict_items", ""), f"{manifest} row {row}")
            if items is None:
                return None
            conditions.append(fields["target_label"])
            verdicts.append(items)
    return (conditions, verdicts) if verdicts else None


def setting_model(setting: str, paths: RunPaths) -> tuple[Path, Path | None]:
    """(what must exist, the LoRA handed to synthesize): the run's preliminary model (model/, no extra
    LoRA) for t2i and i2i, an aligned LoRA stacked on it for the MAGIC settings."""
    if setting in ("t2i", "i2i"):
        return paths.model, None
    lora = paths.aligned / setting.removeprefix("magic-")
    return lora, lora


def ensure_synthetic(config: RunConfig, paths: RunPaths, setting: str) -> tuple[Path | None, str]:
    """The setting's manifest, (re)synthesized when missing, incomplete or made by an older model (the sets under
    synthetic/<setting>/ are a cache of the setting's model); (None, why) when its model does not exist (a
    documented skip: that model was not trained). A synthesis that fails raises: it is a failure, not a skip.

    A manifest without a model (e.g. one built by hand) is read as it is."""
    out_dir = paths.synthetic / setting
    manifest = out_dir / "manifest.csv"
    needed, lora = setting_model(setting, paths)
    if not needed.exists():
        if manifest.is_file():
            return manifest, "read"
        command = "magic finetune" if lora is None else f"magic train {setting.removeprefix('magic-')}"
        return None, f"skipped: no {needed.relative_to(paths.root)}/ (make it first: {command})"
    synth_config = config
    if setting == "t2i":  # text-to-image = starting from pure noise
        synth_config = config.model_copy(deep=True)
        synth_config.sample.strength = 1.0
    # cheap when the set is complete and of this model; a stale set (the model was retrained) is replaced
    summary = synthesize(synth_config, lora, out_dir, replace_stale=True)
    if not summary.manifest.is_file():
        raise EvaluateError(f"synthesis for {setting!r} finished without writing {summary.manifest}")
    return summary.manifest, "synthesized" if summary.written or summary.replaced else "read"


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise EvaluateError("evaluate.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return choice


# ------------------------------------------------------------------------------------------- summaries
def summarise_runs(results: Sequence[RunResult], num_classes: int, resamples: int, seed: int = 0) -> dict:
    """Per-seed metrics (intervals over test images) and their mean over seeds (interval over seeds)."""
    per_seed = [
        {"seed": r.seed, **classification_metrics(r.y_true, r.y_pred, num_classes, r.skin_types, resamples, seed)}
        for r in results
    ]
    summary: dict = {name: mean_over_seeds([entry[name]["value"] for entry in per_seed], resamples, seed)
                     for name in METRICS}
    skin_types = sorted({key for entry in per_seed for key in entry["by_skin_type"]}, key=int)
    summary["by_skin_type"] = {
        key: {**mean_over_seeds([entry["by_skin_type"][key]["value"] for entry in per_seed], resamples, seed),
              "n": per_seed[0]["by_skin_type"][key]["n"]}
        for key in skin_types
    }
    skin_groups = [name for name in SKIN_TYPE_GROUPS if name in per_seed[0].get("by_skin_group", {})]
    summary["by_skin_group"] = {
        name: {**mean_over_seeds([entry["by_skin_group"][name]["value"] for entry in per_seed], resamples, seed),
               "n": per_seed[0]["by_skin_group"][name]["n"]}
        for name in skin_groups
    }
    summary["confusion"] = np.sum([entry["confusion"] for entry in per_seed], axis=0).tolist()  # summed over seeds
    summary["per_seed"] = [{k: v for k, v in entry.items() if k != "confusion"} for entry in per_seed]
    return summary


def versus_baseline(summary: dict, baseline: dict, resamples: int, seed: int = 0) -> dict:
    """A setting's summary against the real-only one of the same classifier group, seed by seed (the same seeds
    give both): the paired difference of every metric and of the accuracy per skin-type group."""
    ours = {entry["seed"]: entry for entry in summary["per_seed"]}
    theirs = {entry["seed"]: entry for entry in baseline["per_seed"]}
    seeds = [s for s in ours if s in theirs]
    if not seeds:
        raise EvaluateError("no seed in common with the real-only classifiers: a paired difference needs the same "
                            "seeds on both sides")

    def differ(value) -> dict:
        return paired_difference([value(ours[s]) for s in seeds], [value(theirs[s]) for s in seeds], resamples, seed)

    result: dict = {name: differ(lambda entry, name=name: entry[name]["value"]) for name in METRICS}
    groups = [g for g in SKIN_TYPE_GROUPS
              if all(g in entry.get("by_skin_group", {}) for s in seeds for entry in (ours[s], theirs[s]))]
    result["by_skin_group"] = {g: differ(lambda entry, g=g: entry["by_skin_group"][g]["value"]) for g in groups}
    return result


def add_paired_differences(rows: list[dict], resamples: int, seed: int = 0) -> None:
    """`vs_real` on every synthetic setting's row (and on its locked-set part): its paired difference against the
    real-only row of the same backbone, mode and group (`versus_baseline`)."""
    baselines = {(r["backbone"], r["mode"], r["group"]): r for r in rows if r["setting"] == "real"}
    for row in rows:
        baseline = baselines.get((row["backbone"], row["mode"], row["group"]))
        if row["setting"] == "real" or baseline is None:
            continue
        row["vs_real"] = versus_baseline(row, baseline, resamples, seed)
        if "locked" in row and "locked" in baseline:
            row["locked"]["vs_real"] = versus_baseline(row["locked"], baseline["locked"], resamples, seed)


CSV_COLUMNS = ["backbone", "mode", "group", "setting", "label", "n_real", "n_synthetic", "seeds"] + [
    f"{name}{suffix}" for name in METRICS for suffix in ("", "_low", "_high", "_std")]


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        values = [row[key] for key in CSV_COLUMNS[:8]]
        for name in METRICS:
            values += [f"{row[name][key]:.4f}" for key in ("value", "low", "high", "std")]
        writer.writerow(values)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ stage
def run_evaluate(config: RunConfig, settings: Sequence[str] | None = None,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Evaluate the run's synthetic data (see the module docstring); writes eval/metrics.json and
    eval/classifier.csv, and returns what metrics.json holds.

    A setting whose model is missing is skipped with a note (documented). Anything that raises (a setting's
    synthesis or manifest, a backbone, the FID features, a pass-rate judge) is a failure: the other parts still
    run and are written, then `EvaluateIncomplete` names every failure, so the stage is not recorded as done."""
    say = progress or (lambda _text: None)
    evaluate = config.evaluate
    chosen = parse_settings(settings if settings is not None else evaluate.settings)
    paths = prepare_run(config)
    split = run_split(config, paths)
    classes = list(split.classes)
    index = {name: i for i, name in enumerate(classes)}
    device = _device(evaluate.device)

    def real_examples(records) -> list[Example]:
        return [Example(r.id, Path(r.path), index[r.label], sha256_file(r.path), r.skin_type, r.group)
                for r in records]

    train, test = real_examples(split.train), real_examples(split.test)
    train_ids = {e.id for e in train}
    # Every classifier is graded on the test split (tuning: it may steer choices) and, apart, on the locked set
    # (stated figures). One prediction pass covers both: the locked images the test split lacks (a data kind's own
    # locked set) are appended, and each set's figures are taken from its own positions.
    test_ids = {e.id for e in test}
    evaluated = test + real_examples([r for r in split.locked if r.id not in test_ids])
    position = {e.id: k for k, e in enumerate(evaluated)}
    test_positions = list(range(len(test)))
    locked_positions = [position[r.id] for r in split.locked]

    def loader(path: Path):
        return load_image(path, config.data.max_image_pixels)

    notes: list[str] = []
    failures: list[str] = []

    def fail(what: str, error: BaseException) -> str:
        failures.append(f"{what}: {_reason(error)}")
        notes.append(f"FAILED {what}: {_reason(error)}")
        say(f"[failed] {what}: {_reason(error)}")
        return _reason(error)

    settings_info: dict[str, dict] = {"real": {"label": LABELS["real"], "status": "ok", "n_synthetic": 0}}
    pools: dict[str, list[Example]] = {}
    manifests: dict[str, Path] = {}
    for setting in chosen[1:]:
        try:
            manifest, how = ensure_synthetic(config, paths, setting)
            if manifest is None:
                settings_info[setting] = {"label": LABELS[setting], "status": "skipped", "note": how}
                notes.append(f"{setting}: {how}")
                continue
            say(f"{setting}: {how} {manifest.relative_to(paths.root)}")
            every = read_manifest(manifest, paths.root, classes, sha256_file)
        except Exception as error:  # one setting's failure must not cost the others' results
            settings_info[setting] = {"label": LABELS[setting], "status": "failed", "note": fail(setting, error)}
            continue
        kept, dropped = select_synthetic(every, evaluated)  # the full set; per group the allow-list narrows it
        pools[setting] = kept
        manifests[setting] = manifest
        settings_info[setting] = {"label": LABELS[setting], "status": "ok", "how": how,
                                  "manifest": str(manifest.relative_to(paths.root)), "n_manifest": len(every),
                                  "dropped": dropped}
        if dropped["source_held_out"] or dropped["group_held_out"]:
            notes.append(f"{setting}: {dropped['source_held_out'] + dropped['group_held_out']} synthetic image(s) "
                         "made from test images (or their groups) left out of training")

    # The groups of classifier runs: (group, setting, label, real training examples, synthetic pool).
    runs: list[tuple[str, str, str, list[Example], list[Example]]] = []
    for setting in chosen:
        if setting != "real" and setting not in pools:
            continue
        synthetic, _ = select_synthetic(pools.get(setting, []), evaluated, train_ids)
        settings_info[setting]["n_synthetic"] = len(synthetic)
        runs.append(("full", setting, LABELS[setting], train, synthetic))
    if config.data.few_shot_fraction and split.few_shot:
        few = real_examples(split.few_shot)
        few_ids = {e.id for e in few}
        runs.append(("few-shot", "real", "real (few-shot)", few, []))
        for setting in chosen[1:]:
            if setting not in pools:
                continue
            own, _ = select_synthetic(pools[setting], evaluated, few_ids)
            runs.append(("few-shot", setting, f"{LABELS[setting]} (few-shot)", few, own))
            extra, _ = select_synthetic(pools[setting], evaluated, None)  # every non-test source: MAGIC-A
            runs.append(("few-shot", f"{setting}+unlabeled", f"{LABELS[setting]} + unlabeled sources", few, extra))

    schedule = Schedule.from_config(evaluate)
    seeds = [config.seed + k for k in range(evaluate.seeds)]
    rows: list[dict] = []
    # One unit per classifier run (a backbone x setting, all seeds): hours in fine-tune mode at the paper's scale.
    classifiers = StageProgress(
        "evaluate classifiers", len(evaluate.backbones) * len(runs), unit="run",
        resume="rerun the same command: cached features are reused, classifier runs start over",
    )
    with classifiers:
        for backbone_name in evaluate.backbones:
            def make_backbone(name: str = backbone_name):
                return load_backbone(name, device, image_size=evaluate.image_size,
                                     pretrained=evaluate.backbone_paths.get(name), seed=config.seed)

            try:
                backbone = make_backbone()
            except BackboneError as error:
                fail(f"backbone {backbone_name}", error)
                classifiers.advance(len(runs))
                continue
            cache = FeatureCache(paths.eval / "features", backbone) if evaluate.mode == "linear_probe" else None
            for group, setting, label, real, synthetic in runs:
                say(f"{backbone_name} {evaluate.mode} {group} {setting}: {len(real)} real + {len(synthetic)} "
                    f"synthetic, {len(seeds)} seed(s)")
                if cache is not None:
                    results = run_linear_probe(cache, real, synthetic, evaluated, len(classes), schedule, seeds, loader)
                else:
                    results = run_finetune(make_backbone, real, synthetic, evaluated, len(classes), schedule, seeds,
                                           loader)
                row = {"backbone": backbone_name, "mode": evaluate.mode, "group": group, "setting": setting,
                       "label": label, "n_real": len(real), "n_synthetic": len(synthetic), "seeds": len(seeds),
                       **summarise_runs([restrict(r, test_positions) for r in results], len(classes),
                                        evaluate.bootstrap, config.seed)}
                if locked_positions:
                    row["locked"] = summarise_runs([restrict(r, locked_positions) for r in results], len(classes),
                                                   evaluate.bootstrap, config.seed)
                rows.append(row)
                classifiers.advance()
    add_paired_differences(rows, evaluate.bootstrap, config.seed)

    distances = _distances(config, train, pools, loader, fail, notes, say)
    pass_rates = _pass_rates(config, paths, manifests, fail, say)
    metrics = {
        "classes": classes,
        "schedule": {**schedule.__dict__, "seeds": seeds},
        "mode": evaluate.mode,
        "settings": settings_info,
        "classifier": rows,
        "distances": distances,
        "pass_rate": pass_rates,
        "counts": {"train": len(train), "test": len(test), "locked": len(locked_positions),
                   "few_shot": len(split.few_shot)},
        # which data role each figure's real images come from (data/split.py): the classifiers are tested on the
        # whole test split, as in the paper (tuning figures), and apart on the locked set (each row's `locked`: the
        # figures to state); FID/KID and pass rates concern images made from training sources
        "sets": {"classifier": "test", "classifier_locked": "locked", "distances": "train", "pass_rate": "train"},
        "notes": notes,
        "failures": failures,
    }
    atomic_write_text(paths.eval / "metrics.json", json.dumps(metrics, indent=2, allow_nan=True))
    atomic_write_text(paths.eval / "classifier.csv", _csv_text(rows))
    if failures:
        raise EvaluateIncomplete(failures, paths.eval / "metrics.json")
    return metrics


def _distances(config: RunConfig, train: list[Example], pools: dict[str, list[Example]], loader, fail, notes,
               say) -> dict:
    """FID/KID of each synthetic set against the real training images (the images it was made from)."""
    if not pools:
        return {}
    evaluate = config.evaluate
    try:
        module = load_feature_module(evaluate.fid_features, _device(evaluate.device), evaluate.fid_image_size)
    except BackboneError as error:
        fail(f"FID/KID features {evaluate.fid_features}", error)
        return {}
    real_images = [loader(e.path) for e in train]
    # extracted once for every comparison; with fewer than 2, image_distances says why it cannot compare
    real_features = extract_features(real_images, module) if len(real_images) >= 2 else None
    result = {}
    for setting, pool in pools.items():
        if len(pool) < 2:
            notes.append(f"FID/KID for {setting}: fewer than 2 synthetic images")
            continue
        say(f"FID/KID {setting}: {len(real_images)} real vs {len(pool)} synthetic ({evaluate.fid_features})")
        distance = image_distances(real_images, [loader(e.path) for e in pool], module, real_features=real_features,
                                   resamples=evaluate.fid_resamples, kid_subsets=evaluate.kid_subsets, seed=config.seed)
        result[setting] = {**distance.as_dict(), "features": evaluate.fid_features}
    return result


def _pass_rates(config: RunConfig, paths: RunPaths, manifests: dict[str, Path], fail, say) -> dict:
    """{setting: {judge id: pass-rate summary}} from manifest verdicts, the run's judge and the held-out judge."""
    if not manifests:
        return {}
    evaluate = config.evaluate
    try:
        checklists = load_checklists(config.judge.checklist)
    except Exception as error:  # a missing checklist file must not cost the classifier results
        fail(f"pass rate (checklists {config.judge.checklist!r})", error)
        return {}
    item_ids = {c.condition: [item.id for item in c.items] for c in checklists.conditions}
    judges = []
    if evaluate.judge_synthetic:
        judges.append(("run judge", config.judge))
    if evaluate.held_out_judge is not None:
        judges.append(("held-out judge", evaluate.held_out_judge))
    result: dict[str, dict] = {}
    for setting, manifest in manifests.items():
        result[setting] = {}
        try:
            stored = manifest_verdicts(manifest)
        except ValueError as error:  # a bad verdict_items cell: that setting's pass rate fails, nothing else
            fail(f"pass rate of {setting} (manifest verdicts)", error)
            continue
        if stored is not None:
            result[setting]["manifest"] = pass_rate_summary(*stored, item_ids, evaluate.bootstrap, config.seed)
        if not judges:
            continue
        with open(manifest, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        images = [paths.root / r["path"] for r in rows]
        conditions = [r["target_label"] for r in rows]
        for role, judge_config in judges:
            if role == "run judge" and stored is not None:
                continue  # the manifest already holds this judge's verdicts
            try:
                judge = make_judge(judge_config, checklists)
                with Ledger(paths.ledger) as ledger:
                    verdicts = judge_images(judge, ledger, images, conditions, checklists, judge_config.concurrency)
            except Exception as error:  # a judge failure must not lose the classifier results above
                fail(f"pass rate of {setting} under the {role}", error)
                continue
            say(f"pass rate {setting}: {role} {judge.id}")
            result[setting][f"{role}: {judge.id}"] = pass_rate_summary(conditions, verdicts, item_ids,
                                                                       evaluate.bootstrap, config.seed)
    return result
