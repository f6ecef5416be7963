"""Frailty-risk flags over the dense (user, day) state, vectorised.

A flag's raw value on day d is 1 (raised), 0 (not raised) or -1 (too little data:
the state stays as it was). Raw values are computed for a rectangle of users x
days at once with cumulative sums along the day axis; a flag event is written
where the carried-forward state changes. Values of other metrics than steps are
kept as integers in millionths of their unit (FIXED_SCALE), so sums and means are
exact and do not depend on the order data arrived in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.rules.config import Rules
from engine.rules.grid import Grid

FIXED_SCALE = 1_000_000
FLAG_NAMES: tuple[str, ...] = ("step_decline", "low_activity", "slow_gait", "weight_loss",
                               "social_isolation", "low_spo2", "resting_hr_rise")
FLAG_ISOLATION = FLAG_NAMES.index("social_isolation")
UNKNOWN, CLEAR, RAISED = -1, 0, 1
NEVER_DAY = np.iinfo(np.int32).min
# Keys of the gait store: user << 40 | (day - GAIT_DAY_BASE) << 24 | gait speed in µm/s.
GAIT_DAY_BASE = 18_262  # 2020-01-01, engine.schemas.TS_MS_MIN
_GAIT_VALUE_BITS = 24
_GAIT_DAY_BITS = 16
_GAIT_USER_SHIFT = _GAIT_VALUE_BITS + _GAIT_DAY_BITS
FLAG_ROWS_PER_CHUNK = 4096


def fixed(value: float) -> int:
    """A threshold in millionths of its unit (exact integer comparisons)."""
    return round(value * FIXED_SCALE)


def window_sums(x: np.ndarray, lookback: int, end_offset: int, width: int,
                count: int) -> np.ndarray:
    """Sums of x over days [d - end_offset - width + 1, d - end_offset] for each of the
    `count` evaluated days d, where x covers days [first - lookback, first + count - 1]."""
    assert lookback >= end_offset + width - 1
    sums = np.zeros((x.shape[0], x.shape[1] + 1), np.int64)
    np.cumsum(x, axis=1, out=sums[:, 1:])
    end = lookback - end_offset + 1
    return sums[:, end:end + count] - sums[:, end - width:end - width + count]


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


class GaitStore:
    """Every included gait-speed sample as one sorted int64 key (for exact medians)."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, np.int64)
        self._pending: list[np.ndarray] = []

    def add(self, user: np.ndarray, day: np.ndarray, value_fixed: np.ndarray) -> None:
        offset = day - GAIT_DAY_BASE
        assert np.all((offset >= 0) & (offset < 1 << _GAIT_DAY_BITS))
        assert np.all((value_fixed >= 0) & (value_fixed < 1 << _GAIT_VALUE_BITS))
        self._pending.append((user.astype(np.int64) << _GAIT_USER_SHIFT)
                             | (offset.astype(np.int64) << _GAIT_VALUE_BITS) | value_fixed)

    def consolidate(self, keep_from_day: np.ndarray) -> None:
        """Merge pending keys; drop days before keep_from_day[user] (no window needs them)."""
        if self._pending:
            self.keys = np.sort(np.concatenate([self.keys, *self._pending]))
            self._pending = []
        user = self.keys >> _GAIT_USER_SHIFT
        day = ((self.keys >> _GAIT_VALUE_BITS) & ((1 << _GAIT_DAY_BITS) - 1)) + GAIT_DAY_BASE
        keep = day >= keep_from_day[user]
        if not keep.all():
            self.keys = self.keys[keep]

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


@dataclass
class FlagResult:
    raw: np.ndarray  # int8 rows x days: RAISED / CLEAR / UNKNOWN
    evidence: dict[str, np.ndarray]  # name -> float (rounded to 3 places) or int arrays


