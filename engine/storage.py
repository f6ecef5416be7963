"""How every genki SQLite file is opened: WAL, full fsync on commit, explicit transactions."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_sqlite(path: Path, *, busy_wait_s_max: float, cache_kib: int | None = None,
                ) -> sqlite3.Connection:
    """A connection in autocommit mode (callers BEGIN IMMEDIATE themselves), WAL journal and
    synchronous=FULL: a committed transaction survives power loss, not just a crash.

    check_same_thread is off because pyarrow and the API hand a connection between threads;
    every caller uses a connection from one thread at a time.
    """
    db = sqlite3.connect(path, timeout=busy_wait_s_max, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        if cache_kib is not None:
            db.execute(f"PRAGMA cache_size = -{int(cache_kib)}")
    except BaseException:
        db.close()
        raise
    return db
