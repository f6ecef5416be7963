"""Ledger entries and flag events from inside consent periods, pseudonymised, to Parquet.

Shop ids are pseudonymised (a shop must not find its own sales and from there a
person's vitals) and entry times coarsened (ExportPolicy.ledger_time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson
import pyarrow as pa

from engine.clock import day_end_ms, day_to_iso, iso_to_day
from engine.ledger import Ledger
from replay.anonymise import ExportPolicy, coarsen

if TYPE_CHECKING:
    from replay.export import Consent, Pseudonymiser, ReplayManifest

LEDGER_ROWS_PER_CHUNK = 100_000
LEDGER_SCHEMA = pa.schema([
    ("entry", pa.string()), ("user", pa.string()), ("kind", pa.string()), ("points", pa.int64()),
    ("day", pa.string()), ("ts_ms", pa.int64()), ("rule", pa.string()), ("shop", pa.string()),
    ("rules_version", pa.string())])
FLAG_SCHEMA = pa.schema([
    ("flag_event", pa.string()), ("user", pa.string()), ("flag", pa.string()),
    ("state", pa.string()), ("day", pa.string()), ("evidence", pa.string()),
    ("rules_version", pa.string())])


_ENTRY_EXPORT_COLUMNS = ("seq", "entry_id", "user_id", "kind", "points", "day", "ts_ms", "rule",
                         "ref", "rules_version")
_FLAG_EXPORT_COLUMNS = ("seq", "flag_id", "user_id", "flag", "state", "day", "evidence",
                        "rules_version")


def _iso_window(window: tuple[int | None, int | None]) -> tuple[str | None, str | None]:
    since, until = window
    return (None if since is None else day_to_iso(since),
            None if until is None else day_to_iso(until))


def _in_window(day: str | None, window: tuple[str | None, str | None]) -> bool:
    since, until = window
    if day is None:
        return True
    return (since is None or day >= since) and (until is None or day <= until)


def _chunks(data_dir: Path, table: str) -> Iterator[list[tuple]]:
    """Rows of the ledger's entries or flags in seq order (without seq), read through
    engine.ledger by position."""
    with Ledger.open_read_only(data_dir) as ledger:
        pages = ledger.iter_entry_rows(_ENTRY_EXPORT_COLUMNS) if table == "entries" else \
            ledger.iter_flag_rows(_FLAG_EXPORT_COLUMNS)
        for rows in pages:
            yield [row[1:] for row in rows]


def _consented(rows: list[tuple], user_column: int, ts: list[int], consent: Consent) -> np.ndarray:
    index: dict[str, int] = {}
    user_idx = np.fromiter((index.setdefault(r[user_column], len(index)) for r in rows),
                           np.int32, count=len(rows))
    return consent.contains(list(index), user_idx, np.array(ts, np.int64))


def _shop(ref: str | None) -> str | None:
    if not ref or not ref.startswith("{"):
        return None
    shop = orjson.loads(ref).get("shop")
    return None if shop is None else str(shop)


def _entry_batch(rows: list[tuple], pseudo: Pseudonymiser, consent: Consent,
                 window: tuple[str | None, str | None], manifest: ReplayManifest,
                 policy: ExportPolicy, versions: set[str]) -> pa.RecordBatch | None:
    """Rows of (entry_id, user_id, kind, points, day, ts_ms, rule, ref, rules_version):
    the consented ones inside the window, column by column."""
    code: dict[str | None, int] = {}
    users = np.fromiter((code.setdefault(r[1], len(code)) for r in rows), np.int64,
                        count=len(rows))
    ts = np.fromiter(map(itemgetter(5), rows), np.int64, count=len(rows))
    allowed = consent.contains([u if u is not None else "" for u in code], users, ts)
    manifest.left_out("ledger", int((~allowed).sum()))
    if window != (None, None):
        allowed &= np.fromiter((_in_window(r[4], window) for r in rows), bool, count=len(rows))
    kept = np.flatnonzero(allowed)
    if not len(kept):
        return None
    if len(kept) < len(rows):
        rows = [rows[i] for i in kept.tolist()]
    versions.update(filter(None, map(itemgetter(8), rows)))
    names = pa.array([pseudo("user", u) if u is not None else None for u in code], pa.string())
    shops = [_shop(ref) for ref in map(itemgetter(7), rows)]
    return pa.RecordBatch.from_arrays([
        pa.array(pseudo.fresh("entry", list(map(itemgetter(0), rows))), pa.string()),
        names.take(pa.array(users[kept])),
        pa.array(list(map(itemgetter(2), rows)), pa.string()),
        pa.array(np.fromiter(map(itemgetter(3), rows), np.int64, count=len(rows))),
        pa.array(list(map(itemgetter(4), rows)), pa.string()),
        pa.array(coarsen(ts[kept], policy.ledger_time)),
        pa.array(list(map(itemgetter(6), rows)), pa.string()),
        pa.array([None if s is None else pseudo("shop", s) for s in shops], type=pa.string()),
        pa.array(list(map(itemgetter(8), rows)), pa.string())], schema=LEDGER_SCHEMA)


def write_ledger(data_dir: Path, directory: Path, pseudo: Pseudonymiser, consent: Consent,
                 window: tuple[int | None, int | None], manifest: ReplayManifest,
                 write: Callable, policy: ExportPolicy) -> str | None:
    versions: set[str] = set()
    iso_window = _iso_window(window)

    def batches() -> Iterator[pa.RecordBatch]:
        for rows in _chunks(data_dir, "entries"):
            batch = _entry_batch(rows, pseudo, consent, iso_window, manifest, policy, versions)
            if batch is not None:
                yield batch

    manifest.rows["ledger"] = write(batches(), LEDGER_SCHEMA, directory, None)
    return ",".join(sorted(versions)) or None


def write_flags(data_dir: Path, directory: Path, pseudo: Pseudonymiser, consent: Consent,
                window: tuple[int | None, int | None], manifest: ReplayManifest,
                write: Callable) -> None:
    iso_window = _iso_window(window)

    def batches() -> Iterator[pa.RecordBatch]:
        for rows in _chunks(data_dir, "flags"):
            allowed = _consented(rows, 1, [day_end_ms(iso_to_day(r[4])) for r in rows],
                                 consent)
            manifest.left_out("flags", int((~allowed).sum()))
            kept = [r for r, ok in zip(rows, allowed.tolist(), strict=True)
                    if ok and _in_window(r[4], iso_window)]
            if kept:
                yield pa.RecordBatch.from_arrays([
                    pa.array([pseudo("flag", r[0]) for r in kept]),
                    pa.array([pseudo("user", r[1]) for r in kept]),
                    *(pa.array([r[i] for r in kept]) for i in range(2, 7))], schema=FLAG_SCHEMA)

    manifest.rows["flags"] = write(batches(), FLAG_SCHEMA, directory, None)
