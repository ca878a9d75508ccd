"""`magic judge`, `magic pairs` and `magic agreement` from the command line (thin wrappers; stage logic is
tested in test_judge_stage.py, test_feedback.py and test_agreement.py)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from magic_align.checklists.schema import load_checklists
from magic_align.cli import app
from magic_align.config import dump_config

runner = CliRunner()


def _config_file(config, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(dump_config(config))
    return str(path)


def test_judge_dry_run_prints_estimate(feedback_run, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config, ledger, _ = feedback_run(
        units=2, k=2, extra=["judge.backend='openai'", "judge.base_url='http://127.0.0.1:9/v1'"]
    )
    result = runner.invoke(app, ["judge", _config_file(config, tmp_path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "calls needed" in result.output and "estimated cost" in result.output
    assert ledger.judge_ids() == []  # nothing asked, nothing stored


def test_judge_without_samples_is_a_clear_error(feedback_run, tmp_path):
    config, _, _ = feedback_run(units=1, k=2, extra=["judge.backend='human'"])
    result = runner.invoke(app, ["judge", _config_file(config, tmp_path), "--round", "4"])
    assert result.exit_code == 2
    assert "no samples for round 4" in result.output
    assert "Traceback" not in result.output


def test_pairs_import_export_and_agreement(feedback_run, tmp_path):
    config, ledger, samples = feedback_run(units=2, k=2)
    config_path = _config_file(config, tmp_path)
    feedback = [[[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]]
    source = tmp_path / "gpt4o-round0.json"
    source.write_text(json.dumps(feedback))
    out = tmp_path / "export.json"
    result = runner.invoke(
        app,
        ["pairs", config_path, "--import-authors", str(source), "--export-dpo", str(tmp_path / "dpo"),
         "--export-authors", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "import:gpt4o-round0" in result.output
    assert json.loads(out.read_text()) == feedback
    assert len((tmp_path / "dpo" / "metadata.jsonl").read_text().splitlines()) == 1  # the other pair is a tie
    assert [p.tie for p in ledger.pairs(0)] == [False, True]

    checklists = load_checklists(config.judge.checklist)
    for sample, items in zip(samples, [[1, 1, 1, 1, 0], [1, 0, 0, 0, 1], [1, 1, 1, 0, 0], [0, 1, 1, 0, 0]]):
        ledger.add_review(sample.sample_id, checklists[sample.target_label].version, items, "dr. a")
    result = runner.invoke(app, ["agreement", config_path, "--judge", "import:gpt4o-round0"])
    assert result.exit_code == 0, result.output
    assert "all items" in result.output and "kappa" in result.output
    result = runner.invoke(app, ["agreement", config_path, "--judge", "nobody"])
    assert result.exit_code == 2 and "has no verdicts" in result.output


def test_pairs_says_how_many_undecided_verdicts_were_left_out(feedback_run, tmp_path):
    from magic_align.judges.base import Verdict

    config, ledger, samples = feedback_run(units=2, k=2)
    checklists = load_checklists(config.judge.checklist)
    for sample, items in zip(samples, [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, None, 0, 0]]):
        checklist = checklists[sample.target_label]
        ledger.put_verdict(sample.image_sha256, "judge-a", checklist.version, "p", Verdict(items=items), checklist.condition)
    result = runner.invoke(app, ["pairs", _config_file(config, tmp_path), "--judge", "judge-a"])
    assert result.exit_code == 0, result.output
    assert "1 verdicts with an undecided item left out" in " ".join(result.output.split())
    assert len(ledger.pairs(0)) == 1
