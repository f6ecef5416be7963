"""Privacy routes: the staff erasure endpoint, and 404 for people who were erased.

`POST /v1/users/{user_id}/erase` (staff key, body `{"reason": "..."}`) runs the
same use case as `genki erase` (engine.erasure.erase_person) on the service's
ingest thread, with the log and ledger the service holds. After it, every
`/v1/users/{user_id}/...` route answers 404 for that person (`ErasedGate`,
in front of the fast balance path too); the erase route itself stays
idempotent (200 again, nothing left to remove).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from engine.api.problems import problem_response
from engine.api.service import ApiService, Principal, require_role
from engine.api.store import Role
from engine.erasure import (
    AUDIT_FILE_NAME,
    KEY_FILE_NAME,
    REASON_CHARS_MAX,
    ErasureAudit,
    ErasureError,
    erase_person,
)
from engine.schemas import ID_CHARS_MAX

if TYPE_CHECKING:
    from engine.api.kafka_service import KafkaApiService

_ID_CHAR = r"[A-Za-z0-9_.:\-]"
_USER_PATH = re.compile(rf"/v1/users/({_ID_CHAR}{{1,{ID_CHARS_MAX}}})/([a-z\-]+)")
ERASE_ROUTE = "erase"
_log = logging.getLogger("genki.api")
UserId = Annotated[str, PathParam(min_length=1, max_length=ID_CHARS_MAX,
                                  pattern=rf"^{_ID_CHAR}+$")]


class EraseIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    reason: Annotated[str, Field(min_length=1, max_length=REASON_CHARS_MAX, pattern=r"\S")]


class EraseOut(BaseModel):
    subject: str = Field(description="the audit log's keyed pseudonym of the person")
    already_erased: bool
    removed: dict[str, dict[str, int]] = Field(description="store → kind → rows removed")
    seconds: float


class ErasedGate:
    """Answers 404 for `/v1/users/{id}/...` of people whose erasure finished: erased through
    this data directory, or (Kafka mode) by `genki erase` on the workers' directory."""

    def __init__(self, data_dir: Path, partitions_dir: Path | None = None) -> None:
        self._audits = [ErasureAudit.open(data_dir)]
        if partitions_dir is not None and (partitions_dir / AUDIT_FILE_NAME).exists() \
                and (partitions_dir / KEY_FILE_NAME).exists():
            try:
                self._audits.append(ErasureAudit.open(partitions_dir))
            except sqlite3.Error as error:  # e.g. a read-only volume without the WAL index
                _log.warning("erasures in %s are not checked: %s", partitions_dir, error)

    def close(self) -> None:
        for audit in self._audits:
            audit.close()

    def blocks(self, path: str) -> bool:
        match = _USER_PATH.fullmatch(path)
        return match is not None and match.group(2) != ERASE_ROUTE \
            and any(audit.is_erased(match.group(1)) for audit in self._audits)

    async def answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        await problem_response(404, "not_found", "no such person")(scope, receive, send)


def add_privacy_routes(app: FastAPI, service: ApiService | KafkaApiService) -> None:
    async def staff(request: Request) -> Principal:
        return require_role(service.authenticate(request.headers.get("authorization")),
                            Role.staff)

    @app.post(f"/v1/users/{{user_id}}/{ERASE_ROUTE}", tags=["staff"], response_model=EraseOut,
              summary="erase a person's data everywhere (audited)")
    async def erase(user_id: UserId, body: EraseIn,
                    principal: Principal = Depends(staff)) -> Response:  # noqa: B008
        """Samples, activities, profile, consent events, flags and dead letters are deleted;
        the ledger keeps settlement amounts without the link. Idempotent."""
        if service.kafka:
            raise ErasureError("this API serves the Kafka runtime: run `genki erase USER "
                               "--reason R --data-dir DIR` on each worker host")
        run = partial(_erase_embedded, service, user_id, body.reason, f"api:{principal.key_id}")
        result = await asyncio.get_running_loop().run_in_executor(service.ingester, run)
        return Response(orjson.dumps(result), media_type="application/json")


def _erase_embedded(service: ApiService, user_id: str, reason: str,
                    actor: str) -> dict[str, Any]:
    """On the ingest thread: the log the service holds (or opens), its write ledger."""
    return service.with_ingest_log(
        lambda log: erase_person(service.data_dir, user_id, reason, actor, log=log,
                                 ledger=service.write_ledger, now_ms=service.clock()).as_dict())
