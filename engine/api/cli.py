"""`genki serve` and `genki keys create|revoke|list`.

Heavy imports (FastAPI, uvicorn) happen inside the commands: every `genki`
invocation imports this module to register its subcommands.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from engine.api.limits import (
    POINTS_PER_PERSON_PER_DAY_MAX_ENV,
    POINTS_PER_REDEMPTION_MAX_ENV,
    TOKEN_TTL_S_DEFAULT,
    TOKEN_TTL_S_MAX,
)
from engine.api.store import ApiStore, Role
from engine.config import add_data_dir_arg, data_dir_of
from engine.errors import UsageError
from engine.kafka.client import add_security_args
from engine.ledger.cli import register_signing_keys

HOST_DEFAULT = "127.0.0.1"
PORT_DEFAULT = 8080
BACKLOG_CONNECTIONS = 2048


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 lets the OS choose (the URL printed names it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit it. Without it, asyncio's loop (uvloop absent)
    # answered keep-alive requests ~40 ms late (Nagle vs delayed ACK).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.listen(BACKLOG_CONNECTIONS)
    sock.set_inheritable(True)
    return sock


def serve(data_dir: Path, sock: socket.socket, *, token_ttl_s: int | None = None,
          clock_offset_ms: int | None = None, log_level: str = "warning",
          access_log: bool = False, loop: str = "auto", http: str = "auto",
          hold_ingest_log: bool = True, bootstrap: str | None = None, topic_prefix: str = "",
          partitions_dir: Path | None = None, points_per_redemption_max: int | None = None,
          points_per_person_per_day_max: int | None = None) -> int:
    """Print the URL (first line of stdout), then serve until SIGINT/SIGTERM."""
    import uvicorn

    from engine.api.app import create_app

    app = create_app(data_dir, token_ttl_s=token_ttl_s, clock_offset_ms=clock_offset_ms,
                     hold_ingest_log=hold_ingest_log, bootstrap=bootstrap,
                     topic_prefix=topic_prefix, partitions_dir=partitions_dir,
                     points_per_redemption_max=points_per_redemption_max,
                     points_per_person_per_day_max=points_per_person_per_day_max)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    what = str(data_dir) if bootstrap is None else f"Kafka {bootstrap} (keys in {data_dir})"
    print(f"genki API serving {what} on http://{shown}:{port} (docs: http://{shown}:{port}"
          "/docs)", flush=True)
    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, loop=loop,
                            http=http, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    if args.bootstrap is None and (args.partitions_dir is not None or args.topic_prefix):
        raise UsageError("--partitions-dir and --topic-prefix need --bootstrap (Kafka mode)")
    if args.partitions_dir is not None and not args.partitions_dir.is_dir():
        raise UsageError(f"--partitions-dir {args.partitions_dir} is not a directory")
    if args.bootstrap is not None:
        from engine.kafka.authn import require_record_keys

        require_record_keys()  # the API signs every record that moves points
    sock = bind_socket(args.host, args.port)
    return serve(data_dir, sock, token_ttl_s=args.token_ttl_s,
                 clock_offset_ms=args.clock_offset_ms, log_level=args.log_level,
                 access_log=args.access_log, loop=args.loop, http=args.http,
                 hold_ingest_log=not args.ingest_per_request, bootstrap=args.bootstrap,
                 topic_prefix=args.topic_prefix, partitions_dir=args.partitions_dir,
                 points_per_redemption_max=args.points_per_redemption_max,
                 points_per_person_per_day_max=args.points_per_person_per_day_max)


def serve_demo(data_dir: Path, console: Any) -> int:
    """After `genki demo --serve`: fresh keys for every role, example calls, then serve."""
    shops_file = data_dir / "simulated" / "shops.json"
    shops = orjson.loads(shops_file.read_bytes()) if shops_file.exists() else []
    shop_id = str(shops[0]["id"]) if shops else "SHOP001"
    with ApiStore.open(data_dir) as store:
        keys = {role: store.create_key(role, shop_id if role == Role.shop else None, "demo",
                                       _now_ms())[0] for role in Role}
    try:
        sock = bind_socket(HOST_DEFAULT, PORT_DEFAULT)
    except UsageError:
        sock = bind_socket(HOST_DEFAULT, 0)
    url = f"http://{HOST_DEFAULT}:{sock.getsockname()[1]}"
    console.print(f"\n[bold]API keys[/] (shown once; shop key is for {shop_id}):")
    for role, key_text in keys.items():
        console.print(f"    {role.value:<8} {key_text}", soft_wrap=True, highlight=False)
    console.print("try:\n"
                  f"    curl -H 'Authorization: Bearer {keys[Role.app]}' "
                  f"{url}/v1/users/USER_ID/balance\n"
                  f"    curl -X POST -H 'Authorization: Bearer {keys[Role.app]}' "
                  f"{url}/v1/users/USER_ID/redeem-tokens\n"
                  f"    curl -X POST -H 'Authorization: Bearer {keys[Role.shop]}' "
                  "-H 'Idempotency-Key: sale-1' -H 'Content-Type: application/json' "
                  "-d '{\"token\": \"TOKEN\", \"points\": 5, \"terminal_id\": \"T1\"}' "
                  f"{url}/v1/redemptions\n"
                  f"    curl -H 'Authorization: Bearer {keys[Role.staff]}' {url}/v1/flags",
                  soft_wrap=True, markup=False, highlight=False)
    return serve(data_dir, sock)


def _cmd_keys_create(args: argparse.Namespace) -> int:
    if (args.vendor or args.enrolment) and args.role != Role.gateway.value:
        raise UsageError("--vendor and --enrolment are for gateway keys only")
    with ApiStore.open(data_dir_of(args)) as store:
        key_text, record = store.create_key(args.role, args.shop, args.label, _now_ms())
    scope = None
    if args.vendor or args.enrolment:  # engine.devices: what this gateway key may write
        from engine.devices import DeviceRegistry

        with DeviceRegistry.open(data_dir_of(args)) as registry:
            scope = registry.bind_key(record.key_id, args.vendor or [], args.enrolment,
                                      _now_ms()).to_dict()
    if args.json:
        extra = {"scope": scope} if scope is not None else {}
        sys.stdout.write(orjson.dumps({"key": key_text, **record.to_dict(), **extra}).decode()
                         + "\n")
        return 0
    where = f" for shop {record.shop_id}" if record.shop_id else ""
    print(f"created {record.role.value} key {record.key_id}{where}; it is shown only now:")
    print(key_text)
    return 0


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    with ApiStore.open(data_dir_of(args)) as store:
        record = store.revoke_key(args.key_id, _now_ms())
    print(f"revoked key {record.key_id} ({record.role.value})")
    return 0


def _cmd_keys_list(args: argparse.Namespace) -> int:
    with ApiStore.open(data_dir_of(args)) as store:
        records = store.list_keys()
    if args.json:
        for record in records:
            sys.stdout.write(orjson.dumps(record.to_dict()).decode() + "\n")
        return 0
    for record in records:
        state = "revoked" if record.revoked_ms is not None else "active"
        print(f"{record.key_id}  {record.role.value:<7}  {record.shop_id or '-':<16}  "
              f"{state:<7}  {record.label or ''}")
    print(f"{len(records)} keys", file=sys.stderr)
    return 0


def _positive_ttl(text: str) -> int:
    value = int(text)
    if not 1 <= value <= TOKEN_TTL_S_MAX:
        raise argparse.ArgumentTypeError(f"1..{TOKEN_TTL_S_MAX}")
    return value


def _positive_points(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("a positive number of points")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve the HTTP API (FastAPI + uvicorn)")
    parser.add_argument("--host", default=HOST_DEFAULT, help=f"default {HOST_DEFAULT}")
    parser.add_argument("--port", type=int, default=PORT_DEFAULT,
                        help=f"default {PORT_DEFAULT}; 0: any free port")
    parser.add_argument("--token-ttl-s", type=_positive_ttl, default=None,
                        help=f"redeem token lifetime (default {TOKEN_TTL_S_DEFAULT})")
    parser.add_argument("--clock-offset-ms", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("--ingest-per-request", action="store_true",
                        help="open the embedded log for each POST /v1/ingest instead of holding "
                             "its writer lock (lets `genki ingest` run alongside; each request "
                             "then reloads the log's dedup state)")
    parser.add_argument("--bootstrap", default=None, metavar="HOST:PORT",
                        help="Kafka mode: redemptions and refunds go to the partition owners "
                             "through genki.redemptions (the data dir then holds only keys, "
                             "secret and stored responses)")
    parser.add_argument("--topic-prefix", default="", help="Kafka mode: topic name prefix")
    add_security_args(parser)
    parser.add_argument("--partitions-dir", type=Path, default=None, metavar="DIR",
                        help="Kafka mode: the workers' data directory (p<N>/ledger.sqlite), "
                             "read only, to answer balance, history and flags; without it "
                             "reads answer 503")
    parser.add_argument("--points-per-redemption-max", type=_positive_points, default=None,
                        metavar="POINTS",
                        help="refuse a redemption of more points (422 "
                             "points_per_redemption_max_exceeded); default: no limit, or "
                             f"${POINTS_PER_REDEMPTION_MAX_ENV}")
    parser.add_argument("--points-per-person-per-day-max", type=_positive_points, default=None,
                        metavar="POINTS",
                        help="refuse a redemption that takes a person past this many points "
                             "redeemed in one Tokyo day, at any shop (409 "
                             "points_per_person_per_day_max_exceeded); default: no limit, or "
                             f"${POINTS_PER_PERSON_PER_DAY_MAX_ENV}")
    parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    parser.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"])
    add_data_dir_arg(parser)
    parser.set_defaults(func=_cmd_serve)

    keys = subparsers.add_parser("keys", help="API keys: create, revoke, list; ledger signing keys")
    actions = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a key (printed once)")
    create.add_argument("--role", required=True, choices=[role.value for role in Role])
    create.add_argument("--shop", default=None, help="the shop id (role shop only)")
    create.add_argument("--label", default=None, help="who holds it (for `keys list`)")
    create.add_argument("--vendor", action="append", default=None,
                        help="gateway keys: bind to a vendor (repeatable; see genki devices)")
    create.add_argument("--enrolment", action="store_true",
                        help="gateway keys: an enrolment key (may write profiles and consent)")
    create.add_argument("--json", action="store_true")
    add_data_dir_arg(create)
    create.set_defaults(func=_cmd_keys_create)
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    add_data_dir_arg(revoke)
    revoke.set_defaults(func=_cmd_keys_revoke)
    listing = actions.add_parser("list", help="list keys (never their text)")
    listing.add_argument("--json", action="store_true")
    add_data_dir_arg(listing)
    listing.set_defaults(func=_cmd_keys_list)
    register_signing_keys(actions)
