"""Consent, leaving and erasure in the Kafka runtime (real tansu broker, real worker)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import orjson
import pyarrow.dataset as ds
import pytest

from engine.clock import iso_to_day
from engine.ingest.log import EmbeddedLog
from engine.kafka.worker import WorkerSettings, run_worker
from engine.ledger import Ledger
from replay.kafka_source import export_kafka

pytest.register_assert_rewrite("tests.kafka_fixtures")
from tests.kafka_fixtures import KafkaTarget, create_topics, genki
from tests.test_privacy import (
    DAYS,
    ERASED,
    FIRST_DAY,
    KEY,
    LEAVER,
    LEFT_ON,
    PEOPLE,
    WITHDRAWN_ON,
    _pseudonym,
    _records,
)

pytest_plugins = ["tests.kafka_fixtures"]
PARTITIONS = 2


def _worker(kafka: KafkaTarget, data_dir: Path) -> None:
    settings = WorkerSettings(bootstrap=kafka.bootstrap, data_dir=data_dir, group=kafka.group,
                              prefix=kafka.prefix, until_idle=True,
                              session_timeout_ms=kafka.session_timeout_ms)
    asyncio.run(run_worker(settings))


def _partition_of(data_dir: Path, user: str) -> Path:
    for directory in sorted(data_dir.glob("p*")):
        with EmbeddedLog.open(directory, writer=False) as log:
            if any(orjson.loads(p)["user_id"] == user for p in log.profiles()):
                return directory
    raise AssertionError(f"{user} is in no partition")


def test_consent_leaving_and_erasure_through_the_topics(kafka: KafkaTarget,
                                                       tmp_path: Path) -> None:
    source = tmp_path / "input.ndjson"
    source.write_bytes(b"\n".join(orjson.dumps(r) for r in _records()) + b"\n")
    create_topics(kafka, PARTITIONS)
    published = orjson.loads(genki("publish", str(source), "--json", *kafka.args()).stdout)
    assert published["by_topic"][kafka.topic("genki.consent")] == 2
    worker_dir = tmp_path / "worker"
    _worker(kafka, worker_dir)

    with Ledger.open(_partition_of(worker_dir, LEAVER)) as ledger:
        tiers = {iso_to_day(e.day) for e in ledger.history(LEAVER, None, 1000)[0]
                 if (e.rule or "").startswith("steps.tier")}
    assert tiers == set(range(FIRST_DAY, iso_to_day(LEFT_ON)))

    export_kafka(kafka.bootstrap, tmp_path / "research", KEY, prefix=kafka.prefix)
    samples = ds.dataset(tmp_path / "research" / "samples", partitioning="hive").to_table()
    days = Counter(d for u, d in zip(samples["user"].to_pylist(), samples["day"].to_pylist(),
                                     strict=True) if u == _pseudonym(PEOPLE[0]))
    assert len(days) == iso_to_day(WITHDRAWN_ON) - FIRST_DAY

    home = _partition_of(worker_dir, ERASED)
    result = orjson.loads(genki("erase", ERASED, "--reason", "request ref 5", "--data-dir",
                                str(worker_dir), "--json").stdout)
    removed = result["removed"][f"worker/{home.name}"]
    assert (removed["samples"], removed["dead_letters"]) == (DAYS, 1)
    with EmbeddedLog.open(home, writer=False) as log:
        assert ERASED not in log.read_activities(0, log.position()).users
        assert not [k for k in log.stored_sample_keys() if k[0] == ERASED]
    for name in ("log.sqlite", "kafka.sqlite"):
        assert ERASED.encode() not in (home / name).read_bytes(), name
    # The topics keep everything: erasure destroys the person's data keys, and a host that
    # rebuilds the partitions from the topics does not bring them back.
    genki("erase", ERASED, "--reason", "request ref 5", "--data-dir", str(worker_dir),
          *kafka.args())
    rebuilt = tmp_path / "rebuilt"
    _worker(kafka, rebuilt)
    for directory in sorted(rebuilt.glob("p*")):
        with EmbeddedLog.open(directory, writer=False) as log:
            assert ERASED not in [orjson.loads(p)["user_id"] for p in log.profiles()]
            assert ERASED not in log.read_activities(0, log.position()).users
            assert not [k for k in log.stored_sample_keys() if k[0] == ERASED]
        with Ledger.open(directory) as ledger:
            assert ledger.history(ERASED, None, 10)[0] == []
        for path in sorted(directory.rglob("*")):
            if path.is_file():  # as UTF-8 (SQLite, JSON) and as numpy's UTF-32 strings
                raw = path.read_bytes()
                assert ERASED.encode() not in raw and ERASED.encode("utf-32-le") not in raw, path
    with EmbeddedLog.open(_partition_of(rebuilt, PEOPLE[4]), writer=False) as log:
        kept = [k for k in log.stored_sample_keys().items() if k[0][0] == PEOPLE[4]]
    assert sum(len(samples) for _, samples in kept) == 3 * DAYS
