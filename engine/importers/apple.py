"""Apple Health `export.xml` (Health app → Export All Health Data), streamed; or the
`export.zip` it comes in (its `apple_health_export/export.xml` member, streamed).

Documents: Apple Developer, HealthKit `HKQuantityTypeIdentifier` and
`HKCategoryValueSleepAnalysis`; the export's DTD (`<!ATTLIST Record type unit
value sourceName device creationDate startDate endDate>`) at the top of every
export.xml. Dates are local with an offset ("2024-05-01 08:00:00 +0900").
Oxygen saturation is exported with unit "%" but as a fraction (0.97).

The file can be gigabytes: it is read with `iterparse` and every top-level
element is cleared once handled, so memory does not grow with the file.
Items are the `Record` elements (a Correlation's nested records included:
they repeat top-level records and dedup as duplicates).
"""

from __future__ import annotations

import datetime as dt
import re
import zipfile
from collections.abc import Iterator
from functools import lru_cache
from typing import IO, BinaryIO
from xml.etree.ElementTree import Element, ParseError, iterparse, tostring

from engine.importers.core import (
    ImportOptions,
    Item,
    Sample,
    Unmappable,
    Unmapped,
    convert,
    id_text,
    number,
    raw_of,
    unmapped,
)
from engine.ingest.reasons import Reason
from engine.schemas import TS_MS_MIN

_APPLE_DATE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} [+-]\d{4}")
EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
DAYS_CACHED_MAX = 4_096
ZIP_MAGIC = b"PK\x03\x04"
EXPORT_MEMBER = "export.xml"  # apple_health_export/export.xml inside export.zip
DEVICE_PREFIX = "apple:"

# Apple type → (genki metric, the date that stamps the sample)
QUANTITY_TYPES: dict[str, tuple[str, str]] = {
    "HKQuantityTypeIdentifierStepCount": ("steps", "endDate"),
    "HKQuantityTypeIdentifierHeartRate": ("heart_rate", "startDate"),
    "HKQuantityTypeIdentifierRestingHeartRate": ("resting_heart_rate", "startDate"),
    "HKQuantityTypeIdentifierOxygenSaturation": ("spo2", "startDate"),
    "HKQuantityTypeIdentifierWalkingSpeed": ("gait_speed", "startDate"),
    "HKQuantityTypeIdentifierBodyMass": ("body_weight", "startDate"),
    "HKQuantityTypeIdentifierBloodPressureSystolic": ("systolic_bp", "startDate"),
    "HKQuantityTypeIdentifierBloodPressureDiastolic": ("diastolic_bp", "startDate"),
}
SLEEP_TYPE = "HKCategoryTypeIdentifierSleepAnalysis"
ASLEEP_VALUES = frozenset((
    "HKCategoryValueSleepAnalysisAsleep",  # before iOS 16
    "HKCategoryValueSleepAnalysisAsleepUnspecified",
    "HKCategoryValueSleepAnalysisAsleepCore",
    "HKCategoryValueSleepAnalysisAsleepDeep",
    "HKCategoryValueSleepAnalysisAsleepREM",
))


@lru_cache(maxsize=DAYS_CACHED_MAX)
def _day_start_s(date_text: str) -> int:
    """Seconds from the epoch to UTC midnight of a calendar date (ValueError if invalid)."""
    return (dt.date.fromisoformat(date_text).toordinal() - EPOCH_ORDINAL) * 86_400


def apple_ms(text: str | None, field_name: str) -> int:
    """Epoch ms of "YYYY-MM-DD HH:MM:SS +HHMM" (strptime costs 40x more per record)."""
    if text is None:
        raise Unmappable(Reason.missing_field, field_name, "required")
    match = _APPLE_DATE.fullmatch(text)
    try:
        if match is None:
            raise ValueError(text)
        hour, minute, second = int(text[11:13]), int(text[14:16]), int(text[17:19])
        offset_min = int(text[21:23]) * 60 + int(text[23:25])
        if hour > 23 or minute > 59 or second > 59 or offset_min > 24 * 60:
            raise ValueError(text)
        local_s = _day_start_s(text[:10]) + hour * 3600 + minute * 60 + second
    except ValueError:
        raise Unmappable(Reason.bad_field, field_name,
                         f"{text!r:.40} is not 'YYYY-MM-DD HH:MM:SS +HHMM'") from None
    ts_ms = (local_s - (offset_min if text[20] == "+" else -offset_min) * 60) * 1000
    if ts_ms < TS_MS_MIN:
        raise Unmappable(Reason.too_old_timestamp, field_name, f"{text} is before 2020-01-01")
    return ts_ms


