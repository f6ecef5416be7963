"""Judging records against a key's policy before they reach the log or the topics."""

from __future__ import annotations

from typing import Any

import orjson

from engine.devices import KeyPolicy
from engine.importers.core import ImportOptions, Resolver
from engine.ingest.reasons import Reason, reason_text

PROFILE_FIELDS = frozenset(("birth_year", "cohort", "research_consent", "consent", "change",
                            "consent_seq"))


def _problem(body: dict[str, Any], policy: KeyPolicy) -> str | None:
    user, device = body.get("user_id"), body.get("device_id")
    if "metric" in body or "values" in body:
        if not isinstance(user, str) or not isinstance(device, str):
            return None  # the decoder names the missing field
        problem = policy.device_problem(user, device)
        return None if problem is None else reason_text(Reason.not_enrolled, "device_id",
                                                        problem)
    if "event_id" in body:
        if not isinstance(user, str):
            return None
        problem = policy.person_problem(user)
        return None if problem is None else reason_text(Reason.not_enrolled, "user_id", problem)
    if PROFILE_FIELDS & body.keys() and not policy.may_write_profiles():
        return reason_text(Reason.not_permitted, "record",
                           f"key {policy.key_id} may not write profiles or consent; they come "
                           "from a staff or enrolment key")
    return None


def screen_lines(lines: list[bytes], offsets: list[int], policy: KeyPolicy,
                 ) -> tuple[list[bytes], list[int], list[tuple[int, str, bytes]]]:
    """(lines kept, their offsets, refused as (offset, reason, raw)). Lines that are not
    JSON objects are kept: the decoder rejects them with its own reasons."""
    if policy.trusted or not policy.enforced:
        return lines, offsets, []
    kept, kept_offsets, refused = [], [], []
    for line, offset in zip(lines, offsets, strict=True):
        try:
            body = orjson.loads(line)
        except orjson.JSONDecodeError:
            body = None
        problem = _problem(body, policy) if isinstance(body, dict) else None
        if problem is None:
            kept.append(line)
            kept_offsets.append(offset)
        else:
            refused.append((offset, problem, line))
    return kept, kept_offsets, refused


def enrolment_resolver(policy: KeyPolicy, options: ImportOptions) -> Resolver:
    """An importer's person and device: --user/--device, else the person the device is
    enrolled to, else the format's own account id; refused if the key may not write it."""

    def resolve(source_user: str | None, device_id: str) -> tuple[str, str] | str:
        device = options.device_id or device_id
        user = options.user_id or policy.person_of(device) or source_user
        if user is None:
            return reason_text(Reason.missing_field, "user_id",
                               "this format names no person; pass --user or enrol the device")
        problem = policy.device_problem(user, device)
        if problem is not None:
            return reason_text(Reason.not_enrolled, "device_id", problem)
        return user, device
    return resolve
