"""Columnar inputs of the rules core, built by the embedded log or the Kafka worker.

Batches hold accepted, de-duplicated data in arrival order. `wm_before_ms` is the
user's watermark (latest timestamp of that user's earlier accepted records of the
same stream) before the record that carried the item; the core uses it to decide
whether an item arrived after its day was settled for flags.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.schemas import ACTIVITY_KINDS, METRICS

NO_WATERMARK_MS = -1


@dataclass(frozen=True)
class Profiles:
    """Latest profile per user: birth year and sex ("F" | "M" | "X")."""

    user_ids: list[str]
    birth_year: np.ndarray  # int16
    sex: np.ndarray  # str_ or object

    def __post_init__(self) -> None:
        assert len(self.user_ids) == len(self.birth_year) == len(self.sex), "ragged profiles"

    @staticmethod
    def empty() -> Profiles:
        return Profiles([], np.zeros(0, np.int16), np.zeros(0, dtype=object))

    @staticmethod
    def from_rows(rows: Iterable[tuple[str, int, str]]) -> Profiles:
        rows = list(rows)
        return Profiles([r[0] for r in rows], np.array([r[1] for r in rows], np.int16),
                        np.array([r[2] for r in rows], dtype=object))


@dataclass(frozen=True)
class SampleBatch:
    """Accepted, already de-duplicated samples, in arrival order."""

    users: list[str]  # distinct user ids of this batch
    user_idx: np.ndarray  # int32 index into users, per sample
    metric: np.ndarray  # int8 metric code (engine.schemas.METRICS[code])
    ts_ms: np.ndarray  # int64 UTC epoch ms
    value: np.ndarray  # float64
    wm_before_ms: np.ndarray  # int64: user's samples watermark before this sample's record

    def __post_init__(self) -> None:
        size = len(self.user_idx)
        assert len(self.metric) == len(self.ts_ms) == len(self.value) == size, "ragged batch"
        assert len(self.wm_before_ms) == size, "ragged batch"
        assert self.user_idx.dtype == np.int32 and self.metric.dtype == np.int8
        assert self.ts_ms.dtype == np.int64 and self.wm_before_ms.dtype == np.int64
        assert self.value.dtype == np.float64

    def __len__(self) -> int:
        return len(self.user_idx)

    @staticmethod
    def empty() -> SampleBatch:
        return SampleBatch([], np.zeros(0, np.int32), np.zeros(0, np.int8),
                           np.zeros(0, np.int64), np.zeros(0, np.float64),
                           np.zeros(0, np.int64))


@dataclass(frozen=True)
class ActivityBatch:
    """Accepted, de-duplicated (unique event_id) activities, in arrival order."""

    users: list[str]
    user_idx: np.ndarray  # int32
    event_id: list[str]
    kind: np.ndarray  # int8 index into engine.schemas.ACTIVITY_KINDS
    ts_ms: np.ndarray  # int64
    venue_id: list[str]  # "" when none
    wm_before_ms: np.ndarray  # int64: user's activities watermark before this event

    def __post_init__(self) -> None:
        size = len(self.user_idx)
        assert len(self.event_id) == len(self.kind) == len(self.ts_ms) == size, "ragged batch"
        assert len(self.venue_id) == len(self.wm_before_ms) == size, "ragged batch"
        assert self.user_idx.dtype == np.int32 and self.kind.dtype == np.int8
        assert self.ts_ms.dtype == np.int64 and self.wm_before_ms.dtype == np.int64

    def __len__(self) -> int:
        return len(self.user_idx)

    @staticmethod
    def empty() -> ActivityBatch:
        return ActivityBatch([], np.zeros(0, np.int32), [], np.zeros(0, np.int8),
                             np.zeros(0, np.int64), [], np.zeros(0, np.int64))


@dataclass(frozen=True)
class SampleRecord:
    """One accepted segment: samples of one metric for one user (tests, benchmarks)."""

    user_id: str
    metric: int
    ts_ms: Sequence[int] | np.ndarray
    values: Sequence[float] | np.ndarray


@dataclass(frozen=True)
class ActivityRecord:
    user_id: str
    event_id: str
    kind: int
    ts_ms: int
    venue_id: str = ""


@dataclass
class WatermarkLog:
    """Assigns wm_before_ms the way the log does, record by record (tests, benchmarks).

    Keeps each user's samples and activities watermarks across batches, so feeding
    the same records in any batch split yields the same wm_before_ms per item.
    """

    samples_wm_ms: dict[str, int] = field(default_factory=dict)
    activities_wm_ms: dict[str, int] = field(default_factory=dict)

    def sample_batch(self, records: Sequence[SampleRecord]) -> SampleBatch:
        users: dict[str, int] = {}
        parts_user, parts_metric, parts_ts, parts_value, parts_wm = [], [], [], [], []
        for record in records:
            ts = np.asarray(record.ts_ms, np.int64)
            if len(ts) == 0:
                continue
            assert 0 <= record.metric < len(METRICS)
            index = users.setdefault(record.user_id, len(users))
            before = self.samples_wm_ms.get(record.user_id, NO_WATERMARK_MS)
            self.samples_wm_ms[record.user_id] = max(before, int(ts.max()))
            parts_user.append(np.full(len(ts), index, np.int32))
            parts_metric.append(np.full(len(ts), record.metric, np.int8))
            parts_ts.append(ts)
            parts_value.append(np.asarray(record.values, np.float64))
            parts_wm.append(np.full(len(ts), before, np.int64))
        if not parts_ts:
            return SampleBatch.empty()
        return SampleBatch(list(users), np.concatenate(parts_user),
                           np.concatenate(parts_metric), np.concatenate(parts_ts),
                           np.concatenate(parts_value), np.concatenate(parts_wm))

    def activity_batch(self, records: Sequence[ActivityRecord]) -> ActivityBatch:
        users: dict[str, int] = {}
        user_idx, wm = [], []
        for record in records:
            assert 0 <= record.kind < len(ACTIVITY_KINDS)
            user_idx.append(users.setdefault(record.user_id, len(users)))
            before = self.activities_wm_ms.get(record.user_id, NO_WATERMARK_MS)
            wm.append(before)
            self.activities_wm_ms[record.user_id] = max(before, record.ts_ms)
        return ActivityBatch(
            list(users), np.array(user_idx, np.int32), [r.event_id for r in records],
            np.array([r.kind for r in records], np.int8),
            np.array([r.ts_ms for r in records], np.int64),
            [r.venue_id for r in records], np.array(wm, np.int64))
