"""The HTTP API, end to end against a real uvicorn server in a subprocess (`genki serve`)."""

from __future__ import annotations

import base64
import contextlib
import itertools
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest

from engine.api.store import ApiStore, Claim, Role
from engine.api.tokens import TokenBox, fingerprint, load_or_create_secret
from engine.entries import EntryDraft
from engine.ids import derive_id
from engine.ingest.log import EmbeddedLog
from engine.ledger.commands import redeem_id
from engine.ledger.store import Ledger
from engine.schemas import EntryKind, FlagEvent
from tests.conftest import REPO_ROOT, genki_cmd

SERVER_START_S_MAX = 60.0
SERVER_STOP_S_MAX = 30.0
TS_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
_counter = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}{os.getpid()}x{next(_counter)}"


class Server:
    """`genki serve --port 0` in a subprocess; the URL comes from its first line."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # stderr goes to a file: an undrained pipe would block the server once full.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(
            genki_cmd("serve", "--port", "0", "--data-dir", str(data_dir), *args),
            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=self.log)
        self.url = self._read_url()

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def _read_url(self) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + SERVER_START_S_MAX
        ready, _, _ = select.select([self.process.stdout], [], [], SERVER_START_S_MAX)
        line = self.process.stdout.readline().decode() if ready else ""
        if "http://" not in line or time.monotonic() > deadline:
            self.stop()
            raise AssertionError(f"server did not start: {line!r} {self.stderr()}")
        url = line.split(" on ", 1)[1].split()[0]
        # The socket listens before uvicorn serves: this request waits in the backlog.
        response = httpx.get(url + "/healthz", timeout=SERVER_START_S_MAX)
        assert response.status_code == 200, response.text
        return url

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=SERVER_STOP_S_MAX)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"server ignored SIGTERM: {self.stderr()[-2000:]}") from None
        finally:
            assert self.process.stdout is not None
            self.process.stdout.close()
            self.log.close()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("api-home")


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    running = Server(home)
    yield running
    running.stop()


def make_key(data_dir: Path, role: Role, shop_id: str | None = None) -> str:
    with ApiStore.open(data_dir) as store:
        key_text, _ = store.create_key(role, shop_id, None, TS_MS)
    return key_text


@pytest.fixture(scope="module")
def keys(home: Path) -> dict[str, str]:
    return {"app": make_key(home, Role.app), "gateway": make_key(home, Role.gateway),
            "staff": make_key(home, Role.staff), "shop_a": make_key(home, Role.shop, "SHOP_A"),
            "shop_b": make_key(home, Role.shop, "SHOP_B")}


def award(data_dir: Path, user_id: str, *points: int) -> None:
    drafts = [EntryDraft(derive_id("test-award", user_id, i, p), user_id, EntryKind.award, p,
                         "2026-01-01", TS_MS + i, "steps_tier_1", None, "test")
              for i, p in enumerate(points)]
    with Ledger.open(data_dir) as ledger:
        ledger.append(drafts)


def token_for(server: Server, keys: dict[str, str], user_id: str) -> str:
    with server.client(keys["app"]) as app:
        response = app.post(f"/v1/users/{user_id}/redeem-tokens")
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def redeem(client: httpx.Client, token: str, points: int, key: str,
           terminal_id: str = "T1") -> httpx.Response:
    return client.post("/v1/redemptions", headers={"Idempotency-Key": key},
                       json={"token": token, "points": points, "terminal_id": terminal_id})


def balance(server: Server, keys: dict[str, str], user_id: str) -> int:
    with server.client(keys["app"]) as app:
        return int(app.get(f"/v1/users/{user_id}/balance").json()["balance"])


# -- reads -------------------------------------------------------------------------

def test_healthz_needs_no_key(server: Server) -> None:
    with server.client() as anonymous:
        response = anonymous.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_openapi_and_docs_list_every_endpoint(server: Server) -> None:
    with server.client() as anonymous:
        paths = anonymous.get("/openapi.json").json()["paths"]
        docs = anonymous.get("/docs")
    assert docs.status_code == 200
    assert set(paths) == {
        "/healthz", "/v1/users/{user_id}/balance", "/v1/users/{user_id}/history",
        "/v1/users/{user_id}/flags", "/v1/flags", "/v1/ingest", "/v1/redemptions",
        "/v1/refunds", "/v1/adjustments", "/v1/shops/{shop_id}/settlement",
        "/v1/users/{user_id}/redeem-tokens", "/v1/ingest/{format_name}", "/v1/push/garmin",
        "/v1/push/garmin/{summary_type}", "/v1/devices", "/v1/devices/enroll", "/v1/devices/{device_id}",
        "/v1/devices/unenroll", "/v1/gateway-keys/{key_id}/scope", "/v1/users/{user_id}/erase"}


def test_balance_is_the_sum_of_the_users_entries(server: Server, home: Path,
                                                 keys: dict[str, str]) -> None:
    user = unique("bal")
    award(home, user, 3, 2, 5)
    with server.client(keys["app"]) as app:
        response = app.get(f"/v1/users/{user}/balance")
    assert response.status_code == 200
    assert response.json() == {"user_id": user, "balance": 10}


def test_history_pages_newest_first_with_reasons(server: Server, home: Path,
                                                 keys: dict[str, str]) -> None:
    user = unique("hist")
    award(home, user, 1, 2, 3, 4, 5)
    pages = []
    with server.client(keys["staff"]) as staff:
        cursor = None
        while True:
            params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
            page = staff.get(f"/v1/users/{user}/history", params=params).json()
            pages.append([entry["points"] for entry in page["entries"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert pages == [[5, 4], [3, 2], [1]]
    assert page["entries"][0]["reason"] == "awarded by rule steps_tier_1"


def test_history_page_size_is_limited(server: Server, keys: dict[str, str]) -> None:
    with server.client(keys["app"]) as app:
        response = app.get("/v1/users/anyone/history", params={"limit": 501})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "invalid_request"


def test_flags_of_a_user_and_the_staff_risk_list(server: Server, home: Path,
                                                 keys: dict[str, str]) -> None:
    user = unique("flag")
    events = [FlagEvent(v=1, flag_id=derive_id(user, flag, state), user_id=user, flag=flag,
                        state=state, day=day, evidence={"mean_steps": 1200}, rules_version="t")
              for flag, state, day in (("low_activity", "raised", "2026-01-02"),
                                       ("slow_gait", "raised", "2026-01-02"),
                                       ("slow_gait", "cleared", "2026-01-05"))]
    with Ledger.open(home) as ledger:
        ledger.append([], flags=events)
    with server.client(keys["app"]) as app:
        mine = app.get(f"/v1/users/{user}/flags").json()
    with server.client(keys["staff"]) as staff:
        listed = staff.get("/v1/flags").json()
        everyone = listed["flags"]
    assert [f["flag"] for f in mine["current"]] == ["low_activity"]
    assert mine["frailty_status"] == "pre-frail"  # one revised J-CHS criterion raised
    assert [p for p in listed["people"] if p["user_id"] == user] == [
        {"user_id": user, "frailty_status": "pre-frail", "severity": 2,
         "flags": ["low_activity"]}]
    assert [(f["flag"], f["state"]) for f in mine["history"]] == [
        ("low_activity", "raised"), ("slow_gait", "raised"), ("slow_gait", "cleared")]
    assert [(f["flag"], f["evidence"]) for f in everyone if f["user_id"] == user] == [
        ("low_activity", {"mean_steps": 1200})]


# -- ingest ------------------------------------------------------------------------

def activity(event_id: str, **fields: object) -> dict[str, object]:
    record: dict[str, object] = {"v": 1, "event_id": event_id, "user_id": "u-ingest",
                                 "kind": "checkin", "ts_ms": time.time_ns() // 1_000_000
                                 - 3_600_000, "venue_id": "hall", "source": "app"}
    return record | fields


def test_ingest_ndjson_counts_accepted_and_dead_letters(server: Server,
                                                        keys: dict[str, str]) -> None:
    body = b"\n".join([orjson.dumps(activity(unique("ev"))),
                       orjson.dumps(activity(unique("ev"), kind="karaoke")), b""])
    with server.client(keys["gateway"]) as gateway:
        response = gateway.post("/v1/ingest", content=body,
                                headers={"Content-Type": "application/x-ndjson"})
    assert response.status_code == 200, response.text
    counts = response.json()
    assert (counts["received"], counts["accepted"], counts["rejected"]) == (2, 1, 1)
    assert sum(counts["rejected_by_reason"].values()) == 1


def test_ingest_json_array_and_resend_counts_duplicates(server: Server,
                                                        keys: dict[str, str]) -> None:
    records = [activity(unique("ev")), activity(unique("ev"))]
    with server.client(keys["gateway"]) as gateway:
        first = gateway.post("/v1/ingest", json=records).json()
        again = gateway.post("/v1/ingest", json=records).json()
    assert (first["accepted"], first["duplicate_records"]) == (2, 0)
    assert (again["accepted"], again["duplicate_records"]) == (2, 2)


def test_ingest_batch_record_limit_is_413(server: Server, keys: dict[str, str]) -> None:
    with server.client(keys["gateway"]) as gateway:
        response = gateway.post("/v1/ingest", content=b"{}\n" * 10_001,
                                headers={"Content-Type": "application/x-ndjson"})
    assert response.status_code == 413
    assert response.json()["code"] == "too_many_records"


def test_command_body_size_limit_is_413(server: Server, keys: dict[str, str]) -> None:
    with server.client(keys["shop_a"]) as shop:
        response = shop.post("/v1/redemptions", headers={"Idempotency-Key": "big"},
                             json={"token": "x" * 70_000, "points": 1, "terminal_id": "T1"})
    assert response.status_code == 413
    assert response.json()["code"] == "body_too_large"


def test_ingest_while_another_process_holds_the_log_is_503(tmp_path: Path) -> None:
    key = make_key(tmp_path, Role.gateway)
    with EmbeddedLog.open(tmp_path):
        running = Server(tmp_path)
        try:
            with running.client(key) as gateway:
                response = gateway.post("/v1/ingest", json=[activity("e1")])
        finally:
            running.stop()
    assert response.status_code == 503
    assert response.json()["code"] == "ingest_log_busy"
    assert "another genki process is writing" in response.json()["detail"]


def test_ingest_per_request_releases_the_log_between_requests(tmp_path: Path) -> None:
    key = make_key(tmp_path, Role.gateway)
    running, record = Server(tmp_path, "--ingest-per-request"), activity("e1")
    try:
        with running.client(key) as gateway:
            first = gateway.post("/v1/ingest", json=[record]).json()
            with EmbeddedLog.open(tmp_path) as log:  # the lock is free again
                stored = log.counters().accepted
            second = gateway.post("/v1/ingest", json=[record]).json()
    finally:
        running.stop()
    assert (first["accepted"], stored, second["duplicate_records"]) == (1, 1, 1)


# -- authentication and roles ------------------------------------------------------

def test_missing_key_is_401(server: Server) -> None:
    with server.client() as anonymous:
        response = anonymous.get("/v1/users/u1/balance")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["detail"].startswith("missing Authorization header")


def test_unknown_key_is_401(server: Server) -> None:
    with server.client("gk.k000000000000.not-a-real-key") as stranger:
        response = stranger.get("/v1/users/u1/balance")
    assert response.status_code == 401
    assert response.json()["detail"] == "unknown API key"


def test_keys_cli_creates_once_lists_without_secret_and_revokes(server: Server,
                                                                home: Path) -> None:
    created = subprocess.run(genki_cmd("keys", "create", "--role", "app", "--json",
                                       "--data-dir", str(home)),
                             cwd=REPO_ROOT, capture_output=True, check=True)
    record = orjson.loads(created.stdout)
    with server.client(record["key"]) as app:
        assert app.get("/v1/users/u1/balance").status_code == 200
        listed = subprocess.run(genki_cmd("keys", "list", "--data-dir", str(home)),
                                cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode()
        subprocess.run(genki_cmd("keys", "revoke", record["key_id"], "--data-dir", str(home)),
                       cwd=REPO_ROOT, capture_output=True, check=True)
        response = app.get("/v1/users/u1/balance")
    assert record["key_id"] in listed and record["key"] not in listed
    assert response.status_code == 401
    assert response.json()["detail"] == f"API key {record['key_id']} was revoked"


def test_a_shop_key_revoked_after_its_redemptions_redeems_no_more(
        server: Server, home: Path, keys: dict[str, str]) -> None:
    """Redemptions remember the keys they saw valid; a revocation still holds at once."""
    user = unique("revoke")
    award(home, user, 50)
    shop_key = make_key(home, Role.shop, "SHOP_A")
    key_id = shop_key.split(".")[1]
    first, second = token_for(server, keys, user), token_for(server, keys, user)
    with server.client(shop_key) as shop:
        assert redeem(shop, first, 10, unique("key")).status_code == 201
        subprocess.run(genki_cmd("keys", "revoke", key_id, "--data-dir", str(home)),
                       cwd=REPO_ROOT, capture_output=True, check=True)
        revoked = redeem(shop, second, 10, unique("key"))
        bad_key = shop.post("/v1/redemptions", headers={"Idempotency-Key": "a b"},
                            json={"token": second, "points": 10, "terminal_id": "T1"})
    with server.client(keys["shop_a"]) as other:
        still_usable = redeem(other, second, 10, unique("key"))
    assert (revoked.status_code, revoked.json()["detail"]) == (
        401, f"API key {key_id} was revoked")
    assert (bad_key.status_code, bad_key.json()["detail"]) == (
        401, f"API key {key_id} was revoked")
    assert still_usable.status_code == 201
    assert balance(server, keys, user) == 30


def test_wrong_role_is_403(server: Server, keys: dict[str, str]) -> None:
    with server.client(keys["gateway"]) as gateway:
        response = gateway.get("/v1/users/u1/balance")
    assert response.status_code == 403
    assert response.json()["code"] == "forbidden"
    assert "needs a app or staff key" in response.json()["detail"]


def test_app_key_cannot_redeem_or_adjust(server: Server, keys: dict[str, str]) -> None:
    with server.client(keys["app"]) as app:
        redemption = redeem(app, "t", 1, "k1")
        adjustment = app.post("/v1/adjustments", headers={"Idempotency-Key": "k1"},
                              json={"user_id": "u1", "points": 5, "reason": "x"})
    assert (redemption.status_code, adjustment.status_code) == (403, 403)


def test_another_shops_settlement_is_403(server: Server, keys: dict[str, str]) -> None:
    with server.client(keys["shop_a"]) as shop:
        response = shop.get("/v1/shops/SHOP_B/settlement", params={"month": "2026-01"})
    assert response.status_code == 403
    assert "cannot act for shop SHOP_B" in response.json()["detail"]


# -- redemptions -------------------------------------------------------------------

def test_redemption_takes_points_and_history_names_the_shop(server: Server, home: Path,
                                                            keys: dict[str, str]) -> None:
    user = unique("red")
    award(home, user, 50)
    token = token_for(server, keys, user)
    with server.client(keys["shop_a"]) as shop:
        response = redeem(shop, token, 20, unique("key"), terminal_id="T9")
    assert response.status_code == 201, response.text
    body = response.json()
    assert sorted(body) == ["entry_id", "points", "shop_id", "terminal_id", "ts_ms"]
    assert (body["shop_id"], body["terminal_id"], body["points"]) == ("SHOP_A", "T9", 20)
    assert balance(server, keys, user) == 30
    with server.client(keys["app"]) as app:
        newest = app.get(f"/v1/users/{user}/history").json()["entries"][0]
    assert (newest["kind"], newest["points"], newest["shop_id"]) == ("redeem", -20, "SHOP_A")
    assert newest["reason"] == "redeemed at shop SHOP_A (terminal T9)"


def test_same_idempotency_key_and_body_returns_the_stored_response(
        server: Server, home: Path, keys: dict[str, str]) -> None:
    user = unique("idem")
    award(home, user, 50)
    token, key = token_for(server, keys, user), unique("key")
    with server.client(keys["shop_a"]) as shop:
        first = redeem(shop, token, 10, key)
        again = redeem(shop, token, 10, key)
    assert (again.status_code, again.content) == (first.status_code, first.content)
    assert again.headers["idempotent-replayed"] == "true"
    assert balance(server, keys, user) == 40


def test_same_idempotency_key_with_another_body_is_422(server: Server, home: Path,
                                                       keys: dict[str, str]) -> None:
    user = unique("idem")
    award(home, user, 50)
    token, key = token_for(server, keys, user), unique("key")
    with server.client(keys["shop_a"]) as shop:
        redeem(shop, token, 10, key)
        response = redeem(shop, token, 11, key)
    assert response.status_code == 422
    assert response.json()["code"] == "idempotency_conflict"
    assert balance(server, keys, user) == 40


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@contextlib.contextmanager
def traced_syncs(pid: int, trace: Path) -> Iterator[None]:
    """The fdatasync/fsync calls of process `pid` (all threads, with file names) written
    to `trace` while the block runs; skips the test where strace cannot attach."""
    tracer = subprocess.Popen(["strace", "-f", "-y", "-e", "trace=fdatasync,fsync", "-o",
                               str(trace), "-p", str(pid)], stderr=subprocess.PIPE, text=True)
    assert tracer.stderr is not None
    ready, _, _ = select.select([tracer.stderr], [], [], SERVER_START_S_MAX)
    line = tracer.stderr.readline() if ready else ""
    if "attached" not in line:  # "Process N attached with M threads"
        tracer.kill()
        tracer.wait()
        pytest.skip(f"strace cannot attach here: {line!r}")
    try:
        yield
    finally:
        tracer.terminate()
        tracer.communicate(timeout=SERVER_STOP_S_MAX)


def test_a_batchs_token_claims_are_durable_before_its_redemptions(tmp_path: Path) -> None:
    """A power cut must not keep a redemption and forget the token use it claimed (the
    token would pass again with another key): the claims' WAL is fdatasynced, and that
    has returned, before the ledger's commit syncs. Seen in the server's system calls."""
    data_dir, trace = tmp_path / "data", tmp_path / "trace.txt"
    award(data_dir, "u1", 50)
    keys = {"app": make_key(data_dir, Role.app), "shop_a": make_key(data_dir, Role.shop, "SHOP_A")}
    running = Server(data_dir)
    try:
        tokens = [token_for(running, keys, "u1") for _ in range(3)]
        with traced_syncs(running.process.pid, trace), running.client(keys["shop_a"]) as shop:
            for index, token in enumerate(tokens):  # one batch each
                assert redeem(shop, token, 10, f"k{index}").status_code == 201
    finally:
        running.stop()
    synced = []  # per fdatasync of the ledger's WAL: claims synced since the one before
    claims = False
    for line in trace.read_text().splitlines():
        if "api.sqlite-wal>" in line and not line.endswith("<unfinished ...>"):
            claims = True
        elif "ledger.sqlite-wal>" in line:
            synced.append(claims)
            claims = False
    assert synced == [True] * 3


def test_redemption_without_idempotency_key_is_400(server: Server,
                                                   keys: dict[str, str]) -> None:
    with server.client(keys["shop_a"]) as shop:
        response = shop.post("/v1/redemptions",
                             json={"token": "t", "points": 1, "terminal_id": "T1"})
    assert response.status_code == 400
    assert response.json()["code"] == "idempotency_key_required"


def test_overdraft_is_409_without_the_balance_and_writes_nothing(
        server: Server, home: Path, keys: dict[str, str]) -> None:
    user = unique("over")
    award(home, user, 30)
    token = token_for(server, keys, user)
    with server.client(keys["shop_a"]) as shop:
        refused = redeem(shop, token, 31, unique("key"))
        with server.client(keys["app"]) as app:
            entries = app.get(f"/v1/users/{user}/history").json()["entries"]
        retry_smaller = redeem(shop, token, 30, unique("key"))
    assert refused.status_code == 409
    assert refused.json()["code"] == "insufficient_points"
    assert refused.json()["detail"] == ("the customer's points are insufficient for this "
                                        "redemption; nothing was taken")
    assert [e["kind"] for e in entries] == ["award"]
    assert retry_smaller.status_code == 201  # the failed attempt did not use up the token
    assert balance(server, keys, user) == 0


def test_reused_token_with_another_key_is_409(server: Server, home: Path,
                                              keys: dict[str, str]) -> None:
    user = unique("reuse")
    award(home, user, 50)
    token = token_for(server, keys, user)
    with server.client(keys["shop_a"]) as shop_a, server.client(keys["shop_b"]) as shop_b:
        assert redeem(shop_a, token, 5, unique("key")).status_code == 201
        same_shop = redeem(shop_a, token, 5, unique("key"))
        other_shop = redeem(shop_b, token, 5, unique("key"))
    assert (same_shop.status_code, other_shop.status_code) == (409, 409)
    assert same_shop.json()["code"] == "token_used"
    assert "already used" in other_shop.json()["detail"]
    assert balance(server, keys, user) == 45


def test_forged_token_is_401(server: Server, home: Path, keys: dict[str, str]) -> None:
    user, victim = unique("forge"), unique("victim")
    award(home, victim, 50)
    token = token_for(server, keys, user)
    raw = bytearray(base64.urlsafe_b64decode(token[3:] + "=" * (-len(token[3:]) % 4)))
    raw[20] ^= 0x01  # one bit of the ciphertext
    forged = "g2." + base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with server.client(keys["shop_a"]) as shop:
        altered = redeem(shop, forged, 5, unique("key"))
        garbage = redeem(shop, "not-a-token", 5, unique("key"))
    assert (altered.status_code, garbage.status_code) == (401, 401)
    assert (altered.json()["code"], garbage.json()["code"]) == ("token_invalid", "token_invalid")
    assert balance(server, keys, victim) == 50


def test_expired_token_is_401(server: Server, home: Path, keys: dict[str, str]) -> None:
    user = unique("exp")
    award(home, user, 50)
    token = token_for(server, keys, user)
    later = Server(home, "--clock-offset-ms", "121000")  # 121 s after the token was issued
    try:
        with later.client(keys["shop_a"]) as shop:
            response = redeem(shop, token, 5, unique("key"))
    finally:
        later.stop()
    assert response.status_code == 401
    assert response.json()["code"] == "token_expired"
    assert balance(server, keys, user) == 50


def test_idempotent_retry_after_restart_returns_the_stored_response(
        tmp_path: Path) -> None:
    app_key, shop_key = make_key(tmp_path, Role.app), make_key(tmp_path, Role.shop, "S1")
    award(tmp_path, "U1", 40)
    keys = {"app": app_key}
    first_server = Server(tmp_path)
    token = token_for(first_server, keys, "U1")
    with first_server.client(shop_key) as shop:
        first = redeem(shop, token, 15, "purchase-1")
    first_server.stop()
    second_server = Server(tmp_path, "--clock-offset-ms", "600000")  # token long expired
    try:
        with second_server.client(shop_key) as shop:
            again = redeem(shop, token, 15, "purchase-1")
        after = balance(second_server, keys, "U1")
    finally:
        second_server.stop()
    assert first.status_code == 201
    assert (again.status_code, again.content) == (201, first.content)
    assert after == 25


def test_crash_after_the_ledger_write_charges_once(
        server: Server, home: Path, keys: dict[str, str]) -> None:
    """A server died after its claim and its ledger entry, before answering: the retry with
    the same key gets the entry; the token stays spent; another body is 422."""
    user, key = unique("crash"), unique("key")
    award(home, user, 50)
    token = token_for(server, keys, user)
    box = TokenBox(load_or_create_secret(home))
    claims = box.open(token)
    ledger_key = box.ledger_key("redeem", "SHOP_A", key)
    request = fingerprint("redeem", claims.nonce, 12, "T1")
    now_ms = time.time_ns() // 1_000_000
    with ApiStore.open(home) as store:
        store.claim(Claim("redemptions:SHOP_A", key, request, "999999999:dead", now_ms,
                          now_ms + 60_000, claims.nonce, user, "SHOP_A",
                          redeem_id("SHOP_A", ledger_key)), live=lambda owner: False)
    with Ledger.open(home) as ledger:
        written = ledger.redeem(user, 12, "SHOP_A", "T1", ledger_key, now_ms, request=request)
    with server.client(keys["shop_a"]) as shop:
        response = redeem(shop, token, 12, key)
        other_key = redeem(shop, token, 12, unique("key"))
        other_body = redeem(shop, token_for(server, keys, user), 12, key)
    assert response.status_code == 201
    assert response.json()["entry_id"] == written.entry_id
    assert response.headers["idempotent-replayed"] == "true"
    assert (other_key.status_code, other_key.json()["code"]) == (409, "token_used")
    assert (other_body.status_code, other_body.json()["code"]) == (422, "idempotency_conflict")
    assert balance(server, keys, user) == 38


def test_a_claim_left_by_a_dead_server_is_taken_over(
        server: Server, home: Path, keys: dict[str, str]) -> None:
    """Claimed, then the server died before writing: a retry (any body) goes ahead."""
    user, key = unique("orphan"), unique("key")
    award(home, user, 50)
    token = token_for(server, keys, user)
    claims = TokenBox(load_or_create_secret(home)).open(token)
    now_ms = time.time_ns() // 1_000_000
    with ApiStore.open(home) as store:
        store.claim(Claim("redemptions:SHOP_A", key, "another-body", "999999999:dead", now_ms,
                          now_ms + 60_000, claims.nonce, user, "SHOP_A", "e"),
                    live=lambda owner: False)
    with server.client(keys["shop_a"]) as shop:
        response = redeem(shop, token_for(server, keys, user), 9, key)
    assert response.status_code == 201, response.text
    assert balance(server, keys, user) == 41


def json_values(value: object) -> list[object]:
    if isinstance(value, dict):
        return [v for item in value.values() for v in json_values(item)]
    if isinstance(value, list):
        return [v for item in value for v in json_values(item)]
    return [value]


def test_no_shop_facing_answer_holds_a_user_id_or_a_balance(
        server: Server, home: Path, keys: dict[str, str]) -> None:
    """Every status a shop key can get, for a person with distinctive balances."""
    user = unique("citizen-zq")
    award(home, user, 4_321)
    balances = {4_321, 4_321 - 17, 4_321 - 17 + 5}
    tokens = [token_for(server, keys, user) for _ in range(3)]
    other = unique("other-zq")
    award(home, other, 60)
    award_id = derive_id("test-award", user, 0, 4_321)
    answers: list[httpx.Response] = []
    with server.client(keys["shop_a"]) as shop:
        sale = redeem(shop, tokens[0], 17, unique("sale"))
        answers += [sale, redeem(shop, tokens[0], 17, sale.request.headers["Idempotency-Key"]),
                    redeem(shop, tokens[1], 18, sale.request.headers["Idempotency-Key"]),
                    redeem(shop, tokens[0], 3, unique("sale")),  # token used
                    redeem(shop, tokens[1], 9_999, unique("sale")),  # insufficient
                    redeem(shop, tokens[2][:-4] + "AAAA", 1, unique("sale"))]  # invalid
        for body in ({"redemption_entry_id": sale.json()["entry_id"], "points": 5},
                     {"redemption_entry_id": sale.json()["entry_id"], "points": 13},
                     {"redemption_entry_id": award_id, "points": 1},
                     {"redemption_entry_id": "f" * 32, "points": 1}):
            answers.append(shop.post("/v1/refunds", json=body,
                                     headers={"Idempotency-Key": unique("refund")}))
        month = time.strftime("%Y-%m", time.gmtime(sale.json()["ts_ms"] / 1000 + 9 * 3600))
        answers += [shop.get("/v1/shops/SHOP_A/settlement", params={"month": month}),
                    shop.get(f"/v1/users/{user}/balance"),
                    shop.get(f"/v1/users/{user}/history"),
                    shop.post(f"/v1/users/{user}/redeem-tokens")]
    with server.client(keys["shop_b"]) as shop_b:
        answers.append(shop_b.post("/v1/refunds", headers={"Idempotency-Key": unique("r")},
                                   json={"redemption_entry_id": sale.json()["entry_id"],
                                         "points": 1}))
    assert [a.status_code for a in answers] == [201, 201, 422, 409, 409, 401, 201, 409, 404,
                                               404, 200, 403, 403, 403, 404]
    assert balance(server, keys, user) == 4_321 - 17 + 5
    for answer in answers:
        values = json_values(answer.json())
        texts = [v for v in values if isinstance(v, str)]
        assert not [v for v in values if v in balances or v == user], answer.text
        assert not [t for t in texts if user in t or other in t], answer.text
        assert not [t for t in texts for b in balances if re.search(rf"\b{b}\b", t)], answer.text


def crashing_redemption(data_dir: Path, point: str, monkeypatch: pytest.MonkeyPatch,
                        keys: dict[str, str], token: str, points: int, key: str) -> None:
    """A server that SIGKILLs itself at `point` while carrying out this redemption."""
    monkeypatch.setenv("GENKI_CRASH_AT", f"{point}:1")
    doomed = Server(data_dir)
    monkeypatch.delenv("GENKI_CRASH_AT")
    try:
        with doomed.client(keys["shop"]) as shop, pytest.raises(httpx.TransportError):
            redeem(shop, token, points, key)
        assert doomed.process.wait(timeout=SERVER_STOP_S_MAX) == -signal.SIGKILL
    finally:
        doomed.stop()


@pytest.fixture
def crash_home(tmp_path: Path) -> tuple[Path, dict[str, str], str, str]:
    """U1 with 40 points, an app and a shop key, and two redeem tokens of U1 (issued by a
    server that is stopped again)."""
    keys = {"app": make_key(tmp_path, Role.app), "shop": make_key(tmp_path, Role.shop, "S1")}
    award(tmp_path, "U1", 40)
    issuer = Server(tmp_path)
    try:
        token, other = token_for(issuer, keys, "U1"), token_for(issuer, keys, "U1")
    finally:
        issuer.stop()
    return tmp_path, keys, token, other


def test_killed_after_the_ledger_commit_a_retry_gets_the_redemption_once(
        crash_home: tuple[Path, dict[str, str], str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    home, keys, token, other = crash_home
    crashing_redemption(home, "api_after_ledger", monkeypatch, keys, token, 15, "sale-1")
    restarted = Server(home)
    try:
        with restarted.client(keys["shop"]) as shop:
            retry = redeem(shop, token, 15, "sale-1")
            other_body = redeem(shop, other, 15, "sale-1")
            other_key = redeem(shop, token, 15, "sale-2")
        after = balance(restarted, keys, "U1")
    finally:
        restarted.stop()
    assert (retry.status_code, retry.json()["points"]) == (201, 15)
    assert [(a.status_code, a.json()["code"]) for a in (other_body, other_key)] == [
        (422, "idempotency_conflict"), (409, "token_used")]
    assert after == 25


def test_killed_after_the_claim_a_retry_goes_ahead_and_charges_once(
        crash_home: tuple[Path, dict[str, str], str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim of a dead server does not block its key: the retry (here with another
    token, as a terminal that rescanned the code would send) is carried out."""
    home, keys, token, other = crash_home
    crashing_redemption(home, "api_after_claims", monkeypatch, keys, token, 15, "sale-1")
    restarted = Server(home)
    try:
        with restarted.client(keys["shop"]) as shop:
            retry = redeem(shop, other, 12, "sale-1")
            again = redeem(shop, other, 12, "sale-1")
        after = balance(restarted, keys, "U1")
    finally:
        restarted.stop()
    assert (retry.status_code, retry.json()["points"]) == (201, 12)
    assert (again.status_code, again.content) == (201, retry.content)
    assert after == 28


