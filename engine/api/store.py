"""`<data_dir>/api.sqlite`: API keys (hashes only), stored responses, redeem-token claims.

* api_keys: one row per key; only the SHA-256 of the key text is kept, so a
  leaked database does not leak keys. A key is shown once, at creation.
* responses: the status and body of every successful idempotent request, by
  (scope, Idempotency-Key), with a hash of the request body, so a retry gets
  the same answer even after a restart and a changed body is refused.
* token_claims: which (shop, Idempotency-Key) a redeem token's nonce belongs
  to: `pending` while its redemption is being written, `done` after.

Both are kept RESPONSES_KEPT_DAYS (limits.py), then pruned.

WAL and synchronous=FULL like the ledger; every write is one BEGIN IMMEDIATE
transaction, so several server processes may share the file.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

from engine.api.limits import KEY_LABEL_CHARS_MAX, WRITE_WAIT_S_MAX
from engine.errors import NotFound, UsageError
from engine.schemas import ID_CHARS_MAX, is_id
from engine.storage import open_sqlite

API_DB_FILE_NAME = "api.sqlite"
KEY_PREFIX = "gk"
KEY_ID_BYTES = 6
KEY_SECRET_BYTES = 32

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
    """
    CREATE TABLE IF NOT EXISTS token_claims (
        nonce TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        shop_id TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('pending', 'done')),
        entry_id TEXT,
        created_ms INTEGER NOT NULL
    ) STRICT
    """,
    "CREATE INDEX IF NOT EXISTS token_claims_by_entry ON token_claims (entry_id)",
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
class TokenClaim:
    nonce: str
    user_id: str
    shop_id: str
    idempotency_key: str
    state: str
    entry_id: str | None


def key_hash(key_text: str) -> str:
    return hashlib.sha256(key_text.encode("utf-8")).hexdigest()


def _key_of_row(row: tuple) -> KeyRecord:
    return KeyRecord(row[0], Role(row[1]), row[2], row[3], row[4], row[5])


_KEY_COLUMNS = "key_id, role, shop_id, label, created_ms, revoked_ms"


class ApiStore:
    """One connection to api.sqlite; calls are serialised on its lock."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self._lock = threading.Lock()
        self.path = path

    @classmethod
    def open(cls, data_dir: Path) -> ApiStore:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / API_DB_FILE_NAME
        db = open_sqlite(path, busy_wait_s_max=WRITE_WAIT_S_MAX)
        try:
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
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
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

    # -- stored responses ------------------------------------------------------------

    def stored_response(self, scope: str, idempotency_key: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute(
                "SELECT request_hash, status, body FROM responses WHERE scope = ? "
                "AND idempotency_key = ?", (scope, idempotency_key)).fetchone()
        return None if row is None else StoredResponse(row[0], row[1], bytes(row[2]))

    def store_response(self, scope: str, idempotency_key: str, stored: StoredResponse,
                       now_ms: int, *, done_nonce: str | None = None,
                       entry_id: str | None = None) -> StoredResponse:
        """Keep a response (first writer wins) and close the token claim, atomically."""
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                       (scope, idempotency_key, stored.request_hash, stored.status,
                        stored.body, now_ms))
            if done_nonce is not None:
                db.execute("UPDATE token_claims SET state = 'done', entry_id = ? "
                           "WHERE nonce = ?", (entry_id, done_nonce))
            row = db.execute("SELECT request_hash, status, body FROM responses WHERE scope = ? "
                             "AND idempotency_key = ?", (scope, idempotency_key)).fetchone()
        return StoredResponse(row[0], row[1], bytes(row[2]))

    # -- redeem-token claims ---------------------------------------------------------

    def claim_token(self, nonce: str, user_id: str, shop_id: str, idempotency_key: str,
                    now_ms: int) -> TokenClaim:
        """Claim a token for (shop, key); returns the claim that holds it (maybe another's)."""
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO token_claims VALUES (?, ?, ?, ?, 'pending', NULL, ?)",
                       (nonce, user_id, shop_id, idempotency_key, now_ms))
            row = db.execute("SELECT nonce, user_id, shop_id, idempotency_key, state, entry_id "
                             "FROM token_claims WHERE nonce = ?", (nonce,)).fetchone()
        return TokenClaim(*row)

    def token_claim(self, nonce: str) -> TokenClaim | None:
        with self._lock:
            row = self._db.execute("SELECT nonce, user_id, shop_id, idempotency_key, state, "
                                   "entry_id FROM token_claims WHERE nonce = ?",
                                   (nonce,)).fetchone()
        return None if row is None else TokenClaim(*row)

    def redemption_user(self, entry_id: str) -> str | None:
        """The user of a redemption this API made (Kafka mode routes its refunds by it)."""
        with self._lock:
            row = self._db.execute("SELECT user_id FROM token_claims WHERE entry_id = ? "
                                   "AND state = 'done'", (entry_id,)).fetchone()
        return None if row is None else str(row[0])

    def prune(self, before_ms: int) -> int:
        """Forget responses and claims older than `before_ms`; returns the rows removed.

        Safe for money: a redemption is bound to its token's nonce in the
        ledger itself, and a token is long expired by then.
        """
        with self._write() as db:
            removed = db.execute("DELETE FROM responses WHERE created_ms < ?",
                                 (before_ms,)).rowcount
            removed += db.execute("DELETE FROM token_claims WHERE created_ms < ?",
                                  (before_ms,)).rowcount
        return int(removed)

    def release_claim(self, claim: TokenClaim) -> None:
        """Free a pending claim whose redemption wrote nothing, so the token can be used."""
        with self._write() as db:
            db.execute("DELETE FROM token_claims WHERE nonce = ? AND shop_id = ? "
                       "AND idempotency_key = ? AND state = 'pending'",
                       (claim.nonce, claim.shop_id, claim.idempotency_key))


def _role_of(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise UsageError(f"role {role!r}: one of {', '.join(r.value for r in Role)}") from None
