"""The ledger: rows round-trip, keys are unique, two processes can write at once, a killed writer loses nothing
that was committed and leaves no half row."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading

import pytest

from magic_align.judges.base import Verdict
from magic_align.ledger import SCHEMA_VERSION, Ledger, LedgerError, PairRow, SampleRow


def make_sample(index: int, round: int = 0, sha: str | None = None, k: int | None = None) -> SampleRow:
    return SampleRow(
        sample_id=f"r{round}-s{index:04d}",
        round=round,
        unit_id=f"u{index // 2:04d}",
        k=index % 2 if k is None else k,
        image_path=f"samples/round-{round}/images/{index:04d}.png",
        image_sha256=sha or f"{index:064x}",
        source_id=f"real-{index}",
        source_label="psoriasis",
        target_label="eczema",
        prompt="an image of <eczema> on human skin",
        seed=index,
        shard="samples/round-0/trajectories/shard-0000.safetensors",
        shard_index=index,
        synthetic=True,
    )


def make_verdict(items: list[int | None], cost: float = 0.01) -> Verdict:
    return Verdict(
        items=items,
        rationales=["why"] * len(items),
        raw=str(items),
        parse_status="ok",
        latency_s=0.5,
        input_tokens=100,
        output_tokens=10,
        cost_usd=cost,
    )


def test_schema_version_and_wal(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.schema_version == SCHEMA_VERSION
    mode = sqlite3.connect(tmp_path / "ledger.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "ledger.sqlite"
    Ledger(path).close()
    connection = sqlite3.connect(path)
    connection.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    connection.commit()
    connection.close()
    with pytest.raises(LedgerError, match="newer"):
        Ledger(path)


def test_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="not a usable SQLite ledger"):
        Ledger(path)


def test_samples_round_trip_and_idempotent(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    rows = [make_sample(i) for i in range(4)] + [make_sample(i, round=1) for i in range(2)]
    assert ledger.add_samples(rows) == 6
    assert ledger.add_samples(rows) == 0  # identical rows: nothing changes
    assert ledger.samples(round=0) == rows[:4]
    assert ledger.samples() == rows
    assert ledger.sample("r1-s0001") == rows[5]
    assert ledger.sample("missing") is None
    assert ledger.rounds() == [0, 1]
    # a resampled image replaces the row
    changed = make_sample(0, sha="f" * 64)
    assert ledger.add_samples([changed]) == 1
    assert ledger.sample(changed.sample_id).image_sha256 == "f" * 64
    assert len(ledger.samples(round=0)) == 4
    real = make_sample(9)
    real.synthetic = False
    real.shard = None
    real.shard_index = None
    ledger.add_samples([real])
    assert ledger.sample(real.sample_id) == real


def test_verdict_key_and_first_answer_wins(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    key = ("a" * 64, "openai:gpt-4o", "ver1", "prompt1")
    assert ledger.get_verdict(*key) is None
    first = ledger.put_verdict(*key, make_verdict([1, 0, 1, None, 0]), condition="eczema")
    stored = ledger.get_verdict(*key)
    assert stored.id == first
    assert stored.items == [1, 0, 1, None, 0]
    assert stored.score == 2
    assert stored.condition == "eczema"
    assert stored.rationales == ["why"] * 5
    assert (stored.input_tokens, stored.output_tokens, stored.cost_usd) == (100, 10, 0.01)
    assert stored.as_verdict().items == [1, 0, 1, None, 0]
    # the same key again keeps the first answer
    again = ledger.put_verdict(*key, make_verdict([0, 0, 0, 0, 0]))
    assert again == first
    assert ledger.get_verdict(*key).items == [1, 0, 1, None, 0]
    # another prompt version is another key
    other = ledger.put_verdict(key[0], key[1], key[2], "prompt2", make_verdict([1, 1, 1, 1, 1]))
    assert other != first
    assert ledger.answered_keys("openai:gpt-4o", "prompt1") == {("a" * 64, "ver1")}
    # replace overwrites in place, keeps the id, adds the cost
    replaced = ledger.put_verdict(*key, make_verdict([1, 1, 1, 1, 1], cost=0.02), replace=True)
    assert replaced == first
    assert ledger.get_verdict(*key).items == [1, 1, 1, 1, 1]
    assert ledger.spent_usd("openai:gpt-4o") == pytest.approx(0.01 + 0.02 + 0.01)
    assert ledger.spent_usd("other") == 0.0
    assert ledger.verdict_by_id(other).prompt_version == "prompt2"


def test_failed_verdict_round_trip(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    failed = Verdict(items=[None] * 5, raw="I cannot help with that.", parse_status="refused", error="refusal")
    ledger.put_verdict("b" * 64, "j", "v", "p", failed)
    stored = ledger.get_verdict("b" * 64, "j", "v", "p")
    assert stored.parse_status == "refused"
    assert stored.error == "refusal"
    assert not stored.answered
    assert stored.raw == "I cannot help with that."


def test_attempts_are_kept_apart_from_verdicts(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    key = ("c" * 64, "openai:gpt-4o", "ver1", "prompt1")
    first = ledger.add_attempt(*key, "connection error (ConnectError)", "no answer from http://127.0.0.1:9/v1 after 3 "
                               "attempt(s): connection error (ConnectError)", requests=3, condition="eczema")
    ledger.add_attempt(*key, "model not found", requests=1, systematic=True)
    ledger.add_attempt("d" * 64, "other", "ver1", "prompt1", "HTTP 503", requests=7)
    # an attempt answers nothing: the key stays unanswered and costs nothing
    assert ledger.get_verdict(*key) is None and ledger.answered_keys(key[1], key[3]) == set()
    assert ledger.spent_usd() == 0.0 and ledger.judge_ids() == []
    stored = ledger.attempts(key[1])
    assert [a.id for a in stored][0] == first and len(stored) == 2
    assert (stored[0].cause, stored[0].requests, stored[0].systematic, stored[0].condition) == (
        "connection error (ConnectError)", 3, False, "eczema")
    assert "127.0.0.1:9" in stored[0].error
    assert stored[1].systematic and stored[1].error == "model not found"  # the cause when no message is given
    assert [a.judge_id for a in ledger.attempts(image_sha256="d" * 64)] == ["other"]
    assert len(ledger.attempts()) == 3


def test_failed_keys_are_the_unreadable_answers(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.put_verdict("a" * 64, "j", "v", "p", make_verdict([1, 0]))
    ledger.put_verdict("b" * 64, "j", "v", "p", Verdict(items=[None, None], parse_status="failed", error="no list"))
    ledger.put_verdict("c" * 64, "j", "v", "p", Verdict(items=[None, None], parse_status="refused", error="refusal"))
    ledger.put_verdict("d" * 64, "j", "v", "p2", Verdict(items=[None, None], parse_status="failed", error="no list"))
    assert ledger.failed_keys("j", "p") == {("b" * 64, "v")}


def test_bad_items_are_refused(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    with pytest.raises(LedgerError, match="item 2 is 2"):
        ledger.put_verdict("c" * 64, "j", "v", "p", make_verdict([1, 2, 0]))
    with pytest.raises(LedgerError, match="item 1 is 'yes'"):
        ledger.add_review("s", "v", ["yes"], "dr. a")
    assert ledger.get_verdict("c" * 64, "j", "v", "p") is None


def test_verdicts_join_samples(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.add_samples([make_sample(i) for i in range(3)] + [make_sample(3, round=1)])
    for i in range(4):
        ledger.put_verdict(f"{i:064x}", "judge-a", "v", "p", make_verdict([i % 2] * 5))
    ledger.put_verdict(f"{0:064x}", "judge-b", "v", "p", make_verdict([1] * 5))
    ledger.put_verdict("9" * 64, "judge-a", "v", "p", make_verdict([1] * 5))  # no sample has this image
    joined = ledger.verdicts(judge_id="judge-a", round=0)
    assert [entry.sample.sample_id for entry in joined] == ["r0-s0000", "r0-s0001", "r0-s0002"]
    assert [entry.verdict.items[0] for entry in joined] == [0, 1, 0]
    assert len(ledger.verdicts()) == 5
    assert ledger.judge_ids() == ["judge-a", "judge-b"]


def test_reviews_keep_history_latest_per_reviewer_wins(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.add_samples([make_sample(0), make_sample(1), make_sample(2, round=1)])
    key = (f"{0:064x}", "judge", "v", "p")
    ledger.put_verdict(*key, make_verdict([1, 1, 1, 1, 1]))
    first = ledger.add_review("r0-s0000", "v", [0, 0, 0, 0, 0], "dr. a", "no lesion")
    second = ledger.add_review("r0-s0000", "v", [1, 0, 0, 0, 0], "dr. a", "changed my mind")
    other = ledger.add_review("r0-s0000", "v", [1, 1, 0, 0, 0], "dr. b")
    ledger.add_review("r1-s0002", "v", [1, 1, 1, 1, 1], "dr. a")
    assert first < second < other
    assert ledger.get_verdict(*key).items == [1, 1, 1, 1, 1]  # a review never overwrites a verdict
    latest = ledger.reviews(sample_id="r0-s0000")
    assert [(r.reviewer, r.items) for r in latest] == [("dr. a", [1, 0, 0, 0, 0]), ("dr. b", [1, 1, 0, 0, 0])]
    assert len(ledger.reviews(sample_id="r0-s0000", latest_only=False)) == 3
    assert [r.sample_id for r in ledger.reviews(round=1)] == ["r1-s0002"]
    assert ledger.latest_reviews(round=0)["r0-s0000"].id == other
    with pytest.raises(LedgerError, match="reviewer name is empty"):
        ledger.add_review("r0-s0000", "v", [1], " ")


def test_pairs_replace_per_round(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")

    def pair(round: int, unit: str, tie: bool = False) -> PairRow:
        return PairRow(f"{unit}-a~{unit}-b", round, unit, f"{unit}-a", f"{unit}-b", 1, int(tie), tie, 4, 2, 1, 2, "paper")

    ledger.replace_pairs(0, [pair(0, "u0"), pair(0, "u1", tie=True)])
    ledger.replace_pairs(1, [pair(1, "x0")])
    assert [p.pair_id for p in ledger.pairs(0)] == ["u0-a~u0-b", "u1-a~u1-b"]
    assert ledger.pairs(0)[1].tie is True
    ledger.replace_pairs(0, [pair(0, "u2")])
    assert [p.unit_id for p in ledger.pairs()] == ["u2", "x0"]
    with pytest.raises(LedgerError, match="round 1, not round 0"):
        ledger.replace_pairs(0, [pair(1, "u3")])
    assert [p.unit_id for p in ledger.pairs(0)] == ["u2"]  # the refused call changed nothing


def test_stage_status(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.stage("judge") is None
    ledger.set_stage("judge", "abc", "running")
    ledger.set_stage("judge", "abc", "done", "12 verdicts")
    status = ledger.stage("judge")
    assert (status.config_hash, status.status, status.detail) == ("abc", "done", "12 verdicts")


def test_threads_share_a_ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    errors: list[BaseException] = []

    def write(offset: int) -> None:
        try:
            for i in range(25):
                ledger.put_verdict(f"{offset + i:064x}", "j", "v", "p", make_verdict([1]))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(n * 100,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(ledger.answered_keys("j", "p")) == 100


# --------------------------------------------------------------------------------- processes and crashes
def _write_verdicts(path: str, judge_id: str, count: int, start_event) -> None:
    ledger = Ledger(path)
    start_event.wait()
    for i in range(count):
        ledger.put_verdict(f"{i:064x}", judge_id, "v", "p", make_verdict([i % 2, 1]))
        ledger.add_samples([make_sample(i + (0 if judge_id == "one" else 10_000))])


def test_two_processes_write_at_once(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    Ledger(path).close()
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = [context.Process(target=_write_verdicts, args=(path, name, 60, start)) for name in ("one", "two")]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    ledger = Ledger(path)
    assert len(ledger.answered_keys("one", "p")) == 60
    assert len(ledger.answered_keys("two", "p")) == 60
    assert len(ledger.samples()) == 120


def _write_then_die(path: str, committed: int) -> None:
    ledger = Ledger(path)
    for i in range(committed):
        ledger.put_verdict(f"{i:064x}", "j", "v", "p", make_verdict([1, 0]))
    # die in the middle of a transaction: rows written but never committed
    connection = ledger._connection()
    connection.execute("BEGIN IMMEDIATE")
    connection.execute(
        "INSERT INTO verdicts (image_sha256, judge_id, checklist_version, prompt_version, items, rationales, raw, "
        "parse_status, latency_s, input_tokens, output_tokens, cost_usd, created_at) "
        "VALUES ('dead', 'j', 'v', 'p', '[1]', '[]', '', 'ok', 0, 0, 0, 5.0, 0)"
    )
    os._exit(17)  # no cleanup, no commit, no close: what SIGKILL does to a judge mid-write


def test_killed_writer_keeps_committed_answers_only(tmp_path):
    path = str(tmp_path / "ledger.sqlite")
    context = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    worker = context.Process(target=_write_then_die, args=(path, 7))
    worker.start()
    worker.join(timeout=120)
    assert worker.exitcode == 17
    ledger = Ledger(path)  # the next run opens the file, recovering the WAL
    keys = ledger.answered_keys("j", "p")
    assert len(keys) == 7
    assert ledger.get_verdict("dead", "j", "v", "p") is None
    assert ledger.spent_usd() == pytest.approx(0.07)
    assert ledger._read("PRAGMA integrity_check")[0][0] == "ok"
    # and it is writable again (the dead process's lock is gone)
    ledger.put_verdict("after", "j", "v", "p", make_verdict([1]))
    assert ledger.get_verdict("after", "j", "v", "p") is not None


def test_table_versions_move_with_every_change(tmp_path, monkeypatch):
    import itertools
    import types

    clock = itertools.count(1000.0)  # a clock that always moves, so a replaced verdict's new time is certain
    monkeypatch.setattr("magic_align.ledger.time", types.SimpleNamespace(time=lambda: next(clock)))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    empty = ledger.table_versions()
    assert set(empty) == {"samples", "verdicts", "reviews", "pairs", "stages", "attempts"}
    assert all(version.rows == 0 and version.last_rowid is None for version in empty.values())

    ledger.add_samples([make_sample(0), make_sample(1)])
    versions = ledger.table_versions()
    assert versions["samples"].rows == 2 and versions["samples"].last_change is not None
    assert versions["verdicts"] == empty["verdicts"] and versions["reviews"] == empty["reviews"]

    key = ("a" * 64, "openai:gpt-4o", "ver1", "prompt1")
    ledger.put_verdict(*key, make_verdict([1, 0, 1, None, 0]))
    first = ledger.table_versions()["verdicts"]
    assert first.rows == 1
    ledger.put_verdict(*key, make_verdict([0, 0, 0, 0, 0]))  # the key is answered: nothing changes
    assert ledger.table_versions()["verdicts"] == first
    ledger.put_verdict(*key, make_verdict([1, 1, 1, 1, 1]), replace=True)  # same row and id, new answer
    replaced = ledger.table_versions()["verdicts"]
    assert (replaced.rows, replaced.last_rowid) == (first.rows, first.last_rowid)
    assert replaced.last_change > first.last_change

    ledger.add_review("r0-s0000", "v", [1, 0, 0, 0, 0], "dr. a")
    assert ledger.table_versions()["reviews"].rows == 1
    ledger.set_stage("judge", "abc", "done")
    assert ledger.table_versions()["stages"].rows == 1
    ledger.add_attempt("c" * 64, "openai:gpt-4o", "ver1", "prompt1", "HTTP 503")
    assert ledger.table_versions()["attempts"].rows == 1 and ledger.table_versions()["verdicts"] == replaced
    ledger.replace_pairs(0, [PairRow("a~b", 0, "u", "a", "b", 1, 0, False, 4, 2, 1, 2, "paper")])
    assert ledger.table_versions()["pairs"].rows == 1 and ledger.table_versions()["pairs"].last_change is None


def test_table_versions_of_named_tables_only(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.add_samples([make_sample(0)])
    named = ledger.table_versions("samples", "verdicts")
    assert list(named) == ["samples", "verdicts"]
    assert named["samples"] == ledger.table_versions()["samples"]
    with pytest.raises(ValueError, match="unknown ledger table"):
        ledger.table_versions("sample")


def test_judge_usage_sums_each_judge(tmp_path):
    from dataclasses import replace

    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.judge_usage() == []
    ledger.put_verdict("a" * 64, "j2", "v1", "p1", make_verdict([1, 0], cost=0.5))
    ledger.put_verdict("b" * 64, "j2", "v1", "p1", replace(make_verdict([None, None], cost=0.25), parse_status="failed"))
    ledger.put_verdict("a" * 64, "j1", "v1", "p1", replace(make_verdict([1, None]), parse_status="partial", latency_s=1.5))
    ledger.add_attempt("c" * 64, "j2", "v1", "p1", "connection error", requests=3)  # a call without an answer
    ledger.add_attempt("d" * 64, "j2", "v1", "p1", "HTTP 503", requests=3)
    first, second = ledger.judge_usage()  # ordered by judge id
    assert (first.judge_id, first.answers, first.ok, first.partial, first.failed) == ("j1", 1, 0, 1, 0)
    assert first.latency_s == 1.5 and first.attempts == 0
    assert (second.judge_id, second.answers, second.ok, second.failed, second.refused) == ("j2", 2, 1, 1, 0)
    assert second.attempts == 2  # counted beside the answers, never as one
    assert (second.input_tokens, second.output_tokens, second.cost_usd) == (200, 20, 0.75)
    assert second.first <= second.last


def test_stages_oldest_update_first(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.stages() == []
    ledger.set_stage("sample", "h", "done")
    ledger.set_stage("judge", "h", "running")
    ledger.set_stage("sample", "h", "failed", "again")  # updated last: now listed last
    assert [(s.stage, s.status) for s in ledger.stages()] == [("judge", "running"), ("sample", "failed")]


def test_forget_round_removes_that_rounds_samples_and_pairs_and_keeps_every_verdict(tmp_path):
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.add_samples([make_sample(0), make_sample(1), make_sample(2, round=1), make_sample(3, round=1)])
    ledger.put_verdict(f"{0:064x}", "rules:demo", "v", "p", make_verdict([1, 1, 0, 0, 1]))
    for round in (0, 1):
        ledger.replace_pairs(round, [PairRow(f"p{round}", round, "u", "a", "b", 1, 0, False, 4, 2, 1, 2, "paper")])

    assert ledger.forget_round(0) == 2
    assert ledger.samples(0) == [] and [row.sample_id for row in ledger.samples(1)] == ["r1-s0002", "r1-s0003"]
    assert ledger.pairs(0) == [] and [pair.pair_id for pair in ledger.pairs(1)] == ["p1"]
    assert ledger.find_verdict(f"{0:064x}", "rules:demo", "v", "p") is not None
    assert ledger.forget_round(0) == 0
