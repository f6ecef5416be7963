"""The HTTP gateway in Kafka mode (`genki serve --bootstrap`) against a real broker:
a fleet posted over HTTP (zstd) and processed by a worker gives the same ledger
content digest as the embedded runtime's ingest of the same records."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import zstandard

from engine.api.store import ApiStore, Role
from engine.devices import DeviceRegistry
from engine.kafka.combined import combined_ledger
from engine.kafka.worker import WorkerSettings, run_worker

pytest.register_assert_rewrite("tests.kafka_fixtures")
from tests.kafka_fixtures import Fleet, KafkaTarget, create_topics, read_topic
from tests.test_api import Server
from tests.test_gateway import TS_MS, ndjson, segment

pytest_plugins = ["tests.kafka_fixtures"]

PARTITIONS = 2
LINES_PER_REQUEST = 500


@dataclass
class Posted:
    answers: list[dict]
    worker_dir: Path
    key_id: str


@pytest.fixture(scope="module")
def posted(kafka_module: KafkaTarget, fleet: Fleet,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Posted]:
    create_topics(kafka_module, PARTITIONS)
    home = tmp_path_factory.mktemp("gateway-kafka-home")
    with ApiStore.open(home) as store:
        key, record = store.create_key(Role.gateway, None, None, 1_767_225_600_000)
    server = Server(home, *kafka_module.args())
    answers = []
    try:
        with server.client(key) as client:
            for path in sorted(fleet.path.glob("*.ndjson")):
                lines = [line for line in path.read_bytes().splitlines() if line.strip()]
                for lo in range(0, len(lines), LINES_PER_REQUEST):
                    body = b"\n".join(lines[lo:lo + LINES_PER_REQUEST]) + b"\n"
                    response = client.post(
                        "/v1/ingest", content=zstandard.ZstdCompressor().compress(body),
                        headers={"Content-Encoding": "zstd",
                                 "Content-Type": "application/x-ndjson"})
                    assert response.status_code == 200, response.text
                    answers.append(response.json())
    finally:
        server.stop()
    worker_dir = tmp_path_factory.mktemp("gateway-kafka-worker")
    asyncio.run(run_worker(WorkerSettings(
        bootstrap=kafka_module.bootstrap, data_dir=worker_dir, group=kafka_module.group,
        prefix=kafka_module.prefix, until_idle=True,
        session_timeout_ms=kafka_module.session_timeout_ms)))
    yield Posted(answers, worker_dir, record.key_id)


def test_every_posted_record_is_counted_accepted_or_rejected(posted: Posted,
                                                             fleet: Fleet) -> None:
    assert sum(a["received"] for a in posted.answers) == fleet.records
    assert all(a["received"] == a["accepted"] + a["rejected"] for a in posted.answers)
    assert sum(a["rejected"] for a in posted.answers) > 0  # the fleet has bad records


def test_edge_rejections_are_on_the_dead_letter_topic_with_reasons(
        posted: Posted, kafka_module: KafkaTarget) -> None:
    letters = [orjson.loads(value) for _, _, _, value in read_topic(kafka_module, "genki.dlq")]
    at_edge = [letter for letter in letters
               if letter["source"].startswith(f"http:{posted.key_id}:")]
    assert len(at_edge) == sum(a["rejected"] for a in posted.answers)
    reasons = {letter["reason"].split(":", 1)[0] for letter in at_edge}
    assert reasons == {code for a in posted.answers for code in a["rejected_by_reason"]}
    assert all(base64.b64decode(letter["raw_b64"]) for letter in at_edge)


def test_kafka_mode_http_ingest_gives_the_embedded_ledger_digest(posted: Posted,
                                                                 fleet: Fleet) -> None:
    ledger = combined_ledger(posted.worker_dir)
    assert ledger.content_digest == fleet.embedded.content_digest
    assert ledger.balances == fleet.embedded.balances


def test_kafka_mode_refuses_unenrolled_devices_at_the_edge(
        posted: Posted, kafka_module: KafkaTarget,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("gateway-kafka-enrolled")
    with ApiStore.open(home) as store:
        key, record = store.create_key(Role.gateway, None, None, TS_MS)
    with DeviceRegistry.open(home) as registry:
        registry.enroll("KE1", "kd1", "acme", TS_MS, "test")
        registry.bind_key(record.key_id, ["acme"], False, TS_MS)
    server = Server(home, *kafka_module.args())
    try:
        with server.client(key) as client:
            response = client.post("/v1/ingest", content=ndjson(
                segment("KE1", [TS_MS], [10.0]) | {"device_id": "kd1"},
                segment("KE1", [TS_MS], [10.0]) | {"device_id": "kd2"}),
                headers={"Content-Type": "application/x-ndjson"})
    finally:
        server.stop()
    counts = response.json()
    assert (counts["accepted"], counts["rejected_by_reason"]) == (1, {"not_enrolled": 1})
    letters = [orjson.loads(value) for _, _, _, value in read_topic(kafka_module, "genki.dlq")]
    (letter,) = [x for x in letters if x["source"].startswith(f"http:{record.key_id}:")]
    assert letter["reason"].startswith("not_enrolled: device_id: device kd2 is not enrolled")
    assert orjson.loads(base64.b64decode(letter["raw_b64"]))["device_id"] == "kd2"


def test_partition_logs_remember_the_key_that_posted_each_record(posted: Posted) -> None:
    from engine.ingest.log import EmbeddedLog
    from engine.kafka.partition import PARTITION_DIR_PREFIX

    received = 0
    for directory in sorted(posted.worker_dir.glob(f"{PARTITION_DIR_PREFIX}*")):
        with EmbeddedLog.open(directory, writer=False) as log:
            by_key = log.counts_by_key()
            assert set(by_key) <= {posted.key_id}  # nothing attributed to anyone else
            received += by_key.get(posted.key_id, {}).get("received", 0)
            positions = log.positions_of_key(posted.key_id)
            assert sum(b - a + 1 for a, b in positions) == \
                by_key.get(posted.key_id, {}).get("records", 0) == log.position()
    assert received == sum(a["accepted"] for a in posted.answers)
