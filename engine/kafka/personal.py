"""Per-person encryption of personal payloads on the topics that keep everything.

Inputs are kept forever (a new partition owner rebuilds from offset 0), so a
person's samples, activities and profile can only be erased from them by making
them unreadable: each person has data keys (AES-256-GCM), and their records are
encrypted with one. The keys live on the compacted topic `genki.keys` (message
key = user id), each wrapped (AES-256-GCM) by a wrap key from a file outside
every data directory (`--wrap-keys`, engine.kafka.keys), so a copy of the broker's
disks alone reads nothing. Erasure publishes a tombstone for the person
(`erase_person_keys`); from then on nothing of theirs decrypts, and a rebuild
counts their records as erased, not as bad input.

Encrypted value: MAGIC (4 bytes) + data key id (8) + nonce (12) + AES-GCM
ciphertext and tag; the associated data binds it to the topic and the person, so
it cannot be moved to another person or topic. JSON never starts with MAGIC's
zero byte, so plaintext records (a gateway that does not encrypt) still work.

A genki.keys value is the person's key ring, `{"v": 1, "keys": {"<dkid hex>":
{"w": "<wrap kid>", "k": "<base64 nonce + wrapped key>"}}}`; readers take the union
of the values after the last tombstone. Two gateways that create a first key for
the same person at once both publish; each then reads the topic back and, when
it finds a key it did not know, publishes the union, so the value compaction
keeps holds both keys.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import itemgetter

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.errors import GenkiError, UsageError
from engine.kafka.client import (
    READ_TO_END_POLL_MS,
    consumer_settings,
    producer_settings,
    topic_name,
)
from engine.kafka.keys import WRAP_KEYS_ENV, KeyFileError, Keyring, wrap_keys
from engine.kafka.topics import KEYS

MAGIC = b"\x00gk1"
DKID_BYTES = 8
NONCE_BYTES = 12
NONCE_PREFIX_BYTES = 8
NONCE_COUNTER_BYTES = NONCE_BYTES - NONCE_PREFIX_BYTES
NONCE_COUNTER_MAX = 2 ** (8 * NONCE_COUNTER_BYTES) - 1
DATA_KEY_BYTES = 32
HEADER_BYTES = len(MAGIC) + DKID_BYTES + NONCE_BYTES
KEYS_VALUE_BYTES_MAX = 64 * 1_024
DATA_KEYS_PER_PERSON_MAX = 64
# Long-running readers (workers, the HTTP gateway) look for new keys and tombstones at
# least this often, so an erasure takes effect on them without a restart.
KEYS_REFRESH_S_MAX = 10.0
FETCH_RECORDS_MAX = 50_000
ENCRYPTION_ENV = "GENKI_KAFKA_ENCRYPTION"


class UnknownWrapKey(KeyFileError):
    """A data key on genki.keys is wrapped by a key this process does not have: a
    configuration error (the wrong --wrap-keys file), never a reason to treat people
    as erased."""


def encryption_enabled() -> bool:
    """Default on; $GENKI_KAFKA_ENCRYPTION=off (or --no-encryption) opts out."""
    return os.environ.get(ENCRYPTION_ENV, "on").lower() not in ("off", "0", "false", "no")


def require_wrap_keys(what: str) -> Keyring:
    """The wrap keys `what` encrypts with (--wrap-keys / $GENKI_WRAP_KEYS / the default
    file, created on first use)."""
    return wrap_keys()


def is_sealed(value: bytes | None) -> bool:
    return value is not None and value[:4] == MAGIC


_first_byte = itemgetter(0)


def any_sealed(values: list[bytes]) -> bool:
    """Whether some value is encrypted. The common batch (all plain, from a gateway
    that does not encrypt) is told by the first bytes alone: JSON never starts with
    MAGIC's zero byte. A fifth of the cost of slicing every value."""
    try:
        if MAGIC[0] not in bytes(map(_first_byte, values)):
            return False
    except IndexError:  # an empty value (a tombstone) among them
        pass
    return any(v[:4] == MAGIC for v in values)


def _aad(tag: bytes, user: bytes) -> bytes:
    return tag + b"\x00" + user


