"""The `genki` command: one entry point, subcommands registered by each package.

Each module in COMMAND_MODULES exposes `register(subparsers)`; every
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

COMMAND_MODULES: tuple[str, ...] = (
    "engine.schemas_cli",
    "engine.sim.cli",
    "engine.ingest.cli",
    "engine.importers.cli",
    "engine.devices.cli",
    "engine.rules.cli",
    "engine.ledger.cli",
    "engine.pipeline_cli",
    "engine.api.cli",
    "engine.kafka.cli",
    "replay.cli",
    "engine.erasure_cli",
    "engine.evaluation.cli",
    "engine.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genki",
        description="Health points and frailty-risk flags from wearable vitals.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and module_name.startswith(error.name):
                continue  # that package is not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
