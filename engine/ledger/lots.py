"""FIFO point lots and expiry: pure functions over one user's journal.

Every credit (award, refund, positive adjustment) opens a lot dated by its
`day` (or the Tokyo day of its ts_ms). Debits (redeem, negative adjustment)
consume the oldest open lots first, ordered by (lot day, seq), so a late award
for an old day is spent (and expires) before newer points. An expire entry
ends exactly the lot named in its ref. A refund opens a new lot on the refund
day rather than reviving the lots its redemption consumed: simple to audit,
and never expires points a person was just given back.

Points expire N months after their lot day: a lot of 2024-01-31 with N = 1
expires on 2024-02-29 (day clamped to the month's end), i.e. an expiry run
as of that day or later ends it.
"""

from __future__ import annotations

import bisect
import calendar
import datetime as dt
import functools
from collections.abc import Iterable
from dataclasses import dataclass

from engine.clock import day_start_ms, day_to_iso, iso_to_day, tokyo_day
from engine.entries import EntryDraft
from engine.ledger.commands import RULE_EXPIRE, expire_id, ref_fields, ref_json
from engine.schemas import EntryKind

EXPIRY_MONTHS_MAX = 120


@dataclass(slots=True)
class Lot:
    entry_id: str
    day: str
    seq: int
    remaining: int


@dataclass(frozen=True, slots=True)
class JournalItem:
    """The part of a stored entry the lot replay needs."""

    seq: int
    entry_id: str
    kind: str
    points: int
    day: str | None
    ts_ms: int
    ref: str | None


@functools.lru_cache(maxsize=65_536)
def add_months(iso_day: str, months: int) -> str:
    assert 0 <= months <= EXPIRY_MONTHS_MAX
    date = dt.date.fromisoformat(iso_day)
    month_index = date.year * 12 + (date.month - 1) + months
    year, month = divmod(month_index, 12)
    last_day = calendar.monthrange(year, month + 1)[1]
    return dt.date(year, month + 1, min(date.day, last_day)).isoformat()


def lot_day(item: JournalItem) -> str:
    return item.day if item.day is not None else day_to_iso(tokyo_day(item.ts_ms))


def open_lots(items: Iterable[JournalItem]) -> list[Lot]:
    """Replay one user's entries (in seq order); the lots still holding points."""
    ordered: list[tuple[str, int]] = []  # (day, seq) of open lots, oldest first
    by_key: dict[tuple[str, int], Lot] = {}
    by_id: dict[str, Lot] = {}
    seq_last = 0
    for item in items:
        assert item.seq > seq_last, "journal items must come in seq order"
        seq_last = item.seq
        if item.points > 0:
            lot = Lot(item.entry_id, lot_day(item), item.seq, item.points)
            key = (lot.day, lot.seq)
            bisect.insort(ordered, key)
            by_key[key] = lot
            by_id[lot.entry_id] = lot
        elif item.kind == EntryKind.expire:
            lot_id = ref_fields(item.ref).get("lot")
            ended = by_id.get(lot_id) if isinstance(lot_id, str) else None
            assert ended is not None and ended.remaining == -item.points, \
                f"expire entry {item.entry_id} does not end an open lot"
            _close(ended, ordered, by_key, by_id)
        else:
            _consume_oldest(-item.points, ordered, by_key, by_id, item.entry_id)
    return [by_key[key] for key in ordered]


def _consume_oldest(points: int, ordered: list[tuple[str, int]],
                    by_key: dict[tuple[str, int], Lot], by_id: dict[str, Lot],
                    entry_id: str) -> None:
    while points > 0:
        assert ordered, f"entry {entry_id} debits more points than the lots hold"
        lot = by_key[ordered[0]]
        taken = min(points, lot.remaining)
        lot.remaining -= taken
        points -= taken
        if lot.remaining == 0:
            _close(lot, ordered, by_key, by_id)


def _close(lot: Lot, ordered: list[tuple[str, int]], by_key: dict[tuple[str, int], Lot],
           by_id: dict[str, Lot]) -> None:
    key = (lot.day, lot.seq)
    index = bisect.bisect_left(ordered, key)
    assert ordered[index] == key
    del ordered[index]
    del by_key[key]
    del by_id[lot.entry_id]


def expiry_drafts(user_id: str, lots: Iterable[Lot], as_of_day: str,
                  months: int) -> list[EntryDraft]:
    """One expire draft per lot whose expiry day is on or before as_of_day.

    The content depends only on the lot and `months` (the entry is dated on the
    lot's expiry day), so re-running with a later as_of yields the same entry.
    """
    drafts = []
    for lot in lots:
        expires_on = add_months(lot.day, months)
        if expires_on > as_of_day:
            continue  # ISO dates compare as text
        assert lot.remaining > 0
        ref = ref_json({"lot": lot.entry_id, "lot_day": lot.day, "months": months})
        ts_ms = day_start_ms(iso_to_day(expires_on))
        drafts.append(EntryDraft(expire_id(user_id, lot.entry_id), user_id, EntryKind.expire,
                                 -lot.remaining, expires_on, ts_ms, RULE_EXPIRE, ref, None))
    return drafts
