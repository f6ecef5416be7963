"""Ledger journal: idempotent appends, no overdraft, tamper evidence, projections."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import orjson
import pytest

from engine.entries import EntryDraft
from engine.errors import (
    ExistsWithDifferent,
    InsufficientPoints,
    LedgerError,
    NotFound,
    RefundExceeds,
)
from engine.ids import derive_id
from engine.ledger import GENESIS_HASH, Ledger, canonical_bytes, chain_hash, content_bytes, store
from engine.ledger.canonical import PersonKey, content_digest, entry_tag
from engine.ledger.errors import (
    EntryExistsWithDifferent,
    InvalidEntry,
    InvalidRequest,
    LedgerBusy,
    Overdraft,
)
from engine.ledger.journal import ChainChecker, chain, normalise
from engine.ledger.store import HISTORY_LIMIT_MAX, LEDGER_FILE_NAME
from engine.schemas import EntryKind, FlagEvent

TS_MS = 1_714_575_600_000  # 2024-05-02 00:00 Tokyo


def award(user_id: str, points: int, tag: object, day: str = "2024-05-01") -> EntryDraft:
    return EntryDraft(derive_id("award", user_id, tag), user_id, EntryKind.award, points, day,
                      TS_MS, "steps_tier", None, "r1")


def debit(user_id: str, points: int, tag: object) -> EntryDraft:
    """A redemption draft as the Kafka runtime would hand it to append()."""
    ref = orjson.dumps({"key": str(tag), "shop": "S1", "terminal": "T1"}).decode()
    return EntryDraft(derive_id("redeem", "S1", tag), user_id, EntryKind.redeem, -points,
                      "2024-05-02", TS_MS, "shop_redemption", ref, None)


def flag(flag_id: str, user_id: str, state: str, day: str, steps: int = 1200) -> FlagEvent:
    return FlagEvent(v=1, flag_id=flag_id, user_id=user_id, flag="low_activity", state=state,
                     day=day, evidence={"median_steps": steps, "days": 14}, rules_version="r1")


def person_key(ledger: Ledger, user_id: str) -> PersonKey:
    raw = sqlite3.connect(ledger.path)
    key = raw.execute("SELECT key FROM person_keys WHERE user_id = ?", (user_id,)).fetchone()[0]
    raw.close()
    return PersonKey(key)


@pytest.fixture
def ledger(data_dir: Path):
    with Ledger.open(data_dir) as opened:
        yield opened


def entry_count(ledger: Ledger) -> int:
    return ledger.head()["entries"]


def test_append_sequences_and_chains_entries(ledger: Ledger) -> None:
    result = ledger.append([award("P1", 3, 1), award("P2", 2, 2)])
    first, second = result.entries
    assert (result.appended, result.existing, result.seq_first, result.seq_last) == (2, 0, 1, 2)
    assert first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.hash
    assert result.chain_head == second.hash
    key = person_key(ledger, "P1")
    expected = chain_hash(GENESIS_HASH, canonical_bytes(
        1, key.subject, entry_tag(key, first.entry_id, "P1", None), "award", 3, "2024-05-01",
        TS_MS, "steps_tier", None, "r1"))
    assert first.hash == expected
    assert (ledger.balance("P1"), ledger.balance("P2"), ledger.balance("nobody")) == (3, 2, 0)


def test_re_append_of_identical_entries_is_a_no_op_returning_the_stored(ledger: Ledger) -> None:
    drafts = [award("P1", 3, 1), award("P1", 2, 2)]
    first = ledger.append(drafts)
    again = ledger.append(drafts + [award("P1", 1, 3)])
    assert (again.appended, again.existing) == (1, 2)
    assert again.existing_entries == first.entries
    assert again.seq_first == 3
    assert ledger.balance("P1") == 6
    assert entry_count(ledger) == 3


def test_duplicate_within_one_batch_counts_once(ledger: Ledger) -> None:
    result = ledger.append([award("P1", 3, 1), award("P1", 3, 1)])
    assert (result.appended, result.existing) == (1, 1)
    assert ledger.balance("P1") == 3


def test_same_id_with_different_content_names_the_field(ledger: Ledger) -> None:
    ledger.append([award("P1", 3, 1)])
    with pytest.raises(ExistsWithDifferent, match="different points: stored 3, sent 5") as info:
        ledger.append([award("P2", 1, 9), award("P1", 5, 1)])
    assert isinstance(info.value, EntryExistsWithDifferent)
    assert info.value.field == "points"
    assert ledger.balance("P2") == 0  # the whole batch was refused
    with pytest.raises(ExistsWithDifferent, match="different day"):
        ledger.append([award("P1", 3, 1, day="2024-05-02")])


def test_same_id_twice_in_a_batch_with_different_content_is_refused(ledger: Ledger) -> None:
    with pytest.raises(ExistsWithDifferent, match="points"):
        ledger.append([award("P1", 3, 1), award("P1", 4, 1)])
    assert entry_count(ledger) == 0


def test_overdraft_refuses_the_whole_batch_and_writes_nothing(ledger: Ledger) -> None:
    ledger.append([award("P1", 10, 1)])
    head_before = ledger.head()
    with pytest.raises(InsufficientPoints,
                       match="insufficient points: balance 10, requested 11 for user P1"):
        ledger.append([award("P2", 5, 2), debit("P1", 11, "k1")],
                      meta={"log_position": "99"})
    assert ledger.head() == head_before
    assert (ledger.balance("P1"), ledger.balance("P2")) == (10, 0)
    assert ledger.get_meta("log_position") is None


def test_running_balance_within_a_batch_may_not_dip_below_zero(ledger: Ledger) -> None:
    with pytest.raises(Overdraft) as info:
        ledger.append([debit("P1", 5, "k1"), award("P1", 10, 1)])
    assert (info.value.balance, info.value.requested) == (0, 5)
    result = ledger.append([award("P1", 10, 1), debit("P1", 5, "k1")])
    assert result.appended == 2
    assert ledger.balance("P1") == 5


def test_invalid_drafts_are_refused_naming_the_problem(ledger: Ledger) -> None:
    cases = [
        (EntryDraft("e1", "P1", EntryKind.award, -3, None, TS_MS, None, None, None), "points -3"),
        (EntryDraft("e1", "P1", EntryKind.adjust, 0, None, TS_MS, None, None, None), "points 0"),
        (EntryDraft("e1", "P 1", EntryKind.award, 3, None, TS_MS, None, None, None), "user_id"),
        (EntryDraft("e1", "P1", "gift", 3, None, TS_MS, None, None, None), "kind 'gift'"),
        (EntryDraft("e1", "P1", EntryKind.award, 3, "1.5.2024", TS_MS, None, None, None), "day"),
        (EntryDraft("e1", "P1", EntryKind.redeem, -3, None, TS_MS, None, None, None), "shop"),
        (EntryDraft("e1", "P1", EntryKind.award, 2.5, None, TS_MS, None, None, None), "integer"),
    ]
    for draft, message in cases:
        with pytest.raises(InvalidEntry, match=message):
            ledger.append([draft])
    assert entry_count(ledger) == 0


def test_journal_refuses_update_and_delete(ledger: Ledger) -> None:
    ledger.append([award("P1", 3, 1), award("P2", 1, 2)],
                  flags=[flag("f1", "P1", "raised", "2024-05-01")])
    ledger.erase_user("P2", "test")
    raw = sqlite3.connect(ledger.path)
    for table in ("journal", "flag_journal", "erasures", "commits", "entry_links", "flags"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only: UPDATE refused"):
            raw.execute(f"UPDATE {table} SET seq = 300 WHERE seq = 1")
    for table in ("journal", "flag_journal", "erasures", "commits"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only: DELETE refused"):
            raw.execute(f"DELETE FROM {table}")
    with pytest.raises(sqlite3.DatabaseError, match="DELETE refused outside an erasure"):
        raw.execute("DELETE FROM entry_links")
    raw.close()
    assert ledger.verify().ok


def test_ledger_file_uses_wal_and_full_sync(ledger: Ledger) -> None:
    assert ledger.path.name == LEDGER_FILE_NAME
    raw = sqlite3.connect(ledger.path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
    assert ledger._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def tamper(path: Path, sql: str, trigger_name: str = "journal_no_update") -> None:
    """Edit the journal behind the triggers' back, as an attacker with file access could."""
    raw = sqlite3.connect(path)
    trigger = raw.execute("SELECT sql FROM sqlite_master WHERE name = ?", (trigger_name,)
                          ).fetchone()[0]
    raw.execute(f"DROP TRIGGER {trigger_name}")
    raw.execute(sql)
    raw.execute(trigger)
    raw.commit()
    raw.close()


