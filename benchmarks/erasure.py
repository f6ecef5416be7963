"""What one erasure costs: `erase_person` on a simulated fleet's data directory.

Builds the fleet (simulate → ingest → rules → ledger, with a few redemptions),
then erases several people one after another and prints the time per erasure
and its parts (log, ledger), next to the reference measured in the same run:
one sequential copy of the data directory's log and ledger files (a full pass
over the bytes erasure has to search).

    .venv/bin/python benchmarks/erasure.py [--participants 300] [--app-users 2400] [--days 28] [--people 3] [--json]
"""

from __future__ import annotations

import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import NOW_MS, fleet_arguments, ingest_fleet, print_result, simulate_fleet

from engine.erasure import erase_person
from engine.ingest.log import EmbeddedLog
from engine.ledger import Ledger
from engine.pipeline import run_pipeline

PEOPLE_DEFAULT = 3


def copy_reference_s(data_dir: Path, scratch: Path) -> float:
    start = time.perf_counter()
    for name in ("log.sqlite", "ledger.sqlite"):
        shutil.copyfile(data_dir / name, scratch / name)
    return time.perf_counter() - start


def main() -> None:
    args = fleet_arguments(__doc__)
    people = PEOPLE_DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fleet, data_dir = simulate_fleet(args, root), root / "data"
        counts = ingest_fleet(fleet, data_dir)
        shutil.rmtree(fleet)
        run_pipeline(data_dir)
        with EmbeddedLog.open(data_dir, writer=False) as log:
            users = sorted(log.read_activities(0, log.position()).users)
        chosen = users[:: max(1, len(users) // people)][:people]
        with Ledger.open(data_dir) as ledger:
            for user in chosen:
                if ledger.balance(user) > 0:
                    ledger.redeem(user, 1, "shop-bench", "T1", f"bench-{user}", NOW_MS)
        log_bytes = (data_dir / "log.sqlite").stat().st_size
        ledger_bytes = (data_dir / "ledger.sqlite").stat().st_size
        (root / "copy").mkdir()
        reference_s = copy_reference_s(data_dir, root / "copy")
        times, removed = [], []
        for user in chosen:
            start = time.perf_counter()
            result = erase_person(data_dir, user, "benchmark", "bench")
            times.append(time.perf_counter() - start)
            removed.append(sum(result.removed["data_dir"].values()))
        again_start = time.perf_counter()
        erase_person(data_dir, chosen[0], "benchmark, again", "bench")
        again_s = time.perf_counter() - again_start
    median_s = statistics.median(times)
    result = {
        "people": args.participants + args.app_users, "days": args.days,
        "records": counts.received, "log_mb": round(log_bytes / 1e6, 1),
        "ledger_mb": round(ledger_bytes / 1e6, 1),
        "erasures": len(times), "erase_s_median": round(median_s, 3),
        "erase_s_max": round(max(times), 3), "erase_again_s": round(again_s, 3),
        "rows_removed_median": int(statistics.median(removed)),
        "reference_copy_files_s": round(reference_s, 3),
        "ratio_erase_to_copy": round(median_s / reference_s, 3),
        "python": platform.python_version(),
    }
    print_result(result, args.json)


if __name__ == "__main__":
    main()
