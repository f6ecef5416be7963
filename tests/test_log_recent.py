"""The writer's in-memory tail (RecentSamples) reads exactly what SQLite holds."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from engine.clock import tokyo_day
from engine.faults import CRASH_ENV
from engine.ingest.archive import archive_dir
from engine.ingest.blocks import BLOCK_COLUMNS, SampleBlock
from engine.ingest.log import LOG_FILE_NAME, ActivityColumns, EmbeddedLog, SampleColumns, UserShare
from tests.conftest import genki_cmd

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


def test_a_log_opened_without_a_tail_stores_and_reads_the_same(tmp_path: Path) -> None:
    """`genki ingest` keeps no tail (nothing in its process reads one): same file rows,
    same reads, from SQLite."""
    rng, dirs = random.Random(11), [tmp_path / "tail", tmp_path / "no-tail"]
    batches = [_batch(rng, batch) for batch in range(12)]
    for data_dir, recent in zip(dirs, (True, False), strict=True):
        with EmbeddedLog.open(data_dir, recent=recent) as log:
            for lines in batches:
                before = log.position()
                log.ingest_lines(lines, "test", 1, NOW_MS)
                assert log._recent.covers(before, log.position()) == (recent and
                                                                      log.position() > before)
    reads = []
    for data_dir in dirs:
        with EmbeddedLog.open(data_dir) as log:
            reads.append([_as_tuple(log.read_samples(lo, log.position())) for lo in (0, 5)])
        with sqlite3.connect(data_dir / LOG_FILE_NAME) as db:
            reads.append(db.execute(f"SELECT {BLOCK_COLUMNS} FROM sample_blocks").fetchall())
    assert reads[0] == reads[2] and reads[1] == reads[3]


def test_excluded_key_reads_leave_its_records_out_of_the_tail_too(data_dir: Path) -> None:
    line = orjson.dumps({"v": 1, "upload_id": "u1", "user_id": "W00001", "device_id": "d",
                         "metric": "steps", "unit": "count", "ts_ms": [T0], "values": [5.0]})
    with EmbeddedLog.open(data_dir) as log:
        log.ingest_lines([line], "test", 1, NOW_MS, key_id="gw1")
        log.exclude_key("gw1", NOW_MS)
        assert log.read_samples(0, log.position()).ts_ms.tolist() == []
        assert np.array_equal(log.read_samples(0, 0).ts_ms, np.empty(0, np.int64))


def _reads(data_dir: Path, ranges: list[tuple[int, int]]) -> tuple[list[tuple], list[tuple]]:
    """Samples and activities of every range, for the whole log and for each of 2 shares."""
    samples, activities = [], []
    for share in [None, UserShare(0, 2), UserShare(1, 2)]:
        with EmbeddedLog.open(data_dir, writer=False) as reader:
            if share is not None:
                reader.read_share(share)
            samples += [_as_tuple(reader.read_samples(lo, hi)) for lo, hi in ranges]
            activities += [_activities_tuple(reader.read_activities(lo, hi))
                           for lo, hi in ranges]
    return samples, activities


def _random_log(data_dir: Path, rng: random.Random) -> list[tuple[int, int]]:
    with EmbeddedLog.open(data_dir) as log:
        for batch in range(30):
            log.ingest_lines(_batch(rng, batch), "test", 1, NOW_MS)
        position = log.position()
    return [(0, position), *((lo, rng.randint(lo, position))
                             for lo in (rng.randint(0, position) for _ in range(12)))]


def test_activity_records_joined_by_sqlite_read_as_the_rows_one_by_one(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """read_activities takes SQLite's records as one aggregate row of joined columns; the
    row by row reading it falls back to is the reference (shares, random ranges)."""
    ranges = _random_log(data_dir, random.Random(11))
    joined = _reads(data_dir, ranges)
    monkeypatch.setattr(EmbeddedLog, "_stored_activity_columns", lambda *_: None)
    assert joined == _reads(data_dir, ranges)
    samples, activities = joined
    assert any(len(read[3]) for read in samples)
    assert any(value != float(np.float32(value)) for read in samples for value in read[4])
    assert any(len(read[1]) > 1 for read in activities)
    assert any(venue == "" for read in activities for venue in read[5])


def _as_legacy_rows(path: Path) -> int:
    """Rewrite a log's sample blocks as the one-row-per-record table an earlier version
    wrote (the test plays that version); returns the records."""
    db = sqlite3.connect(path)
    rows = [record for row in db.execute(f"SELECT {BLOCK_COLUMNS} FROM sample_blocks")
            for record in SampleBlock.of_row(row).records()]
    db.executemany("INSERT INTO sample_records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   [(seq, stream, upload, base, n, offsets, vals, int(wide), wm)
                    for seq, stream, upload, base, n, offsets, vals, wide, wm in rows])
    db.execute("DELETE FROM sample_blocks")
    db.commit()
    db.close()
    return len(rows)


def test_a_log_of_one_row_per_record_reads_the_same_and_converts_once(data_dir: Path) -> None:
    """Logs written before sample blocks (one sample_records row per record) read the same
    samples, wide float64 values, shares and ranges included, before and after a writer
    converts them to blocks; positions, stored samples and the seen index stay."""
    ranges = _random_log(data_dir, random.Random(5))
    with EmbeddedLog.open(data_dir, writer=False) as reader:
        position, keys = reader.position(), reader.stored_sample_keys()
        hot = reader.archive_summary()["hot_records"]
    blocks = _reads(data_dir, ranges)
    records = _as_legacy_rows(data_dir / LOG_FILE_NAME)
    assert records > 30
    with EmbeddedLog.open(data_dir, writer=False) as reader:  # not converted by a reader
        assert reader.position() == position and reader.stored_sample_keys() == keys
        assert reader.archive_summary()["hot_records"] == hot
    assert _reads(data_dir, ranges) == blocks
    with EmbeddedLog.open(data_dir) as writer:  # converted
        assert writer.position() == position and writer.stored_sample_keys() == keys
        assert writer.archive_summary()["hot_records"] == hot
        again = writer.ingest_lines(_batch(random.Random(5), 0), "test", 1, NOW_MS)
        assert again.accepted_samples == 0  # the seen index still knows every sample
    assert _reads(data_dir, ranges) == blocks
    db = sqlite3.connect(data_dir / LOG_FILE_NAME)
    assert db.execute("SELECT count(*) FROM sample_records").fetchone()[0] == 0
    assert db.execute("SELECT sum(records) FROM sample_blocks").fetchone()[0] == records
    db.close()


def test_kill_9_while_converting_leaves_the_rows_converted_at_the_next_open(
        data_dir: Path, tmp_path: Path) -> None:
    ranges = _random_log(data_dir, random.Random(3))
    blocks = _reads(data_dir, ranges)
    records = _as_legacy_rows(data_dir / LOG_FILE_NAME)
    empty = tmp_path / "empty.ndjson"
    empty.write_bytes(b"")
    command = genki_cmd("ingest", "--data-dir", str(data_dir), str(empty))
    crashed = subprocess.run(command, capture_output=True, check=False,
                             env={**os.environ, CRASH_ENV: "convert_legacy_before_commit:1"})
    assert crashed.returncode == -9
    assert _reads(data_dir, ranges) == blocks  # the rows, still read as rows
    subprocess.run(command, capture_output=True, check=True)
    assert _reads(data_dir, ranges) == blocks
    db = sqlite3.connect(data_dir / LOG_FILE_NAME)
    assert db.execute("SELECT count(*), (SELECT sum(records) FROM sample_blocks)"
                      " FROM sample_records").fetchone() == (0, records)
    db.close()


def _activities_tuple(cols: ActivityColumns) -> tuple:
    return (cols.users, cols.user_idx.tolist(), cols.event_id, cols.kind.tolist(),
            cols.ts_ms.tolist(), cols.venue_id, cols.wm_before_ms.tolist(),
            [a.dtype.str for a in (cols.user_idx, cols.kind, cols.ts_ms, cols.wm_before_ms)])


def test_erasing_the_newest_records_keeps_the_position(data_dir: Path) -> None:
    """The next record after an erasure gets a position after every earlier one, even when
    the erased person's records were the newest (a run has read past them)."""
    def segment(user: str, upload: str, minute: int) -> bytes:
        return orjson.dumps({"v": 1, "upload_id": upload, "user_id": user, "device_id": "d",
                             "metric": "steps", "unit": "count",
                             "ts_ms": [T0 + minute * MINUTE_MS], "values": [5.0]})

    with EmbeddedLog.open(data_dir) as log:
        log.ingest_lines([segment("W00001", "u1", 0), segment("W00002", "u2", 0)], "t", 1, NOW_MS)
        log.ingest_lines([segment("W00002", "u3", 1)], "t", 1, NOW_MS)
        position = log.position()
        assert log.erase_user("W00002")["samples"] == 2
        assert log.position() == position
        assert log.read_samples(0, position).ts_ms.tolist() == [T0]
        log.ingest_lines([segment("W00001", "u4", 2)], "t", 1, NOW_MS)
        assert log.position() == position + 1
        assert log.read_samples(position, position + 1).ts_ms.tolist() == [T0 + 2 * MINUTE_MS]
    with EmbeddedLog.open(data_dir, writer=False) as reader:
        assert reader.stored_sample_keys() == {
            ("W00001", "d", 0): {T0: 5.0, T0 + 2 * MINUTE_MS: 5.0}}


