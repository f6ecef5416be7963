"""Programme evaluation over seeds: does matching recover a known effect where naive comparison fails?

Per seed: simulate a fleet with care outcomes (a true risk ratio of 0.7 for
class attendees, and confounding: healthier, more active people attend more),
ingest it, run the rules, link the care file by pseudonym and run the matched
comparison. Prints, per seed, the true risk difference (among the analysed
treated), the matched and naive estimates with their 95 % bootstrap intervals,
whether each interval contains the truth, and the largest |SMD| after matching;
then the coverage over seeds. Also the evaluation's wall time against the
pipeline run's on the same data (the reference measured in the same run).

    .venv/bin/python benchmarks/evaluation.py [--seeds 10] [--first-seed 1]
        [--participants 100] [--app-users 3000] [--days 84] [--bootstrap 200] [--json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import ingest_fleet

from engine.evaluation.evaluate import EvaluationSpec, evaluate
from engine.evaluation.linkage import link_care_data
from engine.pipeline import run_pipeline
from engine.sim import SimConfig, simulate

KEY = b"evaluation-benchmark-key-0123456789"


def one_seed(seed: int, args: argparse.Namespace, root: Path) -> dict[str, object]:
    fleet, data_dir = root / f"fleet-{seed}", root / f"data-{seed}"
    simulate(SimConfig(participants=args.participants, app_users=args.app_users, days=args.days,
                       seed=seed), fleet, care_key=KEY)
    truth = orjson.loads((fleet / "care-truth.json").read_bytes())
    ingest_fleet(fleet, data_dir)
    run = run_pipeline(data_dir)
    link_care_data(data_dir, fleet / "care-data.csv", KEY)
    started = time.perf_counter()
    report = evaluate(data_dir, KEY, EvaluationSpec(bootstrap=args.bootstrap, seed=seed))
    seconds = time.perf_counter() - started
    true_rd = float(truth["true_risk_difference"])
    matched, naive = report["effect"]["risk_difference"], report["naive"]["risk_difference"]
    return {
        "seed": seed, "treated": report["people"]["treated"],
        "treated_matched": report["people"]["treated_matched"],
        "analysed": report["people"]["analysed"], "true_rd": true_rd,
        "matched_rd": matched["estimate"], "matched_ci": matched["ci95"],
        "matched_covers": matched["ci95"][0] <= true_rd <= matched["ci95"][1],
        "naive_rd": naive["estimate"], "naive_ci": naive["ci95"],
        "naive_covers": naive["ci95"][0] <= true_rd <= naive["ci95"][1],
        "matched_rr": report["effect"]["risk_ratio"]["estimate"],
        "smd_after_max": report["smd_after_max"],
        "smd_before_max": max(abs(r["smd_before"]) for r in report["balance"]),
        "evaluate_s": round(seconds, 1), "pipeline_run_s": round(run.seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--participants", type=int, default=100)
    parser.add_argument("--app-users", type=int, default=3000)
    parser.add_argument("--days", type=int, default=84)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    if not args.json:
        print(f"{'seed':>4} {'treated':>7} {'true RD':>8} {'matched RD [95% CI]':>28} {'ok':>3} "
              f"{'naive RD [95% CI]':>28} {'ok':>3} {'RR':>5} {'SMD max':>7} {'eval s':>6}")
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            row = one_seed(seed, args, Path(tmp))
        rows.append(row)
        if not args.json:
            print(f"{row['seed']:>4} {row['treated_matched']:>7} {row['true_rd']:>8.4f} "
                  f"{row['matched_rd']:>8.4f} [{row['matched_ci'][0]:>7.4f}, "
                  f"{row['matched_ci'][1]:>7.4f}] {'yes' if row['matched_covers'] else 'NO':>3} "
                  f"{row['naive_rd']:>8.4f} [{row['naive_ci'][0]:>7.4f}, "
                  f"{row['naive_ci'][1]:>7.4f}] {'yes' if row['naive_covers'] else 'NO':>3} "
                  f"{row['matched_rr']:>5.2f} {row['smd_after_max']:>7.3f} "
                  f"{row['evaluate_s']:>6.1f}", flush=True)
    summary = {
        "seeds": len(rows),
        "matched_intervals_covering_truth": sum(bool(r["matched_covers"]) for r in rows),
        "naive_intervals_covering_truth": sum(bool(r["naive_covers"]) for r in rows),
        "mean_true_rd": round(sum(float(r["true_rd"]) for r in rows) / len(rows), 4),
        "mean_matched_rd": round(sum(float(r["matched_rd"]) for r in rows) / len(rows), 4),
        "mean_naive_rd": round(sum(float(r["naive_rd"]) for r in rows) / len(rows), 4),
        "smd_after_max": max(float(r["smd_after_max"]) for r in rows),
        "smd_before_max": max(float(r["smd_before_max"]) for r in rows),
        "evaluate_to_pipeline_run_time_ratio": round(
            sum(float(r["evaluate_s"]) for r in rows)
            / max(sum(float(r["pipeline_run_s"]) for r in rows), 1e-9), 2)}
    if args.json:
        print(orjson.dumps({"rows": rows, "summary": summary}).decode())
        return
    for key, value in summary.items():
        print(f"{key:>38}: {value}")


if __name__ == "__main__":
    main()
