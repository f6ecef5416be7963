"""Decode and validate wire records: bytes in, columns and rejections out.

Pure: no I/O, no clock (the caller passes `now_ms`) and no module state, so
partitions can decode in parallel threads. Sample segments of the common shape
(exactly the wire fields, well typed) are validated a column at a time for the
whole batch: one comprehension per field and one regular-expression pass over
all ids joined, so a batch of many one-sample records costs a few passes, not
a Python function per record. Every other record takes the record-at-a-time
path, which names the first problem. Arrays are checked once per batch with
numpy. Lines of the common shape exactly as orjson writes them (no spaces, keys
in wire order, plain decimal numbers) skip the JSON parser: their ids are matched
in the bytes and their arrays cut out and converted by numpy, with no Python
object per number; a line that is anything else is parsed as JSON. Activity
events written the same way are matched in the bytes too; every other activity,
profile and consent record is validated by its pydantic model.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, compress, repeat
from typing import Any

import numpy as np
import orjson
from pydantic import ValidationError

from engine.ingest.reasons import Reason, reason_text
from engine.schemas import (
    ACTIVITY_KINDS,
    ID_CHAR_CLASS,
    ID_CHARS_MAX,
    METRIC_BY_NAME,
    METRICS,
    RECORD_BYTES_MAX,
    SAMPLES_PER_RECORD_MAX,
    SEGMENT_SPAN_MS_MAX,
    TS_MS_MIN,
    WIRE_VERSION,
    ActivityEvent,
    ConsentEvent,
    Profile,
    is_id,
)

TS_SKEW_MS_MAX = 10 * 60 * 1000
# Ids of a whole batch joined by a character that no id may hold: one fullmatch
# checks them all (a separator inside an id is caught by counting separators).
_ID_SEPARATOR = ","
_IDS_JOINED = re.compile(rf"(?:{ID_CHAR_CLASS}{{1,{ID_CHARS_MAX}}}{_ID_SEPARATOR})*")
_VALUE_MIN = np.array([m.value_min for m in METRICS], dtype=np.float64)
_VALUE_MAX = np.array([m.value_max for m in METRICS], dtype=np.float64)
_SAMPLE_ID_FIELDS = ("upload_id", "user_id", "device_id")
_SEGMENT_KEYS = frozenset(("v", "metric", "unit", "ts_ms", "values", *_SAMPLE_ID_FIELDS))
_ACTIVITY_KIND_CODE = {kind: code for code, kind in enumerate(ACTIVITY_KINDS)}
# The common shape as bytes (see the module docstring). A line is taken this way only
# when it is certainly a valid, well-typed record; any doubt sends it to the parser.
_ID_GROUP = "(" + ID_CHAR_CLASS + "{1," + str(ID_CHARS_MAX) + "})"
_SEGMENT_HEAD = re.compile((
    r'\{"v":' + str(WIRE_VERSION) + r',"upload_id":"' + _ID_GROUP + r'","user_id":"' + _ID_GROUP
    + r'","device_id":"' + _ID_GROUP + r'","metric":"([a-z_]{1,40})","unit":"([^"\\]{1,40})"'
).encode())
_TS_KEY = b',"ts_ms":['
_VALUES_KEY = b'],"values":['
_SEGMENT_END = b"]}"
_SEGMENT_LINE = re.compile(_SEGMENT_HEAD.pattern + re.escape(_TS_KEY) + rb"([0-9,]*)"
                           + re.escape(_VALUES_KEY) + rb"([0-9.,\-]*)" + re.escape(_SEGMENT_END))
_SHORT_LINE_BYTES = 512
_METRIC_OF_NAME_UNIT = {(m.name.encode(), m.unit.encode()): m.code for m in METRICS}
_DIGITS_COMMA = b"0123456789,"
_NUMBER_CHARS = b"0123456789,.-"
_INT_TOKEN_MAX = 10**18  # plain tokens have at most 18 digits (int64; larger saturate)
_VALUE_ABS_MAX = 1e15  # float tokens beyond are left to the JSON path
_INT_TYPES = frozenset((int,))
_NUMBER_TYPES = frozenset((int, float))
_FLAT_INT_ABS_MAX = 2.0**62
_ACTIVITY_START = b'{"v":' + str(WIRE_VERSION).encode() + b',"event_id":"'
_ACTIVITY_TEXT = re.compile(
    r'\{"v":' + str(WIRE_VERSION) + r',"event_id":"' + _ID_GROUP + r'","user_id":"' + _ID_GROUP
    + r'","kind":"(' + "|".join(map(re.escape, ACTIVITY_KINDS)) + r')","ts_ms":([1-9][0-9]{0,17})'
    + r'(?:,"venue_id":"' + _ID_GROUP + r'")?,"source":"' + _ID_GROUP + r'"\}')


@dataclass
class Rejected:
    index: int
    reason: str
    raw: bytes


@dataclass
class SegmentColumns:
    """Accepted sample segments of one batch, as columns (one row per record)."""

    index: list[int] = field(default_factory=list)
    upload_id: list[str] = field(default_factory=list)
    user_id: list[str] = field(default_factory=list)
    device_id: list[str] = field(default_factory=list)
    metric: list[int] = field(default_factory=list)
    ts_lists: list[list[Any]] = field(default_factory=list)  # JSON arrays, until converted
    value_lists: list[list[Any]] = field(default_factory=list)
    # After conversion: every record's samples back to back, and each record's count.
    ts: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    values: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float64))
    lengths: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.index)

    def starts(self) -> np.ndarray:
        """Offset of each record's first sample in ts / values."""
        return np.cumsum(self.lengths) - self.lengths


