"""API parts without a server: tokens, the secret file, the key store, body parsing, fast path."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import sqlite3
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.api.app import _ingest_lines, create_app
from engine.api.problems import (
    REFUSAL_STATUS,
    BadRequest,
    Refusal,
    Refused,
    error_response,
    refusal_of_ledger_code,
)
from engine.api.service import (
    ApiService,
    ApiSettings,
    Command,
    DirectRedeemer,
    LedgerReads,
    Principal,
)
from engine.api.store import ApiStore, Claim, ClaimRefused, Role, StoredResponse
from engine.api.tokens import SECRET_FILE_NAME, TokenBox, load_or_create_secret
from engine.clock import DAY_MS
from engine.entries import EntryDraft
from engine.errors import GenkiError, UsageError
from engine.ledger.errors import LedgerBusy, Overdraft
from engine.ledger.model import Entry
from engine.ledger.store import Ledger
from engine.schemas import EntryKind
from tests.conftest import REPO_ROOT

NOW_MS = 1_767_225_600_000
BOX = TokenBox(b"k" * 32)
USER_IDS = st.from_regex(r"\A[A-Za-z0-9_.:\-]{1,64}\Z")


@given(USER_IDS)
@settings(max_examples=50, deadline=None)
def test_a_token_names_its_user_and_expiry(user_id: str) -> None:
    token, issued = BOX.issue(user_id, NOW_MS, 120)
    claims = BOX.open(token)
    assert claims == issued
    assert (claims.user_id, claims.expires_ms) == (user_id, NOW_MS + 120_000)


@given(st.from_regex(r"\A[A-Za-z0-9_.:\-]{12,64}\Z"))
@settings(max_examples=50, deadline=None)
def test_a_token_does_not_show_whose_it_is(user_id: str) -> None:
    """Encrypted and padded: the same length for every person, no id in any encoding."""
    token, _ = BOX.issue(user_id, NOW_MS, 120)
    other, _ = BOX.issue("U1", NOW_MS, 120)
    raw = base64.urlsafe_b64decode(token[3:] + "=" * (-len(token[3:]) % 4))
    assert len(token) == len(other)
    assert user_id.encode() not in raw and user_id not in token


@given(st.data())
@settings(max_examples=100, deadline=None)
def test_any_changed_character_makes_a_token_invalid(data: st.DataObject) -> None:
    token, _ = BOX.issue("U1", NOW_MS, 120)
    index = data.draw(st.integers(0, len(token) - 1))
    replacement = data.draw(st.sampled_from("AQgw-_.x0"))
    changed = token[:index] + replacement + token[index + 1:]
    if changed == token:
        return
    try:
        claims = BOX.open(changed)
    except Refused as refused:
        assert refused.code == "token_invalid"
    else:  # base64's last character may carry unused bits: then it is the same token
        assert base64.urlsafe_b64decode(changed[3:] + "==") == base64.urlsafe_b64decode(
            token[3:] + "==") and claims.user_id == "U1"


def test_a_token_of_another_secret_is_invalid() -> None:
    token, _ = TokenBox(b"o" * 32).issue("U1", NOW_MS, 120)
    with pytest.raises(Refused, match="not valid"):
        BOX.open(token)


def test_a_token_expires_at_its_expiry_ms() -> None:
    token, _ = BOX.issue("U1", NOW_MS, 1)
    claims = BOX.open(token)
    BOX.check_fresh(claims, NOW_MS + 999)
    with pytest.raises(Refused, match="expired 0.0 s ago"):
        BOX.check_fresh(claims, NOW_MS + 1000)


def test_ledger_keys_depend_on_the_secret_shop_and_key() -> None:
    keys = {BOX.ledger_key("redeem", "S1", "k1"), BOX.ledger_key("redeem", "S2", "k1"),
            BOX.ledger_key("redeem", "S1", "k2"), BOX.ledger_key("refund", "S1", "k1"),
            TokenBox(b"o" * 32).ledger_key("redeem", "S1", "k1")}
    assert len(keys) == 5
    assert BOX.ledger_key("redeem", "S1", "k1") == BOX.ledger_key("redeem", "S1", "k1")


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
            store.store_response("adjustments:k1", f"k{created_ms}",
                                 StoredResponse("h", 201, b"{}"), created_ms)
            store.claim(Claim("redemptions:S1", f"k{created_ms}", "f", "1:x", created_ms,
                              created_ms + 1, f"n{created_ms}", "U1", "S1", f"e{created_ms}"),
                        live=lambda owner: True)
        removed = store.prune(NOW_MS)
        kept = (store.stored_response("adjustments:k1", f"k{NOW_MS}"),
                store.redemption_user(f"e{NOW_MS}", "S1"))
        gone = (store.stored_response("adjustments:k1", f"k{NOW_MS - 10}"),
                store.redemption_user(f"e{NOW_MS - 10}", "S1"))
    assert removed == 3
    assert None not in kept
    assert gone == (None, None)


# -- the redemption flow with an injected clock (no HTTP) -------------------------------

class Clock:
    def __init__(self) -> None:
        self.now_ms = NOW_MS

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def flow(tmp_path: Path) -> Iterator[tuple[ApiService, Clock, Ledger]]:
    clock = Clock()
    reads = LedgerReads(tmp_path)
    service = ApiService(tmp_path, reads, DirectRedeemer(reads.writer_ledger),
                         settings=ApiSettings(120, 30, 40), clock=clock)
    reads.writer_ledger.append([EntryDraft("award-1", "U1", EntryKind.award, 50, "2026-01-01",
                                           NOW_MS, "steps_tier_1", None, "t")])
    yield service, clock, reads.writer_ledger
    service.close()


SHOP = Principal("k1", Role.shop, "S1")


async def test_a_retry_after_expiry_returns_the_written_redemption(
        flow: tuple[ApiService, Clock, Ledger]) -> None:
    service, clock, ledger = flow
    token = service.issue_token("U1")["token"]
    first = await service.redeem(SHOP, "p1", token, 20, "T1")
    clock.now_ms += 600_000
    again = await service.redeem(SHOP, "p1", token, 20, "T1")
    assert (first.status, again.status, again.body, again.replayed) == (201, 201, first.body,
                                                                       True)
    with pytest.raises(Refused, match="different request body"):
        await service.redeem(SHOP, "p1", token, 21, "T1")
    assert ledger.balance("U1") == 30


async def test_a_token_is_good_until_its_last_millisecond(
        flow: tuple[ApiService, Clock, Ledger]) -> None:
    service, clock, _ = flow
    token = service.issue_token("U1")["token"]
    clock.now_ms += 119_999
    assert (await service.redeem(SHOP, "p1", token, 5, "T1")).status == 201
    token = service.issue_token("U1")["token"]
    clock.now_ms += 120_000
    with pytest.raises(Refused) as expired:
        await service.redeem(SHOP, "p2", token, 5, "T1")
    assert expired.value.code == "token_expired"


async def test_redemption_limits_per_redemption_and_per_person_per_day(
        flow: tuple[ApiService, Clock, Ledger]) -> None:
    """Configured 30 per redemption, 40 per person per Tokyo day; refusals take nothing."""
    service, clock, ledger = flow
    refusals = []
    for key, points in (("p1", 31), ("p2", 30), ("p3", 11), ("p4", 10)):
        try:
            await service.redeem(SHOP, key, service.issue_token("U1")["token"], points, "T1")
        except Refused as refused:
            refusals.append((key, refused.http_status, refused.code))
    assert refusals == [("p1", 422, "points_per_redemption_max_exceeded"),
                        ("p3", 409, "points_per_person_per_day_max_exceeded")]
    assert ledger.balance("U1") == 10
    clock.now_ms += DAY_MS  # a new Tokyo day: the allowance is back
    ledger.append([EntryDraft("award-2", "U1", EntryKind.award, 50, "2026-01-02", clock.now_ms,
                              "steps_tier_1", None, "t")])
    reply = await service.redeem(SHOP, "p5", service.issue_token("U1")["token"], 30, "T1")
    assert (reply.status, ledger.balance("U1")) == (201, 30)


def test_ledger_refusals_become_fixed_shop_texts() -> None:
    over = refusal_of_ledger_code(Overdraft("U1", 30, 31).code)
    busy = error_response(refusal_of_ledger_code(LedgerBusy("ledger.sqlite: locked").code))
    assert (over.http_status, over.code, str(over)) == (
        409, "insufficient_points",
        "the customer's points are insufficient for this redemption; nothing was taken")
    assert (busy.status_code, busy.headers["retry-after"]) == (503, "5")
    kinds = {refusal_of_ledger_code(code).code
             for code in ("not_found", "not_a_redemption", "refund_wrong_shop")}
    assert kinds == {"redemption_not_found"}


def test_every_refusal_code_has_one_status() -> None:
    assert {r.value for r in REFUSAL_STATUS} == {r.value for r in Refusal}
    assert all(400 <= status < 600 for status in REFUSAL_STATUS.values())


def test_a_ledger_batch_keeps_each_command_atomic_and_commits_once(tmp_path: Path) -> None:
    """Group commit: a refused command inside a batch writes nothing, the others stand."""
    with Ledger.open(tmp_path) as ledger:
        ledger.append([EntryDraft("award-1", "U1", EntryKind.award, 10, "2026-01-01", NOW_MS,
                                  "steps_tier_1", None, "t")])
        refused = []
        with ledger.batch():
            ledger.redeem("U1", 6, "S1", "T1", "k1", NOW_MS)
            try:
                ledger.redeem("U1", 6, "S1", "T1", "k2", NOW_MS)  # 4 left: overdraft
            except Overdraft as error:
                refused.append(error.requested)
            ledger.redeem("U1", 4, "S1", "T1", "k3", NOW_MS)
        assert refused == [6]
        assert ledger.balance("U1") == 0
        assert [e.points for e in ledger.history("U1")[0]] == [-4, -6, 10]
        assert ledger.verify().ok


async def test_concurrent_redemptions_are_batched_and_never_overdraw(
        flow: tuple[ApiService, Clock, Ledger]) -> None:
    service, _, ledger = flow
    tokens = [service.issue_token("U1")["token"] for _ in range(12)]

    async def attempt(index: int) -> str:
        try:
            reply = await service.redeem(SHOP, f"k{index}", tokens[index], 7, "T1")
        except Refused as refused:
            return refused.code
        return str(reply.status)

    daily = "points_per_person_per_day_max_exceeded"
    outcomes = await asyncio.gather(*(attempt(i) for i in range(12)))
    assert sorted(outcomes) == ["201"] * 5 + [daily] * 7  # at most 40 a day: 5 x 7 = 35
    assert ledger.balance("U1") == 15
    refused = outcomes.index(daily)
    again = await service.redeem(SHOP, "k-again", tokens[refused], 5, "T1")  # still usable
    assert (again.status, ledger.balance("U1")) == (201, 10)


async def redemption_answers(data_dir: Path, fast: bool) -> list[tuple[int, object]]:
    with ApiStore.open(data_dir) as store:
        shop = store.create_key(Role.shop, "S1", None, NOW_MS)[0]
        app_key = store.create_key(Role.app, None, None, NOW_MS)[0]
    with Ledger.open(data_dir) as ledger:
        ledger.append([EntryDraft("award-1", "U1", EntryKind.award, 50, "2026-01-01", NOW_MS,
                                  "steps_tier_1", None, "t")])
    app = create_app(data_dir, fast_reads=fast)
    token = app.state.service.issue_token("U1")["token"]
    other = app.state.service.issue_token("U1")["token"]
    good = {"token": token, "points": 5, "terminal_id": "T1"}
    cases: list[tuple[str | None, dict[str, str], object]] = [
        (shop, {"Idempotency-Key": "a"}, good),
        (shop, {"Idempotency-Key": "a"}, good),  # replay
        (shop, {"Idempotency-Key": "a"}, {**good, "token": other}),  # 422
        (shop, {"Idempotency-Key": "b"}, {**good, "token": other, "points": 99}),  # 409
        (shop, {"Idempotency-Key": "c"}, good),  # token used
        ("nope", {"Idempotency-Key": "d"}, good), (app_key, {"Idempotency-Key": "d"}, good),
        (None, {"Idempotency-Key": "d"}, good), (shop, {}, good),
        (shop, {"Idempotency-Key": "has space"}, good),
        (shop, {"Idempotency-Key": "e"}, {**good, "points": "5"}),
        (shop, {"Idempotency-Key": "e"}, {**good, "extra": 1}),
        (shop, {"Idempotency-Key": "e", "Content-Type": "text/plain"}, good),
        (shop, {"Idempotency-Key": "e"}, {**good, "terminal_id": "x" * 70_000}),
    ]
    answers: list[tuple[int, object]] = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for key, headers, body in cases:
            auth = {"Authorization": f"Bearer {key}"} if key else {}
            content = orjson.dumps(body)
            response = await client.post("/v1/redemptions", content=content,
                                          headers={"Content-Type": "application/json",
                                                   **auth, **headers})
            answer = orjson.loads(re.sub(rb"k[0-9a-f]{12}", b"KEY", response.content))
            if response.status_code == 201:
                answer = {k: v for k, v in answer.items() if k not in ("entry_id", "ts_ms")}
            answers.append((response.status_code, answer,
                            response.headers.get("idempotent-replayed")))
    app.state.service.close()
    return answers


async def test_fast_redemption_path_answers_as_fastapi_does(tmp_path: Path) -> None:
    fast = await redemption_answers(tmp_path / "fast", True)
    slow = await redemption_answers(tmp_path / "slow", False)
    assert [status for status, *_ in fast] == [201, 201, 422, 409, 409, 401, 403, 401, 400,
                                               400, 400, 400, 400, 413]
    assert fast == slow


class HeldRedeemer(DirectRedeemer):
    """An asynchronous backend (like Kafka's) whose answers wait until released."""

    synchronous = False

    def __init__(self, ledger: Ledger) -> None:
        super().__init__(ledger)
        self.release = asyncio.Event()
        self.submitted = asyncio.Event()

    async def submit(self, command: Command) -> Entry:
        self.submitted.set()
        await self.release.wait()
        return self.apply(command)


async def test_a_duplicate_while_the_first_is_in_flight_is_409_in_progress(
        tmp_path: Path) -> None:
    reads = LedgerReads(tmp_path)
    held = HeldRedeemer(reads.writer_ledger)
    service = ApiService(tmp_path, reads, held, clock=Clock())
    reads.writer_ledger.append([EntryDraft("award-1", "U1", EntryKind.award, 50, "2026-01-01",
                                           NOW_MS, "steps_tier_1", None, "t")])
    try:
        token, other = (service.issue_token("U1")["token"] for _ in range(2))
        first = asyncio.create_task(service.redeem(SHOP, "k1", token, 5, "T1"))
        await held.submitted.wait()
        refusals = []
        for body_token, points in ((token, 5), (other, 6)):
            with pytest.raises(Refused) as refused:
                await service.redeem(SHOP, "k1", body_token, points, "T1")
            refusals.append((refused.value.http_status, refused.value.code,
                             refused.value.headers.get("Retry-After")))
        held.release.set()
        done = await first
        replay = await service.redeem(SHOP, "k1", token, 5, "T1")
        with pytest.raises(Refused) as conflict:
            await service.redeem(SHOP, "k1", other, 6, "T1")
    finally:
        service.close()
    assert refusals == [(409, "in_progress", None)] * 2
    assert error_response(Refused(Refusal.in_progress, "x")).headers["retry-after"] == "1"
    assert (done.status, replay.status, replay.body, replay.replayed) == (201, 201, done.body,
                                                                         True)
    assert (conflict.value.http_status, conflict.value.code) == (422, "idempotency_conflict")


def test_a_dead_claim_is_taken_over_only_where_one_ledger_binds_the_key(tmp_path: Path) -> None:
    """Embedded: any body may take over (the ledger's (shop, key) id decides). Kafka mode:
    only the same body, since the ledgers are per partition, so per person."""
    def claim(fingerprint: str, owner: str, nonce: str) -> Claim:
        return Claim("redemptions:S1", "k1", fingerprint, owner, NOW_MS, NOW_MS + 60_000,
                     nonce, "U1", "S1", "e1")

    dead = claim("body-a", "999999999:x", "n1")
    answers = []
    for take_over in (False, True):
        with ApiStore.open(tmp_path / str(take_over)) as store:
            store.claim(dead, live=lambda owner: False)
            for fingerprint in ("body-b", "body-a"):
                try:
                    store.claim(claim(fingerprint, "1:me", "n1" if fingerprint == "body-a"
                                      else "n2"), live=lambda owner: False,
                                take_over_other_body=take_over)
                    answers.append((take_over, fingerprint, "taken"))
                except ClaimRefused as refused:
                    answers.append((take_over, fingerprint, refused.reason))
    assert answers == [(False, "body-b", "in_progress"), (False, "body-a", "taken"),
                       (True, "body-b", "taken"), (True, "body-a", "taken")]


_BATCH_CLAIMS = st.builds(  # a batch's claims are this server's
    lambda scope, key, body, nonce, now_ms: Claim(
        f"redemptions:{scope}", key, body, "1:me", now_ms, now_ms + 60_000, nonce,
        None if nonce is None else "U1", scope, f"e-{scope}-{key}"),
    scope=st.sampled_from(["S1", "S2"]),
    key=st.sampled_from(["k0", "k1", "k2"]),
    body=st.sampled_from(["f0", "f1"]),
    nonce=st.sampled_from([None, "n0", "n1", "n2"]),
    now_ms=st.sampled_from([NOW_MS, NOW_MS + 120_000]),
)
_CLAIMS = st.builds(
    lambda scope, key, body, owner, nonce, now_ms: Claim(
        f"redemptions:{scope}", key, body, owner, now_ms, now_ms + 60_000, nonce,
        None if nonce is None else "U1", scope, f"e-{scope}-{key}"),
    scope=st.sampled_from(["S1", "S2"]),
    key=st.sampled_from(["k0", "k1", "k2"]),
    body=st.sampled_from(["f0", "f1"]),
    owner=st.sampled_from(["1:me", "999999999:dead"]),
    nonce=st.sampled_from([None, "n0", "n1", "n2"]),
    now_ms=st.sampled_from([NOW_MS, NOW_MS + 120_000]),
)


def _live_in(in_flight: set[tuple[str, str]], claim: Claim, owner: str) -> bool:
    """The service's `live`: this server's claim is live while it carries it out."""
    return owner == "1:me" and (claim.scope, claim.idempotency_key) in in_flight


def _claim_rows(path: Path) -> list[list[tuple]]:
    with sqlite3.connect(path / "api.sqlite") as db:
        return [db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
                for table in ("key_claims", "token_uses")]


@settings(max_examples=150, deadline=None)
@given(st.lists(_CLAIMS, max_size=6), st.lists(st.booleans(), max_size=6),
       st.lists(_BATCH_CLAIMS, min_size=1, max_size=8), st.booleans())
def test_claim_many_equals_claim_one_by_one(before: list[Claim], finished: list[bool],
                                            batch: list[Claim], take_over: bool) -> None:
    """Group commit's batched claims: the same answers and rows as `claim` one by one,
    a key claimed earlier in the batch being in progress (its owner is this server)."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for way in ("one", "many"):
            path = Path(tmp) / way
            in_flight: set[tuple[str, str]] = set()
            with ApiStore.open(path) as store:
                for claim, finish in zip(before, finished + [False] * len(before)):
                    try:
                        store.claim(claim, lambda owner: False)
                    except ClaimRefused:
                        continue
                    if finish:
                        store.finish(claim, b'{"done":1}')
                    else:
                        in_flight.add((claim.scope, claim.idempotency_key))

                live = partial(_live_in, in_flight)
                outcomes: list[object] = []
                with store.batch():
                    if way == "many":
                        outcomes = store.claim_many(batch, live, take_over_other_body=take_over)
                    for claim in batch if way == "one" else ():
                        try:
                            outcomes.append(store.claim(claim, partial(live, claim),
                                                        take_over_other_body=take_over))
                        except ClaimRefused as refused:
                            outcomes.append(refused)
                        else:
                            if outcomes[-1] is None:
                                in_flight.add((claim.scope, claim.idempotency_key))
            results.append(([o.reason if isinstance(o, ClaimRefused) else o for o in outcomes],
                            _claim_rows(path)))
    assert results[1] == results[0]
