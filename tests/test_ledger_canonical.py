"""Canonical form version 2: the documented bytes, reproduced without the engine's code."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.entries import EntryDraft
from engine.ledger import GENESIS_HASH, Ledger, canonical_bytes, chain_hash
from engine.ledger.canonical import (
    CANONICAL_VERSION,
    PersonKey,
    commit_bytes,
    entry_tag,
    flag_bytes,
    flag_tag,
    meta_digest,
)
from engine.ledger.journal import chain, normalise
from engine.schemas import EntryKind
from tests.test_ledger import award, debit, flag

SPEC_KEY = bytes(range(32))
SPEC_BYTES = (b'{"day":"2024-05-01","entry":"1273481aa778c11818b9f2533c83b79d","kind":"award",'
              b'"points":3,"ref":null,"rule":"steps_tier_3","rules_version":"r1","seq":1,'
              b'"subject":"b73bab35df0b7fc513c1c1db7f56ac56","ts_ms":1714575600000}')
SPEC_HASH = "d2e00957e1d926255ee866b13fcc1722cd1f5e47737423aa8ed99a51f141b596"


# -- an independent implementation, from the docstring of engine.ledger.canonical ---------

def _j(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _tag(key: bytes, message: bytes) -> str:
    return hashlib.blake2b(message, key=key, digest_size=16).hexdigest()


def spec_entry_hash(key: bytes, prev: str, seq: int, entry_id: str, user_id: str, kind: str,
                    points: int, day: str | None, ts_ms: int, rule: str | None,
                    ref: str | None, rules_version: str | None) -> tuple[bytes, str]:
    public = ref if kind in ("redeem", "refund") else None
    private = None if public is not None else ref
    body = _j({"day": day, "entry": _tag(key, _j([entry_id, user_id, private])), "kind": kind,
               "points": points, "ref": public, "rule": rule, "rules_version": rules_version,
               "seq": seq, "subject": _tag(key, b"genki.subject.v2"), "ts_ms": ts_ms})
    return body, hashlib.sha256(prev.encode() + body).hexdigest()


# -------------------------------------------------------------------------------------------


def test_canonical_version_is_2() -> None:
    assert CANONICAL_VERSION == 2


def test_spec_example_is_reproduced_by_the_independent_implementation() -> None:
    body, digest = spec_entry_hash(SPEC_KEY, GENESIS_HASH, 1, "e-award-1", "P00017", "award", 3,
                                   "2024-05-01", 1714575600000, "steps_tier_3", None, "r1")
    assert (body, digest) == (SPEC_BYTES, SPEC_HASH)
    key = PersonKey(SPEC_KEY)
    engine_bytes = canonical_bytes(1, key.subject, entry_tag(key, "e-award-1", "P00017", None),
                                   "award", 3, "2024-05-01", 1714575600000, "steps_tier_3", None,
                                   "r1")
    assert engine_bytes == SPEC_BYTES
    assert chain_hash(GENESIS_HASH, engine_bytes) == SPEC_HASH


def test_hot_chain_loop_equals_the_spec_for_every_kind() -> None:
    redemption = debit("P1", 2, "k1")
    drafts = [award("P1", 5, 1), EntryDraft("a2", "P1", EntryKind.award, 1, "2024-05-01", 7,
                                            "checkin", "venue:V1", "r1"), redemption]
    keys = {"P1": PersonKey(SPEC_KEY)}
    rows, journal = chain(normalise(drafts), 0, GENESIS_HASH, keys)
    prev = GENESIS_HASH
    for row, hashed in zip(rows, journal, strict=True):
        seq, entry_id, user_id, kind, points, day, ts_ms, rule, ref, version, _, stored = row
        body, digest = spec_entry_hash(SPEC_KEY, prev, seq, entry_id, user_id, kind, points, day,
                                       ts_ms, rule, ref, version)
        assert digest == stored == hashed[11]
        assert orjson.loads(body)["ref"] == hashed[8]
        prev = digest
    assert journal[1][8] is None  # a venue is private
    assert journal[2][8] == redemption.ref  # a shop ref is public (settlement)


def test_person_key_mac_equals_the_standard_library() -> None:
    key = PersonKey(SPEC_KEY)
    for message in (b"", b"x", b"genki.subject.v2", bytes(200)):
        assert key.tag(message) == _tag(SPEC_KEY, message)
    assert key.subject == "b73bab35df0b7fc513c1c1db7f56ac56"


text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)


@settings(max_examples=150, deadline=None)
@given(text, text, st.none() | text, st.integers(-(2**53), 2**53))
def test_canonical_bytes_equal_python_json_for_any_text(entry_id: str, user_id: str,
                                                        ref: str | None, number: int) -> None:
    key = PersonKey(SPEC_KEY)
    tag = entry_tag(key, entry_id, user_id, ref)
    assert tag == _tag(SPEC_KEY, _j([entry_id, user_id, ref]))
    canonical = canonical_bytes(number, key.subject, tag, "award", number, None, number, ref,
                                ref, None)
    assert canonical == _j({"day": None, "entry": tag, "kind": "award", "points": number,
                            "ref": ref, "rule": ref, "rules_version": None, "seq": number,
                            "subject": key.subject, "ts_ms": number})


def _rows(path: Path, sql: str) -> list[tuple]:
    raw = sqlite3.connect(path)
    try:
        return raw.execute(sql).fetchall()
    finally:
        raw.close()


def test_stored_flags_and_commits_follow_the_spec(data_dir: Path) -> None:
    with Ledger.open(data_dir) as ledger:
        ledger.append([award("P1", 2, 1)], flags=[flag("f1", "P1", "raised", "2024-05-01")],
                      meta={"log_position": "7"})
        path = ledger.path
    (key_bytes,) = _rows(path, "SELECT key FROM person_keys WHERE user_id = 'P1'")[0]
    key = PersonKey(key_bytes)
    (seq, subject, event, prev, digest), = _rows(path, "SELECT * FROM flag_journal")
    evidence = _j({"days": 14, "median_steps": 1200}).decode()
    assert event == _tag(key_bytes, _j(["f1", "P1", "low_activity", "raised", "2024-05-01",
                                        evidence, "r1"]))
    assert event == flag_tag(key, "f1", "P1", "low_activity", "raised", "2024-05-01", evidence,
                             "r1")
    assert subject == key.subject
    assert digest == hashlib.sha256(prev.encode() + _j({"event": event, "seq": 1,
                                                        "subject": subject})).hexdigest()
    assert flag_bytes(seq, subject, event) == _j({"event": event, "seq": 1, "subject": subject})
    (_, body, commit_prev, commit_hash, key_id, signature), = _rows(path, "SELECT * FROM commits")
    record = orjson.loads(body)
    entries_head = _rows(path, "SELECT seq, hash FROM journal")[0]
    assert record["entries"] == list(entries_head)
    assert record["flags"] == [1, digest]
    assert record["erasures"] == [0, GENESIS_HASH]
    assert record["meta"] == {"log_position": "7"}
    assert record["meta_digest"] == hashlib.sha256(_j({"log_position": "7"})).hexdigest()
    assert record["meta_digest"] == meta_digest({"log_position": "7"})
    assert (record["seq"], record["v"], commit_prev) == (1, 2, GENESIS_HASH)
    assert body.encode() == _j(record) == commit_bytes(
        1, record["ts_ms"], tuple(record["entries"]), tuple(record["flags"]),
        tuple(record["erasures"]), record["meta"], record["meta_digest"])
    assert commit_hash == hashlib.sha256(GENESIS_HASH.encode() + body.encode()).hexdigest()
    assert (key_id, signature) == (None, None)


def _spec_seq_digest(drafts_in_seq_order: list[tuple[EntryDraft, bool]]) -> str:
    """canonical.py "Seq digest", from the text: each entry's nine-key content in seq order,
    an erased one with null ids and only its public ref (redemptions' and refunds')."""
    digest = GENESIS_HASH
    for draft, erased in drafts_in_seq_order:
        public = draft.ref if draft.kind.value in ("redeem", "refund") else None
        content = _j({"day": draft.day, "entry_id": None if erased else draft.entry_id,
                      "kind": draft.kind.value, "points": draft.points,
                      "ref": public if erased else draft.ref, "rule": draft.rule,
                      "rules_version": draft.rules_version, "ts_ms": draft.ts_ms,
                      "user_id": None if erased else draft.user_id})
        digest = hashlib.sha256(digest.encode() + content).hexdigest()
    return digest


def test_the_seq_digest_follows_the_spec_extends_and_starts_over_after_an_erasure(
        tmp_path: Path) -> None:
    first = [award("P1", 5, 1), award("P2", 3, 1), debit("P1", 2, "k1")]
    second = [award("P2", 4, 2), award("P1", 1, 2)]
    with Ledger.open(tmp_path / "a") as ledger, Ledger.open(tmp_path / "b") as other:
        ledger.append(first)
        at_first = ledger.seq_digest()
        assert at_first.seq == 3
        assert at_first.digest == _spec_seq_digest([(d, False) for d in first])
        ledger.append(second)
        extended = ledger.seq_digest(at_first)
        assert extended == ledger.seq_digest()
        assert extended.digest == _spec_seq_digest([(d, False) for d in first + second])
        other.append(first + second)  # other person keys, same contents: same digest
        assert other.seq_digest().digest == extended.digest
        ledger.erase_user("P1", "test")
        after = ledger.seq_digest(extended)  # stale: recomputed from the first entry
        assert after.erasures == extended.erasures + 1
        assert after.digest == _spec_seq_digest(
            [(d, d.user_id == "P1") for d in first + second])
        assert after == ledger.seq_digest()
