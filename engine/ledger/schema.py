"""SQLite layout of the ledger file (`<data_dir>/ledger.sqlite`).

entries   the journal: append-only (triggers refuse UPDATE and DELETE), STRICT
          types, seq = rowid so appends go to the end of the B-tree.
balances  projection: user → balance (CHECK >= 0) and entry count; rebuilt from
          entries by `Ledger.rebuild()`.
chain     one row: the seq and hash of the last entry, written in the same
          transaction as the entries, so a truncated tail is detectable.
flags     frailty-flag events (append-only like entries), flag_id unique.
meta      key → value written atomically with entries (e.g. the pipeline's
          processed log position).
"""

from __future__ import annotations

SCHEMA_VERSION = 1
# Written as OR chains, not IN lists: SQLite rebuilds an IN list's ephemeral table
# every time a statement is reset, which executemany does per row (2 µs each).
KIND_CHECK_SQL = " OR ".join(
    f"kind = '{kind}'" for kind in ("award", "redeem", "refund", "expire", "adjust"))
SHOP_KINDS_SQL = "(kind = 'redeem' OR kind = 'refund')"

DDL: tuple[str, ...] = (
    f"""
    CREATE TABLE IF NOT EXISTS entries (
        seq INTEGER PRIMARY KEY CHECK (seq >= 1),
        entry_id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        kind TEXT NOT NULL CHECK ({KIND_CHECK_SQL}),
        points INTEGER NOT NULL,
        day TEXT,
        ts_ms INTEGER NOT NULL,
        rule TEXT,
        ref TEXT,
        rules_version TEXT,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    ) STRICT
    """,
    # (user_id) alone: the rowid (= seq) is the index's last key, so history pages by seq.
    "CREATE INDEX IF NOT EXISTS entries_user ON entries (user_id)",
    # Redemptions and refunds only: awards never touch these indexes.
    f"""
    CREATE INDEX IF NOT EXISTS entries_shop_ts ON entries (json_extract(ref, '$.shop'), ts_ms)
    WHERE {SHOP_KINDS_SQL}
    """,
    """
    CREATE INDEX IF NOT EXISTS entries_refund_of ON entries (json_extract(ref, '$.refund_of'))
    WHERE kind = 'refund'
    """,
    """
    CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only: UPDATE refused'); END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only: DELETE refused'); END
    """,
    """
    CREATE TABLE IF NOT EXISTS balances (
        user_id TEXT PRIMARY KEY,
        points INTEGER NOT NULL CHECK (points >= 0),
        entries INTEGER NOT NULL CHECK (entries >= 1)
    ) STRICT, WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS chain (
        one INTEGER PRIMARY KEY CHECK (one = 1),
        seq INTEGER NOT NULL,
        hash TEXT NOT NULL
    ) STRICT
    """,
    """
    CREATE TABLE IF NOT EXISTS flags (
        seq INTEGER PRIMARY KEY,
        flag_id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        flag TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('raised', 'cleared')),
        day TEXT NOT NULL,
        evidence TEXT NOT NULL,
        rules_version TEXT NOT NULL
    ) STRICT
    """,
    "CREATE INDEX IF NOT EXISTS flags_user_flag ON flags (user_id, flag, day, seq)",
    """
    CREATE TRIGGER IF NOT EXISTS flags_no_update BEFORE UPDATE ON flags
    BEGIN SELECT RAISE(ABORT, 'flag events are append-only: UPDATE refused'); END
    """,
    """
    CREATE TRIGGER IF NOT EXISTS flags_no_delete BEFORE DELETE ON flags
    BEGIN SELECT RAISE(ABORT, 'flag events are append-only: DELETE refused'); END
    """,
    """
    CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT, WITHOUT ROWID
    """,
)