@pytest.mark.parametrize(("edit", "trigger", "problem"), [
    ("UPDATE entry_links SET user_id = 'P00018' WHERE seq = 3", "entry_links_no_update",
     "does not match its hashed entry"),  # one byte: 7 → 8
    ("UPDATE entry_links SET entry_id = 'x' || substr(entry_id, 2) WHERE seq = 3",
     "entry_links_no_update", "does not match its hashed entry"),
    ("UPDATE journal SET points = 4 WHERE seq = 3", "journal_no_update",
     "hash mismatch"),  # one byte: 5 → 4
])
def test_verify_catches_one_edited_byte_and_names_the_seq(ledger: Ledger, edit: str,
                                                          trigger: str, problem: str) -> None:
    ledger.append([award("P00017", 5 if n == 3 else 1, n) for n in range(1, 6)])
    ledger.append([award("P00018", 1, 1)])
    assert ledger.verify().ok
    tamper(ledger.path, edit, trigger)
    result = ledger.verify()
    assert not result.ok
    assert result.first_bad_seq == 3
    assert problem in result.problem


def test_verify_catches_a_lost_tail(ledger: Ledger) -> None:
    ledger.append([award("P1", 1, n) for n in range(5)])
    raw = sqlite3.connect(ledger.path)
    raw.execute("DROP TRIGGER journal_no_delete")
    raw.execute("DELETE FROM journal WHERE seq = 5")
    raw.commit()
    raw.close()
    result = ledger.verify()
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert "removed or added outside the ledger" in result.problem


