"""`genki balance|history|redeem|refund|adjust|settlement` and `genki ledger …`."""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from engine.config import SIGNING_KEY_ENV, add_data_dir_arg, data_dir_of, default_data_dir
from engine.errors import ChainBroken, LedgerError, NotFound, UsageError
from engine.ledger.commands import describe
from engine.ledger.model import Entry, Settlement
from engine.ledger.signing import create_key_pair, load_verifier
from engine.ledger.store import HISTORY_LIMIT_MAX, Ledger
from engine.progress import progress_bar


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode() + "\n")


def _entry_line(entry: Entry) -> str:
    return (f"{entry.seq:>9}  {entry.day or '':10}  {entry.kind.value:7}  {entry.points:>+8}  "
            f"{describe(entry.kind, entry.points, entry.rule, entry.ref)}  [{entry.entry_id}]")


def _print_entry(entry: Entry, as_json: bool) -> None:
    if as_json:
        _print_json(entry.to_dict())
    else:
        print(_entry_line(entry))


def _refuse_erased(data_dir: Path, user_id: str) -> None:
    """An erased person is not a person with 0 points: answer as the API does (404)."""
    from engine.erasure import AUDIT_FILE_NAME, ErasureAudit

    if not (data_dir / AUDIT_FILE_NAME).exists():
        return
    audit = ErasureAudit.open(data_dir)
    try:
        erased = audit.is_erased(user_id)
    finally:
        audit.close()
    if erased:
        raise NotFound(f"no such person: {user_id} was erased from this data directory "
                       "(`genki erase --check` confirms it)")


def _cmd_balance(args: argparse.Namespace) -> int:
    _refuse_erased(data_dir_of(args), args.user)
    with Ledger.open(data_dir_of(args)) as ledger:
        points = ledger.balance(args.user)
    if args.json:
        _print_json({"user_id": args.user, "balance": points})
    else:
        print(points)
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    _refuse_erased(data_dir_of(args), args.user)
    with Ledger.open(data_dir_of(args)) as ledger:
        entries, next_cursor = ledger.history(args.user, args.cursor, args.limit)
    if args.json:
        _print_json({"user_id": args.user, "entries": [e.to_dict() for e in entries],
                     "next_cursor": next_cursor})
        return 0
    for entry in entries:
        print(_entry_line(entry))
    if next_cursor is not None:
        print(f"(more: --cursor {next_cursor})")
    return 0


def _cmd_redeem(args: argparse.Namespace) -> int:
    with Ledger.open(data_dir_of(args)) as ledger:
        entry = ledger.redeem(args.user, args.points, args.shop, args.terminal, args.key,
                              args.ts_ms or _now_ms())
    _print_entry(entry, args.json)
    return 0


def _cmd_refund(args: argparse.Namespace) -> int:
    with Ledger.open(data_dir_of(args)) as ledger:
        entry = ledger.refund(args.entry_id, args.points, args.key, args.ts_ms or _now_ms(),
                              shop_id=args.shop)
    _print_entry(entry, args.json)
    return 0


def _cmd_adjust(args: argparse.Namespace) -> int:
    with Ledger.open(data_dir_of(args)) as ledger:
        entry = ledger.adjust(args.user, args.points, args.reason, args.staff, args.key,
                              args.ts_ms or _now_ms())
    _print_entry(entry, args.json)
    return 0


def _bar_enabled(args: argparse.Namespace) -> bool:
    return sys.stdout.isatty() and not getattr(args, "json", False)


