"""One user partition on this host: `<data-dir>/p<N>/`.

The directory is a complete embedded data directory (EmbeddedLog + ledger, so
`genki ledger ...` works on it) plus `kafka.sqlite`, the worker's own state:
the redemptions offset with the dead letters those redemptions produced, and
how far the ledger, flags and dead letters have been published.

Where each offset lives, and why replay is harmless:
* profiles / samples / activities: in the log's meta, written in the same
  transaction as the records (EmbeddedLog.ingest_lines); the log drops
  re-sent samples and events, so a replayed record is a no-op.
* the pipeline's log position: in the ledger's meta, with the entries.
* redemptions: a successful one is a ledger entry whose id comes from (shop,
  idempotency key), so a replay returns the original; a failed one writes
  nothing to the ledger and is recorded, offset and dead letter together, in
  kafka.sqlite before anything is published, so its outcome never changes.
* outputs (genki.ledger, genki.flags, genki.dlq) are published at least once
  and carry their own ids (entry_id, flag_id; source/partition/offset).
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from engine.entries import EntryDraft
from engine.errors import GenkiError, NotFound
from engine.faults import crash_point
from engine.ingest.log import (
    OPERATOR_KEY_ID,
    EmbeddedLog,
    IngestCounts,
    exclusive_lock,
)
from engine.ingest.reasons import Reason, reason_text
from engine.kafka.authn import verification_failure
from engine.kafka.fetch import TopicBatch
from engine.kafka.keys import Keyring
from engine.kafka.restore import RESTORED_KINDS, RestoreSelection, expiry_failure
from engine.kafka.snapshot_topic import decode_partition_snapshot, encode_partition_snapshot
from engine.ledger import Ledger
from engine.ledger.commands import ref_fields
from engine.ledger.model import ENTRY_COLUMNS, Entry, SeqDigest
from engine.schemas import EntryKind, LedgerEntry, Redemption, RedemptionKind

if TYPE_CHECKING:
    from engine.pipeline import RunSummary

PARTITION_DIR_PREFIX = "p"
STATE_FILE_NAME = "kafka.sqlite"
OWNER_LOCK_FILE_NAME = "owner.lock"
OUTPUT_ROWS_PER_READ_MAX = 50_000

_STATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox_dlq (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, partition INTEGER NOT NULL,
    offset INTEGER NOT NULL, reason TEXT NOT NULL, raw BLOB NOT NULL);
"""
_FLAG_COLUMNS = ("seq", "flag_id", "user_id", "flag", "state", "day", "evidence", "rules_version")


class PartitionBusy(GenkiError):
    """Another worker process on this host still owns the partition directory."""

    code = "partition_busy"


def partition_dir(data_dir: Path, number: int) -> Path:
    assert number >= 0
    return data_dir / f"{PARTITION_DIR_PREFIX}{number}"


def offset_meta_key(topic: str, number: int) -> str:
    return f"kafka.offset:{topic}:{number}"


