"""Wire records: the JSON bodies on every topic, validated at the edge.

The pydantic models are the contract (and generate `schemas/*.json`). The hot
path for sample segments validates whole batches with numpy in
`engine.ingest.decode`, which must agree with these models; a test checks it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Literal, TypeGuard

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.rules.flags import FLAG_NAMES

WIRE_VERSION = 1
RECORD_BYTES_MAX = 1_048_576
SAMPLES_PER_RECORD_MAX = 20_000
SEGMENT_SPAN_MS_MAX = 7 * 86_400_000
ID_CHARS_MAX = 64
# Earliest accepted timestamp (2020-01-01T00:00:00Z): keys pack ts relative to it.
TS_MS_MIN = 1_577_836_800_000
POINTS_PER_ENTRY_MAX = 1_000_000

# The one definition of an id (user, device, upload, shop, venue, ...): 1-64 of these.
ID_CHAR_CLASS = r"[A-Za-z0-9_.:\-]"
ID_PATTERN = re.compile(rf"{ID_CHAR_CLASS}{{1,{ID_CHARS_MAX}}}")


def is_id(value: object) -> TypeGuard[str]:
    """True for a str that is a whole id (fullmatch: no trailing newline slips through)."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


IdText = Annotated[str, Field(min_length=1, max_length=ID_CHARS_MAX,
                              pattern=rf"^{ID_CHAR_CLASS}+$")]
IsoDate = Annotated[str, Field(pattern=r"^\d{4}-\d{2}-\d{2}$")]


@dataclass(frozen=True)
class MetricSpec:
    code: int
    name: str
    unit: str
    loinc: str | None
    omh: str
    value_min: float
    value_max: float
    description: str


# One table: metric → unit, LOINC code (or Open mHealth name where none fits),
# physically possible range. Codes are stable small ints used in columns.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(0, "steps", "count", "55423-8", "step-count", 0, 50_000,
               "steps counted in the interval ending at ts_ms"),
    MetricSpec(1, "heart_rate", "bpm", "8867-4", "heart-rate", 20, 250, "heart rate"),
    MetricSpec(2, "resting_heart_rate", "bpm", "40443-4", "heart-rate", 20, 200,
               "resting heart rate, one per day"),
    MetricSpec(3, "spo2", "%", "59408-5", "oxygen-saturation", 50, 100,
               "oxygen saturation by pulse oximetry"),
    MetricSpec(4, "sleep", "min", "93832-4", "sleep-duration", 0, 1440,
               "minutes asleep in the interval"),
    MetricSpec(5, "gait_speed", "m/s", None, "walking-speed", 0.05, 3.0,
               "usual gait speed (no LOINC code for wearable gait speed)"),
    MetricSpec(6, "body_weight", "kg", "29463-7", "body-weight", 20, 300, "body weight"),
    MetricSpec(7, "systolic_bp", "mmHg", "8480-6", "systolic-blood-pressure", 50, 260,
               "systolic blood pressure"),
    MetricSpec(8, "diastolic_bp", "mmHg", "8462-4", "diastolic-blood-pressure", 30, 160,
               "diastolic blood pressure"),
    MetricSpec(9, "conversation", "min", None, "conversation-duration", 0, 1440,
               "minutes of detected conversation in the interval"),
    MetricSpec(10, "meal_intake", "fraction", None, "meal-intake", 0, 1,
               "fraction of a served meal eaten"),
)
METRIC_BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS}
METRIC_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS)


class Metric(StrEnum):
    steps = "steps"
    heart_rate = "heart_rate"
    resting_heart_rate = "resting_heart_rate"
    spo2 = "spo2"
    sleep = "sleep"
    gait_speed = "gait_speed"
    body_weight = "body_weight"
    systolic_bp = "systolic_bp"
    diastolic_bp = "diastolic_bp"
    conversation = "conversation"
    meal_intake = "meal_intake"


