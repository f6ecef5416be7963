"""Value types the ledger returns: stored entries and the results of its commands."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from engine.schemas import EntryKind, LedgerEntry

# Column order of a stored row; Entry.from_row and the SQL agree on it.
ENTRY_COLUMNS: tuple[str, ...] = (
    "seq", "entry_id", "user_id", "kind", "points", "day", "ts_ms", "rule", "ref",
    "rules_version", "prev_hash", "hash",
)
# Column order of a journal row (the hashed part of an entry, see canonical.py).
JOURNAL_COLUMNS: tuple[str, ...] = (
    "seq", "subject", "entry", "kind", "points", "day", "ts_ms", "rule", "ref",
    "rules_version", "prev_hash", "hash",
)
_KIND_BY_NAME: dict[str, EntryKind] = {kind.value: kind for kind in EntryKind}
EntryRow = tuple[int, str, str, str, int, str | None, int, str | None, str | None, str | None,
                 str, str]


@dataclass(frozen=True, slots=True)
class Entry:
    """A sequenced, hashed journal entry (the wire shape is schemas.LedgerEntry)."""

    seq: int
    entry_id: str
    user_id: str
    kind: EntryKind
    points: int
    day: str | None
    ts_ms: int
    rule: str | None
    ref: str | None
    rules_version: str | None
    prev_hash: str
    hash: str

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Entry:
        assert len(row) == len(ENTRY_COLUMNS)
        return cls(row[0], row[1], row[2], _KIND_BY_NAME[row[3]], row[4], row[5], row[6], row[7],
                   row[8], row[9], row[10], row[11])

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "entry_id": self.entry_id, "user_id": self.user_id,
            "kind": self.kind.value, "points": self.points, "day": self.day,
            "ts_ms": self.ts_ms, "rule": self.rule, "ref": self.ref,
            "rules_version": self.rules_version, "prev_hash": self.prev_hash,
            "hash": self.hash,
        }

    def to_wire(self) -> LedgerEntry:
        return LedgerEntry(**self.to_dict())


@dataclass(frozen=True)
class SeqDigest:
    """The seq digest (canonical.py) of a ledger through entry `seq`, and how many
    erasures that ledger had recorded then (one more makes it stale)."""

    seq: int
    digest: str
    erasures: int


@dataclass(frozen=True)
class AppendResult:
    """What one append transaction did.

    appended new entries hold seq_first..seq_last (None when nothing was new);
    `existing` counts drafts whose id was already stored with identical content
    (including duplicates within the batch), `existing_entries` are those stored
    entries (one per id). `entries` and `existing_entries` build Entry objects
    from the rows on demand, so a million-draft append does not pay for
    objects nobody reads.
    """

    appended: int
    existing: int
    seq_first: int | None
    seq_last: int | None
    chain_head: str
    flags_appended: int = 0
    flags_existing: int = 0
    rows: Sequence[EntryRow] = field(default=(), repr=False)
    existing_rows: Sequence[EntryRow] = field(default=(), repr=False)

    @cached_property
    def entries(self) -> list[Entry]:
        return [Entry.from_row(row) for row in self.rows]

    @cached_property
    def existing_entries(self) -> list[Entry]:
        return [Entry.from_row(row) for row in self.existing_rows]


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of recomputing the chain and every balance from the journal."""

    ok: bool
    entries_checked: int
    users_checked: int
    chain_head: str
    first_bad_seq: int | None = None
    problem: str | None = None
    balance_problems: tuple[str, ...] = ()
    erased_entries: int = 0
    flags_checked: int = 0
    erasures_checked: int = 0
    commits_checked: int = 0
    signatures_checked: int = 0
    key_id: str | None = None
    first_bad_commit: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "entries_checked": self.entries_checked,
            "users_checked": self.users_checked, "chain_head": self.chain_head,
            "first_bad_seq": self.first_bad_seq, "problem": self.problem,
            "balance_problems": list(self.balance_problems),
            "erased_entries": self.erased_entries, "flags_checked": self.flags_checked,
            "erasures_checked": self.erasures_checked, "commits_checked": self.commits_checked,
            "signatures_checked": self.signatures_checked, "key_id": self.key_id,
            "first_bad_commit": self.first_bad_commit,
        }


@dataclass(frozen=True)
class ErasureReceipt:
    """What `Ledger.erase_user` did; `erased` is False when nothing linked the user.

    The receipt names the user (for the caller's own audit trail); the
    ledger's erasure log keeps only the subject, reason, time and counts.
    """

    user_id: str
    erased: bool
    subject: str | None
    entries_unlinked: int
    flags_unlinked: int
    points_forfeited: int
    reason: str
    ts_ms: int
    erasure_seq: int | None
    erasure_hash: str | None

    @property
    def entries(self) -> int:
        return self.entries_unlinked

    @property
    def flags(self) -> int:
        return self.flags_unlinked

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "erased": self.erased, "subject": self.subject,
                "entries_unlinked": self.entries_unlinked, "flags_unlinked": self.flags_unlinked,
                "points_forfeited": self.points_forfeited, "reason": self.reason,
                "ts_ms": self.ts_ms, "erasure_seq": self.erasure_seq,
                "erasure_hash": self.erasure_hash}


@dataclass(frozen=True)
class BalanceDifference:
    user_id: str
    live: int | None
    rebuilt: int | None


@dataclass(frozen=True)
class RebuildResult:
    """Balances recomputed from the journal; `matched` says whether live agreed."""

    users: int
    points_outstanding: int
    differences: tuple[BalanceDifference, ...]

    @property
    def matched(self) -> bool:
        return not self.differences


@dataclass(frozen=True)
class Settlement:
    """One shop's redemptions and refunds in one Tokyo calendar month."""

    shop_id: str
    month: str
    redeemed_points: int
    refunded_points: int
    redemptions: int
    refunds: int

    @property
    def net_points(self) -> int:
        return self.redeemed_points - self.refunded_points

    CSV_HEADER = ("shop_id", "month", "redeemed_points", "refunded_points", "net_points",
                  "redemptions")

    def csv_row(self) -> tuple[str, str, int, int, int, int]:
        return (self.shop_id, self.month, self.redeemed_points, self.refunded_points,
                self.net_points, self.redemptions)
