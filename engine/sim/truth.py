"""Ground truth of a simulated fleet for the frailty flags, and scoring flags against it.

The simulator knows, per person and condition, the onset day, how fast it set in
and whether the person recovered (engine.sim.population). Per flag, a person is
* a positive with an onset day (and a recovery day, if any) when the condition
  is deep enough for the flag's definition for long enough inside the period
  (OBSERVE_DAYS at full depth, HISTORY_DAYS of data before the onset for flags
  that compare with a personal baseline);
* unscored when the truth is borderline or not observable in the period (a
  decline starting days before the end, a level hovering at the threshold):
  such people count neither for nor against a flag;
* a negative otherwise.
Recall, precision, alert burden and time to detection follow (`score_flags`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from engine.clock import day_to_iso, iso_to_day
from engine.errors import UsageError
from engine.rules.flags import FLAG_NAMES
from engine.sim import calendar
from engine.sim.population import CONDITIONS, Population

# Flag -> the simulated condition it should find (low_activity is judged on levels).
FLAG_CONDITIONS = {"step_decline": "decline", "slow_gait": "slow_gait",
                   "weight_loss": "weight_loss", "social_isolation": "isolated",
                   "low_spo2": "spo2", "resting_hr_rise": "rhr"}
# Days at full depth a flag needs to see a condition (its windows, hold and settling).
OBSERVE_DAYS = {"step_decline": 28, "low_activity": 21, "slow_gait": 21, "weight_loss": 21,
                "social_isolation": 38, "low_spo2": 10, "resting_hr_rise": 14}
CHRONIC_OBSERVE_DAYS = {"social_isolation": 26}  # judged from the first days of data
# Days of data before the onset a baseline needs.
HISTORY_DAYS = {"step_decline": 30, "resting_hr_rise": 18}
# Days after reaching full depth that a condition stops being what the flag asks about
# (weight loss: "lost 2 kg within 6 months").
EXPIRES_DAYS = {"weight_loss": 182}
LOW_STEPS_PER_DAY = (1_800.0, 2_600.0)  # below: low; above: not; between: borderline
# Expected recent (28-day) over baseline (84 days before) median steps: a decline at or
# below the first, ordinary variation (seasons, holidays) stays above the second.
DECLINE_RATIO = (0.6, 0.75)
DECLINE_WINDOWS_DAYS = (28, 84)
DECLINE_DAYS_MIN = 14  # days the expected ratio must stay at or below DECLINE_RATIO[0]
PEOPLE_PER_CHUNK = 256
SLOW_GAIT_M_S = (0.96, 1.04)
STEPS_SMOOTH_DAYS = 14
DAYS_PER_MONTH = 30.4375


def ground_truth(pop: Population, days: int, start_day: int) -> dict[str, object]:
    """{"flags": {flag: {user: {"onset", "recovery"}}}, "unscored": {flag: [user]}}."""
    flags: dict[str, dict[str, dict[str, str | None]]] = {}
    unscored: dict[str, list[str]] = {}
    for flag in FLAG_NAMES:
        if flag == "low_activity":
            onset, recovery, borderline = _low_steps(pop, days, start_day)
        elif flag == "step_decline":
            onset, recovery, borderline = _step_decline(pop, days, start_day)
        elif flag == "slow_gait":
            onset, recovery, borderline = _slow_gait(pop, days)
        else:
            onset, recovery, borderline = _condition(pop, flag, days)
        flags[flag] = {pop.user_ids[i]: {
            "onset": day_to_iso(start_day + int(onset[i])),
            "recovery": day_to_iso(start_day + int(recovery[i])) if recovery[i] >= 0 else None}
            for i in np.flatnonzero(onset >= 0).tolist()}
        unscored[flag] = [pop.user_ids[i] for i in np.flatnonzero(borderline).tolist()]
    return {"flags": flags, "unscored": unscored}


def _full_days(level: np.ndarray) -> np.ndarray:
    """Longest run of days at full depth per person."""
    full = level >= 1.0 - 1e-9
    best = np.zeros(len(level), np.int64)
    run = np.zeros(len(level), np.int64)
    for day in range(level.shape[1]):
        run = np.where(full[:, day], run + 1, 0)
        best = np.maximum(best, run)
    return best


def _condition(pop: Population, flag: str, days: int) -> tuple[np.ndarray, ...]:
    condition = FLAG_CONDITIONS[flag]
    c = CONDITIONS.index(condition)
    onset, recover = pop.onset[:, c], pop.recover[:, c]
    full = _full_days(pop.level(condition, days))
    needed = np.where(onset == 0, CHRONIC_OBSERVE_DAYS.get(flag, OBSERVE_DAYS[flag]),
                      OBSERVE_DAYS[flag])
    seen = (onset >= 0) & (full >= needed) & (onset >= HISTORY_DAYS.get(flag, 0))
    borderline = (onset >= 0) & ~seen
    if flag in EXPIRES_DAYS:
        expires = onset + pop.ramp[:, c] - 1 + EXPIRES_DAYS[flag]
        expires = np.where(expires < days, expires, -1)
        recover = np.where((recover >= 0) & ((expires < 0) | (recover < expires)), recover,
                           expires)
    return np.where(seen, onset, -1), np.where(seen, recover, -1), borderline


def _runs(flags: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Per person: first day of a run of at least `length` True days (-1), and the day
    after that run ends (-1 if it lasts to the end)."""
    first = np.full(len(flags), -1)
    end = np.full(len(flags), -1)
    run = np.zeros(len(flags), np.int64)
    for day in range(flags.shape[1]):
        run = np.where(flags[:, day], run + 1, 0)
        hit = (run == length) & (first < 0)
        first[hit] = day - length + 1
        stopped = (first >= 0) & (end < 0) & ~flags[:, day] & (day > first)
        end[stopped] = day
    return first, end


