"""Asia/Tokyo calendar days as plain integers.

Japan has no daylight saving time, so a Tokyo day is a fixed UTC+9 offset and
can be computed with integer arithmetic on whole numpy arrays. A "day" in the
engine is the number of Tokyo calendar days since 1970-01-01.
"""

from __future__ import annotations

import datetime as dt

import numpy as np

TOKYO_OFFSET_MS = 9 * 3600 * 1000
DAY_MS = 86_400_000
WEEK_DAYS = 7
# 1970-01-01 (day 0) was a Thursday; the first Monday was 1970-01-05 (day 4).
MONDAY_DAY = 4
EPOCH_DATE = dt.date(1970, 1, 1)
TOKYO = dt.timezone(dt.timedelta(hours=9), "Asia/Tokyo")


def tokyo_day(ts_ms: int) -> int:
    """Tokyo calendar day number of a Unix timestamp in milliseconds."""
    return (ts_ms + TOKYO_OFFSET_MS) // DAY_MS


def tokyo_days(ts_ms: np.ndarray) -> np.ndarray:
    """Vectorised :func:`tokyo_day` (int64 milliseconds in, int32 days out)."""
    return ((ts_ms.astype(np.int64) + TOKYO_OFFSET_MS) // DAY_MS).astype(np.int32)


def tokyo_minute_of_day(ts_ms: np.ndarray) -> np.ndarray:
    return (((ts_ms.astype(np.int64) + TOKYO_OFFSET_MS) % DAY_MS) // 60_000).astype(np.int32)


def day_start_ms(day: int) -> int:
    """First millisecond (UTC epoch) of a Tokyo day."""
    return day * DAY_MS - TOKYO_OFFSET_MS


def day_end_ms(day: int) -> int:
    """Last millisecond (UTC epoch) of a Tokyo day."""
    return day_start_ms(day + 1) - 1


def day_to_iso(day: int) -> str:
    return (EPOCH_DATE + dt.timedelta(days=int(day))).isoformat()


def iso_to_day(text: str) -> int:
    """Parse YYYY-MM-DD; raises ValueError with the offending text."""
    try:
        return (dt.date.fromisoformat(text) - EPOCH_DATE).days
    except ValueError as error:
        raise ValueError(f"not a date (expected YYYY-MM-DD): {text!r}") from error


def week_of_day(day: int | np.ndarray) -> int | np.ndarray:
    """Monday-based week number; week w covers days [week_start(w), week_start(w)+6]."""
    return (day - MONDAY_DAY) // WEEK_DAYS


def week_start_day(week: int) -> int:
    return week * WEEK_DAYS + MONDAY_DAY


def ms_to_iso(ts_ms: int) -> str:
    return dt.datetime.fromtimestamp(ts_ms / 1000, TOKYO).isoformat(timespec="seconds")
