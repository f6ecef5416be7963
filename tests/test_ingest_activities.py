"""Activity events judged in arrival order against a one-at-a-time reference: a re-sent
event id is a duplicate (same content) or a conflict, an event more than the late window
before its user's newest accepted event is too late, whatever the batches."""

from __future__ import annotations

from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.clock import DAY_MS, tokyo_day
from engine.ingest.log import EmbeddedLog

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
T0 = 1_764_547_200_000 - 80 * DAY_MS
WINDOW_DAYS = 42

EVENTS = st.lists(st.tuples(st.sampled_from(["e1", "e2", "e3", "e4", "e5", "e6"]),
                            st.sampled_from(["A1", "A2"]),
                            st.sampled_from(["meal", "checkin"]),
                            st.integers(0, 100 * 24)),  # hours after T0
                  min_size=1, max_size=16)


def _reference(batches: list[list[dict]]) -> tuple[dict[str, int], list[tuple[str, int]]]:
    known: dict[str, dict] = {}
    marks: dict[str, int] = {}
    counts = {"accepted": 0, "duplicate_records": 0, "conflict": 0, "too_late": 0}
    stored: list[tuple[str, int]] = []
    for batch in batches:
        for event in batch:
            if event["event_id"] in known:
                same = known[event["event_id"]] == event
                counts["accepted" if same else "conflict"] += 1
                counts["duplicate_records"] += same
                continue
            mark = marks.get(event["user_id"], -1)
            if mark >= 0 and tokyo_day(event["ts_ms"]) < tokyo_day(mark) - WINDOW_DAYS:
                counts["too_late"] += 1
                continue
            counts["accepted"] += 1
            known[event["event_id"]] = event
            marks[event["user_id"]] = max(mark, event["ts_ms"])
            stored.append((event["event_id"], mark))
    return counts, stored


@settings(max_examples=100, deadline=None)
@given(EVENTS, st.integers(1, 16))
def test_activities_are_judged_as_one_at_a_time(tmp_path_factory, events: list[tuple],
                                                batch_lines: int) -> None:
    bodies = [{"v": 1, "event_id": e, "user_id": u, "kind": k, "ts_ms": T0 + h * 3_600_000,
               "source": "app"} for e, u, k, h in events]
    batches = [bodies[lo:lo + batch_lines] for lo in range(0, len(bodies), batch_lines)]
    expected, stored = _reference(batches)
    data_dir: Path = tmp_path_factory.mktemp("log")
    with EmbeddedLog.open(data_dir, late_window_days=WINDOW_DAYS) as log:
        for batch in batches:
            log.ingest_lines([orjson.dumps(b) for b in batch], "t", 1, NOW_MS)
        totals = log.counters().as_dict()
        read = log.read_activities(0, log.position())
    assert {"accepted": totals["accepted"], "duplicate_records": totals["duplicate_records"],
            "conflict": totals["rejected_by_reason"].get("conflict", 0),
            "too_late": totals["rejected_by_reason"].get("too_late", 0)} == expected
    assert list(zip(read.event_id, read.wm_before_ms.tolist(), strict=True)) == stored
