"""The API's use cases, free of HTTP: authenticate, redeem with a token, refund, adjust, ingest.

Threads: reads use `reader` (the event loop's thread), the write commands run
on one writer thread (`writer` resources), ingest on its own thread because
the embedded log's connection belongs to the thread that opened it. Each has
its own SQLite connections, so a read never waits behind a write's fsync.

Redemption with a token (single use, crash safe):
1. A stored response for (shop, Idempotency-Key) is returned as it was (or
   422 if the body differs) before anything else, so a retry after the token
   expired still gets its answer.
2. The token's signature is checked (401), then its claim: a token held by
   another (shop, key) is 409. An expired token is 401 unless this very
   request had already written its entry (then it is finished, see 4).
3. The claim is recorded as pending, then the ledger entry is written with the
   ledger idempotency key `token:<nonce>`, so a redemption per token and shop
   can exist at most once, whatever is retried.
4. The response is stored and the claim marked done in one transaction. If
   the process dies between 3 and 4, a retry with the same key finds its own
   claim, the ledger returns the entry it already has, and 4 completes. If the
   ledger refuses (insufficient points, ...), nothing was written and the
   claim is released, so the token stays usable.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from engine.api.limits import (
    PRUNE_EVERY_WRITES,
    RESPONSES_KEPT_DAYS,
    TOKEN_TTL_S_DEFAULT,
    TOKEN_TTL_S_MAX,
)
from engine.api.problems import Forbidden, TokenExpired, TokenUsed, Unauthenticated
from engine.api.store import ApiStore, KeyRecord, Role, StoredResponse, TokenClaim, key_hash
from engine.api.tokens import TokenClaims, TokenSigner, load_or_create_secret
from engine.clock import DAY_MS
from engine.errors import ExistsWithDifferent, NotFound, UsageError
from engine.ingest.log import EmbeddedLog
from engine.ledger.commands import describe, redeem_id, ref_fields
from engine.ledger.model import Entry
from engine.ledger.store import Ledger

_T = TypeVar("_T")

Clock = Callable[[], int]
LEDGER_KEY_PREFIX = "token:"


def system_clock(offset_ms: int = 0) -> Clock:
    def now_ms() -> int:
        return time.time_ns() // 1_000_000 + offset_ms
    return now_ms


class IdempotencyConflict(ExistsWithDifferent):
    """The same Idempotency-Key was sent before with another request body."""


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    role: Role
    shop_id: str | None


@dataclass(frozen=True, slots=True)
class Reply:
    """A JSON response: status, body bytes, and whether it was replayed from storage."""

    status: int
    body: bytes
    replayed: bool = False


def request_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()


def entry_view(entry: Entry) -> dict[str, Any]:
    """An entry as the app sees it: the journal fields plus why it exists."""
    fields = ref_fields(entry.ref)
    return {"seq": entry.seq, "entry_id": entry.entry_id, "kind": entry.kind.value,
            "points": entry.points, "day": entry.day, "ts_ms": entry.ts_ms,
            "rule": entry.rule, "reason": describe(entry.kind.value, entry.points, entry.rule,
                                                   entry.ref),
            "shop_id": fields.get("shop"), "refund_of": fields.get("refund_of")}


@dataclass(frozen=True)
class RedeemAttempt:
    """A redemption request past its replay, signature and claim checks."""

    shop_id: str
    scope: str
    hashed: str
    idempotency_key: str
    claims: TokenClaims
    claim: TokenClaim | None  # this request's own claim from an earlier try, if any
    now_ms: int


class ApiCore:
    """What both runtimes' services share: keys, redeem tokens, stored responses."""

    def __init__(self, data_dir: Path, *, token_ttl_s: int = TOKEN_TTL_S_DEFAULT,
                 clock: Clock | None = None) -> None:
        if not 1 <= token_ttl_s <= TOKEN_TTL_S_MAX:
            raise UsageError(f"token TTL: 1..{TOKEN_TTL_S_MAX} s, got {token_ttl_s}")
        data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.token_ttl_s = token_ttl_s
        self.clock = clock or system_clock()
        self.signer = TokenSigner(load_or_create_secret(data_dir))
        self.read_store = ApiStore.open(data_dir)
        self.write_store = ApiStore.open(data_dir)
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="genki-writer")
        self._writes = 0

    def close(self) -> None:
        self.writer.shutdown(wait=True)
        self.read_store.close()
        self.write_store.close()

    # -- authentication ------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated("missing Authorization header: send "
                                  "'Authorization: Bearer <API key>'")
        scheme, _, key_text = authorization.partition(" ")
        key_text = key_text.strip()
        if scheme.lower() != "bearer" or not key_text:
            raise Unauthenticated("Authorization header must be 'Bearer <API key>'")
        record = self.read_store.key_by_hash(key_hash(key_text))
        if record is None:
            raise Unauthenticated("unknown API key")
        if record.revoked_ms is not None:
            raise Unauthenticated(f"API key {record.key_id} was revoked")
        return _principal(record)

    # -- redeem tokens ---------------------------------------------------------------

    def issue_token(self, user_id: str) -> dict[str, Any]:
        token, claims = self.signer.issue(user_id, self.clock(), self.token_ttl_s)
        return {"token": token, "user_id": user_id, "expires_ms": claims.expires_ms,
                "ttl_s": self.token_ttl_s}

    # -- redemptions (writer thread) ---------------------------------------------------

    def _start_redeem(self, principal: Principal, idempotency_key: str, token: str,
                      points: int, terminal_id: str) -> Reply | RedeemAttempt:
        """The stored reply for a retried request, or the checked start of a new one:
        the token's signature holds and no other request has claimed it."""
        assert principal.role == Role.shop and principal.shop_id is not None
        shop_id = principal.shop_id
        scope = f"redemptions:{shop_id}"
        hashed = request_hash({"token": token, "points": points, "terminal_id": terminal_id})
        replay = self._replay(scope, idempotency_key, hashed)
        if replay is not None:
            return replay
        claims = self.signer.verify_signature(token)
        claim = self.write_store.token_claim(claims.nonce)
        if claim is not None and (claim.shop_id, claim.idempotency_key) != (shop_id,
                                                                              idempotency_key):
            raise _token_used(claim)
        return RedeemAttempt(shop_id, scope, hashed, idempotency_key, claims, claim, self.clock())

    def _claim(self, attempt: RedeemAttempt) -> TokenClaim:
        """Claim the token for this request (single use); refused if another got there first."""
        claim = self.write_store.claim_token(attempt.claims.nonce, attempt.claims.user_id,
                                             attempt.shop_id, attempt.idempotency_key,
                                             attempt.now_ms)
        if (claim.shop_id, claim.idempotency_key) != (attempt.shop_id, attempt.idempotency_key):
            raise _token_used(claim)
        return claim

    # -- stored responses (writer thread) --------------------------------------------

    def _replay(self, scope: str, idempotency_key: str, hashed: str) -> Reply | None:
        stored = self.write_store.stored_response(scope, idempotency_key)
        if stored is None:
            return None
        if stored.request_hash != hashed:
            raise IdempotencyConflict(
                f"Idempotency-Key {idempotency_key!r} was used before with a different "
                "request body; send a new key for a new request")
        return Reply(stored.status, stored.body, replayed=True)

    def _keep(self, scope: str, idempotency_key: str, hashed: str, body: dict[str, Any],
              **claim_done: Any) -> Reply:
        now_ms = self.clock()
        stored = self.write_store.store_response(
            scope, idempotency_key, StoredResponse(hashed, 201, orjson.dumps(body)), now_ms,
            **claim_done)
        if self._writes % PRUNE_EVERY_WRITES == 0:
            self.write_store.prune(now_ms - RESPONSES_KEPT_DAYS * DAY_MS)
        self._writes += 1
        return Reply(stored.status, stored.body)


