import csv

import numpy as np
import pytest
from PIL import Image

from magic_align.config import load_config
from magic_align.data.split import run_split
from magic_align.run import prepare_run
from magic_align.synthesize import MANIFEST_COLUMNS, SynthesizeError, extra_sources, run_synthesize, synthesize


@pytest.mark.slow
def test_synthesize_writes_resized_images_with_provenance_and_resumes(tmp_path):
    extra = tmp_path / "unlabeled"
    extra.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(extra / f"x{i}.png")
    config = load_config("tiny", [f"runs_dir='{tmp_path}'", "sample.steps=10", "sample.strength=0.3",
                                  "synthesize.size=32", "synthesize.per_image=2", f"synthesize.extra_sources='{extra}'"])
    paths = prepare_run(config)
    train = run_split(config, paths).train
    sources = train[:2] + extra_sources(config)
    manifest = run_synthesize(config, lora=None, sources=sources, progress=False)
    assert manifest == paths.synthetic / "manifest.csv"
    with open(manifest, newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
        rows = list(reader)
    assert len(rows) == 2 * len(sources)
    by_id = {record.id: record for record in sources}
    for row in rows:
        source = by_id[row["source_id"]]
        assert row["source_label"] == (source.label or "") and row["target_label"] != row["source_label"]
        assert int(row["source_skin_type"]) == source.skin_type and row["source_group"] == source.group
        assert float(row["strength"]) == 0.3 and row["model_hash"] and row["verdict_score"] == ""
        with Image.open(paths.root / row["path"]) as image:
            assert image.size == (32, 32)
    assert {row["source_label"] for row in rows if row["source_id"].startswith("extra-")} == {""}

    # a rerun does nothing; a missing image is made again, the same
    again = synthesize(config, lora=None, sources=sources, progress=False)
    assert (again.written, again.already_done) == (0, len(rows))
    lost = paths.root / rows[0]["path"]
    before = np.asarray(Image.open(lost), dtype=np.int16)
    lost.unlink()
    assert synthesize(config, lora=None, sources=sources, progress=False).written == 1
    # same seed and target; only float rounding differs with the batch it runs in
    assert np.abs(np.asarray(Image.open(lost), dtype=np.int16) - before).max() <= 2


def test_stale_set_is_replaced_by_evaluate_and_refused_by_plain_synthesize(tmp_path):
    from lora_builders import save_constant_lora

    from magic_align.diffusion.loading import load_run_policy, model_hash, policy_files
    from magic_align.evaluate.stage import ensure_synthetic

    config = load_config("tiny", [f"runs_dir='{tmp_path}'", "data.procedural_per_class=2", "sample.steps=2",
                                  "synthesize.size=32", "synthesize.batch_size=8"])
    paths = prepare_run(config)
    lora = paths.aligned / "dpo"

    def retrain(value: float) -> None:  # a new aligned LoRA: same file name, other bytes
        save_constant_lora(config.model, value, lora)

    def hashes(manifest) -> set[str]:
        with open(manifest, newline="") as handle:
            return {row["model_hash"] for row in csv.DictReader(handle)}

    retrain(0.01)
    first_hash = model_hash(config.model, policy_files(paths, lora))
    assert load_run_policy(config, paths, extra_lora=lora).magic_model_hash == first_hash  # the cheap hash is the real one
    manifest, how = ensure_synthetic(config, paths, "magic-dpo")
    assert how == "synthesized" and hashes(manifest) == {first_hash}
    old_images = {path.name: path.stat().st_mtime_ns for path in (manifest.parent / "images").glob("*.png")}
    assert old_images
    assert ensure_synthetic(config, paths, "magic-dpo") == (manifest, "read")  # complete and current: kept

    retrain(0.02)  # e.g. DPO trained again
    second_hash = model_hash(config.model, policy_files(paths, lora))
    assert second_hash != first_hash
    assert ensure_synthetic(config, paths, "magic-dpo") == (manifest, "synthesized")
    assert hashes(manifest) == {second_hash}
    new_images = {path.name: path.stat().st_mtime_ns for path in (manifest.parent / "images").glob("*.png")}
    assert new_images.keys() == old_images.keys()
    assert all(new_images[name] != old_images[name] for name in old_images)  # every image made again

    retrain(0.03)  # a plain `magic synthesize` into the old folder refuses instead of mixing two models
    with pytest.raises(SynthesizeError, match=f"made with model \\['{second_hash}'\\].*changed since"):
        synthesize(config, lora, manifest.parent, progress=False)
    assert hashes(manifest) == {second_hash}  # untouched


@pytest.mark.slow
def test_changed_sampling_settings_make_the_set_stale(tmp_path):
    """A set made at another strength is never silently reused: plain synthesize refuses it, evaluate's
    replace_stale makes it again, and the alignment comparison keeps one folder per setting."""
    from magic_align.evaluate.alignment import _output_dir
    from magic_align.synthesize import synthesis_settings_hash

    overrides = [f"runs_dir='{tmp_path}'", "sample.steps=10", "synthesize.size=32"]
    first = load_config("tiny", overrides + ["sample.strength=0.3"])
    second = load_config("tiny", overrides + ["sample.strength=0.6"])
    assert synthesis_settings_hash(first) != synthesis_settings_hash(second)
    assert synthesis_settings_hash(first) == synthesis_settings_hash(load_config("tiny", overrides + ["sample.strength=0.3"]))
    paths = prepare_run(first)
    assert _output_dir(first, paths, "i2i", None, "tuning") != _output_dir(second, paths, "i2i", None, "tuning")
    assert _output_dir(first, paths, "i2i", None, "tuning") != _output_dir(first, paths, "i2i", None, "locked")

    sources = run_split(first, paths).train[:2]
    manifest = run_synthesize(first, lora=None, sources=sources, progress=False)
    with pytest.raises(SynthesizeError, match="sampling settings"):
        run_synthesize(second, lora=None, sources=sources, progress=False)
    summary = synthesize(second, lora=None, sources=sources, progress=False, replace_stale=True)
    assert (summary.replaced, summary.written) == (2, 2)
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {float(row["strength"]) for row in rows} == {0.6}
    assert {row["settings_hash"] for row in rows} == {synthesis_settings_hash(second)}
