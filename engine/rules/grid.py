"""Dense per-user state: a user axis and a Tokyo-day axis that both grow.

Arrays are (users, days) or (users, weeks) numpy arrays. The day axis starts on a
Monday and its length is a multiple of 7, so week w of the axis is columns
[7w, 7w + 7) and per-week state is a plain (users, days / 7) array.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np

from engine.clock import week_of_day, week_start_day
from engine.errors import CapacityError

USERS_MAX = 1 << 23
DAY_AXIS_DAYS_MAX = 1 << 15
_USERS_CAPACITY_MIN = 64
_DAYS_SLACK = 28


@dataclass(frozen=True)
class Column:
    """A named state array: one value per (user, day), per (user, week) or per user."""

    name: str
    dtype: type
    fill: int
    axis: str  # "day" | "week" | "user"
    width: int = 1  # trailing columns for axis "user"


@dataclass
class Parked:
    """A user's day and week columns over [day_first, day_stop) (Mondays), kept aside
    while the axis starts later than what the user may still need."""

    day_first: int
    day_stop: int
    values: dict[str, np.ndarray]


class Grid:
    def __init__(self, columns: Sequence[Column]) -> None:
        self.columns = {column.name: column for column in columns}
        self.user_ids: list[str] = []
        self.index: dict[str, int] = {}
        self.day0 = 0  # first day of the axis (a Monday); meaningless while days == 0
        self.days = 0  # allocated days (a multiple of 7)
        self.users_capacity = 0
        self.arrays: dict[str, np.ndarray] = {}
        self.parked: dict[int, Parked] = {}
        self._allocate(_USERS_CAPACITY_MIN, 0, 0)

    @property
    def users(self) -> int:
        return len(self.user_ids)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def _shape(self, column: Column, users: int, days: int) -> tuple[int, ...]:
        if column.axis == "day":
            return (users, days)
        if column.axis == "week":
            return (users, days // 7)
        return (users, column.width) if column.width > 1 else (users,)

    def _allocate(self, users: int, day0: int, days: int) -> None:
        """Reallocate every array to (users, days from day0), keeping the contents that
        stay on the axis (a later day0 drops the days before it)."""
        shift = (self.day0 - day0) if self.days else 0
        assert shift % 7 == 0 and days % 7 == 0
        fresh = {}
        for name, column in self.columns.items():
            array: np.ndarray = np.full(self._shape(column, users, days), column.fill,
                                        column.dtype)
            old = self.arrays.get(name)
            if old is not None and old.size:
                rows = old.shape[0]
                if column.axis == "user":
                    array[:rows] = old
                else:
                    step = 1 if column.axis == "day" else 7
                    start, width = shift // step, array.shape[1]
                    low, high = max(start, 0), min(start + old.shape[1], width)
                    if low < high:
                        array[:rows, low:high] = old[:, low - start:high - start]
            fresh[name] = array
        self.arrays = fresh
        self.users_capacity = users
        self.day0, self.days = day0, days

    def user_indices(self, user_ids: Sequence[str]) -> np.ndarray:
        """Global dense index per user id, registering new users (int64)."""
        out = np.fromiter(map(self.index.get, user_ids, repeat(-1)), np.int64,
                          count=len(user_ids))
        new = np.flatnonzero(out < 0)
        if len(new):
            fresh = [user_ids[position] for position in new.tolist()]
            assert len(set(fresh)) == len(fresh), "a batch lists each user once"
            assert "\x1f" not in "".join(fresh), "a user id holds a unit separator"
            first = len(self.user_ids)
            self.index.update(zip(fresh, range(first, first + len(fresh)), strict=True))
            self.user_ids.extend(fresh)
            out[new] = np.arange(first, first + len(fresh))
            if len(self.user_ids) > USERS_MAX:
                raise CapacityError(f"the rules state holds at most {USERS_MAX:,} users")
            if len(self.user_ids) > self.users_capacity:
                self._allocate(max(2 * self.users_capacity, len(self.user_ids)), self.day0,
                               self.days)
        return out

    def ensure_days(self, day_min: int, day_max: int) -> None:
        """Grow the day axis so it covers [day_min, day_max]."""
        if self.days and self.day0 <= day_min and day_max < self.day0 + self.days:
            return
        low = day_min if not self.days else min(day_min, self.day0)
        high = day_max if not self.days else max(day_max, self.day0 + self.days - 1)
        day0 = monday_of(low) - (
            _DAYS_SLACK if self.days and low < self.day0 else 0)
        span = high - day0 + 1
        grow = 0 if not self.days else max(self.days // 2, _DAYS_SLACK)
        days = -(-(span + grow) // 7) * 7
        if days > DAY_AXIS_DAYS_MAX:
            raise CapacityError(f"a batch would stretch the rules state's day axis to {days:,}"
                                f" days (limit {DAY_AXIS_DAYS_MAX:,})")
        self._allocate(self.users_capacity, day0, days)

    def slab(self, name: str, rows: np.ndarray, day_first: int, day_last: int) -> np.ndarray:
        """array[rows, day_first..day_last]; days off the axis read as the column's fill.

        A read-only view when rows are a contiguous ascending run inside the axis (the
        common case: every user evaluated), else a copy.
        """
        column = self.columns[name]
        assert column.axis == "day"
        array = self.arrays[name]
        low, high = day_first - self.day0, day_last - self.day0 + 1
        if (self.days and 0 <= low and high <= self.days and len(rows)
                and rows[-1] - rows[0] + 1 == len(rows) and (len(rows) < 2 or np.all(
                    rows[1:] > rows[:-1]))):
            view = array[rows[0]:rows[-1] + 1, low:high]
            view.flags.writeable = False
            return view
        width = day_last - day_first + 1
        out: np.ndarray = np.full((len(rows), width), column.fill, column.dtype)
        low, high = max(low, 0), min(high, self.days)
        if low < high:
            out[:, low - (day_first - self.day0):high - (day_first - self.day0)] = (
                array[rows, low:high])
        return out

    # ------------------------------------------------------------- bounded state

    def _day_columns(self) -> list[Column]:
        return [c for c in self.columns.values() if c.axis in ("day", "week")]

    def resize_days(self, day_first: int, day_stop: int) -> None:
        """Make the axis exactly [Monday on or before day_first, day_stop rounded up to a
        week): days outside it are dropped (the caller parked what users still need)."""
        day0 = monday_of(day_first)
        days = max(7, -(-(day_stop - day0) // 7) * 7)
        if days > DAY_AXIS_DAYS_MAX:
            raise CapacityError(f"the rules state's day axis would span {days:,} days "
                                f"(limit {DAY_AXIS_DAYS_MAX:,})")
        if self.days and (day0, days) != (self.day0, self.days):
            self._allocate(self.users_capacity, day0, days)

    def park(self, users: np.ndarray, day_first: np.ndarray, day_stop: np.ndarray) -> None:
        """Copy users' day/week columns over [day_first, day_stop) aside (Mondays; a user
        parked before keeps the earlier part, which ends where the axis started)."""
        for user, first, stop in zip(users.tolist(), day_first.tolist(), day_stop.tolist(),
                                     strict=True):
            held = self.parked.get(user)
            begin = first if held is None else held.day_stop
            values = {}
            for column in self._day_columns():
                step = 1 if column.axis == "day" else 7
                low, high = (begin - self.day0) // step, (stop - self.day0) // step
                row = np.full(max(high - low, 0), column.fill, column.dtype)
                inside_low, inside_high = max(low, 0), min(high, self.days // step)
                if inside_low < inside_high:
                    row[inside_low - low:inside_high - low] = (
                        self.arrays[column.name][user, inside_low:inside_high])
                values[column.name] = row if held is None else np.concatenate(
                    (held.values[column.name], row))
            self.parked[user] = Parked(first if held is None else held.day_first,
                                       max(stop, begin), values)

    def unpark(self, users: np.ndarray) -> None:
        """Put parked columns of these users back on the axis (grown back to cover them)."""
        back = sorted({user for user in users.tolist() if user in self.parked})
        if not back:
            return
        first = min(self.parked[user].day_first for user in back)
        if first < self.day0:
            self.resize_days(first, self.day0 + self.days)
        for user in back:
            held = self.parked.pop(user)
            for column in self._day_columns():
                step = 1 if column.axis == "day" else 7
                low = (held.day_first - self.day0) // step
                values = held.values[column.name]
                width = min(len(values), self.days // step - low)
                self.arrays[column.name][user, low:low + width] = values[:width]

    # ------------------------------------------------------------------- state

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        users = self.users
        arrays = {f"column.{name}": array[:users] for name, array in self.arrays.items()}
        parked = sorted(self.parked)
        arrays["parked.users"] = np.array(parked, np.int64)
        arrays["parked.days"] = np.array([[self.parked[u].day_first, self.parked[u].day_stop]
                                          for u in parked], np.int64).reshape(-1, 2)
        for column in self._day_columns():
            arrays[f"parked.{column.name}"] = np.concatenate(
                [np.zeros(0, column.dtype)] + [self.parked[u].values[column.name] for u in parked])
        return arrays, {"user_ids": self.user_ids, "day0": self.day0, "days": self.days}

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        user_ids = list(meta["user_ids"])
        self.user_ids = user_ids
        self.index = {user: i for i, user in enumerate(user_ids)}
        self.users_capacity = max(_USERS_CAPACITY_MIN, len(user_ids))
        self.day0, self.days = int(meta["day0"]), int(meta["days"])
        self.arrays = {}
        for name, column in self.columns.items():
            array: np.ndarray = np.full(self._shape(column, self.users_capacity, self.days), column.fill,
                            column.dtype)
            array[:len(user_ids)] = arrays[f"column.{name}"]
            self.arrays[name] = array
        self.parked = {}
        spans = arrays["parked.days"]
        offset = {c.name: 0 for c in self._day_columns()}
        for user, (first, stop) in zip(arrays["parked.users"].tolist(), spans.tolist(),
                                       strict=True):
            values = {}
            for column in self._day_columns():
                width = (stop - first) // (1 if column.axis == "day" else 7)
                at = offset[column.name]
                values[column.name] = arrays[f"parked.{column.name}"][at:at + width].copy()
                offset[column.name] = at + width
            self.parked[user] = Parked(first, stop, values)


def monday_of(day: int) -> int:
    """The Monday on or before a day number (weeks run Monday to Sunday)."""
    return int(week_start_day(int(week_of_day(day))))
