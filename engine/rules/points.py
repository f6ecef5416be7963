"""Points: step tiers, weekly streaks, activities and campaigns, vectorised.

Every function here takes the cells or keys a batch touched and returns award rows
(columns); the caller owns the state. Awards are monotonic: a (user, day) tier, a
(user, week) streak level and an activity key are each awarded at most once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.rules.config import Rules
from engine.schemas import ACTIVITY_KINDS

# Award families: how an award row's `detail` column is read.
FAMILY_TIER = 0  # detail = tier number
FAMILY_STREAK = 1  # detail = Monday (day number) of the week; day = its Sunday
FAMILY_ACTIVITY = 2  # detail = venue code (0 = no venue)
FAMILY_CAMPAIGN_TIER = 3  # detail = tier number
FAMILY_CAMPAIGN_TARGET = 4  # detail = 0
FAMILY_CAMPAIGN_ACTIVITY = 5  # detail = venue code


@dataclass(frozen=True)
class RuleSpec:
    name: str  # the ledger entry's rule, e.g. "steps.tier2", "campaign.autumn"
    family: int
    cause: str | None = None  # for campaign rules: the award it rides on


@dataclass
class AwardColumns:
    """Award rows as columns (one row = one ledger entry)."""

    user: list[np.ndarray] = field(default_factory=list)  # global user index
    day: list[np.ndarray] = field(default_factory=list)
    rule: list[np.ndarray] = field(default_factory=list)  # index into the rule table
    detail: list[np.ndarray] = field(default_factory=list)
    points: list[np.ndarray] = field(default_factory=list)

    def add(self, user: np.ndarray, day: np.ndarray, rule: int | np.ndarray,
            detail: int | np.ndarray, points: np.ndarray) -> None:
        size = len(user)
        if size == 0:
            return
        assert np.all(points > 0), "zero-point awards are never written"
        self.user.append(np.asarray(user, np.int64))
        self.day.append(np.asarray(day, np.int64))
        self.rule.append(np.broadcast_to(np.asarray(rule, np.int64), (size,)))
        self.detail.append(np.broadcast_to(np.asarray(detail, np.int64), (size,)))
        self.points.append(np.asarray(points, np.int64))

    def concatenated(self) -> tuple[np.ndarray, ...]:
        if not self.user:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty, empty, empty
        return tuple(np.concatenate(part) for part in
                     (self.user, self.day, self.rule, self.detail, self.points))

    def __len__(self) -> int:
        return sum(len(part) for part in self.user)


_YEAR_FIRST, _YEAR_LAST = 1900, 2200
_JANUARY_FIRST_DAYS = (np.arange(f"{_YEAR_FIRST}-01-01", f"{_YEAR_LAST + 1}-01-01",
                                 dtype="datetime64[Y]").astype("datetime64[D]").astype(np.int64))


def years_of_days(days: np.ndarray) -> np.ndarray:
    """Calendar year of each day number (days since 1970-01-01)."""
    return _YEAR_FIRST - 1 + np.searchsorted(_JANUARY_FIRST_DAYS, days, side="right")


@dataclass(frozen=True)
class Campaign:
    name: str
    start_day: int
    end_day: int
    multiplier: bool
    factor_percent: int
    bonus_points: int
    steps: bool
    kinds: np.ndarray  # bool per activity kind
    venues: np.ndarray | None  # sorted venue codes, or None for every venue
    rule_tier: int  # rule ids (-1 when not applicable)
    rule_target: int
    rule_activity: np.ndarray  # int64 rule id per activity kind


class CompiledPoints:
    """The point rules as arrays, plus the rule table award rows refer to."""

    def __init__(self, rules: Rules, venue_code: callable) -> None:  # type: ignore[valid-type]
        steps = rules.points.steps
        self.tier_steps_min = np.array([t.steps_min for t in steps.tiers], np.int64)
        cumulative = np.array([0] + [t.points for t in steps.tiers], np.int64)
        capped = np.minimum(cumulative, steps.points_per_day_max)
        self.tier_increment = np.diff(capped)  # points of tier k (1-based) at index k-1
        self.tiers = len(steps.tiers)
        target = steps.target
        self.band_age_min = np.array([b.age_min for b in target.bands], np.int64)
        self.band_percent = np.array([b.percent for b in target.bands], np.int64)
        self.percent_default = target.percent_default
        self.sex_percent = {"F": target.sex_percent.F, "M": target.sex_percent.M,
                            "X": target.sex_percent.X}
        streak = rules.points.streak
        self.target_tier = streak.target_tier
        self.streak_days_min = np.array([level.days_min for level in streak.levels], np.int64)
        self.streak_points = np.array([level.points for level in streak.levels], np.int64)
        by_kind = rules.points.activities.by_kind()
        self.activity_points = np.array([a.points for a in by_kind], np.int64)
        self.activity_per_venue = np.array([a.once_per == "venue" for a in by_kind], bool)

        self.rule_table: list[RuleSpec] = []
        self.rule_tier = np.array([self._rule(f"steps.tier{k}", FAMILY_TIER)
                                   for k in range(1, self.tiers + 1)], np.int64)
        self.rule_streak = np.array([self._rule(f"streak.{level.name}", FAMILY_STREAK)
                                     for level in streak.levels], np.int64)
        self.rule_activity = np.array([self._rule(f"activity.{kind}", FAMILY_ACTIVITY)
                                       for kind in ACTIVITY_KINDS], np.int64)
        self.campaigns = [self._campaign(c, venue_code) for c in rules.campaigns]

    def _rule(self, name: str, family: int, cause: str | None = None) -> int:
        self.rule_table.append(RuleSpec(name, family, cause))
        return len(self.rule_table) - 1

    def _campaign(self, campaign, venue_code) -> Campaign:  # type: ignore[no-untyped-def]
        name = f"campaign.{campaign.name}"
        kinds = np.array([kind in campaign.applies_to for kind in ACTIVITY_KINDS], bool)
        steps = "steps" in campaign.applies_to
        multiplier = campaign.kind == "multiplier"
        venues = None
        if campaign.venues is not None:
            venues = np.unique(np.array([venue_code(v) for v in campaign.venues], np.int64))
        rule_tier = self._rule(name, FAMILY_CAMPAIGN_TIER, "steps.tier") if (
            steps and multiplier) else -1
        rule_target = self._rule(name, FAMILY_CAMPAIGN_TARGET, "steps.target") if (
            steps and not multiplier) else -1
        rule_activity = np.array([
            self._rule(name, FAMILY_CAMPAIGN_ACTIVITY, f"activity.{kind}") if kinds[k] else -1
            for k, kind in enumerate(ACTIVITY_KINDS)], np.int64)
        return Campaign(name, campaign.start_day, campaign.end_day, multiplier,
                        campaign.factor_percent if multiplier else 100,
                        campaign.points or 0, steps, kinds, venues, rule_tier, rule_target,
                        rule_activity)

    def thresholds(self, birth_year: np.ndarray, sex_percent: np.ndarray,
                   days: np.ndarray) -> np.ndarray:
        """Personal tier thresholds, shape (cells, tiers). birth_year < 0 = no profile."""
        band_percent = np.full(len(days), self.percent_default, np.int64)
        if len(self.band_age_min):
            age = years_of_days(days) - birth_year
            band = np.searchsorted(self.band_age_min, age, side="right") - 1
            band_percent = np.where(band >= 0, self.band_percent[np.maximum(band, 0)],
                                    band_percent)
        percent = np.where(birth_year >= 0, band_percent * sex_percent, self.percent_default * 100)
        scaled = self.tier_steps_min[None, :] * percent[:, None]
        return -(-scaled // 10_000)

    def extra(self, campaign: Campaign, points: np.ndarray) -> np.ndarray:
        """Campaign points riding on awards worth `points` (integer, rounded down)."""
        if campaign.multiplier:
            return (campaign.factor_percent - 100) * points // 100
        return np.full(len(points), campaign.bonus_points, np.int64)


def step_awards(compiled: CompiledPoints, out: AwardColumns, user: np.ndarray, day: np.ndarray,
                tier_old: np.ndarray, tier_new: np.ndarray) -> None:
    """Tier increments (and campaign extras) for cells whose tier rose."""
    for k in range(1, compiled.tiers + 1):
        increment = int(compiled.tier_increment[k - 1])
        if increment <= 0:
            continue
        hit = np.flatnonzero((tier_old < k) & (tier_new >= k))
        if len(hit) == 0:
            continue
        points = np.full(len(hit), increment, np.int64)
        out.add(user[hit], day[hit], compiled.rule_tier[k - 1], k, points)
        for campaign in compiled.campaigns:
            if campaign.rule_tier < 0:
                continue
            inside = hit[(day[hit] >= campaign.start_day) & (day[hit] <= campaign.end_day)]
            extra = compiled.extra(campaign, np.full(len(inside), increment, np.int64))
            keep = extra > 0
            out.add(user[inside][keep], day[inside][keep], campaign.rule_tier, k, extra[keep])
    target = compiled.target_tier
    reached = np.flatnonzero((tier_old < target) & (tier_new >= target))
    for campaign in compiled.campaigns:
        if campaign.rule_target < 0 or len(reached) == 0:
            continue
        inside = reached[(day[reached] >= campaign.start_day) & (day[reached] <= campaign.end_day)]
        out.add(user[inside], day[inside], campaign.rule_target, 0,
                compiled.extra(campaign, np.zeros(len(inside), np.int64)))


def streak_awards(compiled: CompiledPoints, out: AwardColumns, user: np.ndarray,
                  monday: np.ndarray, days_met: np.ndarray, levels_old: np.ndarray) -> np.ndarray:
    """Streak levels newly reached in (user, week) pairs; returns the new level counts."""
    levels_new = np.searchsorted(compiled.streak_days_min, days_met, side="right")
    levels_new = np.maximum(levels_new, levels_old)
    for level in range(len(compiled.streak_days_min)):
        hit = np.flatnonzero((levels_old <= level) & (levels_new > level))
        out.add(user[hit], monday[hit] + 6, compiled.rule_streak[level], monday[hit],
                np.full(len(hit), compiled.streak_points[level], np.int64))
    return levels_new


def activity_awards(compiled: CompiledPoints, out: AwardColumns, user: np.ndarray,
                    day: np.ndarray, kind: np.ndarray, venue: np.ndarray) -> None:
    """Awards for activity keys never awarded before (campaign extras included)."""
    points = compiled.activity_points[kind]
    paid = np.flatnonzero(points > 0)
    out.add(user[paid], day[paid], compiled.rule_activity[kind[paid]], venue[paid], points[paid])
    for campaign in compiled.campaigns:
        if not campaign.kinds.any():
            continue
        covered = campaign.kinds[kind] & (day >= campaign.start_day) & (day <= campaign.end_day)
        if campaign.venues is not None:
            covered &= np.isin(venue, campaign.venues)
        hit = np.flatnonzero(covered)
        extra = compiled.extra(campaign, points[hit])
        keep = extra > 0
        hit = hit[keep]
        out.add(user[hit], day[hit], campaign.rule_activity[kind[hit]], venue[hit], extra[keep])
