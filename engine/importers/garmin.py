"""Garmin Health API push summaries: `{"dailies": [...], "epochs": [...], ...}`.

Document: Garmin Connect Developer Program, Health API specification (v1.2.x),
"Summary Data": Daily, Epoch, Sleep, Pulse Ox and Body Composition summaries,
as pushed to a partner's endpoint (one POST holds a list per summary type).
Times are UTC epoch seconds (`startTimeInSeconds`); `startTimeOffsetInSeconds`
is the wearer's local offset, for display only, and is not added.

Mapping (items are summaries):
* epochs: steps over [start, start + duration) (15-minute detail);
* dailies: resting heart rate at local noon of the day, and the heart-rate
  samples of `timeOffsetHeartRateSamples`. The daily step total is *not*
  imported: Garmin re-sends dailies with growing totals during the day and the
  epochs already carry those steps, so importing both would count them twice;
* sleeps: deep + light + REM seconds as minutes asleep over the sleep window;
* pulseox: `timeOffsetSpo2Values` as SpO2 samples;
* bodyComps: `weightInGrams` as kg at `measurementTimeInSeconds`.
Other summary types are dead-lettered `unsupported_type`. The summary's
`userId` (Garmin's account id) is the source person and, prefixed, the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, BinaryIO

from engine.importers.core import (
    ImportOptions,
    Item,
    Sample,
    Unmappable,
    Unmapped,
    as_list,
    epoch_s_ms,
    id_text,
    json_records,
    mapped,
    number,
)
from engine.ingest.reasons import Reason

DEVICE_PREFIX = "garmin:"
NOON_S = 12 * 3600


def _offsets(summary: dict[str, Any], key: str) -> list[tuple[int, Any]]:
    values = summary.get(key) or {}
    if not isinstance(values, dict):
        raise Unmappable(Reason.bad_field, key, "expected an object of offset seconds → value")
    try:
        return sorted((int(offset), value) for offset, value in values.items())
    except ValueError:
        raise Unmappable(Reason.bad_field, key, "keys must be offsets in seconds") from None


def _epoch(s: dict[str, Any], user: str, device: str, item: int) -> list[Sample]:
    start = epoch_s_ms(s.get("startTimeInSeconds"), "startTimeInSeconds")
    duration_ms = int(number(s.get("durationInSeconds"), "durationInSeconds") * 1000)
    return [Sample(user, device, "steps", start + duration_ms,
                   number(s.get("steps", 0), "steps"), item, start)]


def _daily(s: dict[str, Any], user: str, device: str, item: int) -> list[Sample]:
    start = epoch_s_ms(s.get("startTimeInSeconds"), "startTimeInSeconds")
    samples = [Sample(user, device, "heart_rate", start + offset * 1000,
                      number(bpm, "timeOffsetHeartRateSamples"), item)
               for offset, bpm in _offsets(s, "timeOffsetHeartRateSamples")]
    if s.get("restingHeartRateInBeatsPerMinute") is not None:
        samples.append(Sample(user, device, "resting_heart_rate", start + NOON_S * 1000,
                              number(s["restingHeartRateInBeatsPerMinute"],
                                     "restingHeartRateInBeatsPerMinute"), item))
    return samples


def _sleep(s: dict[str, Any], user: str, device: str, item: int) -> list[Sample]:
    start = epoch_s_ms(s.get("startTimeInSeconds"), "startTimeInSeconds")
    duration_ms = int(number(s.get("durationInSeconds"), "durationInSeconds") * 1000)
    asleep_s = sum(number(s.get(key, 0), key) for key in (
        "deepSleepDurationInSeconds", "lightSleepDurationInSeconds", "remSleepInSeconds"))
    if duration_ms <= 0:
        raise Unmappable(Reason.bad_field, "durationInSeconds", "must be positive")
    return [Sample(user, device, "sleep", start + duration_ms, asleep_s / 60, item, start)]


def _pulse_ox(s: dict[str, Any], user: str, device: str, item: int) -> list[Sample]:
    start = epoch_s_ms(s.get("startTimeInSeconds"), "startTimeInSeconds")
    return [Sample(user, device, "spo2", start + offset * 1000,
                   number(value, "timeOffsetSpo2Values"), item)
            for offset, value in _offsets(s, "timeOffsetSpo2Values")]


def _body_comp(s: dict[str, Any], user: str, device: str, item: int) -> list[Sample]:
    ts_ms = epoch_s_ms(s.get("measurementTimeInSeconds"), "measurementTimeInSeconds")
    if s.get("weightInGrams") is None:
        raise Unmappable(Reason.missing_field, "weightInGrams", "no weight in this summary")
    return [Sample(user, device, "body_weight", ts_ms,
                   round(number(s["weightInGrams"], "weightInGrams") / 1000, 6), item)]


SUMMARY_MAPPERS: dict[str, Callable[[dict[str, Any], str, str, int], list[Sample]]] = {
    "epochs": _epoch, "dailies": _daily, "sleeps": _sleep, "pulseox": _pulse_ox,
    "bodyComps": _body_comp,
}


def map_summary(kind: str, summary: object, item: int) -> list[Sample]:
    if not isinstance(summary, dict):
        raise Unmappable(Reason.not_an_object, kind, "a summary must be a JSON object")
    mapper = SUMMARY_MAPPERS.get(kind)
    if mapper is None:
        raise Unmappable(Reason.unsupported_type, kind, f"Garmin {kind:.40} summaries have no "
                         "genki metric")
    user = summary.get("userId")
    if not isinstance(user, str) or not user:
        raise Unmappable(Reason.missing_field, "userId", "required")
    return mapper(summary, user, id_text(user, DEVICE_PREFIX), item)


def _summaries(document: object) -> list[object]:
    """Each summary of a push body with its summary type."""
    if not isinstance(document, dict):
        raise Unmappable(Reason.not_an_object, "body", "expected {summary type: [summaries]}")
    return [(kind, summary) for kind, summaries in document.items()
            for summary in as_list(summaries)]


def parse(stream: BinaryIO, options: ImportOptions) -> Iterator[Item]:
    del options  # times are UTC epoch seconds
    for entry in json_records(stream, _summaries):
        if isinstance(entry, Unmapped):
            yield entry
            continue
        item, (kind, summary) = entry
        yield from mapped(item, summary, partial(map_summary, kind, summary, item))