class FlagEvaluator:
    """Raw flag values for users x a run of days, from the grid's included-data columns."""

    def __init__(self, rules: Rules, grid: Grid, gait: GaitStore) -> None:
        self.rules = rules.flags
        self.grid = grid
        self.gait = gait
        self.functions: dict[str, Callable[[np.ndarray, int, int, np.ndarray], FlagResult]] = {
            "step_decline": self.step_decline,
            "low_activity": self.low_activity,
            "slow_gait": self.slow_gait,
            "weight_loss": self.weight_loss,
            "social_isolation": self.social_isolation,
            "low_spo2": self.low_spo2,
            "resting_hr_rise": self.resting_hr_rise,
        }

    def lookback_days(self, flag: str) -> int:
        """Days before an evaluated day its windows read."""
        f = getattr(self.rules, flag)
        return {
            "step_decline": lambda: f.recent_days + f.baseline_days - 1,
            "low_activity": lambda: f.window_days - 1,
            "slow_gait": lambda: f.window_days - 1,
            "weight_loss": lambda: f.recent_days + f.lookback_days - 1,
            "social_isolation": lambda: f.window_days - 1,
            "low_spo2": lambda: f.window_nights - 1,
            "resting_hr_rise": lambda: f.recent_days + f.baseline_days - 1,
        }[flag]()

    def _slabs(self, rows: np.ndarray, first: int, last: int, lookback: int,
               *names: str) -> list[np.ndarray]:
        return [self.grid.slab(name, rows, first - lookback, last) for name in names]

    def step_decline(self, rows: np.ndarray, first: int, last: int,
                     valid: np.ndarray) -> FlagResult:
        f = self.rules.step_decline
        count, lookback = last - first + 1, self.lookback_days("step_decline")
        steps, samples = self._slabs(rows, first, last, lookback, "fsteps_sum", "fsteps_n")
        has = samples > 0
        recent_sum = window_sums(steps, lookback, 0, f.recent_days, count)
        recent_days = window_sums(has, lookback, 0, f.recent_days, count)
        base_sum = window_sums(steps, lookback, f.recent_days, f.baseline_days, count)
        base_days = window_sums(has, lookback, f.recent_days, f.baseline_days, count)
        known = ((recent_days >= f.days_with_data_min) & (base_days >= f.days_with_data_min)
                 & (base_sum > 0))
        with np.errstate(divide="ignore", invalid="ignore"):
            recent_mean = recent_sum / recent_days
            base_mean = base_sum / base_days
            raised = recent_mean <= f.ratio_max * base_mean
            ratio = recent_mean / base_mean
        return FlagResult(_raw(known, raised), {
            "recent_mean_steps": recent_mean, "baseline_mean_steps": base_mean,
            "ratio": ratio, "recent_days_with_data": recent_days,
            "baseline_days_with_data": base_days})

    def low_activity(self, rows: np.ndarray, first: int, last: int,
                     valid: np.ndarray) -> FlagResult:
        f = self.rules.low_activity
        count, width = last - first + 1, f.window_days
        steps, samples = self._slabs(rows, first, last, width - 1, "fsteps_sum", "fsteps_n")
        has = samples > 0
        days = window_sums(has, width - 1, 0, width, count)
        known = valid & (days >= f.days_with_data_min)
        median = np.full(known.shape, np.nan)
        row, column = np.nonzero(known)
        if len(row):
            span = column[:, None] + np.arange(width)
            windows = np.where(has[row[:, None], span], steps[row[:, None], span],
                               np.iinfo(np.int64).max)
            windows.sort(axis=1)
            n = days[row, column]
            median[row, column] = medians_of_sorted(windows.ravel(), np.arange(len(row)) * width,
                                                    n)
        with np.errstate(invalid="ignore"):
            raised = median < f.median_steps_per_day_min
        return FlagResult(_raw(known, raised), {"median_steps_per_day": median,
                                                "days_with_data": days})

    def slow_gait(self, rows: np.ndarray, first: int, last: int, valid: np.ndarray) -> FlagResult:
        f = self.rules.slow_gait
        count, width = last - first + 1, f.window_days
        (samples,) = self._slabs(rows, first, last, width - 1, "gait_n")
        n = window_sums(samples, width - 1, 0, width, count)
        known = valid & (n >= f.samples_min)
        median = np.full(known.shape, np.nan)
        row, column = np.nonzero(known)
        if len(row):
            values, counts = self.gait.medians(rows[row], first + column, width)
            assert np.array_equal(counts, n[row, column]), "gait store out of step"
            median[row, column] = values
        with np.errstate(invalid="ignore"):
            raised = median < fixed(f.gait_speed_median_m_s_min)
        return FlagResult(_raw(known, raised), {"median_gait_speed_m_s": median / FIXED_SCALE,
                                                "samples": n})

    def weight_loss(self, rows: np.ndarray, first: int, last: int,
                    valid: np.ndarray) -> FlagResult:
        f = self.rules.weight_loss
        count, lookback = last - first + 1, self.lookback_days("weight_loss")
        total, samples, heaviest = self._slabs(rows, first, last, lookback,
                                               "weight_sum", "weight_n", "weight_max")
        recent_sum = window_sums(total, lookback, 0, f.recent_days, count)
        recent_n = window_sums(samples, lookback, 0, f.recent_days, count)
        back_n = window_sums(samples, lookback, f.recent_days, f.lookback_days, count)
        back_max = rolling_max(heaviest[:, :f.lookback_days - 1 + count], f.lookback_days)
        known = (recent_n >= f.recent_samples_min) & (back_n >= f.lookback_samples_min)
        with np.errstate(divide="ignore", invalid="ignore"):
            recent_mean = recent_sum / recent_n
            loss = back_max - recent_mean
            raised = loss >= fixed(f.loss_kg_min)
        return FlagResult(_raw(known, raised), {
            "weight_max_kg": back_max / FIXED_SCALE, "weight_recent_kg": recent_mean / FIXED_SCALE,
            "loss_kg": loss / FIXED_SCALE, "recent_samples": recent_n})

    def social_isolation(self, rows: np.ndarray, first: int, last: int,
                         valid: np.ndarray) -> FlagResult:
        f = self.rules.social_isolation
        count, width = last - first + 1, f.window_days
        talk, talk_n, social = self._slabs(rows, first, last, width - 1,
                                           "talk_sum", "talk_n", "social_n")
        talk_days = window_sums(talk_n > 0, width - 1, 0, width, count)
        talk_sum = window_sums(talk, width - 1, 0, width, count)
        activities = window_sums(social, width - 1, 0, width, count)
        known = talk_days >= f.conversation_days_min
        with np.errstate(divide="ignore", invalid="ignore"):
            per_day = talk_sum / talk_days
            raised = (activities == 0) & (per_day < fixed(f.conversation_minutes_per_day_min))
        return FlagResult(_raw(known, raised), {
            "social_activities": activities,
            "conversation_minutes_per_day": per_day / FIXED_SCALE,
            "conversation_days": talk_days})

    def low_spo2(self, rows: np.ndarray, first: int, last: int, valid: np.ndarray) -> FlagResult:
        f = self.rules.low_spo2
        count, width = last - first + 1, f.window_nights
        total, samples = self._slabs(rows, first, last, width - 1, "spo2_sum", "spo2_n")
        low = (samples > 0) & (total < fixed(f.spo2_night_mean_pct_min) * samples)
        nights = window_sums(samples > 0, width - 1, 0, width, count)
        low_nights = window_sums(low, width - 1, 0, width, count)
        known = nights >= f.nights_with_data_min
        return FlagResult(_raw(known, low_nights >= f.low_nights_min), {
            "low_nights": low_nights, "nights_with_data": nights})

    def resting_hr_rise(self, rows: np.ndarray, first: int, last: int,
                        valid: np.ndarray) -> FlagResult:
        f = self.rules.resting_hr_rise
        count, lookback = last - first + 1, self.lookback_days("resting_hr_rise")
        total, samples = self._slabs(rows, first, last, lookback, "rhr_sum", "rhr_n")
        has = samples > 0
        recent_sum = window_sums(total, lookback, 0, f.recent_days, count)
        recent_n = window_sums(samples, lookback, 0, f.recent_days, count)
        recent_days = window_sums(has, lookback, 0, f.recent_days, count)
        base_sum = window_sums(total, lookback, f.recent_days, f.baseline_days, count)
        base_n = window_sums(samples, lookback, f.recent_days, f.baseline_days, count)
        base_days = window_sums(has, lookback, f.recent_days, f.baseline_days, count)
        known = ((recent_days >= f.recent_days_with_data_min)
                 & (base_days >= f.baseline_days_with_data_min))
        with np.errstate(divide="ignore", invalid="ignore"):
            recent_mean = recent_sum / recent_n
            base_mean = base_sum / base_n
            rise = recent_mean - base_mean
            raised = rise >= fixed(f.rise_bpm_min)
        return FlagResult(_raw(known, raised), {
            "recent_mean_bpm": recent_mean / FIXED_SCALE,
            "baseline_mean_bpm": base_mean / FIXED_SCALE, "rise_bpm": rise / FIXED_SCALE,
            "recent_days_with_data": recent_days, "baseline_days_with_data": base_days})


