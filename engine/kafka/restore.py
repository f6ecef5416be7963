"""Takeover: which entries from genki.ledger a new partition owner may trust.

genki.ledger is the changelog a new owner restores redemptions, refunds and
adjustments from (the inputs cannot re-derive them). Anyone who could write that
topic could otherwise mint points by publishing a refund entry, so a restored
redeem, refund or adjust entry is trusted only when it matches a request on
genki.redemptions that carries a valid authenticator from the API service
(engine.kafka.authn): same entry id (derived from shop + idempotency key), same
user, same kind and the points that request asked for. Anything else becomes a
dead letter `unauthenticated` and is not restored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from engine.ingest.reasons import Reason, reason_text
from engine.kafka.authn import verification_failure
from engine.kafka.client import READ_TO_END_POLL_MS, consumer_settings
from engine.kafka.keys import Keyring
from engine.kafka.personal import PersonKeys, open_entry
from engine.ledger.commands import expire_id, redeem_id, ref_fields, refund_id
from engine.ledger.model import Entry
from engine.schemas import EntryKind, LedgerEntry, Redemption, RedemptionKind

FETCH_RECORDS_MAX = 50_000
# Kinds made by commands, not rules: restored from genki.ledger on takeover.
RESTORED_KINDS: frozenset[str] = frozenset({"redeem", "refund", "adjust", "expire"})
# Of those, the kinds that move points on a shop's or staff's request: they need a
# verified request. (Expiry is the ledger's own policy over its lots.)
REQUESTED_KINDS: frozenset[str] = frozenset({"redeem", "refund", "adjust"})


async def read_partition(bootstrap: str, topic: str, number: int,
                         ) -> list[tuple[int, bytes | None, bytes]]:
    """(offset, key, value) of every record on one partition, read to its high watermark."""
    consumer = AIOKafkaConsumer(**consumer_settings(bootstrap, "restore"))
    await consumer.start()
    tp = TopicPartition(topic, number)
    records: list[tuple[int, bytes | None, bytes]] = []
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        while True:
            got = await consumer.getmany(tp, timeout_ms=READ_TO_END_POLL_MS,
                                         max_records=FETCH_RECORDS_MAX)
            records.extend((r.offset, r.key, r.value or b"") for r in got.get(tp, []))
            end = consumer.highwater(tp)  # tansu's end_offsets() under-reports
            if end is not None and await consumer.position(tp) >= end:
                return records
    finally:
        await consumer.stop()


@dataclass(frozen=True, slots=True)
class Expected:
    user_id: str
    kind: str
    points: int


def verified_requests(values: list[bytes],
                      keys: Keyring | None) -> dict[str, set[Expected]]:
    """Entry id → what the entry may be, for every authenticated request (several requests
    can name one id: the same Idempotency-Key sent with another body, which the owner
    refused; the entry is the one of the request it applied)."""
    found: dict[str, set[Expected]] = {}
    for raw in values:
        try:
            request = Redemption.model_validate_json(raw)
        except ValidationError:
            continue
        if verification_failure(request, keys) is not None:
            continue
        if request.kind == RedemptionKind.redeem:
            found.setdefault(redeem_id(request.shop_id, request.idempotency_key), set()).add(
                Expected(request.user_id, EntryKind.redeem.value, -request.points))
        else:
            found.setdefault(refund_id(request.shop_id, request.idempotency_key), set()).add(
                Expected(request.user_id, EntryKind.refund.value, request.points))
    return found


@dataclass
class RestoreSelection:
    trusted: list[LedgerEntry] = field(default_factory=list)
    # (offset, reason, raw) of entries refused
    refused: list[tuple[int, str, bytes]] = field(default_factory=list)
    # (offset, raw, entry) of expiry entries: checked against the rebuilt ledger's lots
    # by the partition store (engine.kafka.partition.PartitionStore.restore_entries)
    expiries: list[tuple[int, bytes, LedgerEntry]] = field(default_factory=list)
    erased: int = 0


def select_restorable(records: list[tuple[int, bytes]], requests: dict[str, set[Expected]],
                      keys: PersonKeys | None = None) -> RestoreSelection:
    """The restorable entries of a genki.ledger partition that a verified request backs
    (sealed entries of erased people do not open: they are skipped, counted as erased)."""
    selection = RestoreSelection()
    for offset, raw in records:
        opened = open_entry(keys, raw)
        if opened is None:
            selection.erased += 1
            continue
        try:
            entry = LedgerEntry.model_validate_json(opened)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "record"
            selection.refused.append((offset, reason_text(Reason.bad_field, where,
                                                          first["msg"]), raw))
            continue
        kind = entry.kind.value
        if kind not in RESTORED_KINDS:
            continue
        if keys is not None and entry.user_id.encode() in keys.erased:
            # the person's keys were destroyed: their awards do not come back, and
            # neither do the redemptions those awards paid for
            selection.erased += 1
            continue
        if kind in REQUESTED_KINDS:
            expected = requests.get(entry.entry_id)
            if expected is None or Expected(entry.user_id, kind, entry.points) not in expected:
                why = "no authenticated request on genki.redemptions made this entry" \
                    if expected is None else "differs from every authenticated request's " \
                    "user, kind or points with its id"
                selection.refused.append((offset, reason_text(Reason.unauthenticated,
                                                              "entry_id", why), raw))
                continue
        if kind == EntryKind.expire.value:
            selection.expiries.append((offset, raw, entry))
            continue
        selection.trusted.append(entry)
    return selection


def expiry_failure(entry: LedgerEntry, lot: Entry | None) -> str | None:
    """None when an expiry entry ends (part of) an award lot of its own person under the id
    the ledger derives for it; else the dead-letter reason. (Expiry has no request to
    check against; this stops a forged one from burning more than a real lot.)"""
    lot_id = ref_fields(entry.ref).get("lot")
    if not lot_id or entry.entry_id != expire_id(entry.user_id, str(lot_id)):
        why = "an expiry's id must be derived from its person and lot"
    elif lot is None or lot.kind != EntryKind.award or lot.user_id != entry.user_id:
        why = f"names no award lot {lot_id} of {entry.user_id} in the rebuilt ledger"
    elif not 0 < -entry.points <= lot.points:
        why = f"takes {-entry.points} points from a lot of {lot.points}"
    else:
        return None
    return reason_text(Reason.unauthenticated, "entry_id", why)
