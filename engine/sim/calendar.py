"""The year people live through: seasons, Japanese holidays and days without the watch.

Older people in Tokyo walk less in the heat of late summer and the cold of
midwinter and differently on public holidays, at New Year, in Golden Week and
at Obon; watches are left on the charger, forgotten on a trip or taken off in
hospital for days at a time. Flags must live with all of it.
"""

from __future__ import annotations

import numpy as np

DAYS_PER_YEAR = 365.2425
SEASON_STEPS_AMPLITUDE = 0.07  # peaks in late April and late October
SEASON_PEAK_DAY_OF_YEAR = 110
SEASON_RHR_AMPLITUDE_BPM = 1.5  # higher in winter
SEASON_WEIGHT_AMPLITUDE_KG = 0.5  # heavier in winter
HOLIDAY_STEPS_FACTOR = 0.85
NEW_YEAR_STEPS_FACTOR = 0.7
# Fixed-date public holidays and the customary days off (month, day).
HOLIDAYS = ((1, 1), (1, 2), (1, 3), (2, 11), (2, 23), (3, 20), (4, 29), (5, 3), (5, 4),
            (5, 5), (8, 11), (8, 13), (8, 14), (8, 15), (8, 16), (9, 23), (11, 3), (11, 23),
            (12, 29), (12, 30), (12, 31))
NEW_YEAR = ((12, 29), (12, 30), (12, 31), (1, 1), (1, 2), (1, 3))
NON_WEAR_SPELLS_PER_YEAR = 2.0  # charger, trips, hospital stays
NON_WEAR_SPELL_DAYS = (2, 11)
PARTIAL_WEAR_DAY_FRACTION = 0.01  # put on for an hour, then left on the table


def day_of_year(day: np.ndarray) -> np.ndarray:
    return np.mod(day, DAYS_PER_YEAR)


def season(day: np.ndarray) -> np.ndarray:
    """-1..1: +1 in the mild seasons (late April, late October), -1 in midsummer and midwinter."""
    return np.cos(4 * np.pi * (day_of_year(day) - SEASON_PEAK_DAY_OF_YEAR) / DAYS_PER_YEAR)


def winter(day: np.ndarray) -> np.ndarray:
    """-1..1: +1 in midwinter (mid January), -1 in midsummer."""
    return np.cos(2 * np.pi * (day_of_year(day) - 15) / DAYS_PER_YEAR)


def _month_day(day: np.ndarray) -> np.ndarray:
    dates = np.datetime64("1970-01-01") + day.astype("timedelta64[D]")
    months = dates.astype("datetime64[M]")
    month = months.astype(np.int64) % 12 + 1
    return month * 100 + (dates - months).astype(np.int64) + 1


def steps_factor(day: np.ndarray) -> np.ndarray:
    """Seasonal and holiday factor on usual daily steps, per day number."""
    code = _month_day(day)
    factor = 1.0 + SEASON_STEPS_AMPLITUDE * season(day)
    factor = np.where(np.isin(code, [m * 100 + d for m, d in HOLIDAYS]),
                      factor * HOLIDAY_STEPS_FACTOR, factor)
    return np.where(np.isin(code, [m * 100 + d for m, d in NEW_YEAR]),
                    factor * NEW_YEAR_STEPS_FACTOR / HOLIDAY_STEPS_FACTOR, factor)


def non_wear_spells(users: int, days: int, rng: np.random.Generator) -> np.ndarray:
    """(users, days) True on the days of multi-day spells without the watch."""
    out = np.zeros((users, days), bool)
    count = rng.poisson(NON_WEAR_SPELLS_PER_YEAR * days / DAYS_PER_YEAR, users)
    user = np.repeat(np.arange(users), count)
    start = rng.integers(0, days, len(user))
    length = rng.integers(*NON_WEAR_SPELL_DAYS, len(user))
    for offset in range(NON_WEAR_SPELL_DAYS[1]):
        live = offset < length
        column = start[live] + offset
        inside = column < days
        out[user[live][inside], column[inside]] = True
    return out
