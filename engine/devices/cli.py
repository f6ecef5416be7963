"""`genki devices enroll|unenroll|list|bind|enforce`: study management of wearables."""

from __future__ import annotations

import argparse
import sys
import time

import orjson

from engine.config import add_data_dir_arg, data_dir_of
from engine.devices import VENDOR_ANY, DeviceRegistry
from engine.errors import NotFound

CLI_ACTOR = "cli"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _print(value: object, as_json: bool, text: str) -> None:
    print(orjson.dumps(value).decode() if as_json else text)


def _cmd_enroll(args: argparse.Namespace) -> int:
    with DeviceRegistry.open(data_dir_of(args)) as registry:
        enrolment = registry.enroll(args.user, args.device, args.vendor, _now_ms(), CLI_ACTOR,
                                    key_id=args.key)
    _print(enrolment.to_dict(), args.json, f"enrolled {enrolment.device_id} "
           f"({enrolment.vendor}) for {enrolment.user_id}")
    return 0


def _cmd_unenroll(args: argparse.Namespace) -> int:
    with DeviceRegistry.open(data_dir_of(args)) as registry:
        enrolment = registry.unenroll(args.user, args.device, _now_ms(), CLI_ACTOR)
    _print(enrolment.to_dict(), args.json, f"unenrolled {enrolment.device_id} from "
           f"{enrolment.user_id}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    with DeviceRegistry.open(data_dir_of(args)) as registry:
        enrolments = registry.enrolments(args.user)
        scopes = registry.scopes()
        enforced = registry.enforced()
    if args.json:
        for enrolment in enrolments:
            sys.stdout.write(orjson.dumps(enrolment.to_dict()).decode() + "\n")
        return 0
    for e in enrolments:
        print(f"{e.user_id}\t{e.device_id}\t{e.vendor}\t{e.key_id or '-'}")
    for scope in scopes:
        print(f"key {scope.key_id}: vendors {','.join(sorted(scope.vendors)) or '-'}"
              f"{', enrolment key' if scope.profiles else ''}", file=sys.stderr)
    print(f"{len(enrolments)} devices enrolled; enforcement for API keys "
          f"{'on' if enforced else 'off'}", file=sys.stderr)
    return 0


def _cmd_bind(args: argparse.Namespace) -> int:
    with DeviceRegistry.open(data_dir_of(args)) as registry:
        scope = registry.bind_key(args.key_id, args.vendor or [], args.profiles, _now_ms())
    _print(scope.to_dict(), args.json, f"key {scope.key_id}: vendors "
           f"{','.join(sorted(scope.vendors)) or '-'}"
           f"{'; enrolment key (profiles and consent)' if scope.profiles else ''}")
    return 0


def _cmd_enforce(args: argparse.Namespace) -> int:
    with DeviceRegistry.open(data_dir_of(args)) as registry:
        if args.state != "status":
            registry.set_enforced(args.state == "on")
        enforced = registry.enforced()
    _print({"enforced": enforced}, args.json,
           f"enrolment enforcement for API keys: {'on' if enforced else 'off'}")
    return 0


def _cmd_provenance(args: argparse.Namespace) -> int:
    from engine.ingest.log import LOG_FILE_NAME, EmbeddedLog

    data_dir = data_dir_of(args)
    if not (data_dir / LOG_FILE_NAME).exists():
        raise NotFound(f"no log in {data_dir}")
    if args.exclude or args.include:
        with EmbeddedLog.open(data_dir) as log:
            log.exclude_key(args.key_id, _now_ms(), excluded=args.exclude)
    with EmbeddedLog.open(data_dir, writer=False) as log:
        positions = log.positions_of_key(args.key_id)
        counts = log.counts_by_key().get(args.key_id, {})
        excluded = args.key_id in log.excluded_keys()
    result = {"key_id": args.key_id, "counts": counts, "excluded": excluded,
              "positions": [[first, last] for first, last in positions]}
    if args.json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        return 0
    print(f"key {args.key_id}: " + (", ".join(f"{n} {v:,}" for n, v in counts.items())
                                    or "nothing submitted")
          + ("; EXCLUDED from runs, rebuilds and what-if" if excluded else ""))
    for first, last in positions:
        print(f"  log positions {first}..{last}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "provenance", help="what one API key submitted: counts and log positions")
    parser.add_argument("key_id", help="a key id (`genki keys list`), or 'operator' for the CLI")
    parser.add_argument("--json", action="store_true")
    switch = parser.add_mutually_exclusive_group()
    switch.add_argument("--exclude", action="store_true",
                        help="leave this key's records out of later runs (a leaked key)")
    switch.add_argument("--include", action="store_true", help="undo --exclude")
    add_data_dir_arg(parser)
    parser.set_defaults(func=_cmd_provenance)

    devices = subparsers.add_parser("devices", help="enrol wearables to persons; scope "
                                                    "gateway keys")
    commands = devices.add_subparsers(dest="devices_command", metavar="SUBCOMMAND",
                                      required=True)

    def sub(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("--json", action="store_true")
        add_data_dir_arg(parser)
        return parser

    parser = sub("enroll", "enrol DEVICE to USER (an event with its time)")
    parser.add_argument("user")
    parser.add_argument("device", help="genki device id, e.g. garmin:<Garmin userId>")
    parser.add_argument("--vendor", default="generic", help="apple, fitbit, garmin, ...")
    parser.add_argument("--key", default=None, help="a gateway key id allowed to write for "
                                                    "this device (besides vendor-bound keys)")
    parser.set_defaults(func=_cmd_enroll)

    parser = sub("unenroll", "end DEVICE's enrolment to USER")
    parser.add_argument("user")
    parser.add_argument("device")
    parser.set_defaults(func=_cmd_unenroll)

    parser = sub("list", "current enrolments (and key scopes on stderr)")
    parser.add_argument("--user", default=None)
    parser.set_defaults(func=_cmd_list)

    parser = sub("bind", "scope a gateway key: the vendors it writes for, enrolment key")
    parser.add_argument("key_id")
    parser.add_argument("--vendor", action="append",
                        help=f"a vendor (repeatable; {VENDOR_ANY!r} for every vendor)")
    parser.add_argument("--profiles", action="store_true",
                        help="an enrolment key: may write profiles and consent")
    parser.set_defaults(func=_cmd_bind)

    parser = sub("enforce", "switch enrolment enforcement for API keys on or off")
    parser.add_argument("state", choices=("on", "off", "status"))
    parser.set_defaults(func=_cmd_enforce)