# -- refunds, adjustments, settlement ------------------------------------------------

def test_refund_by_the_redeeming_shop_bounded_by_the_redemption(
        server: Server, home: Path, keys: dict[str, str]) -> None:
    user = unique("ref")
    award(home, user, 50)
    with server.client(keys["shop_a"]) as shop:
        redemption = redeem(shop, token_for(server, keys, user), 20, unique("key")).json()
        body = {"redemption_entry_id": redemption["entry_id"], "points": 15}
        refunded = shop.post("/v1/refunds", json=body, headers={"Idempotency-Key": "r1"})
        replay = shop.post("/v1/refunds", json=body, headers={"Idempotency-Key": "r1"})
        too_much = shop.post("/v1/refunds", headers={"Idempotency-Key": "r2"},
                             json={"redemption_entry_id": redemption["entry_id"], "points": 6})
    assert refunded.status_code == 201, refunded.text
    assert refunded.json() == {"entry_id": refunded.json()["entry_id"], "shop_id": "SHOP_A",
                               "refund_of": redemption["entry_id"], "points": 15,
                               "ts_ms": refunded.json()["ts_ms"]}
    assert balance(server, keys, user) == 45
    assert replay.content == refunded.content
    assert too_much.status_code == 409
    assert too_much.json()["code"] == "refund_exceeds_redemption"
    with server.client(keys["app"]) as app:
        newest = app.get(f"/v1/users/{user}/history").json()["entries"][0]
    assert (newest["kind"], newest["refund_of"]) == ("refund", redemption["entry_id"])
    assert newest["reason"].startswith("refund from shop SHOP_A of redemption")


