"""The ledger under real processes: concurrent terminals, kill -9, the CLI."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from engine.cli import main
from engine.errors import InsufficientPoints
from engine.faults import CRASH_ENV
from engine.ledger import Ledger
from tests.conftest import REPO_ROOT, genki_cmd
from tests.test_ledger import TS_MS, award, tamper

WORKERS = 4
REDEMPTIONS_PER_WORKER = 25
REDEEM_POINTS = 10
START_BALANCE = 300  # 30 of the 50 distinct keys can succeed
PIPELINE_BATCHES = 8
PIPELINE_BATCH_DRAFTS = 2_000


def terminal(data_dir: str, worker: int, barrier, results) -> None:  # type: ignore[no-untyped-def]
    """A shop terminal: each key is sent twice (a retry); pairs of workers share keys."""
    outcomes: list = []
    try:
        with Ledger.open(Path(data_dir)) as ledger:
            barrier.wait()
            first_key = (worker % 2) * REDEMPTIONS_PER_WORKER
            for number in range(first_key, first_key + REDEMPTIONS_PER_WORKER):
                for _attempt in range(2):
                    outcomes.append(redeem_once(ledger, number))
    except Exception as error:  # noqa: BLE001 - reported to the test, which must not hang
        outcomes.append(("error", repr(error), None))
    results.put(outcomes)


def redeem_once(ledger: Ledger, number: int) -> tuple[str, int | None, str | None]:
    key = f"key-{number}"
    try:
        entry = ledger.redeem("P1", REDEEM_POINTS, "SHOP1", f"T{number % 3}", key,
                              TS_MS + number)
    except InsufficientPoints:
        return (key, None, None)
    return (key, entry.seq, entry.entry_id)


def test_concurrent_redemptions_never_overdraw_or_double_charge(data_dir: Path) -> None:
    with Ledger.open(data_dir) as ledger:
        ledger.append([award("P1", START_BALANCE, "seed")])
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(WORKERS)
    results = context.Queue()
    workers = [context.Process(target=terminal, args=(str(data_dir), n, barrier, results))
               for n in range(WORKERS)]
    for worker in workers:
        worker.start()
    outcomes = [item for _ in workers for item in results.get(timeout=120)]
    assert [item for item in outcomes if item[0] == "error"] == []
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    seqs_by_key: dict[str, set[int]] = {}
    for key, seq, _ in outcomes:
        if seq is not None:
            seqs_by_key.setdefault(key, set()).add(seq)
    assert all(len(seqs) == 1 for seqs in seqs_by_key.values())  # retries: same entry
    assert len(seqs_by_key) == START_BALANCE // REDEEM_POINTS
    with Ledger.open(data_dir) as ledger:
        assert ledger.balance("P1") == 0
        assert ledger.head()["entries"] == 1 + START_BALANCE // REDEEM_POINTS
        assert ledger.verify().ok


def pipeline_drafts(batch: int) -> list:
    return [award(f"P{n % 50}", 1 + n % 3, (batch, n)) for n in range(PIPELINE_BATCH_DRAFTS)]


def run_pipeline(data_dir: str) -> None:
    """Resume from the stored log position, append batches, report each commit."""
    with Ledger.open(Path(data_dir)) as ledger:
        position = ledger.get_meta("log_position")
        start = 0 if position is None else int(position) + 1
        for batch in range(start, PIPELINE_BATCHES):
            ledger.append(pipeline_drafts(batch), meta={"log_position": str(batch)})
            print(batch, flush=True)


def pipeline_process(data_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    code = f"from tests.test_ledger_processes import run_pipeline; run_pipeline({str(data_dir)!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})


def crash_at(data_dir: Path, spec: str) -> None:
    """Run the pipeline until the deterministic crash point kills it (engine/faults.py)."""
    child = pipeline_process(data_dir, {CRASH_ENV: spec})
    child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL


def test_kill_9_mid_append_leaves_whole_batches_and_resumes_to_the_same_ledger(
        tmp_path: Path) -> None:
    killed_dir = tmp_path / "killed"
    # Killed inside the 3rd batch's transaction, then right after the 2nd commit of a resume.
    for spec, position_after in (("ledger_before_commit:3", 1), ("ledger_after_commit:2", 3)):
        crash_at(killed_dir, spec)
        with Ledger.open(killed_dir) as ledger:
            assert int(ledger.get_meta("log_position") or -1) == position_after
            assert ledger.head()["entries"] == (position_after + 1) * PIPELINE_BATCH_DRAFTS
            assert ledger.head()["commit_seq"] == position_after + 1
            assert ledger.verify().ok
    resumed = pipeline_process(killed_dir)
    resumed.communicate(timeout=120)
    assert resumed.returncode == 0
    clean_dir = tmp_path / "clean"
    run_pipeline(str(clean_dir))
    with Ledger.open(killed_dir) as killed, Ledger.open(clean_dir) as clean:
        assert killed.content() == clean.content()
        assert killed.verify().ok


def test_cli_commands_in_process(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Ledger.open(data_dir) as ledger:
        ledger.append([award("P1", 100, "seed")])
    base = ["--data-dir", str(data_dir)]
    assert main(["redeem", "P1", "30", "--shop", "S1", "--terminal", "T1", "--key", "k1",
                 "--ts-ms", str(TS_MS), "--json", *base]) == 0
    redemption = orjson.loads(capsys.readouterr().out)
    assert main(["refund", redemption["entry_id"], "10", "--key", "r1", "--ts-ms", str(TS_MS),
                 *base]) == 0
    assert main(["redeem", "P1", "500", "--shop", "S1", "--terminal", "T1", "--key", "k2",
                 *base]) == 5
    assert "insufficient points: balance 80, requested 500 for user P1" in capsys.readouterr().err
    assert main(["balance", "P1", "--json", *base]) == 0
    assert orjson.loads(capsys.readouterr().out) == {"user_id": "P1", "balance": 80}
    assert main(["history", "P1", "--limit", "2", "--json", *base]) == 0
    page = orjson.loads(capsys.readouterr().out)
    assert [e["kind"] for e in page["entries"]] == ["refund", "redeem"]
    assert page["next_cursor"] == 2
    assert main(["settlement", "--shop", "S1", "--month", "2024-05", *base]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "shop_id,month,redeemed_points,refunded_points,net_points,redemptions",
        "S1,2024-05,30,10,20,1"]
    assert main(["adjust", "P1", "5", "--reason", "", "--staff", "ST1", "--key", "a", *base]) == 2
    assert main(["ledger", "head", "--json", *base]) == 0
    assert orjson.loads(capsys.readouterr().out)["points_outstanding"] == 80
    assert main(["ledger", "rebuild", *base]) == 0
    assert main(["ledger", "expire", "--as-of", "2030-01-01", "--months", "6", *base]) == 0
    assert "expired 80 points in 2 lots of 1 users" in capsys.readouterr().out


def test_cli_verify_exits_non_zero_naming_the_first_bad_seq(data_dir: Path) -> None:
    with Ledger.open(data_dir) as ledger:
        ledger.append([award("P1", 1, n) for n in range(4)])
    ok = subprocess.run(genki_cmd("ledger", "verify", "--json", "--data-dir", str(data_dir)),
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0 and orjson.loads(ok.stdout)["ok"] is True
    tamper(data_dir / "ledger.sqlite", "UPDATE journal SET points = 2 WHERE seq = 2")
    bad = subprocess.run(genki_cmd("ledger", "verify", "--data-dir", str(data_dir)),
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 6
    assert "first bad seq 2" in bad.stderr


def test_raw_sqlite_sees_the_documented_tables(data_dir: Path) -> None:
    Ledger.open(data_dir).close()
    raw = sqlite3.connect(data_dir / "ledger.sqlite")
    tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    views = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type='view'")}
    raw.close()
    assert tables == {"journal", "entry_links", "person_keys", "flag_journal", "flags",
                      "erasures", "erasing", "commits", "balances", "meta"}
    assert views == {"entries"}
