"""Ledger entries and flag events from inside consent periods, pseudonymised, to Parquet.

Shop ids are pseudonymised (a shop must not find its own sales and from there a
person's vitals) and entry times coarsened (ExportPolicy.ledger_time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson
import pyarrow as pa

from engine.clock import day_end_ms, day_to_iso, iso_to_day
from engine.ledger import Ledger
from replay.anonymise import ExportPolicy, coarsen

if TYPE_CHECKING:
    from replay.export import Consent, ReplayManifest

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


def _in_window(day: str | None, window: tuple[int | None, int | None]) -> bool:
    since, until = window
    if day is None:
        return True
    return (since is None or day >= day_to_iso(since)) and (until is None or day <= day_to_iso(until))


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


def write_ledger(data_dir: Path, directory: Path, pseudo: Callable, consent: Consent,
                 window: tuple[int | None, int | None], manifest: ReplayManifest,
                 write: Callable, policy: ExportPolicy) -> str | None:
    versions: set[str] = set()

    def batches() -> Iterator[pa.RecordBatch]:
        for rows in _chunks(data_dir, "entries"):
            allowed = _consented(rows, 1, [r[5] for r in rows], consent)
            manifest.left_out("ledger", int((~allowed).sum()))
            kept = [r for r, ok in zip(rows, allowed.tolist(), strict=True)
                    if ok and _in_window(r[4], window)]
            versions.update(r[8] for r in kept if r[8])
            if kept:
                shops = [_shop(r[7]) for r in kept]
                yield pa.RecordBatch.from_arrays([
                    pa.array([pseudo("entry", r[0]) for r in kept]),
                    pa.array([pseudo("user", r[1]) for r in kept]),
                    pa.array([r[2] for r in kept]), pa.array([r[3] for r in kept]),
                    pa.array([r[4] for r in kept]),
                    pa.array(coarsen(np.array([r[5] for r in kept], np.int64),
                                     policy.ledger_time)),
                    pa.array([r[6] for r in kept]),
                    pa.array([None if s is None else pseudo("shop", s) for s in shops],
                             type=pa.string()),
                    pa.array([r[8] for r in kept])], schema=LEDGER_SCHEMA)

    manifest.rows["ledger"] = write(batches(), LEDGER_SCHEMA, directory, None)
    return ",".join(sorted(versions)) or None


def write_flags(data_dir: Path, directory: Path, pseudo: Callable, consent: Consent,
                window: tuple[int | None, int | None], manifest: ReplayManifest,
                write: Callable) -> None:
    def batches() -> Iterator[pa.RecordBatch]:
        for rows in _chunks(data_dir, "flags"):
            allowed = _consented(rows, 1, [day_end_ms(iso_to_day(r[4])) for r in rows],
                                 consent)
            manifest.left_out("flags", int((~allowed).sum()))
            kept = [r for r, ok in zip(rows, allowed.tolist(), strict=True)
                    if ok and _in_window(r[4], window)]
            if kept:
                yield pa.RecordBatch.from_arrays([
                    pa.array([pseudo("flag", r[0]) for r in kept]),
                    pa.array([pseudo("user", r[1]) for r in kept]),
                    *(pa.array([r[i] for r in kept]) for i in range(2, 7))], schema=FLAG_SCHEMA)

    manifest.rows["flags"] = write(batches(), FLAG_SCHEMA, directory, None)