def test_refund_errors_do_not_tell_a_shop_what_an_entry_is(
        server: Server, home: Path, keys: dict[str, str]) -> None:
    """Another shop's redemption, an award's id and an unknown id: one identical answer."""
    user = unique("ref")
    award(home, user, 50)
    award_id = derive_id("test-award", user, 0, 50)
    with server.client(keys["shop_a"]) as shop_a:
        redemption = redeem(shop_a, token_for(server, keys, user), 20, unique("key")).json()
    with server.client(keys["shop_b"]) as shop_b:
        answers = [shop_b.post("/v1/refunds", headers={"Idempotency-Key": unique("r")},
                               json={"redemption_entry_id": entry_id, "points": 5})
                   for entry_id in (redemption["entry_id"], award_id, "0" * 32)]
    assert [(a.status_code, a.json()["code"]) for a in answers] == [
        (404, "redemption_not_found")] * 3
    assert len({(a.json()["detail"], a.content.replace(e.encode(), b"")) for a, e in zip(
        answers, (redemption["entry_id"], award_id, "0" * 32), strict=True)}) == 1
    assert balance(server, keys, user) == 30


def test_staff_adjustment_needs_a_reason(server: Server, keys: dict[str, str]) -> None:
    user = unique("adj")
    with server.client(keys["staff"]) as staff:
        made = staff.post("/v1/adjustments", headers={"Idempotency-Key": "a1"},
                          json={"user_id": user, "points": 7, "reason": "paper card points"})
        no_reason = staff.post("/v1/adjustments", headers={"Idempotency-Key": "a2"},
                               json={"user_id": user, "points": 7, "reason": " "})
        history = staff.get(f"/v1/users/{user}/history").json()["entries"]
    assert made.status_code == 201, made.text
    assert (made.json()["points"], made.json()["reason"], made.json()["balance"]) == (
        7, "paper card points", 7)
    assert no_reason.status_code == 400
    assert no_reason.json()["code"] == "invalid_request"
    assert [e["reason"] for e in history] == [
        f"adjusted by staff {made.json()['staff_id']}: paper card points"]


