"""What the core hands to the ledger: entries before they get a seq and a hash."""

from __future__ import annotations

from dataclasses import dataclass

from engine.schemas import EntryKind


@dataclass(frozen=True, slots=True)
class EntryDraft:
    """A ledger entry as produced by a rule or a command, before sequencing.

    points is signed (award/refund > 0, redeem/expire < 0, adjust either way);
    a user's balance is the sum of their entries' points. entry_id is derived
    from the cause (engine.ids.derive_id), so producing it twice is harmless.
    """

    entry_id: str
    user_id: str
    kind: EntryKind
    points: int
    day: str | None
    ts_ms: int
    rule: str | None
    ref: str | None
    rules_version: str | None
