"""Decoding ahead in a worker process stores exactly what decoding in-process stores."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.faults import CRASH_ENV
from engine.ingest import ahead
from engine.ingest.cli import ingest_paths
from engine.ingest.log import EmbeddedLog
from engine.sim import SimConfig, simulate

NOW_MS = 1_798_761_600_000  # 2027-01-01: after the simulated period
IN_PROCESS, ALWAYS = False, True  # decode here, decode in a worker


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated fleet with faults and re-sends, and a file of odd lines: blank lines,
    CRLF, not JSON, consent events, a re-sent activity with other content."""
    out = tmp_path_factory.mktemp("fleet")
    simulate(SimConfig(participants=8, app_users=30, days=14, bad_fraction=0.03,
                       duplicate_fraction=0.05), out)
    sample = {"v": 1, "upload_id": "u1", "user_id": "W00001", "device_id": "W00001-watch1",
              "metric": "steps", "unit": "count", "ts_ms": [1_790_000_000_000, 1_790_000_060_000],
              "values": [10, 20]}
    event = {"v": 1, "event_id": "e-odd", "user_id": "W00001", "kind": "venue_checkin",
             "ts_ms": 1_790_000_000_000, "venue_id": "V1", "source": "app"}
    consent = {"v": 1, "user_id": "W00001", "consent_seq": 1, "change": "enrolled",
               "effective_ts_ms": 1_790_000_000_000, "source": "app"}
    odd = [orjson.dumps(sample), b"", b"not json", orjson.dumps(sample) + b"\r",
           orjson.dumps(event), orjson.dumps({**event, "source": "other"}),
           orjson.dumps(consent), b"   ", orjson.dumps({**sample, "values": [10, 1e9]})]
    (out / "30-odd.ndjson").write_bytes(b"\n".join(odd) + b"\n")
    return out


def _receivers() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "genki-decode-receive"]


def _content(data_dir: Path) -> dict[str, Any]:
    """Everything the log answers about what it stores, through its own readers."""
    with EmbeddedLog.open(data_dir, writer=False) as log:
        position = log.position()
        arrays, meta = log.export_state()
        samples = log.read_samples(0, position)
        activities = log.read_activities(0, position)
        return {
            "position": position, "counters": log.counters().as_dict(),
            "dead_letters": log.dead_letters(), "meta": meta,
            "arrays": {name: array.tolist() for name, array in arrays.items()},
            "samples": {name: value if isinstance(value, list) else value.tolist()
                        for name, value in vars(samples).items()},
            "activities": {name: value if isinstance(value, list) else value.tolist()
                           for name, value in vars(activities).items()},
            "profiles": log.profiles(), "keys": log.positions_of_key("operator"),
            "by_key": log.counts_by_key()}


def _ingest(inputs: Path, data_dir: Path, batch_lines: int, in_worker: bool | None) -> dict:
    with EmbeddedLog.open(data_dir) as log:
        counts = ingest_paths(log, [str(inputs)], now_ms=NOW_MS, batch_lines=batch_lines,
                              ahead=in_worker)
    return counts.as_dict()


@pytest.mark.parametrize("batch_lines", [1, 97, 20_000])
def test_decoding_ahead_stores_what_decoding_in_process_stores(
        inputs: Path, tmp_path: Path, batch_lines: int) -> None:
    here = _ingest(inputs, tmp_path / "here", batch_lines, IN_PROCESS)
    there = _ingest(inputs, tmp_path / "there", batch_lines, ALWAYS)
    assert there == here
    assert here["rejected"] > 0 and here["duplicate_samples"] > 0
    assert _content(tmp_path / "here")["meta"]["consent_records"]
    assert _content(tmp_path / "there") == _content(tmp_path / "here")
    assert not multiprocessing.active_children() and not _receivers()


