"""Researchers' replay throughput: rows/s to pseudonymised Parquet and what-if samples/s.

In one run over one simulated fleet: the embedded pipeline's own `genki run`
throughput (reference), `genki replay` rows/s, and `genki whatif` samples/s.

    .venv/bin/python benchmarks/replay.py [--participants 300] [--app-users 2400] [--days 28] [--json]
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import fleet_arguments, ingest_fleet, print_result, simulate_fleet

from engine.pipeline import RULES_DEFAULT_PATH, run_pipeline
from replay.export import export_embedded
from replay.whatif import whatif


def main() -> None:
    args = fleet_arguments(__doc__)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        ingest_fleet(simulate_fleet(args, Path(tmp)), data_dir)
        run = run_pipeline(data_dir)
        start = time.perf_counter()
        manifest = export_embedded(data_dir, Path(tmp) / "export", b"benchmark-key-0123456789")
        replay_s = time.perf_counter() - start
        rows = sum(manifest.rows.values())
        result_whatif = whatif(data_dir, RULES_DEFAULT_PATH)
    result = {
        "samples": run.samples,
        "pipeline_run_samples_per_s": round(run.samples / run.seconds),
        "replay_rows": rows,
        "replay_rows_per_s": round(rows / replay_s),
        "whatif_samples_per_s": round(result_whatif.samples / result_whatif.seconds),
        "ratio_whatif_to_pipeline_run": round(run.seconds / result_whatif.seconds, 3),
        "machine": f"{platform.machine()} Python {platform.python_version()}",
    }
    print_result(result, args.json)


if __name__ == "__main__":
    main()
