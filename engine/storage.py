"""How genki keeps files: private by default, and how every SQLite file is opened.

Health records and the points ledger must not be readable by other accounts
on a shared host. `private_umask()` (called by the `genki` CLI and the API
app before anything is written) makes every directory genki creates 0700 and
every file 0600: logs, ledgers, snapshots, Parquet, keys. GENKI_UMASK (octal)
overrides it for a deployment where a group must read the data directory.
`open_sqlite` also creates its file 0600 itself (SQLite gives the -wal and
-shm files the mode of the database), so library callers get private
databases whatever their umask.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import stat
from pathlib import Path

from engine.errors import UsageError

UMASK_ENV = "GENKI_UMASK"
UMASK_DEFAULT = 0o077
DIR_MODE_PRIVATE = 0o700
FILE_MODE_PRIVATE = 0o600


def private_umask() -> int:
    """Set the process umask (GENKI_UMASK, default 077); returns the one it replaces."""
    text = os.environ.get(UMASK_ENV)
    try:
        mask = UMASK_DEFAULT if not text else int(text, 8)
    except ValueError:
        raise UsageError(f"{UMASK_ENV}={text!r}: an octal umask like 077 or 027") from None
    if not 0 <= mask <= 0o777:
        raise UsageError(f"{UMASK_ENV}={text!r}: an octal umask like 077 or 027")
    return os.umask(mask)


# Files that mark a directory as a genki data directory (whose mode genki may tighten).
DATA_DIR_MARKERS: tuple[str, ...] = ("ledger.sqlite", "log.sqlite", "api.sqlite", "api_secret")


def private_dir(path: Path) -> Path:
    """Create a data directory (and parents) private (0700 under the default umask).

    An existing one that is empty or already genki's (DATA_DIR_MARKERS), and owned
    by this account, loses the permission bits the umask removes: a directory made
    by hand (or by a test fixture) before genki's first run is private too. Any
    other existing directory is left as it is.
    """
    path.mkdir(mode=DIR_MODE_PRIVATE, parents=True, exist_ok=True)
    _tighten(path)
    return path


def _current_umask() -> int:
    """The process umask without changing it (a set-and-restore would race other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return UMASK_DEFAULT


def _tighten(path: Path) -> None:
    mask = _current_umask()
    try:
        info = path.stat()
        if info.st_uid != os.getuid() or not stat.S_IMODE(info.st_mode) & mask:
            return
        if any(True for _ in path.iterdir()) and \
                not any((path / name).exists() for name in DATA_DIR_MARKERS):
            return
        os.chmod(path, stat.S_IMODE(info.st_mode) & ~mask)
    except OSError:
        return  # not ours to change, or gone: SQLite reports what matters


def write_private_file(path: Path, data: bytes) -> bool:
    """Create `path` (0600) holding `data`, atomically: a private temporary file, fsynced,
    then hard-linked into place. False when another writer created it first (theirs wins)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE_PRIVATE)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)
        return True
    except FileExistsError:
        return False
    finally:
        temp.unlink()


def _create_private(path: Path) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE_PRIVATE)
    except OSError:
        return  # exists already, or SQLite will report why it cannot open it
    os.close(fd)


WAL_BYTES_MAX = 64 * 1024 * 1024  # a big store's write-ahead log is checkpointed at this size


def open_sqlite(path: Path, *, busy_wait_s_max: float, cache_kib: int | None = None,
                durable: bool = True, large_wal: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (callers BEGIN IMMEDIATE themselves), WAL journal and
    synchronous=FULL: a committed transaction survives power loss, not just a crash.

    `durable=False` (synchronous=NORMAL) is for bookkeeping whose loss in a power cut
    costs no money: a commit then survives a killed process but skips the fsync.
    check_same_thread is off because pyarrow and the API hand a connection between threads;
    every caller uses a connection from one thread at a time.

    `large_wal` checkpoints when the WAL holds WAL_BYTES_MAX instead of SQLite's 1,000
    pages (4 MiB), and truncates it back to that size: for stores whose transactions
    write more than 4 MiB (an ingest batch, a `genki run` chunk), which otherwise copy
    every commit's pages into the file again.
    """
    if str(path) != ":memory:" and not str(path).startswith("file:"):
        _create_private(Path(path))
    db = sqlite3.connect(path, timeout=busy_wait_s_max, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        if cache_kib is not None:
            db.execute(f"PRAGMA cache_size = -{int(cache_kib)}")
        if large_wal:
            page_bytes = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute(f"PRAGMA journal_size_limit = {WAL_BYTES_MAX}")
            db.execute(f"PRAGMA wal_autocheckpoint = {WAL_BYTES_MAX // page_bytes}")
    except BaseException:
        db.close()
        raise
    return db
