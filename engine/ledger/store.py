"""The SQLite ledger: one file, WAL, synchronous=FULL, every write one transaction.

Writes take SQLite's write lock up front (BEGIN IMMEDIATE), so balance checks
and the entries they allow are atomic across threads and processes. Readers
never block writers (WAL). One Ledger object may be shared by threads (an
HTTP server's pool); calls are serialised on its lock. Every write
transaction that changes the chains or meta ends with one commit record
(signed when a signing key is configured); see canonical.py for the bytes.
"""

from __future__ import annotations

import datetime as dt
import itertools
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import orjson

from engine.clock import TOKYO, iso_to_day
from engine.config import SIGNING_KEY_ENV
from engine.entries import Awards, EntryDraft
from engine.errors import GenkiError, LedgerError, NotFound, RefundExceeds
from engine.faults import crash_point
from engine.ledger import commands
from engine.ledger.audit import commit_hashes, verify_ledger
from engine.ledger.canonical import (
    GENESIS_HASH,
    PERSON_KEY_BYTES,
    PersonKey,
    chain_hash,
    commit_bytes,
    content_digest,
    erasure_bytes,
    flag_bytes,
    meta_digest,
    seq_digest,
)
from engine.ledger.errors import (
    DailyRedeemLimit,
    EntryExistsWithDifferent,
    InvalidEntry,
    InvalidRequest,
    LedgerBusy,
    NotARedemption,
    Overdraft,
    RefundTooLarge,
    RefundWrongShop,
)
from engine.ledger.journal import (
    CONTENT_FIELDS,
    AwardRows,
    Content,
    RefundTracker,
    awards_row_by_row,
    chain,
    chain_awards,
    normalise,
)
from engine.ledger.lots import EXPIRY_MONTHS_MAX, JournalItem, expiry_drafts, open_lots
from engine.ledger.model import (
    ENTRY_COLUMNS,
    JOURNAL_COLUMNS,
    AppendResult,
    BalanceDifference,
    Entry,
    ErasureReceipt,
    RebuildResult,
    SeqDigest,
    Settlement,
    VerifyResult,
)
from engine.ledger.schema import DDL, LEGACY_SCHEMA_VERSIONS, SCHEMA_VERSION, SHOP_KINDS_SQL
from engine.ledger.signing import Signer, Verifier, check_witness, signer_for
from engine.schemas import FlagEvent
from engine.storage import open_sqlite

LEDGER_FILE_NAME = "ledger.sqlite"
DRAFTS_PER_APPEND_MAX = 2_000_000
FLAGS_PER_APPEND_MAX = 1_000_000
META_PER_APPEND_MAX = 64
META_KEY_CHARS_MAX = 200
META_VALUE_CHARS_MAX = 10_000
HISTORY_LIMIT_MAX = 1_000
READ_ENTRIES_MAX = 200_000
LOCK_WAIT_S_MAX = 30.0
ID_LOOKUP_CHUNK_IDS = 50_000
EXPIRY_USERS_PER_TRANSACTION = 500
CACHE_KIB = 65_536
KEY_CACHE_USERS_MAX = 200_000
REASON_CHARS_MAX = 500
_COLUMNS_SQL = ", ".join(ENTRY_COLUMNS)
_JOURNAL_SQL = ", ".join(JOURNAL_COLUMNS)
_INSERT_SQL = f"INSERT INTO journal ({_JOURNAL_SQL}) VALUES ({', '.join('?' * 12)})"
# Links from the entry rows (seq, entry_id, user_id, kind, ref): private refs only.
_LINK_SQL = ("INSERT INTO entry_links (seq, entry_id, user_id, ref) VALUES "
             "(?1, ?2, ?3, CASE WHEN ?4 = 'redeem' OR ?4 = 'refund' THEN NULL ELSE ?5 END)")
_LINK_FIELDS = operator.itemgetter(0, 1, 2, 3, 8)
# Rows of journal.chain_awards: kind and public ref are constants of an award.
_AWARD_SQL = ("INSERT INTO journal (seq, subject, entry, kind, points, day, ts_ms, rule, ref, "
              "rules_version, prev_hash, hash) VALUES (?, ?, ?, 'award', ?, ?, ?, ?, NULL, ?, ?, ?)")
_AWARD_LINK_SQL = "INSERT INTO entry_links (seq, entry_id, user_id, ref) VALUES (?, ?, ?, ?)"
_FLAG_STORED_COLUMNS: tuple[str, ...] = ("seq", "flag_id", "user_id", "flag", "state", "day",
                                         "evidence", "rules_version")
_FLAG_FIELDS: tuple[str, ...] = (
    "flag_id", "user_id", "flag", "state", "day", "evidence", "rules_version",
)


