"""The simulator's faults, duplicates and resyncs through the real ingest path."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from engine.ingest.cli import ingest_paths
from engine.ingest.log import EmbeddedLog
from engine.ingest.reasons import reason_code
from engine.sim import SimConfig, simulate

NOW_MS = 1_798_761_600_000  # 2027-01-01: after the simulated period


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fleet")
    simulate(SimConfig(participants=20, app_users=60, days=21, bad_fraction=0.02,
                       duplicate_fraction=0.05), out)
    return out


@pytest.fixture(scope="module")
def ingested(fleet: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    data_dir = tmp_path_factory.mktemp("data")
    with EmbeddedLog.open(data_dir) as log:
        counts = ingest_paths(log, [str(fleet)], now_ms=NOW_MS)
    return data_dir, counts.as_dict()


def test_every_injected_fault_lands_in_the_dead_letters_with_its_reason(
        fleet: Path, ingested: tuple[Path, dict]) -> None:
    data_dir, _ = ingested
    expected = {(str(fleet / name), fault["line"]): fault["reason"]
                for name, faults in orjson.loads((fleet / "faults.json").read_bytes()).items()
                for fault in faults}
    with EmbeddedLog.open(data_dir, writer=False) as log:
        actual = {(letter.source, letter.offset): reason_code(letter.reason)
                  for letter in log.dead_letters()}
    assert actual == expected
    manifest = orjson.loads((fleet / "manifest.json").read_bytes())
    assert set(expected.values()) >= {"invalid_json", "oversized", "out_of_range", "too_late",
                                      "future_timestamp", "unit_mismatch", "length_mismatch",
                                      "unknown_metric"}
    assert len(expected) == sum(manifest["faults_by_reason"].values())


def test_received_is_accepted_plus_rejected(fleet: Path, ingested: tuple[Path, dict]) -> None:
    _, counts = ingested
    manifest = orjson.loads((fleet / "manifest.json").read_bytes())
    records = sum(f["records"] for f in manifest["files"].values())
    assert counts["received"] == records
    assert counts["received"] == counts["accepted"] + counts["rejected"]


def test_each_unique_sample_is_stored_exactly_once(fleet: Path, ingested: tuple[Path, dict]) -> None:
    _, counts = ingested
    manifest = orjson.loads((fleet / "manifest.json").read_bytes())
    assert counts["accepted_samples"] == sum(manifest["samples_unique"].values())


def test_reingesting_the_fleet_adds_zero_samples(fleet: Path, ingested: tuple[Path, dict]) -> None:
    data_dir, first = ingested
    with EmbeddedLog.open(data_dir) as log:
        again = ingest_paths(log, [str(fleet)], now_ms=NOW_MS).as_dict()
    assert again["accepted_samples"] == 0
    assert again["duplicate_samples"] == first["accepted_samples"] + first["duplicate_samples"]
