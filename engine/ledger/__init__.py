"""Append-only, hash-chained points ledger (SQLite journal, balances as a projection).

    from engine.ledger import Ledger
    with Ledger.open(data_dir) as ledger:
        ledger.append(drafts, meta={"log_position": "1234"})
        ledger.append_awards(output.award_entries, flags=output.flags)   # columns, same bytes
        ledger.redeem("P00017", 300, "S01", "T1", "key-1", ts_ms)

Canonical form version 2 (full text in `engine.ledger.canonical`): hashed
bytes carry no user id: each person has a random key (table person_keys);
entries are hashed with subject = MAC(key, ...) and a keyed entry tag, the
plain entry_id/user_id live in mutable link tables. `erase_user` destroys
the key and links (crypto-shredding) and `verify` still passes. A commits
chain covers entries, flags, erasures and meta (the processed position);
commits are Ed25519-signed when a signing key is configured. The content
digest is over logical content (entry_id, user_id, ...), so it is the same
for the same input whatever the runtime, batching or keys.

Modules: `canonical` (the canonical bytes and hash chain other runtimes must
reproduce), `journal` (validation, sequencing, chain check),
`commands` (pure draft builders for redeem/refund/adjust), `lots` (FIFO lots
and expiry), `store` (the SQLite Ledger), `schema` (table layout), `audit`
(verify), `signing` (Ed25519 head keys), `cli`.
"""

from engine.ledger.canonical import GENESIS_HASH, canonical_bytes, chain_hash, content_bytes
from engine.ledger.model import (
    AppendResult,
    Entry,
    ErasureReceipt,
    RebuildResult,
    Settlement,
    VerifyResult,
)
from engine.ledger.store import HISTORY_LIMIT_MAX, LEDGER_FILE_NAME, Ledger

__all__ = [
    "GENESIS_HASH",
    "HISTORY_LIMIT_MAX",
    "LEDGER_FILE_NAME",
    "AppendResult",
    "Entry",
    "ErasureReceipt",
    "Ledger",
    "RebuildResult",
    "Settlement",
    "VerifyResult",
    "canonical_bytes",
    "chain_hash",
    "content_bytes",
]
