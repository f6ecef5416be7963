"""Researchers' export: the embedded log and ledger as pseudonymised, hive-partitioned Parquet.

A person's rows appear only from inside their consent periods (research consent
given and enrolled; engine.consent), since health data needs consent; the
manifest says how much was left out. User, event, venue and shop ids are
replaced by keyed HMAC-SHA256 pseudonyms: stable for one key (joins work),
unlinkable across keys. Entry and flag ids are derived from user ids, so they
are pseudonymised too, and the chain hashes are dropped. Timestamps are
coarsened and quasi-identifiers made k-anonymous (replay.anonymise); the
manifest records what was generalised and suppressed. The log is read in
chunks and streamed to Parquet, so memory stays bounded by a chunk, and the
output appears atomically: it is written beside the target and renamed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from engine.clock import EPOCH_DATE, iso_to_day, tokyo_days
from engine.consent import PeriodIndex, lifecycle
from engine.errors import UsageError
from engine.ingest.log import ActivityColumns, EmbeddedLog
from engine.schemas import ACTIVITY_KINDS, METRICS
from replay.anonymise import AnonymityReport, ExportPolicy, coarsen, generalise_people

PSEUDONYM_HEX_CHARS = 32
PSEUDONYM_KEY_BYTES_MIN = 16
HMAC_BLOCK_BYTES = 64  # SHA-256's block
LOG_RECORDS_PER_CHUNK = 20_000
LEDGER_ROWS_PER_CHUNK = 200_000
PARQUET_ROWS_PER_FILE_MAX = 5_000_000
PARQUET_ROWS_PER_GROUP_MAX = 1 << 20  # pyarrow's default
OPEN_FILES_MAX = 512
PARTITION_WRITE_THREADS = 2  # a chunk's partitions written at once

SAMPLE_SCHEMA = pa.schema([("user", pa.string()), ("metric", pa.string()), ("day", pa.string()),
                           ("ts_ms", pa.int64()), ("value", pa.float64())])
SAMPLE_FILE_SCHEMA = pa.schema([f for f in SAMPLE_SCHEMA if f.name not in ("metric", "day")])
# As written: the user column dictionary-encoded; files keep no Arrow schema, so readers see
# SAMPLE_FILE_SCHEMA (Parquet's own types: user a UTF-8 string).
SAMPLE_WRITE_SCHEMA = pa.schema([("user", pa.dictionary(pa.int32(), pa.string())),
                                 ("ts_ms", pa.int64()), ("value", pa.float64())])
ACTIVITY_SCHEMA = pa.schema([("user", pa.string()), ("event", pa.string()), ("kind", pa.string()),
                             ("ts_ms", pa.int64()), ("day", pa.string()), ("venue", pa.string())])
PEOPLE_SCHEMA = pa.schema([("user", pa.string()), ("birth_year_min", pa.int32()),
                           ("birth_year_max", pa.int32()), ("sex", pa.string()),
                           ("cohort", pa.string())])


class Pseudonymiser:
    """HMAC-SHA256(key, domain \x1f text), hex, first PSEUDONYM_HEX_CHARS characters.

    The HMAC is computed from the key's inner and outer SHA-256 states, prepared once
    (RFC 2104; the same digests as hmac.new, a third of its cost per id)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < PSEUDONYM_KEY_BYTES_MIN:
            raise UsageError(f"replay: the pseudonym key must be at least "
                             f"{PSEUDONYM_KEY_BYTES_MIN} bytes")
        self._key = key
        block = key if len(key) <= HMAC_BLOCK_BYTES else hashlib.sha256(key).digest()
        block = block.ljust(HMAC_BLOCK_BYTES, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))
        self._cache: dict[tuple[str, str], str] = {}

    def __call__(self, domain: str, text: str) -> str:
        cached = self._cache.get((domain, text))
        if cached is None:
            cached = self.fresh(domain, [text])[0]
            self._cache[(domain, text)] = cached
        return cached

    def many(self, domain: str, texts: list[str]) -> list[str]:
        return [self(domain, t) if t else "" for t in texts]

    def fresh(self, domain: str, texts: list[str]) -> list[str]:
        """Pseudonyms of ids that rarely repeat (events, entries), not cached."""
        inner, outer, prefix = self._inner, self._outer, f"{domain}\x1f"
        out = []
        for text in texts:
            mac = inner.copy()
            mac.update((prefix + text).encode())
            digest = outer.copy()
            digest.update(mac.digest())
            out.append(digest.hexdigest()[:PSEUDONYM_HEX_CHARS])
        return out


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
    consent: str = ("a person's rows are exported only from inside their consent periods: "
                    "research consent given and enrolled, not withdrawn, not left")
    anonymity: dict[str, Any] = field(default_factory=dict)

    def left_out(self, table: str, rows: int) -> None:
        self.rows_left_out_no_consent[table] = self.rows_left_out_no_consent.get(table, 0) + rows


