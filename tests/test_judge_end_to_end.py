"""The judge stage with the real `openai` backend against a loopback chat-completions server (tests/fake_openai_server.py):
faults end as graded or explicitly failed images, a rerun makes no HTTP call, a run killed mid-way resumes
without asking again for any image it had stored, a call without an answer is never a verdict, and the
command line exits non-zero while images are left."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest
from fake_openai_server import FakeChatServer, Fault, default_items, image_key
from PIL import Image
from typer.testing import CliRunner

from magic_align.checklists.schema import load_checklists
from magic_align.cli import app
from magic_align.config import dump_config
from magic_align.judge import JudgeStageError, run_judge

runner = CliRunner()
# the ways a call fails without an answer that the next call may not share: dropped connections, timeouts
# (hang: the server never answers), 5xx, 429 with Retry-After, bodies that are not a chat completion
TRANSIENT_FAULTS = ("drop", "hang", "server_error", "bad_gateway", "rate_limit", "malformed")


def _openai(server, extra=()):
    return [
        "judge.backend='openai'",
        f"judge.base_url='{server.base_url}'",
        "judge.max_retries=2",
        "judge.timeout_s=2.0",
        *extra,
    ]


def _key_of(config, sample) -> str:
    with Image.open(config.run_dir / sample.image_path) as image:
        return image_key(image)


def test_faults_end_graded_or_failed_and_rerun_asks_nothing(feedback_run, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with FakeChatServer() as server:
        config, ledger, samples = feedback_run(units=5, k=2, extra=_openai(server))
        server.script(
            Fault("rate_limit", retry_after="0"), "server_error", "drop", "malformed", "prose", "refusal",
            "unparseable", "unparseable", "short",
        )
        summary = run_judge(config, show_progress=False)
        checklists = load_checklists(config.judge.checklist)
        statuses = []
        for sample in samples:
            stored = ledger.find_verdict(sample.image_sha256, summary.judge_id, checklists[sample.target_label].version)
            assert stored is not None, f"{sample.sample_id} has no verdict"
            statuses.append(stored.parse_status)
        assert summary.remaining == 0 and summary.asked == 10
        assert "refused" in statuses or "failed" in statuses  # the refusal / unparseable answers are explicit
        assert summary.answered + summary.failed == 10
        assert summary.requests == server.total_calls > 10  # calls made: HTTP requests, retries and repairs included
        calls_before = server.total_calls
        again = run_judge(config, show_progress=False)
        assert server.total_calls == calls_before
        assert again.cached == 10 and again.asked == 0


_CHILD = """
import sys
from magic_align.config import load_config
from magic_align.judge import run_judge
run_judge(load_config(sys.argv[1]), show_progress=False)
"""


def test_killed_run_resumes_without_duplicate_calls(feedback_run, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with FakeChatServer(latency_s=0.2) as server:
        config, ledger, samples = feedback_run(units=8, k=2, extra=_openai(server, ["judge.concurrency=2"]))
        config_path = tmp_path / "run.toml"
        config_path.write_text(dump_config(config))
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(config_path)], stderr=subprocess.PIPE)
        judge_ids: list[str] = []
        try:
            while child.poll() is None:  # poll the ledger until some answers are stored, then kill the run
                judge_ids = ledger.judge_ids()
                if judge_ids and len(ledger.answered_keys(judge_ids[0], _prompt_version(ledger, judge_ids[0]))) >= 4:
                    break
                try:
                    child.wait(timeout=0.05)  # the poll interval; returns early if the child ends
                except subprocess.TimeoutExpired:
                    pass
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait(timeout=60)
        assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
        judge_id = judge_ids[0]
        stored_before = {sha for sha, _ in ledger.answered_keys(judge_id, _prompt_version(ledger, judge_id))}
        assert 4 <= len(stored_before) < 16
        calls_before = server.total_calls
        summary = run_judge(config, show_progress=False)
        assert summary.remaining == 0
        assert summary.cached == len(stored_before)
        for sample in samples:
            key = _key_of(config, sample)
            if sample.image_sha256 in stored_before:
                assert server.calls[key] == 1, f"{sample.sample_id} was answered before the kill and asked again"
            else:
                assert server.answers[key] >= 1
        assert server.total_calls - calls_before <= 16 - len(stored_before)


def _prompt_version(ledger, judge_id: str) -> str:
    rows = ledger._read("SELECT DISTINCT prompt_version FROM verdicts WHERE judge_id = ?", (judge_id,))
    return rows[0][0]


def _stored(ledger, judge_id, config, samples):
    checklists = load_checklists(config.judge.checklist)
    return {
        sample.sample_id: ledger.find_verdict(sample.image_sha256, judge_id, checklists[sample.target_label].version)
        for sample in samples
    }


def _kill_after(child, ledger, answers: int) -> list[str]:
    """Poll the ledger until `answers` verdicts are stored, then SIGKILL the child; returns the judge ids seen."""
    judge_ids: list[str] = []
    try:
        while child.poll() is None:
            judge_ids = ledger.judge_ids()
            if judge_ids and len(ledger.answered_keys(judge_ids[0], _prompt_version(ledger, judge_ids[0]))) >= answers:
                break
            try:
                child.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                pass
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    return judge_ids


def test_fault_injected_run_with_a_kill_and_reruns_invents_nothing(feedback_run, tmp_path, monkeypatch):
    """30 % of calls fail (dropped, timed out, 5xx, 429, malformed); the first run is killed, the first rerun
    meets two images the server never answers, the second rerun grades the rest, and a last rerun asks nothing."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    concurrency = 2
    with FakeChatServer(latency_s=0.1) as server:
        server.inject(0.3, TRANSIENT_FAULTS, seed=11)
        extra = ["judge.concurrency=2", "judge.timeout_s=0.5", "judge.retry_base_s=0.01", "judge.retry_max_s=0.05"]
        config, ledger, samples = feedback_run(units=12, k=2, extra=_openai(server, extra))
        config_path = tmp_path / "run.toml"
        config_path.write_text(dump_config(config))
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(config_path)], stderr=subprocess.PIPE)
        judge_ids = _kill_after(child, ledger, answers=6)
        assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
        judge_id = judge_ids[0]
        before_kill = {sha for sha, _ in ledger.answered_keys(judge_id, _prompt_version(ledger, judge_id))}
        assert 6 <= len(before_kill) < 24

        # rerun 1: two of the images left get no answer at all (every attempt a 500)
        silent = [sample for sample in samples if sample.image_sha256 not in before_kill][:2]
        for sample in silent:
            server.script(*["server_error"] * 3, image_key=_key_of(config, sample))
        with pytest.raises(JudgeStageError, match="images not graded") as raised:
            run_judge(config, show_progress=False)
        assert "HTTP 500" in str(raised.value) and raised.value.summary.remaining >= 2
        for sample in silent:
            assert _stored(ledger, judge_id, config, [sample])[sample.sample_id] is None  # no verdict invented
            assert ledger.attempts(judge_id, sample.image_sha256)  # the failed call is on record
        assert ledger.stage("judge:0").status == "failed"

        # rerun 2: the faults go on, but with enough retries every image gets its answer
        config.judge.max_retries = 8
        calls = server.total_calls
        summary = run_judge(config, show_progress=False)
        assert summary.remaining == 0 and ledger.stage("judge:0").status == "done"
        assert summary.requests == server.total_calls - calls  # calls made: every request, retries included

        # the last rerun asks nothing
        calls = server.total_calls
        last = run_judge(config, show_progress=False)
        assert server.total_calls == calls and last.asked == 0 and last.cached == 24

    checklists = load_checklists(config.judge.checklist)
    duplicates = 0
    for sample, verdict in zip(samples, _stored(ledger, judge_id, config, samples).values()):
        key = _key_of(config, sample)
        # every image graded, each verdict exactly the answer the server gave for that image
        assert verdict is not None and verdict.parse_status == "ok", (sample.sample_id, verdict)
        checklist = checklists[sample.target_label]
        assert verdict.items == checklist.apply_requires(default_items(key, len(checklist.items)))
        assert server.answers[key] >= 1
        duplicates += server.answers[key] - 1
        if sample.image_sha256 in before_kill:
            assert server.answers[key] == 1, f"{sample.sample_id} was answered before the kill and paid again"
    assert duplicates <= concurrency  # only the calls in flight at the kill were paid twice
    assert len(ledger.attempts(judge_id)) >= 2


