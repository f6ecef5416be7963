"""Staff endpoints for device enrolment and gateway key scopes (as `genki devices`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import orjson
from fastapi import FastAPI, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from engine.api.service import ApiService, Principal, require_role
from engine.api.store import Role
from engine.devices import DeviceRegistry
from engine.errors import NotFound
from engine.schemas import IdText

if TYPE_CHECKING:
    from engine.api.kafka_service import KafkaApiService

DEVICES_PATH = "/v1/devices"
JSON = "application/json"


class EnrolIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: IdText
    device_id: IdText
    vendor: Annotated[str, Field(min_length=1, max_length=32)] = "generic"
    key_id: IdText | None = None


class UnenrolIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: IdText
    device_id: IdText


class ScopeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vendors: list[Annotated[str, Field(min_length=1, max_length=32)]] = []
    profiles: bool = False


def _json(value: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status_code=status, media_type=JSON)


def add_device_routes(app: FastAPI, service: ApiService | KafkaApiService,
                      registry: DeviceRegistry) -> None:
    def staff(request: Request) -> Principal:
        return require_role(service.authenticate(request.headers.get("authorization")),
                            Role.staff)

    @app.post(DEVICES_PATH + "/enroll", tags=["staff"], status_code=201)
    async def enroll(body: EnrolIn, request: Request) -> Response:
        """Enrol a device to a person (idempotent; 409 if another person wears it)."""
        principal = staff(request)
        enrolment = registry.enroll(body.user_id, body.device_id, body.vendor,
                                    service.clock(), f"key:{principal.key_id}", body.key_id)
        return _json(enrolment.to_dict(), 201)

    @app.post(DEVICES_PATH, tags=["staff"], status_code=201)
    async def enroll_here(body: EnrolIn, request: Request) -> Response:
        """The same as POST /v1/devices/enroll."""
        return await enroll(body, request)

    @app.delete(DEVICES_PATH + "/{device_id}", tags=["staff"])
    async def unenroll_device(device_id: str, request: Request,
                              user_id: Annotated[str | None, Query(max_length=64)] = None,
                              ) -> Response:
        """End a device's enrolment (to `user_id` if given, else to whoever wears it)."""
        principal = staff(request)
        current = registry.enrolment(device_id)
        if current is None:
            raise NotFound(f"device {device_id} is not enrolled")
        enrolment = registry.unenroll(user_id or current.user_id, device_id, service.clock(),
                                      f"key:{principal.key_id}")
        return _json(enrolment.to_dict())

    @app.post(DEVICES_PATH + "/unenroll", tags=["staff"])
    async def unenroll(body: UnenrolIn, request: Request) -> Response:
        principal = staff(request)
        enrolment = registry.unenroll(body.user_id, body.device_id, service.clock(),
                                      f"key:{principal.key_id}")
        return _json(enrolment.to_dict())

    @app.get(DEVICES_PATH, tags=["staff"])
    async def devices(request: Request,
                      user_id: Annotated[str | None, Query(max_length=64)] = None) -> Response:
        """Current enrolments, the key scopes, and whether enforcement is on."""
        staff(request)
        return _json({"devices": [e.to_dict() for e in registry.enrolments(user_id)],
                      "key_scopes": [s.to_dict() for s in registry.scopes()],
                      "enforced": registry.enforced()})

    @app.put("/v1/gateway-keys/{key_id}/scope", tags=["staff"])
    async def scope(key_id: str, body: ScopeIn, request: Request) -> Response:
        """Bind a gateway key to vendors (`any` for all) and/or make it an enrolment key."""
        staff(request)
        return _json(registry.bind_key(key_id, body.vendors, body.profiles,
                                       service.clock()).to_dict())
