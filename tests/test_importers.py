"""Vendor importers: each format's fixture maps to exact samples in genki's units,
and what cannot be mapped is dead-lettered with a reason (fixtures: see
tests/fixtures/importers/README.md for the documents they follow)."""

from __future__ import annotations

import datetime as dt
import io
import subprocess
import zipfile
from pathlib import Path

import orjson
import pytest

from engine.importers import ImportOptions, import_source
from engine.importers.cli import ImportSummary, import_paths
from engine.ingest.log import EmbeddedLog
from engine.schemas import METRIC_BY_NAME, SampleSegment
from tests.conftest import genki_cmd

FIXTURES = Path(__file__).parent / "fixtures" / "importers"
NOW_MS = 1_780_000_000_000  # 2026-05-28, after every fixture's data
GARMIN_USER = "4aacafe8-2f5e-4b3f-9d0c-0e3b1f1d5a11"
GARMIN_DEVICE = f"garmin:{GARMIN_USER}"


def ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp() * 1000)


def run_import(data_dir: Path, fmt: str, name: str, **options: str) -> ImportSummary:
    with EmbeddedLog.open(data_dir) as log:
        return import_paths(log, fmt, [str(FIXTURES / name)], ImportOptions(**options),
                            now_ms=NOW_MS)


def stored(data_dir: Path) -> dict[tuple[str, str, str], dict[int, float]]:
    with EmbeddedLog.open(data_dir, writer=False) as log:
        keys = log.stored_sample_keys()
    names = {spec.code: spec.name for spec in METRIC_BY_NAME.values()}
    return {(user, device, names[metric]): samples
            for (user, device, metric), samples in keys.items()}


def dead_letters(data_dir: Path) -> list[tuple[int | None, str]]:
    with EmbeddedLog.open(data_dir, writer=False) as log:
        return sorted((d.offset, d.reason.split(":", 2)[0] + ":" + d.reason.split(":", 2)[1])
                      for d in log.dead_letters())


UNITS = {"steps": "count", "heart_rate": "bpm", "resting_heart_rate": "bpm", "spo2": "%",
         "sleep": "min", "gait_speed": "m/s", "body_weight": "kg", "systolic_bp": "mmHg",
         "diastolic_bp": "mmHg"}
SOURCES = (("apple", "apple_export.xml", {"user_id": "U1"}),
           ("garmin", "garmin_push.json", {}), ("omh", "omh_datapoints.json", {}),
           ("fitbit", "fitbit_more.ndjson", {"user_id": "U1", "units": "en_US"}),
           ("health-connect", "health_connect_records.json", {"user_id": "U1"}),
           ("google-fit", "google_fit_all_data.json", {"user_id": "U1"}))


@pytest.mark.parametrize(("fmt", "name", "options"), SOURCES)
def test_every_wire_record_carries_the_unit_of_its_metric(fmt: str, name: str,
                                                          options: dict) -> None:
    with open(FIXTURES / name, "rb") as stream:
        result = import_source(fmt, stream, ImportOptions(**options))
    assert result.lines
    for line in result.lines:
        segment = SampleSegment.model_validate_json(line)
        assert segment.unit == UNITS[segment.metric.value]


# -- Apple Health ------------------------------------------------------------------------

IPHONE, WATCH = "apple:Hanako-s-iPhone", "apple:Hanako-s-Apple-Watch"


def test_apple_export_maps_each_type_to_its_metric_and_unit(data_dir: Path) -> None:
    summary = run_import(data_dir, "apple", "apple_export.xml", user_id="U1")
    assert stored(data_dir) == {
        ("U1", IPHONE, "steps"): {ms("2026-05-01T08:10:00+09:00"): 500.0,
                                  ms("2026-05-02T09:30:00+00:00"): 1200.0},
        ("U1", WATCH, "heart_rate"): {ms("2026-05-01T07:00:00+09:00"): 72.0},
        ("U1", WATCH, "resting_heart_rate"): {ms("2026-05-01T00:01:00+09:00"): 58.0},
        ("U1", WATCH, "spo2"): {ms("2026-05-01T03:00:00+09:00"): 97.0},  # 0.97 "%"
        ("U1", IPHONE, "gait_speed"): {ms("2026-05-01T08:00:00+09:00"): 1.2},  # 4.32 km/hr
        ("U1", "apple:Health", "body_weight"): {ms("2026-05-01T07:30:00+09:00"): 68.038855,
                                                ms("2026-05-02T07:30:00+09:00"): 67.5},
        ("U1", WATCH, "sleep"): {ms("2026-05-01T01:00:00+09:00"): 90.0,
                                 ms("2026-05-01T01:45:00+09:00"): 45.0},
        ("U1", "apple:Omron", "systolic_bp"): {ms("2026-05-01T07:40:00+09:00"): 128.0},
        ("U1", "apple:Omron", "diastolic_bp"): {ms("2026-05-01T07:40:00+09:00"): 82.0},
    }
    assert (summary.items, summary.samples, summary.records, summary.unmapped) == (20, 13, 9, 7)
    assert summary.log.duplicate_samples == 1  # the iPhone's 08:00-08:10 record, exported twice
    assert summary.log.received == summary.log.accepted + summary.log.rejected == 9 + 7


