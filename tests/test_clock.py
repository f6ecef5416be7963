from __future__ import annotations

import datetime as dt

import numpy as np

from engine.clock import (
    day_end_ms,
    day_start_ms,
    day_to_iso,
    iso_to_day,
    tokyo_day,
    tokyo_days,
    week_of_day,
    week_start_day,
)


def test_tokyo_midnight_is_15_utc() -> None:
    before = int(dt.datetime(2026, 9, 1, 14, 59, 59, 999_000, dt.UTC).timestamp() * 1000)
    assert day_to_iso(tokyo_day(before)) == "2026-09-01"
    assert day_to_iso(tokyo_day(before + 1)) == "2026-09-02"
    assert tokyo_days(np.array([before, before + 1])).tolist() == [tokyo_day(before), tokyo_day(before) + 1]
    assert day_start_ms(tokyo_day(before + 1)) == before + 1
    assert day_end_ms(tokyo_day(before)) == before


def test_weeks_start_on_monday() -> None:
    for iso in ("2026-08-31", "2026-09-07", "1970-01-05", "2027-01-04"):
        day = iso_to_day(iso)
        assert dt.date.fromisoformat(iso).weekday() == 0
        assert week_start_day(week_of_day(day)) == day
        assert week_of_day(day - 1) == week_of_day(day) - 1
        assert week_of_day(day + 6) == week_of_day(day)
