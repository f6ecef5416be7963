"""The HTTP API's way into the Kafka runtime: publish a redemption, wait for its outcome.

In Kafka mode the API never writes a ledger: the worker that owns the user's
partition is the user's single writer. The bridge produces a `Redemption`
record keyed by user_id to the user's partition of genki.redemptions, then
waits for what the owner made of it. One background consumer (no group; every
partition of genki.ledger and genki.dlq, from their ends at startup) resolves
the waiting requests by entry id: the entry with the request's deterministic
id (redeem_id / refund_id) on genki.ledger, or a dead letter of the record on
genki.dlq (its raw record decoded, or else its partition and offset).

Starting "from the end" uses ListOffsets(latest), which tansu under-reports
(docs/kafka.md): the consumer then starts a little before the true end. That
is harmless: an older entry can only resolve a request for its own id, and
then it is that request's answer.

A request that timed out stays watched (bounded), so a retry with the same
Idempotency-Key that comes after its outcome arrived gets it at once, without
publishing again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from engine.errors import GenkiError, UsageError
from engine.kafka.authn import authenticated_value, require_record_keys
from engine.kafka.client import consumer_settings, producer_settings, topic_name
from engine.kafka.keys import Keyring
from engine.kafka.publish import partition_of
from engine.kafka.topics import (
    DLQ,
    LEDGER,
    REDEMPTIONS,
    TopicsError,
    admin_client,
    partition_counts,
)
from engine.ledger.commands import redeem_id, refund_id
from engine.schemas import LedgerEntry, Redemption, RedemptionKind

# How long a request waits for the owner's answer before 504 (retry with the same key).
OUTCOME_WAIT_S_MAX = 15.0
# Requests waiting at once; more get 503 instead of queueing without bound.
WAITING_REQUESTS_MAX = 1_000
# Waiting plus timed-out requests whose outcome is still watched for a retry.
WATCHED_REQUESTS_MAX = 4 * WAITING_REQUESTS_MAX
FETCH_RECORDS_MAX = 10_000
POLL_MS = 200
CONSUME_RETRY_S = 1.0

log = logging.getLogger("genki.kafka.api_bridge")


class OutcomeTimeout(GenkiError):
    http_status = 504
    code = "outcome_timeout"


class BridgeBusy(GenkiError):
    http_status = 503
    code = "kafka_busy"


class BridgeUnavailable(GenkiError):
    http_status = 503
    code = "kafka_unavailable"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the partition owner did: an entry (as on genki.ledger) or a refusal reason."""

    entry: dict[str, Any] | None
    reason: str | None


def entry_id_of(record: Redemption) -> str:
    """The ledger entry id the owner writes for this request."""
    if record.kind == RedemptionKind.redeem:
        return redeem_id(record.shop_id, record.idempotency_key)
    return refund_id(record.shop_id, record.idempotency_key)


