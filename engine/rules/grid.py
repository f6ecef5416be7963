"""Dense per-user state: a user axis and a Tokyo-day axis that both grow.

Arrays are (users, days) or (users, weeks) numpy arrays. The day axis starts on a
Monday and its length is a multiple of 7, so week w of the axis is columns
[7w, 7w + 7) and per-week state is a plain (users, days / 7) array.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat

import numpy as np

from engine.clock import week_of_day, week_start_day

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


class Grid:
    def __init__(self, columns: Sequence[Column]) -> None:
        self.columns = {column.name: column for column in columns}
        self.user_ids: list[str] = []
        self.index: dict[str, int] = {}
        self.day0 = 0  # first day of the axis (a Monday); meaningless while days == 0
        self.days = 0  # allocated days (a multiple of 7)
        self.users_capacity = 0
        self.arrays: dict[str, np.ndarray] = {}
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
        """Reallocate every array to (users, days from day0), keeping the contents."""
        shift = (self.day0 - day0) if self.days else 0
        assert shift % 7 == 0 and shift >= 0 and days % 7 == 0
        fresh = {}
        for name, column in self.columns.items():
            array: np.ndarray = np.full(self._shape(column, users, days), column.fill,
                                        column.dtype)
            old = self.arrays.get(name)
            if old is not None and old.size:
                rows = old.shape[0]
                if column.axis == "day":
                    array[:rows, shift:shift + old.shape[1]] = old
                elif column.axis == "week":
                    array[:rows, shift // 7:shift // 7 + old.shape[1]] = old
                else:
                    array[:rows] = old
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
            assert len(self.user_ids) <= USERS_MAX, "too many users for the rules state"
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
        assert days <= DAY_AXIS_DAYS_MAX, f"day axis of {days} days is over the limit"
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

def monday_of(day: int) -> int:
    """The Monday on or before a day number (weeks run Monday to Sunday)."""
    return int(week_start_day(int(week_of_day(day))))
