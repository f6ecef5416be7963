"""`genki demo`, the README's first command, end to end as a real process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import orjson

from tests.conftest import genki_cmd


def test_demo_runs_every_stage_and_ends_with_a_verified_ledger(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    result = subprocess.run(
        genki_cmd("demo", "--participants", "15", "--app-users", "40", "--days", "21",
                  "--data-dir", str(data_dir), "--json"),
        capture_output=True, check=False, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    report = orjson.loads(result.stdout.splitlines()[-1])
    ingest = report["ingest"]
    assert ingest["received"] == ingest["accepted"] + ingest["rejected"]
    assert ingest["rejected"] > 0 and ingest["accepted_samples"] > 0
    assert report["run"]["points_awarded"] > 0
    assert any(r[3] == "ok" for r in report["redemptions"])
    assert any(r[3] == "refused" and "insufficient points" in r[4] for r in report["redemptions"])
    assert report["replay"]["rows"]["samples"] > 0
    assert (data_dir / "report.html").exists() and (data_dir / "research" / "manifest.json").exists()
    assert report["verify_ok"] is True
    assert not (data_dir / "simulated" / "10-samples.ndjson").exists()  # in the log now
    head = report["ledger_head"]
    assert head["points_outstanding"] == report["run"]["points_awarded"] - sum(
        r[2] for r in report["redemptions"] if r[3] == "ok")


def test_demo_refuses_a_data_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("something")
    result = subprocess.run(genki_cmd("demo", "--data-dir", str(tmp_path)), capture_output=True,
                            check=False)
    assert result.returncode == 2
    assert b"is not empty" in result.stderr
