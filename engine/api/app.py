"""The FastAPI application: routes, auth dependencies, body limits and problem responses.

`create_app(data_dir)` builds an app bound to one data directory. Reads run on
the event loop (one indexed SQLite lookup each, no thread hop); writes run on
the service's single writer thread, ingest on its ingest thread, reports on
the thread pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import Depends, FastAPI, Header, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import engine
from engine.api import models
from engine.api.gateway import add_gateway_routes, is_gateway_path
from engine.api.gateway import ingest_lines as _ingest_lines  # noqa: F401 - tests use it
from engine.api.limits import (
    COMMAND_BODY_BYTES_MAX,
    HISTORY_PAGE_ENTRIES_DEFAULT,
    HISTORY_PAGE_ENTRIES_MAX,
    IDEMPOTENCY_KEY_CHARS_MAX,
    INGEST_BODY_BYTES_MAX,
    POINTS_PER_PERSON_PER_DAY_MAX_ENV,
    POINTS_PER_REDEMPTION_MAX_ENV,
    TOKEN_TTL_S_DEFAULT,
)
from engine.api.privacy import ErasedGate, add_privacy_routes
from engine.api.problems import (
    REFUSAL_STATUS,
    BadRequest,
    BodyTooLarge,
    IdempotencyKeyRequired,
    Refusal,
    error_response,
    problem_body,
    problem_response,
    refusal_response,
)
from engine.api.service import (
    ApiService,
    ApiSettings,
    DirectRedeemer,
    LedgerReads,
    Principal,
    Reply,
    require_role,
    require_shop,
    system_clock,
)
from engine.api.store import Role
from engine.errors import GenkiError, UsageError
from engine.schemas import ID_CHAR_CLASS, ID_CHARS_MAX
from engine.storage import private_umask

TOKEN_TTL_ENV = "GENKI_API_TOKEN_TTL_S"
CLOCK_OFFSET_ENV = "GENKI_API_CLOCK_OFFSET_MS"
OUTCOME_WAIT_ENV = "GENKI_API_OUTCOME_WAIT_S"  # Kafka mode; at most OUTCOME_WAIT_S_MAX
JSON = "application/json"
REDEMPTIONS_PATH = "/v1/redemptions"
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]+")
_T = TypeVar("_T")
Service = ApiService
_log = logging.getLogger("genki.api")

_BALANCE_PATH = re.compile(rf"/v1/users/({ID_CHAR_CLASS}{{1,{ID_CHARS_MAX}}})/balance")
UserId = Annotated[str, PathParam(min_length=1, max_length=ID_CHARS_MAX,
                                  pattern=rf"^{ID_CHAR_CLASS}+$")]
ShopId = UserId


def json_response(value: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status_code=status, media_type=JSON)


def reply_response(reply: Reply) -> Response:
    headers = {"Idempotent-Replayed": "true"} if reply.replayed else None
    return Response(reply.body, status_code=reply.status, media_type=JSON, headers=headers)


def _codes_of(status: int) -> str:
    return ", ".join(r.value for r, s in REFUSAL_STATUS.items() if s == status)


_PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {"model": models.Problem, "content": {"application/problem+json": {}},
             "description": f"{description} (code: {_codes_of(status)})"}
    for status, description in (
        (400, "invalid request"),
        (401, "missing, unknown or revoked key; expired or invalid redeem token"),
        (403, "wrong role, or another shop's resource"),
        (404, ("not found; refunds: no redemption of this shop has that id (the same answer "
              "for any id a shop does not own)")),
        (409, ("insufficient points (the balance is not shown to shops), token already used, "
              "the same Idempotency-Key still in progress (retry with it shortly), refund "
              "exceeds the redemption, daily redemption limit reached")),
        (413, "body or batch over its limit"),
        (422, ("Idempotency-Key reused with a different body (nothing written); a redemption "
              "over points_per_redemption_max")),
        (503, ("ingest log held by another process, or the ledger busy; retry. Kafka mode: "
              "reads without --partitions-dir, too many waiting requests")),
        (504, ("Kafka mode: the partition owner did not answer in time; retry with the same "
              "Idempotency-Key")))
}


def _warn_if_shared(data_dir: Path) -> None:
    """genki makes new data directories private; an older one may still be readable."""
    try:
        mode = stat.S_IMODE(data_dir.stat().st_mode)
    except FileNotFoundError:
        return
    if mode & 0o077:
        _log.warning("data directory %s has mode %o: other accounts on this host can reach "
                     "health records and keys; chmod 700 %s", data_dir, mode, data_dir)


def _seconds_env(name: str, seconds_max: float) -> float:
    text = os.environ.get(name)
    if not text:
        return seconds_max
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= seconds_max:
        raise UsageError(f"{name}={text!r}: seconds, more than 0 and at most {seconds_max:g}")
    return value


def _int_env(name: str) -> int | None:
    text = os.environ.get(name)
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"{name}={text!r}: a whole number of points") from None


def create_app(data_dir: Path | str, *, token_ttl_s: int | None = None,
               clock_offset_ms: int | None = None, hold_ingest_log: bool = True,
               fast_reads: bool = True, bootstrap: str | None = None, topic_prefix: str = "",
               partitions_dir: Path | None = None,
               points_per_redemption_max: int | None = None,
               points_per_person_per_day_max: int | None = None) -> FastAPI:
    """An app serving one data directory; settings default to the GENKI_API_* environment.

    `fast_reads` answers GET balance ahead of FastAPI (see GenkiAPI). With
    `bootstrap` the app serves the Kafka runtime (engine.api.kafka_service):
    redemptions go to the partition owners, reads to `partitions_dir`.
    """
    private_umask()
    _warn_if_shared(Path(data_dir))
    if token_ttl_s is None:
        token_ttl_s = int(os.environ.get(TOKEN_TTL_ENV) or TOKEN_TTL_S_DEFAULT)
    if clock_offset_ms is None:
        clock_offset_ms = int(os.environ.get(CLOCK_OFFSET_ENV) or 0)
    if points_per_redemption_max is None:
        points_per_redemption_max = _int_env(POINTS_PER_REDEMPTION_MAX_ENV)
    if points_per_person_per_day_max is None:
        points_per_person_per_day_max = _int_env(POINTS_PER_PERSON_PER_DAY_MAX_ENV)
    settings = ApiSettings(token_ttl_s, points_per_redemption_max, points_per_person_per_day_max)
    clock = system_clock(clock_offset_ms)
    bridge = None
    if bootstrap is None:
        reads = LedgerReads(Path(data_dir))
        service = ApiService(Path(data_dir), reads, DirectRedeemer(reads.writer_ledger),
                             settings=settings, clock=clock, hold_ingest_log=hold_ingest_log)
    else:
        from engine.api.kafka_service import KafkaApiService
        from engine.kafka.api_bridge import OUTCOME_WAIT_S_MAX, RedemptionBridge

        wait_s = _seconds_env(OUTCOME_WAIT_ENV, OUTCOME_WAIT_S_MAX)
        bridge = RedemptionBridge(bootstrap, topic_prefix, outcome_wait_s=wait_s)
        service = KafkaApiService(Path(data_dir), bridge, partitions_dir, settings=settings,
                                  clock=clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if bridge is not None:
            await bridge.start()
        try:
            yield
        finally:
            await app.state.gateway_sink.close()
            app.state.devices.close()
            if bridge is not None:
                await bridge.stop()
            service.close()
            if app.erased is not None:
                app.erased.close()

    app = GenkiAPI(title="genki", version=engine.__version__, responses=_PROBLEMS,
                   lifespan=lifespan,
                   description="Health points, redemptions and frailty-risk flags. Every "
                               "endpoint but /healthz needs `Authorization: Bearer <API key>`.")
    app.state.service = service
    _add_error_handlers(app)
    app.add_middleware(BodyLimit)
    app.fast_reads = service if fast_reads else None
    app.erased = ErasedGate(Path(data_dir), partitions_dir)
    add_privacy_routes(app, service)
    _add_read_routes(app, service)
    _add_write_routes(app, service)
    add_gateway_routes(app, service, bootstrap, topic_prefix)
    return app


# -- authentication ----------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="an API key from `genki keys create`")


BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


def _needs(service: Service, *roles: Role) -> Any:
    async def principal(request: Request, _: BearerCredentials = None) -> Principal:
        return require_role(service.authenticate(request.headers.get("authorization")), *roles)
    return Depends(principal)


def _idempotency_key(value: str | None) -> str:
    if value is None:
        raise IdempotencyKeyRequired("this request needs an Idempotency-Key header (a unique "
                                     "string per purchase; resend the same one on retry)")
    if len(value) > IDEMPOTENCY_KEY_CHARS_MAX or _IDEMPOTENCY_KEY.fullmatch(value) is None:
        raise BadRequest(f"Idempotency-Key: 1-{IDEMPOTENCY_KEY_CHARS_MAX} printable ASCII "
                         "characters without spaces")
    return value


IdempotencyHeader = Annotated[str | None, Header(alias="Idempotency-Key",
                                                 description="unique per request; resend on "
                                                             "retry")]


async def _on(executor: Any, fn: Callable[..., _T], *args: Any) -> _T:
    return await asyncio.get_running_loop().run_in_executor(executor, partial(fn, *args))


# -- routes ------------------------------------------------------------------------

def _add_read_routes(app: FastAPI, service: Service) -> None:
    reader = _needs(service, Role.app, Role.staff)
    staff = _needs(service, Role.staff)
    shop_or_staff = _needs(service, Role.shop, Role.staff)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> Response:
        return json_response({"status": "ok", "version": engine.__version__,
                              **service.health()})

    @app.get("/v1/users/{user_id}/balance", tags=["users"], response_model=models.BalanceOut)
    async def balance(user_id: UserId, _: Principal = reader) -> Response:
        return json_response(service.balance(user_id))

    @app.get("/v1/users/{user_id}/history", tags=["users"], response_model=models.HistoryOut)
    async def history(user_id: UserId, _: Principal = reader,
                      cursor: Annotated[int | None, Query(ge=1)] = None,
                      limit: Annotated[int, Query(ge=1, le=HISTORY_PAGE_ENTRIES_MAX)]
                      = HISTORY_PAGE_ENTRIES_DEFAULT) -> Response:
        return json_response(service.history(user_id, cursor, limit))

    @app.get("/v1/users/{user_id}/flags", tags=["users"], response_model=models.UserFlagsOut)
    async def user_flags(user_id: UserId, _: Principal = reader) -> Response:
        return json_response(service.user_flags(user_id))

    @app.get("/v1/flags", tags=["staff"], response_model=models.FlagsOut)
    async def flags(_: Principal = staff,
                    day: Annotated[str | None, Query(pattern=r"^\d{4}-\d{2}-\d{2}$")] = None,
                    ) -> Response:
        return json_response(await run_in_threadpool(service.current_flags, day))

    @app.get("/v1/shops/{shop_id}/settlement", tags=["shops"],
             response_model=models.SettlementOut)
    async def settlement(shop_id: ShopId,
                         month: Annotated[str, Query(pattern=r"^\d{4}-(0[1-9]|1[0-2])$")],
                         principal: Principal = shop_or_staff) -> Response:
        require_shop(principal, shop_id)
        return json_response(await run_in_threadpool(service.settlement, shop_id, month))


def _add_write_routes(app: FastAPI, service: ApiService) -> None:
    app_role = _needs(service, Role.app)
    shop = _needs(service, Role.shop)
    staff = _needs(service, Role.staff)

    @app.post("/v1/users/{user_id}/redeem-tokens", tags=["users"], status_code=201,
              response_model=models.RedeemTokenOut)
    async def redeem_token(user_id: UserId, _: Principal = app_role) -> Response:
        return json_response(service.issue_token(user_id), 201)

    @app.post(REDEMPTIONS_PATH, tags=["shops"], status_code=201,
              response_model=models.RedemptionOut)
    async def redeem(body: models.RedemptionIn, idempotency_key: IdempotencyHeader = None,
                     principal: Principal = shop) -> Response:
        key = _idempotency_key(idempotency_key)
        return reply_response(await service.redeem(principal, key, body.token, body.points,
                                                   body.terminal_id))

    @app.post("/v1/refunds", tags=["shops"], status_code=201, response_model=models.RefundOut)
    async def refund(body: models.RefundIn, idempotency_key: IdempotencyHeader = None,
                     principal: Principal = shop) -> Response:
        key = _idempotency_key(idempotency_key)
        return reply_response(await service.refund(principal, key, body.redemption_entry_id,
                                                   body.points))

    @app.post("/v1/adjustments", tags=["staff"], status_code=201,
              response_model=models.AdjustmentOut)
    async def adjust(body: models.AdjustmentIn, idempotency_key: IdempotencyHeader = None,
                     principal: Principal = staff) -> Response:
        key = _idempotency_key(idempotency_key)
        return reply_response(await service.adjust(principal, key, body.user_id, body.points,
                                                   body.reason))


# -- errors and limits ---------------------------------------------------------------

def _add_error_handlers(app: FastAPI) -> None:
    async def genki_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, GenkiError)
        return error_response(error)

    async def invalid_request(_: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        problems = [{"loc": [str(part) for part in item["loc"]], "msg": item["msg"],
                     "type": item["type"]} for item in error.errors()]
        detail = "; ".join(f"{'.'.join(p['loc'])}: {p['msg']}" for p in problems)
        return problem_response(400, "invalid_request", detail, errors=problems)

    async def http_error(_: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        codes = {404: Refusal.not_found.value, 405: Refusal.method_not_allowed.value}
        return problem_response(error.status_code, codes.get(error.status_code, "http_error"),
                                str(error.detail), dict(error.headers or {}))

    async def internal_error(_: Request, error: Exception) -> Response:
        if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):
            return refusal_response(Refusal.store_busy, "the API store is busy; retry with the "
                                    "same Idempotency-Key", {"Retry-After": "5"})
        _log.error("request failed", exc_info=error)
        return refusal_response(Refusal.internal, "internal error; see the server log")

    app.add_exception_handler(GenkiError, genki_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


class BodyLimit:
    """Refuses bodies above the limit of their route (413), by header or by bytes read."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = INGEST_BODY_BYTES_MAX if is_gateway_path(scope["path"]) \
            else COMMAND_BODY_BYTES_MAX
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_too_large(send, limit)
            return
        received_bytes = 0
        exceeded = started = False

        async def limited_receive() -> Message:
            nonlocal received_bytes, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received_bytes += len(message.get("body", b""))
                if received_bytes > limit:
                    exceeded = True
                    raise BodyTooLarge(f"request body over {limit} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a cut-off body is replaced by 413
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _send_too_large(send, limit)


async def _send_too_large(send: Send, limit: int) -> None:
    body = orjson.dumps(problem_body(413, BodyTooLarge.code,
                                     f"request body over {limit} bytes, the limit of this "
                                     "endpoint"))
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/problem+json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class GenkiAPI(FastAPI):
    """FastAPI with fast paths in front of Starlette's middleware stack.

    GET /v1/users/{id}/balance (app backends) and POST /v1/redemptions (shop
    terminals), the hot paths, are answered here with the same auth, body model
    and service code as the FastAPI routes (a test holds the answers equal).
    FastAPI's per-request dependency solving and middleware layers cost several
    times the work itself (benchmarks/api.py measures both); everything else,
    and any request these paths do not recognise as well formed (they then hand
    it on with its body), goes through FastAPI.
    """

    fast_reads: Service | None = None
    erased: ErasedGate | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.erased is not None and scope["type"] == "http" \
                and self.erased.blocks(scope["path"]):
            await self.erased.answer(scope, receive, send)
            return
        if self.fast_reads is not None and scope["type"] == "http" \
                and scope["method"] == "GET":
            match = _BALANCE_PATH.fullmatch(scope["path"])
            if match is not None:
                await _fast_balance(self.fast_reads, match.group(1), scope, receive, send)
                return
        if self.fast_reads is not None and scope["type"] == "http" \
                and scope["method"] == "POST" and scope["path"] == REDEMPTIONS_PATH:
            await self._fast_redeem(self.fast_reads, scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    async def _fast_redeem(self, service: Service, scope: Scope, receive: Receive,
                           send: Send) -> None:
        headers = dict(scope["headers"])
        body, more = await _read_body(receive, COMMAND_BODY_BYTES_MAX)
        request = _well_formed_redemption(headers, body, more)
        if request is None:  # FastAPI gives the precise answer (400, 413, ...)
            await super().__call__(scope, _replaying(body, more, receive), send)
            return
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        try:
            try:
                principal = require_role(service.authenticate_shop_command(authorization),
                                         Role.shop)
                key = _idempotency_key(headers[b"idempotency-key"].decode("latin-1"))
            except GenkiError:  # a key revoked since it was seen: its 401 comes first
                require_role(service.authenticate(authorization), Role.shop)
                raise
            reply = await service.redeem(principal, key, request.token, request.points,
                                         request.terminal_id)
        except GenkiError as error:
            await error_response(error)(scope, receive, send)
            return
        except Exception:  # noqa: BLE001 - logged, answered as FastAPI would
            _log.exception("redemption failed")
            await refusal_response(Refusal.internal, "internal error; see the server log")(
                scope, receive, send)
            return
        await _send_reply(reply, send)


async def _send_reply(reply: Reply, send: Send) -> None:
    """`reply_response(reply)` as ASGI messages, without a Response object per request."""
    headers = [(b"content-length", str(len(reply.body)).encode()),
               (b"content-type", b"application/json")]
    if reply.replayed:
        headers.insert(0, (b"idempotent-replayed", b"true"))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


async def _read_body(receive: Receive, limit_bytes: int) -> tuple[bytes, bool]:
    """The request body, up to just past `limit_bytes`; True when more is left unread."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        more = bool(message.get("more_body", False))
        if not more or size > limit_bytes:
            return b"".join(chunks), more


def _replaying(body: bytes, more: bool, receive: Receive) -> Receive:
    """A receive that gives the body already read first, then the rest."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": more}
    return replay


def _well_formed_redemption(headers: dict[bytes, bytes], body: bytes,
                            more: bool) -> models.RedemptionIn | None:
    """The body of a request the fast path can answer exactly as FastAPI would."""
    content_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    if more or len(body) > COMMAND_BODY_BYTES_MAX or content_type != b"application/json" \
            or b"idempotency-key" not in headers or b"authorization" not in headers:
        return None
    try:
        return models.RedemptionIn.model_validate_json(body)
    except ValidationError:
        return None


async def _fast_balance(service: Service, user_id: str, scope: Scope, receive: Receive,
                        send: Send) -> None:
    authorization = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
            break
    try:
        require_role(service.authenticate(authorization), Role.app, Role.staff)
        body = orjson.dumps(service.balance(user_id))
    except GenkiError as error:
        await error_response(error)(scope, receive, send)
        return
    except Exception:  # noqa: BLE001 - logged, answered as FastAPI would
        _log.exception("balance read failed")
        await problem_response(500, "internal", "internal error; see the server log")(
            scope, receive, send)
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
