"""Decode and validate wire records: bytes in, columns and rejections out.

Pure: no I/O, no clock (the caller passes `now_ms`) and no module state, so
partitions can decode in parallel threads. Sample segments of the common shape
(exactly the wire fields, well typed) are validated a column at a time for the
whole batch: one comprehension per field and one regular-expression pass over
all ids joined, so a batch of many one-sample records costs a few passes, not
a Python function per record. Every other record takes the record-at-a-time
path, which names the first problem. Arrays are checked once per batch with
numpy. Activities and profiles are small records validated by their pydantic
models.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
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


@dataclass
class DecodedBatch:
    segments: SegmentColumns
    activities: list[tuple[int, ActivityEvent, bytes]]
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
    """Vectorised range checks over all samples of the batch; drops bad records."""
    if not segments.index:
        return []
    ts, values, lengths = segments.ts, segments.values, segments.lengths
    metric = np.repeat(np.asarray(segments.metric, dtype=np.int64), lengths)
    record_of = np.repeat(np.arange(len(segments)), lengths)
    starts = segments.starts()
    bad_value = (values < _VALUE_MIN[metric]) | (values > _VALUE_MAX[metric])
    bad_future = ts > now_ms + TS_SKEW_MS_MAX
    bad_old = ts < TS_MS_MIN
    span = np.maximum.reduceat(ts, starts) - np.minimum.reduceat(ts, starts)
    bad_span = span > SEGMENT_SPAN_MS_MAX
    bad_any = bad_value | bad_future | bad_old
    bad_records = np.union1d(np.unique(record_of[bad_any]), np.flatnonzero(bad_span))
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
    for name in ("index", "upload_id", "user_id", "device_id", "metric"):
        column = getattr(segments, name)
        setattr(segments, name, [item for item, k in zip(column, keep.tolist(), strict=True) if k])


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
    activities: list[tuple[int, ActivityEvent, bytes]] = []
    profiles: list[tuple[int, Profile]] = []
    consents: list[tuple[int, ConsentEvent, bytes]] = []
    rejected: list[Rejected] = []
    fast, others = _common_segments(lines)
    slow = SegmentColumns()
    for index in others:
        problem = _decode_one(index, lines[index], slow, activities, profiles, consents)
        if problem is not None:
            rejected.append(problem)
    segments = _merge_in_index_order(fast, slow) if len(slow) else fast
    rejected.extend(_convert_arrays(segments, lines))
    rejected.extend(_check_segment_arrays(segments, lines, now_ms))
    for index, event, _ in activities:
        if event.ts_ms > now_ms + TS_SKEW_MS_MAX:
            rejected.append(_reject(index, lines[index], Reason.future_timestamp, "ts_ms",
                                    f"{event.ts_ms} is more than {TS_SKEW_MS_MAX // 1000} s in the future"))
    future = {r.index for r in rejected}
    activities = [a for a in activities if a[0] not in future]
    rejected.sort(key=lambda r: r.index)
    return DecodedBatch(segments, activities, profiles, rejected, len(lines), lines, consents)


def _loads_all(lines: list[bytes]) -> list[Any]:
    """Every line parsed, or None where it is not JSON (the slow path names why)."""
    try:
        return [orjson.loads(raw) for raw in lines]
    except orjson.JSONDecodeError:
        return [_loads_or_none(raw) for raw in lines]


def _loads_or_none(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _common_segments(lines: list[bytes]) -> tuple[SegmentColumns, list[int]]:
    """Segments of the common shape, validated a column at a time, and the indexes of
    every other line (to decode one at a time). A line lands in exactly one of them."""
    bodies = _loads_all(lines)
    keys, version, size_max = _SEGMENT_KEYS, WIRE_VERSION, RECORD_BYTES_MAX
    shaped = [i for i, (raw, body) in enumerate(zip(lines, bodies, strict=True))
              if type(body) is dict and body.keys() == keys and body["v"] == version
              and len(raw) <= size_max]
    if not shaped:
        return SegmentColumns(), list(range(len(lines)))
    rows = [bodies[i] for i in shaped]
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
    if all(ok) and len(shaped) == len(lines):
        return SegmentColumns(index=shaped, upload_id=uploads, user_id=users, device_id=devices,
                              metric=[spec.code for spec in specs],  # type: ignore[union-attr]
                              ts_lists=ts_lists, value_lists=value_lists), []
    keep = [row for row, good in enumerate(ok) if good]
    out = SegmentColumns(
        index=[shaped[row] for row in keep], upload_id=[uploads[row] for row in keep],
        user_id=[users[row] for row in keep], device_id=[devices[row] for row in keep],
        metric=[specs[row].code for row in keep],  # type: ignore[union-attr]
        ts_lists=[ts_lists[row] for row in keep], value_lists=[value_lists[row] for row in keep])
    taken = set(out.index)
    return out, [i for i in range(len(lines)) if i not in taken]


def _all_ids(texts: list[Any]) -> bool:
    """All are ids; False (not an error) when any is not a str."""
    try:
        joined = _ID_SEPARATOR.join(texts) + _ID_SEPARATOR
    except TypeError:
        return False
    return joined.count(_ID_SEPARATOR) == len(texts) and \
        _IDS_JOINED.fullmatch(joined) is not None


def _merge_in_index_order(*parts: SegmentColumns) -> SegmentColumns:
    """Record columns of several parts as one, ordered by line index."""
    out = SegmentColumns()
    index = [i for part in parts for i in part.index]
    order = sorted(range(len(index)), key=index.__getitem__)
    for name in ("index", "upload_id", "user_id", "device_id", "metric", "ts_lists",
                 "value_lists"):
        column = [x for part in parts for x in getattr(part, name)]
        setattr(out, name, [column[i] for i in order])
    return out


def _decode_one(
    index: int, raw: bytes, segments: SegmentColumns,
    activities: list[tuple[int, ActivityEvent, bytes]], profiles: list[tuple[int, Profile]],
    consents: list[tuple[int, ConsentEvent, bytes]],
) -> Rejected | None:
    if len(raw) > RECORD_BYTES_MAX:
        return _reject(index, raw[:4096], Reason.oversized, "record",
                       f"{len(raw)} bytes, max {RECORD_BYTES_MAX}")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        return _reject(index, raw, Reason.invalid_json, "record", str(error)[:120])
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
        activities.append((index, parsed, raw))
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


def _flat_array(lists: Sequence[Any], kinds: str) -> np.ndarray | None:
    """All lists as one array in one conversion, or None if any element is not of `kinds`."""
    try:
        flat = np.array(list(chain.from_iterable(lists)))
    except (ValueError, TypeError, OverflowError):
        return None
    return flat if flat.dtype.kind in kinds and flat.ndim == 1 else None


def _convert_arrays(segments: SegmentColumns, raws: list[bytes]) -> list[Rejected]:
    """Turn the segments' JSON arrays into flat numpy arrays: one conversion per batch when
    all are well typed, record by record (to name the bad ones) otherwise."""
    ts_lists, value_lists = segments.ts_lists, segments.value_lists
    segments.ts_lists, segments.value_lists = [], []
    if not len(segments):
        return []
    segments.lengths = np.fromiter(map(len, ts_lists), dtype=np.int64, count=len(ts_lists))
    ts = _flat_array(ts_lists, "iu")
    values = _flat_array(value_lists, "iuf")
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
