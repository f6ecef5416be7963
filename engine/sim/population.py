"""Who is in the simulated programme: people, their traits, venues and shops.

Every trait is drawn once per person as a column (one numpy array per trait),
so the day and minute generators can broadcast them over whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.clock import DAY_MS, day_to_iso
from engine.sim.config import SimConfig

MINUTES_PER_DAY = 1440
WATCH_AGE_MIN, WATCH_AGE_MAX = 65, 95
APP_AGE_MIN, APP_AGE_MAX = 20, 85
DECLINE_START_FRACTION = 0.4  # short periods: decline starts after this share of the days
DECLINE_RAMP_FRACTION = 0.25  # and reaches its full depth this share of the days later
LONG_PERIOD_DAYS_MIN = 90  # longer periods: onsets spread, sudden or gradual, some recover
ONSET_DAY_MIN = 100  # (or a quarter of the period): a 12-week baseline before the onset
ONSET_END_MARGIN_DAYS = 60
SUDDEN_SHARE = 0.35
SUDDEN_RAMP_DAYS = (1, 4)
GRADUAL_RAMP_DAYS = (14, 57)
RECOVERY_SHARE = 0.3
RECOVERY_AFTER_DAYS = (45, 91)  # of full depth
RECOVERY_RAMP_DAYS = 14
LOW_ACTIVITY_FRACTION_WATCH = 0.06
LOW_ACTIVITY_FRACTION_APP = 0.04
APP_DECLINE_SHARE = 0.5  # app users decline at this share of the watch rate
CHRONIC_ISOLATION_FRACTION = 0.02  # watch participants isolated from the start
# Conditions a person can have, each with an onset, a ramp and maybe a recovery.
CONDITIONS = ("decline", "slow_gait", "weight_loss", "isolated", "spo2", "rhr")
SEX_CODES = ("F", "M", "X")

# Venue kinds: (kind, activity kind it produces, weight, open weekdays Mon=0..Sun=6).
VENUE_KINDS: tuple[tuple[str, str, float, tuple[int, ...]], ...] = (
    ("community_salon", "checkin", 0.36, (0, 1, 2, 3, 4)),
    ("exercise_class", "class", 0.20, (0, 1, 2, 3, 4, 5)),
    ("community_centre", "checkin", 0.14, (0, 1, 2, 3, 4, 5, 6)),
    ("library", "checkin", 0.14, (1, 2, 3, 4, 5, 6)),
    ("volunteering_centre", "volunteer", 0.16, (0, 2, 4, 5, 6)),
)
VENUE_KIND_LABEL = {
    "community_salon": "Community Salon",
    "exercise_class": "Exercise Class",
    "community_centre": "Community Centre",
    "library": "Library",
    "volunteering_centre": "Volunteering Centre",
}
DISTRICTS = (
    "Motohongo", "Yokoyama", "Hachiman", "Owada", "Kitano", "Minamino", "Hirayama", "Naganuma",
    "Takao", "Asakawa", "Hazama", "Kunugida", "Tatemachi", "Yugi", "Kawaguchi", "Kamikawa",
    "Koyasu", "Yarimizu", "Horinouchi", "Minami-Osawa", "Ishikawa", "Nakano", "Owada-machi",
    "Mejirodai", "Kobiki", "Yamada", "Hiyoshi", "Dai", "Uenohara", "Tomoda",
)
SHOP_KINDS = (
    "Bakery", "Greengrocer", "Tofu Shop", "Pharmacy", "Bookshop", "Cafe", "Sento",
    "Fishmonger", "Rice Shop", "Hardware Store", "Florist", "Tea House", "Butcher",
    "Noodle Bar", "Stationer", "Sweets Shop",
)
SHOP_CATEGORIES = {
    "Bakery": "food", "Greengrocer": "food", "Tofu Shop": "food", "Pharmacy": "health",
    "Bookshop": "retail", "Cafe": "dining", "Sento": "leisure", "Fishmonger": "food",
    "Rice Shop": "food", "Hardware Store": "retail", "Florist": "retail",
    "Tea House": "dining", "Butcher": "food", "Noodle Bar": "dining", "Stationer": "retail",
    "Sweets Shop": "food",
}


@dataclass(frozen=True)
class Venues:
    ids: list[str]
    names: list[str]
    kinds: list[str]
    districts: list[str]
    activity_kind: np.ndarray  # int8 index into ("checkin", "class", "volunteer")
    open_mask: np.ndarray  # bool (venues, 7), Monday first

    def as_json(self) -> list[dict[str, object]]:
        activity_names = ("checkin", "class", "volunteer")
        weekday_names = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
        return [
            {"id": vid, "name": name, "kind": kind, "district": district,
             "activity_kind": activity_names[int(act)],
             "open_days": [weekday_names[d] for d in range(7) if self.open_mask[i, d]]}
            for i, (vid, name, kind, district, act) in enumerate(
                zip(self.ids, self.names, self.kinds, self.districts, self.activity_kind,
                    strict=True))
        ]


VENUE_ACTIVITY_NAMES = ("checkin", "class", "volunteer")


def make_venues(count: int, rng: np.random.Generator) -> Venues:
    weights = np.array([k[2] for k in VENUE_KINDS])
    kind_index = rng.choice(len(VENUE_KINDS), size=count, p=weights / weights.sum())
    kind_index[: min(count, len(VENUE_KINDS))] = np.arange(min(count, len(VENUE_KINDS)))
    district = rng.integers(0, len(DISTRICTS), size=count)
    kinds = [VENUE_KINDS[int(k)][0] for k in kind_index]
    names = [f"{DISTRICTS[int(d)]} {VENUE_KIND_LABEL[k]}" for d, k in zip(district, kinds, strict=True)]
    names = _unique_names(names)
    open_mask = np.zeros((count, 7), dtype=bool)
    for i, k in enumerate(kind_index):
        open_mask[i, list(VENUE_KINDS[int(k)][3])] = True
    activity = np.array([VENUE_ACTIVITY_NAMES.index(VENUE_KINDS[int(k)][1]) for k in kind_index],
                        dtype=np.int8)
    return Venues([f"V{i + 1:03d}" for i in range(count)], names, kinds,
                  [DISTRICTS[int(d)] for d in district], activity, open_mask)


def make_shops(count: int, rng: np.random.Generator) -> list[dict[str, str]]:
    kind = rng.integers(0, len(SHOP_KINDS), size=count)
    district = rng.integers(0, len(DISTRICTS), size=count)
    names = _unique_names([f"{DISTRICTS[int(d)]} {SHOP_KINDS[int(k)]}"
                           for d, k in zip(district, kind, strict=True)])
    return [{"id": f"S{i + 1:03d}", "name": names[i], "category": SHOP_CATEGORIES[SHOP_KINDS[int(k)]],
             "district": DISTRICTS[int(d)]}
            for i, (k, d) in enumerate(zip(kind, district, strict=True))]


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} {seen[name]}")
    return out


@dataclass(frozen=True)
class Population:
    """Per-person traits; index i < n_watch is a watch participant, the rest app users."""

    n_watch: int
    n_app: int
    user_ids: list[str]
    age: np.ndarray
    birth_year: np.ndarray
    sex: np.ndarray  # index into SEX_CODES
    consent: np.ndarray
    enrolled_day: np.ndarray
    steps_median: np.ndarray  # usual daily steps
    weekend_factor: np.ndarray
    wake_min: np.ndarray  # minute of the Tokyo day the person usually gets up
    bed_min: np.ndarray
    cadence: np.ndarray  # steps per minute while walking
    low_activity: np.ndarray
    decline: np.ndarray
    decline_drop: np.ndarray  # fraction of steps lost at full decline
    slow_gait: np.ndarray
    weight_loss: np.ndarray
    isolated: np.ndarray
    spo2_low: np.ndarray
    rhr_up: np.ndarray
    # per condition (CONDITIONS order): onset day index (-1: none), ramp days, recovery
    # start day index (-1: none); see level()
    onset: np.ndarray  # int64 (n, conditions)
    ramp: np.ndarray
    recover: np.ndarray
    # watch physiology (meaningful for watch participants only)
    hr_base: np.ndarray
    rhr_rise: np.ndarray
    spo2_base: np.ndarray
    spo2_drop: np.ndarray  # night SpO2 points lost at full depth
    gait_base: np.ndarray
    gait_final: np.ndarray
    weight_base: np.ndarray
    weight_loss_kg: np.ndarray
    sbp_base: np.ndarray
    dbp_base: np.ndarray
    conversation_base: np.ndarray  # minutes per awake hour
    conversation_alone: np.ndarray  # minutes per awake hour once isolated
    meal_base: np.ndarray
    syncs_per_day: np.ndarray  # usual number of watch syncs a day (2..4)
    weigh_weekday: np.ndarray
    # app behaviour
    active_prob: np.ndarray
    meal_prob: np.ndarray
    brain_prob: np.ndarray
    # venues
    regular_venue: np.ndarray  # -1 if not a regular anywhere
    regular_weekday: np.ndarray
    regular_minute: np.ndarray
    nearby_venues: np.ndarray  # (n, 3)
    visits_per_week: np.ndarray

    @property
    def n(self) -> int:
        return self.n_watch + self.n_app

    def level(self, condition: str, days: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """How far each of the people [lo, hi) is into a condition per day: 0 before the
        onset, rising over the ramp to 1, back to 0 over RECOVERY_RAMP_DAYS after a recovery."""
        c = CONDITIONS.index(condition)
        hi = self.n if hi is None else hi
        onset, ramp = self.onset[lo:hi, c][:, None], self.ramp[lo:hi, c][:, None]
        recover = self.recover[lo:hi, c][:, None]
        day = np.arange(days)[None, :]
        rise = np.clip((day - onset + 1) / ramp, 0.0, 1.0)
        fall = np.where(recover >= 0, np.clip((day - recover + 1) / RECOVERY_RAMP_DAYS, 0.0, 1.0),
                        0.0)
        return np.where(onset >= 0, rise * (1.0 - fall), 0.0)

    def device_id(self, index: int) -> str:
        suffix = "-watch1" if index < self.n_watch else "-phone"
        return self.user_ids[index] + suffix

    def profiles(self) -> list[dict[str, object]]:
        cohort = ["watch_trial"] * self.n_watch + ["app"] * self.n_app
        return [
            {"v": 1, "user_id": uid, "birth_year": int(by), "sex": SEX_CODES[int(sx)],
             "cohort": co, "enrolled_on": day_to_iso(int(en)), "research_consent": bool(rc)}
            for uid, by, sx, co, en, rc in zip(self.user_ids, self.birth_year, self.sex, cohort,
                                               self.enrolled_day, self.consent, strict=True)
        ]


def condition_timing(days: int, has: np.ndarray, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Onset day, ramp days and recovery day (-1: none) for the people with a condition.

    Short periods (the 28-day demo): onset at DECLINE_START_FRACTION, full depth
    DECLINE_RAMP_FRACTION later. A long period: onsets spread after a baseline,
    sudden (days) or gradual (weeks), and some people recover.
    """
    n = len(has)
    if days < LONG_PERIOD_DAYS_MIN:
        onset = np.full(n, int(DECLINE_START_FRACTION * days))
        ramp = np.where(rng.random(n) < SUDDEN_SHARE, rng.integers(1, 3, n),
                        max(1, round(DECLINE_RAMP_FRACTION * days)))
        recover = np.full(n, -1)
    else:
        first = min(ONSET_DAY_MIN, days // 4)
        onset = rng.integers(first, max(first + 1, days - ONSET_END_MARGIN_DAYS), n)
        ramp = np.where(rng.random(n) < SUDDEN_SHARE, rng.integers(*SUDDEN_RAMP_DAYS, n),
                        rng.integers(*GRADUAL_RAMP_DAYS, n))
        recover = onset + ramp + rng.integers(*RECOVERY_AFTER_DAYS, n)
        recover = np.where((rng.random(n) < RECOVERY_SHARE) & (recover < days - 30), recover, -1)
    return (np.where(has, onset, -1).astype(np.int64), ramp.astype(np.int64),
            np.where(has, recover, -1).astype(np.int64))


def make_population(config: SimConfig, venues: Venues, rng: np.random.Generator) -> Population:
    nw, na = config.participants, config.app_users
    n = nw + na
    watch = np.arange(n) < nw
    age = np.where(watch, _watch_ages(rng, n), _app_ages(rng, n))
    sex = np.where(watch, (rng.random(n) >= 0.55).astype(np.int8),
                   np.where(rng.random(n) < 0.005, 2, (rng.random(n) < 0.40).astype(np.int8)))
    consent = np.where(watch, rng.random(n) < 0.90, rng.random(n) < 0.75)
    enrolled = config.start_day - np.where(watch, rng.integers(7, 400, n), rng.integers(1, 1100, n))
    birth_year = config.start_year - age - (rng.random(n) < 0.6).astype(np.int64)

    low_activity = rng.random(n) < np.where(watch, LOW_ACTIVITY_FRACTION_WATCH, LOW_ACTIVITY_FRACTION_APP)
    rate = config.decline_fraction / (1 - LOW_ACTIVITY_FRACTION_WATCH)
    decline = ~low_activity & (rng.random(n) < np.where(watch, rate, APP_DECLINE_SHARE * rate))
    age_factor = np.clip(1.0 - 0.022 * np.maximum(age - 65, 0), 0.45, 1.0)
    young = age < 60
    median = np.where(young, 8_000.0, 6_800.0) * age_factor * rng.lognormal(0.0, 0.42, n)
    # Nobody is borderline: usual walkers stay clear of the low-activity floor.
    median = np.where(low_activity, rng.uniform(700, 1_600, n), np.maximum(median, 3_000.0))
    weekend = np.where(young, rng.normal(0.82, 0.08, n), rng.normal(0.93, 0.07, n))
    wake = np.clip(rng.normal(360, 30, n), 290, 440).astype(np.int64)
    bed = np.clip(rng.normal(1_320, 30, n), 1_230, 1_395).astype(np.int64)
    cadence = np.clip(rng.normal(92, 9, n) - 0.4 * np.maximum(age - 70, 0), 60, 120)

    drop = np.where(decline, rng.uniform(0.40, 0.60, n), 0.0)
    decline_watch = decline & watch
    chronic_slow = watch & low_activity & (rng.random(n) < 0.5)
    slow_gait = (decline_watch & (rng.random(n) < 0.6)) | chronic_slow
    weight_loss = decline_watch & (rng.random(n) < 0.45)
    chronic_alone = watch & ~decline & (rng.random(n) < CHRONIC_ISOLATION_FRACTION)
    isolated = (decline_watch & (rng.random(n) < 0.35)) | chronic_alone
    spo2_low = decline_watch & (rng.random(n) < 0.3)
    rhr_up = decline_watch & (rng.random(n) < 0.3)
    onset, ramp, recover = condition_timing(config.days, decline, rng)
    conditions = {"decline": decline, "slow_gait": slow_gait & ~chronic_slow,
                  "weight_loss": weight_loss, "isolated": isolated & ~chronic_alone,
                  "spo2": spo2_low, "rhr": rhr_up}
    onsets = np.stack([np.where(has, onset, -1) for has in conditions.values()], axis=1)
    onsets[:, CONDITIONS.index("slow_gait")] = np.where(chronic_slow, 0, onsets[:, 1])
    onsets[:, CONDITIONS.index("isolated")] = np.where(chronic_alone, 0, onsets[:, 3])
    ramps = np.repeat(ramp[:, None], len(CONDITIONS), axis=1)
    ramps[chronic_slow, 1] = 1
    ramps[chronic_alone, 3] = 1
    recovers = np.stack([np.where(has, recover, -1) for has in conditions.values()], axis=1)

    hr_base = np.clip(rng.normal(71, 7, n), 55, 92)
    gait_base = np.where(low_activity & ~chronic_slow, rng.uniform(1.06, 1.12, n),
                         np.clip(rng.normal(1.15, 0.08, n), 1.06, 1.35))
    gait_final = np.where(chronic_slow, rng.uniform(0.80, 0.93, n),
                          np.where(slow_gait, rng.uniform(0.78, 0.92, n), gait_base))
    gait_base = np.where(chronic_slow, gait_final, gait_base)
    spo2_base = np.clip(np.rint(rng.normal(96.2, 1.0, n)), 94, 98)
    female = sex == 0
    return Population(
        n_watch=nw, n_app=na,
        user_ids=[f"W{i + 1:05d}" for i in range(nw)] + [f"A{i + 1:05d}" for i in range(na)],
        age=age, birth_year=birth_year, sex=sex, consent=consent, enrolled_day=enrolled,
        steps_median=median, weekend_factor=weekend, wake_min=wake, bed_min=bed, cadence=cadence,
        low_activity=low_activity, decline=decline, decline_drop=drop, slow_gait=slow_gait,
        weight_loss=weight_loss, isolated=isolated, spo2_low=spo2_low, rhr_up=rhr_up,
        onset=onsets.astype(np.int64), ramp=ramps.astype(np.int64),
        recover=recovers.astype(np.int64),
        hr_base=hr_base, rhr_rise=np.where(rhr_up, rng.uniform(12, 18, n), 0.0),
        spo2_base=spo2_base,
        spo2_drop=np.where(spo2_low, spo2_base - rng.uniform(85.0, 88.0, n), 0.0),
        gait_base=gait_base, gait_final=gait_final,
        weight_base=np.where(female, rng.normal(52, 7, n), rng.normal(63, 8, n)).clip(35, 110),
        weight_loss_kg=np.where(weight_loss, rng.uniform(2.6, 5.0, n), 0.0),
        sbp_base=np.clip(rng.normal(133, 13, n), 100, 175),
        dbp_base=np.clip(rng.normal(78, 8, n), 55, 100),
        conversation_base=np.maximum(rng.lognormal(np.log(7), 0.5, n), 4.0),  # min per hour
        conversation_alone=rng.uniform(0.5, 1.5, n),
        meal_base=np.clip(rng.normal(0.86, 0.07, n), 0.55, 1.0),
        syncs_per_day=rng.choice([2, 3, 4], size=n, p=[0.3, 0.45, 0.25]),
        weigh_weekday=rng.integers(0, 7, n),
        active_prob=np.clip(rng.beta(5, 1.6, n), 0.15, 1.0),
        meal_prob=rng.beta(2, 2, n) * 0.8,
        brain_prob=rng.beta(2, 3, n),
        **_venue_habits(rng, n, watch, age, chronic_alone, venues),
    )


def _watch_ages(rng: np.random.Generator, n: int) -> np.ndarray:
    # Most trial participants are 65-84; fewer of the oldest.
    age = WATCH_AGE_MIN + np.floor(rng.gamma(2.2, 5.2, n)).astype(np.int64)
    return np.clip(age, WATCH_AGE_MIN, WATCH_AGE_MAX)


def _app_ages(rng: np.random.Generator, n: int) -> np.ndarray:
    # Hachioji's registrants are mostly 60+ (about 6 in 10 aged 74 or under).
    older = rng.random(n) < 0.85
    age_old = 60 + np.floor(rng.beta(1.3, 1.6, n) * (APP_AGE_MAX - 60 + 1)).astype(np.int64)
    age_young = rng.integers(APP_AGE_MIN, 60, n)
    return np.where(older, age_old, age_young)


def _venue_habits(rng: np.random.Generator, n: int, watch: np.ndarray, age: np.ndarray,
                  isolated: np.ndarray, venues: Venues) -> dict[str, np.ndarray]:
    nv = len(venues.ids)
    nearby = rng.integers(0, nv, size=(n, 3))
    regular_p = np.where(watch, 0.35, np.where(age >= 60, 0.18, 0.03))
    regular = (rng.random(n) < regular_p) & ~isolated
    regular_venue = np.where(regular, nearby[:, 0], -1)
    # The regular weekday is one of the venue's open days.
    open_days = venues.open_mask[np.maximum(regular_venue, 0)]
    pick = rng.random((n, 7)) * open_days
    regular_weekday = np.argmax(pick, axis=1)
    regular_minute = np.where(rng.random(n) < 0.6, 600, 810) + rng.integers(-20, 21, n)
    visits = np.where(watch, rng.exponential(0.35, n), np.where(age >= 60, rng.exponential(0.25, n),
                                                               rng.exponential(0.05, n)))
    visits = np.where(isolated, 0.0, np.minimum(visits, 2.0))  # the chronically isolated
    return {"regular_venue": regular_venue, "regular_weekday": regular_weekday,
            "regular_minute": regular_minute, "nearby_venues": nearby, "visits_per_week": visits}


assert DAY_MS == MINUTES_PER_DAY * 60_000
