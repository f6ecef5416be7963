"""Researchers' replay throughput: rows/s to pseudonymised Parquet and what-if samples/s.

In one run over one simulated fleet: the embedded pipeline's own `genki run`
throughput (reference), `genki replay` rows/s (wall and CPU seconds, against the
issue's 5 M rows/s goal), and `genki whatif` samples/s in one process and with
the default workers (one per core). A whole year's what-if: benchmarks/whatif_year.py.

    .venv/bin/python benchmarks/replay.py [--participants 300] [--app-users 2400] [--days 28] [--json]
"""

from __future__ import annotations

import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import fleet_arguments, ingest_fleet, print_result, simulate_fleet

from engine.pipeline import RULES_DEFAULT_PATH, run_pipeline
from replay.export import export_embedded
from replay.whatif import whatif, workers_default

REPLAY_ROWS_PER_S_GOAL = 5_000_000


def main() -> None:
    args = fleet_arguments(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        ingest_fleet(simulate_fleet(args, Path(tmp)), data_dir)
        run = run_pipeline(data_dir)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cpu, start = time.process_time(), time.perf_counter()
        manifest = export_embedded(data_dir, Path(tmp) / "export", b"benchmark-key-0123456789")
        replay_s, replay_cpu_s = time.perf_counter() - start, time.process_time() - cpu
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rows = sum(manifest.rows.values())
        one = whatif(data_dir, RULES_DEFAULT_PATH, workers=1)
        parallel = whatif(data_dir, RULES_DEFAULT_PATH, workers=workers_default())
    result = {
        "samples": run.samples,
        "pipeline_run_samples_per_s": round(run.samples / run.seconds),
        "replay_rows": rows,
        "replay_rows_per_s": round(rows / replay_s),
        "replay_cpu_s": round(replay_cpu_s, 2),
        "replay_peak_rss_mib": max(rss_before, rss_after) // 1024,
        "replay_ratio_to_goal_5m_rows_per_s": round(rows / replay_s / REPLAY_ROWS_PER_S_GOAL, 2),
        "whatif_one_process_samples_per_s": round(one.samples / one.seconds),
        f"whatif_{parallel.workers}_workers_samples_per_s": round(
            parallel.samples / parallel.seconds),
        "ratio_whatif_to_pipeline_run": round(run.seconds / min(one.seconds, parallel.seconds), 3),
        "machine": f"{platform.machine()} Python {platform.python_version()}",
    }
    print_result(result, args.json)


if __name__ == "__main__":
    main()