class Ledger:
    """The points journal and its projections. Open with `Ledger.open(data_dir)`."""

    def __init__(self, connection: sqlite3.Connection, path: Path,
                 signer: Signer | None = None) -> None:
        self._db = connection
        self._lock = threading.RLock()
        self._batching = False
        self._batch_meta: dict[str, str] = {}
        self.path = path
        self._signer = signer
        self._keys: dict[str, tuple[bytes, PersonKey]] = {}

    @property
    def signing_key_id(self) -> str | None:
        return None if self._signer is None else self._signer.key_id

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    def open(cls, data_dir: Path, *, signing_key: Path | None = None) -> Ledger:
        """Open (or create) `data_dir`/ledger.sqlite.

        The one place a ledger learns its signing key: `signing_key`, else the
        file named by $GENKI_SIGNING_KEY_FILE (the CLI's `--signing-key` sets
        it), else none (commits are then unsigned). A key inside `data_dir` is
        refused.
        """
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        signer = signer_for(data_dir, signing_key)
        path = data_dir / LEDGER_FILE_NAME
        try:
            # A `genki run` chunk writes ~2,500 pages (the random entry-id index among them):
            # checkpointing them after every commit doubled the commit's work (large_wal).
            connection = open_sqlite(path, busy_wait_s_max=LOCK_WAIT_S_MAX, cache_kib=CACHE_KIB,
                                     large_wal=True)
        except sqlite3.DatabaseError as error:
            raise LedgerError(f"{path}: cannot open as a genki ledger: {error}") from error
        try:
            connection.execute("PRAGMA temp_store = MEMORY")
            # Erased keys and links are overwritten with zeros, not left in free pages.
            connection.execute("PRAGMA secure_delete = ON")
            ledger = cls(connection, path, signer)
            ledger._create_schema()
        except sqlite3.DatabaseError as error:
            connection.close()
            raise LedgerError(f"{path}: cannot open as a genki ledger: {error}") from error
        except BaseException:
            connection.close()
            raise
        return ledger

    def _create_schema(self) -> None:
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version in LEGACY_SCHEMA_VERSIONS:
                raise LedgerError(
                    f"{self.path} is a canonical version {version} ledger (demo data; this "
                    f"genki writes version {SCHEMA_VERSION}, erasure-compatible and signed). "
                    f"Run `genki ledger migrate --data-dir {self.path.parent}` to rewrite it "
                    "as version 2 (the old file is kept beside it), or start a new data "
                    "directory")
            if version not in (0, SCHEMA_VERSION):
                raise LedgerError(f"{self.path}: ledger schema version {version} is not "
                                  f"{SCHEMA_VERSION}; use the genki version that wrote it")
            for statement in DDL:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Several commands (redeem, refund, adjust, append) in one transaction: one
        fsync for all (group commit). Each command stays atomic on its own (a savepoint):
        one that raises wrote nothing and the others go on; all are durable together
        when the block ends, none if it raises. One commit record covers the batch."""
        with self._write() as db:
            heads = _heads(db)
            self._batching, self._batch_meta = True, {}
            try:
                yield
            finally:
                self._batching = False
            if self._batch_meta or _heads(db) != heads:
                self._commit_locked(db, self._batch_meta)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's write lock from its first statement
        (inside `batch`, a savepoint of the batch's transaction)."""
        with self._lock:
            if self._batching:
                meta = dict(self._batch_meta)
                try:
                    yield from _savepoint(self._db)
                except BaseException:
                    self._batch_meta = meta  # that command's meta was rolled back too
                    raise
                return
            assert not self._db.in_transaction, "write transactions do not nest"
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as error:
                raise LedgerBusy(f"{self.path}: could not take the write lock within "
                                 f"{LOCK_WAIT_S_MAX:g} s ({error}); retry") from error
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot for several queries."""
        with self._lock:
            assert not self._db.in_transaction
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    # -- append --------------------------------------------------------------------

    def append(self, drafts: Sequence[EntryDraft], *, flags: Sequence[FlagEvent] = (),
               meta: Mapping[str, str] | None = None) -> AppendResult:
        """Append entries, flag events and meta values in one transaction (all or nothing).

        Drafts whose entry_id is stored with identical content are no-ops
        (counted as existing); the same id with other content raises
        EntryExistsWithDifferent naming the field; a debit that would take any
        balance below zero raises Overdraft. Either way nothing is written.
        """
        _check_count(len(drafts))
        contents = normalise(drafts)
        return self._append_with(lambda db: self._append_locked(db, contents), flags, meta)

    def append_awards(self, awards: Awards, *, flags: Sequence[FlagEvent] = (),
                      meta: Mapping[str, str] | None = None) -> AppendResult:
        """`append(awards.drafts(), ...)` from columns, without an object per award.

        The same entries, bytes, hashes, checks and results as the drafts (the
        differential tests hold it to that). Entry ids are not looked up first:
        the unique index on entry ids refuses a stored one, and then the batch
        is rolled back to a savepoint and appended row by row, which counts
        identical ones as existing and refuses different ones as `append` does.
        """
        _check_count(len(awards))
        if len(awards) == 0 or awards_row_by_row(awards):
            return self.append(awards.drafts(), flags=flags, meta=meta)
        return self._append_with(lambda db: self._append_awards_locked(db, awards), flags, meta)

    def _append_with(self, append_entries: Callable[[sqlite3.Connection], AppendResult],
                     flags: Sequence[FlagEvent],
                     meta: Mapping[str, str] | None) -> AppendResult:
        """One transaction: the entries (`append_entries`), flag events, meta, a commit."""
        if len(flags) > FLAGS_PER_APPEND_MAX:
            raise InvalidEntry(f"{len(flags)} flags in one append; at most {FLAGS_PER_APPEND_MAX}")
        meta_items = _meta_items(meta)
        flag_rows = [_flag_row(flag) for flag in flags]
        with self._write() as db:
            result = append_entries(db)
            flags_appended, flags_existing = self._append_flags_locked(db, flag_rows)
            if meta_items:
                db.executemany("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                               "DO UPDATE SET value = excluded.value", meta_items)
            changed = bool(result.appended or flags_appended or meta_items)
            if changed:
                self._commit_locked(db, dict(meta_items))
        if changed:
            crash_point("ledger_after_commit")
        return AppendResult(result.appended, result.existing, result.seq_first, result.seq_last,
                            result.chain_head, flags_appended, flags_existing,
                            result.rows, result.existing_rows)

    def _append_awards_locked(self, db: sqlite3.Connection, awards: Awards) -> AppendResult:
        seq_head, hash_head = _head(db)
        used = np.unique(awards.user).tolist()
        keys = self._keys_locked(db, [awards.user_ids[index] for index in used])
        journal, links = chain_awards(awards, seq_head, hash_head, keys)
        db.execute("SAVEPOINT awards")
        try:
            db.executemany(_AWARD_SQL, journal)
            db.executemany(_AWARD_LINK_SQL, links)
        except sqlite3.IntegrityError:
            db.execute("ROLLBACK TO awards")
            db.execute("RELEASE awards")
            return self._append_locked(db, normalise(awards.drafts()))
        db.execute("RELEASE awards")
        users, inverse = np.unique(awards.user, return_inverse=True)
        deltas = np.zeros(len(users), np.int64)
        np.add.at(deltas, inverse, awards.points)
        counts = np.bincount(inverse, minlength=len(users))
        user_ids = [awards.user_ids[index] for index in users.tolist()]
        _apply_deltas(db, dict(zip(user_ids, deltas.tolist(), strict=True)),
                      dict(zip(user_ids, counts.tolist(), strict=True)))
        return AppendResult(len(journal), 0, journal[0][0], journal[-1][0], journal[-1][9],
                            rows=AwardRows(journal, links))

    def _append_locked(self, db: sqlite3.Connection, contents: list[Content], *,
                       ids_checked: bool = False) -> AppendResult:
        """`ids_checked`: the caller looked the (one) entry id up in this transaction."""
        new, duplicates = _unique(contents)
        existing: list[tuple] = []
        seq_head, hash_head = _head(db)
        if seq_head and new and not ids_checked:
            new, stored = self._split_stored(db, new)
            existing.extend(stored)
        if not new:
            return AppendResult(0, len(existing) + duplicates, None, None, hash_head,
                                existing_rows=existing)
        self._check_debits(db, new)
        _check_refunds(db, new)
        keys = self._keys_locked(db, {content[1] for content in new})
        rows, journal = chain(new, seq_head, hash_head, keys)
        db.executemany(_INSERT_SQL, journal)
        db.executemany(_LINK_SQL, map(_LINK_FIELDS, rows))
        _apply_balances(db, rows)
        seq_last, chain_head = rows[-1][0], rows[-1][11]
        return AppendResult(len(rows), len(existing) + duplicates, rows[0][0], seq_last,
                            chain_head, rows=rows, existing_rows=existing)

    def _split_stored(self, db: sqlite3.Connection,
                      new: list[Content]) -> tuple[list[Content], list[tuple]]:
        """New contents whose ids are not stored yet, and the stored entries of the rest."""
        stored: dict[str, tuple] = {}
        for start in range(0, len(new), ID_LOOKUP_CHUNK_IDS):
            ids = [content[0] for content in new[start:start + ID_LOOKUP_CHUNK_IDS]]
            for row in db.execute(
                f"SELECT {', '.join('e.' + c for c in ENTRY_COLUMNS)} FROM json_each(?) AS j "
                "JOIN entries AS e ON e.entry_id = j.value", (orjson.dumps(ids).decode(),)
            ):
                stored[row[1]] = row
        if not stored:
            return new, []
        fresh: list[Content] = []
        existing: list[tuple] = []
        for content in new:
            row = stored.get(content[0])
            if row is None:
                fresh.append(content)
                continue
            _raise_if_different("entry", row[1:10], content)
            existing.append(row)
        return fresh, existing

    def _check_debits(self, db: sqlite3.Connection, new: list[Content]) -> None:
        """Refuse the batch if any running balance of a debited user goes below zero."""
        debited = {content[1] for content in new if content[3] < 0}
        if not debited:
            return
        running = self._balances_locked(db, debited)
        for _, user_id, _, points, *_ in new:
            balance = running.get(user_id)
            if balance is None:
                continue
            if balance + points < 0:
                raise Overdraft(user_id, balance, -points)
            running[user_id] = balance + points

    def _balances_locked(self, db: sqlite3.Connection, users: Iterable[str]) -> dict[str, int]:
        balances = {user: 0 for user in users}
        found = db.execute(
            "SELECT b.user_id, b.points FROM json_each(?) AS j "
            "JOIN balances AS b ON b.user_id = j.value",
            (orjson.dumps(list(balances)).decode(),),
        )
        balances.update(found)
        return balances

    def _append_flags_locked(self, db: sqlite3.Connection,
                             flag_rows: list[tuple]) -> tuple[int, int]:
        if not flag_rows:
            return 0, 0
        ids = orjson.dumps([row[0] for row in flag_rows]).decode()
        stored = {row[0]: row for row in db.execute(
            f"SELECT {', '.join('f.' + c for c in _FLAG_FIELDS)} FROM json_each(?) AS j "
            "JOIN flags AS f ON f.flag_id = j.value", (ids,))}
        fresh: dict[str, tuple] = {}
        existing = 0
        for row in flag_rows:
            known = stored.get(row[0]) or fresh.get(row[0])
            if known is None:
                fresh[row[0]] = row
                continue
            _raise_if_different("flag", known, row, _FLAG_FIELDS)
            existing += 1
        if not fresh:
            return 0, existing
        rows = list(fresh.values())
        keys = self._keys_locked(db, {row[1] for row in rows})
        seq, prev = _flag_head(db)
        journal: list[tuple] = []
        links: list[tuple] = []
        dumps = orjson.dumps
        for row in rows:
            seq += 1
            key = keys[row[1]]
            tag = key.tag(dumps(row))  # = canonical.flag_tag
            digest = chain_hash(prev, flag_bytes(seq, key.subject, tag))
            journal.append((seq, key.subject, tag, prev, digest))
            links.append((seq, *row))
            prev = digest
        db.executemany("INSERT INTO flag_journal (seq, subject, event, prev_hash, hash) "
                       "VALUES (?, ?, ?, ?, ?)", journal)
        db.executemany(f"INSERT INTO flags (seq, {', '.join(_FLAG_FIELDS)}) VALUES "
                       f"({', '.join('?' * (1 + len(_FLAG_FIELDS)))})", links)
        return len(fresh), existing

    def _keys_locked(self, db: sqlite3.Connection, users: Iterable[str]) -> dict[str, PersonKey]:
        """Each user's person key, creating (and storing) a random one for new users (in
        user id order, so the same appends draw the same random bytes in the same order)."""
        wanted = sorted(users)
        stored: dict[str, bytes] = dict(db.execute(
            "SELECT k.user_id, k.key FROM json_each(?) AS j "
            "JOIN person_keys AS k ON k.user_id = j.value", (orjson.dumps(wanted).decode(),)))
        cache = self._keys
        if len(cache) > KEY_CACHE_USERS_MAX:
            cache.clear()
        keys: dict[str, PersonKey] = {}
        fresh: list[tuple[str, bytes, str]] = []
        for user in wanted:
            raw = stored.get(user)
            cached = cache.get(user)
            if raw is None:
                raw = os.urandom(PERSON_KEY_BYTES)
                key = PersonKey(raw)
                fresh.append((user, raw, key.subject))
            elif cached is not None and cached[0] == raw:
                key = cached[1]
            else:
                key = PersonKey(raw)
            cache[user] = (raw, key)
            keys[user] = key
        if fresh:
            db.executemany("INSERT INTO person_keys (user_id, key, subject) VALUES (?, ?, ?)",
                           fresh)
        return keys

    def _commit_locked(self, db: sqlite3.Connection, meta_written: dict[str, str]) -> None:
        """Close a write transaction with one commit record over every chain head and meta
        (inside `batch`, the batch's one record at its end)."""
        if self._batching:
            self._batch_meta.update(meta_written)
            return
        seq, prev = _chain_head(db, "commits")
        meta = dict(db.execute("SELECT key, value FROM meta"))
        body = commit_bytes(seq + 1, _now_ms(), _head(db), _flag_head(db),
                            _chain_head(db, "erasures"), meta_written, meta_digest(meta))
        digest = chain_hash(prev, body)
        signer = self._signer
        db.execute("INSERT INTO commits (seq, body, prev_hash, hash, key_id, signature) "
                   "VALUES (?, ?, ?, ?, ?, ?)",
                   (seq + 1, body.decode(), prev, digest, signer and signer.key_id,
                    signer and signer.sign(digest)))
        crash_point("ledger_before_commit")

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    # -- shop and staff commands ------------------------------------------------------

    def redeem(self, user_id: str, points: int, shop_id: str, terminal_id: str,
               idempotency_key: str, ts_ms: int, *, request: str | None = None,
               points_per_day_max: int | None = None) -> Entry:
        """Take points at a shop; a retry with the same key returns the original entry.

        The retry check compares user, points, terminal and `request` (a digest
        of the request, see commands.redeem_draft), not ts_ms: a terminal's
        retry may carry a later clock reading. `points_per_day_max` bounds
        the points the user redeems per Tokyo day (refunds do not give it back).
        """
        draft = commands.redeem_draft(user_id, points, shop_id, terminal_id, idempotency_key,
                                      ts_ms, request)
        with self._write() as db:
            stored = _entry_locked(db, draft.entry_id)
            if stored is not None:
                _raise_if_redeem_differs(stored, commands.RedeemRequest(
                    user_id, points, shop_id, terminal_id, idempotency_key, ts_ms, request))
                return stored
            if points_per_day_max is not None:
                _check_day_redeemed(db, user_id, draft.day, points, points_per_day_max)
            return self._append_one_locked(db, draft)

    def redeem_many(self, requests: Sequence[commands.RedeemRequest],
                    ) -> list[Entry | GenkiError]:
        """`redeem` for each request, in order, as one write: what each call would return
        or raise (a refusal is returned in its place; the others go on).

        One lookup of the entry ids, one of the balances, one chain and insert for the
        batch (the API's group commit) instead of a transaction (or savepoint) each,
        with the same entries, checks and refusals as the calls one by one (a test holds
        them equal). A batch that repeats an entry id, or holds a request `redeem`
        refuses before its lookup, is taken one by one.
        """
        _check_count(len(requests))
        try:
            drafts = [commands.redeem_draft(r.user_id, r.points, r.shop_id, r.terminal_id,
                                            r.idempotency_key, r.ts_ms, r.request)
                      for r in requests]
            contents = normalise(drafts)
        except GenkiError:
            drafts = []
        if not drafts or len({draft.entry_id for draft in drafts}) != len(drafts):
            return [self._redeem_or_refusal(request) for request in requests]
        with self._write() as db:
            return self._redeem_many_locked(db, requests, contents)

    def _redeem_or_refusal(self, request: commands.RedeemRequest) -> Entry | GenkiError:
        try:
            return self.redeem(request.user_id, request.points, request.shop_id,
                               request.terminal_id, request.idempotency_key, request.ts_ms,
                               request=request.request,
                               points_per_day_max=request.points_per_day_max)
        except GenkiError as error:
            return error

    def _redeem_many_locked(self, db: sqlite3.Connection,
                            requests: Sequence[commands.RedeemRequest],
                            contents: list[Content]) -> list[Entry | GenkiError]:
        stored = _entries_locked(db, [content[0] for content in contents])
        running = self._balances_locked(db, {content[1] for content in contents})
        stored_on_day: dict[tuple[str, str | None], int] = {}
        new_on_day: dict[tuple[str, str | None], int] = {}
        outcomes: list[Entry | GenkiError | None] = []
        new: list[Content] = []
        for request, content in zip(requests, contents, strict=True):
            user_id, points, day_key = content[1], request.points, (content[1], content[4])
            try:
                known = stored.get(content[0])
                if known is not None:
                    _raise_if_redeem_differs(known, request)
                    outcomes.append(known)
                    continue
                if request.points_per_day_max is not None:
                    if day_key not in stored_on_day:
                        stored_on_day[day_key] = _day_redeemed(db, *day_key)
                    _check_day_limit(user_id, content[4],
                                     stored_on_day[day_key] + new_on_day.get(day_key, 0),
                                     points, request.points_per_day_max)
                if running[user_id] < points:
                    raise Overdraft(user_id, running[user_id], points)
            except GenkiError as error:
                outcomes.append(error)
                continue
            running[user_id] -= points
            new_on_day[day_key] = new_on_day.get(day_key, 0) + points
            outcomes.append(None)
            new.append(content)
        if new:
            appended = iter(self._append_locked(db, new, ids_checked=True).entries)
            outcomes = [next(appended) if outcome is None else outcome for outcome in outcomes]
            self._commit_locked(db, {})
        return [outcome for outcome in outcomes if outcome is not None]

    def refund(self, redemption_entry_id: str, points: int, idempotency_key: str, ts_ms: int,
               shop_id: str | None = None) -> Entry:
        """Give back (part of) a redemption; all refunds of it together at most what it took."""
        with self._write() as db:
            redemption = _entry_locked(db, redemption_entry_id)
            if redemption is None:
                raise NotFound(f"no ledger entry {redemption_entry_id}")
            if redemption.kind != "redeem":
                raise NotARedemption(f"entry {redemption_entry_id} is a {redemption.kind}, "
                                     "not a redemption; only redemptions can be refunded")
            fields = commands.ref_fields(redemption.ref)
            redeemed_at = fields["shop"]
            if shop_id is not None and shop_id != redeemed_at:
                raise RefundWrongShop(redemption_entry_id, shop_id, redeemed_at)
            draft = commands.refund_draft(redemption_entry_id, redemption.user_id, redeemed_at,
                                          fields.get("terminal"), points, idempotency_key, ts_ms)
            stored = _entry_locked(db, draft.entry_id)
            if stored is not None:
                known = {"refund_of": commands.ref_fields(stored.ref).get("refund_of"),
                         "points": stored.points}
                sent = {"refund_of": redemption_entry_id, "points": points}
                _raise_if_request_differs("idempotency key", idempotency_key, known, sent)
                return stored
            refunded = _refunded(db, redemption_entry_id)
            if refunded + points > -redemption.points:
                raise RefundTooLarge(redemption_entry_id, points, -redemption.points, refunded)
            return self._append_one_locked(db, draft)

    def adjust(self, user_id: str, points: int, reason: str, staff_id: str, key: str,
               ts_ms: int) -> Entry:
        """A staff correction with a mandatory reason; never takes a balance below zero."""
        draft = commands.adjust_draft(user_id, points, reason, staff_id, key, ts_ms)
        with self._write() as db:
            stored = _entry_locked(db, draft.entry_id)
            if stored is not None:
                known = {"user_id": stored.user_id, "points": stored.points,
                         "reason": commands.ref_fields(stored.ref).get("reason")}
                sent = {"user_id": user_id, "points": points, "reason": reason.strip()}
                _raise_if_request_differs("adjustment key", key, known, sent)
                return stored
            return self._append_one_locked(db, draft)

    def _append_one_locked(self, db: sqlite3.Connection, draft: EntryDraft) -> Entry:
        """Append a command's draft whose id the caller found unused in this transaction."""
        entry = self._append_locked(db, normalise([draft]), ids_checked=True).entries[0]
        self._commit_locked(db, {})
        return entry

    def expire(self, as_of_day: str, months: int,
               progress: Callable[[int], object] | None = None) -> list[Entry]:
        """End every lot older than `months` months as of `as_of_day` (FIFO, idempotent).

        Works through the users with points in chunks, each chunk read and
        expired in one write transaction (so no redemption can spend a lot
        between reading and expiring it, and no terminal waits long for the
        lock). Each chunk is idempotent, so an interrupted run is finished by
        running it again. Returns the entries newly appended.
        """
        try:
            iso_to_day(as_of_day)
        except ValueError as error:
            raise InvalidRequest(f"as_of: {error}") from error
        if isinstance(months, bool) or not isinstance(months, int) \
                or not 1 <= months <= EXPIRY_MONTHS_MAX:
            raise InvalidRequest(f"months: must be 1..{EXPIRY_MONTHS_MAX}, got {months!r}")
        with self._lock:
            users = [row[0] for row in self._db.execute(
                "SELECT user_id FROM balances WHERE points > 0 ORDER BY user_id")]
        expired: list[Entry] = []
        for start in range(0, len(users), EXPIRY_USERS_PER_TRANSACTION):
            chunk = users[start:start + EXPIRY_USERS_PER_TRANSACTION]
            with self._write() as db:
                drafts: list[EntryDraft] = []
                for user_id, items in _journals_of(db, chunk):
                    drafts.extend(expiry_drafts(user_id, open_lots(items), as_of_day, months))
                if drafts:
                    expired.extend(self._append_locked(db, normalise(drafts)).entries)
                    self._commit_locked(db, {})
            if progress is not None:
                progress(len(chunk))
        return expired

    # -- queries -------------------------------------------------------------------

    def balance(self, user_id: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT points FROM balances WHERE user_id = ?",
                                   (user_id,)).fetchone()
        return 0 if row is None else int(row[0])

    def has_user(self, user_id: str) -> bool:
        """Whether the ledger links anything to this user (False once erased: answer 404)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM person_keys WHERE user_id = ?",
                                    (user_id,)).fetchone() is not None

    def history(self, user_id: str, cursor: int | None = None,
                limit: int = 50) -> tuple[list[Entry], int | None]:
        """Newest first; pass next_cursor back to get the next page (None: no more)."""
        if isinstance(limit, bool) or not isinstance(limit, int) \
                or not 1 <= limit <= HISTORY_LIMIT_MAX:
            raise InvalidRequest(f"limit: must be 1..{HISTORY_LIMIT_MAX}, got {limit!r}")
        before = cursor if cursor is not None else 2**62
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS_SQL} FROM entries WHERE user_id = ? AND seq < ? "
                "ORDER BY seq DESC LIMIT ?", (user_id, before, limit + 1)).fetchall()
        entries = [Entry.from_row(row) for row in rows[:limit]]
        next_cursor = entries[-1].seq if len(rows) > limit else None
        return entries, next_cursor

    def entry(self, entry_id: str) -> Entry:
        with self._lock:
            found = _entry_locked(self._db, entry_id)
        if found is None:
            raise NotFound(f"no ledger entry {entry_id}")
        return found

    def entries(self, entry_ids: Sequence[str]) -> dict[str, Entry]:
        """The stored entries among `entry_ids` (at most ID_LOOKUP_CHUNK_IDS), by id."""
        with self._lock:
            return _entries_locked(self._db, list(entry_ids))

    def current_flags(self, day: str | None = None) -> list[FlagEvent]:
        """Flags whose latest event (on or before `day`) raised them, with evidence."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_FLAG_FIELDS)} FROM ("
                f" SELECT *, ROW_NUMBER() OVER (PARTITION BY user_id, flag "
                "  ORDER BY day DESC, seq DESC) AS latest"
                " FROM flags WHERE ?1 IS NULL OR day <= ?1)"
                " WHERE latest = 1 AND state = 'raised' ORDER BY user_id, flag", (day,)).fetchall()
        return [_flag_event(row) for row in rows]

    def flag_history(self, user_id: str) -> list[FlagEvent]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_FLAG_FIELDS)} FROM flags WHERE user_id = ? "
                "ORDER BY day, seq", (user_id,)).fetchall()
        return [_flag_event(row) for row in rows]

    def settlement(self, shop_id: str, month: str) -> Settlement:
        """What a shop redeemed and refunded in a Tokyo calendar month ("YYYY-MM")."""
        start_ms, end_ms = _month_range_ms(month)
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, COUNT(*), COALESCE(SUM(points), 0) FROM journal "
                f"WHERE {SHOP_KINDS_SQL} AND json_extract(ref, '$.shop') = ? "
                "AND ts_ms >= ? AND ts_ms < ? GROUP BY kind", (shop_id, start_ms, end_ms))
            totals = {kind: (count, points) for kind, count, points in rows}
        redemptions, redeemed = totals.get("redeem", (0, 0))
        refunds, refunded = totals.get("refund", (0, 0))
        return Settlement(shop_id, month, -redeemed, refunded, redemptions, refunds)

    def read_entries(self, after_seq: int, upto_seq: int) -> list[Entry]:
        """Entries with after_seq < seq <= upto_seq in seq order: readers page by position."""
        if upto_seq - after_seq > READ_ENTRIES_MAX:
            raise InvalidRequest(f"read_entries: at most {READ_ENTRIES_MAX} entries per call, "
                                 f"asked for {upto_seq - after_seq}")
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS_SQL} FROM entries WHERE seq > ? AND seq <= ? ORDER BY seq",
                (after_seq, upto_seq)).fetchall()
        return [Entry.from_row(row) for row in rows]

    # -- read-only access by position for other packages (no SQL outside engine.ledger) --

    @classmethod
    def open_read_only(cls, data_dir: Path) -> Ledger:
        """A reader on an existing ledger (another process may be writing it)."""
        path = Path(data_dir) / LEDGER_FILE_NAME
        if not path.exists():
            raise NotFound(f"no ledger at {path}")
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                     timeout=LOCK_WAIT_S_MAX, check_same_thread=False)
        return cls(connection, path)

    def entry_rows(self, columns: Sequence[str] = ENTRY_COLUMNS, *, after_seq: int = 0,
                   limit: int = READ_ENTRIES_MAX,
                   kinds: Iterable[str] | None = None) -> list[tuple[Any, ...]]:
        """Entry rows with seq > after_seq in seq order (chosen columns; bounded page)."""
        return self._rows("entries", ENTRY_COLUMNS, columns, after_seq, limit, "kind", kinds)

    def flag_rows(self, columns: Sequence[str] = _FLAG_STORED_COLUMNS, *, after_seq: int = 0,
                  limit: int = READ_ENTRIES_MAX) -> list[tuple[Any, ...]]:
        """Flag event rows with seq > after_seq in seq order (evidence as stored JSON text)."""
        return self._rows("flags", _FLAG_STORED_COLUMNS, columns, after_seq, limit, None, None)

    def iter_entry_rows(self, columns: Sequence[str] = ENTRY_COLUMNS, *,
                        kinds: Iterable[str] | None = None) -> Iterator[list[tuple[Any, ...]]]:
        """Every entry row in pages (columns must include "seq" first)."""
        assert columns[0] == "seq", "pages continue from the last seq"
        after = 0
        while rows := self.entry_rows(columns, after_seq=after, kinds=kinds):
            yield rows
            after = rows[-1][0]

    def iter_flag_rows(self, columns: Sequence[str] = _FLAG_STORED_COLUMNS,
                       ) -> Iterator[list[tuple[Any, ...]]]:
        assert columns[0] == "seq", "pages continue from the last seq"
        after = 0
        while rows := self.flag_rows(columns, after_seq=after):
            yield rows
            after = rows[-1][0]

    def _rows(self, table: str, known: Sequence[str], columns: Sequence[str], after_seq: int,
              limit: int, kind_column: str | None,
              kinds: Iterable[str] | None) -> list[tuple[Any, ...]]:
        unknown = [c for c in columns if c not in known]
        if unknown or not 0 < limit <= READ_ENTRIES_MAX:
            raise InvalidRequest(f"{table}: unknown columns {unknown} or page size {limit}")
        where = "seq > ?"
        args: list[Any] = [after_seq]
        if kinds is not None and kind_column is not None:
            wanted = sorted(set(kinds))
            where += f" AND {kind_column} IN ({','.join('?' * len(wanted))})"
            args += wanted
        with self._lock:
            return self._db.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE {where} "
                                    "ORDER BY seq LIMIT ?", (*args, limit)).fetchall()

    def all_flag_events(self) -> list[FlagEvent]:
        """Every flag event in append order (flags change state rarely: a small table)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_FLAG_FIELDS)} FROM flags ORDER BY seq").fetchall()
        return [_flag_event(row) for row in rows]

    def award_points_by_user(self, since_day: str | None = None,
                             until_day: str | None = None) -> dict[str, int]:
        """Award points per person over days since_day..until_day (ISO, inclusive; entries
        without a day always count): one aggregate query, no row object per entry (what-if
        compares a year of awards)."""
        with self._lock:
            return dict(self._db.execute(
                "SELECT l.user_id, sum(j.points) FROM journal j CROSS JOIN entry_links l"
                " ON l.seq = j.seq WHERE j.kind = 'award' AND (j.day IS NULL OR"
                " ((?1 IS NULL OR j.day >= ?1) AND (?2 IS NULL OR j.day <= ?2)))"
                " GROUP BY l.user_id", (since_day, until_day)).fetchall())

    def head_seq(self) -> int:
        """seq of the last entry (0 when empty); cheap, unlike head()."""
        with self._lock:
            return _head(self._db)[0]

    def head(self) -> dict[str, Any]:
        """Size, points outstanding, chain heads and the order-independent content digest.

        Reads every entry (in entry_id order, streamed: memory stays flat however
        long the ledger) for the digest: O(entries), about 13 µs an entry. chain_head and commit_hash
        differ between data directories (random person keys); content_digest
        does not (canonical.py).
        """
        with self._read() as db:
            seq, chain_head = _head(db)
            outstanding = db.execute("SELECT COALESCE(SUM(points), 0) FROM balances").fetchone()[0]
            erased = _erased_contents(db) if _linked_count(db) < seq else []
            flags_seq, flags_head = _flag_head(db)
            erasures = _chain_head(db, "erasures")[0]
            commit = db.execute("SELECT seq, hash, key_id FROM commits ORDER BY seq DESC "
                                "LIMIT 1").fetchone()
        commit_seq, commit_hash, key_id = commit or (0, GENESIS_HASH, None)
        return {"entries": seq, "points_outstanding": outstanding, "chain_head": chain_head,
                "content_digest": content_digest(itertools.chain(
                    _content_bytes(db.execute(_CONTENTS_SQL)), erased)),
                "canonical_version": SCHEMA_VERSION, "erased_entries": len(erased),
                "flag_events": flags_seq, "flags_head": flags_head, "erasures": erasures,
                "commit_seq": commit_seq, "commit_hash": commit_hash, "signed_by": key_id}

    def seq_digest(self, since: SeqDigest | None = None) -> SeqDigest:
        """The seq digest (canonical.py) through the newest entry, extending `since` (an
        earlier answer of this ledger) over the entries after it; from the first entry
        when there is none or an erasure happened since (it changed older contents)."""
        with self._read() as db:
            erasures = _chain_head(db, "erasures")[0]
            if since is None or since.erasures != erasures or since.seq > _head(db)[0]:
                since = SeqDigest(0, GENESIS_HASH, erasures)
            seq, digest = since.seq, since.digest
            cursor = db.execute(_SEQ_CONTENTS_SQL, (seq,))
            while rows := cursor.fetchmany(READ_ENTRIES_MAX):
                digest = seq_digest(digest, _content_bytes(row[1:] for row in rows))
                seq = rows[-1][0]
        return SeqDigest(seq, digest, erasures)

    def content(self) -> dict[str, Any]:
        """The part of head() every runtime and data directory agrees on for the same input."""
        head = self.head()
        return {key: head[key] for key in ("entries", "points_outstanding", "content_digest",
                                           "erased_entries", "flag_events", "erasures")}

    def signed_head(self, seal: bool = True) -> dict[str, Any]:
        """The newest commit as JSON for an external witness (canonical.py, "Signed heads").

        When the newest commit is unsigned and this ledger has a signing key
        (and `seal`), an empty signed commit is appended first. Raises
        LedgerError when there is no signed head to give.
        """
        if seal and self._signer is not None:
            with self._write() as db:
                row = db.execute("SELECT signature FROM commits ORDER BY seq DESC LIMIT 1"
                                 ).fetchone()
                if row is None or row[0] is None:
                    self._commit_locked(db, {})
        with self._read() as db:
            row = db.execute("SELECT seq, body, prev_hash, hash, key_id, signature FROM commits "
                             "ORDER BY seq DESC LIMIT 1").fetchone()
            meta = dict(db.execute("SELECT key, value FROM meta"))
        if row is None or row[5] is None:
            raise LedgerError(f"{self.path}: the newest commit is not signed; run the writers "
                              "(or this command) with --signing-key FILE or "
                              f"${SIGNING_KEY_ENV}")
        seq, body, prev_hash, digest, key_id, signature = row
        return {"canonical_version": SCHEMA_VERSION, "seq": seq, "hash": digest,
                "prev_hash": prev_hash, "body": body, "commit": orjson.loads(body),
                "meta": meta, "key_id": key_id, "signature": signature}

    # -- verification and repair ------------------------------------------------------

    def verify(self, progress: Callable[[int], object] | None = None,
               public_key: Verifier | None = None,
               witness: Mapping[str, Any] | None = None) -> VerifyResult:
        """Recompute every chain, link and balance; report the first bad seq or commit.

        With `public_key`, every signature must verify and the newest commit
        must be signed (a consistent rewrite by someone without the private
        key fails here even when plain verify passes). With `witness` (a
        signed_head() kept elsewhere), the chain must still contain that
        commit. `progress(n)` is called after each n entries checked.
        """
        witnessed: list[int] = []
        if witness is not None:
            witnessed = [check_witness(witness, public_key)]
        with self._read() as db:
            result = verify_ledger(db, progress, public_key, witnessed)
            hashes = commit_hashes(db) if witnessed else {}
        if result.ok and witness is not None:
            stored = hashes.get(witnessed[0])
            if stored != witness["hash"]:
                return replace(result, ok=False, first_bad_commit=witnessed[0], problem=(
                    f"the witnessed head (commit {witnessed[0]}, hash {witness['hash']:.16}…) "
                    "is not in this ledger" + ("" if stored is None else
                                               f": commit {witnessed[0]} now has hash "
                                               f"{stored:.16}…, the ledger was rewritten")))
        return result

    def rebuild(self) -> RebuildResult:
        """Recompute the balances table from the journal and say where live differed."""
        with self._write() as db:
            rebuilt = {user: (points, count) for user, points, count in db.execute(
                "SELECT user_id, SUM(points), COUNT(*) FROM entries GROUP BY user_id")}
            negative = [user for user, (points, _) in rebuilt.items() if points < 0]
            if negative:
                raise LedgerError(f"journal sums to a negative balance for user {negative[0]}; "
                                  "run `genki ledger verify`")
            live = {user: points for user, points in
                    db.execute("SELECT user_id, points FROM balances")}
            differences = tuple(
                BalanceDifference(user, live.get(user), rebuilt[user][0] if user in rebuilt
                                  else None)
                for user in sorted(set(live) | set(rebuilt))
                if live.get(user) != (rebuilt[user][0] if user in rebuilt else None))
            db.execute("DELETE FROM balances")
            db.executemany("INSERT INTO balances (user_id, points, entries) VALUES (?, ?, ?)",
                           [(user, points, count) for user, (points, count) in rebuilt.items()])
        return RebuildResult(len(rebuilt), sum(points for points, _ in rebuilt.values()),
                             differences)

    # -- erasure ----------------------------------------------------------------------

    def erase_user(self, user_id: str, reason: str, ts_ms: int | None = None) -> ErasureReceipt:
        """Crypto-shred a person's link to the ledger (idempotent, audited).

        In one transaction: deletes the person's key, the links of all their
        entries (entry id, user id, private ref), their flag events and their
        balance row, and appends an erasure record (subject, reason, time,
        counts; no user id) and a commit. Afterwards balance() is 0,
        history() and flag_history() are empty, entry(id) raises NotFound,
        `verify` still passes, settlement totals per shop are unchanged (the
        journal keeps kind, points, day, ts_ms and the shop ref) and the
        content digest counts the entries as erased. Remaining points are
        forfeited (points_forfeited). A user the ledger does not know (never
        seen, or already erased) gets a receipt with erased=False and nothing
        is written: nothing links them to the ledger any more.

        Erase the person's inputs first: entries appended later for the same
        user id get a new key and subject, as for a new person. Deleted pages
        are zeroed (secure_delete) and the WAL is truncated after the commit
        when no reader holds it; copies outside this file (backups, Kafka
        topics) are not reached from here.
        """
        commands.check_id("user_id", user_id)
        if not isinstance(reason, str) or not reason.strip():
            raise InvalidRequest("reason: an erasure needs a non-empty reason")
        reason = reason.strip()
        if len(reason) > REASON_CHARS_MAX:
            raise InvalidRequest(f"reason: at most {REASON_CHARS_MAX} characters, "
                                 f"got {len(reason)}")
        ts_ms = _now_ms() if ts_ms is None else commands.check_ts_ms(ts_ms)
        with self._write() as db:
            receipt = self._erase_locked(db, user_id, reason, ts_ms)
        if receipt.erased:
            self._keys.pop(user_id, None)
            crash_point("ledger_erase_before_checkpoint")
        self.checkpoint()  # also finishes an erasure interrupted before its checkpoint
        return receipt

    def _erase_locked(self, db: sqlite3.Connection, user_id: str, reason: str,
                      ts_ms: int) -> ErasureReceipt:
        row = db.execute("SELECT subject FROM person_keys WHERE user_id = ?",
                         (user_id,)).fetchone()
        if row is None:
            return ErasureReceipt(user_id, False, None, 0, 0, 0, reason, ts_ms, None, None)
        subject = row[0]
        balance = db.execute("SELECT points FROM balances WHERE user_id = ?",
                             (user_id,)).fetchone()
        db.execute("INSERT INTO erasing (user_id) VALUES (?)", (user_id,))
        entries = db.execute("DELETE FROM entry_links WHERE user_id = ?", (user_id,)).rowcount
        flags = db.execute("DELETE FROM flags WHERE user_id = ?", (user_id,)).rowcount
        db.execute("DELETE FROM erasing WHERE user_id = ?", (user_id,))
        db.execute("DELETE FROM balances WHERE user_id = ?", (user_id,))
        db.execute("DELETE FROM person_keys WHERE user_id = ?", (user_id,))
        seq, prev = _chain_head(db, "erasures")
        digest = chain_hash(prev, erasure_bytes(seq + 1, subject, reason, ts_ms, entries, flags))
        db.execute("INSERT INTO erasures (seq, subject, reason, ts_ms, entries, flags, "
                   "prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (seq + 1, subject, reason, ts_ms, entries, flags, prev, digest))
        self._commit_locked(db, {})
        return ErasureReceipt(user_id, True, subject, entries, flags,
                              0 if balance is None else balance[0], reason, ts_ms, seq + 1,
                              digest)

    def checkpoint(self) -> None:
        """Copy the WAL into the file and truncate it (best effort: readers may hold it)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def copy_wal(self) -> None:
        """Copy what is committed in the WAL into the file, without waiting for anyone
        (SQLite's PASSIVE checkpoint): a process whose appends run in another one
        (engine.ledger.writer) does it meanwhile, so that the last connection to close
        has little left to copy."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def erasures(self) -> list[dict[str, Any]]:
        """The erasure log (no user ids): seq, subject, reason, ts_ms, counts, hash."""
        with self._lock:
            rows = self._db.execute("SELECT seq, subject, reason, ts_ms, entries, flags, hash "
                                    "FROM erasures ORDER BY seq").fetchall()
        return [dict(zip(("seq", "subject", "reason", "ts_ms", "entries", "flags", "hash"), row,
                         strict=True)) for row in rows]


# -- helpers ---------------------------------------------------------------------------


def _chain_head(db: sqlite3.Connection, table: str) -> tuple[int, str]:
    row = db.execute(f"SELECT seq, hash FROM {table} ORDER BY seq DESC LIMIT 1").fetchone()
    return (0, GENESIS_HASH) if row is None else (row[0], row[1])


def _heads(db: sqlite3.Connection) -> tuple[object, ...]:
    return _head(db), _flag_head(db), _chain_head(db, "erasures")


def _savepoint(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("SAVEPOINT command")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK TO command")
        db.execute("RELEASE command")
        raise
    db.execute("RELEASE command")


def _head(db: sqlite3.Connection) -> tuple[int, str]:
    return _chain_head(db, "journal")


def _flag_head(db: sqlite3.Connection) -> tuple[int, str]:
    return _chain_head(db, "flag_journal")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _entry_locked(db: sqlite3.Connection, entry_id: str) -> Entry | None:
    row = db.execute(f"SELECT {_COLUMNS_SQL} FROM entries WHERE entry_id = ?",
                     (entry_id,)).fetchone()
    return None if row is None else Entry.from_row(row)


def _unique(contents: list[Content]) -> tuple[list[Content], int]:
    """First occurrence of each id, and how many repeats (which must be identical)."""
    first: dict[str, Content] = {}
    for content in contents:
        known = first.setdefault(content[0], content)
        if known is not content:
            _raise_if_different("entry", known, content)
    if len(first) == len(contents):
        return contents, 0
    return list(first.values()), len(contents) - len(first)


def _check_refunds(db: sqlite3.Connection, new: list[Content]) -> None:
    """Refund drafts must name an earlier redemption of the same user and shop, within bounds."""
    refunds = [content for content in new if content[2] == "refund"]
    if not refunds:
        return
    targets = {commands.ref_fields(content[7]).get("refund_of") for content in refunds}
    tracker = RefundTracker()
    for entry_id, user_id, points, ref in db.execute(
            "SELECT e.entry_id, e.user_id, e.points, e.ref FROM json_each(?) AS j "
            "JOIN entries AS e ON e.entry_id = j.value WHERE e.kind = 'redeem'",
            (orjson.dumps(sorted(t for t in targets if isinstance(t, str))).decode(),)):
        tracker.redeemed(entry_id, user_id, ref, points)
        tracker.refunded_before(entry_id, _refunded(db, entry_id))
    for entry_id, user_id, kind, points, _, _, _, ref, _ in new:
        if kind == "redeem":
            tracker.redeemed(entry_id, user_id, ref, points)
        elif kind == "refund":
            refused = tracker.refund(entry_id, user_id, ref, points)
            if refused:
                raise (RefundExceeds if refused[0] == "exceeds" else InvalidEntry)(refused[1])


def _check_day_redeemed(db: sqlite3.Connection, user_id: str, day: str | None, points: int,
                        points_per_day_max: int) -> None:
    _check_day_limit(user_id, day, _day_redeemed(db, user_id, day), points, points_per_day_max)


def _day_redeemed(db: sqlite3.Connection, user_id: str, day: str | None) -> int:
    return -int(db.execute(
        "SELECT COALESCE(SUM(points), 0) FROM entries WHERE user_id = ? AND kind = 'redeem' "
        "AND day = ?", (user_id, day)).fetchone()[0])


def _check_day_limit(user_id: str, day: str | None, redeemed: int, points: int,
                     points_per_day_max: int) -> None:
    if redeemed + points > points_per_day_max:
        raise DailyRedeemLimit(user_id, str(day), redeemed, points, points_per_day_max)


def _entries_locked(db: sqlite3.Connection, entry_ids: list[str]) -> dict[str, Entry]:
    """The stored entries among `entry_ids` (at most ID_LOOKUP_CHUNK_IDS), by id."""
    assert len(entry_ids) <= ID_LOOKUP_CHUNK_IDS
    return {row[1]: Entry.from_row(row) for row in db.execute(
        f"SELECT {', '.join('e.' + c for c in ENTRY_COLUMNS)} FROM json_each(?) AS j "
        "JOIN entries AS e ON e.entry_id = j.value", (orjson.dumps(entry_ids).decode(),))}


def _raise_if_redeem_differs(stored: Entry, request: commands.RedeemRequest) -> None:
    """A redemption's retry (same key) must be the same request; see Ledger.redeem."""
    sent = {"user_id": request.user_id, "points": request.points,
            "terminal_id": request.terminal_id, "request": request.request}
    fields = commands.ref_fields(stored.ref)
    known = {"user_id": stored.user_id, "points": -stored.points,
             "terminal_id": fields.get("terminal"), "request": fields.get("request")}
    _raise_if_request_differs("idempotency key", request.idempotency_key, known, sent)


