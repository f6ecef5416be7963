"""Fitbit Web API response bodies (one per file, a JSON array of them, or NDJSON).

Documents (dev.fitbit.com/build/reference/web-api/): "Get Activity Intraday by
Date" (`activities-steps-intraday`), "Get Heart Rate Intraday by Date"
(`activities-heart-intraday`, `restingHeartRate` in `activities-heart`), "Get
SpO2 Intraday by Date" (`minutes[].minute/value`), "Get Sleep Log by Date" v1.2
(`sleep[].startTime/endTime/minutesAsleep`), "Get Weight Logs"
(`weight[].date/time/weight`) and "Localization" (units follow the request's
Accept-Language: en_US pounds, en_GB stone, otherwise metric).

Every time in these bodies is the user's local time without an offset, so the
offset must be given (`--tz-offset`, default +09:00). A body names no person:
pass --user (or let device enrolment resolve the device). Items are dataset
points, sleep logs, weight logs and daily resting heart rates.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import replace
from functools import partial
from typing import Any, BinaryIO

from engine.errors import UsageError
from engine.importers.core import (
    ImportOptions,
    Item,
    Sample,
    Unmappable,
    Unmapped,
    as_list,
    convert,
    iso_ms,
    json_documents,
    mapped,
    number,
    offset_of,
    raw_of,
    unmapped,
)
from engine.ingest.reasons import Reason

DEVICE_ID = "fitbit"
WEIGHT_UNIT_BY_LOCALE = {"metric": "kg", "en_US": "lb", "en_GB": "st"}
INTERVAL_S_BY_DATASET_TYPE = {"second": 1, "minute": 60, "hour": 3600}
NOON_MS = 12 * 3_600_000


class _Items:
    def __init__(self) -> None:
        self.count = 0

    def next(self) -> int:
        self.count += 1
        return self.count


def _local_ms(date: str, time: str, local: dt.tzinfo, field_name: str) -> int:
    return iso_ms(f"{date}T{time}", local, field_name)


def _date_of(summary: object, field_name: str) -> str:
    if isinstance(summary, list) and summary and isinstance(summary[0], dict):
        date = summary[0].get("dateTime")
        if isinstance(date, str):
            return date
    raise Unmappable(Reason.missing_field, field_name, "dateTime of the day is required")


def _intraday(body: dict[str, Any], summary_key: str, intraday_key: str, metric: str,
              local: dt.tzinfo, items: _Items) -> Iterator[Item]:
    intraday = body[intraday_key]
    try:
        date = _date_of(body.get(summary_key), summary_key)
        interval_s = int(intraday.get("datasetInterval", 1)) * \
            INTERVAL_S_BY_DATASET_TYPE[str(intraday.get("datasetType", "minute"))]
        dataset = list(intraday.get("dataset", []))
    except (Unmappable, AttributeError, KeyError, TypeError, ValueError) as error:
        reason = getattr(error, "reason", f"bad_field: {intraday_key}: malformed ({error})")
        yield Unmapped(items.next(), reason, raw_of(intraday))
        return

    def sample(point: dict[str, Any], item: int) -> list[Sample]:
        start = _local_ms(date, str(point.get("time")), local, "time")
        value = number(point.get("value"), "value")
        if metric == "steps":
            return [Sample(None, DEVICE_ID, metric, start + interval_s * 1000, value, item,
                           start)]
        return [Sample(None, DEVICE_ID, metric, start, value, item)]

    for point in dataset:
        item = items.next()
        yield from mapped(item, point, partial(sample, point, item))


def _resting_sample(day: dict[str, Any], local: dt.tzinfo, item: int) -> list[Sample]:
    noon = _local_ms(str(day.get("dateTime")), "00:00:00", local, "dateTime") + NOON_MS
    return [Sample(None, DEVICE_ID, "resting_heart_rate", noon,
                   number(day["value"]["restingHeartRate"], "restingHeartRate"), item)]


def _resting(body: dict[str, Any], local: dt.tzinfo, items: _Items) -> Iterator[Item]:
    for day in as_list(body.get("activities-heart", [])):
        value = day.get("value") if isinstance(day, dict) else None
        if not isinstance(day, dict) or not isinstance(value, dict) \
                or "restingHeartRate" not in value:
            continue  # a day without a resting rate carries zones only
        item = items.next()
        yield from mapped(item, day, partial(_resting_sample, day, local, item))


def _spo2_sample(point: dict[str, Any], local: dt.tzinfo, item: int) -> list[Sample]:
    return [Sample(None, DEVICE_ID, "spo2", iso_ms(point.get("minute"), local, "minute"),
                   number(point.get("value"), "value"), item)]


def _sleep_sample(log: dict[str, Any], local: dt.tzinfo, item: int) -> list[Sample]:
    start = iso_ms(log.get("startTime"), local, "startTime")
    end = iso_ms(log.get("endTime"), local, "endTime")
    if end <= start:
        raise Unmappable(Reason.bad_field, "endTime", "not after startTime")
    return [Sample(None, DEVICE_ID, "sleep", end,
                   number(log.get("minutesAsleep"), "minutesAsleep"), item, start)]


def _weight_sample(log: dict[str, Any], local: dt.tzinfo, unit: str,
                   item: int) -> list[Sample]:
    ts_ms = _local_ms(str(log.get("date")), str(log.get("time", "23:59:59")), local, "date")
    kg = convert("body_weight", number(log.get("weight"), "weight"), unit)
    return [Sample(None, DEVICE_ID, "body_weight", ts_ms, round(kg, 6), item)]


def _each(body: dict[str, Any], key: str, make: Any, items: _Items) -> Iterator[Item]:
    for entry in as_list(body.get(key, [])):
        item = items.next()
        yield from mapped(item, entry, partial(make, entry, item=item))


def _one_body(body: object, local: dt.tzinfo, unit: str, items: _Items) -> Iterator[Item]:
    if not isinstance(body, dict):
        yield unmapped(items.next(), body, Reason.not_an_object, "body",
                       "expected a Fitbit Web API response object")
        return
    known = False
    if "activities-steps-intraday" in body:
        known = True
        yield from _intraday(body, "activities-steps", "activities-steps-intraday", "steps",
                             local, items)
    if "activities-heart" in body:
        known = True
        yield from _resting(body, local, items)
    if "activities-heart-intraday" in body:
        yield from _intraday(body, "activities-heart", "activities-heart-intraday",
                             "heart_rate", local, items)
    if "minutes" in body:
        known = True
        yield from _each(body, "minutes", partial(_spo2_sample, local=local), items)
    if "sleep" in body:
        known = True
        yield from _each(body, "sleep", partial(_sleep_sample, local=local), items)
    if "weight" in body:
        known = True
        yield from _each(body, "weight", partial(_weight_sample, local=local, unit=unit), items)
    if not known:
        yield unmapped(items.next(), body, Reason.unsupported_type, "body",
                       f"not a Fitbit response genki maps (keys {sorted(body)[:5]})")


def parse(stream: BinaryIO, options: ImportOptions) -> Iterator[Item]:
    local = offset_of(options.local_offset)
    unit = WEIGHT_UNIT_BY_LOCALE.get(options.units)
    if unit is None:
        raise UsageError(f"units {options.units!r}: one of {', '.join(WEIGHT_UNIT_BY_LOCALE)}")
    items = _Items()
    for document in json_documents(stream):
        if isinstance(document, Unmapped):
            yield replace(document, item=items.next())
            continue
        bodies = document if isinstance(document, list) else [document]
        for body in bodies:
            yield from _one_body(body, local, unit, items)