@pytest.mark.parametrize(
    ("fault", "line"),
    [
        ("unauthorized", "rejected the API key (HTTP 401"),
        ("forbidden", "denied access (HTTP 403"),
        ("model_not_found", "judge model 'gpt-4o' not found at http://127.0.0.1:"),
        ("quota", "quota exhausted (HTTP 429"),
    ],
)
def test_systematic_failures_stop_the_stage_and_leave_no_verdict(feedback_run, monkeypatch, fault, line):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with FakeChatServer() as server:
        config, ledger, samples = feedback_run(units=5, k=2, extra=_openai(server, ["judge.concurrency=1"]))
        server.script(fault)
        with pytest.raises(JudgeStageError, match="10 of 10 images not graded") as raised:
            run_judge(config, show_progress=False)
        assert line in str(raised.value)
        assert server.total_calls == 1  # stopped at the first call: no retry, no other image asked
        assert ledger.judge_ids() == []
        (attempt,) = ledger.attempts()
        assert attempt.systematic and attempt.requests == 1
        summary = run_judge(config, show_progress=False)  # fixed: the rerun asks every image
        assert summary.asked == 10 and server.total_calls == 11


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config_file(config, tmp_path) -> str:
    path = tmp_path / "run.toml"
    path.write_text(dump_config(config))
    return str(path)


