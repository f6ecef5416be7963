"""`genki topics create`, `genki publish`, `genki worker`, `genki partitions`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import orjson

from engine.config import add_data_dir_arg, data_dir_of
from engine.errors import UsageError
from engine.kafka.client import add_security_args
from engine.kafka.keys import Keyring

BOOTSTRAP_ENV = "GENKI_BOOTSTRAP"
TOPIC_PREFIX_ENV = "GENKI_TOPIC_PREFIX"


def _add_bootstrap(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=os.environ.get(BOOTSTRAP_ENV),
                        help=f"Kafka bootstrap servers HOST:PORT[,...] (default ${BOOTSTRAP_ENV})")
    parser.add_argument("--topic-prefix", default=os.environ.get(TOPIC_PREFIX_ENV, ""),
                        help="prefix of every topic name, to share a cluster "
                             f"(default ${TOPIC_PREFIX_ENV} or none)")
    add_security_args(parser)


def _bootstrap(args: argparse.Namespace) -> str:
    if not args.bootstrap:
        raise UsageError(f"--bootstrap HOST:PORT is required (or set {BOOTSTRAP_ENV})")
    return str(args.bootstrap)


def _emit(args: argparse.Namespace, summary: Mapping[str, object], text: str) -> None:
    if args.json:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    else:
        print(text)


def _cmd_topics_create(args: argparse.Namespace) -> int:
    from engine.kafka.topics import create_topics

    results = asyncio.run(create_topics(_bootstrap(args), args.partitions,
                                        args.replication_factor, args.topic_prefix))
    summary = {"topics": [{"name": r.name, "partitions": r.partitions, "created": r.created}
                          for r in results]}
    lines = [f"{r.name}: {r.partitions} partitions, {'created' if r.created else 'exists'}"
             for r in results]
    _emit(args, summary, "\n".join(lines))
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from engine.kafka.publish import publish_paths
    from engine.progress import progress_bar

    sign_with = None
    if args.sign_redemptions:
        from engine.kafka.authn import require_record_keys

        sign_with = require_record_keys()
    encrypt_with = _wrap_keys_unless_opted_out(args, "genki publish")
    with progress_bar("publish", enabled=not args.json and sys.stderr.isatty()) as advance:
        summary = asyncio.run(publish_paths(_bootstrap(args), args.paths, args.topic_prefix,
                                            args.compression, advance, sign_with,
                                            encrypt_with))
    topics = ", ".join(f"{topic} {count:,}" for topic, count in sorted(summary.by_topic.items()))
    text = f"published {summary.records:,} records ({summary.bytes:,} bytes) in " \
           f"{summary.seconds:.1f} s: {topics}"
    if summary.refused_oversized:
        text += f"; refused {summary.refused_oversized:,} records over the broker's size limit"
    _emit(args, summary.as_dict(), text)
    return 0


def _wrap_keys_unless_opted_out(args: argparse.Namespace, what: str) -> Keyring | None:
    from engine.kafka.personal import encryption_enabled, require_wrap_keys

    if args.no_encryption or not encryption_enabled():
        return None
    return require_wrap_keys(what)


def _add_no_encryption(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-encryption", action="store_true",
                        help="opt out of per-person encryption of personal payloads (default "
                             "on in Kafka mode; also $GENKI_KAFKA_ENCRYPTION=off)")


def _cmd_worker(args: argparse.Namespace) -> int:
    from engine.kafka.worker import WorkerSettings, run_worker
    from engine.progress import progress_bar

    settings = WorkerSettings(
        bootstrap=_bootstrap(args), data_dir=data_dir_of(args), group=args.group,
        prefix=args.topic_prefix, until_idle=args.until_idle, rules_path=args.rules,
        late_window_days=args.late_window_days, fetch_records_max=args.fetch_records,
        compression=args.compression, client_id=args.client_id,
        session_timeout_ms=args.session_timeout_ms,
        encryption=not args.no_encryption, partition_processes=args.partition_processes)
    show = not args.json and sys.stderr.isatty()
    logging.basicConfig(level=logging.WARNING if show else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    with progress_bar("worker", enabled=show) as advance:
        summary = asyncio.run(run_worker(settings, advance))
    _emit(args, summary.as_dict(),
          f"partitions {sorted(set(summary.partitions))}: accepted {summary.accepted:,}, "
          f"rejected {summary.rejected:,}, erased {summary.erased_records:,} records, "
          f"{summary.accepted_samples:,} samples; "
          f"published {summary.published_entries:,} ledger entries, "
          f"{summary.published_dead_letters:,} dead letters"
          + (f"; {summary.restore_refused:,} unauthenticated entries not restored"
             if summary.restore_refused else ""))
    return 0


def _cmd_partitions(args: argparse.Namespace) -> int:
    from engine.kafka.combined import combined_ledger

    combined = combined_ledger(data_dir_of(args))
    _emit(args, combined.as_dict(),
          f"partitions {combined.partitions}: {combined.entries:,} entries, "
          f"{len(combined.balances):,} users, {combined.points_outstanding:,} points "
          f"outstanding\ncontent digest {combined.content_digest}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from engine.ingest.log import LATE_WINDOW_DAYS_DEFAULT
    from engine.kafka import keys
    from engine.kafka.client import COMPRESSIONS

    keys.register(subparsers)

    topics = subparsers.add_parser("topics", help="manage the genki Kafka topics")
    actions = topics.add_subparsers(dest="topics_command", metavar="ACTION")
    create = actions.add_parser("create", help="create the genki topics (safe to re-run)")
    _add_bootstrap(create)
    create.add_argument("--partitions", type=int, default=12,
                        help="partitions of every co-partitioned topic (default 12)")
    create.add_argument("--replication-factor", type=int, default=1)
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=_cmd_topics_create)

    publish = subparsers.add_parser(
        "publish", help="publish NDJSON wire records to the genki topics (reference gateway)")
    publish.add_argument("paths", nargs="+", help="files, directories (their *.ndjson) or -")
    _add_bootstrap(publish)
    publish.add_argument("--compression", choices=COMPRESSIONS, default="auto",
                         help="auto: lz4 or zstd when installed, else none (default)")
    _add_no_encryption(publish)
    publish.add_argument("--sign-redemptions", action="store_true",
                         help="authenticate redemption lines with the record keys (operators "
                              "only: whoever holds them can move points; gateways never do)")
    publish.add_argument("--json", action="store_true", help="print the summary as JSON")
    publish.set_defaults(func=_cmd_publish)

    worker = subparsers.add_parser(
        "worker", help="consume the input topics into partition ledgers (consumer group)")
    _add_bootstrap(worker)
    add_data_dir_arg(worker)
    worker.add_argument("--group", default="genki", help="consumer group (default genki)")
    worker.add_argument("--until-idle", action="store_true",
                        help="exit once every assigned partition is caught up")
    worker.add_argument("--rules", type=Path, default=None, help="rules TOML (default shipped)")
    worker.add_argument("--late-window-days", type=int, default=LATE_WINDOW_DAYS_DEFAULT)
    worker.add_argument("--fetch-records", type=int, default=20_000,
                        help="records per fetch (getmany max_records)")
    worker.add_argument("--compression", choices=COMPRESSIONS, default="auto",
                        help="compression of the output topics")
    worker.add_argument("--client-id", default="worker")
    worker.add_argument("--session-timeout-ms", type=int, default=10_000,
                        help="how long before a silent worker's partitions move (default 10000)")
    worker.add_argument("--partition-processes", action="store_true",
                        help="run each owned partition's store in a process of its own, so "
                             "partitions use every core (default: threads of the worker)")
    _add_no_encryption(worker)
    worker.add_argument("--json", action="store_true", help="print the summary as JSON at exit")
    worker.set_defaults(func=_cmd_worker)

    partitions = subparsers.add_parser(
        "partitions", help="the partition ledgers of a worker data directory as one")
    add_data_dir_arg(partitions)
    partitions.add_argument("--json", action="store_true")
    partitions.set_defaults(func=_cmd_partitions)
