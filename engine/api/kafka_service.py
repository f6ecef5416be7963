"""The API's use cases in the Kafka runtime: redemptions go to the partition owner.

`genki serve --bootstrap` never writes a ledger. A redemption is checked here
exactly as in the embedded runtime (stored response, token signature, token
claim), then published as a `Redemption` record to genki.redemptions, keyed by
user_id, with the same ledger key (`token:<nonce>`); the worker owning that
partition applies it, and the request waits (bounded) for its entry on
genki.ledger or its dead letter on genki.dlq (engine.kafka.api_bridge). A
refusal releases the token claim, as in the embedded runtime. A timeout (504)
keeps the claim: the record is on the topic and may still be applied, and a
retry with the same Idempotency-Key gets its outcome.

Reads come from the workers' partition ledgers when their data directory is
on this host (`--partitions-dir`, opened read only; a user's partition by the
same partitioner the gateway uses); else they answer 503, because this host
has no copy of the balances to answer from.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.api.problems import ApiError
from engine.api.service import (
    LEDGER_KEY_PREFIX,
    ApiCore,
    Clock,
    IdempotencyConflict,
    Principal,
    Reply,
    entry_view,
    request_hash,
)
from engine.api.store import Role, TokenClaim
from engine.errors import GenkiError, NotFound
from engine.kafka.api_bridge import Outcome, RedemptionBridge, entry_id_of
from engine.kafka.combined import partition_numbers
from engine.kafka.partition import PARTITION_DIR_PREFIX
from engine.ledger import LEDGER_FILE_NAME
from engine.ledger.commands import ref_fields
from engine.ledger.errors import Overdraft  # noqa: F401 - registers ledger error codes
from engine.ledger.model import Entry
from engine.ledger.store import Ledger
from engine.schemas import Redemption, RedemptionKind

REFUSAL_STATUS_DEFAULT = 422


class ReadsUnavailable(ApiError):
    http_status = 503
    code = "reads_unavailable"


class NotInKafkaMode(ApiError):
    http_status = 503
    code = "not_in_kafka_mode"


class Refused(ApiError):
    """The partition owner refused the request; status and code come from its reason."""

    def __init__(self, code: str, status: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = status


def _status_by_code() -> dict[str, int]:
    found: dict[str, int] = {}
    pending: list[type[GenkiError]] = [GenkiError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.code, cls.http_status)
        pending.extend(cls.__subclasses__())
    return found


def refusal(reason: str) -> Refused:
    """A dead letter's reason ("insufficient_points: points: insufficient points: ...")
    as the error the embedded runtime would have raised."""
    code, _, message = reason.partition(":")
    message = message.strip()
    if message.startswith("points:"):
        message = message[len("points:"):].strip()
    status = _status_by_code().get(code, REFUSAL_STATUS_DEFAULT)
    if status < 400 or status >= 500:
        status = REFUSAL_STATUS_DEFAULT
    return Refused(code, status, message or reason)


@dataclass(frozen=True, slots=True)
class Pending:
    """A checked request, ready to publish: what to finish it with afterwards."""

    scope: str
    idempotency_key: str
    hashed: str
    record: Redemption
    claim: TokenClaim | None


class PartitionReads:
    """The workers' partition ledgers, read only, one connection per partition."""

    def __init__(self, partitions_dir: Path) -> None:
        self.partitions_dir = partitions_dir
        self._ledgers: dict[int, Ledger] = {}

    def ledger(self, number: int) -> Ledger:
        ledger = self._ledgers.get(number)
        if ledger is not None:
            return ledger
        path = self.partitions_dir / f"{PARTITION_DIR_PREFIX}{number}" / LEDGER_FILE_NAME
        if not path.exists():
            raise ReadsUnavailable(f"partition {number}'s ledger is not in {self.partitions_dir} "
                                   "(its worker runs on another host, or has not started); "
                                   "ask the API on that host")
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        ledger = self._ledgers[number] = Ledger(db, path)
        return ledger

    def all(self) -> list[Ledger]:
        return [self.ledger(n) for n in partition_numbers(self.partitions_dir)]

    def close(self) -> None:
        for ledger in self._ledgers.values():
            ledger.close()
        self._ledgers.clear()