def test_apple_export_dead_letters_what_it_cannot_map_with_reasons(data_dir: Path) -> None:
    run_import(data_dir, "apple", "apple_export.xml", user_id="U1")
    assert dead_letters(data_dir) == [
        (2, "overlapping_interval: start_ms"),  # the watch's steps overlap the phone's
        (6, "out_of_range: value"),  # heart rate 0
        (14, "unsupported_type: value"),  # awake
        (15, "unsupported_type: value"),  # in bed
        (16, "unsupported_type: type"),  # active energy
        (17, "bad_field: startDate"),
        (18, "too_old_timestamp: endDate"),
    ]


def test_many_apple_records_of_one_source_pack_into_one_segment() -> None:
    records = b"".join(
        b'<Record type="HKQuantityTypeIdentifierHeartRate" sourceName="W" unit="count/min" '
        b'startDate="2026-05-01 07:%02d:00 +0900" endDate="2026-05-01 07:%02d:00 +0900" '
        b'value="70"/>' % (i, i) for i in range(60))
    body = b"<HealthData>" + records + b"</HealthData>"
    result = import_source("apple", io.BytesIO(body), ImportOptions(user_id="U1"))
    (line,) = result.lines
    assert len(orjson.loads(line)["ts_ms"]) == 60 and result.items == 60


def test_the_zip_the_health_app_writes_is_read_like_its_export_xml(tmp_path: Path) -> None:
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("apple_health_export/export_cda.xml", "<ClinicalDocument/>")
        zipped.write(FIXTURES / "apple_export.xml", "apple_health_export/export.xml")
    with EmbeddedLog.open(tmp_path / "a") as log:
        from_zip = import_paths(log, "apple_health", [str(archive)],
                                ImportOptions(user_id="U1"), now_ms=NOW_MS)
    with EmbeddedLog.open(tmp_path / "b") as log:
        from_xml = import_paths(log, "apple", [str(FIXTURES / "apple_export.xml")],
                                ImportOptions(user_id="U1"), now_ms=NOW_MS)
    assert from_zip.as_dict() == from_xml.as_dict()
    assert stored(tmp_path / "a") == stored(tmp_path / "b")


def test_apple_export_needs_a_user(data_dir: Path) -> None:
    summary = run_import(data_dir, "apple", "apple_export.xml")
    assert summary.records == 0 and summary.log.rejected_by_reason["missing_field"] == 15


def test_a_truncated_apple_export_keeps_what_came_before_and_dead_letters_the_rest() -> None:
    body = (FIXTURES / "apple_export.xml").read_bytes()[:4000]
    result = import_source("apple", io.BytesIO(body), ImportOptions(user_id="U1"))
    assert result.lines and result.unmapped[-1].reason.startswith("invalid_source: xml: ")


def test_importing_the_same_export_twice_stores_nothing_new(data_dir: Path) -> None:
    run_import(data_dir, "apple", "apple_export.xml", user_id="U1")
    again = run_import(data_dir, "apple", "apple_export.xml", user_id="U1")
    assert again.log.accepted_samples == 0 and again.log.duplicate_samples == 13


# -- Fitbit ---------------------------------------------------------------------------------

def test_fitbit_intraday_steps_are_local_minutes_ending_at_the_next_minute(data_dir: Path) -> None:
    summary = run_import(data_dir, "fitbit", "fitbit_steps_intraday.json", user_id="U2")
    assert stored(data_dir) == {("U2", "fitbit", "steps"): {
        ms("2026-05-01T08:00:00+09:00"): 0.0, ms("2026-05-01T08:01:00+09:00"): 120.0,
        ms("2026-05-01T08:02:00+09:00"): 115.0, ms("2026-05-02T00:00:00+09:00"): 700.0}}
    assert summary.log.duplicate_samples == 1  # 08:01 listed twice
    assert dead_letters(data_dir) == [(6, "bad_field: value")]


def test_fitbit_local_times_follow_the_given_utc_offset(data_dir: Path) -> None:
    run_import(data_dir, "fitbit", "fitbit_heart_intraday.json", user_id="U2",
               local_offset="-05:00")
    assert stored(data_dir) == {
        ("U2", "fitbit", "heart_rate"): {ms("2026-05-01T06:00:00-05:00"): 64.0,
                                         ms("2026-05-01T06:01:00-05:00"): 66.0},
        ("U2", "fitbit", "resting_heart_rate"): {ms("2026-05-01T12:00:00-05:00"): 61.0}}