def test_unreachable_server_exits_non_zero_and_the_rerun_grades_everything(feedback_run, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    port = _free_port()  # nothing listens there until the server comes back
    base_url = f"http://127.0.0.1:{port}/v1"
    config, ledger, samples = feedback_run(units=3, k=2, extra=[
        "judge.backend='openai'", f"judge.base_url='{base_url}'", "judge.concurrency=1", "judge.max_retries=1",
        "judge.retry_base_s=0.01", "judge.retry_max_s=0.02",
    ])
    path = _config_file(config, tmp_path)
    result = runner.invoke(app, ["judge", path])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "Traceback" not in result.output
    assert f"no answer from {base_url} after 2 attempt(s): connection error" in line
    assert "6 of 6 images not graded" in line and "3 calls in a row got no answer" in line
    assert ledger.judge_ids() == []  # nothing stored as a verdict
    assert len(ledger.attempts()) == 3 and ledger.stage("judge:0").status == "failed"

    with FakeChatServer(port=port) as server:
        result = runner.invoke(app, ["judge", path])
        assert result.exit_code == 0, result.output
        assert server.total_calls == 6
        assert all(verdict is not None and verdict.parse_status == "ok"
                   for verdict in _stored(ledger, ledger.judge_ids()[0], config, samples).values())
        assert ledger.stage("judge:0").status == "done"
        assert runner.invoke(app, ["judge", path]).exit_code == 0 and server.total_calls == 6


def test_dry_run_needs_no_api_key_and_a_real_run_says_it_is_missing(feedback_run, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config, ledger, _ = feedback_run(units=2, k=2, extra=["judge.backend='openai'", "judge.allow_remote=true"])
    path = _config_file(config, tmp_path)  # the OpenAI API itself: nothing may be sent from a test
    result = runner.invoke(app, ["judge", path, "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "calls needed" in result.output and "estimated cost" in result.output
    result = runner.invoke(app, ["judge", path])
    assert result.exit_code == 2
    assert "OPENAI_API_KEY (judge.api_key_env) is not set" in result.output and "nothing was sent" in result.output
    assert ledger.judge_ids() == [] and ledger.attempts() == []


def test_retry_failed_from_the_command_line(feedback_run, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with FakeChatServer() as server:
        config, ledger, samples = feedback_run(units=2, k=2, extra=_openai(server, ["judge.concurrency=1"]))
        unreadable = _key_of(config, samples[0])
        server.script("unparseable", "unparseable", image_key=unreadable)  # the answer and its repair
        path = _config_file(config, tmp_path)
        assert runner.invoke(app, ["judge", path]).exit_code == 0  # a paid, unreadable answer is a verdict
        (judge_id,) = ledger.judge_ids()
        assert _stored(ledger, judge_id, config, samples[:1])[samples[0].sample_id].parse_status == "failed"
        calls = server.total_calls
        assert runner.invoke(app, ["judge", path]).exit_code == 0 and server.total_calls == calls
        result = runner.invoke(app, ["judge", path, "--retry-failed"])
        assert result.exit_code == 0, result.output
        assert server.total_calls == calls + 1 and server.calls[unreadable] == 3
        assert _stored(ledger, judge_id, config, samples[:1])[samples[0].sample_id].parse_status == "ok"


def test_magic_run_records_an_unfinished_judge_stage_as_failed_and_reruns_it(feedback_run, monkeypatch):
    from magic_align import pipeline

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    port = _free_port()
    config, ledger, _ = feedback_run(units=2, k=2, extra=[
        "judge.backend='openai'", f"judge.base_url='http://127.0.0.1:{port}/v1'", "judge.concurrency=1",
        "judge.max_retries=0",
    ])
    judge_only = [stage for stage in pipeline.plan_stages(config, console=None) if stage.name == "judge/round-0"]
    monkeypatch.setattr(pipeline, "plan_stages", lambda config, console: judge_only)
    with pytest.raises(JudgeStageError, match="4 of 4 images not graded"):
        pipeline.run_all(config)
    assert ledger.stage("run:judge/round-0").status == "failed"  # not done: `magic run` comes back to it
    with FakeChatServer(port=port) as server:
        pipeline.run_all(config)
        assert server.total_calls == 4 and ledger.stage("run:judge/round-0").status == "done"
        pipeline.run_all(config)
        assert server.total_calls == 4  # done now, so skipped
