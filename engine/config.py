"""Where the data directory is, shared by every command."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DATA_DIR_DEFAULT = "./genki-data"
DATA_DIR_ENV = "GENKI_HOME"


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DATA_DIR_DEFAULT)


SIGNING_KEY_ENV = "GENKI_SIGNING_KEY_FILE"


def add_data_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"data directory (default ${DATA_DIR_ENV} or {DATA_DIR_DEFAULT})",
    )
    parser.add_argument(
        "--signing-key",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"Ed25519 key that signs ledger heads, kept outside the data directory "
             f"(default ${SIGNING_KEY_ENV}; make one with `genki keys signing create`)",
    )


def apply_signing_key_arg(args: argparse.Namespace) -> None:
    """`--signing-key FILE` reaches every ledger this process opens (engine.ledger.signing)."""
    path = getattr(args, "signing_key", None)
    if path is not None:
        os.environ[SIGNING_KEY_ENV] = str(Path(path).resolve())


def data_dir_of(args: argparse.Namespace) -> Path:
    from engine.storage import private_dir

    path = args.data_dir if getattr(args, "data_dir", None) else default_data_dir()
    return private_dir(path)  # 0700 (engine.storage)
