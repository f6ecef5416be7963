"""Erasure of one person everywhere genki stores them, and the audit log that survives it.

`erase_person` is the one use case behind `genki erase USER --reason R` and the
staff endpoint `POST /v1/users/{id}/erase`. In order, each step idempotent:

1. the audit log records the request (state `started`);
2. the embedded log drops the person's samples, activities, profiles, consent
   events, watermarks and dead letters (EmbeddedLog.erase_user), and the device
   registry their enrolments (DeviceRegistry.erase_user);
3. the ledger destroys the person's key and links: settlement amounts stay,
   unlinked, and `genki ledger verify` still passes (Ledger.erase_user);
4. steps 2 and 3 again in every Kafka partition store on this host
   (`<data-dir>/p<N>/`, or `--partitions-dir`);
5. with `--bootstrap` (Kafka mode), before steps 2-4: the person's data keys are
   destroyed by a tombstone on genki.keys (engine.kafka.personal), so their
   records on the topics that keep everything can no longer be read, and a
   partition rebuilt from the topics leaves them out;
6. the audit log records the outcome (state `done`).

A crash between steps leaves a `started` row without its `done`: running the
erasure again finishes it (each step is a no-op where nothing is left).

The audit log names no one in clear: the subject is an HMAC-SHA256 of the user
id under the erasure key (`privacy.key` in the data directory, or the file
named by GENKI_PRIVACY_KEY_FILE, kept elsewhere). With the key, staff can
answer "was this person erased, when, why, by whom" (`genki erase --check`), and
the API can answer 404 for them; without it the rows say nothing about anyone.
Rows are hash-chained and append-only (triggers refuse UPDATE and DELETE).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from engine.errors import GenkiError, UsageError
from engine.faults import crash_point
from engine.storage import open_sqlite

if TYPE_CHECKING:
    from engine.ingest.log import EmbeddedLog
    from engine.ledger import Ledger

AUDIT_FILE_NAME = "privacy.sqlite"
KEY_FILE_NAME = "privacy.key"
KEY_FILE_ENV = "GENKI_PRIVACY_KEY_FILE"
KEY_BYTES = 32
SUBJECT_HEX_CHARS = 32
REASON_CHARS_MAX = 500
ACTOR_CHARS_MAX = 128
AUDIT_BUSY_WAIT_S_MAX = 60.0
PARTITION_DIR_PREFIX = "p"
GENESIS_HASH = "0" * 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS erasure_audit (
    id INTEGER PRIMARY KEY, subject TEXT NOT NULL, state TEXT NOT NULL
        CHECK (state IN ('started', 'done')),
    ts_ms INTEGER NOT NULL, reason TEXT NOT NULL, actor TEXT NOT NULL, outcome TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS erasure_audit_subject ON erasure_audit (subject, state);
CREATE TRIGGER IF NOT EXISTS erasure_audit_no_update BEFORE UPDATE ON erasure_audit
BEGIN SELECT RAISE(ABORT, 'the erasure audit log is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS erasure_audit_no_delete BEFORE DELETE ON erasure_audit
BEGIN SELECT RAISE(ABORT, 'the erasure audit log is append-only: DELETE refused'); END;
"""


class ErasureError(GenkiError):
    exit_code = 8
    http_status = 503
    code = "erasure_incomplete"


@dataclass
class ErasureResult:
    subject: str
    already_erased: bool
    removed: dict[str, dict[str, int]] = field(default_factory=dict)  # store → kind → rows
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class AuditRow:
    id: int
    subject: str
    state: str
    ts_ms: int
    reason: str
    actor: str
    outcome: dict[str, Any]


def load_key(data_dir: Path) -> bytes:
    """The erasure key: GENKI_PRIVACY_KEY_FILE, else `privacy.key` here (created, mode 0600)."""
    named = os.environ.get(KEY_FILE_ENV)
    path = Path(named) if named else data_dir / KEY_FILE_NAME
    if path.exists():
        key = path.read_bytes()
        if len(key) < 16:
            raise UsageError(f"{path}: the erasure key must be at least 16 bytes")
        return key
    if named:
        raise UsageError(f"{KEY_FILE_ENV}={named}: no such file")
    key = secrets.token_bytes(KEY_BYTES)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(key)
    return key


