"""The HTTP ingest gateway, in both runtimes: wire records and vendor formats.

* `POST /v1/ingest`: NDJSON wire records (or a JSON array of them);
* `POST /v1/ingest/{format}`: a vendor export (engine.importers) mapped to wire records;
* `POST /v1/push/garmin[/{summary_type}]`: Garmin Health API push bodies, per user.

Bodies may be sent with `Content-Encoding: gzip` or `zstd`. The compressed body is
bounded by the body limit of the route (INGEST_COMPRESSED_BYTES_MAX) and is
decompressed a chunk at a time up to INGEST_DECOMPRESSED_BYTES_MAX: a compression
bomb is refused with 413 after at most one chunk past the limit.

Embedded runtime: the records go into the data directory's log, as `genki ingest`.
Kafka runtime (`genki serve --bootstrap`): the records are validated here (the same
decoder as the workers), the valid ones published to the input topics by
`engine.kafka.publish.Gateway` (the partitioner of `genki publish`), the invalid
ones to genki.dlq with their reasons; the answer counts both. Judgements that need
state (late data, duplicates, conflicts) are the partition owner's, later.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import orjson
import zstandard
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Query, Request
from starlette.responses import Response

from engine.api.devices import add_device_routes
from engine.api.limits import INGEST_BODY_BYTES_MAX, INGEST_RECORDS_PER_BATCH_MAX
from engine.api.problems import (
    RETRY_AFTER,
    ApiError,
    BadRequest,
    BodyTooLarge,
    Refusal,
    TooManyRecords,
)
from engine.api.service import ApiService, Principal, require_role
from engine.api.store import Role
from engine.devices import DeviceRegistry, KeyPolicy
from engine.devices.screen import enrolment_resolver, screen_lines
from engine.errors import GenkiError
from engine.importers import ImportOptions, ImportResult, format_named, import_source
from engine.importers.core import LOCAL_OFFSET_DEFAULT
from engine.ingest.decode import DecodedBatch, decode_lines
from engine.ingest.log import IngestCounts

if TYPE_CHECKING:
    from engine.api.kafka_service import KafkaApiService
    from engine.kafka.publish import Gateway

INGEST_PATH = "/v1/ingest"
PUSH_PATH = "/v1/push"
INGEST_COMPRESSED_BYTES_MAX = INGEST_BODY_BYTES_MAX
INGEST_DECOMPRESSED_BYTES_MAX = 128 * 1024 * 1024
DECOMPRESS_CHUNK_BYTES = 1024 * 1024
CONTENT_ENCODINGS = ("identity", "gzip", "x-gzip", "zstd")
JSON = "application/json"
GARMIN_SUMMARY_TYPES = ("dailies", "epochs", "sleeps", "pulseox", "bodyComps")


class UnsupportedEncoding(ApiError):
    refusal = Refusal.unsupported_content_encoding


class GatewayUnavailable(ApiError):
    refusal = Refusal.kafka_unavailable
    headers: ClassVar[dict[str, str]] = RETRY_AFTER


class BadEncoding(ApiError):
    refusal = Refusal.bad_content_encoding


def is_gateway_path(path: str) -> bool:
    """Routes whose bodies are batches (the larger body limit applies)."""
    return path == INGEST_PATH or path.startswith((INGEST_PATH + "/", PUSH_PATH + "/"))


# -- bodies ------------------------------------------------------------------------------

def decompressed(body: bytes, encoding: str | None,
                 limit_bytes: int = INGEST_DECOMPRESSED_BYTES_MAX) -> bytes:
    """The body without its Content-Encoding, refused (413) past `limit_bytes`."""
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return body
    if name not in CONTENT_ENCODINGS:
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r}: one of gzip, zstd "
                                  "(or none)")
    if name in ("gzip", "x-gzip"):
        reader: Any = gzip.GzipFile(fileobj=io.BytesIO(body), mode="rb")
        errors: tuple[type[Exception], ...] = (OSError, EOFError, zlib.error)
    else:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body),
                                                            read_across_frames=True)
        errors = (zstandard.ZstdError, OSError)
    parts: list[bytes] = []
    size_bytes = 0
    try:
        while chunk := reader.read(DECOMPRESS_CHUNK_BYTES):
            size_bytes += len(chunk)
            if size_bytes > limit_bytes:
                raise BodyTooLarge(f"{name} body decompresses to more than {limit_bytes} "
                                   "bytes, the limit of this endpoint; send smaller batches")
            parts.append(chunk)
    except errors as error:
        raise BadEncoding(f"body is not valid {name}: {error}") from None
    return b"".join(parts)


def ingest_lines(body: bytes, content_type: str) -> list[bytes]:
    """One wire record per element: NDJSON lines, or the items of a JSON array."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == JSON:
        try:
            items = orjson.loads(body)
        except orjson.JSONDecodeError as error:
            raise BadRequest(f"body is not JSON: {error}; send a JSON array of wire records "
                             "or NDJSON (application/x-ndjson)") from None
        if not isinstance(items, list):
            raise BadRequest("a JSON body must be an array of wire records")
        lines = [orjson.dumps(item) for item in items]
    else:
        lines = [line.rstrip(b"\r") for line in body.split(b"\n")]
        lines = [line for line in lines if line.strip()]
    if len(lines) > INGEST_RECORDS_PER_BATCH_MAX:
        raise TooManyRecords(f"{len(lines)} records in one request; at most "
                             f"{INGEST_RECORDS_PER_BATCH_MAX} per batch, split it")
    return lines


