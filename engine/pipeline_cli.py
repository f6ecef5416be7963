"""`genki run` and `genki flags` (the care-prevention team's risk list)."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from engine.config import add_data_dir_arg, data_dir_of
from engine.errors import UsageError
from engine.pipeline import LOG_RECORDS_PER_CHUNK, run_pipeline
from engine.progress import progress_bar
from engine.rules.flags import FRAILTY_STATUSES
from engine.rules.risk import RiskRow, SeverityBook, load_questionnaire, risk_rows

RISK_LIST_ROWS_DEFAULT = 50


def _cmd_run(args: argparse.Namespace) -> int:
    show = not args.json and sys.stderr.isatty()
    with progress_bar("rules", enabled=show) as advance:
        summary = run_pipeline(data_dir_of(args), args.rules, chunk_records=args.chunk_records,
                               on_chunk=lambda n, s: advance(n, f"{s:,} samples"))
    if args.json:
        sys.stdout.write(orjson.dumps(summary.as_dict()).decode() + "\n")
    else:
        print(f"processed log positions {summary.position_before:,} → {summary.position_after:,}: "
              f"{summary.samples:,} samples, {summary.activities:,} activities → "
              f"{summary.awards_appended:,} awards ({summary.points_awarded:,} points), "
              f"flags raised {summary.flags_raised}, cleared {summary.flags_cleared} "
              f"in {summary.seconds} s (rules {summary.rules_version})")
    return 0


def risk_list(data_dir: Path, day: str | None = None,
              questionnaire: Path | None = None) -> list[RiskRow]:
    """People with raised flags: frail, pre-frail, then robust (revised J-CHS criteria
    wearables measure), most severe first within each (severity = sum of the flags'
    weights, from the rules that built the ledger). With questionnaire answers
    (engine.rules.risk.load_questionnaire) exhaustion and weakness count as criteria."""
    from engine.ledger import Ledger

    answers = load_questionnaire(questionnaire) if questionnaire is not None else None
    with Ledger.open(data_dir) as ledger:
        flags = ledger.current_flags(day)
        book = SeverityBook(ledger.get_meta)
    return risk_rows(flags, book, answers)


def _evidence_text(evidence: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(evidence.items()))


def print_risk_list(data_dir: Path, console: Console, limit: int, day: str | None = None,
                    questionnaire: Path | None = None) -> None:
    rows = risk_list(data_dir, day, questionnaire)
    counts = {status: sum(r.frailty_status == status for r in rows) for status in FRAILTY_STATUSES}
    table = Table(title=f"frailty risk list: {len(rows)} people with raised flags "
                        f"({', '.join(f'{n} {s}' for s, n in counts.items())})"
                        + (f" (top {limit})" if len(rows) > limit else ""))
    for column in ("user", "status", "severity", "flag", "since", "evidence"):
        table.add_column(column)
    for row in rows[:limit]:
        for i, flag in enumerate(row.flags):
            table.add_row(row.user_id if i == 0 else "", row.frailty_status if i == 0 else "",
                          str(row.severity) if i == 0 else "",
                          flag.flag, flag.since, _evidence_text(flag.evidence))
    console.print(table)


def _cmd_flags(args: argparse.Namespace) -> int:
    if getattr(args, "flags_command", None) == "evaluate":
        return _cmd_flags_evaluate(args)
    data_dir = data_dir_of(args)
    if args.json:
        for row in risk_list(data_dir, args.day, args.questionnaire):
            sys.stdout.write(orjson.dumps(row.as_dict()).decode() + "\n")
    elif args.csv:
        writer = csv.writer(sys.stdout)
        writer.writerow(["user_id", "severity", "flag", "since", "evidence", "frailty_status"])
        for row in risk_list(data_dir, args.day, args.questionnaire):
            for flag in row.flags:
                writer.writerow([row.user_id, row.severity, flag.flag, flag.since,
                                 _evidence_text(flag.evidence), row.frailty_status])
    else:
        print_risk_list(data_dir, Console(width=None if sys.stdout.isatty() else 120), args.limit,
                        args.day, args.questionnaire)
    return 0


def _cmd_flags_evaluate(args: argparse.Namespace) -> int:
    """Score the ledger's flag events against a simulation's ground truth."""
    from engine.ledger import Ledger
    from engine.sim.truth import FlagChange, format_table, score_manifest

    try:
        manifest = orjson.loads(args.truth.read_bytes())
    except (OSError, orjson.JSONDecodeError) as error:
        raise UsageError(f"flags evaluate: cannot read --truth {args.truth}: {error}") from None
    with Ledger.open(data_dir_of(args)) as ledger:
        changes = [FlagChange(e.user_id, e.flag.value, e.state.value, e.day)
                   for e in ledger.all_flag_events()]
    scores = score_manifest(changes, manifest)
    if args.json:
        sys.stdout.write(orjson.dumps({"scores": [s.as_dict() for s in scores]}).decode() + "\n")
    else:
        print(format_table(scores))
    return 0


def status(data_dir: Path) -> dict[str, object]:
    """What an operator checks first: how far the log is, how far the ledger has got."""
    from engine.ingest.log import LOG_FILE_NAME, EmbeddedLog
    from engine.ledger import LEDGER_FILE_NAME, Ledger
    from engine.pipeline import META_LOG_POSITION, META_RULES_VERSION

    result: dict[str, object] = {"data_dir": str(data_dir)}
    if (data_dir / LOG_FILE_NAME).exists():
        with EmbeddedLog.open(data_dir, writer=False) as log:
            counts = log.counters()
            result["log_position"] = log.position()
            result["received"], result["accepted"] = counts.received, counts.accepted
            result["rejected"], result["samples_stored"] = counts.rejected, counts.accepted_samples
            result["rejected_by_reason"] = dict(sorted(counts.rejected_by_reason.items()))
            result["by_key"] = log.counts_by_key()  # provenance: who submitted what
            result.update(log.archive_summary())  # hot vs archived records
    if (data_dir / LEDGER_FILE_NAME).exists():
        with Ledger.open(data_dir) as ledger:
            result["processed_position"] = int(ledger.get_meta(META_LOG_POSITION) or 0)
            result["rules_version"] = ledger.get_meta(META_RULES_VERSION)
            result["ledger_entries"] = ledger.head_seq()
    log_position = int(result.get("log_position", 0))  # type: ignore[call-overload]
    processed = int(result.get("processed_position", 0))  # type: ignore[call-overload]
    result["pending_records"] = max(0, log_position - processed)
    return result


def archive(data_dir: Path, before: str) -> dict[str, object]:
    """Move log records older than `before` that no rule and no dedup window needs any
    more to Parquet in the data directory (engine.ingest.archive)."""
    from engine.clock import iso_to_day
    from engine.errors import UsageError
    from engine.ingest.log import EmbeddedLog
    from engine.ledger import Ledger
    from engine.pipeline import META_LOG_POSITION

    try:
        before_day = iso_to_day(before)
    except ValueError as error:
        raise UsageError(f"--before: a day as YYYY-MM-DD, not {before!r}") from error
    with Ledger.open(data_dir) as ledger:
        processed = int(ledger.get_meta(META_LOG_POSITION) or 0)
    with EmbeddedLog.open(data_dir) as log:
        done = log.archive(before_day, processed)
        summary = log.archive_summary()
    return {"archived_sample_records": done.sample_records,
            "archived_activity_records": done.activity_records, **summary}


def _cmd_archive(args: argparse.Namespace) -> int:
    result = archive(data_dir_of(args), args.before)
    if args.json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    else:
        print(f"archived {result['archived_sample_records']:,} sample and "
              f"{result['archived_activity_records']:,} activity records; log positions up to "
              f"{result['archived_through']:,} are in the archive ({result['archived_records']:,}"
              f" records, {result['archive_bytes']:,} bytes), {result['hot_records']:,} hot")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    result = status(data_dir_of(args))
    if args.json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        return 0
    by_key = result.pop("by_key", {})
    for key, value in result.items():
        print(f"{key:>20}: {value:,}" if isinstance(value, int) else f"{key:>20}: {value}")
    for key_id, counts in by_key.items():  # type: ignore[attr-defined]
        print(f"{'key ' + key_id:>20}: " + ", ".join(f"{n} {v:,}" for n, v in counts.items()))
    if result["pending_records"]:
        print("  run `genki run` to process the pending records")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("status", help="log and ledger positions, pending work, dead letters")
    parser.add_argument("--json", action="store_true")
    add_data_dir_arg(parser)
    parser.set_defaults(func=_cmd_status)

    parser = subparsers.add_parser(
        "archive", help="move old log records no rule or dedup window needs to Parquet")
    parser.add_argument("--before", required=True,
                        help="archive records of data before this Tokyo day (YYYY-MM-DD)")
    parser.add_argument("--json", action="store_true")
    add_data_dir_arg(parser)
    parser.set_defaults(func=_cmd_archive)

    parser = subparsers.add_parser("run", help="process everything pending through the rules into the ledger")
    parser.add_argument("--rules", type=Path, default=None, help="rules TOML (default rules/default.toml)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--chunk-records", type=int, default=LOG_RECORDS_PER_CHUNK,
                        help="log records per ledger transaction")
    add_data_dir_arg(parser)
    parser.set_defaults(func=_cmd_run)

    parser = subparsers.add_parser("flags", help="current frailty-risk list with evidence, most severe first")
    parser.add_argument("--day", default=None, help="risk list as of this day (YYYY-MM-DD)")
    parser.add_argument("--json", action="store_true", help="one JSON object per person")
    parser.add_argument("--csv", action="store_true", help="CSV for outreach lists")
    parser.add_argument("--limit", type=int, default=RISK_LIST_ROWS_DEFAULT)
    parser.add_argument("--questionnaire", type=Path, default=None,
                        help="CSV user_id,exhaustion,weakness (J-CHS items a watch cannot "
                             "measure) counted into the frailty status")
    add_data_dir_arg(parser)
    parser.set_defaults(func=_cmd_flags)
    commands = parser.add_subparsers(dest="flags_command", metavar="{evaluate}")
    evaluate = commands.add_parser(
        "evaluate", help="recall, precision, alert burden and time to detection of the "
                         "ledger's flags against a simulation's ground truth")
    evaluate.add_argument("--truth", type=Path, required=True,
                          help="manifest.json of the simulation (its ground_truth)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS,
                          help="data directory (as for genki flags)")
