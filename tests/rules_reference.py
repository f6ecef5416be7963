"""A plain-Python reference of the rules: one event at a time, dicts, no numpy.

It is written to be obviously correct, not fast; the differential tests require the
vectorised engine (engine.rules.engine) to produce exactly the same award entries
and flag events for any batch split of the same stream.
"""

from __future__ import annotations

import itertools
import math
import random
import tomllib
from collections import defaultdict
from dataclasses import dataclass

from engine.clock import (
    DAY_MS,
    TOKYO_OFFSET_MS,
    day_end_ms,
    day_start_ms,
    day_to_iso,
    iso_to_day,
    week_of_day,
    week_start_day,
)
from engine.entries import EntryDraft
from engine.ids import derive_id
from engine.rules.batch import ActivityRecord, Profiles, SampleRecord, WatermarkLog
from engine.rules.config import RULES_DEFAULT_PATH, Rules, parse_rules_data
from engine.rules.engine import RulesEngine
from engine.schemas import ACTIVITY_KINDS, METRICS, EntryKind, FlagEvent, FlagState

SCALE = 1_000_000
FLAGS = ("step_decline", "low_activity", "slow_gait", "weight_loss", "social_isolation",
         "low_spo2", "resting_hr_rise")
METRIC = {m.name: m.code for m in METRICS}


def day_of(ts_ms: int) -> int:
    return (ts_ms + TOKYO_OFFSET_MS) // DAY_MS


def year_of(day: int) -> int:
    return int(day_to_iso(day)[:4])


def monday_of(day: int) -> int:
    return week_start_day(week_of_day(day))


def fixed(value: float) -> int:
    return round(value * SCALE)


def median(values: list) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


