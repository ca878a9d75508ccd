"""The ledger: one SQLite file (`run/ledger.sqlite`, WAL mode) holding every piece of feedback of a run.

It is the single source of truth between the sampler, the judges, the review page, the pair builder and
the trainers. Each thread and each process opens its own connection (`Ledger` does this by itself: one
connection per thread, reopened after a fork); writers wait on each other through SQLite's busy timeout
instead of failing. Every write is its own short transaction, committed before the call returns, so a
killed process loses at most the write it was in the middle of and never leaves a half-written row.

Tables (schema version `SCHEMA_VERSION`, stored in `meta`):

`meta` (key TEXT PRIMARY KEY, value TEXT)
    `schema_version`: the integer schema version of this file. A file written by a newer magic-align
    (higher version) is refused rather than misread.

`samples`: one row per synthetic (or real) image that may be judged.
    sample_id TEXT PRIMARY KEY      stable id chosen by the sampler, e.g. "r0-u0007-k1"
    round INTEGER                   sampling round (0 for the first)
    unit_id TEXT                    the (source, target) unit; its K samples are compared with each other
    k INTEGER                       index of the sample within its unit (0 .. K-1)
    image_path TEXT                 PNG path relative to the run directory
    image_sha256 TEXT               hex SHA-256 of the PNG file; the verdict cache key
    source_id, source_label TEXT    the real image the sample started from and its label
    target_label TEXT               the condition the sample was pushed towards (its checklist)
    prompt TEXT, seed INTEGER
    shard TEXT, shard_index INTEGER trajectory shard (relative path) and row in it; NULL when not kept
    synthetic INTEGER               1 for generated images, 0 for real ones (real images are not sent to
                                    remote judges unless the config allows it)
    created_at REAL                 Unix time
    Re-adding a sample_id is a no-op when the row is identical and replaces the row when it differs (a
    resampled image on disk is the truth; verdicts are keyed by image hash, so old ones never mix in).

`verdicts`: one row per answer of a judge, UNIQUE (image_sha256, judge_id, checklist_version, prompt_version).
    id INTEGER PRIMARY KEY          verdict id (pairs record it)
    image_sha256, judge_id, checklist_version, prompt_version TEXT   the cache key
    condition TEXT                  the checklist's condition the image was graded against
    items TEXT                      JSON list, one of 1, 0, null per checklist item, in checklist order
    rationales TEXT                 JSON list of strings or nulls
    raw TEXT                        the answer text exactly as received
    parse_status TEXT               ok | partial | failed | refused
    error TEXT                      why a failed / refused answer failed
    latency_s REAL, input_tokens INTEGER, output_tokens INTEGER, cost_usd REAL
    created_at REAL
    A key that is present is never asked again (failed answers included: they are explicit outcomes, and
    retrying them is a deliberate `put_verdict(..., replace=True)`, what `magic judge --retry-failed` does).
    Only answers a model gave are verdicts; a call that got none is an attempt.

`attempts`: one row per judge call that got no answer (kept for audit; never read as a verdict).
    id INTEGER PRIMARY KEY
    image_sha256, judge_id, checklist_version, prompt_version TEXT   the key the call was for
    condition TEXT                  the checklist's condition
    cause TEXT                      the short reason ("connection error (ConnectError)", "HTTP 503", "model not found")
    error TEXT                      the whole message
    requests INTEGER                requests made for it (retries included; 0 when none was sent)
    systematic INTEGER              1 when every later call would fail the same way (key, model, quota), which
                                    stops the stage
    created_at REAL

`reviews`: one row per expert review from the review page (never overwrites a verdict).
    id INTEGER PRIMARY KEY, sample_id TEXT, checklist_version TEXT, items TEXT (JSON as in verdicts),
    reviewer TEXT, note TEXT, created_at REAL
    Several reviews per sample are kept; for each (sample, reviewer) the latest one counts.

`pairs`: preference pairs built by `feedback.run_pairs`, replaced as a whole per round.
    pair_id TEXT PRIMARY KEY        "<sample_a>~<sample_b>"
    round INTEGER, unit_id TEXT, sample_a TEXT, sample_b TEXT
    outcome_a, outcome_b INTEGER    1 win / 0 lose, per sample (the paper's [1, 0], [1, 1], [0, 0])
    tie INTEGER                     1 when outcome_a == outcome_b: the pair gives no gradient
    score_a, score_b REAL           the scores the rule compared (items met, or weighted)
    verdict_a, verdict_b INTEGER    verdict ids (source 'judge') or review ids (source 'human')
    rule TEXT                       paper | margin | weighted
    source TEXT                     judge | human

`stages`: one row per pipeline stage, so `magic run` can skip completed work.
    stage TEXT PRIMARY KEY, config_hash TEXT, status TEXT (running | done | failed | stale), detail TEXT,
    updated_at REAL
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator, Literal

from magic_align.errors import MagicError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0


class LedgerError(MagicError, RuntimeError):
    """A ledger that cannot be used as asked (newer schema, conflicting rows); the message says why."""


# ------------------------------------------------------------------------------------------------ rows
# ok: every item answered; partial: some items unknown (wrong length); failed: nothing usable (items all None);
# refused: the model declined to grade.
ParseStatus = Literal["ok", "partial", "failed", "refused"]


@dataclass
class Verdict:
    """What a judge answered about one image against one checklist (`judges.base.Judge.judge` returns it)."""

    items: list[int | None]  # one of 1, 0, None (unknown) per checklist item, in checklist order
    rationales: list[str | None] = field(default_factory=list)  # one short reason per item where the backend gives one
    raw: str = ""  # the raw answer text, exactly as received
    parse_status: ParseStatus = "ok"
    latency_s: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    error: str | None = None  # why the answer failed, for failed / refused verdicts
    requests: int = 0  # calls to the model behind this verdict (HTTP requests with retries and repair); 0: not counted

    @property
    def score(self) -> int:
        """Items met (unknown items count as not met)."""
        return sum(1 for value in self.items if value == 1)

    @property
    def answered(self) -> bool:
        return self.parse_status in ("ok", "partial")


@dataclass(frozen=True)
class TableVersion:
    """What changes when a table changes: its row count, newest rowid and newest change time (None for
    `pairs`, which has no time column). A replaced verdict keeps its id but gets a new time."""

    rows: int
    last_rowid: int | None
    last_change: float | None


# the column holding each table's change time
_TABLE_TIMES = {"samples": "created_at", "verdicts": "created_at", "reviews": "created_at", "pairs": None,
                "stages": "updated_at", "attempts": "created_at"}


@dataclass
class SampleRow:
    sample_id: str
    round: int
    unit_id: str
    k: int
    image_path: str  # relative to the run directory
    image_sha256: str
    source_id: str
    source_label: str
    target_label: str
    prompt: str
    seed: int
    shard: str | None = None
    shard_index: int | None = None
    synthetic: bool = True


@dataclass
class StoredVerdict(Verdict):
    """A `Verdict` as kept in the ledger, with its id and key."""

    id: int = 0
    image_sha256: str = ""
    judge_id: str = ""
    checklist_version: str = ""
    prompt_version: str = ""
    condition: str | None = None
    created_at: float = 0.0

    def as_verdict(self) -> Verdict:
        return Verdict(**{f.name: getattr(self, f.name) for f in fields(Verdict)})


@dataclass
class StoredAttempt:
    """A judge call that got no answer (see the `attempts` table)."""

    id: int
    image_sha256: str
    judge_id: str
    checklist_version: str
    prompt_version: str
    condition: str | None
    cause: str
    error: str
    requests: int
    systematic: bool
    created_at: float


@dataclass
class SampleVerdict:
    """One sample with one verdict about its image (the join of `samples` and `verdicts`)."""

    sample: SampleRow
    verdict: StoredVerdict


@dataclass
class StoredReview:
    id: int
    sample_id: str
    checklist_version: str
    items: list[int | None]
    reviewer: str
    note: str
    created_at: float

    @property
    def score(self) -> int:
        return sum(1 for value in self.items if value == 1)


PairSource = Literal["judge", "human"]


@dataclass
class PairRow:
    pair_id: str
    round: int
    unit_id: str
    sample_a: str
    sample_b: str
    outcome_a: int
    outcome_b: int
    tie: bool
    score_a: float
    score_b: float
    verdict_a: int | None  # verdict id (source 'judge') or review id (source 'human')
    verdict_b: int | None
    rule: str
    source: PairSource = "judge"


@dataclass
class StageStatus:
    stage: str
    config_hash: str
    status: str
    detail: str
    updated_at: float


@dataclass
class JudgeUsage:
    """One judge over the whole ledger: stored answers (`answers`) by status, tokens, money, mean latency, first
    and last, and the calls that got no answer (`attempts`, never verdicts)."""

    judge_id: str
    answers: int
    ok: int
    partial: int
    failed: int
    refused: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    latency_s: float
    first: float
    last: float
    attempts: int = 0


# ---------------------------------------------------------------------------------------------- schema
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    sample_id TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    unit_id TEXT NOT NULL,
    k INTEGER NOT NULL,
    image_path TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    source_id TEXT NOT NULL,
    source_label TEXT NOT NULL,
    target_label TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    shard TEXT,
    shard_index INTEGER,
    synthetic INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS samples_round ON samples (round, unit_id, k);
CREATE INDEX IF NOT EXISTS samples_sha ON samples (image_sha256);
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image_sha256 TEXT NOT NULL,
    judge_id TEXT NOT NULL,
    checklist_version TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    condition TEXT,
    items TEXT NOT NULL,
    rationales TEXT NOT NULL,
    raw TEXT NOT NULL,
    parse_status TEXT NOT NULL,
    error TEXT,
    latency_s REAL NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (image_sha256, judge_id, checklist_version, prompt_version)
);
CREATE INDEX IF NOT EXISTS verdicts_judge ON verdicts (judge_id);
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id TEXT NOT NULL,
    checklist_version TEXT NOT NULL,
    items TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    note TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reviews_sample ON reviews (sample_id, reviewer);
CREATE TABLE IF NOT EXISTS pairs (
    pair_id TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    unit_id TEXT NOT NULL,
    sample_a TEXT NOT NULL,
    sample_b TEXT NOT NULL,
    outcome_a INTEGER NOT NULL,
    outcome_b INTEGER NOT NULL,
    tie INTEGER NOT NULL,
    score_a REAL NOT NULL,
    score_b REAL NOT NULL,
    verdict_a INTEGER,
    verdict_b INTEGER,
    rule TEXT NOT NULL,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS pairs_round ON pairs (round);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image_sha256 TEXT NOT NULL,
    judge_id TEXT NOT NULL,
    checklist_version TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    condition TEXT,
    cause TEXT NOT NULL,
    error TEXT NOT NULL,
    requests INTEGER NOT NULL,
    systematic INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_judge ON attempts (judge_id, image_sha256);
CREATE TABLE IF NOT EXISTS stages (
    stage TEXT PRIMARY KEY,
    config_hash TEXT NOT NULL,
    status TEXT NOT NULL,
    detail TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""

_SAMPLE_COLUMNS = [f.name for f in fields(SampleRow)]
_VERDICT_COLUMNS = (
    "id, image_sha256, judge_id, checklist_version, prompt_version, condition, items, rationales, raw, "
    "parse_status, error, latency_s, input_tokens, output_tokens, cost_usd, created_at"
)
_PAIR_COLUMNS = [f.name for f in fields(PairRow)]


def _sample_from_row(row: sqlite3.Row) -> SampleRow:
    values = {name: row[name] for name in _SAMPLE_COLUMNS}
    values["synthetic"] = bool(values["synthetic"])
    return SampleRow(**values)


def _verdict_from_row(row: sqlite3.Row, prefix: str = "") -> StoredVerdict:
    def get(name: str):
        return row[prefix + name]

    return StoredVerdict(
        items=json.loads(get("items")),
        rationales=json.loads(get("rationales")),
        raw=get("raw"),
        parse_status=get("parse_status"),
        latency_s=get("latency_s"),
        input_tokens=get("input_tokens"),
        output_tokens=get("output_tokens"),
        cost_usd=get("cost_usd"),
        error=get("error"),
        id=get("id"),
        image_sha256=get("image_sha256"),
        judge_id=get("judge_id"),
        checklist_version=get("checklist_version"),
        prompt_version=get("prompt_version"),
        condition=get("condition"),
        created_at=get("created_at"),
    )


def _review_from_row(row: sqlite3.Row) -> StoredReview:
    return StoredReview(
        id=row["id"],
        sample_id=row["sample_id"],
        checklist_version=row["checklist_version"],
        items=json.loads(row["items"]),
        reviewer=row["reviewer"],
        note=row["note"],
        created_at=row["created_at"],
    )


def _stage_from_row(row: sqlite3.Row) -> StageStatus:
    return StageStatus(row["stage"], row["config_hash"], row["status"], row["detail"], row["updated_at"])


def _where(*filters: tuple[str, object]) -> tuple[str, list]:
    """`WHERE ... AND ...` from (condition, value) filters, skipping those whose value is None; a condition's
    `?` takes its value (a condition without one is a switch: any value but None turns it on)."""
    conditions, parameters = [], []
    for condition, value in filters:
        if value is None:
            continue
        conditions.append(condition)
        if "?" in condition:
            parameters.append(value)
    return (f"WHERE {' AND '.join(conditions)}" if conditions else ""), parameters


def _check_items(items: Iterable, what: str) -> list[int | None]:
    checked: list[int | None] = []
    for index, value in enumerate(items):
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value in (0, 1)):
            checked.append(value)
        elif isinstance(value, bool):
            checked.append(int(value))
        else:
            raise LedgerError(f"{what}: item {index + 1} is {value!r}; expected 1, 0 or None")
    return checked


# ---------------------------------------------------------------------------------------------- ledger
class Ledger:
    """The run's feedback store. Cheap to construct; safe to share between threads (one connection each)
    and to open from several processes at once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._create_schema()

    # -- connections
    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is not None and getattr(self._local, "pid", None) == os.getpid():
            return connection
        # isolation_level=None: no implicit transactions; writes open `BEGIN IMMEDIATE` themselves so a
        # writer takes the lock up front and waits (busy timeout) instead of failing on upgrade.
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=True)
        connection.row_factory = sqlite3.Row
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        connection.execute("PRAGMA journal_mode = WAL")
        # FULL: a commit is on disk when it returns; a paid answer must survive a power cut too.
        connection.execute("PRAGMA synchronous = FULL")
        connection.execute("PRAGMA foreign_keys = ON")
        self._local.connection = connection
        self._local.pid = os.getpid()
        return connection

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None and getattr(self._local, "pid", None) == os.getpid():
            connection.close()
        self._local.connection = None

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def _read(self, sql: str, parameters: Iterable = ()) -> list[sqlite3.Row]:
        return self._connection().execute(sql, tuple(parameters)).fetchall()

    def _create_schema(self) -> None:
        try:
            with self._write() as connection:
                # statements one by one: sqlite3's executescript would COMMIT our transaction midway
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        connection.execute(statement)
                row = connection.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    connection.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row["value"]) > SCHEMA_VERSION:
                    raise LedgerError(
                        f"{self.path} has ledger schema version {row['value']}, newer than this magic-align "
                        f"(version {SCHEMA_VERSION}); upgrade magic-align to read it"
                    )
        except sqlite3.DatabaseError as error:
            raise LedgerError(f"{self.path} is not a usable SQLite ledger: {error}") from None

    @property
    def schema_version(self) -> int:
        return int(self._read("SELECT value FROM meta WHERE key = 'schema_version'")[0]["value"])

    def table_versions(self, *tables: str) -> dict[str, TableVersion]:
        """A cheap fingerprint of the named tables (every table when none is named; one aggregate query each):
        readers such as the review page recompute what they derive from a table only when its version moves."""
        unknown = [table for table in tables if table not in _TABLE_TIMES]
        if unknown:
            raise ValueError(f"unknown ledger table(s) {unknown}; expected some of {list(_TABLE_TIMES)}")
        versions = {}
        for table in tables or tuple(_TABLE_TIMES):
            time_column = _TABLE_TIMES[table]
            latest = f"MAX({time_column})" if time_column else "NULL"
            row = self._read(f"SELECT COUNT(*), MAX(rowid), {latest} FROM {table}")[0]
            versions[table] = TableVersion(rows=row[0], last_rowid=row[1], last_change=row[2])
        return versions

    # -- samples
    def add_samples(self, rows: Iterable[SampleRow]) -> int:
        """Add sample rows in one transaction; returns how many were new or changed."""
        changed = 0
        now = time.time()
        placeholders = ", ".join("?" for _ in _SAMPLE_COLUMNS)
        updates = ", ".join(f"{name} = excluded.{name}" for name in _SAMPLE_COLUMNS[1:])
        differs = " OR ".join(f"samples.{name} IS NOT excluded.{name}" for name in _SAMPLE_COLUMNS[1:])
        with self._write() as connection:
            for row in rows:
                values = asdict(row)
                values["synthetic"] = int(bool(values["synthetic"]))
                cursor = connection.execute(
                    f"INSERT INTO samples ({', '.join(_SAMPLE_COLUMNS)}, created_at) VALUES ({placeholders}, ?) "
                    f"ON CONFLICT (sample_id) DO UPDATE SET {updates}, created_at = excluded.created_at WHERE {differs}",
                    [values[name] for name in _SAMPLE_COLUMNS] + [now],
                )
                changed += cursor.rowcount
        return changed

    def samples(self, round: int | None = None) -> list[SampleRow]:
        if round is None:
            rows = self._read("SELECT * FROM samples ORDER BY round, unit_id, k, sample_id")
        else:
            rows = self._read("SELECT * FROM samples WHERE round = ? ORDER BY unit_id, k, sample_id", (round,))
        return [_sample_from_row(row) for row in rows]

    def sample(self, sample_id: str) -> SampleRow | None:
        rows = self._read("SELECT * FROM samples WHERE sample_id = ?", (sample_id,))
        return _sample_from_row(rows[0]) if rows else None

    def rounds(self) -> list[int]:
        return [row[0] for row in self._read("SELECT DISTINCT round FROM samples ORDER BY round")]

    def forget_round(self, round: int) -> int:
        """Remove the sample and pair rows of `round` (when its samples were made under other settings and are
        set aside); verdicts stay, keyed by image content, so no judge answer is lost. Returns the samples removed."""
        with self._write() as connection:
            removed = connection.execute("DELETE FROM samples WHERE round = ?", (round,)).rowcount
            connection.execute("DELETE FROM pairs WHERE round = ?", (round,))
        return int(removed)

    # -- verdicts
    def get_verdict(
        self, image_sha256: str, judge_id: str, checklist_version: str, prompt_version: str
    ) -> StoredVerdict | None:
        rows = self._read(
            f"SELECT {_VERDICT_COLUMNS} FROM verdicts WHERE image_sha256 = ? AND judge_id = ? "
            "AND checklist_version = ? AND prompt_version = ?",
            (image_sha256, judge_id, checklist_version, prompt_version),
        )
        return _verdict_from_row(rows[0]) if rows else None

    def find_verdict(
        self, image_sha256: str, judge_id: str, checklist_version: str, prompt_version: str | None = None
    ) -> StoredVerdict | None:
        """The verdict for this key; with `prompt_version` None, the newest of any prompt version (imported
        feedback and judges rebuilt from their id alone do not know theirs)."""
        if prompt_version is not None:
            return self.get_verdict(image_sha256, judge_id, checklist_version, prompt_version)
        rows = self._read(
            f"SELECT {_VERDICT_COLUMNS} FROM verdicts WHERE image_sha256 = ? AND judge_id = ? AND checklist_version = ? "
            "ORDER BY created_at DESC, id DESC LIMIT 1",
            (image_sha256, judge_id, checklist_version),
        )
        return _verdict_from_row(rows[0]) if rows else None

    def verdict_by_id(self, verdict_id: int) -> StoredVerdict | None:
        rows = self._read(f"SELECT {_VERDICT_COLUMNS} FROM verdicts WHERE id = ?", (verdict_id,))
        return _verdict_from_row(rows[0]) if rows else None

    def answered_keys(self, judge_id: str, prompt_version: str) -> set[tuple[str, str]]:
        """(image_sha256, checklist_version) of every verdict this judge and prompt already gave."""
        rows = self._read(
            "SELECT image_sha256, checklist_version FROM verdicts WHERE judge_id = ? AND prompt_version = ?",
            (judge_id, prompt_version),
        )
        return {(row[0], row[1]) for row in rows}

    def failed_keys(self, judge_id: str, prompt_version: str) -> set[tuple[str, str]]:
        """(image_sha256, checklist_version) of this judge's stored answers that could not be read (`failed`)."""
        rows = self._read(
            "SELECT image_sha256, checklist_version FROM verdicts WHERE judge_id = ? AND prompt_version = ? "
            "AND parse_status = 'failed'",
            (judge_id, prompt_version),
        )
        return {(row[0], row[1]) for row in rows}

    def put_verdict(
        self,
        image_sha256: str,
        judge_id: str,
        checklist_version: str,
        prompt_version: str,
        verdict: Verdict,
        condition: str | None = None,
        replace: bool = False,
    ) -> int:
        """Store one answer and commit before returning; returns its verdict id.

        When the key is already present the stored answer is kept (two processes that raced for the same
        image both paid, and the first answer wins) unless `replace` is set, which overwrites it in place
        and keeps its id (used to retry failed answers deliberately); the costs of both calls add up, so
        `spent_usd` stays the money actually spent."""
        items = _check_items(verdict.items, f"verdict for image {image_sha256[:12]} by {judge_id}")
        values = (
            image_sha256,
            judge_id,
            checklist_version,
            prompt_version,
            condition,
            json.dumps(items),
            json.dumps(list(verdict.rationales)),
            verdict.raw or "",
            verdict.parse_status,
            verdict.error,
            float(verdict.latency_s),
            int(verdict.input_tokens),
            int(verdict.output_tokens),
            float(verdict.cost_usd),
            time.time(),
        )
        conflict = (
            "DO UPDATE SET condition = excluded.condition, items = excluded.items, rationales = excluded.rationales, "
            "raw = excluded.raw, parse_status = excluded.parse_status, error = excluded.error, "
            "latency_s = excluded.latency_s, input_tokens = excluded.input_tokens, "
            "output_tokens = excluded.output_tokens, cost_usd = verdicts.cost_usd + excluded.cost_usd, "
            "created_at = excluded.created_at"
            if replace
            else "DO NOTHING"
        )
        with self._write() as connection:
            connection.execute(
                "INSERT INTO verdicts (image_sha256, judge_id, checklist_version, prompt_version, condition, items, "
                "rationales, raw, parse_status, error, latency_s, input_tokens, output_tokens, cost_usd, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                f"ON CONFLICT (image_sha256, judge_id, checklist_version, prompt_version) {conflict}",
                values,
            )
            row = connection.execute(
                "SELECT id FROM verdicts WHERE image_sha256 = ? AND judge_id = ? AND checklist_version = ? "
                "AND prompt_version = ?",
                values[:4],
            ).fetchone()
        return int(row[0])

    def verdicts(self, judge_id: str | None = None, round: int | None = None) -> list[SampleVerdict]:
        """Every (sample, verdict) whose image hashes match, optionally for one judge and one round.
        Verdicts of any checklist / prompt version are returned; callers keep the versions they want."""
        where, parameters = _where(("v.judge_id = ?", judge_id), ("s.round = ?", round))
        verdict_columns = ", ".join(f"v.{name.strip()} AS v_{name.strip()}" for name in _VERDICT_COLUMNS.split(","))
        rows = self._read(
            f"SELECT s.*, {verdict_columns} FROM samples s JOIN verdicts v ON v.image_sha256 = s.image_sha256 "
            f"{where} ORDER BY s.round, s.unit_id, s.k, s.sample_id, v.id",
            parameters,
        )
        return [SampleVerdict(_sample_from_row(row), _verdict_from_row(row, prefix="v_")) for row in rows]

    def judge_ids(self) -> list[str]:
        return [row[0] for row in self._read("SELECT DISTINCT judge_id FROM verdicts ORDER BY judge_id")]

    def judge_usage(self) -> list[JudgeUsage]:
        """Per judge (ordered by id): calls, answer statuses, tokens, cost and latency over every verdict."""
        rows = self._read(
            "SELECT judge_id, COUNT(*) AS answers, SUM(parse_status = 'ok') AS ok, SUM(parse_status = 'partial') AS partial, "
            "SUM(parse_status = 'failed') AS failed, SUM(parse_status = 'refused') AS refused, "
            "SUM(input_tokens) AS input_tokens, SUM(output_tokens) AS output_tokens, SUM(cost_usd) AS cost_usd, "
            "AVG(latency_s) AS latency_s, MIN(created_at) AS first, MAX(created_at) AS last, "
            "(SELECT COUNT(*) FROM attempts WHERE attempts.judge_id = verdicts.judge_id) AS attempts "
            "FROM verdicts GROUP BY judge_id ORDER BY judge_id"
        )
        return [JudgeUsage(**dict(row)) for row in rows]

    def spent_usd(self, judge_id: str | None = None) -> float:
        if judge_id is None:
            rows = self._read("SELECT COALESCE(SUM(cost_usd), 0) FROM verdicts")
        else:
            rows = self._read("SELECT COALESCE(SUM(cost_usd), 0) FROM verdicts WHERE judge_id = ?", (judge_id,))
        return float(rows[0][0])

    # -- attempts
    def add_attempt(
        self,
        image_sha256: str,
        judge_id: str,
        checklist_version: str,
        prompt_version: str,
        cause: str,
        error: str = "",
        requests: int = 0,
        systematic: bool = False,
        condition: str | None = None,
    ) -> int:
        """Record a call that got no answer; commits before returning. Never touches `verdicts`."""
        with self._write() as connection:
            cursor = connection.execute(
                "INSERT INTO attempts (image_sha256, judge_id, checklist_version, prompt_version, condition, cause, "
                "error, requests, systematic, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (image_sha256, judge_id, checklist_version, prompt_version, condition, cause, error or cause,
                 int(requests), int(bool(systematic)), time.time()),
            )
        return int(cursor.lastrowid)

    def attempts(self, judge_id: str | None = None, image_sha256: str | None = None) -> list[StoredAttempt]:
        """Recorded failed calls, oldest first, optionally of one judge and one image."""
        where, parameters = _where(("judge_id = ?", judge_id), ("image_sha256 = ?", image_sha256))
        rows = self._read(f"SELECT * FROM attempts {where} ORDER BY id", parameters)
        return [StoredAttempt(**{**dict(row), "systematic": bool(row["systematic"])}) for row in rows]

    # -- reviews
    def add_review(
        self, sample_id: str, checklist_version: str, items: list[int | None], reviewer: str, note: str = ""
    ) -> int:
        if not reviewer.strip():
            raise LedgerError(f"review of {sample_id}: the reviewer name is empty")
        checked = _check_items(items, f"review of {sample_id} by {reviewer}")
        with self._write() as connection:
            cursor = connection.execute(
                "INSERT INTO reviews (sample_id, checklist_version, items, reviewer, note, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (sample_id, checklist_version, json.dumps(checked), reviewer, note or "", time.time()),
            )
        return int(cursor.lastrowid)

    def reviews(
        self,
        sample_id: str | None = None,
        round: int | None = None,
        reviewer: str | None = None,
        latest_only: bool = True,
    ) -> list[StoredReview]:
        """Reviews, oldest first. With `latest_only` (the default) only the newest review of each
        (sample, reviewer) is returned: a reviewer who changes their mind replaces their earlier answer."""
        where, parameters = _where(
            ("r.sample_id = ?", sample_id),
            ("r.reviewer = ?", reviewer),
            ("r.sample_id IN (SELECT sample_id FROM samples WHERE round = ?)", round),
            ("r.id = (SELECT MAX(id) FROM reviews r2 WHERE r2.sample_id = r.sample_id AND r2.reviewer = r.reviewer)",
             latest_only or None),
        )
        rows = self._read(f"SELECT r.* FROM reviews r {where} ORDER BY r.id", parameters)
        return [_review_from_row(row) for row in rows]

    def latest_reviews(self, round: int | None = None) -> dict[str, StoredReview]:
        """The newest review of each sample, whoever wrote it (what `prefer_human` uses)."""
        latest: dict[str, StoredReview] = {}
        for review in self.reviews(round=round, latest_only=True):
            latest[review.sample_id] = review  # ordered by id, so the newest wins
        return latest

    # -- pairs
    def replace_pairs(self, round: int, rows: Iterable[PairRow]) -> int:
        """Replace every pair of `round` with `rows` in one transaction; returns the number stored."""
        rows = list(rows)
        for row in rows:
            if row.round != round:
                raise LedgerError(f"pair {row.pair_id} is for round {row.round}, not round {round}")
        placeholders = ", ".join("?" for _ in _PAIR_COLUMNS)
        with self._write() as connection:
            connection.execute("DELETE FROM pairs WHERE round = ?", (round,))
            for row in rows:
                values = asdict(row)
                values["tie"] = int(bool(values["tie"]))
                connection.execute(
                    f"INSERT INTO pairs ({', '.join(_PAIR_COLUMNS)}) VALUES ({placeholders})",
                    [values[name] for name in _PAIR_COLUMNS],
                )
        return len(rows)

    def pairs(self, round: int | None = None) -> list[PairRow]:
        if round is None:
            rows = self._read("SELECT * FROM pairs ORDER BY round, unit_id, sample_a, sample_b")
        else:
            rows = self._read("SELECT * FROM pairs WHERE round = ? ORDER BY unit_id, sample_a, sample_b", (round,))
        result = []
        for row in rows:
            values = {name: row[name] for name in _PAIR_COLUMNS}
            values["tie"] = bool(values["tie"])
            result.append(PairRow(**values))
        return result

    # -- stages
    def set_stage(self, stage: str, config_hash: str, status: str, detail: str = "") -> None:
        with self._write() as connection:
            connection.execute(
                "INSERT INTO stages (stage, config_hash, status, detail, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (stage) DO UPDATE SET config_hash = excluded.config_hash, status = excluded.status, "
                "detail = excluded.detail, updated_at = excluded.updated_at",
                (stage, config_hash, status, detail or "", time.time()),
            )

    def mark_stale(self, stages: Iterable[str], detail: str) -> None:
        """Set these stage records to status "stale" (their work was replaced): the pipeline redoes a stage whose
        record is not "done"."""
        with self._write() as connection:
            for stage in stages:
                connection.execute("UPDATE stages SET status = 'stale', detail = ?, updated_at = ? WHERE stage = ?",
                                   (detail, time.time(), stage))

    def stage(self, stage: str) -> StageStatus | None:
        rows = self._read("SELECT * FROM stages WHERE stage = ?", (stage,))
        return _stage_from_row(rows[0]) if rows else None

    def stages(self) -> list[StageStatus]:
        """Every recorded stage, the oldest update first."""
        return [_stage_from_row(row) for row in self._read("SELECT * FROM stages ORDER BY updated_at")]
