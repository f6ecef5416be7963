"""API parts without a server: tokens, the secret file, the key store, body parsing, fast path."""

from __future__ import annotations

import base64
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.api.app import _ingest_lines, create_app
from engine.api.problems import BadRequest, TokenExpired, TokenInvalid, error_response
from engine.api.service import ApiService, Principal
from engine.api.store import ApiStore, Role, StoredResponse
from engine.api.tokens import SECRET_FILE_NAME, TokenSigner, load_or_create_secret
from engine.entries import EntryDraft
from engine.errors import ExistsWithDifferent, GenkiError, UsageError
from engine.ledger.errors import LedgerBusy, Overdraft
from engine.schemas import EntryKind
from tests.conftest import REPO_ROOT

NOW_MS = 1_767_225_600_000
SIGNER = TokenSigner(b"k" * 32)
USER_IDS = st.from_regex(r"\A[A-Za-z0-9_.:\-]{1,64}\Z")


@given(USER_IDS)
@settings(max_examples=50, deadline=None)
def test_a_token_names_its_user_and_expiry(user_id: str) -> None:
    token, issued = SIGNER.issue(user_id, NOW_MS, 120)
    claims = SIGNER.verify_signature(token)
    assert claims == issued
    assert (claims.user_id, claims.expires_ms) == (user_id, NOW_MS + 120_000)


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_any_changed_character_makes_a_token_invalid(data: st.DataObject) -> None:
    token, _ = SIGNER.issue("U1", NOW_MS, 120)
    index = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.sampled_from("AQgw-_.x0"))
    changed = token[:index] + replacement + token[index + 1:]
    if changed == token:
        return
    with pytest.raises(TokenInvalid):
        SIGNER.verify_signature(changed)


def test_a_token_of_another_secret_is_invalid() -> None:
    token, _ = TokenSigner(b"o" * 32).issue("U1", NOW_MS, 120)
    with pytest.raises(TokenInvalid, match="signature does not match"):
        SIGNER.verify_signature(token)


def test_a_token_expires_at_its_expiry_ms() -> None:
    token, _ = SIGNER.issue("U1", NOW_MS, 1)
    claims = SIGNER.verify_signature(token)
    SIGNER.check_fresh(claims, NOW_MS + 999)
    with pytest.raises(TokenExpired, match="expired 0.0 s ago"):
        SIGNER.check_fresh(claims, NOW_MS + 1000)


def test_the_secret_is_created_once_private(tmp_path: Path) -> None:
    first = load_or_create_secret(tmp_path)
    again = load_or_create_secret(tmp_path)
    mode = stat.S_IMODE((tmp_path / SECRET_FILE_NAME).stat().st_mode)
    assert (first, len(first), mode) == (again, 32, 0o600)
    assert [p.name for p in tmp_path.iterdir()] == [SECRET_FILE_NAME]


def test_a_readable_secret_is_refused(tmp_path: Path) -> None:
    load_or_create_secret(tmp_path)
    os.chmod(tmp_path / SECRET_FILE_NAME, 0o644)
    with pytest.raises(GenkiError, match="chmod 600"):
        load_or_create_secret(tmp_path)


def test_only_the_hash_of_a_key_is_stored(tmp_path: Path) -> None:
    with ApiStore.open(tmp_path) as store:
        key_text, record = store.create_key(Role.shop, "S1", "till 1", NOW_MS)
    with sqlite3.connect(tmp_path / "api.sqlite") as db:
        dump = "\n".join(db.iterdump())
    assert record.key_id in key_text and record.key_id in dump
    assert key_text.rsplit(".", 1)[1] not in dump


def test_a_shop_key_needs_a_shop_and_only_a_shop_key_has_one(tmp_path: Path) -> None:
    with ApiStore.open(tmp_path) as store:
        with pytest.raises(UsageError, match="--shop is required"):
            store.create_key(Role.shop, None, None, NOW_MS)
        with pytest.raises(UsageError, match="--shop is required"):
            store.create_key(Role.app, "S1", None, NOW_MS)


def test_ingest_body_must_be_ndjson_or_a_json_array() -> None:
    assert _ingest_lines(b'{"a":1}\r\n\n{"b":2}\n', "application/x-ndjson") == [
        b'{"a":1}', b'{"b":2}']
    assert _ingest_lines(b'[{"a":1},{"b":2}]', "application/json; charset=utf-8") == [
        b'{"a":1}', b'{"b":2}']
    with pytest.raises(BadRequest, match="must be an array"):
        _ingest_lines(b'{"a":1}', "application/json")
    with pytest.raises(BadRequest, match="not JSON"):
        _ingest_lines(b"[", "application/json")


async def test_fast_balance_path_answers_as_fastapi_does(tmp_path: Path) -> None:
    with ApiStore.open(tmp_path) as store:
        app_key = store.create_key(Role.app, None, None, NOW_MS)[0]
        gateway_key = store.create_key(Role.gateway, None, None, NOW_MS)[0]
    cases = [("/v1/users/U1/balance", app_key), ("/v1/users/U1/balance", gateway_key),
             ("/v1/users/U1/balance", "nope"), ("/v1/users/U1/balance", None),
             ("/v1/users/bad%20id/balance", app_key)]
    answers = []
    for fast in (True, False):
        app = create_app(tmp_path, fast_reads=fast)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for path, key in cases:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                response = await client.get(path, headers=headers)
                answers.append((response.status_code, response.json()))
        app.state.service.close()
    fast_answers, fastapi_answers = answers[:len(cases)], answers[len(cases):]
    assert [status for status, _ in fast_answers] == [200, 403, 401, 401, 400]
    assert fast_answers == fastapi_answers


