"""Sample blocks: the stored form of sample records, one SQLite row per batch.

Each ingest batch stores its new samples as one row of `sample_blocks` holding every
record of the batch as columns (before: one row per record, whose count, not its bytes,
cost most of ingest's inserts and of every read's row stepping). A record keeps its own
log position (`seq`), stream, upload id and watermark, so reads, dedup, erasure and the
archive see the same records as before; only the container changed.

Byte layout of a row (every number little-endian; `k` records, `m` samples):

| column        | type    | content                                                   |
|---------------|---------|-----------------------------------------------------------|
| first_seq     | INTEGER | primary key: the lowest position the block may hold        |
| last_seq      | INTEGER | the highest position the block may hold                    |
| records       | INTEGER | k (the records it holds, erased ones included)             |
| seqs          | BLOB    | k int64: each record's position, strictly rising           |
| stream_ids    | BLOB    | k int64: each record's (user, device, metric) stream        |
| base_ts_ms    | BLOB    | k int64: each record's first sample time (Unix ms)          |
| n             | BLOB    | k int32: samples per record (at least 1)                    |
| vals_f64      | BLOB    | k uint8: 1 = the record's values are float64, 0 = float32   |
| wm_before_ms  | BLOB    | k int64: its user's sample watermark before it (-1: none)   |
| ts_offsets    | BLOB    | m int32: ms after the record's base, record after record    |
| vals          | BLOB    | each record's values, 4 bytes (float32, when every value of |
|               |         | the record is exact in it) or 8 bytes (float64) each        |
| upload_ids    | TEXT    | k upload ids joined by "\\n" (no id holds one)              |

A record's samples and bytes are exactly those of the old per-record row, so the
archive's Parquet rows are unchanged. [first_seq, last_seq] is the range of positions
the batch was given; archiving takes records out without moving the end of the range,
so blocks never overlap and the log's position never goes back. Per-record columns come
first and the two large ones last, so a scan that needs only the former (the archive's
hot-record search, erasure's search) does not read the samples' pages.

Erasure overwrites a record in place, every value the same length (an UPDATE of a row
to a payload of the same size makes SQLite write only the pages whose bytes changed,
as a deleted row did): stream id, base time and watermark 0, its offsets and values
zero bytes, its upload id the character "0" repeated. Stream id 0 (ERASED_STREAM) is
no stream; reads skip such records, and `sample_block_erasures` counts them per block
until the archive drops them.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

BLOCK_SCHEMA = """
CREATE TABLE IF NOT EXISTS sample_blocks (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, records INTEGER NOT NULL,
    seqs BLOB NOT NULL, stream_ids BLOB NOT NULL, base_ts_ms BLOB NOT NULL, n BLOB NOT NULL,
    vals_f64 BLOB NOT NULL, wm_before_ms BLOB NOT NULL, ts_offsets BLOB NOT NULL,
    vals BLOB NOT NULL, upload_ids TEXT NOT NULL);
"""
# A batch with more samples is stored as several blocks (each blob then stays far below
# SQLite's 1e9-byte value limit: 4 bytes of offset and at most 8 of value per sample).
BLOCK_SAMPLES_MAX = 4_000_000
ERASED_STREAM = 0  # a record erased in place (stream ids start at 1)
ERASURES_SCHEMA = """
CREATE TABLE IF NOT EXISTS sample_block_erasures (
    first_seq INTEGER PRIMARY KEY, records INTEGER NOT NULL);