@dataclass
class Consent:
    """Who may appear in the export and when: their consent periods, indexed."""

    periods: dict[str, list[tuple[int, int]]]
    index: PeriodIndex
    refused: int  # people with a profile and no consent period

    @staticmethod
    def of(log: EmbeddedLog) -> Consent:
        periods = lifecycle(log.lifecycle_events()).export_periods()
        profiled = {orjson.loads(body)["user_id"] for body in log.profiles()}
        return Consent(periods, PeriodIndex(periods), len(profiled - periods.keys()))

    def contains(self, users: list[str], user_idx: np.ndarray, ts_ms: np.ndarray) -> np.ndarray:
        return self.index.contains(users, user_idx, ts_ms)


def consenting_users(log: EmbeddedLog) -> tuple[set[str], int]:
    """(people with at least one consent period, people with a profile and none).

    Whole people; `Consent.of(log).contains(...)` narrows rows to the periods."""
    consent = Consent.of(log)
    return set(consent.periods), consent.refused


_consenting_users = consenting_users  # engine.evaluation.consent asks by this name


def _day_strings(days: np.ndarray) -> pa.Array:
    """ISO dates of day numbers: one string per distinct day, then an Arrow take."""
    if not len(days):
        return pa.array([], pa.string())
    first = int(days.min())
    names = [(EPOCH_DATE + dt.timedelta(days=first + d)).isoformat()
             for d in range(int(days.max()) - first + 1)]
    return _take(names, days - first)


def _take(names: list[str], codes: np.ndarray) -> pa.Array:
    """names[codes] as an Arrow string array, built in Arrow (no Python object per row)."""
    return pa.array(names, pa.string()).take(pa.array(codes))


def _window_mask(days: np.ndarray, since: int | None, until: int | None) -> np.ndarray:
    mask = np.ones(len(days), dtype=bool)
    if since is not None:
        mask &= days >= since
    if until is not None:
        mask &= days <= until
    return mask


@dataclass
class _SampleChunk:
    """A chunk's exported samples sorted by partition (metric, day), ready to slice."""

    partitions: list[tuple[str, int, int]]  # (hive directory, first row, end row)
    users: pa.Array  # the chunk's people's pseudonyms
    user: np.ndarray  # int32 code into users, per row
    ts_ms: pa.Array
    value: pa.Array

    def slice(self, at: int, stop: int) -> pa.Table:
        """Rows at..stop; the user column dictionary-encoded with just the slice's people,
        so the Parquet writer takes the dictionary as it is instead of hashing each id."""
        code = self.user[at:stop]
        present = np.zeros(len(self.users), bool)
        present[code] = True
        people = np.flatnonzero(present)
        recode = np.zeros(len(self.users), np.int32)
        recode[people] = np.arange(len(people), dtype=np.int32)
        user = pa.DictionaryArray.from_arrays(pa.array(recode[code]),
                                              self.users.take(pa.array(people)))
        return pa.Table.from_arrays([user, self.ts_ms.slice(at, stop - at),
                                     self.value.slice(at, stop - at)],
                                    schema=SAMPLE_WRITE_SCHEMA)


def _sample_chunks(log: EmbeddedLog, end: int, pseudo: Pseudonymiser, consent: Consent,
                   window: tuple[int | None, int | None], manifest: ReplayManifest,
                   policy: ExportPolicy, tick: Callable[[int], None]) -> Iterator[_SampleChunk]:
    for lo in range(0, end, LOG_RECORDS_PER_CHUNK):
        hi = min(lo + LOG_RECORDS_PER_CHUNK, end)
        cols = log.read_samples(lo, hi)
        tick(hi - lo)
        if not len(cols.ts_ms):
            continue
        allowed = consent.contains(cols.users, cols.user_idx, cols.ts_ms)
        days = tokyo_days(cols.ts_ms)
        keep = np.flatnonzero(allowed & _window_mask(days, *window))
        manifest.left_out("samples", int((~allowed).sum()))
        if not len(keep):
            continue
        days = days[keep]
        first_day, day_span = int(days.min()), int(days.max() - days.min()) + 1
        partition = cols.metric[keep].astype(np.int64) * day_span + (days - first_day)
        if len(METRICS) * day_span <= np.iinfo(np.uint16).max:
            partition = partition.astype(np.uint16)  # numpy sorts 16-bit keys by radix
        order = np.argsort(partition, kind="stable")
        partition, order = partition[order], keep[order]
        starts = np.flatnonzero(np.r_[True, partition[1:] != partition[:-1]])
        ends = np.r_[starts[1:], len(partition)]
        yield _SampleChunk(
            [(_partition_dir(int(partition[at]) // day_span,
                             first_day + int(partition[at]) % day_span), int(at), int(stop))
             for at, stop in zip(starts.tolist(), ends.tolist(), strict=True)],
            pa.array(pseudo.many("user", cols.users), pa.string()), cols.user_idx[order],
            pa.array(coarsen(cols.ts_ms[order], policy.samples_time)),
            pa.array(cols.value[order]))


