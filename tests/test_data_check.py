"""`magic data check`: every unusable row named by file and row with its reason, and the exit status."""

import random
from pathlib import Path

from PIL import Image
from typer.testing import CliRunner

from magic_align.cli import app
from magic_align.config import load_config
from magic_align.data.check import run_data_check

HEADER = "md5hash,fitzpatrick_scale,label"


def _image(path: Path, size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 80, 80)).save(path)
    return path


def _dataset(tmp_path, rows: list[str]) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    csv_path = tmp_path / "fitz.csv"
    csv_path.write_text(HEADER + "\n" + "\n".join(rows) + "\n")
    return csv_path, images


def _overrides(tmp_path, csv_path, images, *extra) -> list[str]:
    return ["data.kind=fitzpatrick17k", f"data.csv='{csv_path}'", f"data.images='{images}'",
            "judge.checklist=demo", f"runs_dir='{tmp_path / 'runs'}'", *extra]


def test_every_kind_of_unusable_row_is_named_with_file_row_and_reason(tmp_path):
    csv_path, images = _dataset(tmp_path, [
        "good,2,acne",          # row 1: usable
        "gone,2,acne",          # row 2: no file
        "empty,2,acne",         # row 3: 0 bytes
        "cut,2,acne",           # row 4: truncated
        "text,2,acne",          # row 5: not an image
        "big,2,acne",           # row 6: over data.max_image_pixels
        "good,2,nevus",         # row 7: repeats row 1's id
        ",2,acne",              # row 8: dropped while reading (empty md5hash)
        "other,2,tinea",        # row 9: no checklist for the label
        "kept,9,nevus",         # row 10: unreadable skin type, kept as unknown: a note, not unusable
    ])
    _image(images / "good.jpg")
    (images / "empty.jpg").write_bytes(b"")
    whole = tmp_path / "whole.png"
    Image.frombytes("RGB", (24, 24), random.Random(0).randbytes(24 * 24 * 3)).save(whole)  # under the pixel limit
    (images / "cut.png").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    (images / "text.jpg").write_text("not really a jpeg")
    _image(images / "big.jpg", (40, 40))
    _image(images / "other.jpg")
    _image(images / "kept.jpg")

    report = run_data_check(load_config("tiny", _overrides(tmp_path, csv_path, images, "data.max_image_pixels=1000")), None)
    lines = [str(entry) for entry in report.unusable]
    expected = {
        2: "file not found", 3: "empty file (0 bytes)", 4: "truncated", 5: "not an image file",
        6: "over the limit of 1000", 7: "id 'good' repeats", 8: "empty md5hash", 9: "label 'tinea' has no checklist in demo",
    }
    assert len(lines) == len(expected)
    for row, reason in expected.items():
        assert any(f"row {row}" in line and reason in line and "fitz.csv" in line for line in lines), (row, lines)
    assert [entry.row for entry in report.unusable] == sorted(expected)  # in row order
    assert not any("row 10" in line for line in lines)
    assert "row 10: fitzpatrick_scale '9'" in report.summary()
    assert not report.ok


def _check(tmp_path, csv_path, images):
    options = [part for override in _overrides(tmp_path, csv_path, images) for part in ("--set", override)]
    return CliRunner().invoke(app, ["data", "check", "tiny", *options])


def test_cli_exit_status_follows_unusable_rows(tmp_path):
    csv_path, images = _dataset(tmp_path, ["aaa,2,acne", "bbb,2,nevus"])
    _image(images / "aaa.jpg")
    _image(images / "bbb.jpg")
    clean = _check(tmp_path, csv_path, images)
    assert clean.exit_code == 0, clean.output
    assert "every row is usable" in clean.output

    csv_path.write_text(HEADER + "\naaa,2,acne\nbbb,2,tinea corporis\n")  # only a label without a checklist
    unknown = _check(tmp_path, csv_path, images)
    assert unknown.exit_code == 1
    assert "fitz.csv row 2 (bbb.jpg): label 'tinea corporis' has no checklist in demo" in unknown.output

    csv_path.write_text(HEADER + "\naaa,2,acne\nbbb,2,\n")  # only a row dropped while reading the CSV
    dropped = _check(tmp_path, csv_path, images)
    assert dropped.exit_code == 1
    assert "fitz.csv row 2: empty label" in dropped.output

    missing = _check(tmp_path, tmp_path / "nope.csv", images)  # the dataset cannot be read at all: one line
    assert missing.exit_code == 2 and "Traceback" not in missing.output and "nope.csv" in missing.output


def test_folder_records_are_named_by_their_file(tmp_path):
    root = tmp_path / "classes"
    _image(root / "acne" / "a.png")
    _image(root / "tinea" / "b.png")
    (root / "acne" / "c.png").write_bytes(b"")
    config = load_config("tiny", ["data.kind=folder", f"data.images='{root}'", "judge.checklist=demo",
                                  f"runs_dir='{tmp_path / 'runs'}'"])
    lines = [str(entry) for entry in run_data_check(config, None).unusable]
    assert any(str(root / "tinea" / "b.png") in line and "label 'tinea' has no checklist" in line for line in lines)
    assert any(str(root / "acne" / "c.png") in line and "empty file" in line for line in lines)
    assert len(lines) == 2