def map_record(attrs: dict[str, str], item: int) -> Sample:
    kind = attrs.get("type", "")
    device = id_text(attrs.get("sourceName", "unknown"), DEVICE_PREFIX)
    if kind == SLEEP_TYPE:
        stage = attrs.get("value", "")
        if stage not in ASLEEP_VALUES:
            raise Unmappable(Reason.unsupported_type, "value",
                             f"{stage:.60} is not time asleep (in bed or awake)")
        start, end = apple_ms(attrs.get("startDate"), "startDate"), \
            apple_ms(attrs.get("endDate"), "endDate")
        if end <= start:
            raise Unmappable(Reason.bad_field, "endDate", "not after startDate")
        return Sample(None, device, "sleep", end, (end - start) / 60_000, item, start)
    mapping = QUANTITY_TYPES.get(kind)
    if mapping is None:
        raise Unmappable(Reason.unsupported_type, "type", f"{kind:.80} has no genki metric")
    metric, stamp = mapping
    value = number(attrs.get("value"), "value")
    unit = attrs.get("unit", "")
    if metric == "spo2":
        if unit != "%":
            raise Unmappable(Reason.unit_mismatch, "unit", f"{unit!r:.20} for oxygen "
                             "saturation (expects '%' holding a fraction)")
        value *= 100.0  # Apple's "%" holds a fraction: 0.97 is 97 %
    elif metric in ("systolic_bp", "diastolic_bp"):
        if unit != "mmHg":
            raise Unmappable(Reason.unit_mismatch, "unit", f"{unit!r:.20} is not mmHg")
    else:
        value = convert(metric, value, unit)
    ts_ms = apple_ms(attrs.get(stamp), stamp)
    if metric != "steps":
        return Sample(None, device, metric, ts_ms, round(value, 6), item)
    start = apple_ms(attrs.get("startDate"), "startDate")
    if start > ts_ms:
        raise Unmappable(Reason.bad_field, "endDate", "before startDate")
    return Sample(None, device, metric, ts_ms, round(value, 6), item, start)


def parse(stream: BinaryIO, options: ImportOptions) -> Iterator[Item]:
    """export.xml, or the export.zip the Health app writes (its export.xml member)."""
    del options  # every date in the export carries its own offset
    if stream.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
        stream.seek(0)
        yield from _parse_xml(stream)
        return
    stream.seek(0)
    try:
        archive = zipfile.ZipFile(stream)
    except zipfile.BadZipFile as error:
        yield unmapped(1, b"", Reason.invalid_source, "zip", f"not a readable zip: {error}")
        return
    with archive:
        members = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == EXPORT_MEMBER]
        if not members:
            yield unmapped(1, b"", Reason.invalid_source, "zip",
                           f"no {EXPORT_MEMBER} in the archive")
            return
        with archive.open(members[0]) as member:
            yield from _parse_xml(member)


def _parse_xml(stream: BinaryIO | IO[bytes]) -> Iterator[Item]:
    depth = 0
    root: Element | None = None
    item = 0
    try:
        for event, element in iterparse(stream, events=("start", "end")):
            if event == "start":
                if root is None:
                    root = element
                depth += 1
                continue
            depth -= 1
            if element.tag == "Record":
                item += 1
                try:
                    yield map_record(dict(element.attrib), item)
                except Unmappable as error:
                    yield unmapped_element(item, element, error)
            if depth == 1 and root is not None:
                root.clear()  # drop handled top-level elements: constant memory
    except ParseError as error:
        yield unmapped(item + 1, b"", Reason.invalid_source, "xml",
                       f"not well-formed XML: {error}")


def unmapped_element(item: int, element: Element, error: Unmappable) -> Unmapped:
    return Unmapped(item, error.reason, raw_of(tostring(element, encoding="utf-8")))