def _refunded(db: sqlite3.Connection, redemption_id: str) -> int:
    return int(db.execute(
        "SELECT COALESCE(SUM(points), 0) FROM journal WHERE kind = 'refund' "
        "AND json_extract(ref, '$.refund_of') = ?", (redemption_id,)).fetchone()[0])


def _raise_if_different(what: str, stored: Sequence[object], sent: Sequence[object],
                        names: Sequence[str] = CONTENT_FIELDS) -> None:
    for position, (known, value) in enumerate(zip(stored, sent, strict=True)):
        if known != value:
            raise EntryExistsWithDifferent(what, str(sent[0]), names[position], known, value)


def _raise_if_request_differs(what: str, key: str, known: dict[str, Any],
                              sent: dict[str, Any]) -> None:
    for name, value in sent.items():
        if known.get(name) != value:
            raise EntryExistsWithDifferent(what, key, name, known.get(name), value)


def _apply_balances(db: sqlite3.Connection, rows: list[tuple]) -> None:
    """Add the new rows to the balances projection (absolute values, checked >= 0)."""
    deltas: dict[str, int] = {}
    counts: dict[str, int] = {}
    for row in rows:
        user_id = row[2]
        deltas[user_id] = deltas.get(user_id, 0) + row[4]
        counts[user_id] = counts.get(user_id, 0) + 1
    _apply_deltas(db, deltas, counts)


