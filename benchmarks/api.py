"""HTTP API throughput and latency against a real `genki serve` on 127.0.0.1.

Builds a data directory with a few thousand users' balances (ledger awards),
starts the server in a subprocess on a free loopback port, then measures:

* balance reads: CONCURRENCY keep-alive connections, at most READS_MAX requests
  or PHASE_S_MAX seconds, whichever comes first: req/s, p50/p99 latency;
* redemptions (token + Idempotency-Key, 1 point each, spread over users);
* the floor: the same reads against a do-nothing ASGI app on the same uvicorn
  settings, in the same run, so the ratio survives a busy shared machine;
* where the time goes: server and client CPU per request (from /proc and
  process_time), and in-process costs per read: the SQLite lookup, the key
  lookup, the service (auth + lookup), the whole app called as ASGI.

The default load generator is a minimal HTTP/1.1 keep-alive client on asyncio
streams (~50-70 µs CPU per request), so that the client, sharing the 2 cores,
costs little; `--client httpx` uses httpx.AsyncClient instead, which costs
~1.4 ms CPU per request here and so mostly measures itself. Everything stops
by itself: every phase is bounded in requests and in seconds.

    .venv/bin/python benchmarks/api.py [--users 3000] [--http auto|h11|httptools]
        [--loop auto|asyncio|uvloop] [--client raw|httpx] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from engine.api.store import ApiStore, Role
from engine.entries import EntryDraft
from engine.ids import derive_id
from engine.ledger.store import Ledger
from engine.schemas import EntryKind

HOST = "127.0.0.1"  # loopback only, by design
USERS_DEFAULT = 3_000
POINTS_PER_USER = 1_000
CONCURRENCY = 32
CONNECTIONS_MAX = 256
READS_MAX = 20_000
WARMUP_REQUESTS = 2_000
REDEMPTIONS_MAX = 20_000  # enough for a stable p99 (200 requests above it)
GOAL_REDEMPTIONS_PER_S = 2_000  # issue 15, at 32 terminals
GOAL_REDEMPTION_P99_MS = 20.0
PHASE_S_MAX = 20.0
TOKEN_TTL_S = 900  # the tokens are all issued before the redemption phase starts
SERVER_START_S_MAX = 60.0
IN_PROCESS_CALLS = 5_000
TS_MS = 1_767_225_600_000
FLOOR_BODY = b'{"user_id":"U000001","balance":1000}'


def build_data(data_dir: Path, users: int) -> dict[str, str]:
    drafts = [EntryDraft(derive_id("bench", u), f"U{u:06d}", EntryKind.award, POINTS_PER_USER,
                         "2026-01-01", TS_MS, "bench_award", None, "bench")
              for u in range(users)]
    with Ledger.open(data_dir) as ledger:
        ledger.append(drafts)
    with ApiStore.open(data_dir) as store:
        return {role: store.create_key(role, "BENCH" if role == Role.shop else None, "bench",
                                       TS_MS)[0]
                for role in (Role.app, Role.shop)}


async def floor_app(scope: dict, receive: Callable, send: Callable) -> None:
    """The least an ASGI app can do per request: the floor uvicorn itself sets."""
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(FLOOR_BODY)).encode())]})
    await send({"type": "http.response.body", "body": FLOOR_BODY})


_FLOOR_SERVER = f"""
import socket, sys, uvicorn
sys.path.insert(0, {str(REPO_ROOT)!r})
from benchmarks.api import floor_app
sock = socket.socket()
sock.bind(({HOST!r}, 0))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
sock.listen(2048)
print(f"floor on http://{HOST}:{{sock.getsockname()[1]}}", flush=True)
uvicorn.Server(uvicorn.Config(floor_app, log_level="warning", lifespan="off",
                              loop=sys.argv[1], http=sys.argv[2])).run(sockets=[sock])
