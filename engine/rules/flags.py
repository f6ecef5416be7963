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
from functools import lru_cache
from typing import Any

import numpy as np

from engine.errors import CapacityError
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
FLAG_ROWS_PER_CHUNK = 16_384
GAIT_KEYS_PRUNE_MIN = 1 << 16


def fixed(value: float) -> int:
    """A threshold in millionths of its unit (exact integer comparisons)."""
    return round(value * FIXED_SCALE)


BAND_DAYS_MAX = 8  # evaluate up to this many days with a band matmul, more with cumsum


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
        if not np.all((offset >= 0) & (offset < 1 << _GAIT_DAY_BITS)):
            raise CapacityError("gait-speed samples must lie within "
                                f"{1 << _GAIT_DAY_BITS} days of 2020-01-01")
        if not np.all((value_fixed >= 0) & (value_fixed < 1 << _GAIT_VALUE_BITS)):
            raise CapacityError(f"gait speeds must lie in [0, {(1 << _GAIT_VALUE_BITS) - 1}] "
                                "µm/s")
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


Cells = tuple[np.ndarray, np.ndarray]  # (row, column) arrays


@dataclass
class FlagResult:
    raw: np.ndarray  # int8 rows x days: RAISED / CLEAR / UNKNOWN
    evidence: dict[str, np.ndarray]  # name -> int (counts) or float arrays, rows x days
    # Evidence too costly for every cell (exact medians): computed for given cells only.
    lazy: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]] | None = None
    order: tuple[str, ...] = ()  # evidence key order (default: lazy keys, then evidence)


def median_below(below: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Is the median of n values below a threshold, given how many are below it?

    Decided by counts except when n is even and exactly half are below (then the
    middle two straddle the threshold and their mean decides): those are returned
    as `undecided` for an exact median.
    """
    return below >= n // 2 + 1, (n % 2 == 0) & (below == n // 2)


class FlagEvaluator:
    """Raw flag values for users x a run of days, from the grid's included-data columns."""

    def __init__(self, rules: Rules, grid: Grid, gait: GaitStore) -> None:
        self.rules = rules.flags
        self.grid = grid
        self.gait = gait
        self.prepare_gait: Callable[[], None] = lambda: None  # set by the engine
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
        steps_in = Windows(steps, lookback, count)
        has = Windows(samples > 0, lookback, count)
        recent_sum = steps_in.sums(0, f.recent_days)
        recent_days = has.sums(0, f.recent_days)
        base_sum = steps_in.sums(f.recent_days, f.baseline_days)
        base_days = has.sums(f.recent_days, f.baseline_days)
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

    def slow_gait(self, rows: np.ndarray, first: int, last: int, valid: np.ndarray) -> FlagResult:
        f = self.rules.slow_gait
        count, width = last - first + 1, f.window_days
        samples, low = self._slabs(rows, first, last, width - 1, "gait_n", "gait_low_n")
        n = Windows(samples, width - 1, count).sums(0, width)
        below = Windows(low, width - 1, count).sums(0, width)
        known = valid & (n >= f.samples_min)
        raised, undecided = median_below(below, n)

        def medians(row: np.ndarray, column: np.ndarray) -> np.ndarray:
            self.prepare_gait()
            values, counts = self.gait.medians(rows[row], first + column, width)
            assert np.array_equal(counts, n[row, column]), "gait store out of step"
            return values

        row, column = np.nonzero(known & undecided)
        if len(row):
            raised[row, column] = medians(row, column) < fixed(f.gait_speed_median_m_s_min)
        return FlagResult(_raw(known, raised), {"samples": n},
                          lambda r, c: {"median_gait_speed_m_s": medians(r, c) / FIXED_SCALE})

    def weight_loss(self, rows: np.ndarray, first: int, last: int,
                    valid: np.ndarray) -> FlagResult:
        f = self.rules.weight_loss
        count, lookback = last - first + 1, self.lookback_days("weight_loss")
        total, samples, heaviest = self._slabs(rows, first, last, lookback,
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

    def social_isolation(self, rows: np.ndarray, first: int, last: int,
                         valid: np.ndarray) -> FlagResult:
        f = self.rules.social_isolation
        count, width = last - first + 1, f.window_days
        talk, talk_n, social = self._slabs(rows, first, last, width - 1,
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

    def low_spo2(self, rows: np.ndarray, first: int, last: int, valid: np.ndarray) -> FlagResult:
        f = self.rules.low_spo2
        count, width = last - first + 1, f.window_nights
        total, samples = self._slabs(rows, first, last, width - 1, "spo2_sum", "spo2_n")
        low = (samples > 0) & (total < fixed(f.spo2_night_mean_pct_min) * samples)
        nights = Windows(samples > 0, width - 1, count).sums(0, width)
        low_nights = Windows(low, width - 1, count).sums(0, width)
        known = nights >= f.nights_with_data_min
        return FlagResult(_raw(known, low_nights >= f.low_nights_min), {
            "low_nights": low_nights, "nights_with_data": nights})

    def resting_hr_rise(self, rows: np.ndarray, first: int, last: int,
                        valid: np.ndarray) -> FlagResult:
        f = self.rules.resting_hr_rise
        count, lookback = last - first + 1, self.lookback_days("resting_hr_rise")
        total, samples = self._slabs(rows, first, last, lookback, "rhr_sum", "rhr_n")
        has = Windows(samples > 0, lookback, count)
        sums, counts = Windows(total, lookback, count), Windows(samples, lookback, count)
        recent_sum, base_sum = sums.sums(0, f.recent_days), sums.sums(f.recent_days,
                                                                        f.baseline_days)
        recent_n, base_n = counts.sums(0, f.recent_days), counts.sums(f.recent_days,
                                                                       f.baseline_days)
        recent_days = has.sums(0, f.recent_days)
        base_days = has.sums(f.recent_days, f.baseline_days)
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


def evidence_of(result: FlagResult, row: np.ndarray, column: np.ndarray,
                ) -> list[dict[str, float | int | str]]:
    """Evidence of the given cells: counts as int, everything else rounded to 3 places."""
    if len(row) == 0:
        return []
    arrays = {name: array[row, column] for name, array in result.evidence.items()}
    if result.lazy is not None:
        arrays = {**result.lazy(row, column), **arrays}
    if result.order:
        arrays = {name: arrays[name] for name in result.order}
    columns = [(name, values.tolist(), values.dtype.kind in "iub")
               for name, values in arrays.items()]
    return [{name: int(values[i]) if integer else round(float(values[i]), 3)
             for name, values, integer in columns} for i in range(len(row))]
