"""Read NDJSON input (files, directories, stdin) in bounded batches of lines."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from engine.errors import UsageError

BATCH_LINES_MAX = 20_000
BATCH_BYTES_MAX = 64 * 1024 * 1024
DIRECTORY_SUFFIXES = (".ndjson", ".jsonl")


@dataclass(frozen=True)
class LineBatch:
    source: str
    first_offset: int  # line number (1-based) of lines[0] within source
    lines: list[bytes]


def expand_paths(paths: Iterable[str]) -> list[str]:
    """Files as given; a directory becomes its *.ndjson / *.jsonl files in name order."""
    expanded: list[str] = []
    for text in paths:
        if text == "-":
            expanded.append(text)
            continue
        path = Path(text)
        if path.is_dir():
            expanded.extend(str(p) for p in sorted(path.iterdir())
                            if p.is_file() and p.name.endswith(DIRECTORY_SUFFIXES))
        elif path.is_file():
            expanded.append(str(path))
        else:
            raise UsageError(f"no such file or directory: {text}")
    return expanded


def iter_batches(stream: BinaryIO, source: str,
                 batch_lines: int = BATCH_LINES_MAX) -> Iterator[LineBatch]:
    assert 0 < batch_lines <= BATCH_LINES_MAX
    lines: list[bytes] = []
    size_bytes = 0
    first = 1
    for number, line in enumerate(stream, start=1):
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue  # blank lines separate nothing and carry no record
        if not lines:
            first = number
        lines.append(line)
        size_bytes += len(line)
        if len(lines) >= batch_lines or size_bytes >= BATCH_BYTES_MAX:
            yield LineBatch(source, first, lines)
            lines, size_bytes = [], 0
    if lines:
        yield LineBatch(source, first, lines)


def iter_sources(paths: Iterable[str], batch_lines: int = BATCH_LINES_MAX) -> Iterator[LineBatch]:
    for text in expand_paths(paths):
        if text == "-":
            yield from iter_batches(sys.stdin.buffer, "stdin", batch_lines)
        else:
            with open(text, "rb") as stream:
                yield from iter_batches(stream, text, batch_lines)
