"""The paired alignment comparison's statistics: per-source means and the cluster bootstrap."""

import numpy as np
import pytest

from magic_align.evaluate.alignment import paired_summary, per_source_means


def test_per_source_means_by_hand():
    scores = {"u1": 1, "u2": 3, "u3": 5}
    assert per_source_means(scores, ["u1", "u2", "u3"], {"u1": "s1", "u2": "s1", "u3": "s2"}).tolist() == [2.0, 5.0]
    assert per_source_means(scores, ["u1", "u3"], None).tolist() == [1.0, 5.0]


def test_several_images_of_one_source_do_not_count_as_independent_evidence():
    rng = np.random.default_rng(0)
    before = {f"s{i}": int(rng.integers(0, 6)) for i in range(40)}
    after = {unit: min(5, score + int(rng.integers(-1, 3))) for unit, score in before.items()}
    single = paired_summary({"i2i": before, "magic-dpo": after}, "i2i", 500, 0)["differences"]["magic-dpo - i2i"]

    # every source twice, with identical scores: the same evidence
    twice = lambda scores: {f"{unit}-{n}": score for unit, score in scores.items() for n in range(2)}
    source_of = {f"{unit}-{n}": unit for unit in before for n in range(2)}
    clustered = paired_summary({"i2i": twice(before), "magic-dpo": twice(after)}, "i2i", 500, 0, source_of)
    naive = paired_summary({"i2i": twice(before), "magic-dpo": twice(after)}, "i2i", 500, 0)
    difference = clustered["differences"]["magic-dpo - i2i"]
    assert difference["value"] == pytest.approx(single["value"]) and difference["units"] == 80
    assert (difference["low"], difference["high"]) == pytest.approx((single["low"], single["high"]))
    naive_width = naive["differences"]["magic-dpo - i2i"]["high"] - naive["differences"]["magic-dpo - i2i"]["low"]
    assert naive_width < 0.85 * (single["high"] - single["low"])  # what counting units as independent would claim