def _classify(value: np.ndarray, low: float, high: float, days: int, flag: str,
              ) -> tuple[np.ndarray, ...]:
    needed = OBSERVE_DAYS[flag]
    first, end = _runs(value < low, needed)
    onset = np.where(first >= 0, np.argmax(value < (low + high) / 2, axis=1), -1)
    borderline = (first < 0) & (value.min(axis=1) < high)
    return onset, np.where(first >= 0, end, -1), borderline


def _expected_steps(pop: Population, days: int, start_day: int) -> np.ndarray:
    """Noise-free daily steps: usual level, weekends, seasons, holidays, decline."""
    day = start_day + np.arange(days)
    weekday = (day + 3) % 7
    factor = np.where(weekday[None, :] >= 5, pop.weekend_factor[:, None], 1.0)
    return (pop.steps_median[:, None] * factor * calendar.steps_factor(day)[None, :]
            * (1.0 - pop.decline_drop[:, None] * pop.level("decline", days)))


def _step_decline(pop: Population, days: int, start_day: int) -> tuple[np.ndarray, ...]:
    """Decliners whose expected recent/baseline median ratio falls to DECLINE_RATIO[0];
    decliners whose ratio stays between the bounds (seasons working against a mild
    decline), and anyone whose ordinary variation dips below the upper bound, are
    borderline."""
    recent, base = DECLINE_WINDOWS_DAYS
    expected = _expected_steps(pop, days, start_day)
    ratio = np.full((pop.n, days), np.inf)
    if days >= recent + HISTORY_DAYS["step_decline"] - recent // 2:
        padded = np.concatenate([np.full((pop.n, base + recent - 1), np.nan), expected], axis=1)
        for lo in range(0, pop.n, PEOPLE_PER_CHUNK):
            part = padded[lo:lo + PEOPLE_PER_CHUNK]
            now = np.nanmedian(sliding_window_view(part[:, base:], recent, axis=1), axis=2)
            with np.errstate(all="ignore"):
                before = sliding_window_view(part[:, :base + days - 1], base, axis=1)
                enough = np.sum(~np.isnan(before), axis=2) >= HISTORY_DAYS["step_decline"] // 2
                then = np.where(enough, np.nanmedian(np.where(enough[..., None], before, 0.0),
                                                     axis=2), np.nan)
            ratio[lo:lo + PEOPLE_PER_CHUNK] = np.where(np.isnan(then), np.inf, now / then)
    c = CONDITIONS.index("decline")
    onset, recover = pop.onset[:, c], pop.recover[:, c]
    first, _ = _runs(ratio <= DECLINE_RATIO[0], DECLINE_DAYS_MIN)
    seen = (onset >= 0) & (first >= 0) & (onset >= HISTORY_DAYS["step_decline"])
    borderline = ~seen & ((onset >= 0) | (ratio.min(axis=1) < DECLINE_RATIO[1]))
    return np.where(seen, onset, -1), np.where(seen, recover, -1), borderline


def _low_steps(pop: Population, days: int, start_day: int) -> tuple[np.ndarray, ...]:
    expected = _expected_steps(pop, days, start_day)
    width = min(STEPS_SMOOTH_DAYS, days)
    padded = np.concatenate([np.repeat(expected[:, :1], width - 1, axis=1), expected], axis=1)
    smooth = np.median(sliding_window_view(padded, width, axis=1), axis=2)
    return _classify(smooth, *LOW_STEPS_PER_DAY, days, "low_activity")


def _slow_gait(pop: Population, days: int) -> tuple[np.ndarray, ...]:
    speed = (pop.gait_base[:, None]
             + (pop.gait_final - pop.gait_base)[:, None] * pop.level("slow_gait", days))
    watch = (np.arange(pop.n) < pop.n_watch)[:, None]
    speed = np.where(watch, speed, 2.0)  # phones measure no gait
    return _classify(speed, *SLOW_GAIT_M_S, days, "slow_gait")


# ------------------------------------------------------------------ scoring