@dataclass
class PersonKeys:
    """The data keys of the people this process handles, as read from genki.keys."""

    wrap: Keyring
    _users: dict[bytes, dict[bytes, AESGCM]] = field(default_factory=dict)
    _current: dict[bytes, bytes] = field(default_factory=dict)
    _rings: dict[bytes, dict[str, dict[str, str]]] = field(default_factory=dict)
    erased: set[bytes] = field(default_factory=set)
    _nonce_prefix: bytes = field(default_factory=lambda: os.urandom(NONCE_PREFIX_BYTES))
    _counter: int = 0

    # -- the key store -------------------------------------------------------------------

    def apply(self, user: bytes | None, value: bytes | None) -> None:
        """One genki.keys record, in topic order: a key ring, or a tombstone (erased)."""
        if not user:
            return
        if value is None:
            self._users.pop(user, None)
            self._current.pop(user, None)
            self._rings.pop(user, None)
            self.erased.add(user)
            return
        ring = _parse_ring(value)
        known = self._users.setdefault(user, {})
        wire = self._rings.setdefault(user, {})
        for dkid_hex, wrapped in ring.items():
            dkid = bytes.fromhex(dkid_hex)
            if dkid in known:
                continue
            known[dkid] = AESGCM(self._unwrap(user, dkid, wrapped))
            wire[dkid_hex] = wrapped
            self._current.setdefault(user, dkid)
        self.erased.discard(user)

    def _unwrap(self, user: bytes, dkid: bytes, wrapped: dict[str, str]) -> bytes:
        secret = self.wrap.keys.get(wrapped["w"])
        if secret is None:
            raise UnknownWrapKey(f"a data key on {KEYS} is wrapped by key {wrapped['w']!r}, "
                                 f"which the wrap key file does not hold (keys: "
                                 f"{', '.join(self.wrap.keys)}); give this process the "
                                 "file the gateways use")
        blob = base64.b64decode(wrapped["k"])
        try:
            return AESGCM(secret).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                          _aad(b"genki.keys", user + b"\x00" + dkid))
        except InvalidTag:
            raise UnknownWrapKey(f"a data key on {KEYS} does not unwrap with wrap key "
                                 f"{wrapped['w']!r}: a different file under the same id?") from None

    def knows(self, user: bytes) -> bool:
        return user in self._users

    def new_key(self, user: bytes) -> bytes:
        """A fresh data key for the person; returns the genki.keys value to publish
        (this person's whole ring) before any record encrypted with it."""
        dkid = os.urandom(DKID_BYTES)
        secret = AESGCM.generate_key(bit_length=8 * DATA_KEY_BYTES)
        nonce = os.urandom(NONCE_BYTES)
        wrapped = AESGCM(self.wrap.current_key).encrypt(
            nonce, secret, _aad(b"genki.keys", user + b"\x00" + dkid))
        self._users.setdefault(user, {})[dkid] = AESGCM(secret)
        self._current[user] = dkid
        self._rings.setdefault(user, {})[dkid.hex()] = {
            "w": self.wrap.current, "k": base64.b64encode(nonce + wrapped).decode()}
        self.erased.discard(user)
        return self.ring_value(user)

    def ring_value(self, user: bytes) -> bytes:
        return orjson.dumps({"v": 1, "keys": self._rings.get(user, {})})

    def ring_ids(self, user: bytes) -> set[str]:
        return set(self._rings.get(user, {}))

    # -- records -------------------------------------------------------------------------

    def seal(self, tag: bytes, user: bytes, plaintext: bytes) -> bytes:
        """The record encrypted with the person's current data key (which must exist).

        Nonces: 8 random bytes per process (renewed every 2^32 records) + a 4-byte
        counter, so no syscall per record and no repeat across processes that share a
        data key (a collision needs the same 64 random bits)."""
        dkid = self._current[user]
        self._counter += 1
        if self._counter >= NONCE_COUNTER_MAX:
            self._nonce_prefix, self._counter = os.urandom(NONCE_PREFIX_BYTES), 0
        nonce = self._nonce_prefix + self._counter.to_bytes(NONCE_COUNTER_BYTES, "big")
        return MAGIC + dkid + nonce + self._users[user][dkid].encrypt(
            nonce, plaintext, tag + b"\x00" + user)

    def seal_if_known(self, tag: bytes, user: bytes | None, plaintext: bytes) -> bytes:
        if user is None or user not in self._current:
            return plaintext
        return self.seal(tag, user, plaintext)

    def open(self, tag: bytes, user: bytes | None, value: bytes) -> bytes | None:
        """The plaintext, the value itself when not encrypted, or None: no key of this
        person opens it (erased, or never had a key here) — the record counts as erased."""
        if value[:4] != MAGIC:
            return value
        keys = self._users.get(user) if user else None
        key = keys.get(value[4:4 + DKID_BYTES]) if keys else None
        if key is None:
            return None
        try:
            return key.decrypt(value[4 + DKID_BYTES:HEADER_BYTES], value[HEADER_BYTES:],
                               _aad(tag, user or b""))
        except InvalidTag:
            return None

    def missing(self, users: list[bytes | None], values: list[bytes]) -> bool:
        """Whether some encrypted record names a data key not loaded yet (read
        genki.keys further before deciding it is erased)."""
        if not any_sealed(values):
            return False
        for user, value in zip(users, values, strict=True):
            if value is None or value[:4] != MAGIC or not user:
                continue
            keys = self._users.get(user)
            if keys is None or value[4:4 + DKID_BYTES] not in keys:
                return True
        return False


