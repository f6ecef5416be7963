"""`<data_dir>/api.sqlite`: API keys (hashes only), request claims, stored responses.

* api_keys: one row per key; only the SHA-256 of the key text is kept, so a
  leaked database does not leak keys. A key is shown once, at creation.
* key_claims: which request an Idempotency-Key of a shop (scope) is bound to,
  by a fingerprint of its body: `pending` while it is being carried out (a
  duplicate meanwhile is 409 in_progress, while its owner process lives and
  at most until `lease_until_ms`), `done` with its response once its outcome
  is known (Kafka mode; the embedded ledger answers retries itself). The ledger entry id is derived from
  the same (shop, key) and the entry holds the fingerprint, so the ledger
  decides for good; this table gives the early, cheap answers.
* token_uses: which (shop, Idempotency-Key) a redeem token's nonce paid for
  (single use), with the entry id the redemption has or will have.
* responses: the status and body of staff adjustments, by (scope,
  Idempotency-Key), with a hash of the request body.

All are kept RESPONSES_KEPT_DAYS (limits.py), then pruned. Claims are taken
in one BEGIN IMMEDIATE transaction, so several server processes may share the
file. The server's connection commits without fsync (synchronous=NORMAL: it
survives a killed process); the embedded server's group commit then makes a
batch's claims durable (`sync`, one fdatasync of the WAL) while it builds the
ledger transaction, and waits for it before the ledger commits, so a power cut
cannot keep a redemption and forget the token use it claimed (a token then
used again with another key); in Kafka mode each command's claims are synced
the same way before it is published. Keys are managed with full fsync.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, Self

import orjson

from engine.api.limits import COMMANDS_PER_BATCH_MAX, KEY_LABEL_CHARS_MAX, WRITE_WAIT_S_MAX
from engine.errors import NotFound, UsageError
from engine.schemas import ID_CHARS_MAX, is_id
from engine.storage import open_sqlite, private_dir

API_DB_FILE_NAME = "api.sqlite"
KEY_PREFIX = "gk"
KEY_ID_BYTES = 6
KEY_SECRET_BYTES = 32
CLAIMS_PER_CALL_MAX = COMMANDS_PER_BATCH_MAX

_DDL = (
    """
    CREATE TABLE IF NOT EXISTS api_keys (
        key_id TEXT PRIMARY KEY,
        key_hash TEXT NOT NULL UNIQUE,
        role TEXT NOT NULL CHECK (role IN ('app', 'gateway', 'shop', 'staff')),
        shop_id TEXT,
        label TEXT,
        created_ms INTEGER NOT NULL,
        revoked_ms INTEGER,
        CHECK ((role = 'shop') = (shop_id IS NOT NULL))
    ) STRICT
    """,
    """
    CREATE TABLE IF NOT EXISTS responses (
        scope TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        status INTEGER NOT NULL,
        body BLOB NOT NULL,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (scope, idempotency_key)
    ) STRICT
    """,
    "DROP TABLE IF EXISTS token_claims",  # before 0.2: replaced by key_claims + token_uses
    """
    CREATE TABLE IF NOT EXISTS key_claims (
        scope TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'done')),
        owner TEXT NOT NULL,
        lease_until_ms INTEGER NOT NULL,
        response BLOB,
        created_ms INTEGER NOT NULL,
        PRIMARY KEY (scope, idempotency_key)
    ) STRICT
    """,
    """
    CREATE TABLE IF NOT EXISTS token_uses (
        nonce TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        shop_id TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        entry_id TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    ) STRICT
    """,
    "CREATE INDEX IF NOT EXISTS token_uses_by_entry ON token_uses (entry_id)",
)


class Role(StrEnum):
    app = "app"
    gateway = "gateway"
    shop = "shop"
    staff = "staff"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: str
    role: Role
    shop_id: str | None
    label: str | None
    created_ms: int
    revoked_ms: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "role": self.role.value, "shop_id": self.shop_id,
                "label": self.label, "created_ms": self.created_ms,
                "revoked_ms": self.revoked_ms}


@dataclass(frozen=True, slots=True)
class StoredResponse:
    request_hash: str
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Claim:
    """What a request claims before it is carried out: its key (and its token)."""

    scope: str
    idempotency_key: str
    fingerprint: str
    owner: str  # "<pid>:<random>" of the server process carrying it out
    now_ms: int
    lease_until_ms: int
    nonce: str | None = None  # redemptions: the token's single use
    user_id: str | None = None
    shop_id: str | None = None
    entry_id: str | None = None


class ClaimRefused(Exception):
    """Why a claim was not taken: `in_progress`, `idempotency_conflict` or `token_used`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def key_hash(key_text: str) -> str:
    return hashlib.sha256(key_text.encode("utf-8")).hexdigest()


