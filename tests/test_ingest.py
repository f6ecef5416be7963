from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from pydantic import ValidationError

from engine.ingest.decode import decode_lines
from engine.ingest.log import EmbeddedLog, UserShare
from engine.ingest.reasons import reason_code
from engine.schemas import SampleSegment
from tests.conftest import genki_cmd

NOW_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
T0 = 1_764_547_200_000  # 2025-12-01T00:00:00Z
MINUTE_MS = 60_000


def segment(upload: str, ts: list[int], values: list[float], *, user: str = "W00001",
            device: str = "W00001-watch1", metric: str = "steps", unit: str = "count") -> dict:
    return {"v": 1, "upload_id": upload, "user_id": user, "device_id": device,
            "metric": metric, "unit": unit, "ts_ms": ts, "values": values}


def lines_of(*bodies: object) -> list[bytes]:
    return [body if isinstance(body, bytes) else orjson.dumps(body) for body in bodies]


def ingest(log: EmbeddedLog, *bodies: object) -> dict:
    return log.ingest_lines(lines_of(*bodies), "test", 1, NOW_MS).as_dict()


@pytest.fixture
def log(data_dir: Path):
    with EmbeddedLog.open(data_dir) as opened:
        yield opened


def test_overlapping_segments_count_each_sample_once(log: EmbeddedLog) -> None:
    first = segment("u1", [T0 + i * MINUTE_MS for i in range(10)], [5.0] * 10)
    overlap = segment("u2", [T0 + i * MINUTE_MS for i in range(6, 16)], [5.0] * 10)
    counts = ingest(log, first, overlap)
    assert counts["accepted_samples"] == 16
    assert counts["duplicate_samples"] == 4
    stored = log.stored_sample_keys()[("W00001", "W00001-watch1", 0)]
    assert sorted(stored) == [T0 + i * MINUTE_MS for i in range(16)]


def test_reingesting_the_same_records_adds_no_sample(log: EmbeddedLog) -> None:
    body = segment("u1", [T0, T0 + MINUTE_MS], [3.0, 4.0])
    assert ingest(log, body)["accepted_samples"] == 2
    again = ingest(log, body)
    assert again["accepted_samples"] == 0
    assert again["duplicate_samples"] == 2
    assert again["accepted"] == 1


def test_same_timestamp_on_another_device_is_another_sample(log: EmbeddedLog) -> None:
    counts = ingest(log, segment("u1", [T0], [3.0]), segment("u2", [T0], [3.0], device="phone"))
    assert counts["accepted_samples"] == 2


def test_duplicates_within_one_record_count_once(log: EmbeddedLog) -> None:
    counts = ingest(log, segment("u1", [T0, T0, T0 + MINUTE_MS], [1.0, 1.0, 2.0]))
    assert counts["accepted_samples"] == 2
    assert counts["duplicate_samples"] == 1


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (b"{not json", "invalid_json", "record"),
        (b"[1, 2]", "not_an_object", "record"),
        ({**segment("u", [T0], [1.0]), "v": 2}, "bad_version", "v"),
        ({k: v for k, v in segment("u", [T0], [1.0]).items() if k != "user_id"}, "missing_field", "user_id"),
        ({**segment("u", [T0], [1.0]), "user_id": 17}, "bad_field", "user_id"),
        (segment("u", [T0], [1.0], metric="mood", unit="x"), "unknown_metric", "metric"),
        (segment("u", [T0], [1.0], unit="kg"), "unit_mismatch", "unit"),
        (segment("u", [T0, T0 + 1], [1.0]), "length_mismatch", "values"),
        (segment("u", [T0], [-1.0]), "out_of_range", "values[0]"),
        (segment("u", [T0], [0.0], metric="heart_rate", unit="bpm"), "out_of_range", "values[0]"),
        (segment("u", [T0], [400.0], metric="heart_rate", unit="bpm"), "out_of_range", "values[0]"),
        (segment("u", [T0], [101.0], metric="spo2", unit="%"), "out_of_range", "values[0]"),
        (segment("u", [T0, 4_070_908_800_000], [1.0, 2.0]), "future_timestamp", "ts_ms[1]"),
        (segment("u", [1_500_000_000_000], [1.0]), "too_old_timestamp", "ts_ms[0]"),
        (segment("u", [T0, T0 + 8 * 86_400_000], [1.0, 1.0]), "segment_too_long", "ts_ms"),
        (segment("u", [T0], ["many"]), "bad_field", "values"),
        (segment("u", [T0], [[1.0]]), "bad_field", "values"),
        (segment("u", [T0], [True]), "bad_field", "values"),
        (segment("u", [T0 + 0.5], [1.0]), "bad_field", "ts_ms"),
        ({"v": 1, "hello": "world"}, "unknown_type", "record"),
        ({"v": 1, "event_id": "e", "user_id": "A1", "kind": "dance", "ts_ms": T0, "source": "app"},
         "bad_field", "kind"),
    ],
)
def test_each_fault_is_rejected_with_a_reason_naming_the_field(
        log: EmbeddedLog, body: object, code: str, field: str) -> None:
    counts = ingest(log, body)
    assert counts["rejected"] == 1 and counts["accepted"] == 0
    (letter,) = log.dead_letters()
    assert reason_code(letter.reason) == code
    assert letter.reason.split(": ")[1] == field
    assert letter.raw == lines_of(body)[0]


