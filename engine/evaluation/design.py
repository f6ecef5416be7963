"""The evaluation design's defaults, shared by `genki evaluate` and the simulator's ground truth.

A fleet of D days is split into a baseline (the first min(28, D // 2) days), where
covariates are measured, and a treatment period (the rest), where attendance is
counted. By default a person is treated who attended on at least one day per
fortnight of the treatment period; care-need onset is counted up to three years
after the treatment period ends (Hachioji's plan compares care need after 3 years).
"""

from __future__ import annotations

BASELINE_DAYS_MAX = 28
TREATMENT_DAYS_PER_ATTENDANCE = 14
FOLLOWUP_DAYS_DEFAULT = 3 * 365
AGE_YEARS_MIN_DEFAULT = 65
AGE_BAND_YEARS = 5
AGE_BAND_TOP_YEARS = 85  # 85 and older form one band (few people)
TREATMENT_KIND_DEFAULT = "class"


def baseline_days_default(days_total: int) -> int:
    assert days_total >= 2, days_total
    return min(BASELINE_DAYS_MAX, days_total // 2)


def attendances_min_default(treatment_days: int) -> int:
    assert treatment_days >= 1, treatment_days
    return max(1, treatment_days // TREATMENT_DAYS_PER_ATTENDANCE)


def age_band(age_years: int) -> str:
    if age_years >= AGE_BAND_TOP_YEARS:
        return f"{AGE_BAND_TOP_YEARS}+"
    low = age_years // AGE_BAND_YEARS * AGE_BAND_YEARS
    return f"{low}-{low + AGE_BAND_YEARS - 1}"
