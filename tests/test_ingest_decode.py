"""The byte-level paths of the decoder (common-shape segments and activity events read
straight from the bytes) against the JSON + pydantic path they short-cut: the same
accepted columns, the same rejections with the same reasons, whatever the batch."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.ingest import decode
from engine.ingest.decode import Activity, DecodedBatch, decode_lines
from engine.schemas import ActivityEvent

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
T0 = 1_764_547_200_000  # 2025-12-01T00:00:00Z


def _without_byte_paths(lines: list[bytes]) -> DecodedBatch:
    """The decoder with every line parsed as JSON (the reference the byte paths short-cut)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decode, "_plain_segments",
                      lambda lines: (decode.SegmentColumns(), list(range(len(lines)))))
        patch.setattr(decode, "_plain_activities", lambda lines, candidates, out: candidates)
        return decode_lines(lines, NOW_MS)


def _summary(batch: DecodedBatch, offset: int = 0) -> dict[str, Any]:
    seg = batch.segments
    starts = seg.starts().tolist()
    return {
        "segments": [(i + offset, seg.upload_id[r], seg.user_id[r], seg.device_id[r],
                      seg.metric[r], seg.ts[s:s + n].tolist(),
                      seg.values[s:s + n].tobytes())  # bytes: -0.0 and 0.0 differ
                     for r, (i, s, n) in enumerate(zip(seg.index, starts, seg.lengths.tolist(),
                                                       strict=True))],
        "activities": [(a.index + offset, a.event_id, a.user_id, a.kind, a.ts_ms, a.venue_id,
                        a.source, a.canonical(), a.body) for a in batch.activities],
        "profiles": [(i + offset, p.model_dump_json()) for i, p in batch.profiles],
        "rejected": [(r.index + offset, r.reason, r.raw) for r in batch.rejected],
    }


def _one_by_one(lines: list[bytes]) -> dict[str, Any]:
    total: dict[str, Any] = {"segments": [], "activities": [], "profiles": [], "rejected": []}
    for i, line in enumerate(lines):
        for key, items in _summary(decode_lines([line], NOW_MS), offset=i).items():
            total[key] += items
    return total


ID_TEXTS = st.one_of(st.sampled_from(['"W00001"', '"W00002"', '"u-1.a:b_c"', '"x" ', '""',
                                      '"W 1"', '"W\\u0030"', '"é"', '17', 'null',
                                      '"' + "a" * 64 + '"', '"' + "a" * 65 + '"']),
                     st.from_regex(r'"[A-Za-z0-9_.:\-]{1,8}"', fullmatch=True))
INT_TOKENS = st.one_of(
    st.integers(T0 - 5, T0 + 3 * 86_400_000).map(str),
    st.sampled_from(["0", "00", "01", "-0", "1e3", "1.0", "1.", "", " 1", "true", "null",
                     '"1"', "9" * 18, "9" * 19, "1" + "0" * 30, str(2**63), str(2**64)]),
    st.integers(-(2**70), 2**70).map(str))
VALUE_TOKENS = st.one_of(
    st.integers(0, 300).map(str),
    st.floats(-10, 400, allow_nan=False).map(lambda f: orjson.dumps(f).decode()),
    st.sampled_from(["-0", "-0.0", "0.0", "00", "01", "1.", ".5", "1e2", "1E-2", "-", "true",
                     "false", "null", '"5"', "[1]", "", "9" * 18, "9" * 20, "-" + "9" * 19,
                     "1" * 16 + ".5", "0.1234567890123456789", str(2**63)]),
    st.integers(-(2**70), 2**70).map(str))
METRIC_UNIT = st.sampled_from([('"steps"', '"count"'), ('"heart_rate"', '"bpm"'),
                               ('"spo2"', '"%"'), ('"meal_intake"', '"fraction"'),
                               ('"gait_speed"', '"m/s"'), ('"steps"', '"bpm"'),
                               ('"walking"', '"count"'), ('"steps"', '"count\\u0000"'), ('1', '2')])


def _rarely(draw: st.DrawFn) -> bool:
    return draw(st.integers(0, 5)) == 3  # not 0: hypothesis leans to small draws


@st.composite
def segment_lines(draw: st.DrawFn) -> bytes:
    n = draw(st.sampled_from([1, 2, 3, 4, 60]))  # 60: a long line (its arrays searched for)
    ts = [str(T0 + 60_000 * k) for k in range(n)]
    values = [str(k % 7) for k in range(n)]
    for tokens, strategy in ((ts, INT_TOKENS), (values, VALUE_TOKENS)):
        if _rarely(draw):
            tokens[draw(st.integers(0, n - 1))] = draw(strategy)
    if _rarely(draw):
        values = values[:draw(st.integers(0, n + 1))] + ["1"] * draw(st.integers(0, 1))
    metric, unit = draw(METRIC_UNIT) if _rarely(draw) else ('"steps"', '"count"')
    ids = [draw(ID_TEXTS) if _rarely(draw) else '"W00001"' for _ in range(3)]
    v = draw(st.sampled_from(["2", "1.0", '"1"'])) if _rarely(draw) else "1"
    fields = [("v", v), ("upload_id", ids[0]), ("user_id", ids[1]), ("device_id", ids[2]),
              ("metric", metric), ("unit", unit), ("ts_ms", "[" + ",".join(ts) + "]"),
              ("values", "[" + ",".join(values) + "]")]
    if draw(st.integers(0, 9)) == 0:
        fields = draw(st.permutations(fields))
    if draw(st.integers(0, 9)) == 0:
        fields.append(("battery", "80"))
    if draw(st.integers(0, 9)) == 0:
        fields = [f for f in fields if f[0] != draw(st.sampled_from([f[0] for f in fields]))]
    separator = ", " if _rarely(draw) else ","
    text = "{" + separator.join(f'"{k}":{v}' for k, v in fields) + "}"
    if _rarely(draw):
        text = text[:draw(st.integers(0, len(text)))]
    return text.encode()


