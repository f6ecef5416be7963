"""Device enrolment: which person wears which device, and which gateway key may write for it.

`<data_dir>/devices.sqlite` holds enrolment *events* (enroll / unenroll, each with its
time and who made it) and the current enrolments derived from them, plus the scope of
each gateway key: the vendors it writes for, and whether it is an enrolment key (may
write profiles and consent).

Enforcement (`policy_for`) applies to API keys only. It is on when the data directory
says so (`genki devices enforce on|off`), and by default as soon as the first device is
enrolled or key bound; a directory that never used enrolment keeps the earlier open
behaviour. The operator's CLI (`genki ingest`, `genki import`) is trusted: whoever can
run it can write the data directory anyway; it is never screened, and its records are
attributed to the key id `operator`.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from engine.errors import GenkiError, NotFound, UsageError
from engine.ingest.log import OPERATOR_KEY_ID
from engine.schemas import ID_CHAR_CLASS, ID_CHARS_MAX, is_id
from engine.storage import open_sqlite, private_dir

DEVICES_FILE_NAME = "devices.sqlite"
DEVICES_WAIT_S_MAX = 30.0
VENDOR_ANY = "any"
VENDOR_CHARS_MAX = 32
_VENDOR = re.compile(rf"{ID_CHAR_CLASS}{{1,{VENDOR_CHARS_MAX}}}")  # an id, shorter

_SCHEMA = """
CREATE TABLE IF NOT EXISTS enrolment_events (
    seq INTEGER PRIMARY KEY, action TEXT NOT NULL CHECK (action IN ('enroll', 'unenroll')),
    user_id TEXT NOT NULL, device_id TEXT NOT NULL, vendor TEXT NOT NULL, key_id TEXT,
    ts_ms INTEGER NOT NULL, by TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS enrolments (
    device_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, vendor TEXT NOT NULL, key_id TEXT,
    enrolled_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS enrolments_by_user ON enrolments (user_id);
CREATE TABLE IF NOT EXISTS key_scopes (
    key_id TEXT PRIMARY KEY, vendors TEXT NOT NULL, profiles INTEGER NOT NULL,
    bound_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class DeviceConflict(GenkiError):
    exit_code = 5
    http_status = 409
    code = "device_enrolled_elsewhere"


@dataclass(frozen=True, slots=True)
class Enrolment:
    user_id: str
    device_id: str
    vendor: str
    key_id: str | None
    enrolled_ms: int

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "device_id": self.device_id, "vendor": self.vendor,
                "key_id": self.key_id, "enrolled_ms": self.enrolled_ms}


@dataclass(frozen=True)
class KeyScope:
    key_id: str
    vendors: frozenset[str] = frozenset()
    profiles: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "vendors": sorted(self.vendors),
                "profiles": self.profiles}


@dataclass
class KeyPolicy:
    """What one key may write, judged per record (engine.devices.screen)."""

    key_id: str
    enforced: bool
    scope: KeyScope
    devices: dict[str, Enrolment] = field(default_factory=dict)
    trusted: bool = False  # staff keys and the operator

    def device_problem(self, user_id: str, device_id: str) -> str | None:
        """Why this key may not write samples of (user, device), or None."""
        if self.trusted or not self.enforced:
            return None
        enrolment = self.devices.get(device_id)
        if enrolment is None or enrolment.user_id != user_id:
            return f"device {device_id} is not enrolled for person {user_id}"
        if enrolment.key_id == self.key_id or enrolment.vendor in self.scope.vendors \
                or VENDOR_ANY in self.scope.vendors:
            return None
        if enrolment.key_id is None and not self.scope.vendors:
            return None  # a key bound to no vendor writes devices enrolled for no key
        owner = f"key {enrolment.key_id}" if enrolment.key_id else f"vendor {enrolment.vendor}"
        return (f"device {device_id} is enrolled for {owner}, outside the scope of key "
                f"{self.key_id} (vendors: {', '.join(sorted(self.scope.vendors)) or 'none'})")

    def person_problem(self, user_id: str) -> str | None:
        """Activities carry no device: the person must have a device this key covers."""
        if self.trusted or not self.enforced:
            return None
        for enrolment in self.devices.values():
            if enrolment.user_id == user_id and \
                    self.device_problem(user_id, enrolment.device_id) is None:
                return None
        return f"person {user_id} has no device enrolled in the scope of key {self.key_id}"

    def may_write_profiles(self) -> bool:
        return self.trusted or not self.enforced or self.scope.profiles

    def person_of(self, device_id: str) -> str | None:
        enrolment = self.devices.get(device_id)
        return None if enrolment is None else enrolment.user_id


def _check_id(what: str, text: str) -> str:
    if not is_id(text):
        raise UsageError(f"{what} {text!r}: 1-{ID_CHARS_MAX} characters of A-Z a-z 0-9 _ . : -")
    return text


def _check_vendor(vendor: str) -> str:
    if _VENDOR.fullmatch(vendor) is None:
        raise UsageError(f"vendor {vendor!r}: 1-{VENDOR_CHARS_MAX} characters of "
                         "A-Z a-z 0-9 _ . : -")
    return vendor.lower()


class DeviceRegistry:
    """devices.sqlite; calls are serialised on one lock (the API shares one instance)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._lock = threading.Lock()

    @classmethod
    def open(cls, data_dir: Path) -> DeviceRegistry:
        private_dir(data_dir)
        db = open_sqlite(data_dir / DEVICES_FILE_NAME, busy_wait_s_max=DEVICES_WAIT_S_MAX)
        db.executescript(_SCHEMA)
        return cls(db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, statements: list[tuple[str, tuple]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self._db.execute(sql, params)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- enrolment ---------------------------------------------------------------------

    def enroll(self, user_id: str, device_id: str, vendor: str, now_ms: int, by: str,
               key_id: str | None = None) -> Enrolment:
        """Enrol a device to a person (idempotent); a device worn by someone else must be
        unenrolled first."""
        _check_id("user", user_id)
        _check_id("device", device_id)
        vendor = _check_vendor(vendor)
        if key_id is not None:
            _check_id("key", key_id)
        current = self.enrolment(device_id)
        if current is not None and current.user_id != user_id:
            raise DeviceConflict(f"device {device_id} is enrolled for person "
                                 f"{current.user_id}; unenroll it there first")
        if current is not None and (current.vendor, current.key_id) == (vendor, key_id):
            return current
        self._write([
            (("INSERT INTO enrolment_events (action, user_id, device_id, vendor, key_id, ts_ms,"
             " by) VALUES ('enroll', ?, ?, ?, ?, ?, ?)"),
             (user_id, device_id, vendor, key_id, now_ms, by)),
            (("INSERT INTO enrolments VALUES (?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE"
             " SET vendor = excluded.vendor, key_id = excluded.key_id"),
             (device_id, user_id, vendor, key_id, now_ms))])
        result = self.enrolment(device_id)
        assert result is not None
        return result

    def unenroll(self, user_id: str, device_id: str, now_ms: int, by: str) -> Enrolment:
        current = self.enrolment(device_id)
        if current is None or current.user_id != user_id:
            raise NotFound(f"device {device_id} is not enrolled for person {user_id}; "
                           "`genki devices list` shows the enrolments")
        self._write([
            (("INSERT INTO enrolment_events (action, user_id, device_id, vendor, key_id, ts_ms,"
             " by) VALUES ('unenroll', ?, ?, ?, ?, ?, ?)"),
             (user_id, device_id, current.vendor, current.key_id, now_ms, by)),
            ("DELETE FROM enrolments WHERE device_id = ?", (device_id,))])
        return current

    def erase_user(self, user_id: str) -> int:
        """Delete a person's enrolments and enrolment events (engine.erasure); rows removed.
        Their devices are free to be enrolled to someone else afterwards."""
        with self._lock:
            db = self._db
            db.execute("PRAGMA secure_delete = ON")
            db.execute("BEGIN IMMEDIATE")
            try:
                removed = db.execute("DELETE FROM enrolment_events WHERE user_id = ?",
                                     (user_id,)).rowcount
                removed += db.execute("DELETE FROM enrolments WHERE user_id = ?",
                                      (user_id,)).rowcount
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return removed

    def enrolment(self, device_id: str) -> Enrolment | None:
        with self._lock:
            row = self._db.execute("SELECT user_id, device_id, vendor, key_id, enrolled_ms FROM"
                                   " enrolments WHERE device_id = ?", (device_id,)).fetchone()
        return None if row is None else Enrolment(*row)

    def enrolments(self, user_id: str | None = None) -> list[Enrolment]:
        query = "SELECT user_id, device_id, vendor, key_id, enrolled_ms FROM enrolments"
        params: tuple = ()
        if user_id is not None:
            query, params = query + " WHERE user_id = ?", (user_id,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY user_id, device_id", params).fetchall()
        return [Enrolment(*row) for row in rows]

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT seq, action, user_id, device_id, vendor, key_id,"
                                    " ts_ms, by FROM enrolment_events ORDER BY seq").fetchall()
        names = ("seq", "action", "user_id", "device_id", "vendor", "key_id", "ts_ms", "by")
        return [dict(zip(names, row, strict=True)) for row in rows]

    # -- key scopes and enforcement ------------------------------------------------------

    def bind_key(self, key_id: str, vendors: list[str], profiles: bool, now_ms: int) -> KeyScope:
        """Set a gateway key's scope: the vendors it writes for (`any` for all), and whether
        it is an enrolment key (profiles and consent)."""
        _check_id("key", key_id)
        checked = sorted({_check_vendor(v) for v in vendors})
        self._write([(("INSERT INTO key_scopes VALUES (?, ?, ?, ?) ON CONFLICT(key_id) DO UPDATE"
                      " SET vendors = excluded.vendors, profiles = excluded.profiles,"
                      " bound_ms = excluded.bound_ms"),
                      (key_id, ",".join(checked), int(profiles), now_ms))])
        return self.scope(key_id)

    def scope(self, key_id: str) -> KeyScope:
        with self._lock:
            row = self._db.execute("SELECT vendors, profiles FROM key_scopes WHERE key_id = ?",
                                   (key_id,)).fetchone()
        if row is None:
            return KeyScope(key_id)
        return KeyScope(key_id, frozenset(v for v in row[0].split(",") if v), bool(row[1]))

    def scopes(self) -> list[KeyScope]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT key_id FROM key_scopes ORDER BY 1")]
        return [self.scope(key_id) for key_id in ids]

    def set_enforced(self, enforced: bool) -> None:
        self._write([(("INSERT INTO settings VALUES ('enforcement', ?) ON CONFLICT(name)"
                      " DO UPDATE SET value = excluded.value"), ("on" if enforced else "off",))])

    def enforced(self) -> bool:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE name = 'enforcement'"
                                   ).fetchone()
            if row is not None:
                return bool(row[0] == "on")
            used = self._db.execute("SELECT EXISTS (SELECT 1 FROM enrolment_events) OR"
                                    " EXISTS (SELECT 1 FROM key_scopes)").fetchone()[0]
        return bool(used)

    def policy_for(self, key_id: str, *, trusted: bool = False) -> KeyPolicy:
        enforced = self.enforced()
        devices = {e.device_id: e for e in self.enrolments()}
        return KeyPolicy(key_id, enforced, self.scope(key_id), devices, trusted)


def operator_policy(registry: DeviceRegistry | None) -> KeyPolicy:
    """The CLI's policy: trusted, but enrolments still map vendor devices to persons."""
    devices = {} if registry is None else {e.device_id: e for e in registry.enrolments()}
    return KeyPolicy(OPERATOR_KEY_ID, False, KeyScope(OPERATOR_KEY_ID), devices, trusted=True)
