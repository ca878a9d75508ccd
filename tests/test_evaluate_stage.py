"""`run_evaluate` end to end on a toy folder dataset with hand-built synthetic manifests (no diffusion)."""

import csv
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from magic_align.config import load_config
from magic_align.evaluate.stage import EvaluateError, parse_settings, read_manifest
from magic_align.synthesize import MANIFEST_COLUMNS


COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def _square(colour, rng):
    array = np.clip(np.array(colour) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


@pytest.fixture
def toy_run(tmp_path):
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True)
        for index in range(12):
            _square(colour, rng).save(folder / f"{index}.png")
    items = [{"id": f"i{k}", "aspect": "colour", "text": f"criterion number {k}"} for k in range(5)]
    checklists = {"id": "colours", "conditions": [
        {"condition": name, "display_name": name.title(), "token": f"<{name}>", "items": items} for name in COLOURS]}
    (tmp_path / "colours.yaml").write_text(yaml.safe_dump(checklists))
    overrides = [
        f'runs_dir="{tmp_path / "runs"}"', 'name="toy"', 'data.kind="folder"', f'data.images="{tmp_path / "images"}"',
        "data.num_classes=3", "data.few_shot_fraction=0.5", f'judge.checklist="{tmp_path / "colours.yaml"}"',
        'evaluate.mode="linear_probe"', "evaluate.epochs=20", "evaluate.step_size=10", "evaluate.batch_size=8",
        "evaluate.seeds=2", "evaluate.image_size=32", "evaluate.bootstrap=20", "evaluate.fid_resamples=3",
        "evaluate.kid_subsets=3",
    ]
    return load_config("tiny", overrides)


def _write_manifest(config, setting, sources, colour_of_target, judged=False, rng=None):
    """One synthetic image per source: a square of the target colour (the 'next' class)."""
    from magic_align.data.split import run_split  # noqa: F401  (the split is built by run_evaluate)

    rng = rng or np.random.default_rng(1)
    out = config.run_dir / "synthetic" / setting
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    rows = []
    for index, record in enumerate(sources):
        target = names[(names.index(record.label) + 1) % 3]
        path = out / "images" / f"{setting}-{index}.png"
        _square(colour_of_target(target), rng).save(path)
        rows.append({"synthetic_id": f"{setting}-{index}", "path": str(path.relative_to(config.run_dir)),
                     "source_id": record.id, "source_label": record.label, "source_group": record.group,
                     "source_skin_type": record.skin_type, "target_label": target, "prompt": f"an image of <{target}>",
                     "strength": 0.3, "seed": index, "model_hash": "abc",
                     "verdict_score": 3 if judged else "", "verdict_items": "[1, 1, 1, 0, 0]" if judged else ""})
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_parse_settings():
    assert parse_settings(None) == ["real", "t2i", "i2i", "magic-dpo", "magic-rft"]
    assert parse_settings(["magic-dpo", "i2i"]) == ["real", "i2i", "magic-dpo"]
    with pytest.raises(EvaluateError, match="unknown setting"):
        parse_settings(["dpo"])