def test_oversized_record_is_rejected_before_parsing(log: EmbeddedLog) -> None:
    big = b'{"v":1,"pad":"' + b"x" * 1_100_000 + b'"}'
    counts = ingest(log, big)
    assert counts["rejected_by_reason"] == {"oversized": 1}


def test_data_older_than_the_late_window_goes_to_the_dead_letters(log: EmbeddedLog) -> None:
    day = 86_400_000
    counts = ingest(log, segment("u1", [T0], [1.0]), segment("u2", [T0 - 43 * day], [1.0]),
                    segment("u3", [T0 - 41 * day], [1.0]))
    assert counts["rejected_by_reason"] == {"too_late": 1}
    assert counts["accepted_samples"] == 2


def test_late_window_is_per_user(log: EmbeddedLog) -> None:
    day = 86_400_000
    counts = ingest(log, segment("u1", [T0], [1.0]),
                    segment("u2", [T0 - 43 * day], [1.0], user="W00002"))
    assert counts["rejected"] == 0


def test_activity_resent_counts_once_and_conflict_is_rejected(log: EmbeddedLog) -> None:
    event = {"v": 1, "event_id": "e1", "user_id": "A00001", "kind": "checkin", "ts_ms": T0,
             "venue_id": "V001", "source": "venue_qr"}
    counts = ingest(log, event, event, {**event, "venue_id": "V002"})
    assert counts["accepted"] == 2 and counts["duplicate_records"] == 1
    assert counts["rejected_by_reason"] == {"conflict": 1}
    assert len(log.read_activities(0, log.position()).event_id) == 1


def test_received_equals_accepted_plus_rejected_across_runs(log: EmbeddedLog) -> None:
    bodies = [segment(f"u{i}", [T0 + i], [float(i % 3) - 1]) for i in range(50)] + [b"nope"]
    counts = ingest(log, *bodies)
    assert counts["received"] == 51
    assert counts["received"] == counts["accepted"] + counts["rejected"]
    totals = log.counters().as_dict()
    assert totals["received"] == totals["accepted"] + totals["rejected"] == 51
    assert len(log.dead_letters()) == counts["rejected"]


def test_fast_validator_agrees_with_the_pydantic_model() -> None:
    cases = [segment("u", [T0], [1.0]), segment("u", [T0], [1.0], unit="kg"),
             segment("u", [T0, T0 + 1], [1.0]), segment("u", [T0], [-1.0]),
             segment("u", [T0], [97.0], metric="spo2", unit="%"),
             segment("u", [T0], [0.0], metric="heart_rate", unit="bpm"),
             segment("u", [T0, T0 + 8 * 86_400_000], [1.0, 1.0])]
    decoded = decode_lines(lines_of(*cases), NOW_MS)
    fast_ok = set(decoded.segments.index)
    for index, body in enumerate(cases):
        try:
            SampleSegment.model_validate(body)
            model_ok = True
        except ValidationError:
            model_ok = False
        assert model_ok == (index in fast_ok), body


def test_read_back_in_arrival_order_with_watermarks(log: EmbeddedLog) -> None:
    ingest(log, segment("u1", [T0, T0 + MINUTE_MS], [1.0, 2.5]),
           segment("u2", [T0 + 2 * MINUTE_MS], [7.0]))
    columns = log.read_samples(0, log.position())
    assert columns.ts_ms.tolist() == [T0, T0 + MINUTE_MS, T0 + 2 * MINUTE_MS]
    assert columns.value.tolist() == [1.0, 2.5, 7.0]
    assert columns.wm_before_ms.tolist() == [-1, -1, T0 + MINUTE_MS]


def test_second_writer_is_refused(data_dir: Path, log: EmbeddedLog) -> None:
    from engine.ingest.log import LogLocked
    with pytest.raises(LogLocked, match="another genki process"):
        EmbeddedLog.open(data_dir)


