"""Data roles: training sources, a tuning set and a locked validation set never share an image (by id or by file
content); the roles in split.csv are stable; the demo's locked set comes from its own procedural seed; a figure
from the tuning set is refused where a locked one is required."""

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from magic_align import cli
from magic_align.cli import app
from magic_align.config import ConfigError, load_config
from magic_align.data.images import sha256_file
from magic_align.data.records import DataError, Record
from magic_align.data.split import (ROLES, RolesError, Split, build_split, check_roles, divide_test, read_split,
                                    run_split, write_split)
from magic_align.evaluate.alignment import (AlignmentError, alignment_path, held_out_sources, read_locked_alignment,
                                            require_locked, run_alignment_comparison)
from magic_align.evaluate.report.collect import collect_report
from magic_align.run import prepare_run


def _records(tmp_path: Path, counts: dict[str, int], group_size: int = 1) -> list[Record]:
    """Records with a distinct small PNG each (content hashing needs real files)."""
    folder = tmp_path / "images"
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for label_index, (label, count) in enumerate(counts.items()):
        for index in range(count):
            record_id = f"{label}-{index}"
            path = folder / f"{record_id}.png"
            Image.new("RGB", (4, 4), (label_index * 40, index, 7)).save(path)
            group = f"{label}-g{index // group_size}" if group_size > 1 else record_id
            records.append(Record(record_id, path, label, group=group))
    return records


def _ids(records) -> set[str]:
    return {r.id for r in records}


def test_the_test_split_is_divided_into_tuning_and_locked_per_class_and_group(tmp_path):
    records = _records(tmp_path, {"a": 24, "b": 18, "c": 12}, group_size=2)
    split = build_split(records, 3, 0.5, seed=4)
    assert _ids(split.tuning) | _ids(split.locked) == _ids(split.test)
    assert not _ids(split.tuning) & _ids(split.locked) and not _ids(split.train) & _ids(split.test)
    tuning, locked = Counter(r.label for r in split.tuning), Counter(r.label for r in split.locked)
    for label, (_, test) in split.counts().items():  # half of every class locked, within one group of two
        assert abs(locked[label] - test / 2) <= 1 and tuning[label] + locked[label] == test
    assert not {r.group for r in split.tuning} & {r.group for r in split.locked}
    check_roles(split)  # ids and file contents apart: no refusal


def test_roles_are_stable_across_reruns_and_leave_the_train_test_split_as_it_was(tmp_path):
    records = _records(tmp_path, {"a": 20, "b": 20})
    first = build_split(records, 2, 0.5, seed=1, few_shot_fraction=0.2)
    again = build_split(list(reversed(records)), 2, 0.5, seed=1, few_shot_fraction=0.2)
    assert [r.id for r in first.locked] == [r.id for r in again.locked]
    other = build_split(records, 2, 0.5, seed=2)
    assert _ids(first.locked) != _ids(other.locked)
    # the division draws from its own stream: train, test and few-shot are those of a split without roles
    plain = build_split(records, 2, 0.5, seed=1, few_shot_fraction=0.2, locked_fraction=None)
    assert [r.id for r in plain.train] == [r.id for r in first.train]
    assert _ids(plain.few_shot) == _ids(first.few_shot)
    assert _ids(plain.tuning) == _ids(plain.test) and not plain.locked
    tuning, locked = divide_test(first.test, 0.5, seed=1)
    assert _ids(locked) == _ids(first.locked) and _ids(tuning) == _ids(first.tuning)


