"""Canonical version 1 files: refused by name, migrated by `genki ledger migrate`."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import orjson
import pytest

from engine.cli import main
from engine.errors import LedgerError
from engine.ledger import GENESIS_HASH, Ledger

V1_ROWS = [  # entry_id, user_id, kind, points, day, ts_ms, rule, ref, rules_version
    ("a1", "P1", "award", 10, "2024-05-01", 1, "steps_tier", None, "r1"),
    ("a2", "P2", "award", 4, "2024-05-01", 2, "checkin", "V1", "r1"),
    ("d1", "P1", "redeem", -3, "2024-05-02", 3, "shop_redemption",
     '{"key":"k","shop":"S1","terminal":"T1"}', None),
]


def write_v1(path: Path) -> str:
    """A version 1 ledger as the old code wrote it; returns its content digest."""
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE entries (seq INTEGER PRIMARY KEY, entry_id TEXT NOT NULL UNIQUE,
          user_id TEXT NOT NULL, kind TEXT NOT NULL, points INTEGER NOT NULL, day TEXT,
          ts_ms INTEGER NOT NULL, rule TEXT, ref TEXT, rules_version TEXT,
          prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
        CREATE TABLE flags (seq INTEGER PRIMARY KEY, flag_id TEXT NOT NULL UNIQUE,
          user_id TEXT NOT NULL, flag TEXT NOT NULL, state TEXT NOT NULL, day TEXT NOT NULL,
          evidence TEXT NOT NULL, rules_version TEXT NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        PRAGMA user_version = 1;
    """)
    prev = GENESIS_HASH
    names = ("entry_id", "user_id", "kind", "points", "day", "ts_ms", "rule", "ref",
             "rules_version")
    for seq, row in enumerate(V1_ROWS, 1):
        canonical = orjson.dumps({**dict(zip(names, row, strict=True)), "seq": seq},
                                 option=orjson.OPT_SORT_KEYS)
        digest = hashlib.sha256(prev.encode() + canonical).hexdigest()
        db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (seq, *row, prev, digest))
        prev = digest
    db.execute("INSERT INTO flags VALUES (1, 'f1', 'P2', 'low_activity', 'raised', "
               "'2024-05-01', '{\"days\":14}', 'r1')")
    db.execute("INSERT INTO meta VALUES ('log_position', '42')")
    db.commit()
    db.close()
    contents = sorted(orjson.dumps(dict(zip(names, row, strict=True)),
                                   option=orjson.OPT_SORT_KEYS) for row in V1_ROWS)
    return hashlib.sha256(b"".join(c + b"\n" for c in contents)).hexdigest()


def test_a_version_1_ledger_is_refused_naming_the_migration(data_dir: Path) -> None:
    write_v1(data_dir / "ledger.sqlite")
    with pytest.raises(LedgerError, match="canonical version 1 ledger.*genki ledger migrate"):
        Ledger.open(data_dir)


def test_migrate_keeps_entries_flags_position_and_digest(
        data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    digest = write_v1(data_dir / "ledger.sqlite")
    assert main(["ledger", "migrate", "--json", "--data-dir", str(data_dir)]) == 0
    result = orjson.loads(capsys.readouterr().out)
    assert (result["entries"], result["flag_events"], result["content_digest"]) == (3, 1, digest)
    assert (data_dir / "ledger.sqlite.v1").exists()
    with Ledger.open(data_dir) as ledger:
        assert ledger.verify().ok
        assert (ledger.balance("P1"), ledger.balance("P2")) == (7, 4)
        assert ledger.get_meta("log_position") == "42"
        assert [f.flag_id for f in ledger.flag_history("P2")] == ["f1"]
        assert ledger.head()["content_digest"] == digest
    assert main(["ledger", "migrate", "--data-dir", str(data_dir)]) == 2  # already version 2
