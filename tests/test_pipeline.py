"""The embedded pipeline: log → rules → ledger, idempotent and crash safe."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import orjson
import pytest

from engine import pipeline
from engine.errors import RulesError
from engine.faults import CRASH_ENV, POINTS
from engine.ingest.cli import ingest_paths
from engine.ingest.log import EmbeddedLog
from engine.ledger import Ledger
from engine.ledger.writer import AwardWriter
from engine.pipeline import RULES_DEFAULT_PATH, run_pipeline
from engine.sim import SimConfig, simulate
from tests.conftest import genki_cmd

NOW_MS = 1_798_761_600_000  # 2027-01-01, after the simulated period


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory holding a small simulated fleet's log, not yet run."""
    fleet = tmp_path_factory.mktemp("fleet")
    simulate(SimConfig(participants=12, app_users=40, days=35, bad_fraction=0.01,
                       duplicate_fraction=0.02), fleet)
    data_dir = tmp_path_factory.mktemp("ingested")
    with EmbeddedLog.open(data_dir) as log:
        ingest_paths(log, [str(fleet)], now_ms=NOW_MS)
    return data_dir


@pytest.fixture(scope="module")
def reference(ingested: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Head and balances of one uninterrupted run."""
    data_dir = _copy(ingested, tmp_path_factory.mktemp("reference"))
    run_pipeline(data_dir)
    return _state(data_dir)


def _copy(source: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


def _run_with_crash(command: list[str], crash_at: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(command, capture_output=True, check=False,
                          env={**os.environ, CRASH_ENV: crash_at})


def _state(data_dir: Path) -> dict:
    with EmbeddedLog.open(data_dir, writer=False) as log:
        users = sorted(orjson.loads(body)["user_id"] for body in log.profiles())
    with Ledger.open(data_dir) as ledger:
        head = ledger.head()
        assert ledger.verify().ok
        return {"digest": head["content_digest"], "entries": head["entries"],
                "balances": {u: ledger.balance(u) for u in users},
                "flags": sorted(f.flag_id for u in users for f in ledger.flag_history(u))}


def test_uninterrupted_run_awards_points_and_raises_flags(reference: dict) -> None:
    assert reference["entries"] > 100
    assert sum(reference["balances"].values()) > 0
    assert reference["flags"], "the declining minority should raise flags"


def test_second_run_adds_nothing(ingested: Path, reference: dict, tmp_path: Path) -> None:
    data_dir = _copy(ingested, tmp_path / "d")
    run_pipeline(data_dir)
    again = run_pipeline(data_dir)
    assert again.awards_appended == 0 and again.samples == 0
    assert _state(data_dir) == reference


@pytest.mark.parametrize("chunk_records", [7, 250])
def test_chunk_size_does_not_change_the_ledger(ingested: Path, reference: dict, tmp_path: Path,
                                               chunk_records: int) -> None:
    data_dir = _copy(ingested, tmp_path / "d")
    run_pipeline(data_dir, chunk_records=chunk_records)
    assert _state(data_dir) == reference


def test_the_forked_writer_gives_the_ledger_of_appends_in_this_process(
        ingested: Path, reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One chunk (the reference) appends in this process; several, in a forked writer."""
    started: list[AwardWriter | None] = []
    original = AwardWriter.start

    def start(data_dir: Path) -> AwardWriter | None:
        started.append(original(data_dir))
        return started[-1]

    monkeypatch.setattr(pipeline.AwardWriter, "start", start)
    data_dir = _copy(ingested, tmp_path / "d")
    summary = run_pipeline(data_dir, chunk_records=60)
    assert len(started) == 1 and started[0] is not None
    assert summary.awards_appended == reference["entries"]
    assert _state(data_dir) == reference


def test_rules_changed_under_a_live_ledger_are_refused(ingested: Path, tmp_path: Path) -> None:
    data_dir = _copy(ingested, tmp_path / "d")
    run_pipeline(data_dir)
    other = tmp_path / "other.toml"
    text = RULES_DEFAULT_PATH.read_text(encoding="utf-8")
    other.write_text("# reformatted copy\n" + text.replace(" = ", "  =  "), encoding="utf-8")
    changed = tmp_path / "changed.toml"
    assert "points_per_day_max = 3" in text
    changed.write_text(text.replace("points_per_day_max = 3", "points_per_day_max = 2", 1), encoding="utf-8")
    run_pipeline(data_dir, other)  # same rules, other formatting: same version, accepted
    with pytest.raises(RulesError, match="built with rules version"):
        run_pipeline(data_dir, changed)


@pytest.mark.parametrize("crash_at", [
    "pipeline_before_append:1", "pipeline_after_append:1", "pipeline_before_append:3",
    "pipeline_after_append:5",
    # in the forked ledger writer: the run dies with it
    "ledger_before_commit:2", "ledger_after_commit:4"])
def test_kill_9_at_a_crash_point_then_restart_gives_the_uninterrupted_ledger(
        ingested: Path, reference: dict, tmp_path: Path, crash_at: str) -> None:
    data_dir = _copy(ingested, tmp_path / "d")
    command = genki_cmd("run", "--data-dir", str(data_dir), "--chunk-records", "40", "--json")
    killed = _run_with_crash(command, crash_at)
    assert killed.returncode == -signal.SIGKILL
    finished = subprocess.run(command, capture_output=True, check=True)
    assert orjson.loads(finished.stdout)["position_before"] < orjson.loads(
        finished.stdout)["position_after"]
    assert _state(data_dir) == reference


def test_kill_9_repeatedly_at_every_crash_point_gives_the_uninterrupted_ledger(
        ingested: Path, reference: dict, tmp_path: Path) -> None:
    """Eight kills in a row, each a few chunks further, then one run to the end."""
    data_dir = _copy(ingested, tmp_path / "d")
    command = genki_cmd("run", "--data-dir", str(data_dir), "--chunk-records", "40", "--json")
    points = [p for p in POINTS if p.startswith("pipeline_")]
    for attempt in range(8):
        crash_at = f"{points[attempt % len(points)]}:{1 + attempt % 3}"
        killed = _run_with_crash(command, crash_at)
        assert killed.returncode == -signal.SIGKILL, crash_at
    finished = subprocess.run(command, capture_output=True, check=True)
    assert orjson.loads(finished.stdout)["position_after"] > 0
    assert _state(data_dir) == reference


def test_an_unknown_crash_point_is_refused_by_name(ingested: Path, tmp_path: Path) -> None:
    data_dir = _copy(ingested, tmp_path / "d")
    command = genki_cmd("run", "--data-dir", str(data_dir), "--json")
    result = _run_with_crash(command, "pipeline_befor_append:1")
    assert result.returncode != 0
    assert b"unknown crash point 'pipeline_befor_append'" in result.stderr


def test_status_shows_pending_work_until_run(ingested: Path, tmp_path: Path) -> None:
    data_dir = _copy(ingested, tmp_path / "d")

    def status() -> dict:
        result = subprocess.run(genki_cmd("status", "--json", "--data-dir", str(data_dir)),
                                capture_output=True, check=True)
        return orjson.loads(result.stdout)

    before = status()
    assert before["pending_records"] == before["log_position"] > 0
    assert before["received"] == before["accepted"] + before["rejected"]
    run_pipeline(data_dir)
    after = status()
    assert after["pending_records"] == 0
    assert after["processed_position"] == after["log_position"]
    assert after["ledger_entries"] > 0