def _apply_deltas(db: sqlite3.Connection, deltas: dict[str, int],
                  counts: dict[str, int]) -> None:
    """Add points and entry counts per user to the balances projection, one statement per
    user: credits upsert, debits update the row their balance check read. The table's
    CHECK (points >= 0) refuses a balance the debit checks let slip."""
    credits = [(user, delta, counts[user]) for user, delta in deltas.items() if delta >= 0]
    debits = [(delta, counts[user], user) for user, delta in deltas.items() if delta < 0]
    db.executemany(
        "INSERT INTO balances (user_id, points, entries) VALUES (?, ?, ?) "
        "ON CONFLICT (user_id) DO UPDATE SET points = points + excluded.points, "
        "entries = entries + excluded.entries", credits)
    if debits:
        updated = db.executemany("UPDATE balances SET points = points + ?, "
                                 "entries = entries + ? WHERE user_id = ?", debits).rowcount
        assert updated == len(debits), "a debit of a user without a balance passed the checks"


def _check_count(drafts: int) -> None:
    if drafts > DRAFTS_PER_APPEND_MAX:
        raise InvalidEntry(f"{drafts} drafts in one append; at most {DRAFTS_PER_APPEND_MAX}")


def _meta_items(meta: Mapping[str, str] | None) -> list[tuple[str, str]]:
    if not meta:
        return []
    if len(meta) > META_PER_APPEND_MAX:
        raise InvalidEntry(f"{len(meta)} meta keys in one append; at most {META_PER_APPEND_MAX}")
    items = []
    for key, value in meta.items():
        if not isinstance(key, str) or not 0 < len(key) <= META_KEY_CHARS_MAX:
            raise InvalidEntry(f"meta key {key!r:.80} must be 1-{META_KEY_CHARS_MAX} characters")
        if not isinstance(value, str) or len(value) > META_VALUE_CHARS_MAX:
            raise InvalidEntry(f"meta {key}: value must be text of at most "
                               f"{META_VALUE_CHARS_MAX} characters")
        items.append((key, value))
    return items


