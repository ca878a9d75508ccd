"""Dataset loaders: tiny CSVs and folders built in a temporary directory, including every bad-input case."""

from pathlib import Path

import pytest
from PIL import Image

from magic_align.config import DataConfig, load_config
from magic_align.data import load_records
from magic_align.data.check import run_data_check
from magic_align.data.records import DataError, LoadProblems, match_labels, normalise_region, parse_skin_type

FITZ_HEADER = "md5hash,fitzpatrick_scale,fitzpatrick_centaur,label,nine_partition_label,three_partition_label,qc,url,url_alphanum"


def _image(path: Path, color=(200, 80, 80)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _fitzpatrick(tmp_path, rows):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    csv_path = tmp_path / "fitz.csv"
    csv_path.write_text(FITZ_HEADER + "\n" + "\n".join(rows) + "\n")
    return csv_path, images


# ------------------------------------------------------------------------------------------ Fitzpatrick17k
def test_fitzpatrick_rows_become_records(tmp_path):
    csv_path, images = _fitzpatrick(tmp_path, [
        "aaa,3,3,Psoriasis,inflammatory,non-neoplastic,,http://x,x",
        "bbb,-1,2,squamous cell  carcinoma,malignant epidermal,malignant,,http://y,y",
        "ccc,9,2,acne,inflammatory,non-neoplastic,,http://z,z",
    ])
    _image(images / "aaa.jpg")
    _image(images / "bbb.png")  # only a .png: the fallback finds it
    problems = LoadProblems()
    records = load_records(DataConfig(kind="fitzpatrick17k", csv=csv_path, images=images), problems=problems)
    by_id = {r.id: r for r in records}
    assert by_id["aaa"].label == "psoriasis" and by_id["aaa"].skin_type == 3 and by_id["aaa"].row == 1
    assert by_id["aaa"].path == images / "aaa.jpg" and by_id["aaa"].group == "aaa"
    assert by_id["bbb"].label == "squamous cell carcinoma" and by_id["bbb"].skin_type == -1
    assert by_id["bbb"].path == images / "bbb.png"
    assert by_id["ccc"].path == images / "ccc.jpg"  # missing: check_images reports it later, with its row
    assert by_id["ccc"].skin_type == -1
    assert any("row 3" in m and "fitzpatrick_scale '9'" in m for m in problems.note_messages)
    assert not problems.messages  # the row is kept (skin type unknown), not dropped


def test_fitzpatrick_missing_column_names_it_and_what_was_expected(tmp_path):
    csv_path = tmp_path / "fitz.csv"
    csv_path.write_text("md5hash,fitzpatrick_scale,diagnosis\naaa,2,acne\n")
    with pytest.raises(DataError) as error:
        load_records(DataConfig(kind="fitzpatrick17k", csv=csv_path, images=tmp_path))
    message = str(error.value)
    assert "fitz.csv is missing column(s) label" in message and "needs the columns md5hash, label" in message
    assert "found: md5hash, fitzpatrick_scale, diagnosis" in message


def test_fitzpatrick_empty_rows_and_duplicates_are_reported(tmp_path):
    csv_path, images = _fitzpatrick(tmp_path, [
        "aaa,2,2,acne,,,,,", ",2,2,acne,,,,,", "bbb,2,2,,,,,,", "aaa,2,2,eczema,,,,,",
    ])
    problems = LoadProblems()
    records = load_records(DataConfig(kind="fitzpatrick17k", csv=csv_path, images=images), problems=problems)
    assert [r.id for r in records] == ["aaa"] and records[0].label == "acne"
    text = "\n".join(problems.messages)
    assert "row 2: empty md5hash" in text and "row 3: empty label" in text and "row 4: id 'aaa' repeats" in text


def test_missing_csv_and_missing_settings_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(DataConfig(kind="fitzpatrick17k", csv=tmp_path / "nope.csv", images=tmp_path))
    with pytest.raises(DataError, match="needs data.csv and data.images"):
        load_records(DataConfig(kind="fitzpatrick17k"))
    with pytest.raises(DataError, match="needs data.images"):
        load_records(DataConfig(kind="folder"))


def test_csv_that_is_not_utf8_names_the_row(tmp_path):
    csv_path = tmp_path / "latin1.csv"
    csv_path.write_bytes("md5hash,label\naaa,acne\nbbb,ecz\xe9ma\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv line 3 \(data row 2\): not UTF-8 text"):
        load_records(DataConfig(kind="fitzpatrick17k", csv=csv_path, images=tmp_path))


def test_region_column_is_used_when_present(tmp_path):
    csv_path = tmp_path / "fitz.csv"
    csv_path.write_text("md5hash,label,region\naaa,acne,Forehead\nbbb,acne,\n")
    records = load_records(DataConfig(kind="fitzpatrick17k", csv=csv_path, images=tmp_path))
    assert [r.region for r in records] == ["face", None]


# ------------------------------------------------------------------------------------------ SCIN
def test_scin_groups_by_case_and_reads_body_parts(tmp_path):
    _image(tmp_path / "imgs" / "1.png")
    csv_path = tmp_path / "scin.csv"
    csv_path.write_text(
        "case_id,image_path,label,fitzpatrick_skin_type,body_parts_arm,body_parts_palm\n"
        "c1,imgs/1.png,Eczema,FST4,YES,\n"
        "c1,imgs/2.png,Eczema,,YES,YES\n"
        "c2,imgs/3.png,Allergic_Contact_Dermatitis,FST9,,\n"
        "c3,,Eczema,,,\n"
    )
    problems = LoadProblems()
    records = load_records(DataConfig(kind="scin", csv=csv_path), problems=problems)
    assert [r.group for r in records] == ["c1", "c1", "c2"]
    assert records[0].path == tmp_path / "imgs" / "1.png" and records[0].skin_type == 4
    assert [r.region for r in records] == ["extremities", None, None]  # two flagged regions: none is "the" one
    assert records[2].label == "allergic_contact_dermatitis"
    assert len({r.id for r in records}) == 3
    assert "row 3: fitzpatrick_skin_type 'FST9'" in "\n".join(problems.note_messages)
    assert "row 4: empty image_path" in "\n".join(problems.messages)
    # matched to the checklist's spelling when the conditions are known
    assert match_labels(records, ["allergic contact dermatitis", "eczema"])[2].label == "allergic contact dermatitis"


def test_scin_missing_columns(tmp_path):
    csv_path = tmp_path / "scin.csv"
    csv_path.write_text("case,image,label\n1,a.png,x\n")
    with pytest.raises(DataError, match=r"missing column\(s\) case_id, image_path; a SCIN CSV needs"):
        load_records(DataConfig(kind="scin", csv=csv_path))


# ------------------------------------------------------------------------------------------ PAD-UFES-20
def test_padufes_codes_patients_and_nested_image_folders(tmp_path):
    images = tmp_path / "images"
    _image(images / "imgs_part_1" / "PAT_1_1_1.png")
    _image(images / "imgs_part_2" / "PAT_2_2_2.png")
    csv_path = tmp_path / "metadata.csv"
    csv_path.write_text(
        "patient_id,lesion_id,fitspatrick,region,diagnostic,img_id\n"
        "PAT_1,1,2.0,FOREARM,BCC,PAT_1_1_1.png\n"
        "PAT_2,2,,FACE,mel,PAT_2_2_2.png\n"
        "PAT_2,3,,HAND,XYZ,PAT_2_3_3.png\n"
    )
    problems = LoadProblems()
    records = load_records(DataConfig(kind="pad-ufes-20", csv=csv_path, images=images), problems=problems)
    assert [(r.label, r.group, r.region, r.skin_type) for r in records] == [
        ("basal cell carcinoma", "PAT_1", "extremities", 2), ("melanoma", "PAT_2", "face", -1)]
    assert records[1].path == images / "imgs_part_2" / "PAT_2_2_2.png"
    assert any("row 3: diagnostic 'XYZ' is not one of ACK, BCC, MEL, SCC, NEV, SEK" in m for m in problems.messages)


# ------------------------------------------------------------------------------------------ folders
def test_class_folders_and_flat_unlabeled_folder(tmp_path):
    root = tmp_path / "classes"
    _image(root / "Basal_Cell_Carcinoma" / "x1.jpg")
    _image(root / "acne" / "sub" / "x2.png")
    (root / "acne" / "readme.txt").write_text("not an image")
    _image(root / ".hidden" / "x3.png")
    records = load_records(DataConfig(kind="folder", images=root), conditions=["basal cell carcinoma", "acne"])
    assert sorted((r.label, r.path.name) for r in records) == [("acne", "x2.png"), ("basal cell carcinoma", "x1.jpg")]
    assert all(r.row == 0 and r.group == r.id for r in records)

    flat = tmp_path / "flat"
    _image(flat / "u1.jpg")
    _image(flat / "u2.png")
    unlabeled = load_records(DataConfig(kind="folder", images=flat))
    assert [(r.id, r.label) for r in unlabeled] == [("u1", None), ("u2", None)]


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_records(DataConfig(kind="folder", images=tmp_path / "empty"))


# ------------------------------------------------------------------------------------------ fields
@pytest.mark.parametrize("text, expected", [
    ("3", 3), ("3.0", 3), ("FST5", 5), ("IV", 4), ("", -1), ("-1", -1), ("7", None), ("dark", None), (None, -1)])
def test_parse_skin_type(text, expected):
    assert parse_skin_type(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("FACE", "face"), ("back of hand", "hands-feet"), ("foot_top_or_side", "hands-feet"), ("head_or_neck", "face"),
    ("torso_back", "trunk"), ("genitalia_or_groin", "flexures"), ("THIGH", "extremities"), ("extremities", "extremities"),
    ("other", None), ("", None), (None, None)])
def test_normalise_region(text, expected):
    assert normalise_region(text) == expected


# ------------------------------------------------------------------------------------------ check command
def test_data_check_reports_unknown_labels_bad_images_and_skipped_rows(tmp_path):
    csv_path, images = _fitzpatrick(tmp_path, [
        "aaa,2,2,psoriasis,,,,,", "bbb,2,2,tinea corporis,,,,,", "ccc,2,2,,,,,,"])
    _image(images / "aaa.jpg")
    (images / "bbb.jpg").write_text("not really a jpeg")
    config = load_config("tiny", ["data.kind=fitzpatrick17k", f"data.csv='{csv_path}'", f"data.images='{images}'",
                                  "judge.checklist=fitzpatrick20", f"runs_dir='{tmp_path / 'runs'}'"])
    report = run_data_check(config, None)
    assert not report.ok and report.records == 2 and report.unknown == {"tinea corporis": 1}
    summary = report.summary()
    assert "tinea corporis (1)" in summary and "expected one of: acne" in summary
    assert "bbb.jpg (" in summary and "row 2): not an image file" in summary and "row 3: empty label" in summary