def test_an_erased_record_leaves_no_byte_in_the_log_file(data_dir: Path) -> None:
    """Erasure overwrites the person's records inside the blocks they share with others:
    their values, times and upload ids are gone from log.sqlite; the others' stay."""
    marker = 1234.56789012345  # not exact in float32: stored as these 8 bytes
    def segment(user: str, upload: str, value: float) -> bytes:
        return orjson.dumps({"v": 1, "upload_id": upload, "user_id": user, "device_id": "d",
                             "metric": "steps", "unit": "count",
                             "ts_ms": [T0, T0 + MINUTE_MS], "values": [value, value]})

    with EmbeddedLog.open(data_dir) as log:
        log.ingest_lines([segment("W00001", "keep-me", 7.0),
                          segment("W00002", "upload-of-the-erased", marker),
                          segment("W00003", "keep-me-too", 8.0)], "t", 1, NOW_MS)
        raw = (data_dir / LOG_FILE_NAME).read_bytes() + \
            (data_dir / f"{LOG_FILE_NAME}-wal").read_bytes()
        assert np.float64(marker).tobytes() in raw and b"upload-of-the-erased" in raw
        assert log.archive_summary()["hot_records"] == 3
        assert log.erase_user("W00002")["samples"] == 1
        assert log.archive_summary()["hot_records"] == 2
        samples = log.read_samples(0, log.position())
        assert samples.users == ["W00001", "W00003"] and samples.value.tolist() == [7.0] * 2 + [8.0] * 2
        assert log.erase_user("W00002")["samples"] == 0
    with EmbeddedLog.open(data_dir, writer=False) as reader:
        assert sorted(reader.stored_sample_keys()) == [("W00001", "d", 0), ("W00003", "d", 0)]
    wal = data_dir / f"{LOG_FILE_NAME}-wal"
    raw = (data_dir / LOG_FILE_NAME).read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert np.float64(marker).tobytes() not in raw and b"upload-of-the-erased" not in raw
    assert b"keep-me-too" in raw