def test_fitbit_spo2_sleep_and_weight_in_pounds(data_dir: Path) -> None:
    run_import(data_dir, "fitbit", "fitbit_more.ndjson", user_id="U2", units="en_US")
    assert stored(data_dir) == {
        ("U2", "fitbit", "spo2"): {ms("2026-05-01T03:12:00+09:00"): 95.7},
        ("U2", "fitbit", "sleep"): {ms("2026-05-01T06:40:00+09:00"): 412.0},
        ("U2", "fitbit", "body_weight"): {ms("2026-05-01T07:12:30+09:00"): 68.038855}}
    assert dead_letters(data_dir) == [(2, "out_of_range: value"),
                                      (5, "unsupported_type: body"),
                                      (6, "invalid_json: record")]


def test_fitbit_weight_in_kilograms_by_default(data_dir: Path) -> None:
    run_import(data_dir, "fitbit", "fitbit_more.ndjson", user_id="U2")
    assert stored(data_dir)[("U2", "fitbit", "body_weight")] == {
        ms("2026-05-01T07:12:30+09:00"): 150.0}  # metric: 150 kg is within range


# -- Garmin ---------------------------------------------------------------------------------

def test_garmin_summaries_map_to_utc_times_without_adding_the_local_offset(
        data_dir: Path) -> None:
    summary = run_import(data_dir, "garmin", "garmin_push.json")
    key = (GARMIN_USER, GARMIN_DEVICE)
    assert stored(data_dir) == {
        (*key, "steps"): {ms("2026-05-01T08:15:00+09:00"): 312.0,
                          ms("2026-05-01T08:30:00+09:00"): 18.0},
        (*key, "heart_rate"): {ms("2026-05-01T08:00:00+09:00"): 71.0,
                               ms("2026-05-01T08:15:00+09:00"): 74.0},
        (*key, "resting_heart_rate"): {ms("2026-05-01T12:00:00+09:00"): 59.0},
        (*key, "sleep"): {ms("2026-05-01T06:40:00+09:00"): 410.0},  # deep+light+REM
        (*key, "spo2"): {ms("2026-05-01T00:00:00+09:00"): 96.0,
                         ms("2026-05-01T00:01:00+09:00"): 95.0},
        (*key, "body_weight"): {ms("2026-05-01T07:10:00+09:00"): 61.5},  # 61500 g
    }
    assert summary.log.duplicate_samples == 1  # the re-sent epoch
    assert dead_letters(data_dir) == [(6, "out_of_range: value"),
                                      (8, "missing_field: weightInGrams"),
                                      (9, "unsupported_type: stressDetails")]


def test_garmin_user_and_device_can_be_given(data_dir: Path) -> None:
    run_import(data_dir, "garmin", "garmin_push.json", user_id="P9", device_id="watch-9")
    assert {key[:2] for key in stored(data_dir)} == {("P9", "watch-9")}


# -- Open mHealth --------------------------------------------------------------------------

def test_omh_data_points_map_with_their_units_and_time_frames(data_dir: Path) -> None:
    run_import(data_dir, "omh", "omh_datapoints.json")
    band, user = "omh:Kenko-Band-3", "P00017"
    assert stored(data_dir) == {
        (user, band, "steps"): {ms("2026-05-01T09:00:00+09:00"): 1520.0,
                                ms("2026-05-01T01:00:00+00:00"): 800.0},  # start + 30 min
        (user, band, "heart_rate"): {ms("2026-05-01T07:00:00+09:00"): 68.0},
        (user, band, "resting_heart_rate"): {ms("2026-05-01T06:30:00+09:00"): 57.0},
        (user, band, "spo2"): {ms("2026-05-01T03:00:00+09:00"): 96.0},
        (user, band, "sleep"): {ms("2026-05-01T06:30:00+09:00"): 390.0},  # 6.5 h
        (user, "omh:Omron", "systolic_bp"): {ms("2026-05-01T07:20:00+09:00"): 131.0},
        (user, "omh:Omron", "diastolic_bp"): {ms("2026-05-01T07:20:00+09:00"): 84.0},
        (user, "omh:Scale", "body_weight"): {ms("2026-05-01T07:10:00+09:00"): 64.863709},
    }
    assert dead_letters(data_dir) == [
        (3, "overlapping_interval: start_ms"),  # the phone's steps overlap the band's
        (10, "bad_field: effective_time_frame.date_time"),  # no UTC offset
        (11, "unsupported_type: header.schema_id.name"),
        (12, "unit_mismatch: unit"),
    ]


