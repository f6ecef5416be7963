"""Snapshots of the rules engine's state at a log position, checksummed.

A snapshot is written after the ledger has committed the position it reflects, so
its position is never ahead of the ledger's; a reader checks that and everything
else it depends on (format, checksum, rules version, profiles, late window) and
treats any mismatch as "no snapshot": the caller then replays, slower but never
wrong. Files live in `<data dir>/snapshots/`, named by position, written to a
temporary name, fsynced and renamed, so a kill -9 leaves either the old files or
the new one complete. The newest SNAPSHOTS_KEPT are kept (an older one is the
fallback when the newest is damaged).

Layout: MAGIC | header length (u64 LE) | header JSON | array bytes | SHA-256 of
all that. The same bytes travel on the `genki.snapshots` topic in chunks.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
import orjson

from engine.errors import GenkiError
from engine.faults import crash_point
from engine.rules.engine import EngineState

log = logging.getLogger(__name__)

SNAPSHOT_DIR_NAME = "snapshots"
SNAPSHOT_SUFFIX = ".snap"
SNAPSHOTS_KEPT = 2
MAGIC = b"GENKI-SNAPSHOT-1\n"
HEADER_BYTES_MAX = 64 * 1024 * 1024
FILE_MODE = 0o600
_DIGEST_BYTES = 32
_LENGTH = struct.Struct("<Q")
_HASH_CHUNK_BYTES = 16 * 1024 * 1024


class SnapshotInvalid(GenkiError):
    """A snapshot's bytes are damaged or not a snapshot."""

    code = "snapshot_invalid"


@dataclass
class SnapshotInfo:
    """What a snapshot reflects and depends on (all checked before it is used)."""

    position: int  # log position whose effects it holds
    rules_version: str
    profiles_digest: str
    late_window_days: int
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. Kafka offsets

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _header(state: EngineState, info: SnapshotInfo) -> tuple[bytes, list[np.ndarray]]:
    arrays, entries, offset = [], [], 0
    for name in sorted(state.arrays):
        array = np.ascontiguousarray(state.arrays[name])
        assert array.dtype.kind in "biuf", f"{name}: only numeric arrays go into snapshots"
        entries.append([name, array.dtype.str, list(array.shape), offset, array.nbytes])
        arrays.append(array)
        offset += array.nbytes
    header = orjson.dumps({"info": info.as_dict(), "meta": state.meta, "arrays": entries},
                          option=orjson.OPT_SERIALIZE_NUMPY)
    assert len(header) <= HEADER_BYTES_MAX
    return header, arrays


class Writable(Protocol):
    def write(self, data: bytes | memoryview, /) -> int: ...


def write_to(stream: Writable, state: EngineState, info: SnapshotInfo) -> int:
    """Stream a snapshot into a binary file; returns its size in bytes."""
    header, arrays = _header(state, info)
    digest = hashlib.sha256()
    size = 0
    parts: list[bytes | memoryview] = [MAGIC, _LENGTH.pack(len(header)), header]
    parts += [a.reshape(-1).view(np.uint8).data for a in arrays]
    for part in parts:
        digest.update(part)
        stream.write(part)
        size += len(part)
    stream.write(digest.digest())
    return size + _DIGEST_BYTES


