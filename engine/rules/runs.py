"""Runs: a sample batch collapsed into runs of consecutive samples that share a user,
a metric, a watermark and a Tokyo day.

The log hands batches over record by record (a record is one segment of one
metric of one user), so a 2M-sample batch is typically a few thousand runs. Finding
run boundaries and summing them with np.add.reduceat reads the columns once,
sequentially; everything after that (day boxes, exclusion of late samples) works on
runs instead of samples. A batch without that structure (more runs than
`share_max` of its samples) is taken one sample per run.
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
        change = np.empty(size, bool)
        change[0] = True
        np.not_equal(batch.user_idx[1:], batch.user_idx[:-1], out=change[1:])
        change[1:] |= batch.metric[1:] != batch.metric[:-1]
        change[1:] |= batch.wm_before_ms[1:] != batch.wm_before_ms[:-1]
        start = np.flatnonzero(change)
        if len(start) > share_max * size:
            return Runs.single(batch, np.arange(size, dtype=np.int64))
        first_day = _days(np.minimum.reduceat(batch.ts_ms, start))
        last_day = _days(np.maximum.reduceat(batch.ts_ms, start))
        runs = Runs(start, np.diff(start, append=size), batch.user_idx[start].astype(np.int64),
                    batch.metric[start], batch.wm_before_ms[start], first_day,
                    np.add.reduceat(np.rint(batch.value), start))
        mixed = first_day != last_day  # a record crossing midnight: one run per sample
        if not mixed.any():
            return runs
        whole = runs.select(~mixed)
        split = Runs.single(batch, runs.sample_indices(mixed))
        return Runs(*(np.concatenate([getattr(whole, name), getattr(split, name)])
                      for name in Runs.__dataclass_fields__))

    @staticmethod
    def single(batch: SampleBatch, index: np.ndarray) -> Runs:
        """One run per listed sample."""
        return Runs(index, np.ones(len(index), np.int64), batch.user_idx[index].astype(np.int64),
                    batch.metric[index], batch.wm_before_ms[index], _days(batch.ts_ms[index]),
                    np.rint(batch.value[index]))

    def select(self, keep: np.ndarray) -> Runs:
        return Runs(*(getattr(self, name)[keep] for name in Runs.__dataclass_fields__))

    def sample_indices(self, keep: np.ndarray) -> np.ndarray:
        """Indices of the samples of the chosen runs, in batch order within each run."""
        start, length = self.start[keep], self.length[keep]
        offsets = np.cumsum(length) - length
        return np.arange(int(length.sum()), dtype=np.int64) + np.repeat(start - offsets, length)


def _days(ts_ms: np.ndarray) -> np.ndarray:
    return (ts_ms + TOKYO_OFFSET_MS) // DAY_MS