def test_settlement_sums_a_shops_month(tmp_path: Path) -> None:
    keys = {"app": make_key(tmp_path, Role.app), "shop": make_key(tmp_path, Role.shop, "S1"),
            "staff": make_key(tmp_path, Role.staff)}
    award(tmp_path, "U1", 100)
    running = Server(tmp_path)
    try:
        with running.client(keys["shop"]) as shop:
            first = redeem(shop, token_for(running, keys, "U1"), 30, "p1").json()
            redeem(shop, token_for(running, keys, "U1"), 20, "p2")
            shop.post("/v1/refunds", headers={"Idempotency-Key": "r1"},
                      json={"redemption_entry_id": first["entry_id"], "points": 10})
            month = time.strftime("%Y-%m", time.gmtime(first["ts_ms"] / 1000 + 9 * 3600))
            own = shop.get("/v1/shops/S1/settlement", params={"month": month}).json()
        with running.client(keys["staff"]) as staff:
            seen_by_staff = staff.get("/v1/shops/S1/settlement", params={"month": month}).json()
    finally:
        running.stop()
    assert own == {"shop_id": "S1", "month": month, "redeemed_points": 50, "refunded_points": 10,
                   "net_points": 40, "redemptions": 2, "refunds": 1}
    assert seen_by_staff == own


