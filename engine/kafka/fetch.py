"""Fetched records as columns, without a ConsumerRecord per record.

aiokafka's `getmany` wraps every record in a `ConsumerRecord` (eleven fields, two
`len` calls, a headers tuple): about a microsecond per record, a tenth of the
worker's whole cost with one sample per record. The worker needs four fields.
`skip_consumer_records` makes one consumer hand out the records of its fetch
buffer as they are parsed (aiokafka's C `DefaultRecord`: offset, key, value,
headers), everything else in aiokafka unchanged (positions, CRC checks, control
batches, pause and seek). If aiokafka's internals ever differ, the consumer stays
as it is and `getmany` returns ConsumerRecords, which have the same four fields:
slower, never wrong.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer

from engine.ingest.log import OPERATOR_KEY_ID
from engine.kafka.publish import PROVENANCE_HEADER

log = logging.getLogger("genki.kafka.fetch")


class FetchedRecord(Protocol):
    """What the worker reads of a record (a ConsumerRecord or aiokafka's parsed record)."""

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


def _parsed_record(tp: Any, record: Any) -> Any:
    return record


class _ParsedResults(collections.OrderedDict):  # type: ignore[type-arg]
    """The fetcher's buffer (tp → FetchResult): each result added hands out parsed records."""

    def __setitem__(self, tp: Any, result: Any) -> None:
        partition_records = getattr(result, "_partition_records", None)
        if partition_records is not None and hasattr(partition_records, "_consumer_record"):
            partition_records._consumer_record = _parsed_record
        super().__setitem__(tp, result)


def skip_consumer_records(consumer: AIOKafkaConsumer) -> bool:
    """After `consumer.start()`: its getmany returns parsed records. False (and the
    consumer unchanged) when this aiokafka is not shaped as expected."""
    fetcher = getattr(consumer, "_fetcher", None)
    buffer = getattr(fetcher, "_records", None)
    if type(buffer) is not collections.OrderedDict:
        log.warning("aiokafka's fetch buffer is not where expected; records are fetched as "
                    "ConsumerRecords (slower)")
        return False
    parsed = _ParsedResults()
    for tp, result in buffer.items():
        parsed[tp] = result
    fetcher._records = parsed  # type: ignore[union-attr]
    return True


@dataclass(slots=True)
class TopicBatch:
    """One topic-partition's fetched records as columns, in offset order."""

    offsets: list[int]
    keys: list[bytes | None]
    values: list[bytes]
    # The submitting API key per record (PROVENANCE_HEADER); None when no record has one.
    key_ids: list[str] | None
    # Where the partition continues after this batch (records left out of it, e.g. of
    # erased people, included).
    next_offset: int

    def __len__(self) -> int:
        return len(self.offsets)


_offset_of, _key_of = attrgetter("offset"), attrgetter("key")
_value_of, _headers_of = attrgetter("value"), attrgetter("headers")


def columns_of(records: Sequence[FetchedRecord]) -> TopicBatch:
    assert records, "a batch has records"
    key_ids = [submitted_by(r) for r in records] if any(map(_headers_of, records)) else None
    values: list[bytes] = list(map(_value_of, records))
    if None in values:  # a tombstone on an input topic: an empty record (dead-lettered)
        values = [v or b"" for v in values]
    return TopicBatch(list(map(_offset_of, records)), list(map(_key_of, records)), values,
                      key_ids, records[-1].offset + 1)


def submitted_by(record: FetchedRecord) -> str:
    """The API key id in a record's provenance header; `operator` without one (`genki
    publish` and other operator tools)."""
    for name, value in record.headers or ():
        if name == PROVENANCE_HEADER:
            return bytes(value).decode("utf-8", "replace")
    return OPERATOR_KEY_ID
