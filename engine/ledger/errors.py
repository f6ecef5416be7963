"""Ledger errors: engine.errors types carrying the facts a caller acts on."""

from __future__ import annotations

from engine.errors import (
    ExistsWithDifferent,
    InsufficientPoints,
    LedgerError,
    RefundExceeds,
    UsageError,
)


class Overdraft(InsufficientPoints):
    """A debit larger than the balance; nothing was written."""

    def __init__(self, user_id: str, balance: int, requested: int) -> None:
        self.user_id = user_id
        self.balance = balance
        self.requested = requested
        super().__init__(
            f"insufficient points: balance {balance}, requested {requested} for user {user_id}"
        )


class EntryExistsWithDifferent(ExistsWithDifferent):
    """An id (entry, idempotency key or flag) already stored with other content."""

    def __init__(self, what: str, id_: str, field: str, stored: object, sent: object) -> None:
        self.id = id_
        self.field = field
        self.stored = stored
        self.sent = sent
        super().__init__(
            f"{what} {id_} already exists with different {field}: "
            f"stored {stored!r}, sent {sent!r}"
        )


class RefundTooLarge(RefundExceeds):
    def __init__(self, redemption_id: str, requested: int, redeemed: int, refunded: int) -> None:
        self.redemption_id = redemption_id
        self.requested = requested
        self.redeemed = redeemed
        self.refunded = refunded
        super().__init__(
            f"refund of {requested} points exceeds what redemption {redemption_id} has left: "
            f"it took {redeemed}, {refunded} already refunded, at most "
            f"{redeemed - refunded} can be refunded"
        )


class RefundWrongShop(LedgerError):
    """A shop tried to refund another shop's redemption."""

    http_status = 403
    code = "refund_wrong_shop"

    def __init__(self, redemption_id: str, shop_id: str, redeemed_at: str) -> None:
        self.redemption_id = redemption_id
        self.shop_id = shop_id
        self.redeemed_at = redeemed_at
        super().__init__(
            f"redemption {redemption_id} was made at shop {redeemed_at}; "
            f"shop {shop_id} cannot refund it"
        )


class LedgerBusy(LedgerError):
    """Another writer held the ledger's write lock for too long."""

    http_status = 503
    code = "ledger_busy"


class NotARedemption(LedgerError):
    http_status = 422
    code = "not_a_redemption"


class InvalidEntry(LedgerError):
    """A draft that breaks the ledger's rules (a bug upstream, refused whole)."""

    http_status = 422
    code = "invalid_entry"


class InvalidRequest(UsageError):
    """A command argument out of range: non-positive points, empty reason, bad key."""

    http_status = 400
    code = "invalid_request"


class DailyRedeemLimit(LedgerError):
    """A redemption past the points a person may redeem in one Tokyo day; nothing written."""

    code = "points_per_person_per_day_max_exceeded"

    def __init__(self, user_id: str, day: str, redeemed: int, requested: int,
                 points_per_day_max: int) -> None:
        self.user_id = user_id
        self.day = day
        super().__init__(
            f"redemption of {requested} points for user {user_id} on {day} exceeds "
            f"points_per_person_per_day_max {points_per_day_max} ({redeemed} redeemed already)"
        )
