"""Engine snapshots: snapshot + tail equals a full replay; damaged or stale snapshots fall back."""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import orjson
import pytest

from engine.clock import tokyo_day
from engine.faults import CRASH_ENV
from engine.ingest.log import EmbeddedLog
from engine.ingest.reader import expand_paths
from engine.ledger import Ledger
from engine.pipeline import RULES_DEFAULT_PATH, Pipeline, run_pipeline
from engine.rules.config import load_rules
from engine.rules.engine import RulesEngine
from engine.sim import SimConfig, simulate
from engine.snapshots import (
    SnapshotInfo,
    SnapshotInvalid,
    decode,
    read_snapshot,
    snapshot_files,
    write_snapshot,
)
from tests.conftest import genki_cmd

NOW_MS = 1_798_761_600_000  # 2027-01-01, after the simulated period


@pytest.fixture(scope="module")
def lines(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[bytes], int]:
    """A small simulated fleet's input lines, and how many of them are profiles."""
    fleet = tmp_path_factory.mktemp("fleet")
    simulate(SimConfig(participants=10, app_users=30, days=70, bad_fraction=0.01,
                       duplicate_fraction=0.02), fleet)
    out, profiles = [], 0
    for path in expand_paths([str(fleet)]):
        part = [line for line in Path(path).read_bytes().splitlines() if line.strip()]
        if "profiles" in Path(path).name:
            profiles += len(part)
        out += part
    return out, profiles


def _ingest(data_dir: Path, lines: list[bytes], batch_lines: int = 5_000) -> None:
    with EmbeddedLog.open(data_dir) as log:
        for lo in range(0, len(lines), batch_lines):
            log.ingest_lines(lines[lo:lo + batch_lines], "test", lo + 1, NOW_MS)


def _outcome(data_dir: Path) -> dict:
    with EmbeddedLog.open(data_dir, writer=False) as log:
        users = sorted(orjson.loads(body)["user_id"] for body in log.profiles())
    with Ledger.open(data_dir) as ledger:
        return {"digest": ledger.head()["content_digest"],
                "balances": {u: ledger.balance(u) for u in users},
                "flags": sorted((f.flag_id, f.day) for u in users for f in ledger.flag_history(u))}


