"""The writer's in-memory tail (RecentSamples) reads exactly what SQLite holds."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import orjson
import pytest

from engine.ingest.log import ActivityColumns, EmbeddedLog, SampleColumns, UserShare

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
T0 = 1_764_547_200_000  # 2025-12-01T00:00:00Z
MINUTE_MS = 60_000
DAY_MS = 86_400_000


def _batch(rng: random.Random, batch: int) -> list[bytes]:
    lines = []
    for i in range(rng.randint(1, 12)):
        user = f"W{rng.randint(1, 4):05d}"
        metric, unit = rng.choice([("steps", "count"), ("heart_rate", "bpm")])
        start = T0 + rng.randint(0, 50) * DAY_MS // 2 + rng.randint(0, 30) * MINUTE_MS
        n = rng.randint(1, 5)
        values = [rng.choice([float(rng.randint(40, 120)), 70.1, 3.3e-3 + 60])
                  for _ in range(n)]
        lines.append(orjson.dumps({
            "v": 1, "upload_id": f"u{batch}-{i}", "user_id": user, "device_id": f"{user}-w",
            "metric": metric, "unit": unit, "ts_ms": [start + k * MINUTE_MS for k in range(n)],
            "values": values}))
    if rng.random() < 0.3:
        lines.append(orjson.dumps({"v": 1, "event_id": f"e{batch}", "user_id": "W00001",
                                   "kind": "checkin", "ts_ms": T0 + batch * DAY_MS,
                                   "venue_id": "V1", "source": "app"}))
    if rng.random() < 0.3:
        lines.append(orjson.dumps({"v": 1, "event_id": f"m{batch}",
                                   "user_id": f"W{rng.randint(1, 4):05d}", "kind": "meal",
                                   "ts_ms": T0 + batch * DAY_MS + MINUTE_MS, "source": "app"}))
    if rng.random() < 0.2:
        lines.append(b"not json")
    return lines


def _as_tuple(cols: SampleColumns) -> tuple:
    return (cols.users, cols.user_idx.tolist(), cols.metric.tolist(), cols.ts_ms.tolist(),
            cols.value.tolist(), cols.wm_before_ms.tolist(),
            [a.dtype.str for a in (cols.user_idx, cols.metric, cols.ts_ms, cols.value,
                                   cols.wm_before_ms)])


def test_tail_read_from_memory_equals_the_stored_rows(data_dir: Path) -> None:
    rng = random.Random(7)
    with EmbeddedLog.open(data_dir) as log:
        history = []
        for batch in range(20):
            lines = _batch(rng, batch)
            if history and rng.random() < 0.3:
                lines += rng.sample(history, min(3, len(history)))  # re-sends
            history += lines
            before = log.position()
            log.ingest_lines(lines, "test", 1, NOW_MS)
            after = log.position()
            assert log._recent.covers(before, after)  # the tail is served from memory
            with EmbeddedLog.open(data_dir, writer=False) as reader:  # reads SQLite
                for lo, hi in [(before, after), (rng.randint(0, after), after),
                               (max(0, before - 3), after)]:
                    assert _as_tuple(log.read_samples(lo, hi)) == \
                        _as_tuple(reader.read_samples(lo, hi))
        assert log.read_samples(0, log.position()).ts_ms.size > 0


def test_excluded_key_reads_leave_its_records_out_of_the_tail_too(data_dir: Path) -> None:
    line = orjson.dumps({"v": 1, "upload_id": "u1", "user_id": "W00001", "device_id": "d",
                         "metric": "steps", "unit": "count", "ts_ms": [T0], "values": [5.0]})
    with EmbeddedLog.open(data_dir) as log:
        log.ingest_lines([line], "test", 1, NOW_MS, key_id="gw1")
        log.exclude_key("gw1", NOW_MS)
        assert log.read_samples(0, log.position()).ts_ms.tolist() == []
        assert np.array_equal(log.read_samples(0, 0).ts_ms, np.empty(0, np.int64))


def test_stored_records_joined_by_sqlite_read_as_the_rows_one_by_one(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_samples takes SQLite's records as one aggregate row of joined columns; the row
    by row reading it falls back to is the reference (wide float64 values, re-sends, shares
    and random ranges included)."""
    rng = random.Random(11)
    with EmbeddedLog.open(data_dir) as log:
        for batch in range(30):
            log.ingest_lines(_batch(rng, batch), "test", 1, NOW_MS)
        position = log.position()
    ranges = [(0, position), *((lo, rng.randint(lo, position))
                               for lo in (rng.randint(0, position) for _ in range(12)))]
    shares: list[UserShare | None] = [None, UserShare(0, 2), UserShare(1, 2)]

    def reads() -> tuple[list[tuple], list[tuple]]:
        samples, activities = [], []
        for share in shares:
            with EmbeddedLog.open(data_dir, writer=False) as reader:
                if share is not None:
                    reader.read_share(share)
                samples += [_as_tuple(reader.read_samples(lo, hi)) for lo, hi in ranges]
                activities += [_activities_tuple(reader.read_activities(lo, hi))
                               for lo, hi in ranges]
        return samples, activities

    joined = reads()
    monkeypatch.setattr(EmbeddedLog, "_stored_columns", lambda *_: None)
    monkeypatch.setattr(EmbeddedLog, "_stored_activity_columns", lambda *_: None)
    assert joined == reads()
    samples, activities = joined
    assert any(len(read[3]) for read in samples)
    assert any(value != float(np.float32(value)) for read in samples for value in read[4])
    assert any(len(read[1]) > 1 for read in activities)
    assert any(venue == "" for read in activities for venue in read[5])


def _activities_tuple(cols: ActivityColumns) -> tuple:
    return (cols.users, cols.user_idx.tolist(), cols.event_id, cols.kind.tolist(),
            cols.ts_ms.tolist(), cols.venue_id, cols.wm_before_ms.tolist(),
            [a.dtype.str for a in (cols.user_idx, cols.kind, cols.ts_ms, cols.wm_before_ms)])
