"""The programme's own data for evaluation, as columns: consenting people only.

Read through the embedded log's and the ledger's APIs (never their files), in
chunks by log position, and reduced on the way: daily steps per person and day,
activity days, flag events, ledger entries. People without research consent are
dropped at the first step, so nothing downstream can see them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from engine.clock import day_start_ms, iso_to_day, tokyo_days
from engine.evaluation.consent import ResearchConsent
from engine.ingest.log import EmbeddedLog
from engine.schemas import ACTIVITY_KINDS, METRIC_BY_NAME

LOG_RECORDS_PER_CHUNK = 20_000
LEDGER_ENTRIES_PER_READ = 100_000
DAY_KEY_SPAN = 1 << 20  # (person, day) packed as person * span + day


@dataclass
class ProgrammeData:
    """Columns over consenting people; person indexes point into user_ids."""

    user_ids: list[str]
    birth_year: np.ndarray
    sex: np.ndarray  # str objects
    cohort: np.ndarray  # str objects
    enrolled_day: np.ndarray
    people_left_out_no_consent: int
    # daily steps: one row per (person, day) with any steps
    steps_person: np.ndarray
    steps_day: np.ndarray
    steps: np.ndarray
    # activities: one row per stored event
    act_person: np.ndarray
    act_day: np.ndarray
    act_kind: np.ndarray  # str objects (ACTIVITY_KINDS)
    act_venue: np.ndarray  # str objects ("" without a venue)
    # flag events, in append order
    flag_person: np.ndarray
    flag_name: np.ndarray
    flag_raised: np.ndarray
    flag_day: np.ndarray
    # ledger entries
    entry_person: np.ndarray
    entry_kind: np.ndarray
    entry_rule: np.ndarray
    entry_points: np.ndarray
    entry_day: np.ndarray

    @property
    def n(self) -> int:
        return len(self.user_ids)

    def data_days(self) -> tuple[int, int] | None:
        """First and last day with steps or activities (None when there are none)."""
        days = np.concatenate([self.steps_day, self.act_day])
        return (int(days.min()), int(days.max())) if len(days) else None


def load_programme(data_dir: Path, *, with_steps: bool = True) -> ProgrammeData:
    """Without steps, the log's samples are not read at all (indicators need none)."""
    with EmbeddedLog.open(data_dir, writer=False) as log:
        consent = ResearchConsent.of(log)
        consenting, refused = consent.people, consent.refused
        profiles = sorted((p for p in map(orjson.loads, log.profiles())
                           if p["user_id"] in consenting), key=lambda p: p["user_id"])
        index = {p["user_id"]: i for i, p in enumerate(profiles)}
        steps, acts = _read_log(log, index, with_steps, consent)
    entries, flags = _read_ledger(data_dir, index, consent)
    return ProgrammeData(
        user_ids=[p["user_id"] for p in profiles],
        birth_year=np.array([p["birth_year"] for p in profiles], dtype=np.int64),
        sex=np.array([p["sex"] for p in profiles], dtype=object),
        cohort=np.array([p["cohort"] for p in profiles], dtype=object),
        enrolled_day=np.array([iso_to_day(p["enrolled_on"]) for p in profiles], dtype=np.int64),
        people_left_out_no_consent=refused,
        steps_person=steps[0], steps_day=steps[1], steps=steps[2],
        act_person=acts[0], act_day=acts[1], act_kind=acts[2], act_venue=acts[3],
        flag_person=flags[0], flag_name=flags[1], flag_raised=flags[2], flag_day=flags[3],
        entry_person=entries[0], entry_kind=entries[1], entry_rule=entries[2],
        entry_points=entries[3], entry_day=entries[4])