def _flag_row(flag: FlagEvent) -> tuple:
    if not isinstance(flag, FlagEvent):
        raise InvalidEntry(f"flags must be FlagEvent records, got {type(flag).__name__}")
    evidence = orjson.dumps(flag.evidence, option=orjson.OPT_SORT_KEYS).decode()
    return (flag.flag_id, flag.user_id, flag.flag.value, flag.state.value, flag.day, evidence,
            flag.rules_version)


def _flag_event(row: Sequence[Any]) -> FlagEvent:
    flag_id, user_id, flag, state, day, evidence, rules_version = row
    return FlagEvent(v=1, flag_id=flag_id, user_id=user_id, flag=flag, state=state, day=day,
                     evidence=orjson.loads(evidence), rules_version=rules_version)


def _content_bytes(rows: Iterable[Sequence[Any]]) -> Iterator[bytes]:
    dumps, sort = orjson.dumps, orjson.OPT_SORT_KEYS
    for entry_id, user_id, kind, points, day, ts_ms, rule, ref, rules_version in rows:
        yield dumps({"day": day, "entry_id": entry_id, "kind": kind, "points": points,
                     "ref": ref, "rule": rule, "rules_version": rules_version, "ts_ms": ts_ms,
                     "user_id": user_id}, option=sort)


