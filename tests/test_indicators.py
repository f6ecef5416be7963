"""The Tokyo plan's participation indicator and the programme's monthly figures, exact values."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import orjson
import pytest

from engine.clock import day_start_ms, iso_to_day
from engine.evaluation.indicators import indicators_of, weeks_of_month
from engine.evaluation.programme import ProgrammeData
from engine.ingest.log import EmbeddedLog
from tests.conftest import genki_cmd

NOW_MS = day_start_ms(iso_to_day("2026-12-01"))
HOUR_MS = 3_600_000
SEPT_MONDAYS = ("2026-09-07", "2026-09-14", "2026-09-21", "2026-09-28")
OCT_MONDAYS = ("2026-10-05", "2026-10-12", "2026-10-19")
# (user, birth year, enrolled on, research consent)
PEOPLE = (
    ("P1", 1950, "2025-01-01", True),   # 76: at the salon every Monday
    ("P2", 1955, "2025-01-01", True),   # 71: two classes in September only
    ("P3", 1970, "2025-01-01", True),   # 56: every week, but under 65
    ("P4", 1948, "2025-01-01", False),  # no research consent: never counted
    ("P5", 1958, "2026-10-15", True),   # 68: enrolled mid-October, volunteers once
    ("P6", 1960, "2025-01-01", True),   # 66: logs meals only (no venue)
)
VISITS = (  # (user, kind, venue, day)
    *(("P1", "checkin", "V1", d) for d in SEPT_MONDAYS + OCT_MONDAYS),
    ("P2", "class", "V2", "2026-09-02"), ("P2", "class", "V2", "2026-09-09"),
    ("P2", "class", "V2", "2026-09-09"),  # twice the same day counts once
    *(("P3", "checkin", "V1", d) for d in ("2026-09-01", *SEPT_MONDAYS, *OCT_MONDAYS,
                                           "2026-10-31")),
    *(("P4", "checkin", "V1", d) for d in SEPT_MONDAYS + OCT_MONDAYS + ("2026-11-30",)),
    ("P5", "volunteer", "V3", "2026-10-20"),
    ("P6", "meal", None, "2026-09-10"),
)
VENUE_KINDS = {"V1": "community_salon", "V2": "exercise_class", "V3": "volunteering_centre"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("indicators")
    lines = [orjson.dumps({"v": 1, "user_id": u, "birth_year": by, "sex": "F", "cohort": "app",
                           "enrolled_on": en, "research_consent": rc})
             for u, by, en, rc in PEOPLE]
    for i, (user, kind, venue, day) in enumerate(VISITS):
        body = {"v": 1, "event_id": f"E{i:04d}", "user_id": user, "kind": kind,
                "ts_ms": day_start_ms(iso_to_day(day)) + (10 + i % 5) * HOUR_MS,
                "source": "test"}
        if venue:
            body["venue_id"] = venue
        lines.append(orjson.dumps(body))
    with EmbeddedLog.open(path) as log:
        counts = log.ingest_lines(lines, "test", 0, NOW_MS)
    assert counts.rejected == 0
    return path


def _indicators(data_dir: Path, *extra: str) -> dict:
    result = subprocess.run(genki_cmd("indicators", "--json", "--data-dir", str(data_dir), *extra),
                            capture_output=True, check=True)
    return orjson.loads(result.stdout)


def test_weeks_judged_are_whole_weeks_with_their_monday_in_the_month() -> None:
    data = (iso_to_day("2026-09-01"), iso_to_day("2026-10-31"))
    sept = weeks_of_month(iso_to_day("2026-09-01"), iso_to_day("2026-09-30"), data)
    octo = weeks_of_month(iso_to_day("2026-10-01"), iso_to_day("2026-10-31"), data)
    assert sept == [iso_to_day(d) for d in SEPT_MONDAYS]
    assert octo == [iso_to_day(d) for d in OCT_MONDAYS]  # the week of Oct 26 ends after the data


def test_participation_shares_by_month_exact(data_dir: Path) -> None:
    result = _indicators(data_dir)
    assert result["people_consenting"] == 5
    assert result["people_left_out_no_consent"] == 1
    sept, octo = result["months"]
    assert (sept["month"], sept["people"], sept["weeks_judged"]) == ("2026-09", 3, 4)
    assert (sept["weekly"], sept["weekly_share"]) == (1, round(1 / 3, 6))
    assert (sept["monthly"], sept["monthly_share"]) == (2, round(2 / 3, 6))
    assert (octo["month"], octo["people"], octo["weeks_judged"]) == ("2026-10", 4, 3)
    assert (octo["weekly"], octo["weekly_share"]) == (1, 0.25)
    assert (octo["monthly"], octo["monthly_share"]) == (2, 0.5)


def test_participation_by_activity_kind_exact(data_dir: Path) -> None:
    sept, octo = _indicators(data_dir)["months"]
    assert sept["by_venue_kind"] == {
        "checkin": {"weekly": 1, "weekly_share": round(1 / 3, 6), "monthly": 1,
                    "monthly_share": round(1 / 3, 6)},
        "class": {"weekly": 0, "weekly_share": 0.0, "monthly": 1,
                  "monthly_share": round(1 / 3, 6)},
        "volunteer": {"weekly": 0, "weekly_share": 0.0, "monthly": 0, "monthly_share": 0.0}}
    assert octo["by_venue_kind"]["volunteer"] == {"weekly": 0, "weekly_share": 0.0,
                                                  "monthly": 1, "monthly_share": 0.25}


def test_participation_by_venue_kind_from_a_venues_file(data_dir: Path, tmp_path: Path) -> None:
    venues = tmp_path / "venues.json"
    venues.write_bytes(orjson.dumps([{"id": k, "kind": v} for k, v in VENUE_KINDS.items()]))
    sept, _ = _indicators(data_dir, "--venues-file", str(venues))["months"]
    assert sorted(sept["by_venue_kind"]) == sorted(VENUE_KINDS.values())
    assert sept["by_venue_kind"]["exercise_class"]["monthly"] == 1
    assert sept["by_venue_kind"]["community_salon"]["weekly"] == 1


def test_points_redemptions_and_frailty_by_month_exact() -> None:
    day = iso_to_day
    data = ProgrammeData(
        user_ids=["A", "B"], birth_year=np.array([1950, 1952]),
        sex=np.array(["F", "M"], dtype=object), cohort=np.array(["app", "app"], dtype=object),
        enrolled_day=np.array([day("2025-01-01"), day("2026-10-10")]),
        people_left_out_no_consent=0,
        steps_person=np.zeros(0, np.int64), steps_day=np.zeros(0, np.int64), steps=np.zeros(0),
        act_person=np.zeros(0, np.int64), act_day=np.zeros(0, np.int64),
        act_kind=np.zeros(0, object), act_venue=np.zeros(0, object),
        flag_person=np.array([0, 0, 1]),
        flag_name=np.array(["low_activity", "low_activity", "slow_gait"], dtype=object),
        flag_raised=np.array([True, False, True]),
        flag_day=np.array([day("2026-09-20"), day("2026-10-03"), day("2026-10-25")]),
        entry_person=np.array([0, 0, 0, 1, 0]),
        entry_kind=np.array(["award", "award", "redeem", "award", "refund"], dtype=object),
        entry_rule=np.array(["steps.tier", "activity.class", "", "steps.tier", ""], dtype=object),
        entry_points=np.array([30, 3, -20, 7, 5]),
        entry_day=np.array([day(d) for d in ("2026-09-02", "2026-09-30", "2026-09-30",
                                             "2026-10-11", "2026-10-01")]))
    sept, octo = indicators_of(data)["months"]
    assert {k: sept[k] for k in ("points_awarded", "points_redeemed", "points_refunded",
                                 "redemptions", "members", "people_flagged", "flags_raised",
                                 "flags_cleared")} == {
        "points_awarded": 33, "points_redeemed": 20, "points_refunded": 0, "redemptions": 1,
        "members": 1, "people_flagged": 1, "flags_raised": 1, "flags_cleared": 0}
    assert {k: octo[k] for k in ("points_awarded", "points_redeemed", "points_refunded",
                                 "redemptions", "members", "people_flagged",
                                 "people_flagged_share", "flags_raised", "flags_cleared")} == {
        "points_awarded": 7, "points_redeemed": 0, "points_refunded": 5, "redemptions": 0,
        "members": 2, "people_flagged": 1, "people_flagged_share": 0.5, "flags_raised": 1,
        "flags_cleared": 1}
