"""Activity events: venue check-ins, classes and volunteering; app meal logs and brain training.

Drawn as whole user x day arrays, then serialised one small record each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

from engine.clock import DAY_MS
from engine.sim.population import VENUE_ACTIVITY_NAMES, Population, Venues
from engine.sim.segments import RECORDS_PER_EXTEND
from engine.sim.spill import LineSink
from engine.sim.vitals import MINUTE_MS

SOURCES = ("venue_qr", "app")
KIND_NAMES = ("checkin", "class", "volunteer", "meal", "brain_training")
MEAL_WINDOWS_MIN = ((420, 510), (720, 790), (1080, 1170))
REGULAR_ATTENDANCE = 0.85
DOUBLE_SCAN_FRACTION = 0.01  # people who scan the venue QR code twice
APP_LATE_DAYS = (1, 3)
EVENT_ID_BYTES = 16


@dataclass(frozen=True)
class Activities:
    user: np.ndarray  # int64
    kind: np.ndarray  # index into KIND_NAMES
    ts_ms: np.ndarray
    venue: np.ndarray  # index into venues, -1 for none
    source: np.ndarray  # index into SOURCES
    delivery_ms: np.ndarray
    late: np.ndarray
    double_scan: np.ndarray

    def __len__(self) -> int:
        return len(self.user)


def make_activities(pop: Population, venues: Venues, app_active: np.ndarray, days: int,
                    start_day: int, day0_ms: int, late_fraction: float,
                    rng: np.random.Generator) -> Activities:
    visits = _venue_visits(pop, venues, days, start_day, day0_ms, rng)
    app = _app_events(pop, app_active, days, day0_ms, late_fraction, rng)
    parts = [visits, app]
    return Activities(*(np.concatenate([getattr(p, name) for p in parts])
                        for name in Activities.__dataclass_fields__))


def _venue_visits(pop: Population, venues: Venues, days: int, start_day: int, day0_ms: int,
                  rng: np.random.Generator) -> Activities:
    n = pop.n
    weekday = (start_day + np.arange(days) + 3) % 7
    decline, alone = pop.level("decline", days), pop.level("isolated", days)
    attend = REGULAR_ATTENDANCE * (1.0 - 0.5 * decline) * (1.0 - alone)
    regular = ((pop.regular_venue[:, None] >= 0) & (weekday[None, :] == pop.regular_weekday[:, None])
               & (rng.random((n, days)) < attend))
    pick = rng.integers(0, pop.nearby_venues.shape[1], (n, days))
    venue_any = np.take_along_axis(pop.nearby_venues, pick, axis=1)
    chance = pop.visits_per_week[:, None] / 7.0 * (1.0 - 0.6 * decline) * (1.0 - alone)
    occasional = ~regular & (rng.random((n, days)) < chance)
    occasional &= venues.open_mask[venue_any, weekday[None, :]]
    venue = np.where(regular, pop.regular_venue[:, None], venue_any)
    minute = np.where(regular, pop.regular_minute[:, None] + np.rint(rng.normal(0, 8, (n, days))),
                      rng.integers(540, 960, (n, days)))
    went = regular | occasional
    user, day = np.nonzero(went)
    venue, minute = venue[went], minute[went].astype(np.int64)
    ts = day0_ms + day * DAY_MS + minute * MINUTE_MS + rng.integers(0, MINUTE_MS, len(user))
    again = rng.random(len(user)) < DOUBLE_SCAN_FRACTION
    second_ts = ts[again] + rng.integers(1, 21, int(again.sum())) * MINUTE_MS
    user = np.concatenate([user, user[again]])
    venue = np.concatenate([venue, venue[again]])
    ts = np.concatenate([ts, second_ts])
    kind = venues.activity_kind[venue].astype(np.int64)
    assert all(KIND_NAMES[i] == name for i, name in enumerate(VENUE_ACTIVITY_NAMES))
    delivery = ts + rng.integers(200, 5_000, len(ts))
    count = len(ts)
    double = np.zeros(count, dtype=bool)
    double[count - int(again.sum()):] = True
    return Activities(user.astype(np.int64), kind, ts, venue.astype(np.int64),
                      np.zeros(count, dtype=np.int64), delivery, np.zeros(count, dtype=bool), double)


def _app_events(pop: Population, active: np.ndarray, days: int, day0_ms: int,
                late_fraction: float, rng: np.random.Generator) -> Activities:
    lo = pop.n_watch
    n_app = pop.n_app
    meal_p = pop.meal_prob[lo:, None, None] * active[:, :, None]
    meal = rng.random((n_app, days, len(MEAL_WINDOWS_MIN))) < meal_p
    m_user, m_day, m_slot = np.nonzero(meal)
    windows = np.array(MEAL_WINDOWS_MIN)
    m_minute = rng.integers(windows[m_slot, 0], windows[m_slot, 1])
    brain = rng.random((n_app, days)) < pop.brain_prob[lo:, None] * active
    b_user, b_day = np.nonzero(brain)
    b_minute = rng.integers(480, 1_290, len(b_user))
    twice = rng.random(len(b_user)) < 0.1
    b_user = np.concatenate([b_user, b_user[twice]])
    b_day = np.concatenate([b_day, b_day[twice]])
    b_minute = np.concatenate([b_minute, np.minimum(b_minute[twice] + rng.integers(30, 180, int(twice.sum())), 1_430)])
    user = lo + np.concatenate([m_user, b_user]).astype(np.int64)
    day = np.concatenate([m_day, b_day]).astype(np.int64)
    minute = np.concatenate([m_minute, b_minute]).astype(np.int64)
    kind = np.concatenate([np.full(len(m_user), KIND_NAMES.index("meal")),
                           np.full(len(b_user), KIND_NAMES.index("brain_training"))])
    ts = day0_ms + day * DAY_MS + minute * MINUTE_MS + rng.integers(0, MINUTE_MS, len(user))
    late = rng.random(len(ts)) < late_fraction
    delay = rng.integers(APP_LATE_DAYS[0] * DAY_MS, APP_LATE_DAYS[1] * DAY_MS + 1, len(ts))
    delivery = ts + rng.integers(1_000, 90_000, len(ts)) + np.where(late, delay, 0)
    count = len(ts)
    return Activities(user, kind.astype(np.int64), ts, np.full(count, -1, dtype=np.int64),
                      np.ones(count, dtype=np.int64), delivery, late, np.zeros(count, dtype=bool))


def activity_body(event_id: str, user_id: str, kind: str, ts_ms: int, venue_id: str | None,
                  source: str) -> dict[str, object]:
    body: dict[str, object] = {"v": 1, "event_id": event_id, "user_id": user_id, "kind": kind,
                               "ts_ms": ts_ms}
    if venue_id is not None:
        body["venue_id"] = venue_id
    body["source"] = source
    return body


def serialise_activities(pop: Population, venues: Venues, acts: Activities,
                         rng: np.random.Generator, lines: LineSink) -> None:
    ids = rng.bytes(EVENT_ID_BYTES * len(acts)).hex()
    user_ids, venue_ids = pop.user_ids, venues.ids
    columns = zip(acts.user.tolist(), acts.kind.tolist(), acts.ts_ms.tolist(), acts.venue.tolist(),
                  acts.source.tolist(), strict=True)
    records = []
    for r, (u, k, ts, v, s) in enumerate(columns):
        records.append(orjson.dumps(activity_body(ids[32 * r:32 * r + 32], user_ids[u], KIND_NAMES[k],
                                                  ts, venue_ids[v] if v >= 0 else None, SOURCES[s])))
        if len(records) == RECORDS_PER_EXTEND:
            lines.extend(records)
            records = []
    lines.extend(records)
