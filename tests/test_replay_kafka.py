"""Replay from Kafka equals replay from the embedded log for the same input."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from engine.kafka.worker import WorkerSettings, run_worker
from replay.export import export_embedded
from replay.kafka_source import export_kafka

pytest.register_assert_rewrite("tests.kafka_fixtures")
from tests.kafka_fixtures import Fleet, KafkaTarget, create_topics, genki

pytest_plugins = ["tests.kafka_fixtures"]

KEY = b"replay-kafka-test-key-0123456789"


def _rows(root: Path, name: str) -> list[tuple]:
    table = ds.dataset(root / name, partitioning="hive" if name == "samples" else None).to_table()
    columns = sorted(table.column_names)
    return sorted(zip(*(table[c].to_pylist() for c in columns), strict=True))


def test_replay_from_kafka_equals_replay_from_the_embedded_log(
        kafka: KafkaTarget, fleet: Fleet, tmp_path: Path) -> None:
    create_topics(kafka, 3)
    genki("publish", str(fleet.path), *kafka.args())
    settings = WorkerSettings(bootstrap=kafka.bootstrap, data_dir=tmp_path / "worker",
                              group=kafka.group, prefix=kafka.prefix, until_idle=True,
                              session_timeout_ms=kafka.session_timeout_ms)
    asyncio.run(run_worker(settings))
    from_log = export_embedded(fleet.embedded_dir, tmp_path / "embedded", KEY)
    from_kafka = export_kafka(kafka.bootstrap, tmp_path / "kafka", KEY, prefix=kafka.prefix)
    assert from_kafka.rows == from_log.rows
    assert from_log.rows["samples"] > 0 and from_log.rows["ledger"] > 0
    for name in ("samples", "activities", "ledger", "flags"):
        assert _rows(tmp_path / "kafka", name) == _rows(tmp_path / "embedded", name), name
    assert from_kafka.source == "kafka"
    assert sum(from_kafka.source_offsets.values()) > 0
