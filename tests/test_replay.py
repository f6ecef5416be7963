"""Researchers' replay: pseudonymised Parquet, consent, what-if."""

from __future__ import annotations

import math
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from engine.clock import tokyo_days
from engine.errors import UsageError
from engine.ingest.cli import ingest_paths
from engine.ingest.log import EmbeddedLog
from engine.pipeline import RULES_DEFAULT_PATH, run_pipeline
from engine.rules.config import load_rules
from engine.schemas import METRIC_BY_NAME
from engine.sim import SimConfig, simulate
from replay.export import export_embedded
from replay.whatif import whatif
from tests.conftest import genki_cmd

NOW_MS = 1_798_761_600_000
KEY_A = b"research-key-A-0123456789"
KEY_B = b"research-key-B-9876543210"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fleet = tmp_path_factory.mktemp("fleet")
    simulate(SimConfig(participants=15, app_users=45, days=21, bad_fraction=0.0), fleet)
    data_dir = tmp_path_factory.mktemp("live")
    with EmbeddedLog.open(data_dir) as log:
        ingest_paths(log, [str(fleet)], now_ms=NOW_MS)
    run_pipeline(data_dir)
    return data_dir


@pytest.fixture(scope="module")
def exported(live: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("exports") / "a"
    export_embedded(live, target, KEY_A)
    return target


def _users_and_consent(data_dir: Path) -> dict[str, bool]:
    with EmbeddedLog.open(data_dir, writer=False) as log:
        return {p["user_id"]: p["research_consent"] for p in map(orjson.loads, log.profiles())}


def test_row_counts_equal_the_consenting_part_of_the_source(live: Path, exported: Path) -> None:
    consent = _users_and_consent(live)
    with EmbeddedLog.open(live, writer=False) as log:
        samples = log.read_samples(0, log.position())
        activities = log.read_activities(0, log.position())
    allowed = np.array([consent.get(u, False) for u in samples.users])
    expected_samples = int(allowed[samples.user_idx].sum())
    expected_activities = sum(consent.get(activities.users[i], False) for i in activities.user_idx)
    manifest = orjson.loads((exported / "manifest.json").read_bytes())
    assert ds.dataset(exported / "samples", partitioning="hive").count_rows() == expected_samples
    assert manifest["rows"]["samples"] == expected_samples
    assert ds.dataset(exported / "activities").count_rows() == expected_activities
    assert manifest["users_left_out_no_consent"] == sum(1 for c in consent.values() if not c)
    assert manifest["users_left_out_no_consent"] > 0
    assert manifest["rows"]["ledger"] > 0


def test_no_original_id_appears_in_any_output_file(live: Path, exported: Path) -> None:
    users = list(_users_and_consent(live))
    for path in exported.rglob("*"):
        if not path.is_file():
            continue
        raw = path.read_bytes()
        assert not any(u.encode() in raw for u in users), path
        text = str(path.relative_to(exported))
        if path.suffix == ".parquet":
            for column in pq.read_table(path).to_pydict().values():
                values = {str(v) for v in column}
                assert not values & set(users), path
        assert not any(u in text for u in users)


def test_same_key_same_pseudonyms_other_key_disjoint(live: Path, exported: Path,
                                                     tmp_path: Path) -> None:
    export_embedded(live, tmp_path / "again", KEY_A)
    export_embedded(live, tmp_path / "other", KEY_B)

    def users(root: Path) -> set[str]:
        return set(ds.dataset(root / "activities").to_table(columns=["user"])["user"].to_pylist())

    assert users(tmp_path / "again") == users(exported)
    assert not users(tmp_path / "other") & users(exported)


def test_rerun_into_the_same_directory_replaces_it(live: Path, tmp_path: Path) -> None:
    target = tmp_path / "export"
    export_embedded(live, target, KEY_A)
    (target / "stray.txt").write_text("left from an older export")
    export_embedded(live, target, KEY_A)
    assert not (target / "stray.txt").exists()
    assert (target / "manifest.json").exists()


def test_replay_refuses_without_a_key_naming_the_flag(live: Path, tmp_path: Path) -> None:
    result = subprocess.run(genki_cmd("replay", "--to", str(tmp_path / "x"), "--data-dir", str(live)),
                            capture_output=True, check=False)
    assert result.returncode == 2
    assert b"--pseudonym-key-file" in result.stderr


def test_whatif_with_the_live_rules_reproduces_the_ledger(live: Path) -> None:
    result = whatif(live, RULES_DEFAULT_PATH)
    assert result.whatif_points == result.live_points > 0
    assert result.users_affected == 0
    assert result.flags_raised_whatif == result.flags_raised_live


def _daily_steps(data_dir: Path) -> dict[str, dict[int, float]]:
    with EmbeddedLog.open(data_dir, writer=False) as log:
        cols = log.read_samples(0, log.position())
    steps = cols.metric == METRIC_BY_NAME["steps"].code
    totals: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    days = tokyo_days(cols.ts_ms)
    for u, d, v in zip(cols.user_idx[steps].tolist(), days[steps].tolist(),
                       cols.value[steps].tolist(), strict=True):
        totals[cols.users[u]][d] += v
    return totals


def _percent_by_user(data_dir: Path) -> dict[str, int]:
    """Personal step-threshold percent from the rules' age bands (the fleet's year is 2026)."""
    target = load_rules(RULES_DEFAULT_PATH).points.steps.target
    assert all(v == 100 for v in target.sex_percent.model_dump().values())
    percents = {}
    with EmbeddedLog.open(data_dir, writer=False) as log:
        for profile in map(orjson.loads, log.profiles()):
            age, percent = 2026 - profile["birth_year"], target.percent_default
            for band in target.bands:
                if age >= band.age_min:
                    percent = band.percent
            percents[profile["user_id"]] = percent
    return percents


def test_whatif_with_a_lower_top_tier_changes_exactly_the_people_who_reach_it(
        live: Path, tmp_path: Path) -> None:
    text = RULES_DEFAULT_PATH.read_text(encoding="utf-8")
    assert "{ steps_min = 8000, points = 3 }" in text
    other = tmp_path / "lower.toml"
    other.write_text(text.replace("{ steps_min = 8000, points = 3 }",
                                  "{ steps_min = 7000, points = 3 }"), encoding="utf-8")
    out = tmp_path / "diff.parquet"
    before = (live / "ledger.sqlite").read_bytes()
    result = whatif(live, other, out=out)
    assert (live / "ledger.sqlite").read_bytes() == before
    percent = _percent_by_user(live)
    expected = {user for user, days in _daily_steps(live).items()
                if any(math.ceil(70 * percent[user]) <= round(total) < math.ceil(80 * percent[user])
                       for total in days.values())}
    diff = pq.read_table(out).to_pydict()
    changed = {u for u, d in zip(diff["user"], diff["delta_points"], strict=True) if d}
    assert changed == expected and expected
    assert all(d >= 0 for d in diff["delta_points"])
    assert result.users_affected == len(expected)


def test_report_renders_with_plots_and_a_risk_list(live: Path, tmp_path: Path) -> None:
    from html.parser import HTMLParser

    from replay.report import write_report

    html_path, csv_path = write_report(live, tmp_path / "report.html")

    class Collector(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.images: list[str] = []
            self.tables = 0

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            if tag == "img":
                self.images.append(dict(attrs)["src"] or "")
            self.tables += tag == "table"

    parser = Collector()
    parser.feed(html_path.read_text(encoding="utf-8"))
    assert len(parser.images) == 4
    assert all(src.startswith("data:image/png;base64,") and len(src) > 1000 for src in parser.images)
    assert parser.tables >= 4
    rows = csv_path.read_text(encoding="utf-8").splitlines()
    assert rows[0] == "user_id,severity,flag,since,evidence,frailty_status" and len(rows) > 1


def test_report_for_one_month_counts_only_that_month(live: Path, tmp_path: Path) -> None:
    from replay.report import collect

    whole, october = collect(live, None), collect(live, "2026-10")
    assert sum(whole.points_by_rule_week.values()) > 0
    assert not october.points_by_rule_week and not october.active_users


def test_whatif_in_worker_processes_gives_what_one_process_gives(live: Path,
                                                                 tmp_path: Path) -> None:
    other = tmp_path / "lower.toml"
    other.write_text(RULES_DEFAULT_PATH.read_text(encoding="utf-8").replace(
        "{ steps_min = 8000, points = 3 }", "{ steps_min = 7000, points = 3 }"), encoding="utf-8")
    one = whatif(live, other, workers=1, out=tmp_path / "one.parquet", since="2026-09-05")
    three = whatif(live, other, workers=3, out=tmp_path / "three.parquet", since="2026-09-05")
    volatile = {"seconds": 0, "workers": 0, "peak_rss_mib": 0}
    assert {**one.as_dict(), **volatile} == {**three.as_dict(), **volatile}
    assert (one.workers, three.workers) == (1, 3)
    assert one.users_affected > 0 and one.whatif_points > one.live_points
    assert pq.read_table(tmp_path / "one.parquet").to_pydict() == \
        pq.read_table(tmp_path / "three.parquet").to_pydict()


def test_whatif_refuses_a_worker_count_out_of_range(live: Path) -> None:
    with pytest.raises(UsageError, match="workers must be 1..8"):
        whatif(live, RULES_DEFAULT_PATH, workers=0)


def test_award_points_by_user_sums_the_award_entries_of_the_window(live: Path) -> None:
    from engine.ledger import Ledger

    with Ledger.open_read_only(live) as ledger:
        rows = [row for page in ledger.iter_entry_rows(("seq", "user_id", "day", "points",
                                                        "kind")) for row in page]
        for since, until in [(None, None), ("2026-09-05", None), ("2026-09-03", "2026-09-09")]:
            expected: dict[str, int] = defaultdict(int)
            for _, user, day, points, kind in rows:
                if kind == "award" and (since is None or day >= since) and \
                        (until is None or day <= until):
                    expected[user] += points
            assert ledger.award_points_by_user(since, until) == expected
            assert expected


def test_few_open_files_and_small_files_change_the_file_count_not_the_rows(
        live: Path, exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from replay import export

    monkeypatch.setattr(export, "OPEN_FILES_MAX", 3)
    monkeypatch.setattr(export, "PARQUET_ROWS_PER_FILE_MAX", 1_000)
    export.export_embedded(live, tmp_path / "small-files", KEY_A)
    files = list((tmp_path / "small-files" / "samples").rglob("*.parquet"))
    assert any(path.name == "part-1.parquet" for path in files)
    assert len(files) > len(list((exported / "samples").rglob("*.parquet")))
    assert max(pq.ParquetFile(path).metadata.num_rows for path in files) <= 1_000

    def rows(root: Path) -> list[tuple]:
        table = ds.dataset(root / "samples", partitioning="hive").to_table()
        return sorted(zip(*(table.column(name).to_pylist() for name in table.column_names),
                          strict=True))

    assert rows(tmp_path / "small-files") == rows(exported)