class ErasureAudit:
    """The append-only, hash-chained erasure audit log of one data directory."""

    def __init__(self, db: sqlite3.Connection, key: bytes) -> None:
        self._db = db
        self._key = key
        self._version = -1
        self._erased: set[str] = set()

    @classmethod
    def open(cls, data_dir: Path) -> ErasureAudit:
        data_dir.mkdir(parents=True, exist_ok=True)
        key = load_key(data_dir)
        db = open_sqlite(data_dir / AUDIT_FILE_NAME, busy_wait_s_max=AUDIT_BUSY_WAIT_S_MAX)
        db.executescript(_SCHEMA)
        return cls(db, key)

    def close(self) -> None:
        self._db.close()

    def subject(self, user_id: str) -> str:
        digest = hmac.new(self._key, f"erasure\x1f{user_id}".encode(), hashlib.sha256)
        return digest.hexdigest()[:SUBJECT_HEX_CHARS]

    def record(self, subject: str, state: str, reason: str, actor: str, ts_ms: int,
               outcome: dict[str, Any]) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT hash FROM erasure_audit ORDER BY id DESC LIMIT 1").fetchone()
            prev = row[0] if row else GENESIS_HASH
            body = orjson.dumps(outcome, option=orjson.OPT_SORT_KEYS).decode()
            digest = _row_hash(prev, subject, state, ts_ms, reason, actor, body)
            db.execute("INSERT INTO erasure_audit (subject, state, ts_ms, reason, actor, outcome,"
                       " prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (subject, state, ts_ms, reason, actor, body, prev, digest))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def is_erased(self, user_id: str) -> bool:
        """True once an erasure of this person finished (cached until the file changes)."""
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._erased = {subject for (subject,) in self._db.execute(
                "SELECT subject FROM erasure_audit WHERE state = 'done'")}
            self._version = version
        return self.subject(user_id) in self._erased

    def rows(self, subject: str | None = None) -> list[AuditRow]:
        query = "SELECT id, subject, state, ts_ms, reason, actor, outcome FROM erasure_audit"
        args: tuple[str, ...] = ()
        if subject is not None:
            query += " WHERE subject = ?"
            args = (subject,)
        return [AuditRow(row[0], row[1], row[2], row[3], row[4], row[5], orjson.loads(row[6]))
                for row in self._db.execute(query + " ORDER BY id", args)]

    def verify(self) -> int:
        """Recompute the chain; returns the number of rows, raises on the first bad one."""
        prev = GENESIS_HASH
        count = 0
        for row in self._db.execute("SELECT id, subject, state, ts_ms, reason, actor, outcome,"
                                    " prev_hash, hash FROM erasure_audit ORDER BY id"):
            if row[7] != prev or _row_hash(prev, *row[1:7]) != row[8]:
                raise ErasureError(f"erasure audit row {row[0]} does not match its hash chain")
            prev = row[8]
            count += 1
        return count


def _row_hash(prev: str, subject: str, state: str, ts_ms: int, reason: str, actor: str,
              outcome: str) -> str:
    text = "\x1f".join((prev, subject, state, str(ts_ms), reason, actor, outcome))
    return hashlib.sha256(text.encode()).hexdigest()


def partition_dirs(root: Path) -> list[Path]:
    """Kafka partition stores under root (`p<N>/` holding a log or a ledger)."""
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir()
             if path.is_dir() and path.name.startswith(PARTITION_DIR_PREFIX)
             and path.name[len(PARTITION_DIR_PREFIX):].isdigit()
             and ((path / "log.sqlite").exists() or (path / "ledger.sqlite").exists())]
    return sorted(found, key=lambda p: int(p.name[len(PARTITION_DIR_PREFIX):]))


def check_request(user_id: str, reason: str, actor: str) -> None:
    from engine.schemas import ID_CHARS_MAX

    if not user_id or len(user_id) > ID_CHARS_MAX:
        raise UsageError(f"erase: the user id must be 1..{ID_CHARS_MAX} characters")
    if not reason.strip() or len(reason) > REASON_CHARS_MAX:
        raise UsageError(f"erase: --reason must be 1..{REASON_CHARS_MAX} characters "
                         "(why this person is erased, e.g. 'request of 2026-11-30, ref 1234')")
    if not actor or len(actor) > ACTOR_CHARS_MAX:
        raise UsageError(f"erase: the actor must be 1..{ACTOR_CHARS_MAX} characters")


