"""A whole year's what-if at two fleet sizes, projected to the default fleet (13,500 people).

For each size: simulate 365 days, ingest, `genki run` (the reference: its samples/s on the
same log, in the same run), then `genki whatif` with the live rules in its own process
(default workers: one per core). Prints samples/s, the ratio to the run, seconds per
thousand people, peak RSS (the what-if process plus its workers) and the projection of
the larger size to 1,500 + 12,000 people against the issue's 60 s goal. With --data-dir
it times the what-if of an existing data directory instead (no set-up, no reference).

    .venv/bin/python benchmarks/whatif_year.py [--sizes 75:600,150:1200] [--days 365]
        [--workers N] [--data-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import ingest_fleet, print_result

from engine.pipeline import RULES_DEFAULT_PATH, run_pipeline
from engine.sim import SimConfig, simulate

PEOPLE_DEFAULT_FLEET = 1_500 + 12_000
WHATIF_YEAR_S_GOAL = 60.0


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="75:600,150:1200",
                        help="fleet sizes as participants:app_users, comma-separated")
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def _whatif(data_dir: Path, workers: int | None) -> dict:
    """`genki whatif --json` in its own process (peak RSS counts only the what-if)."""
    command = [sys.executable, "-m", "engine.cli", "whatif", "--rules", str(RULES_DEFAULT_PATH),
               "--data-dir", str(data_dir), "--json"]
    if workers is not None:
        command += ["--workers", str(workers)]
    done = subprocess.run(command, capture_output=True, check=True)
    result = orjson.loads(done.stdout)
    result["wall_s"] = result["seconds"]  # inside whatif(): workers' start-up in, the CLI's not
    return result


def _measure(participants: int, app_users: int, days: int, workers: int | None,
             root: Path) -> dict:
    fleet, data_dir = root / "fleet", root / "data"
    simulate(SimConfig(participants=participants, app_users=app_users, days=days), fleet)
    ingest_fleet(fleet, data_dir)
    run = run_pipeline(data_dir)
    result = _whatif(data_dir, workers)
    assert result["whatif_points"] == result["live_points"], "what-if of the live rules differs"
    people = participants + app_users
    return {
        "people": people, "days": days, "samples": result["samples"],
        "whatif_s": round(result["wall_s"], 2), "workers": result["workers"],
        "whatif_samples_per_s": round(result["samples"] / result["wall_s"]),
        "run_samples_per_s": round(run.samples / run.seconds),
        "ratio_whatif_to_run": round(run.seconds / result["wall_s"], 2),
        "whatif_s_per_1000_people": round(result["wall_s"] / people * 1000, 2),
        "whatif_peak_rss_mib": result["peak_rss_mib"],
    }


def main() -> None:
    args = _arguments()
    out: dict[str, object] = {"machine": f"{platform.machine()} Python {platform.python_version()}"}
    if args.data_dir is not None:
        result = _whatif(args.data_dir, args.workers)
        out |= {"samples": result["samples"], "whatif_s": round(result["wall_s"], 2),
                "workers": result["workers"], "users": result["users_total"],
                "whatif_samples_per_s": round(result["samples"] / result["wall_s"]),
                "whatif_peak_rss_mib": result["peak_rss_mib"]}
        print_result(out, args.json)
        return
    sizes = [tuple(int(n) for n in size.split(":")) for size in args.sizes.split(",")]
    measured = []
    for participants, app_users in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            measured.append(_measure(participants, app_users, args.days, args.workers, Path(tmp)))
    for row in measured:
        out |= {f"{row['people']}p_{key}": value for key, value in row.items() if key != "people"}
    largest = measured[-1]
    projected = largest["whatif_s"] * PEOPLE_DEFAULT_FLEET / largest["people"]
    out["projected_whatif_s_13500_people"] = round(projected, 1)
    out["projected_under_60_s"] = str(projected < WHATIF_YEAR_S_GOAL)
    if len(measured) > 1:  # linear in people when the ratio is about the people's ratio
        out["scaling_s_ratio_large_to_small"] = round(
            measured[-1]["whatif_s"] / measured[0]["whatif_s"], 2)
        out["scaling_people_ratio"] = round(measured[-1]["people"] / measured[0]["people"], 2)
    print_result(out, args.json)


if __name__ == "__main__":
    main()