def _write_big_input(path: Path, records: int) -> None:
    with path.open("wb") as out:
        for i in range(records):
            user = f"W{i % 40:05d}"
            base = T0 + (i // 40) * 30 * MINUTE_MS
            ts = [base + k * MINUTE_MS for k in range(40)]  # overlaps the next record
            out.write(orjson.dumps(segment(f"u{i}", ts, [float(k) for k in range(40)],
                                           user=user, device=user + "-watch1")) + b"\n")


def test_ingest_survives_kill_9_mid_batch(tmp_path: Path) -> None:
    source = tmp_path / "input.ndjson"
    _write_big_input(source, 6_000)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(genki_cmd("ingest", str(source), "--data-dir", str(clean), "--batch-lines", "200"),
                   check=True, capture_output=True)
    for _ in range(3):
        process = subprocess.Popen(genki_cmd("ingest", str(source), "--data-dir", str(killed),
                                             "--batch-lines", "200"),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_growth(killed / "log.sqlite")
        process.send_signal(signal.SIGKILL)
        process.wait()
    subprocess.run(genki_cmd("ingest", str(source), "--data-dir", str(killed), "--batch-lines", "200"),
                   check=True, capture_output=True)
    with EmbeddedLog.open(clean) as a, EmbeddedLog.open(killed) as b:
        assert a.stored_sample_keys() == b.stored_sample_keys()
        totals = b.counters().as_dict()
        assert totals["received"] == totals["accepted"] + totals["rejected"]


def _wait_for_growth(path: Path, deadline_s: float = 60.0) -> None:
    """Poll until the log file has grown past its first pages (some batches committed)."""
    start_size = path.stat().st_size if path.exists() else 0
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        wal = path.with_name(path.name + "-wal")
        size = (path.stat().st_size if path.exists() else 0) + (wal.stat().st_size if wal.exists() else 0)
        if size > start_size + 200_000:
            return
        time.sleep(0.01)
    raise AssertionError("ingest made no progress")


def test_badly_typed_arrays_are_named_even_among_good_records(log: EmbeddedLog) -> None:
    good = segment("u1", [T0, T0 + MINUTE_MS], [1.0, 2.0])
    counts = ingest(log, good, segment("u2", [T0 + 2 * MINUTE_MS], [[1.0]]),
                    segment("u3", [T0 + 3 * MINUTE_MS], [None]),
                    {**segment("u4", [T0], [1.0]), "user_id": ["W1"]},
                    orjson.dumps(segment("u5", [T0], [1.0])).replace(
                        str(T0).encode(), b"1" + b"0" * 30))
    assert counts["accepted_samples"] == 2
    reasons = [letter.reason.split(": ")[:2] for letter in log.dead_letters()]
    assert reasons == [["bad_field", "values"], ["bad_field", "values"], ["bad_field", "user_id"],
                       ["bad_field", "ts_ms"]]


def test_an_unknown_field_in_a_segment_is_named(log: EmbeddedLog) -> None:
    ingest(log, {**segment("u1", [T0], [1.0]), "battery": 80})
    (letter,) = log.dead_letters()
    assert letter.reason == "bad_field: battery: unknown field"


def test_a_failed_batch_leaves_nothing_behind(log: EmbeddedLog, monkeypatch: pytest.MonkeyPatch) -> None:
    body = segment("u1", [T0, T0 + MINUTE_MS], [1.0, 2.0])

    def fail(*args: object) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(log, "_store_activities", fail)
        with pytest.raises(OSError, match="disk full"):
            ingest(log, body)
    assert log.position() == 0
    counts = ingest(log, body)
    assert counts["accepted_samples"] == 2
    columns = log.read_samples(0, log.position())
    assert columns.users == ["W00001"] and columns.value.tolist() == [1.0, 2.0]


def test_shares_of_people_take_in_people_who_came_after_the_share_was_set(
        data_dir: Path, log: EmbeddedLog) -> None:
    def event(n: int, user: str) -> dict:
        return {"v": 1, "event_id": f"e{n}", "user_id": user, "kind": "meal",
                "ts_ms": T0 + n * MINUTE_MS, "source": "app"}

    users = [f"A{n:05d}" for n in range(12)]
    ingest(log, *(event(n, u) for n, u in enumerate(users[:6])),
           *(segment(f"u{n}", [T0 + n], [10.0], user=u, device=f"{u}-w") for n, u in
             enumerate(users[:6])))
    readers = [EmbeddedLog.open(data_dir, writer=False) for _ in range(3)]
    for index, reader in enumerate(readers):
        reader.read_share(UserShare(index, 3))
    ingest(log, *(event(n + 6, u) for n, u in enumerate(users[6:])),  # new people, new streams
           *(segment(f"v{n}", [T0 + n], [20.0], user=u, device=f"{u}-w") for n, u in
             enumerate(users[6:])))
    end = log.position()
    try:
        for read in ("read_activities", "read_samples"):
            shares = [getattr(reader, read)(0, end) for reader in readers]
            assert sorted(u for share in shares for u in share.users) == users
            assert [sorted(share.users) for share in shares] == [
                sorted(u for u in users if UserShare(i, 3).owns(u)) for i in range(3)]
            assert sum(len(share.ts_ms) for share in shares) == 12
    finally:
        for reader in readers:
            reader.close()
