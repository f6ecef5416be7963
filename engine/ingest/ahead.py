"""Decode ahead: batches read and decoded in a second process while this one stores.

`genki ingest` spends about as long decoding a batch (pure: bytes in, columns out)
as storing the one before it (SQLite, dedup), so on a machine with two cores a
worker process reads and decodes batch N + 1 while the caller stores batch N.
Only decoding moves: every batch is still stored by the caller, in order, one
transaction each, so the log, its positions and its dead letters are the same
byte for byte, and a crash of either process leaves what a crash of the
single-process path leaves (a worker never writes anything). A thread of the
caller receives and unpickles the next batch meanwhile (most of it while the
caller waits in SQLite, which releases the GIL). Small inputs, and any input on
a machine without a spare core, are decoded in-process: there a worker costs more
than it saves.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from typing import Any, BinaryIO

from engine.ingest.decode import Activity, DecodedBatch, decode_lines
from engine.ingest.reader import BATCH_LINES_DEFAULT, LineBatch, expand_paths, iter_sources

# Decoding ahead overlaps only from the second batch on, and costs ~0.1 s (the fork, the
# batches pickled and sent): below about 32 MB of watch segments it does not pay (24 MB,
# 10,000-line batches: 0.48 s ahead against 0.39 s in one process).
DECODE_AHEAD_BYTES_MIN = 32 * 1024 * 1024
PIPE_BYTES = 1024 * 1024  # the Linux default maximum (fs.pipe-max-size)
_FD_MAX = os.sysconf("SC_OPEN_MAX")

Decoded = tuple[LineBatch, int, DecodedBatch]  # a batch, the clock it was judged by, decoded
_ACTIVITY_FIELDS = [f.name for f in fields(Activity)]


def decoded_batches(paths: list[str], now_ms: int | None,
                    batch_lines: int = BATCH_LINES_DEFAULT,
                    ahead: bool | None = None) -> Iterator[Decoded]:
    """Every batch of the paths, decoded, in order: by a worker process when `ahead`
    (None: when the files hold at least DECODE_AHEAD_BYTES_MIN and a core is spare),
    else here; stdin always here. `now_ms` None: the wall clock when each batch is
    decoded. Either way the batches are the same."""
    files = expand_paths(paths)  # a usage error is raised here, before any worker starts
    if ahead is None:
        ahead = sum(os.path.getsize(f) for f in files if f != "-") >= DECODE_AHEAD_BYTES_MIN \
            and _spare_core()
    if not ahead or "-" in files:
        yield from _decode_each(files, now_ms, batch_lines)
        return
    yield from _decode_in_worker(files, now_ms, batch_lines)


def _spare_core() -> bool:
    """Two or more usable CPUs, and a load average (1 minute) leaving about one idle: on
    a machine already busy a worker only adds its overhead (~20 % more CPU in all). The
    load counts this process too (about 1 when it has just been busy), hence the half."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return cpus >= 2 and os.getloadavg()[0] <= cpus - 0.5


def _decode_each(files: list[str], now_ms: int | None, batch_lines: int) -> Iterator[Decoded]:
    for batch in iter_sources(files, batch_lines):
        clock_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        yield batch, clock_ms, decode_lines(batch.lines, clock_ms)


def _decode_in_worker(files: list[str], now_ms: int | None,
                      batch_lines: int) -> Iterator[Decoded]:
    # fork: the worker needs no imports and gets the arguments without pickling; it only
    # reads files and runs pure functions (never the parent's SQLite connection).
    context = multiprocessing.get_context("fork")
    read_fd, write_fd = os.pipe()
    with contextlib.suppress(OSError, AttributeError):  # fewer reads of a batch (Linux)
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    worker = context.Process(target=_worker, args=(read_fd, write_fd, files, now_ms,
                                                   batch_lines),
                             name="genki-decode", daemon=True)
    worker.start()
    os.close(write_fd)
    received: queue.Queue[tuple[int, Any] | None] = queue.Queue(maxsize=1)
    stop = threading.Event()
    receiver = threading.Thread(target=_receive, args=(read_fd, received, stop),
                                name="genki-decode-receive", daemon=True)
    receiver.start()
    try:
        while (frame := received.get()) is not None:
            kind, item = frame
            if kind == _FAILED:
                raise item
            yield item
        worker.join()  # it sent its last frame: it is ending
        if worker.exitcode != 0:
            raise RuntimeError(f"the decode worker ended with exit code {worker.exitcode}")
    finally:
        stop.set()
        if worker.is_alive():  # the caller stopped early, or failed: nothing more is needed
            worker.kill()
        worker.join()
        receiver.join()


