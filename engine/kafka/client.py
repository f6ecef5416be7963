"""Client settings shared by every genki Kafka client, and their limits.

Idempotent producers and transactions are off on purpose: the design must not
need them (the test broker, tansu, has neither). Exactly-once *effects* come
from deterministic ids and offsets stored with the state they produced.
"""

from __future__ import annotations

from typing import Any

from engine.schemas import RECORD_BYTES_MAX

CLIENT_ID_PREFIX = "genki"
# A record may be RECORD_BYTES_MAX plus key and headers; batches hold many.
MESSAGE_BYTES_MAX = 2 * RECORD_BYTES_MAX
PRODUCE_BATCH_BYTES_MAX = 1_048_576
PRODUCE_LINGER_MS = 20
PRODUCE_REQUEST_TIMEOUT_MS = 60_000
FETCH_PARTITION_BYTES_MAX = 8 * 1_048_576
FETCH_BYTES_MAX = 64 * 1_048_576
COMPRESSIONS: tuple[str, ...] = ("auto", "none", "gzip", "snappy", "lz4", "zstd")


def resolve_compression(name: str) -> str:
    """"auto": lz4, else zstd when their codec (aiokafka uses cramjam) is installed,
    else none. gzip always works but costs ~5x the publish time of none here
    (about 11 MB/s on one core)."""
    assert name in COMPRESSIONS, name
    if name != "auto":
        return name
    from aiokafka.codec import has_lz4, has_zstd

    return "lz4" if has_lz4() else "zstd" if has_zstd() else "none"


def producer_settings(bootstrap: str, client_id: str, compression: str = "auto",
                      linger_ms: int = PRODUCE_LINGER_MS) -> dict[str, Any]:
    compression = resolve_compression(compression)
    return {
        "bootstrap_servers": bootstrap,
        "client_id": f"{CLIENT_ID_PREFIX}-{client_id}",
        "enable_idempotence": False,
        "acks": "all",
        "linger_ms": linger_ms,
        "max_batch_size": PRODUCE_BATCH_BYTES_MAX,
        "max_request_size": MESSAGE_BYTES_MAX + PRODUCE_BATCH_BYTES_MAX,
        "compression_type": None if compression == "none" else compression,
        "request_timeout_ms": PRODUCE_REQUEST_TIMEOUT_MS,
    }


def consumer_settings(bootstrap: str, client_id: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": bootstrap,
        "client_id": f"{CLIENT_ID_PREFIX}-{client_id}",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": FETCH_PARTITION_BYTES_MAX,
        "fetch_max_bytes": FETCH_BYTES_MAX,
        "isolation_level": "read_uncommitted",
    }


def topic_name(prefix: str, name: str) -> str:
    """A topic's name on the broker; the prefix isolates tenants or test runs."""
    return f"{prefix}{name}"
