"""The bounded seen-sample index: sorted uint64 key runs per Tokyo day in the log file.

Runs are written in the same transaction as the samples they describe, so after a
kill -9 the index never disagrees with the log. A batch loads only the days it
touches (cached up to SEEN_DAYS_CACHED_MAX); keys older than their user's late
window plus a margin are pruned as watermarks move. Opening the log therefore
reads nothing of the index, and its size grows with people x window, not with
history. A day's runs merge into one when there are more than
SEEN_RUNS_PER_DAY_MAX of them.

A run is stored as its first key, the count of gaps that need more than 32 bits, every
gap between neighbouring keys as uint32 (0xFFFFFFFF where it needs more), then those
gaps as uint64: about 4 bytes a key, since one stream's samples lie seconds or minutes
apart (`run_bytes`). A run that would not be shorter that way is stored as its uint64
keys; a blob of 8 bytes a key is such a run (runs written before the encoding too).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from engine.ingest.dedup import DayGroups, day_of_keys, stream_of_keys

SEEN_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen_runs (
    id INTEGER PRIMARY KEY, day INTEGER NOT NULL, n INTEGER NOT NULL, keys BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS seen_runs_by_day ON seen_runs (day);
"""
SEEN_DAYS_CACHED_MAX = 64
SEEN_RUNS_PER_DAY_MAX = 8
SEEN_MARGIN_DAYS = 1
SQL_DAYS_PER_QUERY_MAX = 500


_WIDE_GAP = 0xFFFF_FFFF  # a gap of this or more is stored in full (uint64)
_RUN_HEADER_BYTES = 16  # first key, wide gap count (uint64 each)


def run_bytes(run: np.ndarray) -> bytes:
    """A sorted run of keys as stored (module docstring)."""
    n = len(run)
    gaps = np.diff(run)
    wide = gaps >= np.uint64(_WIDE_GAP)
    n_wide = int(np.count_nonzero(wide))
    if _RUN_HEADER_BYTES + 4 * (n - 1) + 8 * n_wide >= 8 * n:
        return run.tobytes()
    narrow = gaps.astype(np.uint32)
    narrow[wide] = _WIDE_GAP
    header = np.array([run[0], n_wide], np.uint64)
    return b"".join((header.tobytes(), narrow.tobytes(), gaps[wide].tobytes()))


def run_of(blob: bytes, n: int) -> np.ndarray:
    """The keys of a stored run of `n` keys (read-only when stored as raw keys)."""
    if len(blob) == 8 * n:
        return np.frombuffer(blob, np.uint64)
    first, n_wide = np.frombuffer(blob, np.uint64, 2).tolist()
    narrow = np.frombuffer(blob, np.uint32, n - 1, _RUN_HEADER_BYTES)
    gaps = narrow.astype(np.uint64)
    gaps[narrow == _WIDE_GAP] = np.frombuffer(blob, np.uint64, n_wide,
                                              _RUN_HEADER_BYTES + 4 * (n - 1))
    run = np.empty(n, np.uint64)
    run[0] = first
    np.cumsum(gaps, out=run[1:])
    run[1:] += np.uint64(first)
    return run


@dataclass(frozen=True)
class StagedDay:
    day: int
    run: np.ndarray  # the batch's new keys of the day, sorted
    merged: np.ndarray | None  # the day's whole run when the batch compacted it


class DayRuns:
    """One day's keys as sorted runs, merged log-structured (a new run merges with the
    last while it is at least half its size): N keys cost O(N log N) overall."""

    def __init__(self, runs: list[np.ndarray]) -> None:
        self.runs: list[np.ndarray] = []
        self.stored_runs = len(runs)
        for run in runs:
            self.add(run)

    def __len__(self) -> int:
        return sum(len(run) for run in self.runs)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(len(keys), dtype=bool)
        for run in self.runs:
            position = np.searchsorted(run, keys)
            position[position == len(run)] = 0
            found |= run[position] == keys
        return found

    def add(self, run: np.ndarray) -> None:
        if not len(run):
            return
        while self.runs and len(self.runs[-1]) <= 2 * len(run):
            run = np.sort(np.concatenate((self.runs.pop(), run)), kind="stable")
        self.runs.append(run)

    def merged(self, extra: np.ndarray) -> np.ndarray:
        return np.sort(np.concatenate([*self.runs, extra]), kind="stable")