def test_verify_catches_an_edited_balance_and_rebuild_repairs_it(ledger: Ledger) -> None:
    ledger.append([award("P1", 3, 1), award("P2", 4, 2)])
    raw = sqlite3.connect(ledger.path)
    raw.execute("UPDATE balances SET points = 300 WHERE user_id = 'P1'")
    raw.commit()
    raw.close()
    result = ledger.verify()
    assert not result.ok and result.first_bad_seq is None
    assert "balance of user P1" in result.problem
    rebuilt = ledger.rebuild()
    assert [(d.user_id, d.live, d.rebuilt) for d in rebuilt.differences] == [("P1", 300, 3)]
    assert ledger.balance("P1") == 3
    assert ledger.verify().ok


def test_rebuild_equals_live_balances(ledger: Ledger) -> None:
    ledger.append([award(f"P{n % 7}", 1 + n % 3, n) for n in range(200)])
    ledger.append([debit("P1", 5, "k1"), debit("P2", 3, "k2")])
    live = {f"P{n}": ledger.balance(f"P{n}") for n in range(7)}
    result = ledger.rebuild()
    assert result.matched
    assert result.users == 7
    assert result.points_outstanding == sum(live.values())
    assert {f"P{n}": ledger.balance(f"P{n}") for n in range(7)} == live


def test_content_digest_is_independent_of_append_order(tmp_path: Path) -> None:
    drafts = [award(f"P{n % 5}", 1 + n % 4, n) for n in range(60)] + [debit("P1", 2, "k")]
    orders = [drafts, drafts[::-1][1:] + [drafts[-1]]]  # the debit stays after its awards
    heads = []
    for number, order in enumerate(orders):
        with Ledger.open(tmp_path / f"ledger{number}") as ledger:
            for start in range(0, len(order), 17):
                ledger.append(order[start:start + 17])
            heads.append(ledger.head())
    assert heads[0]["content_digest"] == heads[1]["content_digest"]
    assert heads[0]["chain_head"] != heads[1]["chain_head"]
    assert heads[0]["entries"] == heads[1]["entries"] == 61
    assert heads[0]["points_outstanding"] == heads[1]["points_outstanding"]


def test_content_digest_is_documented_formula(ledger: Ledger) -> None:
    drafts = [award("P1", 2, "b"), award("P2", 3, "a")]
    ledger.append(drafts)
    contents = sorted((d.entry_id, content_bytes(d.entry_id, d.user_id, d.kind.value, d.points,
                                                 d.day, d.ts_ms, d.rule, d.ref, d.rules_version))
                      for d in drafts)
    assert ledger.head()["content_digest"] == content_digest(c for _, c in contents)
    assert ledger.head()["content_digest"] == hashlib.sha256(
        b"".join(c + b"\n" for _, c in contents)).hexdigest()


def test_empty_ledger_head(ledger: Ledger) -> None:
    assert ledger.head() == {"entries": 0, "points_outstanding": 0, "chain_head": GENESIS_HASH,
                             "content_digest": hashlib.sha256(b"").hexdigest(),
                             "canonical_version": 2, "erased_entries": 0, "flag_events": 0,
                             "flags_head": GENESIS_HASH, "erasures": 0, "commit_seq": 0,
                             "commit_hash": GENESIS_HASH, "signed_by": None}
    assert ledger.verify().ok


def test_meta_commits_with_the_entries(ledger: Ledger) -> None:
    ledger.append([award("P1", 1, 1)], meta={"log_position": "10"})
    ledger.append([], meta={"log_position": "11"})
    assert ledger.get_meta("log_position") == "11"
    assert ledger.get_meta("other") is None


