"""Exact-value tests of each rule of the vectorised engine (points and flags)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from engine.clock import day_end_ms, day_start_ms, day_to_iso, iso_to_day
from engine.ids import derive_id
from engine.rules.batch import (
    ActivityBatch,
    ActivityRecord,
    Profiles,
    SampleBatch,
    SampleRecord,
    WatermarkLog,
)
from engine.rules.config import Rules, default_rules, parse_rules_data
from engine.rules.engine import RulesEngine
from engine.rules.flags import FLAG_NAMES
from engine.rules.runs import Runs
from engine.schemas import ACTIVITY_KINDS, METRIC_BY_NAME, EntryKind
from tests.rules_reference import default_data

HOUR_MS = 3_600_000
STEPS = METRIC_BY_NAME["steps"].code
GAIT = METRIC_BY_NAME["gait_speed"].code
WEIGHT = METRIC_BY_NAME["body_weight"].code
SPO2 = METRIC_BY_NAME["spo2"].code
RHR = METRIC_BY_NAME["resting_heart_rate"].code
TALK = METRIC_BY_NAME["conversation"].code
KIND = {kind: code for code, kind in enumerate(ACTIVITY_KINDS)}
D0 = iso_to_day("2025-03-03")  # a Monday


def rules_with(**changes: Any) -> Rules:
    """Default rules with dotted-key changes, e.g. {"flags.settle_days": 0}."""
    data = default_data()
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return parse_rules_data(data, "test rules")


def at(day: int | str, hour: float = 10.0) -> int:
    day = iso_to_day(day) if isinstance(day, str) else day
    return day_start_ms(day) + int(hour * HOUR_MS)


def sample(user: str, metric: int, day: int | str, *values: float, hour: float = 10.0
           ) -> SampleRecord:
    ts = at(day, hour)
    return SampleRecord(user, metric, [ts + i * 60_000 for i in range(len(values))], list(values))


_event_numbers = iter(range(10**9))


def activity(user: str, kind: str, day: int | str, venue: str = "", hour: float = 10.0
             ) -> ActivityRecord:
    return ActivityRecord(user, f"e{next(_event_numbers)}", KIND[kind], at(day, hour), venue)


class Harness:
    def __init__(self, rules: Rules | None = None,
                 profiles: tuple[tuple[str, int, str], ...] = ()) -> None:
        self.rules = rules or default_rules()
        self.engine = RulesEngine(self.rules, Profiles.from_rows(profiles))
        self.log = WatermarkLog()
        self.awards: list = []
        self.flags: list = []

    def feed(self, *records: SampleRecord | ActivityRecord) -> Harness:
        samples = [r for r in records if isinstance(r, SampleRecord)]
        activities = [r for r in records if isinstance(r, ActivityRecord)]
        out = self.engine.process(self.log.sample_batch(samples),
                                  self.log.activity_batch(activities))
        self.awards += out.awards
        self.flags += out.flags
        return self

    def points(self, rule_prefix: str = "") -> dict[tuple[str, str, str], int]:
        return {(a.user_id, a.day, a.rule): a.points for a in self.awards
                if a.rule.startswith(rule_prefix)}

    def flag_log(self, flag: str | None = None) -> list[tuple[str, str, str, dict]]:
        return [(f.user_id, f.flag.value, f.state.value, f.day, f.evidence) for f in self.flags
                if flag is None or f.flag.value == flag]


# ------------------------------------------------------------------ step tiers


def test_1999_steps_earn_nothing_and_2000_steps_earn_tier1() -> None:
    h = Harness().feed(sample("A", STEPS, D0, 1999.0), sample("B", STEPS, D0, 1500.0, 500.0))
    assert len(h.awards) == 1
    award = h.awards[0]
    assert (award.user_id, award.rule, award.points, award.day) == (
        "B", "steps.tier1", 1, "2025-03-03")
    assert award.kind == EntryKind.award
    assert award.entry_id == derive_id("award", "B", "2025-03-03", "steps.tier1", 1)
    assert award.ts_ms == day_end_ms(D0) == 1_741_013_999_999  # 2025-03-03T14:59:59.999Z
    assert award.ref is None
    assert award.rules_version == default_rules().version


def test_reaching_tier3_writes_one_entry_per_tier_worth_its_increment() -> None:
    h = Harness().feed(sample("A", STEPS, D0, 8000.0), sample("A", STEPS, D0 + 1, 4999.0),
                       sample("A", STEPS, D0 + 2, 5000.0))
    assert h.points() == {
        ("A", "2025-03-03", "steps.tier1"): 1, ("A", "2025-03-03", "steps.tier2"): 1,
        ("A", "2025-03-03", "steps.tier3"): 1, ("A", "2025-03-04", "steps.tier1"): 1,
        ("A", "2025-03-05", "steps.tier1"): 1, ("A", "2025-03-05", "steps.tier2"): 1}


def test_late_steps_award_exactly_the_increment_and_nothing_twice() -> None:
    h = Harness().feed(sample("A", STEPS, D0, 3000.0))
    assert h.points() == {("A", "2025-03-03", "steps.tier1"): 1}
    h.feed(sample("A", STEPS, D0, 2500.0, hour=20))
    assert h.points() == {("A", "2025-03-03", "steps.tier1"): 1,
                          ("A", "2025-03-03", "steps.tier2"): 1}
    h.feed(sample("A", STEPS, D0, 10.0, hour=21))
    assert len(h.awards) == 2


def test_daily_cap_limits_step_points_and_skips_zero_increments() -> None:
    tiers = [{"steps_min": 2000, "points": 1}, {"steps_min": 5000, "points": 3},
             {"steps_min": 8000, "points": 6}]
    h = Harness(rules_with(points__steps__tiers=tiers, points__steps__points_per_day_max=4))
    h.feed(sample("A", STEPS, D0, 9000.0))
    assert h.points() == {("A", "2025-03-03", "steps.tier1"): 1,
                          ("A", "2025-03-03", "steps.tier2"): 2,
                          ("A", "2025-03-03", "steps.tier3"): 1}
    h = Harness(rules_with(points__steps__points_per_day_max=2))
    h.feed(sample("A", STEPS, D0, 9000.0))
    assert sum(h.points().values()) == 2
    assert ("A", "2025-03-03", "steps.tier3") not in h.points()


def test_tokyo_midnight_splits_days_at_15_utc() -> None:
    day_end = day_end_ms(D0)  # 14:59:59.999 UTC: last ms of the Tokyo day
    h = Harness().feed(SampleRecord("A", STEPS, [day_end, day_end + 1], [1500.0, 1500.0]))
    assert h.awards == []
    h.feed(SampleRecord("A", STEPS, [day_start_ms(D0)], [500.0]))  # 15:00:00.000 UTC the day before
    assert h.points() == {("A", "2025-03-03", "steps.tier1"): 1}


def test_each_steps_sample_is_rounded_half_to_even_before_summing() -> None:
    h = Harness().feed(sample("A", STEPS, D0, 1000.5, 999.5),  # 1000 + 1000
                       sample("B", STEPS, D0, 1000.5, 998.5))  # 1000 + 998
    assert h.points() == {("A", "2025-03-03", "steps.tier1"): 1}


# ------------------------------------------------------------- personal targets


@pytest.mark.parametrize(("birth_year", "threshold"), [
    (1961, 2000),  # 64 in 2025: default band
    (1960, 1800),  # 65: 90 %
    (1951, 1800),  # 74
    (1950, 1500),  # 75: 75 %
    (1941, 1500),  # 84
    (1940, 1200),  # 85: 60 %
    (None, 2000),  # no profile: default
])
def test_tier1_threshold_by_age_band(birth_year: int | None, threshold: int) -> None:
    profiles = (("A", birth_year, "F"), ("B", birth_year, "M")) if birth_year else ()
    h = Harness(profiles=profiles).feed(sample("A", STEPS, D0, threshold - 1.0),
                                        sample("B", STEPS, D0, float(threshold)))
    assert h.points() == {("B", "2025-03-03", "steps.tier1"): 1}


def test_age_is_the_calendar_year_of_the_day_minus_the_birth_year() -> None:
    h = Harness(profiles=(("A", 1960, "F"),))
    h.feed(sample("A", STEPS, "2024-12-31", 1900.0), sample("A", STEPS, "2025-01-01", 1900.0))
    assert h.points() == {("A", "2025-01-01", "steps.tier1"): 1}


def test_sex_percent_scales_thresholds_rounding_up() -> None:
    rules = rules_with(points__steps__target__sex_percent={"F": 103, "M": 100, "X": 100})
    # tier 2 for a 75-84 woman: 5000 x 75 x 103 / 10000 = 3862.5 -> 3863 steps
    h = Harness(rules, profiles=(("A", 1950, "F"), ("B", 1950, "F"), ("C", 1950, "M")))
    h.feed(sample("A", STEPS, D0, 3862.0), sample("B", STEPS, D0, 3863.0),
           sample("C", STEPS, D0, 3750.0))
    assert h.points("steps.tier2") == {("B", "2025-03-03", "steps.tier2"): 1,
                                       ("C", "2025-03-03", "steps.tier2"): 1}


# ---------------------------------------------------------------------- streaks


def test_streak_week_crossing_a_month_end_awards_5of7_then_7of7_once() -> None:
    monday = iso_to_day("2025-03-31")
    h = Harness()
    h.feed(*(sample("A", STEPS, monday + i, 2000.0) for i in range(4)),
           sample("A", STEPS, monday - 1, 2000.0))  # Sunday before: another week
    assert h.points("streak") == {}
    h.feed(sample("A", STEPS, monday + 5, 3000.0))
    streak = [a for a in h.awards if a.rule.startswith("streak")]
    assert len(streak) == 1
    award = streak[0]
    assert (award.rule, award.points, award.day, award.ref) == (
        "streak.5of7", 5, "2025-04-06", "week:2025-03-31")
    assert award.ts_ms == day_end_ms(monday + 6)
    assert award.entry_id == derive_id("award", "A", "2025-04-06", "streak.5of7",
                                       "week:2025-03-31")
    h.feed(sample("A", STEPS, monday + 4, 1000.0))  # still below target
    h.feed(sample("A", STEPS, monday + 4, 1000.0), sample("A", STEPS, monday + 6, 2500.0))
    assert h.points("streak") == {("A", "2025-04-06", "streak.5of7"): 5,
                                  ("A", "2025-04-06", "streak.7of7"): 2}
    h.feed(sample("A", STEPS, monday + 6, 9000.0, hour=22))
    assert len([a for a in h.awards if a.rule.startswith("streak")]) == 2


def test_streak_counts_days_at_the_configured_target_tier() -> None:
    h = Harness(rules_with(points__streak__target_tier=2))
    h.feed(*(sample("A", STEPS, D0 + i, 4999.0) for i in range(7)))
    assert h.points("streak") == {}
    h.feed(*(sample("A", STEPS, D0 + i, 1.0, hour=20) for i in range(5)))
    assert h.points("streak") == {("A", "2025-03-09", "streak.5of7"): 5}


# -------------------------------------------------------------------- activities


def test_checkin_at_most_once_per_venue_per_day() -> None:
    h = Harness().feed(activity("A", "checkin", D0, "V1"), activity("A", "checkin", D0, "V1"),
                       activity("A", "checkin", D0, "V2"), activity("A", "checkin", D0 + 1, "V1"))
    h.feed(activity("A", "checkin", D0, "V1", hour=23))
    checkins = sorted((a.day, a.ref, a.points) for a in h.awards)
    assert checkins == [("2025-03-03", "V1", 2), ("2025-03-03", "V2", 2), ("2025-03-04", "V1", 2)]
    first = next(a for a in h.awards if a.ref == "V1" and a.day == "2025-03-03")
    assert first.entry_id == derive_id("award", "A", "2025-03-03", "activity.checkin", "V1")
    assert first.ts_ms == day_end_ms(D0)


def test_activity_points_by_kind_and_once_per_day_kinds() -> None:
    h = Harness().feed(activity("A", "meal", D0, "V1"), activity("A", "meal", D0, "V2"),
                       activity("A", "brain_training", D0), activity("A", "brain_training", D0),
                       activity("A", "class", D0, "C1"), activity("A", "volunteer", D0, "Park"),
                       activity("A", "checkin", D0))
    assert {(a.rule, a.ref): a.points for a in h.awards} == {
        ("activity.meal", None): 1, ("activity.brain_training", None): 1,
        ("activity.class", "C1"): 3, ("activity.volunteer", "Park"): 5,
        ("activity.checkin", None): 2}


def test_activity_day_is_the_tokyo_day() -> None:
    day_end = day_end_ms(D0)
    h = Harness().feed(ActivityRecord("A", "x1", KIND["meal"], day_end),
                       ActivityRecord("A", "x2", KIND["meal"], day_end + 1))
    assert sorted(a.day for a in h.awards) == ["2025-03-03", "2025-03-04"]


# --------------------------------------------------------------------- campaigns


def campaign(**fields: Any) -> dict[str, Any]:
    return {"name": "spring", "start": "2025-04-01", "end": "2025-04-03", **fields}


def test_multiplier_campaign_window_is_inclusive_and_extras_ride_on_each_tier() -> None:
    rules = rules_with(campaigns=[campaign(kind="multiplier", applies_to=["steps"], factor=2.0)])
    h = Harness(rules)
    h.feed(*(sample("A", STEPS, day, 5000.0) for day in
             ("2025-03-31", "2025-04-01", "2025-04-03", "2025-04-04")))
    extras = {(a.day, a.ref): a.points for a in h.awards if a.rule == "campaign.spring"}
    assert extras == {("2025-04-01", "steps.tier1"): 1, ("2025-04-01", "steps.tier2"): 1,
                      ("2025-04-03", "steps.tier1"): 1, ("2025-04-03", "steps.tier2"): 1}
    extra = next(a for a in h.awards if a.rule == "campaign.spring")
    assert extra.entry_id == derive_id("award", "A", "2025-04-01", "campaign.spring",
                                       "steps.tier1")


def test_multiplier_extras_round_down_to_whole_points() -> None:
    rules = rules_with(campaigns=[campaign(kind="multiplier", applies_to=["steps", "volunteer"],
                                           factor=1.5)])
    h = Harness(rules).feed(sample("A", STEPS, "2025-04-02", 9000.0),
                            activity("A", "volunteer", "2025-04-02", "Park"))
    assert h.points("campaign") == {("A", "2025-04-02", "campaign.spring"): 2}  # 5 x 0.5


def test_bonus_campaign_with_venues_covers_only_those_venues() -> None:
    rules = rules_with(campaigns=[campaign(kind="bonus", applies_to=["checkin"], points=3,
                                           venues=["V1"])])
    h = Harness(rules).feed(activity("A", "checkin", "2025-04-01", "V1"),
                            activity("A", "checkin", "2025-04-01", "V1"),
                            activity("A", "checkin", "2025-04-01", "V2"),
                            activity("A", "checkin", "2025-04-04", "V1"))
    bonus = [a for a in h.awards if a.rule == "campaign.spring"]
    assert [(a.day, a.ref, a.points) for a in bonus] == [("2025-04-01", "activity.checkin@V1", 3)]


def test_bonus_campaign_on_steps_pays_once_when_the_day_reaches_the_target() -> None:
    rules = rules_with(campaigns=[campaign(kind="bonus", applies_to=["steps"], points=4)])
    h = Harness(rules).feed(sample("A", STEPS, "2025-04-01", 2500.0))
    h.feed(sample("A", STEPS, "2025-04-01", 6000.0, hour=20))
    assert h.points("campaign") == {("A", "2025-04-01", "campaign.spring"): 4}


def test_multiplier_campaign_on_a_once_per_day_kind() -> None:
    rules = rules_with(campaigns=[campaign(kind="multiplier", applies_to=["meal"], factor=3.0)])
    h = Harness(rules).feed(activity("A", "meal", "2025-04-03"), activity("A", "meal", "2025-04-03"))
    assert {(a.rule, a.ref): a.points for a in h.awards} == {
        ("activity.meal", None): 1, ("campaign.spring", "activity.meal@"): 2}


# ------------------------------------------------------------------------- flags


def flag_rules(**changes: Any) -> Rules:
    """settle_days 1 and every flag off except the ones the test switches on."""
    base: dict[str, Any] = {"flags__settle_days": 1}
    for name in ("step_decline", "low_activity", "slow_gait", "weight_loss",
                 "social_isolation", "low_spo2", "resting_hr_rise"):
        base[f"flags__{name}__enabled"] = False
    return rules_with(**{**base, **changes})


def iso(day: int) -> str:
    return day_to_iso(day)


def tick(day: int) -> SampleRecord:
    """A heart-rate sample (read by no flag) that moves the samples watermark to `day`."""
    return sample("A", METRIC_BY_NAME["heart_rate"].code, day, 70.0)


def test_step_decline_against_a_frozen_median_baseline_with_evidence() -> None:
    rules = flag_rules(flags__step_decline={
        "severity": 3, "recent_days": 3, "baseline_days": 4, "ratio_max": 0.7,
        "recent_days_with_data_min": 2, "baseline_days_with_data_min": 3, "clear_after_days": 2})
    daily = [8000, 10000, 12000, 10000, 5000, 4000, 6000, 5000, 20000, 9000, 9500, 9000]
    h = Harness(rules).feed(*(sample("A", STEPS, D0 + i, float(v)) for i, v in enumerate(daily)),
                            tick(D0 + 12))
    assert h.flag_log() == [
        ("A", "step_decline", "raised", iso(D0 + 5), {
            "recent_median_steps": 5000.0, "baseline_median_steps": 10000.0, "ratio": 0.5,
            "recent_days_with_data": 3, "baseline_days_with_data": 3}),
        # The baseline stays at its value of the raise day (the live one has dropped
        # to 5000), so only a real recovery clears the flag: 2 clear days in a row.
        ("A", "step_decline", "cleared", iso(D0 + 10), {
            "recent_median_steps": 9500.0, "baseline_median_steps": 10000.0, "ratio": 0.95,
            "recent_days_with_data": 3, "baseline_days_with_data": 4}),
    ]
    raised = h.flags[0]
    assert raised.flag_id == derive_id("flag", "A", "step_decline", iso(D0 + 5), "raised")
    assert raised.rules_version == rules.version


def test_non_wear_days_are_neither_low_activity_nor_part_of_the_baseline() -> None:
    rules = flag_rules(flags__wear_steps_per_day_min=100, flags__low_activity={
        "severity": 2, "window_days": 3, "median_steps_per_day_min": 2000,
        "days_with_data_min": 2, "clear_after_days": 1})
    daily = [3000, 99, 0, 2500, 1000, 1200]  # 99 and 0 steps: the watch was not worn
    h = Harness(rules).feed(*(sample("A", STEPS, D0 + i, float(v)) for i, v in enumerate(daily)),
                            tick(D0 + 7))
    # Counted as days, 99 and 0 would have raised it on D0+1 (median 1549.5).
    assert h.flag_log() == [
        ("A", "low_activity", "raised", iso(D0 + 4),
         {"median_steps_per_day": 1750.0, "days_with_data": 2})]


def test_low_activity_raised_and_cleared_with_evidence() -> None:
    rules = flag_rules(flags__low_activity={"severity": 2, "window_days": 3,
                                            "median_steps_per_day_min": 2000,
                                            "days_with_data_min": 2, "clear_after_days": 1})
    daily = [1000, 1500, 3000, 5000, 5000]
    h = Harness(rules).feed(*(sample("A", STEPS, D0 + i, float(v)) for i, v in enumerate(daily)),
                            tick(D0 + 5))
    assert h.flag_log() == [
        ("A", "low_activity", "raised", iso(D0 + 1),
         {"median_steps_per_day": 1250.0, "days_with_data": 2}),
        ("A", "low_activity", "cleared", iso(D0 + 3),
         {"median_steps_per_day": 3000.0, "days_with_data": 3}),
    ]


def test_slow_gait_uses_the_median_of_all_samples_in_the_window() -> None:
    rules = flag_rules(flags__slow_gait={"severity": 4, "window_days": 3, "samples_min": 3,
                                         "gait_speed_median_m_s_min": 1.0,
                                         "clear_after_days": 1})
    h = Harness(rules).feed(sample("A", GAIT, D0, 0.8, 0.9), sample("A", GAIT, D0 + 1, 1.2),
                            sample("A", GAIT, D0 + 2, 1.3, 1.1), sample("A", GAIT, D0 + 6, 0.9),
                            sample("A", GAIT, D0 + 7, 0.95, 1.2, 0.97), tick(D0 + 8))
    assert h.flag_log() == [
        ("A", "slow_gait", "raised", iso(D0 + 1), {"median_gait_speed_m_s": 0.9, "samples": 3}),
        ("A", "slow_gait", "cleared", iso(D0 + 2), {"median_gait_speed_m_s": 1.1, "samples": 5}),
        ("A", "slow_gait", "raised", iso(D0 + 7),  # even count: mean of the middle two
         {"median_gait_speed_m_s": 0.96, "samples": 4}),
    ]


def test_weight_loss_compares_recent_mean_with_lookback_max() -> None:
    rules = flag_rules(flags__weight_loss={
        "severity": 4, "recent_days": 2, "lookback_days": 10, "loss_kg_min": 2.0,
        "recent_samples_min": 1, "lookback_samples_min": 1, "clear_after_days": 1})
    weights = {0: 70.0, 5: 69.0, 8: 67.5, 9: 68.2, 10: 69.5}
    h = Harness(rules).feed(*(sample("A", WEIGHT, D0 + d, w) for d, w in weights.items()),
                            tick(D0 + 11))
    assert h.flag_log() == [
        ("A", "weight_loss", "raised", iso(D0 + 8), {
            "weight_max_kg": 70.0, "weight_recent_kg": 67.5, "loss_kg": 2.5,
            "recent_samples": 1}),
        ("A", "weight_loss", "cleared", iso(D0 + 10), {
            "weight_max_kg": 70.0, "weight_recent_kg": 68.85, "loss_kg": 1.15,
            "recent_samples": 2}),
    ]


def test_social_isolation_needs_no_social_activity_and_little_conversation() -> None:
    rules = flag_rules(flags__social_isolation={
        "severity": 3, "window_days": 4, "conversation_minutes_per_day_min": 30.0,
        "conversation_days_fraction_min": 0.5, "clear_after_days": 1})
    h = Harness(rules).feed(*(sample("A", TALK, D0 + i, 6.0, 4.0) for i in range(10)),
                            activity("A", "checkin", D0, "V1"),
                            *(activity("A", "meal", D0 + i) for i in range(5, 8)),
                            activity("A", "class", D0 + 8, "C1"),
                            activity("A", "meal", D0 + 9))
    assert h.flag_log() == [
        ("A", "social_isolation", "raised", iso(D0 + 4), {
            "social_activities": 0, "conversation_minutes_per_day": 10.0,
            "conversation_days": 4}),
        ("A", "social_isolation", "cleared", iso(D0 + 8), {
            "social_activities": 1, "conversation_minutes_per_day": 10.0,
            "conversation_days": 4}),
    ]


def test_social_isolation_judges_people_without_activity_records_on_the_samples_clock() -> None:
    rules = flag_rules(flags__social_isolation={
        "severity": 3, "window_days": 4, "conversation_minutes_per_day_min": 30.0,
        "activity_wait_days": 3, "clear_after_days": 1})
    h = Harness(rules).feed(*(sample("A", TALK, D0 + i, 5.0) for i in range(10)))
    # Samples settled through D0+8; without activity records, judged 3 days behind.
    assert h.flag_log() == [("A", "social_isolation", "raised", iso(D0 + 1), {
        "social_activities": 0, "conversation_minutes_per_day": 5.0, "conversation_days": 2})]
    assert h.engine.grid["flag_last"][0, FLAG_NAMES.index("social_isolation")] == D0 + 5
    h.feed(activity("A", "checkin", D0 + 6, "V1"),
           *(sample("A", TALK, D0 + i, 5.0) for i in range(10, 14)))
    assert h.flag_log()[1:] == [("A", "social_isolation", "cleared", iso(D0 + 6), {
        "social_activities": 1, "conversation_minutes_per_day": 5.0, "conversation_days": 4})]


def test_low_spo2_by_hand_case_nights_every_10_minutes() -> None:
    """95 % for 14 nights then 87 % for 6 nights, samples 00:00-06:00 every 10 minutes
    (36 a night: their fixed-point sum once overflowed an int32 comparison)."""
    records = []
    for night in range(20):
        start = day_start_ms(D0 + night)
        records.append(SampleRecord("A", SPO2, [start + i * 600_000 for i in range(36)],
                                    [95.0 if night < 14 else 87.0] * 36))
        records.append(sample("A", STEPS, D0 + night, 3000.0, hour=12))
    h = Harness(flag_rules(flags__low_spo2={"severity": 5}))
    for record in records:
        h.feed(record)
    assert h.flag_log() == [("A", "low_spo2", "raised", iso(D0 + 16),
                             {"low_nights": 3, "nights_with_data": 14})]


def test_low_spo2_counts_low_nights_from_samples_before_6am() -> None:
    rules = flag_rules(flags__low_spo2={
        "severity": 5, "window_nights": 3, "night_end_hour": 6, "spo2_night_mean_pct_min": 90.0,
        "low_nights_min": 2, "nights_with_data_min": 2, "clear_after_days": 1})
    h = Harness(rules).feed(
        sample("A", SPO2, D0, 88.0, 89.0, hour=2), sample("A", SPO2, D0 + 1, 95.0, hour=5.99),
        sample("A", SPO2, D0 + 1, 80.0, hour=6),  # 06:00 is day time: ignored
        sample("A", SPO2, D0 + 2, 87.0, hour=0), sample("A", SPO2, D0 + 3, 95.0, hour=3),
        sample("A", SPO2, D0 + 4, 96.0, hour=3), tick(D0 + 5))
    assert h.flag_log() == [
        ("A", "low_spo2", "raised", iso(D0 + 2), {"low_nights": 2, "nights_with_data": 3}),
        ("A", "low_spo2", "cleared", iso(D0 + 3), {"low_nights": 1, "nights_with_data": 3}),
    ]


def test_resting_hr_rise_against_the_baseline_before_the_recent_window() -> None:
    rules = flag_rules(flags__resting_hr_rise={
        "severity": 3, "recent_days": 2, "baseline_days": 3, "rise_bpm_min": 10.0,
        "recent_days_with_data_min": 2, "baseline_days_with_data_min": 3, "clear_after_days": 1})
    daily = [60.0, 62.0, 61.0, 72.0, 73.0, 65.0, 64.0]
    h = Harness(rules).feed(*(sample("A", RHR, D0 + i, v) for i, v in enumerate(daily)),
                            tick(D0 + 7))
    assert h.flag_log() == [
        ("A", "resting_hr_rise", "raised", iso(D0 + 4), {
            "recent_mean_bpm": 72.5, "baseline_median_bpm": 61.0, "rise_bpm": 11.5,
            "recent_days_with_data": 2, "baseline_days_with_data": 3}),
        ("A", "resting_hr_rise", "cleared", iso(D0 + 5), {  # against the frozen baseline
            "recent_mean_bpm": 69.0, "baseline_median_bpm": 61.0, "rise_bpm": 8.0,
            "recent_days_with_data": 2, "baseline_days_with_data": 3}),
    ]


LOW_ACTIVITY = {"severity": 2, "window_days": 3, "median_steps_per_day_min": 2000,
                "days_with_data_min": 2, "clear_after_days": 1}


def test_flags_wait_until_a_day_is_settled() -> None:
    h = Harness(flag_rules(flags__settle_days=2, flags__low_activity=LOW_ACTIVITY))
    h.feed(sample("A", STEPS, D0, 1000.0), sample("A", STEPS, D0 + 1, 1000.0),
           sample("A", STEPS, D0 + 2, 1000.0))
    assert h.flags == []  # watermark day D0+2: only D0 is settled
    h.feed(sample("A", STEPS, D0 + 3, 1000.0))
    assert [f[2:4] for f in h.flag_log()] == [("raised", iso(D0 + 1))]


def test_data_arriving_after_its_day_settled_earns_points_but_never_counts_for_flags() -> None:
    h = Harness(flag_rules(flags__settle_days=2, flags__low_activity=LOW_ACTIVITY))
    h.feed(*(sample("A", STEPS, D0 + i, 1000.0) for i in range(5)))  # settled through D0+2
    assert [f[2:4] for f in h.flag_log()] == [("raised", iso(D0 + 1))]
    h.feed(sample("A", STEPS, D0 + 2, 9000.0, hour=20),  # D0+2 was settled: points only
           sample("A", STEPS, D0 + 3, 9000.0))  # D0+3 was not: counts for flags too
    assert ("A", iso(D0 + 2), "steps.tier3") in h.points()
    h.feed(sample("A", STEPS, D0 + 6, 1000.0), sample("A", STEPS, D0 + 7, 1000.0))
    # Had the late 9000 counted, the median would have cleared the flag on D0+3.
    assert [f[2:5] for f in h.flag_log()] == [
        ("raised", iso(D0 + 1), {"median_steps_per_day": 1000.0, "days_with_data": 2}),
        ("cleared", iso(D0 + 5), {"median_steps_per_day": 5500.0, "days_with_data": 2}),
    ]


def test_too_little_data_keeps_the_state() -> None:
    h = Harness(flag_rules(flags__low_activity=LOW_ACTIVITY))
    h.feed(sample("A", STEPS, D0, 1000.0), sample("A", STEPS, D0 + 1, 1000.0),
           sample("A", STEPS, D0 + 20, 9000.0), tick(D0 + 21))
    assert [f[2:4] for f in h.flag_log()] == [("raised", iso(D0 + 1))]


def test_disabled_flags_are_never_evaluated() -> None:
    h = Harness(flag_rules()).feed(*(sample("A", STEPS, D0 + i, 10.0) for i in range(30)))
    assert h.flags == []


# ------------------------------------------------------------------- the engine


def test_empty_batches_produce_nothing() -> None:
    engine = RulesEngine(default_rules(), Profiles.empty())
    out = engine.process(SampleBatch.empty(), ActivityBatch.empty())
    assert out.awards == [] and out.flags == [] and out.award_count == 0


def test_award_columns_and_drafts_agree() -> None:
    engine = RulesEngine(default_rules())
    log = WatermarkLog()
    out = engine.process(log.sample_batch([sample("A", STEPS, D0 + i, 9000.0) for i in range(7)]),
                         ActivityBatch.empty())
    assert out.award_count == len(out.awards) == 7 * 3 + 2
    assert out.award_points == sum(a.points for a in out.awards) == 7 * 3 + 5 + 2


def test_sparse_aggregation_matches_the_dense_box() -> None:
    records = [sample("A", STEPS, D0, 1500.0), sample("B", STEPS, D0 + 40, 2500.0),
               sample("A", STEPS, D0, 600.0, hour=22), sample("B", GAIT, D0 + 3, 0.9)]
    results = []
    for box in (1 << 25, 1):
        engine = RulesEngine(default_rules(), box_cells_max=box)
        out = engine.process(WatermarkLog().sample_batch(records), ActivityBatch.empty())
        results.append(sorted((a.entry_id, a.points) for a in out.awards))
        assert int(engine.grid["steps"].sum()) == 1500 + 2500 + 600
    assert results[0] == results[1] and len(results[0]) == 2


def test_state_grows_backwards_when_older_days_arrive() -> None:
    h = Harness()
    h.feed(sample("A", STEPS, D0, 2000.0))
    h.feed(sample("A", STEPS, D0 - 100, 2000.0), sample("B", STEPS, D0 + 100, 2000.0))
    assert sorted(a.day for a in h.awards) == ["2024-11-23", "2025-03-03", "2025-06-11"]
    assert h.engine.grid.day0 <= D0 - 100
    assert int(np.sum(h.engine.grid["steps"])) == 6000


def test_severity_weights_are_configuration() -> None:
    rules = default_rules()
    assert rules.flags.severity_of("low_spo2") == 5
    assert rules.flags.severity_of("low_activity") == 2


def test_runs_collapse_records_and_split_those_crossing_midnight() -> None:
    midnight = day_start_ms(D0 + 1)
    batch = WatermarkLog().sample_batch([
        SampleRecord("A", STEPS, [at(D0, 9), at(D0, 8), at(D0, 10)], [10.0, 20.5, 30.0]),
        SampleRecord("A", STEPS, [midnight - 1, midnight], [1.0, 2.0]),
        SampleRecord("B", GAIT, [at(D0, 12)], [1.2]),
    ])
    runs = Runs.of(batch, share_max=1.0)
    assert sorted(zip(runs.user.tolist(), runs.day.tolist(), runs.steps.tolist(),
                      runs.length.tolist(), strict=True)) == [
        (0, D0, 1.0, 1), (0, D0, 60.0, 3), (0, D0 + 1, 2.0, 1), (1, D0, 1.0, 1)]
    per_sample = Runs.of(batch, share_max=0.0)
    assert len(per_sample.start) == len(batch) == 6
    assert sorted(per_sample.sample_indices(per_sample.metric == GAIT).tolist()) == [5]


def test_run_and_per_sample_aggregation_leave_the_same_state() -> None:
    records = [sample("A", STEPS, D0 + i % 3, 700.0 + i, 300.0) for i in range(9)] + [
        sample("A", GAIT, D0 + 1, 0.9, 1.1), sample("B", SPO2, D0, 88.0, 91.0, hour=1)]
    grids = []
    for share in (1.0, 0.0):
        engine = RulesEngine(default_rules(), runs_share_max=share)
        engine.process(WatermarkLog().sample_batch(records), ActivityBatch.empty())
        grids.append(engine.grid.arrays)
    assert grids[0].keys() == grids[1].keys()
    for name in grids[0]:
        assert np.array_equal(grids[0][name], grids[1][name]), name