def _split_by_day(keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
    if not len(keys):
        return []
    days = day_of_keys(keys)
    order = np.argsort(days, kind="stable")
    days, keys = days[order], keys[order]
    cuts = np.flatnonzero(days[1:] != days[:-1]) + 1
    return [(int(d[0]), k) for d, k in zip(np.split(days, cuts), np.split(keys, cuts),
                                           strict=True)]


class SeenIndex:
    """Keys of stored samples, by day. SQL stays here; judgement is in engine.ingest.dedup."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._days: dict[int, DayRuns] = {}

    def _load(self, days: Iterable[int]) -> None:
        missing = sorted(set(days) - self._days.keys())
        for lo in range(0, len(missing), SQL_DAYS_PER_QUERY_MAX):
            chunk = missing[lo:lo + SQL_DAYS_PER_QUERY_MAX]
            found: dict[int, list[np.ndarray]] = {day: [] for day in chunk}
            marks = ",".join("?" * len(chunk))
            for day, n, blob in self._db.execute(
                    f"SELECT day, n, keys FROM seen_runs WHERE day IN ({marks}) ORDER BY id",
                    chunk):
                found[day].append(run_of(blob, n))
            for day, runs in found.items():
                self._days[day] = DayRuns(runs)

    def contains(self, groups: DayGroups) -> np.ndarray:
        """Which of the grouped keys are stored already (loads the days they fall on)."""
        found = np.zeros(len(groups.keys), bool)
        self._load(groups.days)
        for day, lo, hi in zip(groups.days, groups.bounds, groups.bounds[1:], strict=False):
            found[lo:hi] = self._days[day].contains(groups.keys[lo:hi])
        return found

    def stage(self, groups: DayGroups, new: np.ndarray) -> list[StagedDay]:
        """Write the runs of the grouped keys marked new (not stored before, each once),
        inside the caller's transaction.

        Their days must have been loaded by `contains`; the cache changes only in
        `adopt`, after the caller commits.
        """
        staged = []
        for day, lo, hi in zip(groups.days, groups.bounds, groups.bounds[1:], strict=False):
            run = groups.keys[lo:hi][new[lo:hi]]  # sorted, as the groups are
            if not len(run):
                continue
            held = self._days[day]
            merged = None
            if held.stored_runs + 1 > SEEN_RUNS_PER_DAY_MAX:
                merged = held.merged(run)
                self._db.execute("DELETE FROM seen_runs WHERE day = ?", (day,))
            stored = run if merged is None else merged
            self._db.execute("INSERT INTO seen_runs (day, n, keys) VALUES (?, ?, ?)",
                             (day, len(stored), run_bytes(stored)))
            staged.append(StagedDay(day, run, merged))
        return staged

    def adopt(self, staged: list[StagedDay]) -> None:
        for item in staged:
            held = self._days[item.day]
            if item.merged is None:
                held.add(item.run)
                held.stored_runs += 1
            else:
                held.runs, held.stored_runs = [item.merged], 1
        while len(self._days) > SEEN_DAYS_CACHED_MAX:
            del self._days[min(self._days)]

    def forget_cache(self) -> None:
        self._days.clear()

    def prune(self, horizon_day_by_stream: np.ndarray, before_day: int) -> int:
        """Drop keys of days before their stream's horizon, looking at days < before_day
        (inside the caller's transaction). Returns how many keys were dropped."""
        dropped = 0
        rows = self._db.execute("SELECT id, day, n, keys FROM seen_runs WHERE day < ?",
                                (before_day,)).fetchall()
        for row_id, day, n, blob in rows:
            keys = run_of(blob, n)
            stream = stream_of_keys(keys)
            inside = stream < len(horizon_day_by_stream)
            keep = ~inside
            keep[inside] = day >= horizon_day_by_stream[stream[inside]]
            kept = int(keep.sum())
            if kept == len(keys):
                continue
            dropped += len(keys) - kept
            if kept == 0:
                self._db.execute("DELETE FROM seen_runs WHERE id = ?", (row_id,))
            else:
                self._db.execute("UPDATE seen_runs SET n = ?, keys = ? WHERE id = ?",
                                 (kept, run_bytes(keys[keep]), row_id))
        for day in [d for d in self._days if d < before_day]:
            del self._days[day]
        return dropped

    def add_all(self, keys: np.ndarray) -> None:
        """Bulk load (building the index for a log written before it existed)."""
        for day, part in _split_by_day(keys):
            run = np.sort(part, kind="stable")
            self._db.execute("INSERT INTO seen_runs (day, n, keys) VALUES (?, ?, ?)",
                             (day, len(run), run_bytes(run)))
        self.forget_cache()

    def stored_runs(self) -> Iterator[tuple[int, np.ndarray]]:
        """Every stored run with its day, in the order written."""
        for day, n, blob in self._db.execute("SELECT day, n, keys FROM seen_runs ORDER BY id"):
            yield day, run_of(blob, n)

    def clear(self) -> None:
        self._db.execute("DELETE FROM seen_runs")
        self.forget_cache()

    def size(self) -> tuple[int, int]:
        """(days, keys) held."""
        days, keys = self._db.execute(
            "SELECT count(DISTINCT day), coalesce(sum(n), 0) FROM seen_runs").fetchone()
        return int(days), int(keys)
