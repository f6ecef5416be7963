"""The late-data and duplicate judgement against a simple reference, and the bounded index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.clock import DAY_MS, tokyo_day
from engine.errors import CapacityError, UsageError
from engine.ingest.dedup import (
    LATE_WINDOW_DAYS_MIN,
    STREAMS_MAX,
    DayGroups,
    _grouped_runs,
    group_by_day,
    judge_late,
    new_samples,
    pack_keys,
)
from engine.ingest.log import EmbeddedLog
from engine.ingest.seen import run_bytes, run_of
from engine.schemas import TS_MS_MIN

T0 = 1_764_547_200_000  # 2025-12-01T00:00:00Z
HOUR_MS = 3_600_000
NOW_MS = T0 + 100 * DAY_MS


def reference(segments: list[tuple[int, int, list[int]]], stored: set[tuple[int, int]],
              wm: dict[int, int], window_days: int) -> tuple[list[bool], list[list[bool]]]:
    """One segment at a time: (user, stream, ts list) -> too late?, per sample new?"""
    seen = set(stored)
    wm = dict(wm)
    late_flags, new_flags = [], []
    for user, stream, ts in segments:
        mark = wm.get(user, -1)
        late = mark >= 0 and tokyo_day(min(ts)) < tokyo_day(mark) - window_days
        late_flags.append(late)
        flags = []
        for t in ts:
            fresh = not late and (stream, t) not in seen
            flags.append(fresh)
            if fresh:
                seen.add((stream, t))
        new_flags.append(flags)
        if not late:
            wm[user] = max(mark, max(ts))
    return late_flags, new_flags


segment_strategy = st.tuples(
    st.integers(0, 3),  # user
    st.integers(0, 1),  # device of that user
    st.lists(st.integers(0, 24 * 20), min_size=1, max_size=6),  # hours after T0
)


@settings(max_examples=300, deadline=None)
@given(segments=st.lists(segment_strategy, min_size=0, max_size=25),
       stored=st.sets(st.tuples(st.integers(0, 7), st.integers(0, 24 * 20)), max_size=20),
       wm_hours=st.dictionaries(st.integers(0, 3), st.integers(0, 24 * 30), max_size=4),
       window_days=st.integers(LATE_WINDOW_DAYS_MIN, 12))
def test_judgement_matches_the_one_at_a_time_reference(
        segments: list[tuple[int, int, list[int]]], stored: set[tuple[int, int]],
        wm_hours: dict[int, int], window_days: int) -> None:
    # Segments span at most 7 days, as decoding guarantees.
    segments = [(u, u * 2 + d, [t for t in ts if t - min(ts) <= 24 * 7]) for u, d, ts in segments]
    to_ms = [[T0 + h * HOUR_MS for h in ts] for _, _, ts in segments]
    stored_ms = {(s, T0 + h * HOUR_MS) for s, h in stored}
    wm = {u: T0 + h * HOUR_MS for u, h in wm_hours.items()}
    late_ref, new_ref = reference([(u, s, ts) for (u, s, _), ts in zip(segments, to_ms,
                                                                        strict=True)],
                                  stored_ms, wm, window_days)

    users = np.array([u for u, _, _ in segments], np.int64)
    wm_array = np.array([wm.get(u, -1) for u in range(4)], np.int64)
    judged = judge_late(users, np.array([min(ts) for ts in to_ms], np.int64),
                        np.array([max(ts) for ts in to_ms], np.int64), wm_array, window_days)
    assert judged.too_late.tolist() == late_ref

    lengths = [len(ts) for ts in to_ms]
    streams = np.repeat(np.array([s for _, s, _ in segments], np.int64), lengths)
    ts = np.array([t for part in to_ms for t in part], np.int64)
    keys = pack_keys(streams, ts)
    stored_keys = {int(k) for k in pack_keys(np.array([s for s, _ in stored_ms], np.int64),
                                             np.array([t for _, t in stored_ms], np.int64))}
    accepted = ~np.repeat(judged.too_late, lengths)
    def stored_of(groups: DayGroups) -> np.ndarray:
        return np.array([int(k) in stored_keys for k in groups.keys.tolist()], bool)

    expected = [f for part in new_ref for f in part]
    assert new_samples(keys, accepted, stored_of).mask.tolist() == expected
    # The same with the segments given as runs (the path the log takes).
    assert new_samples(keys, accepted, stored_of, np.array(lengths, np.int64)).mask.tolist() \
        == expected
    expected_wm = dict(wm)
    for (u, _, _), part, late in zip(segments, to_ms, late_ref, strict=True):
        if not late:
            expected_wm[u] = max(expected_wm.get(u, -1), max(part))
    assert judged.wm_after_ms.tolist() == [expected_wm.get(u, -1) for u in range(4)]


def test_keys_outside_their_range_are_a_checked_error() -> None:
    with pytest.raises(CapacityError):
        pack_keys(np.array([STREAMS_MAX]), np.array([TS_MS_MIN]))
    with pytest.raises(CapacityError):
        pack_keys(np.array([1]), np.array([TS_MS_MIN - 1]))


def steps(upload: str, ts: list[int], user: str = "W00001") -> bytes:
    return orjson.dumps({"v": 1, "upload_id": upload, "user_id": user,
                         "device_id": f"{user}-watch1", "metric": "steps", "unit": "count",
                         "ts_ms": ts, "values": [10.0] * len(ts)})


def test_a_late_window_shorter_than_a_segment_is_refused(data_dir: Path) -> None:
    with pytest.raises(UsageError):
        EmbeddedLog.open(data_dir, late_window_days=LATE_WINDOW_DAYS_MIN - 1)


def test_the_index_keeps_only_keys_inside_the_late_window(data_dir: Path) -> None:
    days = [T0 + d * DAY_MS for d in range(60)]
    with EmbeddedLog.open(data_dir, late_window_days=10) as log:
        for d, ts in enumerate(days):
            log.ingest_lines([steps(f"u{d}", [ts, ts + HOUR_MS])], "t", 1, NOW_MS)
        kept_days, kept_keys = log._seen.size()
    assert kept_days <= 10 + 1 + 1 + 1
    assert kept_keys == 2 * kept_days
    with EmbeddedLog.open(data_dir, late_window_days=10) as log:
        # Inside the window: still a duplicate after reopening.
        again = log.ingest_lines([steps("r1", [days[-5], days[-5] + HOUR_MS])], "t", 1, NOW_MS)
        assert again.as_dict()["duplicate_samples"] == 2
        # Outside: too late, as before the index was bounded.
        old = log.ingest_lines([steps("r2", [days[0]])], "t", 1, NOW_MS)
        assert old.rejected_by_reason == {"too_late": 1}


def test_a_dormant_user_keeps_their_window_while_others_move_on(data_dir: Path) -> None:
    with EmbeddedLog.open(data_dir, late_window_days=10) as log:
        log.ingest_lines([steps("a", [T0], user="W00002")], "t", 1, NOW_MS)
        for d in range(40):
            log.ingest_lines([steps(f"u{d}", [T0 + d * DAY_MS])], "t", 1, NOW_MS)
    with EmbeddedLog.open(data_dir, late_window_days=10) as log:
        again = log.ingest_lines([steps("a2", [T0], user="W00002")], "t", 1, NOW_MS)
    assert again.as_dict()["duplicate_samples"] == 1


def test_a_wider_late_window_rebuilds_the_index_from_the_log(data_dir: Path) -> None:
    with EmbeddedLog.open(data_dir, late_window_days=10) as log:
        for d in range(30):
            log.ingest_lines([steps(f"u{d}", [T0 + d * DAY_MS])], "t", 1, NOW_MS)
    with EmbeddedLog.open(data_dir, late_window_days=42) as log:
        again = log.ingest_lines([steps("r", [T0 + 2 * DAY_MS])], "t", 1, NOW_MS)
    assert again.as_dict()["duplicate_samples"] == 1
    assert again.as_dict()["accepted_samples"] == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, STREAMS_MAX - 1), st.integers(0, (1 << 43) - 1)),
                max_size=40),
       st.lists(st.tuples(st.integers(0, 3), st.integers(0, 60 * 24 * 40)), max_size=40))
def test_day_groups_sort_by_tokyo_day_then_key_keeping_equal_keys_in_order(
        anywhere: list[tuple[int, int]], near: list[tuple[int, int]]) -> None:
    pairs = anywhere + [(s, T0 - TS_MS_MIN + m * 60_000) for s, m in near]
    keys = pack_keys(np.array([s for s, _ in pairs], np.int64),
                     np.array([TS_MS_MIN + t for _, t in pairs], np.int64))
    days = [tokyo_day(TS_MS_MIN + t) for _, t in pairs]
    expected = sorted(range(len(pairs)), key=lambda i: (days[i], int(keys[i]), i))
    groups = group_by_day(keys)
    assert groups.order.tolist() == expected
    assert groups.days == sorted(set(days))
    assert [days[i] for i in groups.order.tolist()] == [
        day for day, lo, hi in zip(groups.days, groups.bounds, groups.bounds[1:], strict=False)
        for _ in range(hi - lo)]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2),  # stream
                          # start: minutes after T0 (09:00 in Tokyo), mostly around midnight
                          st.one_of(st.integers(880, 920), st.integers(3000, 3010)),
                          st.sampled_from([0, 1, 2, 7, 24 * 60 - 1]),  # step, minutes
                          st.integers(0, 8),  # samples
                          st.integers(0, 19).map(lambda x: x == 0)),  # reversed: not a run
                max_size=30))
def test_day_groups_from_runs_equal_the_sort(
        segments: list[tuple[int, int, int, int, bool]]) -> None:
    """Runs that cross midnights, overlap (re-sent data), repeat keys or are not sorted at
    all: grouping from the runs gives the sort's groups exactly, equal keys in the order
    given."""
    streams, ts, lengths = [], [], []
    for stream, start, step, n, backwards in segments:
        minutes = [start + i * step for i in range(n)]
        minutes = minutes[::-1] if backwards else minutes
        streams += [stream] * n
        ts += [T0 + m * 60_000 for m in minutes]
        lengths.append(n)
    keys = pack_keys(np.array(streams, np.int64), np.array(ts, np.int64))
    plain = group_by_day(keys)
    from_runs = [group_by_day(keys, np.array(lengths, np.int64))]
    if len(keys):  # also below the mean run length where group_by_day sorts instead
        grouped = _grouped_runs(keys, np.array(lengths, np.int64))
        assert (grouped is None) == any(backwards and n > 1 and step
                                        for _, _, step, n, backwards in segments)
        from_runs += [grouped] if grouped is not None else []
    for groups in from_runs:
        assert groups.order.tolist() == plain.order.tolist()
        assert groups.keys.tolist() == plain.keys.tolist()
        assert (groups.days, groups.bounds) == (plain.days, plain.bounds)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, (1 << 63) - 1),
       st.lists(st.one_of(st.integers(0, 70_000), st.sampled_from([0xFFFF_FFFE, 0xFFFF_FFFF,
                                                                   1 << 32, 1 << 43])),
                max_size=60))
def test_a_stored_run_reads_back_as_its_keys(first: int, gaps: list[int]) -> None:
    keys = [first]
    for gap in gaps:
        keys.append(min(keys[-1] + gap, (1 << 63) - 1))
    run = np.array(keys, np.uint64)
    blob = run_bytes(run)
    assert run_of(blob, len(run)).tolist() == keys
    assert len(blob) <= 8 * len(run)
    # Runs stored as raw keys (before the encoding, or not shorter encoded) read as such.
    assert run_of(run.tobytes(), len(run)).tolist() == keys


def test_runs_of_one_streams_samples_are_stored_in_about_4_bytes_a_key() -> None:
    ts = T0 + 60_000 * np.arange(10_000)
    keys = np.sort(np.concatenate([pack_keys(np.full(len(ts), stream), ts)
                                   for stream in (1, 2, 3)]))
    assert len(run_bytes(keys)) < 4.01 * len(keys)
