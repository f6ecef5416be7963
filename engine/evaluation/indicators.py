"""`genki indicators`: the Tokyo plan's participation indicator and the programme's vital signs.

Population: research-consenting people only (as everywhere in evaluation).

* Participation (通いの場, "share of people taking part at least once a week"):
  among consenting people aged age_min+ in the month's year (year - birth_year)
  and enrolled by the month's last day, the share who attended a community
  venue (any activity record with a venue) at least once in every Monday–Sunday
  week whose Monday falls in the month and that lies wholly within the data's
  days ("weekly"; null when the month has no such week), and at least once in
  the month ("monthly"); overall and per venue kind (from a venues file, else the
  activity kind: checkin, class, volunteer).
* Programme: per month, points awarded, points redeemed and refunded and the
  number of redemptions (consenting people of any age), and frailty status: how
  many of the consenting people enrolled by the month's end have at least one
  flag raised at its end, with flags raised and cleared during the month.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from engine.clock import MONDAY_DAY, WEEK_DAYS, day_to_iso, iso_to_day
from engine.evaluation import design
from engine.evaluation.programme import ProgrammeData, load_programme, raised_flags_on

SHARE_DECIMALS = 6


def month_bounds(month: str) -> tuple[int, int]:
    first = dt.date.fromisoformat(month + "-01")
    following = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return iso_to_day(first.isoformat()), iso_to_day(following.isoformat()) - 1


def months_between(first_day: int, last_day: int) -> list[str]:
    months, day = [], first_day
    while day <= last_day:
        month = day_to_iso(day)[:7]
        months.append(month)
        day = month_bounds(month)[1] + 1
    return months


def weeks_of_month(first: int, last: int, data: tuple[int, int]) -> list[int]:
    """Mondays (day numbers) of the weeks whose Monday falls within [first, last] and that lie
    wholly within the data's days (a week cut off by the data's start or end is not judged)."""
    offset = (MONDAY_DAY - first) % WEEK_DAYS
    return [monday for monday in range(first + offset, last + 1, WEEK_DAYS)
            if monday >= data[0] and monday + WEEK_DAYS - 1 <= data[1]]


def _share(count: int | None, people: int) -> float | None:
    if count is None:
        return None
    return round(count / people, SHARE_DECIMALS) if people else 0.0


def _attenders(person: np.ndarray, day: np.ndarray, n: int, month: tuple[int, int],
               weeks: list[int], eligible: np.ndarray) -> tuple[int | None, int]:
    """(weekly, monthly) attenders among eligible people; weekly is None without a whole week."""
    inside = (day >= month[0]) & (day <= month[1])
    monthly = np.zeros(n, dtype=bool)
    monthly[person[inside]] = True
    weekly = np.ones(n, dtype=bool)
    for monday in weeks:
        in_week = np.zeros(n, dtype=bool)
        in_week[person[(day >= monday) & (day < monday + WEEK_DAYS)]] = True
        weekly &= in_week
    weekly_count = int((weekly & eligible).sum()) if weeks else None
    return weekly_count, int((monthly & eligible).sum())


def compute_indicators(data_dir: Path, *, venue_kinds: dict[str, str] | None = None,
                       age_min: int = design.AGE_YEARS_MIN_DEFAULT) -> dict[str, object]:
    data = load_programme(data_dir, with_steps=False)
    return indicators_of(data, venue_kinds=venue_kinds, age_min=age_min)


def _data_extent(data: ProgrammeData) -> tuple[int, int] | None:
    days = np.concatenate([data.act_day, data.entry_day, data.flag_day])
    return (int(days.min()), int(days.max())) if len(days) else None


def indicators_of(data: ProgrammeData, *, venue_kinds: dict[str, str] | None = None,
                  age_min: int = design.AGE_YEARS_MIN_DEFAULT) -> dict[str, object]:
    at_venue = data.act_venue != ""
    person, day = data.act_person[at_venue], data.act_day[at_venue]
    if venue_kinds is not None:
        kind = np.array([venue_kinds.get(str(v), "unknown") for v in data.act_venue[at_venue]],
                        dtype=object)
    else:
        kind = data.act_kind[at_venue]
    kinds = sorted({str(k) for k in kind})
    extent = _data_extent(data)
    rows = []
    for month in (months_between(*extent) if extent else []):
        assert extent is not None
        first, last = month_bounds(month)
        weeks = weeks_of_month(first, last, extent)
        year = int(month[:4])
        enrolled = data.enrolled_day <= last
        eligible = enrolled & (year - data.birth_year >= age_min)
        people = int(eligible.sum())
        weekly, monthly = _attenders(person, day, data.n, (first, last), weeks, eligible)
        by_kind = {}
        for name in kinds:
            pick = kind == name
            k_weekly, k_monthly = _attenders(person[pick], day[pick], data.n, (first, last),
                                             weeks, eligible)
            by_kind[name] = {"weekly": k_weekly, "weekly_share": _share(k_weekly, people),
                             "monthly": k_monthly, "monthly_share": _share(k_monthly, people)}
        rows.append({"month": month, "people": people, "weeks_judged": len(weeks),
                     "weekly": weekly,
                     "weekly_share": _share(weekly, people), "monthly": monthly,
                     "monthly_share": _share(monthly, people), "by_venue_kind": by_kind,
                     **_programme_month(data, first, last, enrolled)})
    return {"population": f"Research-consenting people; participation among those aged "
                          f"{age_min}+ (year minus birth year) enrolled by the month's end",
            "age_min": age_min, "people_consenting": data.n,
            "people_left_out_no_consent": data.people_left_out_no_consent,
            "venue_kinds_from": "venues file" if venue_kinds is not None else "activity kind",
            "months": rows}


def _programme_month(data: ProgrammeData, first: int, last: int,
                     enrolled: np.ndarray) -> dict[str, object]:
    inside = (data.entry_day >= first) & (data.entry_day <= last)
    kinds, points = data.entry_kind[inside], data.entry_points[inside]
    flags_inside = (data.flag_day >= first) & (data.flag_day <= last)
    flagged = (raised_flags_on(data, last) > 0) & enrolled
    members = int(enrolled.sum())
    return {
        "points_awarded": int(points[kinds == "award"].sum()),
        "points_redeemed": int(-points[kinds == "redeem"].sum()),
        "points_refunded": int(points[kinds == "refund"].sum()),
        "redemptions": int((kinds == "redeem").sum()),
        "members": members,
        "people_flagged": int(flagged.sum()),
        "people_flagged_share": _share(int(flagged.sum()), members),
        "flags_raised": int((data.flag_raised[flags_inside]).sum()),
        "flags_cleared": int((~data.flag_raised[flags_inside]).sum())}


def format_indicators(result: dict[str, object]) -> str:
    lines = [f"{'month':<8} {'65+':>6} {'weekly':>8} {'monthly':>8} {'points':>10} "
             f"{'redeemed':>9} {'flagged':>8}".replace("65+", f"{result['age_min']}+")]
    for row in result["months"]:  # type: ignore[attr-defined]
        weekly = "-" if row["weekly_share"] is None else f"{row['weekly_share']:.1%}"
        lines.append(f"{row['month']:<8} {row['people']:>6,} {weekly:>8} "
                     f"{row['monthly_share']:>8.1%} {row['points_awarded']:>10,} "
                     f"{row['points_redeemed']:>9,} {row['people_flagged']:>8,}")
    return "\n".join(lines)
