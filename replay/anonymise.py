"""What makes an export hard to re-identify: coarse times, k-anonymous quasi-identifiers.

Pure functions over columns. The policy is configuration (CLI flags of `genki
replay`); what was generalised or suppressed goes into the export's manifest so
a researcher knows what the numbers mean and a reviewer can check the promise.

* Timestamps are floored to a unit (Tokyo calendar for days): samples to the
  minute, activities and ledger entries to the day by default.
* Quasi-identifiers of people (birth year, sex, cohort) are checked for
  k-anonymity: birth years are generalised to bands (5 years, widened while that
  leaves fewer people in classes smaller than k), and people still in a class
  smaller than k lose all three (suppressed: null).
* Venues are quasi-identifiers of the activity rows: a venue visited by fewer
  than k exported people is suppressed (null) in every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.clock import DAY_MS, TOKYO_OFFSET_MS
from engine.errors import UsageError

K_DEFAULT = 5
K_MAX = 1_000
BIRTH_YEAR_BAND_YEARS_DEFAULT = 5
BIRTH_YEAR_BAND_YEARS_MAX = 20
TIME_UNIT_MS: dict[str, int] = {"ms": 1, "second": 1_000, "minute": 60_000,
                                "hour": 3_600_000, "day": DAY_MS}
QUASI_IDENTIFIERS = ("birth_year", "sex", "cohort", "venue")


@dataclass(frozen=True)
class ExportPolicy:
    k: int = K_DEFAULT
    samples_time: str = "minute"
    activities_time: str = "day"
    ledger_time: str = "day"
    birth_year_band_years: int = BIRTH_YEAR_BAND_YEARS_DEFAULT

    def __post_init__(self) -> None:
        if not 1 <= self.k <= K_MAX:
            raise UsageError(f"replay: --k must be 1..{K_MAX}, got {self.k}")
        for name in ("samples_time", "activities_time", "ledger_time"):
            if getattr(self, name) not in TIME_UNIT_MS:
                raise UsageError(f"replay: {name.replace('_', '-')} must be one of "
                                 f"{', '.join(TIME_UNIT_MS)}, got {getattr(self, name)!r}")
        if not 1 <= self.birth_year_band_years <= BIRTH_YEAR_BAND_YEARS_MAX:
            raise UsageError("replay: the birth-year band must be 1.."
                             f"{BIRTH_YEAR_BAND_YEARS_MAX} years")


@dataclass
class AnonymityReport:
    """The k-anonymity part of the manifest."""

    k: int
    quasi_identifiers: tuple[str, ...] = QUASI_IDENTIFIERS
    time_units: dict[str, str] = field(default_factory=dict)
    birth_year_band_years: int = 0
    people: int = 0
    people_classes: int = 0
    people_smallest_class: int = 0
    people_suppressed: int = 0
    venues: int = 0
    venues_suppressed: int = 0
    activity_rows_venue_suppressed: int = 0

    def as_dict(self) -> dict[str, Any]:
        result = dict(self.__dict__)
        result["quasi_identifiers"] = list(self.quasi_identifiers)
        return result


def coarsen(ts_ms: np.ndarray, unit: str) -> np.ndarray:
    """Floor UTC epoch ms to the unit, days and hours on the Tokyo clock."""
    step = TIME_UNIT_MS[unit]
    if step == 1:
        return ts_ms
    local = ts_ms.astype(np.int64) + TOKYO_OFFSET_MS
    return local - local % step - TOKYO_OFFSET_MS


@dataclass
class GeneralisedPeople:
    """Per person (input order): birth-year band start, sex, cohort; None where suppressed."""

    band_start: list[int | None]
    sex: list[str | None]
    cohort: list[str | None]


def generalise_people(birth_year: np.ndarray, sex: list[str], cohort: list[str],
                      policy: ExportPolicy, report: AnonymityReport) -> GeneralisedPeople:
    """Bands wide enough that few people sit in classes under k; suppress those who still do."""
    n = len(birth_year)
    years = np.asarray(birth_year, np.int64)
    codes = np.unique(np.array([f"{s}\x1f{c}" for s, c in zip(sex, cohort, strict=True)],
                               dtype=object), return_inverse=True)[1] if n else np.zeros(0, int)
    best: tuple[int, int, np.ndarray, np.ndarray] | None = None
    width = policy.birth_year_band_years
    while True:
        band = years // width * width
        key = band * 1_000 + codes
        _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        small = counts[inverse] < policy.k if n else np.zeros(0, bool)
        if best is None or int(small.sum()) < best[0]:
            best = (int(small.sum()), width, band, small)
        if not small.any() or width * 2 > BIRTH_YEAR_BAND_YEARS_MAX:
            break
        width *= 2
    suppressed_count, width, band, small = best
    report.birth_year_band_years = width
    report.people = n
    report.people_suppressed = suppressed_count
    kept = ~small
    if kept.any():
        _, counts = np.unique((band * 1_000 + codes)[kept], return_counts=True)
        report.people_classes = len(counts)
        report.people_smallest_class = int(counts.min())
    rows = kept.tolist()
    return GeneralisedPeople(
        [int(b) if keep else None for b, keep in zip(band.tolist(), rows, strict=True)],
        [s if keep else None for s, keep in zip(sex, rows, strict=True)],
        [c if keep else None for c, keep in zip(cohort, rows, strict=True)])