def erase_store(directory: Path, user_id: str, reason: str, *,
                log: EmbeddedLog | None = None, ledger: Ledger | None = None) -> dict[str, int]:
    """Erase one person from one data directory's log and ledger (opened here unless given)."""
    from engine.devices import DEVICES_FILE_NAME, DeviceRegistry
    from engine.ingest.log import LOG_FILE_NAME, EmbeddedLog, LogLocked
    from engine.kafka.partition import erase_dead_letters
    from engine.ledger import LEDGER_FILE_NAME, Ledger

    removed: dict[str, int] = {}
    if log is not None or (directory / LOG_FILE_NAME).exists():
        if log is None:
            try:
                opened = EmbeddedLog.open(directory)
            except LogLocked:
                raise ErasureError(
                    f"another genki process holds the log of {directory} (a running `genki "
                    "serve` or worker): erase through the API (POST /v1/users/{id}/erase with "
                    "a staff key), or stop that process and run this again") from None
            with opened:
                removed.update(opened.erase_user(user_id))
        else:
            removed.update(log.erase_user(user_id))
    from engine.snapshots import remove_snapshots  # rules state holds the person's rows
    removed["engine_snapshots"] = remove_snapshots(directory)
    removed["partition_dead_letters"] = erase_dead_letters(directory, user_id)
    if (directory / DEVICES_FILE_NAME).exists():
        with DeviceRegistry.open(directory) as registry:
            removed["device_enrolments"] = registry.erase_user(user_id)
    crash_point("erasure_after_log")
    if ledger is not None or (directory / LEDGER_FILE_NAME).exists():
        if ledger is None:
            with Ledger.open(directory) as opened_ledger:
                removed.update(_erase_ledger(opened_ledger, user_id, reason))
        else:
            removed.update(_erase_ledger(ledger, user_id, reason))
    return removed


def _erase_ledger(ledger: Ledger, user_id: str, reason: str) -> dict[str, int]:
    receipt = ledger.erase_user(user_id, reason)
    return {"ledger_entries_unlinked": receipt.entries_unlinked,
            "ledger_flags_unlinked": receipt.flags_unlinked,
            "ledger_points_forfeited": receipt.points_forfeited}


def erase_kafka_keys(user_id: str, bootstrap: str, prefix: str) -> dict[str, int]:
    """Destroy the person's data keys on genki.keys (engine.kafka.personal): their records
    on the input topics stay unreadable, and a partition rebuilt from the topics counts
    them as erased."""
    from engine.kafka.personal import erase_person_keys

    erased = erase_person_keys(user_id, bootstrap, prefix)
    return {"key_tombstones": 1, "partition": int(erased.partition),
            "offset": int(erased.offset)}


def erase_person(data_dir: Path, user_id: str, reason: str, actor: str, *,
                 partitions_dir: Path | None = None, now_ms: int | None = None,
                 log: EmbeddedLog | None = None, ledger: Ledger | None = None,
                 bootstrap: str | None = None,
                 topic_prefix: str = "") -> ErasureResult:
    """Erase one person from data_dir and the partition stores on this host (see module doc).

    `log`/`ledger`, when given, are the data directory's already-open objects (the API
    service holds them); otherwise they are opened here, which needs the log's write lock.
    """
    check_request(user_id, reason, actor)
    started = time.perf_counter()
    now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    audit = ErasureAudit.open(data_dir)
    try:
        subject = audit.subject(user_id)
        result = ErasureResult(subject, audit.is_erased(user_id))
        audit.record(subject, "started", reason, actor, now_ms, {})
        if bootstrap is not None:
            result.removed["kafka_keys"] = erase_kafka_keys(user_id, bootstrap, topic_prefix)
        result.removed["data_dir"] = erase_store(data_dir, user_id, reason, log=log,
                                                 ledger=ledger)
        roots = [data_dir] if partitions_dir is None else [data_dir, partitions_dir]
        for root in roots:
            for directory in partition_dirs(root):
                result.removed[str(directory.relative_to(root.parent))] = erase_store(
                    directory, user_id, reason)
        result.seconds = round(time.perf_counter() - started, 3)
        crash_point("erasure_before_done")
        totals = {store: {k: v for k, v in kinds.items() if v}
                  for store, kinds in result.removed.items()}
        audit.record(subject, "done", reason, actor, time.time_ns() // 1_000_000,
                     {"removed": {k: v for k, v in totals.items() if v},
                      "seconds": result.seconds})
    finally:
        audit.close()
    return result