def test_read_manifest_errors_name_the_row(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("synthetic_id,path,source_id,source_group,target_label\ns0,missing.png,r0,g0,red\n")
    with pytest.raises(EvaluateError, match="row 2: path 'missing.png' does not exist"):
        read_manifest(manifest, tmp_path, ["red"], lambda p: "x")
    manifest.write_text("synthetic_id,path,source_id,source_group,target_label\ns0,missing.png,r0,g0,purple\n")
    with pytest.raises(EvaluateError, match="row 2: target_label 'purple'"):
        read_manifest(manifest, tmp_path, ["red"], lambda p: "x")


def test_run_evaluate_compares_settings_without_leakage(toy_run, capsys):
    from magic_align.data.split import run_split
    from magic_align.evaluate.stage import run_evaluate
    from magic_align.run import prepare_run

    config = toy_run
    split = run_split(config, prepare_run(config))
    # i2i: well-made images of the target colour; from every training image plus two test images (must be dropped).
    _write_manifest(config, "i2i", split.train + split.test[:2], COLOURS.get, judged=True)
    # magic-dpo: from training images only.
    _write_manifest(config, "magic-dpo", split.train, COLOURS.get)

    metrics = run_evaluate(config, ["i2i", "magic-dpo", "magic-rft"])
    eval_dir = config.run_dir / "eval"
    # off a terminal, the classifier runs report their progress as lines, the last naming every run done
    runs = len(metrics["classifier"])
    assert f"evaluate classifiers run {runs}/{runs}" in capsys.readouterr().err
    assert json.loads((eval_dir / "metrics.json").read_text())["classes"] == metrics["classes"]
    with open(eval_dir / "classifier.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(metrics["classifier"])
    assert {row["label"] for row in table} >= {"real", "+ I2I (unaligned)", "+ MAGIC-DPO + unlabeled sources"}
    assert metrics["settings"]["magic-rft"]["status"] == "skipped"
    assert any("magic-rft" in note for note in metrics["notes"])
    assert metrics["settings"]["i2i"]["dropped"]["source_held_out"] == 2

    rows = {(row["group"], row["setting"]): row for row in metrics["classifier"]}
    assert set(rows) == {("full", "real"), ("full", "i2i"), ("full", "magic-dpo"), ("few-shot", "real"),
                         ("few-shot", "i2i"), ("few-shot", "i2i+unlabeled"), ("few-shot", "magic-dpo"),
                         ("few-shot", "magic-dpo+unlabeled")}
    n_train, n_few = len(split.train), len(split.few_shot)
    assert rows[("full", "i2i")]["n_synthetic"] == n_train  # the two made from test images are not there
    assert rows[("few-shot", "i2i")]["n_synthetic"] == n_few  # only those made from the few-shot subset
    assert rows[("few-shot", "i2i+unlabeled")]["n_synthetic"] == n_train
    for row in rows.values():
        assert row["accuracy"]["value"] >= 0.8  # colours are easy (few-shot: 9 training images)
        assert len(row["per_seed"]) == 2
        assert np.array(row["confusion"]).sum() == 2 * len(split.test)
        # the same classifiers graded apart on the locked set (here half of the test split)
        assert np.array(row["locked"]["confusion"]).sum() == 2 * len(split.locked) > 0
        assert len(row["locked"]["per_seed"]) == 2
    assert metrics["counts"]["locked"] == len(split.locked)
    assert metrics["sets"]["classifier_locked"] == "locked"
    for key, row in rows.items():  # every synthetic setting against real only of its group, seed by seed
        if key[1] == "real":
            assert "vs_real" not in row
            continue
        real = rows[(key[0], "real")]
        for part, baseline in ((row, real), (row["locked"], real["locked"])):
            differences = [a["accuracy"]["value"] - b["accuracy"]["value"]
                           for a, b in zip(part["per_seed"], baseline["per_seed"])]
            assert part["vs_real"]["accuracy"]["value"] == pytest.approx(np.mean(differences))
    assert set(metrics["distances"]) == {"i2i", "magic-dpo"}
    assert metrics["distances"]["i2i"]["fid"]["value"] >= 0
    assert metrics["pass_rate"]["i2i"]["manifest"]["pass_share"]["value"] == 1.0
    assert "manifest" not in metrics["pass_rate"]["magic-dpo"]  # not judged, no judge asked
    # Features were extracted once: the cache holds one vector per distinct image.
    shards = list((eval_dir / "features").rglob("*.safetensors"))
    assert shards


def test_cli_evaluate(toy_run, monkeypatch):
    from typer.testing import CliRunner

    from magic_align.cli import app

    import magic_align.evaluate.stage as stage

    seen = {}

    def fake_run(config, settings, progress=None):
        seen["settings"] = settings
        return {"classifier": [], "notes": ["n1"]}

    monkeypatch.setattr(stage, "run_evaluate", fake_run)
    result = CliRunner().invoke(app, ["evaluate", "tiny", "--settings", "i2i,magic-dpo"])
    assert result.exit_code == 0, result.output
    assert seen["settings"] == ["i2i", "magic-dpo"] and "note: n1" in result.output


def test_missing_sets_are_synthesized_with_the_right_model(toy_run, monkeypatch):
    import magic_align.evaluate.stage as stage
    import magic_align.synthesize as synthesize
    from magic_align.evaluate.stage import ensure_synthetic
    from magic_align.run import prepare_run

    config = toy_run
    paths = prepare_run(config)
    calls = []

    def fake_synthesize(cfg, lora, out_dir, replace_stale=False):
        assert replace_stale  # evaluate's sets are a cache: a stale one is made again, never refused
        manifest = out_dir / "manifest.csv"
        summary = synthesize.SynthesizeSummary(manifest=manifest)
        if not manifest.is_file():  # a complete set of the same model: nothing to do
            calls.append((cfg.sample.strength, lora, out_dir.name))
            out_dir.mkdir(parents=True, exist_ok=True)
            manifest.write_text(",".join(MANIFEST_COLUMNS) + "\n")
            summary.written = 1
        return summary

    monkeypatch.setattr(stage, "synthesize", fake_synthesize)  # the name the evaluate stage calls
    manifest, how = ensure_synthetic(config, paths, "magic-dpo")
    assert manifest is None and "aligned/dpo" in how and "magic train dpo" in how and not calls
    manifest, how = ensure_synthetic(config, paths, "t2i")
    assert manifest is None and "model/" in how
    (paths.model).mkdir(parents=True)
    (paths.aligned / "dpo").mkdir(parents=True)
    assert ensure_synthetic(config, paths, "t2i")[1] == "synthesized"
    assert ensure_synthetic(config, paths, "i2i")[1] == "synthesized"
    assert ensure_synthetic(config, paths, "magic-dpo")[1] == "synthesized"
    assert ensure_synthetic(config, paths, "magic-dpo")[1] == "read"  # already there: not made again
    strength = config.sample.strength
    assert calls == [(1.0, None, "t2i"), (strength, None, "i2i"), (strength, paths.aligned / "dpo", "magic-dpo")]
    assert config.sample.strength == strength  # the caller's config is untouched


def test_a_setting_that_raises_is_a_failure_not_a_skip(toy_run, monkeypatch):
    import magic_align.evaluate.stage as stage
    from magic_align.data.split import run_split
    from magic_align.evaluate.stage import EvaluateIncomplete, run_evaluate
    from magic_align.run import prepare_run

    config = toy_run
    paths = prepare_run(config)
    split = run_split(config, paths)
    _write_manifest(config, "i2i", split.train, COLOURS.get)  # a set built by hand: read as it is
    (paths.aligned / "dpo").mkdir(parents=True)  # the DPO model exists, so its set must be synthesized

    def broken_synthesis(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(stage, "synthesize", broken_synthesis)
    with pytest.raises(EvaluateIncomplete, match="magic-dpo: RuntimeError: CUDA out of memory") as raised:
        run_evaluate(config, ["i2i", "magic-dpo", "magic-rft"])
    assert raised.value.failures == ["magic-dpo: RuntimeError: CUDA out of memory"]
    metrics = json.loads((paths.eval / "metrics.json").read_text())  # what did work is written
    assert metrics["settings"]["magic-dpo"]["status"] == "failed"
    assert "CUDA out of memory" in metrics["settings"]["magic-dpo"]["note"]
    assert metrics["settings"]["magic-rft"]["status"] == "skipped"  # no model: a documented skip, not a failure
    assert metrics["failures"] == raised.value.failures
    assert {row["setting"] for row in metrics["classifier"] if row["group"] == "full"} == {"real", "i2i"}
