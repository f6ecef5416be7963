"""Partition snapshots on `genki.snapshots`: chunked, keyed by partition and chunk.

A partition snapshot is an engine snapshot (engine.snapshots format, checksummed)
whose arrays also hold the partition log's bounded state (prefix "log:") and whose
info names the input offsets it reflects and the ledger position and content
digest it was taken at. It travels as chunks of at most SNAPSHOT_CHUNK_BYTES, each
keyed `p<partition>/<index>` (so compaction keeps the latest of each chunk) and
prefixed with the snapshot's id, its index and the chunk count; a reader takes the
newest snapshot whose chunks are all there and whose checksum holds.
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from engine.kafka.restore import read_partition
from engine.rules.engine import EngineState
from engine.snapshots import SnapshotInfo, SnapshotInvalid, decode, write_to

log = logging.getLogger(__name__)

SNAPSHOT_CHUNK_BYTES = 512 * 1024
LOG_PREFIX = "log:"
_CHUNK_HEADER = struct.Struct("<16sII")  # snapshot id, chunk index, chunk count


def encode_partition_snapshot(engine: EngineState, log_arrays: dict[str, Any],
                              log_meta: dict[str, Any], info: SnapshotInfo) -> bytes:
    arrays = dict(engine.arrays)
    arrays.update({LOG_PREFIX + name: array for name, array in log_arrays.items()})
    buffer = io.BytesIO()
    write_to(buffer, EngineState(arrays, {"engine": engine.meta, "log": log_meta}), info)
    return buffer.getvalue()


def decode_partition_snapshot(payload: bytes) -> tuple[EngineState, dict[str, Any],
                                                       dict[str, Any], SnapshotInfo]:
    """(engine state, log arrays, log meta, info); SnapshotInvalid when damaged."""
    state, info = decode(payload)
    if "engine" not in state.meta or "log" not in state.meta:
        raise SnapshotInvalid("not a partition snapshot")
    engine = EngineState({k: v for k, v in state.arrays.items() if not k.startswith(LOG_PREFIX)},
                         state.meta["engine"])
    log_arrays = {k[len(LOG_PREFIX):]: v for k, v in state.arrays.items()
                  if k.startswith(LOG_PREFIX)}
    return engine, log_arrays, state.meta["log"], info


def chunk_records(number: int, payload: bytes) -> list[tuple[bytes, bytes]]:
    """(key, value) records of one snapshot."""
    snapshot_id = hashlib.sha256(payload).digest()[:16]
    count = max(1, -(-len(payload) // SNAPSHOT_CHUNK_BYTES))
    return [(f"p{number}/{index}".encode(),
             _CHUNK_HEADER.pack(snapshot_id, index, count)
             + payload[index * SNAPSHOT_CHUNK_BYTES:(index + 1) * SNAPSHOT_CHUNK_BYTES])
            for index in range(count)]


async def publish_snapshot(producer: AIOKafkaProducer, topic: str, number: int,
                           payload: bytes) -> int:
    """Send every chunk and wait until the broker has them all; returns the count."""
    records = chunk_records(number, payload)
    futures = [await producer.send(topic, value, key=key, partition=number)
               for key, value in records]
    for future in futures:
        await future
    return len(records)


def assemble_latest(records: list[tuple[int, bytes | None, bytes]]) -> bytes | None:
    """The newest complete snapshot among (offset, key, value) records, or None."""
    chunks: dict[bytes, dict[int, bytes]] = {}
    counts: dict[bytes, int] = {}
    last_offset: dict[bytes, int] = {}
    for offset, _, value in records:
        if len(value) < _CHUNK_HEADER.size:
            continue
        snapshot_id, index, count = _CHUNK_HEADER.unpack_from(value)
        chunks.setdefault(snapshot_id, {})[index] = value[_CHUNK_HEADER.size:]
        counts[snapshot_id] = count
        last_offset[snapshot_id] = offset
    for snapshot_id in sorted(last_offset, key=last_offset.__getitem__, reverse=True):
        parts = chunks[snapshot_id]
        if len(parts) != counts[snapshot_id]:
            continue
        payload = b"".join(parts[i] for i in range(counts[snapshot_id]))
        try:
            decode(payload)
        except SnapshotInvalid as error:
            log.warning("a snapshot on the snapshot topic is damaged (%s): skipped", error)
            continue
        return payload
    return None


async def read_latest_snapshot(bootstrap: str, topic: str, number: int) -> bytes | None:
    try:
        records = await read_partition(bootstrap, topic, number)
    except KafkaError as error:
        log.warning("cannot read %s partition %d (%s): no snapshot", topic, number, error)
        return None
    return assemble_latest(records)