def _key_of_row(row: tuple) -> KeyRecord:
    return KeyRecord(row[0], Role(row[1]), row[2], row[3], row[4], row[5])


_KEY_COLUMNS = "key_id, role, shop_id, label, created_ms, revoked_ms"


class ApiStore:
    """One connection to api.sqlite; calls are serialised on its lock."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self._lock = threading.RLock()
        self._batching = False
        self.path = path

    @classmethod
    def open(cls, data_dir: Path, *, durable: bool = True) -> ApiStore:
        private_dir(data_dir)
        path = data_dir / API_DB_FILE_NAME
        db = open_sqlite(path, busy_wait_s_max=WRITE_WAIT_S_MAX, durable=durable)
        try:
            # Statement journals in memory: a claim's savepoint opened a temporary file.
            db.execute("PRAGMA temp_store = MEMORY")
            store = cls(db, path)
            with store._write() as tx:
                for statement in _DDL:
                    tx.execute(statement)
        except BaseException:
            db.close()
            raise
        return store

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Several writes (claims, releases) in one transaction, each atomic on its own
        (a savepoint: one that raises took nothing); committed together at the end."""
        with self._write():
            self._batching = True
            try:
                yield
            finally:
                self._batching = False

    @contextmanager
    def _write(self, *, savepoint: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; inside `batch`, a savepoint of the batch's (none for a write
        that checks everything before its first change)."""
        with self._lock:
            if self._batching and not savepoint:
                yield self._db
                return
            if self._batching:
                self._db.execute("SAVEPOINT request")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK TO request")
                    self._db.execute("RELEASE request")
                    raise
                self._db.execute("RELEASE request")
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    # -- keys ----------------------------------------------------------------------

    def create_key(self, role: Role | str, shop_id: str | None, label: str | None,
                   now_ms: int) -> tuple[str, KeyRecord]:
        """A new key; its text is returned here once and never stored."""
        role = _role_of(role)
        if (role == Role.shop) != (shop_id is not None):
            raise UsageError("--shop is required for role shop and only for role shop")
        if shop_id is not None and not is_id(shop_id):
            raise UsageError(f"shop id {shop_id!r}: 1-{ID_CHARS_MAX} characters of "
                             "A-Z a-z 0-9 _ . : -")
        if label is not None and len(label) > KEY_LABEL_CHARS_MAX:
            raise UsageError(f"label: at most {KEY_LABEL_CHARS_MAX} characters")
        key_id = "k" + secrets.token_hex(KEY_ID_BYTES)
        key_text = f"{KEY_PREFIX}.{key_id}.{secrets.token_urlsafe(KEY_SECRET_BYTES)}"
        record = KeyRecord(key_id, role, shop_id, label, now_ms, None)
        with self._write() as db:
            db.execute(f"INSERT INTO api_keys ({_KEY_COLUMNS}, key_hash) VALUES (?,?,?,?,?,?,?)",
                       (key_id, role.value, shop_id, label, now_ms, None, key_hash(key_text)))
        return key_text, record

    def revoke_key(self, key_id: str, now_ms: int) -> KeyRecord:
        with self._write() as db:
            db.execute("UPDATE api_keys SET revoked_ms = ? WHERE key_id = ? "
                       "AND revoked_ms IS NULL", (now_ms, key_id))
            row = db.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = ?",
                             (key_id,)).fetchone()
        if row is None:
            raise NotFound(f"no API key {key_id!r}; `genki keys list` shows the key ids")
        return _key_of_row(row)

    def list_keys(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_ms, key_id").fetchall()
        return [_key_of_row(row) for row in rows]

    def key_by_hash(self, hashed: str) -> KeyRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = ?",
                                   (hashed,)).fetchone()
        return None if row is None else _key_of_row(row)

    def sync(self) -> None:
        """Make what this connection committed so far durable: one fdatasync of the WAL
        (synchronous=NORMAL commits do not; SQLite syncs before and after a checkpoint,
        so frames checkpointed already are durable, and a WAL that is gone held none)."""
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def revoked_key_ids(self, key_ids: set[str]) -> set[str]:
        """The revoked keys among `key_ids` (one lookup; inside `batch`, as of its start)."""
        with self._lock:
            return {row[0] for row in self._db.execute(
                "SELECT k.key_id FROM json_each(?) AS j JOIN api_keys AS k "
                "ON k.key_id = j.value WHERE k.revoked_ms IS NOT NULL",
                (orjson.dumps(sorted(key_ids)).decode(),))}

    # -- stored responses ------------------------------------------------------------

    def stored_response(self, scope: str, idempotency_key: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute(
                "SELECT request_hash, status, body FROM responses WHERE scope = ? "
                "AND idempotency_key = ?", (scope, idempotency_key)).fetchone()
        return None if row is None else StoredResponse(row[0], row[1], bytes(row[2]))

    def store_response(self, scope: str, idempotency_key: str, stored: StoredResponse,
                       now_ms: int) -> StoredResponse:
        """Keep a response (first writer wins); returns the one kept."""
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                       (scope, idempotency_key, stored.request_hash, stored.status,
                        stored.body, now_ms))
            row = db.execute("SELECT request_hash, status, body FROM responses WHERE scope = ? "
                             "AND idempotency_key = ?", (scope, idempotency_key)).fetchone()
        return StoredResponse(row[0], row[1], bytes(row[2]))

    # -- claims ------------------------------------------------------------------

    def claim(self, claim: Claim, live: Callable[[str], bool], *,
              take_over_other_body: bool = True) -> bytes | None:
        """Bind the key to this request and the token to this key, atomically.

        Returns the stored response body when this very request is already done
        (Kafka mode keeps it); raises ClaimRefused (nothing taken) when another
        request holds the key or the token. A pending claim whose owner is not
        `live` (its process died) or whose lease ran out is taken over: the
        ledger's (shop, key) entry id still decides between the two. Where that
        ledger is not one (Kafka mode: one per partition, so per person), a claim
        for another body is never taken over (`take_over_other_body=False`): it
        stays in progress until its own retry learns its outcome.
        """
        with self._write(savepoint=False) as db:  # checks first: a refusal wrote nothing
            row = db.execute("SELECT fingerprint, state, owner, lease_until_ms, response FROM "
                             "key_claims WHERE scope = ? AND idempotency_key = ?",
                             (claim.scope, claim.idempotency_key)).fetchone()
            if row is not None:
                done = _done_or_refused(claim, row, live, take_over_other_body)
                if done is not None:
                    return done.response
            if claim.nonce is not None:
                holder = db.execute("SELECT shop_id, idempotency_key FROM token_uses WHERE "
                                    "nonce = ?", (claim.nonce,)).fetchone()
                if holder is not None and tuple(holder) != (claim.shop_id,
                                                            claim.idempotency_key):
                    raise ClaimRefused("token_used")
                if holder is None:
                    db.execute(_INSERT_TOKEN_USE_SQL, _token_row(claim))
            db.execute(_UPSERT_KEY_CLAIM_SQL, _key_claim_row(claim))
        return None

    def claim_many(self, claims: list[Claim], live: Callable[[Claim, str], bool], *,
                   take_over_other_body: bool = True) -> list[bytes | None | ClaimRefused]:
        """`claim` for each, in order, as one write: what each call would return or raise
        (a refusal in its place). One read of the keys and one of the tokens for all,
        one insert of each kind (a test holds the outcomes and rows equal to `claim`
        one by one). `live` is `claim`'s, given the claim it is asked about; the owner
        of a key claimed earlier in the same call is live (it is carrying it out)."""
        assert len(claims) <= CLAIMS_PER_CALL_MAX
        with self._write() as db:
            pairs = orjson.dumps([[c.scope, c.idempotency_key] for c in claims]).decode()
            keys: dict[tuple[str, str], tuple] = {
                (row[0], row[1]): row[2:] for row in db.execute(
                    "SELECT k.scope, k.idempotency_key, k.fingerprint, k.state, k.owner, "
                    "k.lease_until_ms, k.response FROM json_each(?) AS j JOIN key_claims AS k "
                    "ON k.scope = json_extract(j.value, '$[0]') "
                    "AND k.idempotency_key = json_extract(j.value, '$[1]')", (pairs,))}
            nonces = orjson.dumps([c.nonce for c in claims if c.nonce is not None]).decode()
            holders: dict[str, tuple[str, str]] = {
                row[0]: (row[1], row[2]) for row in db.execute(
                    "SELECT t.nonce, t.shop_id, t.idempotency_key FROM json_each(?) AS j "
                    "JOIN token_uses AS t ON t.nonce = j.value", (nonces,))}
            taken: set[tuple[str, str]] = set()
            token_rows: list[tuple] = []
            outcomes: list[bytes | None | ClaimRefused] = []
            for claim in claims:
                key = (claim.scope, claim.idempotency_key)
                try:
                    row = keys.get(key)
                    if row is not None:
                        done = _done_or_refused(
                            claim, row, _live_owner if key in taken else partial(live, claim),
                            take_over_other_body)
                        if done is not None:
                            outcomes.append(done.response)
                            continue
                    if claim.nonce is not None:
                        holder = holders.get(claim.nonce)
                        if holder is not None and holder != (claim.shop_id,
                                                              claim.idempotency_key):
                            raise ClaimRefused("token_used")
                        if holder is None:
                            holders[claim.nonce] = (str(claim.shop_id), claim.idempotency_key)
                            token_rows.append(_token_row(claim))
                except ClaimRefused as refused:
                    outcomes.append(refused)
                    continue
                taken.add(key)
                keys[key] = (claim.fingerprint, "pending", claim.owner, claim.lease_until_ms,
                             None)
                outcomes.append(None)
            db.executemany(_INSERT_TOKEN_USE_SQL, token_rows)
            db.executemany(_UPSERT_KEY_CLAIM_SQL, [
                _key_claim_row(claim) for claim, outcome in zip(claims, outcomes, strict=True)
                if outcome is None])
        return outcomes

    def release(self, claim: Claim) -> None:
        """Free what a request claimed when it wrote nothing: the key and the token."""
        with self._write() as db:
            db.execute("DELETE FROM key_claims WHERE scope = ? AND idempotency_key = ? "
                       "AND fingerprint = ? AND state = 'pending'",
                       (claim.scope, claim.idempotency_key, claim.fingerprint))
            if claim.nonce is not None:
                db.execute("DELETE FROM token_uses WHERE nonce = ? AND shop_id = ? "
                           "AND idempotency_key = ?",
                           (claim.nonce, claim.shop_id, claim.idempotency_key))

    def finish(self, claim: Claim, response: bytes) -> None:
        """The request's entry is in the ledger: the key stays bound to it, with its answer."""
        with self._write() as db:
            db.execute("UPDATE key_claims SET state = 'done', response = ? WHERE scope = ? AND "
                       "idempotency_key = ? AND fingerprint = ?",
                       (response, claim.scope, claim.idempotency_key, claim.fingerprint))

    def redemption_user(self, entry_id: str, shop_id: str) -> str | None:
        """The user of a redemption this API made for this shop (Kafka mode routes its
        refunds by it)."""
        with self._lock:
            row = self._db.execute("SELECT user_id FROM token_uses WHERE entry_id = ? "
                                   "AND shop_id = ?", (entry_id, shop_id)).fetchone()
        return None if row is None else str(row[0])

    def prune(self, before_ms: int) -> int:
        """Forget responses and claims older than `before_ms`; returns the rows removed.

        Safe for money: the ledger binds a redemption to its (shop, key) and
        holds the request's fingerprint, and a token is long expired by then.
        """
        with self._write() as db:
            removed = 0
            for table in ("responses", "key_claims", "token_uses"):
                removed += db.execute(f"DELETE FROM {table} WHERE created_ms < ?",
                                      (before_ms,)).rowcount
        return int(removed)


