"""`genki replay`: pseudonymised Parquet for researchers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from engine.config import add_data_dir_arg, data_dir_of
from engine.errors import UsageError
from engine.kafka.client import add_security_args
from engine.progress import progress_bar
from replay.anonymise import BIRTH_YEAR_BAND_YEARS_DEFAULT, K_DEFAULT, TIME_UNIT_MS


def _cmd_replay(args: argparse.Namespace) -> int:
    from replay.anonymise import ExportPolicy
    from replay.export import export_embedded

    if args.pseudonym_key_file is None:
        raise UsageError("replay: --pseudonym-key-file is required (a secret of at least 16 bytes; "
                         "the same key gives the same pseudonyms)")
    key = args.pseudonym_key_file.read_bytes().strip()
    policy = ExportPolicy(k=args.k, samples_time=args.samples_time,
                          activities_time=args.activities_time, ledger_time=args.ledger_time,
                          birth_year_band_years=args.birth_year_band_years)
    with progress_bar("replay", enabled=sys.stderr.isatty() and not args.json) as advance:
        if args.source == "kafka":
            from replay.kafka_source import export_kafka

            if not args.bootstrap:
                raise UsageError("replay: --source kafka needs --bootstrap HOST:PORT")
            manifest = export_kafka(args.bootstrap, args.to, key, prefix=args.topic_prefix,
                                    since=args.since, until=args.until,
                                    tick=lambda n: advance(n, ""), policy=policy)
        else:
            manifest = export_embedded(data_dir_of(args), args.to, key, since=args.since,
                                       until=args.until, tick=lambda n: advance(n, ""),
                                       policy=policy)
    if args.json:
        sys.stdout.write(orjson.dumps(manifest.__dict__).decode() + "\n")
    else:
        rows = ", ".join(f"{name} {count:,}" for name, count in manifest.rows.items())
        anonymity = manifest.anonymity
        print(f"wrote {args.to}: {rows}; {manifest.users_included:,} consenting people, "
              f"{manifest.users_left_out_no_consent:,} left out (no research consent); "
              f"k={anonymity['k']}: birth years in {anonymity['birth_year_band_years']}-year "
              f"bands, {anonymity['people_suppressed']:,} people and "
              f"{anonymity['venues_suppressed']:,} venues suppressed")
    return 0


def _cmd_whatif(args: argparse.Namespace) -> int:
    from replay.whatif import whatif

    key = args.pseudonym_key_file.read_bytes().strip() if args.pseudonym_key_file else None
    result = whatif(data_dir_of(args), args.rules, since=args.since, until=args.until,
                    out=args.out, pseudonym_key=key, workers=args.workers)
    if args.json:
        sys.stdout.write(orjson.dumps(result.as_dict()).decode() + "\n")
        return 0
    delta = result.whatif_points - result.live_points
    print(f"rules {result.rules_version}: {result.whatif_points:,} points "
          f"(live ledger {result.live_points:,}, {delta:+,}); "
          f"{result.users_affected:,} of {result.users_total:,} people affected; "
          f"flags raised {result.flags_raised_whatif:,} (live {result.flags_raised_live:,}), "
          f"cleared {result.flags_cleared_whatif:,} (live {result.flags_cleared_live:,}); "
          f"{result.samples:,} samples in {result.seconds} s")
    if args.out:
        print(f"per-person difference: {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from replay.report import write_report

    html_path, csv_path = write_report(data_dir_of(args), args.out, args.month, args.k)
    print(f"wrote {html_path} (aggregates only) and, for staff only, the identifiable "
          f"risk list {csv_path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="aggregate HTML programme report; staff-only risk list CSV")
    parser.add_argument("--month", default=None, help="only this month (YYYY-MM)")
    parser.add_argument("--out", type=Path, default=Path("report.html"))
    parser.add_argument("--k", type=int, default=K_DEFAULT,
                        help="suppress groups (venues, weekly step boxes) of fewer people")
    add_data_dir_arg(parser)
    parser.set_defaults(func=_cmd_report)

    parser = subparsers.add_parser("whatif", help="re-evaluate the history under other rules")
    parser.add_argument("--rules", type=Path, required=True, help="the other rules TOML")
    parser.add_argument("--since", default=None, help="first Tokyo day compared (YYYY-MM-DD)")
    parser.add_argument("--until", default=None, help="last Tokyo day compared (YYYY-MM-DD)")
    parser.add_argument("--out", type=Path, default=None,
                        help="Parquet file for the per-person difference")
    parser.add_argument("--pseudonym-key-file", type=Path, default=None,
                        help="pseudonymise people in --out with this key")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes, each re-evaluating a share of the people (default: "
                             "one per core; one for small logs)")
    parser.add_argument("--json", action="store_true")
    add_data_dir_arg(parser)
    parser.set_defaults(func=_cmd_whatif)

    parser = subparsers.add_parser("replay", help="export pseudonymised Parquet for research")
    parser.add_argument("--to", type=Path, required=True, help="output directory")
    parser.add_argument("--source", choices=["embedded", "kafka"], default="embedded")
    parser.add_argument("--bootstrap", default=None, help="Kafka bootstrap HOST:PORT (--source kafka)")
    add_security_args(parser)
    parser.add_argument("--topic-prefix", default="", help="prefix of the genki topics")
    parser.add_argument("--pseudonym-key-file", type=Path, default=None)
    parser.add_argument("--since", default=None, help="first Tokyo day (YYYY-MM-DD)")
    parser.add_argument("--until", default=None, help="last Tokyo day (YYYY-MM-DD)")
    parser.add_argument("--k", type=int, default=K_DEFAULT,
                        help="k-anonymity of birth year, sex, cohort and venue (default 5)")
    units = list(TIME_UNIT_MS)
    parser.add_argument("--samples-time", choices=units, default="minute",
                        help="resolution of sample timestamps (default minute)")
    parser.add_argument("--activities-time", choices=units, default="day",
                        help="resolution of activity timestamps (default day)")
    parser.add_argument("--ledger-time", choices=units, default="day",
                        help="resolution of ledger entry timestamps (default day)")
    parser.add_argument("--birth-year-band-years", type=int,
                        default=BIRTH_YEAR_BAND_YEARS_DEFAULT,
                        help="narrowest birth-year band (widened as k needs; default 5)")
    parser.add_argument("--json", action="store_true")
    add_data_dir_arg(parser)
    parser.set_defaults(func=_cmd_replay)
