"""The rules file: a TOML document validated into an immutable `Rules` model.

Errors name the exact key ("points.steps.tiers[1].steps_min: ...") so an operator
can fix the file without reading code. The version is a hash of the validated,
normalised rules, so reformatting or commenting a file never changes it.
"""

from __future__ import annotations

import hashlib
import tomllib
from datetime import date
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import orjson
from pydantic import Field, ValidationError, create_model, model_validator

from engine.errors import RulesError
from engine.rules.config_base import (
    STEPS_MIN_MAX,
    KeyedValueError,
    Name,
    Percent,
    Strict,
)
from engine.rules.flags import FLAG_BY_NAME, FLAGS, FlagConfig, lookback_days
from engine.schemas import ACTIVITY_KINDS

RULES_DEFAULT_PATH = Path(__file__).resolve().parent.parent.parent / "rules" / "default.toml"
VERSION_HEX_CHARS = 16
RULES_FILE_BYTES_MAX = 1_048_576
TIERS_MAX = 16
STREAK_LEVELS_MAX = 7
BANDS_MAX = 16
CAMPAIGNS_MAX = 256
CAMPAIGN_VENUES_MAX = 10_000
POINTS_MAX = 10_000

Points = Annotated[int, Field(ge=0, le=POINTS_MAX)]
_Strict = Strict


# ---------------------------------------------------------------------------- points


class StepTier(_Strict):
    steps_min: int = Field(ge=1, le=STEPS_MIN_MAX)
    points: Points


class AgeBand(_Strict):
    age_min: int = Field(ge=0, le=150)
    percent: Percent


class SexPercent(_Strict):
    F: Percent = 100
    M: Percent = 100
    X: Percent = 100


class StepTarget(_Strict):
    percent_default: Percent = 100
    bands: list[AgeBand] = Field(default_factory=list, max_length=BANDS_MAX)
    sex_percent: SexPercent = SexPercent()

    @model_validator(mode="after")
    def _bands_increase(self) -> StepTarget:
        for index in range(1, len(self.bands)):
            before, after = self.bands[index - 1].age_min, self.bands[index].age_min
            if after <= before:
                raise KeyedValueError(
                    f"bands[{index}].age_min",
                    f"must be greater than bands[{index - 1}] ({after} <= {before})")
        return self


class StepPoints(_Strict):
    tiers: list[StepTier] = Field(min_length=1, max_length=TIERS_MAX)
    points_per_day_max: int = Field(ge=0, le=POINTS_MAX)
    target: StepTarget = StepTarget()

    @model_validator(mode="after")
    def _tiers_increase(self) -> StepPoints:
        for index in range(1, len(self.tiers)):
            before, after = self.tiers[index - 1], self.tiers[index]
            if after.steps_min <= before.steps_min:
                raise KeyedValueError(
                    f"tiers[{index}].steps_min",
                    f"must be greater than tiers[{index - 1}] "
                    f"({after.steps_min} <= {before.steps_min})")
            if after.points < before.points:
                raise KeyedValueError(
                    f"tiers[{index}].points",
                    f"points are cumulative and must not decrease "
                    f"({after.points} < {before.points})")
        return self


class StreakLevel(_Strict):
    name: Name
    days_min: int = Field(ge=1, le=7)
    points: int = Field(ge=1, le=POINTS_MAX)


class Streak(_Strict):
    target_tier: int = Field(ge=1, le=TIERS_MAX)
    levels: list[StreakLevel] = Field(default_factory=list, max_length=STREAK_LEVELS_MAX)

    @model_validator(mode="after")
    def _levels_increase(self) -> Streak:
        for index in range(1, len(self.levels)):
            before, after = self.levels[index - 1].days_min, self.levels[index].days_min
            if after <= before:
                raise KeyedValueError(
                    f"levels[{index}].days_min",
                    f"must be greater than levels[{index - 1}] ({after} <= {before})")
        names = [level.name for level in self.levels]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise KeyedValueError(f"levels[{index}].name", f"duplicate name {name!r}")
        return self


