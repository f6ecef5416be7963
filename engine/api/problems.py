"""Errors as RFC 9457 problem details, with a stable `code` clients can switch on.

Every engine.errors.GenkiError already carries `http_status` and `code`; the
API adds its own for authentication, tokens, idempotency and limits. The
response body is `{type, title, status, detail, code}` with media type
`application/problem+json`.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any, ClassVar

import orjson
from starlette.responses import Response

from engine.errors import GenkiError
from engine.ingest.log import LogLocked

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_TYPE_PREFIX = "urn:genki:problem:"
RETRY_AFTER_S = 5
RETRY_AFTER: dict[str, str] = {"Retry-After": str(RETRY_AFTER_S)}


class ApiError(GenkiError):
    """Base of the API's own errors; `headers` are added to the response."""

    headers: ClassVar[dict[str, str]] = {}


class Unauthenticated(ApiError):
    http_status = 401
    code = "unauthenticated"
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": 'Bearer realm="genki"'}


class Forbidden(ApiError):
    http_status = 403
    code = "forbidden"


class TokenInvalid(ApiError):
    """Not a token this server signed (forged, altered or malformed)."""

    http_status = 401
    code = "token_invalid"


class TokenExpired(ApiError):
    http_status = 401
    code = "token_expired"


class TokenUsed(ApiError):
    """The token already paid for another redemption (or one is in progress)."""

    http_status = 409
    code = "token_used"


class IdempotencyKeyRequired(ApiError):
    http_status = 400
    code = "idempotency_key_required"


class BodyTooLarge(ApiError):
    http_status = 413
    code = "body_too_large"


class TooManyRecords(ApiError):
    http_status = 413
    code = "too_many_records"


class BadRequest(ApiError):
    http_status = 400
    code = "bad_request"


class IngestBusy(ApiError):
    http_status = 503
    code = "ingest_log_busy"
    headers: ClassVar[dict[str, str]] = RETRY_AFTER


def problem_body(status: int, code: str, detail: str, **extra: Any) -> dict[str, Any]:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body: dict[str, Any] = {"type": PROBLEM_TYPE_PREFIX + code, "title": title,
                            "status": status, "detail": detail, "code": code}
    body.update(extra)
    return body


def problem_response(status: int, code: str, detail: str,
                     headers: dict[str, str] | None = None, **extra: Any) -> Response:
    return Response(orjson.dumps(problem_body(status, code, detail, **extra)), status_code=status,
                    media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def error_response(error: GenkiError) -> Response:
    """The problem response of any genki error, by its own status and code."""
    if isinstance(error, LogLocked):
        error = IngestBusy(f"{error}; the ingest log is held by another genki process "
                           "(e.g. `genki ingest`), retry later")
    headers = error.headers if isinstance(error, ApiError) else None
    if error.http_status == 503 and not headers:
        headers = RETRY_AFTER  # e.g. LedgerBusy: a long `genki run` holds the write lock
    return problem_response(error.http_status, error.code, str(error), headers)