def test_a_locked_source_that_is_also_a_training_source_is_refused(tmp_path):
    records = _records(tmp_path, {"a": 8, "b": 8})
    split = build_split(records, 2, 0.5, seed=0)
    leaked = Split(train=split.train + split.locked[:1], test=split.test, classes=split.classes,
                   tuning=split.tuning, locked=split.locked)
    with pytest.raises(RolesError, match=f"image {split.locked[0].id} .* is both a train and a locked image"):
        check_roles(leaked)
    # the same image under another id (a copy of a locked file added to training) is found by its content
    copy = tmp_path / "copy.png"
    copy.write_bytes(Path(split.locked[0].path).read_bytes())
    copied = Split(train=split.train + [Record("copy", copy, "a")], test=split.test, classes=split.classes,
                   tuning=split.tuning, locked=split.locked)
    with pytest.raises(RolesError, match=f"locked image {split.locked[0].id} .* same content as train image copy"):
        check_roles(copied)
    check_roles(copied, content_hash=None)  # by id alone the copy passes: the content check is what catches it
    tuned = Split(train=split.train, test=split.test, classes=split.classes, tuning=split.tuning,
                  locked=split.locked + split.tuning[:1])
    with pytest.raises(RolesError, match="both a tuning and a locked image"):
        check_roles(tuned)


def _folder_config(tmp_path, *overrides, duplicate: bool = False):
    for label, count in {"acne": 10, "psoriasis": 8}.items():
        folder = tmp_path / "images" / label
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.new("RGB", (8, 8), (index * 20, 90 if label == "acne" else 30, 90)).save(folder / f"{index}.png")
    if duplicate:  # the same picture twice under two names (two ids): it must end up in one role
        (tmp_path / "images" / "acne" / "copy-of-0.png").write_bytes((tmp_path / "images" / "acne" / "0.png").read_bytes())
    return load_config("tiny", ["data.kind=folder", f"data.images='{tmp_path / 'images'}'", "data.num_classes=2",
                                "judge.checklist=fitzpatrick20", f"runs_dir='{tmp_path / 'runs'}'", *overrides])


def test_run_split_keeps_identical_files_in_one_role_and_records_roles(tmp_path):
    config = _folder_config(tmp_path, duplicate=True)
    paths = prepare_run(config)
    split = run_split(config, paths)
    copies = [r for r in split.train + split.test if r.path.name in ("0.png", "copy-of-0.png") and r.label == "acne"]
    assert len(copies) == 2
    role_of = {r.id: role for role in ROLES for r in split.role(role)}
    assert role_of[copies[0].id] == role_of[copies[1].id]
    rows = list(csv.DictReader(open(paths.data / "split.csv", newline="")))
    assert {row["role"] for row in rows} == set(ROLES)
    assert {row["id"] for row in rows if row["role"] == "locked"} == _ids(split.locked)
    assert json.loads((paths.data / "split.json").read_text())["roles"] == {role: len(split.role(role)) for role in ROLES}
    again = run_split(config, paths)  # read back, not redrawn
    assert [r.id for r in again.locked] == [r.id for r in split.locked]
    changed = config.model_copy(update={"data": config.data.model_copy(update={"locked_fraction": 0.3})})
    with pytest.raises(DataError, match=r"other settings \(locked_fraction differ\)"):
        run_split(changed, paths)


