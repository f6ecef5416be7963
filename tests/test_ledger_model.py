"""Property: the ledger decides and balances exactly like a tiny dict-based model."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.errors import (
    ExistsWithDifferent,
    InsufficientPoints,
    NotFound,
    RefundExceeds,
)
from engine.ledger import Ledger
from engine.ledger.errors import RefundWrongShop
from tests.test_ledger import TS_MS, award

USERS = ("P1", "P2", "P3")
SHOPS = ("S1", "S2")
KEYS = 4
SEED_POINTS = 30


@dataclass
class Model:
    balances: dict[str, int] = field(default_factory=lambda: dict.fromkeys(USERS, 0))
    redemptions: dict[tuple[str, int], tuple[str, int, str]] = field(default_factory=dict)
    order: list[tuple[str, int]] = field(default_factory=list)  # redemptions, oldest first
    refunds: dict[tuple[str, int], tuple[tuple[str, int], int]] = field(default_factory=dict)
    refunded: dict[tuple[str, int], int] = field(default_factory=dict)
    adjustments: dict[int, tuple[str, int]] = field(default_factory=dict)

    def award(self, user: str, points: int) -> str:
        self.balances[user] += points
        return "ok"

    def redeem(self, user: str, points: int, shop: str, key: int, terminal: str) -> str:
        known = self.redemptions.get((shop, key))
        if known is not None:
            return "ok" if known == (user, points, terminal) else "conflict"
        if self.balances[user] < points:
            return "insufficient"
        self.redemptions[(shop, key)] = (user, points, terminal)
        self.order.append((shop, key))
        self.balances[user] -= points
        return "ok"

    def refund(self, target: tuple[str, int] | None, points: int, key: int,
               shop: str | None) -> str:
        if target is None:
            return "not_found"
        user, taken, _ = self.redemptions[target]
        if shop is not None and shop != target[0]:
            return "wrong_shop"
        known = self.refunds.get((target[0], key))
        if known is not None:
            return "ok" if known == (target, points) else "conflict"
        if self.refunded.get(target, 0) + points > taken:
            return "refund_exceeds"
        self.refunds[(target[0], key)] = (target, points)
        self.refunded[target] = self.refunded.get(target, 0) + points
        self.balances[user] += points
        return "ok"

    def adjust(self, user: str, points: int, key: int) -> str:
        known = self.adjustments.get(key)
        if known is not None:
            return "ok" if known == (user, points) else "conflict"
        if self.balances[user] + points < 0:
            return "insufficient"
        self.adjustments[key] = (user, points)
        self.balances[user] += points
        return "ok"


def decision(call) -> str:  # type: ignore[no-untyped-def]
    try:
        call()
    except InsufficientPoints:
        return "insufficient"
    except ExistsWithDifferent:
        return "conflict"
    except RefundExceeds:
        return "refund_exceeds"
    except RefundWrongShop:
        return "wrong_shop"
    except NotFound:
        return "not_found"
    return "ok"


user_st = st.sampled_from(USERS)
key_st = st.integers(0, KEYS - 1)
operations = st.lists(st.one_of(
    st.tuples(st.just("award"), user_st, st.integers(1, 50)),
    st.tuples(st.just("redeem"), user_st, st.integers(1, 30), st.sampled_from(SHOPS), key_st,
              st.sampled_from(("T1", "T2"))),
    st.tuples(st.just("refund"), st.integers(-1, 3), st.integers(1, 20), key_st,
              st.sampled_from(("same", "same", "other", None))),
    st.tuples(st.just("adjust"), user_st, st.sampled_from((-1, 1)), st.integers(1, 25),
              key_st),
), max_size=30)


def apply(ledger: Ledger, model: Model, operation: tuple, number: int) -> tuple[str, str]:
    kind, *args = operation
    ts_ms = TS_MS + number
    if kind == "award":
        user, points = args
        return (decision(lambda: ledger.append([award(user, points, number)])),
                model.award(user, points))
    if kind == "redeem":
        user, points, shop, key, terminal = args
        return (decision(lambda: ledger.redeem(user, points, shop, terminal, f"k{key}", ts_ms)),
                model.redeem(user, points, shop, key, terminal))
    if kind == "refund":
        index, points, key, shop_choice = args
        target = model.order[index % len(model.order)] if index >= 0 and model.order else None
        entry_id = "missing" if target is None else redemption_id(ledger, target)
        shop = None if shop_choice is None or target is None else (
            target[0] if shop_choice == "same" else next(s for s in SHOPS if s != target[0]))
        return (decision(lambda: ledger.refund(entry_id, points, f"k{key}", ts_ms, shop)),
                model.refund(target, points, key, shop))
    user, sign, size, key = args
    points = sign * size
    return (decision(lambda: ledger.adjust(user, points, "model test", "ST1", f"k{key}", ts_ms)),
            model.adjust(user, points, key))


def redemption_id(ledger: Ledger, target: tuple[str, int]) -> str:
    from engine.ledger.commands import redeem_id
    return ledger.entry(redeem_id(target[0], f"k{target[1]}")).entry_id


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_ledger_matches_reference_model(ops: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as directory, Ledger.open(Path(directory)) as ledger:
        model = Model()
        for user in USERS:  # start with points, so redemptions and refunds happen
            apply(ledger, model, ("award", user, SEED_POINTS), -1 - USERS.index(user))
        for number, operation in enumerate(ops):
            actual, expected = apply(ledger, model, operation, number)
            assert actual == expected, operation
            event(f"{operation[0]}: {actual}")
            assert {user: ledger.balance(user) for user in USERS} == model.balances
        assert ledger.verify().ok
        assert ledger.rebuild().matched
        assert ledger.head()["points_outstanding"] == sum(model.balances.values())
