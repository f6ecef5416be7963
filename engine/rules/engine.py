"""The rules engine: batches of samples and activities in, awards and flag events out.

State is dense numpy arrays over (user, Tokyo day) that grow as users and days
appear (`engine.rules.grid`). A batch is aggregated with one np.bincount pass per
column over a (batch user x channel x day) box, then only the cells the batch
touched are re-scored. Flags are re-evaluated for the days that became settled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from itertools import repeat
from typing import Any

import numpy as np

from engine.clock import DAY_MS, TOKYO_OFFSET_MS, day_to_iso, tokyo_day
from engine.consent import PeriodIndex
from engine.entries import Awards, EntryDraft
from engine.errors import CapacityError
from engine.ids import ID_HEX_CHARS, derive_id
from engine.rules.batch import ActivityBatch, Profiles, SampleBatch
from engine.rules.config import Rules
from engine.rules.flags import (
    FIXED_SCALE,
    FLAG_NAMES,
    FLAG_ROWS_PER_CHUNK,
    FLAGS,
    INPUT_BITS,
    NEVER_DAY,
    RAISED,
    FlagContext,
    GaitStore,
    apply_hysteresis,
    evidence_of,
    fixed,
)
from engine.rules.grid import Column, Grid, monday_of
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
from engine.rules.runs import RUNS_SHARE_MAX, Runs
from engine.schemas import (
    ACTIVITY_KINDS,
    METRIC_BY_NAME,
    FlagEvent,
    FlagName,
    FlagState,
)

# Metrics some flag reads, their channel in the flag box and the columns they feed.
_FLAG_METRICS = ("resting_heart_rate", "conversation", "spo2", "body_weight", "gait_speed")
FLAG_METRIC_CODES = np.array([METRIC_BY_NAME[name].code for name in _FLAG_METRICS], np.int8)
FLAG_CHANNEL_SPO2, FLAG_CHANNEL_WEIGHT, FLAG_CHANNEL_GAIT, FLAG_CHANNEL_GAIT_LOW = 2, 3, 4, 5
FLAG_CHANNEL_IGNORED = 6
FLAG_CHANNELS = 7
FLAG_CHANNEL_OF_METRIC = np.full(128, FLAG_CHANNEL_IGNORED, np.int64)
for _channel, _code in enumerate(FLAG_METRIC_CODES):
    FLAG_CHANNEL_OF_METRIC[_code] = _channel
# Which flag inputs a user has ever had (flags skip users without their input).
SEEN_STEPS, SEEN_GAIT, SEEN_WEIGHT = (INPUT_BITS[n] for n in ("steps", "gait_speed", "body_weight"))
SEEN_TALK, SEEN_SPO2, SEEN_RHR = (INPUT_BITS[n] for n in ("conversation", "spo2",
                                                           "resting_heart_rate"))
FLAG_DATA_BITS = np.array([spec.input_bits for spec in FLAGS], np.int16)
FLAG_COLUMNS = (("rhr_n", "rhr_sum", SEEN_RHR), ("talk_n", "talk_sum", SEEN_TALK),
                ("spo2_n", "spo2_sum", SEEN_SPO2), ("weight_n", "weight_sum", SEEN_WEIGHT),
                ("gait_n", None, SEEN_GAIT), ("gait_low_n", None, 0))
GAIT_PENDING_MAX = 1 << 20  # gait keys kept unsorted before a merge (and a prune)
# A batch whose (users x channels x days) box is larger is aggregated sparsely.
BOX_CELLS_MAX = 1 << 25
# Activity keys: user << 39 | (day - KEY_DAY_BASE) << 23 | kind << 20 | venue code.
KEY_DAY_BASE = 18_262  # 2020-01-01
VENUES_MAX = 1 << 20
_NO_DAY = np.iinfo(np.int32).max
ID_SEPARATOR = "\x1f"  # engine.ids joins id parts with it

COLUMNS = (
    Column("steps", np.int64, 0, "day"),  # every steps sample: points
    Column("tier", np.int8, 0, "day"),  # highest step tier reached (awarded)
    Column("fsteps_sum", np.int64, 0, "day"),  # steps samples that count for flags
    Column("fsteps_n", np.int32, 0, "day"),
    Column("gait_n", np.int32, 0, "day"),
    Column("gait_low_n", np.int32, 0, "day"),  # gait samples below the slow_gait cut-off
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
    Column("seen", np.int16, 0, "user"),  # SEEN_* bits: which flag inputs the user has had
    Column("birth_year", np.int16, -1, "user"),
    Column("sex_percent", np.int64, 100, "user"),
    Column("samples_day_max", np.int32, NEVER_DAY, "user"),  # day of the samples watermark
    Column("activities_day_max", np.int32, NEVER_DAY, "user"),
    Column("first_day", np.int32, _NO_DAY, "user"),
    Column("flag_state", np.int8, 0, "user", len(FLAG_NAMES)),
    Column("flag_last", np.int32, NEVER_DAY, "user", len(FLAG_NAMES)),
    Column("flag_run", np.int16, 0, "user", len(FLAG_NAMES)),  # known days against the state
    Column("flag_anchor", np.float64, 0, "user", len(FLAG_NAMES)),  # frozen baseline if raised
)


# Days kept on the axis beyond what users need before a lagging user's columns are
# parked (so users a few days behind are not parked and unparked every run).
PARK_SLACK_DAYS = 7
STATE_MARGIN_DAYS = 7
STATE_FORMAT = 1
_NEVER_NEEDED = np.iinfo(np.int64).max

StateArrays = dict[str, np.ndarray]
StateGetter = Callable[[], tuple[StateArrays, dict[str, Any]]]
StateSetter = Callable[[StateArrays, dict[str, Any]], None]


@dataclass
class EngineState:
    """Everything a RulesEngine holds, as named arrays and a small JSON-able meta.

    Array names are "<part>/<name>"; meta holds one entry per registered part plus
    the rules version and format. Written by engine.snapshots, checksummed there.
    """

    arrays: StateArrays = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class RulesOutput:
    """Awards and flag events of one batch.

    `award_entries` (engine.entries.Awards, columns) and `awards` (EntryDraft
    objects, built from them) are made on first access from the columns the core
    computed; `award_count`/`award_points` need neither.
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

    @property
    def award_columns(self) -> tuple[np.ndarray, ...]:
        """(user, day, rule, detail, points) per award, no objects: user indexes the
        engine's `grid.user_ids`, rule its `points.rule_table` (readers that only count)."""
        return self._columns

    @cached_property
    def award_entries(self) -> Awards:
        """The awards as ledger columns (what the pipeline appends)."""
        return self._engine.awards_of(self._columns)

    @cached_property
    def awards(self) -> list[EntryDraft]:
        return self.award_entries.drafts()


