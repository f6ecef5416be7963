"""Replay from Kafka: the topics rebuilt into a scratch embedded log and ledger, then exported.

Inputs (profiles, samples, activities) are re-read from offset 0 and ingested
through the same validation, de-duplication and late-data rules as everywhere
else, partition by partition (each user lives on one partition, so each user's
order is the order the worker saw). Ledger entries and flag events come from
`genki.ledger` and `genki.flags` as the workers published them; re-published
entries (a rebuilt partition) are harmless, the ledger's append is idempotent.
The scratch directory is then exported exactly like the embedded source.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from engine.entries import EntryDraft
from engine.errors import UsageError
from engine.ingest.log import EmbeddedLog
from engine.kafka.client import READ_TO_END_POLL_MS, consumer_settings, topic_name
from engine.kafka.personal import (
    FLAGS_TAG,
    LEDGER_TAG,
    load_person_keys,
    open_inputs,
    open_output,
)
from engine.ledger import Ledger
from engine.schemas import FlagEvent, LedgerEntry
from replay.anonymise import ExportPolicy
from replay.export import ReplayManifest, export_embedded

FETCH_RECORDS_MAX = 20_000
INPUT_TOPICS = ("genki.profiles", "genki.consent", "genki.samples", "genki.activities")


async def _partition_batches(consumer: AIOKafkaConsumer, topic: str,
                             ) -> AsyncIterator[tuple[int, list[int], list[bytes | None],
                                                      list[bytes]]]:
    """(partition, offsets, keys, values) batches of a whole topic, partition by partition."""
    cluster = await consumer._client.fetch_all_metadata()  # aiokafka has no public call for it
    partitions = cluster.partitions_for_topic(topic)
    if not partitions:
        raise UsageError(f"replay: topic {topic} does not exist on the broker")
    for number in sorted(partitions):
        tp = TopicPartition(topic, number)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        while True:
            got = await consumer.getmany(tp, timeout_ms=READ_TO_END_POLL_MS,
                                         max_records=FETCH_RECORDS_MAX)
            records = got.get(tp, [])
            if records:
                yield (number, [r.offset for r in records], [r.key for r in records],
                       [r.value or b"" for r in records])
            end = consumer.highwater(tp)  # tansu's end_offsets() is not the high watermark
            if end is not None and await consumer.position(tp) >= end:
                break


async def _rebuild(bootstrap: str, prefix: str, scratch: Path, ends: dict[str, int],
                   tick: Callable[[int], None]) -> None:
    # Personal payloads are sealed per person (engine.kafka.personal): what no key opens
    # belongs to an erased person and is left out.
    keys = await load_person_keys(bootstrap, prefix)
    consumer = AIOKafkaConsumer(**consumer_settings(bootstrap, "replay"))
    await consumer.start()
    try:
        with EmbeddedLog.open(scratch) as log:
            for name in INPUT_TOPICS:
                topic = topic_name(prefix, name)
                async for number, offsets, users, values in _partition_batches(consumer, topic):
                    kept, opened, _ = open_inputs(keys, name.encode(), offsets, users, values)
                    if kept:
                        log.ingest_lines(opened, topic, kept[0], int(time.time() * 1000),
                                         partition=number, offsets=kept)
                    ends[f"{topic}/{number}"] = offsets[-1] + 1
                    tick(len(values))
        with Ledger.open(scratch) as ledger:
            topic = topic_name(prefix, "genki.ledger")
            async for number, offsets, users, values in _partition_batches(consumer, topic):
                entries = [open_output(keys, LEDGER_TAG, u, v) for u, v in zip(users, values)]
                ledger.append([_draft(LedgerEntry.model_validate_json(e))
                               for e in entries if e is not None])
                ends[f"{topic}/{number}"] = offsets[-1] + 1
            topic = topic_name(prefix, "genki.flags")
            async for number, offsets, users, values in _partition_batches(consumer, topic):
                flags = [open_output(keys, FLAGS_TAG, u, v) for u, v in zip(users, values)]
                ledger.append([], flags=[FlagEvent.model_validate_json(f)
                                         for f in flags if f is not None])
                ends[f"{topic}/{number}"] = offsets[-1] + 1
    finally:
        await consumer.stop()


def _draft(entry: LedgerEntry) -> EntryDraft:
    return EntryDraft(entry.entry_id, entry.user_id, entry.kind, entry.points, entry.day,
                      entry.ts_ms, entry.rule, entry.ref, entry.rules_version)


def export_kafka(bootstrap: str, target: Path, key: bytes, *, prefix: str = "",
                 since: str | None = None, until: str | None = None,
                 tick: Callable[[int], None] = lambda n: None,
                 policy: ExportPolicy | None = None) -> ReplayManifest:
    """Export the topics' whole history as `export_embedded` would export a data directory."""
    scratch = Path(tempfile.mkdtemp(prefix="genki-replay-kafka-"))
    try:
        ends: dict[str, int] = {}
        asyncio.run(_rebuild(bootstrap, prefix, scratch, ends, tick))
        manifest = export_embedded(scratch, target, key, since=since, until=until,
                                   source="kafka", source_offsets=ends, policy=policy)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return manifest