def _witness_of(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        value = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as error:
        raise UsageError(f"--witness {path}: not readable JSON ({error})") from error
    if not isinstance(value, dict):
        raise UsageError(f"--witness {path}: expected the JSON object of "
                         "`genki ledger head --signed`")
    return value


def _cmd_verify(args: argparse.Namespace) -> int:
    verifier = load_verifier(args.public_key) if args.public_key is not None else None
    witness = _witness_of(args.witness)
    with Ledger.open(data_dir_of(args)) as ledger:
        total = ledger.head_seq()
        with progress_bar("verifying", total, _bar_enabled(args)) as advance:
            result = ledger.verify(progress=lambda n: advance(n, "entries"),
                                   public_key=verifier, witness=witness)
    if args.json:
        _print_json(result.to_dict())
    elif result.ok:
        signed = (f", {result.signatures_checked} signatures by key {result.key_id}"
                  if verifier is not None else "")
        print(f"ok: {result.entries_checked} entries ({result.erased_entries} erased), "
              f"{result.users_checked} balances, {result.flags_checked} flag events, "
              f"{result.erasures_checked} erasures, {result.commits_checked} commits{signed}, "
              f"head {result.chain_head}" + (" (witnessed head found)" if witness else ""))
    if result.ok:
        return 0
    where = f"first bad seq {result.first_bad_seq}: " if result.first_bad_seq else ""
    if result.first_bad_commit is not None:
        where += f"first bad commit {result.first_bad_commit}: "
    print(f"genki: ledger verify failed: {where}{result.problem}", file=sys.stderr)
    return ChainBroken.exit_code


def _cmd_head(args: argparse.Namespace) -> int:
    with Ledger.open(data_dir_of(args)) as ledger:
        head = ledger.signed_head() if args.signed else ledger.head()
    if args.json or args.signed:
        _print_json(head)
    else:
        for key, value in head.items():
            print(f"{key}: {value}")
    return 0


def _cmd_migrate(args: argparse.Namespace) -> int:
    from engine.ledger.migrate import migrate_v1

    result = migrate_v1(data_dir_of(args))
    if args.json:
        _print_json(result)
    else:
        print(f"migrated {result['entries']} entries and {result['flag_events']} flag events "
              f"to canonical version {result['canonical_version']}; content digest unchanged "
              f"({result['content_digest']}); old file kept as {result['old_file']}")
    return 0


def _cmd_erasures(args: argparse.Namespace) -> int:
    with Ledger.open(data_dir_of(args)) as ledger:
        log = ledger.erasures()
    if args.json:
        _print_json(log)
        return 0
    for record in log:
        print(f"{record['seq']:>6}  {record['ts_ms']}  subject {record['subject']}  "
              f"{record['entries']} entries, {record['flags']} flag events  {record['reason']}")
    print(f"{len(log)} erasures", file=sys.stderr)
    return 0


def _cmd_keys_signing_create(args: argparse.Namespace) -> int:
    home = args.data_dir if args.data_dir is not None else default_data_dir()
    if Path(args.out).resolve().is_relative_to(Path(home).resolve()):
        raise UsageError(f"--out {args.out} is inside the data directory {home}: whoever can "
                         "write the data could read the key; put it elsewhere")
    private_path, public_path, key_id = create_key_pair(args.out)
    result = {"private_key": str(private_path), "public_key": str(public_path), "key_id": key_id}
    if args.json:
        _print_json(result)
    else:
        print(f"signing key {key_id}: private {private_path} (mode 0600; keep it outside the "
              f"data directory, give it to the writers with --signing-key or "
              f"${SIGNING_KEY_ENV}), public {public_path} (for `genki ledger verify "
              "--public-key`)")
    return 0


def register_signing_keys(actions: argparse._SubParsersAction) -> None:
    """`genki keys signing create --out PATH` (hooked into the `genki keys` group)."""
    signing = actions.add_parser("signing", help="Ed25519 keys that sign ledger heads")
    commands = signing.add_subparsers(dest="signing_command", metavar="ACTION", required=True)
    create = commands.add_parser("create", help="make a key pair: PATH (private) and PATH.pub")
    create.add_argument("--out", type=Path, required=True,
                        help="where to write the private key (outside the data directory)")
    create.add_argument("--data-dir", type=Path, default=None,
                        help="the data directory the key must stay out of (default $GENKI_HOME "
                             "or ./genki-data)")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=_cmd_keys_signing_create)


def _cmd_rebuild(args: argparse.Namespace) -> int:
    with Ledger.open(data_dir_of(args)) as ledger:
        result = ledger.rebuild()
    print(f"rebuilt {result.users} balances, {result.points_outstanding} points outstanding")
    if result.matched:
        print("rebuilt balances equal the live balances")
        return 0
    for difference in result.differences:
        print(f"  {difference.user_id}: live {difference.live}, rebuilt {difference.rebuilt}")
    raise LedgerError(f"{len(result.differences)} live balances differed from the journal "
                      "(now corrected)")


