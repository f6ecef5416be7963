"""The HTTP API in Kafka mode, against a real broker, a real `genki worker` and a real
`genki serve --bootstrap` (subprocesses).

One scenario per module: a small simulated fleet is published and a worker
(running in the background, as in production) builds the partition ledgers;
the API then redeems through genki.redemptions and reads the workers' data
directory. Each test uses its own users.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from engine.api.store import Role
from engine.kafka.combined import combined_ledger

pytest.register_assert_rewrite("tests.kafka_fixtures")
from tests.kafka_fixtures import (
    Fleet,
    KafkaTarget,
    create_topics,
    genki,
    start_genki,
    wait_for,
)
from tests.test_api import Server, check_race, make_key, race_same_key, traced_syncs

pytest_plugins = ["tests.kafka_fixtures"]

PARTITIONS = 2
SHOP = "SHOP_K"
WORKER_STOP_S_MAX = 30.0


@dataclass
class Scenario:
    target: KafkaTarget
    home: Path
    server: Server
    worker_dir: Path
    keys: dict[str, str]
    users: list[str]  # users with at least 10 points, most points first


def _ledger_ready(worker_dir: Path, expected: dict[str, int]) -> bool:
    try:
        return combined_ledger(worker_dir).balances == expected
    except Exception:  # noqa: BLE001 - the worker is still creating its files
        return False


class Worker:
    """`genki worker` in the background, as in production (no --until-idle)."""

    def __init__(self, target: KafkaTarget, data_dir: Path) -> None:
        self.args = ["worker", *target.args(), "--data-dir", str(data_dir), "--group",
                     target.group, "--session-timeout-ms", str(target.session_timeout_ms)]
        self.log_path = data_dir.parent / f"{data_dir.name}-worker.log"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        assert self.process is None
        self.process = start_genki(*self.args, stderr_path=self.log_path)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=WORKER_STOP_S_MAX)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


@pytest.fixture(scope="module")
def worker(kafka_module: KafkaTarget, fleet: Fleet,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    create_topics(kafka_module, PARTITIONS)
    genki("publish", str(fleet.path), *kafka_module.args())
    data_dir = tmp_path_factory.mktemp("worker")
    running = Worker(kafka_module, data_dir)
    running.start()
    try:
        wait_for(lambda: _ledger_ready(data_dir, fleet.embedded.balances),
                 "the worker to build the partition ledgers")
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def worker_dir(worker: Worker) -> Path:
    return Path(worker.args[worker.args.index("--data-dir") + 1])


@pytest.fixture(scope="module")
def scenario(kafka_module: KafkaTarget, worker_dir: Path, fleet: Fleet,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    home = tmp_path_factory.mktemp("api-home")
    keys = {"app": make_key(home, Role.app), "shop": make_key(home, Role.shop, SHOP),
            "other_shop": make_key(home, Role.shop, "SHOP_OTHER")}
    server = Server(home, *kafka_module.args(), "--partitions-dir", str(worker_dir))
    users = [user for user, points in sorted(fleet.embedded.balances.items(),
                                             key=lambda item: (-item[1], item[0]))
             if points >= 10]
    assert len(users) >= 5
    try:
        yield Scenario(kafka_module, home, server, worker_dir, keys, users)
    finally:
        server.stop()


def token_for(s: Scenario, user_id: str) -> str:
    with s.server.client(s.keys["app"]) as app:
        response = app.post(f"/v1/users/{user_id}/redeem-tokens")
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def balance(s: Scenario, user_id: str) -> int:
    with s.server.client(s.keys["app"]) as app:
        response = app.get(f"/v1/users/{user_id}/balance")
    assert response.status_code == 200, response.text
    return int(response.json()["balance"])


def redeem(s: Scenario, token: str, points: int, key: str) -> httpx.Response:
    with s.server.client(s.keys["shop"]) as shop:
        return shop.post("/v1/redemptions", headers={"Idempotency-Key": key},
                         json={"token": token, "points": points, "terminal_id": "T1"})


def test_reads_come_from_the_partition_ledgers(scenario: Scenario, fleet: Fleet) -> None:
    user = scenario.users[-1]
    assert balance(scenario, user) == fleet.embedded.balances[user]


def test_a_redemption_takes_exactly_the_points_through_the_owner(scenario: Scenario) -> None:
    user = scenario.users[0]
    before = balance(scenario, user)
    response = redeem(scenario, token_for(scenario, user), 7, "sale-exact")
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["shop_id"], body["terminal_id"], body["points"]) == (SHOP, "T1", 7)
    assert sorted(body) == ["entry_id", "points", "shop_id", "terminal_id", "ts_ms"]
    assert balance(scenario, user) == before - 7
    assert combined_ledger(scenario.worker_dir).balances[user] == before - 7


def test_a_redemption_above_the_balance_is_409_insufficient_points(scenario: Scenario) -> None:
    user = scenario.users[1]
    before = balance(scenario, user)
    response = redeem(scenario, token_for(scenario, user), before + 1, "sale-too-much")
    assert response.status_code == 409, response.text
    problem = response.json()
    assert problem["code"] == "insufficient_points"
    assert str(before) not in problem["detail"] and user not in response.text
    assert balance(scenario, user) == before


def test_the_token_of_a_refused_redemption_stays_usable(scenario: Scenario) -> None:
    user = scenario.users[1]
    token = token_for(scenario, user)
    before = balance(scenario, user)
    assert redeem(scenario, token, before + 1, "sale-refused-first").status_code == 409
    response = redeem(scenario, token, 1, "sale-refused-first-then-less")
    assert response.status_code == 201, response.text
    assert balance(scenario, user) == before - 1


def test_a_retry_with_the_same_key_returns_the_stored_response_and_charges_once(
        scenario: Scenario) -> None:
    user = scenario.users[2]
    before = balance(scenario, user)
    token = token_for(scenario, user)
    first = redeem(scenario, token, 4, "sale-retried")
    second = redeem(scenario, token, 4, "sale-retried")
    assert first.status_code == second.status_code == 201, second.text
    assert second.content == first.content
    assert second.headers.get("Idempotent-Replayed") == "true"
    assert balance(scenario, user) == before - 4


def test_a_refund_gives_points_back_through_the_owner(scenario: Scenario) -> None:
    user = scenario.users[3]
    before = balance(scenario, user)
    redeemed = redeem(scenario, token_for(scenario, user), 5, "sale-refunded")
    assert redeemed.status_code == 201, redeemed.text
    with scenario.server.client(scenario.keys["shop"]) as shop:
        response = shop.post("/v1/refunds", headers={"Idempotency-Key": "refund-1"},
                             json={"redemption_entry_id": redeemed.json()["entry_id"],
                                   "points": 2})
    assert response.status_code == 201, response.text
    assert response.json()["points"] == 2
    assert balance(scenario, user) == before - 3


def test_a_refund_above_the_redemption_is_409(scenario: Scenario) -> None:
    user = scenario.users[3]
    redeemed = redeem(scenario, token_for(scenario, user), 2, "sale-over-refunded")
    assert redeemed.status_code == 201, redeemed.text
    before = balance(scenario, user)
    with scenario.server.client(scenario.keys["shop"]) as shop:
        response = shop.post("/v1/refunds", headers={"Idempotency-Key": "refund-too-much"},
                             json={"redemption_entry_id": redeemed.json()["entry_id"],
                                   "points": 3})
    assert response.status_code == 409, response.text
    assert response.json()["code"] == "refund_exceeds_redemption"
    assert balance(scenario, user) == before


KAFKA_RACE_TRIES = 8


def redeemed_entries(s: Scenario, user_id: str) -> int:
    with s.server.client(s.keys["app"]) as app:
        entries = app.get(f"/v1/users/{user_id}/history", params={"limit": 500}).json()
    return sum(1 for entry in entries["entries"] if entry["kind"] == "redeem")


def test_the_same_key_with_two_bodies_at_two_kafka_mode_servers_redeems_once(
        scenario: Scenario) -> None:
    """Two `genki serve --bootstrap` processes on one data directory, the issue's race."""
    second = Server(scenario.home, *scenario.target.args(), "--partitions-dir",
                    str(scenario.worker_dir))
    try:
        for attempt in range(KAFKA_RACE_TRIES):
            user = scenario.users[5 + attempt % (len(scenario.users) - 5)]
            key = f"race-{attempt}"
            before, entries_before = balance(scenario, user), redeemed_entries(scenario, user)
            tokens = (token_for(scenario, user), token_for(scenario, user))
            answers = race_same_key((scenario.server, second), scenario.keys["shop"], tokens,
                                    (1, 2), key)
            winner = check_race(answers, (1, 2), before, balance(scenario, user),
                                redeemed_entries(scenario, user) - entries_before)
            loser_again = redeem(scenario, tokens[1 - winner], 2 - winner, key)
            winner_again = redeem(scenario, tokens[winner], 1 + winner, key)
            assert (loser_again.status_code, attempt) == (422, attempt), loser_again.text
            assert (winner_again.status_code, winner_again.content) == (
                201, answers[winner].content)
    finally:
        second.stop()


