"""The procedural demo domain: deterministic, readable by the Fitzpatrick loader, varied, and the
condition-free pretraining images match no condition's checklist."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from magic_align.checklists.schema import load_checklists
from magic_align.config import DataConfig, load_config
from magic_align.data import load_records
from magic_align.data.fitzpatrick import load_fitzpatrick
from magic_align.data.records import DataError
from magic_align.demo import procedural
from magic_align.demo.procedural import (
    CONDITIONS,
    CSV_COLUMNS,
    REGION_OF,
    Canvas,
    blob_alpha,
    generate_condition_free,
    generate_dataset,
    render,
    render_arrays,
)
from magic_align.judges.rules import make_rules_judge
from magic_align.run import RunPaths


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_same_seed_same_dataset_other_seed_other_images(tmp_path):
    first = generate_dataset(tmp_path / "a", per_class=2, seed=5)
    second = generate_dataset(tmp_path / "b", per_class=2, seed=5)
    third = generate_dataset(tmp_path / "c", per_class=2, seed=6)
    assert first.read_text() == second.read_text()
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == sorted(p.name for p in (tmp_path / "b" / "images").iterdir())
    assert {r["md5hash"] for r in read_rows(first)}.isdisjoint({r["md5hash"] for r in read_rows(third)})


def test_an_image_does_not_depend_on_how_many_are_drawn():
    few, _ = render_arrays(["nevus"] * 2, seed=3)
    many, _ = render_arrays(["nevus"] * 5, seed=3)
    assert np.array_equal(few, many[:2])


def test_csv_is_read_by_the_fitzpatrick_loader(tmp_path):
    csv_path = generate_dataset(tmp_path, per_class=3, seed=0)
    rows = read_rows(csv_path)
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    records = load_fitzpatrick(csv_path, tmp_path / "images")
    assert len(records) == 3 * len(CONDITIONS)
    assert {r.label for r in records} == set(CONDITIONS)
    for record in records:
        assert record.region == REGION_OF[record.label]
        assert 1 <= record.skin_type <= 6
        with Image.open(record.path) as image:
            assert image.mode == "RGB" and image.size == (64, 64)
    # every condition is a checklist condition of the demo set, with the same region
    checklists = load_checklists("demo")
    for condition in CONDITIONS:
        assert checklists[condition].region == REGION_OF[condition]


def test_images_vary_in_skin_type_size_and_position():
    _, drawings = render_arrays(["melanoma"] * 40 + ["acne"] * 40, seed=0)
    assert len({d.skin_type for d in drawings}) == 6
    sizes = np.array([d.size for d in drawings[:40]])
    centres = np.array([d.center for d in drawings[:40]])
    assert sizes.std() > 0.5 and centres.std(axis=0).min() > 0.5
    counts = {d.count for d in drawings[40:]}
    assert len(counts) >= 3 and min(counts) >= 4


def test_size_scales_the_geometry():
    small = render("vitiligo", np.random.default_rng(1), size=64).image
    large = render("vitiligo", np.random.default_rng(1), size=128).image
    assert large.shape == (128, 128, 3)
    # the same drawing: downsampled 2x it is close to the 64 px one (not a different layout)
    down = large.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.mean(np.abs(down - small)) < 6.0


def test_blob_alpha_covers_the_ellipse_area():
    canvas = Canvas(64)
    alpha = blob_alpha(canvas, (32.0, 32.0), (10.0, 5.0), angle=0.3)
    assert alpha.sum() == pytest.approx(np.pi * 10 * 5, rel=0.02)
    assert alpha[32, 32] == 1.0 and alpha[0, 0] == 0.0


def test_unknown_label_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown procedural label 'lupus'"):
        render("lupus", np.random.default_rng(0))
    with pytest.raises(ValueError, match="per_class"):
        generate_dataset(Path("unused"), per_class=0, seed=0)


def test_condition_free_images_match_no_checklist(tmp_path):
    csv_path = generate_condition_free(tmp_path, count=36, seed=0)
    rows = read_rows(csv_path)
    assert {r["label"] for r in rows} == {"healthy", "generic-lesion"}
    checklists = load_checklists("demo")
    judge = make_rules_judge(None, checklists)
    for checklist in checklists.conditions:
        scores = []
        for row in rows:
            with Image.open(tmp_path / "images" / f"{row['md5hash']}.png") as image:
                scores.append(judge.grade(image, checklist).score)
        # at most the location item (a third of the images show each region) and rarely a second one
        assert np.mean(scores) <= 0.6, checklist.condition


def test_cli_writes_the_dataset(tmp_path):
    from typer.testing import CliRunner

    from magic_align.cli import app

    result = CliRunner().invoke(app, ["data", "procedural", "--out", str(tmp_path), "--per-class", "2", "--seed", "3", "--condition-free", "2"])
    assert result.exit_code == 0, result.output
    assert len(read_rows(tmp_path / "procedural.csv")) == 2 * len(CONDITIONS)
    assert len(read_rows(tmp_path / "condition_free.csv")) == 2
    assert len(list((tmp_path / "images").glob("*.png"))) == 2 * len(CONDITIONS) + 2


# ------------------------------------------------------------------------------------------ data kind
def test_procedural_is_generated_once_and_read_with_the_fitzpatrick_loader(tmp_path, monkeypatch):
    calls = []

    def generate_dataset(out_dir, per_class, seed):
        calls.append((per_class, seed))
        image_path = Path(out_dir) / "images" / "p1.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 80, 80)).save(image_path)
        csv_path = Path(out_dir) / "procedural.csv"
        csv_path.write_text("md5hash,fitzpatrick_scale,label\np1,2,ring\n")
        return csv_path

    monkeypatch.setattr(procedural, "generate_dataset", generate_dataset)
    paths = RunPaths(tmp_path / "run")
    config = DataConfig(kind="procedural", procedural_per_class=3)
    first = load_records(config, paths)
    second = load_records(config, paths)
    assert calls == [(3, 0)]
    assert first == second and first[0].path == paths.data / "procedural" / "images" / "p1.png"
    load_records(DataConfig(kind="procedural", procedural_per_class=4), paths)  # changed setting: regenerated
    assert calls == [(3, 0), (4, 0)]
    with pytest.raises(DataError, match="needs a run directory"):
        load_records(config, None)


@pytest.mark.parametrize("preset", ["tiny"])  # the demo's dataset comes with its own split: test_procedural_split
def test_the_presets_read_the_generated_dataset_through_the_registered_kind(tmp_path, preset):
    config = load_config(preset, [f"runs_dir='{tmp_path}'", "data.procedural_per_class=2", "data.procedural_seed=4"])
    records = load_records(config.data, RunPaths(tmp_path / preset))
    direct = generate_dataset(tmp_path / "direct", per_class=2, seed=4)
    expected = load_fitzpatrick(direct, direct.parent / "images")
    assert [(r.id, r.label, r.skin_type, r.region) for r in records] == [
        (r.id, r.label, r.skin_type, r.region) for r in expected
    ]
    assert all(Path(r.path).read_bytes() == Path(e.path).read_bytes() for r, e in zip(records, expected))
