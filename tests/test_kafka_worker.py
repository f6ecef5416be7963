"""The Kafka runtime against a real broker gives the embedded runtime's ledger.

One scenario per module (a broker, a small simulated fleet): publish → worker
until idle → redemptions through the topic → a new host takes every partition
over from an empty directory. Each test asserts one property of one stage.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.kafka.combined import CombinedLedger, combined_ledger
from engine.kafka.host import GC_THRESHOLD_OBJECTS, collected_rarely
from engine.kafka.worker import WorkerSettings, WorkerSummary, run_worker
from engine.ledger import Ledger
from engine.ledger.commands import redeem_id
from engine.schemas import FlagEvent

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

PARTITIONS = 4
SHOP = "S001"


def work(target: KafkaTarget, data_dir: Path, **kw: Any) -> WorkerSummary:
    settings = WorkerSettings(bootstrap=target.bootstrap, data_dir=data_dir, group=target.group,
                              prefix=target.prefix, until_idle=True,
                              session_timeout_ms=target.session_timeout_ms, **kw)
    return asyncio.run(run_worker(settings))


@dataclass
class FirstRun:
    published: dict[str, Any]
    summary: WorkerSummary
    ledger: CombinedLedger
    data_dir: Path


@pytest.fixture(scope="module")
def first_run(kafka_module: KafkaTarget, fleet: Fleet,
              tmp_path_factory: pytest.TempPathFactory) -> FirstRun:
    create_topics(kafka_module, PARTITIONS)
    published = orjson.loads(genki("publish", str(fleet.path), *kafka_module.args(),
                                   "--json").stdout)
    data_dir = tmp_path_factory.mktemp("worker")
    # Partition stores in processes of their own; every later run of the module uses
    # threads on the same directories, so both hosts are held to one ledger.
    summary = work(kafka_module, data_dir, partition_processes=True)
    return FirstRun(published, summary, combined_ledger(data_dir), data_dir)


def test_kafka_ledger_has_the_embedded_content_digest(first_run: FirstRun, fleet: Fleet) -> None:
    assert first_run.ledger.entries > 0
    assert first_run.ledger.content_digest == fleet.embedded.content_digest


def test_kafka_balances_equal_the_embedded_balances(first_run: FirstRun, fleet: Fleet) -> None:
    assert first_run.ledger.balances == fleet.embedded.balances


def test_worker_reads_every_offset_of_every_partition(first_run: FirstRun) -> None:
    assert first_run.summary.offset_gaps == 0
    by_topic = first_run.summary.records_by_topic
    assert by_topic == first_run.published["by_topic"]


def test_worker_owns_every_partition_in_its_own_directory(first_run: FirstRun) -> None:
    assert first_run.summary.partitions == list(range(PARTITIONS))
    assert first_run.ledger.partitions == list(range(PARTITIONS))


def test_accepted_plus_rejected_equals_published(first_run: FirstRun, fleet: Fleet) -> None:
    summary = first_run.summary
    assert first_run.published["records"] == fleet.records
    assert summary.accepted + summary.rejected == fleet.records
    assert summary.rejected == fleet.embedded_rejected > 0


def test_rejected_records_land_on_dlq_with_reason_and_origin(
        kafka_module: KafkaTarget, first_run: FirstRun) -> None:
    letters = [orjson.loads(value) for *_, value in read_topic(kafka_module, "genki.dlq")]
    assert len(letters) == first_run.summary.rejected
    keys = person_keys_of(kafka_module)
    inputs = {(kafka_module.topic(name), p, offset): keys.open(name.encode(), key, value)
              for name in ("genki.profiles", "genki.samples", "genki.activities")
              for p, offset, key, value in read_topic(kafka_module, name)}
    for _, _, key, value in read_topic(kafka_module, "genki.dlq"):
        letter = orjson.loads(value)
        assert letter["v"] == 1 and letter["reason"].split(":")[0].isidentifier()
        origin = inputs[(letter["source"], letter["partition"], letter["offset"])]
        raw = keys.open(b"genki.dlq", key, base64.b64decode(letter["raw_b64"]))
        assert raw == origin[:len(raw)]


def test_personal_payloads_on_the_topics_are_sealed_per_person(
        kafka_module: KafkaTarget, first_run: FirstRun) -> None:
    for name in ("genki.profiles", "genki.samples", "genki.activities"):
        records = read_topic(kafka_module, name)
        assert records and {value[:4] for _, _, key, value in records if key} == {b"\x00gk1"}
    flags = read_topic(kafka_module, "genki.flags")
    assert all(value[:4] == b"\x00gk1" for *_, value in flags)
    kinds = {}
    for _, _, _, value in read_topic(kafka_module, "genki.ledger"):
        body = orjson.loads(value)
        kinds.setdefault(body["kind"], set()).add("sealed" in body)
    assert kinds == {"award": {True}}


def test_every_ledger_entry_is_published_once_on_its_users_partition(
        kafka_module: KafkaTarget, first_run: FirstRun) -> None:
    records = read_topic(kafka_module, "genki.ledger")
    entries = {orjson.loads(value)["entry_id"]: (partition, key, orjson.loads(value))
               for partition, _, key, value in records}
    assert len(records) == len(entries) == first_run.ledger.entries
    owner = {}
    for partition, key, entry in entries.values():
        assert key == entry["user_id"].encode()
        assert owner.setdefault(entry["user_id"], partition) == partition


def test_a_second_run_after_a_replayed_publish_changes_nothing(
        kafka_module: KafkaTarget, fleet: Fleet, first_run: FirstRun) -> None:
    genki("publish", str(fleet.path), *kafka_module.args())  # a gateway retrying everything
    summary = work(kafka_module, first_run.data_dir)
    assert summary.accepted + summary.rejected == fleet.records
    assert summary.awards == 0 and summary.published_entries == 0
    assert combined_ledger(first_run.data_dir).content_digest == fleet.embedded.content_digest


def test_flag_changes_are_published_as_flag_events_once(kafka_module: KafkaTarget,
                                                       first_run: FirstRun, fleet: Fleet) -> None:
    with Ledger.open(fleet.embedded_dir) as ledger:
        embedded = {flag.flag_id: flag for user in fleet.embedded.balances
                    for flag in ledger.flag_history(user)}
    records = read_topic(kafka_module, "genki.flags")
    keys = person_keys_of(kafka_module)
    published = {}
    for _, _, key, value in records:
        flag = FlagEvent.model_validate_json(keys.open(b"genki.flags", key, value))
        assert key == flag.user_id.encode()
        published[flag.flag_id] = flag
    assert len(records) == len(published) == first_run.summary.published_flags > 0
    assert published == embedded


# -- redemptions -------------------------------------------------------------------------


@dataclass
class RedemptionRun:
    balances_before: dict[str, int]
    expected: dict[str, int]
    summary: WorkerSummary
    ledger: CombinedLedger
    letters: list[dict[str, Any]]


def _redemption(user: str, points: int, key: str, **extra: Any) -> bytes:
    body = {"v": 1, "idempotency_key": key, "shop_id": SHOP, "terminal_id": "T1",
            "user_id": user, "points": points, "ts_ms": 1_790_000_000_000, "kind": "redeem"}
    return orjson.dumps({**body, **extra})


@pytest.fixture(scope="module")
def redemption_run(kafka_module: KafkaTarget, first_run: FirstRun,
                   tmp_path_factory: pytest.TempPathFactory) -> RedemptionRun:
    """Per user with points: take 60 %, try 60 % again (refused), retry the first request
    (no second charge), refund 1 point of it; plus one malformed request."""
    before = combined_ledger(first_run.data_dir).balances
    lines, expected = [], dict(before)
    for user, balance in sorted(before.items()):
        if balance < 2:
            continue
        take = math.ceil(balance * 0.6)
        lines += [_redemption(user, take, f"{user}-a"), _redemption(user, take, f"{user}-b"),
                  _redemption(user, take, f"{user}-a"),
                  _redemption(user, 1, f"{user}-r", kind="refund",
                              refund_of=redeem_id(SHOP, f"{user}-a"))]
        expected[user] = balance - take + 1
    lines.append(_redemption(next(iter(before)), -5, "negative"))
    path = tmp_path_factory.mktemp("redemptions") / "redemptions.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    genki("publish", str(path), *kafka_module.args(), "--sign-redemptions")
    summary = work(kafka_module, first_run.data_dir)
    letters = [orjson.loads(value) for *_, value in read_topic(kafka_module, "genki.dlq")]
    letters = [x for x in letters if x["source"] == kafka_module.topic("genki.redemptions")]
    return RedemptionRun(before, expected, summary, combined_ledger(first_run.data_dir), letters)


def test_redemptions_through_the_topic_take_exactly_the_requested_points(
        redemption_run: RedemptionRun) -> None:
    assert redemption_run.ledger.balances == redemption_run.expected


def test_redemptions_never_overdraw(redemption_run: RedemptionRun, first_run: FirstRun) -> None:
    assert min(redemption_run.ledger.balances.values()) >= 0
    for number in redemption_run.ledger.partitions:
        with Ledger.open(first_run.data_dir / f"p{number}") as ledger:
            assert ledger.verify().ok


def test_refused_redemptions_are_dead_letters_with_the_reason(
        redemption_run: RedemptionRun) -> None:
    users = sum(1 for b in redemption_run.balances_before.values() if b >= 2)
    codes = sorted(letter["reason"].split(":")[0] for letter in redemption_run.letters)
    assert codes == ["bad_field"] + ["insufficient_points"] * users
    assert redemption_run.summary.redemptions_rejected == users + 1
    assert redemption_run.summary.redemptions_applied == 3 * users


# -- takeover ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def takeover(kafka_module: KafkaTarget, redemption_run: RedemptionRun,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[WorkerSummary, CombinedLedger]:
    """Every partition moves to a host without its directory (same group)."""
    data_dir = tmp_path_factory.mktemp("new-host")
    summary = work(kafka_module, data_dir)
    return summary, combined_ledger(data_dir)


def test_a_new_host_rebuilds_the_same_ledger_from_the_topics(
        takeover: tuple[WorkerSummary, CombinedLedger], redemption_run: RedemptionRun) -> None:
    summary, ledger = takeover
    assert sorted(summary.snapshot_restored_partitions) == list(range(PARTITIONS))
    assert summary.caught_up_partitions == []  # the snapshots held every input offset
    assert ledger.content_digest == redemption_run.ledger.content_digest
    assert ledger.balances == redemption_run.expected


def test_a_new_host_restores_redemptions_from_genki_ledger_without_reapplying_them(
        takeover: tuple[WorkerSummary, CombinedLedger], redemption_run: RedemptionRun) -> None:
    summary, _ = takeover
    assert summary.restored_entries == 2 * redemption_run.summary.redemptions_applied // 3
    assert summary.redemptions_applied == summary.redemptions_rejected == 0


def test_the_collector_is_as_it_was_after_a_worker_ran() -> None:
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    with collected_rarely():
        assert gc.get_threshold()[0] == GC_THRESHOLD_OBJECTS
        assert gc.get_freeze_count() > frozen
        with collected_rarely():  # a second worker in the same process
            pass
        assert gc.get_threshold()[0] == GC_THRESHOLD_OBJECTS
        garbage: list[Any] = []
        garbage.append(garbage)  # a cycle made while the worker runs is still collected
        del garbage
        assert gc.collect() >= 1
    assert (gc.get_threshold(), gc.get_freeze_count()) == (threshold, frozen)
