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
DECLINE_START_FRACTION = 0.4  # decline starts after this share of the days
DECLINE_RAMP_FRACTION = 0.25  # and reaches its full depth this share of the days later
LOW_ACTIVITY_FRACTION_WATCH = 0.06
LOW_ACTIVITY_FRACTION_APP = 0.04
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
    spo2_hr: np.ndarray
    # watch physiology (meaningful for watch participants only)
    hr_base: np.ndarray
    rhr_rise: np.ndarray
    spo2_base: np.ndarray
    gait_base: np.ndarray
    gait_final: np.ndarray
    weight_base: np.ndarray
    weight_loss_kg: np.ndarray
    sbp_base: np.ndarray
    dbp_base: np.ndarray
    conversation_base: np.ndarray  # minutes per awake hour
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


def decline_ramp(days: int) -> np.ndarray:
    """0 before the decline starts, rising to 1 at full depth (per day, float64)."""
    start = int(DECLINE_START_FRACTION * days)
    ramp_days = max(1, round(DECLINE_RAMP_FRACTION * days))
    return np.clip((np.arange(days) - start + 1) / ramp_days, 0.0, 1.0)


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
    decline = watch & ~low_activity & (rng.random(n) < config.decline_fraction / (1 - LOW_ACTIVITY_FRACTION_WATCH))
    age_factor = np.clip(1.0 - 0.022 * np.maximum(age - 65, 0), 0.45, 1.0)
    young = age < 60
    median = np.where(young, 8_000.0, 6_800.0) * age_factor * rng.lognormal(0.0, 0.42, n)
    median = np.where(low_activity, rng.uniform(700, 1_800, n), median)
    weekend = np.where(young, rng.normal(0.82, 0.08, n), rng.normal(0.93, 0.07, n))
    wake = np.clip(rng.normal(360, 30, n), 290, 440).astype(np.int64)
    bed = np.clip(rng.normal(1_320, 30, n), 1_230, 1_395).astype(np.int64)
    cadence = np.clip(rng.normal(92, 9, n) - 0.4 * np.maximum(age - 70, 0), 60, 120)

    drop = np.where(decline, rng.uniform(0.40, 0.60, n), 0.0)
    slow_gait = decline & (rng.random(n) < 0.6)
    weight_loss = decline & (rng.random(n) < 0.45)
    isolated = decline & (rng.random(n) < 0.35)
    spo2_hr = decline & (rng.random(n) < 0.35)

    hr_base = np.clip(rng.normal(71, 7, n), 55, 92)
    gait_base = np.where(low_activity, rng.uniform(0.85, 1.05, n),
                         np.clip(rng.normal(1.13, 0.09, n), 0.95, 1.35))
    gait_base = np.where(slow_gait, np.maximum(gait_base, 1.02), gait_base)
    female = sex == 0
    return Population(
        n_watch=nw, n_app=na,
        user_ids=[f"W{i + 1:05d}" for i in range(nw)] + [f"A{i + 1:05d}" for i in range(na)],
        age=age, birth_year=birth_year, sex=sex, consent=consent, enrolled_day=enrolled,
        steps_median=median, weekend_factor=weekend, wake_min=wake, bed_min=bed, cadence=cadence,
        low_activity=low_activity, decline=decline, decline_drop=drop, slow_gait=slow_gait,
        weight_loss=weight_loss, isolated=isolated, spo2_hr=spo2_hr,
        hr_base=hr_base, rhr_rise=np.where(spo2_hr, rng.uniform(10, 15, n), 0.0),
        spo2_base=np.clip(np.rint(rng.normal(96.2, 1.0, n)), 94, 98),
        gait_base=gait_base, gait_final=np.where(slow_gait, rng.uniform(0.78, 0.94, n), gait_base),
        weight_base=np.where(female, rng.normal(52, 7, n), rng.normal(63, 8, n)).clip(35, 110),
        weight_loss_kg=np.where(weight_loss, rng.uniform(2.2, 4.0, n), 0.0),
        sbp_base=np.clip(rng.normal(133, 13, n), 100, 175),
        dbp_base=np.clip(rng.normal(78, 8, n), 55, 100),
        conversation_base=np.where(isolated, rng.uniform(0.5, 2.0, n), rng.lognormal(np.log(7), 0.5, n)),
        meal_base=np.clip(rng.normal(0.86, 0.07, n), 0.55, 1.0),
        syncs_per_day=rng.choice([2, 3, 4], size=n, p=[0.3, 0.45, 0.25]),
        weigh_weekday=rng.integers(0, 7, n),
        active_prob=np.clip(rng.beta(5, 1.6, n), 0.15, 1.0),
        meal_prob=rng.beta(2, 2, n) * 0.8,
        brain_prob=rng.beta(2, 3, n),
        **_venue_habits(rng, n, watch, age, isolated, venues),
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
    visits = np.where(isolated, 0.0, np.minimum(visits, 2.0))
    return {"regular_venue": regular_venue, "regular_weekday": regular_weekday,
            "regular_minute": regular_minute, "nearby_venues": nearby, "visits_per_week": visits}


assert DAY_MS == MINUTES_PER_DAY * 60_000