def _write_as_before_roles(paths, rows: list[dict]) -> None:
    """split.csv and split.json as written before roles existed: no role column, no role settings."""
    with open(paths.data / "split.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "label", "group", "split", "few_shot"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    summary = json.loads((paths.data / "split.json").read_text())
    for key in ("locked_fraction", "locked_set"):
        del summary["settings"][key]
    (paths.data / "split.json").write_text(json.dumps(summary))


def test_an_older_split_csv_without_roles_is_divided_once_and_rewritten(tmp_path):
    config = _folder_config(tmp_path)
    paths = prepare_run(config)
    split = run_split(config, paths)
    csv_path = paths.data / "split.csv"
    rows = list(csv.DictReader(open(csv_path, newline="")))
    _write_as_before_roles(paths, rows)
    old = read_split(csv_path, split.train + split.test)
    assert not old.tuning and not old.locked and _ids(old.test) == _ids(split.test)
    upgraded = run_split(config, paths)
    assert [r.id for r in upgraded.train] == [r.id for r in split.train]  # the sides are kept
    assert _ids(upgraded.locked) == _ids(split.locked)  # the same division a new split gets for these settings
    assert "role" in csv_path.read_text().splitlines()[0]
    assert "locked_fraction" in json.loads((paths.data / "split.json").read_text())["settings"]


def test_a_role_on_the_wrong_side_of_split_csv_is_named(tmp_path):
    records = _records(tmp_path, {"a": 4, "b": 4})
    path = tmp_path / "split.csv"
    write_split(build_split(records, 2, 0.5, seed=0), path, {})
    text = path.read_text().replace(",train,0,train", ",train,0,locked", 1)
    path.write_text(text)
    with pytest.raises(DataError, match=r"split.csv row \d+: role 'locked' on the train side; expected train"):
        read_split(path, records)


# ------------------------------------------------------------------------------------------------ demo
def test_the_demo_locked_set_is_drawn_from_its_own_seed_and_shares_no_image(tmp_path):
    config = load_config("tiny", [f"runs_dir='{tmp_path}'", "data.procedural_per_class=4"])
    paths = prepare_run(config)
    split = run_split(config, paths)
    assert _ids(split.tuning) == _ids(split.test)  # the data kind brings the locked set: all of test tunes
    assert split.locked and {r.label for r in split.locked} <= set(split.classes)
    assert all(paths.data / "procedural-locked" in Path(r.path).parents for r in split.locked)
    assert Counter(r.label for r in split.locked) == {label: 2 for label in split.classes}  # the test size per class
    stamp = json.loads((paths.data / "procedural-locked" / "generated.json").read_text())
    assert stamp["seed"] == config.data.procedural_seed + 1
    contents = {role: {sha256_file(r.path) for r in split.role(role)} for role in ROLES}
    assert not contents["locked"] & (contents["train"] | contents["tuning"])
    check_roles(split)
    # the run's split.csv holds the dataset's own images only; the locked set is the plug-in's
    assert not {row["role"] for row in csv.DictReader(open(paths.data / "split.csv"))} & {"locked"}
    with pytest.raises(ConfigError, match="procedural_locked_seed must differ from procedural_seed"):
        load_config("tiny", ["data.procedural_locked_seed=0"])


# --------------------------------------------------------------------------------- locked figures only
def test_compare_takes_its_sources_from_the_chosen_set(tmp_path):
    records = _records(tmp_path, {"a": 12, "b": 12})
    split = build_split(records, 2, 0.5, seed=0)
    assert _ids(held_out_sources(split, 100, 0, "locked")) == _ids(split.locked)
    assert _ids(held_out_sources(split, 100, 0)) == _ids(split.tuning)  # tuning is the default
    assert len(held_out_sources(split, 3, 0, "locked")) == 3
    config = load_config("tiny", [f"runs_dir='{tmp_path}'"])
    paths = prepare_run(config)
    assert alignment_path(paths, "locked") == paths.eval / "alignment.json"
    assert alignment_path(paths, "tuning") == paths.eval / "alignment-tuning.json"
    with pytest.raises(AlignmentError, match="unknown comparison set 'test'; expected tuning or locked"):
        run_alignment_comparison(config, set_name="test")


def _comparison(paths, made_on: str | None, name: str = "alignment.json") -> Path:
    data = {"judge": "rules:tiny", "settings": {}, "units": [],
            "differences": {"magic-dpo - i2i": {"value": 0.4, "low": 0.1, "high": 0.7, "units": 9}}}
    if made_on is not None:
        data["set"] = made_on
    paths.eval.mkdir(parents=True, exist_ok=True)
    (paths.eval / name).write_text(json.dumps(data))
    return paths.eval / name


def test_a_tuning_figure_is_refused_where_a_locked_one_is_required(tmp_path, monkeypatch):
    config = load_config("tiny", [f"runs_dir='{tmp_path}'"])
    paths = prepare_run(config)
    assert read_locked_alignment(_comparison(paths, "locked"))["set"] == "locked"
    for made_on, found in (("tuning", "the tuning set"), (None, r"no recorded set \(made before data roles existed\)")):
        path = _comparison(paths, made_on)  # e.g. alignment-tuning.json copied over alignment.json
        with pytest.raises(AlignmentError, match=f"holds figures from {found}, where locked-set figures are required"):
            read_locked_alignment(path)
        with pytest.raises(AlignmentError):
            require_locked(json.loads(path.read_text()), path)

    # the report states no figure from it: the file is listed as a problem and the section stays empty
    _comparison(paths, "tuning")
    context = collect_report(config)
    assert "alignment" in context.missing
    assert any("the tuning set, where locked-set figures are required" in p for p in context.problems)
    _comparison(paths, "locked")
    assert collect_report(config).sections["alignment"]["differences"][0]["estimate"]["value"] == 0.4

    # `magic run` closes with the locked figures, and refuses (one line, exit 2) a file from another set
    monkeypatch.setattr(cli, "_run_stages", lambda run_config, force: paths)
    runner = CliRunner()
    result = runner.invoke(app, ["run", "tiny", "--set", f"runs_dir='{tmp_path}'"])
    assert result.exit_code == 0 and "locked set: magic-dpo - i2i: items met +0.40 [+0.10, +0.70]" in result.output
    _comparison(paths, "tuning")
    result = runner.invoke(app, ["run", "tiny", "--set", f"runs_dir='{tmp_path}'"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert "the tuning set, where locked-set figures are required" in " ".join(result.output.split())


def test_an_older_split_csv_keeps_identical_test_files_in_one_role(tmp_path):
    """A split.csv written before roles existed may hold two copies of one picture on its test side under two ids
    (they were not grouped then); dividing it must keep them in one role instead of refusing the run."""
    for seed in range(6):  # several draws: an ungrouped division separates the copies in some of them
        _older_split_with_copies_on_the_test_side(tmp_path / str(seed), seed)


def _older_split_with_copies_on_the_test_side(tmp_path, seed: int) -> None:
    config = _folder_config(tmp_path, f"data.split_seed={seed}", duplicate=True)
    paths = prepare_run(config)
    split = run_split(config, paths)
    csv_path = paths.data / "split.csv"
    rows = list(csv.DictReader(open(csv_path, newline="")))
    copies = {"acne-0.png", "acne-copy-of-0.png"}
    ids = [row["id"] for row in rows]
    copy_ids = [r.id for r in split.train + split.test if f"{r.label}-{r.path.name}" in copies]
    assert len(copy_ids) == 2
    # as written before roles existed: both copies on the test side, each its own group, every other acne image
    # on the test side too, so an ungrouped division puts the two copies in different roles
    for row in rows:
        if row["id"] in copy_ids or row["label"] == "acne":
            row["split"] = "test"
        row["group"] = row["id"]
    keep_train = [row for row in rows if row["label"] == "acne"][:2]
    for row in keep_train:
        if row["id"] not in copy_ids:
            row["split"] = "train"
    _write_as_before_roles(paths, rows)
    upgraded = run_split(config, paths)
    role_of = {r.id: role for role in ROLES for r in upgraded.role(role)}
    assert role_of[copy_ids[0]] == role_of[copy_ids[1]] != "train"
    assert set(ids) == set(role_of)


def test_a_locked_comparison_refuses_an_extra_source_that_copies_a_locked_image(tmp_path, monkeypatch):
    """`synthesize.extra_sources` (MAGIC-A) are sampled for pairs and synthesized from: a copy of a locked image
    among them is a training source, so the locked comparison refuses to run."""
    from magic_align.evaluate import alignment

    config = _folder_config(tmp_path)
    split = run_split(config, prepare_run(config))
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "unlabelled.png").write_bytes(Path(split.locked[0].path).read_bytes())
    config = load_config("tiny", ["data.kind=folder", f"data.images='{tmp_path / 'images'}'", "data.num_classes=2",
                                  "judge.checklist=fitzpatrick20", f"runs_dir='{tmp_path / 'runs'}'",
                                  f"synthesize.extra_sources='{extra}'"])
    monkeypatch.setattr(alignment, "_require_models", lambda chosen, paths: None)  # the roles are checked first
    with pytest.raises(RolesError, match=f"same content as locked image {split.locked[0].id}|locked image "
                                         f"{split.locked[0].id} .* same content as train image extra-"):
        run_alignment_comparison(config, set_name="locked")
