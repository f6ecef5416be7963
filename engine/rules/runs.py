"""Runs: a sample batch collapsed into runs of consecutive samples that share a user,
a metric, a watermark and a Tokyo day.

The log hands batches over record by record (a record is one segment of one
metric of one user), so a 2M-sample batch is typically a few thousand runs. Finding
run boundaries and summing them with np.add.reduceat reads the columns once,
sequentially; everything after that (day boxes, exclusion of late samples) works on
runs instead of samples. A record crossing midnight is split where the day
changes. A batch without that structure (more runs than `share_max` of its
samples) is taken one sample per run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.clock import DAY_MS, TOKYO_OFFSET_MS
from engine.rules.batch import SampleBatch

RUNS_SHARE_MAX = 0.25


@dataclass(frozen=True)
class Runs:
    start: np.ndarray  # int64: index of the run's first sample
    length: np.ndarray  # int64
    user: np.ndarray  # int64: batch-local user index
    metric: np.ndarray  # int8
    wm: np.ndarray  # int64: wm_before_ms shared by the run's samples
    day: np.ndarray  # int64: Tokyo day shared by the run's samples
    steps: np.ndarray  # float64: sum of the samples' values rounded half to even

    @staticmethod
    def of(batch: SampleBatch, share_max: float = RUNS_SHARE_MAX) -> Runs:
        size = len(batch)
        assert size > 0
        day = _days(batch.ts_ms)
        change = np.empty(size, bool)
        change[0] = True
        np.not_equal(batch.user_idx[1:], batch.user_idx[:-1], out=change[1:])
        change[1:] |= batch.metric[1:] != batch.metric[:-1]
        change[1:] |= batch.wm_before_ms[1:] != batch.wm_before_ms[:-1]
        change[1:] |= day[1:] != day[:-1]  # a record crossing midnight: a run each side
        start = np.flatnonzero(change)
        if len(start) > share_max * size:
            start = np.arange(size, dtype=np.int64)
            return Runs(start, np.ones(size, np.int64), batch.user_idx.astype(np.int64),
                        batch.metric, batch.wm_before_ms, day, np.rint(batch.value))
        return Runs(start, np.diff(start, append=size), batch.user_idx[start].astype(np.int64),
                    batch.metric[start], batch.wm_before_ms[start], day[start],
                    np.add.reduceat(np.rint(batch.value), start))

    def sample_indices(self, keep: np.ndarray) -> np.ndarray:
        """Indices of the samples of the chosen runs, in batch order within each run."""
        start, length = self.start[keep], self.length[keep]
        offsets = np.cumsum(length) - length
        return np.arange(int(length.sum()), dtype=np.int64) + np.repeat(start - offsets, length)


def _days(ts_ms: np.ndarray) -> np.ndarray:
    return (ts_ms + TOKYO_OFFSET_MS) // DAY_MS
