"""Syncs and segments: how samples leave a device, one record per metric per sync.

A sync takes every sample with cut_ms >= ts_ms > the previous sync's cut_ms
(one searchsorted over (user, ts) keys for a whole block). A re-sync also
re-sends the tail of the previous segment under a new upload_id; a late
upload is delivered days after its sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import orjson

from engine.clock import DAY_MS
from engine.schemas import METRIC_BY_NAME
from engine.sim.population import Population
from engine.sim.spill import LineSink
from engine.sim.vitals import MINUTE_MS, Block, Samples

USER_SHIFT_BITS = 42  # (user << 42) | (ts - base): 139 years of milliseconds per user
WATCH_SYNC_SLOTS_MIN = ((480, 570), (720, 810), (1050, 1140), (1305, 1410))
WATCH_SLOTS_BY_COUNT = {2: (0, 2), 3: (0, 1, 2), 4: (0, 1, 2, 3)}
PHONE_CUT_MIN = 23 * 60  # a phone's day segment ends with the bucket ending 23:00
RESYNC_OVERLAP_MIN = (30, 120)
LATE_DAYS = (1, 5)
RESYNC_GAP_MS_MAX = 2 * DAY_MS  # only re-send a tail from a recent segment
UPLOAD_ID_BYTES = 16
NUMPY = orjson.OPT_SERIALIZE_NUMPY
# Many orjson outputs alive at once fragment the heap (each keeps ~4 KiB): hand them on in batches.
RECORDS_PER_EXTEND = 10_000


@dataclass(frozen=True)
class Syncs:
    user: np.ndarray  # int64, sorted by (user, cut_ms)
    cut_ms: np.ndarray
    delivery_ms: np.ndarray
    overlap_ms: np.ndarray  # > 0: this sync re-sends that much of the previous segment's tail
    late: np.ndarray

    def __len__(self) -> int:
        return len(self.user)


def watch_syncs(block: Block, rng: np.random.Generator, resync: float, late: float) -> Syncs:
    """2-4 syncs a day per watch, plus one the morning after the last day."""
    users, days = block.users, block.days
    count = np.clip(block.trait("syncs_per_day")[:, None] + rng.choice([-1, 0, 1], (users, days + 1),
                                                                   p=[0.2, 0.6, 0.2]), 2, 4)
    chosen = np.zeros((users, days + 1, len(WATCH_SYNC_SLOTS_MIN)), dtype=bool)
    for n, slots in WATCH_SLOTS_BY_COUNT.items():
        for slot in slots:
            chosen[:, :, slot] |= count == n
    chosen[:, days, 1:] = False
    chosen[:, days, 0] = True
    low = np.array([s[0] for s in WATCH_SYNC_SLOTS_MIN])
    high = np.array([s[1] for s in WATCH_SYNC_SLOTS_MIN])
    second = rng.integers(low * 60, high * 60, chosen.shape)
    day_ms = block.day0_ms + np.arange(days + 1, dtype=np.int64) * DAY_MS
    cut = day_ms[None, :, None] + second * 1000 + rng.integers(0, 1000, chosen.shape)
    user = np.broadcast_to((block.lo + np.arange(users))[:, None, None], chosen.shape)[chosen]
    cut = cut[chosen]
    latency = rng.integers(2_000, 300_000, len(cut))
    return _with_faults(user.astype(np.int64), cut.astype(np.int64), cut + latency, rng, resync, late)


def phone_syncs(block: Block, active: np.ndarray, rng: np.random.Generator, resync: float,
                late: float) -> Syncs:
    """One segment per active day, sent that evening or the next morning."""
    users, days = block.users, block.days
    day_ms = block.day0_ms + np.arange(days, dtype=np.int64) * DAY_MS
    cut = np.broadcast_to(day_ms[None, :] + PHONE_CUT_MIN * MINUTE_MS, (users, days))[active]
    user = np.broadcast_to((block.lo + np.arange(users))[:, None], (users, days))[active]
    evening = rng.random(len(cut)) < 0.4
    wait_ms = np.where(evening, rng.integers(5 * MINUTE_MS, 59 * MINUTE_MS, len(cut)),
                       rng.integers(7 * 60 * MINUTE_MS, 11 * 60 * MINUTE_MS, len(cut)))
    return _with_faults(user.astype(np.int64), cut.astype(np.int64), cut + wait_ms, rng, resync, late)


def _with_faults(user: np.ndarray, cut: np.ndarray, delivery: np.ndarray, rng: np.random.Generator,
                 resync: float, late: float) -> Syncs:
    has_recent_prev = np.zeros(len(user), dtype=bool)
    has_recent_prev[1:] = (user[1:] == user[:-1]) & (cut[1:] - cut[:-1] <= RESYNC_GAP_MS_MAX)
    overlap = np.where(has_recent_prev & (rng.random(len(user)) < resync),
                       rng.integers(RESYNC_OVERLAP_MIN[0], RESYNC_OVERLAP_MIN[1] + 1, len(user))
                       * MINUTE_MS, 0)
    is_late = rng.random(len(user)) < late
    delay = rng.integers(LATE_DAYS[0] * DAY_MS, LATE_DAYS[1] * DAY_MS + 1, len(user))
    return Syncs(user, cut, delivery + np.where(is_late, delay, 0), overlap.astype(np.int64), is_late)


def cut_segments(samples: Samples, syncs: Syncs, base_ms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sync: [start, end) into the samples, and where it would start without a re-sync."""
    key = (samples.user << USER_SHIFT_BITS) | (samples.ts_ms - base_ms)
    assert len(key) == 0 or (np.all(samples.ts_ms >= base_ms) and np.all(np.diff(key) > 0))
    sync_key = (syncs.user << USER_SHIFT_BITS) | (syncs.cut_ms - base_ms)
    end = np.searchsorted(key, sync_key, side="right")
    plain = np.zeros_like(end)
    plain[1:] = end[:-1]
    first = np.ones(len(syncs), dtype=bool)
    first[1:] = syncs.user[1:] != syncs.user[:-1]
    user_start = np.searchsorted(key, syncs.user[first] << USER_SHIFT_BITS, side="left")
    assert np.array_equal(plain[first], user_start), "a user's samples were not all synced"
    assert len(syncs) == 0 or end[-1] == len(key), "samples after the last sync"
    prev_cut = np.zeros_like(syncs.cut_ms)
    prev_cut[1:] = syncs.cut_ms[:-1]
    resend = ~first & (syncs.overlap_ms > 0)
    tail_key = (syncs.user << USER_SHIFT_BITS) | np.maximum(prev_cut - syncs.overlap_ms - base_ms, 0)
    start = np.where(resend, np.minimum(np.searchsorted(key, tail_key, side="right"), plain), plain)
    return start, end, plain


