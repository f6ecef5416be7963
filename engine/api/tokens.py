"""Short-lived, single-use redeem tokens signed with the server's secret (HMAC-SHA256).

A token is `<payload>.<signature>`, both base64url without padding; the
payload is compact JSON `{"v":1,"u":user_id,"exp":expiry_ms,"n":nonce}`. It is
signed, not encrypted: the app shows it as a QR code, the shop terminal posts
it back, and only a server holding the secret can make one. Single use is
enforced by the redemption flow (engine.api.service), keyed by the nonce.

The secret lives in `<data_dir>/api_secret` (mode 0600), created once,
atomically (written to a private temporary file, then hard-linked into
place), so concurrent servers on one data directory agree on it.
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

from engine.api.limits import TOKEN_CHARS_MAX
from engine.api.problems import TokenExpired, TokenInvalid
from engine.errors import GenkiError

SECRET_FILE_NAME = "api_secret"
SECRET_BYTES = 32
NONCE_BYTES = 16
TOKEN_VERSION = 1
_SIGNING_CONTEXT = b"genki.redeem-token.v1."


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user_id: str
    expires_ms: int
    nonce: str


def load_or_create_secret(data_dir: Path) -> bytes:
    """The server secret, created (0600) on first use; refuses a group/world-readable one."""
    path = data_dir / SECRET_FILE_NAME
    if not path.exists():
        _create_secret(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise GenkiError(f"{path} has permissions {mode:o}; it signs redeem tokens and must be "
                         f"private: chmod 600 {path}")
    secret = bytes.fromhex(path.read_text().strip())
    assert len(secret) == SECRET_BYTES, f"{path} does not hold a {SECRET_BYTES}-byte secret"
    return secret


def _create_secret(path: Path) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, (secrets.token_hex(SECRET_BYTES) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)  # atomic; loses to a concurrent creator, which is fine
    except FileExistsError:
        pass
    finally:
        temp.unlink()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    def __init__(self, secret: bytes) -> None:
        assert len(secret) == SECRET_BYTES
        self._secret = secret

    def _signature(self, payload_b64: str) -> bytes:
        return hmac.new(self._secret, _SIGNING_CONTEXT + payload_b64.encode("ascii"),
                        hashlib.sha256).digest()

    def issue(self, user_id: str, now_ms: int, ttl_s: int) -> tuple[str, TokenClaims]:
        assert ttl_s > 0
        claims = TokenClaims(user_id, now_ms + ttl_s * 1000, secrets.token_hex(NONCE_BYTES))
        payload = orjson.dumps({"v": TOKEN_VERSION, "u": claims.user_id,
                                "exp": claims.expires_ms, "n": claims.nonce})
        payload_b64 = _b64(payload)
        token = f"{payload_b64}.{_b64(self._signature(payload_b64))}"
        assert len(token) <= TOKEN_CHARS_MAX
        return token, claims

    def verify_signature(self, token: str) -> TokenClaims:
        """The claims of a token this server signed, expired or not; else TokenInvalid."""
        if len(token) > TOKEN_CHARS_MAX or token.count(".") != 1:
            raise TokenInvalid("redeem token is malformed: not a token issued by this server")
        payload_b64, signature_b64 = token.split(".")
        try:
            signature = _unb64(signature_b64)
            payload_ok = payload_b64.isascii()
        except (binascii.Error, ValueError):
            raise TokenInvalid("redeem token is malformed: not a token issued by this "
                               "server") from None
        if not payload_ok or not hmac.compare_digest(signature, self._signature(payload_b64)):
            raise TokenInvalid("redeem token signature does not match: the token was not "
                               "issued by this server or was altered")
        fields = orjson.loads(_unb64(payload_b64))
        assert fields["v"] == TOKEN_VERSION, "a signed token of an unknown version"
        return TokenClaims(fields["u"], fields["exp"], fields["n"])

    @staticmethod
    def check_fresh(claims: TokenClaims, now_ms: int) -> None:
        if now_ms >= claims.expires_ms:
            raise TokenExpired(f"redeem token expired {(now_ms - claims.expires_ms) / 1000:.1f} s "
                               "ago; ask the customer to show a new code in the app")