# -- concurrency -------------------------------------------------------------------

def test_concurrent_redemptions_from_two_servers_never_overdraw(
        server: Server, home: Path, keys: dict[str, str]) -> None:
    user, attempts, points = unique("race"), 40, 7
    award(home, user, 100)
    tokens = [token_for(server, keys, user) for _ in range(attempts)]
    second = Server(home)
    try:
        def attempt(index: int) -> int:
            target = server if index % 2 else second
            with target.client(keys["shop_a"]) as shop:
                return redeem(shop, tokens[index], points, unique("race-key")).status_code

        with ThreadPoolExecutor(attempts) as pool:
            statuses = list(pool.map(attempt, range(attempts)))
    finally:
        second.stop()
    assert sorted(set(statuses)) == [201, 409]
    assert statuses.count(201) == 100 // points
    assert balance(server, keys, user) == 100 - statuses.count(201) * points
    with Ledger.open(home) as ledger:
        assert ledger.verify().ok


RACE_TRIES = 30


def race_same_key(servers: tuple[Server, Server], shop_key: str, tokens: tuple[str, str],
                  points: tuple[int, int], key: str) -> list[httpx.Response]:
    """Both requests leave at once (a barrier), one to each server."""
    barrier = threading.Barrier(2)
    clients = [target.client(shop_key) for target in servers]
    try:
        for client in clients:  # connect first, so the barrier releases two ready requests
            assert client.get("/healthz").status_code == 200

        def send(side: int) -> httpx.Response:
            barrier.wait()
            return redeem(clients[side], tokens[side], points[side], key)

        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(send, (0, 1)))
    finally:
        for client in clients:
            client.close()


