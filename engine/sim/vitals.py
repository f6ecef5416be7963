"""Vitals of a block of people: whole user x day x minute arrays, no per-sample loops.

Every generator returns, per metric, flat columns sorted by (user, ts_ms):
the order the segmenter needs to cut them at sync times with one searchsorted.
Timestamps follow engine.schemas: steps count the minute (or hour) *ending* at
ts_ms; sleep and conversation count the hour *starting* at ts_ms; the rest are
instants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.clock import DAY_MS
from engine.sim import calendar
from engine.sim.population import MINUTES_PER_DAY, Population

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
HR_INTERVAL_MIN = 5
SPO2_INTERVAL_MIN = 10
SPO2_NIGHT_END_MIN = 360  # night-time SpO2 between 00:00 and 06:00
SLEEP_HOURS = np.array([0, 1, 2, 3, 4, 5, 6, 7, 20, 21, 22, 23])
MEAL_MINUTES = np.array([450, 750, 1110])  # 07:30, 12:30, 18:30
NON_WEAR_DAY_FRACTION = 0.02
BOUT_MINUTES_MEAN = 11
WALK_SHARE = 0.85  # the rest of a day's steps are pottering about the house
STEPS_PER_MINUTE_MAX = 150
GAIT_DAYS_PER_WEEK = 3
BP_DAY_FRACTION = 0.35
PHONE_HOURS = 23  # hourly buckets ending 01:00 ... 23:00


@dataclass(frozen=True)
class Samples:
    user: np.ndarray  # int64 index into Population
    ts_ms: np.ndarray  # int64
    values: np.ndarray  # int16 counts or float64 measurements

    def __len__(self) -> int:
        return len(self.ts_ms)


@dataclass(frozen=True)
class Block:
    """The people [lo, hi) over the whole period; arrays are (users, days, ...)."""

    pop: Population
    lo: int
    hi: int
    days: int
    start_day: int
    day0_ms: int

    @property
    def users(self) -> int:
        return self.hi - self.lo

    def trait(self, name: str) -> np.ndarray:
        return getattr(self.pop, name)[self.lo:self.hi]

    def level(self, condition: str) -> np.ndarray:
        """(users, days): how far into a condition each person is (Population.level)."""
        return self.pop.level(condition, self.days, self.lo, self.hi)

    def day_numbers(self) -> np.ndarray:
        return self.start_day + np.arange(self.days)

    def weekday(self) -> np.ndarray:
        """Monday = 0 for each simulated day (1970-01-01 was a Thursday)."""
        return (self.start_day + np.arange(self.days) + 3) % 7

    def daily_steps_target(self, rng: np.random.Generator) -> np.ndarray:
        weekend = self.weekday() >= 5
        factor = np.where(weekend[None, :], self.trait("weekend_factor")[:, None], 1.0)
        factor = factor * calendar.steps_factor(self.day_numbers())[None, :]
        decline = 1.0 - self.trait("decline_drop")[:, None] * self.level("decline")
        noise = rng.lognormal(0.0, 0.28, (self.users, self.days))
        return self.trait("steps_median")[:, None] * factor * noise * decline

    def emit(self, values: np.ndarray, offset_ms: np.ndarray, mask: np.ndarray) -> Samples:
        """Samples where mask holds; offset_ms is relative to each day's start."""
        shape = (self.users, self.days, values.shape[2])
        mask = np.broadcast_to(mask, shape)
        user = np.broadcast_to((self.lo + np.arange(self.users))[:, None, None], shape)[mask]
        day_ms = np.broadcast_to((self.day0_ms + np.arange(self.days, dtype=np.int64) * DAY_MS)
                                 [None, :, None], shape)
        ts = day_ms[mask] + np.broadcast_to(offset_ms, shape)[mask]
        return Samples(user.astype(np.int64), ts.astype(np.int64), values[mask])


