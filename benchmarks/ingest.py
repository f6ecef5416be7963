"""Embedded ingest throughput: NDJSON segments → validated, de-duplicated, durable log.

Prints samples/s for `EmbeddedLog.ingest_lines` over watch-like segments (per-minute
steps, 5-minute heart rate) with 5 % overlapping re-syncs, and the ratio to the
floor measured in the same run: orjson.loads + numpy conversion of the same lines
(what any decoder must at least pay).

    .venv/bin/python benchmarks/ingest.py [--users 1500] [--days 7] [--json]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.ingest.log import EmbeddedLog
from engine.ingest.reader import BATCH_LINES_MAX

T0_MS = 1_788_188_400_000  # 2026-09-01T00:00+09:00
MINUTE_MS = 60_000
NOW_MS = T0_MS + 400 * 86_400_000


def make_lines(users: int, days: int, seed: int) -> tuple[list[bytes], int]:
    rng = np.random.default_rng(seed)
    lines: list[bytes] = []
    samples = 0
    for day in range(days):
        for sync in range(3):
            start = T0_MS + day * 86_400_000 + (6 + sync * 5) * 3_600_000
            minutes = np.arange(300 + (30 if rng.random() < 0.05 else 0)) - 30 * (sync > 0)
            ts = start + minutes * MINUTE_MS
            for user in range(users):
                steps = rng.poisson(8, len(ts))
                uid = f"W{user:05d}"
                lines.append(orjson.dumps({
                    "v": 1, "upload_id": f"{uid}-{day}-{sync}", "user_id": uid,
                    "device_id": uid + "-watch1", "metric": "steps", "unit": "count",
                    "ts_ms": ts, "values": steps}, option=orjson.OPT_SERIALIZE_NUMPY))
                hr_ts = np.ascontiguousarray(ts[::5])
                lines.append(orjson.dumps({
                    "v": 1, "upload_id": f"{uid}-{day}-{sync}-hr", "user_id": uid,
                    "device_id": uid + "-watch1", "metric": "heart_rate", "unit": "bpm",
                    "ts_ms": hr_ts, "values": rng.integers(55, 110, len(hr_ts))},
                    option=orjson.OPT_SERIALIZE_NUMPY))
                samples += len(ts) + len(hr_ts)
    return lines, samples


def parse_floor(lines: list[bytes]) -> float:
    start = time.perf_counter()
    for line in lines:
        body = orjson.loads(line)
        np.asarray(body["ts_ms"], dtype=np.int64)
        np.asarray(body["values"], dtype=np.float64)
    return time.perf_counter() - start


def ingest_once(lines: list[bytes]) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp, EmbeddedLog.open(Path(tmp)) as log:
        start = time.perf_counter()
        total: dict[str, int] = {}
        for lo in range(0, len(lines), BATCH_LINES_MAX):
            counts = log.ingest_lines(lines[lo:lo + BATCH_LINES_MAX], "bench", lo + 1, NOW_MS)
            for key, value in counts.as_dict().items():
                if isinstance(value, int):
                    total[key] = total.get(key, 0) + value
        return time.perf_counter() - start, total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=1500)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    lines, samples = make_lines(args.users, args.days, args.seed)
    floor_s = parse_floor(lines)
    ingest_s, counts = ingest_once(lines)
    result = {
        "records": len(lines), "samples": samples,
        "accepted_samples": counts["accepted_samples"],
        "duplicate_samples": counts["duplicate_samples"],
        "ingest_seconds": round(ingest_s, 3),
        "samples_per_s": round(samples / ingest_s),
        "parse_floor_samples_per_s": round(samples / floor_s),
        "ratio_to_parse_floor": round(floor_s / ingest_s, 3),
        "machine": f"{platform.machine()} {platform.python_version()}",
    }
    if args.json:
        print(orjson.dumps(result).decode())
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value:,}" if isinstance(value, int) else f"{key:>28}: {value}")


if __name__ == "__main__":
    main()