def _parse_ring(value: bytes) -> dict[str, dict[str, str]]:
    if len(value) > KEYS_VALUE_BYTES_MAX:
        raise GenkiError(f"a {KEYS} value is over {KEYS_VALUE_BYTES_MAX} bytes")
    try:
        body = orjson.loads(value)
        keys = body["keys"]
        assert isinstance(keys, dict)
        for dkid_hex, wrapped in keys.items():
            if len(bytes.fromhex(dkid_hex)) != DKID_BYTES or set(wrapped) != {"w", "k"}:
                raise ValueError(dkid_hex)
            base64.b64decode(wrapped["k"], validate=True)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AssertionError,
            binascii.Error):
        raise GenkiError(f"a {KEYS} value is not a key ring: {value[:80]!r}") from None
    return keys


# -- reading and writing genki.keys ------------------------------------------------------


class KeyTopic:
    """Reads genki.keys partitions into PersonKeys (to their high watermark, on demand)
    and publishes new key rings and tombstones."""

    def __init__(self, bootstrap: str, prefix: str, keys: PersonKeys,
                 client_id: str = "keys") -> None:
        self.topic = topic_name(prefix, KEYS)
        self.keys = keys
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._positions: dict[int, int] = {}
        self._refreshed_s = 0.0
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.partitions = 0

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(**consumer_settings(self._bootstrap, self._client_id))
        await self._consumer.start()
        self._producer = AIOKafkaProducer(**producer_settings(self._bootstrap, self._client_id,
                                                              "none", linger_ms=0))
        try:
            await self._producer.start()
            found = await self._producer.partitions_for(self.topic)
        except BaseException:
            await self.stop()
            raise
        self.partitions = len(found)

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def catch_up(self, numbers: Iterable[int] | None = None) -> int:
        """Read the partitions (default all) from where this reader stopped to their ends."""
        consumer = self._consumer
        assert consumer is not None, "start() first"
        wanted = sorted(set(range(self.partitions) if numbers is None else numbers))
        tps = [TopicPartition(self.topic, n) for n in wanted if n < self.partitions]
        if not tps:
            return 0
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, self._positions.get(tp.partition, 0))
        read = 0
        self._refreshed_s = time.monotonic()
        pending = set(tps)
        while pending:
            got = await consumer.getmany(*pending, timeout_ms=READ_TO_END_POLL_MS,
                                         max_records=FETCH_RECORDS_MAX)
            for tp, records in got.items():
                for record in records:
                    self.keys.apply(record.key, record.value)
                read += len(records)
            for tp in list(pending):
                end = consumer.highwater(tp)
                position = await consumer.position(tp)
                if end is not None and position >= end:
                    self._positions[tp.partition] = position
                    pending.discard(tp)
        return read

    async def refresh_if_due(self, numbers: Iterable[int] | None = None) -> None:
        """catch_up when the last one is older than KEYS_REFRESH_S_MAX."""
        if time.monotonic() - self._refreshed_s >= KEYS_REFRESH_S_MAX:
            await self.catch_up(numbers)

    def partition_of(self, user: bytes) -> int:
        from engine.kafka.publish import partition_of

        return partition_of(user, b"", self.partitions)

    async def publish_new_keys(self, users: list[bytes]) -> None:
        """Create a data key for each person and make it durable on genki.keys before any
        record uses it; then read back and publish the union where another writer raced."""
        producer = self._producer
        assert producer is not None, "start() first"
        numbers = {self.partition_of(u) for u in users}
        futures = [await producer.send(self.topic, self.keys.new_key(user), key=user,
                                       partition=self.partition_of(user)) for user in users]
        if futures:
            await asyncio.gather(*futures)
        mine = {user: self.keys.ring_ids(user) for user in users}
        await self.catch_up(numbers)
        raced = [u for u in users if self.keys.ring_ids(u) != mine[u] and self.keys.knows(u)]
        futures = [await producer.send(self.topic, self.keys.ring_value(user), key=user,
                                       partition=self.partition_of(user)) for user in raced]
        if futures:
            await asyncio.gather(*futures)

    async def tombstone(self, user: bytes) -> int:
        producer = self._producer
        assert producer is not None, "start() first"
        sent = await producer.send_and_wait(self.topic, None, key=user,
                                            partition=self.partition_of(user))
        self.keys.apply(user, None)
        return int(sent.offset)


# -- erasure -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ErasedKeys:
    user_id: str
    topic: str
    partition: int
    offset: int


