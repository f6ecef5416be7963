"""Topics and the reference gateway against a real broker; the assignor on its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from engine.kafka.assignor import assign_numbers
from engine.kafka.publish import partition_of, route
from engine.kafka.topics import COPARTITIONED_TOPICS, TOPIC_SPECS, TopicsError, create_topics

pytest.register_assert_rewrite("tests.kafka_fixtures")
from tests.kafka_fixtures import KafkaTarget, genki, person_keys_of, read_topic

pytest_plugins = ["tests.kafka_fixtures"]

PROFILE = {"v": 1, "user_id": "W00001", "birth_year": 1950, "sex": "F",
           "cohort": "watch_trial", "enrolled_on": "2026-04-01", "research_consent": True}
SEGMENT = {"v": 1, "upload_id": "u1", "user_id": "W00001", "device_id": "W00001-watch",
           "metric": "steps", "unit": "count", "ts_ms": [1788188400000], "values": [12]}
ACTIVITY = {"v": 1, "event_id": "e1", "user_id": "W00001", "kind": "meal",
            "ts_ms": 1788188400000, "source": "app"}
REDEMPTION = {"v": 1, "idempotency_key": "k1", "shop_id": "S01", "terminal_id": "T1",
              "user_id": "W00001", "points": 5, "ts_ms": 1788188400000, "kind": "redeem"}


def test_route_sends_each_shape_to_its_topic_keyed_by_user() -> None:
    assert route(orjson.dumps(PROFILE)) == ("genki.profiles", b"W00001")
    assert route(orjson.dumps(SEGMENT)) == ("genki.samples", b"W00001")
    assert route(orjson.dumps(ACTIVITY)) == ("genki.activities", b"W00001")
    assert route(orjson.dumps(REDEMPTION)) == ("genki.redemptions", b"W00001")


def test_route_sends_unroutable_lines_to_samples_for_dead_lettering() -> None:
    assert route(b"{not json") == ("genki.samples", None)
    assert route(b"[1, 2]") == ("genki.samples", None)
    assert route(b'{"v": 1, "user_id": "W1", "battery_pct": 3}') == ("genki.samples", b"W1")


def test_partition_of_is_kafkas_murmur2_default_partitioner() -> None:
    # Values the Java client's Utils.murmur2 gives (toPositive(murmur2(key)) % 12).
    from aiokafka.partitioner import DefaultPartitioner

    for key in (b"W00001", b"A00042", b"P17"):
        assert partition_of(key, b"", 12) == DefaultPartitioner()(key, list(range(12)), [])


def test_assignment_is_balanced_and_covers_every_partition_once() -> None:
    numbers = assign_numbers(12, {"m1": [], "m2": [], "m3": []})
    assert numbers == {"m1": [0, 1, 2, 3], "m2": [4, 5, 6, 7], "m3": [8, 9, 10, 11]}


def test_assignment_keeps_partitions_where_they_were() -> None:
    before = {"m1": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]}
    after = assign_numbers(12, {**before, "m2": []})
    assert after == {"m1": [0, 1, 2, 3, 4, 5], "m2": [6, 7, 8, 9, 10, 11]}
    again = assign_numbers(12, {"m1": after["m1"], "m2": after["m2"], "m3": []})
    assert again == {"m1": [0, 1, 2, 3], "m2": [6, 7, 8, 9], "m3": [4, 5, 10, 11]}


def test_assignment_with_more_members_than_partitions_leaves_some_idle() -> None:
    assert assign_numbers(2, {"a": [1], "b": [], "c": [0]}) == {"a": [1], "b": [], "c": [0]}


def test_topics_create_makes_every_topic_with_the_same_partition_count(
        kafka: KafkaTarget) -> None:
    first = orjson.loads(genki("topics", "create", *kafka.args(), "--partitions", "3",
                               "--json").stdout)
    again = orjson.loads(genki("topics", "create", *kafka.args(), "--partitions", "3",
                               "--json").stdout)
    names = sorted(kafka.topic(spec.name) for spec in TOPIC_SPECS)
    assert sorted(t["name"] for t in first["topics"]) == names
    assert {(t["partitions"], t["created"]) for t in first["topics"]} == {(3, True)}
    assert {(t["partitions"], t["created"]) for t in again["topics"]} == {(3, False)}


def test_topics_create_refuses_a_topic_with_another_partition_count(
        kafka: KafkaTarget) -> None:
    async def make_odd_one() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(kafka.topic("genki.activities"), 5, 1)])
        await admin.close()

    asyncio.run(make_odd_one())
    with pytest.raises(TopicsError, match="same partition count"):
        asyncio.run(create_topics(kafka.bootstrap, 3, 1, kafka.prefix))


def test_publish_routes_keys_and_copartitions_every_line(kafka: KafkaTarget,
                                                        tmp_path: Path) -> None:
    genki("topics", "create", *kafka.args(), "--partitions", "4")
    other = {**SEGMENT, "user_id": "A00007", "device_id": "A00007-phone", "upload_id": "u2"}
    lines = [orjson.dumps(PROFILE), orjson.dumps(SEGMENT), orjson.dumps(other),
             orjson.dumps(ACTIVITY), orjson.dumps(REDEMPTION), b"{broken", b""]
    path = tmp_path / "in.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    summary = orjson.loads(genki("publish", str(path), *kafka.args(), "--json").stdout)
    assert summary["records"] == 6  # the blank line carries no record
    assert summary["by_topic"] == {"genki.activities": 1, "genki.profiles": 1,
                                   "genki.redemptions": 1, "genki.samples": 3}
    by_topic = {name: read_topic(kafka, name) for name in COPARTITIONED_TOPICS[:4]}
    user_partitions = {(name, key, partition) for name, records in by_topic.items()
                       for partition, _, key, _ in records if key is not None}
    w1 = {p for name, key, p in user_partitions if key == b"W00001"}
    assert w1 == {partition_of(b"W00001", b"", 4)}  # one partition number on all four topics
    keys = person_keys_of(kafka)  # personal payloads are sealed per person
    samples = [keys.open(b"genki.samples", key, value)
               for _, _, key, value in by_topic["genki.samples"]]
    assert sorted(samples) == sorted([lines[1], lines[2], b"{broken"])
    assert sum(value[:4] == b"\x00gk1" for _, _, _, value in by_topic["genki.samples"]) == 2
    ends = summary["end_offsets"][kafka.topic("genki.samples")]
    assert sum(ends.values()) == 3


def test_publish_with_no_encryption_sends_plain_json_and_makes_no_keys(
        kafka: KafkaTarget, tmp_path: Path) -> None:
    genki("topics", "create", *kafka.args(), "--partitions", "2")
    path = tmp_path / "in.ndjson"
    path.write_bytes(orjson.dumps(SEGMENT) + b"\n")
    genki("publish", str(path), *kafka.args(), "--no-encryption")
    assert [value for *_, value in read_topic(kafka, "genki.samples")] == [orjson.dumps(SEGMENT)]
    assert read_topic(kafka, "genki.keys") == []