def _partition_dir(metric: int, day: int) -> str:
    return f"metric={METRICS[metric].name}/day={(EPOCH_DATE + dt.timedelta(days=day)).isoformat()}"


class _PartitionFiles:
    """The Parquet files of a hive-partitioned table: one open writer per partition, at most
    OPEN_FILES_MAX open (the least recently written is closed and its partition goes on in
    the next part-N file), at most PARQUET_ROWS_PER_FILE_MAX rows a file: the layout
    pyarrow's dataset writer makes. The caller writes distinct partitions in parallel."""

    def __init__(self, directory: Path, schema: pa.Schema) -> None:
        self.directory, self.schema = directory, schema
        self._open: dict[str, tuple[pq.ParquetWriter, int]] = {}  # LRU order: oldest first
        self._parts: dict[str, int] = {}

    def writers_for(self, partitions: list[tuple[str, int]]) -> list[pq.ParquetWriter]:
        """A writer per (partition, rows about to be written), at most OPEN_FILES_MAX of
        them, opened and closed here (one thread, no write running); the writes themselves
        may then run in parallel."""
        assert len(partitions) <= OPEN_FILES_MAX
        writers = []
        for name, rows in partitions:
            writer, written = self._open.pop(name, (None, 0))
            if writer is not None and written + rows > PARQUET_ROWS_PER_FILE_MAX:
                writer.close()
                writer = None
            if writer is None:
                writer, written = self._new_file(name), 0
            self._open[name] = (writer, written + rows)
            writers.append(writer)
        for name in list(self._open)[:max(0, len(self._open) - OPEN_FILES_MAX)]:
            self._open.pop(name)[0].close()
        return writers

    def _new_file(self, name: str) -> pq.ParquetWriter:
        part = self._parts.get(name, 0)
        self._parts[name] = part + 1
        (self.directory / name).mkdir(parents=True, exist_ok=True)
        return pq.ParquetWriter(self.directory / name / f"part-{part}.parquet", self.schema,
                                compression="zstd", store_schema=False)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1][0].close()


def _slice_groups(partitions: list[tuple[str, int, int]],
                  ) -> Iterator[list[tuple[str, int, int]]]:
    """The slices in groups written at once: at most OPEN_FILES_MAX, each partition at
    most once in a group, no slice longer than a file may be."""
    group: list[tuple[str, int, int]] = []
    for name, at, stop in partitions:
        for first in range(at, stop, PARQUET_ROWS_PER_FILE_MAX):
            if len(group) == OPEN_FILES_MAX or (group and group[-1][0] == name):
                yield group
                group = []
            group.append((name, first, min(first + PARQUET_ROWS_PER_FILE_MAX, stop)))
    if group:
        yield group


def _write_slice(writer: pq.ParquetWriter, chunk: _SampleChunk, at: int, stop: int) -> None:
    writer.write_table(chunk.slice(at, stop))


def _write_samples(chunks: Iterator[_SampleChunk], directory: Path) -> int:
    """Write each chunk's partitions in parallel threads (Arrow encodes without the GIL)
    while the next chunk is read."""
    files = _PartitionFiles(directory, SAMPLE_WRITE_SCHEMA)
    rows = 0
    try:
        with ThreadPoolExecutor(PARTITION_WRITE_THREADS) as pool:
            pending: list[Future] = []
            for chunk in chunks:
                for group in _slice_groups(chunk.partitions):
                    for done in pending:
                        done.result()  # before any file is closed
                    writers = files.writers_for([(name, stop - at) for name, at, stop in group])
                    pending = [pool.submit(_write_slice, writer, chunk, at, stop)
                               for writer, (_, at, stop) in zip(writers, group, strict=True)]
                rows += len(chunk.user)
            for done in pending:
                done.result()
    finally:
        files.close()
    if rows == 0:
        directory.mkdir(parents=True, exist_ok=True)
        pq.write_table(SAMPLE_FILE_SCHEMA.empty_table(), directory / "empty.parquet",
                       compression="zstd")
    return rows


