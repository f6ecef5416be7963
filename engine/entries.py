"""What the core hands to the ledger: entries before they get a seq and a hash."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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


@dataclass(frozen=True, slots=True)
class Awards:
    """Award entries as columns: what the rules hand to the ledger without an object per
    award (`Ledger.append_awards`). Row i is the draft

        EntryDraft(entry_id[i], user_ids[user[i]], award, points[i], days[day[i]],
                   ts_ms[i], rules[rule[i]], refs[ref[i]], rules_version)

    Repeating values (users, days, rule names, refs) are small tables indexed by
    int64 columns, so the ledger checks and encodes each distinct value once.
    """

    entry_id: list[str]
    user: np.ndarray
    user_ids: Sequence[str]
    points: np.ndarray
    day: np.ndarray
    days: Sequence[str]
    ts_ms: np.ndarray
    rule: np.ndarray
    rules: Sequence[str]
    ref: np.ndarray
    refs: Sequence[str | None]
    rules_version: str | None

    def __len__(self) -> int:
        return len(self.entry_id)

    @property
    def points_total(self) -> int:
        return int(self.points.sum())

    def points_by_rule(self) -> dict[str, int]:
        """Points per rule name (rules without awards in this batch left out)."""
        sums = np.bincount(self.rule, weights=self.points, minlength=len(self.rules))
        counts = np.bincount(self.rule, minlength=len(self.rules))
        return {self.rules[index]: int(sums[index]) for index in np.flatnonzero(counts).tolist()}

    def drafts(self) -> list[EntryDraft]:
        """The same entries as EntryDraft objects (the row-by-row path and its tests)."""
        user_ids, days, rules, refs = self.user_ids, self.days, self.rules, self.refs
        award, version = EntryKind.award, self.rules_version
        return [EntryDraft(entry_id, user_ids[user], award, points, days[day], ts_ms,
                           rules[rule], refs[ref], version)
                for entry_id, user, points, day, ts_ms, rule, ref in zip(
                    self.entry_id, self.user.tolist(), self.points.tolist(), self.day.tolist(),
                    self.ts_ms.tolist(), self.rule.tolist(), self.ref.tolist(), strict=True)]
