"""The set of samples already stored, as sorted runs of packed uint64 keys.

A sample is identified by (user, device, metric, ts_ms). The log numbers each
(user, device, metric) stream, so a key packs stream id and timestamp into one
uint64 and membership for a whole batch is a few `searchsorted` passes. Runs
are merged log-structured (a new run merges with the last while it is at least
half its size), so inserting N keys costs O(N log N) overall, never a full
re-sort per batch.
"""

from __future__ import annotations

import numpy as np

from engine.schemas import TS_MS_MIN

TS_BITS = 43
STREAMS_MAX = 1 << (63 - TS_BITS)
_TS_MASK = (1 << TS_BITS) - 1


def pack_keys(stream_id: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
    offset = ts_ms.astype(np.int64) - TS_MS_MIN
    assert offset.size == 0 or (offset.min() >= 0 and offset.max() <= _TS_MASK), "ts out of key range"
    assert stream_id.size == 0 or int(stream_id.max()) < STREAMS_MAX, "too many streams"
    return (stream_id.astype(np.uint64) << np.uint64(TS_BITS)) | offset.astype(np.uint64)


class SeenSamples:
    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask: which keys are already stored."""
        found = np.zeros(len(keys), dtype=bool)
        for run in self._runs:
            position = np.searchsorted(run, keys)
            position[position == len(run)] = 0
            found |= run[position] == keys
        return found

    def add(self, keys: np.ndarray) -> None:
        """Add keys that are not yet present (the caller filtered them)."""
        if not len(keys):
            return
        run = np.sort(keys)
        while self._runs and len(self._runs[-1]) <= 2 * len(run):
            run = np.sort(np.concatenate((self._runs.pop(), run)), kind="stable")
        self._runs.append(run)


def first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Mask of the first occurrence of each key within one batch (arrival order)."""
    _, first = np.unique(keys, return_index=True)
    mask = np.zeros(len(keys), dtype=bool)
    mask[first] = True
    return mask
