"""Target selection: a different condition, uniformly or within the same body region."""

import logging
import random
from collections import Counter

import numpy as np
import pytest

from magic_align.data import targets
from magic_align.data.targets import choose_target

CLASSES = ["acne", "basal cell carcinoma", "psoriasis", "lichen planus", "melanoma", "eczema"]
REGION_OF = {"acne": "face", "basal cell carcinoma": "face", "psoriasis": "extremities", "lichen planus": "extremities",
             "melanoma": "anywhere", "eczema": "flexures"}


@pytest.fixture(autouse=True)
def _fresh_log_cache():
    targets._log_fallback.cache_clear()


def _draws(n=600, **kwargs):
    rng = random.Random(0)
    return Counter(choose_target(rng=rng, classes=CLASSES, **kwargs) for _ in range(n))


def test_uniform_never_returns_the_source_and_covers_the_others():
    counts = _draws(source_label="acne", mode="uniform")
    assert set(counts) == set(CLASSES) - {"acne"}
    assert min(counts.values()) > 600 / 5 * 0.6  # roughly uniform: each of 5 is drawn often


def test_same_region_stays_in_the_region_or_anywhere():
    counts = _draws(source_label="acne", mode="same_region", region_of=REGION_OF)
    assert set(counts) == {"basal cell carcinoma", "melanoma"}
    counts = _draws(source_label="psoriasis", mode="same_region", region_of=REGION_OF)
    assert set(counts) == {"lichen planus", "melanoma"}


def test_anywhere_source_may_go_to_any_other_condition():
    counts = _draws(source_label="melanoma", mode="same_region", region_of=REGION_OF)
    assert set(counts) == set(CLASSES) - {"melanoma"}


def test_record_region_overrides_the_condition_region():
    counts = _draws(source_label="eczema", mode="same_region", region_of=REGION_OF, source_region="FACE")
    assert set(counts) == {"acne", "basal cell carcinoma", "melanoma"}


def test_region_spellings_are_normalised_on_both_sides():
    region_of = {"acne": "head", "basal cell carcinoma": "Face", "psoriasis": "extremities", "eczema": None}
    counts = _draws(source_label="acne", mode="same_region", region_of=region_of, n=50)
    assert set(counts) == {"basal cell carcinoma"}


def test_falls_back_to_uniform_with_the_reason_logged(caplog):
    region_of = dict(REGION_OF, melanoma="extremities")  # eczema is alone in flexures now
    with caplog.at_level(logging.INFO, logger="magic_align.data.targets"):
        counts = _draws(source_label="eczema", mode="same_region", region_of=region_of)
    assert set(counts) == set(CLASSES) - {"eczema"}
    assert "no other condition in region 'flexures'" in caplog.text
    assert caplog.text.count("target for eczema") == 1  # once, not once per draw
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="magic_align.data.targets"):
        _draws(n=5, source_label="acne", mode="same_region", region_of={})
    assert "source region unknown" in caplog.text


def test_unlabeled_source_may_get_any_class_and_numpy_rng_works():
    rng = np.random.default_rng(0)
    counts = Counter(choose_target(None, CLASSES, rng, mode="same_region", region_of=REGION_OF) for _ in range(400))
    assert set(counts) == set(CLASSES)


def test_seeded_choices_repeat_and_bad_inputs_are_errors():
    first = [choose_target("acne", CLASSES, random.Random(5)) for _ in range(3)]
    rng_a, rng_b = random.Random(9), random.Random(9)
    assert [choose_target("acne", CLASSES, rng_a) for _ in range(20)] == [choose_target("acne", CLASSES, rng_b) for _ in range(20)]
    assert len(set(first)) == 1
    with pytest.raises(ValueError, match="no target condition other than 'acne'"):
        choose_target("acne", ["acne"], random.Random(0))
    with pytest.raises(ValueError, match="not 'uniform' or 'same_region'"):
        choose_target("acne", CLASSES, random.Random(0), mode="nearby")


# The paper's Fitzpatrick17k training counts (20 largest conditions, 3,100 images).
FITZPATRICK_TRAIN = {
    "psoriasis": 326, "squamous cell carcinoma": 290, "lichen planus": 246, "basal cell carcinoma": 234,
    "allergic contact dermatitis": 215, "lupus erythematosus": 205, "sarcoidosis": 174, "folliculitis": 171,
    "scabies": 170, "melanoma": 130, "erythema multiforme": 118, "granuloma annulare": 106, "eczema": 102,
    "pityriasis rosea": 96, "acne": 92, "mycosis fungoides": 91, "actinic keratosis": 88, "prurigo nodularis": 85,
    "vitiligo": 83, "keloid": 78,
}


def _planned_targets(*overrides):
    """One target per training image, drawn the way the sample stage plans its units under the paper preset."""
    from pathlib import Path

    from magic_align.checklists.schema import load_checklists
    from magic_align.config import load_config
    from magic_align.data.records import Record
    from magic_align.sample import plan_units

    train = [Record(id=f"{label[:4]}-{i}", path=Path("x.jpg"), label=label)
             for label, n in FITZPATRICK_TRAIN.items() for i in range(n)]
    config = load_config("paper", [f"sample.num_sources={len(train)}", *overrides])
    units = plan_units(config, train, list(FITZPATRICK_TRAIN), load_checklists("fitzpatrick20"), 0)
    return units, Counter(unit.target_label for unit in units)


def test_paper_targets_are_near_uniform_over_the_other_conditions():
    units, counts = _planned_targets()
    assert all(unit.target_label != unit.source_label for unit in units)
    share = len(units) / len(FITZPATRICK_TRAIN)  # 155 per condition if exactly uniform
    assert set(counts) == set(FITZPATRICK_TRAIN)
    assert max(counts.values()) <= 1.5 * share and min(counts.values()) >= 0.5 * share, counts
    # the region rule stays available, and it is the one that skews the set (melanoma may go anywhere)
    _, regional = _planned_targets('sample.target_selection="same_region"')
    assert regional["melanoma"] > 1.5 * share
