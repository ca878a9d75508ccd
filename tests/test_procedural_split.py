"""The demo's skewed, scarce task: a procedural dataset that comes with its own split (DataKind.given_split).
Training skin types follow the weights per condition, the test part and the locked set are balanced over types
1..6, everything is deterministic per seed, and the default configuration keeps the drawn split it had."""

from collections import Counter
from pathlib import Path

import pytest

from magic_align.config import ConfigError, DataConfig, load_config
from magic_align.data.fitzpatrick import load_fitzpatrick
from magic_align.data.records import DataError
from magic_align.data.split import ROLES, build_split, check_roles, run_split
from magic_align.demo.procedural import CONDITIONS, generate_dataset, skin_type_counts
from magic_align.run import prepare_run

WEIGHTS = [2, 2, 1, 1, 0, 0]
VITILIGO = [0, 0, 1, 1, 2, 2]


def _own_split_config(tmp_path: Path, name: str = "own", seed: int = 0):
    return load_config("tiny", [
        f"runs_dir='{tmp_path}'", f"name='{name}'", f"data.procedural_seed={seed}",
        "data.procedural_train_per_class=6", "data.procedural_test_per_class=6",
        f"data.procedural_skin_weights={WEIGHTS}", f"data.procedural_condition_skin_weights={{vitiligo={VITILIGO}}}",
    ])


def _by_condition_and_type(records) -> dict[str, list[int]]:
    counts = Counter((r.label, r.skin_type) for r in records)
    return {label: [counts[(label, t)] for t in range(1, 7)] for label in sorted({r.label for r in records})}


def test_skin_type_counts_follow_the_weights_by_largest_remainder():
    assert skin_type_counts([6, 6, 3, 1, 0, 0], 16) == [6, 6, 3, 1, 0, 0]
    assert skin_type_counts([1] * 6, 8) == [2, 2, 1, 1, 1, 1]  # ties go to the lighter types
    assert skin_type_counts([1, 0, 0, 0, 0, 3], 5) == [1, 0, 0, 0, 0, 4]  # 1.25 and 3.75: the larger remainder
    assert skin_type_counts([0, 1, 2, 3, 4, 4], 7) == [0, 1, 1, 1, 2, 2]
    assert skin_type_counts([5, 6, 3, 1, 0, 0], 3)[4:] == [0, 0]  # a zero weight never gets an image


def test_the_own_split_is_skewed_in_training_and_balanced_in_test_and_locked(tmp_path):
    config = _own_split_config(tmp_path)
    split = run_split(config, prepare_run(config))
    assert sorted(split.classes) == sorted(CONDITIONS)
    train = _by_condition_and_type(split.train)
    assert train == {label: skin_type_counts(VITILIGO if label == "vitiligo" else WEIGHTS, 6) for label in CONDITIONS}
    assert train["melanoma"][4:] == [0, 0] and sum(train["vitiligo"][4:]) > 0  # weight 0 on types 5-6: none
    assert _by_condition_and_type(split.test) == {label: [1] * 6 for label in CONDITIONS}
    assert _by_condition_and_type(split.locked) == {label: [1] * 6 for label in CONDITIONS}
    assert {r.id for r in split.tuning} == {r.id for r in split.test}  # the kind's own locked set: all test tunes
    check_roles(split)  # no image in two roles, by id or by content
    assert not {r.id for r in split.train} & {r.id for r in split.test}
    # read back from split.csv: the same split
    again = run_split(config, prepare_run(config))
    assert [r.id for r in again.train] == [r.id for r in split.train] and [r.id for r in again.test] == [
        r.id for r in split.test]


def test_the_own_split_is_deterministic_per_seed(tmp_path):
    first = run_split(*(lambda c: (c, prepare_run(c)))(_own_split_config(tmp_path, "a")))
    second = run_split(*(lambda c: (c, prepare_run(c)))(_own_split_config(tmp_path, "b")))
    other = run_split(*(lambda c: (c, prepare_run(c)))(_own_split_config(tmp_path, "c", seed=3)))
    for role in ROLES:
        assert [r.id for r in first.role(role)] == [r.id for r in second.role(role)]
        assert {r.id for r in first.role(role)}.isdisjoint({r.id for r in other.role(role)})


def test_the_default_configuration_keeps_the_drawn_split_and_its_dump(tmp_path):
    config = load_config("tiny", [f"runs_dir='{tmp_path}'", "data.procedural_per_class=4"])
    split = run_split(config, prepare_run(config))
    direct = generate_dataset(tmp_path / "direct", per_class=4, seed=config.data.procedural_seed)
    expected = build_split(load_fitzpatrick(direct, direct.parent / "images"), config.data.num_classes,
                           config.data.train_fraction, config.data.split_seed, locked_fraction=None,
                           eligible=CONDITIONS)
    assert [r.id for r in split.train] == [r.id for r in expected.train]
    assert [r.id for r in split.test] == [r.id for r in expected.test]
    # settings added later are left out of a dump at their defaults (fingerprints of older runs stay valid)
    dumped = DataConfig().model_dump(mode="json")
    assert not {"procedural_train_per_class", "procedural_skin_weights"} & set(dumped)
    assert DataConfig(procedural_train_per_class=5).model_dump()["procedural_train_per_class"] == 5


def test_bad_skin_weights_and_a_csv_with_an_own_split_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="procedural_skin_weights must be 6 non-negative weights"):
        load_config("tiny", ["data.procedural_skin_weights=[1, 2]"])
    with pytest.raises(ConfigError, match=r"procedural_condition_skin_weights.acne must be 6"):
        load_config("tiny", ["data.procedural_condition_skin_weights={acne=[0,0,0,0,0,0]}"])
    config = load_config("tiny", [f"runs_dir='{tmp_path}'", "data.procedural_train_per_class=2",
                                  f"data.csv='{tmp_path / 'x.csv'}'"])
    with pytest.raises(DataError, match="leave data.csv unset"):
        run_split(config, prepare_run(config))


def test_the_demo_preset_reads_its_own_skewed_split(tmp_path):
    config = load_config("demo", [f"runs_dir='{tmp_path}'", "data.procedural_test_per_class=6"])
    split = run_split(config, prepare_run(config))
    train = _by_condition_and_type(split.train)
    assert all(sum(counts) == config.data.procedural_train_per_class for counts in train.values())
    weights = config.data.procedural_condition_skin_weights
    assert train == {label: skin_type_counts(weights[label], config.data.procedural_train_per_class)
                     for label in CONDITIONS}
    assert _by_condition_and_type(split.test) == {label: [1] * 6 for label in CONDITIONS}


def test_a_misspelt_condition_in_the_skin_weights_is_named(tmp_path):
    config = load_config("tiny", [
        f"runs_dir='{tmp_path}'", "data.procedural_train_per_class=6", "data.procedural_test_per_class=6",
        "data.procedural_condition_skin_weights={melanomaa=[1, 1, 1, 1, 1, 1]}",
    ])
    with pytest.raises(DataError, match="'melanomaa', not a demo condition"):
        run_split(config, prepare_run(config))
