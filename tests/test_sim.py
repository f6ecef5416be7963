"""The fleet simulator: deterministic, realistic, and honest about what it injected."""

from __future__ import annotations

import subprocess
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from engine.clock import tokyo_days, tokyo_minute_of_day
from engine.errors import UsageError
from engine.ingest.reasons import WIRE_RECORD_REASONS
from engine.schemas import ActivityEvent, Profile, SampleSegment
from engine.sim import SimConfig, SimManifest, simulate
from engine.sim.faults import FAULT_KINDS, FAULTS_VALID_AS_MODELS
from tests.conftest import REPO_ROOT, genki_cmd

FLEET = SimConfig(participants=24, app_users=60, days=14, seed=11, bad_fraction=0.02,
                  duplicate_fraction=0.03, decline_fraction=0.3)
TINY = SimConfig(participants=5, app_users=8, days=4, seed=3, bad_fraction=0.05,
                 duplicate_fraction=0.05)
RECORD_FILES = ("00-profiles.ndjson", "10-samples.ndjson", "20-activities.ndjson")
ALL_FILES = (*RECORD_FILES, "venues.json", "shops.json", "faults.json", "manifest.json")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> SimManifest:
    return simulate(FLEET, tmp_path_factory.mktemp("fleet"))


def lines_of(manifest: SimManifest, name: str) -> list[bytes]:
    return (manifest.out / name).read_bytes().splitlines()


def fault_lines(manifest: SimManifest, name: str) -> dict[int, str]:
    rows = orjson.loads((manifest.out / "faults.json").read_bytes())[name]
    return {row["line"]: row["kind"] for row in rows}


def good_lines(manifest: SimManifest, name: str) -> list[bytes]:
    bad = fault_lines(manifest, name)
    return [line for number, line in enumerate(lines_of(manifest, name), start=1) if number not in bad]


def test_same_seed_writes_identical_bytes(tmp_path: Path) -> None:
    simulate(TINY, tmp_path / "a")
    simulate(TINY, tmp_path / "b")
    for name in ALL_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_different_seed_writes_different_data(tmp_path: Path) -> None:
    simulate(TINY, tmp_path / "a")
    simulate(SimConfig(**{**TINY.as_dict(), "seed": 4}), tmp_path / "b")
    for name in RECORD_FILES[1:]:
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "b" / name).read_bytes(), name


def test_output_holds_only_the_documented_files(fleet: SimManifest) -> None:
    assert sorted(p.name for p in fleet.out.iterdir()) == sorted(ALL_FILES)


def test_manifest_counts_lines_and_bytes_of_every_file(fleet: SimManifest) -> None:
    for name in RECORD_FILES:
        stats = fleet.files[name]
        assert len(lines_of(fleet, name)) == stats["records"]
        assert (fleet.out / name).stat().st_size == stats["bytes"]
        assert stats["records"] == stats["good"] + stats["exact_duplicates"] + stats["faults"]
    assert SimManifest.load(fleet.out).data == fleet.as_dict()


def test_every_reason_a_wire_record_can_cause_is_injected(fleet: SimManifest) -> None:
    assert all(entry["count"] >= 1 for entry in fleet.faults.values())
    assert set(fleet["faults_by_reason"]) == {r.value for r in WIRE_RECORD_REASONS}  # type: ignore[arg-type]


def test_big_faults_are_capped(tmp_path: Path) -> None:
    manifest = simulate(SimConfig(**{**TINY.as_dict(), "bad_fraction": 0.5}), tmp_path)
    assert manifest.faults["oversized"]["count"] == 2
    assert manifest.faults["too_many_samples"]["count"] == 2
    assert manifest.faults["negative_steps"]["count"] > 2


def test_no_faults_or_duplicates_when_fractions_are_zero(tmp_path: Path) -> None:
    manifest = simulate(SimConfig(**{**TINY.as_dict(), "bad_fraction": 0.0,
                                     "duplicate_fraction": 0.0}), tmp_path)
    assert all(entry["count"] == 0 for entry in manifest.faults.values())
    for name in RECORD_FILES:
        assert manifest.files[name]["records"] == manifest.files[name]["good"]