@dataclass
class _ActivityPart:
    """One chunk's exported activities, all but the venue column final."""

    user: np.ndarray  # int64 code into _Activities.users
    event: pa.Array  # pseudonyms
    kind: np.ndarray
    ts_ms: np.ndarray  # coarsened
    day: np.ndarray
    venue: np.ndarray  # int64 code into _Activities.venues


@dataclass
class _Activities:
    """The exported activities of the whole log, read once: the venue column waits for
    the count of people per venue (k-anonymity) that only the whole log gives."""

    users: dict[str, int] = field(default_factory=dict)
    venues: dict[str, int] = field(default_factory=dict)
    parts: list[_ActivityPart] = field(default_factory=list)

    def add(self, cols: ActivityColumns, idx: np.ndarray, days: np.ndarray,
            pseudo: Pseudonymiser, policy: ExportPolicy) -> None:
        to_user = np.fromiter((self.users.setdefault(u, len(self.users)) for u in cols.users),
                              np.int64, count=len(cols.users))
        rows = idx.tolist()
        venue = np.fromiter((self.venues.setdefault(cols.venue_id[i], len(self.venues))
                             for i in rows), np.int64, count=len(rows))
        self.parts.append(_ActivityPart(
            to_user[cols.user_idx[idx]],
            pa.array(pseudo.fresh("event", [cols.event_id[i] for i in rows]), pa.string()),
            cols.kind[idx], coarsen(cols.ts_ms[idx], policy.activities_time), days[idx], venue))

    def venue_names(self, pseudo: Pseudonymiser, k: int, report: AnonymityReport) -> pa.Array:
        """Per venue code: its pseudonym, "" for none, null when fewer than k people went."""
        user = np.concatenate([np.zeros(0, np.int64)] + [p.user for p in self.parts])
        venue = np.concatenate([np.zeros(0, np.int64)] + [p.venue for p in self.parts])
        pairs = np.unique(venue * max(len(self.users), 1) + user)
        people = np.bincount(pairs // max(len(self.users), 1), minlength=len(self.venues))
        names: list[str | None] = []
        for name, count in zip(self.venues, people.tolist(), strict=True):
            rare = bool(name) and count < k
            names.append(None if rare else pseudo("venue", name) if name else "")
        report.venues = sum(1 for name in self.venues if name)
        report.venues_suppressed = sum(1 for name, count in zip(self.venues, people.tolist(),
                                                               strict=True) if name and count < k)
        return pa.array(names, pa.string())


def _activities(log: EmbeddedLog, end: int, pseudo: Pseudonymiser, consent: Consent,
                window: tuple[int | None, int | None], manifest: ReplayManifest,
                policy: ExportPolicy) -> _Activities:
    exported = _Activities()
    for lo in range(0, end, LOG_RECORDS_PER_CHUNK):
        cols = log.read_activities(lo, min(lo + LOG_RECORDS_PER_CHUNK, end))
        if not len(cols.ts_ms):
            continue
        allowed = consent.contains(cols.users, cols.user_idx, cols.ts_ms)
        days = tokyo_days(cols.ts_ms)
        manifest.left_out("activities", int((~allowed).sum()))
        idx = np.flatnonzero(allowed & _window_mask(days, *window))
        if len(idx):
            exported.add(cols, idx, days, pseudo, policy)
    return exported


def _activity_batches(log: EmbeddedLog, end: int, pseudo: Pseudonymiser, consent: Consent,
                      window: tuple[int | None, int | None], manifest: ReplayManifest,
                      policy: ExportPolicy, report: AnonymityReport,
                      ) -> Iterator[pa.RecordBatch]:
    exported = _activities(log, end, pseudo, consent, window, manifest, policy)
    venues = exported.venue_names(pseudo, policy.k, report)
    users = pa.array(pseudo.many("user", list(exported.users)), pa.string())
    kinds = pa.array(ACTIVITY_KINDS, pa.string())
    for part in exported.parts:
        venue = venues.take(pa.array(part.venue))
        report.activity_rows_venue_suppressed += venue.null_count
        yield pa.RecordBatch.from_arrays(
            [users.take(pa.array(part.user)), part.event, kinds.take(pa.array(part.kind)),
             pa.array(part.ts_ms), _day_strings(part.day), venue], schema=ACTIVITY_SCHEMA)


def _people_table(log: EmbeddedLog, pseudo: Pseudonymiser, consent: Consent,
                  policy: ExportPolicy, report: AnonymityReport) -> pa.Table:
    """One row per exported person: generalised quasi-identifiers (k-anonymous)."""
    profiles = [p for p in map(orjson.loads, log.profiles()) if p["user_id"] in consent.periods]
    people = generalise_people(np.array([p["birth_year"] for p in profiles], np.int64),
                               [p["sex"] for p in profiles], [p["cohort"] for p in profiles],
                               policy, report)
    return pa.Table.from_arrays(
        [pa.array([pseudo("user", p["user_id"]) for p in profiles], pa.string()),
         pa.array(people.band_start, pa.int32()),
         pa.array([None if b is None else b + report.birth_year_band_years - 1
                   for b in people.band_start], pa.int32()),
         pa.array(people.sex, pa.string()), pa.array(people.cohort, pa.string())],
        schema=PEOPLE_SCHEMA)


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
                     max_rows_per_group=min(PARQUET_ROWS_PER_GROUP_MAX, PARQUET_ROWS_PER_FILE_MAX),
                     existing_data_behavior="overwrite_or_ignore")
    if rows == 0:  # every table is there, with its schema, even when nothing qualifies
        directory.mkdir(parents=True, exist_ok=True)
        empty = schema if not partitioning else pa.schema(
            [f for f in schema if f.name not in partitioning])
        pq.write_table(empty.empty_table(), directory / "empty.parquet", compression="zstd")
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