"""
BLOCK_COLUMNS = ("first_seq, last_seq, records, seqs, stream_ids, base_ts_ms, n, vals_f64,"
                 " wm_before_ms, ts_offsets, vals, upload_ids")
# What a read of samples needs: everything but the upload ids (which come last).
BLOCK_READ_COLUMNS = ("first_seq, last_seq, records, seqs, stream_ids, base_ts_ms, n,"
                      " vals_f64, wm_before_ms, ts_offsets, vals")
BLOCK_INSERT = "INSERT INTO sample_blocks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# The per-record columns a record's position and stream can be judged by.
BLOCK_KEY_COLUMNS = "first_seq, seqs, stream_ids, base_ts_ms"

_I8, _I4, _U1 = np.dtype("<i8"), np.dtype("<i4"), np.dtype("u1")
# A legacy row of sample_records (one row per record), in this column order.
LEGACY_COLUMNS = ("seq, stream_id, upload_id, base_ts_ms, n, ts_offsets, vals, vals_f64,"
                  " wm_before_ms")


@dataclass(frozen=True)
class SampleBlock:
    """Sample records as columns (see the module docstring for the stored bytes)."""

    first_seq: int
    last_seq: int
    seq: np.ndarray  # int64 per record
    stream_id: np.ndarray  # int64 per record
    base_ts_ms: np.ndarray  # int64 per record
    n: np.ndarray  # int32 per record
    wide: np.ndarray  # bool per record: values stored as float64
    wm_before_ms: np.ndarray  # int64 per record
    ts_offsets: np.ndarray  # int32 per sample
    vals: np.ndarray  # uint8: each record's value bytes
    upload_text: str | None  # upload ids joined by newlines (None: not read)

    def __len__(self) -> int:
        return len(self.seq)

    @property
    def widths(self) -> np.ndarray:
        """Value bytes per record."""
        return self.n.astype(np.int64) * np.where(self.wide, 8, 4)

    @property
    def upload_ids(self) -> list[str]:
        assert self.upload_text is not None, "read without its upload ids"
        return self.upload_text.split("\n") if len(self.seq) else []

    def values(self) -> np.ndarray:
        """float64 per sample."""
        return values_of(self.vals, self.wide, self.n)

    def timestamps(self) -> np.ndarray:
        """int64 Unix ms per sample."""
        return np.repeat(self.base_ts_ms, self.n) + self.ts_offsets

    def take(self, keep: np.ndarray, first_seq: int | None = None) -> SampleBlock:
        """The records where `keep` (bool per record), in the same range unless
        `first_seq` moves its start."""
        if keep.all() and first_seq is None:
            return self
        per_sample = np.repeat(keep, self.n)
        if self.wide.any():
            vals = self.vals[np.repeat(keep, self.widths)]
        else:  # 4 bytes a sample: gathered as such
            vals = self.vals.view(np.uint32)[per_sample].view(np.uint8)
        uploads = None
        if self.upload_text is not None:
            uploads = "\n".join(u for u, k in zip(self.upload_ids, keep.tolist(), strict=True)
                                if k)
        return SampleBlock(
            self.first_seq if first_seq is None else first_seq, self.last_seq, self.seq[keep],
            self.stream_id[keep], self.base_ts_ms[keep], self.n[keep], self.wide[keep],
            self.wm_before_ms[keep], self.ts_offsets[per_sample], vals, uploads)

    def split(self, samples_max: int | None = None) -> list[SampleBlock]:
        """Consecutive blocks of whole records, each with at most samples_max samples
        (default BLOCK_SAMPLES_MAX) unless one record alone has more; their ranges tile
        this one's."""
        samples_max = BLOCK_SAMPLES_MAX if samples_max is None else samples_max
        ends = np.cumsum(self.n, dtype=np.int64)
        if not len(ends) or ends[-1] <= samples_max:
            return [self]
        cuts, at = [], 0
        while at < len(ends):  # the first record of each part
            cuts.append(at)
            base = ends[at - 1] if at else 0
            at = max(at + 1, int(np.searchsorted(ends, base + samples_max, side="right")))
        bounds = [*cuts, len(ends)]
        parts = []
        for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            keep = np.zeros(len(ends), bool)
            keep[lo:hi] = True
            part = self.take(keep, self.first_seq if i == 0 else int(self.seq[lo]))
            last = self.last_seq if hi == len(ends) else int(self.seq[hi]) - 1
            parts.append(dataclasses.replace(part, last_seq=last))
        return parts

    def row(self) -> tuple[Any, ...]:
        """The row of sample_blocks (BLOCK_COLUMNS order)."""
        assert self.upload_text is not None, "read without its upload ids"
        return (self.first_seq, self.last_seq, len(self.seq),
                self.seq.astype(_I8).tobytes(), self.stream_id.astype(_I8).tobytes(),
                self.base_ts_ms.astype(_I8).tobytes(), self.n.astype(_I4).tobytes(),
                self.wide.astype(_U1).tobytes(), self.wm_before_ms.astype(_I8).tobytes(),
                self.ts_offsets.astype(_I4).tobytes(), self.vals.tobytes(), self.upload_text)

    @classmethod
    def of_row(cls, row: tuple[Any, ...]) -> SampleBlock:
        """A row of BLOCK_COLUMNS or BLOCK_READ_COLUMNS (then without upload ids)."""
        count = row[2]
        block = cls(row[0], row[1], np.frombuffer(row[3], _I8), np.frombuffer(row[4], _I8),
                    np.frombuffer(row[5], _I8), np.frombuffer(row[6], _I4),
                    np.frombuffer(row[7], _U1).astype(np.bool_), np.frombuffer(row[8], _I8),
                    np.frombuffer(row[9], _I4), np.frombuffer(row[10], _U1),
                    row[11] if len(row) > 11 else None)
        if not (len(block.seq) == len(block.stream_id) == len(block.n) == count
                and len(block.ts_offsets) == int(block.n.sum())
                and len(block.vals) == int(block.widths.sum())):
            raise ValueError(f"sample block at {row[0]} is damaged: its columns disagree")
        return block

    @classmethod
    def of_legacy_rows(cls, rows: list[tuple[Any, ...]]) -> SampleBlock:
        """Rows of the old sample_records table (LEGACY_COLUMNS order, by seq)."""
        count = len(rows)

        def column(at: int, dtype: type) -> np.ndarray:
            return np.fromiter(map(itemgetter(at), rows), dtype, count=count)

        seq = column(0, np.int64)
        return cls(int(seq[0]), int(seq[-1]), seq, column(1, np.int64), column(3, np.int64),
                   column(4, np.int32), column(7, np.bool_), column(8, np.int64),
                   np.frombuffer(b"".join(map(itemgetter(5), rows)), _I4),
                   np.frombuffer(b"".join(map(itemgetter(6), rows)), _U1),
                   "\n".join(map(itemgetter(2), rows)))

    def records(self) -> list[tuple[int, int, str, int, int, bytes, bytes, bool, int]]:
        """One tuple per record: (seq, stream_id, upload_id, base_ts_ms, n, ts_offsets
        bytes, value bytes, vals_f64, wm_before_ms), as the old row held them."""
        ends = np.cumsum(self.n)
        byte_ends = np.cumsum(self.widths)
        offsets, vals = self.ts_offsets.astype(_I4).tobytes(), self.vals.tobytes()
        return [(seq, stream, upload, base, n, offsets[4 * (end - n):4 * end],
                 vals[byte_end - width:byte_end], wide, wm)
                for seq, stream, upload, base, n, end, width, byte_end, wide, wm in zip(
                    self.seq.tolist(), self.stream_id.tolist(), self.upload_ids,
                    self.base_ts_ms.tolist(), self.n.tolist(), ends.tolist(),
                    self.widths.tolist(), byte_ends.tolist(), self.wide.tolist(),
                    self.wm_before_ms.tolist(), strict=True)]


