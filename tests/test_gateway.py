"""The HTTP ingest gateway (embedded runtime) against a real server: compressed bodies,
limits, vendor formats and the Garmin-shaped push endpoint."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import zstandard

from engine.api.gateway import INGEST_DECOMPRESSED_BYTES_MAX
from engine.api.store import Role
from engine.ingest.log import EmbeddedLog
from tests.test_api import Server, make_key, unique
from tests.test_importers import FIXTURES, GARMIN_USER, ms

TS_MS = 1_777_590_000_000  # 2026-05-01T08:00:00+09:00


def segment(user: str, ts_ms: list[int], values: list[float]) -> dict:
    return {"v": 1, "upload_id": f"u-{user}-{ts_ms[0]}", "user_id": user, "device_id": "d1",
            "metric": "steps", "unit": "count", "ts_ms": ts_ms, "values": values}


def ndjson(*records: dict) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-home")


@pytest.fixture(scope="module")
def gateway_key(home: Path) -> str:
    return make_key(home, Role.gateway)


@pytest.fixture(scope="module")
def server(home: Path, gateway_key: str) -> Iterator[Server]:
    running = Server(home)
    yield running
    running.stop()


def post(server: Server, key: str, path: str, body: bytes, encoding: str | None = None,
         content_type: str = "application/x-ndjson") -> tuple[int, dict]:
    headers = {"Content-Type": content_type}
    if encoding:
        headers["Content-Encoding"] = encoding
    with server.client(key) as client:
        response = client.post(path, content=body, headers=headers)
    return response.status_code, response.json()


def stored(home: Path, user: str) -> dict[tuple[str, int], dict[int, float]]:
    with EmbeddedLog.open(home, writer=False) as log:
        return {(d, m): s for (u, d, m), s in log.stored_sample_keys().items() if u == user}


def test_gzip_and_zstd_bodies_are_ingested_like_plain_ones(server: Server, home: Path,
                                                           gateway_key: str) -> None:
    user = unique("gz")
    plain = ndjson(segment(user, [TS_MS], [10.0]))
    zipped = gzip.compress(ndjson(segment(user, [TS_MS + 60_000], [20.0]), {"v": 1}))
    zstd = zstandard.ZstdCompressor().compress(ndjson(segment(user, [TS_MS + 120_000], [30.0])))
    assert post(server, gateway_key, "/v1/ingest", plain)[1]["accepted"] == 1
    status, counts = post(server, gateway_key, "/v1/ingest", zipped, "gzip")
    assert status == 200 and (counts["received"], counts["accepted"], counts["rejected"]) == \
        (2, 1, 1)
    assert post(server, gateway_key, "/v1/ingest", zstd, "zstd")[1]["accepted_samples"] == 1
    assert stored(home, user) == {("d1", 0): {TS_MS: 10.0, TS_MS + 60_000: 20.0,
                                               TS_MS + 120_000: 30.0}}


def _gzip_bomb(size_bytes: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    parts = [compressor.compress(zeros) for _ in range(size_bytes >> 20)]
    return b"".join(parts) + compressor.flush()


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
def test_a_compression_bomb_is_refused_with_413(server: Server, gateway_key: str,
                                                encoding: str) -> None:
    size = INGEST_DECOMPRESSED_BYTES_MAX + (2 << 20)
    body = _gzip_bomb(size) if encoding == "gzip" else \
        zstandard.ZstdCompressor(level=3).compress(bytes(size))
    assert len(body) < 1 << 20  # small on the wire, huge once inflated
    status, problem = post(server, gateway_key, "/v1/ingest", body, encoding)
    assert status == 413 and problem["code"] == "body_too_large"


def test_an_unknown_or_broken_encoding_is_refused(server: Server, gateway_key: str) -> None:
    status, problem = post(server, gateway_key, "/v1/ingest", b"x", "br")
    assert (status, problem["code"]) == (415, "unsupported_content_encoding")
    status, problem = post(server, gateway_key, "/v1/ingest", b"not gzip at all", "gzip")
    assert (status, problem["code"]) == (400, "bad_content_encoding")


def test_ingest_needs_a_gateway_key(server: Server, home: Path) -> None:
    status, problem = post(server, make_key(home, Role.app), "/v1/ingest", b"{}")
    assert (status, problem["code"]) == (403, "forbidden")


def test_a_vendor_format_is_mapped_and_its_bad_items_dead_lettered(
        server: Server, home: Path, gateway_key: str) -> None:
    user = unique("apple")
    body = gzip.compress((FIXTURES / "apple_export.xml").read_bytes())
    status, counts = post(server, gateway_key, f"/v1/ingest/apple?user={user}", body, "gzip",
                          "application/xml")
    assert status == 200, counts
    assert (counts["items"], counts["records"], counts["unmapped"], counts["received"],
            counts["accepted"], counts["rejected"]) == (20, 9, 7, 16, 9, 7)
    assert counts["rejected_by_reason"] == {"bad_field": 1, "out_of_range": 1,
                                            "overlapping_interval": 1, "too_old_timestamp": 1,
                                            "unsupported_type": 3}
    assert stored(home, user)[("apple:Hanako-s-Apple-Watch", 3)] == {
        ms("2026-05-01T03:00:00+09:00"): 97.0}


def test_an_unknown_format_is_a_bad_request(server: Server, gateway_key: str) -> None:
    status, problem = post(server, gateway_key, "/v1/ingest/polar", b"{}")
    assert status == 400 and "unknown import format 'polar'" in problem["detail"]


def test_garmin_push_maps_summaries_per_user(server: Server, home: Path,
                                            gateway_key: str) -> None:
    status, counts = post(server, gateway_key, "/v1/push/garmin",
                          (FIXTURES / "garmin_push.json").read_bytes(),
                          content_type="application/json")
    assert status == 200 and (counts["records"], counts["rejected"]) == (6, 3)
    epoch = {"userId": GARMIN_USER, "summaryId": "e-2", "steps": 40,
             "durationInSeconds": 900, "startTimeInSeconds": 1777591800}
    status, counts = post(server, gateway_key, "/v1/push/garmin/epochs",
                          orjson.dumps([epoch]), content_type="application/json")
    assert status == 200 and counts["accepted_samples"] == 1
    assert stored(home, GARMIN_USER)[(f"garmin:{GARMIN_USER}", 0)] == {
        ms("2026-05-01T08:15:00+09:00"): 312.0, ms("2026-05-01T08:30:00+09:00"): 18.0,
        ms("2026-05-01T08:45:00+09:00"): 40.0}