def test_a_small_input_is_decoded_in_process(inputs: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def no_worker(*args: object) -> None:
        raise AssertionError("started a worker for a small input")

    monkeypatch.setattr(ahead, "_decode_in_worker", no_worker)
    _ingest(inputs, tmp_path / "data", 97, None)


def test_a_failure_in_the_worker_stops_after_the_batches_before_it(
        inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker is forked: the patched decoder is the one it runs."""
    real = ahead.decode_lines
    calls = []

    def failing(lines: list[bytes], now_ms: int) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("decoder failed")
        return real(lines, now_ms)

    monkeypatch.setattr(ahead, "decode_lines", failing)
    contents = []
    for in_worker in (IN_PROCESS, ALWAYS):
        calls.clear()
        data_dir = tmp_path / str(in_worker)
        with pytest.raises(ValueError, match="decoder failed"):
            _ingest(inputs, data_dir, 50, in_worker)
        contents.append(_content(data_dir))
    assert contents[0] == contents[1]
    assert contents[0]["position"] > 0
    assert not multiprocessing.active_children() and not _receivers()


def test_a_failure_while_storing_ends_the_worker(
        inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = EmbeddedLog.ingest_lines
    calls = []

    def failing(self: EmbeddedLog, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddedLog, "ingest_lines", failing)
    with pytest.raises(OSError, match="disk full"):
        _ingest(inputs, tmp_path / "data", 1, ALWAYS)
    assert not multiprocessing.active_children() and not _receivers()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_the_worker_holds_nothing_of_the_log(inputs: Path, tmp_path: Path) -> None:
    """A writer restarted after this process is killed must not find the log locked by
    a worker that is still finishing a batch."""
    with EmbeddedLog.open(tmp_path / "data"):
        batches = ahead.decoded_batches([str(inputs)], NOW_MS, 50, ahead=ALWAYS)
        next(batches)
        (worker,) = multiprocessing.active_children()
        held = [os.readlink(f"/proc/{worker.pid}/fd/{fd}")
                for fd in os.listdir(f"/proc/{worker.pid}/fd")]
        batches.close()
    assert not [path for path in held if str(tmp_path) in path]
    assert any(path.startswith("pipe:") for path in held)
    assert not multiprocessing.active_children() and not _receivers()


_CRASHING_INGEST = """
import sys
from pathlib import Path
from engine.ingest.cli import ingest_paths
from engine.ingest.log import EmbeddedLog
with EmbeddedLog.open(Path(sys.argv[1])) as log:
    ingest_paths(log, [sys.argv[2]], now_ms=int(sys.argv[3]), batch_lines=50,
                 ahead=sys.argv[4] == "True")
"""


def test_a_crash_between_batches_leaves_what_the_single_process_path_leaves(
        inputs: Path, tmp_path: Path) -> None:
    contents = []
    for in_worker in (IN_PROCESS, ALWAYS):
        data_dir = tmp_path / str(in_worker)
        done = subprocess.run(
            [sys.executable, "-c", _CRASHING_INGEST, str(data_dir), str(inputs), str(NOW_MS),
             str(in_worker)],
            env={**os.environ, CRASH_ENV: "ingest_after_batch:3"}, check=False)
        assert done.returncode == -signal.SIGKILL
        with EmbeddedLog.open(data_dir):  # not locked by a worker still finishing a batch
            pass
        contents.append(_content(data_dir))
    assert contents[0] == contents[1]
    assert 100 < contents[0]["counters"]["received"] <= 150  # three batches of <= 50 lines


@pytest.mark.parametrize(("load", "expected"), [(0.0, True), (99.0, False)])
def test_a_large_input_is_decoded_ahead_only_with_a_core_to_spare(
        inputs: Path, monkeypatch: pytest.MonkeyPatch, load: float, expected: bool) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    used = []

    def worker(*args: object) -> Any:
        used.append(True)
        return iter(())

    monkeypatch.setattr(ahead, "DECODE_AHEAD_BYTES_MIN", 0)
    monkeypatch.setattr(ahead, "_decode_in_worker", worker)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    list(ahead.decoded_batches([str(inputs)], NOW_MS))
    assert bool(used) == expected