class RulesEngine:
    """Incremental, vectorised rules: feed batches in log order with `process`."""

    def __init__(self, rules: Rules, profiles: Profiles | None = None, *,
                 box_cells_max: int = BOX_CELLS_MAX,
                 runs_share_max: float = RUNS_SHARE_MAX,
                 away: PeriodIndex | None = None) -> None:
        self.rules = rules
        self.away = away
        self.version = rules.version
        self.settle_days = rules.flags.settle_days
        self.box_cells_max = box_cells_max
        self.runs_share_max = runs_share_max
        profiles = profiles or Profiles.empty()
        self._profile_row = dict(zip(profiles.user_ids, range(len(profiles.user_ids)),
                                     strict=True))
        self._profile_birth_year = np.asarray(profiles.birth_year, np.int16)
        self.grid = Grid(COLUMNS)
        self.venues: list[str] = [""]
        self._venue_codes: dict[str, int] = {"": 0}
        self.points = CompiledPoints(rules, self._venue_code)
        sex = np.asarray(profiles.sex).astype(str)
        assert np.isin(sex, ["F", "M", "X"]).all(), "profile sex must be F, M or X"
        self._profile_sex_percent = np.select(
            [sex == code for code in ("F", "M", "X")],
            [self.points.sex_percent[code] for code in ("F", "M", "X")], 100).astype(np.int64)
        self.awarded_keys = np.zeros(0, np.int64)
        self.gait = GaitStore()
        self.flag_context = FlagContext(rules.flags, self.grid, self.gait)
        self.flag_context.prepare_gait = self._prepare_gait
        self.gait_low_fixed = fixed(rules.flags.slow_gait.gait_speed_median_m_s_min)
        self.flags_enabled = np.array([rules.flags.section(name).enabled for name in FLAG_NAMES],
                                      bool)
        self.activity_wait_days = np.array(
            [getattr(rules.flags.section(spec.name), "activity_wait_days", 0) for spec in FLAGS],
            np.int64)
        self.social_clock = np.array([spec.clock == "social" for spec in FLAGS], bool)
        kinds = rules.flags.social_isolation.social_kinds
        self.social_kind = np.array([kind in kinds for kind in ACTIVITY_KINDS], bool)
        self.night_minutes_end = rules.flags.low_spo2.night_end_hour * 60
        self._day_iso: dict[int, str] = {}
        self._state_parts: dict[str, tuple[StateGetter, StateSetter]] = {}
        self.register_state("grid", self.grid.state, self.grid.load_state)
        self.register_state("activities", self._activity_state, self._load_activity_state)
        self.register_state("gait", self.gait.state, self.gait.load_state)

    # -------------------------------------------------------------------- state

    def register_state(self, name: str, get: StateGetter, load: StateSetter) -> None:
        """A component's arrays and meta join snapshots under `name` (restored by `load`)."""
        assert name not in self._state_parts and "/" not in name, name
        self._state_parts[name] = (get, load)

    def state(self) -> EngineState:
        """The whole engine state (views of live arrays: serialise before the next batch)."""
        out = EngineState(meta={"format": STATE_FORMAT, "rules_version": self.version,
                                "parts": {}})
        for name, (get, _) in self._state_parts.items():
            arrays, meta = get()
            out.arrays.update({f"{name}/{key}": array for key, array in arrays.items()})
            out.meta["parts"][name] = meta
        return out

    def load_state(self, state: EngineState) -> None:
        if state.meta.get("format") != STATE_FORMAT:
            raise ValueError(f"engine state format {state.meta.get('format')} is not "
                             f"{STATE_FORMAT}")
        if state.meta.get("rules_version") != self.version:
            raise ValueError(f"engine state of rules {state.meta.get('rules_version')}, "
                             f"not {self.version}")
        parts = state.meta["parts"]
        if set(parts) != set(self._state_parts):
            raise ValueError(f"engine state parts {sorted(parts)} are not "
                             f"{sorted(self._state_parts)}")
        for name, (_, load) in self._state_parts.items():
            prefix = f"{name}/"
            load({key[len(prefix):]: array for key, array in state.arrays.items()
                  if key.startswith(prefix)}, parts[name])

    @classmethod
    def from_state(cls, rules: Rules, profiles: Profiles | None, state: EngineState,
                   **options: Any) -> RulesEngine:
        engine = cls(rules, profiles, **options)
        engine.load_state(state)
        return engine

    def _activity_state(self) -> tuple[StateArrays, dict[str, Any]]:
        return {"awarded_keys": self.awarded_keys}, {"venues": self.venues}

    def _load_activity_state(self, arrays: StateArrays, meta: dict[str, Any]) -> None:
        self.awarded_keys = arrays["awarded_keys"].astype(np.int64)
        self.venues = list(meta["venues"])
        self._venue_codes = {venue: code for code, venue in enumerate(self.venues)}

    def lookback_days(self) -> int:
        """Days before an evaluated day that the enabled flags' windows read."""
        return max([0, *self.rules.flags.lookback_days().values()])

    def needed_from_day(self, late_window_days: int) -> np.ndarray:
        """Per user, the first day any rule can still read: late data (late window), the
        week it falls in (streaks), and the windows of flags not yet evaluated."""
        grid, users = self.grid, self.grid.users
        need = np.full(users, _NEVER_NEEDED, np.int64)
        for name in ("samples_day_max", "activities_day_max"):
            latest = grid[name][:users].astype(np.int64)
            has = latest != NEVER_DAY
            need[has] = np.minimum(need[has], latest[has] - late_window_days)
        last = grid["flag_last"][:users].astype(np.int64)
        first = grid["first_day"][:users].astype(np.int64)
        next_day = np.where(last == NEVER_DAY, first[:, None], last + 1)
        next_day = np.where(self.flags_enabled[None, :], next_day, _NEVER_NEEDED)
        has = first != _NO_DAY
        need[has] = np.minimum(need[has], next_day[has].min(axis=1) - self.lookback_days()
                               - self.settle_days)
        return np.where(need == _NEVER_NEEDED, need, need - 6 - STATE_MARGIN_DAYS)

    def prune(self, late_window_days: int) -> None:
        """Drop state no rule can read again: days before every user's need, activity
        keys older than their user's late window. Users far behind the others have their
        columns parked aside (restored when they send data), so the axis follows the
        active users and the state grows with people x lookback, not with history."""
        grid = self.grid
        if not grid.days or not grid.users:
            return
        need = self.needed_from_day(late_window_days)
        active = need[need != _NEVER_NEEDED]
        if not len(active):
            return
        target = monday_of(int(active.max()) - PARK_SLACK_DAYS)
        latest = np.maximum(grid["samples_day_max"][:grid.users],
                            grid["activities_day_max"][:grid.users]).astype(np.int64)
        if target > grid.day0:
            lagging = np.flatnonzero(need < target)
            stop = np.minimum(np.array([monday_of(int(d)) + 7 for d in latest[lagging]],
                                       np.int64), target)
            first = np.array([monday_of(int(d)) for d in need[lagging]], np.int64)
            grid.park(lagging, first, np.maximum(stop, first))
        else:
            target = grid.day0
        # Keep the days up to the newest data plus room to grow; the axis regrows on demand.
        day_stop = max(int(latest.max()) + 1 + PARK_SLACK_DAYS, target + 7)
        grid.resize_days(target, max(day_stop, target + 7))
        self._prune_activity_keys(late_window_days)

    def _prune_activity_keys(self, late_window_days: int) -> None:
        keys = self.awarded_keys
        if not len(keys):
            return
        latest = self.grid["activities_day_max"].astype(np.int64)
        day = ((keys >> 23) & 0xFFFF) + KEY_DAY_BASE
        horizon = latest[keys >> 39] - late_window_days - STATE_MARGIN_DAYS
        self.awarded_keys = keys[(latest[keys >> 39] == NEVER_DAY) | (day >= horizon)]

    # ------------------------------------------------------------------ batches

    def process(self, samples: SampleBatch, activities: ActivityBatch) -> RulesOutput:
        if self.away is not None:
            samples, activities = mask_away(self.away, samples, activities)
        sample_users = self._users(samples.users)
        activity_users = self._users(activities.users)
        if self.grid.parked:
            self.grid.unpark(np.concatenate([sample_users, activity_users]))
        self._ensure_days(samples.ts_ms, activities.ts_ms)
        awards = AwardColumns()
        if len(samples):
            self._samples(samples, sample_users, awards)
        if len(activities):
            self._activities(activities, activity_users, awards)
        touched = distinct(np.concatenate([sample_users, activity_users]))
        flags = self._evaluate_flags(touched) if len(touched) else []
        return RulesOutput(self._sorted(awards), self, flags)

    def _users(self, user_ids: list[str]) -> np.ndarray:
        before = self.grid.users
        index = self.grid.user_indices(user_ids)
        if self.grid.users > before:
            self._set_profiles(before, self.grid.users)
        return index

    def _set_profiles(self, first: int, stop: int) -> None:
        get = self._profile_row.get
        row = np.fromiter(map(get, self.grid.user_ids[first:stop], repeat(-1)), np.int64,
                          count=stop - first)
        known = np.flatnonzero(row >= 0)
        self.grid["birth_year"][first + known] = self._profile_birth_year[row[known]]
        self.grid["sex_percent"][first + known] = self._profile_sex_percent[row[known]]

    def _ensure_days(self, *timestamps: np.ndarray) -> None:
        present = [ts for ts in timestamps if len(ts)]
        if present:
            low = min(int(ts.min()) for ts in present)
            high = max(int(ts.max()) for ts in present)
            self.grid.ensure_days(tokyo_day(low), tokyo_day(high))

    def _venue_code(self, venue: str) -> int:
        code = self._venue_codes.get(venue)
        if code is None:
            assert ID_SEPARATOR not in venue, f"venue id {venue!r} holds a unit separator"
            code = len(self.venues)
            if code >= VENUES_MAX:
                raise CapacityError(f"the rules state holds at most {VENUES_MAX - 1:,} venues")
            self._venue_codes[venue] = code
            self.venues.append(venue)
        return code

    # ------------------------------------------------------------------ samples

    def _cells(self, flat: np.ndarray, size: int, counts: np.ndarray, sums: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Touched cells of a flat index with their summed counts and sums (exact ints).

        A dense np.bincount over the whole box when it fits (measured fastest at
        every batch size here), a sort when the box would be mostly empty.
        """
        if size <= self.box_cells_max:
            totals = np.bincount(flat, weights=counts, minlength=size)
            cells = np.flatnonzero(totals)
            return cells, totals[cells], np.bincount(flat, weights=sums, minlength=size)[cells]
        cells, inverse = distinct_inverse(flat)
        return (cells, np.bincount(inverse, weights=counts, minlength=len(cells)),
                np.bincount(inverse, weights=sums, minlength=len(cells)))

    def _samples(self, batch: SampleBatch, users: np.ndarray, out: AwardColumns) -> None:
        """Steps into points and flag columns; other metrics into flag columns."""
        grid = self.grid
        runs = Runs.of(batch, self.runs_share_max)
        day_first = int(runs.day.min())
        span = int(runs.day.max()) - day_first + 1
        other = (runs.metric != METRIC_BY_NAME["steps"].code).astype(np.int64)
        flat = (runs.user * 2 + other) * span + (runs.day - day_first)
        cells, counts, sums = self._cells(flat, len(batch.users) * 2 * span,
                                          runs.length.astype(np.float64), runs.steps)
        user_and_channel, day = np.divmod(cells, span)
        user, channel = np.divmod(user_and_channel, 2)
        global_user = users[user]
        day += day_first
        np.maximum.at(grid["samples_day_max"], global_user, day.astype(np.int32))
        np.minimum.at(grid["first_day"], global_user, day.astype(np.int32))
        steps = channel == 0
        user, day = global_user[steps], day[steps]
        column = day - grid.day0
        total = sums[steps].astype(np.int64)
        if len(total) and not (0 <= total.min() and total.max() < 1 << 52):
            raise CapacityError("a day's step sum is outside [0, 2**52): not exact in float64")
        grid["steps"][user, column] += total
        grid["fsteps_sum"][user, column] += total
        grid["fsteps_n"][user, column] += counts[steps].astype(np.int32)
        grid["seen"][user] |= SEEN_STEPS
        self._score_steps(user, day, column, out)
        late = (runs.wm >= 0) & (runs.day <= day_of(runs.wm) - self.settle_days)
        self._unflag_steps(runs, users, late & (other == 0))
        flagged = np.isin(runs.metric, FLAG_METRIC_CODES) & ~late
        if flagged.any():
            self._flag_metrics(batch, users, runs.sample_indices(flagged), day_first, span)

    def _unflag_steps(self, runs: Runs, users: np.ndarray, late: np.ndarray) -> None:
        """Take steps that arrived after their day settled back out of the flag columns."""
        if not late.any():
            return
        where = (users[runs.user[late]], runs.day[late] - self.grid.day0)
        np.add.at(self.grid["fsteps_sum"], where, -runs.steps[late].astype(np.int64))
        np.add.at(self.grid["fsteps_n"], where, -runs.length[late].astype(np.int32))

    def _flag_metrics(self, batch: SampleBatch, users: np.ndarray, chosen: np.ndarray,
                      day_first: int, span: int) -> None:
        """Included samples of the metrics flags read, into fixed-point day columns."""
        metric = batch.metric
        metric = metric[chosen]
        ts = batch.ts_ms[chosen]
        local_user = batch.user_idx[chosen].astype(np.int64)
        offset = (ts - (day_first * DAY_MS - TOKYO_OFFSET_MS)) // DAY_MS
        channel = FLAG_CHANNEL_OF_METRIC[metric]
        spo2 = np.flatnonzero(channel == FLAG_CHANNEL_SPO2)
        minute = (ts[spo2] + TOKYO_OFFSET_MS) % DAY_MS // 60_000
        channel[spo2[minute >= self.night_minutes_end]] = FLAG_CHANNEL_IGNORED
        fixed = np.rint(batch.value[chosen] * FIXED_SCALE)
        flat = (local_user * FLAG_CHANNELS + channel) * span + offset
        slow = np.flatnonzero((channel == FLAG_CHANNEL_GAIT) & (fixed < self.gait_low_fixed))
        flat_all = np.concatenate([flat, flat[slow] + (FLAG_CHANNEL_GAIT_LOW
                                                       - FLAG_CHANNEL_GAIT) * span])
        cells, counts, sums = self._cells(
            flat_all, len(batch.users) * FLAG_CHANNELS * span, np.ones(len(flat_all)),
            np.concatenate([fixed, np.zeros(len(slow))]))
        if len(counts) and counts.max() >= 1 << 22:
            raise CapacityError("more than 4,194,303 samples of one metric for one person and "
                                "day in one batch")
        user_and_channel, day = np.divmod(cells, span)
        user, cell_channel = np.divmod(user_and_channel, FLAG_CHANNELS)
        user = users[user]
        column = day + day_first - self.grid.day0
        grid = self.grid
        for index, (count_name, sum_name, seen) in enumerate(FLAG_COLUMNS):
            pick = cell_channel == index
            where = (user[pick], column[pick])
            grid[count_name][where] += counts[pick].astype(np.int32)
            if sum_name:
                grid[sum_name][where] += sums[pick].astype(np.int64)
            grid["seen"][user[pick]] |= seen
        global_user = users[local_user]
        weight = channel == FLAG_CHANNEL_WEIGHT
        np.maximum.at(grid["weight_max"], (global_user[weight], (offset + day_first
                                                                  - grid.day0)[weight]),
                      fixed[weight].astype(np.int64))
        gait = channel == FLAG_CHANNEL_GAIT
        if self.flags_enabled[FLAG_NAMES.index("slow_gait")] and gait.any():
            self.gait.add(global_user[gait], (offset + day_first)[gait],
                          fixed[gait].astype(np.int64))
            if self.gait.pending > max(GAIT_PENDING_MAX, len(self.gait.keys)):
                self._prepare_gait()

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
        week = distinct(user[crossed] * (grid.days // 7) + column[crossed] // 7)
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
        codes = np.fromiter(map(self._venue_codes.get, batch.venue_id, repeat(-1)), np.int64,
                            count=len(batch.venue_id))
        for position in np.flatnonzero(codes < 0).tolist():
            codes[position] = self._venue_code(batch.venue_id[position])
        venue = np.where(self.points.activity_per_venue[kind], codes, 0)
        if not np.all((day >= KEY_DAY_BASE) & (day < KEY_DAY_BASE + (1 << 16))):
            raise CapacityError(f"activity days must lie in [{day_to_iso(KEY_DAY_BASE)}, "
                                f"{day_to_iso(KEY_DAY_BASE + (1 << 16) - 1)}]")
        keys = distinct((user << 39) | ((day - KEY_DAY_BASE) << 23) | (kind << 20) | venue)
        slot = np.searchsorted(self.awarded_keys, keys)
        known = np.zeros(len(keys), bool)
        inside = slot < len(self.awarded_keys)
        known[inside] = self.awarded_keys[slot[inside]] == keys[inside]
        fresh = keys[~known]
        if len(fresh) == 0:
            return
        self.awarded_keys = np.insert(self.awarded_keys, slot[~known], fresh)
        activity_awards(self.points, out, fresh >> 39, ((fresh >> 23) & 0xFFFF) + KEY_DAY_BASE,
                        (fresh >> 20) & 0x7, fresh & (VENUES_MAX - 1))

    # -------------------------------------------------------------------- flags

    def _evaluate_flags(self, users: np.ndarray) -> list[FlagEvent]:
        """Evaluate every flag on the days that became settled for these users."""
        grid = self.grid
        horizon = self._horizons(users)
        last = grid["flag_last"][users].astype(np.int64)
        start = np.where(last == NEVER_DAY, grid["first_day"][users][:, None], last + 1)
        need = self.flags_enabled[None, :] & (horizon != NEVER_DAY) & (start <= horizon)
        seen = grid["seen"][users]
        events: list[FlagEvent] = []
        for index, name in enumerate(FLAG_NAMES):
            rows = np.flatnonzero(need[:, index])
            if len(rows) == 0:
                continue
            # Without any data of the flag's metric every settled day reads "unknown".
            rows = rows[(seen[rows] & FLAG_DATA_BITS[index]) != 0]
            rows = rows[np.argsort(start[rows, index], kind="stable")]
            for chunk in range(0, len(rows), FLAG_ROWS_PER_CHUNK):
                part = rows[chunk:chunk + FLAG_ROWS_PER_CHUNK]
                events += self._evaluate_rows(index, users[part], start[part, index],
                                              horizon[part, index])
            done = need[:, index]
            grid["flag_last"][users[done], index] = horizon[done, index]
        events.sort(key=lambda e: (e.user_id, e.day, FLAG_NAMES.index(e.flag.value)))
        return events

    def _horizons(self, users: np.ndarray) -> np.ndarray:
        """Last settled day per (user, flag); NEVER_DAY without samples.

        The samples clock: day(samples watermark) - settle_days. The social clock
        also waits for the activities watermark, but at most activity_wait_days
        behind the samples clock (people without activity records included).
        """
        grid, settle = self.grid, self.settle_days
        samples_max = grid["samples_day_max"][users].astype(np.int64)
        samples = np.where(samples_max == NEVER_DAY, NEVER_DAY, samples_max - settle)
        horizon = np.repeat(samples[:, None], len(FLAG_NAMES), axis=1)
        activities_max = grid["activities_day_max"][users].astype(np.int64)
        activities = np.where(activities_max == NEVER_DAY, NEVER_DAY, activities_max - settle)
        for index in np.flatnonzero(self.social_clock).tolist():
            waited = np.maximum(activities, samples - self.activity_wait_days[index])
            horizon[:, index] = np.where(samples == NEVER_DAY, NEVER_DAY,
                                         np.minimum(samples, waited))
        return horizon

    def _prepare_gait(self) -> None:
        width = self.rules.flags.slow_gait.window_days
        last = self.grid["flag_last"][:, FLAG_NAMES.index("slow_gait")].astype(np.int64)
        keep_from = np.where(last == NEVER_DAY, np.iinfo(np.int64).min, last + 2 - width)
        self.gait.consolidate(keep_from)

    def _evaluate_rows(self, index: int, users: np.ndarray, start: np.ndarray,
                       horizon: np.ndarray) -> list[FlagEvent]:
        """One flag over users x days [min start, max horizon]; each row its own range."""
        grid, spec = self.grid, FLAGS[index]
        config = self.rules.flags.section(spec.name)
        first, last = int(start.min()), int(horizon.max())
        days = np.arange(first, last + 1)
        valid = (days >= start[:, None]) & (days <= horizon[:, None])
        result = spec.evaluate(self.flag_context, config, users, first, last, valid)
        changes = apply_hysteresis(result, valid, config, grid["flag_state"][users, index],
                                   grid["flag_run"][users, index],
                                   grid["flag_anchor"][users, index])
        grid["flag_state"][users, index] = changes.state_after
        grid["flag_run"][users, index] = changes.run_after
        grid["flag_anchor"][users, index] = changes.anchor_after
        evidence = evidence_of(result, changes.row, changes.column)
        return [self._flag_event(int(users[r]), spec.name, first + c, v, e) for r, c, v, e in
                zip(changes.row.tolist(), changes.column.tolist(), changes.state.tolist(),
                    evidence, strict=True)]

    def _flag_event(self, user: int, flag: str, day: int, state: int,
                    evidence: dict[str, float | int | str]) -> FlagEvent:
        user_id = self.grid.user_ids[user]
        state_name = FlagState.raised if state == RAISED else FlagState.cleared
        day_iso = day_to_iso(day)
        return FlagEvent(v=1, flag_id=derive_id("flag", user_id, flag, day_iso, state_name.value),
                         user_id=user_id, flag=FlagName(flag), state=state_name, day=day_iso,
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

    def awards_of(self, columns: tuple[np.ndarray, ...]) -> Awards:
        """Award rows as ledger columns (engine.entries.Awards), no object per award.

        entry_id = derive_id("award", user, day, rule, key), computed here (the same
        SHA-256 over the unit-separated parts; user and venue ids are checked for the
        separator when first seen) from byte prefixes built once per distinct user,
        day and (rule, detail): one hash per award is all that runs per row.
        """
        user, day, rule, detail, points = columns
        users, user_index = distinct_inverse(user)
        days, day_index = distinct_inverse(day)
        causes, cause_index = distinct_inverse((rule << 32) | detail)
        user_ids, table = self.grid.user_ids, self.points.rule_table
        user_parts = [f"award{ID_SEPARATOR}{user_ids[u]}{ID_SEPARATOR}".encode()
                      for u in users.tolist()]
        day_isos = [self._iso(d) for d in days.tolist()]
        day_parts = [f"{iso}{ID_SEPARATOR}".encode() for iso in day_isos]
        refs: list[str | None] = []
        cause_parts: list[bytes] = []
        for cause in causes.tolist():
            spec = table[cause >> 32]
            key, ref = self._award_key(spec.family, spec.cause, cause & 0xFFFFFFFF)
            refs.append(ref)
            cause_parts.append(f"{spec.name}{ID_SEPARATOR}{key}".encode())
        sha256 = hashlib.sha256
        entry_ids = [sha256(user_parts[u] + day_parts[d] + cause_parts[c]).hexdigest()
                     [:ID_HEX_CHARS] for u, d, c in zip(user_index.tolist(), day_index.tolist(),
                                                         cause_index.tolist(), strict=True)]
        return Awards(entry_ids, user, user_ids, points, day_index, day_isos,
                      (day + 1) * DAY_MS - TOKYO_OFFSET_MS - 1, rule,
                      [spec.name for spec in table], cause_index, refs, self.version)

    def _award_key(self, family: int, cause: str | None, detail: int) -> tuple[object, str | None]:
        """(id key, ref) of an award of a rule family and detail (see engine.rules.points)."""
        if family == FAMILY_TIER:
            return detail, None
        if family == FAMILY_STREAK:
            week = f"week:{self._iso(detail)}"
            return week, week
        if family == FAMILY_ACTIVITY:
            venue = self.venues[detail]
            return venue, venue or None
        if family == FAMILY_CAMPAIGN_TIER:
            tier = f"steps.tier{detail}"
            return tier, tier
        if family == FAMILY_CAMPAIGN_TARGET:
            return "steps.target", "steps.target"
        assert family == FAMILY_CAMPAIGN_ACTIVITY
        key = f"{cause}@{self.venues[detail]}"
        return key, key

    def state_summary(self) -> dict[str, int]:
        """Sizes of the state (for tests and operators)."""
        return {"users": self.grid.users, "days": self.grid.days, "day0": self.grid.day0,
                "activity_keys": len(self.awarded_keys), "gait_samples": len(self.gait.keys),
                "venues": len(self.venues) - 1, "parked_users": len(self.grid.parked)}


def mask_away(away: PeriodIndex, samples: SampleBatch, activities: ActivityBatch,
              ) -> tuple[SampleBatch, ActivityBatch]:
    """Drop what people did while they were out of the programme (after leaving): no
    awards and no flags come from it. One vectorised pass per batch."""
    keep = ~away.contains(samples.users, samples.user_idx, samples.ts_ms)
    if not keep.all():
        samples = SampleBatch(samples.users, samples.user_idx[keep], samples.metric[keep],
                              samples.ts_ms[keep], samples.value[keep],
                              samples.wm_before_ms[keep])
    keep = ~away.contains(activities.users, activities.user_idx, activities.ts_ms)
    if not keep.all():
        rows = np.flatnonzero(keep).tolist()
        activities = ActivityBatch(
            activities.users, activities.user_idx[keep], [activities.event_id[i] for i in rows],
            activities.kind[keep], activities.ts_ms[keep],
            [activities.venue_id[i] for i in rows], activities.wm_before_ms[keep])
    return samples, activities


def distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (np.unique takes a hash path in numpy 2.4 that is ~30x slower
    than sorting for million-element int arrays)."""
    ordered = np.sort(values)
    keep = np.ones(len(ordered), bool)
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def distinct_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values and, per input, the index of its value among them."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new = np.ones(len(ordered), bool)
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    inverse = np.empty(len(values), np.int64)
    inverse[order] = np.cumsum(new) - 1
    return ordered[new], inverse


def day_of(ts_ms: np.ndarray) -> np.ndarray:
    """Tokyo day numbers as int64 (engine.clock.tokyo_days gives int32)."""
    return (ts_ms + TOKYO_OFFSET_MS) // DAY_MS
