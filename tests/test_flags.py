"""Every flag through the same day-by-day trajectories, with exact event days.

Windows are one day wide, so each day's raw value is that day's data alone:
G (good) says clear, B (bad) says raised, - has no usable data (for steps: a
day the device was not worn). Hysteresis: raised after 2 bad days in a row,
cleared after 3 good days in a row; unknown days change nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from engine.clock import day_to_iso
from engine.rules.batch import SampleRecord
from engine.rules.flags import FLAG_NAMES
from tests.test_rules import (
    D0,
    GAIT,
    RHR,
    SPO2,
    STEPS,
    TALK,
    WEIGHT,
    Harness,
    flag_rules,
    sample,
    tick,
)

HOLD = {"raise_after_days": 2, "clear_after_days": 3}
SECTIONS: dict[str, dict[str, Any]] = {
    "step_decline": {"recent_days": 1, "baseline_days": 9, "ratio_max": 0.7,
                     "recent_days_with_data_min": 1, "baseline_days_with_data_min": 1},
    "low_activity": {"window_days": 1, "median_steps_per_day_min": 2000, "days_with_data_min": 1},
    "slow_gait": {"window_days": 1, "samples_min": 1},
    "weight_loss": {"recent_days": 1, "lookback_days": 20, "loss_kg_min": 2.0},
    "social_isolation": {"window_days": 1, "conversation_days_fraction_min": 1.0,
                         "conversation_minutes_per_day_min": 30.0, "activity_wait_days": 0},
    "low_spo2": {"window_nights": 1, "low_nights_min": 1, "nights_with_data_min": 1},
    "resting_hr_rise": {"recent_days": 1, "baseline_days": 9, "rise_bpm_min": 10.0,
                        "recent_days_with_data_min": 1, "baseline_days_with_data_min": 1},
}


def _steps(good: float, bad: float, gap: float | None) -> Callable[[str, int], list[SampleRecord]]:
    def day(kind: str, number: int) -> list[SampleRecord]:
        value = {"G": good, "B": bad, "-": gap}[kind]
        return [] if value is None else [sample("A", STEPS, number, value)]
    return day


def _metric(metric: int, good: float, bad: float, hour: float = 10.0
            ) -> Callable[[str, int], list[SampleRecord]]:
    def day(kind: str, number: int) -> list[SampleRecord]:
        if kind == "-":
            return []
        return [sample("A", metric, number, good if kind == "G" else bad, hour=hour)]
    return day


DAYS: dict[str, Callable[[str, int], list[SampleRecord]]] = {
    "step_decline": _steps(10_000.0, 5_000.0, 50.0),  # 50 steps: not worn
    "low_activity": _steps(5_000.0, 1_000.0, 50.0),
    "slow_gait": _metric(GAIT, 1.2, 0.8),
    "weight_loss": _metric(WEIGHT, 60.0, 57.0),
    "social_isolation": _metric(TALK, 60.0, 5.0),
    "low_spo2": _metric(SPO2, 96.0, 85.0, hour=2.0),
    "resting_hr_rise": _metric(RHR, 60.0, 75.0),
}
assert set(DAYS) == set(SECTIONS) == set(FLAG_NAMES)

LEAD = "GGGGGGGG"  # baselines (9 days) stay mostly good through the flapping
TRAJECTORIES = {  # name: (days, expected [(day index, state)])
    "raising": (LEAD + "BBBBBB", [(9, "raised")]),
    "recovering": (LEAD + "BBB" + "GGGG", [(9, "raised"), (13, "cleared")]),
    "flapping": (LEAD + "BGBG" + "BB" + "GBGBGB" + "GGG",
                 [(13, "raised"), (22, "cleared")]),
    "non_wear_gap": (LEAD + "B--B" + "G--GG", [(11, "raised"), (16, "cleared")]),
}


def run(flag: str, days: str) -> list[tuple[str, str]]:
    rules = flag_rules(**{f"flags__{flag}": {"severity": 3, **HOLD, **SECTIONS[flag]}})
    records = [r for i, kind in enumerate(days) for r in DAYS[flag](kind, D0 + i)]
    h = Harness(rules).feed(*records, tick(D0 + len(days) + 1))
    return [(f[3], f[2]) for f in h.flag_log(flag)]


@pytest.mark.parametrize("trajectory", sorted(TRAJECTORIES))
@pytest.mark.parametrize("flag", FLAG_NAMES)
def test_trajectory_gives_the_exact_event_days(flag: str, trajectory: str) -> None:
    days, expected = TRAJECTORIES[trajectory]
    assert run(flag, days) == [(day_to_iso(D0 + i), state) for i, state in expected]


@pytest.mark.parametrize("flag", FLAG_NAMES)
def test_every_flag_fed_day_by_day_gives_the_same_events(flag: str) -> None:
    days, expected = TRAJECTORIES["flapping"]
    rules = flag_rules(**{f"flags__{flag}": {"severity": 3, **HOLD, **SECTIONS[flag]}})
    h = Harness(rules)
    for i, kind in enumerate(days):
        h.feed(*DAYS[flag](kind, D0 + i), tick(D0 + i))
    h.feed(tick(D0 + len(days) + 1))
    assert [(f[3], f[2]) for f in h.flag_log(flag)] == [
        (day_to_iso(D0 + i), state) for i, state in expected]
