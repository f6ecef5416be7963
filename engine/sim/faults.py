"""Malformed and rejectable records a gateway can send, each with the reason ingest must give.

Every fault record has exactly one thing wrong with it, so its expected
dead-letter reason is unambiguous. Reason precedence follows the ingest
decoder: size, JSON, object, version, record type, fields, arrays, ranges,
timestamps, span; then the late window and event-id conflicts at store time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import orjson

from engine.clock import DAY_MS
from engine.ingest.reasons import Reason
from engine.schemas import RECORD_BYTES_MAX, SAMPLES_PER_RECORD_MAX
from engine.sim.activities import SOURCES, activity_body
from engine.sim.population import Population, Venues
from engine.sim.vitals import MINUTE_MS

SAMPLES_FILE = "10-samples.ndjson"
ACTIVITIES_FILE = "20-activities.ndjson"
BIG_FAULTS_MAX = 2  # oversized / too_many_samples records are large: at most this many each
TOO_LATE_DAYS_BEFORE_START = 60
OVERSIZED_SAMPLES = 70_000  # 1 Hz heart rate: about 1.2 MB of JSON
TS_2099_MS = 4_070_908_800_000  # 2099-01-01T00:00:00Z
TS_2019_MS = 1_546_300_800_000  # 2019-01-01T00:00:00Z
BASE_SAMPLES = 12


@dataclass(frozen=True)
class FaultKind:
    name: str
    reason: Reason
    file: str
    count_max: int | None = None


FAULT_KINDS: tuple[FaultKind, ...] = (
    FaultKind("invalid_json", Reason.invalid_json, SAMPLES_FILE),
    FaultKind("oversized", Reason.oversized, SAMPLES_FILE, BIG_FAULTS_MAX),
    FaultKind("not_an_object", Reason.not_an_object, SAMPLES_FILE),
    FaultKind("bad_version", Reason.bad_version, SAMPLES_FILE),
    FaultKind("device_status_record", Reason.unknown_type, SAMPLES_FILE),
    FaultKind("missing_user_id", Reason.missing_field, SAMPLES_FILE),
    FaultKind("user_id_not_a_string", Reason.bad_field, SAMPLES_FILE),
    FaultKind("unknown_metric", Reason.unknown_metric, SAMPLES_FILE),
    FaultKind("unit_mismatch", Reason.unit_mismatch, SAMPLES_FILE),
    FaultKind("length_mismatch", Reason.length_mismatch, SAMPLES_FILE),
    FaultKind("too_many_samples", Reason.too_many_samples, SAMPLES_FILE, BIG_FAULTS_MAX),
    FaultKind("negative_steps", Reason.out_of_range, SAMPLES_FILE),
    FaultKind("heart_rate_zero", Reason.out_of_range, SAMPLES_FILE),
    FaultKind("heart_rate_400", Reason.out_of_range, SAMPLES_FILE),
    FaultKind("spo2_over_100", Reason.out_of_range, SAMPLES_FILE),
    FaultKind("future_timestamp", Reason.future_timestamp, SAMPLES_FILE),
    FaultKind("too_old_timestamp", Reason.too_old_timestamp, SAMPLES_FILE),
    FaultKind("segment_too_long", Reason.segment_too_long, SAMPLES_FILE),
    FaultKind("too_late", Reason.too_late, SAMPLES_FILE),
    FaultKind("activity_invalid_json", Reason.invalid_json, ACTIVITIES_FILE),
    FaultKind("activity_not_an_object", Reason.not_an_object, ACTIVITIES_FILE),
    FaultKind("activity_bad_version", Reason.bad_version, ACTIVITIES_FILE),
    FaultKind("activity_missing_user_id", Reason.missing_field, ACTIVITIES_FILE),
    FaultKind("activity_unknown_kind", Reason.bad_field, ACTIVITIES_FILE),
    FaultKind("activity_future_timestamp", Reason.future_timestamp, ACTIVITIES_FILE),
    FaultKind("activity_too_old_timestamp", Reason.too_old_timestamp, ACTIVITIES_FILE),
    FaultKind("activity_too_late", Reason.too_late, ACTIVITIES_FILE),
    FaultKind("activity_conflict", Reason.conflict, ACTIVITIES_FILE),
)
FAULT_KIND_BY_NAME = {kind.name: kind for kind in FAULT_KINDS}
# Kinds that pass the pydantic wire models: only the ingest's clock, late window or
# event-id index can tell they are wrong.
FAULTS_VALID_AS_MODELS = frozenset({"future_timestamp", "too_late", "activity_future_timestamp",
                                    "activity_too_late", "activity_conflict"})


@dataclass(frozen=True)
class FaultContext:
    pop: Population
    venues: Venues
    days: int
    day0_ms: int
    has_samples: np.ndarray  # bool per user: this user sent good samples
    read_activity: Callable[[int], bytes]  # the good activity record at an index
    activity_user: np.ndarray  # per good activity record
    activity_delivery_ms: np.ndarray
    samples_done_ms: int  # after every good sample record was delivered
    activities_done_ms: int


@dataclass(frozen=True)
class Fault:
    kind: str
    line: bytes
    delivery_ms: int


def fault_counts(total: int, ctx: FaultContext) -> dict[str, int]:
    """How many of each kind: an equal share, at least one each when total > 0."""
    possible = [k for k in FAULT_KINDS if _possible(k.name, ctx)]
    counts = dict.fromkeys((k.name for k in FAULT_KINDS), 0)
    if total <= 0 or not possible:
        return counts
    share = max(1, total // len(possible))
    for kind in possible:
        counts[kind.name] = share if kind.count_max is None else min(share, kind.count_max)
    open_kinds = [k.name for k in possible if k.count_max is None]
    left = total - sum(counts.values())
    for i in range(max(0, left)):
        counts[open_kinds[i % len(open_kinds)]] += 1
    return counts


def _possible(name: str, ctx: FaultContext) -> bool:
    if name in ("activity_conflict", "activity_too_late"):
        return len(ctx.activity_user) > 0
    if name == "too_late":
        return bool(ctx.has_samples.any())
    return True


def make_faults(counts: dict[str, int], ctx: FaultContext, rng: np.random.Generator) -> list[Fault]:
    faults = []
    for name, count in counts.items():
        maker = _MAKERS[name]
        for i in range(count):
            line, delivery = maker(ctx, rng, i)
            assert b"\n" not in line
            faults.append(Fault(name, line, delivery))
    return faults


def _new_id(rng: np.random.Generator) -> str:
    return rng.bytes(16).hex()


def _any_delivery(ctx: FaultContext, rng: np.random.Generator) -> int:
    return ctx.day0_ms + int(rng.integers(0, (ctx.days + 1) * DAY_MS))


def _segment(ctx: FaultContext, rng: np.random.Generator, metric: str | None = None,
             user: int | None = None, count: int = BASE_SAMPLES, step_ms: int = 5 * MINUTE_MS,
             first_ms: int | None = None) -> dict[str, object]:
    """A well-formed segment that the fault makers then break in exactly one way."""
    pop = ctx.pop
    if user is None:
        # Only watches measure heart rate and SpO2; phones count steps.
        watch_only = metric not in (None, "steps") and pop.n_watch > 0
        user = int(rng.integers(0, pop.n_watch if watch_only else pop.n))
    u = user
    metric = metric or ("heart_rate" if u < pop.n_watch else "steps")
    if first_ms is None:
        first_ms = ctx.day0_ms + int(rng.integers(0, ctx.days)) * DAY_MS + int(rng.integers(8, 18)) * 3_600_000
    ts = (first_ms + np.arange(count, dtype=np.int64) * step_ms).tolist()
    low, high, unit = {"heart_rate": (58, 95, "bpm"), "steps": (0, 120, "count"),
                       "spo2": (93, 99, "%"), "resting_heart_rate": (55, 75, "bpm")}[metric]
    values = rng.integers(low, high, count).tolist()
    return {"v": 1, "upload_id": _new_id(rng), "user_id": pop.user_ids[u],
            "device_id": pop.device_id(u), "metric": metric, "unit": unit, "ts_ms": ts,
            "values": values}


def _activity(ctx: FaultContext, rng: np.random.Generator, user: int | None = None,
              ts_ms: int | None = None) -> dict[str, object]:
    u = int(rng.integers(0, ctx.pop.n)) if user is None else user
    if ts_ms is None:
        ts_ms = ctx.day0_ms + int(rng.integers(0, ctx.days * DAY_MS))
    if u < ctx.pop.n_watch:
        venue = int(rng.integers(0, len(ctx.venues.ids)))
        return activity_body(_new_id(rng), ctx.pop.user_ids[u], "checkin", ts_ms,
                             ctx.venues.ids[venue], SOURCES[0])
    return activity_body(_new_id(rng), ctx.pop.user_ids[u], "meal", ts_ms, None, SOURCES[1])


def _dumps(body: object) -> bytes:
    return orjson.dumps(body)


def _truncated(body: dict[str, object], rng: np.random.Generator) -> bytes:
    raw = _dumps(body)
    return raw[: int(rng.integers(8, len(raw) - 1))]


Maker = Callable[[FaultContext, np.random.Generator, int], tuple[bytes, int]]


def _sample_maker(change: Callable[[dict[str, object], np.random.Generator], object],
                  metric: str | None = None) -> Maker:
    def make(ctx: FaultContext, rng: np.random.Generator, _: int) -> tuple[bytes, int]:
        body = _segment(ctx, rng, metric)
        broken = change(body, rng)
        raw = broken if isinstance(broken, bytes) else _dumps(broken if broken is not None else body)
        return raw, _any_delivery(ctx, rng)
    return make


def _activity_maker(change: Callable[[dict[str, object], np.random.Generator], object]) -> Maker:
    def make(ctx: FaultContext, rng: np.random.Generator, _: int) -> tuple[bytes, int]:
        body = _activity(ctx, rng)
        broken = change(body, rng)
        raw = broken if isinstance(broken, bytes) else _dumps(broken if broken is not None else body)
        return raw, _any_delivery(ctx, rng)
    return make


def _set(key: str, value: object) -> Callable[[dict[str, object], np.random.Generator], None]:
    def change(body: dict[str, object], _: np.random.Generator) -> None:
        body[key] = value
    return change


def _drop(key: str) -> Callable[[dict[str, object], np.random.Generator], None]:
    def change(body: dict[str, object], _: np.random.Generator) -> None:
        del body[key]
    return change


def _one_value(value: float) -> Callable[[dict[str, object], np.random.Generator], None]:
    def change(body: dict[str, object], rng: np.random.Generator) -> None:
        values = body["values"]
        assert isinstance(values, list)
        values[int(rng.integers(0, len(values)))] = value
    return change


def _shift_ts(first_ms: int) -> Callable[[dict[str, object], np.random.Generator], None]:
    def change(body: dict[str, object], rng: np.random.Generator) -> None:
        ts = body["ts_ms"]
        start = first_ms + int(rng.integers(0, 300)) * DAY_MS
        if isinstance(ts, list):
            body["ts_ms"] = [start + t - ts[0] for t in ts]
        else:
            body["ts_ms"] = start
    return change


def _shorter_values(body: dict[str, object], _: np.random.Generator) -> None:
    values = body["values"]
    assert isinstance(values, list)
    body["values"] = values[:-1]


def _device_status(body: dict[str, object], rng: np.random.Generator) -> dict[str, object]:
    ts = body["ts_ms"]
    assert isinstance(ts, list)
    return {"v": 1, "user_id": body["user_id"], "device_id": body["device_id"],
            "battery_pct": int(rng.integers(5, 100)), "ts_ms": ts[0]}


def _user_id_number(body: dict[str, object], _: np.random.Generator) -> None:
    text = body["user_id"]
    assert isinstance(text, str)
    body["user_id"] = int(text[1:])


def _heart_rate_at_1_hz(ctx: FaultContext, rng: np.random.Generator, count: int) -> tuple[bytes, int]:
    body = _segment(ctx, rng, "heart_rate", count=count, step_ms=1_000)
    return _dumps(body), _any_delivery(ctx, rng)


def _oversized(ctx: FaultContext, rng: np.random.Generator, _: int) -> tuple[bytes, int]:
    raw, delivery = _heart_rate_at_1_hz(ctx, rng, OVERSIZED_SAMPLES)
    assert len(raw) > RECORD_BYTES_MAX
    return raw, delivery


def _too_many(ctx: FaultContext, rng: np.random.Generator, _: int) -> tuple[bytes, int]:
    raw, delivery = _heart_rate_at_1_hz(ctx, rng, SAMPLES_PER_RECORD_MAX + 1)
    assert len(raw) <= RECORD_BYTES_MAX
    return raw, delivery


def _segment_too_long(ctx: FaultContext, rng: np.random.Generator, _: int) -> tuple[bytes, int]:
    """Ten daily resting heart rates in one record: 9 days, over the 7-day limit."""
    first_day = int(rng.integers(0, ctx.days - 9)) if ctx.days >= 10 else ctx.days - 10
    first_ms = ctx.day0_ms + first_day * DAY_MS + 5 * 3_600_000
    body = _segment(ctx, rng, "resting_heart_rate", count=10, step_ms=DAY_MS, first_ms=first_ms)
    return _dumps(body), _any_delivery(ctx, rng)


def _too_late(ctx: FaultContext, rng: np.random.Generator, i: int) -> tuple[bytes, int]:
    """Data from ~60 days before the start, sent after all of the user's real data."""
    user = int(rng.choice(np.flatnonzero(ctx.has_samples)))
    first_ms = (ctx.day0_ms - TOO_LATE_DAYS_BEFORE_START * DAY_MS
                + int(rng.integers(7, 20)) * 3_600_000)
    body = _segment(ctx, rng, user=user, first_ms=first_ms)
    return _dumps(body), ctx.samples_done_ms + (i + 1) * 1_000


