"""Fleet simulator throughput: the default fleet (1,500 watch participants, 12,000 app
users, 28 days) generated into a temporary directory, which is deleted afterwards.

Prints JSON {"seconds", "records", "samples", "samples_per_s", "bytes"}; also the
floor measured in the same run: orjson serialising the same number of bytes of
per-minute step segments (what writing this much NDJSON costs at least).

    .venv/bin/python benchmarks/simulate.py [--participants 1500] [--app-users 12000] [--days 28]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.sim import SimConfig, simulate
from engine.sim import config as defaults

FLOOR_SEGMENT_SAMPLES = 300


def serialise_floor(total_bytes: int) -> float:
    """Seconds orjson needs to write total_bytes of 300-sample step segments to memory."""
    ts = 1_788_188_400_000 + np.arange(FLOOR_SEGMENT_SAMPLES, dtype=np.int64) * 60_000
    values = np.random.default_rng(0).integers(0, 120, FLOOR_SEGMENT_SAMPLES).astype(np.int16)
    body = {"v": 1, "upload_id": "0" * 32, "user_id": "W00001", "device_id": "W00001-watch1",
            "metric": "steps", "unit": "count", "ts_ms": ts, "values": values}
    size = len(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))
    start = time.perf_counter()
    for _ in range(total_bytes // size):
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=defaults.PARTICIPANTS_DEFAULT)
    parser.add_argument("--app-users", type=int, default=defaults.APP_USERS_DEFAULT)
    parser.add_argument("--days", type=int, default=defaults.DAYS_DEFAULT)
    parser.add_argument("--seed", type=int, default=defaults.SEED_DEFAULT)
    args = parser.parse_args()
    config = SimConfig(participants=args.participants, app_users=args.app_users, days=args.days,
                       seed=args.seed)
    out = Path(tempfile.mkdtemp(prefix="genki-simulate-"))
    try:
        start = time.perf_counter()
        manifest = simulate(config, out)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    floor_s = serialise_floor(manifest.total_bytes)
    result = {
        "seconds": round(seconds, 2),
        "records": manifest.total_records,
        "samples": manifest.total_samples,
        "samples_per_s": round(manifest.total_samples / seconds),
        "bytes": manifest.total_bytes,
        "serialise_floor_seconds": round(floor_s, 2),
        "floor_ratio": round(floor_s / seconds, 3),
        "config": {"participants": config.participants, "app_users": config.app_users,
                   "days": config.days, "seed": config.seed},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    print(orjson.dumps(result).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