@dataclass
class Outputs:
    """What a partition has not published yet (rows in publish order)."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    flags: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    ledger_seq: int = 0
    flag_seq: int = 0
    dlq_id: int = 0
    outbox_id: int = 0

    def __len__(self) -> int:
        return len(self.entries) + len(self.flags) + len(self.dead_letters)


@dataclass
class RedemptionCounts:
    applied: int = 0
    replayed: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


class PartitionStore:
    """Open with `PartitionStore.open(data_dir, number)`; one owner process at a time."""

    def __init__(self, number: int, path: Path, existed: bool, lock_file: Any,
                 log: EmbeddedLog, ledger: Ledger, state: sqlite3.Connection) -> None:
        self.number = number
        self.path = path
        self.existed = existed
        self._lock_file = lock_file
        self.log = log
        self.ledger = ledger
        self._state = state
        self._pipeline: Any = None
        # The ledger's seq digest at the last snapshot: the next extends it (O(new entries)).
        self._seq_digest: SeqDigest | None = None
        # Verifies the authenticators of point-moving records; None refuses them all.
        self.record_keys: Keyring | None = None

    @classmethod
    def open(cls, data_dir: Path, number: int, *, late_window_days: int) -> PartitionStore:
        path = partition_dir(data_dir, number)
        existed = (path / STATE_FILE_NAME).exists()
        path.mkdir(parents=True, exist_ok=True)
        lock_file = exclusive_lock(path / OWNER_LOCK_FILE_NAME)
        if lock_file is None:
            raise PartitionBusy(f"partition {number} in {path} is owned by another worker "
                                "process on this host")
        try:
            log = EmbeddedLog.open(path, late_window_days=late_window_days)
            ledger = Ledger.open(path)
            state = sqlite3.connect(path / STATE_FILE_NAME, isolation_level=None, timeout=60.0)
            state.execute("PRAGMA journal_mode=WAL")
            state.execute("PRAGMA synchronous=FULL")
            state.executescript(_STATE_SCHEMA)
        except BaseException:
            lock_file.close()
            raise
        return cls(number, path, existed, lock_file, log, ledger, state)

    def close(self) -> None:
        if self._pipeline is not None:
            self._pipeline.snapshot(self.log)  # the next owner on this host starts from it
        self._state.close()
        self.ledger.close()
        self.log.close()
        self._lock_file.close()

    # -- offsets ---------------------------------------------------------------------

    def stored_offsets(self, topics: list[str], redemptions_topic: str) -> dict[str, int | None]:
        """Next offset to read per topic, as recorded with the state it produced."""
        found: dict[str, int | None] = {}
        for topic in topics:
            value = self.log.get_meta(offset_meta_key(topic, self.number))
            found[topic] = None if value is None else int(value)
        found[redemptions_topic] = self._get("redemptions_offset")
        return found

    def _get(self, key: str) -> int | None:
        row = self._state.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def _set_many(self, values: dict[str, int]) -> None:
        self._state.executemany(
            "INSERT INTO state VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            list(values.items()))

    # -- inputs ------------------------------------------------------------------------

    def ingest(self, topic: str, offsets: list[int], values: list[bytes],
               now_ms: int, key_ids: list[str] | None = None,
               next_offset: int | None = None) -> IngestCounts:
        """Store one topic's records of this partition; their next offset commits with them.

        `key_ids` (provenance, from the records' headers) splits the records into runs
        of one submitting key, each stored with its own next offset in one transaction.
        `next_offset`: the fetch's end, when records of erased people were left out
        (engine.kafka.personal); it commits with the last run (or alone).
        """
        assert len(offsets) == len(values) and (offsets or next_offset is not None)
        assert all(b > a for a, b in itertools.pairwise(offsets)), "offsets ascend"
        assert key_ids is None or len(key_ids) == len(offsets)
        assert next_offset is None or not offsets or next_offset > offsets[-1]
        offset_key = offset_meta_key(topic, self.number)
        if not offsets:
            return self.log.ingest_lines([], topic, int(next_offset or 0), now_ms,
                                         partition=self.number, offsets=[],
                                         meta={offset_key: str(next_offset)},
                                         key_id=OPERATOR_KEY_ID)
        runs = [(0, len(offsets), OPERATOR_KEY_ID)] if key_ids is None else _runs(key_ids)
        total = IngestCounts()
        for lo, hi, key_id in runs:
            end = next_offset if hi == len(offsets) and next_offset is not None \
                else offsets[hi - 1] + 1
            total.add(self.log.ingest_lines(values[lo:hi], topic, offsets[lo], now_ms,
                                            partition=self.number, offsets=offsets[lo:hi],
                                            meta={offset_key: str(end)}, key_id=key_id))
        return total

    def process(self, inputs: list[tuple[str, bool, TopicBatch]],
                redemptions: tuple[str, TopicBatch] | None,
                rules_path: Path | None) -> dict[str, int]:
        """One cycle of this partition: store each input topic's records (topic, whether
        it changes step targets, the opened records) in order, run the rules over what is
        new, then apply the redemption requests. Counts, the log position after it and
        the CPU time it took."""
        cpu_ns = time.thread_time_ns()
        done = {"accepted": 0, "rejected": 0, "accepted_samples": 0, "awards": 0,
                "redemptions_applied": 0, "redemptions_rejected": 0}
        profiles_changed = False
        for topic, changes_targets, columns in inputs:
            counts = self.ingest(topic, columns.offsets, columns.values, now_ms(),
                                 key_ids=columns.key_ids, next_offset=columns.next_offset)
            done["accepted"] += counts.accepted
            done["rejected"] += counts.rejected
            done["accepted_samples"] += counts.accepted_samples
            profiles_changed |= changes_targets and counts.accepted > 0
        crash_point("after_ingest")
        done["awards"] = self.run_pipeline(rules_path, profiles_changed).awards_appended
        if redemptions is not None:
            topic, requests = redemptions
            result = self.apply_redemptions(topic, requests.offsets, requests.values)
            done["redemptions_applied"] = result.applied
            done["redemptions_rejected"] = result.rejected
        crash_point("after_pipeline")
        done["position"] = self.log.position()
        done["cpu_ns"] = time.thread_time_ns() - cpu_ns
        return done

    def position(self) -> int:
        """The partition log's position (the input records stored so far)."""
        return self.log.position()

    def run_pipeline(self, rules_path: Path | None, profiles_changed: bool) -> RunSummary:
        from engine.pipeline import RULES_DEFAULT_PATH, Pipeline
        from engine.rules.config import load_rules

        if self._pipeline is None:
            self._pipeline = Pipeline(load_rules(rules_path or RULES_DEFAULT_PATH),
                                      snapshot_at_end=False)
        if profiles_changed:
            self._pipeline.invalidate()
        return self._pipeline.run(self.log, self.ledger)

    # -- snapshots on genki.snapshots (takeover without the directory) ----------------

    def topic_snapshot(self) -> bytes | None:
        """This partition's state for a new owner, or None when not at a clean point (the
        rules have not seen the whole log, or ledger entries are not yet published)."""
        from engine.pipeline import META_LOG_POSITION
        from engine.snapshots import SnapshotInfo

        pipeline = self._pipeline
        done = int(self.ledger.get_meta(META_LOG_POSITION) or 0)
        head = self.ledger.head_seq()
        if pipeline is None or done == 0 or self.log.position() != done or \
                (self._get("published_ledger_seq") or 0) < head:
            return None
        engine = pipeline.pruned_engine(self.log, self.ledger)
        log_arrays, log_meta = self.log.export_state()
        info = SnapshotInfo(done, pipeline.rules.version, self.log.profiles_digest(),
                            self.log.late_window_days_max(),
                            {"partition": self.number, "ledger_seq": head,
                             "ledger_seq_digest": self._ledger_seq_digest(head),
                             "redemptions_offset": self._get("redemptions_offset") or 0})
        return encode_partition_snapshot(engine.state(), log_arrays, log_meta, info)

    def _ledger_seq_digest(self, head: int) -> str:
        """The ledger's seq digest through `head`, extended from the last snapshot's."""
        self._seq_digest = self.ledger.seq_digest(self._seq_digest)
        assert self._seq_digest.seq == head, "only this partition's thread appends"
        return self._seq_digest.digest

    def _ledger_check(self, extra: dict[str, Any]) -> bool:
        """Whether the restored ledger is the one the snapshot was taken with (snapshots
        of earlier versions carry the content digest instead: O(entries) to check)."""
        if "ledger_seq_digest" in extra:
            self._seq_digest = self.ledger.seq_digest()
            return self._seq_digest.digest == extra["ledger_seq_digest"]
        return "ledger_digest" in extra and \
            self.ledger.head()["content_digest"] == extra["ledger_digest"]

    def restore_from_snapshot(self, payload: bytes, ledger_records: list[tuple[int, bytes]],
                              ledger_topic: str, rules_path: Path | None) -> tuple[int, int, int]:
        """Rebuild an empty partition directory from a topic snapshot and the entries
        genki.ledger holds up to the snapshot's ledger position.

        The restored ledger must have the content digest the snapshot recorded, else
        SnapshotInvalid (the caller discards the directory and rebuilds from offset 0).
        Records that claim a position inside the snapshot's ledger but differ from the
        entry restored there are dead letters `unauthenticated` (nothing vouches for
        them). Returns (entries restored, of which redemption kinds, refused).
        """
        from engine.pipeline import META_LOG_POSITION, META_RULES_VERSION, RULES_DEFAULT_PATH
        from engine.rules.config import load_rules
        from engine.snapshots import SnapshotInfo, SnapshotInvalid, write_snapshot

        engine, log_arrays, log_meta, info = decode_partition_snapshot(payload)
        rules = load_rules(rules_path or RULES_DEFAULT_PATH)
        if info.rules_version != rules.version or info.extra.get("partition") != self.number:
            raise SnapshotInvalid(f"snapshot of rules {info.rules_version} for partition "
                                  f"{info.extra.get('partition')}")
        self.log.restore_state(log_arrays, log_meta)
        if self.log.profiles_digest() != info.profiles_digest:
            raise SnapshotInvalid("restored profiles differ from the snapshot's")
        last_seq = int(info.extra["ledger_seq"])
        by_seq: dict[int, dict[str, Any]] = {}
        claims: list[tuple[int, bytes, dict[str, Any]]] = []
        for offset, raw in ledger_records:
            body = orjson.loads(raw)
            if isinstance(body, dict) and isinstance(body.get("seq"), int) and \
                    body["seq"] <= last_seq:
                by_seq.setdefault(body["seq"], body)
                claims.append((offset, raw, body))
        drafts = [EntryDraft(e["entry_id"], e["user_id"], EntryKind(e["kind"]), e["points"],
                             e["day"], e["ts_ms"], e["rule"], e["ref"], e["rules_version"])
                  for _, e in sorted(by_seq.items())]
        if len(drafts) != last_seq:
            raise SnapshotInvalid(f"genki.ledger holds {len(drafts)} of the {last_seq} entries "
                                  "the snapshot reflects")
        self.ledger.append(drafts, meta={META_LOG_POSITION: str(info.position),
                                         META_RULES_VERSION: rules.version})
        if not self._ledger_check(info.extra):
            raise SnapshotInvalid("entries restored from genki.ledger do not give the "
                                  "snapshot's ledger digest")
        write_snapshot(self.path, engine, SnapshotInfo(
            info.position, info.rules_version, info.profiles_digest, info.late_window_days))
        refused = [(ledger_topic, self.number, offset, reason_text(
            Reason.unauthenticated, "seq", f"entry {body.get('entry_id')} claims position "
            f"{body['seq']}, which the snapshot's verified ledger holds otherwise"), raw)
                   for offset, raw, body in claims if by_seq[body["seq"]] != body]
        self._state.execute("BEGIN IMMEDIATE")
        self._state.executemany("INSERT INTO outbox_dlq (source, partition, offset, reason, raw)"
                                " VALUES (?, ?, ?, ?, ?)", refused)
        self._set_many({"published_ledger_seq": self.ledger.head_seq(),
                        "redemptions_offset": int(info.extra["redemptions_offset"])})
        self._state.execute("COMMIT")
        return len(drafts), sum(d.kind.value in RESTORED_KINDS for d in drafts), len(refused)

    def apply_redemptions(self, topic: str, offsets: list[int],
                          values: list[bytes]) -> RedemptionCounts:
        """Apply redemption requests in offset order; failures become dead letters."""
        counts = RedemptionCounts()
        done = self._get("redemptions_offset") or 0
        letters: list[tuple[str, int, int, str, bytes]] = []
        for offset, raw in zip(offsets, values, strict=True):
            if offset < done:
                counts.replayed += 1
                continue
            reason = self._redeem_one(raw)
            if reason is None:
                counts.applied += 1
                continue
            letters.append((topic, self.number, offset, reason, raw))
            code = reason.split(":", 1)[0]
            counts.rejected += 1
            counts.rejected_by_reason[code] = counts.rejected_by_reason.get(code, 0) + 1
        if offsets and offsets[-1] + 1 > done:
            self._state.execute("BEGIN IMMEDIATE")
            self._state.executemany("INSERT INTO outbox_dlq (source, partition, offset, reason,"
                                    " raw) VALUES (?, ?, ?, ?, ?)", letters)
            self._set_many({"redemptions_offset": offsets[-1] + 1})
            self._state.execute("COMMIT")
        return counts

    def _redeem_one(self, raw: bytes) -> str | None:
        """None when applied (or already applied); else the dead-letter reason."""
        try:
            request = Redemption.model_validate_json(raw)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "record"
            code = Reason.missing_field if first["type"] == "missing" else Reason.bad_field
            return reason_text(code, where, first["msg"])
        unauthenticated = verification_failure(request, self.record_keys)
        if unauthenticated is not None:
            return unauthenticated
        try:
            if request.kind == RedemptionKind.redeem:
                self.ledger.redeem(request.user_id, request.points, request.shop_id,
                                   request.terminal_id, request.idempotency_key, request.ts_ms,
                                   request=request.request,
                                   points_per_day_max=request.points_per_day_max)
            else:
                assert request.refund_of is not None
                self.ledger.refund(request.refund_of, request.points, request.idempotency_key,
                                   request.ts_ms, shop_id=request.shop_id)
        except GenkiError as error:
            return f"{error.code}: points: {error}"
        return None

    # -- takeover ----------------------------------------------------------------------

    def restore_entries(self, selection: RestoreSelection, ledger_topic: str) -> tuple[int, int]:
        """Append the non-derivable entries (redeem, refund, adjust, expire) another
        owner made and a verified request backs (engine.kafka.restore); the refused
        ones become dead letters.

        Called after the inputs are caught up to what that owner had processed, so
        the awards that paid for them are back; entry ids make repeats no-ops.
        Returns (entries appended, entries refused).
        """
        trusted = [e for e in selection.trusted if e.kind.value in RESTORED_KINDS]
        refused = list(selection.refused)
        for offset, raw, expiry in selection.expiries:
            reason = expiry_failure(expiry, self._lot_of(expiry))
            if reason is None:
                trusted.append(expiry)
            else:
                refused.append((offset, reason, raw))
        selection.refused = refused
        drafts = [EntryDraft(e.entry_id, e.user_id, EntryKind(e.kind), e.points, e.day, e.ts_ms,
                             e.rule, e.ref, e.rules_version) for e in trusted]
        if refused:
            self._state.execute("BEGIN IMMEDIATE")
            self._state.executemany(
                "INSERT INTO outbox_dlq (source, partition, offset, reason, raw) "
                "VALUES (?, ?, ?, ?, ?)",
                [(ledger_topic, self.number, offset, reason, raw)
                 for offset, reason, raw in refused])
            self._state.execute("COMMIT")
        if not drafts:
            return 0, len(refused)
        return self.ledger.append(drafts).appended, len(refused)

    def _lot_of(self, expiry: LedgerEntry) -> Entry | None:
        lot_id = ref_fields(expiry.ref).get("lot")
        if not lot_id:
            return None
        try:
            return self.ledger.entry(str(lot_id))
        except NotFound:
            return None

    # -- outputs -----------------------------------------------------------------------

    def pending_outputs(self) -> Outputs:
        """Ledger entries, flag events and dead letters not yet published (bounded)."""
        out = Outputs(ledger_seq=self._get("published_ledger_seq") or 0,
                      flag_seq=self._get("published_flag_seq") or 0,
                      dlq_id=self._get("published_dlq_id") or 0,
                      outbox_id=self._get("published_outbox_id") or 0)
        out.entries = [dict(zip(ENTRY_COLUMNS, row, strict=True)) for row in
                       self.ledger.entry_rows(ENTRY_COLUMNS, after_seq=out.ledger_seq,
                                              limit=OUTPUT_ROWS_PER_READ_MAX)]
        out.flags = [dict(zip(_FLAG_COLUMNS, row, strict=True)) for row in
                     self.ledger.flag_rows(_FLAG_COLUMNS, after_seq=out.flag_seq,
                                           limit=OUTPUT_ROWS_PER_READ_MAX)]
        for letter in self.log.dead_letters_after(out.dlq_id, OUTPUT_ROWS_PER_READ_MAX):
            out.dead_letters.append({"id": letter.id, "source": letter.source,
                                     "partition": letter.partition, "offset": letter.offset,
                                     "reason": letter.reason, "raw": letter.raw, "table": "dlq"})
        for row in self._state.execute(
                "SELECT id, source, partition, offset, reason, raw FROM outbox_dlq WHERE id > ?"
                " ORDER BY id LIMIT ?", (out.outbox_id, OUTPUT_ROWS_PER_READ_MAX)):
            out.dead_letters.append({"id": row[0], "source": row[1], "partition": row[2],
                                     "offset": row[3], "reason": row[4], "raw": row[5],
                                     "table": "outbox"})
        return out

    def mark_published(self, out: Outputs) -> None:
        values = {"published_ledger_seq": max([out.ledger_seq, *(e["seq"] for e in out.entries)]),
                  "published_flag_seq": max([out.flag_seq, *(f["seq"] for f in out.flags)]),
                  "published_dlq_id": max([out.dlq_id, *(d["id"] for d in out.dead_letters
                                                         if d["table"] == "dlq")]),
                  "published_outbox_id": max([out.outbox_id, *(d["id"] for d in out.dead_letters
                                                               if d["table"] == "outbox")])}
        self._state.execute("BEGIN IMMEDIATE")
        self._set_many(values)
        self._state.execute("COMMIT")

    def all_entry_contents(self) -> list[tuple]:
        """Every entry's content columns (for digests across partitions)."""
        columns = ("seq", "entry_id", "user_id", "kind", "points", "day", "ts_ms", "rule", "ref",
                   "rules_version")
        return [row[1:] for page in self.ledger.iter_entry_rows(columns) for row in page]


