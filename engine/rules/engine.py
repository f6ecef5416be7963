"""The rules engine: batches of samples and activities in, awards and flag events out.

State is dense numpy arrays over (user, Tokyo day) that grow as users and days
appear (`engine.rules.grid`). A batch is aggregated with one np.bincount pass per
column over a (batch user x channel x day) box, then only the cells the batch
touched are re-scored. Flags are re-evaluated for the days that became settled.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from engine.clock import DAY_MS, TOKYO_OFFSET_MS, day_end_ms, day_to_iso, tokyo_day
from engine.entries import EntryDraft
from engine.ids import derive_id
from engine.rules.batch import ActivityBatch, Profiles, SampleBatch
from engine.rules.config import Rules
from engine.rules.flags import (
    FIXED_SCALE,
    FLAG_ISOLATION,
    FLAG_NAMES,
    FLAG_ROWS_PER_CHUNK,
    NEVER_DAY,
    RAISED,
    FlagEvaluator,
    GaitStore,
    evidence_at,
    transitions,
)
from engine.rules.grid import Column, Grid
from engine.rules.points import (
    FAMILY_ACTIVITY,
    FAMILY_CAMPAIGN_ACTIVITY,
    FAMILY_CAMPAIGN_TARGET,
    FAMILY_CAMPAIGN_TIER,
    FAMILY_STREAK,
    FAMILY_TIER,
    AwardColumns,
    CompiledPoints,
    activity_awards,
    step_awards,
    streak_awards,
)
from engine.schemas import ACTIVITY_KINDS, METRIC_BY_NAME, EntryKind, FlagEvent, FlagState

# Sample channels of the aggregation box: steps, metrics some flag reads, the rest.
CHANNEL_STEPS, CHANNEL_FLAGS, CHANNEL_OTHER = 0, 1, 2
CHANNELS = 3
_FLAG_METRICS = ("resting_heart_rate", "spo2", "gait_speed", "body_weight", "conversation")
CHANNEL_OF_METRIC = np.full(128, CHANNEL_OTHER, np.int32)
CHANNEL_OF_METRIC[METRIC_BY_NAME["steps"].code] = CHANNEL_STEPS
for _name in _FLAG_METRICS:
    CHANNEL_OF_METRIC[METRIC_BY_NAME[_name].code] = CHANNEL_FLAGS
# A batch whose (users x channels x days) box is larger is aggregated sparsely.
BOX_CELLS_MAX = 1 << 25
# Activity keys: user << 39 | (day - KEY_DAY_BASE) << 23 | kind << 20 | venue code.
KEY_DAY_BASE = 18_262  # 2020-01-01
VENUES_MAX = 1 << 20
_NO_DAY = np.iinfo(np.int32).max

COLUMNS = (
    Column("steps", np.int64, 0, "day"),  # every steps sample: points
    Column("tier", np.int8, 0, "day"),  # highest step tier reached (awarded)
    Column("fsteps_sum", np.int64, 0, "day"),  # steps samples that count for flags
    Column("fsteps_n", np.int32, 0, "day"),
    Column("gait_n", np.int32, 0, "day"),
    Column("weight_sum", np.int64, 0, "day"),  # millionths of a kg
    Column("weight_n", np.int32, 0, "day"),
    Column("weight_max", np.int64, -1, "day"),
    Column("talk_sum", np.int64, 0, "day"),  # millionths of a minute of conversation
    Column("talk_n", np.int32, 0, "day"),
    Column("spo2_sum", np.int64, 0, "day"),  # night samples only
    Column("spo2_n", np.int32, 0, "day"),
    Column("rhr_sum", np.int64, 0, "day"),
    Column("rhr_n", np.int32, 0, "day"),
    Column("social_n", np.int32, 0, "day"),  # activities of the isolation flag's kinds
    Column("streak", np.int8, 0, "week"),  # streak levels awarded
    Column("birth_year", np.int16, -1, "user"),
    Column("sex_percent", np.int64, 100, "user"),
    Column("samples_day_max", np.int32, NEVER_DAY, "user"),  # day of the samples watermark
    Column("activities_day_max", np.int32, NEVER_DAY, "user"),
    Column("first_day", np.int32, _NO_DAY, "user"),
    Column("flag_state", np.int8, 0, "user", len(FLAG_NAMES)),
    Column("flag_last", np.int32, NEVER_DAY, "user", len(FLAG_NAMES)),
)


@dataclass(frozen=True)
class AwardTable:
    """Award rows of one batch as columns, sorted by (day, user, rule, detail)."""

    user_id: list[str]
    day: np.ndarray
    rule: list[str]
    points: np.ndarray


class RulesOutput:
    """Awards and flag events of one batch.

    `awards` (EntryDraft objects) are built on first access from the columns the
    core computed; `award_count`/`award_points` need no objects at all.
    """

    def __init__(self, columns: tuple[np.ndarray, ...], engine: RulesEngine,
                 flags: list[FlagEvent]) -> None:
        self._columns = columns
        self._engine = engine
        self.flags = flags

    @property
    def award_count(self) -> int:
        return len(self._columns[0])

    @property
    def award_points(self) -> int:
        return int(self._columns[4].sum())

    @cached_property
    def awards(self) -> list[EntryDraft]:
        return self._engine.drafts(self._columns)


class RulesEngine:
    """Incremental, vectorised rules: feed batches in log order with `process`."""

    def __init__(self, rules: Rules, profiles: Profiles | None = None, *,
                 box_cells_max: int = BOX_CELLS_MAX) -> None:
        self.rules = rules
        self.version = rules.version
        self.settle_days = rules.flags.settle_days
        self.box_cells_max = box_cells_max
        profiles = profiles or Profiles.empty()
        self._profiles = {user: (int(year), str(sex)) for user, year, sex in
                          zip(profiles.user_ids, profiles.birth_year, profiles.sex, strict=True)}
        self.grid = Grid(COLUMNS)
        self.venues: list[str] = [""]
        self._venue_codes: dict[str, int] = {"": 0}
        self.points = CompiledPoints(rules, self._venue_code)
        self.awarded_keys = np.zeros(0, np.int64)
        self.gait = GaitStore()
        self.evaluator = FlagEvaluator(rules, self.grid, self.gait)
        self.flags_enabled = np.array(
            [getattr(rules.flags, name).enabled for name in FLAG_NAMES], bool)
        kinds = rules.flags.social_isolation.social_kinds
        self.social_kind = np.array([kind in kinds for kind in ACTIVITY_KINDS], bool)
        self.night_minutes_end = rules.flags.low_spo2.night_end_hour * 60
        self._day_iso: dict[int, str] = {}

    # ------------------------------------------------------------------ batches

    def process(self, samples: SampleBatch, activities: ActivityBatch) -> RulesOutput:
        sample_users = self._users(samples.users)
        activity_users = self._users(activities.users)
        self._ensure_days(samples.ts_ms, activities.ts_ms)
        awards = AwardColumns()
        if len(samples):
            self._samples(samples, sample_users, awards)
        if len(activities):
            self._activities(activities, activity_users, awards)
        touched = np.union1d(sample_users, activity_users)
        flags = self._evaluate_flags(touched) if len(touched) else []
        return RulesOutput(self._sorted(awards), self, flags)

    def _users(self, user_ids: list[str]) -> np.ndarray:
        before = self.grid.users
        index = self.grid.user_indices(user_ids)
        if self.grid.users > before:
            self._set_profiles(before, self.grid.users)
        return index

    def _set_profiles(self, first: int, stop: int) -> None:
        sex_percent = self.points.sex_percent
        for user in range(first, stop):
            profile = self._profiles.get(self.grid.user_ids[user])
            if profile is not None:
                self.grid["birth_year"][user] = profile[0]
                self.grid["sex_percent"][user] = sex_percent[profile[1]]

    def _ensure_days(self, *timestamps: np.ndarray) -> None:
        present = [ts for ts in timestamps if len(ts)]
        if present:
            low = min(int(ts.min()) for ts in present)
            high = max(int(ts.max()) for ts in present)
            self.grid.ensure_days(tokyo_day(low), tokyo_day(high))

    def _venue_code(self, venue: str) -> int:
        code = self._venue_codes.get(venue)
        if code is None:
            code = len(self.venues)
            assert code < VENUES_MAX, "too many venues for activity keys"
            self._venue_codes[venue] = code
            self.venues.append(venue)
        return code

    # ------------------------------------------------------------------ samples

    def _boxed_cells(self, batch: SampleBatch) -> tuple[np.ndarray, ...]:
        """Per touched (batch user, channel, day offset): sample count and rounded sum."""
        ts = batch.ts_ms
        day_first = tokyo_day(int(ts.min()))
        span = tokyo_day(int(ts.max())) - day_first + 1
        offset = ts + (TOKYO_OFFSET_MS - day_first * DAY_MS)
        offset //= DAY_MS
        channel = CHANNEL_OF_METRIC[batch.metric]
        users = len(batch.users)
        if users * CHANNELS * span <= self.box_cells_max:
            key = batch.user_idx * np.int32(CHANNELS * span)
            key += channel * np.int32(span)
            offset += key
            size = users * CHANNELS * span
            counts = np.bincount(offset, minlength=size)
            cells = np.flatnonzero(counts)
            sums = np.bincount(offset, weights=np.rint(batch.value), minlength=size)[cells]
            counts = counts[cells]
        else:
            offset += (batch.user_idx.astype(np.int64) * CHANNELS + channel) * span
            cells, inverse = np.unique(offset, return_inverse=True)
            counts = np.bincount(inverse, minlength=len(cells))
            sums = np.bincount(inverse, weights=np.rint(batch.value), minlength=len(cells))
        user, rest = np.divmod(cells, CHANNELS * span)
        channel_of_cell, day = np.divmod(rest, span)
        return user, channel_of_cell, day + day_first, counts, sums

    def _samples(self, batch: SampleBatch, users: np.ndarray, out: AwardColumns) -> None:
        grid = self.grid
        user, channel, day, counts, sums = self._boxed_cells(batch)
        global_user = users[user]
        np.maximum.at(grid["samples_day_max"], global_user, day.astype(np.int32))
        np.minimum.at(grid["first_day"], global_user, day.astype(np.int32))
        steps = channel == CHANNEL_STEPS
        user, day = global_user[steps], day[steps]
        column = day - grid.day0
        total = sums[steps].astype(np.int64)
        assert np.array_equal(total, sums[steps]), "step sums must be exact"
        grid["steps"][user, column] += total
        grid["fsteps_sum"][user, column] += total
        grid["fsteps_n"][user, column] += counts[steps].astype(np.int32)
        self._score_steps(user, day, column, out)
        excluded = self._excluded(batch)
        self._unflag_steps(batch, users, excluded)
        if np.any(channel == CHANNEL_FLAGS):
            self._flag_metrics(batch, users, excluded)

    def _excluded(self, batch: SampleBatch) -> np.ndarray:
        """Samples that arrived after their day was settled (never count for flags)."""
        settle = self.settle_days
        candidates = np.flatnonzero((batch.wm_before_ms - batch.ts_ms) > (settle - 1) * DAY_MS)
        wm = batch.wm_before_ms[candidates]
        late = (wm >= 0) & (day_of(batch.ts_ms[candidates]) <= day_of(wm) - settle)
        return candidates[late]

    def _unflag_steps(self, batch: SampleBatch, users: np.ndarray, excluded: np.ndarray) -> None:
        excluded = excluded[batch.metric[excluded] == METRIC_BY_NAME["steps"].code]
        if len(excluded) == 0:
            return
        where = (users[batch.user_idx[excluded]],
                 day_of(batch.ts_ms[excluded]) - self.grid.day0)
        np.add.at(self.grid["fsteps_sum"], where, -np.rint(batch.value[excluded]).astype(np.int64))
        np.add.at(self.grid["fsteps_n"], where, np.int32(-1))

    def _flag_metrics(self, batch: SampleBatch, users: np.ndarray, excluded: np.ndarray) -> None:
        grid = self.grid
        chosen = np.flatnonzero(CHANNEL_OF_METRIC[batch.metric] == CHANNEL_FLAGS)
        chosen = chosen[~np.isin(chosen, excluded, assume_unique=True)]
        metric = batch.metric[chosen]
        ts = batch.ts_ms[chosen]
        user = users[batch.user_idx[chosen]]
        day = day_of(ts)
        column = day - grid.day0
        value = np.rint(batch.value[chosen] * FIXED_SCALE).astype(np.int64)

        def add(name: str, pick: np.ndarray, sum_name: str | None = None) -> None:
            where = (user[pick], column[pick])
            np.add.at(grid[name], where, np.int32(1))
            if sum_name:
                np.add.at(grid[sum_name], where, value[pick])

        code = METRIC_BY_NAME
        add("rhr_n", metric == code["resting_heart_rate"].code, "rhr_sum")
        add("talk_n", metric == code["conversation"].code, "talk_sum")
        minute = (ts + TOKYO_OFFSET_MS) % DAY_MS // 60_000
        add("spo2_n", (metric == code["spo2"].code) & (minute < self.night_minutes_end),
            "spo2_sum")
        weight = metric == code["body_weight"].code
        add("weight_n", weight, "weight_sum")
        np.maximum.at(grid["weight_max"], (user[weight], column[weight]), value[weight])
        gait = metric == code["gait_speed"].code
        add("gait_n", gait)
        if self.flags_enabled[FLAG_NAMES.index("slow_gait")]:
            self.gait.add(user[gait], day[gait], value[gait])

    def _score_steps(self, user: np.ndarray, day: np.ndarray, column: np.ndarray,
                     out: AwardColumns) -> None:
        grid, compiled = self.grid, self.points
        thresholds = compiled.thresholds(grid["birth_year"][user].astype(np.int64),
                                         grid["sex_percent"][user], day)
        tier_new = (grid["steps"][user, column][:, None] >= thresholds).sum(axis=1)
        tier_old = grid["tier"][user, column].astype(np.int64)
        assert np.all(tier_new >= tier_old), "step tiers never go down"
        rose = np.flatnonzero(tier_new > tier_old)
        if len(rose) == 0:
            return
        user, day, column = user[rose], day[rose], column[rose]
        tier_old, tier_new = tier_old[rose], tier_new[rose]
        grid["tier"][user, column] = tier_new
        step_awards(compiled, out, user, day, tier_old, tier_new)
        target = compiled.target_tier
        crossed = (tier_old < target) & (tier_new >= target)
        if not crossed.any() or len(compiled.streak_days_min) == 0:
            return
        week = np.unique(user[crossed] * (grid.days // 7) + column[crossed] // 7)
        user, week = np.divmod(week, grid.days // 7)
        days_met = (grid["tier"][user[:, None], week[:, None] * 7 + np.arange(7)]
                    >= target).sum(axis=1)
        levels_old = grid["streak"][user, week].astype(np.int64)
        grid["streak"][user, week] = streak_awards(compiled, out, user, grid.day0 + week * 7,
                                                   days_met, levels_old)

    # --------------------------------------------------------------- activities

    def _activities(self, batch: ActivityBatch, users: np.ndarray, out: AwardColumns) -> None:
        grid = self.grid
        user = users[batch.user_idx]
        day = day_of(batch.ts_ms)
        np.maximum.at(grid["activities_day_max"], user, day.astype(np.int32))
        np.minimum.at(grid["first_day"], user, day.astype(np.int32))
        wm = batch.wm_before_ms
        included = (wm < 0) | (day > day_of(wm) - self.settle_days)
        social = np.flatnonzero(included & self.social_kind[batch.kind])
        np.add.at(grid["social_n"], (user[social], day[social] - grid.day0), np.int32(1))
        kind = batch.kind.astype(np.int64)
        venue_names, venue_index = np.unique(np.array(batch.venue_id, dtype=object),
                                             return_inverse=True)
        codes = np.array([self._venue_code(str(v)) for v in venue_names], np.int64)
        venue = np.where(self.points.activity_per_venue[kind], codes[venue_index], 0)
        assert np.all((day >= KEY_DAY_BASE) & (day < KEY_DAY_BASE + (1 << 16)))
        keys = np.unique((user << 39) | ((day - KEY_DAY_BASE) << 23) | (kind << 20) | venue)
        position = np.searchsorted(self.awarded_keys, keys)
        known = np.zeros(len(keys), bool)
        inside = position < len(self.awarded_keys)
        known[inside] = self.awarded_keys[position[inside]] == keys[inside]
        fresh = keys[~known]
        if len(fresh) == 0:
            return
        self.awarded_keys = np.insert(self.awarded_keys, position[~known], fresh)
        activity_awards(self.points, out, fresh >> 39, ((fresh >> 23) & 0xFFFF) + KEY_DAY_BASE,
                        (fresh >> 20) & 0x7, fresh & (VENUES_MAX - 1))

    # -------------------------------------------------------------------- flags

    def _evaluate_flags(self, users: np.ndarray) -> list[FlagEvent]:
        grid = self.grid
        settle = self.settle_days
        samples_max = grid["samples_day_max"][users].astype(np.int64)
        horizon = np.where(samples_max == NEVER_DAY, NEVER_DAY, samples_max - settle)
        horizon = np.repeat(horizon[:, None], len(FLAG_NAMES), axis=1)
        activities_max = grid["activities_day_max"][users].astype(np.int64)
        both = np.minimum(horizon[:, FLAG_ISOLATION], activities_max - settle)
        horizon[:, FLAG_ISOLATION] = np.where(activities_max == NEVER_DAY, NEVER_DAY, both)
        last = grid["flag_last"][users].astype(np.int64)
        start = np.where(last == NEVER_DAY, grid["first_day"][users][:, None], last + 1)
        need = self.flags_enabled[None, :] & (horizon != NEVER_DAY) & (start <= horizon)
        rows = np.flatnonzero(need.any(axis=1))
        if len(rows) == 0:
            return []
        if need[:, FLAG_NAMES.index("slow_gait")].any():
            self._prepare_gait()
        rows = rows[np.argsort(np.where(need, start, _NO_DAY)[rows].min(axis=1), kind="stable")]
        events: list[FlagEvent] = []
        for chunk in range(0, len(rows), FLAG_ROWS_PER_CHUNK):
            part = rows[chunk:chunk + FLAG_ROWS_PER_CHUNK]
            events += self._evaluate_rows(users[part], need[part], start[part], horizon[part])
        events.sort(key=lambda e: (e.user_id, e.day, FLAG_NAMES.index(e.flag.value)))
        return events

    def _prepare_gait(self) -> None:
        width = self.rules.flags.slow_gait.window_days
        last = self.grid["flag_last"][:, FLAG_NAMES.index("slow_gait")].astype(np.int64)
        keep_from = np.where(last == NEVER_DAY, np.iinfo(np.int64).min, last + 2 - width)
        self.gait.consolidate(keep_from)

    def _evaluate_rows(self, users: np.ndarray, need: np.ndarray, start: np.ndarray,
                       horizon: np.ndarray) -> list[FlagEvent]:
        grid = self.grid
        first = int(np.where(need, start, _NO_DAY).min())
        last = int(np.where(need, horizon, NEVER_DAY).max())
        days = np.arange(first, last + 1)
        events: list[FlagEvent] = []
        for index, name in enumerate(FLAG_NAMES):
            if not need[:, index].any():
                continue
            valid = (need[:, index, None] & (days >= start[:, index, None])
                     & (days <= horizon[:, index, None]))
            result = self.evaluator.functions[name](users, first, last, valid)
            state = grid["flag_state"][users, index]
            row, column, value, state_after = transitions(result, valid, state)
            grid["flag_state"][users, index] = state_after
            grid["flag_last"][users, index] = np.where(need[:, index], horizon[:, index],
                                                       grid["flag_last"][users, index])
            for r, c, v in zip(row.tolist(), column.tolist(), value.tolist(), strict=True):
                events.append(self._flag_event(int(users[r]), name, first + c, v,
                                               evidence_at(result, r, c)))
        return events

    def _flag_event(self, user: int, flag: str, day: int, state: int,
                    evidence: dict[str, float | int]) -> FlagEvent:
        user_id = self.grid.user_ids[user]
        state_name = FlagState.raised if state == RAISED else FlagState.cleared
        day_iso = day_to_iso(day)
        return FlagEvent(v=1, flag_id=derive_id("flag", user_id, flag, day_iso, state_name.value),
                         user_id=user_id, flag=flag, state=state_name, day=day_iso,
                         evidence=evidence, rules_version=self.version)

    # ------------------------------------------------------------------- output

    @staticmethod
    def _sorted(awards: AwardColumns) -> tuple[np.ndarray, ...]:
        user, day, rule, detail, points = awards.concatenated()
        order = np.lexsort((detail, rule, user, day))
        return user[order], day[order], rule[order], detail[order], points[order]

    def _iso(self, day: int) -> str:
        text = self._day_iso.get(day)
        if text is None:
            text = self._day_iso[day] = day_to_iso(day)
        return text

    def drafts(self, columns: tuple[np.ndarray, ...]) -> list[EntryDraft]:
        """Ledger entry drafts for award rows (entry ids derived from their causes)."""
        table = self.points.rule_table
        user_ids, venues, iso, version = self.grid.user_ids, self.venues, self._iso, self.version
        award = EntryKind.award
        out = []
        for user, day, rule, detail, points in zip(*(c.tolist() for c in columns), strict=True):
            spec = table[rule]
            user_id = user_ids[user]
            day_iso = iso(day)
            family = spec.family
            if family == FAMILY_TIER:
                key, ref = detail, None
            elif family == FAMILY_STREAK:
                key = ref = f"week:{iso(detail)}"
            elif family == FAMILY_ACTIVITY:
                key = venues[detail]
                ref = key or None
            elif family == FAMILY_CAMPAIGN_TIER:
                key = ref = f"steps.tier{detail}"
            elif family == FAMILY_CAMPAIGN_TARGET:
                key = ref = "steps.target"
            else:
                assert family == FAMILY_CAMPAIGN_ACTIVITY
                key = ref = f"{spec.cause}@{venues[detail]}"
            out.append(EntryDraft(derive_id("award", user_id, day_iso, spec.name, key), user_id,
                                  award, points, day_iso, day_end_ms(day), spec.name, ref,
                                  version))
        return out

    def state_summary(self) -> dict[str, int]:
        """Sizes of the state (for tests and operators)."""
        return {"users": self.grid.users, "days": self.grid.days, "day0": self.grid.day0,
                "activity_keys": len(self.awarded_keys), "gait_samples": len(self.gait.keys),
                "venues": len(self.venues) - 1}


def day_of(ts_ms: np.ndarray) -> np.ndarray:
    """Tokyo day numbers as int64 (engine.clock.tokyo_days gives int32)."""
    return (ts_ms + TOKYO_OFFSET_MS) // DAY_MS