class KafkaApiService(ApiCore):
    def __init__(self, data_dir: Path, bridge: RedemptionBridge,
                 partitions_dir: Path | None = None, *, token_ttl_s: int, clock: Clock) -> None:
        super().__init__(data_dir, token_ttl_s=token_ttl_s, clock=clock)
        self.bridge = bridge
        self.reads = PartitionReads(partitions_dir) if partitions_dir is not None else None

    def close(self) -> None:
        super().close()
        if self.reads is not None:
            self.reads.close()

    # -- reads -----------------------------------------------------------------------

    def _reads(self) -> PartitionReads:
        if self.reads is None:
            raise ReadsUnavailable("reads in Kafka mode need the workers' data directory: "
                                   "start `genki serve --bootstrap ... --partitions-dir DIR` on "
                                   "the host of the workers (DIR holds p<N>/ledger.sqlite)")
        return self.reads

    def _ledger_of(self, user_id: str) -> Ledger:
        return self._reads().ledger(self.bridge.partition_of_user(user_id))

    def balance(self, user_id: str) -> dict[str, Any]:
        return {"user_id": user_id, "balance": self._ledger_of(user_id).balance(user_id)}

    def history(self, user_id: str, cursor: int | None, limit: int) -> dict[str, Any]:
        entries, next_cursor = self._ledger_of(user_id).history(user_id, cursor, limit)
        return {"user_id": user_id, "entries": [entry_view(e) for e in entries],
                "next_cursor": next_cursor}

    def user_flags(self, user_id: str) -> dict[str, Any]:
        events = self._ledger_of(user_id).flag_history(user_id)
        latest = {event.flag: event for event in events}
        current = [e.model_dump(mode="json") for e in latest.values() if e.state == "raised"]
        return {"user_id": user_id, "current": current,
                "history": [e.model_dump(mode="json") for e in events]}

    def current_flags(self, day: str | None) -> dict[str, Any]:
        flags = [f for ledger in self._reads().all() for f in ledger.current_flags(day)]
        flags.sort(key=lambda f: (f.user_id, f.flag))
        return {"day": day, "flags": [f.model_dump(mode="json") for f in flags]}

    def settlement(self, shop_id: str, month: str) -> dict[str, Any]:
        parts = [ledger.settlement(shop_id, month) for ledger in self._reads().all()]
        redeemed = sum(p.redeemed_points for p in parts)
        refunded = sum(p.refunded_points for p in parts)
        return {"shop_id": shop_id, "month": month, "redeemed_points": redeemed,
                "refunded_points": refunded, "net_points": redeemed - refunded,
                "redemptions": sum(p.redemptions for p in parts),
                "refunds": sum(p.refunds for p in parts)}

    def _balance_or_none(self, user_id: str) -> int | None:
        """The balance after an entry the owner published (its ledger commits first)."""
        if self.reads is None:
            return None
        try:
            return self._ledger_of(user_id).balance(user_id)
        except ReadsUnavailable:
            return None

    def _entry_or_none(self, user_id: str, entry_id: str) -> dict[str, Any] | None:
        if self.reads is None:
            return None
        try:
            entry = self._ledger_of(user_id).entry(entry_id)
        except (NotFound, ReadsUnavailable):
            return None
        return _entry_dict(entry)

    # -- redemptions: checked on the writer thread, awaited on the event loop ----------

    def prepare_redeem(self, principal: Principal, idempotency_key: str, token: str,
                       points: int, terminal_id: str) -> Reply | Pending:
        attempt = self._start_redeem(principal, idempotency_key, token, points, terminal_id)
        if isinstance(attempt, Reply):
            return attempt
        claim = attempt.claim
        if claim is None:  # a claim of ours from an earlier try was made while fresh: publish again
            self.signer.check_fresh(attempt.claims, attempt.now_ms)
            claim = self._claim(attempt)
        record = Redemption(v=1, idempotency_key=LEDGER_KEY_PREFIX + attempt.claims.nonce,
                            shop_id=attempt.shop_id, terminal_id=terminal_id,
                            user_id=attempt.claims.user_id, points=points, ts_ms=attempt.now_ms,
                            kind=RedemptionKind.redeem)
        return Pending(attempt.scope, idempotency_key, attempt.hashed, record, claim)

    def known_outcome(self, pending: Pending) -> Outcome | None:
        """The entry already in the owner's ledger (a retry after a restart), if readable."""
        entry = self._entry_or_none(pending.record.user_id, entry_id_of(pending.record))
        return None if entry is None else Outcome(entry, None)

    def finish(self, pending: Pending, outcome: Outcome) -> Reply:
        record = pending.record
        if outcome.entry is None:
            if pending.claim is not None:
                self.write_store.release_claim(pending.claim)  # nothing written
            raise refusal(outcome.reason or "refused")
        entry = outcome.entry
        fields = ref_fields(entry.get("ref"))
        balance = self._balance_or_none(record.user_id)
        if record.kind == RedemptionKind.redeem:
            if (-entry["points"], fields.get("terminal")) != (record.points, record.terminal_id):
                raise IdempotencyConflict(
                    f"Idempotency-Key {pending.idempotency_key!r} already redeemed "
                    f"{-entry['points']} points at terminal {fields.get('terminal')}; this "
                    "request differs")
            body = {"entry_id": entry["entry_id"], "seq": entry["seq"],
                    "user_id": entry["user_id"], "shop_id": fields.get("shop"),
                    "terminal_id": fields.get("terminal"), "points": -entry["points"],
                    "ts_ms": entry["ts_ms"], "balance": balance}
            assert pending.claim is not None
            return self._keep(pending.scope, pending.idempotency_key, pending.hashed, body,
                              done_nonce=pending.claim.nonce, entry_id=entry["entry_id"])
        body = {"entry_id": entry["entry_id"], "seq": entry["seq"], "user_id": entry["user_id"],
                "shop_id": record.shop_id, "refund_of": record.refund_of,
                "points": entry["points"], "ts_ms": entry["ts_ms"], "balance": balance}
        return self._keep(pending.scope, pending.idempotency_key, pending.hashed, body)

    def prepare_refund(self, principal: Principal, idempotency_key: str,
                       redemption_entry_id: str, points: int) -> Reply | Pending:
        assert principal.role == Role.shop and principal.shop_id is not None
        scope = f"refunds:{principal.shop_id}"
        hashed = request_hash({"redemption_entry_id": redemption_entry_id, "points": points})
        replay = self._replay(scope, idempotency_key, hashed)
        if replay is not None:
            return replay
        user_id = self._redemption_user(redemption_entry_id)
        record = Redemption(v=1, idempotency_key=idempotency_key, shop_id=principal.shop_id,
                            terminal_id=principal.key_id, user_id=user_id, points=points,
                            ts_ms=self.clock(), kind=RedemptionKind.refund,
                            refund_of=redemption_entry_id)
        return Pending(scope, idempotency_key, hashed, record, None)

    def _redemption_user(self, entry_id: str) -> str:
        """Whose redemption it is, to route the refund to that user's partition."""
        user_id = self.write_store.redemption_user(entry_id)
        if user_id is not None:
            return user_id
        if self.reads is not None:
            for ledger in self.reads.all():
                try:
                    return ledger.entry(entry_id).user_id
                except NotFound:
                    continue
        raise NotFound(f"no redemption {entry_id} known to this API: it was not made here "
                       "(or long ago), and no --partitions-dir holds it")


def _entry_dict(entry: Entry) -> dict[str, Any]:
    return {"entry_id": entry.entry_id, "seq": entry.seq, "user_id": entry.user_id,
            "kind": entry.kind.value, "points": entry.points, "ts_ms": entry.ts_ms,
            "ref": entry.ref}