def _activity_too_late(ctx: FaultContext, rng: np.random.Generator, i: int) -> tuple[bytes, int]:
    user = int(ctx.activity_user[int(rng.integers(0, len(ctx.activity_user)))])
    ts = ctx.day0_ms - TOO_LATE_DAYS_BEFORE_START * DAY_MS + int(rng.integers(9, 18)) * 3_600_000
    return _dumps(_activity(ctx, rng, user=user, ts_ms=ts)), ctx.activities_done_ms + (i + 1) * 1_000


def _activity_conflict(ctx: FaultContext, rng: np.random.Generator, _: int) -> tuple[bytes, int]:
    """An event id already sent, now with another time: a gateway re-using ids."""
    index = int(rng.integers(0, len(ctx.activity_user)))
    body = orjson.loads(ctx.read_activity(index))
    body["ts_ms"] += int(rng.integers(1, 60)) * MINUTE_MS
    delay = int(rng.integers(MINUTE_MS, 6 * 3_600_000))
    return _dumps(body), int(ctx.activity_delivery_ms[index]) + delay


_MAKERS: dict[str, Maker] = {
    "invalid_json": _sample_maker(_truncated),
    "oversized": _oversized,
    "not_an_object": _sample_maker(lambda body, _: b"[" + _dumps(body) + b"]"),
    "bad_version": _sample_maker(_set("v", 2)),
    "device_status_record": _sample_maker(_device_status),
    "missing_user_id": _sample_maker(_drop("user_id")),
    "user_id_not_a_string": _sample_maker(_user_id_number),
    "unknown_metric": _sample_maker(lambda body, _: {**body, "metric": "blood_glucose",
                                                     "unit": "mg/dL"}),
    "unit_mismatch": _sample_maker(_set("unit", "kg"), "steps"),
    "length_mismatch": _sample_maker(_shorter_values),
    "too_many_samples": _too_many,
    "negative_steps": _sample_maker(_one_value(-25), "steps"),
    "heart_rate_zero": _sample_maker(_one_value(0), "heart_rate"),
    "heart_rate_400": _sample_maker(_one_value(400), "heart_rate"),
    "spo2_over_100": _sample_maker(_one_value(101), "spo2"),
    "future_timestamp": _sample_maker(_shift_ts(TS_2099_MS)),
    "too_old_timestamp": _sample_maker(_shift_ts(TS_2019_MS)),
    "segment_too_long": _segment_too_long,
    "too_late": _too_late,
    "activity_invalid_json": _activity_maker(_truncated),
    "activity_not_an_object": _activity_maker(lambda body, _: b"[" + _dumps(body) + b"]"),
    "activity_bad_version": _activity_maker(_set("v", 2)),
    "activity_missing_user_id": _activity_maker(_drop("user_id")),
    "activity_unknown_kind": _activity_maker(_set("kind", "karaoke")),
    "activity_future_timestamp": _activity_maker(_shift_ts(TS_2099_MS)),
    "activity_too_old_timestamp": _activity_maker(_shift_ts(TS_2019_MS)),
    "activity_too_late": _activity_too_late,
    "activity_conflict": _activity_conflict,
}
assert set(_MAKERS) == set(FAULT_KIND_BY_NAME)