@st.composite
def activity_lines(draw: st.DrawFn) -> bytes:
    fields = [("v", "2" if _rarely(draw) else "1"),
              ("event_id", draw(ID_TEXTS) if _rarely(draw) else draw(st.sampled_from(
                  ['"e1"', '"e2"']))),
              ("user_id", draw(ID_TEXTS) if _rarely(draw) else '"A00001"'),
              ("kind", draw(st.sampled_from(['"checkin"', '"meal"', '"brain_training"',
                                             '"volunteer"', '"class"', '"nap"', '"Meal"']))),
              ("ts_ms", draw(INT_TOKENS) if _rarely(draw) else str(T0))]
    if draw(st.booleans()):
        fields.append(("venue_id", draw(ID_TEXTS) if _rarely(draw) else '"V001"'))
    fields.append(("source", draw(st.one_of(ID_TEXTS, st.just('"a b"'),
                                            st.just('"' + "s" * 65 + '"')))
                   if _rarely(draw) else '"app"'))
    if draw(st.integers(0, 9)) == 0:
        fields = draw(st.permutations(fields))
    if draw(st.integers(0, 9)) == 0:
        fields.append(("extra", "1"))
    return ("{" + ",".join(f'"{k}":{v}' for k, v in fields) + "}").encode()


LINES = st.lists(st.one_of(segment_lines(), segment_lines(), activity_lines(),
                           st.sampled_from([b"{not json", b"[1,2]", b"", b"{}", b"null"])),
                 min_size=1, max_size=12)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(LINES)
def test_byte_paths_decide_as_the_json_path(lines: list[bytes]) -> None:
    assert _summary(decode_lines(lines, NOW_MS)) == _summary(_without_byte_paths(lines))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(LINES)
def test_a_record_is_judged_alone_whatever_its_batch(lines: list[bytes]) -> None:
    assert _summary(decode_lines(lines, NOW_MS)) == _one_by_one(lines)


def test_common_lines_take_the_byte_paths() -> None:
    segment = {"v": 1, "upload_id": "u1", "user_id": "W00001", "device_id": "W00001-watch1",
               "metric": "steps", "unit": "count", "ts_ms": [T0, T0 + 60_000], "values": [3, 0]}
    meal = {**segment, "metric": "meal_intake", "unit": "fraction", "values": [0.5, -0.0]}
    event = {"v": 1, "event_id": "e1", "user_id": "A00001", "kind": "checkin", "ts_ms": T0,
             "venue_id": "V001", "source": "venue_qr"}
    lines = [orjson.dumps(body) for body in (segment, meal, event)]
    plain, others = decode._plain_segments(lines)
    assert plain.index == [0, 1] and others == [2]
    assert plain.values.tobytes() == np.array([3.0, 0.0, 0.5, -0.0]).tobytes()
    found: list[Activity] = []
    assert decode._plain_activities(lines, others, found) == []
    assert found[0].canonical() == orjson.dumps(
        ActivityEvent.model_validate(event).model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)


def test_a_timestamp_too_long_for_int64_is_left_to_the_json_path() -> None:
    line = (b'{"v":1,"upload_id":"u","user_id":"W1","device_id":"d","metric":"steps",'
            b'"unit":"count","ts_ms":[1' + b"0" * 30 + b'],"values":[1]}')
    plain, others = decode._plain_segments([line])
    assert len(plain) == 0 and others == [0]
    (rejected,) = decode_lines([line], NOW_MS).rejected
    assert rejected.reason.startswith("bad_field: ts_ms:")


@pytest.mark.parametrize(("text", "zero_tokens", "expected"), [
    (b"1,22,333", False, [1, 22, 333]), (b"0,10,0", True, [0, 10, 0]), (b"0", True, [0]),
    (b"0", False, None), (b"10,01", True, None), (b"00", True, None), (b"1,,2", True, None),
    (b",1", True, None), (b"1,", True, None), (b"", True, None), (b"1, 2", True, None),
    (b"-1", True, None), (b"1.5", True, None), (b"9" * 18, True, [10**18 - 1]),
    (b"1" + b"0" * 18, True, None), (b"1" + b"0" * 40, False, None)])
def test_plain_integers_are_exactly_the_json_ones(text: bytes, zero_tokens: bool,
                                                  expected: list[int] | None) -> None:
    parsed = decode._plain_ints(text, zero_tokens)
    assert (None if parsed is None else parsed.tolist()) == expected