def test_redemption_limits_hold_in_kafka_mode(scenario: Scenario, tmp_path: Path) -> None:
    """The daily limit travels in the record and the owner's ledger enforces it."""
    user = scenario.users[1]
    today = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 9 * 3600))
    with scenario.server.client(scenario.keys["app"]) as app:
        entries = app.get(f"/v1/users/{user}/history", params={"limit": 500}).json()["entries"]
    redeemed_today = -sum(e["points"] for e in entries
                          if e["kind"] == "redeem" and e["day"] == today)
    keys = {"app": make_key(tmp_path, Role.app), "shop": make_key(tmp_path, Role.shop, SHOP)}
    server = Server(tmp_path, *scenario.target.args(), "--partitions-dir",
                    str(scenario.worker_dir), "--points-per-redemption-max", "4",
                    "--points-per-person-per-day-max", str(redeemed_today + 5))
    try:
        limited = Scenario(scenario.target, tmp_path, server, scenario.worker_dir, keys,
                           scenario.users)
        before = balance(limited, user)
        answers = [redeem(limited, token_for(limited, user), points, f"limited-{i}")
                   for i, points in enumerate((5, 3, 3, 2))]
        assert [(a.status_code, a.json().get("code")) for a in answers] == [
            (422, "points_per_redemption_max_exceeded"), (201, None),
            (409, "points_per_person_per_day_max_exceeded"), (201, None)]
        assert balance(limited, user) == before - 5
    finally:
        server.stop()