# -- Android ----------------------------------------------------------------------------------

def test_health_connect_records_map_instants_and_asleep_stages(data_dir: Path) -> None:
    run_import(data_dir, "health-connect", "health_connect_records.json", user_id="U3")
    watch = "hc:Samsung-SM-R930"
    assert stored(data_dir) == {
        ("U3", watch, "steps"): {ms("2026-04-30T23:15:00+00:00"): 640.0},
        ("U3", watch, "heart_rate"): {ms("2026-04-30T22:00:00+00:00"): 66.0,
                                      ms("2026-04-30T22:01:00+00:00"): 69.0},
        ("U3", watch, "resting_heart_rate"): {ms("2026-05-01T03:00:00+09:00"): 60.0},
        ("U3", watch, "spo2"): {ms("2026-04-30T18:00:00+00:00"): 97.0},
        ("U3", watch, "sleep"): {ms("2026-04-30T17:00:00+00:00"): 160.0,  # light
                                 ms("2026-04-30T18:30:00+00:00"): 90.0,  # deep
                                 ms("2026-04-30T21:00:00+00:00"): 150.0},  # REM; awake not
        ("U3", "hc:com.withings.wiscale2", "body_weight"): {
            ms("2026-04-30T22:30:00+00:00"): 59.874193},  # 132 lb
    }
    assert dead_letters(data_dir) == [(2, "overlapping_interval: start_ms"),
                                      (8, "unsupported_type: recordType"),
                                      (9, "bad_field: time")]


def test_google_fit_takeout_points_map_by_data_type(data_dir: Path) -> None:
    summary = run_import(data_dir, "google-fit", "google_fit_all_data.json", user_id="U4")
    watch = "gfit:Google-Pixel-Watch-2-1a2b3c"
    assert stored(data_dir) == {
        ("U4", watch, "steps"): {ms("2026-05-01T08:30:00+09:00"): 512.0},
        ("U4", watch, "heart_rate"): {ms("2026-05-01T07:00:00+09:00"): 71.5},
        ("U4", watch, "sleep"): {ms("2026-05-01T02:00:00+09:00"): 90.0},
        ("U4", watch, "spo2"): {ms("2026-05-01T04:00:00+09:00"): 97.0},
        ("U4", "gfit:com.google.android.apps.fitness", "body_weight"): {
            ms("2026-05-01T07:10:00+09:00"): 62.25},
    }
    assert summary.log.duplicate_samples == 1
    assert dead_letters(data_dir) == [(6, "unsupported_type: fitValue"),
                                      (7, "unsupported_type: dataTypeName")]


# -- the command -----------------------------------------------------------------------------

def test_genki_import_prints_counts_and_refuses_an_unknown_format(data_dir: Path) -> None:
    result = subprocess.run(genki_cmd("import", "garmin", str(FIXTURES / "garmin_push.json"),
                                      "--json", "--data-dir", str(data_dir)),
                            capture_output=True, check=False)
    assert result.returncode == 0, result.stderr
    counts = orjson.loads(result.stdout)
    assert (counts["items"], counts["records"], counts["unmapped"], counts["received"],
            counts["accepted"], counts["rejected"]) == (9, 6, 3, 9, 6, 3)
    bad = subprocess.run(genki_cmd("import", "polar", str(FIXTURES / "garmin_push.json"),
                                   "--data-dir", str(data_dir)), capture_output=True, check=False)
    assert bad.returncode == 2 and b"unknown import format 'polar'" in bad.stderr


@pytest.mark.parametrize("offset", ["+0900", "09:00", "JST"])
def test_a_bad_tz_offset_is_a_usage_error(offset: str) -> None:
    from engine.errors import UsageError
    from engine.importers import check_options

    if offset == "+0900":
        check_options(ImportOptions(local_offset=offset))
        return
    with pytest.raises(UsageError):
        check_options(ImportOptions(local_offset=offset))


def test_a_directory_imports_its_files_in_name_order(tmp_path: Path, data_dir: Path) -> None:
    folder = tmp_path / "takeout"
    folder.mkdir()
    (folder / "a.json").write_bytes((FIXTURES / "fitbit_heart_intraday.json").read_bytes())
    (folder / "b.json").write_bytes((FIXTURES / "fitbit_steps_intraday.json").read_bytes())
    with EmbeddedLog.open(data_dir) as log:
        summary = import_paths(log, "fitbit", [str(folder)], ImportOptions(user_id="U5"),
                               now_ms=NOW_MS)
    assert (summary.items, summary.records) == (3 + 6, 3)
    with EmbeddedLog.open(data_dir, writer=False) as log:
        assert sorted(d.source for d in log.dead_letters()) == ["import:fitbit:b.json"]
