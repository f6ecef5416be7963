"""The canonical bytes and hashes of the ledger, reproducible by any runtime.

Canonical form, version 2
=========================
Version 2 makes the chains erasure-compatible (crypto-shredding) and adds a
commits chain that signed heads sign. No hashed byte links to a person once
that person's key is destroyed.

JSON rules (all records below)
------------------------------
Compact JSON, object keys sorted bytewise, UTF-8, no whitespace. Strings:
non-ASCII characters raw (not ``\\uXXXX``), ``"`` and ``\\`` backslash-escaped,
``\\b \\t \\n \\f \\r`` short escapes, other control characters below U+0020
as ``\\u00xx`` (lowercase hex), ``/`` not escaped. Integers are decimal, no
leading zeros, no exponent. This is ``orjson.dumps(obj,
option=orjson.OPT_SORT_KEYS)`` and Python's ``json.dumps(obj, sort_keys=True,
separators=(",", ":"), ensure_ascii=False).encode()`` (RFC 8785 for these
value types). ``H`` below is SHA-256, hex is lowercase.

Person keys, subjects and tags
------------------------------
Each person (user_id) gets a random 32-byte *person key* the first time the
ledger writes for them. It lives in the mutable table ``person_keys`` and is
deleted at erasure. With ``MAC(key, m)`` = keyed BLAKE2b (RFC 7693 keyed
mode: ``hashlib.blake2b(m, key=key, digest_size=16)``, libsodium's
``crypto_generichash`` with a key) as 32 hex characters::

    subject       = MAC(key, "genki.subject.v2")
    entry tag     = MAC(key, JSON [entry_id, user_id, private_ref])
    flag tag      = MAC(key, JSON [flag_id, user_id, flag, state, day,
                                   evidence, rules_version])

(Keyed BLAKE2b is a PRF in one pass; HMAC-SHA256 costs two SHA-256 passes,
2–3 times as much on the append hot path.)

``evidence`` inside the flag tag's array is the evidence object's canonical
JSON as a *string*. An entry's ``ref`` is *public* for shop kinds (``redeem``,
``refund``: the shop, terminal, idempotency key and redeemed entry that
settlement and refund bounds need) and *private* otherwise (award venues,
adjustment reasons, expired lots, whose ids derive from the user id):
``public_ref = ref if kind in (redeem, refund) else null`` and
``private_ref = ref if public_ref is null else null``.

Entries chain
-------------
An entry's canonical bytes are the JSON object with exactly these ten keys::

    day, entry (tag), kind, points, ref (public_ref), rule, rules_version,
    seq, subject, ts_ms

``day``, ``ref``, ``rule`` and ``rules_version`` may be null; ``kind`` is one
of ``award redeem refund expire adjust``. ``hash = H(prev_hash ‖ bytes)``
where ``prev_hash`` is the previous entry's hash as 64 ASCII hex bytes; seq 1
has ``prev_hash = "0" * 64`` (GENESIS_HASH); seq starts at 1 without gaps.
Example: person key = bytes 0x00 0x01 … 0x1f, user "P00017", entry_id
"e-award-1", an award of 3 points on 2024-05-01 by rule "steps_tier_3" of
rules_version "r1", ts_ms 1714575600000, ref null, seq 1. Then subject =
``b73bab35df0b7fc513c1c1db7f56ac56``, entry tag (over ``["e-award-1",
"P00017",null]``) = ``1273481aa778c11818b9f2533c83b79d``, the canonical
bytes are (one line)::

    {"day":"2024-05-01","entry":"1273481aa778c11818b9f2533c83b79d","kind":"award",
     "points":3,"ref":null,"rule":"steps_tier_3","rules_version":"r1","seq":1,
     "subject":"b73bab35df0b7fc513c1c1db7f56ac56","ts_ms":1714575600000}

and hash = ``d2e00957e1d926255ee866b13fcc1722cd1f5e47737423aa8ed99a51f141b596``
(tests/test_ledger_canonical.py reproduces this with hashlib and json).

The plain ``entry_id``, ``user_id`` and private ref live in the mutable table
``entry_links`` (seq → ids); verify recomputes each linked entry's tag and
subject from the person key, so a link cannot be moved to another person or
entry. Erasure deletes the key and the links; the chain still verifies and
keeps what settlement needs (kind, points, day, ts_ms, shop ref), and a
subject's running balance can still be checked never to go below zero.

Flags chain
-----------
A flag event's canonical bytes are ``{"event": flag tag, "seq": n,
"subject": s}``, chained like entries (own seq from 1, own genesis). The flag
itself (name, state, day, evidence) lives only in the mutable ``flags`` table.

Erasures chain
--------------
An erasure's canonical bytes are ``{"entries": n, "flags": m, "reason": text,
"seq": k, "subject": s, "ts_ms": t}`` (how many entries and flag events lost
their link), chained the same way. No user id is stored.

Commits chain
-------------
Every write transaction that changes anything appends one commit whose bytes
are::

    {"entries": [seq, hash], "erasures": [seq, hash], "flags": [seq, hash],
     "meta": {key: value written by this transaction},
     "meta_digest": H(JSON of the whole meta table after it),
     "seq": c, "ts_ms": t, "v": 2}

(the three pairs are the chain heads after the transaction; ``[0, GENESIS]``
for an empty chain; ``ts_ms`` is the wall clock, which never enters the
content digest) and ``hash = H(prev_commit_hash ‖ bytes)``. The processed log
position is a meta value, so it is covered.

Signed heads
------------
With a signing key configured, a commit carries an Ed25519 signature
(RFC 8032) over the ASCII bytes ``"genki.ledger.commit.v2:" ‖ hash`` and the
key id ``hex(H(raw 32-byte public key))[:16]``. The commit hash covers all
chains, so a valid signature on the newest commit authenticates everything
before it.

Content digest (runtime and key independent)
--------------------------------------------
Per-person keys are random, so chain hashes differ between data directories;
the content digest does not. A linked entry's content bytes are the JSON of
the nine keys ``day, entry_id, kind, points, ref (full), rule, rules_version,
ts_ms, user_id`` (as in version 1). An erased entry's content bytes are the
same nine keys with ``entry_id`` and ``user_id`` null and ``ref`` the public
ref. Linked contents sorted by entry_id (bytewise UTF-8), then erased
contents sorted bytewise::

    content_digest = H(c_1 ‖ "\\n" ‖ c_2 ‖ "\\n" ‖ … ‖ c_n ‖ "\\n")

Two runtimes fed the same input (and erasing the same people) agree on it
whatever their batch sizes, orders, restarts or keys.

Seq digest (a partition snapshot's check)
-----------------------------------------
The same content bytes (erased entries as above) chained in seq order::

    d_0 = GENESIS_HASH,  d_s = hex(H(d_{s-1} ‖ c_s))

Unlike the content digest it extends: a Kafka partition records d_s of its ledger
in each snapshot it publishes, at the cost of the entries since the last one, and a
new owner that rebuilt the ledger from genki.ledger (same seqs, same order) must
reach the same value. An erasure changes earlier contents, so it starts d over.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import orjson

CANONICAL_VERSION = 2
HASH_HEX_CHARS = 64
TAG_BYTES = 16
TAG_HEX_CHARS = 2 * TAG_BYTES
PERSON_KEY_BYTES = 32
GENESIS_HASH = "0" * HASH_HEX_CHARS
SUBJECT_MESSAGE = b"genki.subject.v2"
SIGNATURE_PREFIX = b"genki.ledger.commit.v2:"
SHOP_KINDS: frozenset[str] = frozenset({"redeem", "refund"})
CANONICAL_KEYS: tuple[str, ...] = (
    "day", "entry", "kind", "points", "ref", "rule", "rules_version", "seq", "subject", "ts_ms",
)
_SORT = orjson.OPT_SORT_KEYS


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=_SORT)


class PersonKey:
    """The keyed BLAKE2b MAC of one person key, its keyed state prepared once."""

    __slots__ = ("_keyed", "subject")

    def __init__(self, key: bytes) -> None:
        assert len(key) == PERSON_KEY_BYTES, "person keys are 32 bytes"
        self._keyed = hashlib.blake2b(key=key, digest_size=TAG_BYTES)
        self.subject = self.tag(SUBJECT_MESSAGE)

    def pads(self) -> tuple[Any, str]:
        """(keyed state, subject) for loops that inline tag()."""
        return self._keyed, self.subject

    def tag(self, message: bytes) -> str:
        mac = self._keyed.copy()
        mac.update(message)
        return mac.hexdigest()


def split_ref(kind: str, ref: str | None) -> tuple[str | None, str | None]:
    """(public_ref, private_ref) of an entry."""
    return (ref, None) if kind in SHOP_KINDS else (None, ref)


def entry_tag(key: PersonKey, entry_id: str, user_id: str, private_ref: str | None) -> str:
    return key.tag(orjson.dumps([entry_id, user_id, private_ref]))


def flag_tag(key: PersonKey, flag_id: str, user_id: str, flag: str, state: str, day: str,
             evidence: str, rules_version: str) -> str:
    return key.tag(orjson.dumps([flag_id, user_id, flag, state, day, evidence, rules_version]))


def canonical_bytes(seq: int, subject: str, entry: str, kind: str, points: int,
                    day: str | None, ts_ms: int, rule: str | None, public_ref: str | None,
                    rules_version: str | None) -> bytes:
    """The bytes an entry's hash covers (see the module docstring)."""
    return dumps({"day": day, "entry": entry, "kind": kind, "points": points, "ref": public_ref,
                  "rule": rule, "rules_version": rules_version, "seq": seq, "subject": subject,
                  "ts_ms": ts_ms})