@dataclass(slots=True)  # not frozen: a frozen dataclass costs 1.8 us to make, this 0.3
class Activity:
    """An accepted activity event (what `ActivityEvent` validates), without the model."""

    index: int
    event_id: str
    user_id: str
    kind: str
    ts_ms: int
    venue_id: str | None
    source: str
    body: bytes = b""  # canonical(), filled in by decode_lines (so a decode worker makes it)

    @classmethod
    def of(cls, index: int, event: ActivityEvent) -> Activity:
        return cls(index, event.event_id, event.user_id, event.kind.value, event.ts_ms,
                   event.venue_id, event.source)

    def canonical(self) -> bytes:
        """The stored body: the model's JSON dump with sorted keys (a re-send compares equal)."""
        return orjson.dumps({"event_id": self.event_id, "kind": self.kind, "source": self.source,
                             "ts_ms": self.ts_ms, "user_id": self.user_id, "v": WIRE_VERSION,
                             "venue_id": self.venue_id})


@dataclass
class DecodedBatch:
    segments: SegmentColumns
    activities: list[Activity]
    profiles: list[tuple[int, Profile]]
    rejected: list[Rejected]
    received: int
    lines: list[bytes]
    consents: list[tuple[int, ConsentEvent, bytes]] = field(default_factory=list)


def _reject(index: int, raw: bytes, code: Reason, field_name: str, detail: str) -> Rejected:
    return Rejected(index, reason_text(code, field_name, detail), raw)


def _kind_of(body: dict[str, Any]) -> str | None:
    if "metric" in body or "values" in body:
        return "sample"
    if "change" in body:
        return "consent"
    if "event_id" in body:
        return "activity"
    if "birth_year" in body or "cohort" in body:
        return "profile"
    return None


def _check_segment_fields(body: dict[str, Any]) -> tuple[Reason, str, str] | None:
    """First problem with a segment's fields, or None (arrays are checked per batch)."""
    exact = body.keys() == _SEGMENT_KEYS  # the common case: no field missing, none extra
    if not exact:
        for name in (*_SAMPLE_ID_FIELDS, "metric", "unit", "ts_ms", "values"):
            if name not in body:
                return Reason.missing_field, name, "required"
    for name in _SAMPLE_ID_FIELDS:
        text = body[name]
        if not is_id(text):
            return Reason.bad_field, name, f"must be 1-{ID_CHARS_MAX} characters of A-Z a-z 0-9 _ . : - (got {text!r:.80})"
    metric = body["metric"]
    spec = METRIC_BY_NAME.get(metric) if isinstance(metric, str) else None
    if spec is None:
        return Reason.unknown_metric, "metric", f"unknown metric {metric!r:.40}"
    if body["unit"] != spec.unit:
        return Reason.unit_mismatch, "unit", f"{body['unit']!r:.20} is not the unit of {spec.name} (expects {spec.unit!r})"
    ts, values = body["ts_ms"], body["values"]
    if not isinstance(ts, list) or not ts:
        return Reason.bad_field, "ts_ms", "must be a non-empty array of integers"
    if not isinstance(values, list):
        return Reason.bad_field, "values", "must be an array of numbers"
    if len(values) != len(ts):
        return Reason.length_mismatch, "values", f"length {len(values)} != ts_ms length {len(ts)}"
    if len(ts) > SAMPLES_PER_RECORD_MAX:
        return Reason.too_many_samples, "ts_ms", f"{len(ts)} samples, max {SAMPLES_PER_RECORD_MAX}"
    if not exact:
        return Reason.bad_field, min(set(body) - _SEGMENT_KEYS), "unknown field"
    return None


