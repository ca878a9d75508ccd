"""The judge stage with the real `openai` backend against a loopback chat-completions server (tests/fake_openai_server.py):
faults end as graded or explicitly failed images, a rerun makes no HTTP call, and a run killed mid-way resumes
without asking again for any image it had stored."""

from __future__ import annotations

import signal
import subprocess
import sys

from fake_openai_server import FakeChatServer, Fault, image_key
from PIL import Image

from magic_align.checklists.schema import load_checklists
from magic_align.config import dump_config
from magic_align.judge import run_judge


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
