"""The split builder: N largest classes, stratified, seeded, group-disjoint; split.csv round trip."""

import json
from collections import Counter
from pathlib import Path

import pytest

from magic_align.data.records import DataError, Record
from magic_align.data.split import build_split, largest_classes, read_split, write_split


def _records(counts: dict[str, int], group_size: int = 1, prefix: str = "") -> list[Record]:
    records = []
    for label, count in counts.items():
        for index in range(count):
            record_id = f"{prefix}{label}-{index}"
            group = f"{prefix}{label}-g{index // group_size}" if group_size > 1 else record_id
            records.append(Record(record_id, Path(f"{record_id}.jpg"), label, group=group))
    return records


def test_largest_classes_are_chosen_with_ties_broken_by_name():
    records = _records({"b": 5, "a": 5, "c": 9, "d": 1})
    assert largest_classes(records, 3) == (["c", "a", "b"], [])
    with pytest.raises(DataError, match="data.num_classes = 5 but the data has only 4 label"):
        largest_classes(records, 5)


def test_only_labels_with_a_checklist_are_classes():
    # PAD-UFES-20-like counts: nevus and seborrheic keratosis are large but have no checklist
    records = _records({"bcc": 8, "ack": 7, "nev": 6, "sek": 5, "scc": 4, "mel": 2})
    classes, skipped = largest_classes(records, 4, eligible=["ack", "bcc", "mel", "scc", "other"])
    assert classes == ["bcc", "ack", "scc", "mel"] and skipped == ["nev", "sek"]
    split = build_split(records, 4, 0.5, seed=0, eligible=["ack", "bcc", "mel", "scc"])
    assert split.classes == classes and split.skipped_classes == ["nev", "sek"]
    with pytest.raises(DataError, match="only 4 label\\(s\\) with a checklist"):
        largest_classes(records, 5, eligible=["ack", "bcc", "mel", "scc"])


def test_split_is_stratified_exactly_with_one_image_per_group():
    counts = {"psoriasis": 11, "acne": 7, "eczema": 4, "keloid": 2, "scabies": 1}
    split = build_split(_records(counts), num_classes=4, train_fraction=0.5, seed=3)
    assert split.classes == ["psoriasis", "acne", "eczema", "keloid"]
    assert split.counts() == {"psoriasis": (6, 5), "acne": (4, 3), "eczema": (2, 2), "keloid": (1, 1)}  # round(n/2)
    assert not {r.label for r in split.train + split.test} - set(split.classes)  # scabies left out
    split30 = build_split(_records(counts), num_classes=3, train_fraction=0.3, seed=0)
    assert split30.counts() == {"psoriasis": (3, 8), "acne": (2, 5), "eczema": (1, 3)}


def test_split_is_seeded():
    records = _records({"a": 20, "b": 20})
    first = build_split(records, 2, 0.5, seed=1)
    again = build_split(list(reversed(records)), 2, 0.5, seed=1)  # input order does not matter
    other = build_split(records, 2, 0.5, seed=2)
    assert [r.id for r in first.train] == [r.id for r in again.train]
    assert {r.id for r in first.train} != {r.id for r in other.train}


def test_no_group_on_both_sides_and_counts_stay_close():
    # groups of 3 images; some groups mix two classes (a patient with two diagnoses)
    records = _records({"a": 30, "b": 24, "c": 18}, group_size=3)
    mixed = [Record(f"m{i}", Path(f"m{i}.jpg"), "a" if i % 2 else "c", group=f"patient-{i // 4}") for i in range(16)]
    split = build_split(records + mixed, 3, 0.5, seed=7)
    train_groups, test_groups = {r.group for r in split.train}, {r.group for r in split.test}
    assert not train_groups & test_groups
    assert len(split.train) + len(split.test) == len(records) + len(mixed)
    for label, (train, test) in split.counts().items():
        assert abs(train - test) <= 4, (label, train, test)  # whole groups of 3-4 move together


def test_few_shot_subset_is_stratified_and_inside_train():
    split = build_split(_records({"a": 40, "b": 20, "c": 6}), 3, 0.5, seed=0, few_shot_fraction=0.1)
    assert {r.id for r in split.few_shot} <= {r.id for r in split.train}
    assert Counter(r.label for r in split.few_shot) == {"a": 2, "b": 1, "c": 1}  # at least one per class


def test_a_class_on_one_side_only_is_an_error():
    records = _records({"a": 4}, group_size=4) + _records({"b": 4})  # every image of a in one group
    with pytest.raises(DataError, match=r"no train or no test image: a \(train [04], test [04]\)"):
        build_split(records, 2, 0.5, seed=0)


