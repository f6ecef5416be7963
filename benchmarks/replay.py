"""Researchers' replay throughput: rows/s to pseudonymised Parquet and what-if samples/s.

In one run over one simulated fleet: the embedded pipeline's own `genki run`
throughput (reference), `genki replay` rows/s, and `genki whatif` samples/s.

    .venv/bin/python benchmarks/replay.py [--participants 300] [--app-users 2400] [--days 28] [--json]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.ingest.cli import ingest_paths  # noqa: E402
from engine.ingest.log import EmbeddedLog  # noqa: E402
from engine.pipeline import RULES_DEFAULT_PATH, run_pipeline  # noqa: E402
from engine.sim import SimConfig, simulate  # noqa: E402
from replay.export import export_embedded  # noqa: E402
from replay.whatif import whatif  # noqa: E402

NOW_MS = 1_830_297_600_000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--participants", type=int, default=300)
    parser.add_argument("--app-users", type=int, default=2400)
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fleet, data_dir = Path(tmp) / "fleet", Path(tmp) / "data"
        simulate(SimConfig(participants=args.participants, app_users=args.app_users,
                           days=args.days), fleet)
        with EmbeddedLog.open(data_dir) as log:
            ingest_paths(log, [str(fleet)], now_ms=NOW_MS)
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
    print(orjson.dumps(result).decode() if args.json else
          "\n".join(f"{k:>30}: {v:,}" if isinstance(v, int) else f"{k:>30}: {v}"
                    for k, v in result.items()))


if __name__ == "__main__":
    main()
