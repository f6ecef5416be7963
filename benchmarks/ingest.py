"""Embedded ingest throughput: NDJSON segments → validated, de-duplicated, durable log.

Prints samples/s for `EmbeddedLog.ingest_lines` over watch-like segments (per-minute
steps, 5-minute heart rate) with 5 % overlapping re-syncs, and the ratio to the
floor measured in the same run: orjson.loads + numpy conversion of the same lines
(what any decoder must at least pay). With --one-sample-records N it ingests N
records of one step sample each (the Kafka per-record workload) in batches of
--batch-lines, and prints microseconds per record against the same floor.

    .venv/bin/python benchmarks/ingest.py [--users 1500] [--days 7] [--json]
    .venv/bin/python benchmarks/ingest.py --one-sample-records 200000 [--batch-lines 5000]
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


def one_sample_lines(records: int) -> list[bytes]:
    """One step sample per record, 2,000 people, one minute apart per person."""
    return [orjson.dumps({"v": 1, "upload_id": f"up{i}", "user_id": f"W{i % 2000:05d}",
                          "device_id": f"W{i % 2000:05d}-watch1", "metric": "steps",
                          "unit": "count", "ts_ms": [T0_MS + (i // 2000) * MINUTE_MS],
                          "values": [i % 97]}) for i in range(records)]


def parse_floor(lines: list[bytes]) -> float:
    start = time.perf_counter()
    for line in lines:
        body = orjson.loads(line)
        np.asarray(body["ts_ms"], dtype=np.int64)
        np.asarray(body["values"], dtype=np.float64)
    return time.perf_counter() - start


def ingest_once(lines: list[bytes], batch_lines: int = BATCH_LINES_MAX) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp, EmbeddedLog.open(Path(tmp)) as log:
        start = time.perf_counter()
        total: dict[str, int] = {}
        for lo in range(0, len(lines), batch_lines):
            counts = log.ingest_lines(lines[lo:lo + batch_lines], "bench", lo + 1, NOW_MS)
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
    parser.add_argument("--one-sample-records", type=int, default=0)
    parser.add_argument("--batch-lines", type=int, default=5_000)
    args = parser.parse_args()
    if args.one_sample_records:
        print_result(one_sample_result(args.one_sample_records, args.batch_lines), args.json)
        return
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
    print_result(result, args.json)


def one_sample_result(records: int, batch_lines: int) -> dict[str, object]:
    """Best of three runs (CPU seconds of this process and wall seconds)."""
    lines = one_sample_lines(records)
    floor_s = min(parse_floor(lines) for _ in range(3))
    wall_s, cpu_s = float("inf"), float("inf")
    for _ in range(3):
        cpu_start = time.process_time()
        wall, counts = ingest_once(lines, batch_lines)
        cpu_s = min(cpu_s, time.process_time() - cpu_start)
        wall_s = min(wall_s, wall)
    assert counts["accepted_samples"] == records
    return {"records": records, "batch_lines": batch_lines,
            "records_per_s": round(records / wall_s),
            "us_per_record": round(wall_s / records * 1e6, 2),
            "cpu_us_per_record": round(cpu_s / records * 1e6, 2),
            "parse_floor_us_per_record": round(floor_s / records * 1e6, 2),
            "ratio_to_parse_floor": round(floor_s / wall_s, 3),
            "machine": f"{platform.machine()} {platform.python_version()}"}


def print_result(result: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(result).decode())
        return
    for key, value in result.items():
        print(f"{key:>28}: {value:,}" if isinstance(value, int) else f"{key:>28}: {value}")


if __name__ == "__main__":
    main()
