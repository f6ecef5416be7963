"""Specific errors with messages a user can act on, and their exit/HTTP codes."""

from __future__ import annotations


class GenkiError(Exception):
    """Base of every error genki reports to a user."""

    exit_code = 1
    http_status = 400
    code = "error"


class UsageError(GenkiError):
    exit_code = 2
    code = "usage"


class RulesError(GenkiError):
    """The rules file is invalid; the message names the key."""

    exit_code = 3
    code = "rules_invalid"


class CapacityError(GenkiError):
    """A fixed capacity of a store (users, days, streams, key ranges) is exhausted;
    the message names the limit."""

    exit_code = 9
    http_status = 507
    code = "capacity"


class NotFound(GenkiError):
    exit_code = 4
    http_status = 404
    code = "not_found"


class LedgerError(GenkiError):
    exit_code = 5
    http_status = 409
    code = "ledger"


class InsufficientPoints(LedgerError):
    code = "insufficient_points"


class ExistsWithDifferent(LedgerError):
    """An id that exists already was sent with different content."""

    http_status = 422
    code = "idempotency_conflict"


class RefundExceeds(LedgerError):
    code = "refund_exceeds_redemption"


class ChainBroken(LedgerError):
    exit_code = 6
    code = "chain_broken"
