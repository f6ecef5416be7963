"""Researchers' export: the embedded log and ledger as pseudonymised, hive-partitioned Parquet.

Only people whose profile gives research consent appear (health data: consent is
the law); the manifest says how many were left out. User, device and venue ids
are replaced by keyed HMAC-SHA256 pseudonyms: stable for one key (joins work),
unlinkable across keys. Entry and flag ids are derived from user ids, so they
are pseudonymised too, and the chain hashes are dropped. The log is read in
chunks and streamed to Parquet, so memory stays bounded by a chunk, and the
output appears atomically: it is written beside the target and renamed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.dataset as ds

from engine.clock import EPOCH_DATE, iso_to_day, tokyo_days
from engine.errors import UsageError
from engine.ingest.log import EmbeddedLog
from engine.schemas import ACTIVITY_KINDS, METRICS

PSEUDONYM_HEX_CHARS = 32
PSEUDONYM_KEY_BYTES_MIN = 16
LOG_RECORDS_PER_CHUNK = 20_000
LEDGER_ROWS_PER_CHUNK = 200_000
PARQUET_ROWS_PER_FILE_MAX = 5_000_000
OPEN_FILES_MAX = 512

SAMPLE_SCHEMA = pa.schema([("user", pa.string()), ("metric", pa.string()), ("day", pa.string()),
                           ("ts_ms", pa.int64()), ("value", pa.float64())])
ACTIVITY_SCHEMA = pa.schema([("user", pa.string()), ("event", pa.string()), ("kind", pa.string()),
                             ("ts_ms", pa.int64()), ("day", pa.string()), ("venue", pa.string())])


class Pseudonymiser:
    def __init__(self, key: bytes) -> None:
        if len(key) < PSEUDONYM_KEY_BYTES_MIN:
            raise UsageError(f"replay: the pseudonym key must be at least "
                             f"{PSEUDONYM_KEY_BYTES_MIN} bytes")
        self._key = key
        self._cache: dict[tuple[str, str], str] = {}

    def __call__(self, domain: str, text: str) -> str:
        cached = self._cache.get((domain, text))
        if cached is None:
            digest = hmac.new(self._key, f"{domain}\x1f{text}".encode(), hashlib.sha256)
            cached = digest.hexdigest()[:PSEUDONYM_HEX_CHARS]
            self._cache[(domain, text)] = cached
        return cached

    def many(self, domain: str, texts: list[str]) -> list[str]:
        return [self(domain, t) if t else "" for t in texts]


@dataclass
class ReplayManifest:
    created_at: str
    source: str
    log_position: int
    rules_version: str | None
    since: str | None
    until: str | None
    rows: dict[str, int] = field(default_factory=dict)
    users_included: int = 0
    users_left_out_no_consent: int = 0
    rows_left_out_no_consent: dict[str, int] = field(default_factory=dict)
    source_offsets: dict[str, int] = field(default_factory=dict)  # "topic/partition" → next offset


def _consenting_users(log: EmbeddedLog) -> tuple[set[str], int]:
    consenting, refused = set(), 0
    for body in log.profiles():
        profile = orjson.loads(body)
        if profile["research_consent"]:
            consenting.add(profile["user_id"])
        else:
            refused += 1
    return consenting, refused


def _day_strings(days: np.ndarray) -> np.ndarray:
    unique, inverse = np.unique(days, return_inverse=True)
    names = np.array([(EPOCH_DATE + dt.timedelta(days=int(d))).isoformat() for d in unique],
                     dtype=object)
    return names[inverse]


def _window_mask(days: np.ndarray, since: int | None, until: int | None) -> np.ndarray:
    mask = np.ones(len(days), dtype=bool)
    if since is not None:
        mask &= days >= since
    if until is not None:
        mask &= days <= until
    return mask


def _sample_batches(log: EmbeddedLog, end: int, pseudo: Pseudonymiser, consent: set[str],
                    window: tuple[int | None, int | None], manifest: ReplayManifest,
                    tick: Callable[[int], None]) -> Iterator[pa.RecordBatch]:
    metric_names = np.array([m.name for m in METRICS], dtype=object)
    for lo in range(0, end, LOG_RECORDS_PER_CHUNK):
        hi = min(lo + LOG_RECORDS_PER_CHUNK, end)
        cols = log.read_samples(lo, hi)
        tick(hi - lo)
        if not len(cols.ts_ms):
            continue
        allowed = np.array([u in consent for u in cols.users], dtype=bool)
        days = tokyo_days(cols.ts_ms)
        keep = allowed[cols.user_idx] & _window_mask(days, *window)
        left_out = int((~allowed[cols.user_idx]).sum())
        manifest.rows_left_out_no_consent["samples"] = \
            manifest.rows_left_out_no_consent.get("samples", 0) + left_out
        if not keep.any():
            continue
        users = np.array(pseudo.many("user", cols.users), dtype=object)
        yield pa.RecordBatch.from_arrays(
            [pa.array(users[cols.user_idx[keep]]), pa.array(metric_names[cols.metric[keep]]),
             pa.array(_day_strings(days[keep])), pa.array(cols.ts_ms[keep]),
             pa.array(cols.value[keep])], schema=SAMPLE_SCHEMA)


def _activity_batches(log: EmbeddedLog, end: int, pseudo: Pseudonymiser, consent: set[str],
                      window: tuple[int | None, int | None], manifest: ReplayManifest,
                      ) -> Iterator[pa.RecordBatch]:
    kinds = np.array(ACTIVITY_KINDS, dtype=object)
    for lo in range(0, end, LOG_RECORDS_PER_CHUNK):
        cols = log.read_activities(lo, min(lo + LOG_RECORDS_PER_CHUNK, end))
        if not len(cols.ts_ms):
            continue
        allowed = np.array([u in consent for u in cols.users], dtype=bool)
        days = tokyo_days(cols.ts_ms)
        keep = allowed[cols.user_idx] & _window_mask(days, *window)
        manifest.rows_left_out_no_consent["activities"] = \
            manifest.rows_left_out_no_consent.get("activities", 0) + int((~allowed[cols.user_idx]).sum())
        if not keep.any():
            continue
        idx = np.flatnonzero(keep)
        users = np.array(pseudo.many("user", cols.users), dtype=object)
        yield pa.RecordBatch.from_arrays(
            [pa.array(users[cols.user_idx[idx]]),
             pa.array(pseudo.many("event", [cols.event_id[i] for i in idx])),
             pa.array(kinds[cols.kind[idx]]), pa.array(cols.ts_ms[idx]),
             pa.array(_day_strings(days[idx])),
             pa.array(pseudo.many("venue", [cols.venue_id[i] for i in idx]))],
            schema=ACTIVITY_SCHEMA)


def _write(batches: Iterator[pa.RecordBatch], schema: pa.Schema, directory: Path,
           partitioning: list[str] | None) -> int:
    rows = 0

    def counted() -> Iterator[pa.RecordBatch]:
        nonlocal rows
        for batch in batches:
            rows += batch.num_rows
            yield batch

    reader = pa.RecordBatchReader.from_batches(schema, counted())
    ds.write_dataset(reader, directory, format="parquet", partitioning=partitioning,
                     partitioning_flavor="hive" if partitioning else None,
                     file_options=ds.ParquetFileFormat().make_write_options(compression="zstd"),
                     max_open_files=OPEN_FILES_MAX, max_rows_per_file=PARQUET_ROWS_PER_FILE_MAX,
                     existing_data_behavior="overwrite_or_ignore")
    return rows


def replace_atomically(staging: Path, target: Path) -> None:
    """Move a finished export into place; an old export there is swapped out whole."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        if not (target / "manifest.json").exists():
            raise UsageError(f"replay: {target} exists and is not a genki export; "
                             "refusing to replace it")
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)


