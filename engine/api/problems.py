"""Errors as RFC 9457 problem details, with a stable `code` clients can switch on.

Every refusal the API gives has a code in `Refusal`, and `REFUSAL_STATUS` is
the one place a code becomes an HTTP status. The response body is
`{type, title, status, detail, code}` with media type
`application/problem+json`.

Refusals of the ledger (the embedded ledger's exceptions, or the partition
owner's dead-letter reason in Kafka mode) become API refusals through
`refusal_of_ledger_code`, by their code alone, never by their message: what a
shop is told is written here, so it can hold no balance, user id or what kind
an entry it does not own is (one answer for an unknown id, an award's id and
another shop's redemption).
"""

from __future__ import annotations

from enum import StrEnum
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
IN_PROGRESS_RETRY_AFTER_S = 1


class Refusal(StrEnum):
    """Every code the API answers an error with."""

    invalid_request = "invalid_request"
    bad_request = "bad_request"
    idempotency_key_required = "idempotency_key_required"
    unauthenticated = "unauthenticated"
    token_invalid = "token_invalid"
    token_expired = "token_expired"
    forbidden = "forbidden"
    not_found = "not_found"
    method_not_allowed = "method_not_allowed"
    redemption_not_found = "redemption_not_found"
    insufficient_points = "insufficient_points"
    token_used = "token_used"
    in_progress = "in_progress"
    refund_exceeds_redemption = "refund_exceeds_redemption"
    points_per_person_per_day_max_exceeded = "points_per_person_per_day_max_exceeded"
    body_too_large = "body_too_large"
    too_many_records = "too_many_records"
    unsupported_content_encoding = "unsupported_content_encoding"
    bad_content_encoding = "bad_content_encoding"
    idempotency_conflict = "idempotency_conflict"
    points_per_redemption_max_exceeded = "points_per_redemption_max_exceeded"
    refused = "refused"
    internal = "internal"
    ingest_log_busy = "ingest_log_busy"
    ledger_busy = "ledger_busy"
    store_busy = "store_busy"
    reads_unavailable = "reads_unavailable"
    not_in_kafka_mode = "not_in_kafka_mode"
    kafka_busy = "kafka_busy"
    kafka_unavailable = "kafka_unavailable"
    outcome_timeout = "outcome_timeout"


REFUSAL_STATUS: dict[Refusal, int] = {
    Refusal.invalid_request: 400, Refusal.bad_request: 400,
    Refusal.idempotency_key_required: 400, Refusal.bad_content_encoding: 400,
    Refusal.unauthenticated: 401, Refusal.token_invalid: 401, Refusal.token_expired: 401,
    Refusal.forbidden: 403,
    Refusal.not_found: 404, Refusal.redemption_not_found: 404,
    Refusal.method_not_allowed: 405,
    Refusal.insufficient_points: 409, Refusal.token_used: 409, Refusal.in_progress: 409,
    Refusal.refund_exceeds_redemption: 409, Refusal.points_per_person_per_day_max_exceeded: 409,
    Refusal.body_too_large: 413, Refusal.too_many_records: 413,
    Refusal.unsupported_content_encoding: 415,
    Refusal.idempotency_conflict: 422, Refusal.points_per_redemption_max_exceeded: 422,
    Refusal.refused: 422,
    Refusal.internal: 500,
    Refusal.ingest_log_busy: 503, Refusal.ledger_busy: 503, Refusal.store_busy: 503,
    Refusal.reads_unavailable: 503, Refusal.not_in_kafka_mode: 503, Refusal.kafka_busy: 503,
    Refusal.kafka_unavailable: 503,
    Refusal.outcome_timeout: 504,
}
assert set(REFUSAL_STATUS) == set(Refusal), "every refusal needs its status"

_RETRY_AFTER_BY_REFUSAL: dict[Refusal, int] = {
    Refusal.in_progress: IN_PROGRESS_RETRY_AFTER_S, Refusal.ingest_log_busy: RETRY_AFTER_S,
    Refusal.ledger_busy: RETRY_AFTER_S, Refusal.store_busy: RETRY_AFTER_S,
    Refusal.kafka_busy: RETRY_AFTER_S, Refusal.kafka_unavailable: RETRY_AFTER_S,
}