class ActivityRule(_Strict):
    points: Points
    once_per: Literal["venue", "day"]


class Activities(_Strict):
    checkin: ActivityRule
    meal: ActivityRule
    brain_training: ActivityRule
    volunteer: ActivityRule
    class_: ActivityRule = Field(alias="class")

    def by_kind(self) -> tuple[ActivityRule, ...]:
        """Rules in engine.schemas.ACTIVITY_KINDS order (the int8 kind codes)."""
        return tuple(getattr(self, "class_" if kind == "class" else kind)
                     for kind in ACTIVITY_KINDS)


class PointsRules(_Strict):
    steps: StepPoints
    streak: Streak
    activities: Activities

    @model_validator(mode="after")
    def _target_tier_exists(self) -> PointsRules:
        if self.streak.target_tier > len(self.steps.tiers):
            raise KeyedValueError(
                "streak.target_tier",
                f"must name one of the {len(self.steps.tiers)} step tiers "
                f"({self.streak.target_tier} > {len(self.steps.tiers)})")
        return self


CAMPAIGN_TARGETS: tuple[str, ...] = ("steps", *ACTIVITY_KINDS)


class Campaign(_Strict):
    name: Name
    start: date
    end: date
    kind: Literal["multiplier", "bonus"]
    applies_to: list[Literal["steps", "checkin", "meal", "brain_training", "volunteer",
                             "class"]] = Field(min_length=1, max_length=len(CAMPAIGN_TARGETS))
    factor: float | None = Field(default=None, gt=1.0, le=100.0)
    points: int | None = Field(default=None, ge=1, le=POINTS_MAX)
    venues: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        default=None, min_length=1, max_length=CAMPAIGN_VENUES_MAX)

    @model_validator(mode="after")
    def _consistent(self) -> Campaign:
        if self.end < self.start:
            raise KeyedValueError("end", f"is before start ({self.end} < {self.start})")
        if len(set(self.applies_to)) != len(self.applies_to):
            raise KeyedValueError("applies_to", "lists a target twice")
        if self.kind == "multiplier":
            if self.factor is None:
                raise KeyedValueError("factor", "required for a multiplier campaign")
            if self.points is not None:
                raise KeyedValueError("points", "only for bonus campaigns (use factor)")
            if abs(self.factor * 100 - round(self.factor * 100)) > 1e-9:
                raise KeyedValueError("factor", f"at most 2 decimals ({self.factor})")
        else:
            if self.points is None:
                raise KeyedValueError("points", "required for a bonus campaign")
            if self.factor is not None:
                raise KeyedValueError("factor", "only for multiplier campaigns (use points)")
        return self

    @property
    def factor_percent(self) -> int:
        """The multiplier as an integer percent, so extras are exact integer math."""
        assert self.factor is not None
        return round(self.factor * 100)

    @property
    def start_day(self) -> int:
        return (self.start - date(1970, 1, 1)).days

    @property
    def end_day(self) -> int:
        return (self.end - date(1970, 1, 1)).days


# ----------------------------------------------------------------------------- flags


class FlagRulesBase(Strict):
    """[flags]: shared settings; one section per entry of engine.rules.flags.FLAGS."""

    settle_days: int = Field(default=2, ge=1, le=60)
    wear_steps_per_day_min: int = Field(default=100, ge=0, le=STEPS_MIN_MAX)

    if TYPE_CHECKING:
        def __getattr__(self, name: str) -> Any: ...

    def section(self, flag: str) -> FlagConfig:
        if flag not in FLAG_BY_NAME:
            raise KeyError(f"unknown flag {flag!r}")
        section: FlagConfig = getattr(self, flag)
        return section

    def severity_of(self, flag: str) -> int:
        return int(self.section(str(flag)).severity)

    def lookback_days(self) -> dict[str, int]:
        """Days before an evaluated day each enabled flag's windows read."""
        return lookback_days(self)


if TYPE_CHECKING:
    FlagRules = FlagRulesBase
else:
    FlagRules = create_model("FlagRules", __base__=FlagRulesBase,
                             **{spec.name: (spec.config, ...) for spec in FLAGS})


