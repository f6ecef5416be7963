"""The vectorised engine against the plain-Python reference, on generated streams.

For any stream and any split into batches, the engine must write exactly the set
of award entries and flag events the one-event-at-a-time reference writes.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.rules.config import Rules, default_rules
from tests.rules_reference import (
    award_set,
    flag_set,
    generate,
    run_engine,
    run_reference,
    short_window_rules,
    split,
)

DIFFERENTIAL = settings(max_examples=500, derandomize=True, deadline=None, database=None,
                        suppress_health_check=[HealthCheck.too_slow])
SMALL = settings(max_examples=750, derandomize=True, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])

_RULES: dict[tuple[int, int, bool], Rules] = {}


def rules_for(variant: int, settle_days: int) -> Rules:
    """0: default rules; 1: short flag windows + campaigns; 2: the same with a cap of 2."""
    key = (variant, settle_days, True)
    if key not in _RULES:
        _RULES[key] = default_rules() if variant == 0 else short_window_rules(
            settle_days, cap=3 if variant == 1 else 2)
    return _RULES[key]


# Aggregation paths of the engine: (dense box or sparse cells) x (runs or samples).
PATHS = {"box+runs": {"runs_share_max": 1.0}, "box+samples": {"runs_share_max": 0.0},
         "sparse+runs": {"box_cells_max": 60, "runs_share_max": 1.0},
         "sparse+samples": {"box_cells_max": 60, "runs_share_max": 0.0}, "default": {}}


def check(rules: Rules, seed: int, users: int, days: int, late_share: float, split_seed: int,
          batches_max: int, path: str) -> None:
    stream = generate(seed, users=users, days=days, late_share=late_share)
    reference = run_reference(rules, stream)
    batches = split(stream.events, split_seed, batches_max)
    awards, flags, _ = run_engine(rules, stream, batches, **PATHS[path])
    assert len({a.entry_id for a in awards}) == len(awards), "an award was written twice"
    assert len({f.flag_id for f in flags}) == len(flags), "a flag event was written twice"
    assert award_set(awards) == award_set(reference.awards.values())
    assert flag_set(flags) == flag_set(reference.flags)


@DIFFERENTIAL
@given(seed=st.integers(0, 2**32 - 1), users=st.integers(1, 4), days=st.integers(20, 60),
       late_share=st.sampled_from([0.0, 0.1, 0.3]), variant=st.sampled_from([1, 1, 2, 0]),
       settle_days=st.integers(1, 3), split_seed=st.integers(0, 2**32 - 1),
       batches_max=st.integers(0, 40), path=st.sampled_from(sorted(PATHS)))
def test_any_split_gives_the_reference_awards_and_flags(
        seed: int, users: int, days: int, late_share: float, variant: int, settle_days: int,
        split_seed: int, batches_max: int, path: str) -> None:
    check(rules_for(variant, settle_days), seed, users, days, late_share, split_seed,
          batches_max, path)


@SMALL
@given(seed=st.integers(0, 2**32 - 1), days=st.integers(8, 24), settle_days=st.integers(1, 3),
       split_seed=st.integers(0, 2**32 - 1), batches_max=st.integers(0, 12),
       path=st.sampled_from(["box+runs", "box+samples"]))
def test_small_streams_with_many_batches(seed: int, days: int, settle_days: int,
                                         split_seed: int, batches_max: int, path: str) -> None:
    check(rules_for(1, settle_days), seed, 2, days, 0.2, split_seed, batches_max, path)


@pytest.mark.parametrize("seed", range(6))
def test_one_event_per_batch_equals_one_batch(seed: int) -> None:
    rules = rules_for(1, 1 + seed % 3)
    stream = generate(seed, users=2, days=18)
    reference = run_reference(rules, stream)
    one = run_engine(rules, stream, [stream.events], runs_share_max=1.0)
    each = run_engine(rules, stream, [[event] for event in stream.events])
    for awards, flags, _ in (one, each):
        assert award_set(awards) == award_set(reference.awards.values())
        assert flag_set(flags) == flag_set(reference.flags)
    assert reference.flags, "the stream should raise some flag"


def test_generated_streams_exercise_every_rule_and_flag() -> None:
    rules = rules_for(1, 2)
    wanted_rules = {
        "steps.tier1", "steps.tier2", "steps.tier3", "streak.5of7", "streak.7of7",
        "activity.checkin", "activity.meal", "activity.brain_training", "activity.class",
        "activity.volunteer", "campaign.walk-x2", "campaign.v1-visits", "campaign.all-checkins"}
    rules_seen, flags_seen = set(), set()
    for seed in range(60):
        reference = run_reference(rules, generate(seed, users=3, days=60))
        rules_seen |= {a.rule for a in reference.awards.values()}
        flags_seen |= {(f.flag.value, f.state.value) for f in reference.flags}
        if wanted_rules <= rules_seen and len(flags_seen) == 14:
            break
    assert wanted_rules <= rules_seen
    assert len(flags_seen) == 14, sorted(flags_seen)


@pytest.mark.parametrize("seed", range(8))
def test_flag_rows_evaluated_in_small_chunks_give_the_same_events(
        seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("engine.rules.engine.FLAG_ROWS_PER_CHUNK", 1 + seed % 2)
    check(rules_for(1, 1 + seed % 3), seed, 4, 40, 0.1, seed, 6, "default")
