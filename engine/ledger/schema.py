"""SQLite layout of the ledger file (`<data_dir>/ledger.sqlite`), canonical version 2.

Append-only, hashed (triggers refuse UPDATE and DELETE; see canonical.py):
journal       entries without personal links: subject, keyed entry tag, kind,
              points, day, ts_ms, rule, public ref, rules_version, prev_hash,
              hash; seq = rowid.
flag_journal  flag events: subject, keyed event tag, prev_hash, hash.
erasures      the erasure log: subject, reason, time, counts, prev_hash, hash.
commits       one row per write transaction: canonical body, prev_hash, hash,
              and the Ed25519 signature and key id when a signing key is set.

Mutable (what erasure deletes; UPDATE refused, DELETE only inside an erasure):
person_keys   user → random 32-byte key and its subject.
entry_links   seq → entry_id (unique), user_id, private ref.
flags         seq → the flag event itself (v1 columns, read by others).

Projections: balances (user → points >= 0, entry count; rebuilt from the
journal by `Ledger.rebuild()`), meta (key → value written with appends, e.g.
the processed log position; covered by the commits chain).

`entries` is a view joining journal and entry_links with the version 1
columns, so readers by position keep working; erased entries are not in it.
"""

from __future__ import annotations

from engine.ledger.canonical import CANONICAL_VERSION

SCHEMA_VERSION = CANONICAL_VERSION
LEGACY_SCHEMA_VERSIONS: tuple[int, ...] = (1,)
# Written as OR chains, not IN lists: SQLite rebuilds an IN list's ephemeral table
# every time a statement is reset, which executemany does per row (2 µs each).
KIND_CHECK_SQL = " OR ".join(
    f"kind = '{kind}'" for kind in ("award", "redeem", "refund", "expire", "adjust"))
SHOP_KINDS_SQL = "(kind = 'redeem' OR kind = 'refund')"
APPEND_ONLY_TABLES: tuple[str, ...] = ("journal", "flag_journal", "erasures", "commits")
ERASABLE_TABLES: tuple[str, ...] = ("entry_links", "flags")


def _append_only(table: str) -> tuple[str, str]:
    return (f"""
    CREATE TRIGGER IF NOT EXISTS {table}_no_update BEFORE UPDATE ON {table}
    BEGIN SELECT RAISE(ABORT, 'ledger {table} is append-only: UPDATE refused'); END
    """, f"""
    CREATE TRIGGER IF NOT EXISTS {table}_no_delete BEFORE DELETE ON {table}
    BEGIN SELECT RAISE(ABORT, 'ledger {table} is append-only: DELETE refused'); END
    """)


def _erasable(table: str) -> tuple[str, str]:
    return (f"""
    CREATE TRIGGER IF NOT EXISTS {table}_no_update BEFORE UPDATE ON {table}
    BEGIN SELECT RAISE(ABORT, 'ledger {table} is append-only: UPDATE refused'); END
    """, f"""
    CREATE TRIGGER IF NOT EXISTS {table}_no_delete BEFORE DELETE ON {table}
    WHEN NOT EXISTS (SELECT 1 FROM erasing WHERE user_id = OLD.user_id)
    BEGIN SELECT RAISE(ABORT, 'ledger {table}: DELETE refused outside an erasure'); END
    """)


DDL: tuple[str, ...] = (
    f"""
    CREATE TABLE IF NOT EXISTS journal (
        seq INTEGER PRIMARY KEY CHECK (seq >= 1),
        subject TEXT NOT NULL,
        entry TEXT NOT NULL,
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
    # Redemptions and refunds only: awards never touch these indexes.
    f"""
    CREATE INDEX IF NOT EXISTS journal_shop_ts ON journal (json_extract(ref, '$.shop'), ts_ms)
    WHERE {SHOP_KINDS_SQL}
    """,
    """
    CREATE INDEX IF NOT EXISTS journal_refund_of ON journal (json_extract(ref, '$.refund_of'))
    WHERE kind = 'refund'
    """,
    *_append_only("journal"),
    """
    CREATE TABLE IF NOT EXISTS erasing (user_id TEXT PRIMARY KEY) STRICT, WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS person_keys (
        user_id TEXT PRIMARY KEY,
        key BLOB NOT NULL CHECK (length(key) = 32),
        subject TEXT NOT NULL UNIQUE
    ) STRICT, WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS entry_links (
        seq INTEGER PRIMARY KEY,
        entry_id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        ref TEXT
    ) STRICT
    """,
    # (user_id) alone: the rowid (= seq) is the index's last key, so history pages by seq.
    "CREATE INDEX IF NOT EXISTS entry_links_user ON entry_links (user_id)",
    *_erasable("entry_links"),
    """
    CREATE VIEW IF NOT EXISTS entries AS
    SELECT j.seq AS seq, l.entry_id AS entry_id, l.user_id AS user_id, j.kind AS kind,
           j.points AS points, j.day AS day, j.ts_ms AS ts_ms, j.rule AS rule,
           COALESCE(j.ref, l.ref) AS ref, j.rules_version AS rules_version,
           j.prev_hash AS prev_hash, j.hash AS hash
    FROM journal AS j JOIN entry_links AS l ON l.seq = j.seq
    """,
    """
    CREATE TABLE IF NOT EXISTS balances (
        user_id TEXT PRIMARY KEY,
        points INTEGER NOT NULL CHECK (points >= 0),
        entries INTEGER NOT NULL CHECK (entries >= 1)
    ) STRICT, WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS flag_journal (
        seq INTEGER PRIMARY KEY CHECK (seq >= 1),
        subject TEXT NOT NULL,
        event TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    ) STRICT
    """,
    *_append_only("flag_journal"),
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
    *_erasable("flags"),
    """
    CREATE TABLE IF NOT EXISTS erasures (
        seq INTEGER PRIMARY KEY CHECK (seq >= 1),
        subject TEXT NOT NULL,
        reason TEXT NOT NULL,
        ts_ms INTEGER NOT NULL,
        entries INTEGER NOT NULL,
        flags INTEGER NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    ) STRICT
    """,
    *_append_only("erasures"),
    """
    CREATE TABLE IF NOT EXISTS commits (
        seq INTEGER PRIMARY KEY CHECK (seq >= 1),
        body TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        key_id TEXT,
        signature TEXT
    ) STRICT
    """,
    *_append_only("commits"),
    """
    CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT, WITHOUT ROWID
    """,
)