@dataclass(frozen=True)
class FlagScore:
    flag: str
    positives: int  # scored people who should be flagged
    found: int  # of them, raised on or after their onset
    flagged: int  # scored people with any raise
    false_alarms: int  # flagged negatives and positives raised only before their onset
    unscored: int
    raises: int  # raise events, everyone
    recall: float | None
    precision: float | None
    raises_per_1000_person_months: float
    onset_to_flag_days_median: float | None
    held_until_recovery: float | None  # share of found people raised without a gap until
    # their recovery (or the end of the period)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class FlagChange:
    user_id: str
    flag: str
    state: str  # "raised" | "cleared"
    day: str


def score_flags(changes: Iterable[FlagChange], truth: Mapping[str, object], users: int,
                first_day: str, last_day: str, flags: Sequence[str] = FLAG_NAMES,
                ) -> list[FlagScore]:
    """Per flag: recall, precision, alert burden and days from onset to flag."""
    period = (iso_to_day(first_day), iso_to_day(last_day))
    months = users * (period[1] - period[0] + 1) / DAYS_PER_MONTH
    history: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for change in changes:
        history.setdefault((change.flag, change.user_id), []).append(
            (iso_to_day(change.day), change.state))
    positives_by_flag = cast(Mapping[str, Mapping[str, Mapping[str, str | None]]], truth["flags"])
    unscored_by_flag = cast(Mapping[str, list[str]], truth["unscored"])
    return [_score(flag, positives_by_flag.get(flag, {}), set(unscored_by_flag.get(flag, [])),
                   {user: sorted(events) for (name, user), events in history.items()
                    if name == flag}, months, period) for flag in flags]


def _score(flag: str, positives: Mapping[str, Mapping[str, str | None]], unscored: set[str],
           history: Mapping[str, list[tuple[int, str]]], months: float,
           period: tuple[int, int]) -> FlagScore:
    raises = sum(state == "raised" for events in history.values() for _, state in events)
    found, delays, held = 0, [], []
    flagged = false_alarms = 0
    for user, events in history.items():
        if user in unscored or not any(state == "raised" for _, state in events):
            continue
        flagged += 1
        truth = positives.get(user)
        if truth is None:
            false_alarms += 1
            continue
        onset = iso_to_day(str(truth["onset"]))
        recovery = iso_to_day(str(truth["recovery"])) if truth.get("recovery") else period[1] + 1
        detected = _raised_from(events, onset)
        if detected is None:
            false_alarms += 1
            continue
        found += 1
        delays.append(detected - onset)
        held.append(all(not (detected < day < recovery and state == "cleared")
                        for day, state in events))
    scored = len(positives)
    return FlagScore(
        flag=flag, positives=scored, found=found, flagged=flagged, false_alarms=false_alarms,
        unscored=len(unscored), raises=raises,
        recall=round(found / scored, 3) if scored else None,
        precision=round((flagged - false_alarms) / flagged, 3) if flagged else None,
        raises_per_1000_person_months=round(1000 * raises / months, 2) if months else 0.0,
        onset_to_flag_days_median=float(np.median(delays)) if delays else None,
        held_until_recovery=round(sum(held) / len(held), 3) if held else None)


def _raised_from(events: list[tuple[int, str]], onset: int) -> int | None:
    """First day on or after the onset that the flag is raised, or None."""
    state = "cleared"
    for day, new in events:
        if day >= onset:
            if state == "raised":
                return onset
            if new == "raised":
                return day
        state = new
    return onset if state == "raised" else None


def score_manifest(changes: Iterable[FlagChange], manifest: Mapping[str, Any]) -> list[FlagScore]:
    """score_flags against a simulation's manifest.json (its ground truth and period)."""
    if "ground_truth_unscored" not in manifest or "period" not in manifest:
        raise UsageError("flags evaluate: the --truth file is not a manifest.json of "
                         "`genki simulate` with per-flag onsets (ground_truth_unscored missing)")
    truth = {"flags": manifest["ground_truth"], "unscored": manifest["ground_truth_unscored"]}
    period = manifest["period"]
    return score_flags(changes, truth, int(manifest["users"]["total"]), period["first_day"],
                       period["last_day"])


def format_table(scores: Sequence[FlagScore]) -> str:
    """A Markdown table of the scores."""
    def number(value: float | None, digits: int = 2) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [("| flag | positives (unscored) | recall | precision | flagged | raises / 1,000 "
             "person-months | median days onset → flag | held until recovery |"),
             "|---|---|---|---|---|---|---|---|"]
    for s in scores:
        lines.append(f"| {s.flag} | {s.positives} ({s.unscored}) | {number(s.recall)} | "
                     f"{number(s.precision)} | {s.flagged} | "
                     f"{s.raises_per_1000_person_months:.1f} | "
                     f"{number(s.onset_to_flag_days_median, 0)} | "
                     f"{number(s.held_until_recovery)} |")
    return "\n".join(lines)