def watch_block(block: Block, rng: np.random.Generator) -> dict[str, Samples]:
    """Every watch metric for a block of trial participants."""
    wear = rng.random((block.users, block.days)) >= NON_WEAR_DAY_FRACTION
    wear &= ~calendar.non_wear_spells(block.users, block.days, rng)
    partial = rng.random(wear.shape) < calendar.PARTIAL_WEAR_DAY_FRACTION
    wake_d = block.trait("wake_min")[:, None] + rng.normal(0, 20, (block.users, block.days))
    bed_d = block.trait("bed_min")[:, None] + rng.normal(0, 20, (block.users, block.days))
    target = block.daily_steps_target(rng) * wear * np.where(partial, 0.01, 1.0)
    steps = minute_steps(block, target, rng)
    rhr = block.level("rhr")
    out = {"steps": _emit_minute_steps(block, steps, wear)}
    out["heart_rate"] = _heart_rate(block, steps, wear, wake_d, bed_d, rhr, rng)
    out["resting_heart_rate"] = _resting_heart_rate(block, wear, rhr, rng)
    out["sleep"] = _sleep(block, wear, wake_d, bed_d, rng)
    out["spo2"] = _spo2(block, wear, block.level("spo2"), rng)
    out.update(_spot_checks(block, wear, rng))
    out["conversation"] = _conversation(block, wear, block.level("isolated"), rng)
    out["meal_intake"] = _meal_intake(block, wear, block.level("decline"), rng)
    return out


