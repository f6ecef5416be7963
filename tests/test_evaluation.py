"""Programme evaluation: care-data linkage, matched comparison, consent, indicators."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from engine.evaluation.evaluate import EvaluationSpec, evaluate, treatment_counts
from engine.evaluation.linkage import (
    LINKAGE_DIR,
    LinkageError,
    key_check,
    link_care_data,
    pseudonymiser,
)
from engine.evaluation.programme import ProgrammeData
from engine.ingest.cli import ingest_paths
from engine.ingest.log import EmbeddedLog
from engine.pipeline import run_pipeline
from engine.sim import SimConfig, simulate
from tests.conftest import genki_cmd

NOW_MS = 1_830_297_600_000
KEY = b"care-linkage-key-0123456789"
OTHER_KEY = b"another-key-9876543210-xyz"
FLEET = SimConfig(participants=8, app_users=400, days=56, seed=5, bad_fraction=0.0,
                  duplicate_fraction=0.0)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fleet")
    simulate(FLEET, out, care_key=KEY)
    return out


@pytest.fixture(scope="module")
def live(fleet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("live")
    with EmbeddedLog.open(data_dir) as log:
        ingest_paths(log, [str(fleet)], now_ms=NOW_MS)
    run_pipeline(data_dir)
    return data_dir


@pytest.fixture(scope="module")
def linked(live: Path, fleet: Path) -> Path:
    link_care_data(live, fleet / "care-data.csv", KEY)
    return live


@pytest.fixture(scope="module")
def evaluated(linked: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("evaluation")
    return evaluate(linked, KEY, EvaluationSpec(bootstrap=20, seed=1), out), out


def _profiles(fleet: Path) -> list[dict]:
    return [orjson.loads(line) for line in (fleet / "00-profiles.ndjson").read_bytes().splitlines()]


def _key_file(tmp_path: Path, key: bytes) -> Path:
    path = tmp_path / "key"
    path.write_bytes(key + b"\n")
    return path


def test_care_file_starts_with_the_key_check_of_its_key(fleet: Path) -> None:
    first, columns = (fleet / "care-data.csv").read_text().splitlines()[:2]
    assert first == f"# genki-care-data v=1 key_check={key_check(KEY)}"
    assert columns == "pseudonym,care_level,certified_on,care_cost_yen_per_month"
    assert key_check(KEY) != key_check(OTHER_KEY)


def test_link_with_a_wrong_key_is_refused_and_links_nothing(live: Path, fleet: Path,
                                                            tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with EmbeddedLog.open(data_dir) as log:
        ingest_paths(log, [str(fleet / "00-profiles.ndjson")], now_ms=NOW_MS)
    result = subprocess.run(genki_cmd("link", "--care-data", str(fleet / "care-data.csv"),
                                      "--pseudonym-key-file", str(_key_file(tmp_path, OTHER_KEY)),
                                      "--data-dir", str(data_dir)),
                            capture_output=True, text=True, check=False)
    assert result.returncode == LinkageError.exit_code
    assert "another key" in result.stderr and "nothing linked" in result.stderr
    assert not (data_dir / LINKAGE_DIR).exists()


def test_link_without_a_key_file_names_the_flag(fleet: Path, tmp_path: Path) -> None:
    result = subprocess.run(genki_cmd("link", "--care-data", str(fleet / "care-data.csv"),
                                      "--data-dir", str(tmp_path)), capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "--pseudonym-key-file is required" in result.stderr
    assert not (tmp_path / LINKAGE_DIR).exists()


def test_link_without_a_key_check_line_is_refused_unless_asked(live: Path, fleet: Path,
                                                               tmp_path: Path) -> None:
    bare = tmp_path / "bare.csv"
    bare.write_text("\n".join((fleet / "care-data.csv").read_text().splitlines()[1:]) + "\n")
    with pytest.raises(LinkageError, match="no key check line"):
        link_care_data(tmp_path / "none", bare, KEY)


def test_link_without_key_check_and_a_wrong_key_fails_the_match_rate(
        live: Path, fleet: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare.csv"
    bare.write_text("\n".join((fleet / "care-data.csv").read_text().splitlines()[1:]) + "\n")
    with pytest.raises(LinkageError, match=r"only 0 of \d+ consenting people were found"):
        link_care_data(live, bare, OTHER_KEY, require_key_check=False)
    assert not (live / LINKAGE_DIR / "care.parquet").exists() or \
        pq.read_table(live / LINKAGE_DIR / "care.parquet").num_rows > 0


def test_link_refuses_a_malformed_line_naming_it(live: Path, fleet: Path, tmp_path: Path) -> None:
    lines = (fleet / "care-data.csv").read_text().splitlines()
    lines[4] = lines[4].split(",")[0] + ",care_9,2029-01-01,1000"
    broken = tmp_path / "broken.csv"
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(LinkageError, match="line 5: care_level 'care_9'"):
        link_care_data(tmp_path / "other", broken, KEY)


def test_link_keeps_exactly_the_consenting_people_by_pseudonym(linked: Path, fleet: Path) -> None:
    pseudo = pseudonymiser(KEY)
    profiles = _profiles(fleet)
    consenting = {pseudo("user", p["user_id"]) for p in profiles if p["research_consent"]}
    table = pq.read_table(linked / LINKAGE_DIR / "care.parquet").to_pydict()
    assert set(table["pseudonym"]) == consenting
    manifest = orjson.loads((linked / LINKAGE_DIR / "manifest.json").read_bytes())
    assert manifest["linked"] == len(consenting)
    assert manifest["records"] == len(profiles)
    assert manifest["records_not_linked"] == len(profiles) - len(consenting)
    raw = b"".join(p.read_bytes() for p in (linked / LINKAGE_DIR).iterdir())
    assert not any(p["user_id"].encode() in raw for p in profiles)


def test_evaluate_analyses_only_consenting_people(evaluated: tuple[dict, Path],
                                                  fleet: Path) -> None:
    report, out = evaluated
    pseudo = pseudonymiser(KEY)
    profiles = _profiles(fleet)
    refused = {pseudo("user", p["user_id"]) for p in profiles if not p["research_consent"]}
    people = pq.read_table(out / "people.parquet").to_pydict()
    assert refused and not refused & set(people["pseudonym"])
    assert report["people"]["left_out_no_consent"] == len(refused)
    assert report["people"]["consenting"] == len(profiles) - len(refused)
    assert report["people"]["analysed"] == len(people["pseudonym"])
    pairs = pq.read_table(out / "pairs.parquet").to_pydict()
    assert not refused & (set(pairs["treated"]) | set(pairs["control"]))


def test_evaluate_treats_exactly_the_people_with_enough_class_days(
        evaluated: tuple[dict, Path], fleet: Path) -> None:
    report, out = evaluated
    truth = orjson.loads((fleet / "care-truth.json").read_bytes())
    assert report["design"]["treatment"] == {"kind": "class", "venues": None,
                                             **truth["treatment"]}
    assert report["design"]["baseline"] == truth["baseline"]
    people = pq.read_table(out / "people.parquet").to_pydict()
    needed = truth["treatment"]["attendances_min"]
    assert people["treated"] == [days >= needed for days in people["attendance_days"]]
    assert report["people"]["treated"] == sum(people["treated"])


def test_evaluate_report_has_balance_effects_and_costs(evaluated: tuple[dict, Path]) -> None:
    report, out = evaluated
    assert report["outcome"] == "care_onset"
    names = [row["covariate"] for row in report["balance"]]
    assert {"age_years", "sex_F", "cohort_watch_trial", "baseline_steps_per_day",
            "baseline_frail"} <= set(names)
    for row in report["balance"]:
        if row["covariate"].startswith(("age_band_", "sex_", "cohort_", "baseline_frail")):
            assert row["smd_after"] == 0.0  # exact strata
    for label in ("effect", "naive"):
        effect = report[label]
        assert set(effect) == {"risk_treated", "risk_control", "risk_difference", "risk_ratio"}
        low, high = effect["risk_difference"]["ci95"]
        assert low <= high
    assert "effect_care_cost_yen_per_year_per_1000" in report
    assert pq.read_table(out / "balance.parquet").num_rows == len(names)
    assert orjson.loads((out / "evaluation.json").read_bytes())["people"] == report["people"]


def test_evaluate_refuses_a_key_other_than_the_linking_one(linked: Path, tmp_path: Path) -> None:
    with pytest.raises(LinkageError, match="linked with another pseudonym key"):
        evaluate(linked, OTHER_KEY, EvaluationSpec(bootstrap=5), tmp_path)


def test_evaluate_steps_outcome_is_a_difference_in_differences(linked: Path,
                                                               tmp_path: Path) -> None:
    report = evaluate(linked, KEY, EvaluationSpec(outcome="steps", bootstrap=5), tmp_path)
    people = pq.read_table(tmp_path / "people.parquet").to_pydict()
    change = np.array(people["outcome"])
    treated = np.array(people["treated"])
    naive = change[treated].mean() - change[~treated].mean()
    assert report["naive"]["difference"]["estimate"] == pytest.approx(naive, abs=1e-6)
    assert report["effect_kind"] == "difference-in-differences of mean daily steps"


def _programme(**columns: np.ndarray) -> ProgrammeData:
    empty_i, empty_o = np.zeros(0, np.int64), np.zeros(0, object)
    base: dict[str, object] = {
        "user_ids": ["A", "B", "C"], "birth_year": np.array([1950, 1950, 1950]),
        "sex": np.array(["F", "M", "F"], dtype=object),
        "cohort": np.array(["app"] * 3, dtype=object), "enrolled_day": np.zeros(3, np.int64),
        "people_left_out_no_consent": 0, "steps_person": empty_i, "steps_day": empty_i,
        "steps": np.zeros(0), "act_person": empty_i, "act_day": empty_i, "act_kind": empty_o,
        "act_venue": empty_o, "flag_person": empty_i, "flag_name": empty_o,
        "flag_raised": np.zeros(0, bool), "flag_day": empty_i, "entry_person": empty_i,
        "entry_kind": empty_o, "entry_rule": empty_o, "entry_points": empty_i,
        "entry_day": empty_i}
    base.update(columns)
    return ProgrammeData(**base)  # type: ignore[arg-type]


def test_treatment_counts_distinct_days_by_kind_venue_or_campaign() -> None:
    data = _programme(
        act_person=np.array([0, 0, 0, 1, 1, 2]), act_day=np.array([10, 10, 11, 12, 30, 11]),
        act_kind=np.array(["class", "class", "class", "checkin", "class", "class"], object),
        act_venue=np.array(["V1", "V1", "V2", "V1", "V2", "V2"], object),
        entry_person=np.array([2, 2, 2, 0]), entry_day=np.array([10, 10, 12, 11]),
        entry_kind=np.array(["award", "award", "award", "award"], object),
        entry_rule=np.array(["campaign.walk", "campaign.walk", "campaign.walk",
                             "campaign.walkabout"], object),
        entry_points=np.array([1, 1, 1, 1]))
    counts, definition = treatment_counts(data, EvaluationSpec(), (10, 20))
    assert counts.tolist() == [2, 0, 1] and definition == {"kind": "class", "venues": None}
    counts, _ = treatment_counts(data, EvaluationSpec(venues=("V1",)), (10, 20))
    assert counts.tolist() == [1, 1, 0]
    counts, definition = treatment_counts(data, EvaluationSpec(campaign="walk"), (10, 20))
    assert counts.tolist() == [0, 0, 2] and definition == {"campaign": "walk"}


def test_simulate_cli_writes_care_data_with_its_key(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    subprocess.run(genki_cmd("simulate", "--participants", "3", "--app-users", "10", "--days",
                             "4", "--out", str(out), "--care-data"), check=True,
                   capture_output=True)
    key = (out / "pseudonym-key.txt").read_bytes().strip()
    lines = (out / "care-data.csv").read_text().splitlines()
    assert lines[0] == f"# genki-care-data v=1 key_check={key_check(key)}"
    assert len(lines) == 2 + 13
    truth = orjson.loads((out / "care-truth.json").read_bytes())
    assert truth["true_risk_ratio"] == 0.7
    assert truth["treatment"] == {"kind": "class", "attendances_min": 1, "since": "2026-09-03",
                                  "until": "2026-09-04"}


def test_report_has_the_evaluation_section_with_aggregates_only(linked: Path, fleet: Path,
                                                                tmp_path: Path) -> None:
    from replay.report import write_report

    evaluate(linked, KEY, EvaluationSpec(bootstrap=5), None)
    html_path, _ = write_report(linked, tmp_path / "report.html", k=1)
    page = html_path.read_text(encoding="utf-8")
    section = page[page.index("<h2>Indicators</h2>"):]
    assert "<h2>Programme evaluation</h2>" in section
    assert section.count("<svg") == 3  # participation, balance, effect
    assert "risk difference" in section and "care cost difference" in section
    pseudo = pseudonymiser(KEY)
    for profile in _profiles(fleet):
        assert profile["user_id"] not in section
        assert pseudo("user", profile["user_id"]) not in section


def test_nearest_matches_stay_in_stratum_and_caliper() -> None:
    from engine.evaluation.matching import Design, nearest_matches

    # logit scores: treated 0 (stratum 1) and 2 (stratum 1), 4 (stratum 2, no control there)
    ps = 1 / (1 + np.exp(-np.array([0.0, 2.0, 4.0, 0.1, 1.8, 2.05, 4.0, -3.0])))
    design = Design(["x"], np.zeros((8, 1)), np.array([1, 1, 2, 1, 1, 1, 3, 1]),
                    np.array([True, True, True, False, False, False, False, False]))
    # caliper = 0.2 x SD of the logits
    caliper = 0.2 * float(np.log(ps / (1 - ps)).std())
    assert caliper > 0.1
    found = nearest_matches(design, ps)
    assert dict(zip(found.treated.tolist(), found.control.tolist(), strict=True)) == {0: 3, 1: 5}
    assert found.treated_unmatched == 1


def test_standardised_mean_difference_uses_the_pooled_sd_before_matching() -> None:
    from engine.evaluation.matching import smd

    treated_all, control_all = np.array([1.0, 2.0, 3.0]), np.array([0.0, 0.0, 3.0, 5.0])
    pooled = np.sqrt((treated_all.var(ddof=1) + control_all.var(ddof=1)) / 2)
    assert smd(treated_all, control_all, treated_all, control_all) == pytest.approx(
        (2.0 - 2.0) / pooled)
    assert smd(np.array([3.0]), np.array([0.0]), treated_all, control_all) == pytest.approx(
        3.0 / pooled)