def test_split_csv_round_trip(tmp_path):
    records = _records({"a": 6, "b": 4})
    split = build_split(records, 2, 0.5, seed=0, few_shot_fraction=0.5)
    path = tmp_path / "data" / "split.csv"
    write_split(split, path, {"seed": 0})
    assert path.read_text().splitlines()[0] == "id,label,group,split,few_shot,role"
    summary = json.loads(path.with_suffix(".json").read_text())
    assert summary["counts"] == {"a": [3, 3], "b": [2, 2]}
    assert summary["roles"] == {"train": 5, "tuning": 3, "locked": 2}  # a: round(1.5) = 2 tuning, 1 locked; b: 1, 1
    again = read_split(path, records)
    assert [r.id for r in again.tuning] == [r.id for r in split.tuning]
    assert [r.id for r in again.locked] == [r.id for r in split.locked]
    assert [r.id for r in again.train] == [r.id for r in split.train]
    assert [r.id for r in again.test] == [r.id for r in split.test]
    assert {r.id for r in again.few_shot} == {r.id for r in split.few_shot}
    assert again.classes == split.classes
    with pytest.raises(DataError, match=r"split.csv row \d+: id 'a-0' is not in the dataset any more"):
        read_split(path, [r for r in records if r.id != "a-0"])


# ------------------------------------------------------------------------------------------ stage + CLI
def _folder_config(tmp_path, *overrides):
    from PIL import Image

    from magic_align.config import load_config

    for label, count in {"acne": 6, "psoriasis": 4, "keloid": 2}.items():
        for index in range(count):
            folder = tmp_path / "images" / label
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (index * 20, 90, 90)).save(folder / f"{index}.png")
    (tmp_path / "images" / "acne" / "5.png").write_bytes(b"broken")  # skipped with a count
    return load_config("tiny", [
        "data.kind=folder", f"data.images='{tmp_path / 'images'}'", "data.num_classes=2",
        "judge.checklist=fitzpatrick20", f"runs_dir='{tmp_path / 'runs'}'", *overrides])


def test_run_split_writes_once_reuses_and_refuses_other_settings(tmp_path):
    from magic_align.data.split import run_split
    from magic_align.run import prepare_run

    config = _folder_config(tmp_path)
    paths = prepare_run(config)
    split = run_split(config, paths)
    assert split.classes == ["acne", "psoriasis"] and split.counts() == {"acne": (2, 3), "psoriasis": (2, 2)}
    again = run_split(config, paths)
    assert [r.id for r in again.train] == [r.id for r in split.train] and again.classes == split.classes
    changed = config.model_copy(update={"data": config.data.model_copy(update={"split_seed": 5})})
    with pytest.raises(DataError, match=r"other settings \(seed differ\)"):
        run_split(changed, paths)
    assert len(run_split(changed, paths, force=True).train) == 4
    stopping = config.model_copy(update={"data": config.data.model_copy(update={"on_bad_image": "stop"})})
    from magic_align.data.images import BadImageError

    with pytest.raises(BadImageError, match=r"5\.png"):
        run_split(stopping, paths, force=True)


def test_data_cli_split_and_check(tmp_path):
    from typer.testing import CliRunner

    from magic_align.cli import app

    _folder_config(tmp_path)
    sets = ["--set", "data.kind=folder", "--set", f"data.images='{tmp_path / 'images'}'", "--set", "data.num_classes=2",
            "--set", "judge.checklist=fitzpatrick20", "--set", f"runs_dir='{tmp_path / 'runs'}'"]
    runner = CliRunner()
    result = runner.invoke(app, ["data", "split", "tiny", *sets])
    assert result.exit_code == 0, result.output
    assert "2 classes: train 4, test 5" in result.output
    assert "roles: train 4, tuning 3 (for choosing settings), locked 2" in result.output  # acne 3: 2 + 1; psoriasis 2: 1 + 1
    assert (tmp_path / "runs" / "tiny" / "data" / "split.csv").is_file()
    result = runner.invoke(app, ["data", "check", "tiny", *sets])
    assert result.exit_code == 1  # one broken image
    assert "5.png" in result.output and "1 bad" in result.output
    result = runner.invoke(app, ["data", "split", "tiny", *sets, "--set", "data.num_classes=5"])
    assert result.exit_code == 2 and "(num_classes differ)" in " ".join(result.output.split())
    result = runner.invoke(app, ["data", "split", "tiny", "--force", *sets, "--set", "data.num_classes=5"])
    text = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 2 and "data.num_classes = 5 but the data has only 3 label(s)" in text


# ------------------------------------------------------------------------- published split files
FITZ_COLUMNS = ["md5hash", "fitzpatrick_scale", "fitzpatrick_centaur", "label", "nine_partition_label",
                "three_partition_label", "qc", "url", "url_alphanum"]


def _fitz_row(md5hash: str, label: str) -> list[str]:
    return [md5hash, "2", "2", label, "inflammatory", "non-neoplastic", "", f"https://example.org/{md5hash}.jpg",
            f"httpexampleorg{md5hash}jpg.jpg"]


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(FITZ_COLUMNS)
        writer.writerows(rows)
    return path