# ----------------------------------------------------------------------------- rules


class Leaving(_Strict):
    """The balance of a person who leaves the programme (docs/privacy.md): "expire" keeps it
    under the ordinary expiry (`genki ledger expire`); "settle" closes it at the moment of
    leaving with one `expire` entry (rule leaving.settle) the city can settle."""

    balance: Literal["expire", "settle"] = "expire"


class Rules(_Strict):
    """Validated rules. `version` hashes the normalised content, not the file text."""

    points: PointsRules
    campaigns: list[Campaign] = Field(default_factory=list, max_length=CAMPAIGNS_MAX)
    flags: FlagRules
    leaving: Leaving | None = None  # absent: "expire" (and the version of older files)

    @model_validator(mode="after")
    def _campaigns_consistent(self) -> Rules:
        names = [campaign.name for campaign in self.campaigns]
        activities = self.points.activities.by_kind()
        for index, campaign in enumerate(self.campaigns):
            if campaign.name in names[:index]:
                raise KeyedValueError(f"campaigns[{index}].name",
                                      f"duplicate campaign name {campaign.name!r}")
            if campaign.venues is None:
                continue
            for target in campaign.applies_to:
                if target == "steps" or activities[ACTIVITY_KINDS.index(target)].once_per != "venue":
                    raise KeyedValueError(
                        f"campaigns[{index}].venues",
                        f"venues apply only to activity kinds awarded once per venue, "
                        f"not {target!r}")
        return self

    def normalised(self) -> dict[str, Any]:
        dumped = self.model_dump(mode="json", by_alias=True)
        if self.leaving is None:
            del dumped["leaving"]
        return dumped

    def canonical_json(self) -> bytes:
        return orjson.dumps(self.normalised(), option=orjson.OPT_SORT_KEYS)

    @cached_property
    def version(self) -> str:
        """First 16 hex digits of SHA-256 over the canonical JSON of the rules."""
        return hashlib.sha256(self.canonical_json()).hexdigest()[:VERSION_HEX_CHARS]


def _key_path(location: tuple[int | str, ...]) -> str:
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


_REASONS = {
    "missing": "required key is missing",
    "extra_forbidden": "unknown key",
}


def _describe(error: Any) -> str:
    location = tuple(part for part in error["loc"]
                     if not (isinstance(part, str) and ("[" in part or part.startswith("function-"))))
    path = _key_path(location)
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, KeyedValueError):
        path = f"{path}.{cause.key}" if path else cause.key
        path = path.replace(".[", "[")
        reason = cause.reason
    else:
        reason = _REASONS.get(error["type"], error["msg"].replace("Input should be", "must be"))
        if error["type"] not in _REASONS and "input" in error and not isinstance(
                error["input"], dict | list):
            reason = f"{reason} (got {error['input']!r})"
    return f"{path or '(top level)'}: {reason}"


def parse_rules_data(data: dict[str, Any], source: str = "<rules>") -> Rules:
    try:
        return Rules.model_validate(data)
    except ValidationError as error:
        lines = [_describe(item) for item in error.errors(include_url=False)]
        raise RulesError(f"{source}: " + f"\n{source}: ".join(lines)) from None


def parse_rules(text: str, source: str = "<rules>") -> Rules:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RulesError(f"{source}: not valid TOML: {error}") from None
    return parse_rules_data(data, source)


def load_rules(path: str | Path | None = None) -> Rules:
    """Read and validate a rules file (default: rules/default.toml)."""
    path = Path(path) if path is not None else RULES_DEFAULT_PATH
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise RulesError(f"{path}: cannot read rules file: {error.strerror}") from None
    if len(raw) > RULES_FILE_BYTES_MAX:
        raise RulesError(f"{path}: rules file is {len(raw)} bytes, over the "
                         f"{RULES_FILE_BYTES_MAX}-byte limit")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RulesError(f"{path}: not UTF-8 text") from None
    return parse_rules(text, str(path))


def default_rules() -> Rules:
    return load_rules(RULES_DEFAULT_PATH)