def test_fault_lines_match_the_manifest_counts(fleet: SimManifest) -> None:
    counted: Counter[str] = Counter()
    for name in RECORD_FILES[1:]:
        counted.update(fault_lines(fleet, name).values())
        assert len(fault_lines(fleet, name)) == fleet.files[name]["faults"]
    assert counted == {kind: entry["count"] for kind, entry in fleet.faults.items()}
    files = {kind.name: kind.file for kind in FAULT_KINDS}
    for name in RECORD_FILES[1:]:
        assert all(files[kind] == name for kind in fault_lines(fleet, name).values())


@pytest.mark.parametrize(("name", "model"), [("00-profiles.ndjson", Profile),
                                             ("10-samples.ndjson", SampleSegment),
                                             ("20-activities.ndjson", ActivityEvent)])
def test_good_records_validate_and_faults_do_not(fleet: SimManifest, name: str, model: type) -> None:
    bad = fault_lines(fleet, name)
    for number, line in enumerate(lines_of(fleet, name), start=1):
        kind = bad.get(number)
        if kind is None or kind in FAULTS_VALID_AS_MODELS:
            model.model_validate_json(line)
        else:
            with pytest.raises((ValidationError, ValueError)):
                model.model_validate_json(line)


def test_records_carry_wire_version_1(fleet: SimManifest) -> None:
    for name in RECORD_FILES:
        assert all(orjson.loads(line)["v"] == 1 for line in good_lines(fleet, name))


def test_exact_duplicates_are_byte_copies_sent_later(fleet: SimManifest) -> None:
    for name in RECORD_FILES[1:]:
        seen: set[bytes] = set()
        repeats = 0
        for line in good_lines(fleet, name):
            repeats += line in seen
            seen.add(line)
        assert repeats == fleet.files[name]["exact_duplicates"] > 0


def _sample_records(manifest: SimManifest) -> list[dict]:
    """Good sample records, each distinct line once."""
    return [orjson.loads(line) for line in dict.fromkeys(good_lines(manifest, "10-samples.ndjson"))]


def test_overlapping_resyncs_resend_samples_under_new_upload_ids(fleet: SimManifest) -> None:
    uploads_of_key: dict[tuple, set[str]] = defaultdict(set)
    written = 0
    for body in _sample_records(fleet):
        written += len(body["ts_ms"])
        for ts in body["ts_ms"]:
            uploads_of_key[(body["user_id"], body["device_id"], body["metric"], ts)].add(body["upload_id"])
    resent = written - len(uploads_of_key)
    assert resent == fleet["overlapping_resyncs"]["samples"] > 0  # type: ignore[index]
    assert all(len(uploads) <= 2 for uploads in uploads_of_key.values())
    assert len(uploads_of_key) == fleet.unique_samples


def test_samples_per_metric_match_the_manifest(fleet: SimManifest) -> None:
    written: Counter[str] = Counter()
    unique: dict[str, set] = defaultdict(set)
    for line in good_lines(fleet, "10-samples.ndjson"):
        body = orjson.loads(line)
        written[body["metric"]] += len(body["ts_ms"])
        unique[body["metric"]].update((body["user_id"], body["device_id"], t) for t in body["ts_ms"])
    assert written == {m: n for m, n in fleet["samples_written"].items() if n}  # type: ignore[attr-defined]
    assert {m: len(keys) for m, keys in unique.items()} == {
        m: n for m, n in fleet["samples_unique"].items() if n}  # type: ignore[attr-defined]


def test_every_metric_is_simulated(fleet: SimManifest) -> None:
    assert all(count > 0 for count in fleet["samples_unique"].values())  # type: ignore[attr-defined]


def test_good_timestamps_fall_on_the_simulated_tokyo_days(fleet: SimManifest) -> None:
    period = fleet["period"]
    first = int(tokyo_days(np.array([period["first_ts_ms"]]))[0])  # type: ignore[index]
    for body in _sample_records(fleet):
        days = tokyo_days(np.array(body["ts_ms"]))
        assert first <= days.min() and days.max() < first + FLEET.days
    for line in good_lines(fleet, "20-activities.ndjson"):
        day = int(tokyo_days(np.array([orjson.loads(line)["ts_ms"]]))[0])
        assert first <= day < first + FLEET.days