class ApiService(ApiCore):
    """The embedded runtime's service: reads and writes the data directory's ledger."""

    def __init__(self, data_dir: Path, *, token_ttl_s: int = TOKEN_TTL_S_DEFAULT,
                 clock: Clock | None = None, hold_ingest_log: bool = True) -> None:
        super().__init__(data_dir, token_ttl_s=token_ttl_s, clock=clock)
        self.hold_ingest_log = hold_ingest_log
        self.read_ledger = Ledger.open(data_dir)
        self.report_ledger = Ledger.open(data_dir)
        self.write_ledger = Ledger.open(data_dir)
        self.ingester = ThreadPoolExecutor(1, thread_name_prefix="genki-ingest")
        self._ingest_log: EmbeddedLog | None = None

    def close(self) -> None:
        self.writer.shutdown(wait=True)
        self.ingester.submit(self._close_ingest_log).result()
        self.ingester.shutdown(wait=True)
        for resource in (self.read_ledger, self.report_ledger, self.write_ledger):
            resource.close()
        super().close()

    # -- reads (event loop thread) ---------------------------------------------------

    def balance(self, user_id: str) -> dict[str, Any]:
        return {"user_id": user_id, "balance": self.read_ledger.balance(user_id)}

    def history(self, user_id: str, cursor: int | None, limit: int) -> dict[str, Any]:
        entries, next_cursor = self.read_ledger.history(user_id, cursor, limit)
        return {"user_id": user_id, "entries": [entry_view(e) for e in entries],
                "next_cursor": next_cursor}

    def user_flags(self, user_id: str) -> dict[str, Any]:
        events = self.read_ledger.flag_history(user_id)
        latest = {event.flag: event for event in events}  # ordered by day, seq
        current = [e.model_dump(mode="json") for e in latest.values() if e.state == "raised"]
        return {"user_id": user_id, "current": current,
                "history": [e.model_dump(mode="json") for e in events]}

    # -- reports (thread pool) -----------------------------------------------------

    def current_flags(self, day: str | None) -> dict[str, Any]:
        flags = self.report_ledger.current_flags(day)
        return {"day": day, "flags": [f.model_dump(mode="json") for f in flags]}

    def settlement(self, shop_id: str, month: str) -> dict[str, Any]:
        result = self.report_ledger.settlement(shop_id, month)
        return {"shop_id": result.shop_id, "month": result.month,
                "redeemed_points": result.redeemed_points,
                "refunded_points": result.refunded_points, "net_points": result.net_points,
                "redemptions": result.redemptions, "refunds": result.refunds}

    # -- writes (writer thread) ------------------------------------------------------

    def redeem(self, principal: Principal, idempotency_key: str, token: str, points: int,
               terminal_id: str) -> Reply:
        attempt = self._start_redeem(principal, idempotency_key, token, points, terminal_id)
        if isinstance(attempt, Reply):
            return attempt
        scope, hashed, claims, claim = attempt.scope, attempt.hashed, attempt.claims, attempt.claim
        try:
            self.signer.check_fresh(claims, attempt.now_ms)
        except TokenExpired:
            if claim is not None:  # ours, from a run that died before it answered
                entry = self._entry_or_none(redeem_id(attempt.shop_id,
                                                      LEDGER_KEY_PREFIX + claims.nonce))
                if entry is not None:
                    _check_same_redemption(entry, idempotency_key, points, terminal_id)
                    return self._finish_redemption(scope, idempotency_key, hashed, claim, entry)
                self.write_store.release_claim(claim)
            raise
        claim = self._claim(attempt)
        entry = self._redeem_in_ledger(claims, claim, points, terminal_id, attempt.now_ms)
        return self._finish_redemption(scope, idempotency_key, hashed, claim, entry)

    def _redeem_in_ledger(self, claims: TokenClaims, claim: TokenClaim, points: int,
                          terminal_id: str, now_ms: int) -> Entry:
        ledger_key = LEDGER_KEY_PREFIX + claims.nonce
        try:
            return self.write_ledger.redeem(claims.user_id, points, claim.shop_id, terminal_id,
                                            ledger_key, now_ms)
        except BaseException:
            if self._entry_or_none(redeem_id(claim.shop_id, ledger_key)) is None:
                self.write_store.release_claim(claim)  # nothing written: the token stays good
            raise

    def _finish_redemption(self, scope: str, idempotency_key: str, hashed: str,
                           claim: TokenClaim, entry: Entry) -> Reply:
        fields = ref_fields(entry.ref)
        body = {"entry_id": entry.entry_id, "seq": entry.seq, "user_id": entry.user_id,
                "shop_id": fields.get("shop"), "terminal_id": fields.get("terminal"),
                "points": -entry.points, "ts_ms": entry.ts_ms,
                "balance": self.write_ledger.balance(entry.user_id)}
        return self._keep(scope, idempotency_key, hashed, body, done_nonce=claim.nonce,
                          entry_id=entry.entry_id)

    def _entry_or_none(self, entry_id: str) -> Entry | None:
        try:
            return self.write_ledger.entry(entry_id)
        except NotFound:
            return None

    def refund(self, principal: Principal, idempotency_key: str, redemption_entry_id: str,
               points: int) -> Reply:
        assert principal.role == Role.shop and principal.shop_id is not None
        scope = f"refunds:{principal.shop_id}"
        hashed = request_hash({"redemption_entry_id": redemption_entry_id, "points": points})
        replay = self._replay(scope, idempotency_key, hashed)
        if replay is not None:
            return replay
        entry = self.write_ledger.refund(redemption_entry_id, points, idempotency_key,
                                         self.clock(), shop_id=principal.shop_id)
        body = {"entry_id": entry.entry_id, "seq": entry.seq, "user_id": entry.user_id,
                "shop_id": principal.shop_id, "refund_of": redemption_entry_id,
                "points": entry.points, "ts_ms": entry.ts_ms,
                "balance": self.write_ledger.balance(entry.user_id)}
        return self._keep(scope, idempotency_key, hashed, body)

    def adjust(self, principal: Principal, idempotency_key: str, user_id: str, points: int,
               reason: str) -> Reply:
        assert principal.role == Role.staff
        scope = f"adjustments:{principal.key_id}"
        hashed = request_hash({"user_id": user_id, "points": points, "reason": reason})
        replay = self._replay(scope, idempotency_key, hashed)
        if replay is not None:
            return replay
        entry = self.write_ledger.adjust(user_id, points, reason, principal.key_id,
                                         idempotency_key, self.clock())
        body = {"entry_id": entry.entry_id, "seq": entry.seq, "user_id": entry.user_id,
                "points": entry.points, "reason": ref_fields(entry.ref).get("reason"),
                "staff_id": principal.key_id, "ts_ms": entry.ts_ms,
                "balance": self.write_ledger.balance(entry.user_id)}
        return self._keep(scope, idempotency_key, hashed, body)

    # -- ingest (ingest thread) -----------------------------------------------------

    def ingest(self, principal: Principal, lines: list[bytes], *,
               offsets: list[int] | None = None,
               rejected_before: Sequence[tuple[int, str, bytes]] = ()) -> dict[str, Any]:
        """Wire records into the log; `offsets` and `rejected_before` as in
        EmbeddedLog.ingest_lines (the gateway's importers and enrolment checks)."""
        now_ms = self.clock()
        log = self._ingest_log or EmbeddedLog.open(self.data_dir)  # LogLocked → 503
        try:
            counts = log.ingest_lines(lines, f"http:{principal.key_id}:{now_ms}", 1, now_ms,
                                      offsets=offsets, rejected_before=rejected_before)
        finally:
            if self.hold_ingest_log:
                self._ingest_log = log
            else:
                log.close()
        return counts.as_dict()

    def with_ingest_log(self, fn: Callable[[EmbeddedLog], _T]) -> _T:
        """Run fn (ingest thread) with the log this service holds, or opens for the call."""
        log = self._ingest_log or EmbeddedLog.open(self.data_dir)  # LogLocked → 503
        try:
            return fn(log)
        finally:
            if self.hold_ingest_log:
                self._ingest_log = log
            else:
                log.close()

    def _close_ingest_log(self) -> None:
        if self._ingest_log is not None:
            self._ingest_log.close()
            self._ingest_log = None


