"""The canonical bytes and hashes of ledger entries, reproducible by any runtime.

Canonical form (version 1)
--------------------------
An entry's *canonical bytes* are the compact JSON of an object with exactly
these ten keys, sorted bytewise, UTF-8 encoded, no whitespace::

    day, entry_id, kind, points, ref, rule, rules_version, seq, ts_ms, user_id

* strings are JSON strings: non-ASCII characters are written as raw UTF-8
  (not ``\\uXXXX``), ``"`` and ``\\`` are backslash-escaped, ``\\b \\t \\n \\f \\r``
  use their short escapes, every other control character below U+0020 is
  ``\\u00xx`` (lowercase hex), ``/`` is not escaped;
* ``points``, ``seq`` and ``ts_ms`` are decimal integers (no sign for >= 0,
  no leading zeros, no exponent);
* ``day``, ``ref``, ``rule`` and ``rules_version`` may be ``null``;
* ``kind`` is one of ``award redeem refund expire adjust``.

This is exactly ``orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)`` and exactly
Python's ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=False).encode()``; for these value types it is also RFC 8785
(JCS). Example (one line)::

    {"day":"2024-05-01","entry_id":"9f..","kind":"award","points":3,"ref":null,
     "rule":"steps_tier_3","rules_version":"r1","seq":1,"ts_ms":1714575600000,
     "user_id":"P00017"}

Chain: ``hash = SHA-256(prev_hash ‖ canonical_bytes)`` as 64 lowercase hex
characters, where ``prev_hash`` is the previous entry's hash as its 64 ASCII
hex bytes; the first entry (seq 1) has ``prev_hash = "0" * 64`` (GENESIS_HASH).
seq starts at 1 and has no gaps.

Content digest (order independent): the canonical *content* bytes of an entry
are the same JSON without ``seq`` (nine keys; ``prev_hash`` and ``hash`` are
never part of it). Over all entries sorted by ``entry_id`` (bytewise UTF-8)::

    content_digest = SHA-256(c_1 ‖ "\\n" ‖ c_2 ‖ "\\n" ‖ … ‖ c_n ‖ "\\n")

Two runtimes that append the same entries in different orders get the same
digest, though their chain heads differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import orjson

CANONICAL_VERSION = 1
HASH_HEX_CHARS = 64
GENESIS_HASH = "0" * HASH_HEX_CHARS
CANONICAL_KEYS: tuple[str, ...] = (
    "day", "entry_id", "kind", "points", "ref", "rule", "rules_version", "seq", "ts_ms", "user_id",
)
_SORT = orjson.OPT_SORT_KEYS


def canonical_bytes(seq: int, entry_id: str, user_id: str, kind: str, points: int,
                    day: str | None, ts_ms: int, rule: str | None, ref: str | None,
                    rules_version: str | None) -> bytes:
    """The bytes an entry's hash covers (see the module docstring)."""
    return orjson.dumps(
        {"day": day, "entry_id": entry_id, "kind": kind, "points": points, "ref": ref,
         "rule": rule, "rules_version": rules_version, "seq": seq, "ts_ms": ts_ms,
         "user_id": user_id},
        option=_SORT,
    )


def content_bytes(entry_id: str, user_id: str, kind: str, points: int, day: str | None,
                  ts_ms: int, rule: str | None, ref: str | None,
                  rules_version: str | None) -> bytes:
    """Canonical bytes without seq: what two runtimes must agree on."""
    return orjson.dumps(
        {"day": day, "entry_id": entry_id, "kind": kind, "points": points, "ref": ref,
         "rule": rule, "rules_version": rules_version, "ts_ms": ts_ms, "user_id": user_id},
        option=_SORT,
    )


def chain_hash(prev_hash: str, canonical: bytes) -> str:
    assert len(prev_hash) == HASH_HEX_CHARS, "prev_hash must be 64 hex characters"
    return hashlib.sha256(prev_hash.encode("ascii") + canonical).hexdigest()


def content_digest(contents_sorted_by_entry_id: Iterable[bytes]) -> str:
    """SHA-256 over content bytes, each followed by a newline, in entry_id order."""
    digest = hashlib.sha256()
    for content in contents_sorted_by_entry_id:
        digest.update(content)
        digest.update(b"\n")
    return digest.hexdigest()
