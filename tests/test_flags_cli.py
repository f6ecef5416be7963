"""The risk list (frailty status, severities of the ledger's rules) and `genki flags evaluate`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import orjson
import pytest

from engine.ids import derive_id
from engine.ingest.cli import ingest_paths
from engine.ingest.log import EmbeddedLog
from engine.ledger import Ledger
from engine.pipeline import RULES_DEFAULT_PATH, run_pipeline
from engine.pipeline_cli import risk_list
from engine.rules.flags import FLAG_NAMES, frailty_status
from engine.rules.risk import SeverityBook, load_questionnaire, risk_rows
from engine.schemas import FlagEvent
from engine.sim import SimConfig, simulate
from engine.sim.truth import FlagChange, score_flags, score_manifest
from tests.conftest import genki_cmd

NOW_MS = 1_798_761_600_000  # 2027-01-01, after the simulated period


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fleet")
    simulate(SimConfig(participants=16, app_users=24, days=42, seed=5, decline_fraction=0.3,
                       bad_fraction=0.0), out)
    return out


def _run(fleet: Path, data_dir: Path, rules: Path | None = None) -> Path:
    with EmbeddedLog.open(data_dir) as log:
        ingest_paths(log, [str(fleet)], now_ms=NOW_MS)
    run_pipeline(data_dir, rules)
    return data_dir


@pytest.fixture(scope="module")
def live(fleet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(fleet, tmp_path_factory.mktemp("live"))


def event(user: str, flag: str, day: str = "2026-01-02", version: str = "x") -> FlagEvent:
    return FlagEvent(v=1, flag_id=derive_id(user, flag), user_id=user, flag=flag,
                     state="raised", day=day, evidence={}, rules_version=version)


def test_frailty_status_counts_the_wearable_jchs_criteria() -> None:
    assert frailty_status(set()) == "robust"
    assert frailty_status({"low_spo2", "step_decline", "social_isolation"}) == "robust"
    assert frailty_status({"slow_gait"}) == "pre-frail"
    assert frailty_status({"weight_loss", "low_activity"}) == "pre-frail"
    assert frailty_status({"weight_loss", "low_activity", "slow_gait"}) == "frail"


def test_risk_list_sorts_by_status_then_severity() -> None:
    flags = [event("A", "low_spo2"), event("A", "resting_hr_rise"),  # robust, 5 + 3
             event("B", "slow_gait"),  # pre-frail, 4
             event("C", "low_activity"), event("C", "step_decline"),  # pre-frail, 2 + 3
             event("D", "weight_loss"), event("D", "slow_gait"), event("D", "low_activity")]
    rows = risk_rows(flags, SeverityBook())
    assert [(r.user_id, r.frailty_status, r.severity) for r in rows] == [
        ("D", "frail", 10), ("C", "pre-frail", 5), ("B", "pre-frail", 4), ("A", "robust", 8)]


def test_severities_come_from_the_rules_that_built_the_ledger(
        fleet: Path, tmp_path: Path) -> None:
    rules = tmp_path / "heavy.toml"
    rules.write_text(re.sub(r"(?m)^severity = \d+$", "severity = 50",
                            RULES_DEFAULT_PATH.read_text()))
    rows = risk_list(_run(fleet, tmp_path / "d", rules))
    assert rows, "the simulated decliners raise flags"
    assert all(row.severity == 50 * len(row.flags) for row in rows)


def test_genki_flags_lists_status_and_severity(live: Path) -> None:
    done = subprocess.run(genki_cmd("flags", "--json", "--data-dir", str(live)),
                          capture_output=True, check=True)
    rows = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert rows
    for row in rows:
        assert row["frailty_status"] == frailty_status({f["flag"] for f in row["flags"]})
    order = ("frail", "pre-frail", "robust")
    keys = [(order.index(r["frailty_status"]), -r["severity"], r["user_id"]) for r in rows]
    assert keys == sorted(keys)


def test_genki_flags_evaluate_scores_the_ledger_against_the_manifest(
        live: Path, fleet: Path) -> None:
    done = subprocess.run(genki_cmd("flags", "evaluate", "--truth", str(fleet / "manifest.json"),
                                    "--json", "--data-dir", str(live)),
                          capture_output=True, check=True)
    scores = orjson.loads(done.stdout)["scores"]
    assert [s["flag"] for s in scores] == list(FLAG_NAMES)
    with Ledger.open(live) as ledger:
        changes = [FlagChange(e.user_id, e.flag.value, e.state.value, e.day)
                   for e in ledger.all_flag_events()]
    manifest = orjson.loads((fleet / "manifest.json").read_bytes())
    assert scores == [s.as_dict() for s in score_manifest(changes, manifest)]
    table = subprocess.run(genki_cmd("flags", "evaluate", "--truth", str(fleet / "manifest.json"),
                                     "--data-dir", str(live)), capture_output=True, check=True)
    assert b"| low_spo2 |" in table.stdout


def test_scores_count_people_not_events() -> None:
    truth = {"flags": {"low_spo2": {"P1": {"onset": "2026-01-10", "recovery": None},
                                    "P2": {"onset": "2026-01-10", "recovery": None}}},
             "unscored": {"low_spo2": ["P9"]}}
    changes = [FlagChange("P1", "low_spo2", "raised", "2026-01-05"),  # raised before onset,
               FlagChange("P1", "low_spo2", "cleared", "2026-01-07"),  # cleared: no detection
               FlagChange("P1", "low_spo2", "raised", "2026-01-14"),  # found, 4 days
               FlagChange("P3", "low_spo2", "raised", "2026-01-20"),  # false alarm
               FlagChange("P9", "low_spo2", "raised", "2026-01-20")]  # unscored
    [score] = score_flags(changes, truth, users=10, first_day="2026-01-01",
                          last_day="2026-01-30", flags=("low_spo2",))
    assert (score.positives, score.found, score.flagged, score.false_alarms, score.raises) == (
        2, 1, 2, 1, 4)
    assert (score.recall, score.precision, score.onset_to_flag_days_median) == (0.5, 0.5, 4.0)
    assert score.raises_per_1000_person_months == round(1000 * 4 / (10 * 30 / 30.4375), 2)


def test_manifest_ground_truth_has_an_onset_per_person_and_flag(fleet: Path) -> None:
    manifest = orjson.loads((fleet / "manifest.json").read_bytes())
    truth = manifest["ground_truth"]
    assert set(truth) == set(FLAG_NAMES) == set(manifest["ground_truth_unscored"])
    people = [t for flag in truth.values() for t in flag.values()]
    assert people and all(p["onset"] >= manifest["period"]["first_day"] for p in people)


def test_questionnaire_answers_add_exhaustion_and_weakness(tmp_path: Path) -> None:
    answers = tmp_path / "answers.csv"
    answers.write_text("user_id,exhaustion,weakness\nB,yes,1\nC,0,no\n")
    met = load_questionnaire(answers)
    assert met == {"B": 2, "C": 0}
    rows = risk_rows([event("B", "slow_gait"), event("C", "slow_gait")], SeverityBook(), met)
    assert [(r.user_id, r.frailty_status) for r in rows] == [("B", "frail"), ("C", "pre-frail")]


def test_a_malformed_questionnaire_is_refused_with_its_line(live: Path, tmp_path: Path) -> None:
    answers = tmp_path / "answers.csv"
    answers.write_text("user_id,exhaustion,weakness\nB,maybe,1\n")
    done = subprocess.run(genki_cmd("flags", "--questionnaire", str(answers), "--data-dir",
                                    str(live)), capture_output=True, check=False)
    assert done.returncode == 2
    assert b"answers.csv:2: exhaustion must be 1/0, yes/no or true/false" in done.stderr