def test_module_level_app_serves_genki_home(tmp_path: Path) -> None:
    code = ("import engine.api, fastapi; app = engine.api.app; "
            "assert isinstance(app, fastapi.FastAPI), type(app); "
            "print(app.state.service.data_dir)")
    result = subprocess.run([sys.executable, "-c", code],
                            cwd=REPO_ROOT, capture_output=True, check=True,
                            env={**os.environ, "GENKI_HOME": str(tmp_path)})
    assert result.stdout.decode().strip() == str(tmp_path)


def test_prune_forgets_old_responses_and_claims_only(tmp_path: Path) -> None:
    with ApiStore.open(tmp_path) as store:
        for created_ms in (NOW_MS - 10, NOW_MS):
            store.store_response("redemptions:S1", f"k{created_ms}",
                                 StoredResponse("h", 201, b"{}"), created_ms)
            store.claim_token(f"n{created_ms}", "U1", "S1", f"k{created_ms}", created_ms)
        removed = store.prune(NOW_MS)
        kept = (store.stored_response("redemptions:S1", f"k{NOW_MS}"),
                store.token_claim(f"n{NOW_MS}"))
        gone = (store.stored_response("redemptions:S1", f"k{NOW_MS - 10}"),
                store.token_claim(f"n{NOW_MS - 10}"))
    assert removed == 2
    assert None not in kept
    assert gone == (None, None)


# -- the redemption flow with an injected clock (no HTTP) -------------------------------

class Clock:
    def __init__(self) -> None:
        self.now_ms = NOW_MS

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def flow(tmp_path: Path) -> Iterator[tuple[ApiService, Clock]]:
    clock = Clock()
    service = ApiService(tmp_path, token_ttl_s=120, clock=clock)
    service.write_ledger.append([EntryDraft("award-1", "U1", EntryKind.award, 50, "2026-01-01",
                                            NOW_MS, "steps_tier_1", None, "t")])
    yield service, clock
    service.close()


SHOP = Principal("k1", Role.shop, "S1")


def nonce_of(token: str) -> str:
    return str(orjson.loads(base64.urlsafe_b64decode(token.split(".")[0] + "==="))["n"])


def crash_after_ledger_write(service: ApiService, token: str, key: str, points: int) -> None:
    """What a redemption leaves when the process dies before storing its response."""
    nonce = nonce_of(token)
    service.write_store.claim_token(nonce, "U1", "S1", key, NOW_MS)
    service.write_ledger.redeem("U1", points, "S1", "T1", f"token:{nonce}", NOW_MS)


def test_retry_after_crash_and_expiry_returns_the_written_redemption(flow: tuple[ApiService, Clock]) -> None:
    service, clock = flow
    token = service.issue_token("U1")["token"]
    crash_after_ledger_write(service, token, "p1", 20)
    clock.now_ms += 600_000
    reply = service.redeem(SHOP, "p1", token, 20, "T1")
    assert (reply.status, orjson.loads(reply.body)["balance"]) == (201, 30)
    assert service.redeem(SHOP, "p1", token, 20, "T1").replayed


def test_retry_after_crash_and_expiry_with_other_points_is_a_conflict(flow: tuple[ApiService, Clock]) -> None:
    service, clock = flow
    token = service.issue_token("U1")["token"]
    crash_after_ledger_write(service, token, "p1", 20)
    clock.now_ms += 600_000
    with pytest.raises(ExistsWithDifferent, match="already redeemed 20 points"):
        service.redeem(SHOP, "p1", token, 25, "T1")


def test_expired_token_with_a_dangling_claim_frees_it_and_writes_nothing(flow: tuple[ApiService, Clock]) -> None:
    service, clock = flow
    token = service.issue_token("U1")["token"]
    service.write_store.claim_token(nonce_of(token), "U1", "S1", "p1", NOW_MS)
    clock.now_ms += 121_000
    with pytest.raises(TokenExpired):
        service.redeem(SHOP, "p1", token, 20, "T1")
    assert service.write_store.token_claim(nonce_of(token)) is None
    assert service.write_ledger.balance("U1") == 50


def test_a_token_is_good_until_its_last_millisecond(flow: tuple[ApiService, Clock]) -> None:
    service, clock = flow
    token = service.issue_token("U1")["token"]
    clock.now_ms += 119_999
    assert service.redeem(SHOP, "p1", token, 5, "T1").status == 201


def test_genki_errors_map_to_problems_by_their_status_and_code() -> None:
    busy = error_response(LedgerBusy("ledger.sqlite: could not take the write lock"))
    over = error_response(Overdraft("U1", 30, 31))
    assert (busy.status_code, busy.headers["retry-after"]) == (503, "5")
    assert orjson.loads(busy.body)["code"] == "ledger_busy"
    assert (over.status_code, orjson.loads(over.body)["code"]) == (409, "insufficient_points")
    assert orjson.loads(over.body)["detail"].startswith("insufficient points: balance 30, "
                                                        "requested 31")
