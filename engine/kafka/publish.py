"""The reference gateway: NDJSON wire records → genki topics, keyed by user_id.

Each line goes to the topic its shape names (the same shape rules as
`engine.ingest.decode`), keyed by its user_id, into the partition Kafka's
default partitioner picks for that key (murmur2, as the Java client), so one
user's profile, samples, activities and redemptions share a partition number.
Lines that cannot be routed (not JSON, no recognisable shape) still go to
genki.samples: the worker dead-letters them with a reason, so nothing
disappears at the gateway. Records are packed into per-partition batches and
sent with a bounded number of batches in flight.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from pydantic import ValidationError

from engine.kafka.authn import authenticated_value
from engine.kafka.client import MESSAGE_BYTES_MAX, producer_settings, topic_name
from engine.kafka.keys import Keyring
from engine.kafka.personal import KeyTopic, PersonKeys, encryption_enabled, require_wrap_keys
from engine.kafka.topics import (
    ACTIVITIES,
    CONSENT,
    PROFILES,
    REDEMPTIONS,
    SAMPLES,
    TopicsError,
)
from engine.schemas import Redemption

BATCHES_IN_FLIGHT_MAX = 64
# Inputs whose records are personal and encrypted per person, with the tag that binds
# each ciphertext to its topic.
SEALED_INPUTS: dict[str, bytes] = {name: name.encode()
                                   for name in (PROFILES, CONSENT, SAMPLES, ACTIVITIES)}
PROVENANCE_HEADER = "genki-key"  # the API key that submitted a record (HTTP gateway)
KEY_CACHE_ENTRIES_MAX = 1_000_000


def route(raw: bytes) -> tuple[str, bytes | None]:
    """(topic, key) of one wire record, judged by its shape only."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return SAMPLES, None
    if not isinstance(body, dict):
        return SAMPLES, None
    user = body.get("user_id")
    key = user.encode() if isinstance(user, str) and user else None
    if "metric" in body or "values" in body:
        return SAMPLES, key
    if "change" in body:
        return CONSENT, key
    if "event_id" in body:
        return ACTIVITIES, key
    if "idempotency_key" in body:
        return REDEMPTIONS, key
    if "birth_year" in body or "cohort" in body:
        return PROFILES, key
    return SAMPLES, key


def partition_of(key: bytes | None, raw: bytes, count: int) -> int:
    """Kafka's default partitioner for keyed records; a content hash for the rest."""
    if key is None:
        return zlib.crc32(raw) % count
    return (murmur2(key) & 0x7FFFFFFF) % count


@dataclass
class PublishSummary:
    records: int = 0
    bytes: int = 0
    refused_oversized: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)
    # topic → partition → next offset after what this run wrote
    end_offsets: dict[str, dict[int, int]] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records, "bytes": self.bytes,
                "refused_oversized": self.refused_oversized,
                "by_topic": dict(sorted(self.by_topic.items())),
                "end_offsets": {t: {str(p): o for p, o in sorted(v.items())}
                                for t, v in sorted(self.end_offsets.items())},
                "seconds": self.seconds}


