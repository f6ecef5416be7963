"""Erasure by crypto-shredding: the person's link goes, the chain and settlement stay."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import NotFound
from engine.faults import CRASH_ENV
from engine.ledger import Ledger
from engine.ledger.errors import InvalidRequest
from tests.conftest import REPO_ROOT
from tests.test_ledger import TS_MS, award, flag

SETTLEMENT_MONTH = "2024-05"


def populate(ledger: Ledger) -> dict[str, str]:
    """Two people with awards, flags, redemptions and a refund at two shops."""
    ledger.append([award("P00017", 50, 1), award("P00017", 7, 2, day="2024-05-02"),
                   award("P00018", 40, 3)],
                  flags=[flag("f17", "P00017", "raised", "2024-05-01"),
                         flag("f18", "P00018", "raised", "2024-05-01")],
                  meta={"log_position": "3"})
    r17 = ledger.redeem("P00017", 20, "S1", "T1", "k17", TS_MS + 1)
    ledger.redeem("P00017", 5, "S2", "T9", "k17b", TS_MS + 2)
    ledger.redeem("P00018", 10, "S1", "T2", "k18", TS_MS + 3)
    ledger.refund(r17.entry_id, 4, "rf17", TS_MS + 4, shop_id="S1")
    return {"redemption": r17.entry_id}


@pytest.fixture
def ledger(data_dir: Path):
    with Ledger.open(data_dir) as opened:
        yield opened


def test_erasure_keeps_verify_passing_and_settlement_totals(ledger: Ledger) -> None:
    populate(ledger)
    before = [ledger.settlement(shop, SETTLEMENT_MONTH) for shop in ("S1", "S2")]
    head_before = ledger.head()
    receipt = ledger.erase_user("P00017", "request by the person (APPI art. 35)")
    assert receipt.erased
    assert (receipt.entries_unlinked, receipt.flags_unlinked, receipt.points_forfeited) == (
        5, 1, 36)
    assert receipt.erasure_seq == 1
    verified = ledger.verify()
    assert verified.ok, verified.problem
    assert (verified.entries_checked, verified.erased_entries, verified.erasures_checked) == (
        7, 5, 1)
    assert [ledger.settlement(shop, SETTLEMENT_MONTH) for shop in ("S1", "S2")] == before
    assert before[0].net_points == 20 + 10 - 4
    head = ledger.head()
    assert head["entries"] == head_before["entries"] == 7
    assert head["erased_entries"] == 5
    assert head["points_outstanding"] == head_before["points_outstanding"] - 36 == 30


def test_erased_person_is_not_found_anywhere(ledger: Ledger) -> None:
    ids = populate(ledger)
    ledger.erase_user("P00017", "left the programme")
    assert not ledger.has_user("P00017") and ledger.has_user("P00018")
    assert ledger.balance("P00017") == 0
    assert ledger.history("P00017") == ([], None)
    assert ledger.flag_history("P00017") == []
    assert [f.user_id for f in ledger.current_flags()] == ["P00018"]
    with pytest.raises(NotFound):
        ledger.entry(ids["redemption"])
    assert ledger.balance("P00018") == 30


def test_no_trace_of_the_user_id_is_left_in_the_file(ledger: Ledger) -> None:
    populate(ledger)
    ledger.erase_user("P00017", "erasure request")
    raw = sqlite3.connect(ledger.path)
    tables = [row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        for row in raw.execute(f"SELECT * FROM {table}"):
            assert "P00017" not in repr(row), table
    raw.close()
    files = [ledger.path, ledger.path.with_name(ledger.path.name + "-wal")]
    assert all(b"P00017" not in path.read_bytes() for path in files if path.exists())


def test_erasure_log_keeps_subject_reason_and_counts_only(ledger: Ledger) -> None:
    populate(ledger)
    receipt = ledger.erase_user("P00017", "  request  ", ts_ms=TS_MS + 99)
    assert ledger.erasures() == [{"seq": 1, "subject": receipt.subject, "reason": "request",
                                  "ts_ms": TS_MS + 99, "entries": 5, "flags": 1,
                                  "hash": receipt.erasure_hash}]


def test_erasure_is_idempotent(ledger: Ledger) -> None:
    populate(ledger)
    first = ledger.erase_user("P00017", "request")
    head = ledger.head()
    again = ledger.erase_user("P00017", "request")
    assert first.erased and not again.erased
    assert (again.subject, again.entries_unlinked, again.erasure_seq) == (None, 0, None)
    assert ledger.head() == head
    assert not ledger.erase_user("never-seen", "request").erased
    assert ledger.verify().ok


def test_erasure_needs_a_reason(ledger: Ledger) -> None:
    populate(ledger)
    with pytest.raises(InvalidRequest, match="reason"):
        ledger.erase_user("P00017", " ")
    assert ledger.has_user("P00017")


def test_content_digest_agrees_across_data_dirs_after_the_same_erasure(tmp_path: Path) -> None:
    digests = []
    for name in ("a", "b"):
        with Ledger.open(tmp_path / name) as ledger:
            populate(ledger)
            before = ledger.head()
            ledger.erase_user("P00017", f"request {name}")
            after = ledger.head()
            digests.append((before["content_digest"], after["content_digest"],
                            after["chain_head"]))
    assert digests[0][0] == digests[1][0] != digests[0][1]
    assert digests[0][1] == digests[1][1]
    assert digests[0][2] != digests[1][2]  # random person keys: the chains differ


def test_a_new_entry_for_an_erased_user_id_starts_a_new_subject(ledger: Ledger) -> None:
    populate(ledger)
    old = ledger.erase_user("P00017", "request")
    ledger.append([award("P00017", 3, "after")])
    assert ledger.balance("P00017") == 3
    assert ledger.verify().ok
    assert ledger.erase_user("P00017", "again").subject != old.subject


def test_unlinking_without_an_erasure_record_is_caught(ledger: Ledger) -> None:
    populate(ledger)
    raw = sqlite3.connect(ledger.path)
    raw.execute("INSERT INTO erasing (user_id) VALUES ('P00018')")
    raw.execute("DELETE FROM entry_links WHERE user_id = 'P00018'")
    raw.execute("DELETE FROM erasing")
    raw.commit()
    raw.close()
    result = ledger.verify()
    assert (result.ok, result.first_bad_seq) == (False, 3)
    assert "lost its link" in result.problem


def test_rebuild_after_erasure_leaves_the_erased_out(ledger: Ledger) -> None:
    populate(ledger)
    ledger.erase_user("P00017", "request")
    result = ledger.rebuild()
    assert result.matched and result.users == 1 and result.points_outstanding == 30


def erase_in_a_process(data_dir: Path, crash_spec: str) -> int:
    code = ("from pathlib import Path; from engine.ledger import Ledger\n"
            f"with Ledger.open(Path({str(data_dir)!r})) as ledger:\n"
            "    ledger.erase_user('P00017', 'request')\n")
    child = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, timeout=60,
                           env={**os.environ, CRASH_ENV: crash_spec}, check=False)
    return child.returncode


def test_a_kill_inside_the_erasure_leaves_the_person_whole(data_dir: Path) -> None:
    with Ledger.open(data_dir) as ledger:
        populate(ledger)
        before = ledger.head()
    assert erase_in_a_process(data_dir, "ledger_before_commit:1") == -signal.SIGKILL
    with Ledger.open(data_dir) as ledger:
        assert ledger.head() == before and ledger.balance("P00017") == 36
        assert ledger.verify().ok


def test_a_kill_after_the_erasure_commit_is_finished_by_running_it_again(
        data_dir: Path) -> None:
    with Ledger.open(data_dir) as ledger:
        populate(ledger)
    assert erase_in_a_process(data_dir, "ledger_erase_before_checkpoint:1") == -signal.SIGKILL
    with Ledger.open(data_dir) as ledger:
        assert not ledger.has_user("P00017") and ledger.verify().ok
        assert not ledger.erase_user("P00017", "request").erased
        assert [e["seq"] for e in ledger.erasures()] == [1]
    assert b"P00017" not in (data_dir / "ledger.sqlite").read_bytes()