def record_column(blob: bytes) -> np.ndarray:
    """A stored per-record int64 column (seqs, stream_ids, base_ts_ms, wm_before_ms) read
    without decoding the rest of its block (e.g. from a BLOCK_KEY_COLUMNS row)."""
    return np.frombuffer(blob, _I8)


def values_of(data: np.ndarray, wide: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """float64 per sample from records' value bytes (uint8), each record's float32 or, when
    `wide`, float64 (blocks and archived rows alike)."""
    if not wide.any():
        return data.view(np.float32).astype(np.float64)
    counts = counts.astype(np.int64)
    value = np.empty(int(counts.sum()), np.float64)
    per_sample_wide = np.repeat(wide, counts)
    per_byte_wide = np.repeat(wide, counts * np.where(wide, 8, 4))
    value[~per_sample_wide] = data[~per_byte_wide].view(np.float32)
    value[per_sample_wide] = data[per_byte_wide].view(np.float64)
    return value


def new_sample_block(first_seq: int, record: np.ndarray, ts: np.ndarray,
                     values: np.ndarray, stream_ids: np.ndarray, upload_ids: list[str],
                     wm_before: np.ndarray) -> SampleBlock | None:
    """The block of a batch's new samples: `record` (non-decreasing) is each sample's
    segment, `stream_ids`, `upload_ids` and `wm_before` are per segment. Segments with no
    new sample get no record; the others get positions first_seq, first_seq + 1, ... in
    segment order. None when no sample is new."""
    n_new = np.bincount(record, minlength=len(stream_ids))
    has_new = np.flatnonzero(n_new)
    if not len(has_new):
        return None
    counts = n_new[has_new]
    ends = np.cumsum(counts)
    starts = ends - counts
    base = np.minimum.reduceat(ts, starts)
    offsets = (ts - np.repeat(base, counts)).astype(np.int32)
    narrow = values.astype(np.float32)
    exact = narrow == values  # compared as float64
    lossless = np.ones(len(counts), bool) if exact.all() else np.logical_and.reduceat(
        exact, starts)
    if lossless.all():
        vals = narrow.view(np.uint8)
    else:  # each record's values in float32 when exact there, else float64
        wide_sample = np.repeat(~lossless, counts)
        wide_byte = np.repeat(~lossless, counts * np.where(lossless, 4, 8))
        vals = np.empty(len(wide_byte), np.uint8)
        vals[~wide_byte] = narrow[~wide_sample].view(np.uint8)
        vals[wide_byte] = np.ascontiguousarray(values[wide_sample]).view(np.uint8)
    seq = np.arange(first_seq, first_seq + len(has_new), dtype=np.int64)
    return SampleBlock(first_seq, int(seq[-1]), seq, stream_ids[has_new], base,
                       counts.astype(np.int32), ~lossless, wm_before[has_new], offsets,
                       vals, "\n".join(map(upload_ids.__getitem__, has_new.tolist())))


def erased_bytes(n: np.ndarray, wide: np.ndarray, upload_text: str,
                 which: np.ndarray) -> dict[str, list[tuple[int, int]]]:
    """Per column of a stored block, the (offset, length) byte ranges that hold the records
    at indexes `which` (of a block with these counts, widths and upload ids joined by
    newlines): what erasure overwrites (see the module docstring)."""
    n = n.astype(np.int64)
    widths = n * np.where(wide, 8, 4)
    sample_ends, byte_ends = np.cumsum(n), np.cumsum(widths)
    text = upload_text.encode()  # ids are ASCII: a byte a character
    newlines = np.flatnonzero(np.frombuffer(text, np.uint8) == 10)
    id_ends = np.append(newlines, len(text))
    id_starts = np.concatenate(([0], newlines + 1))
    id_lengths = id_ends - id_starts
    assert len(id_lengths) == len(n), "one upload id per record"
    at = which.tolist()
    per_record = [(8 * i, 8) for i in at]
    return {"stream_ids": per_record, "base_ts_ms": per_record, "wm_before_ms": per_record,
            "ts_offsets": [(4 * int(sample_ends[i] - n[i]), 4 * int(n[i])) for i in at],
            "vals": [(int(byte_ends[i] - widths[i]), int(widths[i])) for i in at],
            "upload_ids": [(int(id_starts[i]), int(id_lengths[i])) for i in at]}


_COLUMN_AT = {name.strip(): at for at, name in enumerate(BLOCK_COLUMNS.split(","))}


def erased_row(row: tuple[Any, ...], streams: np.ndarray) -> tuple[tuple[Any, ...], int]:
    """A stored row (BLOCK_COLUMNS order) with the records of `streams` overwritten, every
    value the same length (SQLite then writes only the pages whose bytes changed), and how
    many records that was."""
    which = np.flatnonzero(np.isin(record_column(row[_COLUMN_AT["stream_ids"]]), streams))
    ranges = erased_bytes(np.frombuffer(row[_COLUMN_AT["n"]], _I4),
                          np.frombuffer(row[_COLUMN_AT["vals_f64"]], _U1).astype(bool),
                          row[_COLUMN_AT["upload_ids"]], which)
    new = list(row)
    for column, spans in ranges.items():
        at, text = _COLUMN_AT[column], column == "upload_ids"
        value = bytearray(row[at].encode() if text else row[at])
        for offset, length in spans:
            value[offset:offset + length] = (b"0" if text else b"\0") * length
        new[at] = value.decode() if text else bytes(value)
    return tuple(new), len(which)
