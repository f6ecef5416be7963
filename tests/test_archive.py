"""`genki archive`: old log records move to Parquet; runs, replays and status still see them."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import orjson
import pytest

from engine.clock import day_to_iso, tokyo_day
from engine.ingest.archive import archive_dir
from engine.ingest.log import EmbeddedLog
from engine.ingest.reader import expand_paths
from engine.ledger import LEDGER_FILE_NAME, Ledger
from engine.pipeline import run_pipeline
from engine.sim import SimConfig, simulate
from engine.snapshots import remove_snapshots
from tests.conftest import genki_cmd

NOW_MS = 1_798_761_600_000  # 2027-01-01


def _first_ts(line: bytes) -> int:
    ts = orjson.loads(line).get("ts_ms", 0)
    return ts[0] if isinstance(ts, list) else ts


def _samples(data_dir: Path) -> tuple[int, float, int]:
    with EmbeddedLog.open(data_dir, writer=False) as log:
        cols = log.read_samples(0, log.position())
        acts = log.read_activities(0, log.position())
    return len(cols.ts_ms), float(np.sum(cols.value)), len(acts.ts_ms)


@pytest.fixture(scope="module")
def archived(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    fleet = tmp_path_factory.mktemp("fleet")
    simulate(SimConfig(participants=6, app_users=20, days=75, bad_fraction=0.0,
                       duplicate_fraction=0.0), fleet)
    lines = [line for path in expand_paths([str(fleet)])
             for line in Path(path).read_bytes().splitlines() if line.strip()]
    # Arrival in time order, as daily increments would be (profiles first).
    lines.sort(key=lambda line: (b'"ts_ms"' in line, _first_ts(line)))
    data_dir = tmp_path_factory.mktemp("data")
    with EmbeddedLog.open(data_dir) as log:
        for lo in range(0, len(lines), 200):
            log.ingest_lines(lines[lo:lo + 200], "t", lo + 1, NOW_MS)
    run_pipeline(data_dir)
    before = _samples(data_dir)
    first_day = min(tokyo_day(orjson.loads(line)["ts_ms"][0]) for line in lines
                    if b'"ts_ms":[' in line)
    copy = tmp_path_factory.mktemp("copy")
    shutil.copytree(data_dir, copy, dirs_exist_ok=True)
    result = subprocess.run(genki_cmd("archive", "--before", day_to_iso(first_day + 20),
                                      "--json", "--data-dir", str(copy)),
                            capture_output=True, check=True)
    return copy, data_dir, {"before": before, "result": orjson.loads(result.stdout),
                            "lines": lines}


def test_old_records_move_to_private_parquet_files(archived: tuple[Path, Path, dict]) -> None:
    copy, _, facts = archived
    result = facts["result"]
    assert result["archived_sample_records"] > 0 and result["archived_activity_records"] > 0
    assert result["archived_records"] == (result["archived_sample_records"]
                                          + result["archived_activity_records"])
    files = list(archive_dir(copy).glob("*.parquet"))
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


def test_reads_see_archive_and_log_as_one(archived: tuple[Path, Path, dict]) -> None:
    copy, _, facts = archived
    assert _samples(copy) == facts["before"]


def test_status_shows_hot_and_archived(archived: tuple[Path, Path, dict]) -> None:
    copy, _, facts = archived
    shown = orjson.loads(subprocess.run(genki_cmd("status", "--json", "--data-dir", str(copy)),
                                        capture_output=True, check=True).stdout)
    assert shown["archived_records"] == facts["result"]["archived_records"]
    assert shown["hot_records"] == facts["result"]["hot_records"] > 0
    assert shown["archived_through"] == facts["result"]["archived_through"] > 0


def test_a_full_replay_over_the_archive_gives_the_same_ledger(
        archived: tuple[Path, Path, dict]) -> None:
    copy, original, _ = archived
    with Ledger.open(original) as ledger:
        expected = ledger.head()["content_digest"]
    (copy / LEDGER_FILE_NAME).unlink()
    for extra in copy.glob(LEDGER_FILE_NAME + "-*"):
        extra.unlink()
    remove_snapshots(copy)
    run_pipeline(copy)
    with Ledger.open(copy) as ledger:
        assert ledger.head()["content_digest"] == expected


def test_archiving_again_moves_nothing_new(archived: tuple[Path, Path, dict]) -> None:
    copy, _, facts = archived
    again = orjson.loads(subprocess.run(
        genki_cmd("archive", "--before", "2020-01-02", "--json", "--data-dir", str(copy)),
        capture_output=True, check=True).stdout)
    assert again["archived_sample_records"] == again["archived_activity_records"] == 0
    assert again["archived_through"] == facts["result"]["archived_through"]
