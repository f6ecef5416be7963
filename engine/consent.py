"""Research consent and programme membership over time: events in, periods out.

Pure: no I/O. Every change (consent given or withdrawn, enrolled, left) is an
event with an effective time and a per-person order (`consent_seq`, issued increasing
by the system of record). At any moment, of the events already effective, the
newest decision (greatest consent_seq) decides; on a tie the more protective
state wins (withdrawn, left). So the set of events, not their arrival order,
decides: an old profile re-sent later changes nothing, a decision never
overrides a newer one, and a retroactive withdrawal takes effect from its
effective time.

A profile's `research_consent` and `enrolled_on` are events too (see
`engine.schemas.Profile`): at `updated_ts_ms`/`consent_seq` when the profile
carries them, else at the start of `enrolled_on` with order 0, the lowest.

A person's export period is where research consent and membership overlap.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from engine.clock import day_start_ms, iso_to_day
from engine.errors import GenkiError
from engine.schemas import EFFECTIVE_TS_MS_MAX, TS_MS_MIN, ConsentChange

# Periods are half-open [start_ms, end_ms); an open end is TS_OPEN_END_MS. A period
# index packs (person row, ms since TS_MS_MIN) into one int64 key: 42 bits of time
# (to 2159, beyond EFFECTIVE_TS_MS_MAX) and 21 bits of people.
TS_OPEN_END_MS = EFFECTIVE_TS_MS_MAX + 1
_TS_BITS = 42
_TS_MASK = (1 << _TS_BITS) - 1
PEOPLE_PER_PERIOD_INDEX_MAX = 1 << 21
_PROTECTIVE_RANK = {ConsentChange.consent_withdrawn: 0, ConsentChange.left: 0,
                    ConsentChange.consent_given: 1, ConsentChange.enrolled: 1}
_RESEARCH = (ConsentChange.consent_given, ConsentChange.consent_withdrawn)


class CapacityError(GenkiError):
    code = "capacity"


@dataclass(frozen=True)
class LifecycleEvent:
    user_id: str
    change: ConsentChange
    effective_ts_ms: int
    consent_seq: int


Period = tuple[int, int]


@dataclass
class Lifecycle:
    """Per person: research-consent periods, membership periods, and when they left."""

    research: dict[str, list[Period]] = field(default_factory=dict)
    member: dict[str, list[Period]] = field(default_factory=dict)

    def export_periods(self) -> dict[str, list[Period]]:
        """Where consent and membership overlap, per person (empty lists dropped)."""
        result: dict[str, list[Period]] = {}
        for user, consent in self.research.items():
            both = intersect(consent, self.member.get(user, []))
            if both:
                result[user] = both
        return result

    def away_periods(self) -> dict[str, list[Period]]:
        """Per person who has ever left: the times from each leaving to the next enrolment
        (or open), where the rules engine ignores their data."""
        result: dict[str, list[Period]] = {}
        for user, periods in self.member.items():
            gaps = [(end, following[0]) for (_, end), following
                    in zip(periods, [*periods[1:], (TS_OPEN_END_MS, 0)], strict=True)
                    if end != TS_OPEN_END_MS]
            if gaps:
                result[user] = gaps
        return result

    def consenting_now(self) -> set[str]:
        return {user for user, periods in self.research.items()
                if periods and periods[-1][1] == TS_OPEN_END_MS}


def events_of_profile(body: bytes | Mapping[str, Any]) -> list[LifecycleEvent]:
    """The consent and enrolment events a stored profile stands for."""
    profile: Mapping[str, Any] = orjson.loads(body) if isinstance(body, bytes) else body
    user = str(profile["user_id"])
    enrolled_ms = day_start_ms(iso_to_day(str(profile["enrolled_on"])))
    timed = profile.get("consent_seq") is not None
    seq = int(profile["consent_seq"]) if timed else 0
    at = int(profile["updated_ts_ms"]) if timed else enrolled_ms
    consent = (ConsentChange.consent_given if profile["research_consent"]
               else ConsentChange.consent_withdrawn)
    return [LifecycleEvent(user, ConsentChange.enrolled, enrolled_ms, 0),
            LifecycleEvent(user, consent, at, seq)]


def lifecycle(events: Iterable[LifecycleEvent]) -> Lifecycle:
    """Consent and membership periods from events in any order."""
    result = Lifecycle()
    by_user: dict[tuple[str, bool], list[LifecycleEvent]] = {}
    for event in events:
        by_user.setdefault((event.user_id, event.change in _RESEARCH), []).append(event)
    for (user, research), items in by_user.items():
        periods = _periods(items)
        (result.research if research else result.member)[user] = periods
    return result


def _periods(events: list[LifecycleEvent]) -> list[Period]:
    """One person's periods of one kind: sweep effective times, the newest decision so far wins."""
    ordered = sorted(events, key=lambda e: e.effective_ts_ms)
    periods: list[Period] = []
    start: int | None = None
    best: tuple[int, int] | None = None  # (consent_seq, protective tie-break) of the decider
    on = False
    for index, event in enumerate(ordered):
        rank = (event.consent_seq, -_PROTECTIVE_RANK[event.change])
        if best is None or rank > best:
            best, on = rank, _PROTECTIVE_RANK[event.change] == 1
        at = event.effective_ts_ms
        if index + 1 < len(ordered) and ordered[index + 1].effective_ts_ms == at:
            continue  # decide once all events effective at this moment are seen
        if on and start is None:
            start = at
        elif not on and start is not None:
            if at > start:
                periods.append((start, at))
            start = None
    if start is not None:
        periods.append((start, TS_OPEN_END_MS))
    return periods


