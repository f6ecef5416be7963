"""Flag quality on simulated cohorts: recall, precision, alert burden, time to detection.

    python benchmarks/flags_quality.py --days 365 --seeds 201 202 [--rules FILE] [--json]

Each seed's fleet is generated exactly as `genki simulate` generates it (same
random streams), but fed to the rules engine directly, one Tokyo day per batch,
without the wire files: steps as one daily total per person (flags read daily
totals), the other metrics flags read sample by sample, activities as events.
Late uploads, duplicates and faulty records of the files are left out, so this
is the rules' quality, not the pipeline's; `genki flags evaluate --truth` scores
a real data directory. Prints one Markdown table per cohort plus the seeds
pooled, and the time taken (the machine: 2 cores shared with other agents).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from engine.clock import DAY_MS, day_start_ms, day_to_iso
from engine.rules.batch import ActivityBatch, Profiles, SampleBatch
from engine.rules.config import Rules, default_rules, load_rules
from engine.rules.engine import RulesEngine
from engine.schemas import ACTIVITY_KINDS, METRIC_BY_NAME
from engine.sim import care
from engine.sim.activities import KIND_NAMES, make_activities
from engine.sim.config import SimConfig
from engine.sim.population import MINUTES_PER_DAY, SEX_CODES, make_population, make_venues
from engine.sim.simulate import (
    PHONE_BLOCK_CELLS_MAX,
    STREAM_ACTIVITIES,
    STREAM_PEOPLE,
    STREAM_PHONE,
    STREAM_VENUES,
    STREAM_WATCH,
    WATCH_BLOCK_CELLS_MAX,
    rng_for,
)
from engine.sim.truth import FlagChange, FlagScore, format_table, ground_truth, score_flags
from engine.sim.vitals import PHONE_HOURS, Block, Samples, phone_block, watch_block

FLAG_METRICS = ("resting_heart_rate", "conversation", "spo2", "body_weight", "gait_speed")
STEPS_CODE = METRIC_BY_NAME["steps"].code
LATE_HOUR_MS = 23 * 3_600_000


@dataclass
class Cohort:
    config: SimConfig
    changes: list[FlagChange]
    truth: dict[str, object]
    seconds: float

    def scores(self) -> list[FlagScore]:
        return score_flags(self.changes, self.truth, self.config.participants
                           + self.config.app_users, day_to_iso(self.config.start_day),
                           day_to_iso(self.config.start_day + self.config.days - 1))


def _columns(config: SimConfig) -> tuple[object, dict[str, list[np.ndarray]]]:
    """The population and every sample flags read, as (user, day, ts, metric, value)."""
    venues = make_venues(config.venues, rng_for(config, STREAM_VENUES))
    pop = make_population(config, venues, rng_for(config, STREAM_PEOPLE))
    pop = care.assign_class_regulars(pop, venues, rng_for(config, care.STREAM_CARE, 0))
    day0_ms = day_start_ms(config.start_day)
    watch_users = max(1, WATCH_BLOCK_CELLS_MAX // (config.days * MINUTES_PER_DAY))
    phone_users = max(1, PHONE_BLOCK_CELLS_MAX // (config.days * PHONE_HOURS))
    blocks = ([("watch", lo, min(lo + watch_users, pop.n_watch))
               for lo in range(0, pop.n_watch, watch_users)]
              + [("phone", lo, min(lo + phone_users, pop.n))
                 for lo in range(pop.n_watch, pop.n, phone_users)])
    parts: dict[str, list[np.ndarray]] = {"user": [], "ts": [], "metric": [], "value": []}
    active_parts = []
    for number, (kind, lo, hi) in enumerate(blocks):
        block = Block(pop, lo, hi, config.days, config.start_day, day0_ms)
        stream = STREAM_WATCH if kind == "watch" else STREAM_PHONE
        data_rng = rng_for(config, stream, 3 * number)
        if kind == "watch":
            samples = watch_block(block, data_rng)
        else:
            samples, active = phone_block(block, data_rng)
            active_parts.append(active)
        _add_daily_steps(parts, samples["steps"], day0_ms)
        for name in FLAG_METRICS:
            if name in samples:
                got = samples[name]
                parts["user"].append(got.user)
                parts["ts"].append(got.ts_ms)
                parts["metric"].append(np.full(len(got), METRIC_BY_NAME[name].code, np.int8))
                parts["value"].append(got.values.astype(np.float64))
    app_active = (np.concatenate(active_parts) if active_parts
                  else np.zeros((0, config.days), dtype=bool))
    acts = make_activities(pop, venues, app_active, config.days, config.start_day, day0_ms,
                           config.late_fraction, rng_for(config, STREAM_ACTIVITIES, 0))
    parts["act_user"], parts["act_ts"], parts["act_kind"] = [acts.user], [acts.ts_ms], [
        np.array([ACTIVITY_KINDS.index(KIND_NAMES[k]) for k in acts.kind.tolist()], np.int8)]
    parts["act_venue"] = [acts.venue]
    return pop, parts


def _add_daily_steps(parts: dict[str, list[np.ndarray]], steps: Samples, day0_ms: int) -> None:
    day = (steps.ts_ms - 1 - day0_ms) // DAY_MS  # a step count ends at its ts
    key = steps.user * 100_000 + day
    cells, inverse = np.unique(key, return_inverse=True)
    totals = np.bincount(inverse, weights=steps.values.astype(np.float64))
    user, day = np.divmod(cells, 100_000)
    parts["user"].append(user)
    parts["ts"].append(day0_ms + day * DAY_MS + LATE_HOUR_MS)
    parts["metric"].append(np.full(len(cells), STEPS_CODE, np.int8))
    parts["value"].append(totals)


def run_cohort(config: SimConfig, rules: Rules) -> Cohort:
    started = time.perf_counter()
    pop, parts = _columns(config)
    user = np.concatenate(parts["user"]).astype(np.int64)
    ts = np.concatenate(parts["ts"]).astype(np.int64)
    metric = np.concatenate(parts["metric"])
    value = np.concatenate(parts["value"])
    day0_ms = day_start_ms(config.start_day)
    day = (ts - day0_ms) // DAY_MS
    order = np.lexsort((ts, user, day))
    user, ts, metric, value, day = user[order], ts[order], metric[order], value[order], day[order]
    act_user = parts["act_user"][0]
    act_ts = parts["act_ts"][0]
    act_day = (act_ts - day0_ms) // DAY_MS
    act_order = np.lexsort((act_ts, act_user, act_day))
    act_user, act_ts, act_day = act_user[act_order], act_ts[act_order], act_day[act_order]
    act_kind, act_venue = parts["act_kind"][0][act_order], parts["act_venue"][0][act_order]
    profiles = Profiles(list(pop.user_ids), pop.birth_year.astype(np.int16),
                        np.array([SEX_CODES[int(x)] for x in pop.sex], dtype=object))
    engine = RulesEngine(rules, profiles)
    samples_wm = np.full(pop.n, -1, np.int64)
    activities_wm = np.full(pop.n, -1, np.int64)
    bounds = np.searchsorted(day, np.arange(config.days + 1))
    act_bounds = np.searchsorted(act_day, np.arange(config.days + 1))
    changes: list[FlagChange] = []
    ids = pop.user_ids
    for d in range(config.days):
        lo, hi = bounds[d], bounds[d + 1]
        batch_users, local = np.unique(user[lo:hi], return_inverse=True)
        samples = SampleBatch([ids[u] for u in batch_users.tolist()], local.astype(np.int32),
                              metric[lo:hi], ts[lo:hi], value[lo:hi], samples_wm[user[lo:hi]])
        if hi > lo:
            np.maximum.at(samples_wm, user[lo:hi], ts[lo:hi])
        a_lo, a_hi = act_bounds[d], act_bounds[d + 1]
        a_users, a_local = np.unique(act_user[a_lo:a_hi], return_inverse=True)
        activities = ActivityBatch(
            [ids[u] for u in a_users.tolist()], a_local.astype(np.int32),
            [f"e{i}" for i in range(a_lo, a_hi)], act_kind[a_lo:a_hi], act_ts[a_lo:a_hi],
            [f"V{v + 1:03d}" if v >= 0 else "" for v in act_venue[a_lo:a_hi].tolist()],
            activities_wm[act_user[a_lo:a_hi]])
        if a_hi > a_lo:
            np.maximum.at(activities_wm, act_user[a_lo:a_hi], act_ts[a_lo:a_hi])
        out = engine.process(samples, activities)
        changes += [FlagChange(f.user_id, f.flag.value, f.state.value, f.day) for f in out.flags]
    truth = ground_truth(pop, config.days, config.start_day)
    return Cohort(config, changes, truth, round(time.perf_counter() - started, 1))


def pooled(cohorts: list[Cohort]) -> list[FlagScore]:
    """Scores over several cohorts (user ids prefixed by the seed)."""
    changes = [FlagChange(f"{c.config.seed}:{x.user_id}", x.flag, x.state, x.day)
               for c in cohorts for x in c.changes]
    flags: dict[str, dict[str, object]] = {}
    unscored: dict[str, list[str]] = {}
    for c in cohorts:
        for flag, people in c.truth["flags"].items():  # type: ignore[attr-defined]
            flags.setdefault(flag, {}).update({f"{c.config.seed}:{u}": t for u, t in people.items()})
        for flag, people in c.truth["unscored"].items():  # type: ignore[attr-defined]
            unscored.setdefault(flag, []).extend(f"{c.config.seed}:{u}" for u in people)
    first = cohorts[0].config
    users = sum(c.config.participants + c.config.app_users for c in cohorts)
    return score_flags(changes, {"flags": flags, "unscored": unscored}, users,
                       day_to_iso(first.start_day), day_to_iso(first.start_day + first.days - 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--participants", type=int, default=150)
    parser.add_argument("--app-users", type=int, default=1_200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[201, 202])
    parser.add_argument("--start", default="2025-04-01")
    parser.add_argument("--rules", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rules = load_rules(args.rules) if args.rules else default_rules()
    cohorts = []
    for seed in args.seeds:
        config = SimConfig(participants=args.participants, app_users=args.app_users,
                           days=args.days, seed=seed, start=args.start)
        cohorts.append(run_cohort(config, rules))
        if not args.json:
            print(f"\nseed {seed}: {args.participants} watch + {args.app_users} app users, "
                  f"{args.days} days from {args.start} ({cohorts[-1].seconds} s)")
            print(format_table(cohorts[-1].scores()))
    scores = pooled(cohorts)
    if args.json:
        sys.stdout.write(orjson.dumps({"seeds": args.seeds, "days": args.days,
                                       "scores": [s.as_dict() for s in scores]}).decode() + "\n")
    else:
        print(f"\npooled seeds {args.seeds} (rules {rules.version}):")
        print(format_table(scores))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
