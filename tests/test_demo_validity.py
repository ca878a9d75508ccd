"""`python -m magic_align.demo.validity`: what a demo base model can draw. The captions name every part of a
condition's look and never its name; the tables come out for the shipped model at tiny sizes (2 images per
condition, a 2-step sampler, a small CNN probe); a folder that is not a model is refused with its name."""

import math

import pytest

from magic_align.config import load_config
from magic_align.demo.model import LESION_LOOKS, REGION_PHRASES, build_tokenizer, packaged_demo_model_dir
from magic_align.demo.procedural import CONDITIONS, REGION_OF
from magic_align.demo.validity import cut_words, full_look_caption, main, markdown, model_validity


def test_full_look_captions_name_every_part_and_the_region_never_the_condition():
    for condition in CONDITIONS:
        caption = full_look_caption(condition)
        for part, wordings in LESION_LOOKS[condition].items():
            if wordings:
                assert wordings[0] in caption, (condition, part)
        assert caption.endswith(REGION_PHRASES[REGION_OF[condition]])
        assert condition.split("-")[0] not in caption


def test_cut_words_are_the_tail_beyond_the_tokenizer():
    tokenizer = build_tokenizer(max_length=8)  # <start> + 6 words + <end>
    assert cut_words(tokenizer, "a photo of red spots on") == ""
    assert cut_words(tokenizer, "a photo of red spots on skin on the arm") == "skin on the arm"


@pytest.fixture(scope="module")
def result():
    config = load_config("demo", ["evaluate.backbones=['small-cnn']", "evaluate.image_size=64", "evaluate.epochs=3",
                                  "evaluate.recognition_augment=1", "evaluate.bootstrap=50", "sample.steps=2"])
    return model_validity(packaged_demo_model_dir(), per_condition=2, config=config)


def test_tables_of_the_shipped_model_at_tiny_sizes(result):
    for table in ("reconstruction", "text_to_image"):
        rows = result[table]
        assert [row["condition"] for row in rows] == list(CONDITIONS)
        for row in rows:
            assert row["n"] == 2 and 0 <= row["own"] <= 5 and 0 <= row["others"] <= 5 and 0 <= row["recognised"] <= 1
    assert result["validity"]["n"] == 2 * len(CONDITIONS) and result["augment"] == 1
    assert all(row["caption"] == full_look_caption(row["condition"]) for row in result["text_to_image"])
    # the shipped codec keeps the conditions' looks: reconstructions meet their own items far more than others'
    rows = result["reconstruction"]
    assert sum(row["own"] for row in rows) / len(rows) > 2 * sum(row["others"] for row in rows) / len(rows)
    text = markdown(result)
    assert "**Reconstruction**" in text and "**Text to image**" in text and "r(items met, recognised)" in text
    r = result["validity"]["r"]["value"]
    assert math.isnan(r) or -1 <= r <= 1


def test_a_folder_that_is_not_a_model_is_named(tmp_path, capsys):
    assert main([str(tmp_path), "--per-condition", "2"]) == 2
    assert str(tmp_path) in capsys.readouterr().err
