"""Ledger throughput: batched appends, idempotent re-appends, redemptions, verify, head.

    .venv/bin/python benchmarks/ledger.py --json
    .venv/bin/python benchmarks/ledger.py --drafts 1000000 --batches 1   # one 1M append

Runs on a real file (WAL, synchronous=FULL) in a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.entries import EntryDraft
from engine.ids import derive_id
from engine.ledger import Ledger
from engine.schemas import EntryKind

USERS = 13_000  # Hachioji-sized programme
TS_MS = 1_714_575_600_000


def award_drafts(batch: int, count: int) -> list[EntryDraft]:
    days = [f"2024-0{1 + month}-{day:02d}" for month in range(6) for day in range(1, 29)]
    return [EntryDraft(derive_id("award", batch, n), f"P{n % USERS:05d}", EntryKind.award,
                       1 + n % 3, days[(batch + n) % len(days)], TS_MS + n, "steps_tier",
                       None, "bench") for n in range(count)]


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def run(drafts_per_batch: int, batches: int, redemptions: int,
        expire: bool) -> dict[str, object]:
    results: dict[str, object] = {"drafts_per_batch": drafts_per_batch, "batches": batches,
                                  "load_average_1m_before": round(os.getloadavg()[0], 2)}
    batch_drafts = [award_drafts(batch, drafts_per_batch) for batch in range(batches)]
    with tempfile.TemporaryDirectory() as directory, Ledger.open(Path(directory)) as ledger:
        started = time.perf_counter()
        for batch, drafts in enumerate(batch_drafts):
            ledger.append(drafts, meta={"log_position": str(batch)})
        appended = drafts_per_batch * batches
        results["append_entries_per_s"] = rate(appended, time.perf_counter() - started)

        started = time.perf_counter()
        again = ledger.append(batch_drafts[0])
        assert again.appended == 0
        results["reappend_existing_per_s"] = rate(drafts_per_batch,
                                                  time.perf_counter() - started)

        started = time.perf_counter()
        for n in range(redemptions):
            ledger.redeem(f"P{n % USERS:05d}", 1, "SHOP1", "T1", f"bench-{n}", TS_MS + n)
        results["redemptions_per_s"] = rate(redemptions, time.perf_counter() - started)

        started = time.perf_counter()
        for n in range(redemptions):  # retries of the same keys
            ledger.redeem(f"P{n % USERS:05d}", 1, "SHOP1", "T1", f"bench-{n}", TS_MS + n)
        results["redemption_retries_per_s"] = rate(redemptions, time.perf_counter() - started)

        total = appended + redemptions
        started = time.perf_counter()
        verified = ledger.verify()
        assert verified.ok and verified.entries_checked == total
        results["verify_entries_per_s"] = rate(total, time.perf_counter() - started)

        started = time.perf_counter()
        head = ledger.head()
        results["head_digest_entries_per_s"] = rate(total, time.perf_counter() - started)

        if expire:
            started = time.perf_counter()
            expired = ledger.expire("2024-10-01", 6)
            results["expire_seconds"] = round(time.perf_counter() - started, 3)
            results["expired_lots"] = len(expired)
        results["entries"] = head["entries"]
        results["load_average_1m_after"] = round(os.getloadavg()[0], 2)
        results["ledger_bytes"] = sum(p.stat().st_size for p in Path(directory).iterdir())
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafts", type=int, default=200_000, help="award drafts per append")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--redemptions", type=int, default=2_000)
    parser.add_argument("--no-expire", action="store_true", help="skip the expiry run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = run(args.drafts, args.batches, args.redemptions, not args.no_expire)
    if args.json:
        print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    else:
        for key, value in results.items():
            print(f"{key:28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