def test_without_the_partitions_dir_reads_are_503_and_redemptions_work(
        scenario: Scenario, tmp_path: Path) -> None:
    keys = {"app": make_key(tmp_path, Role.app), "shop": make_key(tmp_path, Role.shop, SHOP)}
    server = Server(tmp_path, *scenario.target.args())
    try:
        other = Scenario(scenario.target, tmp_path, server, scenario.worker_dir, keys,
                         scenario.users)
        with server.client(keys["app"]) as app:
            read = app.get(f"/v1/users/{scenario.users[0]}/balance")
        assert read.status_code == 503, read.text
        assert read.json()["code"] == "reads_unavailable"
        assert "--partitions-dir" in read.json()["detail"]
        user = scenario.users[0]
        before = combined_ledger(scenario.worker_dir).balances[user]
        response = redeem(other, token_for(other, user), 1, "sale-no-reads")
        assert response.status_code == 201, response.text
        assert combined_ledger(scenario.worker_dir).balances[user] == before - 1
    finally:
        server.stop()


def test_a_timed_out_redemption_is_finished_by_a_retry_with_the_same_key(
        scenario: Scenario, worker: Worker, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """Last in the module: it stops the worker. The request waits 1 s here (15 s in
    production), times out while no worker runs, and the retry after the worker is back
    gets the redemption, charged once."""
    user = scenario.users[4]
    before = balance(scenario, user)
    monkeypatch.setenv("GENKI_API_OUTCOME_WAIT_S", "1")
    keys = {"app": make_key(tmp_path, Role.app), "shop": make_key(tmp_path, Role.shop, SHOP)}
    server = Server(tmp_path, *scenario.target.args(), "--partitions-dir",
                    str(scenario.worker_dir))
    try:
        waiting = Scenario(scenario.target, tmp_path, server, scenario.worker_dir, keys,
                           scenario.users)
        worker.stop()
        token = token_for(waiting, user)
        timed_out = redeem(waiting, token, 3, "sale-late")
        assert timed_out.status_code == 504, timed_out.text
        assert timed_out.json()["code"] == "outcome_timeout"
        assert "same Idempotency-Key" in timed_out.json()["detail"]
        assert redeem(waiting, token, 3, "sale-late-other-key").status_code == 409
        worker.start()
        answers: list[httpx.Response] = []

        def retried() -> bool:
            answers.append(redeem(waiting, token, 3, "sale-late"))
            return answers[-1].status_code != 504

        wait_for(retried, "a retry to get the outcome")
        assert answers[-1].status_code == 201, answers[-1].text
        assert balance(waiting, user) == before - 3
        assert combined_ledger(scenario.worker_dir).balances[user] == before - 3
    finally:
        server.stop()


def test_unreadable_outcome_records_are_skipped_and_redemptions_go_on(
        scenario: Scenario, worker: Worker, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """Garbage on genki.dlq and genki.ledger while a request is watched: the API's outcome
    consumer skips it (counted on /healthz) and the next redemption still succeeds. This
    API has no --partitions-dir, so its answers can only come through that consumer."""
    user = scenario.users[4]
    monkeypatch.setenv("GENKI_API_OUTCOME_WAIT_S", "1")
    keys = {"app": make_key(tmp_path, Role.app), "shop": make_key(tmp_path, Role.shop, SHOP)}
    server = Server(tmp_path, *scenario.target.args())
    try:
        api = Scenario(scenario.target, tmp_path, server, scenario.worker_dir, keys,
                       scenario.users)
        worker.stop()
        start = balance(scenario, user)
        assert redeem(api, token_for(api, user), 1, "sale-watched").status_code == 504
        garbage = [b"not json", b"[1, 2]", b'{"source": 7, "partition": "x"}',
                   orjson.dumps({"source": scenario.target.topic("genki.redemptions"),
                                 "partition": None, "offset": [], "raw_b64": "%%%"})]
        asyncio.run(produce_to_every_partition(scenario.target, "genki.dlq", garbage, None))
        asyncio.run(produce_to_every_partition(scenario.target, "genki.ledger",
                                               [b"{", b'{"entry_id": 1}'], user.encode()))

        def skipped() -> bool:
            return int(httpx.get(server.url + "/healthz").json()["outcome_records_skipped"]) \
                >= 2 * PARTITIONS + 2

        wait_for(skipped, "the API to read the garbage")
        worker.start()
        wait_for(lambda: balance(scenario, user) == start - 1, "the worker to apply the watched one")
        token, answers = token_for(api, user), []

        def answered() -> bool:  # the same key: a 504 while the worker warms up is retried
            answers.append(redeem(api, token, 2, "sale-after-garbage"))
            return answers[-1].status_code != 504

        wait_for(answered, "the next redemption")
        assert answers[-1].status_code == 201, answers[-1].text
        assert balance(scenario, user) == start - 1 - 2
    finally:
        server.stop()


async def produce_to_every_partition(target: KafkaTarget, name: str, values: list[bytes],
                                     key: bytes | None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=target.bootstrap)
    await producer.start()
    try:
        for partition in range(PARTITIONS):
            for value in values:
                await producer.send_and_wait(target.topic(name), value, key=key,
                                             partition=partition)
    finally:
        await producer.stop()


def test_a_kafka_mode_claim_is_durable_before_its_redemption_is_sent(
        scenario: Scenario, tmp_path: Path) -> None:
    """The owner applies what it receives; a power cut of the API's host must not forget
    the token use behind it: each redemption's claims are fdatasynced before publishing."""
    users = scenario.users[:2]
    tokens = [token_for(scenario, user) for user in users]
    trace = tmp_path / "trace.txt"
    with traced_syncs(scenario.server.process.pid, trace):
        for index, token in enumerate(tokens):
            assert redeem(scenario, token, 1, f"durable-{index}").status_code == 201
    claim_syncs = [line for line in trace.read_text().splitlines()
                   if "fdatasync" in line and "api.sqlite-wal>" in line
                   and not line.endswith("<unfinished ...>")]
    assert len(claim_syncs) >= len(tokens)
