"""Building blocks of the rules model shared by engine.rules.config and the flag registry.

Kept free of engine imports so the flag registry (engine.rules.flags), which
engine.schemas reads for the flag names, can use them without an import cycle.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

WINDOW_DAYS_MAX = 400
STEPS_MIN_MAX = 1_000_000
PERCENT_MAX = 1_000
HOLD_DAYS_MAX = 90

ActivityKindName = Literal["checkin", "meal", "brain_training", "volunteer", "class"]
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,47}$")]
Severity = Annotated[int, Field(ge=1, le=100)]
WindowDays = Annotated[int, Field(ge=1, le=WINDOW_DAYS_MAX)]
HoldDays = Annotated[int, Field(ge=1, le=HOLD_DAYS_MAX)]
CountMin = Annotated[int, Field(ge=1, le=100_000)]
Percent = Annotated[int, Field(ge=1, le=PERCENT_MAX)]


class KeyedValueError(ValueError):
    """A cross-field error that knows which key below the validated model is wrong."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
