"""The balance of people who left the programme, under the rules' `[leaving]` setting.

"expire" (the default, also when the section is absent): nothing happens at
leaving; the balance stays spendable until `genki ledger expire` takes lots
older than the expiry age, as for everyone. "settle": the pipeline closes the
balance with one `expire` entry (rule `leaving.settle`) dated at the moment of
leaving. Its id comes from the person, the moment and how many entries they had,
so re-running is a no-op, and points awarded later for days before leaving
(late data) are settled by a second entry.
"""

from __future__ import annotations

from engine.clock import day_to_iso, tokyo_day
from engine.consent import TS_OPEN_END_MS, Period
from engine.entries import EntryDraft
from engine.ids import derive_id
from engine.ledger import Ledger
from engine.rules.config import Rules
from engine.schemas import EntryKind

SETTLE_RULE = "leaving.settle"
HISTORY_PAGE_ENTRIES = 1_000


def settlement_drafts(ledger: Ledger, away: dict[str, list[Period]], rules: Rules,
                      ) -> list[EntryDraft]:
    """Entries closing the balances of people who are out of the programme now."""
    if rules.leaving is None or rules.leaving.balance != "settle":
        return []
    drafts = []
    for user, periods in sorted(away.items()):
        left_ms, until_ms = periods[-1]
        if until_ms != TS_OPEN_END_MS:
            continue  # enrolled again since
        balance = ledger.balance(user)
        if balance <= 0:
            continue
        entries = _entry_count(ledger, user)
        drafts.append(EntryDraft(
            derive_id("leaving", user, left_ms, entries), user, EntryKind.expire, -balance,
            day_to_iso(tokyo_day(left_ms)), left_ms, SETTLE_RULE, None, rules.version))
    return drafts


def _entry_count(ledger: Ledger, user: str) -> int:
    count, cursor = 0, None
    while True:
        page, cursor = ledger.history(user, cursor, HISTORY_PAGE_ENTRIES)
        count += len(page)
        if cursor is None:
            return count