class ActivityKind(StrEnum):
    checkin = "checkin"
    meal = "meal"
    brain_training = "brain_training"
    volunteer = "volunteer"
    class_ = "class"


ACTIVITY_KINDS: tuple[str, ...] = tuple(k.value for k in ActivityKind)


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleSegment(Wire):
    """A segment of many samples of one metric from one device (one watch sync)."""

    v: Literal[1]
    upload_id: IdText
    user_id: IdText
    device_id: IdText
    metric: Metric
    unit: str
    ts_ms: list[Annotated[int, Field(ge=TS_MS_MIN)]] = Field(
        min_length=1, max_length=SAMPLES_PER_RECORD_MAX)
    values: list[float] = Field(min_length=1, max_length=SAMPLES_PER_RECORD_MAX)

    @model_validator(mode="after")
    def _consistent(self) -> SampleSegment:
        spec = METRIC_BY_NAME[self.metric.value]
        if self.unit != spec.unit:
            raise ValueError(f"unit: {self.unit!r} is not the unit of {spec.name} "
                             f"(expects {spec.unit!r})")
        if len(self.values) != len(self.ts_ms):
            raise ValueError(f"values: length {len(self.values)} != ts_ms length "
                             f"{len(self.ts_ms)}")
        for index, value in enumerate(self.values):
            if not spec.value_min <= value <= spec.value_max:
                raise ValueError(f"values[{index}]: {spec.name} {value} outside "
                                 f"[{spec.value_min}, {spec.value_max}] {spec.unit}")
        if max(self.ts_ms) - min(self.ts_ms) > SEGMENT_SPAN_MS_MAX:
            raise ValueError("ts_ms: segment spans more than 7 days")
        return self


class ActivityEvent(Wire):
    """A check-in, meal log, brain-training session, volunteering or class."""

    v: Literal[1]
    event_id: IdText
    user_id: IdText
    kind: ActivityKind
    ts_ms: int = Field(ge=TS_MS_MIN)
    venue_id: IdText | None = None
    source: Annotated[str, Field(min_length=1, max_length=ID_CHARS_MAX)]


class Sex(StrEnum):
    female = "F"
    male = "M"
    other = "X"


class Cohort(StrEnum):
    watch_trial = "watch_trial"
    app = "app"


CONSENT_SEQ_MAX = 2**53 - 1
EFFECTIVE_TS_MS_MAX = 4_102_444_800_000  # 2100-01-01T00:00:00Z


class Profile(Wire):
    """Latest profile per user (compacted topic).

    `research_consent` is read as a consent event (engine.consent): effective
    at `updated_ts_ms` with order `consent_seq` when both are given, otherwise
    at the start of `enrolled_on` with order 0, so a profile re-sent later can
    never re-grant consent that a newer event withdrew.
    """

    v: Literal[1]
    user_id: IdText
    birth_year: int = Field(ge=1900, le=2030)
    sex: Sex
    cohort: Cohort
    enrolled_on: IsoDate
    research_consent: bool
    updated_ts_ms: int | None = Field(default=None, ge=TS_MS_MIN, le=EFFECTIVE_TS_MS_MAX)
    consent_seq: int | None = Field(default=None, ge=1, le=CONSENT_SEQ_MAX)

    @model_validator(mode="after")
    def _timed_together(self) -> Profile:
        if (self.updated_ts_ms is None) != (self.consent_seq is None):
            raise ValueError("consent_seq: updated_ts_ms and consent_seq come together")
        return self


class ConsentChange(StrEnum):
    consent_given = "research_consent_given"
    consent_withdrawn = "research_consent_withdrawn"
    enrolled = "enrolled"
    left = "left"


