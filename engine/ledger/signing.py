"""Ed25519 keys that sign the ledger's commit heads (canonical.py, "Signed heads").

The private key lives outside the data directory: whoever can only write the
data files cannot re-sign a rewritten chain. `genki keys signing create --out
PATH` writes PATH (PKCS#8 PEM, mode 0600) and PATH.pub (SubjectPublicKeyInfo
PEM). Writers find the private key through `--signing-key FILE` or the
environment variable GENKI_SIGNING_KEY_FILE (`Ledger.open` is the one place
that reads it); `genki ledger verify --public-key PATH.pub` checks.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from engine.config import SIGNING_KEY_ENV
from engine.errors import LedgerError, UsageError
from engine.ledger.canonical import HASH_HEX_CHARS, chain_hash, signed_message

PUBLIC_KEY_SUFFIX = ".pub"
KEY_ID_HEX_CHARS = 16
KEY_FILE_BYTES_MAX = 16 * 1024
SIGNATURE_HEX_CHARS = 128
_PRIVATE_FILE_MODE = 0o600


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX_CHARS]


@dataclass(frozen=True)
class Signer:
    private_key: Ed25519PrivateKey
    key_id: str
    path: Path

    def sign(self, commit_hash: str) -> str:
        return self.private_key.sign(signed_message(commit_hash)).hex()


@dataclass(frozen=True)
class Verifier:
    public_key: Ed25519PublicKey
    key_id: str

    def valid(self, commit_hash: str, signature_hex: str | None) -> bool:
        if not isinstance(signature_hex, str) or len(signature_hex) != SIGNATURE_HEX_CHARS:
            return False
        try:
            self.public_key.verify(bytes.fromhex(signature_hex), signed_message(commit_hash))
        except (InvalidSignature, ValueError):
            return False
        return True


def create_key_pair(out: Path) -> tuple[Path, Path, str]:
    """Write a new private key to `out` (0600) and its public key to `out`.pub."""
    out = Path(out)
    public_path = out.with_name(out.name + PUBLIC_KEY_SUFFIX)
    for path in (out, public_path):
        if path.exists():
            raise UsageError(f"{path} exists; refusing to overwrite a signing key")
    out.parent.mkdir(parents=True, exist_ok=True)
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_FILE_MODE)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    public_key = private_key.public_key()
    public_path.write_bytes(public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return out, public_path, key_id_of(public_key)


def _read(path: Path, what: str) -> bytes:
    try:
        if path.stat().st_size > KEY_FILE_BYTES_MAX:
            raise UsageError(f"{path}: not a {what} (larger than {KEY_FILE_BYTES_MAX} bytes)")
        return path.read_bytes()
    except OSError as error:
        raise UsageError(f"{what} {path}: {error.strerror or error}") from error


def load_signer(path: Path) -> Signer:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(_read(path, "signing key"), password=None)
    except (ValueError, TypeError) as error:
        raise UsageError(f"{path}: not an unencrypted PEM private key ({error})") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path}: not an Ed25519 private key (make one with "
                         "`genki keys signing create --out PATH`)")
    return Signer(key, key_id_of(key.public_key()), path)


def load_verifier(path: Path) -> Verifier:
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(_read(path, "public key"))
    except (ValueError, TypeError) as error:
        raise UsageError(f"{path}: not a PEM public key ({error})") from error
    if not isinstance(key, Ed25519PublicKey):
        raise UsageError(f"{path}: not an Ed25519 public key")
    return Verifier(key, key_id_of(key))


def signer_for(data_dir: Path, explicit: Path | None) -> Signer | None:
    """The signing key a ledger in `data_dir` uses: explicit, else $GENKI_SIGNING_KEY_FILE.

    Refuses a key stored inside the data directory: it would protect nothing.
    """
    path = explicit if explicit is not None else (
        Path(os.environ[SIGNING_KEY_ENV]) if os.environ.get(SIGNING_KEY_ENV) else None)
    if path is None:
        return None
    resolved, home = Path(path).resolve(), Path(data_dir).resolve()
    if resolved.is_relative_to(home):
        raise LedgerError(f"signing key {path} is inside the data directory {data_dir}; keep "
                          "it outside, where whoever can write the data cannot read it")
    return load_signer(resolved)


def check_witness(witness: Mapping[str, Any], verifier: Verifier | None) -> int:
    """The commit seq of a witnessed head (`genki ledger head --signed`), once its own
    hash and signature check out; a witness file that does not is a usage error."""
    if verifier is None:
        raise UsageError("--witness needs --public-key: a head is only evidence if its "
                         "signature is checked")
    seq, digest, prev_hash, body, key_id, signature = (
        witness.get(name) for name in ("seq", "hash", "prev_hash", "body", "key_id",
                                        "signature"))
    if not (isinstance(seq, int) and seq >= 1 and isinstance(body, str)
            and isinstance(digest, str) and len(digest) == HASH_HEX_CHARS
            and isinstance(prev_hash, str) and len(prev_hash) == HASH_HEX_CHARS):
        raise UsageError("witness: expected the JSON of `genki ledger head --signed` "
                         "(seq, hash, prev_hash, body, key_id, signature)")
    if chain_hash(prev_hash, body.encode()) != digest:
        raise UsageError(f"witness: commit {seq}'s hash does not match its body")
    if key_id != verifier.key_id or not verifier.valid(digest, signature):
        raise UsageError(f"witness: commit {seq} is not signed by key {verifier.key_id}")
    return seq
