"""The Kafka runtime's backends of the API service: partition reads and a redeemer
that goes through the partition owner.

`genki serve --bootstrap` never writes a ledger. A checked shop command
(engine.api.service) is published as a `Redemption` record to
genki.redemptions, keyed by user_id, with the keyed ledger key, the request's
fingerprint and the daily limit; the worker owning that partition applies it
with the same ledger rules as the embedded runtime, and the request waits
(bounded) for its entry on genki.ledger or its dead letter on genki.dlq
(engine.kafka.api_bridge). A dead letter's reason code (the ledger error's
code) is the refusal; its message is never shown to the shop. A timeout (504)
keeps the request's claims: the record is on the topic and may still be
applied, and a retry with the same Idempotency-Key gets its outcome.

Reads come from the workers' partition ledgers when their data directory is
on this host (`--partitions-dir`, opened read only; a user's partition by the
same partitioner the gateway uses); else they answer 503, because this host
has no copy of the balances to answer from.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from engine.api.problems import ReadsUnavailable
from engine.api.service import ApiService, Command, settlement_view
from engine.errors import GenkiError, NotFound
from engine.kafka.api_bridge import RedemptionBridge
from engine.kafka.combined import partition_numbers
from engine.kafka.partition import PARTITION_DIR_PREFIX
from engine.ledger import LEDGER_FILE_NAME
from engine.ledger.model import ENTRY_COLUMNS, Entry, Settlement
from engine.ledger.store import Ledger
from engine.schemas import EntryKind, FlagEvent, Redemption, RedemptionKind


class OwnerRefused(GenkiError):
    """The partition owner dead-lettered the request; `code` is its reason's code."""

    http_status = 409

    def __init__(self, code: str) -> None:
        super().__init__(f"refused by the partition owner: {code}")
        self.code = code


def entry_of_wire(fields: dict[str, Any]) -> Entry:
    return Entry.from_row(tuple(fields.get(name) for name in ENTRY_COLUMNS))


class PartitionReads:
    """The workers' partition ledgers, read only, one connection per partition."""

    def __init__(self, partitions_dir: Path | None, bridge: RedemptionBridge) -> None:
        self.partitions_dir = partitions_dir
        self.bridge = bridge
        self._ledgers: dict[int, Ledger] = {}

    def _ledger(self, number: int) -> Ledger:
        ledger = self._ledgers.get(number)
        if ledger is not None:
            return ledger
        if self.partitions_dir is None:
            raise ReadsUnavailable("reads in Kafka mode need the workers' data directory: "
                                   "start `genki serve --bootstrap ... --partitions-dir DIR` on "
                                   "the host of the workers (DIR holds p<N>/ledger.sqlite)")
        path = self.partitions_dir / f"{PARTITION_DIR_PREFIX}{number}" / LEDGER_FILE_NAME
        if not path.exists():
            raise ReadsUnavailable(f"partition {number}'s ledger is not in {self.partitions_dir} "
                                   "(its worker runs on another host, or has not started); "
                                   "ask the API on that host")
        ledger = self._ledgers[number] = Ledger.open_read_only(path.parent)
        return ledger

    def _of(self, user_id: str) -> Ledger:
        return self._ledger(self.bridge.partition_of_user(user_id))

    def _all(self) -> list[Ledger]:
        if self.partitions_dir is None:
            return [self._ledger(0)]  # raises ReadsUnavailable
        return [self._ledger(n) for n in partition_numbers(self.partitions_dir)]

    def balance(self, user_id: str) -> int:
        return self._of(user_id).balance(user_id)

    def history(self, user_id: str, cursor: int | None,
                limit: int) -> tuple[list[Entry], int | None]:
        return self._of(user_id).history(user_id, cursor, limit)

    def flag_history(self, user_id: str) -> list[FlagEvent]:
        return self._of(user_id).flag_history(user_id)

    def current_flags(self, day: str | None) -> list[FlagEvent]:
        flags = [f for ledger in self._all() for f in ledger.current_flags(day)]
        flags.sort(key=lambda f: (f.user_id, f.flag))
        return flags

    def settlement(self, shop_id: str, month: str) -> dict[str, Any]:
        parts = [ledger.settlement(shop_id, month) for ledger in self._all()]
        redeemed = sum(p.redeemed_points for p in parts)
        refunded = sum(p.refunded_points for p in parts)
        return settlement_view(Settlement(shop_id, month, redeemed, refunded,
                                          sum(p.redemptions for p in parts),
                                          sum(p.refunds for p in parts)))

    def entry(self, user_id: str | None, entry_id: str) -> Entry | None:
        """The entry if a partition ledger on this host has it (else None: unknown)."""
        if self.partitions_dir is None:
            return None
        try:
            ledgers = [self._of(user_id)] if user_id is not None else self._all()
        except ReadsUnavailable:
            return None
        for ledger in ledgers:
            try:
                return ledger.entry(entry_id)
            except NotFound:
                continue
        return None

    def entries(self, wanted: Sequence[tuple[str | None, str]]) -> dict[str, Entry]:
        found = ((entry_id, self.entry(user_id, entry_id)) for user_id, entry_id in wanted)
        return {entry_id: entry for entry_id, entry in found if entry is not None}

    def close(self) -> None:
        for ledger in self._ledgers.values():
            ledger.close()
        self._ledgers.clear()


class KafkaRedeemer:
    """Publishes the command to its user's partition owner and awaits the outcome."""

    synchronous = False

    def __init__(self, bridge: RedemptionBridge) -> None:
        self.bridge = bridge

    def apply(self, command: Command) -> Entry:
        raise AssertionError("the Kafka redeemer is awaited on the event loop (submit)")

    def apply_all(self, commands: Sequence[Command]) -> list[Entry | GenkiError]:
        raise AssertionError("the Kafka redeemer is awaited on the event loop (submit)")

    def batch(self) -> AbstractContextManager[None]:
        return nullcontext()

    async def submit(self, command: Command) -> Entry:
        outcome = await self.bridge.submit(record_of(command))
        if outcome.entry is None:
            code = (outcome.reason or "refused").split(":", 1)[0].strip()
            raise OwnerRefused(code)
        return entry_of_wire(outcome.entry)

    def close(self) -> None:
        pass


def record_of(command: Command) -> Redemption:
    if command.kind == EntryKind.redeem:
        return Redemption(v=1, idempotency_key=command.ledger_key, shop_id=command.shop_id,
                          terminal_id=command.terminal_id, user_id=command.user_id,
                          points=command.points, ts_ms=command.ts_ms,
                          kind=RedemptionKind.redeem, request=command.claim.fingerprint,
                          points_per_day_max=command.points_per_day_max)
    return Redemption(v=1, idempotency_key=command.ledger_key, shop_id=command.shop_id,
                      terminal_id=command.terminal_id, user_id=command.user_id,
                      points=command.points, ts_ms=command.ts_ms, kind=RedemptionKind.refund,
                      refund_of=command.refund_of)


class KafkaApiService(ApiService):
    """The API service of `genki serve --bootstrap`: partition reads, the Kafka redeemer."""

    def __init__(self, data_dir: Path, bridge: RedemptionBridge, partitions_dir: Path | None,
                 **options: Any) -> None:
        super().__init__(data_dir, PartitionReads(partitions_dir, bridge),
                         KafkaRedeemer(bridge), kafka=True, **options)
        self.bridge = bridge

    def health(self) -> dict[str, Any]:
        return {"outcome_records_skipped": self.bridge.skipped_records}
