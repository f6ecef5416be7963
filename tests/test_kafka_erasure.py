"""Crypto-shredding on the topics (issue 14.3, Kafka part): erase a person's data keys,
rebuild a partition from the topics, and the person is gone while everyone else is
exactly as in an embedded run without them."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import UsageError
from engine.kafka.combined import CombinedLedger, combine, combined_ledger
from engine.kafka.keys import add_key, load_keyring
from engine.kafka.personal import (
    MAGIC,
    ErasedKeys,
    PersonKeys,
    any_sealed,
    erase_person_keys,
    open_inputs,
)
from engine.kafka.worker import WorkerSettings, WorkerSummary, run_worker

pytest.register_assert_rewrite("tests.kafka_fixtures")
from tests.kafka_fixtures import (
    Fleet,
    KafkaTarget,
    create_topics,
    genki,
    person_keys_of,
    read_topic,
)

pytest_plugins = ["tests.kafka_fixtures"]

PARTITIONS = 2


def _user_of(line: bytes) -> str | None:
    try:
        body = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    user = body.get("user_id") if isinstance(body, dict) else None
    return user if isinstance(user, str) else None


def _lines(fleet: Fleet) -> list[bytes]:
    return [line for path in sorted(fleet.path.glob("*.ndjson"))
            for line in path.read_bytes().splitlines() if line.strip()]


def _embedded_without(fleet: Fleet, user: str, directory: Path) -> CombinedLedger:
    from engine.ingest.cli import ingest_paths
    from engine.ingest.log import EmbeddedLog
    from engine.pipeline import run_pipeline

    inputs = directory / "inputs"
    inputs.mkdir()
    for path in sorted(fleet.path.glob("*.ndjson")):
        kept = [line for line in path.read_bytes().splitlines()
                if line.strip() and _user_of(line) != user]
        (inputs / path.name).write_bytes(b"\n".join(kept) + b"\n")
    data_dir = directory / "data"
    with EmbeddedLog.open(data_dir) as log:
        ingest_paths(log, [str(inputs)])
    run_pipeline(data_dir)
    return combine([data_dir])


@dataclass
class Erasure:
    user: str
    records_of_user: int
    erased: list[ErasedKeys]
    summary: WorkerSummary
    rebuilt: CombinedLedger
    without: CombinedLedger


@pytest.fixture(scope="module")
def erasure(kafka_module: KafkaTarget, fleet: Fleet,
            tmp_path_factory: pytest.TempPathFactory) -> Erasure:
    create_topics(kafka_module, PARTITIONS)
    genki("publish", str(fleet.path), *kafka_module.args())
    balances = fleet.embedded.balances
    user = max(sorted(balances), key=lambda u: balances[u])
    erased = [erase_person_keys(user, kafka_module.bootstrap, kafka_module.prefix)
              for _ in range(2)]  # idempotent
    settings = WorkerSettings(bootstrap=kafka_module.bootstrap,
                              data_dir=tmp_path_factory.mktemp("rebuilt"), group=kafka_module.group,
                              prefix=kafka_module.prefix, until_idle=True,
                              session_timeout_ms=kafka_module.session_timeout_ms)
    summary = asyncio.run(run_worker(settings))
    return Erasure(user, sum(1 for line in _lines(fleet) if _user_of(line) == user), erased,
                   summary, combined_ledger(settings.data_dir),
                   _embedded_without(fleet, user, tmp_path_factory.mktemp("without")))


def test_a_rebuild_after_erasure_has_the_digest_of_an_embedded_run_without_the_person(
        erasure: Erasure) -> None:
    assert erasure.rebuilt.entries > 0
    assert erasure.rebuilt.content_digest == erasure.without.content_digest


def test_the_erased_person_is_absent_and_everyone_else_unchanged(erasure: Erasure,
                                                                 fleet: Fleet) -> None:
    assert erasure.user not in erasure.rebuilt.balances
    others = {u: b for u, b in fleet.embedded.balances.items() if u != erasure.user}
    assert erasure.rebuilt.balances == others


def test_the_erased_persons_records_count_as_erased_not_as_bad_input(erasure: Erasure,
                                                                     fleet: Fleet) -> None:
    summary = erasure.summary
    assert summary.erased_records == erasure.records_of_user > 0
    assert summary.accepted + summary.rejected + summary.erased_records == fleet.records


def test_no_dead_letter_carries_the_erased_persons_record(erasure: Erasure,
                                                         kafka_module: KafkaTarget) -> None:
    user = erasure.user.encode()
    assert all(key != user for *_, key, _ in read_topic(kafka_module, "genki.dlq"))


def test_erasure_is_a_tombstone_on_genki_keys_and_repeating_it_is_harmless(
        erasure: Erasure, kafka_module: KafkaTarget) -> None:
    first, again = erasure.erased
    assert first.topic == again.topic == kafka_module.topic("genki.keys")
    assert first.partition == again.partition and again.offset > first.offset
    keys = [(k, v) for p, _, k, v in read_topic(kafka_module, "genki.keys")
            if k == erasure.user.encode()]
    assert keys[0][1] and keys[-2:] == [(erasure.user.encode(), b""),
                                        (erasure.user.encode(), b"")]
    assert not person_keys_of(kafka_module).knows(erasure.user.encode())


def test_a_second_rebuild_gives_the_same_ledger(erasure: Erasure, kafka_module: KafkaTarget,
                                                tmp_path: Path) -> None:
    settings = WorkerSettings(bootstrap=kafka_module.bootstrap, data_dir=tmp_path,
                              group=f"{kafka_module.group}-again", prefix=kafka_module.prefix,
                              until_idle=True, session_timeout_ms=kafka_module.session_timeout_ms)
    asyncio.run(run_worker(settings))  # from the first rebuild's snapshot, or from offset 0
    rebuilt = combined_ledger(tmp_path)
    assert rebuilt.content_digest == erasure.without.content_digest
    assert erasure.user not in rebuilt.balances


# -- the cipher ----------------------------------------------------------------------------


@pytest.fixture
def person_keys(tmp_path: Path) -> PersonKeys:
    add_key(tmp_path / "wrap.json")
    return PersonKeys(load_keyring(tmp_path / "wrap.json"))


def test_a_sealed_record_opens_only_for_its_person_and_topic(person_keys: PersonKeys) -> None:
    person_keys.new_key(b"W00001")
    person_keys.new_key(b"W00002")
    sealed = person_keys.seal(b"genki.samples", b"W00001", b'{"v": 1}')
    assert sealed[:4] == MAGIC and b'"v"' not in sealed
    assert person_keys.open(b"genki.samples", b"W00001", sealed) == b'{"v": 1}'
    assert person_keys.open(b"genki.samples", b"W00002", sealed) is None
    assert person_keys.open(b"genki.profiles", b"W00001", sealed) is None


def test_a_tombstone_makes_every_record_of_the_person_unreadable(
        person_keys: PersonKeys) -> None:
    ring = person_keys.new_key(b"W00001")
    sealed = person_keys.seal(b"genki.samples", b"W00001", b"{}")
    reader = PersonKeys(person_keys.wrap)
    reader.apply(b"W00001", ring)
    assert reader.open(b"genki.samples", b"W00001", sealed) == b"{}"
    reader.apply(b"W00001", None)
    offsets, values, erased = open_inputs(reader, b"genki.samples", [7, 8],
                                          [b"W00001", b"W00002"], [sealed, b'{"plain": 1}'])
    assert (offsets, values, erased) == ([8], [b'{"plain": 1}'], 1)


def test_sealed_records_without_wrap_keys_are_a_configuration_error_not_erasure(
        person_keys: PersonKeys) -> None:
    person_keys.new_key(b"W00001")
    sealed = person_keys.seal(b"genki.samples", b"W00001", b"{}")
    with pytest.raises(UsageError, match="wrap keys"):
        open_inputs(None, b"genki.samples", [0], [b"W00001"], [sealed])


@given(st.lists(st.sampled_from([b"", b"{}", b"\x00", b"\x00gk", MAGIC, MAGIC + b"x",
                                 b"x" + MAGIC, b'{"v": 1}'])))
def test_any_sealed_is_a_prefix_check_of_every_value(values: list[bytes]) -> None:
    assert any_sealed(values) == any(v[:4] == MAGIC for v in values)


def test_a_data_key_is_stored_wrapped(person_keys: PersonKeys) -> None:
    ring = orjson.loads(person_keys.new_key(b"W00001"))
    (wrapped,) = ring["keys"].values()
    assert wrapped["w"] == person_keys.wrap.current
    assert len(base64.b64decode(wrapped["k"])) == 12 + 32 + 16  # nonce, key, tag


def test_outputs_of_people_whose_inputs_came_in_clear_are_sealed_with_keys_the_worker_made(
        kafka: KafkaTarget, fleet: Fleet, tmp_path: Path) -> None:
    create_topics(kafka, PARTITIONS)
    genki("publish", str(fleet.path), *kafka.args(), "--no-encryption")  # another gateway
    settings = WorkerSettings(bootstrap=kafka.bootstrap, data_dir=tmp_path, group=kafka.group,
                              prefix=kafka.prefix, until_idle=True,
                              session_timeout_ms=kafka.session_timeout_ms)
    summary = asyncio.run(run_worker(settings))
    assert combined_ledger(tmp_path).content_digest == fleet.embedded.content_digest
    assert summary.data_keys_created == len(fleet.embedded.balances)
    awards = [orjson.loads(v) for *_, v in read_topic(kafka, "genki.ledger")]
    assert awards and all("sealed" in entry for entry in awards if entry["kind"] == "award")
    keys = person_keys_of(kafka)
    opened = [orjson.loads(keys.open(b"genki.dlq", key, base64.b64decode(
        orjson.loads(value)["raw_b64"]))) for *_, key, value in read_topic(kafka, "genki.dlq")
        if key is not None]
    assert opened and all(isinstance(body, dict) for body in opened)


def test_a_takeover_after_erasure_restores_none_of_the_persons_redemptions(
        kafka: KafkaTarget, fleet: Fleet, tmp_path: Path) -> None:
    create_topics(kafka, PARTITIONS)
    genki("publish", str(fleet.path), *kafka.args())
    settings = WorkerSettings(bootstrap=kafka.bootstrap, data_dir=tmp_path / "a",
                              group=kafka.group, prefix=kafka.prefix, until_idle=True,
                              session_timeout_ms=kafka.session_timeout_ms)
    asyncio.run(run_worker(settings))
    balances = fleet.embedded.balances
    user = max(sorted(balances), key=lambda u: balances[u])
    request = {"v": 1, "idempotency_key": "k1", "shop_id": "S001", "terminal_id": "T1",
               "user_id": user, "points": 2, "ts_ms": 1_790_000_000_000, "kind": "redeem"}
    (tmp_path / "r.ndjson").write_bytes(orjson.dumps(request) + b"\n")
    genki("publish", str(tmp_path / "r.ndjson"), *kafka.args(), "--sign-redemptions")
    assert asyncio.run(run_worker(settings)).redemptions_applied == 1
    erase_person_keys(user, kafka.bootstrap, kafka.prefix)
    new_host = WorkerSettings(bootstrap=kafka.bootstrap, data_dir=tmp_path / "b",
                              group=kafka.group, prefix=kafka.prefix, until_idle=True,
                              session_timeout_ms=kafka.session_timeout_ms)
    summary = asyncio.run(run_worker(new_host))
    rebuilt = combined_ledger(tmp_path / "b")
    assert user not in rebuilt.balances
    assert rebuilt.balances == {u: b for u, b in balances.items() if u != user}
    assert summary.restored_entries == summary.restore_refused == 0
