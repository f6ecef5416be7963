"""`genki worker`: a consumer-group member that owns whole user partitions.

One cycle: fetch a large batch (getmany) → per partition, in one store thread:
store profiles, samples and activities in the partition's log (offsets in the
same transaction), run the rules over what is new into the partition's ledger,
apply redemption requests → publish new ledger entries, flag changes and dead
letters → commit the Kafka offsets. Offsets are committed only after the
ledger is durable and its outputs acknowledged, so a commit means "done and
visible"; anything after the last commit is replayed, harmlessly (see
engine.kafka.partition for why each replay is a no-op).

A newly assigned partition goes through phases before it is live:
* profiles: only the profiles topic is read until caught up, so step targets
  are known before the samples they apply to (the embedded runtime reads
  00-profiles.ndjson first for the same reason);
* catch-up (only when this host's directory is missing or behind what the
  group committed, i.e. the partition moved here): inputs are re-read from the
  directory's own offsets (0 for a new one) up to the end seen on arrival;
  then the redemptions, refunds and adjustments the previous owner made are
  restored from genki.ledger, and redemptions resume from the group's offset;
* live: everything is read.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from engine.errors import GenkiError
from engine.faults import crash_point
from engine.ingest.log import LATE_WINDOW_DAYS_DEFAULT
from engine.kafka.assignor import CoPartitionedAssignor
from engine.kafka.client import (
    consumer_settings,
    producer_settings,
    topic_name,
)
from engine.kafka.fetch import FetchedRecord, TopicBatch, columns_of, skip_consumer_records
from engine.kafka.host import ThreadHost, collected_rarely, new_host
from engine.kafka.keys import (
    RECORD_KEYS_ENV,
    WRAP_KEYS_ENV,
    Keyring,
    resolve_keyring,
)
from engine.kafka.partition import (
    Outputs,
    PartitionBusy,
    partition_dir,
)
from engine.kafka.personal import (
    DLQ_TAG,
    FLAGS_TAG,
    SEALED_ENTRY_KINDS,
    KeyTopic,
    PersonKeys,
    encryption_enabled,
    open_entry,
    open_inputs,
    seal_entry,
)
from engine.kafka.publish import SEALED_INPUTS, BatchSender, route
from engine.kafka.restore import (
    read_partition,
    select_restorable,
    verified_requests,
)
from engine.kafka.snapshot_topic import publish_snapshot, read_latest_snapshot
from engine.kafka.topics import (
    CONSENT,
    DLQ,
    FLAGS,
    INPUT_TOPICS,
    KEYS,
    LEDGER,
    LOG_TOPICS,
    PROFILES,
    REDEMPTIONS,
    SNAPSHOTS,
    TopicsError,
    admin_client,
    check_copartitioned,
    partition_counts,
)

FETCH_RECORDS_MAX_DEFAULT = 20_000
FETCH_RECORDS_LIMIT = 200_000
POLL_MS = 500
SESSION_TIMEOUT_MS_DEFAULT = 10_000
SESSION_TIMEOUT_MS_MIN = 1_000
HEARTBEATS_PER_SESSION_TIMEOUT = 6
MAX_POLL_INTERVAL_MS = 600_000
PARTITION_BUSY_WAIT_S_MAX = 120.0
PARTITION_BUSY_RETRY_S = 0.2
SNAPSHOT_PUBLISH_RECORDS = 100_000  # log positions between two published partition snapshots
# Partitions on threads run two at a time: while one holds the GIL (decoding, rules) the
# other's SQLite and numpy work, which releases it, goes on. Segment records 1.41-1.82 M
# samples/s one at a time, 2.00-2.38 M two at a time (benchmarks/kafka.py, 4 alternating
# runs each, 2026-12-02); one sample per record the same (162-172 k records/s). (Two at a
# time measured no faster before the consumer's fetch waits were cut, when stalls
# dominated.) Partitions in processes of their own (--partition-processes) all run at once.
PARTITIONS_IN_PARALLEL_MAX = 2

log = logging.getLogger("genki.kafka.worker")


@dataclass(frozen=True)
class WorkerSettings:
    bootstrap: str
    data_dir: Path
    group: str = "genki"
    prefix: str = ""
    until_idle: bool = False
    rules_path: Path | None = None
    late_window_days: int = LATE_WINDOW_DAYS_DEFAULT
    fetch_records_max: int = FETCH_RECORDS_MAX_DEFAULT
    compression: str = "auto"
    client_id: str = "worker"
    # A dead worker's partitions move after this long. tansu also waits half of it
    # before answering a JoinGroup, so tests use a short one.
    session_timeout_ms: int = SESSION_TIMEOUT_MS_DEFAULT
    # Record authenticator keys (engine.kafka.authn); None: --record-keys / $GENKI_RECORD_KEYS.
    record_keys: Path | None = None
    # Per-person encryption (engine.kafka.personal): wrap keys (None: --wrap-keys /
    # $GENKI_WRAP_KEYS); encryption=False (or GENKI_KAFKA_ENCRYPTION=off) publishes
    # outputs in plain text.
    wrap_keys: Path | None = None
    encryption: bool = True
    # Each owned partition's store (decode → dedup → rules → ledger) in a process of its
    # own (engine.kafka.host), so partitions use every core; False: threads of this one.
    partition_processes: bool = False

    def __post_init__(self) -> None:
        assert 0 < self.fetch_records_max <= FETCH_RECORDS_LIMIT
        assert self.session_timeout_ms >= SESSION_TIMEOUT_MS_MIN


@dataclass
class WorkerSummary:
    partitions: list[int] = field(default_factory=list)
    records_by_topic: dict[str, int] = field(default_factory=dict)
    accepted: int = 0
    rejected: int = 0
    accepted_samples: int = 0
    awards: int = 0
    redemptions_applied: int = 0
    redemptions_rejected: int = 0
    published_entries: int = 0
    published_flags: int = 0
    published_dead_letters: int = 0
    caught_up_partitions: list[int] = field(default_factory=list)
    restored_entries: int = 0
    # genki.ledger entries a takeover did not restore: no authenticated request backs them.
    restore_refused: int = 0
    # Takeover from genki.snapshots: partitions restored, entries restored with them.
    snapshot_restored_partitions: list[int] = field(default_factory=list)
    snapshot_restored_entries: int = 0
    snapshots_published: int = 0
    # Input records (and restored entries) no data key opens: their person was erased.
    erased_records: int = 0
    # Data keys this worker made for people whose inputs came in clear.
    data_keys_created: int = 0
    rebalances: int = 0
    # Records skipped on a topic that keeps everything: a bug or an operator's
    # retention change; the partition's ledger may lack what they carried.
    offset_gaps: int = 0
    seconds: float = 0.0
    # From the first record fetched to the end of the last cycle that had records
    # (published and committed): the worker's busy time, without group joins.
    processing_seconds: float = 0.0
    # CPU time over the same span, of this process (all its threads) and of its partition
    # processes' cycles: what the worker costs when the broker and others share the cores.
    processing_cpu_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        result = dict(self.__dict__)
        result["partitions"] = sorted(set(self.partitions))
        return result


@dataclass
class PartitionState:
    """A partition this worker owns: its store, topic-partitions and phase."""

    number: int
    host: ThreadHost  # where the partition's store runs (engine.kafka.host)
    tps: dict[str, TopicPartition]  # logical topic → tp
    phase: str = "profiles"  # profiles → (catchup) → live
    catchup: bool = False
    restore: bool = False
    redemptions_from: int = 0
    targets: dict[TopicPartition, int] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    next_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    # What the store holds, kept here so that a cycle asks its host only to process: the
    # next offset per logical topic (stored with the records), the log position, and
    # whether outputs may be unpublished.
    stored: dict[str, int | None] = field(default_factory=dict)
    position: int = 0
    outputs_pending: bool = True


class Worker:
    def __init__(self, settings: WorkerSettings,
                 on_progress: Callable[[int, str], None] | None = None) -> None:
        self.settings = settings
        self.topics = {name: topic_name(settings.prefix, name)
                       for name in (*INPUT_TOPICS, LEDGER, FLAGS, DLQ, KEYS)}
        self._logical = {actual: logical for logical, actual in self.topics.items()}
        self.snapshot_topic = topic_name(settings.prefix, SNAPSHOTS)
        self._snapshots_on = True
        self._snapshot_positions: dict[int, int] = {}
        self._parallel = asyncio.Semaphore(
            FETCH_RECORDS_LIMIT if settings.partition_processes else PARTITIONS_IN_PARALLEL_MAX)
        self._parts: dict[int, PartitionState] = {}
        self._lock = asyncio.Lock()
        self._assignor = CoPartitionedAssignor()
        self._assigned_once = asyncio.Event()
        self._generation = 0  # bumped by every assignment
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None
        self._dlq_partitions = 1
        self._partition_cpu_s = 0.0  # CPU of partition processes' cycles (not this process's)
        self._progress = on_progress or (lambda n, note: None)
        self.summary = WorkerSummary()
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.person_keys: PersonKeys = PersonKeys(resolve_keyring(
            WRAP_KEYS_ENV, settings.wrap_keys, (settings.data_dir,)))
        self._seal_outputs = settings.encryption and encryption_enabled()
        self._key_topic: KeyTopic | None = None
        self.record_keys: Keyring = resolve_keyring(RECORD_KEYS_ENV, settings.record_keys,
                                                    (settings.data_dir,))

    def stop(self) -> None:
        self._stop.set()

    def fail(self, error: BaseException) -> None:
        """A rebalance callback failed: aiokafka would only log it and go on fetching
        for a partition without its store, so the worker stops and the error surfaces."""
        self._failure = error
        self._stop.set()

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> WorkerSummary:
        started = time.perf_counter()
        s = self.settings
        await self._check_topics()
        self._key_topic = KeyTopic(s.bootstrap, s.prefix, self.person_keys, s.client_id)
        await self._key_topic.start()
        consumer = self.consumer = AIOKafkaConsumer(
            **consumer_settings(s.bootstrap, s.client_id), group_id=s.group,
            partition_assignment_strategy=(self._assignor,),
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.session_timeout_ms // HEARTBEATS_PER_SESSION_TIMEOUT,
            max_poll_interval_ms=MAX_POLL_INTERVAL_MS)
        producer = self.producer = AIOKafkaProducer(
            **producer_settings(s.bootstrap, s.client_id, s.compression))
        consumer.subscribe([self.topics[t] for t in INPUT_TOPICS], listener=_Listener(self))
        await producer.start()
        await consumer.start()
        skip_consumer_records(consumer)
        try:
            with collected_rarely():
                await self._loop(consumer)
            if self._failure is not None:
                raise self._failure
        finally:
            async with self._lock:
                for number in list(self._parts):
                    await self._parts.pop(number).host.close()
            await consumer.stop()
            await producer.stop()
            if self._key_topic is not None:
                await self._key_topic.stop()
        self.summary.seconds = round(time.perf_counter() - started, 3)
        return self.summary

    async def _check_topics(self) -> None:
        admin = admin_client(self.settings.bootstrap)
        await admin.start()
        try:
            counts = await partition_counts(admin, list(self.topics.values()))
        finally:
            await admin.close()
        check_copartitioned(counts, self.settings.prefix)
        self._dlq_partitions = counts[self.topics[DLQ]]
        admin = admin_client(self.settings.bootstrap)
        await admin.start()
        try:
            await partition_counts(admin, [self.snapshot_topic])
        except TopicsError:
            log.warning("topic %s is missing: partitions taken over without their directory "
                        "are rebuilt from offset 0 (run `genki topics create`)",
                        self.snapshot_topic)
            self._snapshots_on = False
        finally:
            await admin.close()

    async def _loop(self, consumer: AIOKafkaConsumer) -> None:
        s = self.settings
        first_s = first_cpu_s = 0.0
        while not self._stop.is_set():
            generation = self._generation
            got = await consumer.getmany(timeout_ms=POLL_MS, max_records=s.fetch_records_max)
            async with self._lock:
                stale = generation != self._generation  # a rebalance came in between
                got = await self._put_back(consumer, got, every=stale)
                if got:
                    if not first_s:
                        first_s, first_cpu_s = time.perf_counter(), time.process_time()
                    await self._process(got)
                await self._advance_phases()
                await self._publish_and_commit()
                if got:
                    self.summary.processing_seconds = round(time.perf_counter() - first_s, 3)
                    self.summary.processing_cpu_seconds = round(
                        time.process_time() - first_cpu_s + self._partition_cpu_s, 3)
                await self._publish_snapshots(force=False)
                if s.until_idle and not got and self._assigned_once.is_set() \
                        and await self._idle():
                    log.info("caught up on partitions %s; exiting (--until-idle)",
                             sorted(self._parts))
                    await self._publish_snapshots(force=True)
                    return

    # -- processing --------------------------------------------------------------------

    @staticmethod
    async def _put_back(consumer: AIOKafkaConsumer,
                        got: dict[TopicPartition, list[FetchedRecord]], every: bool,
                        ) -> dict[TopicPartition, list[FetchedRecord]]:
        """Hand back records fetched before their partition was paused (or, with every,
        before a rebalance): they are read again from their first offset, unless a
        seek after the fetch has already chosen where the partition continues."""
        paused = consumer.paused()
        for tp in [tp for tp, records in got.items() if records and (every or tp in paused)]:
            records = got.pop(tp)
            if tp in consumer.assignment() and \
                    await consumer.position(tp) == records[-1].offset + 1:
                consumer.seek(tp, records[0].offset)
        return {tp: records for tp, records in got.items() if records}

    async def _process(self, got: dict[TopicPartition, list[FetchedRecord]]) -> None:
        by_number: dict[int, dict[str, TopicBatch]] = {}
        for tp, records in got.items():
            if tp.partition in self._parts and records:
                by_number.setdefault(tp.partition, {})[self._logical[tp.topic]] = \
                    columns_of(records)
        for number, batch in by_number.items():
            for logical, columns in batch.items():
                counts = self.summary.records_by_topic
                counts[logical] = counts.get(logical, 0) + len(columns)
                self._check_contiguous(self._parts[number], logical, columns)
        if self._key_topic is not None:
            await self._key_topic.refresh_if_due(self._parts)
            for number, batch in by_number.items():
                if any(self.person_keys.missing(columns.keys, columns.values)
                       for t, columns in batch.items() if t in LOG_TOPICS):
                    await self._key_topic.catch_up([number])
        await asyncio.gather(*(self._process_one(number, batch)
                               for number, batch in sorted(by_number.items())))

    async def _process_one(self, number: int, batch: dict[str, TopicBatch]) -> None:
        inputs, erased = self._opened_inputs(batch)
        requests = batch.get(REDEMPTIONS)
        redemptions = None if requests is None else (self.topics[REDEMPTIONS], requests)
        part = self._parts[number]
        async with self._parallel:
            counts = await part.host.call("process", inputs, redemptions,
                                          self.settings.rules_path)
        for logical, columns in batch.items():  # as PartitionStore.ingest/apply_redemptions
            part.stored[logical] = max(part.stored.get(logical) or 0, columns.next_offset)
        part.position = counts.pop("position")
        part.outputs_pending = True
        cpu_ns = counts.pop("cpu_ns")
        if self.settings.partition_processes:
            self._partition_cpu_s += cpu_ns / 1e9
        counts["erased_records"] = erased
        summary = self.summary
        for name, value in counts.items():
            setattr(summary, name, getattr(summary, name) + value)
        self._progress(sum(len(r) for r in batch.values()),
                       f"{summary.accepted_samples:,} samples")

    def _opened_inputs(self, batch: dict[str, TopicBatch],
                       ) -> tuple[list[tuple[str, bool, TopicBatch]], int]:
        """The log topics' records in topic order, decrypted (engine.kafka.personal); the
        records of erased people are left out and counted."""
        inputs: list[tuple[str, bool, TopicBatch]] = []
        erased_total = 0
        for logical in LOG_TOPICS:
            columns = batch.get(logical)
            if not columns:
                continue
            offsets, values, erased = open_inputs(
                self.person_keys, SEALED_INPUTS[logical], columns.offsets, columns.keys,
                columns.values)
            erased_total += erased
            key_ids = columns.key_ids
            if key_ids is not None and erased:
                kept = set(offsets)
                key_ids = [k for o, k in zip(columns.offsets, key_ids, strict=True) if o in kept]
            inputs.append((self.topics[logical], logical in (PROFILES, CONSENT),
                           TopicBatch(offsets, [], values, key_ids, columns.next_offset)))
        return inputs, erased_total

    def _check_contiguous(self, part: PartitionState, logical: str,
                          columns: TopicBatch) -> None:
        tp = part.tps[logical]
        expected = part.next_offsets.get(tp, 0)
        part.next_offsets[tp] = max(expected, columns.next_offset)
        if logical != PROFILES and columns.offsets[0] > expected:  # profiles are compacted
            self.summary.offset_gaps += 1
            log.error("%s: records %d..%d were skipped (next stored offset %d, fetched from "
                      "%d); were they deleted by retention?", tp, expected,
                      columns.offsets[0] - 1, expected, columns.offsets[0])

    # -- outputs and commits ---------------------------------------------------------

    async def _publish_and_commit(self) -> None:
        assert self.producer is not None and self.consumer is not None
        sender = BatchSender(self.producer)
        parts = [part for part in self._parts.values() if part.outputs_pending]
        while parts:  # every partition's outputs in one flush: one wait for the broker
            sent: list[tuple[PartitionState, Outputs]] = []
            for part in parts:
                outputs = await part.host.call("pending_outputs")
                if len(outputs):
                    await self._send_outputs(sender, part.number, outputs)
                    sent.append((part, outputs))
                else:
                    part.outputs_pending = False
            await sender.flush()
            for part, outputs in sent:
                await part.host.call("mark_published", outputs)
            parts = [part for part, _ in sent]
        crash_point("after_publish")
        await self._commit()
        crash_point("after_commit")

    async def _send_outputs(self, sender: BatchSender, number: int, out: Outputs) -> None:
        ledger, flags, dlq = self.topics[LEDGER], self.topics[FLAGS], self.topics[DLQ]
        keys = self.person_keys if self._seal_outputs else None
        letter_users = [route(letter["raw"])[1] if keys is not None
                        and self._logical.get(letter["source"]) in SEALED_INPUTS else None
                        for letter in out.dead_letters]
        if keys is not None:
            await self._ensure_data_keys(keys, out, letter_users)
        for entry in out.entries:
            value = orjson.dumps(entry) if keys is None else seal_entry(keys, entry)
            await sender.append(ledger, number, entry["user_id"].encode(), value)
        for flag in out.flags:
            body = {"v": 1, "flag_id": flag["flag_id"], "user_id": flag["user_id"],
                    "flag": flag["flag"], "state": flag["state"], "day": flag["day"],
                    "evidence": orjson.loads(flag["evidence"]),
                    "rules_version": flag["rules_version"]}
            user = flag["user_id"].encode()
            value = orjson.dumps(body)
            if keys is not None:
                value = keys.seal_if_known(FLAGS_TAG, user, value)
            await sender.append(flags, number, user, value)
        for letter, user in zip(out.dead_letters, letter_users, strict=True):
            raw = letter["raw"]
            if keys is not None and user is not None:
                raw = keys.seal_if_known(DLQ_TAG, user, raw)
            body = {"v": 1, "source": letter["source"], "partition": letter["partition"],
                    "offset": letter["offset"], "reason": letter["reason"],
                    "raw_b64": _b64(raw)}
            await sender.append(dlq, number % self._dlq_partitions, user, orjson.dumps(body))
        self.summary.published_entries += len(out.entries)
        self.summary.published_flags += len(out.flags)
        self.summary.published_dead_letters += len(out.dead_letters)

    async def _ensure_data_keys(self, keys: PersonKeys, out: Outputs,
                                letter_users: list[bytes | None]) -> None:
        """A data key for every person these outputs are about who has none yet (their
        inputs came in clear, from a gateway that does not encrypt), durable on
        genki.keys before anything sealed with it is published. Erased people get none."""
        users = {e["user_id"].encode() for e in out.entries if e["kind"] in SEALED_ENTRY_KINDS}
        users.update(f["user_id"].encode() for f in out.flags)
        users.update(u for u in letter_users if u is not None)
        missing = sorted(u for u in users if not keys.knows(u) and u not in keys.erased)
        if missing and self._key_topic is not None:
            await self._key_topic.publish_new_keys(missing)
            self.summary.data_keys_created += len(missing)

    async def _commit(self) -> None:
        assert self.consumer is not None
        offsets: dict[TopicPartition, int] = {}
        for part in self._parts.values():
            for logical, offset in part.stored.items():
                tp = part.tps[logical]
                if offset is not None and offset > part.committed.get(tp, -1):
                    offsets[tp] = offset
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as error:
            log.warning("offset commit failed (%s); the partition logs keep the offsets, "
                        "the next owner resumes from them", error)
            return
        for part in self._parts.values():
            for tp in part.tps.values():
                if tp in offsets:
                    part.committed[tp] = offsets[tp]

    async def _stored_offsets(self, host: ThreadHost) -> dict[str, int | None]:
        stored = await host.call("stored_offsets", [self.topics[t] for t in LOG_TOPICS],
                                 self.topics[REDEMPTIONS])
        return {self._logical[topic]: offset for topic, offset in stored.items()}

    # -- assignment, phases, takeover --------------------------------------------------

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        assert self.consumer is not None
        async with self._lock:
            numbers = sorted({tp.partition for tp in assigned})
            for number in numbers:
                missing = [t for t in INPUT_TOPICS
                           if TopicPartition(self.topics[t], number) not in assigned]
                if missing:
                    log.error("partition %d assigned without %s: a group member is not using "
                              "the co-partitioned assignor", number, missing)
            for number in [n for n in self._parts if n not in numbers]:
                await self._parts.pop(number).host.close()
            for number in numbers:
                await self._assign_one(number)
            self._generation += 1
            self.summary.rebalances += 1
            self.summary.partitions.extend(numbers)
            log.info("assigned partitions %s", numbers)
            self._assigned_once.set()

    async def _publish_snapshots(self, force: bool) -> None:
        """Publish partition snapshots to genki.snapshots: every SNAPSHOT_PUBLISH_RECORDS
        log positions, and (force) when the worker leaves."""
        if not self._snapshots_on or self.producer is None:
            return
        for part in self._parts.values():
            position = part.position
            last = self._snapshot_positions.get(part.number, 0)
            if position <= last or (not force and position - last < SNAPSHOT_PUBLISH_RECORDS):
                continue
            payload = await part.host.call("topic_snapshot")
            if payload is None:
                continue
            try:
                await publish_snapshot(self.producer, self.snapshot_topic, part.number, payload)
            except KafkaError as error:
                log.warning("partition %d: snapshot not published (%s)", part.number, error)
                continue
            self._snapshot_positions[part.number] = position
            self.summary.snapshots_published += 1

    async def _restore_from_snapshot(self, number: int, host: ThreadHost) -> ThreadHost:
        """A partition new to this host: start from the newest snapshot on genki.snapshots
        and the entries of genki.ledger up to it; without one (or when it does not check
        out) the inputs are re-read from offset 0."""
        bootstrap = self.settings.bootstrap
        payload = await read_latest_snapshot(bootstrap, self.snapshot_topic, number)
        if payload is None:
            log.info("partition %d: no snapshot on %s; rebuilding from offset 0", number,
                     self.snapshot_topic)
            return host
        ledger = await read_partition(bootstrap, self.topics[LEDGER], number)
        try:
            restored, redemptions, refused = await host.call(
                "restore_from_snapshot", payload,
                [(offset, opened) for offset, _, v in ledger
                 if (opened := open_entry(self.person_keys, v))],
                self.topics[LEDGER], self.settings.rules_path)
        except (GenkiError, ValueError, KeyError) as error:
            log.error("partition %d: snapshot restore failed (%s); rebuilding from offset 0",
                      number, error)
            await host.close()
            await asyncio.to_thread(shutil.rmtree, partition_dir(self.settings.data_dir,
                                                                 number))
            return await self._open_store(number)
        self.summary.snapshot_restored_partitions.append(number)
        self.summary.snapshot_restored_entries += restored
        self.summary.restored_entries += redemptions
        self.summary.restore_refused += refused
        self._snapshot_positions[number] = await host.call("position")
        log.info("partition %d: restored from the snapshot on %s and %d entries of %s",
                 number, self.snapshot_topic, restored, self.topics[LEDGER])
        return host

    async def _assign_one(self, number: int) -> None:
        consumer = self.consumer
        assert consumer is not None
        part = self._parts.get(number)
        if self._key_topic is not None:
            await self._key_topic.catch_up([number])
        if part is None:
            host = await self._open_store(number)
            if not host.existed and self._snapshots_on:
                host = await self._restore_from_snapshot(number, host)
            tps = {t: TopicPartition(self.topics[t], number) for t in INPUT_TOPICS}
            part = self._parts[number] = PartitionState(number, host, tps)
        stored = part.stored = await self._stored_offsets(part.host)
        part.position = await part.host.call("position")
        part.outputs_pending = True
        committed = {t: await consumer.committed(tp) for t, tp in part.tps.items()}
        part.committed = {tp: committed[t] for t, tp in part.tps.items()
                          if committed[t] is not None}
        local_red, group_red = stored[REDEMPTIONS] or 0, committed[REDEMPTIONS] or 0
        part.restore = group_red > local_red
        part.catchup = part.restore or any(
            (committed[t] or 0) > (stored[t] or 0) for t in LOG_TOPICS)
        part.redemptions_from = max(local_red, group_red)
        part.targets = {}
        part.next_offsets = {part.tps[t]: stored[t] or 0 for t in LOG_TOPICS}
        part.next_offsets[part.tps[REDEMPTIONS]] = part.redemptions_from
        for t in LOG_TOPICS:
            consumer.seek(part.tps[t], stored[t] or 0)
        consumer.seek(part.tps[REDEMPTIONS], part.redemptions_from)
        part.phase = "profiles"
        consumer.pause(*[tp for t, tp in part.tps.items() if t != PROFILES])
        if part.catchup:
            log.info("partition %d: this host is behind the group (local %s, committed %s); "
                     "catching up from the inputs", number, stored, committed)

    async def _open_store(self, number: int) -> ThreadHost:
        s = self.settings
        host = new_host(number, s.partition_processes)
        waited_s = 0.0
        try:
            while True:
                try:
                    await host.open(s.data_dir, s.late_window_days, self.record_keys)
                    return host
                except PartitionBusy:
                    if waited_s >= PARTITION_BUSY_WAIT_S_MAX:
                        raise
                    await asyncio.sleep(PARTITION_BUSY_RETRY_S)
                    waited_s += PARTITION_BUSY_RETRY_S
        except BaseException:
            await host.close()
            raise

    async def _caught_up(self, tp: TopicPartition, target: int | None = None) -> bool:
        assert self.consumer is not None
        end = self.consumer.highwater(tp) if target is None else target
        return end is not None and await self.consumer.position(tp) >= end

    async def _advance_phases(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        for part in self._parts.values():
            if part.phase == "profiles" and await self._caught_up(part.tps[PROFILES]):
                part.phase = "catchup" if part.catchup else "live"
                resume = LOG_TOPICS if part.catchup else INPUT_TOPICS
                consumer.resume(*[part.tps[t] for t in resume])
            if part.phase == "catchup" and await self._catchup_done(part):
                await self._restore(part)
                consumer.seek(part.tps[REDEMPTIONS], part.redemptions_from)
                consumer.resume(part.tps[REDEMPTIONS])
                part.phase = "live"
                self.summary.caught_up_partitions.append(part.number)

    async def _catchup_done(self, part: PartitionState) -> bool:
        assert self.consumer is not None
        for t in LOG_TOPICS:
            tp = part.tps[t]
            if tp not in part.targets:
                end = self.consumer.highwater(tp)
                if end is None:
                    return False
                part.targets[tp] = end
            if not await self._caught_up(tp, part.targets[tp]):
                return False
        return True

    async def _restore(self, part: PartitionState) -> None:
        """Bring back what the previous owner did that the inputs cannot re-derive."""
        if not part.restore:
            return
        bootstrap, number = self.settings.bootstrap, part.number
        ledger = await read_partition(bootstrap, self.topics[LEDGER], number)
        requests = await read_partition(bootstrap, self.topics[REDEMPTIONS], number)
        selection = select_restorable([(offset, value) for offset, _, value in ledger],
                                      verified_requests([v for *_, v in requests],
                                                        self.record_keys), self.person_keys)
        restored, refused = await part.host.call("restore_entries", selection,
                                                 self.topics[LEDGER])
        part.outputs_pending = True
        self.summary.restored_entries += restored
        self.summary.restore_refused += refused
        self.summary.erased_records += selection.erased
        if refused:
            log.error("partition %d: %d entries on %s are not backed by an authenticated "
                      "request; not restored, dead-lettered as unauthenticated", number,
                      refused, self.topics[LEDGER])
        log.info("partition %d: restored %d redemption/refund/adjustment entries from %s",
                 number, restored, self.topics[LEDGER])

    async def _idle(self) -> bool:
        assert self.consumer is not None
        for part in self._parts.values():
            if part.phase != "live":
                return False
            for tp in part.tps.values():
                if not await self._caught_up(tp):
                    return False
        return True


class _Listener(ConsumerRebalanceListener):
    """Keeps stores open across a rebalance (most partitions stay: the assignor is
    sticky); on_assigned closes the ones that left and prepares the new ones."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._worker._lock:  # the cycle in progress finishes and commits first
            pass

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            await self._worker.on_assigned(set(assigned))
        except Exception as error:  # noqa: BLE001 (handed to the main loop, which raises it)
            log.error("taking over partitions failed: %s", error)
            self._worker.fail(error)


def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode()


async def run_worker(settings: WorkerSettings,
                     on_progress: Callable[[int, str], None] | None = None) -> WorkerSummary:
    """Run until SIGTERM/SIGINT (or caught up, with until_idle)."""
    worker = Worker(settings, on_progress)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    try:
        return await worker.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
