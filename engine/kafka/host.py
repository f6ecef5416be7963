"""Where a partition's store runs: a thread of the worker, or a process of its own.

The worker's event loop fetches, publishes and commits; each owned partition's
store (log, rules, ledger: decode → dedup → rules → ledger) runs elsewhere,
one call at a time, so SQLite connections stay with the thread that opened them.

* `ThreadHost` (default): a thread of the worker process. Decoding holds the GIL,
  so partitions on threads share one core for their Python work; two run at once
  (the worker's PARTITIONS_IN_PARALLEL_MAX), so one's SQLite and numpy work, which
  releases the GIL, overlaps the other's.
* `ProcessHost` (`genki worker --partition-processes`): a process per partition
  (forked from a forkserver that has imported the engine once), so partitions
  run on every core while the worker's loop keeps the Kafka I/O. What crosses
  is data: a partition's input columns in, counts and pending outputs out.

Both answer the same calls (`call("pending_outputs")` runs
`PartitionStore.pending_outputs` on the partition's store). A partition process
that dies (a crash point, the OOM killer) stops the worker with an error; the
restart resumes from the offsets stored with the state, as after any crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import select
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool, ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from engine.errors import GenkiError
from engine.kafka.keys import Keyring
from engine.kafka.partition import PartitionStore

# Imported once by the forkserver, so a partition process starts in milliseconds.
_PRELOAD_MODULES = ["engine.kafka.hostserver", "engine.kafka.host", "engine.pipeline",
                    "engine.rules.engine"]
WORKER_WATCH_S = 0.5  # how often a partition process checks that its worker lives (no pidfd)
# The cyclic collector's first threshold (allocations less deallocations of containers)
# while a worker runs; CPython's default is 700. A cycle allocates tens of thousands of
# containers per batch (fetched records, rows for the log), so at 700 the collector ran
# over 1,100 times per 200,000 one-sample records, and its full collections walked every
# object the imports made: 0.7 of the worker's 3.0 CPU seconds. With the imports' objects
# frozen (collect_rarely): 0.13 s at 10,000, 0.015 s at 50,000 (a few MB of containers).
GC_THRESHOLD_OBJECTS = 50_000


class PartitionProcessDied(GenkiError):
    """A partition's process ended in the middle of a call."""

    code = "partition_process_died"


# The store of this partition process (ProcessHost), or of nothing (the worker itself).
_process_store: dict[str, PartitionStore] = {}


def _open(holder: dict[str, PartitionStore], data_dir: Path, number: int,
          late_window_days: int, record_keys: Keyring | None) -> bool:
    assert "store" not in holder
    store = PartitionStore.open(data_dir, number, late_window_days=late_window_days)
    store.record_keys = record_keys
    holder["store"] = store
    return store.existed


def _call(holder: dict[str, PartitionStore], name: str, *args: Any) -> Any:
    return getattr(holder["store"], name)(*args)


def _close(holder: dict[str, PartitionStore]) -> None:
    store = holder.pop("store", None)
    if store is not None:
        store.close()


def _in_process(fn: Any, *args: Any) -> Any:
    return fn(_process_store, *args)


def collect_rarely() -> tuple[int, int, int]:
    """Tune the cyclic collector for a worker process: what exists already (modules, the
    engine's imports) is frozen out of its walks, and it runs once per
    GC_THRESHOLD_OBJECTS new containers. Garbage cycles are still collected, later.
    Returns the thresholds it replaced."""
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_OBJECTS, *threshold[1:])
    return threshold


class _RarelyBlocks:
    """The blocks of collected_rarely running in this process, and the thresholds the
    first of them replaced."""

    running = 0
    replaced: tuple[int, int, int] = gc.get_threshold()


@contextlib.contextmanager
def collected_rarely() -> Iterator[None]:
    """collect_rarely while the block runs; the collector as it was once the last such
    block has ended (workers that overlap in one process, as in tests, share it)."""
    if _RarelyBlocks.running == 0:
        _RarelyBlocks.replaced = collect_rarely()
    _RarelyBlocks.running += 1
    try:
        yield
    finally:
        _RarelyBlocks.running -= 1
        if _RarelyBlocks.running == 0:
            gc.set_threshold(*_RarelyBlocks.replaced)
            gc.unfreeze()


def _start_partition_process(worker_pid: int) -> None:
    _die_with_worker(worker_pid)
    collect_rarely()  # for the process's life: it serves one partition


def _die_with_worker(worker_pid: int) -> None:
    """A partition process must not outlive its worker (its parent is the forkserver,
    which lives as long as any of its children): it holds the partition's owner.lock,
    which the worker's restart needs. A watcher thread kills it when the worker ends.

    Ctrl-C and a SIGTERM to the whole process group are the worker's to handle: it
    finishes the cycle and closes its partitions, so they ignore both."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch, args=(worker_pid,), name="genki-watch-worker",
                     daemon=True).start()


def _watch(worker_pid: int) -> None:
    try:
        pidfd = os.pidfd_open(worker_pid)
    except (OSError, AttributeError):
        pidfd = None
    if pidfd is not None:
        select.select([pidfd], [], [])  # readable once the worker has ended
    else:
        while True:
            try:
                os.kill(worker_pid, 0)
            except ProcessLookupError:
                break
            threading.Event().wait(WORKER_WATCH_S)
    os.kill(os.getpid(), signal.SIGKILL)


class ThreadHost:
    """A partition's store on a thread of its own in the worker process."""

    def __init__(self, number: int, executor: Executor | None = None) -> None:
        self.number = number
        self.existed = False
        self._holder: dict[str, PartitionStore] = {}
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix=f"genki-p{number}")

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(fn, self._holder, *args))

    async def open(self, data_dir: Path, late_window_days: int,
                   record_keys: Keyring | None) -> None:
        self.existed = await self._run(_open, data_dir, self.number, late_window_days,
                                       record_keys)

    async def call(self, name: str, *args: Any) -> Any:
        return await self._run(_call, name, *args)

    async def close(self) -> None:
        try:
            await self._run(_close)
        finally:
            self._executor.shutdown(wait=True)


class ProcessHost(ThreadHost):
    """A partition's store in a process of its own."""

    def __init__(self, number: int) -> None:
        super().__init__(number, ProcessPoolExecutor(1, mp_context=_context(),
                                                     initializer=_start_partition_process,
                                                     initargs=(os.getpid(),)))

    async def _run(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, partial(_in_process, fn, *args))
        except BrokenProcessPool:
            raise PartitionProcessDied(
                f"the process of partition {self.number} died (killed, or out of memory); "
                "restart the worker: it resumes from the offsets stored with the "
                "partition's state") from None

    async def close(self) -> None:
        with contextlib.suppress(PartitionProcessDied):  # a dead process has nothing open
            await super().close()


_contexts: list[Any] = []


def _context() -> Any:
    if not _contexts:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(_PRELOAD_MODULES)
        _contexts.append(context)
    return _contexts[0]


def new_host(number: int, processes: bool) -> ThreadHost:
    return ProcessHost(number) if processes else ThreadHost(number)
