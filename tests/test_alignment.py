"""The paired alignment comparison's statistics (per-source means, the cluster bootstrap) and how the compared
models are named (with the objective each was trained with)."""

from pathlib import Path

import numpy as np
import pytest

from magic_align.data.records import Record
from magic_align.data.split import Split
from magic_align.evaluate.alignment import grader_images, grouped_summaries, paired_summary, per_source_means


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


def test_the_breakdown_gives_each_groups_own_paired_difference_by_hand():
    from magic_align.evaluate.metrics import skin_group

    # sources a, b on light skin (two units each), c on dark skin, d unknown; the aligned model gains on light
    # skin and loses on dark skin, and has no image of unit d2
    source_of = {"a1": "a", "a2": "a", "b1": "b", "b2": "b", "c1": "c", "d1": "d", "d2": "d"}
    skin = {"a": 1, "b": 2, "c": 6, "d": -1}
    before = {"a1": 1, "a2": 3, "b1": 2, "b2": 2, "c1": 5, "d1": 0, "d2": 4}
    after = {"a1": 4, "a2": 4, "b1": 3, "b2": 5, "c1": 3, "d1": 1}
    group_of = {unit: skin_group(skin[source]) for unit, source in source_of.items()}
    groups = grouped_summaries({"i2i": before, "magic-dpo": after}, "i2i", group_of, ["1-2", "3-4", "5-6"], 200, 0,
                               source_of)
    assert list(groups) == ["1-2", "5-6", "unknown"]  # the named order, empty groups left out, others after
    light = groups["1-2"]
    assert light["sources"] == 2
    # per-source means: a 2 -> 4, b 2 -> 4; the difference is the mean of the per-source differences
    assert light["settings"]["i2i"]["value"] == pytest.approx(2.0)
    assert light["settings"]["magic-dpo"]["value"] == pytest.approx(4.0)
    assert light["differences"]["magic-dpo - i2i"]["value"] == pytest.approx(2.0)
    assert light["differences"]["magic-dpo - i2i"]["units"] == 4
    assert groups["5-6"]["differences"]["magic-dpo - i2i"]["value"] == pytest.approx(-2.0)
    unknown = groups["unknown"]  # only unit d1 is paired: 0 -> 1; the baseline's own mean keeps d2
    assert unknown["differences"]["magic-dpo - i2i"] == pytest.approx({"value": 1.0, "low": 1.0, "high": 1.0,
                                                                       "units": 1})
    assert unknown["settings"]["i2i"]["value"] == pytest.approx(2.0)
    assert [skin_group(t) for t in (1, 2, 3, 4, 5, 6, -1, 7)] == ["1-2", "1-2", "3-4", "3-4", "5-6", "5-6",
                                                                   "unknown", "unknown"]


# ------------------------------------------------------------------------------------------ objective labels
def test_objective_labels():
    from magic_align.evaluate.labels import TrainedObjective

    assert TrainedObjective("dpo", "trajectory").label == "MAGIC-DPO (trajectory, as in the paper)"
    assert TrainedObjective("dpo", "denoising").label == "MAGIC-DPO (Diffusion-DPO objective)"
    assert TrainedObjective("rft", "trajectory", "none").label == "MAGIC-RFT (reward-weighted trajectory, as in the paper)"
    assert TrainedObjective("rft", "trajectory", "unit").label == "MAGIC-RFT (reward-weighted trajectory, unit baseline)"
    assert TrainedObjective("rft", "denoising", "unit").label == "MAGIC-RFT (reward-weighted denoising, unit baseline)"
    assert TrainedObjective("rft", "denoising", "none").label == "MAGIC-RFT (reward-weighted denoising)"
    assert TrainedObjective("dpo", None).label == "MAGIC-DPO"  # known nowhere: the plain name