def _raw(known: np.ndarray, raised: np.ndarray) -> np.ndarray:
    return np.where(known, raised.astype(np.int8), np.int8(UNKNOWN)).astype(np.int8)


@dataclass(frozen=True)
class Transition:
    user: int  # global user index
    flag: str
    day: int
    state: int  # RAISED or CLEAR
    evidence: dict[str, float | int]


def transitions(result: FlagResult, valid: np.ndarray, state_before: np.ndarray,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where the carried-forward state changes: (row, column, new state), state after."""
    known = valid & (result.raw != UNKNOWN)
    row, column = np.nonzero(known)  # row-major: days in order within a row
    values = result.raw[row, column]
    previous = np.empty_like(values)
    previous[1:] = values[:-1]
    first_of_row = np.ones(len(row), bool)
    first_of_row[1:] = row[1:] != row[:-1]
    previous[first_of_row] = state_before[row[first_of_row]]
    change = values != previous
    state_after = state_before.copy()
    last_of_row = np.ones(len(row), bool)
    last_of_row[:-1] = row[1:] != row[:-1]
    state_after[row[last_of_row]] = values[last_of_row]
    return row[change], column[change], values[change], state_after


def evidence_at(result: FlagResult, row: int, column: int) -> dict[str, float | int]:
    """Evidence numbers of one cell: counts as int, everything else rounded to 3 places."""
    out: dict[str, float | int] = {}
    for name, array in result.evidence.items():
        value = array[row, column]
        if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
            out[name] = int(value)
        else:
            out[name] = round(float(value), 3)
    return out
