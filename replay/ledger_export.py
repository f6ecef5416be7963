"""Ledger entries and flag events of consenting people, pseudonymised, to Parquet."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa

from engine.clock import day_to_iso

LEDGER_ROWS_PER_CHUNK = 100_000
LEDGER_SCHEMA = pa.schema([
    ("entry", pa.string()), ("user", pa.string()), ("kind", pa.string()), ("points", pa.int64()),
    ("day", pa.string()), ("ts_ms", pa.int64()), ("rule", pa.string()), ("shop", pa.string()),
    ("rules_version", pa.string())])
FLAG_SCHEMA = pa.schema([
    ("flag_event", pa.string()), ("user", pa.string()), ("flag", pa.string()),
    ("state", pa.string()), ("day", pa.string()), ("evidence", pa.string()),
    ("rules_version", pa.string())])


def _connect(data_dir: Path) -> sqlite3.Connection:
    uri = f"file:{data_dir / 'ledger.sqlite'}?mode=ro"
    return sqlite3.connect(uri, uri=True)


def _in_window(day: str | None, window: tuple[int | None, int | None]) -> bool:
    since, until = window
    if day is None:
        return True
    return (since is None or day >= day_to_iso(since)) and (until is None or day <= day_to_iso(until))


def _chunks(db: sqlite3.Connection, query: str) -> Iterator[list[tuple]]:
    cursor = db.execute(query)
    while rows := cursor.fetchmany(LEDGER_ROWS_PER_CHUNK):
        yield rows


def write_ledger(data_dir: Path, directory: Path, pseudo: Callable, consent: set[str],
                 window: tuple[int | None, int | None], manifest: object,
                 write: Callable) -> str | None:
    import orjson

    versions: set[str] = set()

    def batches() -> Iterator[pa.RecordBatch]:
        left_out = 0
        with _connect(data_dir) as db:
            for rows in _chunks(db, "SELECT entry_id, user_id, kind, points, day, ts_ms, rule,"
                                    " ref, rules_version FROM entries ORDER BY seq"):
                kept = [r for r in rows if r[1] in consent and _in_window(r[4], window)]
                left_out += sum(1 for r in rows if r[1] not in consent)
                versions.update(r[8] for r in kept if r[8])
                if kept:
                    shops = [(orjson.loads(r[7]).get("shop") if r[7] and r[7].startswith("{")
                              else None) for r in kept]
                    yield pa.RecordBatch.from_arrays([
                        pa.array([pseudo("entry", r[0]) for r in kept]),
                        pa.array([pseudo("user", r[1]) for r in kept]),
                        pa.array([r[2] for r in kept]), pa.array([r[3] for r in kept]),
                        pa.array([r[4] for r in kept]), pa.array([r[5] for r in kept]),
                        pa.array([r[6] for r in kept]), pa.array(shops, type=pa.string()),
                        pa.array([r[8] for r in kept])], schema=LEDGER_SCHEMA)
        manifest.rows_left_out_no_consent["ledger"] = left_out  # type: ignore[attr-defined]

    manifest.rows["ledger"] = write(batches(), LEDGER_SCHEMA, directory, None)  # type: ignore[attr-defined]
    return ",".join(sorted(versions)) or None


def write_flags(data_dir: Path, directory: Path, pseudo: Callable, consent: set[str],
                window: tuple[int | None, int | None], manifest: object, write: Callable) -> None:
    def batches() -> Iterator[pa.RecordBatch]:
        with _connect(data_dir) as db:
            for rows in _chunks(db, "SELECT flag_id, user_id, flag, state, day, evidence,"
                                    " rules_version FROM flags ORDER BY seq"):
                kept = [r for r in rows if r[1] in consent and _in_window(r[4], window)]
                if kept:
                    yield pa.RecordBatch.from_arrays([
                        pa.array([pseudo("flag", r[0]) for r in kept]),
                        pa.array([pseudo("user", r[1]) for r in kept]),
                        *(pa.array([r[i] for r in kept]) for i in range(2, 7))], schema=FLAG_SCHEMA)

    manifest.rows["flags"] = write(batches(), FLAG_SCHEMA, directory, None)  # type: ignore[attr-defined]
