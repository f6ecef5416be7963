"""Rules core throughput against numpy's dense day-sum, measured in the same run.

Builds a realistic fleet in-process with numpy (no simulator dependency): watch
users with per-minute steps while active, 3-minute heart rate, nightly SpO2,
resting heart rate, conversation, gait speed and weekly weight; app users with
hourly steps and daily activities; 2 % of app users re-send a day's steps three
days late (those samples earn points but are excluded from flags). Data arrives
as one batch per day, users interleaved, each user's records in order with the
watermarks the log would assign.

Reports samples/s of `RulesEngine.process` (awards as columns + flag events),
the dense limit (np.bincount over a user x day flat index of the same batches),
their ratio, the cost of turning awards into EntryDraft objects, a growth table at
1x/10x/100x users (1x = a tenth of the fleet, same per-user data, fewer days, so
100x = 10x the fleet fits in memory; linear cost = constant samples/s), and a
micro-benchmark of the aggregation primitives.

    .venv/bin/python benchmarks/rules.py [--days 28] [--watch 1500] [--app 12000] [--json]
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.clock import DAY_MS, TOKYO_OFFSET_MS, day_start_ms, iso_to_day
from engine.rules.batch import ActivityBatch, Profiles, SampleBatch
from engine.rules.config import default_rules
from engine.rules.engine import RulesEngine
from engine.schemas import ACTIVITY_KINDS, METRIC_BY_NAME

FIRST_DAY = iso_to_day("2026-09-07")  # a Monday
MINUTE_MS = 60_000
CODE = {name: spec.code for name, spec in METRIC_BY_NAME.items()}
LATE_SHARE = 0.02
GAIT_M_S = np.random.default_rng(11).normal(1.15, 0.15, 1_000_000)  # each watch user's usual
LATE_DAYS = 3


@dataclass(frozen=True)
class Fleet:
    watch: int
    app: int
    thin: int = 1  # keep every thin-th sample time (growth table: fewer samples per user)

    @property
    def users(self) -> int:
        return self.watch + self.app

    def user_ids(self) -> list[str]:
        return [f"W{u:07d}" for u in range(self.watch)] + [f"A{u:07d}" for u in range(self.app)]


def _grid(first_minute: int, last_minute: int, every_minutes: int, thin: int) -> np.ndarray:
    """Minute-of-day offsets (ms) of a sampling schedule."""
    return np.arange(first_minute, last_minute, every_minutes * thin, dtype=np.int64) * MINUTE_MS


def day_batch(fleet: Fleet, day: int, wm_ms: np.ndarray, rng: np.random.Generator
              ) -> SampleBatch:
    """One day of data for every user; updates wm_ms (the log's samples watermarks)."""
    start = day_start_ms(day)
    w, a, thin = fleet.watch, fleet.app, fleet.thin
    blocks = []  # (metric, offsets ms, values matrix rows=users of the block)
    if w:
        steps = _grid(7 * 60, 19 * 60, 1, thin)
        blocks_w = [
            (CODE["steps"], steps, rng.poisson(9, (w, len(steps)))),
            (CODE["heart_rate"], _grid(6 * 60, 22 * 60, 3, thin),
             rng.integers(55, 120, (w, len(_grid(6 * 60, 22 * 60, 3, thin))))),
            (CODE["resting_heart_rate"], _grid(6 * 60, 6 * 60 + 1, 1, 1),
             rng.integers(55, 75, (w, 1))),
            (CODE["spo2"], _grid(0, 6 * 60, 10, thin),
             rng.integers(88, 99, (w, len(_grid(0, 6 * 60, 10, thin))))),
            (CODE["conversation"], _grid(7 * 60, 23 * 60, 60, thin),
             rng.integers(0, 20, (w, len(_grid(7 * 60, 23 * 60, 60, thin))))),
            (CODE["gait_speed"], _grid(8 * 60, 20 * 60, 180, 1),
             (GAIT_M_S[:w, None] + rng.normal(0, 0.05, (w, 4))).clip(0.1, 2.5).round(3)),
        ]
        blocks.append((0, blocks_w))
    if a:
        steps = _grid(0, 24 * 60, 60, thin)
        blocks.append((w, [(CODE["steps"], steps, rng.poisson(300, (a, len(steps))))]))
    users, metrics, ts, values, wm = [], [], [], [], []
    for first_user, parts in blocks:
        rows = len(parts[0][2])
        user = np.arange(first_user, first_user + rows, dtype=np.int32)
        before = wm_ms[user].copy()
        for metric, offsets, matrix in parts:
            users.append(np.repeat(user, len(offsets)))
            metrics.append(np.full(rows * len(offsets), metric, np.int8))
            ts.append((start + offsets)[None, :].repeat(rows, 0).ravel())
            values.append(matrix.astype(np.float64).ravel())
            wm.append(np.repeat(before, len(offsets)))
            before = np.maximum(before, start + offsets.max())
        wm_ms[user] = before
    if a and day >= FIRST_DAY + LATE_DAYS:  # a few app users re-send an old day's steps
        late = np.flatnonzero(rng.random(a) < LATE_SHARE).astype(np.int32) + w
        offsets = _grid(30, 24 * 60, 60, 1)
        users.append(np.repeat(late, len(offsets)))
        metrics.append(np.full(len(late) * len(offsets), CODE["steps"], np.int8))
        ts.append(np.tile(day_start_ms(day - LATE_DAYS) + offsets, len(late)))
        values.append(rng.poisson(200, len(late) * len(offsets)).astype(np.float64))
        wm.append(np.repeat(wm_ms[late], len(offsets)))
    user = np.concatenate(users)
    order = np.argsort(rng.permutation(fleet.users)[user], kind="stable")  # users interleaved
    return _compact(fleet, user[order], np.concatenate(metrics)[order],
                    np.concatenate(ts)[order], np.concatenate(values)[order],
                    np.concatenate(wm)[order])


def _compact(fleet: Fleet, user: np.ndarray, metric: np.ndarray, ts: np.ndarray,
             value: np.ndarray, wm: np.ndarray) -> SampleBatch:
    """Batch-local user indices, as the log hands them over."""
    present, local = np.unique(user, return_inverse=True)
    ids = fleet.user_ids()
    return SampleBatch([ids[u] for u in present], local.astype(np.int32), metric, ts, value, wm)


def activity_batch(fleet: Fleet, day: int, wm_ms: np.ndarray, rng: np.random.Generator
                   ) -> ActivityBatch:
    app = np.arange(fleet.watch, fleet.users)
    meal = app[rng.random(len(app)) < 0.6]
    brain = app[rng.random(len(app)) < 0.3]
    checkin = np.arange(fleet.users)[rng.random(fleet.users) < 0.1]
    user = np.concatenate([meal, brain, checkin])
    kind = np.concatenate([np.full(len(meal), ACTIVITY_KINDS.index("meal")),
                           np.full(len(brain), ACTIVITY_KINDS.index("brain_training")),
                           np.full(len(checkin), ACTIVITY_KINDS.index("checkin"))]).astype(np.int8)
    ts = day_start_ms(day) + rng.integers(8 * 3_600_000, 20 * 3_600_000, len(user))
    venue = ["" if k != ACTIVITY_KINDS.index("checkin") else f"V{u % 50:02d}"
             for u, k in zip(user.tolist(), kind.tolist(), strict=True)]
    wm = wm_ms[user].copy()
    np.maximum.at(wm_ms, user, ts)
    present, local = np.unique(user, return_inverse=True)
    ids = fleet.user_ids()
    return ActivityBatch([ids[u] for u in present], local.astype(np.int32),
                         [f"{day}-{i}" for i in range(len(user))], kind, ts, venue, wm)


def build(fleet: Fleet, days: int, seed: int = 7) -> list[tuple[SampleBatch, ActivityBatch]]:
    rng = np.random.default_rng(seed)
    samples_wm = np.full(fleet.users, -1, np.int64)
    activities_wm = np.full(fleet.users, -1, np.int64)
    return [(day_batch(fleet, FIRST_DAY + d, samples_wm, rng),
             activity_batch(fleet, FIRST_DAY + d, activities_wm, rng)) for d in range(days)]


def profiles(fleet: Fleet, seed: int = 3) -> Profiles:
    rng = np.random.default_rng(seed)
    return Profiles(fleet.user_ids(), rng.integers(1935, 1995, fleet.users).astype(np.int16),
                    rng.choice(np.array(["F", "M", "X"], dtype=object), fleet.users))


def dense_limit_s(batches: list[tuple[SampleBatch, ActivityBatch]]) -> float:
    """np.bincount day-sum over a (batch user x day) flat index: the floor per sample."""
    total = 0.0
    for samples, _ in batches:
        start = time.perf_counter()
        day = (samples.ts_ms + TOKYO_OFFSET_MS) // DAY_MS
        first = int(day.min())
        span = int(day.max()) - first + 1
        flat = samples.user_idx.astype(np.int64) * span + (day - first)
        np.bincount(flat, weights=samples.value, minlength=len(samples.users) * span)
        total += time.perf_counter() - start
    return total


def run_engine(fleet: Fleet, batches: list[tuple[SampleBatch, ActivityBatch]],
               drafts: bool) -> dict[str, float]:
    engine = RulesEngine(default_rules(), profiles(fleet))
    core = drafting = 0.0
    awards = flags = 0
    for samples, activities in batches:
        start = time.perf_counter()
        out = engine.process(samples, activities)
        core += time.perf_counter() - start
        awards += out.award_count
        flags += len(out.flags)
        if drafts:
            start = time.perf_counter()
            assert len(out.awards) == out.award_count
            drafting += time.perf_counter() - start
    return {"core_s": core, "drafts_s": drafting, "awards": awards, "flags": flags}


def measure(fleet: Fleet, days: int, repeats: int, drafts: bool) -> dict[str, float]:
    batches = build(fleet, days)
    samples = sum(len(s) for s, _ in batches)
    best: dict[str, float] = {}
    limit_s = float("inf")
    for _ in range(repeats):
        gc.collect()
        limit_s = min(limit_s, dense_limit_s(batches))
        result = run_engine(fleet, batches, drafts)
        if not best or result["core_s"] < best["core_s"]:
            best = result
    return {"samples": samples, "activities": sum(len(a) for _, a in batches),
            "batches": len(batches), "limit_s": limit_s, **best}


def aggregators(samples: int = 2_000_000, users: int = 13_500, days: int = 2
                ) -> dict[str, dict[str, int]]:
    """samples/s of (user, day) sum+count primitives at a daily-batch size, for samples in
    log order (records contiguous, ~150 per run) and in random order."""
    import polars as pl

    rng = np.random.default_rng(1)
    runs = np.sort(rng.integers(0, users * days, samples // 150))
    log_order = np.repeat(runs, 150)
    value = rng.integers(0, 30, len(log_order)).astype(np.float64)
    out: dict[str, dict[str, int]] = {}

    def best(function) -> int:  # type: ignore[no-untyped-def]
        times = []
        for _ in range(3):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return round(len(value) / min(times))

    for order, flat in (("log_order", log_order), ("random_order", rng.permutation(log_order))):
        size = users * days

        def bincount(flat=flat, size=size) -> None:  # type: ignore[no-untyped-def]
            np.bincount(flat, minlength=size)
            np.bincount(flat, weights=value, minlength=size)

        def add_at(flat=flat, size=size) -> None:  # type: ignore[no-untyped-def]
            np.add.at(np.zeros(size), flat, value)
            np.add.at(np.zeros(size, np.int64), flat, 1)

        def reduceat_runs(flat=flat, size=size) -> None:  # type: ignore[no-untyped-def]
            start = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
            sums = np.add.reduceat(value, start)
            counts = np.diff(start, append=len(flat))
            np.bincount(flat[start], weights=sums, minlength=size)
            np.bincount(flat[start], weights=counts, minlength=size)

        frame = pl.DataFrame({"k": flat, "v": value})
        out[order] = {
            "np.bincount": best(bincount),
            "np.add.at": best(add_at),
            "runs+np.add.reduceat": best(reduceat_runs),
            "polars.group_by": best(lambda frame=frame: frame.group_by("k").agg(
                pl.col("v").sum(), pl.len())),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--watch", type=int, default=1500)
    parser.add_argument("--app", type=int, default=12000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--growth-days", type=int, default=3)
    parser.add_argument("--growth-base", type=int, default=10,
                        help="growth 1x = the fleet divided by this (default 10: 1,350 users)")
    parser.add_argument("--no-growth", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    main_run = measure(Fleet(args.watch, args.app), args.days, args.repeats, drafts=True)
    samples = main_run["samples"]
    result: dict[str, object] = {
        "samples_per_s": round(samples / main_run["core_s"]),
        "dense_limit_samples_per_s": round(samples / main_run["limit_s"]),
        "ratio": round(main_run["limit_s"] / main_run["core_s"], 3),
        "samples": samples,
        "activities": main_run["activities"],
        "batches": main_run["batches"],
        "users": args.watch + args.app,
        "days": args.days,
        "awards": main_run["awards"],
        "flags": main_run["flags"],
        "drafts_per_s": round(main_run["awards"] / main_run["drafts_s"]) if main_run[
            "drafts_s"] else None,
        "with_drafts_samples_per_s": round(samples / (main_run["core_s"] + main_run["drafts_s"])),
    }
    if not args.no_growth:
        growth = []
        for scale in (1, 10, 100):
            fleet = Fleet(args.watch * scale // args.growth_base,
                          args.app * scale // args.growth_base)
            run = measure(fleet, args.growth_days, 1, drafts=False)
            growth.append({"scale": scale, "users": fleet.users, "samples": run["samples"],
                           "samples_per_s": round(run["samples"] / run["core_s"]),
                           "user_days_per_s": round(fleet.users * args.growth_days
                                                    / run["core_s"]),
                           "ratio": round(run["limit_s"] / run["core_s"], 3)})
            gc.collect()
        result["growth"] = growth
    result["aggregators_samples_per_s"] = aggregators()
    result["machine"] = {"python": platform.python_version(), "numpy": np.__version__,
                         "cpus": __import__("os").cpu_count()}
    if args.json:
        print(orjson.dumps(result).decode())
    else:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
