"""`genki ledger migrate`: rewrite a canonical version 1 ledger as version 2.

Version 1 hashed user ids in clear, so its chain cannot survive an erasure.
The migration checks the old chain, replays its entries (in seq order), flag
events and meta into a new version 2 file, checks that the content digest is
unchanged (the digest's definition did not change for unerased entries), and
keeps the old file beside the new one as `ledger.sqlite.v1`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import orjson

from engine.entries import EntryDraft
from engine.errors import LedgerError, UsageError
from engine.ledger.canonical import GENESIS_HASH, content_bytes, content_digest
from engine.ledger.store import LEDGER_FILE_NAME, Ledger
from engine.schemas import EntryKind, FlagEvent

MIGRATE_BATCH_ENTRIES = 100_000
V1_SUFFIX = ".v1"
_STAGING_DIR_NAME = ".ledger-migrate"


def _v1_canonical(row: tuple) -> bytes:
    seq, entry_id, user_id, kind, points, day, ts_ms, rule, ref, rules_version = row[:10]
    return orjson.dumps({"day": day, "entry_id": entry_id, "kind": kind, "points": points,
                         "ref": ref, "rule": rule, "rules_version": rules_version, "seq": seq,
                         "ts_ms": ts_ms, "user_id": user_id}, option=orjson.OPT_SORT_KEYS)


def _read_v1(path: Path) -> tuple[list[tuple], list[tuple], dict[str, str]]:
    db = sqlite3.connect(path)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != 1:
            raise UsageError(f"{path} is ledger version {version}, not 1: nothing to migrate")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        entries = db.execute("SELECT seq, entry_id, user_id, kind, points, day, ts_ms, rule, "
                             "ref, rules_version, prev_hash, hash FROM entries ORDER BY seq"
                             ).fetchall()
        flags = db.execute("SELECT flag_id, user_id, flag, state, day, evidence, rules_version "
                           "FROM flags ORDER BY seq").fetchall()
        meta = dict(db.execute("SELECT key, value FROM meta"))
    finally:
        db.close()
    prev = GENESIS_HASH
    for row in entries:
        if row[10] != prev or hashlib.sha256(prev.encode() + _v1_canonical(row)).hexdigest() \
                != row[11]:
            raise LedgerError(f"{path}: the version 1 chain is broken at seq {row[0]}; "
                              "refusing to migrate it")
        prev = row[11]
    return entries, flags, meta


def migrate_v1(data_dir: Path, signing_key: Path | None = None) -> dict[str, Any]:
    data_dir = Path(data_dir)
    path = data_dir / LEDGER_FILE_NAME
    if not path.exists():
        raise UsageError(f"{path} does not exist: nothing to migrate")
    entries, flags, meta = _read_v1(path)
    old_digest = content_digest(content_bytes(*row[1:10])
                                for row in sorted(entries, key=lambda r: r[1].encode()))
    staging = data_dir / _STAGING_DIR_NAME
    shutil.rmtree(staging, ignore_errors=True)
    with Ledger.open(staging, signing_key=signing_key) as ledger:
        for start in range(0, len(entries), MIGRATE_BATCH_ENTRIES):
            ledger.append([EntryDraft(row[1], row[2], EntryKind(row[3]), row[4], row[5], row[6],
                                      row[7], row[8], row[9])
                           for row in entries[start:start + MIGRATE_BATCH_ENTRIES]])
        ledger.append([], flags=[FlagEvent(v=1, flag_id=f[0], user_id=f[1], flag=f[2],
                                           state=f[3], day=f[4], evidence=orjson.loads(f[5]),
                                           rules_version=f[6]) for f in flags],
                      meta=meta or None)
        head = ledger.head()
        verified = ledger.verify()
        ledger.checkpoint()
    if head["content_digest"] != old_digest or not verified.ok:
        raise LedgerError(f"migration check failed (digest {head['content_digest']} vs "
                          f"{old_digest}, verify {verified.problem}); {path} is unchanged")
    backup = path.with_name(path.name + V1_SUFFIX)
    os.replace(path, backup)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    os.replace(staging / LEDGER_FILE_NAME, path)
    shutil.rmtree(staging, ignore_errors=True)
    return {"entries": head["entries"], "flag_events": head["flag_events"],
            "content_digest": head["content_digest"], "old_file": str(backup),
            "canonical_version": head["canonical_version"]}
