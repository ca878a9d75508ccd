"""The paired alignment comparison's statistics (per-source means, the cluster bootstrap) and how the compared
models are named (with the objective each was trained with)."""

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