# What a shop is told for a ledger refusal: fixed texts, never the ledger's message.
SHOP_DETAIL: dict[Refusal, str] = {
    Refusal.insufficient_points: "the customer's points are insufficient for this redemption; "
                                 "nothing was taken",
    Refusal.redemption_not_found: "no redemption of this shop has that id",
    Refusal.refund_exceeds_redemption: "the refund exceeds what is left of the redemption "
                                       "(refunds together give back at most what it took)",
    Refusal.points_per_person_per_day_max_exceeded: (
        "this redemption would take the customer past the programme's daily redemption limit "
        "(points_per_person_per_day_max); nothing was taken"),
    Refusal.idempotency_conflict: "this Idempotency-Key was used before with a different "
                                  "request body; send a new key for a new request",
    Refusal.ledger_busy: "the ledger is busy; retry with the same Idempotency-Key",
    Refusal.invalid_request: "the request was refused as invalid",
    Refusal.refused: "the request was refused",
}

# Codes of engine.errors.GenkiError subclasses (and the worker's dead-letter reasons).
_REFUSAL_BY_LEDGER_CODE: dict[str, Refusal] = {
    "insufficient_points": Refusal.insufficient_points,
    "not_found": Refusal.redemption_not_found,
    "not_a_redemption": Refusal.redemption_not_found,
    "refund_wrong_shop": Refusal.redemption_not_found,
    "refund_exceeds_redemption": Refusal.refund_exceeds_redemption,
    "points_per_person_per_day_max_exceeded": Refusal.points_per_person_per_day_max_exceeded,
    "idempotency_conflict": Refusal.idempotency_conflict,
    "ledger_busy": Refusal.ledger_busy,
    "invalid_request": Refusal.invalid_request,
    "invalid_entry": Refusal.invalid_request,
    "usage": Refusal.invalid_request,
    "bad_field": Refusal.invalid_request,
    "missing_field": Refusal.invalid_request,
}


class ApiError(GenkiError):
    """Base of the API's errors: a subclass names its `refusal`; status comes from the table.
    `headers` are added to the response."""

    refusal: ClassVar[Refusal] = Refusal.bad_request
    headers: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "refusal" in cls.__dict__:
            cls.code = cls.refusal.value
            cls.http_status = REFUSAL_STATUS[cls.refusal]


class Refused(ApiError):
    """A refusal by code, with the detail a client is shown."""

    def __init__(self, refusal: Refusal, detail: str) -> None:
        super().__init__(detail)
        self.refusal_code = refusal
        self.code = refusal.value
        self.http_status = REFUSAL_STATUS[refusal]


def refusal_of_ledger_code(code: str) -> Refused:
    """A ledger refusal (by its code) as a shop sees it."""
    refusal = _REFUSAL_BY_LEDGER_CODE.get(code, Refusal.refused)
    return Refused(refusal, SHOP_DETAIL.get(refusal, SHOP_DETAIL[Refusal.refused]))


class Unauthenticated(ApiError):
    refusal = Refusal.unauthenticated
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": 'Bearer realm="genki"'}


class Forbidden(ApiError):
    refusal = Refusal.forbidden


class IdempotencyKeyRequired(ApiError):
    refusal = Refusal.idempotency_key_required


class BodyTooLarge(ApiError):
    refusal = Refusal.body_too_large


class TooManyRecords(ApiError):
    refusal = Refusal.too_many_records


class BadRequest(ApiError):
    refusal = Refusal.bad_request


class IngestBusy(ApiError):
    refusal = Refusal.ingest_log_busy


class ReadsUnavailable(ApiError):
    refusal = Refusal.reads_unavailable


class NotInKafkaMode(ApiError):
    refusal = Refusal.not_in_kafka_mode


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


def refusal_response(refusal: Refusal, detail: str, headers: dict[str, str] | None = None,
                     **extra: Any) -> Response:
    return problem_response(REFUSAL_STATUS[refusal], refusal.value, detail, headers, **extra)


def error_response(error: GenkiError) -> Response:
    """The problem response of any genki error, by its own status and code."""
    if isinstance(error, LogLocked):
        error = IngestBusy(f"{error}; the ingest log is held by another genki process "
                           "(e.g. `genki ingest`), retry later")
    headers = dict(error.headers) if isinstance(error, ApiError) else {}
    retry_after_s = _RETRY_AFTER_BY_REFUSAL.get(Refusal(error.code)) \
        if error.code in Refusal.__members__ else None
    if retry_after_s is not None:
        headers.setdefault("Retry-After", str(retry_after_s))
    elif error.http_status == 503:
        headers.setdefault("Retry-After", str(RETRY_AFTER_S))
    return problem_response(error.http_status, error.code, str(error), headers or None)