def erase_dead_letters(directory: Path, user_id: str) -> int:
    """Delete the dead letters naming a person from a partition's kafka.sqlite (published or
    not; engine.erasure). Run only while no worker owns the partition."""
    path = directory / STATE_FILE_NAME
    if not path.exists():
        return 0
    db = sqlite3.connect(path, isolation_level=None, timeout=60.0)
    try:
        db.execute("PRAGMA secure_delete = ON")
        removed = db.execute("DELETE FROM outbox_dlq WHERE instr(raw, ?) > 0",
                             (orjson.dumps(user_id),)).rowcount
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return int(removed)


def now_ms() -> int:
    return int(time.time() * 1000)


def entry_wire(row: dict[str, Any]) -> bytes:
    return orjson.dumps(row)


def decode_entry(raw: bytes) -> LedgerEntry:
    return LedgerEntry.model_validate_json(raw)


def _runs(key_ids: list[str]) -> list[tuple[int, int, str]]:
    """[lo, hi) runs of equal consecutive key ids."""
    runs: list[tuple[int, int, str]] = []
    lo = 0
    for i in range(1, len(key_ids) + 1):
        if i == len(key_ids) or key_ids[i] != key_ids[lo]:
            runs.append((lo, i, key_ids[lo]))
            lo = i
    return runs
