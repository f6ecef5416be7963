"""The SQLite ledger: one file, WAL, synchronous=FULL, every write one transaction.

Writes take SQLite's write lock up front (BEGIN IMMEDIATE), so balance checks
and the entries they allow are atomic across threads and processes. Readers
never block writers (WAL). One Ledger object may be shared by threads (an
HTTP server's pool); calls are serialised on its lock.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import orjson

from engine.clock import TOKYO, iso_to_day
from engine.entries import EntryDraft
from engine.errors import LedgerError, NotFound, RefundExceeds
from engine.ledger import commands
from engine.ledger.canonical import GENESIS_HASH, content_digest
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
    ChainChecker,
    Content,
    RefundTracker,
    chain,
    normalise,
)
from engine.ledger.lots import EXPIRY_MONTHS_MAX, JournalItem, expiry_drafts, open_lots
from engine.ledger.model import (
    ENTRY_COLUMNS,
    AppendResult,
    BalanceDifference,
    Entry,
    RebuildResult,
    Settlement,
    VerifyResult,
)
from engine.ledger.schema import DDL, SCHEMA_VERSION, SHOP_KINDS_SQL
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
WAL_BYTES_MAX = 64 * 1024 * 1024
VERIFY_FETCH_ROWS = 10_000
CACHE_KIB = 65_536
_COLUMNS_SQL = ", ".join(ENTRY_COLUMNS)
_INSERT_SQL = f"INSERT INTO entries ({_COLUMNS_SQL}) VALUES ({', '.join('?' * 12)})"
_FLAG_FIELDS: tuple[str, ...] = (
    "flag_id", "user_id", "flag", "state", "day", "evidence", "rules_version",
)


class Ledger:
    """The points journal and its projections. Open with `Ledger.open(data_dir)`."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self._lock = threading.RLock()
        self.path = path

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    def open(cls, data_dir: Path) -> Ledger:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LEDGER_FILE_NAME
        try:
            connection = open_sqlite(path, busy_wait_s_max=LOCK_WAIT_S_MAX, cache_kib=CACHE_KIB)
        except sqlite3.DatabaseError as error:
            raise LedgerError(f"{path}: cannot open as a genki ledger: {error}") from error
        try:
            connection.execute("PRAGMA temp_store = MEMORY")
            connection.execute(f"PRAGMA journal_size_limit = {WAL_BYTES_MAX}")
            ledger = cls(connection, path)
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
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding SQLite's write lock from its first statement."""
        with self._lock:
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
        if len(drafts) > DRAFTS_PER_APPEND_MAX:
            raise InvalidEntry(f"{len(drafts)} drafts in one append; at most "
                               f"{DRAFTS_PER_APPEND_MAX}")
        if len(flags) > FLAGS_PER_APPEND_MAX:
            raise InvalidEntry(f"{len(flags)} flags in one append; at most {FLAGS_PER_APPEND_MAX}")
        meta_items = _meta_items(meta)
        contents = normalise(drafts)
        flag_rows = [_flag_row(flag) for flag in flags]
        with self._write() as db:
            result = self._append_locked(db, contents)
            flags_appended, flags_existing = self._append_flags_locked(db, flag_rows)
            if meta_items:
                db.executemany("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                               "DO UPDATE SET value = excluded.value", meta_items)
        return AppendResult(result.appended, result.existing, result.seq_first, result.seq_last,
                            result.chain_head, flags_appended, flags_existing,
                            result.rows, result.existing_rows)

    def _append_locked(self, db: sqlite3.Connection, contents: list[Content]) -> AppendResult:
        new, duplicates = _unique(contents)
        existing: list[tuple] = []
        seq_head, hash_head = _head(db)
        if seq_head and new:
            new, stored = self._split_stored(db, new)
            existing.extend(stored)
        if not new:
            return AppendResult(0, len(existing) + duplicates, None, None, hash_head,
                                existing_rows=existing)
        self._check_debits(db, new)
        _check_refunds(db, new)
        rows = chain(new, seq_head, hash_head)
        db.executemany(_INSERT_SQL, rows)
        _apply_balances(db, rows)
        seq_last, chain_head = rows[-1][0], rows[-1][11]
        db.execute("INSERT INTO chain (one, seq, hash) VALUES (1, ?, ?) ON CONFLICT (one) "
                   "DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                   (seq_last, chain_head))
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
        db.executemany(f"INSERT INTO flags ({', '.join(_FLAG_FIELDS)}) VALUES "
                       f"({', '.join('?' * len(_FLAG_FIELDS))})", list(fresh.values()))
        return len(fresh), existing

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
                sent = {"user_id": user_id, "points": points, "terminal_id": terminal_id,
                        "request": request}
                fields = commands.ref_fields(stored.ref)
                known = {"user_id": stored.user_id, "points": -stored.points,
                         "terminal_id": fields.get("terminal"), "request": fields.get("request")}
                _raise_if_request_differs("idempotency key", idempotency_key, known, sent)
                return stored
            if points_per_day_max is not None:
                _check_day_redeemed(db, user_id, draft.day, points, points_per_day_max)
            return self._append_locked(db, normalise([draft])).entries[0]

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
            return self._append_locked(db, normalise([draft])).entries[0]

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
            return self._append_locked(db, normalise([draft])).entries[0]

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
            if progress is not None:
                progress(len(chunk))
        return expired

    # -- queries -------------------------------------------------------------------

    def balance(self, user_id: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT points FROM balances WHERE user_id = ?",
                                   (user_id,)).fetchone()
        return 0 if row is None else int(row[0])

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
                "SELECT kind, COUNT(*), COALESCE(SUM(points), 0) FROM entries "
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

    def all_flag_events(self) -> list[FlagEvent]:
        """Every flag event in append order (flags change state rarely: a small table)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_FLAG_FIELDS)} FROM flags ORDER BY seq").fetchall()
        return [_flag_event(row) for row in rows]

    def head_seq(self) -> int:
        """seq of the last entry (0 when empty); cheap, unlike head()."""
        with self._lock:
            return _head(self._db)[0]

    def head(self) -> dict[str, Any]:
        """Size, points outstanding, chain head and the order-independent content digest.

        Reads every entry (in entry_id order) for the digest: O(entries), about
        a second per few hundred thousand entries.
        """
        with self._read() as db:
            seq, chain_head = _head(db)
            outstanding = db.execute("SELECT COALESCE(SUM(points), 0) FROM balances").fetchone()[0]
            cursor = db.execute("SELECT entry_id, user_id, kind, points, day, ts_ms, rule, ref, "
                                "rules_version FROM entries ORDER BY entry_id")
            digest = content_digest(_content_bytes(cursor))
        return {"entries": seq, "points_outstanding": outstanding, "chain_head": chain_head,
                "content_digest": digest}

    # -- verification and repair ------------------------------------------------------

    def verify(self, progress: Callable[[int], object] | None = None) -> VerifyResult:
        """Recompute the hash chain and every balance; report the first bad seq.

        `progress(n)` is called after each n entries checked (for a progress bar).
        """
        checker = ChainChecker()
        with self._read() as db:
            cursor = db.execute(f"SELECT {_COLUMNS_SQL} FROM entries ORDER BY seq")
            problem = None
            while problem is None:
                rows = cursor.fetchmany(VERIFY_FETCH_ROWS)
                if not rows:
                    break
                problem = checker.feed(rows)
                if progress is not None:
                    progress(len(rows))
            cursor.close()
            if problem is not None:
                return VerifyResult(False, checker.seq, len(checker.balances), checker.prev,
                                    problem.seq, problem.problem)
            tail = db.execute("SELECT seq, hash FROM chain WHERE one = 1").fetchone()
            live = {user: (points, count) for user, points, count in
                    db.execute("SELECT user_id, points, entries FROM balances")}
        result = VerifyResult(True, checker.seq, len(checker.balances), checker.prev)
        recorded = (0, GENESIS_HASH) if tail is None else (tail[0], tail[1])
        if recorded != (checker.seq, checker.prev):
            return VerifyResult(False, checker.seq, len(checker.balances), checker.prev,
                                min(checker.seq, recorded[0]) + 1,
                                f"journal ends at seq {checker.seq} but the recorded chain head "
                                f"is seq {recorded[0]}: entries were removed or added outside "
                                "the ledger")
        problems = _balance_problems(live, checker.balances, checker.counts)
        if problems:
            return VerifyResult(False, result.entries_checked, result.users_checked,
                                result.chain_head, None, problems[0], tuple(problems))
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


# -- helpers ---------------------------------------------------------------------------


def _head(db: sqlite3.Connection) -> tuple[int, str]:
    row = db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
    return (0, GENESIS_HASH) if row is None else (row[0], row[1])


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
    redeemed = -int(db.execute(
        "SELECT COALESCE(SUM(points), 0) FROM entries WHERE user_id = ? AND kind = 'redeem' "
        "AND day = ?", (user_id, day)).fetchone()[0])
    if redeemed + points > points_per_day_max:
        raise DailyRedeemLimit(user_id, str(day), redeemed, points, points_per_day_max)


def _refunded(db: sqlite3.Connection, redemption_id: str) -> int:
    return int(db.execute(
        "SELECT COALESCE(SUM(points), 0) FROM entries WHERE kind = 'refund' "
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
    current = {user: (points, entries) for user, points, entries in db.execute(
        "SELECT b.user_id, b.points, b.entries FROM json_each(?) AS j "
        "JOIN balances AS b ON b.user_id = j.value", (orjson.dumps(list(deltas)).decode(),))}
    updates = []
    for user_id, delta in deltas.items():
        points, entries = current.get(user_id, (0, 0))
        assert points + delta >= 0, f"balance of {user_id} would go negative past the checks"
        updates.append((user_id, points + delta, entries + counts[user_id]))
    db.executemany(
        "INSERT INTO balances (user_id, points, entries) VALUES (?, ?, ?) "
        "ON CONFLICT (user_id) DO UPDATE SET points = excluded.points, "
        "entries = excluded.entries", updates)


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


def _balance_problems(live: dict[str, tuple[int, int]], balances: dict[str, int],
                      counts: dict[str, int]) -> list[str]:
    problems = []
    for user in sorted(set(live) | set(balances)):
        expected = (balances.get(user, 0), counts.get(user, 0))
        if live.get(user, (0, 0)) != expected:
            problems.append(f"balance of user {user}: table says {live.get(user)}, journal "
                            f"says {expected} (points, entries); run `genki ledger rebuild`")
    return problems
