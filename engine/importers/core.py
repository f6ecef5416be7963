"""What every importer shares: mapped samples, dead letters, units, and segment building.

A format parser turns one source (a file or an HTTP body) into a stream of
`Sample`s and `Unmapped` items. `SegmentBuilder` resolves each sample's genki
person and device, checks its range, drops intervals that overlap one already
kept (two sources counting the same walk), and packs what is left into
`SampleSegment` wire records (one per person, device and metric, at most
SAMPLES_PER_RECORD_MAX samples spanning at most SEGMENT_SPAN_MS_MAX). The wire
records then take the same path as `genki ingest`. Upload ids are derived from
the content, so importing the same export twice stores nothing new.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, BinaryIO

import orjson

from engine.ingest.reasons import Reason, reason_text
from engine.schemas import (
    ID_CHARS_MAX,
    METRIC_BY_NAME,
    SAMPLES_PER_RECORD_MAX,
    SEGMENT_SPAN_MS_MAX,
    TS_MS_MIN,
    WIRE_VERSION,
)

# A dead letter keeps at most this much of the source item it could not map.
RAW_ITEM_BYTES_MAX = 4_096
# JSON sources are read whole; XML (Apple) is streamed whatever its size.
JSON_SOURCE_BYTES_MAX = 256 * 1024 * 1024
# Samples held before they are packed into segments and handed on.
SAMPLES_PER_FLUSH_MAX = 500_000
UPLOAD_ID_HASH_CHARS = 20
ID_TEXTS_CACHED_MAX = 1_024  # device names repeat on every record of a source
# Metrics whose value is an amount over an interval: overlapping intervals would count twice.
INTERVAL_METRICS = frozenset(("steps", "sleep", "conversation"))
LOCAL_OFFSET_DEFAULT = "+09:00"  # the programme's users live in Japan

_ID_CHARS = re.compile(r"[^A-Za-z0-9_.:\-]+")


class Unmappable(ValueError):
    """A source item that cannot be mapped; carries its dead-letter reason."""

    def __init__(self, code: Reason, field_name: str, detail: str) -> None:
        super().__init__(reason_text(code, field_name, detail))
        self.reason = reason_text(code, field_name, detail)


@dataclass(frozen=True, slots=True)
class Sample:
    """One mapped sample in genki's metric and unit. `start_ms` is the interval
    start of amounts (steps, sleep minutes); ts_ms is the interval end."""

    source_user: str | None
    device_id: str
    metric: str
    ts_ms: int
    value: float
    item: int
    start_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Unmapped:
    item: int
    reason: str
    raw: bytes


Item = Sample | Unmapped
# (source user or None, device) → (genki user, device) or an Unmapped reason text.
Resolver = Callable[[str | None, str], tuple[str, str] | str]


@dataclass(frozen=True)
class ImportOptions:
    user_id: str | None = None
    device_id: str | None = None
    local_offset: str = LOCAL_OFFSET_DEFAULT  # for formats that give local times only
    units: str = "metric"  # Fitbit's Accept-Language: metric, en_US (lb), en_GB (st)


@dataclass
class ImportResult:
    """Wire records (NDJSON lines), the source item each starts at, and dead letters."""

    lines: list[bytes] = field(default_factory=list)
    line_items: list[int] = field(default_factory=list)
    unmapped: list[Unmapped] = field(default_factory=list)
    items: int = 0
    samples: int = 0

    def extend(self, other: ImportResult) -> None:
        self.lines.extend(other.lines)
        self.line_items.extend(other.line_items)
        self.unmapped.extend(other.unmapped)
        self.items += other.items
        self.samples += other.samples


def raw_of(item: object) -> bytes:
    raw = item if isinstance(item, bytes) else orjson.dumps(item, default=str)
    return raw[:RAW_ITEM_BYTES_MAX]


def unmapped(item: int, raw: object, code: Reason, field_name: str, detail: str) -> Unmapped:
    return Unmapped(item, reason_text(code, field_name, detail), raw_of(raw))


@lru_cache(maxsize=ID_TEXTS_CACHED_MAX)
def id_text(text: str, prefix: str = "") -> str:
    """A source name as a genki id: A-Z a-z 0-9 _ . : - only, at most ID_CHARS_MAX."""
    cleaned = _ID_CHARS.sub("-", text.strip()).strip("-") or "unknown"
    return (prefix + cleaned)[:ID_CHARS_MAX]


# -- units: one table per genki unit, source unit → factor ------------------------------

KG_PER = {"kg": 1.0, "g": 0.001, "lb": 0.45359237, "lbs": 0.45359237, "pound": 0.45359237,
          "st": 6.35029318, "stone": 6.35029318}
M_S_PER = {"m/s": 1.0, "km/hr": 1 / 3.6, "km/h": 1 / 3.6, "mi/hr": 0.44704, "mph": 0.44704,
           "mi/h": 0.44704}
BPM_PER = {"count/min": 1.0, "bpm": 1.0, "beats/min": 1.0, "/min": 1.0}
MIN_PER = {"min": 1.0, "h": 60.0, "hr": 60.0, "s": 1 / 60, "sec": 1 / 60, "ms": 1 / 60_000}
UNIT_TABLES = {"body_weight": KG_PER, "gait_speed": M_S_PER, "heart_rate": BPM_PER,
               "resting_heart_rate": BPM_PER, "sleep": MIN_PER}


def convert(metric: str, value: float, unit: str) -> float:
    """`value` in `unit` as genki's unit of `metric`; Unmappable for an unknown unit."""
    spec = METRIC_BY_NAME[metric]
    if unit == spec.unit:
        return value
    table = UNIT_TABLES.get(metric, {})
    factor = table.get(unit) or table.get(unit.lower())
    if factor is None:
        raise Unmappable(Reason.unit_mismatch, "unit",
                           f"{unit!r:.20} cannot be converted to {spec.unit!r} for {metric}")
    return value * factor