@dataclass(frozen=True, slots=True)
class _Done:
    response: bytes | None


def _done_or_refused(claim: Claim, row: tuple, live: Callable[[str], bool],
                     take_over_other_body: bool) -> _Done | None:
    """The claim's key is held (`row` of key_claims): its stored answer when done with
    this body, None when the claim may take it over; else raises ClaimRefused."""
    fingerprint, state, owner, lease_until_ms, response = row
    if state == "done":
        if fingerprint != claim.fingerprint:
            raise ClaimRefused("idempotency_conflict")
        return _Done(None if response is None else bytes(response))
    if lease_until_ms > claim.now_ms and live(owner):
        raise ClaimRefused("in_progress")
    if fingerprint != claim.fingerprint and not take_over_other_body:
        raise ClaimRefused("in_progress")
    return None


def _live_owner(owner: str) -> bool:
    return True


_INSERT_TOKEN_USE_SQL = "INSERT INTO token_uses VALUES (?, ?, ?, ?, ?, ?)"
_UPSERT_KEY_CLAIM_SQL = (
    "INSERT INTO key_claims VALUES (?, ?, ?, 'pending', ?, ?, NULL, ?) "
    "ON CONFLICT (scope, idempotency_key) DO UPDATE SET fingerprint = excluded.fingerprint, "
    "owner = excluded.owner, lease_until_ms = excluded.lease_until_ms")


def _token_row(claim: Claim) -> tuple:
    return (claim.nonce, claim.user_id, claim.shop_id, claim.idempotency_key, claim.entry_id,
            claim.now_ms)


def _key_claim_row(claim: Claim) -> tuple:
    return (claim.scope, claim.idempotency_key, claim.fingerprint, claim.owner,
            claim.lease_until_ms, claim.now_ms)


def _role_of(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise UsageError(f"role {role!r}: one of {', '.join(r.value for r in Role)}") from None
