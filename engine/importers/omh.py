"""Open mHealth data points (a JSON array, one object, or NDJSON).

Documents: Open mHealth schema library (openmhealth.org/documentation,
github.com/openmhealth/schemas): `omh:data-point:1.0` (header with
`schema_id`, `user_id`, `acquisition_provenance`), `omh:step-count:1.0/2.0`,
`omh:heart-rate:1.x`, `omh:body-weight:1.0`, `omh:oxygen-saturation:1.0`,
`omh:sleep-duration:1.0`, `omh:blood-pressure:1.0`, and `omh:time-frame:1.0`
(`date_time`, or `time_interval` as start/end or start/end plus `duration`).
Date-times are RFC 3339 and must carry an offset. A heart rate whose
`temporal_relationship_to_physical_activity` is "at rest" is a resting rate.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any, BinaryIO

from engine.importers.core import (
    ImportOptions,
    Item,
    Sample,
    Unmappable,
    Unmapped,
    as_list,
    convert,
    id_text,
    iso_ms,
    json_records,
    mapped,
    number,
)
from engine.ingest.reasons import Reason

DEVICE_PREFIX = "omh:"
DURATION_MS_PER = {"ms": 1, "sec": 1000, "s": 1000, "min": 60_000, "h": 3_600_000,
                   "d": 86_400_000}


def _time_frame(body: dict[str, Any]) -> tuple[int | None, int]:
    """(interval start or None, timestamp) of `effective_time_frame`."""
    frame = body.get("effective_time_frame")
    if not isinstance(frame, dict):
        raise Unmappable(Reason.missing_field, "body.effective_time_frame", "required")
    if "date_time" in frame:
        return None, iso_ms(frame["date_time"], None, "effective_time_frame.date_time")
    interval = frame.get("time_interval")
    if not isinstance(interval, dict):
        raise Unmappable(Reason.bad_field, "effective_time_frame",
                         "needs date_time or time_interval")
    where = "effective_time_frame.time_interval"
    start = end = None
    if "start_date_time" in interval:
        start = iso_ms(interval["start_date_time"], None, f"{where}.start_date_time")
    if "end_date_time" in interval:
        end = iso_ms(interval["end_date_time"], None, f"{where}.end_date_time")
    if (start is None or end is None) and isinstance(interval.get("duration"), dict):
        duration = interval["duration"]
        per = DURATION_MS_PER.get(str(duration.get("unit")))
        if per is None:
            raise Unmappable(Reason.unit_mismatch, f"{where}.duration.unit",
                             f"{duration.get('unit')!r:.20} is not a duration unit")
        length_ms = int(number(duration.get("value"), f"{where}.duration.value") * per)
        if start is not None:
            end = start + length_ms
        elif end is not None:
            start = end - length_ms
    if start is None or end is None:
        raise Unmappable(Reason.bad_field, where, "needs two of start, end and duration")
    if end < start:
        raise Unmappable(Reason.bad_field, where, "ends before it starts")
    return start, end


def _quantity(body: dict[str, Any], key: str) -> tuple[float, str | None]:
    if key not in body:
        raise Unmappable(Reason.missing_field, f"body.{key}", "required")
    quantity = body[key]
    if isinstance(quantity, dict):
        return number(quantity.get("value"), f"body.{key}.value"), quantity.get("unit")
    return number(quantity, f"body.{key}"), None  # step-count 1.0: a bare number


def map_point(point: object, item: int) -> list[Sample]:
    if not isinstance(point, dict):
        raise Unmappable(Reason.not_an_object, "record", "a data point is a JSON object")
    header, body = point.get("header"), point.get("body")
    if not isinstance(header, dict) or not isinstance(body, dict):
        raise Unmappable(Reason.missing_field, "header" if not isinstance(header, dict)
                         else "body", "a data point has a header and a body")
    schema = header.get("schema_id") or {}
    name = schema.get("name") if isinstance(schema, dict) else None
    user = header.get("user_id") if isinstance(header.get("user_id"), str) else None
    provenance = header.get("acquisition_provenance") or {}
    device = id_text(str(provenance.get("source_name", "unknown")), DEVICE_PREFIX)
    start, ts_ms = _time_frame(body)
    if name == "step-count":
        value, _ = _quantity(body, "step_count")
        return [Sample(user, device, "steps", ts_ms, value, item, start)]
    if name == "heart-rate":
        value, unit = _quantity(body, "heart_rate")
        resting = body.get("temporal_relationship_to_physical_activity") == "at rest"
        metric = "resting_heart_rate" if resting else "heart_rate"
        return [Sample(user, device, metric, start or ts_ms,
                       convert(metric, value, unit or "bpm"), item)]
    if name == "body-weight":
        value, unit = _quantity(body, "body_weight")
        return [Sample(user, device, "body_weight", start or ts_ms,
                       round(convert("body_weight", value, unit or "kg"), 6), item)]
    if name == "oxygen-saturation":
        value, unit = _quantity(body, "oxygen_saturation")
        if unit not in (None, "%"):
            raise Unmappable(Reason.unit_mismatch, "body.oxygen_saturation.unit",
                             f"{unit!r:.20} is not '%'")
        return [Sample(user, device, "spo2", start or ts_ms, value, item)]
    if name == "sleep-duration":
        value, unit = _quantity(body, "sleep_duration")
        return [Sample(user, device, "sleep", ts_ms, convert("sleep", value, unit or "min"),
                       item, start)]
    if name == "blood-pressure":
        systolic, s_unit = _quantity(body, "systolic_blood_pressure")
        diastolic, d_unit = _quantity(body, "diastolic_blood_pressure")
        if {s_unit, d_unit} - {None, "mmHg"}:
            raise Unmappable(Reason.unit_mismatch, "body", "blood pressure must be in mmHg")
        return [Sample(user, device, "systolic_bp", start or ts_ms, systolic, item),
                Sample(user, device, "diastolic_bp", start or ts_ms, diastolic, item)]
    raise Unmappable(Reason.unsupported_type, "header.schema_id.name",
                     f"{name!r:.40} has no genki metric")


def parse(stream: BinaryIO, options: ImportOptions) -> Iterator[Item]:
    del options  # RFC 3339 times carry their offsets
    for entry in json_records(stream, as_list):
        if isinstance(entry, Unmapped):
            yield entry
            continue
        item, point = entry
        yield from mapped(item, point, partial(map_point, point, item))
