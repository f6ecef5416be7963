"""Short-lived, single-use redeem tokens, encrypted with the server's key (AES-256-GCM).

A token is `g2.<base64url(iv || ciphertext || tag)>`. The plaintext is
compact JSON `{"u":user_id,"exp":expiry_ms,"n":nonce}`, padded to a fixed
size so the token's length says nothing about the person either. The app
shows it as a QR code; the shop terminal posts it back but cannot read whose
it is (the citizen's id never reaches a shop), and only a server holding the
key can make or open one. Single use is enforced by the redemption flow
(engine.api.service), keyed by the nonce.

The secret lives in `<data_dir>/api_secret` (mode 0600), created once,
atomically (written to a private temporary file, then hard-linked into
place), so concurrent servers on one data directory agree on it. Two keys
are derived from it: one encrypts tokens, one keys the ledger ids the API
makes from a shop's Idempotency-Key (so a shop cannot predict another's ids).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from engine.api.limits import TOKEN_CHARS_MAX
from engine.api.problems import Refusal, Refused
from engine.errors import GenkiError
from engine.schemas import ID_CHARS_MAX
from engine.storage import write_private_file

SECRET_FILE_NAME = "api_secret"
SECRET_BYTES = 32
NONCE_BYTES = 16
IV_BYTES = 12
TOKEN_PREFIX = "g2."
# {"u":"<64 chars>","exp":<13 digits>,"n":"<32 hex>"} fits; every token is padded to this.
PLAINTEXT_BYTES = ID_CHARS_MAX + 80
_TOKEN_CONTEXT = b"genki.redeem-token.v2"
_ID_CONTEXT = b"genki.shop-ledger-ids.v1"


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user_id: str
    expires_ms: int
    nonce: str


def load_or_create_secret(data_dir: Path) -> bytes:
    """The server secret, created (0600) on first use; refuses a group/world-readable one."""
    path = data_dir / SECRET_FILE_NAME
    if not path.exists():
        write_private_file(path, (secrets.token_hex(SECRET_BYTES) + "\n").encode())
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise GenkiError(f"{path} has permissions {mode:o}; it encrypts redeem tokens and must "
                         f"be private: chmod 600 {path}")
    try:
        secret = bytes.fromhex(path.read_text().strip())
    except ValueError:
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise GenkiError(f"{path} does not hold a {SECRET_BYTES}-byte hex secret; move it away "
                         "to have a new one made (outstanding redeem tokens then stop working)")
    return secret


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _subkey(secret: bytes, context: bytes) -> bytes:
    return hmac.new(secret, context, hashlib.sha256).digest()


def _invalid() -> Refused:
    return Refused(Refusal.token_invalid, "redeem token is not valid: it was not issued by this "
                   "programme, or was altered; ask the customer to show the code again")


class TokenBox:
    """Makes and opens redeem tokens; keys the ledger ids of shop requests."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != SECRET_BYTES:
            raise GenkiError(f"the API secret must be {SECRET_BYTES} bytes")
        self._aead = AESGCM(_subkey(secret, _TOKEN_CONTEXT))
        self._id_key = _subkey(secret, _ID_CONTEXT)

    def issue(self, user_id: str, now_ms: int, ttl_s: int) -> tuple[str, TokenClaims]:
        if ttl_s <= 0:
            raise GenkiError(f"token TTL must be positive, got {ttl_s}")
        claims = TokenClaims(user_id, now_ms + ttl_s * 1000, secrets.token_hex(NONCE_BYTES))
        plain = orjson.dumps({"u": claims.user_id, "exp": claims.expires_ms, "n": claims.nonce})
        if len(plain) > PLAINTEXT_BYTES:
            raise GenkiError(f"user id {user_id!r:.80} is too long for a redeem token")
        iv = os.urandom(IV_BYTES)
        sealed = self._aead.encrypt(iv, plain.ljust(PLAINTEXT_BYTES), _TOKEN_CONTEXT)
        token = TOKEN_PREFIX + _b64(iv + sealed)
        assert len(token) <= TOKEN_CHARS_MAX
        return token, claims

    def open(self, token: str) -> TokenClaims:
        """The claims of a token this server made, expired or not; else token_invalid."""
        if len(token) > TOKEN_CHARS_MAX or not token.startswith(TOKEN_PREFIX) \
                or not token.isascii():
            raise _invalid()
        try:
            raw = _unb64(token[len(TOKEN_PREFIX):])
        except (binascii.Error, ValueError):
            raise _invalid() from None
        if len(raw) <= IV_BYTES:
            raise _invalid()
        try:
            plain = self._aead.decrypt(raw[:IV_BYTES], raw[IV_BYTES:], _TOKEN_CONTEXT)
        except InvalidTag:
            raise _invalid() from None
        fields = orjson.loads(plain)  # ours: authenticated, so well formed
        return TokenClaims(str(fields["u"]), int(fields["exp"]), str(fields["n"]))

    def ledger_key(self, purpose: str, shop_id: str, idempotency_key: str) -> str:
        """The ledger idempotency key for a shop's request: keyed, so the entry id the
        ledger derives from it cannot be predicted (or probed) without the secret."""
        mac = hmac.new(self._id_key, f"{purpose}\x1f{shop_id}\x1f{idempotency_key}".encode(),
                       hashlib.sha256)
        return "h:" + mac.hexdigest()[:32]

    @staticmethod
    def check_fresh(claims: TokenClaims, now_ms: int) -> None:
        if now_ms >= claims.expires_ms:
            raise Refused(Refusal.token_expired,
                          f"redeem token expired {(now_ms - claims.expires_ms) / 1000:.1f} s ago; "
                          "ask the customer to show a new code in the app")


def fingerprint(*parts: object) -> str:
    """A short digest of a request's body, stored with the ledger entry it made."""
    text = "\x1f".join(map(str, parts))
    return hashlib.sha256(text.encode()).hexdigest()[:32]
