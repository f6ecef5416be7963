"""`genki whatif`: the whole history re-evaluated under other rules, the live ledger untouched.

The same vectorised core as the live pipeline runs over the embedded log from
its first position; its awards and flag events are compared per user with the
live ledger's awards and flags. Nothing is written to the data directory.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.ingest.log import EmbeddedLog
from engine.ledger import LEDGER_FILE_NAME, Ledger
from engine.pipeline import LOG_RECORDS_PER_CHUNK, chunks, open_engine, read_batches
from engine.rules.config import load_rules
from replay.export import Pseudonymiser, parse_window

DIFF_SCHEMA = pa.schema([("user", pa.string()), ("live_points", pa.int64()),
                         ("whatif_points", pa.int64()), ("delta_points", pa.int64()),
                         ("live_flags_raised", pa.int64()), ("whatif_flags_raised", pa.int64())])


@dataclass
class WhatIfResult:
    rules_version: str
    live_points: int = 0
    whatif_points: int = 0
    users_affected: int = 0
    users_total: int = 0
    flags_raised_live: int = 0
    flags_raised_whatif: int = 0
    flags_cleared_live: int = 0
    flags_cleared_whatif: int = 0
    samples: int = 0
    seconds: float = 0.0
    points_by_rule_whatif: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _in_window(day: str | None, window: tuple[str | None, str | None]) -> bool:
    since, until = window
    return day is None or ((since is None or day >= since) and (until is None or day <= until))


def _live(data_dir: Path, window: tuple[str | None, str | None]) -> tuple[Counter, Counter, Counter]:
    points: Counter = Counter()
    raised: Counter = Counter()
    cleared: Counter = Counter()
    if not (data_dir / LEDGER_FILE_NAME).exists():
        return points, raised, cleared
    with Ledger.open_read_only(data_dir) as ledger:
        for rows in ledger.iter_entry_rows(("seq", "user_id", "day", "points"), kinds=["award"]):
            for _, user, day, amount in rows:
                if _in_window(day, window):
                    points[user] += amount
        for rows in ledger.iter_flag_rows(("seq", "user_id", "day", "state")):
            for _, user, day, state in rows:
                if _in_window(day, window):
                    (raised if state == "raised" else cleared)[user] += 1
    return points, raised, cleared


def whatif(data_dir: Path, rules_path: Path, *, since: str | None = None,
           until: str | None = None, out: Path | None = None,
           pseudonym_key: bytes | None = None) -> WhatIfResult:
    started = time.perf_counter()
    parse_window(since, until)  # validates the dates
    window = (since, until)
    rules = load_rules(rules_path)
    result = WhatIfResult(rules_version=rules.version)
    points: Counter = Counter()
    raised: Counter = Counter()
    cleared: Counter = Counter()
    with EmbeddedLog.open(data_dir, writer=False) as log:
        engine = open_engine(log, rules)
        for lo, hi in chunks(0, log.position(), LOG_RECORDS_PER_CHUNK):
            samples, activities = read_batches(log, lo, hi)
            output = engine.process(samples, activities)
            result.samples += len(samples.ts_ms)
            for draft in output.awards:
                if _in_window(draft.day, window):
                    points[draft.user_id] += draft.points
                    family = (draft.rule or "").split(".")[0]
                    result.points_by_rule_whatif[family] = \
                        result.points_by_rule_whatif.get(family, 0) + draft.points
            for flag in output.flags:
                if _in_window(flag.day, window):
                    (raised if flag.state == "raised" else cleared)[flag.user_id] += 1
    live_points, live_raised, live_cleared = _live(data_dir, window)
    users = sorted(set(points) | set(live_points) | set(raised) | set(live_raised))
    result.users_total = len(users)
    result.users_affected = sum(1 for u in users if points[u] != live_points[u])
    result.live_points, result.whatif_points = sum(live_points.values()), sum(points.values())
    result.flags_raised_live, result.flags_raised_whatif = sum(live_raised.values()), sum(raised.values())
    result.flags_cleared_live = sum(live_cleared.values())
    result.flags_cleared_whatif = sum(cleared.values())
    if out is not None:
        _write_difference(out, users, points, live_points, raised, live_raised, pseudonym_key)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _write_difference(out: Path, users: list[str], points: Counter, live: Counter,
                      raised: Counter, live_raised: Counter, key: bytes | None) -> None:
    name = Pseudonymiser(key) if key is not None else None
    table = pa.Table.from_pydict({
        "user": [name("user", u) if name else u for u in users],
        "live_points": [live[u] for u in users],
        "whatif_points": [points[u] for u in users],
        "delta_points": [points[u] - live[u] for u in users],
        "live_flags_raised": [live_raised[u] for u in users],
        "whatif_flags_raised": [raised[u] for u in users]}, schema=DIFF_SCHEMA)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    pq.write_table(table, staging, compression="zstd")
    staging.replace(out)
