"""Android: Health Connect records and Google Fit (Takeout) data points.

Health Connect. Document: Android Developers, Jetpack reference
`androidx.health.connect.client.records` (StepsRecord, HeartRateRecord,
RestingHeartRateRecord, OxygenSaturationRecord, WeightRecord,
SleepSessionRecord with `SleepSessionRecord.STAGE_TYPE_*`, SpeedRecord) and
`units` (Mass.inKilograms/inPounds, Percentage.value). Health Connect has no
file format of its own; a source is JSON `{"records": [...]}` (or a list) of
records with `recordType` set to the class name and the class's properties,
times as ISO instants and `*ZoneOffset` beside them (display only: the
instant is the truth), as a reader app serialises them.

Google Fit. Document: Google Fit REST API "Data types" (com.google.step_count.delta,
com.google.heart_rate.bpm, com.google.weight, com.google.oxygen_saturation,
com.google.sleep.segment) and Google Takeout's Fit "All Data" JSON
(`{"Data Source", "Data Points": [{dataTypeName, startTimeNanos, endTimeNanos,
fitValue: [{value: {intVal | fpVal}}], originDataSourceId}]}`).

Speed (SpeedRecord, com.google.speed) is of any activity, not gait speed, so it
is dead-lettered `unsupported_type`.
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
    id_text,
    iso_ms,
    json_records,
    mapped,
    number,
)
from engine.ingest.reasons import Reason
from engine.schemas import TS_MS_MIN

HC_DEVICE_PREFIX = "hc:"
FIT_DEVICE_PREFIX = "gfit:"
# SleepSessionRecord.STAGE_TYPE_* and com.google.sleep.segment share these numbers.
ASLEEP_STAGES = frozenset((2, 4, 5, 6))  # sleeping, light, deep, REM
NS_PER_MS = 1_000_000


def _instant(record: dict[str, Any], key: str) -> int:
    return iso_ms(record.get(key), None, key)


def _hc_device(record: dict[str, Any]) -> str:
    metadata = record.get("metadata") or {}
    device = metadata.get("device") or {}
    origin = (metadata.get("dataOrigin") or {}).get("packageName")
    if device.get("model"):
        return id_text(f"{device.get('manufacturer', '')}-{device['model']}", HC_DEVICE_PREFIX)
    return id_text(str(origin or "unknown"), HC_DEVICE_PREFIX)


def _kilograms(mass: object) -> float:
    if isinstance(mass, dict):
        if "inKilograms" in mass:
            return number(mass["inKilograms"], "weight.inKilograms")
        if "inGrams" in mass:
            return number(mass["inGrams"], "weight.inGrams") / 1000
        if "inPounds" in mass:
            return number(mass["inPounds"], "weight.inPounds") * 0.45359237
    raise Unmappable(Reason.unit_mismatch, "weight", "expected inKilograms, inGrams or inPounds")


def _hc_sleep(record: dict[str, Any], device: str, item: int) -> list[Sample]:
    start, end = _instant(record, "startTime"), _instant(record, "endTime")
    stages = record.get("stages") or []
    if not stages:  # a session without stages: asleep throughout
        return [Sample(None, device, "sleep", end, (end - start) / 60_000, item, start)]
    samples = []
    for stage in stages:
        if stage.get("stage") in ASLEEP_STAGES:
            s, e = _instant(stage, "startTime"), _instant(stage, "endTime")
            samples.append(Sample(None, device, "sleep", e, (e - s) / 60_000, item, s))
    return samples


def map_hc_record(record: object, item: int) -> list[Sample]:
    if not isinstance(record, dict):
        raise Unmappable(Reason.not_an_object, "record", "a record is a JSON object")
    kind = record.get("recordType")
    device = _hc_device(record)
    if kind == "StepsRecord":
        start = _instant(record, "startTime")
        return [Sample(None, device, "steps", _instant(record, "endTime"),
                       number(record.get("count"), "count"), item, start)]
    if kind == "HeartRateRecord":
        return [Sample(None, device, "heart_rate", _instant(s, "time"),
                       number(s.get("beatsPerMinute"), "beatsPerMinute"), item)
                for s in record.get("samples") or []]
    if kind == "RestingHeartRateRecord":
        return [Sample(None, device, "resting_heart_rate", _instant(record, "time"),
                       number(record.get("beatsPerMinute"), "beatsPerMinute"), item)]
    if kind == "OxygenSaturationRecord":
        percentage = record.get("percentage")
        value = percentage.get("value") if isinstance(percentage, dict) else percentage
        return [Sample(None, device, "spo2", _instant(record, "time"),
                       number(value, "percentage"), item)]
    if kind == "WeightRecord":
        return [Sample(None, device, "body_weight", _instant(record, "time"),
                       round(_kilograms(record.get("weight")), 6), item)]
    if kind == "SleepSessionRecord":
        return _hc_sleep(record, device, item)
    raise Unmappable(Reason.unsupported_type, "recordType", f"{kind!r:.40} has no genki metric"
                     + (" (speed of any activity is not gait speed)"
                        if kind == "SpeedRecord" else ""))


def _hc_records(document: object) -> list[object]:
    records = document.get("records") if isinstance(document, dict) \
        and "records" in document else document
    return as_list(records)


def parse_health_connect(stream: BinaryIO, options: ImportOptions) -> Iterator[Item]:
    del options
    for entry in json_records(stream, _hc_records):
        if isinstance(entry, Unmapped):
            yield entry
            continue
        item, record = entry
        yield from mapped(item, record, partial(map_hc_record, record, item))


# -- Google Fit --------------------------------------------------------------------------

FIT_TYPES = {"com.google.step_count.delta": "steps", "com.google.heart_rate.bpm": "heart_rate",
             "com.google.weight": "body_weight", "com.google.oxygen_saturation": "spo2",
             "com.google.sleep.segment": "sleep"}


def _nanos_ms(point: dict[str, Any], key: str) -> int:
    value = point.get(key)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or value // NS_PER_MS < TS_MS_MIN:
        raise Unmappable(Reason.bad_field if not isinstance(value, int)
                         else Reason.too_old_timestamp, key,
                         f"{value!r:.30}: expected epoch nanoseconds after 2020-01-01")
    return value // NS_PER_MS


def _fit_value(point: dict[str, Any]) -> float:
    values = point.get("fitValue") or []
    value = values[0].get("value", {}) if values and isinstance(values[0], dict) else {}
    for key in ("intVal", "fpVal"):
        if key in value:
            return number(value[key], f"fitValue[0].value.{key}")
    raise Unmappable(Reason.missing_field, "fitValue[0].value", "intVal or fpVal required")


def _fit_device(data_source_id: str) -> str:
    """"raw:<type>:<manufacturer>:<model>:<uid>:<stream>" names a device; a shorter id
    ("raw:<type>:<package>:<stream>") names the app that wrote the data."""
    parts = data_source_id.split(":")
    if len(parts) >= 6:
        return id_text("-".join(parts[2:5]), FIT_DEVICE_PREFIX)
    return id_text(parts[2] if len(parts) >= 3 else data_source_id, FIT_DEVICE_PREFIX)


def map_fit_point(point: object, source: str, item: int) -> list[Sample]:
    if not isinstance(point, dict):
        raise Unmappable(Reason.not_an_object, "record", "a data point is a JSON object")
    kind = str(point.get("dataTypeName"))
    metric = FIT_TYPES.get(kind)
    if metric is None:
        raise Unmappable(Reason.unsupported_type, "dataTypeName",
                         f"{kind:.60} has no genki metric")
    device = _fit_device(str(point.get("originDataSourceId") or source))
    start, end = _nanos_ms(point, "startTimeNanos"), _nanos_ms(point, "endTimeNanos")
    value = _fit_value(point)
    if metric == "steps":
        return [Sample(None, device, metric, end, value, item, start)]
    if metric == "sleep":
        if int(value) not in ASLEEP_STAGES:
            raise Unmappable(Reason.unsupported_type, "fitValue", f"sleep stage {int(value)} "
                             "is not time asleep (awake or out of bed)")
        return [Sample(None, device, metric, end, (end - start) / 60_000, item, start)]
    return [Sample(None, device, metric, start, round(value, 6), item)]


def _fit_points(document: object) -> list[object]:
    """The data points of a Takeout Fit file, each with the file's data source."""
    if not isinstance(document, dict) or not isinstance(document.get("Data Points"), list):
        raise Unmappable(Reason.missing_field, "Data Points",
                         "expected a Takeout Fit data source file")
    source = str(document.get("Data Source", "unknown"))
    return [(point, source) for point in document["Data Points"]]


def parse_google_fit(stream: BinaryIO, options: ImportOptions) -> Iterator[Item]:
    del options  # nanosecond epoch times
    for entry in json_records(stream, _fit_points):
        if isinstance(entry, Unmapped):
            yield entry
            continue
        item, (point, source) = entry
        yield from mapped(item, point, partial(map_fit_point, point, source, item))
