"""Record authenticators: proof that a point-moving record comes from the API service.

A redemption, refund (or adjustment) request on genki.redemptions moves points, so
the broker's ACLs are not its only protection: the API adds an authenticator,
`"auth": {"kid": <key id>, "mac": <base64url HMAC-SHA256>}`, over the record's
canonical bytes (every other field, sorted keys, compact JSON, after a domain
tag), with the current record key. The partition owner recomputes it with the
key of that id; a record without one, with an unknown key id or a wrong MAC is
refused with reason `unauthenticated` before it can touch the ledger. Rotation:
add a key (`genki kafka-keys add`), give the file to workers first, then to the
API; old key ids keep verifying what they signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

import orjson

from engine.ingest.reasons import Reason, reason_text
from engine.kafka.keys import Keyring, record_keys
from engine.schemas import RecordAuth, Redemption

DOMAIN_TAG = b"genki.redemptions.v1\n"
MAC_BYTES = 32


def canonical_bytes(record: Redemption) -> bytes:
    """What the authenticator covers: the record without `auth`, in one byte form."""
    body = record.model_dump(mode="json", exclude_none=True, exclude={"auth"})
    return DOMAIN_TAG + orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def _mac(key: bytes, record: Redemption) -> bytes:
    return hmac.new(key, canonical_bytes(record), hashlib.sha256).digest()


def authenticate(record: Redemption, keys: Keyring) -> Redemption:
    """The record with the API's authenticator (current key)."""
    mac = base64.urlsafe_b64encode(_mac(keys.current_key, record)).rstrip(b"=").decode()
    return record.model_copy(update={"auth": RecordAuth(kid=keys.current, mac=mac)})


def require_record_keys() -> Keyring:
    """The API's signing keys (--record-keys / $GENKI_RECORD_KEYS / the default file)."""
    return record_keys()


def authenticated_value(record: Redemption, keys: Keyring | None) -> bytes:
    """The Kafka record value the API publishes for a request."""
    assert keys is not None, "require_record_keys() first"
    signed = authenticate(record, keys)
    return orjson.dumps(signed.model_dump(mode="json", exclude_none=True))


def verification_failure(record: Redemption, keys: Keyring | None) -> str | None:
    """None when the record carries a valid authenticator; else the dead-letter reason."""
    if keys is None:
        return reason_text(Reason.unauthenticated, "auth",
                           "this worker has no record keys (--record-keys / GENKI_RECORD_KEYS) "
                           "and accepts no point-moving record")
    auth = record.auth
    if auth is None:
        return reason_text(Reason.unauthenticated, "auth", "missing: records that move points "
                           "must come from the API service")
    key = keys.keys.get(auth.kid)
    if key is None:
        return reason_text(Reason.unauthenticated, "auth.kid", f"unknown key id {auth.kid!r}")
    try:
        sent = base64.urlsafe_b64decode(auth.mac + "=" * (-len(auth.mac) % 4))
    except (ValueError, binascii.Error):
        sent = b""
    if len(sent) != MAC_BYTES or not hmac.compare_digest(sent, _mac(key, record)):
        return reason_text(Reason.unauthenticated, "auth.mac",
                           "does not match the record (forged or altered)")
    return None
