"""Verification of a ledger file: every chain, link, balance, commit and signature.

Runs inside one read transaction of the store (`Ledger.verify`). The order is
commits first (remembering the chain heads each commit claims), then the
entries, flags and erasures chains checked against those claims, then the
projections (links, balances, meta) against the chains.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import orjson

from engine.ledger.canonical import (
    GENESIS_HASH,
    PersonKey,
    chain_hash,
    erasure_bytes,
    flag_bytes,
    meta_digest,
)
from engine.ledger.journal import ChainChecker
from engine.ledger.model import JOURNAL_COLUMNS, VerifyResult
from engine.ledger.signing import Verifier

VERIFY_FETCH_ROWS = 10_000
_ENTRIES_SQL = (f"SELECT {', '.join('j.' + c for c in JOURNAL_COLUMNS)}, l.entry_id, l.user_id, "
                "l.ref FROM journal AS j LEFT JOIN entry_links AS l ON l.seq = j.seq "
                "ORDER BY j.seq")
_FLAGS_SQL = ("SELECT j.seq, j.subject, j.event, j.prev_hash, j.hash, f.flag_id, f.user_id, "
              "f.flag, f.state, f.day, f.evidence, f.rules_version FROM flag_journal AS j "
              "LEFT JOIN flags AS f ON f.seq = j.seq ORDER BY j.seq")


class Failed(Exception):
    """A verification problem: where (entry seq and/or commit) and what."""

    def __init__(self, problem: str, seq: int | None = None, commit: int | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.seq = seq
        self.commit = commit


@dataclass
class Claims:
    """What the commits say the chain heads were, and the newest commit."""

    entries: dict[int, str] = field(default_factory=dict)
    flags: dict[int, str] = field(default_factory=dict)
    erasures: dict[int, str] = field(default_factory=dict)
    last: dict | None = None
    last_signed: bool = False
    commits: int = 0
    signatures: int = 0
    unsigned: int = 0
    commit_hashes: dict[int, str] = field(default_factory=dict)


def verify_ledger(db: sqlite3.Connection, progress: Callable[[int], object] | None,
                  verifier: Verifier | None, witnessed: Iterable[int] = ()) -> VerifyResult:
    keys: dict[str, PersonKey] = {}
    checker = ChainChecker()
    counts = {"flags": 0, "erasures": 0}
    claims = Claims()
    try:
        keys = _person_keys(db)
        claims = _walk_commits(db, verifier, set(witnessed))
        erased = _walk_erasures(db, claims, counts)
        checker = ChainChecker(keys, erased)
        _walk_entries(db, checker, claims, progress)
        _walk_flags(db, keys, erased, claims, counts)
        _check_heads(db, checker, claims, counts)
        balance_problems = _balance_problems(db, keys, checker)
        if verifier is not None and claims.last is not None and not claims.last_signed:
            raise Failed(f"the newest commit {claims.commits} is not signed by key "
                         f"{verifier.key_id}: it was written without the signing key, or "
                         "after the last signed head by someone without it",
                         commit=claims.commits)
    except Failed as failure:
        return VerifyResult(False, checker.seq, len(keys), checker.prev, failure.seq,
                            failure.problem, erased_entries=checker.seq - checker.linked,
                            flags_checked=counts["flags"], erasures_checked=counts["erasures"],
                            commits_checked=claims.commits,
                            signatures_checked=claims.signatures,
                            key_id=None if verifier is None else verifier.key_id,
                            first_bad_commit=failure.commit)
    return VerifyResult(not balance_problems, checker.seq, len(keys), checker.prev, None,
                        balance_problems[0] if balance_problems else None,
                        tuple(balance_problems), erased_entries=checker.seq - checker.linked,
                        flags_checked=counts["flags"], erasures_checked=counts["erasures"],
                        commits_checked=claims.commits, signatures_checked=claims.signatures,
                        key_id=None if verifier is None else verifier.key_id)


def commit_hashes(db: sqlite3.Connection) -> dict[int, str]:
    return dict(db.execute("SELECT seq, hash FROM commits"))


def _person_keys(db: sqlite3.Connection) -> dict[str, PersonKey]:
    keys = {}
    for user_id, raw, subject in db.execute("SELECT user_id, key, subject FROM person_keys"):
        key = PersonKey(raw)
        if key.subject != subject:
            raise Failed(f"the person key of user {user_id} does not give its stored subject")
        keys[user_id] = key
    return keys


def _walk_commits(db: sqlite3.Connection, verifier: Verifier | None,
                  witnessed: set[int]) -> Claims:
    claims = Claims()
    prev, heads = GENESIS_HASH, {"entries": 0, "flags": 0, "erasures": 0}
    cursor = db.execute("SELECT seq, body, prev_hash, hash, key_id, signature FROM commits "
                        "ORDER BY seq")
    for seq, body, prev_hash, stored, key_id, signature in cursor:
        entries_before = heads["entries"]
        if seq != claims.commits + 1:
            raise Failed(f"commit {claims.commits + 1} missing (next is {seq})",
                         entries_before + 1, claims.commits + 1)
        if prev_hash != prev or chain_hash(prev, body.encode()) != stored:
            raise Failed(f"commit {seq}: hash mismatch: the commit record was altered",
                         entries_before + 1, seq)
        record = orjson.loads(body)
        if record.get("seq") != seq:
            raise Failed(f"commit {seq}: its body names seq {record.get('seq')}", None, seq)
        for chain in ("entries", "flags", "erasures"):
            head_seq, head_hash = record[chain]
            if head_seq < heads[chain]:
                raise Failed(f"commit {seq}: {chain} head went back from {heads[chain]} to "
                             f"{head_seq}", None, seq)
            heads[chain] = head_seq
            if head_seq:
                getattr(claims, chain)[head_seq] = head_hash
        if verifier is not None and signature is not None:
            claims.signatures += 1
            if key_id != verifier.key_id or not verifier.valid(stored, signature):
                first = entries_before + 1 if record["entries"][0] > entries_before else None
                where = (f"entries {entries_before + 1}..{record['entries'][0]}"
                         if first else "no new entries")
                raise Failed(f"commit {seq} ({where}): the signature (key {key_id}) does not "
                             f"match key {verifier.key_id} over its hash: the ledger was "
                             "rewritten after it was signed", first, seq)
        if signature is None:
            claims.unsigned += 1
        if seq in witnessed:
            claims.commit_hashes[seq] = stored
        claims.commits, prev = seq, stored
        claims.last, claims.last_signed = record, signature is not None
    return claims


def _walk_erasures(db: sqlite3.Connection, claims: Claims, counts: dict[str, int]) -> set[str]:
    erased: set[str] = set()
    prev, expected = GENESIS_HASH, 1
    for seq, subject, reason, ts_ms, entries, flags, prev_hash, stored in db.execute(
            "SELECT seq, subject, reason, ts_ms, entries, flags, prev_hash, hash FROM erasures "
            "ORDER BY seq"):
        digest = chain_hash(prev, erasure_bytes(seq, subject, reason, ts_ms, entries, flags))
        if seq != expected or prev_hash != prev or digest != stored:
            raise Failed(f"erasure {expected}: missing or altered (hash mismatch)")
        claimed = claims.erasures.get(seq)
        if claimed is not None and claimed != stored:
            raise Failed(f"erasure {seq}: its hash is not the one a commit recorded")
        erased.add(subject)
        prev, expected = stored, expected + 1
        counts["erasures"] = seq
    return erased


def _walk_entries(db: sqlite3.Connection, checker: ChainChecker, claims: Claims,
                  progress: Callable[[int], object] | None) -> None:
    cursor = db.execute(_ENTRIES_SQL)
    claimed = claims.entries
    while True:
        rows = cursor.fetchmany(VERIFY_FETCH_ROWS)
        if not rows:
            break
        problem = checker.feed(rows)
        if problem is not None:
            cursor.close()
            raise Failed(problem.problem, problem.seq)
        for row in rows:
            expected = claimed.get(row[0])
            if expected is not None and expected != row[11]:
                raise Failed(f"seq {row[0]}: its hash is not the one commit recorded for it: "
                             "the journal was rewritten", row[0])
        if progress is not None:
            progress(len(rows))


def _walk_flags(db: sqlite3.Connection, keys: dict[str, PersonKey], erased: set[str],
                claims: Claims, counts: dict[str, int]) -> None:
    live = {key.subject for key in keys.values()}
    prev, expected, linked = GENESIS_HASH, 1, 0
    dumps = orjson.dumps
    for seq, subject, event, prev_hash, stored, *link in db.execute(_FLAGS_SQL):
        digest = chain_hash(prev, flag_bytes(seq, subject, event))
        if seq != expected or prev_hash != prev or digest != stored:
            raise Failed(f"flag event {expected}: missing or altered (hash mismatch)")
        if claims.flags.get(seq, stored) != stored:
            raise Failed(f"flag event {seq}: its hash is not the one a commit recorded")
        user_id = link[1]
        if user_id is not None:
            key = keys.get(user_id)
            if key is None or key.subject != subject or key.tag(dumps(link)) != event:
                raise Failed(f"flag event {seq} ({link[0]}) does not match its hashed event")
            linked += 1
        elif subject in live:
            raise Failed(f"flag event {seq} of a person who is not erased has lost its content")
        elif subject not in erased:
            raise Failed(f"flag event {seq} names a subject neither a person's nor erased")
        prev, expected = stored, expected + 1
        counts["flags"] = seq
    stray = db.execute("SELECT COUNT(*) FROM flags").fetchone()[0] - linked
    if stray:
        raise Failed(f"{stray} flag events are in the flags table but not in the flags chain")


def _check_heads(db: sqlite3.Connection, checker: ChainChecker, claims: Claims,
                 counts: dict[str, int]) -> None:
    last = claims.last or {"entries": [0, GENESIS_HASH], "flags": [0, GENESIS_HASH],
                           "erasures": [0, GENESIS_HASH], "meta_digest": meta_digest({})}
    recorded = tuple(last["entries"])
    if recorded != (checker.seq, checker.prev):
        raise Failed(f"journal ends at seq {checker.seq} but the newest commit records seq "
                     f"{recorded[0]}: entries were removed or added outside the ledger",
                     min(checker.seq, recorded[0]) + 1)
    flags_end = _end(db, "flag_journal")
    if tuple(last["flags"]) != flags_end:
        raise Failed(f"flags chain ends at {flags_end[0]} but the newest commit records "
                     f"{last['flags'][0]}: flag events were removed or added outside the ledger")
    erasures_end = _end(db, "erasures")
    if tuple(last["erasures"]) != erasures_end:
        raise Failed(f"erasure log ends at {erasures_end[0]} but the newest commit records "
                     f"{last['erasures'][0]}")
    stray = db.execute("SELECT COUNT(*) FROM entry_links").fetchone()[0] - checker.linked
    if stray:
        raise Failed(f"{stray} entry links name no journal entry")
    meta = dict(db.execute("SELECT key, value FROM meta"))
    if meta_digest(meta) != last["meta_digest"]:
        raise Failed("the meta table (e.g. the processed log position) differs from what the "
                     "newest commit recorded: it was edited outside the ledger")


def _end(db: sqlite3.Connection, table: str) -> tuple[int, str]:
    row = db.execute(f"SELECT seq, hash FROM {table} ORDER BY seq DESC LIMIT 1").fetchone()
    return (0, GENESIS_HASH) if row is None else (row[0], row[1])


def _balance_problems(db: sqlite3.Connection, keys: dict[str, PersonKey],
                      checker: ChainChecker) -> list[str]:
    live = {user: (points, count) for user, points, count in
            db.execute("SELECT user_id, points, entries FROM balances")}
    problems = []
    for user in sorted(set(live) | set(keys)):
        key = keys.get(user)
        if key is None:
            problems.append(f"balance of user {user}: table says {live[user]} but the ledger "
                            "holds no key for that user; run `genki ledger rebuild`")
            continue
        count = checker.counts.get(key.subject, 0)
        expected = (checker.balances.get(key.subject, 0), count) if count else None
        if live.get(user) != expected:
            problems.append(f"balance of user {user}: table says {live.get(user)}, journal "
                            f"says {expected} (points, entries); run `genki ledger rebuild`")
    return problems