class ConsentEvent(Wire):
    """A change of research consent or programme membership, effective at a time.

    `consent_seq` orders one person's changes (issued increasing by the system of
    record, e.g. the citizen app backend); (user_id, consent_seq) identifies the
    event, so a re-send is a duplicate. Of the events effective at or before a
    moment, the newest decision (greatest consent_seq) decides (engine.consent).
    """

    v: Literal[1]
    user_id: IdText
    change: ConsentChange
    effective_ts_ms: int = Field(ge=TS_MS_MIN, le=EFFECTIVE_TS_MS_MAX)
    consent_seq: int = Field(ge=1, le=CONSENT_SEQ_MAX)
    source: Annotated[str, Field(min_length=1, max_length=ID_CHARS_MAX)]


class RedemptionKind(StrEnum):
    redeem = "redeem"
    refund = "refund"


class RecordAuth(Wire):
    """An authenticator from the API service (engine.kafka.authn): key id + HMAC-SHA256."""

    kid: Annotated[str, Field(min_length=1, max_length=64)]
    mac: Annotated[str, Field(min_length=43, max_length=43, pattern=r"^[A-Za-z0-9_-]+$")]


class Redemption(Wire):
    """A shop terminal's redemption (or refund) request."""

    v: Literal[1]
    idempotency_key: Annotated[str, Field(min_length=1, max_length=128)]
    shop_id: IdText
    terminal_id: IdText
    user_id: IdText
    points: int = Field(gt=0, le=POINTS_PER_ENTRY_MAX)
    ts_ms: int = Field(ge=TS_MS_MIN)
    kind: RedemptionKind
    refund_of: str | None = None
    # Set by the HTTP API: a digest of the shop's request (same key + another request is
    # refused by the ledger) and the programme's daily redemption limit per person.
    request: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    points_per_day_max: int | None = Field(default=None, gt=0)
    # Set by the API in Kafka mode; workers refuse records without a valid one.
    auth: RecordAuth | None = None

    @model_validator(mode="after")
    def _refund_names_its_redemption(self) -> Redemption:
        if (self.kind == RedemptionKind.refund) != (self.refund_of is not None):
            raise ValueError("refund_of: required for refunds and only for refunds")
        return self


class EntryKind(StrEnum):
    award = "award"
    redeem = "redeem"
    refund = "refund"
    expire = "expire"
    adjust = "adjust"


class LedgerEntry(Wire):
    """One journal entry. points is signed: balance = sum(points) per user."""

    seq: int = Field(ge=1)
    entry_id: str
    user_id: IdText
    kind: EntryKind
    points: int
    day: IsoDate | None
    ts_ms: int
    rule: str | None
    ref: str | None
    rules_version: str | None
    prev_hash: str
    hash: str


if TYPE_CHECKING:
    class FlagName(StrEnum):
        """Names of the frailty-risk flags (engine.rules.flags.FLAGS)."""
else:
    FlagName = StrEnum("FlagName", [(name, name) for name in FLAG_NAMES])


class FlagState(StrEnum):
    raised = "raised"
    cleared = "cleared"


class FlagEvent(Wire):
    """A frailty-risk flag changing state, with the numbers that made it change."""

    v: Literal[1]
    flag_id: str
    user_id: IdText
    flag: FlagName
    state: FlagState
    day: IsoDate
    evidence: dict[str, float | int | str]
    rules_version: str


class DeadLetter(Wire):
    """A rejected input, kept whole (base64) with the reason it was rejected."""

    v: Literal[1]
    source: str
    partition: int | None
    offset: int | None
    reason: str
    raw_b64: str


WIRE_MODELS: dict[str, type[Wire]] = {
    "sample_segment": SampleSegment,
    "activity_event": ActivityEvent,
    "profile": Profile,
    "consent_event": ConsentEvent,
    "redemption": Redemption,
    "ledger_entry": LedgerEntry,
    "flag_event": FlagEvent,
    "dead_letter": DeadLetter,
}

TOPICS: dict[str, str] = {
    "genki.samples": "sample_segment",
    "genki.activities": "activity_event",
    "genki.profiles": "profile",
    "genki.consent": "consent_event",
    "genki.redemptions": "redemption",
    "genki.ledger": "ledger_entry",
    "genki.flags": "flag_event",
    "genki.dlq": "dead_letter",
}