def test_night_spo2_and_waking_steps_keep_their_hours(fleet: SimManifest) -> None:
    for body in _sample_records(fleet):
        minute = tokyo_minute_of_day(np.array(body["ts_ms"]))
        if body["metric"] == "spo2":
            assert minute.max() < 6 * 60 and 84 <= min(body["values"]) <= max(body["values"]) <= 100
        if body["metric"] == "steps" and body["device_id"].endswith("-watch1"):
            assert minute.min() >= 4 * 60


def test_segments_hold_one_metric_of_one_device_within_limits(fleet: SimManifest) -> None:
    for body in _sample_records(fleet):
        assert body["device_id"] == body["user_id"] + ("-watch1" if body["user_id"][0] == "W" else "-phone")
        assert body["ts_ms"] == sorted(body["ts_ms"])
        assert len(body["ts_ms"]) <= 20_000
        assert body["ts_ms"][-1] - body["ts_ms"][0] <= 3 * 86_400_000  # since the last sync


def test_declining_participants_walk_less_late_than_early(fleet: SimManifest) -> None:
    onsets = fleet["ground_truth"]["step_decline"]  # type: ignore[index]
    unscored = fleet["ground_truth_unscored"]["step_decline"]  # type: ignore[index]
    # 14 days are too few for a 12-week baseline: every decline is unscored here.
    decliners = {user for user in [*onsets, *unscored] if user.startswith("W")}
    assert len(decliners) >= 3
    first = int(fleet["period"]["first_ts_ms"])  # type: ignore[index]
    early: Counter[str] = Counter()
    late: Counter[str] = Counter()
    for body in _sample_records(fleet):
        if body["user_id"] in decliners and body["metric"] == "steps":
            day = (np.array(body["ts_ms"]) - first) // 86_400_000
            values = np.array(body["values"])
            early[body["user_id"]] += int(values[day < 5].sum())
            late[body["user_id"]] += int(values[day >= 10].sum())
    for user in decliners:
        assert late[user] / 4 < 0.8 * early[user] / 5, user


def test_profiles_describe_each_cohort(fleet: SimManifest) -> None:
    profiles = [orjson.loads(line) for line in lines_of(fleet, "00-profiles.ndjson")]
    assert [p["user_id"] for p in profiles] == (
        [f"W{i:05d}" for i in range(1, 25)] + [f"A{i:05d}" for i in range(1, 61)])
    year = int(FLEET.start[:4])
    for p in profiles:
        low, high = (65, 95) if p["cohort"] == "watch_trial" else (20, 85)
        assert low <= year - p["birth_year"] <= high + 1  # not yet had this year's birthday
        assert p["enrolled_on"] < FLEET.start


def test_too_late_segments_arrive_after_the_users_real_data(fleet: SimManifest) -> None:
    bad = fault_lines(fleet, "10-samples.ndjson")
    last_good: dict[str, int] = {}
    for number, line in enumerate(lines_of(fleet, "10-samples.ndjson"), start=1):
        if number not in bad:
            last_good[orjson.loads(line)["user_id"]] = number
    late = [n for n, kind in bad.items() if kind == "too_late"]
    assert late
    for number in late:
        user = orjson.loads(lines_of(fleet, "10-samples.ndjson")[number - 1])["user_id"]
        assert number > last_good[user]


def test_conflicting_events_reuse_an_earlier_event_id(fleet: SimManifest) -> None:
    bad = fault_lines(fleet, "20-activities.ndjson")
    first_seen: dict[str, bytes] = {}
    for number, line in enumerate(lines_of(fleet, "20-activities.ndjson"), start=1):
        if bad.get(number) == "activity_conflict":
            event_id = orjson.loads(line)["event_id"]
            assert event_id in first_seen and first_seen[event_id] != line
        elif number not in bad:
            first_seen.setdefault(orjson.loads(line)["event_id"], line)