def _check_same_redemption(entry: Entry, idempotency_key: str, points: int,
                           terminal_id: str) -> None:
    """What the ledger checks on a retry, for the one retry that bypasses it."""
    if (-entry.points, ref_fields(entry.ref).get("terminal")) != (points, terminal_id):
        raise IdempotencyConflict(
            f"Idempotency-Key {idempotency_key!r} already redeemed {-entry.points} points at "
            f"terminal {ref_fields(entry.ref).get('terminal')}; this request differs")


def _principal(record: KeyRecord) -> Principal:
    return Principal(record.key_id, record.role, record.shop_id)


def _token_used(claim: TokenClaim) -> TokenUsed:
    if claim.state == "done":
        return TokenUsed(f"redeem token was already used (redemption {claim.entry_id} at shop "
                         f"{claim.shop_id}); ask the customer to show a new code")
    return TokenUsed(f"redeem token is being used by another redemption request at shop "
                     f"{claim.shop_id}; ask the customer to show a new code")


def require_role(principal: Principal, *roles: Role) -> Principal:
    if principal.role not in roles:
        needed = " or ".join(role.value for role in roles)
        raise Forbidden(f"this endpoint needs a {needed} key; key {principal.key_id} has role "
                        f"{principal.role.value}")
    return principal


def require_shop(principal: Principal, shop_id: str) -> None:
    if principal.role == Role.shop and principal.shop_id != shop_id:
        raise Forbidden(f"key {principal.key_id} belongs to shop {principal.shop_id} and "
                        f"cannot act for shop {shop_id}")
