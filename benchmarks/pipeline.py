"""Embedded end-to-end throughput: simulate → ingest → rules → ledger, on one machine.

Prints samples/s for each stage and end to end, and the ratio to numpy's dense
bincount day-sum over the same samples (the practical limit of this machine),
measured in the same run.

    .venv/bin/python benchmarks/pipeline.py [--participants 300] [--app-users 2400] [--days 28] [--json]
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import fleet_arguments, ingest_fleet, print_result, simulate_fleet
from ingest import parse_floor

from engine.clock import tokyo_days
from engine.ingest.log import EmbeddedLog
from engine.pipeline import run_pipeline


def dense_limit_s(data_dir: Path) -> tuple[float, int]:
    with EmbeddedLog.open(data_dir, writer=False) as log:
        cols = log.read_samples(0, log.position())
    days = tokyo_days(cols.ts_ms)
    day0, width = int(days.min()), int(days.max() - days.min()) + 1
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        flat = cols.user_idx.astype(np.int64) * width + (days - day0)
        np.bincount(flat, weights=cols.value, minlength=len(cols.users) * width)
        best = min(best, time.perf_counter() - start)
    return best, len(cols.ts_ms)


def _is_segment(line: bytes) -> bool:
    try:
        body = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return isinstance(body, dict) and all(
        isinstance(body.get(name), list) and all(isinstance(x, int | float) for x in body[name])
        for name in ("ts_ms", "values"))


def parse_floor_s(fleet: Path) -> float:
    """orjson + numpy over the fleet's sample lines (best of two): the parse floor."""
    lines = [line for path in sorted(fleet.glob("*.ndjson"))
             for line in path.read_bytes().splitlines() if _is_segment(line)]
    return min(parse_floor(lines) for _ in range(2))


def main() -> None:
    args = fleet_arguments(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        fleet, data_dir = simulate_fleet(args, Path(tmp)), Path(tmp) / "data"
        start = time.perf_counter()
        counts = ingest_fleet(fleet, data_dir)
        ingest_s = time.perf_counter() - start
        summary = run_pipeline(data_dir)
        run_s = summary.seconds
        limit_s, samples = dense_limit_s(data_dir)
        floor_s = parse_floor_s(fleet)
    result = {
        "samples": samples, "records": counts.received, "awards": summary.awards_appended,
        "ingest_samples_per_s": round(samples / ingest_s),
        "run_samples_per_s": round(samples / run_s),
        "end_to_end_samples_per_s": round(samples / (ingest_s + run_s)),
        "dense_limit_samples_per_s": round(samples / limit_s),
        "ratio_end_to_end_to_limit": round(limit_s / (ingest_s + run_s), 4),
        "parse_floor_samples_per_s": round(samples / floor_s),
        "ratio_end_to_end_to_parse_floor": round(floor_s / (ingest_s + run_s), 3),
        "ingest_s": round(ingest_s, 2), "run_s": round(run_s, 2),
        "machine": f"{platform.machine()} Python {platform.python_version()}",
    }
    print_result(result, args.json)


if __name__ == "__main__":
    main()
