"""Personal data lifecycle: consent over time, leaving, erasure, exports that resist re-identification."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.clock import DAY_MS, day_start_ms, day_to_iso, iso_to_day, tokyo_day
from engine.consent import TS_OPEN_END_MS, LifecycleEvent, lifecycle
from engine.devices import DeviceRegistry
from engine.erasure import ErasureAudit, erase_person
from engine.ingest.log import EmbeddedLog
from engine.ledger import Ledger
from engine.pipeline import run_pipeline
from engine.schemas import ConsentChange
from replay.anonymise import ExportPolicy
from replay.export import export_embedded
from replay.report import STAFF_RISK_LIST_SUFFIX, write_report
from tests.conftest import genki_cmd

KEY = b"privacy-test-key-0123456789"
NOW_MS = day_start_ms(iso_to_day("2026-10-21"))  # in the past: Kafka workers use the clock
FIRST_DAY = iso_to_day("2026-09-22")  # a Tuesday
DAYS = 20
WITHDRAWN_ON = "2026-09-30"
LEFT_ON = "2026-10-03"  # a Saturday
PEOPLE = [f"citizen-{n:02d}" for n in range(1, 13)]
WITHDRAWER, LEAVER, ERASED, ERASED_BY_API = PEOPLE[0], PEOPLE[1], PEOPLE[6], PEOPLE[7]
RARE_VENUE, BIG_VENUE = "venue-rare", "venue-big"
SHOP = "shop-alpha"


def _profile(user: str, index: int, consent: bool = True) -> dict[str, object]:
    return {"v": 1, "user_id": user, "birth_year": 1950 + index % 3, "sex": "F" if index % 2 else "M",
            "cohort": "app", "enrolled_on": "2026-08-01", "research_consent": consent}


def _consent(user: str, change: ConsentChange, on: str, seq: int) -> dict[str, object]:
    return {"v": 1, "user_id": user, "change": change.value,
            "effective_ts_ms": day_start_ms(iso_to_day(on)), "consent_seq": seq, "source": "app"}


def _records() -> list[dict[str, object]]:
    records: list[dict[str, object]] = [_profile(u, i) for i, u in enumerate(PEOPLE)]
    for offset in range(DAYS):
        start = day_start_ms(FIRST_DAY + offset) + 8 * 3_600_000 + 12_345
        for user in PEOPLE:
            records.append({"v": 1, "upload_id": f"{user}-{offset}", "user_id": user,
                            "device_id": f"{user}-watch", "metric": "steps", "unit": "count",
                            "ts_ms": [start + k * 600_000 for k in range(3)],
                            "values": [3000.0, 3000.0, 3000.0]})
    for index, user in enumerate(PEOPLE):
        venue = RARE_VENUE if user == PEOPLE[5] else BIG_VENUE
        records.append({"v": 1, "event_id": f"ev-{user}", "user_id": user, "kind": "checkin",
                        "ts_ms": day_start_ms(FIRST_DAY + 2) + 36_000_000 + index * 1_000,
                        "venue_id": venue, "source": "app"})
    records.append(_consent(WITHDRAWER, ConsentChange.consent_withdrawn, WITHDRAWN_ON, 5))
    records.append(_profile(WITHDRAWER, 0))  # an old profile, re-sent: must not re-grant
    records.append(_consent(LEAVER, ConsentChange.left, LEFT_ON, 3))
    records.append({"v": 1, "user_id": ERASED, "metric": "steps"})  # a dead letter naming them
    return records


def _build(data_dir: Path) -> None:
    lines = [orjson.dumps(r) for r in _records()]
    with EmbeddedLog.open(data_dir) as log:
        counts = log.ingest_lines(lines, "test", 1, NOW_MS)
    assert counts.rejected == 1
    run_pipeline(data_dir)
    with Ledger.open(data_dir) as ledger:
        for user in (ERASED, PEOPLE[3]):
            ledger.redeem(user, 4, SHOP, "T1", f"key-{user}", day_start_ms(FIRST_DAY + 5) + 1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("privacy") / "genki-data"
    _build(data_dir)
    return data_dir


@pytest.fixture(scope="module")
def exported(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("export") / "research"
    export_embedded(world, target, KEY)
    return target


def _pseudonym(user: str) -> str:
    from replay.export import Pseudonymiser

    return Pseudonymiser(KEY)("user", user)


# -- consent as events with time ----------------------------------------------------

def _event(change: ConsentChange, day: str, seq: int) -> LifecycleEvent:
    return LifecycleEvent("u", change, day_start_ms(iso_to_day(day)), seq)


def test_an_old_consent_re_sent_cannot_re_grant() -> None:
    given = _event(ConsentChange.consent_given, "2026-11-01", 1)
    withdrawn = _event(ConsentChange.consent_withdrawn, "2026-12-10", 2)
    periods = lifecycle([given, withdrawn, given]).research["u"]
    assert periods == [(given.effective_ts_ms, withdrawn.effective_ts_ms)]


def test_a_newer_decision_overrides_an_older_later_effective_one() -> None:
    scheduled = _event(ConsentChange.consent_given, "2026-12-20", 3)
    given = _event(ConsentChange.consent_given, "2026-11-01", 1)
    retroactive = _event(ConsentChange.consent_withdrawn, "2026-10-01", 4)
    assert lifecycle([given, scheduled, retroactive]).research.get("u") == []


def test_consent_given_again_by_a_newer_event_opens_a_new_period() -> None:
    events = [_event(ConsentChange.consent_given, "2026-11-01", 1),
              _event(ConsentChange.consent_withdrawn, "2026-11-10", 2),
              _event(ConsentChange.consent_given, "2026-11-20", 3)]
    assert lifecycle(events).research["u"] == [
        (events[0].effective_ts_ms, events[1].effective_ts_ms),
        (events[2].effective_ts_ms, TS_OPEN_END_MS)]


def test_a_tie_goes_to_the_protective_state() -> None:
    events = [_event(ConsentChange.consent_given, "2026-11-01", 0),
              _event(ConsentChange.consent_withdrawn, "2026-11-01", 0)]
    assert lifecycle(events).research["u"] == []


def test_a_conflicting_consent_event_is_a_dead_letter(tmp_path: Path) -> None:
    first = _consent("x1", ConsentChange.left, "2026-12-01", 7)
    other = _consent("x1", ConsentChange.enrolled, "2026-12-01", 7)
    with EmbeddedLog.open(tmp_path) as log:
        counts = log.ingest_lines([orjson.dumps(first), orjson.dumps(first),
                                   orjson.dumps(other)], "t", 1, NOW_MS)
        letters = log.dead_letters()
    assert (counts.accepted, counts.duplicate_records, counts.rejected) == (2, 1, 1)
    assert letters[0].reason.startswith("conflict: consent_seq")


def test_exports_hold_a_person_only_inside_their_consent_period(world: Path,
                                                                 exported: Path) -> None:
    samples = ds.dataset(exported / "samples", partitioning="hive").to_table().to_pydict()
    days = Counter(d for u, d in zip(samples["user"], samples["day"], strict=True)
                   if u == _pseudonym(WITHDRAWER))
    withdrawn = iso_to_day(WITHDRAWN_ON)
    assert sorted(days) == [day_to_iso(d) for d in range(FIRST_DAY, withdrawn)]
    assert set(days.values()) == {3}
    other = Counter(d for u, d in zip(samples["user"], samples["day"], strict=True)
                    if u == _pseudonym(PEOPLE[4]))
    assert len(other) == DAYS
    manifest = orjson.loads((exported / "manifest.json").read_bytes())
    # the withdrawer's later days, and the leaver's days from leaving on
    expected = 3 * (FIRST_DAY + DAYS - withdrawn) + 3 * (FIRST_DAY + DAYS - iso_to_day(LEFT_ON))
    assert manifest["rows_left_out_no_consent"]["samples"] == expected
    assert manifest["users_included"] == len(PEOPLE)


# -- leaving ----------------------------------------------------------------------------

def test_a_person_who_left_gets_no_awards_from_that_day(world: Path) -> None:
    with Ledger.open(world) as ledger:
        leaver = ledger.history(LEAVER, None, 1000)[0]
        stayer = ledger.history(PEOPLE[4], None, 1000)[0]

    def tier_days(entries: list) -> set[int]:
        return {iso_to_day(e.day) for e in entries if (e.rule or "").startswith("steps.tier")}

    def streaks(entries: list) -> set[tuple[str, str]]:
        return {(e.day, e.rule) for e in entries if (e.rule or "").startswith("streak")}

    left = iso_to_day(LEFT_ON)
    assert tier_days(leaver) == set(range(FIRST_DAY, left))
    assert tier_days(stayer) == set(range(FIRST_DAY, FIRST_DAY + DAYS))
    # the week of leaving (Mon 09-28 .. Sun 10-04) counts only the five days before it
    assert ("2026-10-04", "streak.5of7") in streaks(leaver)
    assert ("2026-10-04", "streak.7of7") not in streaks(leaver)
    assert ("2026-10-04", "streak.7of7") in streaks(stayer)


# -- exports that resist re-identification ----------------------------------------------

def test_timestamps_are_coarsened_and_shops_pseudonymised(exported: Path) -> None:
    samples = ds.dataset(exported / "samples", partitioning="hive").to_table()
    assert all(ts % 60_000 == 0 for ts in samples["ts_ms"].to_pylist())
    activities = ds.dataset(exported / "activities").to_table().to_pydict()
    assert all((ts + 9 * 3_600_000) % DAY_MS == 0 for ts in activities["ts_ms"])
    ledger = ds.dataset(exported / "ledger").to_table().to_pydict()
    assert all((ts + 9 * 3_600_000) % DAY_MS == 0 for ts in ledger["ts_ms"])
    shops = {s for s in ledger["shop"] if s}
    assert len(shops) == 1 and SHOP not in shops
    for path in exported.rglob("*.parquet"):
        assert SHOP.encode() not in path.read_bytes()


def test_quasi_identifiers_are_k_anonymous(exported: Path) -> None:
    people = pq.read_table(exported / "people" / "people.parquet").to_pydict()
    manifest = orjson.loads((exported / "manifest.json").read_bytes())["anonymity"]
    classes = Counter((lo, hi, s, c) for lo, hi, s, c in zip(
        people["birth_year_min"], people["birth_year_max"], people["sex"], people["cohort"],
        strict=True) if s is not None)
    assert manifest["k"] == 5
    assert min(classes.values()) >= 5
    suppressed = sum(1 for s in people["sex"] if s is None)
    assert manifest["people_suppressed"] == suppressed
    assert manifest["people"] == len(people["user"]) == len(PEOPLE)
    assert all(hi - lo + 1 == manifest["birth_year_band_years"]
               for lo, hi in zip(people["birth_year_min"], people["birth_year_max"], strict=True)
               if lo is not None)
    activities = ds.dataset(exported / "activities").to_table().to_pydict()
    assert manifest["venues_suppressed"] == 1 and manifest["activity_rows_venue_suppressed"] == 1
    assert sum(1 for v in activities["venue"] if v is None) == 1


def test_a_smaller_k_keeps_more(world: Path, tmp_path: Path) -> None:
    manifest = export_embedded(world, tmp_path / "k1", KEY, policy=ExportPolicy(k=1))
    assert manifest.anonymity["people_suppressed"] == 0
    assert manifest.anonymity["venues_suppressed"] == 0
    assert manifest.anonymity["birth_year_band_years"] == 5


def test_the_report_shows_aggregates_and_the_risk_list_is_a_separate_staff_file(
        world: Path, tmp_path: Path) -> None:
    html_path, csv_path = write_report(world, tmp_path / "report.html")
    text = html_path.read_text(encoding="utf-8")
    assert not any(user in text for user in PEOPLE)
    assert RARE_VENUE not in text
    assert csv_path.name == "report" + STAFF_RISK_LIST_SUFFIX
    assert csv_path.read_text(encoding="utf-8").startswith("user_id,")


# -- erasure ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def erased(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """A copy of the world, its settlement and head before, then `genki erase` on it."""
    data_dir = tmp_path_factory.mktemp("erased") / "genki-data"
    shutil.copytree(world, data_dir)
    shutil.copytree(world, data_dir / "p3")  # a Kafka partition store on this host
    with Ledger.open(data_dir) as ledger:
        before = ledger.settlement(SHOP, "2026-09")
    with DeviceRegistry.open(data_dir) as registry:
        registry.enroll(ERASED, f"{ERASED}-watch", "garmin", NOW_MS, "test")
        registry.enroll(PEOPLE[3], f"{PEOPLE[3]}-watch", "garmin", NOW_MS, "test")
    result = subprocess.run(genki_cmd("erase", ERASED, "--reason", "request 2026-12-30 ref 17",
                                      "--data-dir", str(data_dir), "--json"),
                            capture_output=True, check=False)
    assert result.returncode == 0, result.stderr
    yield {"dir": data_dir, "settlement": before, "result": orjson.loads(result.stdout)}


def test_erasure_removes_the_person_from_the_log_files(erased: dict[str, object]) -> None:
    data_dir = erased["dir"]
    assert isinstance(data_dir, Path)
    for directory in (data_dir, data_dir / "p3"):
        with EmbeddedLog.open(directory, writer=False) as log:
            assert not [k for k in log.stored_sample_keys() if k[0] == ERASED]
            assert ERASED not in log.read_activities(0, log.position()).users
            assert all(orjson.loads(p)["user_id"] != ERASED for p in log.profiles())
            assert log.dead_letters() == []
        for name in ("log.sqlite", "log.sqlite-wal"):
            path = directory / name
            assert not path.exists() or ERASED.encode() not in path.read_bytes()
    with DeviceRegistry.open(data_dir) as registry:
        assert registry.enrolments(ERASED) == []
        assert [e["user_id"] for e in registry.events()] == [PEOPLE[3]]
    assert ERASED.encode() not in (data_dir / "devices.sqlite").read_bytes()
    removed = erased["result"]["removed"]  # type: ignore[index]
    assert removed["data_dir"]["samples"] == DAYS
    assert removed["data_dir"]["device_enrolments"] == 2
    assert removed["data_dir"]["dead_letters"] == 1
    assert removed["genki-data/p3"]["samples"] == DAYS


def test_erasure_is_audited_without_naming_the_person(erased: dict[str, object]) -> None:
    data_dir = erased["dir"]
    assert isinstance(data_dir, Path)
    audit = ErasureAudit.open(data_dir)
    try:
        assert audit.verify() == 2
        assert audit.is_erased(ERASED) and not audit.is_erased(PEOPLE[3])
        rows = audit.rows()
    finally:
        audit.close()
    assert [r.state for r in rows] == ["started", "done"]
    assert rows[0].reason == "request 2026-12-30 ref 17"
    assert ERASED.encode() not in (data_dir / "privacy.sqlite").read_bytes()
    check = subprocess.run(genki_cmd("erase", ERASED, "--check", "--data-dir", str(data_dir)),
                           capture_output=True, check=False)
    assert check.returncode == 0
    other = subprocess.run(genki_cmd("erase", PEOPLE[3], "--check", "--data-dir",
                                     str(data_dir)), capture_output=True, check=False)
    assert other.returncode == 1


@pytest.mark.parametrize("command", ["balance", "history"])
def test_the_cli_answers_no_such_person_for_the_erased(erased: dict[str, object],
                                                      command: str) -> None:
    data_dir = erased["dir"]
    assert isinstance(data_dir, Path)
    gone = subprocess.run(genki_cmd(command, ERASED, "--data-dir", str(data_dir)),
                          capture_output=True, check=False)
    assert gone.returncode == 4
    assert b"no such person" in gone.stderr and b"erased" in gone.stderr
    kept = subprocess.run(genki_cmd(command, PEOPLE[3], "--data-dir", str(data_dir)),
                          capture_output=True, check=False)
    assert kept.returncode == 0, kept.stderr


def test_erasure_again_finds_nothing_left(erased: dict[str, object], tmp_path: Path) -> None:
    data_dir = erased["dir"]
    assert isinstance(data_dir, Path)
    result = erase_person(data_dir, ERASED, "repeat", "test")
    assert result.already_erased
    assert all(v == 0 for kinds in result.removed.values() for v in kinds.values())


def test_replay_after_erasure_lacks_the_person(erased: dict[str, object], tmp_path: Path) -> None:
    data_dir = erased["dir"]
    assert isinstance(data_dir, Path)
    manifest = export_embedded(data_dir, tmp_path / "after", KEY)
    assert manifest.users_included == len(PEOPLE) - 1
    pseudonym = _pseudonym(ERASED)
    for path in (tmp_path / "after").rglob("*.parquet"):
        assert pseudonym.encode() not in path.read_bytes()
        assert ERASED.encode() not in path.read_bytes()


def test_the_pipeline_runs_on_after_erasure(erased: dict[str, object]) -> None:
    data_dir = erased["dir"]
    assert isinstance(data_dir, Path)
    summary = run_pipeline(data_dir)
    assert summary.awards_appended == 0


def test_leaving_day_is_a_tokyo_day() -> None:
    assert tokyo_day(day_start_ms(iso_to_day(LEFT_ON))) == iso_to_day(LEFT_ON)


def test_settle_closes_the_balance_at_leaving_and_runs_once(tmp_path: Path) -> None:
    from engine.pipeline import RULES_DEFAULT_PATH
    from engine.rules.config import load_rules

    rules_path = tmp_path / "settle.toml"
    rules_path.write_text(RULES_DEFAULT_PATH.read_text(encoding="utf-8")
                          + '\n[leaving]\nbalance = "settle"\n', encoding="utf-8")
    assert "leaving" not in load_rules(RULES_DEFAULT_PATH).normalised()
    data_dir = tmp_path / "genki-data"
    with EmbeddedLog.open(data_dir) as log:
        log.ingest_lines([orjson.dumps(r) for r in _records()], "test", 1, NOW_MS)
    run_pipeline(data_dir, rules_path)
    again = run_pipeline(data_dir, rules_path)
    with Ledger.open(data_dir) as ledger:
        entries = ledger.history(LEAVER, None, 1000)[0]
        settled = [e for e in entries if e.rule == "leaving.settle"]
        awarded = sum(e.points for e in entries if e.kind == "award")
        assert ledger.balance(LEAVER) == 0
        assert ledger.balance(PEOPLE[4]) > 0
    assert [(e.kind, e.points, e.day, e.ts_ms) for e in settled] == [
        ("expire", -awarded, LEFT_ON, day_start_ms(iso_to_day(LEFT_ON)))]
    assert again.awards_appended == 0


def test_the_staff_endpoint_erases_and_the_api_answers_404(world: Path, tmp_path: Path) -> None:
    from engine.api.store import Role
    from tests.test_api import Server, make_key

    home = tmp_path / "home"
    shutil.copytree(world, home)
    staff, app = make_key(home, Role.staff), make_key(home, Role.app)
    server = Server(home)
    try:
        with server.client(app) as client:
            assert client.get(f"/v1/users/{ERASED_BY_API}/balance").status_code == 200
        with server.client(app) as client:
            refused = client.post(f"/v1/users/{ERASED_BY_API}/erase", json={"reason": "r"})
        assert refused.status_code == 403
        with server.client(staff) as client:
            first = client.post(f"/v1/users/{ERASED_BY_API}/erase",
                                json={"reason": "request ref 99"})
            second = client.post(f"/v1/users/{ERASED_BY_API}/erase",
                                 json={"reason": "request ref 99"})
        assert first.status_code == 200, first.text
        assert first.json()["removed"]["data_dir"]["samples"] == DAYS
        assert second.status_code == 200 and second.json()["already_erased"]
        assert all(v == 0 for v in second.json()["removed"]["data_dir"].values())
        with server.client(app) as client:
            for path in ("balance", "history", "flags"):
                response = client.get(f"/v1/users/{ERASED_BY_API}/{path}")
                assert response.status_code == 404, (path, response.text)
            assert client.get(f"/v1/users/{PEOPLE[4]}/balance").status_code == 200
    finally:
        server.stop()
    audit = ErasureAudit.open(home)
    try:
        assert [row.actor.startswith("api:") for row in audit.rows()] == [True] * 4
    finally:
        audit.close()


def test_after_erasure_the_ledger_verifies_and_settlement_is_unchanged(
        erased: dict[str, object]) -> None:
    data_dir = erased["dir"]
    assert isinstance(data_dir, Path)
    for directory in (data_dir, data_dir / "p3"):
        result = subprocess.run(genki_cmd("ledger", "verify", "--data-dir", str(directory)),
                                capture_output=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
    with Ledger.open(data_dir) as ledger:
        assert ledger.settlement(SHOP, "2026-09") == erased["settlement"]
        assert ledger.settlement(SHOP, "2026-09").redemptions == 2
        assert ledger.balance(ERASED) == 0
        assert ledger.history(ERASED, None, 10)[0] == []
        assert ledger.flag_history(ERASED) == []
    removed = erased["result"]["removed"]["data_dir"]  # type: ignore[index]
    assert removed["ledger_entries_unlinked"] > DAYS


def test_the_period_index_agrees_with_the_periods_at_their_edges() -> None:
    from engine.consent import PeriodIndex
    from engine.schemas import TS_MS_MIN

    at = day_start_ms(iso_to_day("2026-01-01"))
    periods = {"a": [(TS_MS_MIN - DAY_MS, TS_MS_MIN + 5), (at, at + 10)],
               "b": [(at + 5, TS_OPEN_END_MS)], "c": [(0, TS_MS_MIN)]}
    index = PeriodIndex(periods)
    users = ["a", "b", "c", "d"]
    probes = [(0, TS_MS_MIN), (0, TS_MS_MIN + 5), (0, at - 1), (0, at), (0, at + 9),
              (0, at + 10), (1, at + 4), (1, at + 5), (1, 4_000_000_000_000), (2, TS_MS_MIN),
              (3, at)]
    got = index.contains(users, np.array([p[0] for p in probes], np.int32),
                         np.array([p[1] for p in probes], np.int64))
    assert got.tolist() == [True, False, False, True, True, False, False, True, True, False,
                            False]


@pytest.mark.parametrize("point", ["erasure_after_log", "erasure_before_done"])
def test_an_erasure_killed_midway_is_finished_by_running_it_again(
        world: Path, tmp_path: Path, point: str) -> None:
    import os

    data_dir = tmp_path / "genki-data"
    shutil.copytree(world, data_dir)
    command = genki_cmd("erase", ERASED, "--reason", "request ref 3", "--data-dir", str(data_dir))
    killed = subprocess.run(command, capture_output=True, check=False,
                            env={**os.environ, "GENKI_CRASH_AT": point})
    assert killed.returncode == -9
    audit = ErasureAudit.open(data_dir)
    try:
        assert [r.state for r in audit.rows()] == ["started"]
        assert not audit.is_erased(ERASED)
    finally:
        audit.close()
    with Ledger.open(data_dir) as ledger:
        linked = len(ledger.history(ERASED, None, 1000)[0])
    assert (linked > 0) == (point == "erasure_after_log")
    finished = subprocess.run(command, capture_output=True, check=False)
    assert finished.returncode == 0, finished.stderr
    audit = ErasureAudit.open(data_dir)
    try:
        assert [r.state for r in audit.rows()] == ["started", "started", "done"]
        assert audit.is_erased(ERASED) and audit.verify() == 3
    finally:
        audit.close()
    with Ledger.open(data_dir) as ledger:
        assert ledger.history(ERASED, None, 10)[0] == []
    verify = subprocess.run(genki_cmd("ledger", "verify", "--data-dir", str(data_dir)),
                            capture_output=True, check=False)
    assert verify.returncode == 0
    with EmbeddedLog.open(data_dir, writer=False) as log:
        assert not [k for k in log.stored_sample_keys() if k[0] == ERASED]


_CHANGES = [ConsentChange.consent_given, ConsentChange.consent_withdrawn]
_BASE_MS = day_start_ms(iso_to_day("2026-01-01"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_CHANGES), st.integers(0, 6), st.integers(0, 4)),
                max_size=8))
def test_consent_periods_match_the_newest_effective_decision(
        events: list[tuple[ConsentChange, int, int]]) -> None:
    """Reference model: at time t, of the events effective by t, the greatest consent_seq
    decides, withdrawn on a tie; no event effective yet means no consent."""
    from engine.consent import PeriodIndex

    items = [LifecycleEvent("u", change, _BASE_MS + at * DAY_MS, seq)
             for change, at, seq in events]
    index = PeriodIndex({"u": lifecycle(items).research.get("u", [])})
    probes = [_BASE_MS + (half * DAY_MS) // 2 for half in range(16)]
    expected = []
    for t in probes:
        effective = [e for e in items if e.effective_ts_ms <= t]
        best = max(effective, default=None, key=lambda e: (
            e.consent_seq, e.change == ConsentChange.consent_withdrawn))
        expected.append(best is not None and best.change == ConsentChange.consent_given)
    got = index.contains(["u"], np.zeros(len(probes), np.int32), np.array(probes, np.int64))
    assert got.tolist() == expected


def test_the_replay_command_takes_the_anonymity_settings(world: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY)
    target = tmp_path / "out"
    result = subprocess.run(genki_cmd(
        "replay", "--to", str(target), "--pseudonym-key-file", str(key_file), "--data-dir",
        str(world), "--k", "2", "--samples-time", "hour", "--ledger-time", "minute",
        "--birth-year-band-years", "10", "--json"), capture_output=True, check=False)
    assert result.returncode == 0, result.stderr
    anonymity = orjson.loads(result.stdout)["anonymity"]
    assert (anonymity["k"], anonymity["birth_year_band_years"]) == (2, 10)
    assert anonymity["time_units"] == {"samples": "hour", "activities": "day",
                                       "ledger": "minute", "flags": "day"}
    samples = ds.dataset(target / "samples", partitioning="hive").to_table()
    assert all(ts % 3_600_000 == 0 for ts in samples["ts_ms"].to_pylist())
    refused = subprocess.run(genki_cmd(
        "replay", "--to", str(tmp_path / "x"), "--pseudonym-key-file", str(key_file),
        "--data-dir", str(world), "--k", "0"), capture_output=True, check=False)
    assert refused.returncode == 2 and b"--k" in refused.stderr


def test_erasure_reaches_the_archive(tmp_path: Path) -> None:
    from engine.ingest.archive import archive_dir
    from engine.pipeline_cli import archive
    from engine.sim import SimConfig, simulate

    fleet = tmp_path / "fleet"
    simulate(SimConfig(participants=3, app_users=6, days=60, bad_fraction=0.0,
                       duplicate_fraction=0.0), fleet)
    lines = [line for path in sorted(fleet.glob("*.ndjson"))
             for line in path.read_bytes().splitlines() if line.strip()]

    def first_ts(line: bytes) -> int:
        ts = orjson.loads(line).get("ts_ms", 0)
        return ts[0] if isinstance(ts, list) else ts

    lines.sort(key=lambda line: (b'"ts_ms"' in line, first_ts(line)))  # daily arrival
    data_dir = tmp_path / "genki-data"
    with EmbeddedLog.open(data_dir) as log:
        for lo in range(0, len(lines), 100):
            log.ingest_lines(lines[lo:lo + 100], "t", lo + 1, 1_830_297_600_000)
    run_pipeline(data_dir)
    first_day = min(tokyo_day(first_ts(line)) for line in lines if b'"ts_ms":[' in line)
    moved = archive(data_dir, day_to_iso(first_day + 15))
    assert moved["archived_sample_records"] > 0

    def archived_users() -> Counter:
        return Counter(user for path in sorted(archive_dir(data_dir).glob("*.parquet"))
                       for user in pq.read_table(path, columns=["user_id"])["user_id"]
                       .to_pylist())

    person = "W00001"
    before = archived_users()
    assert before[person] > 0
    result = erase_person(data_dir, person, "request ref 8", "test")
    assert result.removed["data_dir"]["archived_samples"] > 0
    del before[person]
    assert archived_users() == before
    with EmbeddedLog.open(data_dir, writer=False) as log:
        assert person not in log.read_samples(0, log.position()).users


@pytest.mark.parametrize("key_bytes", [16, 63, 64, 65, 200])
def test_pseudonyms_are_hmac_sha256_of_domain_and_id(key_bytes: int) -> None:
    import hashlib
    import hmac

    from replay.export import PSEUDONYM_HEX_CHARS, Pseudonymiser

    key = bytes(range(key_bytes)) if key_bytes < 256 else b"k" * key_bytes
    pseudo = Pseudonymiser(key)
    ids = ["P00017", "E-1", "shop:7", "日本語", "x" * 300]
    expected = [hmac.new(key, f"entry\x1f{i}".encode(), hashlib.sha256).hexdigest()
                [:PSEUDONYM_HEX_CHARS] for i in ids]
    assert pseudo.fresh("entry", ids) == expected
    assert [pseudo("entry", i) for i in ids] == expected
    assert pseudo.many("user", ["", "P00017"]) == [
        "", hmac.new(key, b"user\x1fP00017", hashlib.sha256).hexdigest()[:PSEUDONYM_HEX_CHARS]]


def _contains_by_search(periods: dict[str, list[tuple[int, int]]], users: list[str],
                        user_idx: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
    """The reference: a linear look through each person's periods."""
    return np.array([any(start <= t < end for start, end in periods.get(users[u], []))
                     for u, t in zip(user_idx.tolist(), ts_ms.tolist(), strict=True)], bool)


@pytest.mark.parametrize("seed", range(8))
def test_period_index_answers_as_a_look_through_the_periods(seed: int) -> None:
    from engine.consent import PeriodIndex
    from engine.schemas import TS_MS_MIN

    rng = np.random.default_rng(seed)
    base = TS_MS_MIN + 10**12
    periods: dict[str, list[tuple[int, int]]] = {}
    for person in range(40):
        cuts = np.sort(rng.choice(10_000, size=2 * int(rng.integers(0, 4)), replace=False))
        periods[f"P{person}"] = [(base + int(a), base + int(b))
                                 for a, b in zip(cuts[::2], cuts[1::2], strict=True)]
    users = [f"P{person}" for person in rng.permutation(50)]  # ten without any period
    user_idx = rng.integers(0, len(users), 5_000)
    ts_ms = base + rng.integers(-50, 10_050, 5_000)
    got = PeriodIndex(periods).contains(users, user_idx, ts_ms)
    assert got.tolist() == _contains_by_search(periods, users, user_idx, ts_ms).tolist()
    assert 0 < got.sum() < len(got)