@dataclass
class SegmentStats:
    records: int = 0
    samples_written: dict[str, int] = field(default_factory=dict)
    samples_unique: dict[str, int] = field(default_factory=dict)
    resync_records: int = 0  # records that re-send samples of an earlier segment
    resync_samples: int = 0
    late_records: int = 0
    late_syncs: int = 0

    def add(self, other: SegmentStats) -> None:
        self.records += other.records
        for name in ("samples_written", "samples_unique"):
            mine, theirs = getattr(self, name), getattr(other, name)
            for metric, count in theirs.items():
                mine[metric] = mine.get(metric, 0) + count
        self.resync_records += other.resync_records
        self.resync_samples += other.resync_samples
        self.late_records += other.late_records
        self.late_syncs += other.late_syncs


def serialise_block(pop: Population, samples: dict[str, Samples], syncs: Syncs, base_ms: int,
                    rng: np.random.Generator, lines: LineSink) -> tuple[np.ndarray, SegmentStats]:
    """Append one record per (metric, non-empty sync) to lines; return their delivery times."""
    stats = SegmentStats(late_syncs=int(syncs.late.sum()))
    deliveries = []
    user_ids, n_watch = pop.user_ids, pop.n_watch
    sync_user = syncs.user.tolist()
    for metric, sample in samples.items():
        start, end, plain = cut_segments(sample, syncs, base_ms)
        keep = np.flatnonzero(end > start)
        ids = rng.bytes(UPLOAD_ID_BYTES * len(keep)).hex()
        unit = METRIC_BY_NAME[metric].unit
        ts, values = sample.ts_ms, sample.values
        starts, ends = start.tolist(), end.tolist()
        records = []
        for r, j in enumerate(keep.tolist()):
            a, b, u = starts[j], ends[j], sync_user[j]
            uid = user_ids[u]
            records.append(orjson.dumps({
                "v": 1, "upload_id": ids[32 * r:32 * r + 32], "user_id": uid,
                "device_id": uid + ("-watch1" if u < n_watch else "-phone"),
                "metric": metric, "unit": unit, "ts_ms": ts[a:b], "values": values[a:b],
            }, option=NUMPY))
            if len(records) == RECORDS_PER_EXTEND:
                lines.extend(records)
                records = []
        lines.extend(records)
        deliveries.append(syncs.delivery_ms[keep])
        resent = (plain - start)[keep]
        stats.records += len(keep)
        stats.samples_written[metric] = int((end - start).sum())
        stats.samples_unique[metric] = len(sample)
        stats.resync_records += int((resent > 0).sum())
        stats.resync_samples += int(resent.sum())
        stats.late_records += int(syncs.late[keep].sum())
    delivery = np.concatenate(deliveries) if deliveries else np.zeros(0, dtype=np.int64)
    return delivery, stats