async def request_body(request: Request) -> bytes:
    """The decoded body; decompression (up to 128 MiB) runs off the event loop."""
    body, encoding = await request.body(), request.headers.get("content-encoding")
    if (encoding or "identity").strip().lower() == "identity":
        return body
    return await asyncio.get_running_loop().run_in_executor(None, decompressed, body, encoding)


# -- what a request hands to a runtime ---------------------------------------------------------

@dataclass
class Batch:
    """Wire records of one request, and the items refused before they became records
    as (offset, reason, raw)."""

    lines: list[bytes]
    rejected_before: list[tuple[int, str, bytes]] = field(default_factory=list)
    offsets: list[int] | None = None
    extra: dict[str, int] = field(default_factory=dict)


def batch_of_import(result: ImportResult) -> Batch:
    if len(result.lines) > INGEST_RECORDS_PER_BATCH_MAX:
        raise TooManyRecords(f"{len(result.lines)} records from one request; at most "
                             f"{INGEST_RECORDS_PER_BATCH_MAX}, split it")
    return Batch(result.lines, [(u.item, u.reason, u.raw) for u in result.unmapped],
                 result.line_items, {"items": result.items, "samples": result.samples,
                                     "records": len(result.lines),
                                     "unmapped": len(result.unmapped)})


def screened(batch: Batch, policy: KeyPolicy) -> Batch:
    """The batch without the records the key may not write (they become dead letters)."""
    offsets = batch.offsets or list(range(1, len(batch.lines) + 1))
    kept, kept_offsets, refused = screen_lines(batch.lines, offsets, policy)
    if not refused:
        return batch
    return Batch(kept, batch.rejected_before + refused, kept_offsets, batch.extra)


class EmbeddedSink:
    """Into the data directory's log, on the service's ingest thread."""

    def __init__(self, service: ApiService) -> None:
        self.service = service

    async def submit(self, principal: Principal, make: Callable[[], Batch]) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            batch = make()
            if not batch.lines and not batch.rejected_before:
                return {**IngestCounts().as_dict(), **batch.extra}
            counts = self.service.ingest(principal, batch.lines, offsets=batch.offsets,
                                         rejected_before=batch.rejected_before,
                                         key_id=principal.key_id)
            return {**counts, **batch.extra}

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.service.ingester, work)

    async def close(self) -> None:
        return None


