"""Records that move points must come from the API service (issue 13, Kafka mode).

A forged redemption published straight to genki.redemptions is dead-lettered
`unauthenticated` and moves no points; on takeover, an entry on genki.ledger that
no authenticated request backs is not restored.
"""

from __future__ import annotations

import asyncio
import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from engine.kafka.authn import authenticate, authenticated_value, verification_failure
from engine.kafka.combined import combined_ledger
from engine.kafka.keys import (
    RECORD_KEYS_ENV,
    KeyFileError,
    add_key,
    load_keyring,
    record_keys,
)
from engine.kafka.publish import partition_of
from engine.kafka.worker import WorkerSettings, WorkerSummary, run_worker
from engine.ledger.commands import expire_id, redeem_id, refund_id
from engine.schemas import Redemption

pytest.register_assert_rewrite("tests.kafka_fixtures")
from tests.kafka_fixtures import Fleet, KafkaTarget, create_topics, genki, read_topic

pytest_plugins = ["tests.kafka_fixtures"]

PARTITIONS = 2
SHOP = "S042"
TS_MS = 1_790_000_000_000


def _request(user: str, points: int, key: str) -> Redemption:
    return Redemption(v=1, idempotency_key=key, shop_id=SHOP, terminal_id="T1", user_id=user,
                      points=points, ts_ms=TS_MS, kind="redeem")


def work(target: KafkaTarget, data_dir: Path) -> WorkerSummary:
    settings = WorkerSettings(bootstrap=target.bootstrap, data_dir=data_dir, group=target.group,
                              prefix=target.prefix, until_idle=True,
                              session_timeout_ms=target.session_timeout_ms)
    return asyncio.run(run_worker(settings))


