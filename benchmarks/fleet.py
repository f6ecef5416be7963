"""Shared set-up of the fleet benchmarks: command-line sizes, a simulated fleet, output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.ingest.cli import ingest_paths
from engine.ingest.log import EmbeddedLog, IngestCounts
from engine.sim import SimConfig, simulate

NOW_MS = 1_830_297_600_000  # 2028-01-01: after any simulated period


def fleet_arguments(description: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--participants", type=int, default=300)
    parser.add_argument("--app-users", type=int, default=2400)
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def simulate_fleet(args: argparse.Namespace, root: Path) -> Path:
    fleet = root / "fleet"
    simulate(SimConfig(participants=args.participants, app_users=args.app_users,
                       days=args.days), fleet)
    return fleet


def ingest_fleet(fleet: Path, data_dir: Path) -> IngestCounts:
    """As `genki ingest` does it (its log keeps no recent samples: nothing reads them)."""
    with EmbeddedLog.open(data_dir, recent=False) as log:
        return ingest_paths(log, [str(fleet)], now_ms=NOW_MS)


def print_result(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(result).decode())
        return
    for key, value in result.items():
        print(f"{key:>30}: {value:,}" if isinstance(value, int) else f"{key:>30}: {value}")
