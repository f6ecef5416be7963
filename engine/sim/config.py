"""What a simulated fleet looks like: sizes, period, seed and fault rates."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass

from engine.clock import iso_to_day
from engine.errors import UsageError

PARTICIPANTS_DEFAULT = 1_500
APP_USERS_DEFAULT = 12_000
DAYS_DEFAULT = 28
SEED_DEFAULT = 7
START_DEFAULT = "2026-09-01"
VENUES_DEFAULT = 50
SHOPS_DEFAULT = 50
BAD_FRACTION_DEFAULT = 0.001
DUPLICATE_FRACTION_DEFAULT = 0.01
RESYNC_FRACTION_DEFAULT = 0.03
LATE_FRACTION_DEFAULT = 0.02
DECLINE_FRACTION_DEFAULT = 0.08

USERS_PER_COHORT_MAX = 99_999  # ids are W00001..W99999 / A00001..A99999
VENUES_MAX = 999
SHOPS_MAX = 999
DAYS_MAX = 366
FRACTION_MAX = 0.5


@dataclass(frozen=True)
class SimConfig:
    participants: int = PARTICIPANTS_DEFAULT
    app_users: int = APP_USERS_DEFAULT
    days: int = DAYS_DEFAULT
    seed: int = SEED_DEFAULT
    start: str = START_DEFAULT
    venues: int = VENUES_DEFAULT
    shops: int = SHOPS_DEFAULT
    bad_fraction: float = BAD_FRACTION_DEFAULT
    duplicate_fraction: float = DUPLICATE_FRACTION_DEFAULT
    resync_fraction: float = RESYNC_FRACTION_DEFAULT
    late_fraction: float = LATE_FRACTION_DEFAULT
    decline_fraction: float = DECLINE_FRACTION_DEFAULT

    def __post_init__(self) -> None:
        _check_int("participants", self.participants, 0, USERS_PER_COHORT_MAX)
        _check_int("app_users", self.app_users, 0, USERS_PER_COHORT_MAX)
        if self.participants + self.app_users < 1:
            raise UsageError("simulate: need at least one participant or app user")
        _check_int("days", self.days, 1, DAYS_MAX)
        _check_int("venues", self.venues, 1, VENUES_MAX)
        _check_int("shops", self.shops, 1, SHOPS_MAX)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        try:
            iso_to_day(self.start)
        except ValueError as error:
            raise UsageError(f"simulate: --start {error}") from None
        if dt.date.fromisoformat(self.start).year < 2021:
            raise UsageError(f"simulate: --start {self.start} is before 2021 (timestamps "
                             "must stay after 2020-01-01 even for the too-late faults)")
        for name in ("bad_fraction", "duplicate_fraction", "resync_fraction", "late_fraction",
                     "decline_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= FRACTION_MAX:
                raise UsageError(f"simulate: {name} {value} outside [0, {FRACTION_MAX}]")

    @property
    def start_day(self) -> int:
        """Tokyo day number of the first simulated day."""
        return iso_to_day(self.start)

    @property
    def start_year(self) -> int:
        return dt.date.fromisoformat(self.start).year

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"simulate: {name} {value!r} outside [{low}, {high}]")