@pytest.fixture
def published(tmp_path):
    """A Fitzpatrick17k-format dataset (CSV + <md5hash>.jpg) and split files in the authors' format: train.csv and
    test.csv holding dataset rows. The dataset has a fourth, larger label that the split files leave out."""
    from PIL import Image

    labels = {"psoriasis": 6, "acne": 4, "eczema": 4, "keloid": 9}
    rows = [_fitz_row(f"{label[:3]}{i:029d}", label) for label, n in labels.items() for i in range(n)]
    images = tmp_path / "images"
    images.mkdir()
    for index, row in enumerate(rows):  # distinct images: identical files may not sit in two roles
        Image.new("RGB", (8, 8), (index * 9, 80, 120)).save(images / f"{row[0]}.jpg")
    _write_csv(tmp_path / "fitzpatrick17k.csv", rows)
    chosen = [row for row in rows if row[3] != "keloid"]
    train, test = chosen[0::2], chosen[1::2]
    split_dir = tmp_path / "splits"
    _write_csv(split_dir / "train.csv", train)
    _write_csv(split_dir / "test.csv", test)

    def config(*extra):
        from magic_align.config import load_config

        return load_config("tiny", [f"runs_dir='{tmp_path / 'runs'}'", 'data.kind="fitzpatrick17k"',
                                    f"data.csv='{tmp_path / 'fitzpatrick17k.csv'}'", f"data.images='{images}'",
                                    f"data.split_dir='{split_dir}'", "data.num_classes=3",
                                    'judge.checklist="fitzpatrick20"', *extra])

    return config, split_dir, train, test


def test_published_split_files_are_used_as_they_are(published):
    from magic_align.data.split import run_split
    from magic_align.run import prepare_run

    config, split_dir, train, test = published
    paths = prepare_run(config())
    split = run_split(config(), paths)
    assert [r.id for r in split.train] == [row[0] for row in train]  # not redrawn: the files' rows, in order
    assert [r.id for r in split.test] == [row[0] for row in test]
    assert split.classes == ["psoriasis", "acne", "eczema"]  # keloid is larger, but the split leaves it out
    assert all(r.path.name == f"{r.id}.jpg" for r in split.train)
    assert [r.id for r in run_split(config(), paths).train] == [r.id for r in split.train]  # read back

    few = run_split(config("name='few'", "data.few_shot_fraction=0.4"), prepare_run(config("name='few'")))
    assert few.few_shot and {r.id for r in few.few_shot} < {r.id for r in few.train}

    # a changed split file is another split: the run refuses to mix them
    _write_csv(split_dir / "train.csv", train[:-1])
    with pytest.raises(DataError, match="split_files"):
        run_split(config(), paths)


def test_published_split_rows_that_do_not_fit_the_dataset_are_named(published, tmp_path):
    from magic_align.data.split import run_split
    from magic_align.run import prepare_run

    config, split_dir, train, test = published

    def fails(name, rows, match, *extra):
        _write_csv(split_dir / name, rows)
        run = config(f"name='bad{len(list((tmp_path / 'runs').glob('*')))}'", *extra)
        with pytest.raises(DataError, match=match):
            run_split(run, prepare_run(run))
        _write_csv(split_dir / "train.csv", train)
        _write_csv(split_dir / "test.csv", test)

    unknown = _fitz_row("f" * 32, "acne")
    fails("train.csv", [*train[:1], unknown, *train[1:]], f"train.csv row 2: md5hash '{'f' * 32}' is not an image")
    relabelled = [*test[:2], [test[2][0], *test[2][1:3], "vitiligo", *test[2][4:]], *test[3:]]
    fails("test.csv", relabelled, "test.csv row 3: label 'vitiligo' but the dataset labels this image")
    fails("test.csv", [*test, train[0]], "test.csv: 1 image\\(s\\) also in .*train.csv")
    fails("train.csv", train, "hold 3 classes but data.num_classes = 4", "data.num_classes=4")
    (split_dir / "test.csv").unlink()
    with pytest.raises(DataError, match="has no test.csv"):
        run_split(config("name='no-test'"), prepare_run(config("name='no-test'")))


def test_published_split_files_from_windows_with_upper_case_digests_are_read(published):
    # a BOM, CRLF line endings and md5hash in upper-case hex (the digest is case-insensitive) name the same images
    from magic_align.data.split import run_split
    from magic_align.run import prepare_run

    config, split_dir, train, test = published
    for name, rows in (("train.csv", train), ("test.csv", test)):
        lines = [",".join(FITZ_COLUMNS), *(",".join([row[0].upper(), *row[1:]]) for row in rows)]
        (split_dir / name).write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    run = config("name='windows'")
    split = run_split(run, prepare_run(run))
    assert [r.id for r in split.train] == [row[0] for row in train]
    assert [r.id for r in split.test] == [row[0] for row in test]
    # the same image spelled in both cases is still one image named twice
    _write_csv(split_dir / "train.csv", [*train, [train[0][0].upper(), *train[0][1:]]])
    run = config("name='twice'")
    with pytest.raises(DataError, match=f"train.csv row {len(train) + 1}: the image of row 1 again"):
        run_split(run, prepare_run(run))
