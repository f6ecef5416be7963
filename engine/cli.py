"""The `genki` command: one entry point, subcommands registered by each package.

Each module in COMMANDS exposes `register(subparsers)`; every
subcommand sets `func(args) -> int` (the exit code). GenkiError becomes a
one-line message on stderr and its exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from engine.config import apply_signing_key_arg
from engine.errors import GenkiError
from engine.storage import private_umask

KAFKA_EXIT_CODE = 8  # the broker could not be reached, or refused the connection

# Each subcommand and the module that registers it. A command line naming one of them
# imports that module only (`genki status` starts in ~0.6 s instead of ~0.75 s: imports
# dominate short commands); help and unknown commands import them all.
COMMANDS: dict[str, str] = {
    "schemas": "engine.schemas_cli",
    "simulate": "engine.sim.cli",
    "ingest": "engine.ingest.cli", "dlq": "engine.ingest.cli",
    "import": "engine.importers.cli",
    "provenance": "engine.devices.cli", "devices": "engine.devices.cli",
    "rules": "engine.rules.cli",
    **dict.fromkeys(("balance", "history", "redeem", "refund", "adjust", "settlement",
                     "ledger"), "engine.ledger.cli"),
    **dict.fromkeys(("status", "archive", "run", "flags"), "engine.pipeline_cli"),
    "serve": "engine.api.cli", "keys": "engine.api.cli",
    **dict.fromkeys(("kafka-keys", "topics", "publish", "worker", "partitions"),
                    "engine.kafka.cli"),
    **dict.fromkeys(("report", "whatif", "replay"), "replay.cli"),
    "erase": "engine.erasure_cli",
    **dict.fromkeys(("link", "evaluate", "indicators"), "engine.evaluation.cli"),
    "demo": "engine.demo",
}
COMMAND_MODULES: tuple[str, ...] = tuple(dict.fromkeys(COMMANDS.values()))  # help order


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv` (None: every command, as for --help)."""
    parser = argparse.ArgumentParser(
        prog="genki",
        description="Health points and frailty-risk flags from wearable vitals.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    named = COMMANDS.get(argv[0]) if argv else None
    for module_name in (named,) if named else COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        private_umask()  # every file and directory genki writes is private (engine.storage)
        apply_signing_key_arg(args)
        from engine.kafka.client import apply_security_args

        apply_security_args(args)
        return int(args.func(args) or 0)
    except GenkiError as error:
        print(f"genki: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:
        return 0
    except Exception as error:
        if not type(error).__module__.startswith("aiokafka"):
            raise
        print(f"genki: Kafka: {type(error).__name__}: {error} (check --bootstrap and the TLS/SASL"
              " settings: --security-protocol, --ssl-cafile, --sasl-*, GENKI_KAFKA_*)",
              file=sys.stderr)
        return KAFKA_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
