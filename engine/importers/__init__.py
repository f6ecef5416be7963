"""Vendor importers: real export formats → genki wire records, or dead letters with reasons.

`import_source(format, stream, options)` maps one source; `genki import` and
the HTTP gateway (`POST /v1/ingest/{format}`, the Garmin-shaped push endpoint)
both call it and then take the wire records the same way as `genki ingest`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO

from engine.errors import UsageError
from engine.importers import android, apple, fitbit, garmin, omh
from engine.importers.core import (
    ImportOptions,
    ImportResult,
    Item,
    Resolver,
    SegmentBuilder,
    default_resolver,
    offset_of,
)

Parser = Callable[[BinaryIO, ImportOptions], Iterator[Item]]

FORMATS: dict[str, Parser] = {
    "apple": apple.parse,
    "health-connect": android.parse_health_connect,
    "google-fit": android.parse_google_fit,
    "fitbit": fitbit.parse,
    "garmin": garmin.parse,
    "omh": omh.parse,
}
FORMAT_ALIASES = {"apple-health": "apple", "healthkit": "apple", "open-mhealth": "omh",
                  "openmhealth": "omh", "googlefit": "google-fit",
                  "healthconnect": "health-connect", "garmin-health": "garmin"}


def format_named(name: str) -> str:
    spelled = name.strip().lower().replace("_", "-")
    canonical = FORMAT_ALIASES.get(spelled, spelled)
    if canonical not in FORMATS:
        raise UsageError(f"unknown import format {name!r}; one of {', '.join(FORMATS)}")
    return canonical


def check_options(options: ImportOptions) -> None:
    try:
        offset_of(options.local_offset)
    except ValueError as error:
        raise UsageError(f"--tz-offset: {error}") from None
    if options.units not in fitbit.WEIGHT_UNIT_BY_LOCALE:
        raise UsageError(f"--units {options.units!r}: one of "
                         f"{', '.join(fitbit.WEIGHT_UNIT_BY_LOCALE)}")


def import_source(format_name: str, stream: BinaryIO, options: ImportOptions,
                  resolver: Resolver | None = None,
                  sink: Callable[[ImportResult], None] | None = None) -> ImportResult:
    """Map one source (a file or a request body) to wire records and dead letters.

    With `sink`, results are handed over every SAMPLES_PER_FLUSH_MAX samples (and
    at the end) instead of being kept: memory stays bounded for huge exports.
    """
    name = format_named(format_name)
    check_options(options)
    builder = SegmentBuilder(name, resolver or default_resolver(options), sink)
    counter = _ItemCounter(FORMATS[name](stream, options))
    result = builder.add(counter)
    result.items = counter.items
    return result


class _ItemCounter:
    """Passes items through, noting the highest source item number (items count from 1)."""

    def __init__(self, items: Iterator[Item]) -> None:
        self._items = items
        self.items = 0

    def __iter__(self) -> Iterator[Item]:
        for entry in self._items:
            self.items = max(self.items, entry.item)
            yield entry


__all__ = ["FORMATS", "ImportOptions", "ImportResult", "format_named", "import_source"]
