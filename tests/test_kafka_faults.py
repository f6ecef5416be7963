"""Workers as real processes: a group of two splits the partitions; a SIGKILL at
any step of a cycle, then another worker, still gives the embedded ledger."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from engine.kafka.combined import combined_ledger
from engine.kafka.host import PartitionProcessDied
from engine.kafka.partition import partition_dir
from engine.snapshots import SNAPSHOT_DIR_NAME

pytest.register_assert_rewrite("tests.kafka_fixtures")
from tests.kafka_fixtures import (
    REPO_ROOT,
    Fleet,
    KafkaTarget,
    committed_offsets,
    create_topics,
    genki,
    read_topic,
    start_genki,
    wait_for,
)

pytest_plugins = ["tests.kafka_fixtures"]

PARTITIONS = 4
EXIT_WAIT_S_MAX = 120
_ASSIGNED = re.compile(r"assigned partitions \[([0-9, ]*)\]")


def worker_args(kafka: KafkaTarget, data_dir: Path, *extra: str) -> list[str]:
    return ["worker", *kafka.args(), "--data-dir", str(data_dir), "--group", kafka.group,
            "--session-timeout-ms", str(kafka.session_timeout_ms), "--json", *extra]


def last_assignment(stderr_path: Path) -> list[int] | None:
    found = _ASSIGNED.findall(stderr_path.read_text()) if stderr_path.exists() else []
    return [int(n) for n in found[-1].split(",") if n.strip()] if found else None


def publish(kafka: KafkaTarget, path: Path) -> dict[str, dict[str, int]]:
    summary = orjson.loads(genki("publish", str(path), *kafka.args(), "--json").stdout)
    return summary["end_offsets"]


def all_committed(kafka: KafkaTarget, ends: dict[str, dict[str, int]]) -> bool:
    committed = committed_offsets(kafka, ends)
    return all(committed[tp] == ends[tp.topic][str(tp.partition)] for tp in committed)


def stop(process: subprocess.Popen[str]) -> dict[str, object]:
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=EXIT_WAIT_S_MAX)
    assert process.returncode == 0
    return orjson.loads(out)


def test_two_workers_split_the_partitions_and_give_the_embedded_ledger(
        kafka: KafkaTarget, fleet: Fleet, tmp_path: Path) -> None:
    create_topics(kafka, PARTITIONS)
    data_dir = tmp_path / "data"
    logs = [tmp_path / "a.err", tmp_path / "b.err"]
    a = start_genki(*worker_args(kafka, data_dir, "--client-id", "a"), stderr_path=logs[0])
    wait_for(lambda: last_assignment(logs[0]) == list(range(PARTITIONS)), "worker a to join")
    b = start_genki(*worker_args(kafka, data_dir, "--client-id", "b"), stderr_path=logs[1])
    wait_for(lambda: bool(last_assignment(logs[1])) and
             sorted(last_assignment(logs[0]) + last_assignment(logs[1])) ==  # type: ignore[operator]
             list(range(PARTITIONS)), "the group to split the partitions")
    ends = publish(kafka, fleet.path)
    wait_for(lambda: all_committed(kafka, ends), "both workers to commit every input")
    summaries = [stop(a), stop(b)]
    assert all(summary["accepted"] for summary in summaries)  # both did part of the work
    assert sum(s["accepted"] + s["rejected"] for s in summaries) == fleet.records  # type: ignore[operator]
    assert combined_ledger(data_dir).content_digest == fleet.embedded.content_digest


@pytest.mark.parametrize(("crash_at", "restart_where", "hosts"), [
    ("after_ingest:3", "same host", "threads"),
    ("after_pipeline:3", "new host", "threads"),
    ("after_publish:4", "same host", "threads"),
    # A partition process killed: the worker stops with an error, the others close.
    ("after_pipeline:3", "same host", "processes"),
    # The worker killed: its partition processes die with it (they hold owner.lock).
    ("after_publish:4", "same host", "processes"),
])
def test_sigkill_mid_stream_then_another_worker_gives_the_embedded_ledger(
        kafka: KafkaTarget, fleet: Fleet, tmp_path: Path, crash_at: str,
        restart_where: str, hosts: str) -> None:
    create_topics(kafka, PARTITIONS)
    ends = publish(kafka, fleet.path)
    first_dir = tmp_path / "first"
    in_processes = ("--partition-processes",) if hosts == "processes" else ()
    crashing = start_genki(*worker_args(kafka, first_dir, "--until-idle", "--fetch-records",
                                        "150", *in_processes),
                           env={"GENKI_CRASH_AT": crash_at},
                           stderr_path=tmp_path / "crash.err")
    crashing.communicate(timeout=EXIT_WAIT_S_MAX)
    in_partition_process = hosts == "processes" and not crash_at.startswith("after_publish")
    assert crashing.returncode == (PartitionProcessDied.exit_code if in_partition_process
                                   else -signal.SIGKILL)
    assert not all_committed(kafka, ends)  # killed mid-stream
    second_dir = first_dir if restart_where == "same host" else tmp_path / "second"
    genki(*worker_args(kafka, second_dir, "--until-idle"))
    assert all_committed(kafka, ends)
    assert combined_ledger(second_dir).content_digest == fleet.embedded.content_digest
    published = {orjson.loads(v)["entry_id"] for *_, v in read_topic(kafka, "genki.ledger")}
    assert len(published) == fleet.embedded.entries


def test_sigterm_to_the_process_group_stops_a_worker_and_its_partition_processes_cleanly(
        kafka: KafkaTarget, fleet: Fleet, tmp_path: Path) -> None:
    """What a terminal's Ctrl-C or a service manager does: every process of the group gets
    the signal; the partition processes leave it to the worker, which closes them."""
    create_topics(kafka, PARTITIONS)
    ends = publish(kafka, fleet.path)
    data_dir, err_path = tmp_path / "data", tmp_path / "worker.err"
    with open(err_path, "w") as err:
        worker = subprocess.Popen(
            [sys.executable, "-m", "engine.cli",
             *worker_args(kafka, data_dir, "--partition-processes")],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=err, text=True,
            start_new_session=True)
    wait_for(lambda: all_committed(kafka, ends), "the worker to commit every input")
    os.killpg(worker.pid, signal.SIGTERM)
    out, _ = worker.communicate(timeout=EXIT_WAIT_S_MAX)
    assert worker.returncode == 0
    summary = orjson.loads(out)
    assert summary["accepted"] + summary["rejected"] == fleet.records
    assert combined_ledger(data_dir).content_digest == fleet.embedded.content_digest
    # each partition process closed its store: the rules' snapshot a restart starts from
    assert all(any(partition_dir(data_dir, n).joinpath(SNAPSHOT_DIR_NAME).iterdir())
               for n in range(PARTITIONS))


def test_a_partition_directory_held_by_another_process_stops_the_worker_loudly(
        kafka: KafkaTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from engine.kafka import worker
    from engine.kafka.partition import PartitionBusy, PartitionStore

    create_topics(kafka, 1)
    monkeypatch.setattr(worker, "PARTITION_BUSY_WAIT_S_MAX", 0.2)
    held = PartitionStore.open(tmp_path, 0, late_window_days=42)  # another owner on this host
    try:
        settings = worker.WorkerSettings(bootstrap=kafka.bootstrap, data_dir=tmp_path,
                                         group=kafka.group, prefix=kafka.prefix,
                                         until_idle=True,
                                         session_timeout_ms=kafka.session_timeout_ms)
        with pytest.raises(PartitionBusy, match="partition 0"):
            asyncio.run(worker.run_worker(settings))
    finally:
        held.close()
