"""Care-insurance outcomes for a simulated fleet, with a known programme effect and confounding.

Who becomes an exercise-class regular depends on health: more steps, no low
activity, younger, women and trial participants are more likely to (the seeds'
"are they healthy because they attend, or attend because they are healthy?").
Care-need onset within three years after the treatment period depends on the
same baseline traits; a treated person (at least N class days in the treatment
period, counted from the generated events exactly as `genki evaluate` counts
them) has RISK_RATIO_TRUE times the risk. So a naive comparison overstates the
effect and a comparison matched on baseline covariates should recover it.

care-data.csv is what the care-insurance side would send (keyed by the shared
HMAC pseudonym, see engine.evaluation.linkage); care-truth.json holds the true
effect among the consenting treated aged 65+ (the people `genki evaluate`
analyses by default).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import numpy as np
import orjson

from engine.clock import DAY_MS, day_to_iso
from engine.evaluation import design
from engine.evaluation.linkage import CARE_LEVELS, CareRecord, format_care_csv, pseudonymiser
from engine.sim.activities import KIND_NAMES, Activities
from engine.sim.config import SimConfig
from engine.sim.population import Population, Venues

CARE_DATA_FILE = "care-data.csv"
CARE_TRUTH_FILE = "care-truth.json"
SIM_KEY_FILE = "pseudonym-key.txt"
STREAM_CARE = 40  # random stream number (see engine.sim.simulate.rng_for)
SIM_KEY_BYTES = 32
RISK_RATIO_TRUE = 0.7
CLASS_AGE_YEARS_MIN = 60
STEPS_REFERENCE = 5_000.0
STEPS_LOG_SD = 0.45
# Care need: an initial certification's level mix and the monthly cost of each level (yen).
CARE_LEVEL_SHARES = (0.26, 0.19, 0.24, 0.13, 0.08, 0.06, 0.04)
CARE_COST_YEN_PER_MONTH_MEAN = (21_000, 33_000, 118_000, 152_000, 218_000, 252_000, 290_000)
CARE_COST_SPREAD = 0.25
MONTHS_PER_YEAR = 12


def _steps_z(pop: Population) -> np.ndarray:
    return (np.log(pop.steps_median) - np.log(STEPS_REFERENCE)) / STEPS_LOG_SD


def _logistic(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def class_propensity(pop: Population) -> np.ndarray:
    """Chance of becoming an exercise-class regular (the confounded choice)."""
    watch = np.arange(pop.n) < pop.n_watch
    logit = (-2.0 + 0.9 * _steps_z(pop) - 1.5 * pop.low_activity - 0.05 * (pop.age - 75)
             + 0.3 * (pop.sex == 0) + 0.4 * watch)
    return np.where((pop.age >= CLASS_AGE_YEARS_MIN) & ~pop.isolated, _logistic(logit), 0.0)


def care_risk_untreated(pop: Population) -> np.ndarray:
    """Chance of a care-need certification within the follow-up, without the programme."""
    logit = (-1.5 + 0.10 * (pop.age - 75) - 0.5 * _steps_z(pop) + 1.0 * pop.low_activity
             - 0.15 * (pop.sex == 0))
    return _logistic(logit)


def assign_class_regulars(pop: Population, venues: Venues, rng: np.random.Generator) -> Population:
    """Re-draw who is a regular at an exercise class, by class_propensity."""
    class_code = KIND_NAMES.index("class")
    is_class = venues.activity_kind == class_code
    class_venues, other_venues = np.flatnonzero(is_class), np.flatnonzero(~is_class)
    if not len(class_venues) or not len(other_venues):
        return pop
    n = pop.n
    joins = rng.random(n) < class_propensity(pop)
    class_pick = class_venues[rng.integers(0, len(class_venues), n)]
    other_pick = other_venues[rng.integers(0, len(other_venues), n)]
    was_class = (pop.regular_venue >= 0) & is_class[np.maximum(pop.regular_venue, 0)]
    venue = np.where(joins, class_pick, np.where(was_class, other_pick, pop.regular_venue))
    open_days = venues.open_mask[np.maximum(venue, 0)]
    weekday = np.argmax(rng.random((n, 7)) * open_days, axis=1)
    changed = venue != pop.regular_venue
    return dataclasses.replace(pop, regular_venue=venue,
                               regular_weekday=np.where(changed, weekday, pop.regular_weekday))


def treatment_window(config: SimConfig) -> tuple[int, int, int]:
    """(first day, last day, attendances needed) of the default evaluation design."""
    baseline = design.baseline_days_default(config.days)
    first, last = config.start_day + baseline, config.start_day + config.days - 1
    return first, last, design.attendances_min_default(last - first + 1)


def class_days(acts: Activities, n: int, first_day: int, last_day: int, day0_ms: int,
               start_day: int) -> np.ndarray:
    """Distinct days with a class per person within [first_day, last_day]."""
    is_class = acts.kind == KIND_NAMES.index("class")
    day = start_day + (acts.ts_ms[is_class] - day0_ms) // DAY_MS
    user = acts.user[is_class]
    inside = (day >= first_day) & (day <= last_day)
    pairs = np.unique(user[inside] * 100_000 + (day[inside] - first_day))
    return np.bincount(pairs // 100_000, minlength=n)


def write_care_data(config: SimConfig, pop: Population, acts: Activities, day0_ms: int,
                    out: Path, key: bytes, rng: np.random.Generator) -> dict[str, object]:
    """care-data.csv for everyone in the fleet and care-truth.json; returns the truth."""
    first, last, needed = treatment_window(config)
    attended = class_days(acts, pop.n, first, last, day0_ms, config.start_day)
    treated = attended >= needed
    p0 = care_risk_untreated(pop)
    p = np.where(treated, RISK_RATIO_TRUE * p0, p0)
    onset = rng.random(pop.n) < p
    onset_day = last + rng.integers(1, design.FOLLOWUP_DAYS_DEFAULT + 1, pop.n)
    level = rng.choice(len(CARE_LEVELS), size=pop.n, p=CARE_LEVEL_SHARES)
    cost_mean = np.array(CARE_COST_YEN_PER_MONTH_MEAN)[level]
    cost = np.rint(cost_mean * rng.uniform(1 - CARE_COST_SPREAD, 1 + CARE_COST_SPREAD, pop.n)
                   / 100) * 100
    pseudo = pseudonymiser(key)
    records = [
        CareRecord(pseudo("user", uid), CARE_LEVELS[int(level[i])] if onset[i] else None,
                   dt.date.fromisoformat(day_to_iso(int(onset_day[i]))) if onset[i] else None,
                   int(cost[i]) if onset[i] else 0)
        for i, uid in enumerate(pop.user_ids)]
    (out / CARE_DATA_FILE).write_bytes(format_care_csv(key, records))
    truth = _truth(config, pop, treated, p0, first, last, needed)
    (out / CARE_TRUTH_FILE).write_bytes(orjson.dumps(truth, option=orjson.OPT_INDENT_2) + b"\n")
    return truth


def _truth(config: SimConfig, pop: Population, treated: np.ndarray, p0: np.ndarray, first: int,
           last: int, needed: int) -> dict[str, object]:
    age_years = config.start_year - pop.birth_year
    analysed = pop.consent & (age_years >= design.AGE_YEARS_MIN_DEFAULT)
    group = analysed & treated
    risk0 = float(p0[group].mean()) if group.any() else 0.0
    cost_year = MONTHS_PER_YEAR * float(np.dot(CARE_LEVEL_SHARES, CARE_COST_YEN_PER_MONTH_MEAN))
    difference = (RISK_RATIO_TRUE - 1.0) * risk0
    return {
        "treatment": {"kind": design.TREATMENT_KIND_DEFAULT, "attendances_min": needed,
                      "since": day_to_iso(first), "until": day_to_iso(last)},
        "baseline": {"since": config.start, "until": day_to_iso(first - 1)},
        "followup_days": design.FOLLOWUP_DAYS_DEFAULT,
        "population": f"research consent, aged {design.AGE_YEARS_MIN_DEFAULT}+",
        "people_analysed": int(analysed.sum()),
        "treated_analysed": int(group.sum()),
        "true_risk_ratio": RISK_RATIO_TRUE,
        "true_risk_untreated_among_treated": round(risk0, 6),
        "true_risk_difference": round(difference, 6),
        "true_care_cost_difference_yen_per_year_per_1000": round(1000 * difference * cost_year),
    }


def simulated_key(rng: np.random.Generator) -> bytes:
    """A deterministic stand-in for the key the city shares with the care-insurance side."""
    return rng.bytes(SIM_KEY_BYTES).hex().encode()
