"""`genki ingest` and `genki dlq`."""

from __future__ import annotations

import argparse
import base64
import sys

import orjson

from engine.config import add_data_dir_arg, data_dir_of
from engine.faults import crash_point
from engine.ingest.ahead import decoded_batches
from engine.ingest.log import LATE_WINDOW_DAYS_DEFAULT, EmbeddedLog, IngestCounts
from engine.ingest.reader import BATCH_LINES_DEFAULT, BATCH_LINES_MAX
from engine.progress import progress_bar


def ingest_paths(log: EmbeddedLog, paths: list[str], now_ms: int | None = None,
                 show_progress: bool = False, batch_lines: int = BATCH_LINES_DEFAULT,
                 ahead: bool | None = None) -> IngestCounts:
    """Ingest the paths batch by batch, the next batch decoded ahead while this one is
    stored when `ahead` (None: when that pays, see `decoded_batches`)."""
    total = IngestCounts()
    with progress_bar("ingest", enabled=show_progress) as advance:
        for batch, clock_ms, decoded in decoded_batches(paths, now_ms, batch_lines,
                                                        ahead):
            counts = log.ingest_lines(batch.lines, batch.source, batch.first_offset, clock_ms,
                                      offsets=batch.line_numbers, decoded=decoded)
            crash_point("ingest_after_batch")
            total.add(counts)
            advance(len(batch.lines), f"{total.accepted_samples:,} samples")
    return total


def _cmd_ingest(args: argparse.Namespace) -> int:
    with EmbeddedLog.open(data_dir_of(args), late_window_days=args.late_window_days,
                          recent=False) as log:
        counts = ingest_paths(log, args.paths, batch_lines=args.batch_lines,
                              show_progress=not args.json and sys.stderr.isatty())
    summary = counts.as_dict()
    if args.json:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    else:
        print(f"received {counts.received:,} records: accepted {counts.accepted:,}, "
              f"rejected {counts.rejected:,}; samples stored {counts.accepted_samples:,}, "
              f"duplicate samples {counts.duplicate_samples:,}")
        for reason, count in sorted(counts.rejected_by_reason.items()):
            print(f"  rejected {reason}: {count:,}")
    return 0


def _cmd_dlq(args: argparse.Namespace) -> int:
    with EmbeddedLog.open(data_dir_of(args), writer=False) as log:
        letters = log.dead_letters(limit=args.limit)
    if args.json:
        for letter in letters:
            wire = {"v": 1, "id": letter.id, "source": letter.source, "partition": letter.partition,
                    "offset": letter.offset, "reason": letter.reason,
                    "raw_b64": base64.b64encode(letter.raw).decode()}
            sys.stdout.write(orjson.dumps(wire).decode() + "\n")
        return 0
    for letter in letters:
        preview = letter.raw[:60].decode("utf-8", "replace")
        print(f"{letter.source}:{letter.offset}  {letter.reason}  | {preview}")
    print(f"{len(letters)} dead letters", file=sys.stderr)
    return 0


def _batch_lines(text: str) -> int:
    value = int(text)
    if not 1 <= value <= BATCH_LINES_MAX:
        raise argparse.ArgumentTypeError(f"1..{BATCH_LINES_MAX}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ingest", help="append NDJSON wire records to the embedded log")
    parser.add_argument("paths", nargs="+", help="files, directories (their *.ndjson) or - for stdin")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.add_argument("--late-window-days", type=int, default=LATE_WINDOW_DAYS_DEFAULT,
                        help="data older than this behind the user's newest data is rejected")
    parser.add_argument("--batch-lines", type=_batch_lines, default=BATCH_LINES_DEFAULT,
                        help=f"records per transaction (default {BATCH_LINES_DEFAULT:,}, "
                             f"max {BATCH_LINES_MAX:,})")
    add_data_dir_arg(parser)
    parser.set_defaults(func=_cmd_ingest)

    parser = subparsers.add_parser("dlq", help="list dead letters (rejected records) with reasons")
    parser.add_argument("--json", action="store_true", help="one DeadLetter wire record per line")
    parser.add_argument("--limit", type=int, default=None)
    add_data_dir_arg(parser)
    parser.set_defaults(func=_cmd_dlq)