async def erase_person_keys_async(user_id: str, bootstrap: str, prefix: str = "") -> ErasedKeys:
    """Destroy a person's data keys: a tombstone on genki.keys (idempotent: again is
    harmless). Their records on every topic become unreadable, now and after any rebuild;
    the compacted topic drops the key values at its next compaction."""
    user = user_id.encode()
    # A tombstone needs no wrap key; an empty ring stands in for one.
    topic = KeyTopic(bootstrap, prefix, PersonKeys(Keyring("-", {"-": b"\x00" * 32})), "erase")
    await topic.start()
    try:
        offset = await topic.tombstone(user)
        return ErasedKeys(user_id, topic.topic, topic.partition_of(user), offset)
    finally:
        await topic.stop()


def erase_person_keys(user_id: str, bootstrap: str, prefix: str = "") -> ErasedKeys:
    """`genki erase` in Kafka mode calls this (see erase_person_keys_async)."""
    return asyncio.run(erase_person_keys_async(user_id, bootstrap, prefix))


def open_inputs(keys: PersonKeys | None, tag: bytes, offsets: list[int],
                users: list[bytes | None], values: list[bytes],
                ) -> tuple[list[int], list[bytes], int]:
    """(offsets, plaintexts, erased) of one topic's records: a record no key opens is left
    out and counted as erased (its person's keys were destroyed), never dead-lettered."""
    sealed = any_sealed(values)
    if keys is None:
        if sealed:
            raise UsageError("encrypted records on the input topics, and no wrap keys: give "
                             f"the worker --wrap-keys FILE or ${WRAP_KEYS_ENV}")
        return offsets, values, 0
    if not sealed:
        return offsets, values, 0
    kept_offsets: list[int] = []
    kept: list[bytes] = []
    for offset, user, value in zip(offsets, users, values, strict=True):
        plain = keys.open(tag, user, value) if value[:4] == MAGIC else value
        if plain is not None:
            kept_offsets.append(offset)
            kept.append(plain)
    return kept_offsets, kept, len(values) - len(kept)


# Output records sealed per person (the worker seals, readers open with the same tag).
FLAGS_TAG = b"genki.flags"
LEDGER_TAG = b"genki.ledger"
DLQ_TAG = b"genki.dlq"
# Ledger entries whose fields tell what a person did and when (awards from their
# vitals and activities, expiries of those): sealed. Redemptions, refunds and
# adjustments stay readable: settlement, the API and takeover verification need them.
SEALED_ENTRY_KINDS: frozenset[str] = frozenset({"award", "expire"})
SEALED_ENTRY_CLEAR_FIELDS: tuple[str, ...] = ("seq", "entry_id", "user_id", "kind", "prev_hash",
                                              "hash")


def seal_entry(keys: PersonKeys, entry: dict[str, object]) -> bytes:
    """A ledger entry for genki.ledger: award and expiry entries keep only their ids,
    kind and chain fields in clear, the rest (points, day, time, rule, ref) sealed."""
    user = str(entry["user_id"]).encode()
    body = orjson.dumps(entry)
    if entry.get("kind") not in SEALED_ENTRY_KINDS or not keys.knows(user):
        return body
    clear = {name: entry[name] for name in SEALED_ENTRY_CLEAR_FIELDS}
    clear["sealed"] = base64.b64encode(keys.seal(LEDGER_TAG, user, body)).decode()
    return orjson.dumps(clear)


def open_entry(keys: PersonKeys | None, value: bytes) -> bytes | None:
    """A genki.ledger value as the full entry JSON, or None when it does not open."""
    if b'"sealed"' not in value:
        return value
    body = orjson.loads(value)
    if "sealed" not in body:
        return value
    if keys is None:
        return None
    return keys.open(LEDGER_TAG, str(body["user_id"]).encode(), base64.b64decode(body["sealed"]))


async def load_person_keys(bootstrap: str, prefix: str = "") -> PersonKeys:
    """Every data key on genki.keys, for a reader of whole topics (replay)."""
    keys = PersonKeys(wrap_keys())
    topic = KeyTopic(bootstrap, prefix, keys, "replay-keys")
    await topic.start()
    try:
        await topic.catch_up()
    finally:
        await topic.stop()
    return keys


def open_output(keys: PersonKeys | None, tag: bytes, user: bytes | None,
                value: bytes) -> bytes | None:
    """A flag event (tag FLAGS_TAG) or ledger entry (LEDGER_TAG) as published: its JSON,
    or None when it does not open (erased, or no wrap keys)."""
    if tag == LEDGER_TAG:
        return open_entry(keys, value)
    if value[:4] != MAGIC:
        return value
    return None if keys is None else keys.open(tag, user, value)
