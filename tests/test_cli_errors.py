"""Bad input at the command line: one line on stderr, exit code 2, never a traceback."""

import pytest
from typer.testing import CliRunner

from magic_align.cli import app


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, *expected: str) -> str:
    """Exit 2 and a single 'error: ...' line that contains every expected fragment."""
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    lines = output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_a_run_directory_where_a_config_is_expected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "config.toml").write_text('name = "tiny"\n')
    assert_one_line_error(run("report", "runs/tiny"), "runs/tiny is a run directory; pass its config: "
                          "runs/tiny/config.toml or the preset name")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("config", "show", "empty"), "empty is a folder; expected a TOML config file")


def test_a_toml_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    assert_one_line_error(run("config", "show", str(path)), "latin1.toml is not UTF-8 text")


def test_a_missing_config_file_and_bad_values(tmp_path):
    assert_one_line_error(run("config", "show", str(tmp_path / "nope.toml")), "nope.toml does not exist")
    assert_one_line_error(run("config", "show", "tiny", "--set", "sample.steps=many"), "sample.steps = 'many'")
    assert_one_line_error(run("config", "show", "tiny", "--set", "sample.strength"), "expected key=value")


@pytest.mark.parametrize("url", ["ftp://example.org/v1", "127.0.0.1:8000/v1", "http://"])
def test_a_judge_url_that_is_not_http_is_refused_at_load(url):
    line = assert_one_line_error(run("config", "show", "tiny", "--set", f"judge.base_url='{url}'"),
                                 "judge.base_url", "http:// or https://")
    assert url in line


def test_a_held_out_judge_url_is_checked_too():
    assert_one_line_error(run("config", "show", "tiny", "--set", "evaluate.held_out_judge.base_url='ftp://x/v1'"),
                          "evaluate.held_out_judge.base_url", "http:// or https://")


def test_review_port_out_of_range():
    assert_one_line_error(run("review", "tiny", "--port", "80000"), "--port 80000", "1 to 65535")
    assert_one_line_error(run("review", "tiny", "--port", "0"), "--port 0")


def test_stopping_the_review_page_is_its_normal_end(monkeypatch):
    # Ctrl-C ends a review server: one line and exit 0, not the "interrupted" exit 130 of a stage
    import magic_align.review.app as review_app

    def serve(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(review_app, "run_review", serve)
    result = run("review", "tiny")
    assert result.exit_code == 0, result.output
    assert "review page stopped; every saved review is in the ledger" in result.output
    assert "interrupted" not in result.output


def test_a_judge_backend_that_cannot_grade_the_checklists(tmp_path):
    from magic_align.judges import make_judge
    from magic_align.checklists.schema import load_checklists
    from magic_align.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="no measurement rules for checklist set 'fitzpatrick20'"):
        make_judge(load_config("tiny", ["judge.checklist=fitzpatrick20"]).judge, load_checklists("fitzpatrick20"))
    with pytest.raises(ConfigError, match='judge.backend = "human" has no judge'):
        make_judge(load_config("tiny", ["judge.backend=human"]).judge, load_checklists("tiny"))
    with pytest.raises(ConfigError, match="judge.members entry 'gpt'"):
        make_judge(load_config("tiny", ["judge.backend=ensemble", "judge.members=['gpt']"]).judge, load_checklists("tiny"))


def test_compare_without_models_names_the_stage_to_run(tmp_path):
    runs = f"runs_dir='{tmp_path}'"
    assert_one_line_error(run("compare", "tiny", "--set", runs), "run `magic finetune` first")
    (tmp_path / "tiny" / "model").mkdir(parents=True)
    assert_one_line_error(run("compare", "tiny", "--set", runs), "no aligned model",
                          "run `magic train dpo` or `magic train rft` first")
    assert_one_line_error(run("compare", "tiny", "--set", runs, "--settings", "magic-rft"), "`magic train rft`")
    assert not list((tmp_path / "tiny").glob("eval/alignment*.json"))  # no empty file pretending to be a result


def test_unknown_settings_of_evaluate_and_compare(tmp_path):
    runs = f"runs_dir='{tmp_path}'"
    assert_one_line_error(run("evaluate", "tiny", "--set", runs, "--settings", "magic-xyz"), "unknown setting(s)")
    assert_one_line_error(run("compare", "tiny", "--set", runs, "--settings", "real"), "unknown setting(s)")


def test_data_check_on_a_missing_image_folder(tmp_path):
    assert_one_line_error(run("data", "check", "tiny", "--set", "data.kind=folder", "--set",
                              f"data.images='{tmp_path / 'nope'}'"), "image folder", "does not exist")


def test_sample_with_a_missing_policy_lora(tmp_path):
    # refused before anything else, so also when every unit of the round is already sampled
    assert_one_line_error(run("sample", "tiny", "--lora", str(tmp_path / "nowhere"), "--set", f"runs_dir='{tmp_path}'"),
                          "policy LoRA", "nowhere does not exist")
    assert not (tmp_path / "tiny").exists()
