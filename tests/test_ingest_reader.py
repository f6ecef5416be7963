"""The NDJSON reader batches lines exactly like the plain line-by-line loop it replaced:
same lines, same line numbers (each line's own when blank lines were skipped), same batch
boundaries, whatever the chunking."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.ingest import reader
from engine.ingest.reader import LineBatch, iter_batches


def _line_by_line(stream: io.BytesIO, source: str, batch_lines: int,
                  batch_bytes_max: int) -> Iterator[LineBatch]:
    lines: list[bytes] = []
    numbers: list[int] = []
    size_bytes = 0
    for number, line in enumerate(stream, start=1):
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        lines.append(line)
        numbers.append(number)
        size_bytes += len(line)
        if len(lines) >= batch_lines or size_bytes >= batch_bytes_max:
            yield _batch(source, lines, numbers)
            lines, numbers, size_bytes = [], [], 0
    if lines:
        yield _batch(source, lines, numbers)


def _batch(source: str, lines: list[bytes], numbers: list[int]) -> LineBatch:
    run = numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    return LineBatch(source, numbers[0], lines, None if run else numbers)


LINES = st.lists(st.one_of(st.sampled_from([b"{}", b'{"v":1}', b"", b" ", b"\t", b"\r", b"x\r",
                                            b"a\rb", b" {}", b"\x0b"]),
                           st.binary(max_size=12).map(lambda b: b.replace(b"\n", b""))),
                 max_size=40)


@settings(max_examples=300, deadline=None)
@given(LINES, st.booleans(), st.integers(1, 7), st.integers(1, 40), st.integers(1, 64))
def test_batches_match_the_line_by_line_reader(lines: list[bytes], final_newline: bool,
                                               batch_lines: int, bytes_max: int,
                                               read_bytes: int) -> None:
    data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reader, "BATCH_BYTES_MAX", bytes_max)
        patch.setattr(reader, "READ_BYTES", read_bytes)
        got = list(iter_batches(io.BytesIO(data), "s", batch_lines))
    assert got == list(_line_by_line(io.BytesIO(data), "s", batch_lines, bytes_max))