def _journals_of(db: sqlite3.Connection,
                 users: Sequence[str]) -> Iterator[tuple[str, list[JournalItem]]]:
    """Each of the users (that has entries) with their entries in seq order."""
    cursor = db.execute(
        "SELECT e.user_id, e.seq, e.entry_id, e.kind, e.points, e.day, e.ts_ms, e.ref "
        "FROM json_each(?) AS j JOIN entries AS e ON e.user_id = j.value "
        "ORDER BY e.user_id, e.seq", (orjson.dumps(list(users)).decode(),))
    user: str | None = None
    items: list[JournalItem] = []
    for user_id, *fields in cursor:
        if user_id != user:
            if user is not None:
                yield user, items
            user, items = user_id, []
        items.append(JournalItem(*fields))
    if user is not None:
        yield user, items


def _month_range_ms(month: str) -> tuple[int, int]:
    try:
        year, number = (int(part) for part in month.split("-"))
        start = dt.datetime(year, number, 1, tzinfo=TOKYO)
    except ValueError as error:
        raise InvalidRequest(f"month: expected YYYY-MM, got {month!r}") from error
    if len(month) != 7:
        raise InvalidRequest(f"month: expected YYYY-MM, got {month!r}")
    end = dt.datetime(year + number // 12, number % 12 + 1, 1, tzinfo=TOKYO)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


@contextmanager
def read_contents(path: Path) -> Iterator[tuple[Iterator[tuple], list[bytes]]]:
    """A ledger file's linked content rows (entry_id, user_id, kind, points, day, ts_ms,
    rule, ref, rules_version) in entry_id order, streamed, and its erased entries'
    content bytes, read only.

    For digests over several ledgers (engine.kafka.combined): the content
    digest is canonical.content_bytes of the rows sorted by entry_id, then the
    erased contents sorted bytewise (canonical.py). SQLite's BINARY order of
    the entry_id index is UTF-8 byte order, which is str order in Python.
    """
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        erased = _erased_contents(db) if _linked_count(db) < _head(db)[0] else []
        yield db.execute(_CONTENTS_SQL), erased
    finally:
        db.close()


# entry_id order from the unique index: streamed, no sort in memory. Reading in seq
# order and sorting in Python is about 3x faster but holds every entry at once
# (~5 KB each with orjson's buffers: gigabytes for a year).
_CONTENTS_SQL = ("SELECT entry_id, user_id, kind, points, day, ts_ms, rule, ref, rules_version "
                 "FROM entries ORDER BY entry_id")


_SEQ_CONTENTS_SQL = (  # every entry after a seq, erased ones with null ids and the public ref
    "SELECT j.seq, l.entry_id, l.user_id, j.kind, j.points, j.day, j.ts_ms, j.rule, "
    "COALESCE(j.ref, l.ref), j.rules_version FROM journal AS j "
    "LEFT JOIN entry_links AS l ON l.seq = j.seq WHERE j.seq > ? ORDER BY j.seq")


def _linked_count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COUNT(*) FROM entry_links").fetchone()[0])


def _erased_contents(db: sqlite3.Connection) -> list[bytes]:
    """Content bytes of entries whose link was erased, sorted (canonical.py); exact-size
    copies, since each of orjson's results holds a 4 KiB buffer."""
    return sorted(memoryview(content).tobytes() for content in _content_bytes(db.execute(
        "SELECT NULL, NULL, j.kind, j.points, j.day, j.ts_ms, j.rule, j.ref, j.rules_version "
        "FROM journal AS j WHERE NOT EXISTS (SELECT 1 FROM entry_links AS l "
        "WHERE l.seq = j.seq)")))
