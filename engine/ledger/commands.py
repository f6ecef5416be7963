"""Pure draft builders for the ledger's commands (redeem, refund, adjust, expire).

The store runs them inside its write transaction; the Kafka runtime can call
the same functions so both runtimes produce byte-identical entries. `ref` holds
a small canonical JSON object (sorted keys) so history can say why an entry
exists: the shop, terminal and key of a redemption; the redemption a refund
reverses; the staff member and reason of an adjustment; the lot an expiry ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from engine.clock import day_to_iso, tokyo_day
from engine.entries import EntryDraft
from engine.ids import derive_id
from engine.ledger.errors import InvalidRequest
from engine.schemas import ID_CHARS_MAX, POINTS_PER_ENTRY_MAX, TS_MS_MIN, EntryKind, is_id

IDEMPOTENCY_KEY_CHARS_MAX = 128
REASON_CHARS_MAX = 500
RULE_REDEEM = "shop_redemption"
RULE_REFUND = "shop_refund"
RULE_ADJUST = "staff_adjustment"
RULE_EXPIRE = "points_expiry"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def ref_json(fields: dict[str, Any]) -> str:
    return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS).decode()


def ref_fields(ref: str | None) -> dict[str, Any]:
    """The JSON object in `ref`, or {} when ref is empty or not such an object."""
    if not ref or not ref.startswith("{"):
        return {}
    try:
        value = orjson.loads(ref)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def check_id(name: str, value: object) -> str:
    if not is_id(value):
        raise InvalidRequest(f"{name}: {value!r} is not an id (1-{ID_CHARS_MAX} characters "
                             f"of A-Z a-z 0-9 _ . : -)")
    return value


def check_key(name: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > IDEMPOTENCY_KEY_CHARS_MAX \
            or _CONTROL.search(value):
        raise InvalidRequest(f"{name}: must be 1-{IDEMPOTENCY_KEY_CHARS_MAX} printable "
                             f"characters, got {value!r}")
    return value


def check_points(value: object, *, signed: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"points: must be an integer, got {value!r}")
    low = -POINTS_PER_ENTRY_MAX if signed else 1
    if not low <= value <= POINTS_PER_ENTRY_MAX or value == 0:
        bound = f"{low}..{POINTS_PER_ENTRY_MAX}, not 0" if signed else f"1..{POINTS_PER_ENTRY_MAX}"
        raise InvalidRequest(f"points: must be in {bound}, got {value}")
    return value


def check_ts_ms(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < TS_MS_MIN:
        raise InvalidRequest(f"ts_ms: must be an integer Unix time in ms >= {TS_MS_MIN}, "
                             f"got {value!r}")
    return value


def redeem_id(shop_id: str, idempotency_key: str) -> str:
    return derive_id("redeem", shop_id, idempotency_key)


def refund_id(shop_id: str, idempotency_key: str) -> str:
    """Refund keys are scoped by shop, as redemption keys are (Stripe: per account)."""
    return derive_id("refund", shop_id, idempotency_key)


def adjust_id(staff_id: str, key: str) -> str:
    return derive_id("adjust", staff_id, key)


def expire_id(user_id: str, lot_entry_id: str) -> str:
    return derive_id("expire", user_id, lot_entry_id)


@dataclass(frozen=True, slots=True)
class RedeemRequest:
    """The arguments of one `Ledger.redeem`, for `Ledger.redeem_many`."""

    user_id: str
    points: int
    shop_id: str
    terminal_id: str
    idempotency_key: str
    ts_ms: int
    request: str | None = None
    points_per_day_max: int | None = None


def redeem_draft(user_id: str, points: int, shop_id: str, terminal_id: str,
                 idempotency_key: str, ts_ms: int, request: str | None = None) -> EntryDraft:
    """`request`: a digest of the request that made it (the API's), so a retry with the
    same key but another request differs in content and is refused."""
    check_id("user_id", user_id)
    check_points(points)
    check_id("shop_id", shop_id)
    check_id("terminal_id", terminal_id)
    check_key("idempotency_key", idempotency_key)
    check_ts_ms(ts_ms)
    fields = {"key": idempotency_key, "shop": shop_id, "terminal": terminal_id}
    if request is not None:
        fields["request"] = check_key("request", request)
    ref = ref_json(fields)
    return EntryDraft(redeem_id(shop_id, idempotency_key), user_id, EntryKind.redeem, -points,
                      day_to_iso(tokyo_day(ts_ms)), ts_ms, RULE_REDEEM, ref, None)


def refund_draft(redemption_entry_id: str, user_id: str, shop_id: str, terminal_id: str | None,
                 points: int, idempotency_key: str, ts_ms: int) -> EntryDraft:
    """A refund of (part of) a redemption; shop and user come from the redemption."""
    check_points(points)
    check_key("idempotency_key", idempotency_key)
    check_ts_ms(ts_ms)
    ref = ref_json({"key": idempotency_key, "refund_of": redemption_entry_id, "shop": shop_id,
                    "terminal": terminal_id})
    return EntryDraft(refund_id(shop_id, idempotency_key), user_id, EntryKind.refund, points,
                      day_to_iso(tokyo_day(ts_ms)), ts_ms, RULE_REFUND, ref, None)


def adjust_draft(user_id: str, points: int, reason: str, staff_id: str, key: str,
                 ts_ms: int) -> EntryDraft:
    check_id("user_id", user_id)
    check_points(points, signed=True)
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidRequest("reason: an adjustment needs a non-empty reason")
    if len(reason) > REASON_CHARS_MAX:
        raise InvalidRequest(f"reason: at most {REASON_CHARS_MAX} characters, got {len(reason)}")
    check_id("staff_id", staff_id)
    check_key("key", key)
    check_ts_ms(ts_ms)
    ref = ref_json({"key": key, "reason": reason.strip(), "staff": staff_id})
    return EntryDraft(adjust_id(staff_id, key), user_id, EntryKind.adjust, points,
                      day_to_iso(tokyo_day(ts_ms)), ts_ms, RULE_ADJUST, ref, None)


def describe(kind: str, points: int, rule: str | None, ref: str | None) -> str:
    """One line a person can read: why this entry exists."""
    fields = ref_fields(ref)
    if kind == EntryKind.redeem:
        return f"redeemed at shop {fields.get('shop')} (terminal {fields.get('terminal')})"
    if kind == EntryKind.refund:
        return f"refund from shop {fields.get('shop')} of redemption {fields.get('refund_of')}"
    if kind == EntryKind.adjust:
        return f"adjusted by staff {fields.get('staff')}: {fields.get('reason')}"
    if kind == EntryKind.expire:
        return (f"expired {fields.get('months')} months after {fields.get('lot_day')} "
                f"(lot {fields.get('lot')})")
    return f"awarded by rule {rule}" + (f" ({ref})" if ref else "")