def test_history_pages_newest_first(ledger: Ledger) -> None:
    ledger.append([award("P1", 1, n) for n in range(5)] + [award("P2", 1, 99)])
    page, cursor = ledger.history("P1", None, 2)
    assert [e.seq for e in page] == [5, 4] and cursor == 4
    page, cursor = ledger.history("P1", cursor, 2)
    assert [e.seq for e in page] == [3, 2] and cursor == 2
    page, cursor = ledger.history("P1", cursor, 2)
    assert [e.seq for e in page] == [1] and cursor is None
    with pytest.raises(InvalidRequest, match=f"1..{HISTORY_LIMIT_MAX}"):
        ledger.history("P1", None, HISTORY_LIMIT_MAX + 1)


def test_entry_lookup(ledger: Ledger) -> None:
    stored = ledger.append([award("P1", 1, 1)]).entries[0]
    assert ledger.entry(stored.entry_id) == stored
    assert stored.to_wire().hash == stored.hash
    with pytest.raises(NotFound):
        ledger.entry("missing")


def test_flags_are_idempotent_and_current_flags_shows_latest_raised(ledger: Ledger) -> None:
    events = [flag("f1", "P1", "raised", "2024-05-01"), flag("f2", "P2", "raised", "2024-05-01"),
              flag("f3", "P1", "cleared", "2024-05-10")]
    first = ledger.append([], flags=events)
    again = ledger.append([], flags=events)
    assert (first.flags_appended, again.flags_appended, again.flags_existing) == (3, 0, 3)
    assert [(f.user_id, f.state) for f in ledger.current_flags()] == [("P2", "raised")]
    assert [f.user_id for f in ledger.current_flags("2024-05-05")] == ["P1", "P2"]
    assert ledger.current_flags("2024-05-05")[0].evidence == {"median_steps": 1200, "days": 14}
    assert [f.flag_id for f in ledger.flag_history("P1")] == ["f1", "f3"]
    with pytest.raises(ExistsWithDifferent, match="flag f1 already exists with different evidence"):
        ledger.append([], flags=[flag("f1", "P1", "raised", "2024-05-01", steps=1300)])


def refund_draft_of(redemption: EntryDraft, points: int, tag: object,
                    shop: str = "S1") -> EntryDraft:
    ref = orjson.dumps({"key": str(tag), "refund_of": redemption.entry_id, "shop": shop}).decode()
    return EntryDraft(derive_id("refund", shop, tag), redemption.user_id, EntryKind.refund,
                      points, "2024-05-02", TS_MS, "shop_refund", ref, None)


def test_appended_refund_drafts_are_bounded_by_their_redemption(ledger: Ledger) -> None:
    redemption = debit("P1", 10, "k1")
    ledger.append([award("P1", 50, 1), redemption, refund_draft_of(redemption, 4, "r1")])
    with pytest.raises(RefundExceeds, match="exceeds the 6 left to refund"):
        ledger.append([refund_draft_of(redemption, 7, "r2")])
    with pytest.raises(InvalidEntry, match="at shop S2"):
        ledger.append([refund_draft_of(redemption, 1, "r3", shop="S2")])
    with pytest.raises(InvalidEntry, match="names no earlier redemption"):
        ledger.append([refund_draft_of(debit("P1", 5, "never"), 1, "r4")])
    ledger.append([refund_draft_of(redemption, 6, "r2")])
    assert ledger.balance("P1") == 50


def test_chain_checker_refuses_an_over_refund_that_bypassed_append() -> None:
    redemption = debit("P1", 10, "k1")
    contents = normalise([award("P1", 50, 1), redemption, refund_draft_of(redemption, 11, "r")])
    keys = {"P1": PersonKey(bytes(32))}
    rows, journal = chain(contents, 0, GENESIS_HASH, keys)
    checker = ChainChecker(keys)
    problem = checker.feed([(*j, r[1], r[2], None if r[3] in ("redeem", "refund") else r[8])
                            for r, j in zip(rows, journal, strict=True)])
    assert problem is not None and problem.seq == 3
    assert "exceeds the 10 left" in problem.problem


def test_a_file_that_is_not_a_ledger_is_refused_clearly(data_dir: Path) -> None:
    (data_dir / LEDGER_FILE_NAME).write_bytes(b"not a database" * 100)
    with pytest.raises(LedgerError, match="cannot open as a genki ledger"):
        Ledger.open(data_dir)


def test_a_writer_that_cannot_get_the_lock_gets_a_busy_error(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "LOCK_WAIT_S_MAX", 0.05)
    with Ledger.open(data_dir) as ledger:
        other = sqlite3.connect(ledger.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(LedgerBusy, match="write lock"):
            ledger.append([award("P1", 1, 1)])
        other.execute("ROLLBACK")
        other.close()
        assert ledger.append([award("P1", 1, 1)]).appended == 1