class RedemptionBridge:
    def __init__(self, bootstrap: str, prefix: str = "", client_id: str = "api",
                 outcome_wait_s: float = OUTCOME_WAIT_S_MAX) -> None:
        if not 0 < outcome_wait_s <= OUTCOME_WAIT_S_MAX:
            raise UsageError(f"outcome wait: more than 0 and at most {OUTCOME_WAIT_S_MAX:g} s, "
                             f"got {outcome_wait_s:g}")
        self.bootstrap = bootstrap
        self.outcome_wait_s = outcome_wait_s
        self.topics = {name: topic_name(prefix, name) for name in (REDEMPTIONS, LEDGER, DLQ)}
        self.client_id = client_id
        self.partitions = 0
        self._watch: OrderedDict[str, asyncio.Future[Outcome]] = OrderedDict()
        self._watch_user: dict[str, bytes] = {}  # entry id → its user's record key
        self._users: dict[bytes, int] = {}  # user key → watched requests (filters genki.ledger)
        self._by_offset: dict[tuple[int, int], str] = {}  # redemptions (partition, offset) → id
        self._offset_of: dict[str, tuple[int, int]] = {}
        self._waiting = 0
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self.skipped_records = 0  # unreadable records on genki.ledger / genki.dlq
        self._record_keys: Keyring | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._record_keys = require_record_keys()
        admin = admin_client(self.bootstrap)
        await admin.start()
        try:
            counts = await partition_counts(admin, list(self.topics.values()))
        finally:
            await admin.close()
        self.partitions = counts[self.topics[REDEMPTIONS]]
        if counts[self.topics[LEDGER]] != self.partitions:
            raise TopicsError(f"{self.topics[REDEMPTIONS]} has {self.partitions} partitions, "
                              f"{self.topics[LEDGER]} {counts[self.topics[LEDGER]]}: they must "
                              "be co-partitioned (users are partitioned by user_id)")
        producer = AIOKafkaProducer(**producer_settings(self.bootstrap, self.client_id,
                                                        linger_ms=0))
        consumer = AIOKafkaConsumer(**consumer_settings(self.bootstrap, self.client_id))
        await producer.start()
        try:
            await consumer.start()
        except BaseException:
            await producer.stop()
            raise
        self._producer, self._consumer = producer, consumer
        tps = [TopicPartition(self.topics[t], p) for t in (LEDGER, DLQ)
               for p in range(counts[self.topics[t]])]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the start positions before any request is published
            await consumer.position(tp)
        self._task = asyncio.create_task(self._consume(), name="genki-api-bridge")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for future in self._watch.values():
            if not future.done():
                future.cancel()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    def partition_of_user(self, user_id: str) -> int:
        assert self.partitions > 0, "bridge not started"
        return partition_of(user_id.encode(), b"", self.partitions)

    # -- requests ------------------------------------------------------------------------

    async def submit(self, record: Redemption) -> Outcome:
        """Publish the request (unless it is already watched) and wait for its outcome."""
        if self._waiting >= WAITING_REQUESTS_MAX:
            raise BridgeBusy(f"{WAITING_REQUESTS_MAX} redemption requests are already waiting "
                             "for their partition owners; retry with the same Idempotency-Key")
        entry_id = entry_id_of(record)
        future = self._watch.get(entry_id)
        self._waiting += 1
        try:
            if future is None:
                future = self._add_watch(entry_id, record.user_id)
                await self._publish(entry_id, record)
            return await asyncio.wait_for(asyncio.shield(future), self.outcome_wait_s)
        except TimeoutError:
            # The partition is named in the log only: it is a hash of the person's id.
            log.warning("no outcome from the owner of partition %d within %g s",
                        self.partition_of_user(record.user_id), self.outcome_wait_s)
            raise OutcomeTimeout(
                f"no answer from the partition owner within {self.outcome_wait_s:g} s (is a "
                "`genki worker` running?); the request was published and may still be "
                "applied: retry with the same Idempotency-Key to get its outcome") from None
        finally:
            self._waiting -= 1
            if future is not None and future.done():
                self._drop_watch(entry_id, future)

    async def _publish(self, entry_id: str, record: Redemption) -> None:
        assert self._producer is not None
        key = record.user_id.encode()
        value = authenticated_value(record, self._record_keys)
        partition = partition_of(key, value, self.partitions)
        try:
            sent = await self._producer.send_and_wait(self.topics[REDEMPTIONS], value, key=key,
                                                      partition=partition)
        except KafkaError as error:
            self._drop_watch(entry_id, self._watch.get(entry_id))
            raise BridgeUnavailable(f"publishing to {self.topics[REDEMPTIONS]} failed: {error}; "
                                    "retry with the same Idempotency-Key") from None
        if entry_id in self._watch:
            self._by_offset[(sent.partition, sent.offset)] = entry_id
            self._offset_of[entry_id] = (sent.partition, sent.offset)

    def _add_watch(self, entry_id: str, user_id: str) -> asyncio.Future[Outcome]:
        while len(self._watch) >= WATCHED_REQUESTS_MAX:
            oldest, watched = next(iter(self._watch.items()))
            self._drop_watch(oldest, watched)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        key = user_id.encode()
        self._watch[entry_id] = future
        self._watch_user[entry_id] = key
        self._users[key] = self._users.get(key, 0) + 1
        return future

    def _drop_watch(self, entry_id: str, future: asyncio.Future[Outcome] | None) -> None:
        if future is None or self._watch.get(entry_id) is not future:
            return
        del self._watch[entry_id]
        key = self._watch_user.pop(entry_id)
        left = self._users[key] - 1
        if left:
            self._users[key] = left
        else:
            del self._users[key]
        where = self._offset_of.pop(entry_id, None)
        if where is not None:
            del self._by_offset[where]

    def _resolve(self, entry_id: str, outcome: Outcome) -> None:
        future = self._watch.get(entry_id)
        if future is not None and not future.done():
            future.set_result(outcome)

    # -- the outcome consumer ----------------------------------------------------------

    async def _consume(self) -> None:
        """Resolve waiting requests from genki.ledger and genki.dlq, forever: a record it
        cannot read is counted, logged and skipped, never the end of the loop (every
        redemption would wait for nothing after it)."""
        consumer = self._consumer
        assert consumer is not None
        while True:
            try:
                got = await consumer.getmany(timeout_ms=POLL_MS, max_records=FETCH_RECORDS_MAX)
            except KafkaError as error:
                log.warning("reading outcomes failed (%s); retrying", error)
                await asyncio.sleep(CONSUME_RETRY_S)
                continue
            if not self._watch:
                continue
            for tp, records in got.items():
                on_ledger = tp.topic == self.topics[LEDGER]
                for record in records:
                    if on_ledger and record.key not in self._users:
                        continue
                    try:
                        if on_ledger:
                            self._on_ledger_entry(record.value or b"")
                        else:
                            self._on_dead_letter(record.value or b"")
                    except Exception:  # one bad record must not stop the loop
                        self._skip(tp.topic, tp.partition, record.offset, "unexpected error")
                        log.exception("outcome record %s/%d@%d", tp.topic, tp.partition,
                                      record.offset)

    def _skip(self, topic: str, partition: int, offset: int, why: str) -> None:
        self.skipped_records += 1
        log.warning("skipped unreadable outcome record %s/%d@%d (%s); %d skipped so far",
                    topic, partition, offset, why, self.skipped_records)

    def _on_ledger_entry(self, value: bytes) -> None:
        try:
            entry = LedgerEntry.model_validate_json(value)
        except ValidationError:
            self.skipped_records += 1
            log.warning("skipped a %s record that is not a ledger entry", self.topics[LEDGER])
            return
        self._resolve(entry.entry_id, Outcome(entry.model_dump(mode="json"), None))

    def _on_dead_letter(self, value: bytes) -> None:
        try:
            letter = orjson.loads(value)
        except orjson.JSONDecodeError:
            letter = None
        if not isinstance(letter, dict):
            self.skipped_records += 1
            log.warning("skipped a %s record that is not a dead letter", self.topics[DLQ])
            return
        if letter.get("source") != self.topics[REDEMPTIONS]:
            return
        partition, offset = letter.get("partition"), letter.get("offset")
        where = (partition, offset) if isinstance(partition, int) \
            and isinstance(offset, int) else (-1, -1)
        entry_id = self._by_offset.get(where)
        if entry_id is None:  # refused before send_and_wait returned, or not ours
            try:
                entry_id = entry_id_of(Redemption.model_validate_json(
                    base64.b64decode(str(letter.get("raw_b64", "")))))
            except (ValueError, binascii.Error):
                return  # not one of ours (ours are valid records)
            if self._offset_of.get(entry_id, where) != where:
                return  # an earlier, refused try of the same request
        self._resolve(entry_id, Outcome(None, str(letter.get("reason", ""))))
