"""Shop redemptions, refunds, staff adjustments, expiry and settlement."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.entries import EntryDraft
from engine.errors import (
    ExistsWithDifferent,
    GenkiError,
    InsufficientPoints,
    NotFound,
    RefundExceeds,
    UsageError,
)
from engine.ledger import Ledger, store
from engine.ledger.commands import RedeemRequest, ref_fields
from engine.ledger.errors import NotARedemption, RefundWrongShop
from engine.ledger.lots import add_months
from tests.test_ledger import TS_MS, award

DAY_MS = 86_400_000


@pytest.fixture
def ledger(data_dir: Path):
    with Ledger.open(data_dir) as opened:
        opened.append([award("P1", 100, "seed")])
        yield opened


def test_redeem_takes_points_and_records_shop_terminal_and_key(ledger: Ledger) -> None:
    entry = ledger.redeem("P1", 30, "SHOP1", "T7", "key-1", TS_MS)
    assert (entry.kind, entry.points, entry.user_id) == ("redeem", -30, "P1")
    assert ref_fields(entry.ref) == {"shop": "SHOP1", "terminal": "T7", "key": "key-1"}
    assert ledger.balance("P1") == 70


def test_redeem_retry_with_same_key_returns_the_original(ledger: Ledger) -> None:
    first = ledger.redeem("P1", 30, "SHOP1", "T7", "key-1", TS_MS)
    retry = ledger.redeem("P1", 30, "SHOP1", "T7", "key-1", TS_MS + 5_000)
    assert retry == first
    assert ledger.balance("P1") == 70


def test_redeem_same_key_different_request_is_refused_naming_the_field(ledger: Ledger) -> None:
    ledger.append([award("P2", 100, "seed")])
    ledger.redeem("P1", 30, "SHOP1", "T7", "key-1", TS_MS)
    with pytest.raises(ExistsWithDifferent,
                       match="key-1 already exists with different points: stored 30, sent 31"):
        ledger.redeem("P1", 31, "SHOP1", "T7", "key-1", TS_MS)
    with pytest.raises(ExistsWithDifferent, match="different user_id"):
        ledger.redeem("P2", 30, "SHOP1", "T7", "key-1", TS_MS)
    assert (ledger.balance("P1"), ledger.balance("P2")) == (70, 100)
    other_shop = ledger.redeem("P1", 31, "SHOP2", "T1", "key-1", TS_MS)  # keys are per shop
    assert other_shop.points == -31


def test_redeem_above_balance_writes_nothing(ledger: Ledger) -> None:
    before = ledger.head()
    with pytest.raises(InsufficientPoints,
                       match="^insufficient points: balance 100, requested 101 for user P1$"):
        ledger.redeem("P1", 101, "SHOP1", "T7", "key-1", TS_MS)
    assert ledger.head() == before


@pytest.mark.parametrize("points", [0, -5])
def test_redeem_needs_positive_points(ledger: Ledger, points: int) -> None:
    with pytest.raises(UsageError, match="points"):
        ledger.redeem("P1", points, "SHOP1", "T7", "key-1", TS_MS)


def test_partial_refunds_are_summed_and_over_refund_refused(ledger: Ledger) -> None:
    redemption = ledger.redeem("P1", 50, "SHOP1", "T7", "key-1", TS_MS)
    ledger.refund(redemption.entry_id, 20, "refund-1", TS_MS + 1)
    ledger.refund(redemption.entry_id, 25, "refund-2", TS_MS + 2)
    with pytest.raises(RefundExceeds, match="it took 50, 45 already refunded, at most 5"):
        ledger.refund(redemption.entry_id, 6, "refund-3", TS_MS + 3)
    last = ledger.refund(redemption.entry_id, 5, "refund-3", TS_MS + 3)
    assert ref_fields(last.ref)["refund_of"] == redemption.entry_id
    assert ledger.balance("P1") == 100
    with pytest.raises(RefundExceeds):
        ledger.refund(redemption.entry_id, 1, "refund-4", TS_MS + 4)


def test_refund_retry_returns_the_original_and_conflicts_are_named(ledger: Ledger) -> None:
    redemption = ledger.redeem("P1", 50, "SHOP1", "T7", "key-1", TS_MS)
    first = ledger.refund(redemption.entry_id, 20, "refund-1", TS_MS + 1)
    assert ledger.refund(redemption.entry_id, 20, "refund-1", TS_MS + 9) == first
    with pytest.raises(ExistsWithDifferent, match="different points"):
        ledger.refund(redemption.entry_id, 21, "refund-1", TS_MS + 1)
    assert ledger.balance("P1") == 70


def test_refund_by_another_shop_is_refused(ledger: Ledger) -> None:
    redemption = ledger.redeem("P1", 50, "SHOP1", "T7", "key-1", TS_MS)
    with pytest.raises(RefundWrongShop, match="made at shop SHOP1; shop SHOP2 cannot refund"):
        ledger.refund(redemption.entry_id, 10, "refund-1", TS_MS, shop_id="SHOP2")
    assert RefundWrongShop.http_status == 403
    ledger.refund(redemption.entry_id, 10, "refund-1", TS_MS, shop_id="SHOP1")
    assert ledger.balance("P1") == 60


def test_refund_of_unknown_or_non_redemption_entry_is_refused(ledger: Ledger) -> None:
    with pytest.raises(NotFound):
        ledger.refund("no-such-entry", 1, "r", TS_MS)
    award_entry = ledger.history("P1", None, 1)[0][0]
    with pytest.raises(NotARedemption):
        ledger.refund(award_entry.entry_id, 1, "r", TS_MS)


def test_adjust_needs_a_reason_and_never_overdraws(ledger: Ledger) -> None:
    with pytest.raises(UsageError, match="non-empty reason"):
        ledger.adjust("P1", 5, "  ", "STAFF1", "adj-1", TS_MS)
    with pytest.raises(InsufficientPoints, match="balance 100, requested 101"):
        ledger.adjust("P1", -101, "correction", "STAFF1", "adj-1", TS_MS)
    entry = ledger.adjust("P1", -40, "duplicate award", "STAFF1", "adj-1", TS_MS)
    assert ref_fields(entry.ref) == {"staff": "STAFF1", "reason": "duplicate award",
                                     "key": "adj-1"}
    assert ledger.adjust("P1", -40, "duplicate award", "STAFF1", "adj-1", TS_MS) == entry
    with pytest.raises(ExistsWithDifferent, match="different reason"):
        ledger.adjust("P1", -40, "other", "STAFF1", "adj-1", TS_MS)
    assert ledger.balance("P1") == 60


def test_settlement_by_shop_and_tokyo_month(ledger: Ledger) -> None:
    april_last_ms = TS_MS - DAY_MS - 1  # 2024-04-30 23:59:59.999 Tokyo
    march = ledger.redeem("P1", 10, "SHOP1", "T1", "a", april_last_ms)
    ledger.redeem("P1", 20, "SHOP1", "T1", "b", TS_MS)
    ledger.redeem("P1", 7, "SHOP2", "T1", "c", TS_MS)
    ledger.refund(march.entry_id, 4, "r", TS_MS + 1)  # refunded in May
    may = ledger.settlement("SHOP1", "2024-05")
    assert (may.redeemed_points, may.refunded_points, may.net_points, may.redemptions) == (
        20, 4, 16, 1)
    april = ledger.settlement("SHOP1", "2024-04")
    assert (april.redeemed_points, april.refunded_points, april.redemptions) == (10, 0, 1)
    with pytest.raises(UsageError, match="YYYY-MM"):
        ledger.settlement("SHOP1", "2024-5")


def test_add_months_clamps_to_month_end() -> None:
    assert add_months("2024-01-31", 1) == "2024-02-29"
    assert add_months("2023-11-15", 6) == "2024-05-15"
    assert add_months("2024-12-01", 12) == "2025-12-01"


def test_expiry_is_fifo_oldest_lots_first(data_dir: Path) -> None:
    with Ledger.open(data_dir) as ledger:
        ledger.append([award("P1", 10, "jan", day="2024-01-10"),
                       award("P1", 20, "feb", day="2024-02-10"),
                       award("P1", 40, "apr", day="2024-04-10")])
        ledger.redeem("P1", 15, "SHOP1", "T1", "k", TS_MS)  # takes all of jan, 5 of feb
        expired = ledger.expire("2024-08-10", 6)
        assert [(e.points, e.day, ref_fields(e.ref)["lot_day"]) for e in expired] == [
            (-15, "2024-08-10", "2024-02-10")]
        assert ledger.balance("P1") == 40
        assert ledger.expire("2024-08-10", 6) == []
        assert ledger.expire("2024-09-01", 6) == []
        later = ledger.expire("2024-10-10", 6)
        assert [(e.points, ref_fields(e.ref)["lot_day"]) for e in later] == [(-40, "2024-04-10")]
        assert ledger.balance("P1") == 0
        assert ledger.verify().ok


def test_late_award_for_an_old_day_is_spent_and_expired_first(data_dir: Path) -> None:
    with Ledger.open(data_dir) as ledger:
        ledger.append([award("P1", 10, "mar", day="2024-03-01")])
        ledger.append([award("P1", 5, "late-jan", day="2024-01-05")])
        ledger.redeem("P1", 3, "SHOP1", "T1", "k", TS_MS)
        expired = ledger.expire("2024-07-05", 6)
        assert [(e.points, ref_fields(e.ref)["lot_day"]) for e in expired] == [(-2, "2024-01-05")]


def test_expiry_ids_derive_from_user_and_lot_so_reruns_add_nothing(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "EXPIRY_USERS_PER_TRANSACTION", 2)
    with Ledger.open(data_dir) as ledger:
        ledger.append([award(f"P{n}", 5, n, day="2024-01-01") for n in range(5)])
        first = ledger.expire("2025-01-01", 3)
        assert sorted(e.user_id for e in first) == ["P0", "P1", "P2", "P3", "P4"]
        assert ledger.expire("2025-06-01", 3) == []
        assert ledger.expire("2025-06-01", 1) == []
        redo = ledger.append([EntryDraft(e.entry_id, e.user_id, e.kind, e.points, e.day,
                                         e.ts_ms, e.rule, e.ref, e.rules_version)
                              for e in first])
        assert (redo.appended, redo.existing) == (0, 5)
        assert ledger.head()["points_outstanding"] == 0


def test_refund_opens_a_new_lot_on_the_refund_day(data_dir: Path) -> None:
    with Ledger.open(data_dir) as ledger:
        ledger.append([award("P1", 10, "jan", day="2024-01-10")])
        redemption = ledger.redeem("P1", 10, "SHOP1", "T1", "k", TS_MS)  # 2024-05-02
        ledger.refund(redemption.entry_id, 4, "r", TS_MS)
        assert ledger.expire("2024-07-10", 6) == []
        assert [e.points for e in ledger.expire("2024-11-02", 6)] == [-4]


def test_expire_arguments_are_checked(ledger: Ledger) -> None:
    with pytest.raises(UsageError, match="months"):
        ledger.expire("2024-01-01", 0)
    with pytest.raises(UsageError, match="as_of"):
        ledger.expire("2024-13-01", 6)


_REDEEM_REQUESTS = st.builds(
    RedeemRequest,
    user_id=st.sampled_from(["P1", "P2", "P3"]),
    points=st.integers(1, 12),
    shop_id=st.sampled_from(["SHOP1", "SHOP2"]),
    terminal_id=st.sampled_from(["T1", "T2", "not an id!"]),
    idempotency_key=st.sampled_from([f"k{i}" for i in range(6)]),
    ts_ms=st.sampled_from([TS_MS, TS_MS + DAY_MS]),
    request=st.sampled_from([None, "r0", "r1"]),
    points_per_day_max=st.sampled_from([None, 20]),
)


def _outcome(result: object) -> object:
    """An entry without its hashes (each ledger draws its own person keys), or the error."""
    if isinstance(result, GenkiError):
        return type(result).__name__, str(result)
    assert not isinstance(result, BaseException)
    return {k: v for k, v in result.to_dict().items() if k not in ("prev_hash", "hash")}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(_REDEEM_REQUESTS, max_size=8), min_size=1, max_size=4))
def test_redeem_many_equals_redeem_one_by_one(batches: list[list[RedeemRequest]]) -> None:
    """Group commit's batched redemptions: the same entries, refusals and balances."""
    with tempfile.TemporaryDirectory() as one_dir, tempfile.TemporaryDirectory() as many_dir, \
            Ledger.open(Path(one_dir)) as one, Ledger.open(Path(many_dir)) as many:
        seeds = [award("P1", 100, "seed"), award("P2", 10, "seed")]
        one.append(seeds)
        many.append(seeds)
        for batch in batches:
            one_by_one: list[object] = []
            with one.batch():
                for r in batch:
                    try:
                        one_by_one.append(one.redeem(
                            r.user_id, r.points, r.shop_id, r.terminal_id, r.idempotency_key,
                            r.ts_ms, request=r.request, points_per_day_max=r.points_per_day_max))
                    except GenkiError as error:
                        one_by_one.append(error)
            with many.batch():
                batched = many.redeem_many(batch)
            assert [_outcome(o) for o in batched] == [_outcome(o) for o in one_by_one]
        for user in ("P1", "P2", "P3"):
            assert many.balance(user) == one.balance(user)
        assert many.head()["entries"] == one.head()["entries"]
        assert many.head()["commit_seq"] == one.head()["commit_seq"]
        assert many.verify().ok
