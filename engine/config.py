"""Where the data directory is, shared by every command."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DATA_DIR_DEFAULT = "./genki-data"
DATA_DIR_ENV = "GENKI_HOME"


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or DATA_DIR_DEFAULT)


def add_data_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"data directory (default ${DATA_DIR_ENV} or {DATA_DIR_DEFAULT})",
    )


def data_dir_of(args: argparse.Namespace) -> Path:
    path = args.data_dir if getattr(args, "data_dir", None) else default_data_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path
