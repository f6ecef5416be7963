"""`genki import FORMAT PATH...`: vendor exports into the embedded log."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from engine.config import add_data_dir_arg, data_dir_of
from engine.devices import DEVICES_FILE_NAME, DeviceRegistry, operator_policy
from engine.devices.screen import enrolment_resolver
from engine.errors import UsageError
from engine.importers import FORMATS, ImportOptions, ImportResult, format_named, import_source
from engine.importers.core import LOCAL_OFFSET_DEFAULT, Resolver
from engine.ingest.log import LATE_WINDOW_DAYS_DEFAULT, EmbeddedLog, IngestCounts
from engine.ingest.reader import BATCH_LINES_MAX


@dataclass
class ImportSummary:
    """Source items read, samples mapped, and what the log did with the wire records
    (its counts include the items dead-lettered at the importer)."""

    items: int = 0
    samples: int = 0
    records: int = 0
    unmapped: int = 0
    log: IngestCounts = field(default_factory=IngestCounts)

    def as_dict(self) -> dict[str, Any]:
        return {"items": self.items, "samples": self.samples, "records": self.records,
                "unmapped": self.unmapped, **self.log.as_dict()}


def ingest_result(log: EmbeddedLog, result: ImportResult, source: str, now_ms: int,
                  summary: ImportSummary) -> None:
    """Wire records (in batches) and importer dead letters (with the first batch) into
    the log; dead letters carry the source item number as their offset."""
    rejected = [(u.item, u.reason, u.raw) for u in result.unmapped]
    summary.samples += result.samples
    summary.records += len(result.lines)
    summary.unmapped += len(rejected)
    for lo in range(0, max(len(result.lines), 1), BATCH_LINES_MAX):
        lines = result.lines[lo:lo + BATCH_LINES_MAX]
        offsets = result.line_items[lo:lo + BATCH_LINES_MAX]
        if not lines and not rejected:
            break
        summary.log.add(log.ingest_lines(lines, source, 1, now_ms, offsets=offsets,
                                         rejected_before=rejected))
        rejected = []


def _expand(paths: list[str]) -> list[Path]:
    """Files as given; a directory becomes its files (not hidden ones) in name order."""
    expanded: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            expanded.extend(p for p in sorted(path.iterdir())
                            if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            expanded.append(path)
        else:
            raise UsageError(f"no such file or directory: {text}")
    return expanded


def _ingest_part(log: EmbeddedLog, source: str, now_ms: int, summary: ImportSummary,
                 part: ImportResult) -> None:
    ingest_result(log, part, source, now_ms, summary)


def import_paths(log: EmbeddedLog, format_name: str, paths: list[str], options: ImportOptions,
                 now_ms: int | None = None, resolver: Resolver | None = None) -> ImportSummary:
    name = format_named(format_name)
    summary = ImportSummary()
    for path in _expand(paths):
        clock_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        source = f"import:{name}:{path.name}"
        with open(path, "rb") as stream:
            sink = partial(_ingest_part, log, source, clock_ms, summary)
            result = import_source(name, stream, options, resolver, sink=sink)
        summary.items += result.items
    return summary


def _cmd_import(args: argparse.Namespace) -> int:
    options = ImportOptions(user_id=args.user, device_id=args.device,
                            local_offset=args.tz_offset, units=args.units)
    format_named(args.format)
    data_dir = data_dir_of(args)
    resolver = None
    if (data_dir / DEVICES_FILE_NAME).exists():  # enrolled devices name their persons
        with DeviceRegistry.open(data_dir) as registry:
            resolver = enrolment_resolver(operator_policy(registry), options)
    with EmbeddedLog.open(data_dir, late_window_days=args.late_window_days) as log:
        summary = import_paths(log, args.format, args.paths, options, resolver=resolver)
    if args.json:
        sys.stdout.write(orjson.dumps(summary.as_dict()).decode() + "\n")
        return 0
    counts = summary.log
    print(f"read {summary.items:,} {args.format} items: {summary.samples:,} samples in "
          f"{summary.records:,} wire records, {summary.unmapped:,} items not mapped")
    print(f"log received {counts.received:,}: accepted {counts.accepted:,}, rejected "
          f"{counts.rejected:,}; samples stored {counts.accepted_samples:,}, duplicate "
          f"samples {counts.duplicate_samples:,}")
    for reason, count in sorted(counts.rejected_by_reason.items()):
        print(f"  rejected {reason}: {count:,}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import", help="map vendor exports (Apple Health, Health Connect, Google Fit, Fitbit, "
                       "Garmin, Open mHealth) to wire records and ingest them")
    parser.add_argument("format", help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("paths", nargs="+", help="export files, or directories of them")
    parser.add_argument("--user", default=None,
                        help="genki user id for every sample (formats without one need it)")
    parser.add_argument("--device", default=None, help="genki device id for every sample")
    parser.add_argument("--tz-offset", default=LOCAL_OFFSET_DEFAULT,
                        help="UTC offset of formats with local times only (Fitbit)")
    parser.add_argument("--units", default="metric", choices=("metric", "en_US", "en_GB"),
                        help="Fitbit's unit system (Accept-Language of the export request)")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.add_argument("--late-window-days", type=int, default=LATE_WINDOW_DAYS_DEFAULT)
    add_data_dir_arg(parser)
    parser.set_defaults(func=_cmd_import)
