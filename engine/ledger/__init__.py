"""Append-only, hash-chained points ledger (SQLite journal, balances as a projection).

    from engine.ledger import Ledger
    with Ledger.open(data_dir) as ledger:
        ledger.append(drafts, meta={"log_position": "1234"})
        ledger.redeem("P00017", 300, "S01", "T1", "key-1", ts_ms)

Modules: `canonical` (the canonical bytes and hash chain other runtimes must
reproduce, documented there), `journal` (validation, sequencing, chain check),
`commands` (pure draft builders for redeem/refund/adjust), `lots` (FIFO lots
and expiry), `store` (the SQLite Ledger), `schema` (table layout), `cli`.
"""

from engine.ledger.canonical import GENESIS_HASH, canonical_bytes, chain_hash, content_bytes
from engine.ledger.model import AppendResult, Entry, RebuildResult, Settlement, VerifyResult
from engine.ledger.store import HISTORY_LIMIT_MAX, LEDGER_FILE_NAME, Ledger

__all__ = [
    "GENESIS_HASH",
    "HISTORY_LIMIT_MAX",
    "LEDGER_FILE_NAME",
    "AppendResult",
    "Entry",
    "Ledger",
    "RebuildResult",
    "Settlement",
    "VerifyResult",
    "canonical_bytes",
    "chain_hash",
    "content_bytes",
]