@pytest.fixture(scope="module")
def reference(lines: tuple[list[bytes], int], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted ingest and run, no snapshot ever read."""
    data_dir = tmp_path_factory.mktemp("reference")
    _ingest(data_dir, lines[0])
    summary = run_pipeline(data_dir)
    assert summary.snapshot_position == 0
    return _outcome(data_dir)


def test_reference_has_awards_and_flags(reference: dict) -> None:
    assert sum(reference["balances"].values()) > 0
    assert reference["flags"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_snapshot_plus_tail_equals_a_full_replay(lines: tuple[list[bytes], int], reference: dict,
                                                 tmp_path: Path, seed: int) -> None:
    """Random cut points, chunk sizes and restarts (a new pipeline per piece, as a new
    `genki run` process would be): each run starts from the previous run's snapshot."""
    rng = random.Random(seed)
    all_lines, profiles = lines
    cuts = sorted(rng.sample(range(profiles + 1, len(all_lines)), 4))
    data_dir = tmp_path / "d"
    previous = 0
    for lo, hi in zip([0, *cuts], [*cuts, len(all_lines)], strict=True):
        _ingest(data_dir, all_lines[lo:hi], batch_lines=rng.choice([300, 5_000]))
        summary = run_pipeline(data_dir, chunk_records=rng.choice([37, 500, 20_000]))
        assert summary.snapshot_position == previous
        assert summary.replayed_records == 0
        previous = summary.position_after
    assert _outcome(data_dir) == reference


def test_a_run_in_a_new_process_reads_only_the_tail(lines: tuple[list[bytes], int],
                                                    tmp_path: Path) -> None:
    all_lines, profiles = lines
    data_dir = tmp_path / "d"
    half = (profiles + len(all_lines)) // 2
    _ingest(data_dir, all_lines[:half])
    first = run_pipeline(data_dir)
    _ingest(data_dir, all_lines[half:])
    result = subprocess.run(genki_cmd("run", "--json", "--data-dir", str(data_dir)),
                            capture_output=True, check=True)
    second = orjson.loads(result.stdout)
    assert second["snapshot_position"] == first.position_after
    assert second["replayed_records"] == 0
    assert second["position_before"] == first.position_after


def _damage(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_bytes_are_detected(lines: tuple[list[bytes], int], tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    _ingest(data_dir, lines[0][:lines[1] + 2_000])
    run_pipeline(data_dir)
    ((_, path),) = snapshot_files(data_dir)
    _, info = read_snapshot(path)
    assert info.rules_version == load_rules(RULES_DEFAULT_PATH).version
    size = path.stat().st_size
    for at in (0, 40, size // 2, size - 1):
        copy = tmp_path / f"copy{at}"
        shutil.copy(path, copy)
        _damage(copy, at)
        with pytest.raises(SnapshotInvalid):
            decode(copy.read_bytes())


def test_a_damaged_or_stale_snapshot_falls_back_and_stays_correct(
        lines: tuple[list[bytes], int], reference: dict, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    all_lines, profiles = lines
    data_dir = tmp_path / "d"
    cuts = [profiles + 3_000, profiles + 6_000, len(all_lines)]
    _ingest(data_dir, all_lines[:cuts[0]])
    run_pipeline(data_dir)
    _ingest(data_dir, all_lines[cuts[0]:cuts[1]])
    run_pipeline(data_dir)
    (newest, newest_path), (older, _) = snapshot_files(data_dir)
    _damage(newest_path, newest_path.stat().st_size // 2)
    _ingest(data_dir, all_lines[cuts[1]:])
    with caplog.at_level(logging.WARNING):
        summary = run_pipeline(data_dir)
    assert "unusable" in caplog.text
    assert summary.snapshot_position == older
    assert summary.replayed_records == newest - older
    assert _outcome(data_dir) == reference
    for _, path in snapshot_files(data_dir):
        path.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_pipeline(data_dir)  # nothing pending: no replay needed at all
    assert _outcome(data_dir) == reference


def test_without_snapshots_a_run_replays_everything_with_a_log_line(
        lines: tuple[list[bytes], int], reference: dict, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    all_lines, profiles = lines
    data_dir = tmp_path / "d"
    _ingest(data_dir, all_lines[:profiles + 4_000])
    first = run_pipeline(data_dir)
    for _, path in snapshot_files(data_dir):
        path.unlink()
    _ingest(data_dir, all_lines[profiles + 4_000:])
    with caplog.at_level(logging.WARNING):
        summary = run_pipeline(data_dir)
    assert "replaying the whole processed log" in caplog.text
    assert summary.snapshot_position == 0
    assert summary.replayed_records == first.position_after
    assert _outcome(data_dir) == reference


@pytest.mark.parametrize("point", ["snapshot_mid_write", "snapshot_before_rename",
                                   "snapshot_after_rename"])
def test_kill_9_while_a_snapshot_is_written(lines: tuple[list[bytes], int], reference: dict,
                                            tmp_path: Path, point: str) -> None:
    all_lines, profiles = lines
    data_dir = tmp_path / "d"
    _ingest(data_dir, all_lines[:profiles + 3_000])
    run_pipeline(data_dir)
    _ingest(data_dir, all_lines[profiles + 3_000:])
    command = genki_cmd("run", "--json", "--data-dir", str(data_dir))
    crashed = subprocess.run(command, capture_output=True, check=False,
                             env={**os.environ, CRASH_ENV: f"{point}:1"})
    assert crashed.returncode == -9
    finished = subprocess.run(command, capture_output=True, check=True)
    assert orjson.loads(finished.stdout)["replayed_records"] == 0
    assert _outcome(data_dir) == reference
    (_, newest), *_ = snapshot_files(data_dir)
    read_snapshot(newest)  # complete and checksummed
    assert not list(newest.parent.glob("*.tmp")) or point != "snapshot_after_rename"


def test_state_round_trips_through_a_snapshot(lines: tuple[list[bytes], int],
                                              tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    _ingest(data_dir, lines[0][:lines[1] + 5_000])
    pipeline = Pipeline(load_rules(RULES_DEFAULT_PATH))
    with EmbeddedLog.open(data_dir, writer=False) as log, Ledger.open(data_dir) as ledger:
        pipeline.run(log, ledger)
    engine = pipeline._engine
    assert engine is not None
    state = engine.state()
    path = write_snapshot(tmp_path, state, pipeline.loaded or _info(pipeline))
    restored = RulesEngine.from_state(engine.rules, None, read_snapshot(path)[0])
    again = restored.state()
    assert set(again.arrays) == set(state.arrays)
    for name, array in state.arrays.items():
        np.testing.assert_array_equal(again.arrays[name], array, err_msg=name)
    assert again.meta == state.meta


def _info(pipeline: Pipeline) -> SnapshotInfo:
    return SnapshotInfo(1, pipeline.rules.version, "", 42)


SHORT_WINDOW_DAYS = 10


@pytest.fixture(scope="module")
def short_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rules whose longest lookback is weeks, not months, so 70 days get pruned."""
    text = RULES_DEFAULT_PATH.read_text(encoding="utf-8")
    short = re.sub(r"^(lookback_days|baseline_days|window_days|recent_days) = \d+", r"\1 = 7",
                   text, flags=re.MULTILINE)
    short = re.sub(r"^(\w*days_with_data_min) = \d+", r"\1 = 4", short, flags=re.MULTILINE)
    assert short != text
    path = tmp_path_factory.mktemp("rules") / "short.toml"
    path.write_text(short, encoding="utf-8")
    return path


def _first_ts(line: bytes) -> tuple[str | None, int | None]:
    try:
        body = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    ts = body.get("ts_ms")
    first = ts[0] if isinstance(ts, list) and ts else ts
    user = body.get("user_id")
    return (user if isinstance(user, str) else None,
            first if isinstance(first, int) and not isinstance(first, bool) else None)


@pytest.fixture(scope="module")
def dormant_lines(lines: tuple[list[bytes], int]) -> list[bytes]:
    """Three people fall silent for weeks and then sync everything they held back."""
    all_lines, profiles = lines
    users = sorted({orjson.loads(line)["user_id"] for line in all_lines[:profiles]})[:3]
    start_ms = min(ts for _, ts in map(_first_ts, all_lines[profiles:]) if ts is not None)
    quiet_from = start_ms + 20 * 86_400_000
    kept, held = [], []
    for line in all_lines:
        user, ts = _first_ts(line)
        (held if user in users and ts is not None and ts >= quiet_from else kept).append(line)
    assert held
    return kept + held


def test_pruned_and_parked_state_gives_the_same_ledger(
        dormant_lines: list[bytes], lines: tuple[list[bytes], int], short_rules: Path,
        tmp_path: Path) -> None:
    profiles = lines[1]
    first_day = tokyo_day(min(ts for _, ts in map(_first_ts, dormant_lines[profiles:])
                              if ts is not None))
    full = tmp_path / "full"
    with EmbeddedLog.open(full, late_window_days=SHORT_WINDOW_DAYS) as log:
        log.ingest_lines(dormant_lines, "t", 1, NOW_MS)
    run_pipeline(full, short_rules)
    for _, path in snapshot_files(full):
        path.unlink()

    pieces = tmp_path / "pieces"
    rng = random.Random(5)
    cuts = sorted(rng.sample(range(profiles + 1, len(dormant_lines)), 6))
    parked_seen, day0_max = 0, 0
    for lo, hi in zip([0, *cuts], [*cuts, len(dormant_lines)], strict=True):
        with EmbeddedLog.open(pieces, late_window_days=SHORT_WINDOW_DAYS) as log:
            log.ingest_lines(dormant_lines[lo:hi], "t", lo + 1, NOW_MS)
        pipeline = Pipeline(load_rules(short_rules), rng.choice([50, 20_000]))
        with EmbeddedLog.open(pieces, writer=False) as log, Ledger.open(pieces) as ledger:
            pipeline.run(log, ledger)
        assert pipeline._engine is not None
        sizes = pipeline._engine.state_summary()
        parked_seen = max(parked_seen, sizes["parked_users"])
        day0_max = max(day0_max, sizes["day0"])
    assert day0_max > first_day + 7  # the axis follows the active people
    assert parked_seen > 0
    assert _outcome(pieces) == _outcome(full)


def test_pruning_mid_run_keeps_the_ledger(dormant_lines: list[bytes], short_rules: Path,
                                         tmp_path: Path) -> None:
    """Snapshots (and the pruning before each) every few hundred positions of one run."""
    outcomes = []
    for name, snapshot_records in (("rare", 10**9), ("often", 300)):
        data_dir = tmp_path / name
        with EmbeddedLog.open(data_dir, late_window_days=SHORT_WINDOW_DAYS) as log:
            log.ingest_lines(dormant_lines, "t", 1, NOW_MS)
        pipeline = Pipeline(load_rules(short_rules), 100, snapshot_records=snapshot_records,
                            snapshot_at_end=False)
        with EmbeddedLog.open(data_dir, writer=False) as log, Ledger.open(data_dir) as ledger:
            pipeline.run(log, ledger)
        outcomes.append(_outcome(data_dir))
    assert len(snapshot_files(tmp_path / "often")) == 2
    assert outcomes[0] == outcomes[1]


def test_a_large_state_is_snapshotted_less_often(dormant_lines: list[bytes], short_rules: Path,
                                                 tmp_path: Path) -> None:
    """Mid-run snapshots are spaced by at least their size / bytes-per-position: with
    one byte a position, the first snapshot's size pushes the next past the log's end.
    The ledger is the same either way."""
    outcomes, written = [], []
    for name, bytes_per_record in (("by count", 10**9), ("by size", 1)):
        data_dir = tmp_path / name
        with EmbeddedLog.open(data_dir, late_window_days=SHORT_WINDOW_DAYS) as log:
            log.ingest_lines(dormant_lines, "t", 1, NOW_MS)
            end = log.position()
        pipeline = Pipeline(load_rules(short_rules), 100, snapshot_records=300,
                            snapshot_bytes_per_record=bytes_per_record, snapshot_at_end=False)
        with EmbeddedLog.open(data_dir, writer=False) as log, Ledger.open(data_dir) as ledger:
            pipeline.run(log, ledger)
        newest = snapshot_files(data_dir)[0][1]
        assert pipeline.snapshot_interval == max(
            300, -(-newest.stat().st_size // bytes_per_record))
        outcomes.append(_outcome(data_dir))
        written.append(pipeline.snapshots_written)
    assert end > 3 * 300
    assert newest.stat().st_size > end  # one byte a position: past the end after the first
    assert written[0] == end // 300 and written[1] == 1
    assert outcomes[0] == outcomes[1]