def decode(data: bytes | mmap.mmap | memoryview) -> tuple[EngineState, SnapshotInfo]:
    """Check and parse snapshot bytes (arrays are read-only views of `data`)."""
    view = memoryview(data)
    if len(view) < len(MAGIC) + _LENGTH.size + _DIGEST_BYTES or view[:len(MAGIC)] != MAGIC:
        raise SnapshotInvalid("not a genki snapshot (bad magic or too short)")
    body_end = len(view) - _DIGEST_BYTES
    digest = hashlib.sha256()
    for lo in range(0, body_end, _HASH_CHUNK_BYTES):
        digest.update(view[lo:min(lo + _HASH_CHUNK_BYTES, body_end)])
    if digest.digest() != bytes(view[body_end:]):
        raise SnapshotInvalid("snapshot checksum mismatch (damaged bytes)")
    (header_len,) = _LENGTH.unpack(view[len(MAGIC):len(MAGIC) + _LENGTH.size])
    start = len(MAGIC) + _LENGTH.size
    header = orjson.loads(bytes(view[start:start + header_len]))
    body = start + header_len
    arrays = {}
    for name, dtype, shape, offset, nbytes in header["arrays"]:
        if body + offset + nbytes > body_end:
            raise SnapshotInvalid(f"snapshot array {name} runs past the end")
        flat = np.frombuffer(data, np.dtype(dtype), count=nbytes // np.dtype(dtype).itemsize,
                             offset=body + offset)
        arrays[name] = flat.reshape(shape)
    return EngineState(arrays, header["meta"]), SnapshotInfo(**header["info"])


def snapshot_dir(data_dir: Path) -> Path:
    return data_dir / SNAPSHOT_DIR_NAME


def snapshot_files(data_dir: Path) -> list[tuple[int, Path]]:
    """(position, path) of the snapshot files, newest first."""
    directory = snapshot_dir(data_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        stem = path.name.removesuffix(SNAPSHOT_SUFFIX)
        if path.name.endswith(SNAPSHOT_SUFFIX) and stem.startswith("engine-") and \
                stem[7:].isdigit():
            found.append((int(stem[7:]), path))
    return sorted(found, reverse=True)


def write_snapshot(data_dir: Path, state: EngineState, info: SnapshotInfo) -> Path:
    """Write atomically (temporary file, fsync, rename, fsync of the directory)."""
    directory = snapshot_dir(data_dir)
    directory.mkdir(mode=0o700, exist_ok=True)
    for stale in directory.glob("*.tmp"):
        stale.unlink()
    final = directory / f"engine-{info.position:012d}{SNAPSHOT_SUFFIX}"
    temporary = final.with_name(final.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as stream:
        write_to(_CrashingWriter(stream), state, info)
        stream.flush()
        os.fsync(stream.fileno())
    crash_point("snapshot_before_rename")
    os.replace(temporary, final)
    _fsync_dir(directory)
    crash_point("snapshot_after_rename")
    for _, older in snapshot_files(data_dir)[SNAPSHOTS_KEPT:]:
        older.unlink()
    return final


class _CrashingWriter:
    """Passes writes through; the `snapshot_mid_write` crash point fires after the
    header, with the arrays not yet written."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._writes = 0

    def write(self, data: bytes | memoryview) -> int:
        self._writes += 1
        if self._writes == 4:
            self._stream.flush()
            crash_point("snapshot_mid_write")
        return self._stream.write(data)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_snapshots(data_dir: Path) -> int:
    """Delete every snapshot (e.g. after an erasure: they hold per-person state); the
    next run rebuilds the rules state from the log. Returns how many were removed."""
    files = snapshot_files(data_dir)
    for _, path in files:
        path.unlink()
    return len(files)


def read_snapshot(path: Path) -> tuple[EngineState, SnapshotInfo]:
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size == 0:
            raise SnapshotInvalid(f"{path.name} is empty")
        mapped = mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ)
    return decode(mapped)


def iter_valid(data_dir: Path, position_max: int) -> Iterator[tuple[EngineState, SnapshotInfo]]:
    """Snapshots not ahead of position_max whose bytes check out, newest first; damaged
    or stale ones are named in the log and skipped."""
    for position, path in snapshot_files(data_dir):
        if position > position_max:
            log.warning("snapshot %s is ahead of the ledger's position %d: ignored",
                        path, position_max)
            continue
        try:
            state, info = read_snapshot(path)
        except (SnapshotInvalid, OSError, ValueError, KeyError, TypeError) as error:
            log.warning("snapshot %s is unusable (%s): ignored", path, error)
            continue
        if info.position != position:
            log.warning("snapshot %s says position %d: ignored", path, info.position)
            continue
        yield state, info
