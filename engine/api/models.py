"""HTTP bodies: requests validated by pydantic at the edge; responses documented for OpenAPI.

Handlers return pre-serialised JSON (orjson) for speed, so the response
models here describe the bodies for /docs and clients; tests pin the shapes.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.api.limits import TOKEN_CHARS_MAX
from engine.ledger.commands import REASON_CHARS_MAX
from engine.schemas import POINTS_PER_ENTRY_MAX, IdText

EntryIdText = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[0-9a-f]+$")]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedemptionIn(Body):
    token: Annotated[str, Field(min_length=1, max_length=TOKEN_CHARS_MAX)]
    points: int = Field(gt=0, le=POINTS_PER_ENTRY_MAX, strict=True)
    terminal_id: IdText


class RefundIn(Body):
    redemption_entry_id: EntryIdText
    points: int = Field(gt=0, le=POINTS_PER_ENTRY_MAX, strict=True)


class AdjustmentIn(Body):
    user_id: IdText
    points: int = Field(ge=-POINTS_PER_ENTRY_MAX, le=POINTS_PER_ENTRY_MAX, strict=True,
                        description="signed, not 0")
    reason: Annotated[str, Field(min_length=1, max_length=REASON_CHARS_MAX,
                                 pattern=r"\S")]

    @field_validator("points")
    @classmethod
    def _not_zero(cls, points: int) -> int:
        if points == 0:
            raise ValueError("an adjustment of 0 points changes nothing")
        return points


class BalanceOut(BaseModel):
    user_id: str
    balance: int


class EntryOut(BaseModel):
    seq: int
    entry_id: str
    kind: str
    points: int
    day: str | None
    ts_ms: int
    rule: str | None
    reason: str = Field(description="why this entry exists: rule, shop, refund, staff reason")
    shop_id: str | None
    refund_of: str | None


class HistoryOut(BaseModel):
    user_id: str
    entries: list[EntryOut]
    next_cursor: int | None = Field(description="pass as ?cursor= for the next (older) page")


class FlagOut(BaseModel):
    v: int
    flag_id: str
    user_id: str
    flag: str
    state: str
    day: str
    evidence: dict[str, float | int | str]
    rules_version: str


class UserFlagsOut(BaseModel):
    user_id: str
    current: list[FlagOut]
    history: list[FlagOut]
    frailty_status: str = Field(description="robust, pre-frail or frail: how many of the revised "
                                "J-CHS criteria wearables measure (weight loss, slow gait, low "
                                "activity) are raised now")


class RiskPersonOut(BaseModel):
    user_id: str
    frailty_status: str = Field(description="robust, pre-frail or frail")
    severity: int = Field(description="sum of the raised flags' severities")
    flags: list[str]


class FlagsOut(BaseModel):
    day: str | None
    flags: list[FlagOut]
    people: list[RiskPersonOut] = Field(description="the risk list: frail, pre-frail, robust, "
                                        "most severe first within each")


class RedeemTokenOut(BaseModel):
    token: str
    user_id: str
    expires_ms: int
    ttl_s: int


class RedemptionOut(BaseModel):
    """What a shop terminal learns: never whose points they were, nor what is left."""

    entry_id: str = Field(description="the redemption's id (opaque; pass it to /v1/refunds)")
    shop_id: str
    terminal_id: str
    points: int = Field(description="points taken (positive)")
    ts_ms: int


class RefundOut(BaseModel):
    entry_id: str
    shop_id: str
    refund_of: str
    points: int
    ts_ms: int


class AdjustmentOut(BaseModel):
    entry_id: str
    seq: int
    user_id: str
    points: int
    reason: str
    staff_id: str
    ts_ms: int
    balance: int


class IngestOut(BaseModel):
    received: int
    accepted: int
    rejected: int
    duplicate_samples: int
    accepted_samples: int
    duplicate_records: int
    rejected_by_reason: dict[str, int]


class SettlementOut(BaseModel):
    shop_id: str
    month: str
    redeemed_points: int
    refunded_points: int
    net_points: int
    redemptions: int
    refunds: int


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    code: str
