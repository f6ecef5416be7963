"""Records in generation order on a scratch file, written out later in delivery order.

A gigabyte of small bytes objects costs several gigabytes of heap (allocator
slack), so records go to disk as they are made and only their offsets stay in
memory; the final file is copied out of a memory map in arrival order.
"""

from __future__ import annotations

import mmap
import os
from array import array
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import numpy as np

SPILL_BUFFER_BYTES = 8 * 1024 * 1024
COPY_LINES_PER_CHUNK = 50_000


class LineSink(Protocol):
    def extend(self, lines: list[bytes]) -> None: ...


class Spill:
    """Append-only scratch file of newline-terminated records, addressed by index."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "w+b", buffering=SPILL_BUFFER_BYTES)  # noqa: SIM115
        self._offsets = array("q")
        self._lengths = array("q")  # without the newline
        self._size = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._offsets)

    def append(self, line: bytes) -> None:
        self.extend([line])

    def extend(self, lines: list[bytes]) -> None:
        """Append many records with one write."""
        if not lines:
            return
        chunk = b"\n".join(lines) + b"\n"
        assert chunk.count(b"\n") == len(lines), "a record holds a newline"
        sizes = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines)) + 1
        starts = self._size + np.cumsum(sizes) - sizes
        self._offsets.frombytes(starts.tobytes())
        self._lengths.frombytes((sizes - 1).tobytes())
        self._file.write(chunk)
        self._size += len(chunk)

    def repeat(self, index: int) -> None:
        """Append the record at index again (an exact duplicate), without copying it."""
        self._offsets.append(self._offsets[index])
        self._lengths.append(self._lengths[index])

    def read(self, index: int) -> bytes:
        self._file.flush()
        return os.pread(self._file.fileno(), self._lengths[index], self._offsets[index])

    def write_in_order(self, path: Path, order: np.ndarray) -> int:
        """Copy the records to path in the given order; returns the bytes written."""
        assert len(order) == len(self)
        self._file.flush()
        offsets = np.frombuffer(self._offsets, dtype=np.int64)[order].tolist()
        lengths = (np.frombuffer(self._lengths, dtype=np.int64)[order] + 1).tolist()
        written = 0
        with open(path, "wb", buffering=SPILL_BUFFER_BYTES) as out:
            if self._size == 0:
                return 0
            with mmap.mmap(self._file.fileno(), self._size, access=mmap.ACCESS_READ) as source:
                for lo in range(0, len(offsets), COPY_LINES_PER_CHUNK):
                    chunk = b"".join([source[o:o + n] for o, n in zip(
                        offsets[lo:lo + COPY_LINES_PER_CHUNK], lengths[lo:lo + COPY_LINES_PER_CHUNK],
                        strict=True)])
                    out.write(chunk)
                    written += len(chunk)
        return written

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)
