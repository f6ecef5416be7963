"""`genki archive`: old log records move to Parquet; runs, replays and status still see them."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from engine.clock import day_to_iso, tokyo_day
from engine.faults import CRASH_ENV
from engine.ingest.archive import archive_dir
from engine.ingest.log import EmbeddedLog, UserShare
from engine.ingest.reader import expand_paths
from engine.ledger import LEDGER_FILE_NAME, Ledger
from engine.pipeline import RULES_DEFAULT_PATH, run_pipeline
from engine.sim import SimConfig, simulate
from engine.snapshots import remove_snapshots
from replay.whatif import whatif
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
                            "before_iso": day_to_iso(first_day + 20)}


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


def test_kill_9_between_writing_and_registering_leaves_no_trace(
        archived: tuple[Path, Path, dict], tmp_path: Path) -> None:
    _, original, facts = archived
    copy = tmp_path / "d"
    shutil.copytree(original, copy)
    command = genki_cmd("archive", "--before", facts["before_iso"], "--json", "--data-dir",
                        str(copy))
    crashed = subprocess.run(command, capture_output=True, check=False,
                             env={**os.environ, CRASH_ENV: "archive_before_commit:1"})
    assert crashed.returncode == -9
    assert _samples(copy) == facts["before"]  # nothing registered, nothing deleted
    again = orjson.loads(subprocess.run(command, capture_output=True, check=True).stdout)
    assert again["archived_through"] == facts["result"]["archived_through"]
    assert sorted(p.name for p in archive_dir(copy).iterdir()) == sorted(
        p.name for p in archive_dir(archived[0]).glob("*.parquet"))
    assert _samples(copy) == facts["before"]


def _columns(data_dir: Path, lo: int, hi: int, share: UserShare | None = None) -> dict:
    with EmbeddedLog.open(data_dir, writer=False) as log:
        if share is not None:
            log.read_share(share)
        samples, acts = log.read_samples(lo, hi), log.read_activities(lo, hi)
    return {f"samples.{k}": v.tolist() if isinstance(v, np.ndarray) else v
            for k, v in samples.__dict__.items()} | {
        f"activities.{k}": v.tolist() if isinstance(v, np.ndarray) else v
        for k, v in acts.__dict__.items()}


def test_reads_across_the_archive_boundary_equal_the_log_column_for_column(
        archived: tuple[Path, Path, dict]) -> None:
    copy, original, facts = archived
    through = facts["result"]["archived_through"]
    for lo, hi in [(0, through), (through - 37, through + 41), (5, through + 1000),
                   (through, through + 500)]:
        assert _columns(copy, lo, hi) == _columns(original, lo, hi)


def test_shares_of_the_people_split_every_read_without_overlap(
        archived: tuple[Path, Path, dict]) -> None:
    copy, _, facts = archived
    end = facts["result"]["archived_through"] + 800
    whole = _columns(copy, 0, end)
    shares = [_columns(copy, 0, end, UserShare(index, 3)) for index in range(3)]
    for table in ("samples", "activities"):
        people = [set(share[f"{table}.users"]) for share in shares]
        assert set().union(*people) == set(whole[f"{table}.users"])
        assert sum(len(p) for p in people) == len(whole[f"{table}.users"])
        assert sum(len(share[f"{table}.ts_ms"]) for share in shares) == \
            len(whole[f"{table}.ts_ms"])
    first = shares[0]
    rows = [i for i, u in enumerate(whole["samples.user_idx"])
            if whole["samples.users"][u] in set(first["samples.users"])]
    assert first["samples.ts_ms"] == [whole["samples.ts_ms"][i] for i in rows]
    assert first["samples.value"] == [whole["samples.value"][i] for i in rows]


def test_whatif_over_the_archive_in_two_workers_equals_one_process_over_the_log(
        archived: tuple[Path, Path, dict], tmp_path: Path) -> None:
    copy, original, _ = archived
    one = whatif(original, RULES_DEFAULT_PATH, workers=1, out=tmp_path / "one.parquet")
    two = whatif(copy, RULES_DEFAULT_PATH, workers=2, out=tmp_path / "two.parquet")
    volatile = {"seconds": 0, "workers": 0, "peak_rss_mib": 0}
    assert {**one.as_dict(), **volatile} == {**two.as_dict(), **volatile}
    assert (one.workers, two.workers) == (1, 2)
    assert one.whatif_points == one.live_points > 0 and one.samples > 0
    assert pq.read_table(tmp_path / "one.parquet").to_pydict() == \
        pq.read_table(tmp_path / "two.parquet").to_pydict()