def _segment_arrays(body: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | tuple[Reason, str, str]:
    try:
        ts = np.asarray(body["ts_ms"])
    except (ValueError, TypeError, OverflowError):
        return Reason.bad_field, "ts_ms", "must hold integers (epoch milliseconds)"
    try:
        values = np.asarray(body["values"])
    except (ValueError, TypeError, OverflowError):
        return Reason.bad_field, "values", "must hold numbers only"
    if ts.dtype.kind not in "iu" or ts.ndim != 1:
        return Reason.bad_field, "ts_ms", "must hold integers (epoch milliseconds)"
    if values.dtype.kind not in "iuf" or values.ndim != 1:
        return Reason.bad_field, "values", "must hold numbers only"
    return ts.astype(np.int64, copy=False), values.astype(np.float64, copy=False)


def _check_segment_arrays(
    segments: SegmentColumns, raws: list[bytes], now_ms: int
) -> list[Rejected]:
    """Vectorised range checks of the batch, on each record's extremes (a record has a
    value out of range when its least or greatest is); drops bad records."""
    if not segments.index:
        return []
    ts, values, lengths = segments.ts, segments.values, segments.lengths
    metric = np.asarray(segments.metric, dtype=np.int64)
    starts = segments.starts()
    ts_min, ts_max = np.minimum.reduceat(ts, starts), np.maximum.reduceat(ts, starts)
    bad_span = ts_max - ts_min > SEGMENT_SPAN_MS_MAX
    bad = (np.minimum.reduceat(values, starts) < _VALUE_MIN[metric]) | \
        (np.maximum.reduceat(values, starts) > _VALUE_MAX[metric]) | \
        (ts_max > now_ms + TS_SKEW_MS_MAX) | (ts_min < TS_MS_MIN) | bad_span
    bad_records = np.flatnonzero(bad)
    if not len(bad_records):
        return []
    rejected = []
    for record in bad_records.tolist():
        lo, hi = int(starts[record]), int(starts[record] + lengths[record])
        rejected.append(_explain_bad_segment(segments, record, raws, ts[lo:hi], values[lo:hi],
                                             bool(bad_span[record]), now_ms))
    keep = np.ones(len(segments), dtype=bool)
    keep[bad_records] = False
    _keep_rows(segments, keep)
    return rejected


def _explain_bad_segment(
    segments: SegmentColumns, record: int, raws: list[bytes], ts: np.ndarray,
    values: np.ndarray, bad_span: bool, now_ms: int,
) -> Rejected:
    index = segments.index[record]
    raw = raws[index]
    spec = METRICS[segments.metric[record]]
    out = np.flatnonzero((values < spec.value_min) | (values > spec.value_max))
    if len(out):
        i = int(out[0])
        return _reject(index, raw, Reason.out_of_range, f"values[{i}]",
                       f"{spec.name} {values[i]:g} outside [{spec.value_min:g}, {spec.value_max:g}] {spec.unit}")
    future = np.flatnonzero(ts > now_ms + TS_SKEW_MS_MAX)
    if len(future):
        i = int(future[0])
        return _reject(index, raw, Reason.future_timestamp, f"ts_ms[{i}]",
                       f"{int(ts[i])} is more than {TS_SKEW_MS_MAX // 1000} s in the future")
    old = np.flatnonzero(ts < TS_MS_MIN)
    if len(old):
        i = int(old[0])
        return _reject(index, raw, Reason.too_old_timestamp, f"ts_ms[{i}]",
                       f"{int(ts[i])} is before 2020-01-01")
    assert bad_span
    days = (int(ts.max()) - int(ts.min())) / 86_400_000
    return _reject(index, raw, Reason.segment_too_long, "ts_ms",
                   f"segment spans {days:.1f} days, max {SEGMENT_SPAN_MS_MAX // 86_400_000}")


def _keep_record_columns(segments: SegmentColumns, keep: np.ndarray) -> None:
    flags = keep.tolist()
    for name in ("index", "upload_id", "user_id", "device_id", "metric"):
        setattr(segments, name, list(compress(getattr(segments, name), flags)))


def _keep_rows(segments: SegmentColumns, keep: np.ndarray) -> None:
    """Drop the records (and their samples) where keep is False."""
    _keep_record_columns(segments, keep)
    samples = np.repeat(keep, segments.lengths)
    segments.ts, segments.values = segments.ts[samples], segments.values[samples]
    segments.lengths = segments.lengths[keep]


def _pydantic_reason(error: ValidationError) -> tuple[Reason, str, str]:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "record"
    if first["type"] == "missing":
        return Reason.missing_field, location, "required"
    if location == "ts_ms" and first["type"] == "greater_than_equal":
        return Reason.too_old_timestamp, location, f"{first['input']} is before 2020-01-01"
    return Reason.bad_field, location, first["msg"]


def decode_lines(lines: list[bytes], now_ms: int) -> DecodedBatch:
    """Decode a batch of NDJSON lines (without trailing newlines)."""
    with gc_paused():
        return _decode_lines(lines, now_ms)


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic collector off while a batch builds many containers that all live until
    the batch ends (JSON bodies hold no cycles); walking them again and again is waste."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _decode_lines(lines: list[bytes], now_ms: int) -> DecodedBatch:
    activities: list[Activity] = []
    profiles: list[tuple[int, Profile]] = []
    consents: list[tuple[int, ConsentEvent, bytes]] = []
    rejected: list[Rejected] = []
    plain, others = _plain_segments(lines)
    others = _plain_activities(lines, others, activities)
    shaped, others, bodies = _common_segments(lines, others)
    slow = SegmentColumns()
    for index, body in zip(others, bodies, strict=True):
        problem = _decode_one(index, lines[index], body, slow, activities, profiles, consents)
        if problem is not None:
            rejected.append(problem)
    parsed = _merge_in_index_order(shaped, slow) if len(slow) else shaped
    rejected.extend(_convert_arrays(parsed, lines))
    segments = _merge_converted(plain, parsed)
    rejected.extend(_check_segment_arrays(segments, lines, now_ms))
    activities.sort(key=lambda a: a.index)
    for activity in activities:
        if activity.ts_ms > now_ms + TS_SKEW_MS_MAX:
            rejected.append(_reject(activity.index, lines[activity.index], Reason.future_timestamp,
                                    "ts_ms", f"{activity.ts_ms} is more than "
                                    f"{TS_SKEW_MS_MAX // 1000} s in the future"))
    future = {r.index for r in rejected}
    activities = [a for a in activities if a.index not in future]
    for activity in activities:
        activity.body = activity.canonical()
    rejected.sort(key=lambda r: r.index)
    return DecodedBatch(segments, activities, profiles, rejected, len(lines), lines, consents)


# -- the common shape, straight from the bytes ---------------------------------------


def _plain_segments(lines: list[bytes]) -> tuple[SegmentColumns, list[int]]:
    """Segments of the common shape as orjson writes them, decoded from the bytes (module
    docstring) and already converted; and the indexes of every other line, in order."""
    index, fields, others = _plain_segment_fields(lines)
    if not index:
        return SegmentColumns(), others
    uploads, users, devices, metrics, units, ts_texts, value_texts = map(list, zip(*fields))
    codes = list(map(_METRIC_OF_NAME_UNIT.get, zip(metrics, units)))
    commas = list(map(bytes.count, ts_texts, repeat(b",")))
    value_commas = list(map(bytes.count, value_texts, repeat(b",")))
    if None not in codes and commas == value_commas and max(commas) < SAMPLES_PER_RECORD_MAX:
        rows = list(range(len(index)))
    else:  # an unknown metric or unit, arrays of unequal length, too many samples
        rows = [row for row, (code, n, m) in enumerate(zip(codes, commas, value_commas,
                                                           strict=True))
                if code is not None and n == m and n < SAMPLES_PER_RECORD_MAX]
    lengths = [n + 1 for n in commas]
    kept, ts_parts, value_parts = _plain_arrays(ts_texts, value_texts, lengths, rows)
    if len(kept) < len(index):  # the JSON path takes (and names) the others
        taken = set(kept)
        others = sorted(others + [index[row] for row in range(len(index)) if row not in taken])
        index, lengths = ([column[row] for row in kept] for column in (index, lengths))
        codes = [codes[row] for row in kept]
        uploads, users, devices = ([column[row] for row in kept]
                                   for column in (uploads, users, devices))
    upload_id, user_id, device_id = (b"\n".join(column).decode().split("\n")
                                     for column in (uploads, users, devices))
    return SegmentColumns(
        index=index, upload_id=upload_id, user_id=user_id, device_id=device_id,
        metric=codes,  # type: ignore[arg-type]
        ts=_concatenate(ts_parts, np.int64), values=_concatenate(value_parts, np.float64),
        lengths=np.array(lengths, np.int64)), others


def _plain_segment_fields(lines: list[bytes]
                          ) -> tuple[list[int], list[tuple[bytes, ...]], list[int]]:
    """Indexes of the lines laid out as the common shape, their fields (ids, metric, unit,
    and the texts inside the two arrays, unchecked), and the indexes of the other lines.
    A short line is matched whole; a long one only up to its arrays, which are found by
    a search (a regular expression would step through every digit)."""
    index: list[int] = []
    fields: list[tuple[bytes, ...]] = []
    others: list[int] = []
    line_of, head_of = _SEGMENT_LINE.fullmatch, _SEGMENT_HEAD.fullmatch
    ts_at, values_at, end_at = len(_TS_KEY), len(_VALUES_KEY), -len(_SEGMENT_END)
    for i, raw in enumerate(lines):
        if len(raw) <= _SHORT_LINE_BYTES:
            found = line_of(raw)
            if found is None:
                others.append(i)
                continue
            fields.append(found.groups())
        else:
            cut = raw.find(_TS_KEY)
            split = raw.find(_VALUES_KEY, cut)
            head = head_of(raw, 0, cut) if cut > 0 else None
            if head is None or split < 0 or raw[end_at:] != _SEGMENT_END or \
                    len(raw) > RECORD_BYTES_MAX:
                others.append(i)
                continue
            fields.append((*head.groups(), raw[cut + ts_at:split], raw[split + values_at:end_at]))
        index.append(i)
    return index, fields, others


def _concatenate(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate([np.empty(0, dtype), *parts])


def _plain_arrays(ts_texts: list[bytes], value_texts: list[bytes], lengths: list[int],
                  rows: list[int]) -> tuple[list[int], list[np.ndarray], list[np.ndarray]]:
    """The rows whose arrays are plain numbers, and their arrays: one conversion for all
    when they are; otherwise halves, so that a few odd lines cost a few conversions."""
    if not rows:
        return [], [], []
    ts = _plain_ints(b",".join([ts_texts[row] for row in rows]), zero_tokens=False)
    values = None if ts is None else _plain_values(
        [value_texts[row] for row in rows], [lengths[row] for row in rows])
    if ts is not None and values is not None:
        return rows, [ts], [values]
    if len(rows) == 1:
        return [], [], []
    half = len(rows) // 2
    left, right = (_plain_arrays(ts_texts, value_texts, lengths, part)
                   for part in (rows[:half], rows[half:]))
    return left[0] + right[0], left[1] + right[1], left[2] + right[2]


def _plain_ints(joined: bytes, zero_tokens: bool) -> np.ndarray | None:
    """Comma-separated JSON integers without sign (at most 18 digits each) as int64, or
    None when `joined` is anything else. Tokens "0" are refused unless zero_tokens."""
    if not joined or joined.translate(None, _DIGITS_COMMA):
        return None
    chars = np.frombuffer(joined, np.uint8)
    comma = chars == 44  # ","
    zero_after_comma = comma[:-1] & (chars[1:] == 48)  # "0" starting a token
    if comma[0] or comma[-1] or (comma[1:] & comma[:-1]).any():
        return None  # an empty token
    if not zero_tokens:
        if chars[0] == 48 or zero_after_comma.any():
            return None
    else:  # "0" alone, but no other token may start with 0 (JSON)
        zeros = np.flatnonzero(zero_after_comma) + 1
        if chars[0] == 48:
            zeros = np.concatenate(([0], zeros))
        after = zeros + 1
        after = after[after < len(chars)]
        if not comma[after].all():
            return None
    parsed = np.fromstring(joined, dtype=np.int64, sep=",")
    if len(parsed) != np.count_nonzero(comma) + 1 or int(parsed.max()) >= _INT_TOKEN_MAX:
        return None  # a token too long for int64 saturates: it is left to the JSON path
    return parsed


def _plain_values(texts: list[bytes], lengths: list[int]) -> np.ndarray | None:
    """Values as float64: integer arrays by numpy, arrays with a sign or a fraction by
    orjson (one call for all of them), or None when any is not plain."""
    joined = b",".join(texts)
    if b"." not in joined and b"-" not in joined:
        ints = _plain_ints(joined, zero_tokens=True)
        return None if ints is None else ints.astype(np.float64)
    floats = [b"." in text or b"-" in text for text in texts]
    joined = b",".join([text for text, f in zip(texts, floats, strict=True) if f])
    if joined.translate(None, _NUMBER_CHARS):
        return None
    try:
        parsed = np.array(orjson.loads(b"[" + joined + b"]"), dtype=np.float64)
    except (orjson.JSONDecodeError, OverflowError, TypeError, ValueError):
        return None
    is_float = np.repeat(np.array(floats), lengths)
    if parsed.ndim != 1 or len(parsed) != np.count_nonzero(is_float) or \
            (np.abs(parsed) >= _VALUE_ABS_MAX).any():
        return None
    values = np.empty(len(is_float), np.float64)
    values[is_float] = parsed
    if not all(floats):
        ints = _plain_ints(b",".join([t for t, f in zip(texts, floats, strict=True) if not f]),
                           zero_tokens=True)
        if ints is None or len(ints) != len(values) - len(parsed):
            return None
        values[~is_float] = ints
    return values


def _plain_activities(lines: list[bytes], candidates: list[int],
                      activities: list[Activity]) -> list[int]:
    """Activity events of the common shape as orjson writes them, matched in the text
    (latin-1 never fails to decode, and only ASCII matches); returns the indexes of every
    other line."""
    others: list[int] = []
    match = _ACTIVITY_TEXT.fullmatch
    for i in candidates:
        raw = lines[i]
        found = match(raw.decode("latin-1")) if raw.startswith(_ACTIVITY_START) else None
        if found is None or len(raw) > RECORD_BYTES_MAX:
            others.append(i)
            continue
        event_id, user_id, kind, ts_text, venue_id, source = found.groups()
        ts_ms = int(ts_text)
        if ts_ms < TS_MS_MIN:  # pydantic names it
            others.append(i)
            continue
        activities.append(Activity(i, event_id, user_id, kind, ts_ms, venue_id, source))
    return others


# -- everything else, parsed as JSON -------------------------------------------------


_NOT_JSON = object()


def _loads_all(lines: list[bytes]) -> list[Any]:
    """Every line parsed, or _NOT_JSON where it is not JSON (the slow path names why)."""
    try:
        return [orjson.loads(raw) for raw in lines]
    except orjson.JSONDecodeError:
        return [_loads_or_not(raw) for raw in lines]


def _loads_or_not(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _NOT_JSON


def _common_segments(lines: list[bytes], candidates: list[int]
                     ) -> tuple[SegmentColumns, list[int], list[Any]]:
    """Segments of the common shape among `candidates`, validated a column at a time, and
    the indexes (and parsed bodies) of every other line, to decode one at a time. A line
    lands in exactly one of them."""
    bodies = _loads_all([lines[i] for i in candidates])
    keys, version, size_max = _SEGMENT_KEYS, WIRE_VERSION, RECORD_BYTES_MAX
    shaped = [at for at, (i, body) in enumerate(zip(candidates, bodies, strict=True))
              if type(body) is dict and body.keys() == keys and body["v"] == version
              and len(lines[i]) <= size_max]
    if not shaped:
        return SegmentColumns(), candidates, bodies
    rows = [bodies[at] for at in shaped]
    uploads, users, devices = ([body[name] for body in rows] for name in _SAMPLE_ID_FIELDS)
    specs = [METRIC_BY_NAME.get(m) if type(m) is str else None
             for m in (body["metric"] for body in rows)]
    ts_lists = [body["ts_ms"] for body in rows]
    value_lists = [body["values"] for body in rows]
    ok = [spec is not None and body["unit"] == spec.unit
          and type(ts) is list and type(values) is list
          and 0 < len(ts) == len(values) <= SAMPLES_PER_RECORD_MAX
          for spec, body, ts, values in zip(specs, rows, ts_lists, value_lists, strict=True)]
    if not _all_ids(uploads + users + devices):
        ok = [good and is_id(u) and is_id(p) and is_id(d)
              for good, u, p, d in zip(ok, uploads, users, devices, strict=True)]
    keep = [row for row, good in enumerate(ok) if good]
    out = SegmentColumns(
        index=[candidates[shaped[row]] for row in keep], upload_id=[uploads[row] for row in keep],
        user_id=[users[row] for row in keep], device_id=[devices[row] for row in keep],
        metric=[specs[row].code for row in keep],  # type: ignore[union-attr]
        ts_lists=[ts_lists[row] for row in keep], value_lists=[value_lists[row] for row in keep])
    taken = {shaped[row] for row in keep}
    rest = [at for at in range(len(candidates)) if at not in taken]
    return out, [candidates[at] for at in rest], [bodies[at] for at in rest]


def _all_ids(texts: list[Any]) -> bool:
    """All are ids; False (not an error) when any is not a str."""
    try:
        joined = _ID_SEPARATOR.join(texts) + _ID_SEPARATOR
    except TypeError:
        return False
    return joined.count(_ID_SEPARATOR) == len(texts) and \
        _IDS_JOINED.fullmatch(joined) is not None


def _merge_in_index_order(*parts: SegmentColumns) -> SegmentColumns:
    """Record columns of several parts (not converted yet) as one, ordered by line index."""
    out = SegmentColumns()
    index = [i for part in parts for i in part.index]
    order = sorted(range(len(index)), key=index.__getitem__)
    for name in ("index", "upload_id", "user_id", "device_id", "metric", "ts_lists",
                 "value_lists"):
        column = [x for part in parts for x in getattr(part, name)]
        setattr(out, name, [column[i] for i in order])
    return out


def _merge_converted(first: SegmentColumns, second: SegmentColumns) -> SegmentColumns:
    """Two converted parts as one, records (and their samples) ordered by line index."""
    if not len(second):
        return first
    if not len(first):
        return second
    index = first.index + second.index
    order = np.argsort(np.array(index, np.int64), kind="stable")
    lengths = np.concatenate((first.lengths, second.lengths))
    starts = np.cumsum(lengths) - lengths
    out_lengths = lengths[order]
    out_starts = np.cumsum(out_lengths) - out_lengths
    take = np.repeat(starts[order] - out_starts, out_lengths) + np.arange(int(lengths.sum()))
    rows = order.tolist()
    out = SegmentColumns(lengths=out_lengths,
                         ts=np.concatenate((first.ts, second.ts))[take],
                         values=np.concatenate((first.values, second.values))[take])
    for name in ("index", "upload_id", "user_id", "device_id", "metric"):
        column = getattr(first, name) + getattr(second, name)
        setattr(out, name, [column[row] for row in rows])
    return out


def _decode_one(
    index: int, raw: bytes, body: Any, segments: SegmentColumns, activities: list[Activity],
    profiles: list[tuple[int, Profile]], consents: list[tuple[int, ConsentEvent, bytes]],
) -> Rejected | None:
    """One line that no column-wise path took; `body` is the line parsed (or _NOT_JSON)."""
    if len(raw) > RECORD_BYTES_MAX:
        return _reject(index, raw[:4096], Reason.oversized, "record",
                       f"{len(raw)} bytes, max {RECORD_BYTES_MAX}")
    if body is _NOT_JSON:
        try:
            orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            return _reject(index, raw, Reason.invalid_json, "record", str(error)[:120])
        raise AssertionError("a line parsed once and not the second time")
    if not isinstance(body, dict):
        return _reject(index, raw, Reason.not_an_object, "record",
                       f"expected a JSON object, got {type(body).__name__}")
    if body.get("v") != WIRE_VERSION:
        return _reject(index, raw, Reason.bad_version, "v",
                       f"unsupported version {body.get('v')!r:.20}, expected {WIRE_VERSION}")
    kind = _kind_of(body)
    if kind == "sample":
        return _decode_segment(index, raw, body, segments)
    models: dict[str, type[ActivityEvent | Profile | ConsentEvent]] = {
        "activity": ActivityEvent, "profile": Profile, "consent": ConsentEvent}
    model = models.get(kind or "")
    if model is None:
        return _reject(index, raw, Reason.unknown_type, "record",
                       "not a sample segment, activity event, profile or consent event")
    try:
        parsed = model.model_validate(body)
    except ValidationError as error:
        return _reject(index, raw, *_pydantic_reason(error))
    if isinstance(parsed, ActivityEvent):
        activities.append(Activity.of(index, parsed))
    elif isinstance(parsed, ConsentEvent):
        consents.append((index, parsed, raw))
    else:
        profiles.append((index, parsed))  # type: ignore[arg-type]
    return None


def _decode_segment(index: int, raw: bytes, body: dict[str, Any], segments: SegmentColumns) -> Rejected | None:
    problem = _check_segment_fields(body)
    if problem is not None:
        return _reject(index, raw, *problem)
    segments.index.append(index)
    segments.upload_id.append(body["upload_id"])
    segments.user_id.append(body["user_id"])
    segments.device_id.append(body["device_id"])
    segments.metric.append(METRIC_BY_NAME[body["metric"]].code)
    segments.ts_lists.append(body["ts_ms"])
    segments.value_lists.append(body["values"])
    return None


def _flat_array(lists: Sequence[Any], types: frozenset[type]) -> np.ndarray | None:
    """All lists as one array in one conversion, or None when that could differ from
    converting each record on its own (the definition: a record is judged alone, whatever
    batch it comes in): an element not of `types` (a bool, a string), or a float array
    holding an integer beyond int64 (that record alone would not convert to numbers)."""
    flat = list(chain.from_iterable(lists))
    found = set(map(type, flat))
    if not found <= types:
        return None
    try:
        array = np.array(flat)
    except (ValueError, TypeError, OverflowError):
        return None
    if array.dtype.kind not in "iuf" or array.ndim != 1:
        return None
    if array.dtype.kind == "f" and int in found and len(array) and \
            float(np.abs(array).max()) >= _FLAT_INT_ABS_MAX:
        return None
    return array


def _convert_arrays(segments: SegmentColumns, raws: list[bytes]) -> list[Rejected]:
    """Turn the segments' JSON arrays into flat numpy arrays: one conversion per batch when
    that gives what converting record by record gives, record by record (which also names
    the bad ones) otherwise."""
    ts_lists, value_lists = segments.ts_lists, segments.value_lists
    segments.ts_lists, segments.value_lists = [], []
    if not len(segments):
        return []
    segments.lengths = np.fromiter(map(len, ts_lists), dtype=np.int64, count=len(ts_lists))
    ts = _flat_array(ts_lists, _INT_TYPES)
    values = _flat_array(value_lists, _NUMBER_TYPES)
    if ts is not None and values is not None:
        segments.ts = ts.astype(np.int64, copy=False)
        segments.values = values.astype(np.float64, copy=False)
        return []
    rejected, keep, ts_parts, value_parts = [], np.ones(len(segments), dtype=bool), [], []
    for row, (ts_list, value_list) in enumerate(zip(ts_lists, value_lists, strict=True)):
        arrays = _segment_arrays({"ts_ms": ts_list, "values": value_list})
        if isinstance(arrays[0], Reason):
            index = segments.index[row]
            rejected.append(_reject(index, raws[index], *arrays))  # type: ignore[arg-type]
            keep[row] = False
        else:
            ts_parts.append(arrays[0])
            value_parts.append(arrays[1])
    segments.lengths = segments.lengths[keep]
    _keep_record_columns(segments, keep)
    segments.ts = np.concatenate(ts_parts) if ts_parts else np.empty(0, dtype=np.int64)
    segments.values = np.concatenate(value_parts) if value_parts else np.empty(0, np.float64)
    return rejected


def activity_kind_code(kind: str) -> int:
    return _ACTIVITY_KIND_CODE[kind]