def _receive(read_fd: int, received: queue.Queue, stop: threading.Event) -> None:
    """Put each frame's batch (or failure) on `received`, then None; give up when `stop`
    is set (the consumer left)."""
    def put(frame: tuple[int, Any] | None) -> None:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                received.put(frame, timeout=0.05)
                return

    try:
        with open(read_fd, "rb", buffering=PIPE_BYTES) as pipe:
            while True:
                try:
                    kind, item = pickle.load(pipe)
                except EOFError:
                    raise RuntimeError("the decode worker ended without finishing") from None
                if kind == _DONE:
                    put(None)
                    return
                put((kind, _from_wire(item) if kind == _BATCH else item))
                if kind == _FAILED:
                    return
    except BaseException as error:  # noqa: BLE001 - the consumer raises it
        put((_FAILED, error))


# Frames: pickled (kind, payload) pairs, back to back: pickled straight into the pipe's
# buffer (pickle.dumps would build each batch's ~48 MB in memory first, growing it by
# copies) and unpickled straight from it.
_BATCH, _FAILED, _DONE = 0, 1, 2


# Activities cross as columns: unpickling an object each costs ~4 us, rebuilding ~0.5 us.
_Wire = tuple[LineBatch, int, DecodedBatch, list[tuple[Any, ...]]]


def _to_wire(item: Decoded) -> _Wire:
    batch, clock_ms, decoded = item
    activities, decoded.activities = decoded.activities, []
    columns = [tuple(getattr(a, name) for a in activities) for name in _ACTIVITY_FIELDS]
    return batch, clock_ms, decoded, columns


def _from_wire(item: _Wire) -> Decoded:
    batch, clock_ms, decoded, columns = item
    decoded.activities = list(map(Activity, *columns))
    return batch, clock_ms, decoded


def _worker(read_fd: int, write_fd: int, files: list[str], now_ms: int | None,
            batch_lines: int) -> None:
    """Send each decoded batch, then a last frame; or the exception that stopped it.

    It first closes every descriptor it inherited but its end of the pipe: it must not
    hold the log's lock file (a writer restarted after the parent was killed would find
    the log locked until this process ends) nor the log's database. Ctrl-C is the
    parent's to handle: the worker ends when the parent stops reading.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.closerange(3, write_fd)
    os.closerange(write_fd + 1, _FD_MAX)
    del read_fd  # closed with the others
    # A broken pipe: the parent stopped reading (it failed or was killed): nothing to do.
    with contextlib.suppress(BrokenPipeError), open(write_fd, "wb", buffering=PIPE_BYTES) as pipe:
        try:
            for item in _decode_each(files, now_ms, batch_lines):
                _send(pipe, _BATCH, _to_wire(item))
            _send(pipe, _DONE, None)
        except BrokenPipeError:
            raise
        except Exception as error:  # noqa: BLE001 - the parent re-raises it
            _send(pipe, _FAILED, _picklable(error))


def _send(pipe: BinaryIO, kind: int, payload: object) -> None:
    pickle.dump((kind, payload), pipe, protocol=pickle.HIGHEST_PROTOCOL)
    pipe.flush()


def _picklable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any exception that does not survive pickling
        return RuntimeError(f"decode worker: {type(error).__name__}: {error}")
    return error