def test_the_archive_drops_erased_records_and_keeps_the_rest_of_their_block(
        data_dir: Path) -> None:
    def segment(user: str, upload: str, start_ms: int) -> bytes:
        return orjson.dumps({"v": 1, "upload_id": upload, "user_id": user, "device_id": "d",
                             "metric": "steps", "unit": "count", "ts_ms": [start_ms],
                             "values": [9.0]})

    with EmbeddedLog.open(data_dir) as log:
        log.ingest_lines([segment("W00001", "a", T0), segment("W00002", "b", T0),
                          segment("W00003", "c", T0)], "t", 1, NOW_MS)
        later_ms = T0 + 100 * DAY_MS
        log.ingest_lines([segment("W00001", "d", later_ms)], "t", 1, later_ms + DAY_MS)
        position = log.position()
        log.erase_user("W00002")
        assert log.archive_summary()["hot_records"] == 3
        db = sqlite3.connect(data_dir / LOG_FILE_NAME)
        stored = [record for row in db.execute(f"SELECT {BLOCK_COLUMNS} FROM sample_blocks")
                  for record in SampleBlock.of_row(row).records()]
        db.close()
        # W00003's record is inside their late window: the archive stops before it
        moved = log.archive(tokyo_day(later_ms), position)
        assert (moved.archived_through, moved.sample_records) == (2, 1)
    (archived,) = archive_dir(data_dir).glob("samples-*.parquet")
    rows = pq.read_table(archived).to_pylist()  # the row the record had, with its names
    assert [(r["seq"], r["stream_id"], r["user_id"], r["device_id"], r["metric"],
             r["upload_id"], r["base_ts_ms"], r["n"], r["ts_offsets"], r["vals"],
             r["vals_f64"], r["wm_before_ms"]) for r in rows] == [
        (seq, stream, "W00001", "d", 0, upload, base, n, offsets, vals, wide, wm)
        for seq, stream, upload, base, n, offsets, vals, wide, wm in stored if seq == 1]
    with EmbeddedLog.open(data_dir) as log:
        summary = log.archive_summary()
        assert (summary["hot_records"], summary["archived_records"]) == (2, 1)
        samples = log.read_samples(0, position)
        assert samples.users == ["W00001", "W00003"]
        assert samples.ts_ms.tolist() == [T0, T0, T0 + 100 * DAY_MS]


def test_a_batch_stored_as_several_blocks_reads_the_same(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch with more than BLOCK_SAMPLES_MAX samples becomes several blocks: the same
    reads (ranges, shares), the same position, the same seen index."""
    one, split = tmp_path / "one", tmp_path / "split"
    ranges = _random_log(one, random.Random(9))
    monkeypatch.setattr("engine.ingest.blocks.BLOCK_SAMPLES_MAX", 3)
    assert _random_log(split, random.Random(9)) == ranges
    assert _reads(split, ranges) == _reads(one, ranges)
    db = sqlite3.connect(split / LOG_FILE_NAME)
    assert db.execute("SELECT count(*) FROM sample_blocks").fetchone()[0] > 30
    db.close()
    with EmbeddedLog.open(split) as log:
        assert log.ingest_lines(_batch(random.Random(9), 0), "t", 1, NOW_MS).accepted_samples == 0
