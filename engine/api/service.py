"""The API's use cases, free of HTTP: one service, two redeemer backends.

Reads come from a `Reads` (the data directory's ledger, or the Kafka
workers' partition ledgers); redemptions and refunds go to a `Redeemer`
(the ledger directly, or the partition owner through genki.redemptions).
Everything else (authentication, tokens, idempotency, limits, what a shop is
told) is the same code for both.

A shop request (redemption or refund), with Idempotency-Key K of shop S:
1. Its ledger entry id is derived from (S, K) through a key only the server
   holds (TokenBox.ledger_key): one key, one entry, and a shop cannot predict
   or probe ids. The entry holds a fingerprint of the request body (token
   nonce, points, terminal; for refunds the body is the entry's content).
2. If that entry exists, the request is answered from it: the same body →
   the same response (201, Idempotent-Replayed); another body → 422.
3. Else the token's freshness and the limits are checked, and the key and
   the token are claimed in one api.sqlite transaction (store.claim): a
   duplicate of a request still being carried out is 409 in_progress (safe to
   retry), a token already used for another key is 409 token_used.
4. The backend writes the entry in one ledger transaction, which again
   refuses the same id with other content (two processes that both got past
   step 2 cannot both redeem), overdraft and the daily limit. A refusal
   releases the claims: nothing was written, the token stays usable.

Threads: reads run on the event loop, shop commands on one writer thread
(its own SQLite connections), ingest on its own thread, reports on the pool.
The direct backend commits in groups (WriteBatcher): the requests that queued
while the previous batch was written are claimed in one api.sqlite
transaction, then applied in one ledger transaction with a savepoint each
(Ledger.batch), so a redemption is still answered only once it is durable, but
one fsync serves many.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson

from engine.api.limits import (
    COMMANDS_PER_BATCH_MAX,
    KEY_CLAIM_LEASE_S,
    KEYS_SEEN_MAX,
    PRUNE_EVERY_WRITES,
    RESPONSES_KEPT_DAYS,
    TOKEN_TTL_S_DEFAULT,
    TOKEN_TTL_S_MAX,
)
from engine.api.problems import (
    Forbidden,
    NotInKafkaMode,
    Refusal,
    Refused,
    Unauthenticated,
    refusal_of_ledger_code,
)
from engine.api.store import (
    ApiStore,
    Claim,
    ClaimRefused,
    KeyRecord,
    Role,
    StoredResponse,
    key_hash,
)
from engine.api.tokens import TokenBox, TokenClaims, fingerprint, load_or_create_secret
from engine.clock import DAY_MS
from engine.errors import GenkiError, UsageError
from engine.faults import crash_point
from engine.ingest.log import EmbeddedLog
from engine.ledger.commands import (
    RedeemRequest,
    describe,
    redeem_id,
    ref_fields,
    refund_id,
)
from engine.ledger.model import Entry, Settlement
from engine.ledger.store import Ledger
from engine.rules.flags import frailty_status
from engine.rules.risk import person_summaries, risk_rows, shipped_book
from engine.schemas import POINTS_PER_ENTRY_MAX, EntryKind, FlagEvent
from engine.storage import private_dir

Clock = Callable[[], int]
_T = TypeVar("_T")
Prepare = Callable[[], "Reply | Command"]


def system_clock(offset_ms: int = 0) -> Clock:
    import time

    def now_ms() -> int:
        return time.time_ns() // 1_000_000 + offset_ms
    return now_ms


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


@dataclass(frozen=True)
class ApiSettings:
    """The API's configuration (`genki serve` flags, GENKI_API_* environment)."""

    token_ttl_s: int = TOKEN_TTL_S_DEFAULT
    points_per_redemption_max: int | None = None
    points_per_person_per_day_max: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.token_ttl_s <= TOKEN_TTL_S_MAX:
            raise UsageError(f"token TTL: 1..{TOKEN_TTL_S_MAX} s, got {self.token_ttl_s}")
        for name in ("points_per_redemption_max", "points_per_person_per_day_max"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= POINTS_PER_ENTRY_MAX * 1_000:
                raise UsageError(f"{name}: a positive number of points, got {value}")


@dataclass(frozen=True, slots=True)
class RedeemJob:
    """A redemption as it arrives; checked and claimed on the writer thread (in a batch,
    with the redemptions queued next to it: one entry lookup, one claim write)."""

    principal: Principal
    idempotency_key: str
    token: str
    points: int
    terminal_id: str


@dataclass(frozen=True, slots=True)
class _OpenedRedemption:
    """A redemption whose token opened: the ids and fingerprint it is known by."""

    job: RedeemJob
    shop_id: str
    token: TokenClaims
    ledger_key: str
    entry_id: str
    request: str


@dataclass(frozen=True, slots=True)
class Command:
    """A shop request past every check and claim, for a backend to carry out."""

    kind: EntryKind  # redeem or refund
    claim: Claim
    ledger_key: str
    entry_id: str
    user_id: str
    shop_id: str
    terminal_id: str
    points: int
    ts_ms: int
    refund_of: str | None = None
    points_per_day_max: int | None = None


class Reads(Protocol):
    """Where balances, history, flags and entries are read."""

    def balance(self, user_id: str) -> int: ...
    def history(self, user_id: str, cursor: int | None,
                limit: int) -> tuple[list[Entry], int | None]: ...
    def flag_history(self, user_id: str) -> list[FlagEvent]: ...
    def current_flags(self, day: str | None) -> list[FlagEvent]: ...
    def settlement(self, shop_id: str, month: str) -> dict[str, Any]: ...
    def entry(self, user_id: str | None, entry_id: str) -> Entry | None:
        """On the writer thread: the entry if readable here (None: absent or unknown)."""
    def entries(self, wanted: Sequence[tuple[str | None, str]]) -> dict[str, Entry]:
        """On the writer thread: `entry` for each (user id, entry id), the found by id."""
    def close(self) -> None: ...


class Redeemer(Protocol):
    """Carries out a checked command; raises a GenkiError whose code says why not.

    `synchronous` backends run `apply` on the writer thread; the others are
    awaited on the event loop (`submit`).
    """

    synchronous: bool

    def apply(self, command: Command) -> Entry: ...
    def apply_all(self, commands: Sequence[Command]) -> list[Entry | GenkiError]:
        """`apply` for each command in order, a refusal in its place (inside `batch`)."""
    def batch(self) -> AbstractContextManager[None]: ...
    async def submit(self, command: Command) -> Entry: ...
    def close(self) -> None: ...


class LedgerReads:
    """The data directory's ledger: one connection per thread that reads it."""

    def __init__(self, data_dir: Path) -> None:
        self.loop_ledger = Ledger.open(data_dir)  # event loop
        self.report_ledger = Ledger.open(data_dir)  # thread pool
        self.writer_ledger = Ledger.open(data_dir)  # writer thread (and DirectRedeemer)

    def balance(self, user_id: str) -> int:
        return self.loop_ledger.balance(user_id)

    def history(self, user_id: str, cursor: int | None,
                limit: int) -> tuple[list[Entry], int | None]:
        return self.loop_ledger.history(user_id, cursor, limit)

    def flag_history(self, user_id: str) -> list[FlagEvent]:
        return self.loop_ledger.flag_history(user_id)

    def current_flags(self, day: str | None) -> list[FlagEvent]:
        return self.report_ledger.current_flags(day)

    def settlement(self, shop_id: str, month: str) -> dict[str, Any]:
        return settlement_view(self.report_ledger.settlement(shop_id, month))

    def entry(self, user_id: str | None, entry_id: str) -> Entry | None:
        try:
            return self.writer_ledger.entry(entry_id)
        except GenkiError:
            return None

    def entries(self, wanted: Sequence[tuple[str | None, str]]) -> dict[str, Entry]:
        return self.writer_ledger.entries([entry_id for _, entry_id in wanted])

    def close(self) -> None:
        for ledger in (self.loop_ledger, self.report_ledger, self.writer_ledger):
            ledger.close()


class DirectRedeemer:
    """The embedded runtime: the command is one ledger transaction on the writer thread."""

    synchronous = True

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def apply(self, command: Command) -> Entry:
        if command.kind == EntryKind.redeem:
            return self.ledger.redeem(command.user_id, command.points, command.shop_id,
                                      command.terminal_id, command.ledger_key, command.ts_ms,
                                      request=command.claim.fingerprint,
                                      points_per_day_max=command.points_per_day_max)
        assert command.refund_of is not None
        return self.ledger.refund(command.refund_of, command.points, command.ledger_key,
                                  command.ts_ms, shop_id=command.shop_id)

    def apply_all(self, commands: Sequence[Command]) -> list[Entry | GenkiError]:
        """Each run of redemptions is one `Ledger.redeem_many` (one lookup, one chain and
        insert for the run); refunds one by one, in their place."""
        outcomes: list[Entry | GenkiError] = []
        for is_redeem, run in groupby(commands, key=lambda c: c.kind == EntryKind.redeem):
            if is_redeem:
                outcomes.extend(self.ledger.redeem_many([_redeem_request(c) for c in run]))
                continue
            for command in run:
                try:
                    outcomes.append(self.apply(command))
                except GenkiError as error:
                    outcomes.append(error)
        return outcomes

    def batch(self) -> AbstractContextManager[None]:
        """Commands applied inside share one ledger transaction (group commit)."""
        return self.ledger.batch()

    async def submit(self, command: Command) -> Entry:
        raise AssertionError("the direct redeemer runs on the writer thread (apply)")

    def close(self) -> None:
        pass


def _redeem_request(command: Command) -> RedeemRequest:
    return RedeemRequest(command.user_id, command.points, command.shop_id, command.terminal_id,
                         command.ledger_key, command.ts_ms, command.claim.fingerprint,
                         command.points_per_day_max)


def settlement_view(result: Settlement) -> dict[str, Any]:
    return {"shop_id": result.shop_id, "month": result.month,
            "redeemed_points": result.redeemed_points,
            "refunded_points": result.refunded_points, "net_points": result.net_points,
            "redemptions": result.redemptions, "refunds": result.refunds}


def entry_view(entry: Entry) -> dict[str, Any]:
    """An entry as the citizen's app sees it: the journal fields plus why it exists."""
    fields = ref_fields(entry.ref)
    return {"seq": entry.seq, "entry_id": entry.entry_id, "kind": entry.kind.value,
            "points": entry.points, "day": entry.day, "ts_ms": entry.ts_ms,
            "rule": entry.rule, "reason": describe(entry.kind.value, entry.points, entry.rule,
                                                   entry.ref),
            "shop_id": fields.get("shop"), "refund_of": fields.get("refund_of")}


def request_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _conflict() -> Refused:
    return refusal_of_ledger_code("idempotency_conflict")


def _pid_alive(owner: str) -> bool:
    pid_text = owner.split(":", 1)[0]
    if not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


Job = RedeemJob | Prepare  # a shop command queued for the writer thread


class WriteBatcher:
    """Group commit: requests queue while a batch is written; the writer thread takes
    everything queued (at most COMMANDS_PER_BATCH_MAX) as the next batch. Under load a
    batch holds about the requests in flight; alone, a request is a batch of one."""

    def __init__(self, executor: ThreadPoolExecutor,
                 run: Callable[[list[Job]], list[Reply | BaseException]]) -> None:
        self._executor = executor
        self._run = run
        self._lock = threading.Lock()
        self._queued: list[tuple[Job, asyncio.Future[Reply]]] = []
        self._draining = False

    async def submit(self, prepare: Job) -> Reply:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        with self._lock:
            self._queued.append((prepare, future))
            start = not self._draining
            self._draining = True
        if start:
            loop.run_in_executor(self._executor, self._drain, loop)
        return await future

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            with self._lock:
                batch = self._queued[:COMMANDS_PER_BATCH_MAX]
                del self._queued[:COMMANDS_PER_BATCH_MAX]
                if not batch:
                    self._draining = False
                    return
            try:
                results = self._run([prepare for prepare, _ in batch])
            except BaseException as error:  # noqa: BLE001 - every request of it gets it
                results = [error] * len(batch)
            # one wake-up of the event loop per batch, not per request
            loop.call_soon_threadsafe(_resolve_all, [future for _, future in batch], results)


def _resolve_all(futures: list[asyncio.Future[Reply]],
                 results: list[Reply | BaseException]) -> None:
    for future, result in zip(futures, results, strict=True):
        if future.done():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


class ApiService:
    def __init__(self, data_dir: Path, reads: Reads, redeemer: Redeemer, *,
                 settings: ApiSettings | None = None, clock: Clock | None = None,
                 hold_ingest_log: bool = True, kafka: bool = False) -> None:
        self.data_dir = private_dir(data_dir)
        self.settings = settings or ApiSettings()
        self.clock = clock or system_clock()
        self.reads = reads
        self.redeemer = redeemer
        self.kafka = kafka
        self.hold_ingest_log = hold_ingest_log
        self.box = TokenBox(load_or_create_secret(data_dir))
        self.key_store = ApiStore.open(data_dir)  # event loop: key lookups
        self.store = ApiStore.open(data_dir, durable=False)  # writer thread: claims
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="genki-writer")
        self.syncer = ThreadPoolExecutor(1, thread_name_prefix="genki-claims-sync")
        self.ingester = ThreadPoolExecutor(1, thread_name_prefix="genki-ingest")
        self.owner = f"{os.getpid()}:{secrets.token_hex(6)}"
        self._in_flight: set[tuple[str, str]] = set()
        self._keys_seen: dict[str | None, Principal] = {}  # by Authorization header
        self.batcher = WriteBatcher(self.writer, self._carry_out_batch)
        self._ingest_log: EmbeddedLog | None = None
        self._writes = 0

    @property
    def write_ledger(self) -> Ledger:
        """The embedded runtime's ledger connection of the writer and ingest threads."""
        if not isinstance(self.reads, LedgerReads):
            raise NotInKafkaMode("this API serves the Kafka runtime: it holds no ledger")
        return self.reads.writer_ledger

    def close(self) -> None:
        self.writer.shutdown(wait=True)
        self.syncer.shutdown(wait=True)
        self.ingester.submit(self._close_ingest_log).result()
        self.ingester.shutdown(wait=True)
        self.redeemer.close()
        self.reads.close()
        self.key_store.close()
        self.store.close()

    async def _on_writer(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.writer, partial(fn, *args))

    def health(self) -> dict[str, Any]:
        """What /healthz adds for operators (Kafka mode: the bridge's skipped records)."""
        return {}

    # -- authentication ------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthenticated("missing Authorization header: send "
                                  "'Authorization: Bearer <API key>'")
        scheme, _, key_text = authorization.partition(" ")
        key_text = key_text.strip()
        if scheme.lower() != "bearer" or not key_text:
            raise Unauthenticated("Authorization header must be 'Bearer <API key>'")
        record = self.key_store.key_by_hash(key_hash(key_text))
        if record is None:
            raise Unauthenticated("unknown API key")
        if record.revoked_ms is not None:
            raise _revoked(record.key_id)
        return _principal(record)

    def authenticate_shop_command(self, authorization: str | None) -> Principal:
        """`authenticate` for redemptions, from the keys seen valid before: no key lookup
        on the event loop per request. Revocation is checked again on the writer thread,
        in the claims transaction, before the command is (see `_revoked_keys`)."""
        principal = self._keys_seen.get(authorization) if authorization else None
        if principal is not None:
            return principal
        principal = self.authenticate(authorization)
        if len(self._keys_seen) >= KEYS_SEEN_MAX:
            self._keys_seen.clear()
        self._keys_seen[authorization] = principal
        return principal

    def _revoked_keys(self, jobs: list[RedeemJob]) -> set[str]:
        """Writer thread: the keys among the jobs' that were revoked (one lookup)."""
        return self.store.revoked_key_ids({job.principal.key_id for job in jobs})

    # -- reads (event loop; reports on the pool) --------------------------------------

    def balance(self, user_id: str) -> dict[str, Any]:
        return {"user_id": user_id, "balance": self.reads.balance(user_id)}

    def history(self, user_id: str, cursor: int | None, limit: int) -> dict[str, Any]:
        entries, next_cursor = self.reads.history(user_id, cursor, limit)
        return {"user_id": user_id, "entries": [entry_view(e) for e in entries],
                "next_cursor": next_cursor}

    def user_flags(self, user_id: str) -> dict[str, Any]:
        events = self.reads.flag_history(user_id)
        latest = {event.flag: event for event in events}  # ordered by day, seq
        current = [e.model_dump(mode="json") for e in latest.values() if e.state == "raised"]
        return {"user_id": user_id, "current": current,
                "history": [e.model_dump(mode="json") for e in events],
                "frailty_status": frailty_status({e["flag"] for e in current})}

    def current_flags(self, day: str | None) -> dict[str, Any]:
        flags = self.reads.current_flags(day)
        return {"day": day, "flags": [f.model_dump(mode="json") for f in flags],
                "people": person_summaries(risk_rows(flags, shipped_book()))}

    def settlement(self, shop_id: str, month: str) -> dict[str, Any]:
        return self.reads.settlement(shop_id, month)

    # -- redeem tokens (the citizen's app) ------------------------------------------------

    def issue_token(self, user_id: str) -> dict[str, Any]:
        token, claims = self.box.issue(user_id, self.clock(), self.settings.token_ttl_s)
        return {"token": token, "user_id": user_id, "expires_ms": claims.expires_ms,
                "ttl_s": self.settings.token_ttl_s}

    # -- shop commands ---------------------------------------------------------------------

    async def redeem(self, principal: Principal, idempotency_key: str, token: str,
                     points: int, terminal_id: str) -> Reply:
        return await self._carry_out(RedeemJob(principal, idempotency_key, token, points,
                                               terminal_id))

    async def refund(self, principal: Principal, idempotency_key: str,
                     redemption_entry_id: str, points: int) -> Reply:
        prepare = partial(self._prepare_refund, principal, idempotency_key,
                          redemption_entry_id, points)
        return await self._carry_out(prepare)

    async def _carry_out(self, job: Job) -> Reply:
        if self.redeemer.synchronous:
            return await self.batcher.submit(job)
        prepared = await self._on_writer(self._prepare_durably, job)
        if isinstance(prepared, Reply):
            return prepared
        try:
            entry = await self.redeemer.submit(prepared)
        except GenkiError as error:
            self._in_flight.discard(_claim_key(prepared.claim))
            if _is_refusal(error):
                await self._on_writer(self.store.release, prepared.claim)
                raise refusal_of_ledger_code(error.code) from None
            raise  # e.g. a timeout: it may still be applied; a retry finds out
        except BaseException:
            self._in_flight.discard(_claim_key(prepared.claim))
            raise
        return await self._on_writer(self._finish, prepared, entry)

    def _carry_out_batch(self, jobs: list[Job]) -> list[Reply | BaseException]:
        """On the writer thread: the shop commands that queued up while the last batch
        was committed, checked and claimed (each run of redemptions with one entry
        lookup and one claim write), then applied in one ledger transaction (each
        command atomic on its own: one fsync for the batch)."""
        results: list[Reply | BaseException] = []
        commands: list[tuple[int, Command]] = []
        try:
            with self.store.batch():  # the claims: committed before the ledger is written
                for is_redeem, group in groupby(jobs, key=lambda j: isinstance(j, RedeemJob)):
                    run = list(group)
                    prepared = self._prepare_redemptions(run) if is_redeem \
                        else [self._prepare_or_error(job) for job in run]
                    for one in prepared:
                        if isinstance(one, Command):
                            commands.append((len(results), one))
                            one = Reply(0, b"")  # replaced by its outcome below
                        results.append(one)
        except BaseException as error:  # noqa: BLE001 - no claim was taken
            for _, command in commands:
                self._in_flight.discard(_claim_key(command.claim))
            return [error] * len(jobs)
        if not commands:
            return results
        synced = self.syncer.submit(self.store.sync)  # while the ledger batch is built
        crash_point("api_after_claims")
        outcomes: list[Entry | GenkiError] | list[BaseException]
        try:
            with self.redeemer.batch():
                outcomes = self.redeemer.apply_all([command for _, command in commands])
                synced.result()  # the token uses are durable before the redemptions are
        except BaseException as error:  # noqa: BLE001 - the batch did not commit
            outcomes = [error] * len(commands)
        else:
            crash_point("api_after_ledger")
        for (index, command), outcome in zip(commands, outcomes, strict=True):
            self._in_flight.discard(_claim_key(command.claim))
            results[index] = self._settle(command, outcome)
        return results

    def _settle(self, command: Command, outcome: Entry | BaseException) -> Reply | BaseException:
        if isinstance(outcome, Entry):
            self._count_write()
            try:
                return self._reply(command.kind, outcome, command.claim.fingerprint)
            except Refused as refused:
                return refused
        self.store.release(command.claim)  # its savepoint rolled back: nothing written
        if isinstance(outcome, GenkiError) and _is_refusal(outcome):
            return refusal_of_ledger_code(outcome.code)
        return outcome

    def _finish(self, command: Command, entry: Entry) -> Reply:
        """Kafka mode: the owner's entry; the key stays bound to it with its answer."""
        self._in_flight.discard(_claim_key(command.claim))
        try:
            reply = self._reply(command.kind, entry, command.claim.fingerprint)
        except Refused:
            self.store.release(command.claim)
            raise
        self.store.finish(command.claim, reply.body)
        self._count_write()
        return reply

    def _prepare(self, job: Job) -> Reply | Command:
        """A shop command checked and claimed (or answered: a replay, a refusal)."""
        if isinstance(job, RedeemJob):
            return self._prepare_redeem(job)
        return job()

    def _prepare_durably(self, job: Job) -> Reply | Command:
        """Kafka mode: `_prepare`, and a command's claim made durable before it is sent
        (a power cut must not forget a token use whose redemption the owner applies)."""
        prepared = self._prepare(job)
        if isinstance(prepared, Command):
            self.store.sync()
        return prepared

    def _prepare_or_error(self, job: Job) -> Reply | Command | BaseException:
        try:
            return self._prepare(job)
        except BaseException as error:  # noqa: BLE001 - that request's answer
            return error

    def _prepare_redeem(self, job: RedeemJob) -> Reply | Command:
        """One redemption (Kafka mode): a batch of one, raising its refusal."""
        (prepared,) = self._prepare_redemptions([job])
        if isinstance(prepared, BaseException):
            raise prepared
        return prepared

    def _prepare_redemptions(self, jobs: list[Job]) -> list[Reply | Command | BaseException]:
        """`_prepare_redeem` for each, with one entry lookup and one claim write for all."""
        results: list[Reply | Command | BaseException] = []
        opened: list[tuple[int, _OpenedRedemption]] = []
        assert all(isinstance(job, RedeemJob) for job in jobs)
        redeem_jobs = [job for job in jobs if isinstance(job, RedeemJob)]
        try:
            revoked = self._revoked_keys(redeem_jobs)
        except BaseException as error:  # noqa: BLE001 - none of them checked
            return [error] * len(jobs)
        for job in redeem_jobs:
            try:
                if job.principal.key_id in revoked:
                    raise _revoked(job.principal.key_id)
                opened.append((len(results), self._open_redemption(job)))
            except BaseException as error:  # noqa: BLE001 - that request's answer
                results.append(error)
                continue
            results.append(Reply(0, b""))  # replaced below
        existing = self.reads.entries([(o.token.user_id, o.entry_id) for _, o in opened])
        claims: list[tuple[int, _OpenedRedemption, Claim]] = []
        for index, one in opened:
            try:
                checked = self._check_redemption(one, existing.get(one.entry_id))
            except BaseException as error:  # noqa: BLE001 - that request's answer
                results[index] = error
                continue
            if isinstance(checked, Reply):
                results[index] = checked
            else:
                claims.append((index, one, checked))
        if not claims:
            return results
        try:
            outcomes = self.store.claim_many([claim for _, _, claim in claims], self._live,
                                             take_over_other_body=self.redeemer.synchronous)
        except BaseException as error:  # noqa: BLE001 - none of them claimed
            for index, _, _ in claims:
                results[index] = error
            return results
        for (index, one, claim), outcome in zip(claims, outcomes, strict=True):
            if isinstance(outcome, ClaimRefused):
                results[index] = _claim_refusal(outcome.reason)
                continue
            if outcome is None:
                self._in_flight.add(_claim_key(claim))
            results[index] = self._claimed(one, claim, outcome)
        return results

    def _open_redemption(self, job: RedeemJob) -> _OpenedRedemption:
        shop_id = _shop_of(job.principal)
        token = self.box.open(job.token)
        ledger_key = self.box.ledger_key("redeem", shop_id, job.idempotency_key)
        return _OpenedRedemption(job, shop_id, token, ledger_key, redeem_id(shop_id, ledger_key),
                                 fingerprint("redeem", token.nonce, job.points, job.terminal_id))

    def _check_redemption(self, opened: _OpenedRedemption,
                          existing: Entry | None) -> Reply | Claim:
        """Its replay when its entry exists; else, fresh and within limits, its claim."""
        if existing is not None:
            return self._reply(EntryKind.redeem, existing, opened.request, replayed=True)
        now_ms = self.clock()
        self.box.check_fresh(opened.token, now_ms)
        limit = self.settings.points_per_redemption_max
        if limit is not None and opened.job.points > limit:
            raise Refused(Refusal.points_per_redemption_max_exceeded,
                          f"at most {limit} points per redemption (points_per_redemption_max); "
                          "nothing was taken")
        return Claim(f"redemptions:{opened.shop_id}", opened.job.idempotency_key,
                     opened.request, self.owner, now_ms, now_ms + KEY_CLAIM_LEASE_S * 1000,
                     opened.token.nonce, opened.token.user_id, opened.shop_id, opened.entry_id)

    def _claimed(self, opened: _OpenedRedemption, claim: Claim,
                 stored: bytes | None) -> Reply | Command:
        if stored is not None:
            return Reply(201, stored, replayed=True)
        return Command(EntryKind.redeem, claim, opened.ledger_key, opened.entry_id,
                       opened.token.user_id, opened.shop_id, opened.job.terminal_id,
                       opened.job.points, claim.now_ms,
                       points_per_day_max=self.settings.points_per_person_per_day_max)

    def _prepare_refund(self, principal: Principal, idempotency_key: str,
                        redemption_entry_id: str, points: int) -> Reply | Command:
        shop_id = _shop_of(principal)
        ledger_key = self.box.ledger_key("refund", shop_id, idempotency_key)
        entry_id = refund_id(shop_id, ledger_key)
        request = fingerprint("refund", redemption_entry_id, points)
        user_id = self._redemption_user(redemption_entry_id, shop_id)
        existing = self.reads.entry(user_id, entry_id)
        if existing is not None:
            return self._reply(EntryKind.refund, existing, request, replayed=True)
        now_ms = self.clock()
        claim = Claim(f"refunds:{shop_id}", idempotency_key, request, self.owner, now_ms,
                      now_ms + KEY_CLAIM_LEASE_S * 1000)
        stored = self._claim(claim)
        if stored is not None:
            return Reply(201, stored, replayed=True)
        return Command(EntryKind.refund, claim, ledger_key, entry_id, user_id, shop_id,
                       principal.key_id, points, now_ms, refund_of=redemption_entry_id)

    def _redemption_user(self, entry_id: str, shop_id: str) -> str:
        """Whose redemption at this shop it is; one answer for every other case."""
        user_id = self.store.redemption_user(entry_id, shop_id)
        if user_id is not None:
            return user_id
        entry = self.reads.entry(None, entry_id)
        if entry is not None and entry.kind == EntryKind.redeem \
                and ref_fields(entry.ref).get("shop") == shop_id:
            return entry.user_id
        raise refusal_of_ledger_code("not_found")

    def _live(self, claim: Claim, owner: str) -> bool:
        """Whether the owner of a pending claim on this claim's key may still finish it."""
        if owner == self.owner:
            return _claim_key(claim) in self._in_flight
        return not owner.startswith(f"{os.getpid()}:") and _pid_alive(owner)

    def _claim(self, claim: Claim) -> bytes | None:
        try:
            stored = self.store.claim(claim, partial(self._live, claim),
                                      take_over_other_body=self.redeemer.synchronous)
        except ClaimRefused as refused:
            raise _claim_refusal(refused.reason) from None
        if stored is None:
            self._in_flight.add(_claim_key(claim))
        return stored

    def _reply(self, kind: EntryKind, entry: Entry, request: str, *,
               replayed: bool = False) -> Reply:
        """The shop's answer, made from the entry alone (so every retry gets the same
        bytes): no user id, no balance, no sequence number."""
        fields = ref_fields(entry.ref)
        if kind == EntryKind.redeem:
            if entry.kind != EntryKind.redeem or fields.get("request") != request:
                raise _conflict()
            body = {"entry_id": entry.entry_id, "shop_id": fields.get("shop"),
                    "terminal_id": fields.get("terminal"), "points": -entry.points,
                    "ts_ms": entry.ts_ms}
        else:
            sent = fingerprint("refund", fields.get("refund_of"), entry.points)
            if entry.kind != EntryKind.refund or sent != request:
                raise _conflict()
            body = {"entry_id": entry.entry_id, "shop_id": fields.get("shop"),
                    "refund_of": fields.get("refund_of"), "points": entry.points,
                    "ts_ms": entry.ts_ms}
        return Reply(201, orjson.dumps(body), replayed=replayed)

    # -- staff adjustments (embedded only) -------------------------------------------------

    async def adjust(self, principal: Principal, idempotency_key: str, user_id: str,
                     points: int, reason: str) -> Reply:
        if self.kafka or not isinstance(self.reads, LedgerReads):
            raise NotInKafkaMode("adjustments are not available through the API in Kafka "
                                 "mode: genki.redemptions carries redemptions and refunds only")
        return await self._on_writer(self._adjust, principal, idempotency_key, user_id,
                                     points, reason)

    def _adjust(self, principal: Principal, idempotency_key: str, user_id: str, points: int,
                reason: str) -> Reply:
        assert isinstance(self.reads, LedgerReads) and principal.role == Role.staff
        ledger = self.reads.writer_ledger
        scope = f"adjustments:{principal.key_id}"
        hashed = request_hash({"user_id": user_id, "points": points, "reason": reason})
        stored = self.store.stored_response(scope, idempotency_key)
        if stored is not None:
            if stored.request_hash != hashed:
                raise _conflict()
            return Reply(stored.status, stored.body, replayed=True)
        try:
            entry = ledger.adjust(user_id, points, reason, principal.key_id, idempotency_key,
                                  self.clock())
        except GenkiError as error:
            if error.code == "idempotency_conflict":
                raise _conflict() from None
            raise
        body = {"entry_id": entry.entry_id, "seq": entry.seq, "user_id": entry.user_id,
                "points": entry.points, "reason": ref_fields(entry.ref).get("reason"),
                "staff_id": principal.key_id, "ts_ms": entry.ts_ms,
                "balance": ledger.balance(entry.user_id)}
        kept = self.store.store_response(scope, idempotency_key,
                                         StoredResponse(hashed, 201, orjson.dumps(body)),
                                         self.clock())
        self._count_write()
        return Reply(kept.status, kept.body)

    def _count_write(self) -> None:
        if self._writes % PRUNE_EVERY_WRITES == 0:
            self.store.prune(self.clock() - RESPONSES_KEPT_DAYS * DAY_MS)
        self._writes += 1

    # -- ingest (ingest thread) -----------------------------------------------------

    def ingest(self, principal: Principal, lines: list[bytes], *,
               offsets: list[int] | None = None,
               rejected_before: Sequence[tuple[int, str, bytes]] = (),
               key_id: str | None = None) -> dict[str, Any]:
        """Wire records into the log; `offsets`, `rejected_before` and `key_id` (the
        submitting key, default the principal's) as in EmbeddedLog.ingest_lines."""
        if self.kafka:
            raise NotInKafkaMode("in Kafka mode gateways publish to the input topics "
                                 "(`genki publish`), not to this API")
        now_ms = self.clock()
        log = self._ingest_log or EmbeddedLog.open(self.data_dir)  # LogLocked → 503
        try:
            counts = log.ingest_lines(lines, f"http:{principal.key_id}:{now_ms}", 1, now_ms,
                                      offsets=offsets, rejected_before=rejected_before,
                                      key_id=key_id or principal.key_id)
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


def _revoked(key_id: str) -> Unauthenticated:
    return Unauthenticated(f"API key {key_id} was revoked")


def _claim_key(claim: Claim) -> tuple[str, str]:
    return claim.scope, claim.idempotency_key


def _claim_refusal(reason: str) -> Refused:
    if reason == "in_progress":
        return Refused(Refusal.in_progress, "a request with this Idempotency-Key is still being "
                       "carried out; retry with the same key shortly to get its outcome")
    if reason == "token_used":
        return Refused(Refusal.token_used, "this redeem code was already used; ask the customer "
                       "to show a new code in the app")
    return _conflict()


def _is_refusal(error: GenkiError) -> bool:
    """A refusal decided by the ledger (shown to the shop by its code, never its message)."""
    return 400 <= error.http_status < 500 or error.code == "ledger_busy"


def _shop_of(principal: Principal) -> str:
    if principal.role != Role.shop or principal.shop_id is None:
        raise Forbidden("shop commands need a shop key")
    return principal.shop_id


def _principal(record: KeyRecord) -> Principal:
    return Principal(record.key_id, record.role, record.shop_id)


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