async def _send(target: KafkaTarget, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    """Straight to the topic, keyed into the user's partition, as an intruder would."""
    producer = AIOKafkaProducer(bootstrap_servers=target.bootstrap)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(target.topic(topic), value, key=key,
                                         partition=partition_of(key, value, PARTITIONS))
    finally:
        await producer.stop()


@dataclass
class Forgery:
    user: str
    before: dict[str, int]
    summary: WorkerSummary
    after: dict[str, int]
    letters: list[dict[str, Any]]
    data_dir: Path


@pytest.fixture(scope="module")
def forgery(kafka_module: KafkaTarget, fleet: Fleet,
            tmp_path_factory: pytest.TempPathFactory) -> Forgery:
    create_topics(kafka_module, PARTITIONS)
    genki("publish", str(fleet.path), *kafka_module.args())
    data_dir = tmp_path_factory.mktemp("worker")
    work(kafka_module, data_dir)
    before = combined_ledger(data_dir).balances
    user = max(sorted(before), key=lambda u: before[u])
    keys = record_keys()
    assert keys is not None
    unsigned = orjson.dumps(_request(user, 2, "unsigned").model_dump(mode="json",
                                                                    exclude_none=True))
    signed = authenticate(_request(user, 2, "wrong-key"), keys)
    wrong_mac = base64.urlsafe_b64encode(b"\x00" * 32).rstrip(b"=").decode()
    wrong_key = orjson.dumps({**signed.model_dump(mode="json", exclude_none=True),
                              "auth": {"kid": keys.current, "mac": wrong_mac}})
    altered = orjson.dumps({**orjson.loads(authenticated_value(_request(user, 1, "altered"),
                                                                keys)), "points": 3})
    genuine = authenticated_value(_request(user, 1, "genuine"), keys)
    key = user.encode()
    asyncio.run(_send(kafka_module, "genki.redemptions",
                      [(key, unsigned), (key, wrong_key), (key, altered), (key, genuine)]))
    summary = work(kafka_module, data_dir)
    letters = [orjson.loads(v) for *_, v in read_topic(kafka_module, "genki.dlq")]
    return Forgery(user, before, summary, combined_ledger(data_dir).balances,
                   [x for x in letters if x["source"] in (kafka_module.topic("genki.redemptions"),
                                                          kafka_module.topic("genki.ledger"))],
                   data_dir)


def test_a_forged_redemption_is_dead_lettered_unauthenticated(forgery: Forgery) -> None:
    reasons = sorted(letter["reason"].split(":")[0:2] for letter in forgery.letters)
    assert reasons == [["unauthenticated", " auth"], ["unauthenticated", " auth.mac"],
                       ["unauthenticated", " auth.mac"]]
    assert forgery.summary.redemptions_rejected == 3
    assert forgery.summary.redemptions_applied == 1


def test_forged_redemptions_move_no_points(forgery: Forgery) -> None:
    expected = dict(forgery.before)
    expected[forgery.user] -= 1  # the genuine one only
    assert forgery.after == expected


def test_a_takeover_does_not_restore_a_forged_ledger_entry(
        forgery: Forgery, kafka_module: KafkaTarget,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    user = forgery.user
    minted = {"seq": 1, "entry_id": refund_id(SHOP, "minted"), "user_id": user, "kind": "refund",
              "points": 500, "day": "2026-09-22", "ts_ms": TS_MS, "rule": "refund",
              "ref": orjson.dumps({"key": "minted", "refund_of": redeem_id(SHOP, "genuine"),
                                   "shop": SHOP, "terminal": "T1"}).decode(),
              "rules_version": None, "prev_hash": "0" * 64, "hash": "0" * 64}
    lot = "0" * 64  # no such award
    burnt = {**minted, "entry_id": expire_id(user, lot), "kind": "expire",
             "points": -forgery.after[user], "rule": "expire",
             "ref": orjson.dumps({"lot": lot, "lot_day": "2026-01-01", "months": 6}).decode()}
    asyncio.run(_send(kafka_module, "genki.ledger", [(user.encode(), orjson.dumps(minted)),
                                                     (user.encode(), orjson.dumps(burnt))]))
    new_host = tmp_path_factory.mktemp("new-host")
    summary = work(kafka_module, new_host)
    assert summary.restore_refused == 2
    assert summary.restored_entries == 1  # the genuine redemption
    rebuilt = combined_ledger(new_host)
    assert rebuilt.balances == forgery.after
    letters = [orjson.loads(v) for *_, v in read_topic(kafka_module, "genki.dlq")]
    refused = [x for x in letters if x["source"] == kafka_module.topic("genki.ledger")]
    assert [x["reason"].split(":")[0] for x in refused] == ["unauthenticated"] * 2
    assert sorted(orjson.loads(base64.b64decode(x["raw_b64"]))["entry_id"] for x in refused) \
        == sorted([minted["entry_id"], burnt["entry_id"]])


# -- authenticators and key files --------------------------------------------------------


def test_an_authenticator_verifies_with_an_older_key_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    add_key(path)
    old = load_keyring(path)
    signed = authenticate(_request("W00001", 5, "k"), old)
    add_key(path)
    rotated = load_keyring(path)
    assert rotated.current != old.current
    assert verification_failure(signed, rotated) is None
    assert authenticate(_request("W00001", 5, "k"), rotated).auth.kid == rotated.current


def test_any_change_to_a_signed_record_breaks_its_authenticator(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    add_key(path)
    keys = load_keyring(path)
    signed = authenticate(_request("W00001", 5, "k"), keys)
    for change in ({"points": 6}, {"user_id": "W00002"}, {"idempotency_key": "k2"},
                   {"shop_id": "S043"}, {"ts_ms": TS_MS + 1}):
        assert verification_failure(signed.model_copy(update=change), keys).startswith(
            "unauthenticated: auth.mac:")


def test_key_files_are_private_and_kept_out_of_data_directories(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    add_key(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    with pytest.raises(KeyFileError, match="inside the data directory"):
        load_keyring(path, (tmp_path,))
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        load_keyring(path)


def test_without_key_settings_one_default_file_per_host_is_created_and_shared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.kafka.keys import (
        WRAP_KEYS_ENV,
        configure_key_paths,
        resolve_keyring,
        wrap_keys,
    )

    monkeypatch.setenv("GENKI_KEYS_DIR", str(tmp_path / "keys"))
    monkeypatch.delenv(RECORD_KEYS_ENV, raising=False)
    monkeypatch.delenv(WRAP_KEYS_ENV, raising=False)
    configure_key_paths(None, None)
    try:
        api = record_keys()
        worker = resolve_keyring(RECORD_KEYS_ENV, None, (tmp_path / "data",))
        assert api == worker and api.current == load_keyring(
            tmp_path / "keys" / "record-keys.json").current
        assert wrap_keys().current != api.current
        assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == [
            "record-keys.json", "wrap-keys.json"]
        assert os.stat(tmp_path / "keys" / "record-keys.json").st_mode & 0o777 == 0o600
        with pytest.raises(KeyFileError, match="inside the data directory"):
            resolve_keyring(RECORD_KEYS_ENV, None, (tmp_path,))
    finally:
        configure_key_paths(None, None)


def test_kafka_keys_add_rotates_and_list_shows_ids_only(tmp_path: Path) -> None:
    from tests.kafka_fixtures import genki

    path = tmp_path / "keys" / "record.json"
    first = genki("kafka-keys", "add", str(path)).stdout.split("added key ")[1].split(",")[0]
    second = genki("kafka-keys", "add", str(path)).stdout.split("added key ")[1].split(",")[0]
    listing = genki("kafka-keys", "list", str(path)).stdout.splitlines()
    assert sorted(listing) == sorted([first, f"{second} (current)"])
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_keyring(path).current == second
