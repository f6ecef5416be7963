"""Dead-letter reason codes. A dead letter's reason is "<code>: <field>: <detail>"."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    invalid_json = "invalid_json"          # the line is not JSON
    oversized = "oversized"                # record larger than RECORD_BYTES_MAX
    not_an_object = "not_an_object"        # JSON, but not an object
    unknown_type = "unknown_type"          # cannot tell which wire record it is
    bad_version = "bad_version"            # "v" is not 1
    missing_field = "missing_field"        # a required field is absent
    bad_field = "bad_field"                # wrong type or format of a field
    unknown_metric = "unknown_metric"      # metric not in engine.schemas.METRICS
    unit_mismatch = "unit_mismatch"        # unit is not the metric's unit
    length_mismatch = "length_mismatch"    # ts_ms and values differ in length
    too_many_samples = "too_many_samples"  # more than SAMPLES_PER_RECORD_MAX
    out_of_range = "out_of_range"          # physically impossible value
    future_timestamp = "future_timestamp"  # beyond now + skew allowance
    too_old_timestamp = "too_old_timestamp"  # before TS_MS_MIN
    segment_too_long = "segment_too_long"  # spans more than SEGMENT_SPAN_MS_MAX
    too_late = "too_late"                  # older than the late-data window
    conflict = "conflict"                  # same event id, different content
    unauthenticated = "unauthenticated"    # a point-moving record without a valid authenticator
    capacity = "capacity"                  # a fixed capacity of the store is exhausted
    # Importers and the HTTP gateway (engine.importers, engine.api.gateway):
    invalid_source = "invalid_source"      # an import source that is not its format at all
    unsupported_type = "unsupported_type"  # a vendor record type genki has no metric for
    overlapping_interval = "overlapping_interval"  # an amount over an interval already counted
    not_enrolled = "not_enrolled"          # (person, device) not enrolled for the submitting key
    not_permitted = "not_permitted"        # profiles/consent from a key that may not write them


# Reasons that come from who sent a record, a vendor format or a store's capacity,
# not from the bytes of a wire record: the simulator's injected faults cover all
# the others (tests/test_sim.py checks that).
CONTEXT_REASONS: frozenset[Reason] = frozenset({
    Reason.unauthenticated, Reason.capacity, Reason.invalid_source, Reason.unsupported_type,
    Reason.overlapping_interval, Reason.not_enrolled, Reason.not_permitted,
})
WIRE_RECORD_REASONS: frozenset[Reason] = frozenset(Reason) - CONTEXT_REASONS


def reason_text(code: Reason, field: str, detail: str) -> str:
    return f"{code.value}: {field}: {detail}"


def reason_code(text: str) -> str:
    return text.split(":", 1)[0]