def flag_bytes(seq: int, subject: str, event: str) -> bytes:
    return dumps({"event": event, "seq": seq, "subject": subject})


def erasure_bytes(seq: int, subject: str, reason: str, ts_ms: int, entries: int,
                  flags: int) -> bytes:
    return dumps({"entries": entries, "flags": flags, "reason": reason, "seq": seq,
                  "subject": subject, "ts_ms": ts_ms})


def commit_bytes(seq: int, ts_ms: int, entries: tuple[int, str], flags: tuple[int, str],
                 erasures: tuple[int, str], meta: dict[str, str], meta_digest: str) -> bytes:
    return dumps({"entries": list(entries), "erasures": list(erasures), "flags": list(flags),
                  "meta": meta, "meta_digest": meta_digest, "seq": seq, "ts_ms": ts_ms, "v": 2})


def meta_digest(meta: dict[str, str]) -> str:
    return hashlib.sha256(dumps(meta)).hexdigest()


def signed_message(commit_hash: str) -> bytes:
    assert len(commit_hash) == HASH_HEX_CHARS
    return SIGNATURE_PREFIX + commit_hash.encode("ascii")


def content_bytes(entry_id: str | None, user_id: str | None, kind: str, points: int,
                  day: str | None, ts_ms: int, rule: str | None, ref: str | None,
                  rules_version: str | None) -> bytes:
    """What two runtimes must agree on (erased entries: ids None, ref the public ref)."""
    return dumps({"day": day, "entry_id": entry_id, "kind": kind, "points": points, "ref": ref,
                  "rule": rule, "rules_version": rules_version, "ts_ms": ts_ms,
                  "user_id": user_id})


def chain_hash(prev_hash: str, canonical: bytes) -> str:
    assert len(prev_hash) == HASH_HEX_CHARS, "prev_hash must be 64 hex characters"
    return hashlib.sha256(prev_hash.encode("ascii") + canonical).hexdigest()


def content_digest(contents_in_order: Iterable[bytes]) -> str:
    """SHA-256 over content bytes, each followed by a newline, in digest order."""
    digest = hashlib.sha256()
    for content in contents_in_order:
        digest.update(content)
        digest.update(b"\n")
    return digest.hexdigest()


def seq_digest(digest: str, contents_in_seq_order: Iterable[bytes]) -> str:
    """`digest` (d_s) extended over the content bytes of the entries after s, in seq order."""
    sha256 = hashlib.sha256
    for content in contents_in_seq_order:
        digest = sha256(digest.encode("ascii") + content).hexdigest()
    return digest


def digest_of_contents(linked: Iterable[tuple[str, bytes]], erased: Iterable[bytes]) -> str:
    """The content digest from (entry_id, content) of linked entries and erased contents."""
    ordered = sorted(linked, key=lambda item: item[0].encode())
    return content_digest([content for _, content in ordered] + sorted(erased))
