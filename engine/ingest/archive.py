"""The log's archive: old sample and activity records as Parquet in the data directory.

`EmbeddedLog.archive(before_day, processed)` moves a prefix of the log (positions
up to some S) out of SQLite: records the ledger has processed, whose data lies
before `before_day` and outside every late window (so no dedup check and no rule
can need them hot). The prefix stops at the first record that does not qualify,
so reads split a position range at S: archive below, SQLite above. The files are
written (mode 0600, fsynced) before the rows are deleted and registered in one
transaction; a file not registered (a kill between the two) is removed on the next
archive. Reads (`read_samples`, `read_activities`, hence runs, replay and what-if)
see archive and log as one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ARCHIVE_DIR_NAME = "archive"
ARCHIVE_ROWS_PER_GROUP = 20_000
FILE_MODE = 0o600

SAMPLE_SCHEMA = pa.schema([
    ("seq", pa.int64()), ("stream_id", pa.int64()), ("user_id", pa.string()),
    ("device_id", pa.string()), ("metric", pa.int8()), ("upload_id", pa.string()),
    ("base_ts_ms", pa.int64()), ("n", pa.int64()), ("ts_offsets", pa.binary()),
    ("vals", pa.binary()), ("vals_f64", pa.bool_()), ("wm_before_ms", pa.int64())])
ACTIVITY_SCHEMA = pa.schema([
    ("seq", pa.int64()), ("event_id", pa.string()), ("user_id", pa.string()),
    ("kind", pa.int8()), ("ts_ms", pa.int64()), ("venue_id", pa.string()),
    ("source", pa.string()), ("wm_before_ms", pa.int64()), ("body", pa.binary())])
SCHEMAS = {"samples": SAMPLE_SCHEMA, "activities": ACTIVITY_SCHEMA}


@dataclass(frozen=True)
class ArchiveResult:
    archived_through: int  # log positions up to here live in the archive
    sample_records: int  # moved by this call
    activity_records: int


def archive_dir(data_dir: Path) -> Path:
    return data_dir / ARCHIVE_DIR_NAME


def rows_table(kind: str, rows: list[tuple]) -> pa.Table:
    """Rows (in schema column order) as a table of the kind's schema."""
    schema = SCHEMAS[kind]
    columns: list[Any] = list(zip(*rows, strict=True)) if rows else [[] for _ in schema]
    return pa.Table.from_arrays([pa.array([bool(v) for v in c] if f.type == pa.bool_()
                                          else list(c), type=f.type)
                                 for c, f in zip(columns, schema, strict=True)], schema=schema)


def write_tables(path: Path, kind: str, tables: Iterable[pa.Table]) -> int:
    """Write the tables' rows, in order, to one Parquet file atomically (mode 0600), a
    table at a time (memory: one table, however long the file); returns the rows (the
    file is written even with none)."""
    schema = SCHEMAS[kind]
    temporary = path.with_name(path.name + ".tmp")
    rows = 0
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as stream:
            with pq.ParquetWriter(stream, schema) as writer:
                for table in tables:
                    if table.num_rows:
                        writer.write_table(table.cast(schema),
                                           row_group_size=ARCHIVE_ROWS_PER_GROUP)
                        rows += table.num_rows
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return rows


def read_table(path: Path, after_seq: int, upto_seq: int, columns: list[str]) -> pa.Table:
    """Rows with after_seq < seq <= upto_seq in seq order, seq first (row groups skipped by
    stats), as Arrow columns: no Python object per row."""
    table = pq.read_table(path, columns=["seq", *columns],
                          filters=[("seq", ">", after_seq), ("seq", "<=", upto_seq)])
    return table.sort_by("seq")


def drop_user(path: Path, kind: str, user_id: str) -> int:
    """Rewrite a file without one person's rows, a row group at a time; returns how many
    went (the file is left as it is when none)."""
    users = pq.read_table(path, columns=["user_id"]).column("user_id")
    removed = int(pc.sum(pc.equal(users, pa.scalar(user_id))).as_py() or 0)
    if not removed:
        return 0
    source = pq.ParquetFile(path)

    def kept() -> Iterator[pa.Table]:
        for group in range(source.num_row_groups):
            table = source.read_row_group(group)
            yield table.filter(pc.not_equal(table.column("user_id"), pa.scalar(user_id)))

    write_tables(path, kind, kept())  # it stays registered, rows or none
    return removed
