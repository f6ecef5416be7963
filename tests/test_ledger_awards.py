"""Columnar award appends (Ledger.append_awards) against the row-by-row path they replace.

The same award batches go into one ledger as columns and into another as
EntryDraft lists, with the same person keys and commit clock: every table
(journal, links, keys, balances, flags, meta, commits) must be byte for byte
the same, and so must results, errors, content digests and expiry lots.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.entries import Awards, EntryDraft
from engine.ids import derive_id
from engine.ledger import Ledger, store
from engine.ledger.errors import EntryExistsWithDifferent, InvalidEntry
from engine.ledger.journal import _all_ids
from engine.schemas import EntryKind, FlagEvent, is_id

TABLES = ("journal", "entry_links", "person_keys", "balances", "flag_journal", "flags", "meta",
          "commits")
DAYS = ["2024-04-29", "2024-04-30", "2024-05-01", "2024-05-05", "2025-01-01"]
RULES = ["steps.tier1", "steps.tier2", "streak.week", "activity.class", "campaign.autumn"]
# Refs a JSON encoder must escape or keep raw, and nulls.
REFS = [None, "week:2024-04-29", "V0001", "campaign@V\"17\\", "café ☕", "tab\there", ""]
USERS = [f"P{n:05d}" for n in range(40)] + ["user.with:colons-and_underscores"]


def awards_batch(rng: random.Random, count: int, ids: list[str],
                 reuse: float = 0.0) -> Awards:
    """Random awards; `reuse` of them re-send an earlier award (same id and content)."""
    user = np.array([rng.randrange(len(USERS)) for _ in range(count)], np.int64)
    day = np.array([rng.randrange(len(DAYS)) for _ in range(count)], np.int64)
    rule = np.array([rng.randrange(len(RULES)) for _ in range(count)], np.int64)
    ref = np.array([rng.randrange(len(REFS)) for _ in range(count)], np.int64)
    points = np.array([rng.choice([1, 2, 3, 50, 1_000_000]) for _ in range(count)], np.int64)
    ts_ms = np.array([rng.randrange(0, 2**53) for _ in range(count)], np.int64)
    entry_id = [derive_id("award", rng.random()) for _ in range(count)]
    ids.extend(entry_id)
    batch = Awards(entry_id, user, USERS, points, day, DAYS, ts_ms, rule, RULES, ref, REFS, "r1")
    return batch if not reuse else _with_repeats(rng, batch, reuse)


def _with_repeats(rng: random.Random, batch: Awards, share: float) -> Awards:
    picks = [i for i in range(len(batch)) if rng.random() < share]
    order = np.array(list(range(len(batch))) + picks, np.int64)
    return _take(batch, order)


def _take(batch: Awards, order: np.ndarray) -> Awards:
    return Awards([batch.entry_id[i] for i in order.tolist()], batch.user[order], batch.user_ids,
                  batch.points[order], batch.day[order], batch.days, batch.ts_ms[order],
                  batch.rule[order], batch.rules, batch.ref[order], batch.refs,
                  batch.rules_version)


def flag(user_id: str, day: str, state: str) -> FlagEvent:
    return FlagEvent(v=1, flag_id=derive_id("flag", user_id, day, state), user_id=user_id,
                     flag="low_activity", state=state, day=day,
                     evidence={"median_steps": 1200, "days": 14}, rules_version="r1")


Reset = Callable[[], None]


@pytest.fixture
def same_keys(monkeypatch: pytest.MonkeyPatch) -> Reset:
    """Both ledgers draw the same person keys (in user order; call reset before each) and
    read the same commit clock."""
    state = {"random": random.Random(0)}

    def urandom(size: int) -> bytes:
        return state["random"].randbytes(size)

    def reset() -> None:
        state["random"] = random.Random(0)

    monkeypatch.setattr(store.os, "urandom", urandom)
    monkeypatch.setattr(store, "_now_ms", lambda: 1_714_575_600_000)
    return reset


def dump(path: Path) -> dict[str, list[tuple]]:
    db = sqlite3.connect(path / "ledger.sqlite")
    try:
        return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                for table in TABLES}
    finally:
        db.close()


def both(tmp_path: Path, reset: Reset,
         batches: list[tuple[Awards, list[FlagEvent], dict[str, str]]],
         ) -> tuple[list[object], list[object], Ledger, Ledger]:
    """Append the batches as columns into one ledger and as drafts into another."""
    results: list[list[object]] = []
    ledgers = []
    for name, columns in (("columns", True), ("drafts", False)):
        reset()
        ledger = Ledger.open(tmp_path / name)
        ledgers.append(ledger)
        outcomes: list[object] = []
        for awards, flags, meta in batches:
            try:
                result = (ledger.append_awards(awards, flags=flags, meta=meta) if columns else
                          ledger.append(awards.drafts(), flags=flags, meta=meta))
                outcomes.append((result.appended, result.existing, result.seq_first,
                                 result.seq_last, result.chain_head, result.flags_appended,
                                 result.flags_existing, list(result.rows),
                                 list(result.existing_rows), result.entries))
            except (InvalidEntry, EntryExistsWithDifferent) as error:
                outcomes.append((type(error).__name__, str(error)))
        results.append(outcomes)
    return results[0], results[1], ledgers[0], ledgers[1]


@pytest.mark.parametrize("seed", range(6))
def test_award_columns_build_the_ledger_the_drafts_build(tmp_path: Path, same_keys: Reset,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         seed: int) -> None:
    chained: list[int] = []
    chain_awards = store.chain_awards

    def spy(awards: Awards, *args: object) -> object:
        chained.append(len(awards))
        return chain_awards(awards, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "chain_awards", spy)
    rng = random.Random(seed)
    ids: list[str] = []
    batches = []
    for number in range(5):
        awards = awards_batch(rng, rng.choice([1, 7, 300]), ids, reuse=0.1 * (number % 2))
        if number >= 2 and rng.random() < 0.7:  # re-send some stored awards with new ones
            stored = batches[rng.randrange(number)][0]
            order = np.array(rng.sample(range(len(stored)), k=min(3, len(stored))), np.int64)
            awards = _concat(_take(stored, order), awards)
        flags = [flag(USERS[rng.randrange(len(USERS))], DAYS[number], "raised")]
        batches.append((awards, flags, {"log_position": str(number)}))
    columns, drafts, first, second = both(tmp_path, same_keys, batches)
    assert chained, "some batches took the columnar path"
    with first, second:
        assert columns == drafts
        assert dump(tmp_path / "columns") == dump(tmp_path / "drafts")
        assert first.head() == second.head()
        assert first.verify().ok and second.verify().ok
        expired = [entry.to_dict() for entry in first.expire("2025-06-01", 3)]
        assert expired == [entry.to_dict() for entry in second.expire("2025-06-01", 3)]
        assert len(expired) > 0
        assert dump(tmp_path / "columns") == dump(tmp_path / "drafts")


def _concat(first: Awards, second: Awards) -> Awards:
    return Awards(first.entry_id + second.entry_id, np.concatenate([first.user, second.user]),
                  USERS, np.concatenate([first.points, second.points]),
                  np.concatenate([first.day, second.day]), DAYS,
                  np.concatenate([first.ts_ms, second.ts_ms]),
                  np.concatenate([first.rule, second.rule]), RULES,
                  np.concatenate([first.ref, second.ref]), REFS, "r1")


def test_a_stored_id_with_other_content_is_refused_and_nothing_is_written(
        tmp_path: Path, same_keys: Reset) -> None:
    rng = random.Random(7)
    ids: list[str] = []
    stored = awards_batch(rng, 20, ids)
    changed = _take(stored, np.array([4], np.int64))
    changed = Awards(changed.entry_id, changed.user, USERS, changed.points + 1, changed.day,
                     DAYS, changed.ts_ms, changed.rule, RULES, changed.ref, REFS, "r1")
    fresh = awards_batch(rng, 5, ids)
    batches = [(stored, [], {"log_position": "1"}),
               (_concat(fresh, changed), [], {"log_position": "2"})]
    columns, drafts, first, second = both(tmp_path, same_keys, batches)
    with first, second:
        assert columns == drafts
        assert columns[1][0] == "EntryExistsWithDifferent"
        assert first.get_meta("log_position") == "1"
        assert first.head_seq() == 20
        assert dump(tmp_path / "columns") == dump(tmp_path / "drafts")


@pytest.mark.parametrize(("column", "value"), [
    ("points", 0), ("points", -3), ("points", 1_000_001), ("ts_ms", -1), ("ts_ms", 2**53),
])
def test_out_of_range_values_are_refused_as_for_drafts(tmp_path: Path, same_keys: Reset,
                                                       column: str, value: int) -> None:
    awards = awards_batch(random.Random(3), 10, [])
    getattr(awards, column)[6] = value
    columns, drafts, first, second = both(tmp_path, same_keys, [(awards, [], {})])
    with first, second:
        assert columns == drafts
        assert columns[0][0] == "InvalidEntry" and awards.entry_id[6] in str(columns[0][1])
        assert first.head_seq() == 0


@pytest.mark.parametrize(("table", "value"), [
    ("user_ids", "P 1"), ("days", "2024-5-1"), ("rules", "x" * 5000), ("refs", "\ud800"),
])
def test_invalid_table_values_are_refused_as_for_drafts(tmp_path: Path, same_keys: Reset,
                                                        table: str, value: str) -> None:
    awards = awards_batch(random.Random(4), 30, [])
    values = list(getattr(awards, table))
    index = {"user_ids": awards.user, "days": awards.day, "rules": awards.rule,
             "refs": awards.ref}[table][11]
    values[int(index)] = value
    fields = {name: getattr(awards, name) for name in Awards.__slots__}
    broken = Awards(**{**fields, table: values})
    columns, drafts, first, second = both(tmp_path, same_keys, [(broken, [], {})])
    with first, second:
        assert columns == drafts
        assert columns[0][0] == "InvalidEntry"
        assert first.head_seq() == 0


def test_an_index_outside_its_table_is_refused(tmp_path: Path) -> None:
    awards = awards_batch(random.Random(5), 4, [])
    awards.user[2] = len(USERS)
    with Ledger.open(tmp_path) as ledger, pytest.raises(InvalidEntry, match="user index"):
        ledger.append_awards(awards)


def test_awards_drafts_are_the_rows_they_describe() -> None:
    awards = awards_batch(random.Random(6), 3, [])
    first = awards.drafts()[0]
    assert first == EntryDraft(awards.entry_id[0], USERS[int(awards.user[0])], EntryKind.award,
                               int(awards.points[0]), DAYS[int(awards.day[0])],
                               int(awards.ts_ms[0]), RULES[int(awards.rule[0])],
                               REFS[int(awards.ref[0])], "r1")
    assert awards.points_total == sum(d.points for d in awards.drafts())
    by_rule: dict[str, int] = {}
    for draft in awards.drafts():
        by_rule[str(draft.rule)] = by_rule.get(str(draft.rule), 0) + draft.points
    assert awards.points_by_rule() == by_rule


@pytest.mark.parametrize("entry_id", ["plain-é-\x7f-\u2028-😀", "quote\"d", "back\\slash",
                                      "tab\tid", "x" * 128])
def test_unusual_entry_ids_give_the_ledger_the_drafts_give(tmp_path: Path, same_keys: Reset,
                                                           entry_id: str) -> None:
    awards = awards_batch(random.Random(8), 5, [])
    awards.entry_id[3] = entry_id
    columns, drafts, first, second = both(tmp_path, same_keys, [(awards, [], {})])
    with first, second:
        assert columns == drafts
        assert first.entry(entry_id).entry_id == entry_id
        assert dump(tmp_path / "columns") == dump(tmp_path / "drafts")
        assert first.verify().ok


@given(st.lists(st.one_of(st.text(alphabet="Pab01_.:-\x1f \né", max_size=70),
                          st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True)),
                max_size=6))
def test_the_one_pass_id_check_agrees_with_is_id(values: list[str]) -> None:
    assert _all_ids(values) == all(is_id(value) for value in values)
