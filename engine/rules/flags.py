"""Frailty-risk flags: one registry entry per flag, evaluated over dense (user, day) state.

A flag is one `FlagSpec` in `FLAGS` (name, config section, inputs, lookback,
evaluator, clock; the default severity is the section's) plus its section in the
rules file. Everything else (the rules model, the wire enum and its JSON Schema,
the engine's loops, the risk list) is derived from the registry.

An evaluator computes a rectangle of users x days at once with cumulative sums
(or sorted windows for medians) along the day axis and returns, per cell, the raw
value: RAISED, CLEAR or UNKNOWN (too little data: nothing changes that day). The
state then moves with hysteresis (`apply_hysteresis`): a flag is raised after
`raise_after_days` known raised days in a row and cleared only after
`clear_after_days` known clear days in a row, so a flag does not flap. Anchored
flags (step decline, resting-heart-rate rise) compare a recent level with a
personal baseline; while raised, the baseline stays frozen at its value on the
day the flag was raised, so a sustained decline stays raised until the person
recovers rather than until the baseline has caught up with the decline.

Values of other metrics than steps are kept as integers in millionths of their
unit (FIXED_SCALE), so sums and means are exact and independent of arrival order.
All per-person state (flag state, run lengths, frozen baselines, gait samples) is
numpy arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import Field, model_validator

from engine.errors import GenkiError
from engine.rules.config_base import (
    ActivityKindName,
    CountMin,
    HoldDays,
    KeyedValueError,
    Severity,
    Strict,
    WindowDays,
)

if TYPE_CHECKING:
    from engine.rules.grid import Grid

FIXED_SCALE = 1_000_000
UNKNOWN, CLEAR, RAISED = -1, 0, 1
NEVER_DAY = int(np.iinfo(np.int32).min)
# Keys of the gait store: user << 40 | (day - GAIT_DAY_BASE) << 24 | gait speed in µm/s.
GAIT_DAY_BASE = 18_262  # 2020-01-01, engine.schemas.TS_MS_MIN
_GAIT_VALUE_BITS = 24
_GAIT_DAY_BITS = 16
_GAIT_USER_SHIFT = _GAIT_VALUE_BITS + _GAIT_DAY_BITS
GAIT_USERS_MAX = 1 << (63 - _GAIT_USER_SHIFT)
GAIT_SPEED_FIXED_MAX = (1 << _GAIT_VALUE_BITS) - 1  # 16.7 m/s in µm/s
FLAG_ROWS_PER_CHUNK = 16_384
GAIT_KEYS_PRUNE_MIN = 1 << 16
MEDIAN_WINDOW_CELLS_MAX = 1 << 22  # (row, day, window day) cells sorted at once
BAND_DAYS_MAX = 8  # evaluate up to this many days with a band matmul, more with cumsum

# Inputs a flag can read, as bits of the engine's per-user "seen" column.
INPUT_BITS: dict[str, int] = {"steps": 1, "gait_speed": 2, "body_weight": 4,
                              "conversation": 8, "spo2": 16, "resting_heart_rate": 32}


class FlagCapacityError(GenkiError):
    """Input beyond what the flag state can hold (a checked error, not an assert)."""

    code = "flag_capacity"


def fixed(value: float) -> int:
    """A threshold in millionths of its unit (exact integer comparisons)."""
    return round(value * FIXED_SCALE)


# ------------------------------------------------------------------ config sections


class FlagConfig(Strict):
    """What every flag section has: on/off, a severity weight and the hysteresis."""

    enabled: bool = True
    severity: Severity = 3
    raise_after_days: HoldDays = 1
    clear_after_days: HoldDays = 7


def _not_above(model: Strict, key: str, limit_key: str) -> None:
    if getattr(model, key) > getattr(model, limit_key):
        raise KeyedValueError(key, f"exceeds {limit_key} "
                              f"({getattr(model, key)} > {getattr(model, limit_key)})")


class StepDecline(FlagConfig):
    severity: Severity = 3
    recent_days: WindowDays = 14
    baseline_days: WindowDays = 84
    ratio_max: float = Field(default=0.7, gt=0.0, lt=1.0)
    clear_ratio_min: float = Field(default=0.8, gt=0.0, le=1.0)
    recent_days_with_data_min: CountMin = 7
    baseline_days_with_data_min: CountMin = 14

    @model_validator(mode="after")
    def _fits(self) -> StepDecline:
        if self.clear_ratio_min < self.ratio_max:
            raise KeyedValueError("clear_ratio_min", f"is below ratio_max "
                                  f"({self.clear_ratio_min} < {self.ratio_max})")
        _not_above(self, "recent_days_with_data_min", "recent_days")
        _not_above(self, "baseline_days_with_data_min", "baseline_days")
        return self


class LowActivity(FlagConfig):
    severity: Severity = 2
    window_days: WindowDays = 14
    median_steps_per_day_min: int = Field(default=2000, ge=1, le=1_000_000)
    days_with_data_min: CountMin = 7

    @model_validator(mode="after")
    def _fits(self) -> LowActivity:
        _not_above(self, "days_with_data_min", "window_days")
        return self


class SlowGait(FlagConfig):
    severity: Severity = 4
    window_days: WindowDays = 14
    gait_speed_median_m_s_min: float = Field(default=1.0, gt=0.0, le=3.0)
    samples_min: CountMin = 3


class WeightLoss(FlagConfig):
    severity: Severity = 4
    recent_days: WindowDays = 7
    lookback_days: WindowDays = 182
    loss_kg_min: float = Field(default=2.0, gt=0.0, le=100.0)
    recent_samples_min: CountMin = 1
    lookback_samples_min: CountMin = 1


class SocialIsolation(FlagConfig):
    severity: Severity = 3
    window_days: WindowDays = 28
    social_kinds: list[ActivityKindName] = Field(
        default_factory=lambda: list[ActivityKindName](["checkin", "class", "volunteer"]),
        min_length=1)
    conversation_minutes_per_day_min: float = Field(default=30.0, gt=0.0, le=1440.0)
    conversation_days_fraction_min: float = Field(default=0.5, gt=0.0, le=1.0)
    activity_wait_days: int = Field(default=7, ge=0, le=60)

    @property
    def conversation_days_min(self) -> int:
        """Days with conversation data needed in the window (rounded up, at least 1)."""
        needed = self.window_days * self.conversation_days_fraction_min
        return max(1, int(-(-round(needed * 1e9) // 1_000_000_000)))


class LowSpo2(FlagConfig):
    severity: Severity = 5
    window_nights: WindowDays = 14
    night_end_hour: int = Field(default=6, ge=1, le=12)
    spo2_night_mean_pct_min: float = Field(default=90.0, gt=50.0, le=100.0)
    low_nights_min: CountMin = 3
    nights_with_data_min: CountMin = 7

    @model_validator(mode="after")
    def _fits(self) -> LowSpo2:
        _not_above(self, "low_nights_min", "window_nights")
        _not_above(self, "nights_with_data_min", "window_nights")
        return self


class RestingHrRise(FlagConfig):
    severity: Severity = 3
    recent_days: WindowDays = 7
    baseline_days: WindowDays = 84
    rise_bpm_min: float = Field(default=10.0, gt=0.0, le=200.0)
    recent_days_with_data_min: CountMin = 4
    baseline_days_with_data_min: CountMin = 14

    @model_validator(mode="after")
    def _fits(self) -> RestingHrRise:
        _not_above(self, "recent_days_with_data_min", "recent_days")
        _not_above(self, "baseline_days_with_data_min", "baseline_days")
        return self


# ------------------------------------------------------------------ window helpers


class Windows:
    """Sums of one (rows x days) slab over windows of days, for `count` evaluated days.

    The slab covers days [first - lookback, first + count - 1]. Sums use a matmul
    with a 0/1 band matrix when few days are evaluated (the steady state: one new
    settled day per batch), cumulative sums along days otherwise. Exact (int64).
    """

    def __init__(self, x: np.ndarray, lookback: int, count: int) -> None:
        self.x = x if x.dtype == np.int64 else x.astype(np.int64)
        self.lookback, self.count = lookback, count
        self._prefix: np.ndarray | None = None

    def sums(self, end_offset: int, width: int) -> np.ndarray:
        """Sums over days [d - end_offset - width + 1, d - end_offset] per evaluated d."""
        assert self.lookback >= end_offset + width - 1
        start, count = self.lookback - end_offset - width + 1, self.count
        if count <= BAND_DAYS_MAX:
            return self.x[:, start:start + width + count - 1] @ _band(width, count)
        if self._prefix is None:
            self._prefix = np.zeros((self.x.shape[0], self.x.shape[1] + 1), np.int64)
            np.cumsum(self.x, axis=1, out=self._prefix[:, 1:])
        end = start + width
        return self._prefix[:, end:end + count] - self._prefix[:, start:start + count]


@lru_cache(maxsize=256)
def _band(width: int, count: int) -> np.ndarray:
    """band[i, j] = 1 when slab column i lies in the window of evaluated day j."""
    column = np.arange(width + count - 1)[:, None]
    day = np.arange(count)[None, :]
    band = ((column >= day) & (column < day + width)).astype(np.int64)
    band.flags.writeable = False
    return band


def window_medians(x: np.ndarray, has: np.ndarray, lookback: int, count: int,
                   end_offset: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Median of x over the days with `has` in each window (as Windows.sums), and their count.

    NaN where a window has no such day. Windows are sorted in chunks of rows so the
    (rows x days x width) cells stay under MEDIAN_WINDOW_CELLS_MAX.
    """
    assert lookback >= end_offset + width - 1
    start = lookback - end_offset - width + 1
    part = slice(start, start + width + count - 1)
    values = np.where(has[:, part], x[:, part].astype(np.float64), np.inf)
    windows = sliding_window_view(values, width, axis=1)
    n = Windows(has, lookback, count).sums(end_offset, width)
    out = np.full((x.shape[0], count), np.nan)
    step = max(1, MEDIAN_WINDOW_CELLS_MAX // max(1, count * width))
    for lo in range(0, x.shape[0], step):
        ordered = np.sort(windows[lo:lo + step], axis=2)
        k = n[lo:lo + step]
        low = np.take_along_axis(ordered, np.maximum(k - 1, 0)[..., None] // 2, 2)[..., 0]
        high = np.take_along_axis(ordered, (k // 2)[..., None], 2)[..., 0]
        out[lo:lo + step] = np.where(k > 0, (low + high) / 2, np.nan)
    return out, n


def rolling_max(x: np.ndarray, width: int) -> np.ndarray:
    """max of x[:, i:i + width] for every i (doubling: O(log width) passes)."""
    count = x.shape[1] - width + 1
    assert count >= 0
    out: np.ndarray | None = None
    power, span, offset = x, 1, 0
    while span <= width:
        if width & span:
            part = power[:, offset:offset + count]
            out = part if out is None else np.maximum(out, part)
            offset += span
        if 2 * span <= width:
            power = np.maximum(power[:, :-span], power[:, span:])
        span *= 2
    assert out is not None
    return out


def medians_of_sorted(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Median of each run values[start:start + count] (runs sorted, count > 0)."""
    low = values[starts + (counts - 1) // 2]
    high = values[starts + counts // 2]
    return (low + high) / 2


def median_below(below: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Is the median of n values below a threshold, given how many are below it?

    Decided by counts except when n is even and exactly half are below (then the
    middle two straddle the threshold and their mean decides): those are returned
    as `undecided` for an exact median.
    """
    return below >= n // 2 + 1, (n % 2 == 0) & (below == n // 2)


class GaitStore:
    """Every included gait-speed sample as one sorted int64 key (for exact medians)."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.int64)
        self._pending: list[np.ndarray] = []
        self._pruned_size = GAIT_KEYS_PRUNE_MIN

    @property
    def pending(self) -> int:
        return sum(len(keys) for keys in self._pending)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return ({"keys": self.keys, "pending": np.concatenate([np.zeros(0, np.int64),
                                                              *self._pending])},
                {"pruned_size": self._pruned_size})

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.keys = arrays["keys"].astype(np.int64)
        self._pending = [arrays["pending"].astype(np.int64)] if len(arrays["pending"]) else []
        self._pruned_size = int(meta["pruned_size"])

    def add(self, user: np.ndarray, day: np.ndarray, value_fixed: np.ndarray) -> None:
        offset = day - GAIT_DAY_BASE
        if len(user) and int(user.max()) >= GAIT_USERS_MAX:
            raise FlagCapacityError(f"gait store holds at most {GAIT_USERS_MAX} users")
        if not np.all((offset >= 0) & (offset < 1 << _GAIT_DAY_BITS)):
            raise FlagCapacityError(
                f"gait sample day outside the {1 << _GAIT_DAY_BITS} days from 2020-01-01 "
                "the gait store covers")
        if not np.all((value_fixed >= 0) & (value_fixed <= GAIT_SPEED_FIXED_MAX)):
            raise FlagCapacityError(f"gait speed outside [0, {GAIT_SPEED_FIXED_MAX / FIXED_SCALE}]"
                                    " m/s")
        self._pending.append((user.astype(np.int64) << _GAIT_USER_SHIFT)
                             | (offset.astype(np.int64) << _GAIT_VALUE_BITS) | value_fixed)

    def consolidate(self, keep_from_day: np.ndarray) -> None:
        """Merge pending keys in; when the store has doubled since the last prune, drop
        days before keep_from_day[user] (no window of an unevaluated day reads them)."""
        if self._pending:
            fresh = np.sort(np.concatenate(self._pending))
            self._pending = []
            self.keys = np.insert(self.keys, np.searchsorted(self.keys, fresh), fresh)
        if len(self.keys) <= 2 * self._pruned_size:
            return
        user = self.keys >> _GAIT_USER_SHIFT
        day = ((self.keys >> _GAIT_VALUE_BITS) & ((1 << _GAIT_DAY_BITS) - 1)) + GAIT_DAY_BASE
        self.keys = self.keys[day >= keep_from_day[user]]
        self._pruned_size = max(len(self.keys), GAIT_KEYS_PRUNE_MIN)

    def medians(self, user: np.ndarray, day: np.ndarray, width: int) -> tuple[np.ndarray, ...]:
        """Median (µm/s, float) and count of samples in days [day - width + 1, day]."""
        assert not self._pending
        base = user.astype(np.int64) << _GAIT_USER_SHIFT
        low = np.searchsorted(self.keys, base | ((day - width + 1 - GAIT_DAY_BASE).astype(
            np.int64) << _GAIT_VALUE_BITS))
        high = np.searchsorted(self.keys, base | ((day + 1 - GAIT_DAY_BASE).astype(
            np.int64) << _GAIT_VALUE_BITS))
        counts = high - low
        starts = np.cumsum(counts) - counts
        total = int(counts.sum())
        pair = np.repeat(np.arange(len(user), dtype=np.int64), counts)
        index = np.arange(total, dtype=np.int64) - np.repeat(starts, counts) + np.repeat(low, counts)
        values = self.keys[index] & ((1 << _GAIT_VALUE_BITS) - 1)
        ordered = np.sort((pair << _GAIT_VALUE_BITS) | values) & ((1 << _GAIT_VALUE_BITS) - 1)
        medians = np.full(len(user), np.nan)
        has = counts > 0
        medians[has] = medians_of_sorted(ordered, starts[has], counts[has])
        return medians, counts


# ------------------------------------------------------------------ evaluation


@dataclass
class Anchored:
    """A recent level against a personal baseline (the anchor), per cell.

    While the flag is raised the anchor is the one frozen on the day it was raised.
    """

    level: np.ndarray  # float, rows x days
    anchor: np.ndarray  # float, rows x days
    level_known: np.ndarray  # bool
    anchor_known: np.ndarray  # bool
    raised: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (level, anchor) -> bool
    evidence: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]  # (level, anchor)
    # While raised: still raised? (a less strict threshold; default: `raised`)
    holds: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None


@dataclass
class FlagResult:
    raw: np.ndarray | None  # int8 rows x days: RAISED / CLEAR / UNKNOWN (None when anchored)
    evidence: dict[str, np.ndarray]  # name -> int (counts) or float arrays, rows x days
    # Evidence too costly for every cell (exact medians): computed for given cells only.
    lazy: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]] | None = None
    order: tuple[str, ...] = ()  # evidence key order (default: lazy keys, then evidence)
    anchored: Anchored | None = None
    anchor_used: np.ndarray | None = None  # filled by apply_hysteresis for anchored flags


class FlagContext:
    """What evaluators read: the flag rules, the grid's day columns and the gait store."""

    def __init__(self, flag_rules: Any, grid: Grid, gait: GaitStore) -> None:
        self.rules = flag_rules
        self.grid = grid
        self.gait = gait
        self.prepare_gait: Callable[[], None] = lambda: None  # set by the engine

    def slabs(self, rows: np.ndarray, first: int, last: int, lookback: int,
              *names: str) -> list[np.ndarray]:
        return [self.grid.slab(name, rows, first - lookback, last) for name in names]

    def wear(self, steps: np.ndarray, samples: np.ndarray) -> np.ndarray:
        """Days the device was worn: steps data at or above the wear minimum."""
        return (samples > 0) & (steps >= self.rules.wear_steps_per_day_min)


Evaluator = Callable[[FlagContext, Any, np.ndarray, int, int, np.ndarray], FlagResult]


def step_decline(ctx: FlagContext, f: StepDecline, rows: np.ndarray, first: int, last: int,
                 valid: np.ndarray) -> FlagResult:
    count, lookback = last - first + 1, f.recent_days + f.baseline_days - 1
    steps, samples = ctx.slabs(rows, first, last, lookback, "fsteps_sum", "fsteps_n")
    wear = ctx.wear(steps, samples)
    recent, recent_days = window_medians(steps, wear, lookback, count, 0, f.recent_days)
    base, base_days = window_medians(steps, wear, lookback, count, f.recent_days,
                                     f.baseline_days)

    def evidence(level: np.ndarray, anchor: np.ndarray) -> dict[str, np.ndarray]:
        with np.errstate(divide="ignore", invalid="ignore"):
            return {"recent_median_steps": level, "baseline_median_steps": anchor,
                    "ratio": level / anchor}

    return FlagResult(None, {"recent_days_with_data": recent_days,
                             "baseline_days_with_data": base_days},
                      anchored=Anchored(
        recent, base, recent_days >= f.recent_days_with_data_min,
        (base_days >= f.baseline_days_with_data_min) & (base > 0),
        lambda level, anchor: level <= f.ratio_max * anchor, evidence,
        lambda level, anchor: level <= f.clear_ratio_min * anchor))


def low_activity(ctx: FlagContext, f: LowActivity, rows: np.ndarray, first: int, last: int,
                 valid: np.ndarray) -> FlagResult:
    count, width = last - first + 1, f.window_days
    steps, samples = ctx.slabs(rows, first, last, width - 1, "fsteps_sum", "fsteps_n")
    has = ctx.wear(steps, samples)
    days = Windows(has, width - 1, count).sums(0, width)
    low = has & (steps < f.median_steps_per_day_min)
    below = Windows(low, width - 1, count).sums(0, width)
    known = valid & (days >= f.days_with_data_min)
    raised, undecided = median_below(below, days)

    def medians(row: np.ndarray, column: np.ndarray) -> np.ndarray:
        span = column[:, None] + np.arange(width)
        windows = np.where(has[row[:, None], span], steps[row[:, None], span],
                           np.iinfo(np.int64).max)
        windows.sort(axis=1)
        return medians_of_sorted(windows.ravel(), np.arange(len(row)) * width,
                                 days[row, column])

    row, column = np.nonzero(known & undecided)
    if len(row):
        raised[row, column] = medians(row, column) < f.median_steps_per_day_min
    return FlagResult(_raw(known, raised), {"days_with_data": days},
                      lambda r, c: {"median_steps_per_day": medians(r, c)})


def slow_gait(ctx: FlagContext, f: SlowGait, rows: np.ndarray, first: int, last: int,
              valid: np.ndarray) -> FlagResult:
    count, width = last - first + 1, f.window_days
    samples, low = ctx.slabs(rows, first, last, width - 1, "gait_n", "gait_low_n")
    n = Windows(samples, width - 1, count).sums(0, width)
    below = Windows(low, width - 1, count).sums(0, width)
    known = valid & (n >= f.samples_min)
    raised, undecided = median_below(below, n)

    def medians(row: np.ndarray, column: np.ndarray) -> np.ndarray:
        ctx.prepare_gait()
        values, counts = ctx.gait.medians(rows[row], first + column, width)
        assert np.array_equal(counts, n[row, column]), "gait store out of step"
        return values

    row, column = np.nonzero(known & undecided)
    if len(row):
        raised[row, column] = medians(row, column) < fixed(f.gait_speed_median_m_s_min)
    return FlagResult(_raw(known, raised), {"samples": n},
                      lambda r, c: {"median_gait_speed_m_s": medians(r, c) / FIXED_SCALE})


def weight_loss(ctx: FlagContext, f: WeightLoss, rows: np.ndarray, first: int, last: int,
                valid: np.ndarray) -> FlagResult:
    count, lookback = last - first + 1, f.recent_days + f.lookback_days - 1
    total, samples, heaviest = ctx.slabs(rows, first, last, lookback,
                                         "weight_sum", "weight_n", "weight_max")
    counts = Windows(samples, lookback, count)
    recent_sum = Windows(total, lookback, count).sums(0, f.recent_days)
    recent_n = counts.sums(0, f.recent_days)
    back_n = counts.sums(f.recent_days, f.lookback_days)
    back_max = rolling_max(heaviest[:, :f.lookback_days - 1 + count], f.lookback_days)
    known = (recent_n >= f.recent_samples_min) & (back_n >= f.lookback_samples_min)
    with np.errstate(divide="ignore", invalid="ignore"):
        recent_mean = recent_sum / recent_n
        loss = back_max - recent_mean
        raised = loss >= fixed(f.loss_kg_min)
    return FlagResult(_raw(known, raised), {
        "weight_max_kg": back_max / FIXED_SCALE, "weight_recent_kg": recent_mean / FIXED_SCALE,
        "loss_kg": loss / FIXED_SCALE, "recent_samples": recent_n})


def social_isolation(ctx: FlagContext, f: SocialIsolation, rows: np.ndarray, first: int,
                     last: int, valid: np.ndarray) -> FlagResult:
    count, width = last - first + 1, f.window_days
    talk, talk_n, social = ctx.slabs(rows, first, last, width - 1,
                                     "talk_sum", "talk_n", "social_n")
    talk_days = Windows(talk_n > 0, width - 1, count).sums(0, width)
    talk_sum = Windows(talk, width - 1, count).sums(0, width)
    activities = Windows(social, width - 1, count).sums(0, width)
    known = talk_days >= f.conversation_days_min
    with np.errstate(divide="ignore", invalid="ignore"):
        per_day = talk_sum / talk_days
        raised = (activities == 0) & (per_day < fixed(f.conversation_minutes_per_day_min))
    return FlagResult(_raw(known, raised), {
        "social_activities": activities,
        "conversation_minutes_per_day": per_day / FIXED_SCALE,
        "conversation_days": talk_days})


def low_spo2(ctx: FlagContext, f: LowSpo2, rows: np.ndarray, first: int, last: int,
             valid: np.ndarray) -> FlagResult:
    count, width = last - first + 1, f.window_nights
    total, samples = ctx.slabs(rows, first, last, width - 1, "spo2_sum", "spo2_n")
    low = (samples > 0) & (total < fixed(f.spo2_night_mean_pct_min) * samples.astype(np.int64))
    nights = Windows(samples > 0, width - 1, count).sums(0, width)
    low_nights = Windows(low, width - 1, count).sums(0, width)
    known = nights >= f.nights_with_data_min
    return FlagResult(_raw(known, low_nights >= f.low_nights_min), {
        "low_nights": low_nights, "nights_with_data": nights})


def resting_hr_rise(ctx: FlagContext, f: RestingHrRise, rows: np.ndarray, first: int,
                    last: int, valid: np.ndarray) -> FlagResult:
    count, lookback = last - first + 1, f.recent_days + f.baseline_days - 1
    total, samples = ctx.slabs(rows, first, last, lookback, "rhr_sum", "rhr_n")
    has = samples > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        daily = np.where(has, total / samples, 0.0)
    counts = Windows(samples, lookback, count)
    recent_n = counts.sums(0, f.recent_days)
    recent_days = Windows(has, lookback, count).sums(0, f.recent_days)
    with np.errstate(divide="ignore", invalid="ignore"):
        recent = Windows(total, lookback, count).sums(0, f.recent_days) / recent_n
    base, base_days = window_medians(daily, has, lookback, count, f.recent_days,
                                     f.baseline_days)

    def evidence(level: np.ndarray, anchor: np.ndarray) -> dict[str, np.ndarray]:
        return {"recent_mean_bpm": level / FIXED_SCALE, "baseline_median_bpm": anchor / FIXED_SCALE,
                "rise_bpm": (level - anchor) / FIXED_SCALE}

    rise = fixed(f.rise_bpm_min)
    return FlagResult(None, {"recent_days_with_data": recent_days,
                             "baseline_days_with_data": base_days},
                      anchored=Anchored(
        recent, base, recent_days >= f.recent_days_with_data_min,
        base_days >= f.baseline_days_with_data_min,
        lambda level, anchor: level - anchor >= rise, evidence))


def _raw(known: np.ndarray, raised: np.ndarray) -> np.ndarray:
    return np.where(known, raised.astype(np.int8), np.int8(UNKNOWN)).astype(np.int8)


# ------------------------------------------------------------------ the registry


Clock = Literal["samples", "social"]


@dataclass(frozen=True)
class FlagSpec:
    """Everything genki knows about one flag; its section in the rules file does the rest.

    clock "samples": evaluated on days settled by the person's samples watermark;
    "social": also waits for the activities watermark, but at most
    activity_wait_days behind the samples (people without activity records
    included). lookback: days before an evaluated day its windows read. jchs: a
    revised J-CHS frailty criterion that wearables measure.
    """

    name: str
    config: type[FlagConfig]
    inputs: tuple[str, ...]
    lookback: Callable[[Any], int]
    evaluate: Evaluator
    clock: Clock = "samples"
    jchs: bool = False

    @property
    def severity(self) -> int:
        """The default severity (the config section's)."""
        return int(self.config.model_fields["severity"].default)

    @property
    def input_bits(self) -> int:
        bits = 0
        for name in self.inputs:
            bits |= INPUT_BITS[name]
        return bits


FLAGS: tuple[FlagSpec, ...] = (
    FlagSpec("step_decline", StepDecline, ("steps",),
             lambda f: f.recent_days + f.baseline_days - 1, step_decline),
    FlagSpec("low_activity", LowActivity, ("steps",), lambda f: f.window_days - 1, low_activity,
             jchs=True),
    FlagSpec("slow_gait", SlowGait, ("gait_speed",), lambda f: f.window_days - 1, slow_gait,
             jchs=True),
    FlagSpec("weight_loss", WeightLoss, ("body_weight",),
             lambda f: f.recent_days + f.lookback_days - 1, weight_loss, jchs=True),
    FlagSpec("social_isolation", SocialIsolation, ("conversation",),
             lambda f: f.window_days - 1, social_isolation, clock="social"),
    FlagSpec("low_spo2", LowSpo2, ("spo2",), lambda f: f.window_nights - 1, low_spo2),
    FlagSpec("resting_hr_rise", RestingHrRise, ("resting_heart_rate",),
             lambda f: f.recent_days + f.baseline_days - 1, resting_hr_rise),
)
FLAG_NAMES: tuple[str, ...] = tuple(spec.name for spec in FLAGS)
FLAG_BY_NAME: dict[str, FlagSpec] = {spec.name: spec for spec in FLAGS}
assert len(FLAG_BY_NAME) == len(FLAGS), "flag names are unique"

# Frailty status from the revised J-CHS criteria wearables measure (weight loss,
# slowness, low physical activity); exhaustion and weakness are questionnaire items.
JCHS_FLAGS: tuple[str, ...] = tuple(spec.name for spec in FLAGS if spec.jchs)
FRAILTY_STATUSES = ("frail", "pre-frail", "robust")  # most urgent first


def frailty_status(raised_flags: set[str] | frozenset[str] | list[str],
                   questionnaire_criteria: int = 0) -> str:
    """robust (no criterion), pre-frail (1-2), frail (3 or more): the raised wearable
    criteria plus any questionnaire criteria met (exhaustion, weakness; 0-2)."""
    assert 0 <= questionnaire_criteria <= 2
    criteria = sum(1 for name in JCHS_FLAGS if name in raised_flags) + questionnaire_criteria
    return "frail" if criteria >= 3 else "pre-frail" if criteria >= 1 else "robust"


def lookback_days(flag_rules: Any) -> dict[str, int]:
    """Days before an evaluated day each enabled flag's windows read (state pruning)."""
    return {spec.name: spec.lookback(getattr(flag_rules, spec.name)) for spec in FLAGS
            if getattr(flag_rules, spec.name).enabled}


# ------------------------------------------------------------------ state changes


@dataclass
class Changes:
    """State changes of one flag over users x days, and the state after them."""

    row: np.ndarray
    column: np.ndarray
    state: np.ndarray  # RAISED or CLEAR per change
    state_after: np.ndarray  # int8 per row
    run_after: np.ndarray  # int16 per row: known days in a row against the state
    anchor_after: np.ndarray  # float64 per row: frozen baseline while raised


def apply_hysteresis(result: FlagResult, valid: np.ndarray, config: FlagConfig,
                     state: np.ndarray, run: np.ndarray, anchor: np.ndarray) -> Changes:
    """Walk the evaluated days in order: a known day that disagrees with the state
    extends the run, one that agrees resets it, an unknown day changes nothing; the
    state flips when the run reaches raise_after_days / clear_after_days."""
    state, run, anchor = state.copy(), run.astype(np.int64), anchor.copy()
    rows, count = valid.shape
    fixed_anchor = result.anchored
    if fixed_anchor is not None:
        result.anchor_used = np.empty((rows, count))
    need = np.array([config.raise_after_days, config.clear_after_days], np.int64)
    changes: list[tuple[np.ndarray, int, np.ndarray]] = []
    for j in range(count):
        is_raised = state == RAISED
        if fixed_anchor is not None:
            used = np.where(is_raised, anchor, fixed_anchor.anchor[:, j])
            assert result.anchor_used is not None
            result.anchor_used[:, j] = used
            known = valid[:, j] & fixed_anchor.level_known[:, j] & (
                is_raised | fixed_anchor.anchor_known[:, j])
            holds = fixed_anchor.holds or fixed_anchor.raised
            level = fixed_anchor.level[:, j]
            with np.errstate(invalid="ignore"):
                says_raised = np.where(is_raised, holds(level, used),
                                       fixed_anchor.raised(level, used))
        else:
            assert result.raw is not None
            known = valid[:, j] & (result.raw[:, j] != UNKNOWN)
            says_raised = result.raw[:, j] == RAISED
        against = known & (says_raised != is_raised)
        run[known & ~against] = 0
        run[against] += 1
        flip = np.flatnonzero(against & (run >= need[is_raised.astype(np.int64)]))
        if len(flip):
            state[flip] = np.where(is_raised[flip], CLEAR, RAISED)
            run[flip] = 0
            if fixed_anchor is not None:
                anchor[flip] = np.where(is_raised[flip], 0.0, fixed_anchor.anchor[flip, j])
            changes.append((flip, j, state[flip].copy()))
    if changes:
        row = np.concatenate([c[0] for c in changes])
        column = np.concatenate([np.full(len(c[0]), c[1], np.int64) for c in changes])
        new_state = np.concatenate([c[2] for c in changes])
    else:
        row = column = np.zeros(0, np.int64)
        new_state = np.zeros(0, np.int8)
    order = np.lexsort((column, row))
    return Changes(row[order], column[order], new_state[order], state,
                   run.astype(np.int16), anchor)


def evidence_of(result: FlagResult, row: np.ndarray, column: np.ndarray,
                ) -> list[dict[str, float | int | str]]:
    """Evidence of the given cells: counts as int, everything else rounded to 3 places."""
    if len(row) == 0:
        return []
    arrays = {name: array[row, column] for name, array in result.evidence.items()}
    if result.lazy is not None:
        arrays = {**result.lazy(row, column), **arrays}
    if result.anchored is not None:
        assert result.anchor_used is not None
        arrays = {**result.anchored.evidence(result.anchored.level[row, column],
                                             result.anchor_used[row, column]), **arrays}
    if result.order:
        arrays = {name: arrays[name] for name in result.order}
    columns = [(name, values.tolist(), values.dtype.kind in "iub")
               for name, values in arrays.items()]
    return [{name: int(values[i]) if integer else round(float(values[i]), 3)
             for name, values, integer in columns} for i in range(len(row))]