def minute_steps(block: Block, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Steps per minute (users, days, 1440): walking bouts plus pottering, zeros at rest."""
    users, days = block.users, block.days
    wake, bed = block.trait("wake_min"), block.trait("bed_min")
    cadence = block.trait("cadence")
    # The day's walking minutes are split into bouts of random length that add up to them,
    # so a day's total follows its target and only the timing is left to chance.
    walk_minutes = (WALK_SHARE * target / cadence[:, None]).ravel()
    bouts = np.where(walk_minutes > 0, 1 + rng.poisson(walk_minutes / BOUT_MINUTES_MEAN), 0)
    row = np.repeat(np.arange(users * days), bouts)
    share = rng.gamma(1.5, 1.0, len(row))
    share /= np.bincount(row, share, minlength=users * days)[row]
    length = np.maximum(1, np.rint(walk_minutes[row] * share)).astype(np.int64)
    person = row // days
    lo, hi = wake[person], bed[person]
    choice = rng.random(len(row))
    start = np.where(choice < 0.45, rng.normal(lo + 150, 60),
                     np.where(choice < 0.8, rng.normal(930, 80), rng.uniform(lo, hi)))
    start = np.clip(np.rint(start).astype(np.int64), lo, hi - 1)
    end = np.minimum(start + length, hi)
    pace = cadence[person] * rng.normal(1.0, 0.07, len(row))
    width = MINUTES_PER_DAY + 1
    cells = users * days * width
    diff = (np.bincount(row * width + start, pace, minlength=cells)
            - np.bincount(row * width + end, pace, minlength=cells))
    walk = np.cumsum(diff.reshape(users * days, width)[:, :MINUTES_PER_DAY], axis=1)
    walk *= rng.uniform(0.85, 1.05, walk.shape)
    potter = rng.poisson((1 - WALK_SHARE) * target / 8.0).ravel()
    row = np.repeat(np.arange(users * days), potter)
    person = row // days
    minute = rng.integers(wake[person], bed[person])
    walk += np.bincount(row * MINUTES_PER_DAY + minute, rng.integers(1, 16, len(row)),
                        minlength=users * days * MINUTES_PER_DAY).reshape(walk.shape)
    steps = np.clip(np.rint(walk), 0, STEPS_PER_MINUTE_MAX).astype(np.int16)
    return steps.reshape(users, days, MINUTES_PER_DAY)


def _emit_minute_steps(block: Block, steps: np.ndarray, wear: np.ndarray) -> Samples:
    minute = np.arange(MINUTES_PER_DAY)
    awake = ((minute[None, :] >= block.trait("wake_min")[:, None])
             & (minute[None, :] < block.trait("bed_min")[:, None]))
    mask = wear[:, :, None] & awake[:, None, :]
    offset = ((minute + 1) * MINUTE_MS)[None, None, :]
    return block.emit(steps, offset, mask)


def _heart_rate(block: Block, steps: np.ndarray, wear: np.ndarray, wake_d: np.ndarray,
                bed_d: np.ndarray, ramp: np.ndarray, rng: np.random.Generator) -> Samples:
    per = MINUTES_PER_DAY // HR_INTERVAL_MIN
    minute = np.arange(per) * HR_INTERVAL_MIN
    pace = steps.reshape(block.users, block.days, per, HR_INTERVAL_MIN).mean(axis=3)
    asleep = (minute[None, None, :] < wake_d[:, :, None]) | (minute[None, None, :] >= bed_d[:, :, None])
    base = block.trait("hr_base")[:, None] + block.trait("rhr_rise")[:, None] * ramp
    base = base + calendar.SEASON_RHR_AMPLITUDE_BPM * calendar.winter(block.day_numbers())[None, :]
    hr = base[:, :, None] + 0.22 * pace - 7.0 * asleep + rng.normal(0, 2.5, pace.shape)
    values = np.clip(np.rint(hr), 38, 185).astype(np.int16)
    return block.emit(values, (minute * MINUTE_MS)[None, None, :], wear[:, :, None])


def _resting_heart_rate(block: Block, wear: np.ndarray, ramp: np.ndarray,
                        rng: np.random.Generator) -> Samples:
    shape = (block.users, block.days, 1)
    base = block.trait("hr_base")[:, None] - 6.0 + block.trait("rhr_rise")[:, None] * ramp
    base = base + calendar.SEASON_RHR_AMPLITUDE_BPM * calendar.winter(block.day_numbers())[None, :]
    values = np.clip(np.rint(base[:, :, None] + rng.normal(0, 1.5, shape)), 35, 140).astype(np.int16)
    offset = (300 + rng.integers(0, 60, shape)) * MINUTE_MS
    return block.emit(values, offset, wear[:, :, None])


def _sleep(block: Block, wear: np.ndarray, wake_d: np.ndarray, bed_d: np.ndarray,
           rng: np.random.Generator) -> Samples:
    h0 = (SLEEP_HOURS * 60)[None, None, :]
    h1 = h0 + 60
    morning = np.clip(np.minimum(h1, wake_d[:, :, None]) - h0, 0, 60)
    evening = np.clip(h1 - np.maximum(h0, bed_d[:, :, None]), 0, 60)
    efficiency = rng.uniform(0.80, 0.99, morning.shape)
    values = np.rint((morning + evening) * efficiency).astype(np.int16)
    return block.emit(values, (SLEEP_HOURS * HOUR_MS)[None, None, :], wear[:, :, None])


def _spo2(block: Block, wear: np.ndarray, ramp: np.ndarray, rng: np.random.Generator) -> Samples:
    per = SPO2_NIGHT_END_MIN // SPO2_INTERVAL_MIN
    shape = (block.users, block.days, per)
    base = block.trait("spo2_base")[:, None] - block.trait("spo2_drop")[:, None] * ramp
    values = np.clip(np.rint(base[:, :, None] + rng.normal(0, 0.8, shape)), 84, 100)
    # Nights with desaturation episodes for the people whose SpO2 declines.
    dip_night = block.trait("spo2_low")[:, None] & (rng.random(shape[:2]) < 0.75 * ramp)
    first = rng.integers(0, per - 6, shape[:2])[:, :, None]
    length = rng.integers(2, 7, shape[:2])[:, :, None]
    slot = np.arange(per)[None, None, :]
    dip = dip_night[:, :, None] & (slot >= first) & (slot < first + length)
    values = np.where(dip, rng.integers(84, 90, shape), values).astype(np.int16)
    offset = (np.arange(per) * SPO2_INTERVAL_MIN * MINUTE_MS)[None, None, :]
    return block.emit(values, offset, wear[:, :, None])


def _spot_checks(block: Block, wear: np.ndarray, rng: np.random.Generator
                 ) -> dict[str, Samples]:
    """Gait speed a few times a week, weekly weight, blood pressure some mornings."""
    shape = (block.users, block.days, 1)
    gait_day = wear & (rng.random(wear.shape) < GAIT_DAYS_PER_WEEK / 7)
    base, final = block.trait("gait_base")[:, None], block.trait("gait_final")[:, None]
    gait = base + (final - base) * block.level("slow_gait") + rng.normal(0, 0.03, wear.shape)
    gait = np.round(np.clip(gait, 0.3, 1.8), 2)[:, :, None]
    weigh_day = wear & (block.weekday()[None, :] == block.trait("weigh_weekday")[:, None])
    weight = (block.trait("weight_base")[:, None]
              - block.trait("weight_loss_kg")[:, None] * block.level("weight_loss")
              + calendar.SEASON_WEIGHT_AMPLITUDE_KG * calendar.winter(block.day_numbers())[None, :]
              + rng.normal(0, 0.25, wear.shape))
    weight = np.round(weight, 1)[:, :, None]
    bp_day = wear & (rng.random(wear.shape) < BP_DAY_FRACTION)
    sbp = np.rint(block.trait("sbp_base")[:, None] + rng.normal(0, 7, wear.shape))
    dbp = np.rint(block.trait("dbp_base")[:, None] + rng.normal(0, 5, wear.shape))
    bp_offset = (420 + rng.integers(0, 120, shape)) * MINUTE_MS
    return {
        "gait_speed": block.emit(gait, (600 + rng.integers(0, 360, shape)) * MINUTE_MS,
                                 gait_day[:, :, None]),
        "body_weight": block.emit(weight, (420 + rng.integers(0, 60, shape)) * MINUTE_MS,
                                  weigh_day[:, :, None]),
        "systolic_bp": block.emit(np.clip(sbp, 85, 210).astype(np.int16)[:, :, None], bp_offset,
                                  bp_day[:, :, None]),
        "diastolic_bp": block.emit(np.clip(dbp, 45, 125).astype(np.int16)[:, :, None], bp_offset,
                                   bp_day[:, :, None]),
    }


def _conversation(block: Block, wear: np.ndarray, ramp: np.ndarray,
                  rng: np.random.Generator) -> Samples:
    hour = np.arange(24)
    awake = ((hour[None, :] * 60 >= block.trait("wake_min")[:, None])
             & ((hour[None, :] + 1) * 60 <= block.trait("bed_min")[:, None]))
    time_of_day = np.interp(hour, [5, 9, 12, 15, 19, 23], [0.4, 1.0, 1.3, 1.2, 0.9, 0.3])
    base = block.trait("conversation_base")[:, None]
    per_hour = base * (1.0 - ramp) + block.trait("conversation_alone")[:, None] * ramp
    shape = (block.users, block.days, 24)
    minutes = per_hour[:, :, None] * time_of_day[None, None, :] * rng.gamma(2.0, 0.5, shape)
    values = np.clip(np.rint(minutes), 0, 60).astype(np.int16)
    mask = wear[:, :, None] & awake[:, None, :]
    return block.emit(values, (hour * HOUR_MS)[None, None, :], mask)


def _meal_intake(block: Block, wear: np.ndarray, ramp: np.ndarray,
                 rng: np.random.Generator) -> Samples:
    shape = (block.users, block.days, len(MEAL_MINUTES))
    eaten = block.trait("meal_base")[:, None] - 0.25 * ramp
    values = np.round(np.clip(eaten[:, :, None] + rng.normal(0, 0.08, shape), 0.1, 1.0), 2)
    minute = MEAL_MINUTES[None, None, :] + np.clip(np.rint(rng.normal(0, 20, shape)), -50, 50)
    return block.emit(values, minute.astype(np.int64) * MINUTE_MS, wear[:, :, None])


def phone_block(block: Block, rng: np.random.Generator) -> tuple[dict[str, Samples], np.ndarray]:
    """Hourly phone step counts of app users, and which days each phone was in use."""
    active = rng.random((block.users, block.days)) < block.trait("active_prob")[:, None]
    target = block.daily_steps_target(rng)
    hour_end = np.arange(1, PHONE_HOURS + 1)
    weekday = block.weekday() < 5
    young = (block.trait("age") < 60)[:, None, None] & weekday[None, :, None]
    commute = np.interp(hour_end, [6, 8, 9, 12, 13, 17, 19, 20, 23], [0, 3, 1.5, 1, 1.5, 1, 3, 1, 0.1])
    leisure = np.interp(hour_end, [6, 8, 10, 12, 14, 16, 18, 20, 23], [0, 1, 3, 1.5, 1.2, 2.2, 1, 0.4, 0])
    profile = np.where(young, commute[None, None, :], leisure[None, None, :])
    shape = (block.users, block.days, PHONE_HOURS)
    weights = profile * rng.gamma(1.5, 1.0, shape) + 0.001
    weights /= weights.sum(axis=2, keepdims=True)
    values = np.rint(target[:, :, None] * weights).astype(np.int32)
    steps = block.emit(values, (hour_end * HOUR_MS)[None, None, :], active[:, :, None])
    return {"steps": steps}, active
