"""The rules file: validation errors name the key, the version ignores formatting."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import orjson
import pytest

from engine.cli import main
from engine.errors import RulesError
from engine.rules.config import RULES_DEFAULT_PATH, default_rules, load_rules, parse_rules
from tests.conftest import genki_cmd

DEFAULT_TEXT = RULES_DEFAULT_PATH.read_text()


def broken(old: str, new: str) -> str:
    assert old in DEFAULT_TEXT
    return DEFAULT_TEXT.replace(old, new, 1)


def error_of(text: str) -> str:
    with pytest.raises(RulesError) as caught:
        parse_rules(text, "rules/default.toml")
    return str(caught.value)


def test_default_rules_load_with_a_16_hex_version() -> None:
    rules = default_rules()
    assert re.fullmatch(r"[0-9a-f]{16}", rules.version)
    assert [t.steps_min for t in rules.points.steps.tiers] == [2000, 5000, 8000]
    assert [t.points for t in rules.points.steps.tiers] == [1, 2, 3]
    assert rules.flags.settle_days == 2
    assert rules.campaigns == []


def test_version_ignores_comments_order_and_formatting() -> None:
    without_comments = "\n".join(line.split("#")[0].rstrip() for line in
                                 DEFAULT_TEXT.splitlines())
    flags_at = without_comments.index("[flags]")
    reordered = without_comments[flags_at:] + "\n" + without_comments[:flags_at]
    respaced = reordered.replace(" = ", "=").replace("2000", "2_000")
    assert parse_rules(respaced).version == default_rules().version


def test_version_changes_with_any_value() -> None:
    changed = parse_rules(broken("ratio_max = 0.65", "ratio_max = 0.75"))
    assert changed.version != default_rules().version


def test_non_increasing_tier_names_the_key_and_the_values() -> None:
    text = broken("{ steps_min = 2000, points = 1 }", "{ steps_min = 5000, points = 1 }")
    assert error_of(text) == (
        "rules/default.toml: points.steps.tiers[1].steps_min: "
        "must be greater than tiers[0] (5000 <= 5000)")


@pytest.mark.parametrize(("old", "new", "message"), [
    ("points_per_day_max = 3", "points_per_day_max = -1",
     "points.steps.points_per_day_max: must be greater than or equal to 0 (got -1)"),
    ("points_per_day_max = 3", "points_per_day_max = \"three\"",
     "points.steps.points_per_day_max: must be a valid integer"),
    ("ratio_max = 0.65", "ratio_max = 1.5",
     "flags.step_decline.ratio_max: must be less than 1 (got 1.5)"),
    ("settle_days = 2", "settle_days = 2\nsettle_dayz = 3", "flags.settle_dayz: unknown key"),
    ("meal = { points = 1, once_per = \"day\" }", "",
     "points.activities.meal: required key is missing"),
    ("meal = { points = 1, once_per = \"day\" }", "meal = { points = 1, once_per = \"week\" }",
     "points.activities.meal.once_per: must be 'venue' or 'day'"),
    ("{ age_min = 75, percent = 75 }", "{ age_min = 60, percent = 75 }",
     "points.steps.target.bands[1].age_min: must be greater than bands[0] (60 <= 65)"),
    ("target_tier = 1", "target_tier = 4",
     "points.streak.target_tier: must name one of the 3 step tiers (4 > 3)"),
    ("{ name = \"7of7\", days_min = 7, points = 2 }", "{ name = \"7of7\", days_min = 5, points = 2 }",
     "points.streak.levels[1].days_min: must be greater than levels[0] (5 <= 5)"),
    ("low_nights_min = 3", "low_nights_min = 30",
     "flags.low_spo2.low_nights_min: exceeds window_nights (30 > 14)"),
])
def test_invalid_values_name_the_key(old: str, new: str, message: str) -> None:
    assert message in error_of(broken(old, new))


CAMPAIGN = '''
[[campaigns]]
name = "autumn"
start = 2025-10-01
end = 2025-10-31
'''


@pytest.mark.parametrize(("body", "message"), [
    ('kind = "multiplier"\napplies_to = ["steps"]',
     "campaigns[0].factor: required for a multiplier campaign"),
    ('kind = "multiplier"\napplies_to = ["steps"]\nfactor = 1.333',
     "campaigns[0].factor: at most 2 decimals (1.333)"),
    ('kind = "bonus"\napplies_to = ["meal"]\npoints = 2\nvenues = ["V1"]',
     "campaigns[0].venues: venues apply only to activity kinds awarded once per venue, not 'meal'"),
    ('kind = "bonus"\napplies_to = ["walking"]\npoints = 2', "campaigns[0].applies_to[0]: must be"),
    ('kind = "bonus"\napplies_to = ["steps"]\npoints = 2\nend = 2025-09-01',
     "end"),
])
def test_invalid_campaigns_name_the_key(body: str, message: str) -> None:
    text = DEFAULT_TEXT + CAMPAIGN + body + "\n"
    if "end = 2025-09-01" in body:
        text = DEFAULT_TEXT + CAMPAIGN.replace("end = 2025-10-31", "end = 2025-09-01") + (
            'kind = "bonus"\napplies_to = ["steps"]\npoints = 2\n')
        message = "campaigns[0].end: is before start (2025-09-01 < 2025-10-01)"
    assert message in error_of(text)


def test_campaign_dates_normalise_to_iso_text() -> None:
    text = DEFAULT_TEXT + CAMPAIGN + 'kind = "bonus"\napplies_to = ["checkin"]\npoints = 2\n'
    quoted = text.replace("start = 2025-10-01", 'start = "2025-10-01"')
    rules = parse_rules(text)
    assert rules.normalised()["campaigns"][0]["start"] == "2025-10-01"
    assert parse_rules(quoted).version == rules.version


def test_toml_syntax_error_names_the_file() -> None:
    assert error_of("[points\n").startswith("rules/default.toml: not valid TOML:")


def test_missing_file_is_a_rules_error(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read rules file"):
        load_rules(tmp_path / "nope.toml")


def test_shipped_example_files_are_valid() -> None:
    for path in sorted(RULES_DEFAULT_PATH.parent.glob("*.toml")):
        assert load_rules(path).version


def test_cli_check_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "check"]) == 0
    out = capsys.readouterr().out
    assert f"ok, version {default_rules().version}" in out
    assert "step tiers: 2000 steps -> 1, 5000 steps -> 2, 8000 steps -> 3 (cap 3/day)" in out


def test_cli_check_of_a_bad_file_names_the_key_and_exits_3(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(broken("{ steps_min = 2000, points = 1 }", "{ steps_min = 5000, points = 1 }"))
    done = subprocess.run(genki_cmd("rules", "check", str(bad)), capture_output=True, text=True,
                          check=False)
    assert done.returncode == 3
    assert "points.steps.tiers[1].steps_min: must be greater than tiers[0] (5000 <= 5000)" in (
        done.stderr)


def test_cli_show_prints_the_normalised_rules(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "show"]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    rules = default_rules()
    assert shown == {"version": rules.version, "rules": rules.normalised()}