"""


def start_server(data_dir: Path | None, loop: str, http: str) -> tuple[subprocess.Popen, str]:
    """`genki serve` on a free loopback port (or the floor app when data_dir is None)."""
    command = [sys.executable, "-m", "engine.cli", "serve", "--host", HOST, "--port", "0",
               "--data-dir", str(data_dir), "--loop", loop, "--http", http,
               "--token-ttl-s", str(TOKEN_TTL_S)]
    if data_dir is None:
        command = [sys.executable, "-c", _FLOOR_SERVER, loop, http]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], SERVER_START_S_MAX)
    line = process.stdout.readline().decode() if ready else ""
    if "http://" not in line:
        process.kill()
        raise SystemExit(f"server did not start: {line!r}")
    url = line.split(" on ", 1)[1].split()[0]
    assert url.startswith(f"http://{HOST}:")
    httpx.get(url + "/healthz", timeout=SERVER_START_S_MAX).raise_for_status()
    return process, url


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=60)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- load generators -----------------------------------------------------------------

Request = tuple[str, str, bytes, dict[str, str]]  # method, path, body, extra headers


class Phase:
    """Bounded work: requests are taken by index until the count or the deadline runs out."""

    concurrency = CONCURRENCY

    def __init__(self, make: Callable[[int], Request], count_max: int) -> None:
        self.make = make
        self.count_max = count_max
        self.next_index = 0
        self.deadline = time.monotonic() + PHASE_S_MAX
        self.latencies_s: list[float] = []
        self.statuses: dict[int, int] = {}

    def take(self) -> Request | None:
        if self.next_index >= self.count_max or time.monotonic() >= self.deadline:
            return None
        self.next_index += 1
        return self.make(self.next_index - 1)

    def record(self, status: int, latency_s: float) -> None:
        self.latencies_s.append(latency_s)
        self.statuses[status] = self.statuses.get(status, 0) + 1


async def raw_worker(url: str, auth: str, phase: Phase) -> None:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        while (request := phase.take()) is not None:
            method, path, body, headers = request
            head = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Authorization: {auth}",
                    f"Content-Length: {len(body)}"]
            head += [f"{name}: {value}" for name, value in headers.items()]
            started = time.perf_counter()
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            phase.record(status, time.perf_counter() - started)
    finally:
        writer.close()


async def httpx_worker(url: str, auth: str, phase: Phase) -> None:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": auth}) as client:
        while (request := phase.take()) is not None:
            method, path, body, headers = request
            started = time.perf_counter()
            response = await client.request(method, path, content=body, headers=headers)
            phase.record(response.status_code, time.perf_counter() - started)


async def run_phase(url: str, auth: str, phase: Phase, client: str) -> float:
    worker = raw_worker if client == "raw" else httpx_worker
    started = time.perf_counter()
    await asyncio.gather(*(worker(url, auth, phase) for _ in range(phase.concurrency)))
    return time.perf_counter() - started


def summary(phase: Phase, elapsed_s: float, server_cpu_s: float,
            client_cpu_s: float) -> dict[str, Any]:
    done = len(phase.latencies_s)
    cuts = statistics.quantiles(phase.latencies_s, n=100) if done > 1 else [0.0] * 99
    return {"requests": done, "seconds": round(elapsed_s, 3),
            "req_per_s": round(done / elapsed_s, 1),
            "p50_ms": round(cuts[49] * 1000, 3), "p99_ms": round(cuts[98] * 1000, 3),
            "statuses": {str(k): v for k, v in sorted(phase.statuses.items())},
            "server_cpu_us_per_req": round(server_cpu_s / max(done, 1) * 1e6, 1),
            "client_cpu_us_per_req": round(client_cpu_s / max(done, 1) * 1e6, 1)}


def read_phase(url: str, pid: int, auth: str, users: int, client: str) -> dict[str, Any]:
    def read(i: int) -> Request:
        return "GET", f"/v1/users/U{i * 7919 % users:06d}/balance", b"", {}

    asyncio.run(run_phase(url, auth, Phase(read, WARMUP_REQUESTS), client))
    reads = Phase(read, READS_MAX)
    cpu_before, client_before = cpu_s(pid), time.process_time()
    elapsed = asyncio.run(run_phase(url, auth, reads, client))
    return summary(reads, elapsed, cpu_s(pid) - cpu_before, time.process_time() - client_before)


def measure(url: str, pid: int, keys: dict[str, str], users: int, client: str,
            data_dir: Path) -> dict[str, Any]:
    app_auth, shop_auth = f"Bearer {keys['app']}", f"Bearer {keys['shop']}"
    result = {"balance_reads": read_phase(url, pid, app_auth, users, client)}

    with httpx.Client(base_url=url, headers={"Authorization": app_auth}) as app:
        tokens = [app.post(f"/v1/users/U{i % users:06d}/redeem-tokens").json()["token"]
                  for i in range(REDEMPTIONS_MAX)]
    with Ledger.open(data_dir) as ledger:
        head_before = ledger.head()

    def redemption(i: int) -> Request:
        body = orjson.dumps({"token": tokens[i], "points": 1, "terminal_id": "T1"})
        return "POST", "/v1/redemptions", body, {"Content-Type": "application/json",
                                                   "Idempotency-Key": f"bench-{i}"}

    redemptions = Phase(redemption, len(tokens))
    cpu_before, client_before = cpu_s(pid), time.process_time()
    elapsed = asyncio.run(run_phase(url, shop_auth, redemptions, client))
    result["redemptions"] = summary(redemptions, elapsed, cpu_s(pid) - cpu_before,
                                    time.process_time() - client_before)
    with Ledger.open(data_dir) as ledger:
        head = ledger.head()
    commits = head["commit_seq"] - head_before["commit_seq"]  # one per ledger transaction
    result["redemptions"]["per_durable_commit"] = round(
        (head["entries"] - head_before["entries"]) / max(commits, 1), 2)
    return result


# -- in-process breakdown ----------------------------------------------------------------

def per_call_us(fn: Callable[[], object], calls: int = IN_PROCESS_CALLS) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return round((time.perf_counter() - started) / calls * 1e6, 1)


def breakdown(data_dir: Path, keys: dict[str, str]) -> dict[str, float]:
    """Microseconds per balance read at each layer, without HTTP or a client."""
    from engine.api.app import create_app

    app = create_app(data_dir)
    service = app.state.service
    auth = f"Bearer {keys['app']}"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": "/v1/users/U000001/balance", "raw_path": b"",
             "root_path": "", "query_string": b"", "server": (HOST, 80),
             "client": (HOST, 1), "headers": [(b"authorization", auth.encode())]}

    async def asgi_calls() -> float:
        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                assert message["status"] == 200, message

        started = time.perf_counter()
        for _ in range(IN_PROCESS_CALLS):
            await app(dict(scope), receive, send)
        return round((time.perf_counter() - started) / IN_PROCESS_CALLS * 1e6, 1)

    result = {
        "sqlite_balance_lookup_us": per_call_us(lambda: service.reads.balance("U000001")),
        "auth_key_lookup_us": per_call_us(lambda: service.authenticate(auth)),
        "service_auth_and_balance_us": per_call_us(
            lambda: (service.authenticate(auth), service.balance("U000001"))),
        "fastapi_asgi_call_us": asyncio.run(asgi_calls()),
    }
    service.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=USERS_DEFAULT)
    parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    parser.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"])
    parser.add_argument("--client", default="raw", choices=["raw", "httpx"])
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY,
                        help=f"connections in flight (default {CONCURRENCY})")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    Phase.concurrency = max(1, min(args.concurrency, CONNECTIONS_MAX))
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        keys = build_data(data_dir, args.users)
        process, url = start_server(None, args.loop, args.http)
        try:
            floor = read_phase(url, process.pid, "Bearer -", args.users, args.client)
        finally:
            stop_server(process)
        process, url = start_server(data_dir, args.loop, args.http)
        try:
            result = measure(url, process.pid, keys, args.users, args.client, data_dir)
        finally:
            stop_server(process)
        result["uvicorn_floor_reads"] = floor
        result["balance_reads_vs_floor"] = round(
            result["balance_reads"]["req_per_s"] / floor["req_per_s"], 3)
        result["in_process"] = breakdown(data_dir, keys)
    result.update({"users": args.users, "concurrency": Phase.concurrency, "client": args.client,
                   "server_loop": args.loop, "server_http": args.http,
                   "python": platform.python_version(), "cpus": os.cpu_count(),
                   "load_average_1m_after": round(os.getloadavg()[0], 2)})
    if args.json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return
    for name in ("uvicorn_floor_reads", "balance_reads", "redemptions"):
        row = result[name]
        print(f"{name:19} {row['req_per_s']:>9,.0f} req/s  p50 {row['p50_ms']:.2f} ms  "
              f"p99 {row['p99_ms']:.2f} ms  CPU µs/req server {row['server_cpu_us_per_req']:.0f} "
              f"client {row['client_cpu_us_per_req']:.0f}"
              f"  ({row['requests']:,} requests, statuses {row['statuses']})")
    print(f"balance reads / uvicorn floor: {result['balance_reads_vs_floor']:.2f}")
    redeemed = result["redemptions"]
    print(f"redemptions / uvicorn floor: {redeemed['req_per_s'] / floor_rate(result):.3f}; "
          f"{redeemed['per_durable_commit']:.1f} redemptions per durable ledger commit; "
          f"one core at the measured server CPU: "
          f"{1e6 / max(redeemed['server_cpu_us_per_req'], 1):,.0f} redemptions/s")
    met = redeemed["req_per_s"] >= GOAL_REDEMPTIONS_PER_S and \
        redeemed["p99_ms"] < GOAL_REDEMPTION_P99_MS and Phase.concurrency == CONCURRENCY
    print(f"goal (>= {GOAL_REDEMPTIONS_PER_S:,} redemptions/s, p99 < {GOAL_REDEMPTION_P99_MS:.0f} ms "
          f"at {CONCURRENCY} terminals, each durable before its answer): "
          f"{'met' if met else 'NOT met'} ({redeemed['req_per_s']:,.0f}/s, p99 "
          f"{redeemed['p99_ms']:.1f} ms at {Phase.concurrency})")
    print("in process (µs per balance read):", result["in_process"])


def floor_rate(result: dict[str, Any]) -> float:
    return float(result["uvicorn_floor_reads"]["req_per_s"])


if __name__ == "__main__":
    main()
