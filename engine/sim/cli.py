"""`genki simulate`: write a simulated fleet's wire records as NDJSON files."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.sim import config as defaults
from engine.sim.config import SimConfig
from engine.sim.simulate import Progress, simulate


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate", help="generate a realistic fleet of watch participants and app users",
        description="Write profiles, sample segments and activity events as NDJSON in arrival "
                    "order, with injected faults, duplicates, re-syncs and late uploads.")
    parser.add_argument("--participants", type=int, default=defaults.PARTICIPANTS_DEFAULT,
                        help="smartwatch trial participants (default %(default)s)")
    parser.add_argument("--app-users", type=int, default=defaults.APP_USERS_DEFAULT,
                        help="citizen app users (default %(default)s)")
    parser.add_argument("--days", type=int, default=defaults.DAYS_DEFAULT)
    parser.add_argument("--seed", type=int, default=defaults.SEED_DEFAULT)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--start", default=defaults.START_DEFAULT,
                        help="first simulated Tokyo day, YYYY-MM-DD (default %(default)s)")
    parser.add_argument("--venues", type=int, default=defaults.VENUES_DEFAULT)
    parser.add_argument("--shops", type=int, default=defaults.SHOPS_DEFAULT)
    parser.add_argument("--bad-fraction", type=float, default=defaults.BAD_FRACTION_DEFAULT,
                        help="fraction of malformed records added (default %(default)s)")
    parser.add_argument("--duplicate-fraction", type=float,
                        default=defaults.DUPLICATE_FRACTION_DEFAULT,
                        help="fraction of records re-sent byte for byte (default %(default)s)")
    parser.add_argument("--care-data", action="store_true",
                        help="also write care-data.csv (care-need outcomes keyed by pseudonym, "
                             "with a known programme effect) and care-truth.json")
    parser.add_argument("--pseudonym-key-file", type=Path, default=None,
                        help="key for care-data.csv's pseudonyms (default: a simulated key, "
                             "written to pseudonym-key.txt)")
    parser.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    config = SimConfig(
        participants=args.participants, app_users=args.app_users, days=args.days, seed=args.seed,
        start=args.start, venues=args.venues, shops=args.shops, bad_fraction=args.bad_fraction,
        duplicate_fraction=args.duplicate_fraction)
    care_key = _care_key(args, config) if args.care_data else None
    started = time.perf_counter()
    with _progress(sys.stdout.isatty()) as progress:
        manifest = simulate(config, args.out, progress, care_key=care_key)
    seconds = time.perf_counter() - started
    print(f"wrote {manifest.total_records:,} records ({manifest.total_samples:,} samples, "
          f"{manifest.total_bytes / 1e6:,.1f} MB) for {config.participants + config.app_users:,} "
          f"users to {args.out} in {seconds:.1f} s")
    return 0


def _care_key(args: argparse.Namespace, config: SimConfig) -> bytes:
    from engine.evaluation.linkage import read_key_file
    from engine.sim.care import SIM_KEY_FILE, STREAM_CARE, simulated_key
    from engine.sim.simulate import rng_for

    if args.pseudonym_key_file is not None:
        return read_key_file(args.pseudonym_key_file, "simulate")
    key = simulated_key(rng_for(config, STREAM_CARE, 2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / SIM_KEY_FILE).write_bytes(key + b"\n")
    return key


@contextmanager
def _progress(enabled: bool) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    with RichProgress(TextColumn("{task.description:<10}"), BarColumn(), TimeElapsedColumn(),
                      transient=True) as bar:
        tasks: dict[str, object] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)  # type: ignore[arg-type]

        yield update
