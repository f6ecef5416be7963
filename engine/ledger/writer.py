"""Award appends in a forked process, so a caller's next batch overlaps this one's append.

`genki run` alternates reading + rules (its process) with the ledger append
(hashing, SQLite rows, the fsynced commit), about half of the work each. Both
hold the GIL for most of it (executemany binds every row in Python), so a thread
gains nothing; a forked child with its own connection to the ledger file does
the appends while the parent evaluates the next chunk.

The child is forked before the parent opens the ledger (or the log), so no SQLite
connection or lock state crosses the fork, and opens the ledger itself (the same
file and signing key: `Ledger.open(data_dir)`). The pair lives and dies as one process: the child dies with the parent
(PR_SET_PDEATHSIG), and a child killed by a signal takes the parent with it
(the same signal), so a kill -9 at any crash point leaves what a single process
would. An append the child refuses (any exception) is rolled back there and
repeated by the parent in its own process, which raises the same error from the
same checks (or succeeds, e.g. after a busy ledger), then appends in-process.

Linux only (prctl); elsewhere `AwardWriter.start` returns None and the caller
appends in-process.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from engine.entries import Awards
from engine.errors import LedgerError
from engine.ledger.store import Ledger
from engine.schemas import FlagEvent

_PR_SET_PDEATHSIG = 1

Append = tuple[Awards, Sequence[FlagEvent], Mapping[str, str]]


class AwardWriter:
    """One append at a time in flight: `submit`, then `wait` before the next `submit`."""

    def __init__(self, process: Any, connection: Connection) -> None:
        self._ledger: Ledger | None = None  # the caller's, for appends in this process
        self._process = process
        self._connection = connection
        self._pending: Append | None = None
        self._inline = False  # the child refused an append: the rest run in this process

    @classmethod
    def start(cls, data_dir: Path) -> AwardWriter | None:
        """A writer appending to data_dir's ledger, or None where it cannot fork (not
        Linux). Call it before this process opens that ledger."""
        if not sys.platform.startswith("linux"):
            return None
        context = multiprocessing.get_context("fork")
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_serve, args=(Path(data_dir), child_end, os.getpid()),
                                  name="genki-ledger-writer", daemon=True)
        process.start()
        child_end.close()
        return cls(process, parent_end)

    def submit(self, ledger: Ledger, awards: Awards, flags: Sequence[FlagEvent],
               meta: Mapping[str, str]) -> None:
        """Start appending (`ledger.append_awards`, in the child on its own connection to
        the same file); returns at once."""
        assert self._pending is None, "wait for the append in flight first"
        self._ledger = ledger
        self._pending = (awards, flags, meta)
        if not self._inline:
            try:
                self._connection.send(self._pending)
            except OSError:
                self._child_died()

    def wait(self) -> None:
        """Until the append in flight is committed; raises what the append raises."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if not self._inline:
            try:
                refused = self._connection.recv()
            except (EOFError, OSError):
                self._child_died()
            if refused is None:
                return
            self._inline = True
            self._stop()
        assert self._ledger is not None
        self._ledger.append_awards(pending[0], flags=pending[1], meta=pending[2])

    def close(self) -> None:
        """Let the append in flight finish (its outcome unread), then stop the child."""
        if self._pending is not None and not self._inline:
            try:
                self._connection.recv()
            except (EOFError, OSError):
                self._child_died()
        self._pending = None
        self._stop()

    def _stop(self) -> None:
        if self._process is None:
            return
        try:
            self._connection.send(None)
        except OSError:
            pass
        self._process.join()
        self._connection.close()
        code, self._process = self._process.exitcode, None
        if code is not None and code < 0:
            _die_like(-code)

    def _child_died(self) -> None:
        self._process.join()
        code = self._process.exitcode
        if code is not None and code < 0:
            _die_like(-code)
        raise LedgerError(f"the ledger writer process ended (exit {code}) during an append; "
                          "the ledger holds every chunk committed before it: run again")


def _die_like(signal_number: int) -> None:
    """The child was killed by a signal: so is this process (one run, one fate)."""
    os.kill(os.getpid(), signal_number)
    raise LedgerError(f"the ledger writer process was killed by signal {signal_number}")


def _serve(data_dir: Path, connection: Connection, parent_pid: int) -> None:
    """The child: append what arrives until None or the parent's end closes. Ends with
    os._exit: nothing the parent's other threads may have held at the fork (stdout's
    lock, say) is touched on the way out."""
    code = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl
            return
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is the parent's to handle
        _append_until_done(data_dir, connection)
        code = 0
    finally:
        os._exit(code)


def _append_until_done(data_dir: Path, connection: Connection) -> None:
    ledger: Ledger | None = None
    try:
        while True:
            try:
                message = connection.recv()
            except EOFError:
                return
            if message is None:
                return
            awards, flags, meta = message
            try:
                ledger = ledger or Ledger.open(data_dir)
                ledger.append_awards(awards, flags=flags, meta=meta)
            except Exception as error:  # noqa: BLE001 (the parent repeats it to raise it)
                connection.send(f"{type(error).__name__}: {error}")
                return
            connection.send(None)
    finally:
        if ledger is not None:
            ledger.close()
