"""Sample blocks (engine.ingest.blocks) against a per-record reference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.ingest.blocks import SampleBlock, erased_row, new_sample_block

T0 = 1_764_547_200_000

# A record: (stream id, upload id, watermark before, samples as (offset ms, value)).
_value = st.one_of(st.integers(0, 30_000).map(float),
                   st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))
_record = st.tuples(st.integers(1, 50), st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),
                    st.integers(-1, 10**12),
                    st.lists(st.tuples(st.integers(0, 10**8), _value), min_size=1, max_size=6))


def _block(first_seq: int, records: list) -> SampleBlock:
    """The block of records given as segments, every sample new."""
    record = np.repeat(np.arange(len(records)), [len(r[3]) for r in records])
    ts = np.array([T0 + offset for r in records for offset, _ in r[3]], np.int64)
    values = np.array([value for r in records for _, value in r[3]], np.float64)
    block = new_sample_block(first_seq, record, ts, values,
                             np.array([r[0] for r in records], np.int64),
                             [r[1] for r in records], np.array([r[2] for r in records], np.int64))
    assert block is not None
    return block


def _reference(first_seq: int, records: list) -> list[tuple]:
    """Per record: seq, stream, upload, watermark, [(ts, value)] as given (values exact)."""
    return [(first_seq + i, stream, upload, wm, [(T0 + o, v) for o, v in samples])
            for i, (stream, upload, wm, samples) in enumerate(records)]


def _as_records(block: SampleBlock) -> list[tuple]:
    ts = (np.repeat(block.base_ts_ms, block.n) + block.ts_offsets).tolist()
    values = block.values().tolist()
    out, at = [], 0
    for seq, stream, upload, wm, n in zip(block.seq.tolist(), block.stream_id.tolist(),
                                          block.upload_ids, block.wm_before_ms.tolist(),
                                          block.n.tolist(), strict=True):
        out.append((seq, stream, upload, wm, list(zip(ts[at:at + n], values[at:at + n],
                                                      strict=True))))
        at += n
    return out


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 10**9), st.lists(_record, min_size=1, max_size=12), st.data())
def test_a_block_keeps_every_record_exactly_through_its_row_and_a_take(
        first_seq: int, records: list, data: st.DataObject) -> None:
    block = _block(first_seq, records)
    expected = _reference(first_seq, records)
    assert _as_records(block) == expected
    stored = SampleBlock.of_row(block.row())  # the bytes SQLite keeps
    assert _as_records(stored) == expected
    assert (stored.first_seq, stored.last_seq) == (first_seq, first_seq + len(records) - 1)
    keep = np.array(data.draw(st.lists(st.booleans(), min_size=len(records),
                                       max_size=len(records))), bool)
    taken = stored.take(keep)
    assert _as_records(taken) == [r for r, k in zip(expected, keep.tolist(), strict=True) if k]
    assert _as_records(SampleBlock.of_row(taken.row())) == _as_records(taken)
    # each record's bytes as the old one-row-per-record table held them
    for (seq, _, _, _, n, offsets, vals, wide, _), (_, _, _, _, samples) in zip(
            stored.records(), expected, strict=True):
        assert len(offsets) == 4 * n and len(vals) == (8 if wide else 4) * n
        exact = all(float(np.float32(v)) == v for _, v in samples)
        assert wide == (not exact), seq
    assert _as_records(SampleBlock.of_legacy_rows(stored.records())) == expected


def test_a_damaged_row_is_refused() -> None:
    block = _block(1, [(1, "u", -1, [(0, 5.0), (60_000, 6.0)])])
    row = list(block.row())
    row[9] = row[9][:-4]  # one sample's offset missing
    with pytest.raises(ValueError, match="damaged"):
        SampleBlock.of_row(tuple(row))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 10**9), st.lists(_record, min_size=1, max_size=12), st.integers(1, 20))
def test_a_split_block_tiles_its_range_with_whole_records(
        first_seq: int, records: list, samples_max: int) -> None:
    block = _block(first_seq, records)
    parts = block.split(samples_max)
    assert [r for part in parts for r in _as_records(SampleBlock.of_row(part.row()))] == \
        _as_records(block)
    assert parts[0].first_seq == block.first_seq and parts[-1].last_seq == block.last_seq
    for before, after in itertools.pairwise(parts):
        assert before.last_seq + 1 == after.first_seq
    for part in parts:
        assert len(part) and part.first_seq <= int(part.seq[0])
        assert int(part.n.sum()) <= samples_max or len(part) == 1


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 10**9), st.lists(_record, min_size=1, max_size=12), st.data())
def test_erased_bytes_cover_exactly_the_erased_records(
        first_seq: int, records: list, data: st.DataObject) -> None:
    """A row with some streams erased keeps every value's length (SQLite overwrites it in
    place), the other records as they were and the erased ones with stream 0 and no
    content."""
    block = _block(first_seq, records)
    erase = np.array(data.draw(st.lists(st.booleans(), min_size=len(records),
                                        max_size=len(records))), bool)
    streams = np.unique(block.stream_id[erase])
    erase = np.isin(block.stream_id, streams)  # every record of those streams goes
    row, count = erased_row(block.row(), streams)
    assert count == int(erase.sum())
    assert [len(value) for value in row[3:]] == [len(value) for value in block.row()[3:]]
    stored = SampleBlock.of_row(row)
    kept = _as_records(block.take(~erase))
    assert [r for r, gone in zip(_as_records(stored), erase.tolist(), strict=True)
            if not gone] == kept
    erased = stored.take(erase)
    assert not erased.stream_id.any() and not erased.base_ts_ms.any()
    assert not erased.wm_before_ms.any()
    assert not erased.ts_offsets.any() and not erased.vals.any()
    assert all(set(u) == {"0"} for u in erased.upload_ids)