# -- time ----------------------------------------------------------------------------

def offset_of(text: str) -> dt.timezone:
    """'+09:00', '+0900', 'Z' or seconds east of UTC as a timezone."""
    text = text.strip()
    if text in ("Z", "UTC"):
        return dt.UTC
    match = re.fullmatch(r"([+-])(\d{2}):?(\d{2})", text)
    if match is None:
        raise ValueError(f"UTC offset {text!r}: expected +HH:MM")
    sign = 1 if match.group(1) == "+" else -1
    return dt.timezone(sign * dt.timedelta(hours=int(match.group(2)),
                                           minutes=int(match.group(3))))


def iso_ms(text: object, local: dt.tzinfo | None, field_name: str) -> int:
    """Epoch ms of an ISO 8601 time; one without an offset is read in `local` (or refused)."""
    if not isinstance(text, str):
        raise Unmappable(Reason.bad_field, field_name, f"expected an ISO 8601 time, got "
                           f"{text!r:.40}")
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise Unmappable(Reason.bad_field, field_name,
                           f"{text!r:.40} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        if local is None:
            raise Unmappable(Reason.bad_field, field_name,
                               f"{text!r:.40} has no UTC offset")
        parsed = parsed.replace(tzinfo=local)
    return _checked_ms(int(parsed.timestamp() * 1000), field_name)


def epoch_s_ms(value: object, field_name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise Unmappable(Reason.bad_field, field_name,
                           f"expected epoch seconds, got {value!r:.40}")
    return _checked_ms(value * 1000, field_name)


def _checked_ms(ts_ms: int, field_name: str) -> int:
    if ts_ms < TS_MS_MIN:
        raise Unmappable(Reason.too_old_timestamp, field_name,
                           f"{ts_ms} is before 2020-01-01")
    return ts_ms


def number(value: object, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise Unmappable(Reason.bad_field, field_name, f"expected a number, got {value!r:.40}")
    try:
        return float(value)
    except ValueError:
        raise Unmappable(Reason.bad_field, field_name,
                           f"expected a number, got {value!r:.40}") from None


# -- from samples to wire records ----------------------------------------------------------

def default_resolver(options: ImportOptions) -> Resolver:
    """--user/--device win; else the source's own account id names the person."""

    def resolve(source_user: str | None, device_id: str) -> tuple[str, str] | str:
        device = options.device_id or device_id
        user = options.user_id or source_user
        if user is None:
            return reason_text(Reason.missing_field, "user_id",
                               "this format names no person; pass --user")
        return user, device
    return resolve


class SegmentBuilder:
    """Collects samples and packs them into wire records (see the module docstring)."""

    def __init__(self, format_name: str, resolver: Resolver,
                 sink: Callable[[ImportResult], None] | None = None) -> None:
        self.format_name = format_name
        self.resolver = resolver
        self.sink = sink
        self.result = ImportResult()
        self._pending: list[tuple[str, str, str, int, int, float, int]] = []

    def add(self, items: Iterable[Item]) -> ImportResult:
        for entry in items:
            if isinstance(entry, Unmapped):
                self.result.unmapped.append(entry)
            else:
                self._add_sample(entry)
            if len(self._pending) >= SAMPLES_PER_FLUSH_MAX:
                self.flush()
        self.flush()
        return self.result

    def _add_sample(self, sample: Sample) -> None:
        resolved = self.resolver(sample.source_user, sample.device_id)
        if isinstance(resolved, str):
            self.result.unmapped.append(Unmapped(sample.item, resolved, raw_of(
                {"user": sample.source_user, "device_id": sample.device_id,
                 "metric": sample.metric, "ts_ms": sample.ts_ms, "value": sample.value})))
            return
        spec = METRIC_BY_NAME[sample.metric]
        if not spec.value_min <= sample.value <= spec.value_max:
            self.result.unmapped.append(unmapped(
                sample.item, {"metric": sample.metric, "ts_ms": sample.ts_ms,
                              "value": sample.value}, Reason.out_of_range, "value",
                f"{spec.name} {sample.value:g} outside [{spec.value_min:g}, "
                f"{spec.value_max:g}] {spec.unit}"))
            return
        user, device = resolved
        start = sample.ts_ms if sample.start_ms is None else sample.start_ms
        self._pending.append((user, sample.metric, device, start, sample.ts_ms, sample.value,
                              sample.item))
        self.result.samples += 1

    def flush(self) -> None:
        pending = sorted(self._pending, key=_by_interval)
        pending, self._pending = self._drop_overlaps(pending), []
        streams: dict[tuple[str, str, str], list[tuple[int, float, int]]] = {}
        for user, metric, device, _, ts_ms, value, item in pending:
            streams.setdefault((user, device, metric), []).append((ts_ms, value, item))
        for (user, device, metric), samples in sorted(streams.items()):
            samples.sort()
            for chunk in _chunks(samples):
                self._emit(user, device, metric, chunk)
        self.result.unmapped.sort(key=lambda u: u.item)
        if self.sink is not None:
            self.sink(self.result)
            self.result = ImportResult()

    def _drop_overlaps(self, pending: list[tuple]) -> list[tuple]:
        """Amounts over intervals: keep an interval only if it starts at or after the end
        of the last one kept for that person and metric (sorted by start, then device).
        The same interval again (a duplicate export) passes; the log dedups it."""
        kept: list[tuple] = []
        last: dict[tuple[str, str], tuple] = {}
        for row in pending:
            user, metric, device, start, end, value, item = row
            if metric not in INTERVAL_METRICS:
                kept.append(row)
                continue
            previous = last.get((user, metric))
            if previous is None or start >= previous[4] or previous[2:6] == row[2:6]:
                kept.append(row)
                if previous is None or end > previous[4]:
                    last[(user, metric)] = row
                continue
            self.result.samples -= 1
            self.result.unmapped.append(unmapped(
                item, {"metric": metric, "device_id": device, "start_ms": start, "ts_ms": end,
                       "value": value}, Reason.overlapping_interval, "start_ms",
                f"{metric} interval [{start}, {end}) overlaps [{previous[3]}, {previous[4]}) "
                f"from device {previous[2]} (source item {previous[6]}), kept instead"))
        return kept

    def _emit(self, user: str, device: str, metric: str,
              chunk: list[tuple[int, float, int]]) -> None:
        ts = [row[0] for row in chunk]
        values = [row[1] for row in chunk]
        digest = hashlib.sha256(orjson.dumps([self.format_name, user, device, metric, ts,
                                              values])).hexdigest()
        record = {"v": WIRE_VERSION, "upload_id": f"{self.format_name}-"
                  f"{digest[:UPLOAD_ID_HASH_CHARS]}", "user_id": user, "device_id": device,
                  "metric": metric, "unit": METRIC_BY_NAME[metric].unit, "ts_ms": ts,
                  "values": values}
        self.result.lines.append(orjson.dumps(record))
        self.result.line_items.append(min(row[2] for row in chunk))


def _by_interval(row: tuple[str, str, str, int, int, float, int]) -> tuple:
    """Person, metric, interval start and end, then device: the order overlaps are judged in."""
    user, metric, device, start, end, value, item = row
    return user, metric, start, end, device, value, item


def _chunks(samples: list[tuple[int, float, int]]) -> Iterator[list[tuple[int, float, int]]]:
    """Sorted samples cut into runs of at most SAMPLES_PER_RECORD_MAX within the span limit."""
    chunk: list[tuple[int, float, int]] = []
    for row in samples:
        if chunk and (len(chunk) >= SAMPLES_PER_RECORD_MAX
                      or row[0] - chunk[0][0] > SEGMENT_SPAN_MS_MAX):
            yield chunk
            chunk = []
        chunk.append(row)
    if chunk:
        yield chunk


# -- JSON sources ----------------------------------------------------------------------------

def json_documents(stream: BinaryIO) -> Iterator[object | Unmapped]:
    """The JSON value of a source, or each line of NDJSON; an Unmapped for what is not JSON
    (its item number is the line's; parsers renumber it in their own count)."""
    data = stream.read(JSON_SOURCE_BYTES_MAX + 1)
    if len(data) > JSON_SOURCE_BYTES_MAX:
        yield unmapped(1, data[:RAW_ITEM_BYTES_MAX], Reason.oversized, "source",
                       f"over {JSON_SOURCE_BYTES_MAX} bytes; split the export")
        return
    try:
        yield orjson.loads(data)
        return
    except orjson.JSONDecodeError:
        pass
    for number_, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError as error:
            yield unmapped(number_, line, Reason.invalid_json, "record",
                           str(error)[:120])


def json_records(stream: BinaryIO, split: Callable[[Any], list[Any]],
                 ) -> Iterator[tuple[int, Any] | Unmapped]:
    """The records of a JSON source numbered 1, 2, ... in source order. `split` gives a
    document's records, or raises Unmappable for a document that is not one of the
    format; such a document, and a line that is not JSON, comes back as an Unmapped
    with the next number."""
    item = 0
    for document in json_documents(stream):
        if isinstance(document, Unmapped):
            item += 1
            yield replace(document, item=item)
            continue
        try:
            records = split(document)
        except Unmappable as problem:
            item += 1
            yield Unmapped(item, problem.reason, raw_of(document))
            continue
        for record in records:
            item += 1
            yield item, record


def as_list(value: object) -> list[object]:
    return value if isinstance(value, list) else [value]


def mapped(item: int, raw: object, make: Callable[[], list[Sample]]) -> Iterator[Item]:
    """The samples `make` maps from one source item, or that item as a dead letter."""
    try:
        samples = make()
    except Unmappable as error:
        yield Unmapped(item, error.reason, raw_of(raw))
        return
    except (AttributeError, TypeError, KeyError, ValueError, OverflowError) as error:
        yield unmapped(item, raw, Reason.bad_field, "record", f"malformed: {error}"[:160])
        return
    yield from samples