def check_race(answers: list[httpx.Response], points: tuple[int, int], before: int,
               after: int, redeemed_entries: int) -> int:
    """Exactly one redemption, answered 201 to its own body; the other request refused
    (422 or 409 in_progress), nothing written for it. Returns the winner's side."""
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(201) == 1, [answer.text for answer in answers]
    winner = statuses.index(201)
    loser = answers[1 - winner]
    assert (loser.status_code, loser.json()["code"]) in {(422, "idempotency_conflict"),
                                                         (409, "in_progress")}, loser.text
    assert answers[winner].json()["points"] == points[winner]
    assert (before - after, redeemed_entries) == (points[winner], 1)
    return winner


def test_the_same_key_with_two_bodies_at_two_servers_redeems_once(
        server: Server, home: Path, keys: dict[str, str]) -> None:
    """The issue's race: two tokens of one person (1 and 2 points), one Idempotency-Key,
    sent at the same moment to two `genki serve` processes on one data directory."""
    second = Server(home)
    try:
        for attempt in range(RACE_TRIES):
            user, key = unique("race2"), unique("race-key")
            award(home, user, 10)
            tokens = (token_for(server, keys, user), token_for(second, keys, user))
            answers = race_same_key((server, second), keys["shop_a"], tokens, (1, 2), key)
            with server.client(keys["app"]) as app:
                history = app.get(f"/v1/users/{user}/history").json()["entries"]
            redeemed = [e for e in history if e["kind"] == "redeem"]
            winner = check_race(answers, (1, 2), 10, balance(server, keys, user), len(redeemed))
            with server.client(keys["shop_a"]) as shop:  # the outcome is final
                loser_again = redeem(shop, tokens[1 - winner], 2 - winner, key)
                winner_again = redeem(shop, tokens[winner], 1 + winner, key)
            assert (loser_again.status_code, attempt) == (422, attempt), loser_again.text
            assert (winner_again.status_code, winner_again.content) == (
                201, answers[winner].content)
    finally:
        second.stop()
    with Ledger.open(home) as ledger:
        assert ledger.verify().ok


# -- problem details -----------------------------------------------------------------

def test_every_error_is_a_problem_document(server: Server, keys: dict[str, str]) -> None:
    with server.client(keys["shop_a"]) as shop:
        answers = [
            shop.get("/v1/nowhere"),
            shop.get("/v1/shops/SHOP_A/settlement", params={"month": "2026-13"}),
            shop.post("/v1/redemptions", headers={"Idempotency-Key": "has space"},
                      json={"token": "t", "points": 1, "terminal_id": "T1"}),
            shop.post("/v1/redemptions", headers={"Idempotency-Key": "k"}, content=b"{"),
        ]
    assert [(a.status_code, a.json()["code"]) for a in answers] == [
        (404, "not_found"), (400, "invalid_request"), (400, "bad_request"),
        (400, "invalid_request")]
    for answer in answers:
        assert answer.headers["content-type"] == "application/problem+json"
        body = answer.json()
        assert body["type"] == f"urn:genki:problem:{body['code']}"
        assert (body["status"], bool(body["title"]), bool(body["detail"])) == (
            answer.status_code, True, True)