class Reference:
    def __init__(self, rules: Rules, profiles: dict[str, tuple[int, str]]) -> None:
        self.rules = rules
        self.version = rules.version
        self.profiles = profiles
        self.awards: dict[str, EntryDraft] = {}
        self.flags: list[FlagEvent] = []
        # points
        self.steps: dict[tuple[str, int], int] = defaultdict(int)
        self.tier: dict[tuple[str, int], int] = defaultdict(int)
        self.streak_levels: dict[tuple[str, int], int] = defaultdict(int)
        self.activity_keys: set[tuple[str, int, str, str]] = set()
        # flags: included data only
        self.samples_wm: dict[str, int] = {}
        self.activities_wm: dict[str, int] = {}
        self.first_day: dict[str, int] = {}
        self.included: dict[tuple[str, str, int], list[tuple[int, int]]] = defaultdict(list)
        self.social: dict[tuple[str, int], int] = defaultdict(int)
        self.state: dict[tuple[str, str], int] = defaultdict(int)
        self.run: dict[tuple[str, str], int] = defaultdict(int)
        self.anchor: dict[tuple[str, str], float] = defaultdict(float)
        self.last_evaluated: dict[tuple[str, str], int] = {}

    # ---------------------------------------------------------------- events

    def sample_record(self, user: str, metric: int, ts_ms: list[int], values: list[float]) -> None:
        settle = self.rules.flags.settle_days
        before = self.samples_wm.get(user, -1)
        touched = set()
        for ts, value in zip(ts_ms, values, strict=True):
            day = day_of(ts)
            self.first_day[user] = min(self.first_day.get(user, day), day)
            if metric == METRIC["steps"]:
                self.steps[(user, day)] += round(value)
                touched.add(day)
            if before < 0 or day > day_of(before) - settle:
                minute = (ts + TOKYO_OFFSET_MS) % DAY_MS // 60_000
                stored = round(value) if metric == METRIC["steps"] else fixed(value)
                self.included[(user, METRICS[metric].name, day)].append((minute, stored))
        self.samples_wm[user] = max(before, max(ts_ms))
        for day in sorted(touched):
            self._score_day(user, day)
        self._evaluate(user)

    def activity(self, user: str, kind: int, ts_ms: int, venue: str) -> None:
        settle = self.rules.flags.settle_days
        before = self.activities_wm.get(user, -1)
        day = day_of(ts_ms)
        self.first_day[user] = min(self.first_day.get(user, day), day)
        kind_name = ACTIVITY_KINDS[kind]
        included = before < 0 or day > day_of(before) - settle
        if included and kind_name in self.rules.flags.social_isolation.social_kinds:
            self.social[(user, day)] += 1
        self.activities_wm[user] = max(before, ts_ms)
        self._award_activity(user, day, kind_name, venue)
        self._evaluate(user)

    # ---------------------------------------------------------------- points

    def _award(self, user: str, day: int, rule: str, key: object, ref: str | None,
               points: int, ts_ms: int | None = None) -> None:
        assert points > 0
        day_iso = day_to_iso(day)
        entry_id = derive_id("award", user, day_iso, rule, key)
        assert entry_id not in self.awards, f"awarded twice: {user} {day_iso} {rule} {key}"
        self.awards[entry_id] = EntryDraft(
            entry_id, user, EntryKind.award, points, day_iso,
            day_end_ms(day) if ts_ms is None else ts_ms, rule, ref, self.version)

    def thresholds(self, user: str, day: int) -> list[int]:
        steps = self.rules.points.steps
        target = steps.target
        percent = target.percent_default * 100
        profile = self.profiles.get(user)
        if profile is not None:
            birth_year, sex = profile
            age = year_of(day) - birth_year
            band_percent = target.percent_default
            for band in target.bands:
                if age >= band.age_min:
                    band_percent = band.percent
            percent = band_percent * getattr(target.sex_percent, sex)
        return [-(-tier.steps_min * percent // 10_000) for tier in steps.tiers]

    def _score_day(self, user: str, day: int) -> None:
        steps = self.rules.points.steps
        total = self.steps[(user, day)]
        tier = sum(1 for threshold in self.thresholds(user, day) if total >= threshold)
        old = self.tier[(user, day)]
        if tier <= old:
            return
        self.tier[(user, day)] = tier
        cap = steps.points_per_day_max
        cumulative = [0] + [t.points for t in steps.tiers]
        for k in range(old + 1, tier + 1):
            increment = min(cap, cumulative[k]) - min(cap, cumulative[k - 1])
            if increment <= 0:
                continue
            self._award(user, day, f"steps.tier{k}", k, None, increment)
            for campaign in self._campaigns(day, "steps"):
                if campaign.kind == "multiplier":
                    extra = (campaign.factor_percent - 100) * increment // 100
                    if extra > 0:
                        self._award(user, day, f"campaign.{campaign.name}", f"steps.tier{k}",
                                    f"steps.tier{k}", extra)
        target = self.rules.points.streak.target_tier
        if old < target <= tier:
            for campaign in self._campaigns(day, "steps"):
                if campaign.kind == "bonus":
                    self._award(user, day, f"campaign.{campaign.name}", "steps.target",
                                "steps.target", campaign.points)
            self._score_week(user, monday_of(day))

    def _score_week(self, user: str, monday: int) -> None:
        streak = self.rules.points.streak
        met = sum(1 for day in range(monday, monday + 7)
                  if self.tier[(user, day)] >= streak.target_tier)
        done = self.streak_levels[(user, monday)]
        for index, level in enumerate(streak.levels):
            if index >= done and met >= level.days_min:
                ref = f"week:{day_to_iso(monday)}"
                self._award(user, monday + 6, f"streak.{level.name}", ref, ref, level.points)
                self.streak_levels[(user, monday)] = index + 1

    def _campaigns(self, day: int, target: str) -> list:
        return [c for c in self.rules.campaigns
                if target in c.applies_to and c.start_day <= day <= c.end_day]

    def _award_activity(self, user: str, day: int, kind: str, venue: str) -> None:
        rule = getattr(self.rules.points.activities, "class_" if kind == "class" else kind)
        key_venue = venue if rule.once_per == "venue" else ""
        key = (user, day, kind, key_venue)
        if key in self.activity_keys:
            return
        self.activity_keys.add(key)
        if rule.points > 0:
            self._award(user, day, f"activity.{kind}", key_venue, key_venue or None, rule.points)
        for campaign in self._campaigns(day, kind):
            if campaign.venues is not None and key_venue not in campaign.venues:
                continue
            if campaign.kind == "multiplier":
                extra = (campaign.factor_percent - 100) * rule.points // 100
            else:
                extra = campaign.points
            if extra > 0:
                cause = f"activity.{kind}@{key_venue}"
                self._award(user, day, f"campaign.{campaign.name}", cause, cause, extra)

    # ----------------------------------------------------------------- flags

    def _horizon(self, user: str, flag: str) -> int | None:
        """Last settled day for a flag: the samples clock; social_isolation also waits for
        the activities clock, at most activity_wait_days behind the samples clock."""
        settle = self.rules.flags.settle_days
        samples = day_of(self.samples_wm[user]) - settle
        if flag != "social_isolation":
            return samples
        waited = samples - self.rules.flags.social_isolation.activity_wait_days
        if user in self.activities_wm:
            waited = max(waited, day_of(self.activities_wm[user]) - settle)
        return min(samples, waited)

    def _evaluate(self, user: str) -> None:
        if user not in self.samples_wm:
            return
        for flag in FLAGS:
            config = getattr(self.rules.flags, flag)
            if not config.enabled:
                continue
            last = self._horizon(user, flag)
            previous = self.last_evaluated.get((user, flag))
            start = self.first_day[user] if previous is None else previous + 1
            if start > last:
                continue
            for day in range(start, last + 1):
                self._step(user, flag, config, day)
            self.last_evaluated[(user, flag)] = last

    def _step(self, user: str, flag: str, config, day: int) -> None:
        """One evaluated day through the hysteresis (see engine.rules.flags)."""
        key = (user, flag)
        state = self.state[key]
        if flag in ANCHORED:
            level, level_known, anchor, anchor_known, counts = getattr(self, flag)(
                config, user, day)
            used = self.anchor[key] if state else anchor
            if not (level_known and (state or anchor_known)):
                return
            says, evidence = ANCHORED[flag](config, level, used, counts, state)
        else:
            says, evidence = getattr(self, flag)(config, user, day)
            if says is None:
                return
        if says == state:
            self.run[key] = 0
            return
        self.run[key] += 1
        if self.run[key] < (config.clear_after_days if state else config.raise_after_days):
            return
        self.run[key] = 0
        self.state[key] = says
        self.anchor[key] = anchor if says and flag in ANCHORED else 0.0
        state_name = FlagState.raised if says else FlagState.cleared
        day_iso = day_to_iso(day)
        self.flags.append(FlagEvent(
            v=1, flag_id=derive_id("flag", user, flag, day_iso, state_name.value),
            user_id=user, flag=flag, state=state_name, day=day_iso, evidence=evidence,
            rules_version=self.version))

    def _values(self, user: str, metric: str, first: int, last: int) -> list[int]:
        return [value for day in range(first, last + 1)
                for _, value in self.included.get((user, metric, day), [])]

    def _daily(self, user: str, metric: str, first: int, last: int) -> dict[int, list[int]]:
        """Included values per day that has any, for days first..last."""
        out = {}
        for day in range(first, last + 1):
            values = [value for _, value in self.included.get((user, metric, day), [])]
            if values:
                out[day] = values
        return out

    def _worn(self, user: str, first: int, last: int) -> list[int]:
        """Daily step totals of the days first..last the device was worn."""
        floor = self.rules.flags.wear_steps_per_day_min
        return [sum(v) for v in self._daily(user, "steps", first, last).values()
                if sum(v) >= floor]

    def step_decline(self, f, user: str, day: int):
        recent = self._worn(user, day - f.recent_days + 1, day)
        base = self._worn(user, day - f.recent_days - f.baseline_days + 1, day - f.recent_days)
        level = median(recent) if recent else math.nan
        anchor = median(base) if base else math.nan
        return (level, len(recent) >= f.recent_days_with_data_min, anchor,
                len(base) >= f.baseline_days_with_data_min and anchor > 0,
                {"recent_days_with_data": len(recent), "baseline_days_with_data": len(base)})

    def low_activity(self, f, user: str, day: int):
        daily = self._worn(user, day - f.window_days + 1, day)
        if len(daily) < f.days_with_data_min:
            return None, None
        middle = median(daily)
        return int(middle < f.median_steps_per_day_min), {
            "median_steps_per_day": round(middle, 3), "days_with_data": len(daily)}

    def slow_gait(self, f, user: str, day: int):
        values = self._values(user, "gait_speed", day - f.window_days + 1, day)
        if len(values) < f.samples_min:
            return None, None
        middle = median(values)
        return int(middle < fixed(f.gait_speed_median_m_s_min)), {
            "median_gait_speed_m_s": round(middle / SCALE, 3), "samples": len(values)}

    def weight_loss(self, f, user: str, day: int):
        recent = self._values(user, "body_weight", day - f.recent_days + 1, day)
        back = self._values(user, "body_weight", day - f.recent_days - f.lookback_days + 1,
                            day - f.recent_days)
        if len(recent) < f.recent_samples_min or len(back) < f.lookback_samples_min:
            return None, None
        recent_mean = sum(recent) / len(recent)
        heaviest = max(back)
        loss = heaviest - recent_mean
        return int(loss >= fixed(f.loss_kg_min)), {
            "weight_max_kg": round(heaviest / SCALE, 3),
            "weight_recent_kg": round(recent_mean / SCALE, 3),
            "loss_kg": round(loss / SCALE, 3), "recent_samples": len(recent)}

    def social_isolation(self, f, user: str, day: int):
        first = day - f.window_days + 1
        talk = self._daily(user, "conversation", first, day)
        activities = sum(self.social.get((user, d), 0) for d in range(first, day + 1))
        if len(talk) < f.conversation_days_min:
            return None, None
        per_day = sum(sum(v) for v in talk.values()) / len(talk)
        raised = activities == 0 and per_day < fixed(f.conversation_minutes_per_day_min)
        return int(raised), {"social_activities": activities,
                             "conversation_minutes_per_day": round(per_day / SCALE, 3),
                             "conversation_days": len(talk)}

    def low_spo2(self, f, user: str, day: int):
        nights = low = 0
        for night in range(day - f.window_nights + 1, day + 1):
            values = [value for minute, value in self.included.get((user, "spo2", night), [])
                      if minute < f.night_end_hour * 60]
            if values:
                nights += 1
                low += sum(values) < fixed(f.spo2_night_mean_pct_min) * len(values)
        if nights < f.nights_with_data_min:
            return None, None
        return int(low >= f.low_nights_min), {"low_nights": low, "nights_with_data": nights}

    def resting_hr_rise(self, f, user: str, day: int):
        recent = self._daily(user, "resting_heart_rate", day - f.recent_days + 1, day)
        base = self._daily(user, "resting_heart_rate", day - f.recent_days - f.baseline_days + 1,
                           day - f.recent_days)
        recent_values = [v for values in recent.values() for v in values]
        level = sum(recent_values) / len(recent_values) if recent_values else math.nan
        anchor = median([sum(v) / len(v) for v in base.values()]) if base else math.nan
        return (level, len(recent) >= f.recent_days_with_data_min, anchor,
                len(base) >= f.baseline_days_with_data_min,
                {"recent_days_with_data": len(recent), "baseline_days_with_data": len(base)})


def _step_decline_says(f, level: float, anchor: float, counts: dict, state: int):
    limit = f.clear_ratio_min if state else f.ratio_max  # raised: clears only above this
    return int(level <= limit * anchor), {
        "recent_median_steps": round(level, 3), "baseline_median_steps": round(anchor, 3),
        "ratio": round(level / anchor, 3), **counts}


def _resting_hr_says(f, level: float, anchor: float, counts: dict, state: int):
    return int(level - anchor >= fixed(f.rise_bpm_min)), {
        "recent_mean_bpm": round(level / SCALE, 3), "baseline_median_bpm": round(anchor / SCALE, 3),
        "rise_bpm": round((level - anchor) / SCALE, 3), **counts}


# Flags comparing a recent level with a personal baseline frozen while raised.
ANCHORED = {"step_decline": _step_decline_says, "resting_hr_rise": _resting_hr_says}


# ====================================================================== streams
# Generated event streams (seeded, reproducible): a few users over ~60 days with
# weeks crossing month ends, timestamps on both sides of Tokyo midnight, regimes
# that make every flag rise and fall, duplicate activity keys under distinct event
# ids, and records that arrive days late.

HOUR_MS = 3_600_000
# First days chosen so 60-day streams cross several month ends mid-week.
START_DATES = ("2025-01-27", "2025-02-24", "2025-03-29", "2025-06-26", "2025-12-29",
               "2024-02-26")
BIRTH_YEARS = (1938, 1947, 1950, 1957, 1961, 1985)
VENUES = ("V1", "V2", "V3")


@dataclass(frozen=True)
class Stream:
    events: list[SampleRecord | ActivityRecord]
    profiles: dict[str, tuple[int, str]]


def _timestamp(rng: random.Random, day: int) -> int:
    """A time in the day, often right at Tokyo midnight (14:59:59.999 / 15:00 UTC)."""
    choice = rng.random()
    if choice < 0.15:
        return day_start_ms(day)  # 15:00:00.000 UTC the day before
    if choice < 0.3:
        return day_start_ms(day + 1) - 1  # 14:59:59.999 UTC
    if choice < 0.4:
        return day_start_ms(day) + rng.randrange(6 * HOUR_MS)  # night
    return day_start_ms(day) + rng.randrange(DAY_MS)


def generate(seed: int, users: int = 3, days: int = 60, late_share: float = 0.15) -> Stream:
    rng = random.Random(seed)
    first = iso_to_day(rng.choice(START_DATES)) + rng.randrange(4)
    profiles = {}
    timed: list[tuple[int, int, SampleRecord | ActivityRecord]] = []
    taken: set[tuple[str, int, int]] = set()
    event_number = 0
    for u in range(users):
        user = f"U{u}"
        if rng.random() < 0.8:
            profiles[user] = (rng.choice(BIRTH_YEARS), rng.choice("FMX"))
        turn = first + rng.randrange(days)  # regime change: activity drops, vitals worsen
        social = rng.random() < 0.8  # the others never send an activity record
        level = rng.choice((1999, 2000, 4000, 5200, 9000))
        carried: dict[int, list[tuple[int, float]]] = {}  # held back into the next day's sync
        for day in range(first, first + days):
            worse = day >= turn and rng.random() < 0.9
            for metric, values in _day_samples(rng, day, level, worse).items():
                ts_values = carried.pop(metric, [])
                for value in values:
                    ts = _timestamp(rng, day)
                    if (user, metric, ts) in taken:
                        continue
                    taken.add((user, metric, ts))
                    ts_values.append((ts, value))
                if rng.random() < 0.2 and day + 1 < first + days:
                    carried[metric] = ts_values  # one segment across Tokyo midnight
                    continue
                _split_records(rng, timed, user, metric, ts_values, late_share)
            for kind, venue in _day_activities(rng, worse) if social else ():
                event_number += 1
                ts = _timestamp(rng, day)
                record = ActivityRecord(user, f"e{event_number}", kind, ts, venue)
                # Activities reach genki within two days (out of order, but never later
                # than social_isolation's activity_wait_days behind the samples clock:
                # later ones may miss a judgement depending on stream interleaving).
                timed.append((_arrival(rng, ts, 0.0), rng.random(), record))
        for metric, ts_values in carried.items():
            _split_records(rng, timed, user, metric, ts_values, late_share)
    timed.sort(key=lambda item: (item[0], item[1]))
    return Stream([record for _, _, record in timed], profiles)


def _arrival(rng: random.Random, ts: int, late_share: float) -> int:
    if rng.random() < late_share:
        return ts + rng.randrange(1, 20) * DAY_MS + rng.randrange(DAY_MS)
    return ts + rng.randrange(2 * DAY_MS)


def _split_records(rng: random.Random, timed: list, user: str, metric: int,
                   ts_values: list[tuple[int, float]], late_share: float) -> None:
    """Samples of a metric sent as one or a few segments (watch syncs), often in order."""
    if rng.random() < 0.5:
        rng.shuffle(ts_values)
    else:
        ts_values.sort()
    while ts_values:
        take = rng.randint(1, len(ts_values))
        part, ts_values = ts_values[:take], ts_values[take:]
        record = SampleRecord(user, metric, [t for t, _ in part], [v for _, v in part])
        timed.append((_arrival(rng, max(record.ts_ms), late_share), rng.random(), record))


def _day_samples(rng: random.Random, day: int, level: int, worse: bool) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    if rng.random() < 0.85:
        total = level // 3 if worse else level + rng.choice((0, 0, -1, 1, 3000))
        parts = rng.randint(1, 4)
        cuts = sorted(rng.randrange(total + 1) for _ in range(parts - 1))
        bounds = [0, *cuts, total]
        out[METRIC["steps"]] = [float(b - a) for a, b in itertools.pairwise(bounds)]
        if rng.random() < 0.1:
            out[METRIC["steps"]].append(0.5)  # a fractional count rounds to even (0)
    if rng.random() < 0.6:
        out[METRIC["gait_speed"]] = [round(rng.uniform(0.7, 1.0) if worse else rng.uniform(0.95, 1.4), 3)
                                for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.35:
        out[METRIC["body_weight"]] = [round((58.0 if worse else 61.0) + rng.uniform(-0.8, 0.8), 2)]
    if rng.random() < 0.7:
        out[METRIC["spo2"]] = [float(rng.randint(84, 91) if worse else rng.randint(90, 99))
                          for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.7:
        out[METRIC["resting_heart_rate"]] = [float(rng.randint(70, 80) if worse else rng.randint(58, 64))]
    if rng.random() < 0.75:
        out[METRIC["conversation"]] = [round(rng.uniform(0, 8 if worse else 30), 1)
                                  for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.3:
        out[METRIC["heart_rate"]] = [float(rng.randint(55, 120))]
    return out


def _day_activities(rng: random.Random, worse: bool) -> list[tuple[int, str]]:
    out = []
    for _ in range(rng.randint(0, 1 if worse else 4)):
        kind = rng.randrange(len(ACTIVITY_KINDS))
        if worse and ACTIVITY_KINDS[kind] in ("checkin", "class", "volunteer"):
            continue
        venue = rng.choice(VENUES) if rng.random() < 0.8 else ""
        out.append((kind, venue))
        if rng.random() < 0.2:
            out.append((kind, venue))  # same key again under another event id
    return out


def split(events: list, seed: int, batches_max: int) -> list[list]:
    """Cut a stream into contiguous batches of random sizes (some empty)."""
    rng = random.Random(seed)
    cuts = sorted(rng.randrange(len(events) + 1) for _ in range(rng.randint(0, batches_max)))
    bounds = [0, *cuts, len(events)]
    return [events[a:b] for a, b in itertools.pairwise(bounds)]


def run_engine(rules: Rules, stream: Stream, batches: list[list], **options: int) -> tuple:
    profiles = Profiles.from_rows((u, y, s) for u, (y, s) in sorted(stream.profiles.items()))
    engine = RulesEngine(rules, profiles, **options)
    log = WatermarkLog()
    awards, flags = [], []
    for batch in batches:
        samples = log.sample_batch([e for e in batch if isinstance(e, SampleRecord)])
        activities = log.activity_batch([e for e in batch if isinstance(e, ActivityRecord)])
        out = engine.process(samples, activities)
        awards += out.awards
        flags += out.flags
    return awards, flags, engine


def run_reference(rules: Rules, stream: Stream) -> Reference:
    reference = Reference(rules, stream.profiles)
    for event in stream.events:
        if isinstance(event, SampleRecord):
            reference.sample_record(event.user_id, event.metric, list(event.ts_ms),
                                    list(event.values))
        else:
            reference.activity(event.user_id, event.kind, event.ts_ms, event.venue_id)
    return reference


def default_data() -> dict:
    return tomllib.loads(RULES_DEFAULT_PATH.read_text())


def short_window_rules(settle_days: int, cap: int = 3, campaigns: bool = True) -> Rules:
    """Default points with short flag windows, so flags rise and clear within 60 days."""
    data = default_data()
    data["points"]["steps"]["points_per_day_max"] = cap
    flags = data["flags"]
    flags["settle_days"] = settle_days
    flags["wear_steps_per_day_min"] = 300
    flags["step_decline"].update(recent_days=5, baseline_days=9, recent_days_with_data_min=3,
                                 baseline_days_with_data_min=3, clear_ratio_min=0.8)
    flags["low_activity"].update(window_days=5, days_with_data_min=3)
    flags["slow_gait"].update(window_days=4, samples_min=2)
    flags["weight_loss"].update(recent_days=3, lookback_days=20, loss_kg_min=2.0)
    flags["social_isolation"].update(window_days=7, conversation_minutes_per_day_min=10.0,
                                     activity_wait_days=2)
    flags["low_spo2"].update(window_nights=5, low_nights_min=2, nights_with_data_min=2)
    flags["resting_hr_rise"].update(recent_days=3, baseline_days=7, recent_days_with_data_min=2,
                                    baseline_days_with_data_min=3)
    # Short holds so flags both flap (raise 1 / clear 1) and hold (raise 2 / clear 3).
    for index, name in enumerate(("step_decline", "low_activity", "slow_gait", "weight_loss",
                                  "social_isolation", "low_spo2", "resting_hr_rise")):
        flags[name].update(raise_after_days=1 + index % 2, clear_after_days=1 + 2 * (index % 2))
    if campaigns:
        data["campaigns"] = [
            {"name": "walk-x15", "start": "2025-01-30", "end": "2025-02-02", "kind": "multiplier",
             "applies_to": ["steps"], "factor": 1.5},
            {"name": "walk-x2", "start": "2025-03-31", "end": "2025-04-13", "kind": "multiplier",
             "applies_to": ["steps", "meal"], "factor": 2.0},
            {"name": "walk-day", "start": "2025-07-01", "end": "2025-07-01", "kind": "bonus",
             "applies_to": ["steps"], "points": 4},
            {"name": "v1-visits", "start": "2025-01-01", "end": "2026-01-31", "kind": "bonus",
             "applies_to": ["checkin", "class"], "points": 3, "venues": ["V1"]},
            {"name": "all-checkins", "start": "2024-02-01", "end": "2024-03-31",
             "kind": "multiplier", "applies_to": ["checkin", "volunteer"], "factor": 1.5},
        ]
    return parse_rules_data(data, "short-window rules")


def award_set(awards) -> set[tuple]:
    return {(a.entry_id, a.user_id, a.points, a.rule, a.day, a.ts_ms, a.ref, a.rules_version)
            for a in awards}


def flag_set(flags) -> set[tuple]:
    return {(f.flag_id, f.user_id, f.flag.value, f.state.value, f.day,
             tuple(sorted(f.evidence.items())), f.rules_version) for f in flags}