def _cmd_expire(args: argparse.Namespace) -> int:
    with Ledger.open(data_dir_of(args)) as ledger, \
            progress_bar("expiring", None, _bar_enabled(args)) as advance:
        entries = ledger.expire(args.as_of, args.months,
                                progress=lambda n: advance(n, "users"))
    points = -sum(entry.points for entry in entries)
    users = len({entry.user_id for entry in entries})
    print(f"expired {points} points in {len(entries)} lots of {users} users "
          f"(as of {args.as_of}, {args.months} months)")
    return 0


def _cmd_settlement(args: argparse.Namespace) -> int:
    with Ledger.open(data_dir_of(args)) as ledger:
        result = ledger.settlement(args.shop, args.month)
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(Settlement.CSV_HEADER)
    writer.writerow(result.csv_row())
    return 0


def _sub(subparsers: argparse._SubParsersAction, name: str, help_: str,
         func: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_)
    add_data_dir_arg(parser)
    parser.set_defaults(func=func)
    return parser


def _key_args(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    parser.add_argument("--key", required=True, help="idempotency key (retry with the same)")
    parser.add_argument("--ts-ms", type=int, default=None, help="time (default: now)")
    if json_flag:
        parser.add_argument("--json", action="store_true")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = _sub(subparsers, "balance", "a user's points balance", _cmd_balance)
    p.add_argument("user")
    p.add_argument("--json", action="store_true")

    p = _sub(subparsers, "history", "a user's ledger entries, newest first", _cmd_history)
    p.add_argument("user")
    p.add_argument("--limit", type=int, default=50, help=f"at most {HISTORY_LIMIT_MAX}")
    p.add_argument("--cursor", type=int, default=None, help="next_cursor of the previous page")
    p.add_argument("--json", action="store_true")

    p = _sub(subparsers, "redeem", "spend a user's points at a shop", _cmd_redeem)
    p.add_argument("user")
    p.add_argument("points", type=int)
    p.add_argument("--shop", required=True)
    p.add_argument("--terminal", required=True)
    _key_args(p)

    p = _sub(subparsers, "refund", "give back (part of) a redemption", _cmd_refund)
    p.add_argument("entry_id", help="entry id of the redemption")
    p.add_argument("points", type=int)
    p.add_argument("--shop", default=None, help="the refunding shop (must be the redeeming one)")
    _key_args(p)

    p = _sub(subparsers, "adjust", "a staff correction of a balance", _cmd_adjust)
    p.add_argument("user")
    p.add_argument("points", type=int, help="signed")
    p.add_argument("--reason", required=True)
    p.add_argument("--staff", required=True)
    _key_args(p)

    p = _sub(subparsers, "settlement", "a shop's monthly redemptions as CSV", _cmd_settlement)
    p.add_argument("--shop", required=True)
    p.add_argument("--month", required=True, help="YYYY-MM (Tokyo time)")

    ledger = subparsers.add_parser("ledger", help="verify, inspect and repair the ledger")
    commands = ledger.add_subparsers(dest="ledger_command", metavar="LEDGER_COMMAND",
                                     required=True)
    p = _sub(commands, "verify", "recompute every chain, link, balance, commit and signature",
             _cmd_verify)
    p.add_argument("--json", action="store_true")
    p.add_argument("--public-key", type=Path, default=None, metavar="PUB",
                   help="Ed25519 public key (PATH.pub of `genki keys signing create`): every "
                        "signature must verify and the newest commit must be signed")
    p.add_argument("--witness", type=Path, default=None, metavar="HEAD.json",
                   help="a head saved from `genki ledger head --signed`: the ledger must still "
                        "contain it (needs --public-key)")
    p = _sub(commands, "head", "entry count, points outstanding, chain heads, digest", _cmd_head)
    p.add_argument("--json", action="store_true")
    p.add_argument("--signed", action="store_true",
                   help="the newest commit with its Ed25519 signature, as JSON for an external "
                        "witness (with --signing-key, seals an unsigned head first)")
    p = _sub(commands, "migrate", "rewrite a canonical version 1 ledger as version 2",
             _cmd_migrate)
    p.add_argument("--json", action="store_true")
    p = _sub(commands, "erasures", "the erasure log (subjects, reasons, times; no user ids)",
             _cmd_erasures)
    p.add_argument("--json", action="store_true")
    _sub(commands, "rebuild", "recompute balances from the journal", _cmd_rebuild)
    p = _sub(commands, "expire", "expire points older than N months", _cmd_expire)
    p.add_argument("--as-of", required=True, help="YYYY-MM-DD")
    p.add_argument("--months", type=int, required=True)