def _ledger_tables(data_dir: Path, staging: Path, pseudo: Pseudonymiser, consent: Consent,
                   window: tuple[int | None, int | None], policy: ExportPolicy,
                   ) -> ReplayManifest:
    """The ledger and flag tables; what they add to the manifest, in a manifest of its own
    (this runs in a thread beside the log's tables)."""
    from replay.ledger_export import write_flags, write_ledger

    part = ReplayManifest(created_at="", source="", log_position=0, rules_version=None,
                          since=None, until=None)
    if (data_dir / "ledger.sqlite").exists():
        part.rules_version = write_ledger(data_dir, staging / "ledger", pseudo, consent,
                                          window, part, _write, policy)
        write_flags(data_dir, staging / "flags", pseudo, consent, window, part, _write)
    return part


def export_embedded(data_dir: Path, target: Path, key: bytes, *, since: str | None = None,
                    until: str | None = None, tick: Callable[[int], None] = lambda n: None,
                    source: str = "embedded", source_offsets: dict[str, int] | None = None,
                    policy: ExportPolicy | None = None) -> ReplayManifest:
    policy = policy or ExportPolicy()
    pseudo = Pseudonymiser(key)
    window = parse_window(since, until)
    report = AnonymityReport(k=policy.k, time_units={
        "samples": policy.samples_time, "activities": policy.activities_time,
        "ledger": policy.ledger_time, "flags": "day"})
    staging = target.with_name(f".{target.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    with EmbeddedLog.open(data_dir, writer=False) as log, ThreadPoolExecutor(1) as pool:
        consent = Consent.of(log)
        end = log.position()
        manifest = ReplayManifest(
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), source=source,
            log_position=end, rules_version=None, since=since, until=until,
            users_included=len(consent.periods), users_left_out_no_consent=consent.refused,
            source_offsets=dict(source_offsets or {}))
        ledger = pool.submit(_ledger_tables, data_dir, staging, pseudo, consent, window, policy)
        manifest.rows["samples"] = _write_samples(
            _sample_chunks(log, end, pseudo, consent, window, manifest, policy, tick),
            staging / "samples")
        manifest.rows["activities"] = _write(
            _activity_batches(log, end, pseudo, consent, window, manifest, policy, report),
            ACTIVITY_SCHEMA, staging / "activities", None)
        people = _people_table(log, pseudo, consent, policy, report)
        (staging / "people").mkdir()
        pq.write_table(people, staging / "people" / "people.parquet", compression="zstd")
        manifest.rows["people"] = people.num_rows
        ledger_part = ledger.result()
    manifest.rules_version = ledger_part.rules_version
    manifest.rows.update(ledger_part.rows)
    for table, rows in ledger_part.rows_left_out_no_consent.items():
        manifest.left_out(table, rows)
    manifest.anonymity = report.as_dict()
    (staging / "manifest.json").write_bytes(
        orjson.dumps(manifest.__dict__, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    replace_atomically(staging, target)
    return manifest
