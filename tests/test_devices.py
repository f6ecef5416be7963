"""Device enrolment: gateway keys write only for enrolled (person, device) pairs in their
scope, profiles only from staff or enrolment keys; every record keeps its key."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from engine.api.store import ApiStore, Role
from engine.devices import DeviceConflict, DeviceRegistry
from engine.errors import NotFound, UsageError
from engine.ingest.log import OPERATOR_KEY_ID, EmbeddedLog
from tests.conftest import genki_cmd
from tests.test_api import Server
from tests.test_gateway import TS_MS, ndjson, post, segment
from tests.test_importers import FIXTURES, GARMIN_USER, ms

PROFILE = {"v": 1, "user_id": "E1", "birth_year": 1948, "sex": "F", "cohort": "watch_trial",
           "enrolled_on": "2026-04-01", "research_consent": True}


def activity(user: str, event_id: str) -> dict:
    return {"v": 1, "event_id": event_id, "user_id": user, "kind": "checkin",
            "ts_ms": TS_MS, "venue_id": "V1", "source": "app"}


def genki(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(genki_cmd(*args), capture_output=True, check=False)
    assert result.returncode == 0, result.stderr
    return result


def create_key(home: Path, role: Role) -> tuple[str, str]:
    with ApiStore.open(home) as store:
        text, record = store.create_key(role, None, None, TS_MS)
    return text, record.key_id


# -- the registry --------------------------------------------------------------------------

def test_a_device_is_worn_by_one_person_at_a_time(tmp_path: Path) -> None:
    with DeviceRegistry.open(tmp_path) as registry:
        assert not registry.enforced()
        registry.enroll("E1", "w1", "garmin", TS_MS, "test")
        assert registry.enroll("E1", "w1", "garmin", TS_MS + 1, "test").enrolled_ms == TS_MS
        with pytest.raises(DeviceConflict):
            registry.enroll("E2", "w1", "garmin", TS_MS, "test")
        with pytest.raises(NotFound):
            registry.unenroll("E2", "w1", TS_MS, "test")
        registry.unenroll("E1", "w1", TS_MS + 2, "test")
        registry.enroll("E2", "w1", "garmin", TS_MS + 3, "test")
        assert [(e["action"], e["user_id"]) for e in registry.events()] == [
            ("enroll", "E1"), ("unenroll", "E1"), ("enroll", "E2")]
        assert registry.enforced()  # on once enrolment is used
        registry.set_enforced(False)
        assert not registry.enforced()


@pytest.mark.parametrize(("user", "device", "vendor"), [
    ("E1\n", "w1", "garmin"), ("E1", "w1\n", "garmin"), ("E1", "w1", "garmin\n"),
    ("E 1", "w1", "garmin"), ("E1", "w" * 65, "garmin"), ("E1", "w1", "v" * 33), ("", "w1", "garmin")])
def test_an_id_with_a_trailing_newline_or_a_foreign_character_is_refused(
        tmp_path: Path, user: str, device: str, vendor: str) -> None:
    with DeviceRegistry.open(tmp_path) as registry:
        with pytest.raises(UsageError, match="characters of A-Z"):
            registry.enroll(user, device, vendor, TS_MS, "test")
        assert registry.events() == []


def test_genki_devices_enroll_list_unenroll_bind_enforce(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    genki("devices", "enroll", "E1", "garmin:abc", "--vendor", "garmin", *data)
    genki("devices", "enroll", "E2", "fitbit-1", "--vendor", "fitbit", *data)
    listed = genki("devices", "list", "--json", *data).stdout.splitlines()
    assert [(d["user_id"], d["device_id"], d["vendor"]) for d in map(orjson.loads, listed)] == [
        ("E1", "garmin:abc", "garmin"), ("E2", "fitbit-1", "fitbit")]
    genki("devices", "unenroll", "E2", "fitbit-1", *data)
    assert len(genki("devices", "list", "--json", *data).stdout.splitlines()) == 1
    scope = orjson.loads(genki("devices", "bind", "k123", "--vendor", "garmin", "--profiles",
                               "--json", *data).stdout)
    assert scope == {"key_id": "k123", "vendors": ["garmin"], "profiles": True}
    assert orjson.loads(genki("devices", "enforce", "off", "--json", *data).stdout) == {
        "enforced": False}
    created = orjson.loads(genki("keys", "create", "--role", "gateway", "--vendor", "garmin",
                                 "--json", *data).stdout)
    assert created["scope"] == {"key_id": created["key_id"], "vendors": ["garmin"],
                                "profiles": False}
    refused = subprocess.run(genki_cmd("devices", "unenroll", "E2", "fitbit-1", *data),
                             capture_output=True, check=False)
    assert refused.returncode == 4 and b"not enrolled" in refused.stderr


# -- the gateway ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("devices-home")


@pytest.fixture(scope="module")
def keys(home: Path) -> dict[str, tuple[str, str]]:
    return {name: create_key(home, role) for name, role in (
        ("acme", Role.gateway), ("other", Role.gateway), ("enrol", Role.gateway),
        ("garmin", Role.gateway), ("staff", Role.staff))}


@pytest.fixture(scope="module")
def server(home: Path, keys: dict[str, tuple[str, str]]) -> Iterator[Server]:
    running = Server(home)
    staff = keys["staff"][0]
    with running.client(staff) as client:
        for user, device, vendor, key in (("E1", "d1", "acme", None),
                                          ("E5", "d5", "other", keys["other"][1]),
                                          ("EG", f"garmin:{GARMIN_USER}", "garmin", None)):
            response = client.post("/v1/devices/enroll", json={
                "user_id": user, "device_id": device, "vendor": vendor, "key_id": key})
            assert response.status_code == 201, response.text
        for name, body in (("acme", {"vendors": ["acme"]}), ("enrol", {"profiles": True}),
                           ("garmin", {"vendors": ["garmin"]})):
            response = client.put(f"/v1/gateway-keys/{keys[name][1]}/scope", json=body)
            assert response.status_code == 200, response.text
    yield running
    running.stop()


def reasons(counts: dict) -> dict[str, int]:
    return counts["rejected_by_reason"]


def test_a_vendor_key_writes_only_for_enrolled_pairs_of_its_vendor(
        server: Server, keys: dict[str, tuple[str, str]]) -> None:
    body = ndjson(segment("E1", [TS_MS], [100.0]), segment("E1", [TS_MS], [5.0]) | {
        "device_id": "d2"}, segment("E9", [TS_MS], [7.0]),
        segment("E5", [TS_MS], [8.0]) | {"device_id": "d5"})
    status, counts = post(server, keys["acme"][0], "/v1/ingest", body)
    assert status == 200
    assert (counts["received"], counts["accepted"], reasons(counts)) == (
        4, 1, {"not_enrolled": 3})


def test_a_device_bound_to_a_key_accepts_that_key_only(
        server: Server, keys: dict[str, tuple[str, str]]) -> None:
    body = ndjson(segment("E5", [TS_MS + 60_000], [9.0]) | {"device_id": "d5"})
    assert post(server, keys["other"][0], "/v1/ingest", body)[1]["accepted"] == 1
    assert reasons(post(server, keys["enrol"][0], "/v1/ingest", body)[1]) == {
        "not_enrolled": 1}


def test_profiles_and_consent_only_from_staff_or_enrolment_keys(
        server: Server, keys: dict[str, tuple[str, str]]) -> None:
    consent = {"v": 1, "user_id": "E1", "change": "research_consent_given",
               "effective_ts_ms": TS_MS, "consent_seq": 1, "source": "app"}
    assert reasons(post(server, keys["acme"][0], "/v1/ingest", ndjson(PROFILE, consent))[1]) \
        == {"not_permitted": 2}
    body = ndjson(PROFILE)
    assert post(server, keys["enrol"][0], "/v1/ingest", body)[1]["accepted"] == 1
    assert post(server, keys["staff"][0], "/v1/ingest", body)[1]["accepted"] == 1


def test_activities_need_a_person_with_a_device_in_scope(
        server: Server, keys: dict[str, tuple[str, str]]) -> None:
    body = ndjson(activity("E1", "ev-e1"), activity("E9", "ev-e9"))
    counts = post(server, keys["acme"][0], "/v1/ingest", body)[1]
    assert (counts["accepted"], reasons(counts)) == (1, {"not_enrolled": 1})


def test_garmin_push_finds_the_person_enrolled_with_the_garmin_account(
        server: Server, home: Path, keys: dict[str, tuple[str, str]]) -> None:
    raw = (FIXTURES / "garmin_push.json").read_bytes()
    refused = post(server, keys["acme"][0], "/v1/push/garmin", raw, content_type=JSON_TYPE)[1]
    assert refused["accepted"] == 0 and reasons(refused)["not_enrolled"] == 11
    counts = post(server, keys["garmin"][0], "/v1/push/garmin", raw, content_type=JSON_TYPE)[1]
    assert counts["accepted"] == 6
    with EmbeddedLog.open(home, writer=False) as log:
        stored = log.stored_sample_keys()
    assert stored[("EG", f"garmin:{GARMIN_USER}", 4)] == {ms("2026-05-01T06:40:00+09:00"): 410.0}


def test_every_record_remembers_the_key_that_submitted_it(
        server: Server, home: Path, keys: dict[str, tuple[str, str]]) -> None:
    body = ndjson(segment("E1", [TS_MS + 120_000], [11.0]))
    post(server, keys["acme"][0], "/v1/ingest", body)
    status = orjson.loads(genki("status", "--json", "--data-dir", str(home)).stdout)
    by_key = status["by_key"]
    acme = keys["acme"][1]
    assert by_key[acme]["received"] == by_key[acme]["accepted"] + by_key[acme]["rejected"]
    assert by_key[acme]["records"] >= 2
    with EmbeddedLog.open(home, writer=False) as log:
        positions = log.positions_of_key(acme)
        assert sum(last - first + 1 for first, last in positions) == by_key[acme]["records"]
        assert not log.positions_of_key("k-never-used")
    shown = orjson.loads(genki("provenance", acme, "--json", "--data-dir", str(home)).stdout)
    assert shown == {"key_id": acme, "counts": by_key[acme], "excluded": False,
                     "positions": [list(p) for p in positions]}


def test_the_operator_cli_is_trusted_and_attributed_to_operator(tmp_path: Path) -> None:
    with DeviceRegistry.open(tmp_path) as registry:
        registry.enroll("E1", "d1", "acme", TS_MS, "test")
        assert registry.enforced()
    source = tmp_path / "in.ndjson"
    source.write_bytes(ndjson(segment("E7", [TS_MS], [3.0]), PROFILE))
    counts = orjson.loads(genki("ingest", str(source), "--json", "--data-dir",
                                str(tmp_path)).stdout)
    assert (counts["accepted"], counts["rejected"]) == (2, 0)
    with EmbeddedLog.open(tmp_path, writer=False) as log:
        assert log.counts_by_key()[OPERATOR_KEY_ID]["accepted"] == 2


def test_staff_device_endpoints_need_a_staff_key(
        server: Server, keys: dict[str, tuple[str, str]]) -> None:
    with server.client(keys["acme"][0]) as client:
        response = client.post("/v1/devices/enroll", json={"user_id": "X", "device_id": "x"})
    assert response.status_code == 403
    with server.client(keys["staff"][0]) as client:
        listed = client.get("/v1/devices", params={"user_id": "E1"}).json()
        conflict = client.post("/v1/devices/enroll", json={"user_id": "E2", "device_id": "d1"})
    assert [d["device_id"] for d in listed["devices"]] == ["d1"] and listed["enforced"]
    assert conflict.status_code == 409


JSON_TYPE = "application/json"


def test_an_unbound_gateway_key_writes_enrolled_pairs_only(tmp_path: Path) -> None:
    with DeviceRegistry.open(tmp_path) as registry:
        registry.enroll("E1", "d1", "garmin", TS_MS, "test")
        registry.enroll("E2", "d2", "fitbit", TS_MS, "test", key_id="k-fitbit")
        policy = registry.policy_for("k-plain")
    assert policy.device_problem("E1", "d1") is None
    assert policy.device_problem("E1", "d9") == "device d9 is not enrolled for person E1"
    assert policy.device_problem("E3", "d1") == "device d1 is not enrolled for person E3"
    assert policy.device_problem("E2", "d2") == (
        "device d2 is enrolled for key k-fitbit, outside the scope of key k-plain "
        "(vendors: none)")


def test_the_records_of_an_excluded_key_are_left_out_of_later_reads(tmp_path: Path) -> None:
    with EmbeddedLog.open(tmp_path) as log:
        log.ingest_lines([orjson.dumps(segment("E1", [TS_MS], [100.0]))], "t", 1, TS_MS,
                         key_id="k-good")
        log.ingest_lines([orjson.dumps(segment("E2", [TS_MS], [900.0])),
                          orjson.dumps(activity("E2", "ev-leak"))], "t", 1, TS_MS,
                         key_id="k-leaked")
        log.ingest_lines([orjson.dumps(segment("E1", [TS_MS + 60_000], [50.0]))], "t", 1,
                         TS_MS, key_id="k-good")
        assert log.read_samples(0, log.position()).value.tolist() == [100.0, 900.0, 50.0]
        log.exclude_key("k-leaked", TS_MS)
        samples = log.read_samples(0, log.position())
        assert (samples.users, samples.value.tolist()) == (["E1"], [100.0, 50.0])
        assert log.read_activities(0, log.position()).event_id == []
        log.exclude_key("k-leaked", TS_MS, excluded=False)
        assert len(log.read_samples(0, log.position()).value) == 3
    shown = orjson.loads(genki("provenance", "k-leaked", "--exclude", "--json", "--data-dir",
                               str(tmp_path)).stdout)
    assert shown["excluded"] and shown["positions"] == [[2, 3]]


def test_devices_can_be_enrolled_and_unenrolled_restfully(
        server: Server, keys: dict[str, tuple[str, str]]) -> None:
    with server.client(keys["staff"][0]) as client:
        created = client.post("/v1/devices", json={"user_id": "E8", "device_id": "d8"})
        listed = client.get("/v1/devices", params={"user_id": "E8"}).json()["devices"]
        removed = client.delete("/v1/devices/d8")
        again = client.delete("/v1/devices/d8")
    assert created.status_code == 201 and [d["device_id"] for d in listed] == ["d8"]
    assert removed.status_code == 200 and removed.json()["user_id"] == "E8"
    assert again.status_code == 404
