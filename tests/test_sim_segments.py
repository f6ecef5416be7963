"""Cutting samples into segments at sync times (property tests against a plain model)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.sim.segments import Syncs, cut_segments
from engine.sim.vitals import Samples

BASE_MS = 1_700_000_000_000


@st.composite
def streams(draw: st.DrawFn) -> tuple[Samples, Syncs]:
    users, ts, cuts, cut_users, overlaps = [], [], [], [], []
    for user in range(draw(st.integers(1, 4))):
        times = sorted(draw(st.sets(st.integers(0, 10_000), max_size=30)))
        users += [user] * len(times)
        ts += times
        user_cuts = sorted(draw(st.sets(st.integers(0, 10_000), min_size=1, max_size=6)))
        user_cuts[-1] = max(user_cuts[-1], max(times, default=0))  # the last sync takes everything
        cuts += user_cuts
        cut_users += [user] * len(user_cuts)
        overlaps += draw(st.lists(st.sampled_from([0, 0, 0, 5, 50, 500]), min_size=len(user_cuts),
                                  max_size=len(user_cuts)))
    samples = Samples(np.array(users, dtype=np.int64), BASE_MS + np.array(ts, dtype=np.int64),
                      np.arange(len(ts), dtype=np.int16))
    cut = BASE_MS + np.array(cuts, dtype=np.int64)
    syncs = Syncs(np.array(cut_users, dtype=np.int64), cut, cut, np.array(overlaps, dtype=np.int64),
                  np.zeros(len(cut), dtype=bool))
    return samples, syncs


@settings(max_examples=200, deadline=None)
@given(streams())
def test_segments_partition_the_samples_and_resend_only_recent_tails(case: tuple[Samples, Syncs]) -> None:
    samples, syncs = case
    start, end, plain = cut_segments(samples, syncs, BASE_MS - 1_000)
    fresh = np.concatenate([np.arange(p, e) for p, e in zip(plain, end, strict=True)])
    assert fresh.tolist() == list(range(len(samples)))
    for j in range(len(syncs)):
        user, cut = syncs.user[j], syncs.cut_ms[j]
        mine = np.arange(plain[j], end[j])
        assert np.all(samples.user[mine] == user)
        assert np.all(samples.ts_ms[mine] <= cut)
        resent = np.arange(start[j], plain[j])
        if len(resent):
            assert j > 0 and syncs.user[j - 1] == user and syncs.overlap_ms[j] > 0
            previous_cut = syncs.cut_ms[j - 1]
            assert np.all(samples.user[resent] == user)
            assert np.all(samples.ts_ms[resent] > previous_cut - syncs.overlap_ms[j])
            assert np.all(samples.ts_ms[resent] <= previous_cut)
