"""Ledger throughput: batched appends (drafts and columns), re-appends, redemptions, verify, head.

References measured in the same run (the machine is shared, so ratios are what
compare across runs): the same rows inserted into one plain table with the
version 1 layout (unique entry id, user index), one transaction per batch, and
one-row transactions on that file (the fsync floor of a redemption). The
same awards are appended as EntryDraft lists (`append`) and as columns
(`append_awards`, what `genki run` hands over) into two ledgers, wall and CPU
seconds each (CPU compares across a shared machine).

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

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.entries import Awards, EntryDraft
from engine.ids import derive_id
from engine.ledger import Ledger
from engine.schemas import EntryKind
from engine.storage import open_sqlite

USERS = 13_000  # Hachioji-sized programme
TS_MS = 1_714_575_600_000


def award_drafts(batch: int, count: int) -> list[EntryDraft]:
    days = [f"2024-0{1 + month}-{day:02d}" for month in range(6) for day in range(1, 29)]
    return [EntryDraft(derive_id("award", batch, n), f"P{n % USERS:05d}", EntryKind.award,
                       1 + n % 3, days[(batch + n) % len(days)], TS_MS + n, "steps_tier",
                       None, "bench") for n in range(count)]


def award_columns(drafts: list[EntryDraft]) -> Awards:
    """The drafts as the columns the rules engine hands over (ids already derived)."""
    users = sorted({d.user_id for d in drafts})
    days = sorted({str(d.day) for d in drafts})
    user_index = {user: n for n, user in enumerate(users)}
    day_index = {day: n for n, day in enumerate(days)}
    count = len(drafts)
    return Awards([d.entry_id for d in drafts],
                  np.array([user_index[d.user_id] for d in drafts], np.int64), users,
                  np.array([d.points for d in drafts], np.int64),
                  np.array([day_index[str(d.day)] for d in drafts], np.int64), days,
                  np.array([d.ts_ms for d in drafts], np.int64), np.zeros(count, np.int64),
                  ["steps_tier"], np.zeros(count, np.int64), [None], "bench")


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else float("inf")


def reference(directory: Path, batch_drafts: list[list[EntryDraft]],
              commits: int) -> dict[str, float]:
    """Plain SQLite: the rows into a version 1 style table, and one-row commits."""
    db = open_sqlite(directory / "reference.sqlite", busy_wait_s_max=30.0, cache_kib=65_536)
    db.execute("CREATE TABLE entries (seq INTEGER PRIMARY KEY, entry_id TEXT NOT NULL UNIQUE, "
               "user_id TEXT NOT NULL, kind TEXT NOT NULL, points INTEGER NOT NULL, day TEXT, "
               "ts_ms INTEGER NOT NULL, rule TEXT, ref TEXT, rules_version TEXT, "
               "prev_hash TEXT NOT NULL, hash TEXT NOT NULL) STRICT")
    db.execute("CREATE INDEX entries_user ON entries (user_id)")
    fake_hash = "0" * 64
    seq = 0
    started = time.perf_counter()
    for drafts in batch_drafts:
        rows = []
        for d in drafts:
            seq += 1
            rows.append((seq, d.entry_id, d.user_id, d.kind.value, d.points, d.day, d.ts_ms,
                         d.rule, d.ref, d.rules_version, fake_hash, fake_hash))
        db.execute("BEGIN IMMEDIATE")
        db.executemany(f"INSERT INTO entries VALUES ({', '.join('?' * 12)})", rows)
        db.execute("COMMIT")
    inserted = rate(seq, time.perf_counter() - started)
    started = time.perf_counter()
    for n in range(commits):
        db.execute("BEGIN IMMEDIATE")
        db.execute(f"INSERT INTO entries VALUES ({', '.join('?' * 12)})",
                   (seq + n + 1, f"r{n}", "P1", "redeem", -1, None, n, None, None, None,
                    fake_hash, fake_hash))
        db.execute("COMMIT")
    committed = rate(commits, time.perf_counter() - started)
    db.close()
    return {"reference_plain_insert_rows_per_s": inserted,
            "reference_one_row_commits_per_s": committed}


def run(drafts_per_batch: int, batches: int, redemptions: int,
        expire: bool) -> dict[str, object]:
    results: dict[str, object] = {"drafts_per_batch": drafts_per_batch, "batches": batches,
                                  "load_average_1m_before": round(os.getloadavg()[0], 2)}
    batch_drafts = [award_drafts(batch, drafts_per_batch) for batch in range(batches)]
    batch_columns = [award_columns(drafts) for drafts in batch_drafts]
    appended = drafts_per_batch * batches
    with tempfile.TemporaryDirectory() as directory, Ledger.open(Path(directory)) as ledger:
        started, cpu = time.perf_counter(), time.process_time()
        for batch, columns in enumerate(batch_columns):
            ledger.append_awards(columns, meta={"log_position": str(batch)})
        results["append_awards_entries_per_s"] = rate(appended, time.perf_counter() - started)
        results["append_awards_cpu_s"] = round(time.process_time() - cpu, 3)
        columns_head = ledger.head()["content_digest"]
    with tempfile.TemporaryDirectory() as directory, Ledger.open(Path(directory)) as ledger:
        started, cpu = time.perf_counter(), time.process_time()
        for batch, drafts in enumerate(batch_drafts):
            ledger.append(drafts, meta={"log_position": str(batch)})
        results["append_entries_per_s"] = rate(appended, time.perf_counter() - started)
        results["append_cpu_s"] = round(time.process_time() - cpu, 3)
        assert ledger.head()["content_digest"] == columns_head
        results["ratio_awards_to_drafts_cpu"] = round(
            results["append_cpu_s"] / results["append_awards_cpu_s"], 2)

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
        results["ledger_bytes"] = sum(p.stat().st_size for p in Path(directory).iterdir())
        results.update(reference(Path(directory), batch_drafts, redemptions))
        results["append_ratio_to_plain_insert"] = round(
            results["append_entries_per_s"] / results["reference_plain_insert_rows_per_s"], 3)
        results["append_awards_ratio_to_plain_insert"] = round(
            results["append_awards_entries_per_s"]
            / results["reference_plain_insert_rows_per_s"], 3)
        results["redemption_ratio_to_one_row_commit"] = round(
            results["redemptions_per_s"] / results["reference_one_row_commits_per_s"], 3)
        results["load_average_1m_after"] = round(os.getloadavg()[0], 2)
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