def parse_window(since: str | None, until: str | None) -> tuple[int | None, int | None]:
    try:
        return (iso_to_day(since) if since else None, iso_to_day(until) if until else None)
    except ValueError as error:
        raise UsageError(f"replay: {error}") from None


def export_embedded(data_dir: Path, target: Path, key: bytes, *, since: str | None = None,
                    until: str | None = None, tick: Callable[[int], None] = lambda n: None,
                    source: str = "embedded", source_offsets: dict[str, int] | None = None,
                    ) -> ReplayManifest:
    from replay.ledger_export import write_flags, write_ledger

    pseudo = Pseudonymiser(key)
    window = parse_window(since, until)
    staging = target.with_name(f".{target.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    with EmbeddedLog.open(data_dir, writer=False) as log:
        consent, refused = _consenting_users(log)
        end = log.position()
        manifest = ReplayManifest(
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), source=source,
            log_position=end, rules_version=None, since=since, until=until,
            users_included=len(consent), users_left_out_no_consent=refused,
            source_offsets=dict(source_offsets or {}))
        manifest.rows["samples"] = _write(
            _sample_batches(log, end, pseudo, consent, window, manifest, tick), SAMPLE_SCHEMA,
            staging / "samples", ["metric", "day"])
        manifest.rows["activities"] = _write(
            _activity_batches(log, end, pseudo, consent, window, manifest), ACTIVITY_SCHEMA,
            staging / "activities", None)
    if (data_dir / "ledger.sqlite").exists():
        manifest.rules_version = write_ledger(data_dir, staging / "ledger", pseudo, consent,
                                              window, manifest, _write)
        write_flags(data_dir, staging / "flags", pseudo, consent, window, manifest, _write)
    (staging / "manifest.json").write_bytes(
        orjson.dumps(manifest.__dict__, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    replace_atomically(staging, target)
    return manifest
