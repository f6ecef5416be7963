"""Cost of one more day after D days of history (issue 11: bounded state).

For each history length: simulate a fleet over D days ending before today, hold the
last day's sample records back, ingest and run everything else (`genki ingest`,
`genki run`), then time the held-back day's `genki ingest` and `genki run`, each in
its own process so its peak RSS is its own (os.wait4). Prints the table and the
ratio of each figure at the longest history to the shortest, measured in the same
run (target: <= 1.3).

    .venv/bin/python benchmarks/history.py [--days 28 90 365] [--participants 150] [--app-users 1200]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.clock import tokyo_day
from engine.snapshots import snapshot_files

SAMPLES_FILE_PREFIX = "10-samples"
TS_FIELD = b'"ts_ms":['


def genki(*args: str) -> bytes:
    result = subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True,
                            check=False)
    if result.returncode != 0:
        raise SystemExit(f"genki {' '.join(args)} failed: {result.stderr.decode()[-2000:]}")
    return result.stdout


def genki_measured(*args: str) -> tuple[float, float, bytes]:
    """Like genki(), with the child's own rusage (Popen.communicate would reap it first)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        process = subprocess.Popen([sys.executable, "-m", "engine.cli", *args],
                                   stdout=out_file, stderr=err_file)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    if process.returncode != 0:
        raise SystemExit(f"genki {' '.join(args)} failed: {err.decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, out


def first_day_of(line: bytes) -> int | None:
    at = line.find(TS_FIELD)
    if at < 0:
        return None
    end = line.find(b",", at + len(TS_FIELD))
    close = line.find(b"]", at + len(TS_FIELD))
    end = close if end < 0 or (0 <= close < end) else end
    try:
        return tokyo_day(int(line[at + len(TS_FIELD):end]))
    except ValueError:
        return None


def split_last_day(fleet: Path, base: Path, increment: Path) -> int:
    """Copy the fleet to base/, moving sample records of its last full day (and any
    stragglers after it) to increment/."""
    base.mkdir()
    increment.mkdir()
    samples = [p for p in sorted(fleet.iterdir()) if p.name.startswith(SAMPLES_FILE_PREFIX)]
    per_day: dict[int, int] = {}
    for path in samples:
        for line in path.open("rb"):
            day = first_day_of(line)
            if day is not None:
                per_day[day] = per_day.get(day, 0) + 1
    busiest = max(per_day.values())  # faulty records scatter single ones over odd days
    last = max(day for day, count in per_day.items() if count >= busiest // 2)
    held = 0
    for path in sorted(fleet.iterdir()):
        if not path.name.endswith(".ndjson"):
            continue
        if path not in samples:
            shutil.copy(path, base / path.name)
            continue
        with path.open("rb") as source, (base / path.name).open("wb") as kept, \
                (increment / path.name).open("wb") as later:
            for line in source:
                if (first_day_of(line) or 0) >= last:
                    later.write(line)
                    held += 1
                else:
                    kept.write(line)
    return held


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def one_history(days: int, args: argparse.Namespace, root: Path) -> dict[str, object]:
    start = (dt.date.today() - dt.timedelta(days=days + 3)).isoformat()
    fleet, base, increment = root / "fleet", root / "base", root / "increment"
    data = root / "data"
    started = time.perf_counter()
    genki("simulate", "--participants", str(args.participants), "--app-users",
          str(args.app_users), "--days", str(days), "--start", start, "--out", str(fleet))
    held = split_last_day(fleet, base, increment)
    shutil.rmtree(fleet)
    genki("ingest", str(base), "--data-dir", str(data), "--json")
    genki("run", "--data-dir", str(data), "--json")
    setup_s = time.perf_counter() - started
    ingest_s, ingest_mb, _ = genki_measured("ingest", str(increment), "--data-dir", str(data),
                                            "--json")
    run_s, run_mb, out = genki_measured("run", "--data-dir", str(data), "--json")
    summary = orjson.loads(out)
    snapshots = snapshot_files(data)
    return {"history_days": days, "held_back_records": held,
            "increment_samples": summary["samples"], "ingest_s": round(ingest_s, 2),
            "ingest_peak_rss_mb": round(ingest_mb), "run_s": round(run_s, 2),
            "run_peak_rss_mb": round(run_mb), "run_work_s": summary["seconds"],
            "run_replayed_records": summary["replayed_records"],
            "data_dir_mb": round(dir_mb(data)),
            "snapshot_mb": round(snapshots[0][1].stat().st_size / 1e6, 1) if snapshots else 0,
            "setup_s": round(setup_s)}


def kafka_takeover(days: int, args: argparse.Namespace, root: Path) -> dict[str, object]:
    """On a tansu broker: a worker processes D days from offset 0; then another worker of
    the same group takes every partition over with the first one's directory (snapshot +
    tail) and a third without any directory (genki.snapshots + genki.ledger)."""
    import asyncio

    from engine.kafka.combined import combined_ledger
    from engine.kafka.publish import Gateway
    from engine.kafka.topics import create_topics
    from engine.kafka.worker import WorkerSettings, run_worker
    from tests.kafka_fixtures import tansu_broker

    start = (dt.date.today() - dt.timedelta(days=days + 3)).isoformat()
    fleet = root / "fleet"
    genki("simulate", "--participants", str(args.participants), "--app-users",
          str(args.app_users), "--days", str(days), "--start", start, "--out", str(fleet))
    lines = [line for path in sorted(fleet.glob("*.ndjson"))
             for line in path.read_bytes().splitlines() if line.strip()]

    async def publish(bootstrap: str) -> None:
        async with Gateway(bootstrap, "", "none") as gateway:
            await gateway.send_lines([x for x in lines if b'"birth_year"' in x])
            await gateway.flush()
            await gateway.send_lines([x for x in lines if b'"birth_year"' not in x])

    def work(bootstrap: str, data_dir: Path) -> tuple[float, dict[str, object]]:
        settings = WorkerSettings(bootstrap=bootstrap, data_dir=data_dir, group="history",
                                  until_idle=True, session_timeout_ms=2_000,
                                  encryption=False)
        started = time.perf_counter()
        summary = asyncio.run(run_worker(settings)).as_dict()
        return time.perf_counter() - started, summary

    os.environ.setdefault("GENKI_KAFKA_ENCRYPTION", "off")
    with tansu_broker(root / "tansu.log") as bootstrap:
        asyncio.run(create_topics(bootstrap, 4, 1, ""))
        asyncio.run(publish(bootstrap))
        first_s, _ = work(bootstrap, root / "a")
        digest = combined_ledger(root / "a").content_digest
        with_dir_s, _ = work(bootstrap, root / "a")
        without_s, summary = work(bootstrap, root / "b")
        same = combined_ledger(root / "b").content_digest == digest
    return {"kafka_history_days": days, "kafka_records": len(lines),
            "worker_from_offset_0_s": round(first_s, 1),
            "takeover_with_directory_s": round(with_dir_s, 1),
            "takeover_without_directory_s": round(without_s, 1),
            "restored_from_snapshot_partitions": len(
                summary["snapshot_restored_partitions"]),  # type: ignore[arg-type]
            "same_content_digest": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--days", type=int, nargs="*", default=[28, 90, 365])
    parser.add_argument("--participants", type=int, default=150)
    parser.add_argument("--app-users", type=int, default=1200)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--kafka-days", type=int, default=0,
                        help="also time Kafka takeovers after this many days (0: skip)")
    args = parser.parse_args()
    if args.kafka_days:
        with tempfile.TemporaryDirectory(prefix="genki-history-kafka-") as tmp:
            row = kafka_takeover(args.kafka_days, args, Path(tmp))
        print(orjson.dumps(row).decode() if args.json else row, flush=True)
    rows = []
    for days in args.days:
        with tempfile.TemporaryDirectory(prefix="genki-history-") as tmp:
            row = one_history(days, args, Path(tmp))
        rows.append(row)
        print(orjson.dumps(row).decode() if args.json else row, flush=True)
    if not rows:
        return
    first, last = rows[0], rows[-1]
    ratios = {f"{key}_ratio_{last['history_days']}_to_{first['history_days']}":
              round(float(last[key]) / max(float(first[key]), 1e-9), 2)  # type: ignore[arg-type]
              for key in ("ingest_s", "ingest_peak_rss_mb", "run_s", "run_peak_rss_mb")}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "fleet": f"{args.participants} participants + {args.app_users} app users",
              **ratios}
    print(orjson.dumps(result).decode() if args.json else result)


if __name__ == "__main__":
    main()