def intersect(a: list[Period], b: list[Period]) -> list[Period]:
    out: list[Period] = []
    i = j = 0
    while i < len(a) and j < len(b):
        low, high = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if low < high:
            out.append((low, high))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


class PeriodIndex:
    """Vectorised "is this (user, time) inside one of the user's periods?"."""

    def __init__(self, periods: Mapping[str, list[Period]]) -> None:
        self._row = {user: row for row, user in enumerate(sorted(periods))}
        if len(self._row) >= PEOPLE_PER_PERIOD_INDEX_MAX:
            raise CapacityError(f"{len(self._row):,} people with consent or membership periods; "
                                f"a period index holds at most {PEOPLE_PER_PERIOD_INDEX_MAX:,}")
        bounds = []  # periods clipped to the times the wire records allow, empty ones dropped
        for user, row in self._row.items():
            for start, end in periods[user]:
                start, end = max(start, TS_MS_MIN), min(end, TS_OPEN_END_MS)
                if start < end:
                    bounds += [(row << _TS_BITS) + start - TS_MS_MIN,
                               (row << _TS_BITS) + end - TS_MS_MIN]
        self._bounds = np.array(bounds, np.int64)
        assert np.all(np.diff(self._bounds) > 0), "periods overlap or are unordered"
        # Most people have one period: theirs is [start, end) per row, no search needed.
        owner = self._bounds[::2] >> _TS_BITS
        count = np.bincount(owner, minlength=len(self._row))
        self._multi = count > 1
        self._start = np.zeros(len(self._row), np.int64)  # [0, 0): no period left
        self._end = np.zeros(len(self._row), np.int64)
        single = count[owner] == 1
        self._start[owner[single]] = (self._bounds[::2][single] & _TS_MASK) + TS_MS_MIN
        self._end[owner[single]] = (self._bounds[1::2][single] & _TS_MASK) + TS_MS_MIN

    def rows(self, users: list[str]) -> np.ndarray:
        """Row per user id (-1 when the person has no period)."""
        return np.array([self._row.get(u, -1) for u in users], np.int64)

    def contains(self, users: list[str], user_idx: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        rows = self.rows(users)
        known = rows >= 0
        start = np.where(known, self._start[np.maximum(rows, 0)], 0)[user_idx]
        end = np.where(known, self._end[np.maximum(rows, 0)], 0)[user_idx]
        ts = np.clip(ts_ms, TS_MS_MIN, TS_OPEN_END_MS - 1)
        inside = (ts >= start) & (ts < end)
        multi = known & self._multi[np.maximum(rows, 0)]
        if multi.any():
            at = np.flatnonzero(multi[user_idx])
            keys = (rows[user_idx[at]] << _TS_BITS) + (ts[at] - TS_MS_MIN)
            inside[at] = (np.searchsorted(self._bounds, keys, side="right") & 1) == 1
        return inside
