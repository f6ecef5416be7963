"""Append-only, hash-chained points ledger (SQLite journal, balances as a projection).

    from engine.ledger import Ledger
    with Ledger.open(data_dir) as ledger:
        ledger.append(drafts, meta={"log_position": "1234"})
        ledger.redeem("P00017", 300, "S01", "T1", "key-1", ts_ms)

Canonical form (full text in `engine.ledger.canonical`): an entry's bytes are
the compact, key-sorted UTF-8 JSON of {day, entry_id, kind, points, ref, rule,
rules_version, seq, ts_ms, user_id} (= orjson OPT_SORT_KEYS = Python json.dumps
sort_keys, separators=(",", ":"), ensure_ascii=False); hash = SHA-256(prev_hash
as 64 ASCII hex chars ‖ those bytes), genesis prev_hash = "0" * 64. The
content digest is SHA-256 over the same JSON without seq, each followed by
a newline byte, for all entries sorted by entry_id.

Modules: `canonical` (the canonical bytes and hash chain other runtimes must
reproduce), `journal` (validation, sequencing, chain check),
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