def test_venues_and_shops_are_listed(fleet: SimManifest) -> None:
    venues = orjson.loads((fleet.out / "venues.json").read_bytes())
    shops = orjson.loads((fleet.out / "shops.json").read_bytes())
    assert [v["id"] for v in venues] == [f"V{i:03d}" for i in range(1, 51)]
    assert [s["id"] for s in shops] == [f"S{i:03d}" for i in range(1, 51)]
    assert {"community_salon", "exercise_class", "volunteering_centre", "library"} <= {v["kind"] for v in venues}
    used = {orjson.loads(line).get("venue_id") for line in good_lines(fleet, "20-activities.ndjson")}
    assert used - {None} <= {v["id"] for v in venues}


def test_config_rejects_impossible_values() -> None:
    with pytest.raises(UsageError, match="days"):
        SimConfig(days=0)
    with pytest.raises(UsageError, match="bad_fraction"):
        SimConfig(bad_fraction=1.5)
    with pytest.raises(UsageError, match="start"):
        SimConfig(start="2026-13-01")


def test_cli_simulate_runs_as_a_process(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    result = subprocess.run(
        genki_cmd("simulate", "--participants", "3", "--app-users", "4", "--days", "3", "--seed", "5",
                  "--out", str(out), "--bad-fraction", "0.1", "--duplicate-fraction", "0.1"),
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "\x1b[" not in result.stdout
    manifest = SimManifest.load(out)
    assert manifest["config"]["seed"] == 5  # type: ignore[index]
    assert manifest.files["00-profiles.ndjson"]["records"] == 7


def test_cli_reports_bad_arguments_with_exit_code_2(tmp_path: Path) -> None:
    result = subprocess.run(genki_cmd("simulate", "--days", "0", "--out", str(tmp_path)),
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "days" in result.stderr


def test_a_year_has_seasons_holidays_and_days_without_the_watch() -> None:
    from engine.clock import iso_to_day
    from engine.sim import calendar

    days = np.array([iso_to_day(d) for d in ("2026-01-01", "2026-01-15", "2026-04-21",
                                              "2026-05-04", "2026-08-04", "2026-10-21")])
    factor = calendar.steps_factor(days)
    assert factor[0] < 0.7 and factor[3] < factor[2]  # New Year; Golden Week
    assert factor[2] > 1.06 and factor[5] > 1.06 and factor[1] < 0.94 and factor[4] < 0.94
    spells = calendar.non_wear_spells(400, 365, np.random.default_rng(1))
    share = spells.mean()
    assert 0.005 < share < 0.05  # about two spells of 2-10 days a year
    assert (spells[:, 1:] & spells[:, :-1]).any()  # spells last several days


def test_a_year_long_fleet_has_sudden_gradual_and_recovering_people() -> None:
    from engine.sim.population import CONDITIONS, make_population, make_venues
    from engine.sim.simulate import STREAM_PEOPLE, STREAM_VENUES, rng_for
    from engine.sim.truth import ground_truth

    config = SimConfig(participants=300, app_users=300, days=365, seed=9)
    venues = make_venues(config.venues, rng_for(config, STREAM_VENUES))
    pop = make_population(config, venues, rng_for(config, STREAM_PEOPLE))
    decline = CONDITIONS.index("decline")
    onset, ramp = pop.onset[:, decline], pop.ramp[:, decline]
    has = onset >= 0
    assert has.sum() >= 20 and onset[has].min() >= 91 and onset[has].max() < 365 - 60
    assert (ramp[has] <= 3).any() and (ramp[has] >= 14).any()  # sudden and gradual
    assert (pop.recover[has, decline] > onset[has]).any()
    level = pop.level("decline", config.days)
    assert np.all(level[~has] == 0) and np.allclose(level[has].max(axis=1), 1.0)
    truth = ground_truth(pop, config.days, config.start_day)
    people = truth["flags"]["step_decline"]  # type: ignore[index]
    assert people and all(v["onset"] > config.start for v in people.values())
    assert any(v["recovery"] for v in people.values())