def _read_log(log: EmbeddedLog, index: dict[str, int], with_steps: bool,
              consent: ResearchConsent) -> tuple[tuple, tuple]:
    steps_code = METRIC_BY_NAME["steps"].code
    kinds = np.array(ACTIVITY_KINDS, dtype=object)
    key_parts: list[np.ndarray] = []
    sum_parts: list[np.ndarray] = []
    act_parts: list[tuple[np.ndarray, ...]] = []
    end = log.position()
    for lo in range(0, end, LOG_RECORDS_PER_CHUNK):
        hi = min(lo + LOG_RECORDS_PER_CHUNK, end)
        cols = log.read_samples(lo, hi) if with_steps else None
        if cols is not None and len(cols.ts_ms):
            person = np.array([index.get(u, -1) for u in cols.users], dtype=np.int64)[cols.user_idx]
            keep = (cols.metric == steps_code) & (person >= 0)
            keep &= consent.contains(cols.users, cols.user_idx, cols.ts_ms)
            if keep.any():
                keys = person[keep] * DAY_KEY_SPAN + tokyo_days(cols.ts_ms[keep])
                chunk_keys, chunk_inverse = np.unique(keys, return_inverse=True)
                key_parts.append(chunk_keys)
                sum_parts.append(np.bincount(chunk_inverse, weights=cols.value[keep]))
        acts = log.read_activities(lo, hi)
        if len(acts.ts_ms):
            person = np.array([index.get(u, -1) for u in acts.users], dtype=np.int64)[acts.user_idx]
            keep = (person >= 0) & consent.contains(acts.users, acts.user_idx, acts.ts_ms)
            venues = np.array([v or "" for v in acts.venue_id], dtype=object)
            act_parts.append((person[keep], tokyo_days(acts.ts_ms[keep]).astype(np.int64),
                              kinds[acts.kind[keep]], venues[keep]))
    unique: np.ndarray = np.zeros(0, dtype=np.int64)
    totals: np.ndarray = np.zeros(0)
    if key_parts:
        unique, inverse = np.unique(np.concatenate(key_parts), return_inverse=True)
        totals = np.bincount(inverse, weights=np.concatenate(sum_parts))
    steps = (unique // DAY_KEY_SPAN, unique % DAY_KEY_SPAN, totals)
    if act_parts:
        acts_cols = tuple(np.concatenate([p[k] for p in act_parts]) for k in range(4))
    else:
        acts_cols = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, object),
                     np.zeros(0, object))
    return steps, acts_cols


def _read_ledger(data_dir: Path, index: dict[str, int],
                 consent: ResearchConsent) -> tuple[tuple, tuple]:
    from engine.ledger import Ledger
    from engine.ledger.store import LEDGER_FILE_NAME

    empty_entries = (np.zeros(0, np.int64), np.zeros(0, object), np.zeros(0, object),
                     np.zeros(0, np.int64), np.zeros(0, np.int64))
    empty_flags = (np.zeros(0, np.int64), np.zeros(0, object), np.zeros(0, bool),
                   np.zeros(0, np.int64))
    if not (data_dir / LEDGER_FILE_NAME).exists():
        return empty_entries, empty_flags
    rows: list[tuple[int, str, str, int, int, str, int]] = []
    with Ledger.open(data_dir) as ledger:
        head = ledger.head_seq()
        for lo in range(0, head, LEDGER_ENTRIES_PER_READ):
            for e in ledger.read_entries(lo, min(lo + LEDGER_ENTRIES_PER_READ, head)):
                person = index.get(e.user_id, -1)
                if person < 0:
                    continue
                day = iso_to_day(e.day) if e.day else int(tokyo_days(np.array([e.ts_ms]))[0])
                rows.append((person, e.kind.value, e.rule or "", e.points, day, e.user_id,
                             e.ts_ms))
        flag_rows = [(index[f.user_id], f.flag.value, f.state.value == "raised", iso_to_day(f.day),
                      f.user_id, day_start_ms(iso_to_day(f.day)))
                     for f in ledger.all_flag_events() if f.user_id in index]
    rows = _inside(rows, consent)
    flag_rows = _inside(flag_rows, consent)
    entries = empty_entries if not rows else (
        np.array([r[0] for r in rows], np.int64), np.array([r[1] for r in rows], object),
        np.array([r[2] for r in rows], object), np.array([r[3] for r in rows], np.int64),
        np.array([r[4] for r in rows], np.int64))
    flags = empty_flags if not flag_rows else (
        np.array([r[0] for r in flag_rows], np.int64), np.array([r[1] for r in flag_rows], object),
        np.array([r[2] for r in flag_rows], bool), np.array([r[3] for r in flag_rows], np.int64))
    return entries, flags


def _inside(rows: list, consent: ResearchConsent) -> list:  # type: ignore[type-arg]
    """Rows (..., user_id, ts_ms) inside their person's consent periods."""
    if not rows:
        return rows
    users = sorted({r[-2] for r in rows})
    position = {u: i for i, u in enumerate(users)}
    keep = consent.contains(users, np.array([position[r[-2]] for r in rows], np.int64),
                            np.array([r[-1] for r in rows], np.int64))
    return [r for r, k in zip(rows, keep.tolist(), strict=True) if k]


def raised_flags_on(data: ProgrammeData, day: int) -> np.ndarray:
    """Per person, how many flags stand raised at the end of `day` (latest event per flag wins)."""
    counts = np.zeros(data.n, dtype=np.int64)
    if not len(data.flag_person):
        return counts
    state: dict[tuple[int, str], bool] = {}
    order = np.argsort(data.flag_day, kind="stable")
    for i in order.tolist():
        if data.flag_day[i] > day:
            break
        state[(int(data.flag_person[i]), str(data.flag_name[i]))] = bool(data.flag_raised[i])
    for (person, _), raised in state.items():
        counts[person] += raised
    return counts
