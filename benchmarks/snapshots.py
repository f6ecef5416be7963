"""Engine snapshots in a long catch-up `genki run`: spaced by count only, or by size too.

One simulated fleet is ingested once; then `genki run` processes the whole log twice,
each time from a copy of the same data directory, alternating:
(a) a snapshot every SNAPSHOT_INTERVAL_RECORDS positions whatever the state's size
    (what the pipeline did before), and
(b) the default: also at least the last snapshot's size / SNAPSHOT_BYTES_PER_RECORD
    positions apart.
Prints, for each: wall seconds, snapshots written, the last one's size, and the time
(b) / (a). The ledgers must be the same (content digest), or the figures are void.
The full fleet's year (17.6 M positions) had its ~300 MB state written every 200,000
positions by count: 87 snapshots, ~1,500 bytes a position. Its 28 days (~1.3 M
positions) have a ~55 MB state, so the default count interval here, 40,000, writes
the same bytes per position (~1,400), and the ratio stands for the year's.

    .venv/bin/python benchmarks/snapshots.py [--participants 1500] [--app-users 12000]
        [--days 28] [--interval 40000] [--repeat 2] [--json]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import ingest_fleet, print_result

import engine.pipeline as pipeline_module
from engine.ledger import Ledger
from engine.pipeline import SNAPSHOT_BYTES_PER_RECORD, Pipeline, run_pipeline
from engine.sim import SimConfig, simulate
from engine.snapshots import snapshot_files

BY_COUNT_ONLY = 1 << 62  # bytes a position: the size never spaces snapshots further


def one_run(source: Path, work: Path, interval: int, bytes_per_record: int) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work)
    made: list[Pipeline] = []

    def configured(*args: Any, **kwargs: Any) -> Pipeline:
        made.append(Pipeline(*args, snapshot_records=interval,
                             snapshot_bytes_per_record=bytes_per_record, **kwargs))
        return made[-1]

    pipeline_module.Pipeline = configured  # type: ignore[assignment,misc]
    try:
        summary = run_pipeline(work)
    finally:
        pipeline_module.Pipeline = Pipeline  # type: ignore[misc]
    with Ledger.open(work) as ledger:
        digest = ledger.head()["content_digest"]
    newest = snapshot_files(work)[0][1]
    return {"seconds": summary.seconds, "snapshots": made[0].snapshots_written,
            "last_snapshot_mb": round(newest.stat().st_size / 1e6, 1), "digest": digest,
            "awards": summary.awards_appended}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", type=int, default=1500)
    parser.add_argument("--app-users", type=int, default=12000)
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--interval", type=int, default=40_000,
                        help="positions between two snapshots by count")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="genki-bench-snapshots-") as name:
        tmp = Path(name)
        simulate(SimConfig(participants=args.participants, app_users=args.app_users,
                           days=args.days), tmp / "fleet")
        counts = ingest_fleet(tmp / "fleet", tmp / "data")
        runs: dict[str, list[dict[str, Any]]] = {"by_count": [], "by_size": []}
        for _ in range(args.repeat):
            runs["by_count"].append(one_run(tmp / "data", tmp / "run", args.interval,
                                            BY_COUNT_ONLY))
            runs["by_size"].append(one_run(tmp / "data", tmp / "run", args.interval,
                                           SNAPSHOT_BYTES_PER_RECORD))
    digests = {run["digest"] for kind in runs.values() for run in kind}
    assert len(digests) == 1, f"the ledgers differ: {digests}"
    best = {kind: min(r["seconds"] for r in kind_runs) for kind, kind_runs in runs.items()}
    result = {
        "records": counts.received, "awards": runs["by_size"][0]["awards"],
        "interval_positions": args.interval, "bytes_per_position": SNAPSHOT_BYTES_PER_RECORD,
        "last_snapshot_mb": runs["by_size"][0]["last_snapshot_mb"],
        "by_count_snapshots": runs["by_count"][0]["snapshots"],
        "by_size_snapshots": runs["by_size"][0]["snapshots"],
        "by_count_run_s": [r["seconds"] for r in runs["by_count"]],
        "by_size_run_s": [r["seconds"] for r in runs["by_size"]],
        "ratio_by_size_to_by_count": round(best["by_size"] / best["by_count"], 3),
        "machine": f"{platform.machine()} Python {platform.python_version()}",
    }
    print_result(result, args.json)


if __name__ == "__main__":
    main()