class BatchSender:
    """Packs records into one batch per (topic, partition) and sends each when full,
    with at most BATCHES_IN_FLIGHT_MAX batches awaiting acknowledgement."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._batches: dict[tuple[str, int], Any] = {}
        self._in_flight: deque[tuple[str, int, int, asyncio.Future]] = deque()
        # topic → partition → next offset after what was acknowledged
        self.end_offsets: dict[str, dict[int, int]] = {}

    async def append(self, topic: str, partition: int, key: bytes | None, value: bytes,
                     headers: Sequence[tuple[str, bytes]] = ()) -> None:
        batch = self._batches.get((topic, partition))
        if batch is None:
            batch = self._batches[(topic, partition)] = self._producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None, headers=list(headers)) is None:
            await self._send(topic, partition)
            batch = self._batches[(topic, partition)] = self._producer.create_batch()
            appended = batch.append(key=key, value=value, timestamp=None, headers=list(headers))
            assert appended is not None, "a record larger than an empty batch"

    async def _send(self, topic: str, partition: int) -> None:
        batch = self._batches.pop((topic, partition))
        records = batch.record_count()
        if not records:
            return
        batch.close()
        future = await self._producer.send_batch(batch, topic, partition=partition)
        self._in_flight.append((topic, partition, records, future))
        while len(self._in_flight) > BATCHES_IN_FLIGHT_MAX:
            await self._settle_oldest()

    async def _settle_oldest(self) -> None:
        topic, partition, records, future = self._in_flight.popleft()
        metadata = await future
        ends = self.end_offsets.setdefault(topic, {})
        ends[partition] = max(ends.get(partition, 0), metadata.offset + records)

    async def flush(self) -> None:
        """Send every open batch and wait until the broker has acknowledged all."""
        for topic, partition in list(self._batches):
            await self._send(topic, partition)
        while self._in_flight:
            await self._settle_oldest()


class Configured:
    """Gateway(encrypt_with=CONFIGURED): the wrap keys of --wrap-keys / $GENKI_WRAP_KEYS,
    required unless encryption is switched off ($GENKI_KAFKA_ENCRYPTION=off)."""


CONFIGURED = Configured()


class Gateway:
    """Routes and keys wire records onto one producer. Use as an async context."""

    def __init__(self, bootstrap: str, prefix: str = "", compression: str = "auto",
                 client_id: str = "gateway", sign_with: Keyring | None = None,
                 encrypt_with: Keyring | None | Configured = CONFIGURED) -> None:
        self._producer = AIOKafkaProducer(**producer_settings(bootstrap, client_id, compression))
        self._sender = BatchSender(self._producer)
        self._prefix = prefix
        self._counts: dict[str, int] = {}
        self._keys: dict[bytes, int] = {}
        # Record keys to authenticate redemption lines with (an operator holding the API's
        # keys); None: they go out as they are, and workers refuse them (unauthenticated).
        self._sign_with = sign_with
        # Wrap keys: profiles, samples and activities are encrypted per person
        # (engine.kafka.personal); None: they go out in plain text.
        if isinstance(encrypt_with, Configured):  # on by default, as the CLI decides
            encrypt_with = require_wrap_keys("the gateway") if encryption_enabled() else None
        self.person_keys = PersonKeys(encrypt_with) if encrypt_with is not None else None
        self._key_topic = KeyTopic(bootstrap, prefix, self.person_keys, client_id) \
            if self.person_keys is not None else None
        self.summary = PublishSummary()
        self.summary.end_offsets = self._sender.end_offsets

    async def __aenter__(self) -> Self:
        await self._producer.start()
        try:
            for logical in (PROFILES, CONSENT, SAMPLES, ACTIVITIES, REDEMPTIONS):
                name = topic_name(self._prefix, logical)
                self._counts[logical] = len(await self._producer.partitions_for(name))
            if len(set(self._counts.values())) != 1:
                raise TopicsError(f"input topics must have the same partition count (users are "
                                  f"co-partitioned by user_id); found {self._counts}")
            if self._key_topic is not None:
                await self._key_topic.start()
                await self._key_topic.catch_up()
        except BaseException:
            await self._producer.stop()
            if self._key_topic is not None:
                await self._key_topic.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                await self.flush()
        finally:
            await self._producer.stop()
            if self._key_topic is not None:
                await self._key_topic.stop()

    async def send_lines(self, lines: Iterable[bytes], submitted_by: str | None = None) -> None:
        """Route and send; `submitted_by` (an API key id) travels in the PROVENANCE_HEADER
        of every record, so the partition's log can keep who submitted it."""
        summary = self.summary
        headers = () if submitted_by is None else ((PROVENANCE_HEADER,
                                                     submitted_by.encode()),)
        lines = list(lines)
        routed = [route(raw) if len(raw) <= MESSAGE_BYTES_MAX else None for raw in lines]
        person_keys = self.person_keys
        if person_keys is not None and self._key_topic is not None:
            await self._key_topic.refresh_if_due()
            new = {key for r in routed if r is not None and r[0] in SEALED_INPUTS
                   and (key := r[1]) is not None and not person_keys.knows(key)}
            if new:
                await self._key_topic.publish_new_keys(sorted(new))
        for raw, routing in zip(lines, routed, strict=True):
            if routing is None:
                summary.refused_oversized += 1
                continue
            logical, key = routing
            if logical == REDEMPTIONS and self._sign_with is not None:
                raw = _signed(raw, self._sign_with)
            summary.bytes += len(raw)
            if person_keys is not None and key is not None and logical in SEALED_INPUTS:
                raw = person_keys.seal(SEALED_INPUTS[logical], key, raw)
            count = self._counts[logical]
            partition = self._keys.get(key) if key is not None else None
            if partition is None or partition >= count:
                partition = partition_of(key, raw, count)
                if key is not None and len(self._keys) < KEY_CACHE_ENTRIES_MAX:
                    self._keys[key] = partition
            await self._sender.append(topic_name(self._prefix, logical), partition, key, raw,
                                      headers)
            summary.records += 1
            summary.by_topic[logical] = summary.by_topic.get(logical, 0) + 1

    async def flush(self) -> None:
        await self._sender.flush()


def _signed(raw: bytes, keys: Keyring) -> bytes:
    """A redemption line with an authenticator; a line that is not one is left for the
    worker to dead-letter with its reason."""
    try:
        record = Redemption.model_validate_json(raw)
    except ValidationError:
        return raw
    return authenticated_value(record, keys)


async def publish_paths(bootstrap: str, paths: list[str], prefix: str = "",
                        compression: str = "auto",
                        advance: Callable[[int, str], None] | None = None,
                        sign_with: Keyring | None = None,
                        encrypt_with: Keyring | None = None) -> PublishSummary:
    """Publish NDJSON files (in name order; each file flushed before the next, so
    profiles written first reach the broker before the samples that need them)."""
    from engine.ingest.reader import expand_paths, iter_sources

    started = time.perf_counter()
    async with Gateway(bootstrap, prefix, compression, sign_with=sign_with,
                       encrypt_with=encrypt_with) as gateway:
        for path in expand_paths(paths):
            for batch in iter_sources([path]):
                await gateway.send_lines(batch.lines)
                if advance is not None:
                    advance(len(batch.lines), f"{gateway.summary.records:,} records")
            await gateway.flush()
    gateway.summary.seconds = round(time.perf_counter() - started, 3)
    return gateway.summary