class KafkaSink:
    """Validated at the edge, published as `genki publish` would (one producer)."""

    def __init__(self, service: KafkaApiService, bootstrap: str, prefix: str) -> None:
        self.service = service
        self.bootstrap = bootstrap
        self.prefix = prefix
        self._gateway: Gateway | None = None
        self._lock = asyncio.Lock()

    async def _started(self) -> Gateway:
        if self._gateway is None:
            from engine.kafka.publish import Gateway

            gateway = Gateway(self.bootstrap, self.prefix, client_id="http-gateway")
            try:
                await gateway.__aenter__()
            except (KafkaError, GenkiError, OSError) as error:
                raise GatewayUnavailable(f"cannot publish to Kafka at {self.bootstrap}: "
                                         f"{error}; retry later") from None
            self._gateway = gateway
        return self._gateway

    async def _publish(self, principal: Principal, accepted: list[bytes], source: str,
                       letters: list[tuple[int, str, bytes]]) -> None:
        """Records and dead letters, acknowledged by the broker; on a broker error the
        producer is dropped (the next request starts a new one) and the client retries:
        what was published twice is a duplicate the partition owner drops."""
        async with self._lock:
            gateway = await self._started()
            try:
                await gateway.send_lines(accepted, submitted_by=principal.key_id)
                await send_dead_letters(gateway, self.prefix, source, letters)
                await gateway.flush()
            except KafkaError as error:
                self._gateway = None
                with contextlib.suppress(Exception):
                    await gateway.__aexit__(None, None, None)
                raise GatewayUnavailable(f"publishing to Kafka failed: {error}; retry the "
                                         "request") from None

    async def submit(self, principal: Principal, make: Callable[[], Batch]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        now_ms = self.service.clock()

        def validated() -> tuple[Batch, DecodedBatch]:  # off the event loop: batches are large
            batch = make()
            return batch, decode_lines(batch.lines, now_ms)

        batch, decoded = await loop.run_in_executor(None, validated)
        refused = {r.index for r in decoded.rejected}
        accepted = [line for i, line in enumerate(batch.lines) if i not in refused]
        offsets = batch.offsets or list(range(1, len(batch.lines) + 1))
        letters = [(offsets[r.index], r.reason, r.raw) for r in decoded.rejected]
        letters.extend(batch.rejected_before)
        source = f"http:{principal.key_id}:{now_ms}"
        await self._publish(principal, accepted, source, letters)
        by_reason: dict[str, int] = {}
        for _, reason, _ in letters:
            code = reason.split(":", 1)[0]
            by_reason[code] = by_reason.get(code, 0) + 1
        received = len(batch.lines) + len(batch.rejected_before)
        return {"received": received, "accepted": len(accepted), "rejected": len(letters),
                "rejected_by_reason": dict(sorted(by_reason.items())), "published": True,
                **batch.extra}

    async def close(self) -> None:
        if self._gateway is not None:
            gateway, self._gateway = self._gateway, None
            await gateway.__aexit__(None, None, None)


async def send_dead_letters(gateway: Gateway, prefix: str, source: str,
                            letters: list[tuple[int, str, bytes]]) -> None:
    """DeadLetter wire records onto genki.dlq through the gateway's producer."""
    if not letters:
        return
    from engine.kafka.client import topic_name
    from engine.kafka.topics import DLQ

    producer = gateway._producer
    topic = topic_name(prefix, DLQ)
    partitions = sorted(await producer.partitions_for(topic))
    for offset, reason, raw in letters:
        body = {"v": 1, "source": source, "partition": None, "offset": offset,
                "reason": reason, "raw_b64": base64.b64encode(raw).decode()}
        partition = partitions[zlib.crc32(raw) % len(partitions)]
        await gateway._sender.append(topic, partition, None, orjson.dumps(body))


# -- routes -----------------------------------------------------------------------------------

def add_gateway_routes(app: FastAPI, service: ApiService | KafkaApiService,
                       bootstrap: str | None = None, topic_prefix: str = "") -> None:
    """The gateway's routes; `app.state.gateway_sink` is closed by the app's lifespan."""
    sink: EmbeddedSink | KafkaSink
    if not service.kafka:  # one ApiService class serves both runtimes
        sink = EmbeddedSink(service)
    else:
        from engine.api.kafka_service import KafkaApiService

        assert bootstrap is not None and isinstance(service, KafkaApiService)
        sink = KafkaSink(service, bootstrap, topic_prefix)
    registry = DeviceRegistry.open(service.data_dir)
    app.state.gateway_sink = sink
    app.state.devices = registry
    add_device_routes(app, service, registry)

    def gateway_principal(request: Request) -> tuple[Principal, KeyPolicy]:
        """A gateway key (screened by its enrolment scope) or a staff key (trusted)."""
        principal = require_role(service.authenticate(request.headers.get("authorization")),
                                 Role.gateway, Role.staff)
        return principal, registry.policy_for(principal.key_id,
                                              trusted=principal.role == Role.staff)

    def answer(counts: dict[str, Any]) -> Response:
        return Response(orjson.dumps(counts), media_type=JSON)

    @app.post(INGEST_PATH, tags=["ingest"], openapi_extra={"requestBody": {
        "required": True, "content": {"application/x-ndjson": {"schema": {"type": "string"}},
                                      JSON: {"schema": {"type": "array",
                                                        "items": {"type": "object"}}}}}})
    async def ingest(request: Request) -> Response:
        """Wire records (NDJSON or a JSON array; gzip or zstd Content-Encoding allowed);
        same checks as `genki ingest`. Answers received/accepted/rejected counts."""
        principal, policy = gateway_principal(request)
        body = await request_body(request)
        content_type = request.headers.get("content-type", "")
        return answer(await sink.submit(principal, lambda: screened(Batch(
            ingest_lines(body, content_type)), policy)))

    @app.post(INGEST_PATH + "/{format_name}", tags=["ingest"])
    async def ingest_format(request: Request, format_name: str,
                            user: Annotated[str | None, Query(max_length=64)] = None,
                            device: Annotated[str | None, Query(max_length=64)] = None,
                            user_id: Annotated[str | None, Query(max_length=64)] = None,
                            device_id: Annotated[str | None, Query(max_length=64)] = None,
                            tz_offset: str = LOCAL_OFFSET_DEFAULT,
                            units: str = "metric") -> Response:
        """A vendor export (engine.importers.FORMATS) mapped to wire records, as `genki
        import`; the query mirrors its options."""
        principal, policy = gateway_principal(request)
        name = format_named(format_name)
        options = ImportOptions(user_id=user or user_id, device_id=device or device_id,
                                local_offset=tz_offset, units=units)
        body = await request_body(request)
        return answer(await sink.submit(principal, lambda: screened(batch_of_import(
            import_source(name, io.BytesIO(body), options,
                          enrolment_resolver(policy, options))), policy)))

    @app.post(PUSH_PATH + "/garmin", tags=["ingest"])
    async def garmin_push(request: Request) -> Response:
        """Garmin Health API push: `{"dailies": [...], "epochs": [...], ...}`, summaries of
        any number of users; each summary's userId names the person."""
        return await _garmin(request, None)

    @app.post(PUSH_PATH + "/garmin/{summary_type}", tags=["ingest"])
    async def garmin_push_type(request: Request, summary_type: str) -> Response:
        """Garmin's per-summary-type push URL: the body is `{summary_type: [...]}` or a
        bare list of summaries."""
        return await _garmin(request, summary_type)

    async def _garmin(request: Request, summary_type: str | None) -> Response:
        principal, policy = gateway_principal(request)
        body = await request_body(request)
        if summary_type is not None:
            body = _garmin_body(body, summary_type)
        options = ImportOptions()
        return answer(await sink.submit(principal, lambda: screened(batch_of_import(
            import_source("garmin", io.BytesIO(body), options,
                          enrolment_resolver(policy, options))), policy)))


def _garmin_body(body: bytes, summary_type: str) -> bytes:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"body is not JSON: {error}") from None
    if isinstance(value, list):
        return orjson.dumps({summary_type: value})
    return body