def test_the_objective_comes_from_the_summary_then_config_toml(tmp_path):
    import json

    from magic_align.evaluate.labels import SettingLabels, trained_objective
    from magic_align.run import RunPaths

    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir()
    assert trained_objective(paths, "dpo").objective is None  # neither exists
    paths.config.write_text('[dpo]\nobjective = "trajectory"\n[rft]\nobjective = "denoising"\nbaseline = "unit"\n')
    assert trained_objective(paths, "dpo").source == "config.toml"
    (paths.aligned / "dpo").mkdir(parents=True)
    (paths.aligned / "dpo" / "dpo.json").write_text("{not json")  # unreadable: the next source
    assert trained_objective(paths, "dpo").objective == "trajectory"
    (paths.aligned / "dpo" / "dpo.json").write_text(json.dumps({"objective": "denoising"}))
    found = trained_objective(paths, "dpo")
    assert (found.objective, found.source) == ("denoising", "aligned/dpo/dpo.json")

    labels = SettingLabels.of_run(paths)
    assert labels("magic-dpo") == labels("dpo") == "MAGIC-DPO (Diffusion-DPO objective)"
    assert labels("magic-rft") == "MAGIC-RFT (reward-weighted denoising, unit baseline)"
    assert labels("i2i") == "I2I, before alignment"
    assert labels.relabel("magic-dpo+unlabeled", "+ MAGIC-DPO + unlabeled sources") == \
        "+ MAGIC-DPO (Diffusion-DPO objective) + unlabeled sources"
    assert labels.relabel("magic-dpo", "+ MAGIC-DPO (Diffusion-DPO objective)") == "+ MAGIC-DPO (Diffusion-DPO objective)"
    # what `magic compare` records per model in eval/alignment.json
    assert labels.describe("magic-dpo") == {"label": "MAGIC-DPO (Diffusion-DPO objective)", "objective": {
        "method": "dpo", "objective": "denoising", "source": "aligned/dpo/dpo.json"}}
    assert labels.describe("i2i") == {"label": "I2I, before alignment"}

    # a negative control says so wherever the model is named, so it is never read as an aligned model
    (paths.aligned / "dpo" / "dpo.json").write_text(json.dumps({"objective": "denoising",
                                                                "preference_control": "flipped"}))
    labels = SettingLabels.of_run(paths)
    assert labels("magic-dpo") == "MAGIC-DPO (Diffusion-DPO objective, flipped-preference control)"
    assert labels.describe("magic-dpo")["objective"]["preference_control"] == "flipped"
    (paths.aligned / "dpo" / "dpo.json").write_text(json.dumps({"objective": "denoising", "preference_control": "none"}))
    assert SettingLabels.of_run(paths)("magic-dpo") == "MAGIC-DPO (Diffusion-DPO objective)"


# ------------------------------------------------------------------------------------ the independent measure
def test_alignment_json_holds_the_independent_measure_with_intervals(tmp_path):
    """Hand-made outputs: the baseline's images look like a wrong condition, the aligned model's like the target.
    Recognition rises with an interval above 0, so the judge's gain is marked confirmed."""
    from types import SimpleNamespace

    from test_recognition import CONDITIONS, draw

    from magic_align.config import load_config
    from magic_align.evaluate.alignment import independent_measures
    from magic_align.run import prepare_run

    config = load_config("tiny", [f"runs_dir='{tmp_path}'", "evaluate.backbones=['efficientnet-lite0']",
                                  "evaluate.image_size=64", "evaluate.epochs=30", "evaluate.bootstrap=200"])
    paths = prepare_run(config)
    rng = np.random.default_rng(1)

    def image(folder: str, condition: str, index: int) -> str:
        relative = f"{folder}/{condition}-{index}.png"
        (paths.root / folder).mkdir(parents=True, exist_ok=True)
        draw(condition, rng).save(paths.root / relative)
        return relative

    train = [SimpleNamespace(id=f"t-{c}-{i}", path=paths.root / image("real", c, i), label=c)
             for c in CONDITIONS for i in range(8)]
    split = SimpleNamespace(train=train, test=train[:3])
    images, answers, targets = {"i2i": {}, "magic-dpo": {}}, {"i2i": {}, "magic-dpo": {}}, {}
    for index in range(12):
        target, wrong = CONDITIONS[index % 3], CONDITIONS[(index + 1) % 3]
        unit = f"u{index}"
        targets[unit] = (f"s{index}", target)
        images["i2i"][unit] = image("i2i", wrong, index)
        images["magic-dpo"][unit] = image("dpo", target, index)
        answers["i2i"][unit], answers["magic-dpo"][unit] = [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]
    judge_differences = {"magic-dpo - i2i": {"value": 3.0, "low": 3.0, "high": 3.0}}
    notes: list[str] = []
    result = independent_measures(config, paths, split, "tuning", [], images, answers, targets,
                                  {unit: source for unit, (source, _) in targets.items()},
                                  {c: [f"{c}-{k}" for k in range(5)] for c in CONDITIONS}, notes, judge_differences)
    assert notes == []
    settings = result["independent"]["settings"]
    assert settings["i2i"]["recognised"]["value"] == 0.0 and settings["magic-dpo"]["recognised"]["value"] == 1.0
    difference = result["independent"]["differences"]["magic-dpo - i2i"]["recognised"]
    assert set(difference) >= {"value", "low", "high"} and difference["low"] > 0
    assert judge_differences["magic-dpo - i2i"]["independent"] == "confirmed"
    assert result["recognition"]["magic-dpo"]["u0"]["recognised"] == 1
    real_test = result["independent"]["real_test"]
    assert real_test["accuracy"]["value"] == 1.0 and real_test["augment"] == 0
    assert set(real_test["degraded_accuracy"]) == {"value", "low", "high"}  # the probe on blurred real images too
    assert "degraded copies" not in result["independent"]["grader"]
    kid = result["artefacts"]["settings"]
    assert kid["magic-dpo"]["kid"] < kid["i2i"]["kid"]  # images of the target are closer to its real images
    # the paired change: on the same units it is the difference of the two values, its interval below zero
    change = result["artefacts"]["differences"]["magic-dpo - i2i"]
    assert change["value"] == pytest.approx(kid["magic-dpo"]["kid"] - kid["i2i"]["kid"])
    assert change["low"] <= change["value"] <= change["high"] < 0
    validity = result["validity"]
    assert validity["n"] == 24 and validity["r"]["value"] == pytest.approx(1.0) and validity["low"] is False
    assert {row["condition"] for row in validity["per_condition"]} == set(CONDITIONS)


