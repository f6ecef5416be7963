"""`genki erase USER --reason R`: erase one person everywhere; `--check`, `--audit`."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

import orjson

from engine.config import add_data_dir_arg, data_dir_of
from engine.errors import UsageError
from engine.kafka.client import add_security_args

ROW_KINDS = frozenset(("samples", "activities", "profile_records", "profiles", "consent_records",
                       "watermarks", "dead_letters", "device_enrolments", "partition_dead_letters",
                       "ledger_entries_unlinked", "ledger_flags_unlinked"))


def _cmd_erase(args: argparse.Namespace) -> int:
    from engine.erasure import ErasureAudit, erase_person

    data_dir = data_dir_of(args)
    if args.audit:
        audit = ErasureAudit.open(data_dir)
        try:
            count = audit.verify()
            rows = audit.rows(audit.subject(args.user) if args.user else None)
        finally:
            audit.close()
        for row in rows:
            sys.stdout.write(orjson.dumps(row.__dict__).decode() + "\n")
        print(f"erasure audit log: {count} rows, hash chain intact", file=sys.stderr)
        return 0
    if not args.user:
        raise UsageError("erase: name the person (genki erase USER --reason R)")
    if args.check:
        audit = ErasureAudit.open(data_dir)
        try:
            erased = audit.is_erased(args.user)
            rows = audit.rows(audit.subject(args.user))
        finally:
            audit.close()
        for row in rows:
            sys.stdout.write(orjson.dumps(row.__dict__).decode() + "\n")
        print(f"{args.user}: {'erased' if erased else 'not erased'}", file=sys.stderr)
        return 0 if erased else 1
    if args.reason is None:
        raise UsageError("erase: --reason is required (why, e.g. 'request of 2026-11-30, "
                         "ref 1234'); it is kept in the audit log, so name no one in it")
    actor = args.actor or f"cli:{getpass.getuser()}"
    result = erase_person(data_dir, args.user, args.reason, actor,
                          partitions_dir=args.partitions_dir, bootstrap=args.bootstrap,
                          topic_prefix=args.topic_prefix)
    if args.json:
        sys.stdout.write(orjson.dumps(result.as_dict()).decode() + "\n")
        return 0
    removed = sum(v for kinds in result.removed.values() for kind, v in kinds.items()
                  if kind in ROW_KINDS)
    stores = len(result.removed)
    again = " (already erased before; nothing was left)" if result.already_erased and \
        not removed else ""
    print(f"erased {args.user} from {stores} store(s): {removed:,} rows removed or unlinked "
          f"in {result.seconds} s; audit subject {result.subject}{again}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "erase", help="erase one person's data everywhere (audited)",
        description="Deletes the person's samples, activities, profile, consent events, flags "
                    "and dead letters from the log and every partition store on this host; the "
                    "ledger keeps settlement amounts without the link to the person.")
    parser.add_argument("user", nargs="?", default=None, help="the person's user id")
    parser.add_argument("--reason", default=None, help="why (kept in the audit log)")
    parser.add_argument("--actor", default=None, help="who asks (default cli:<login>)")
    parser.add_argument("--partitions-dir", type=Path, default=None,
                        help="also the Kafka partition stores p<N>/ under this directory")
    parser.add_argument("--bootstrap", default=None,
                        help="Kafka mode: also destroy the person's data keys on genki.keys")
    parser.add_argument("--topic-prefix", default="", help="prefix of the genki topics")
    parser.add_argument("--check", action="store_true",
                        help="only say whether USER was erased (exit 0) or not (exit 1)")
    parser.add_argument("--audit", action="store_true",
                        help="verify the audit log and print its rows (USER's only if given)")
    parser.add_argument("--json", action="store_true")
    add_data_dir_arg(parser)
    add_security_args(parser)
    parser.set_defaults(func=_cmd_erase)