def _records(prefix: str, count: int):
    return [Record(id=f"{prefix}{i}", path=Path(f"{prefix}{i}.png"), label="acne") for i in range(count)]


def test_the_grader_never_learns_from_what_it_grades():
    train, tuning, locked = _records("train", 3), _records("tuning", 5), _records("locked", 4)
    split = Split(train=train, test=tuning, classes=["acne"], tuning=tuning, locked=locked)
    ids = lambda records: [r.id for r in records]

    # the default: the training split only, checked on the test split
    learn, check = grader_images(split, "locked", "train", locked[:2])
    assert ids(learn) == ids(train) and ids(check) == ids(tuning)

    # the locked set graded: every tuning image joins, the locked set checks it and never trains it
    learn, check = grader_images(split, "locked", "train+tuning", locked[:2])
    assert ids(learn) == ids(train + tuning) and ids(check) == ids(locked)

    # the tuning set graded: its sources stay out of the probe's training and are what it is checked on
    graded = [tuning[1], tuning[3]]
    learn, check = grader_images(split, "tuning", "train+tuning", graded)
    assert ids(learn) == ids(train) + ["tuning0", "tuning2", "tuning4"]
    assert ids(check) == ["tuning1", "tuning3"]
    assert not set(ids(learn)) & set(ids(locked))


def test_a_long_breakdown_prints_only_its_clearest_groups():
    """Up to the limit every group is printed; beyond it, the groups whose difference's interval excludes zero,
    the largest first, in their own order."""
    from magic_align.evaluate.alignment import groups_to_print

    def group(value, low, high):
        return {"sources": 10, "differences": {"magic-dpo - i2i": {"value": value, "low": low, "high": high}}}

    few = {"a": group(0.1, -0.2, 0.4), "b": group(0.5, 0.1, 0.9)}
    assert groups_to_print(few, limit=2) == ["a", "b"]
    many = {"a": group(0.1, -0.2, 0.4), "b": group(0.5, 0.1, 0.9), "c": group(-0.9, -1.4, -0.3),
            "d": group(0.3, 0.05, 0.6), "e": group(-0.2, -0.5, 0.1)}
    assert groups_to_print(many, limit=2) == ["b", "c"]  # the two clearest, in the breakdown's order
    assert groups_to_print(many, limit=4) == ["b", "c", "d"]  # every decided group, still fewer than the limit
