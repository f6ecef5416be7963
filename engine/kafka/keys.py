"""Key files for the Kafka runtime: keyrings of secrets by key id, kept outside data dirs.

Two keyrings, each its own file, so that each principal holds only what it needs:
* record keys (`--record-keys`, $GENKI_RECORD_KEYS): HMAC-SHA256 keys of the record
  authenticators; the API signs with the current one, workers verify with any.
* wrap keys (`--wrap-keys`, $GENKI_WRAP_KEYS): AES-256 keys that wrap the per-person
  data keys on genki.keys; gateways, workers and replay hold them.

File: `{"v": 1, "current": "<kid>", "keys": {"<kid>": "<base64 32 bytes>", ...}}`,
mode 0600. Without a flag or variable, `record-keys.json` / `wrap-keys.json` in
$GENKI_KEYS_DIR (default ~/.config/genki) are used, created on first use: enough
for one host; several hosts must share the same files. Rotation: `genki kafka-keys add FILE` adds a key and makes it current;
older keys stay to verify and unwrap what they made, until removed by hand.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import orjson

from engine.errors import GenkiError

KEY_BYTES = 32
KEYS_PER_RING_MAX = 64
KEY_FILE_BYTES_MAX = 64 * 1_024
KID_CHARS = 8
RECORD_KEYS_ENV = "GENKI_RECORD_KEYS"
WRAP_KEYS_ENV = "GENKI_WRAP_KEYS"
KEYS_DIR_ENV = "GENKI_KEYS_DIR"
DEFAULT_KEY_FILES: dict[str, str] = {RECORD_KEYS_ENV: "record-keys.json",
                                     WRAP_KEYS_ENV: "wrap-keys.json"}

log = logging.getLogger("genki.kafka.keys")


class KeyFileError(GenkiError):
    exit_code = 2
    code = "key_file"


@dataclass(frozen=True)
class Keyring:
    current: str
    keys: dict[str, bytes]

    def __post_init__(self) -> None:
        assert self.current in self.keys

    @property
    def current_key(self) -> bytes:
        return self.keys[self.current]


def load_keyring(path: Path, data_dirs: tuple[Path, ...] = ()) -> Keyring:
    """A keyring file, refused when others may read it or it lies in a data directory."""
    path = Path(path)
    resolved = path.resolve()
    for data_dir in data_dirs:
        if resolved.is_relative_to(Path(data_dir).resolve()):
            raise KeyFileError(f"key file {path} is inside the data directory {data_dir}: keep "
                               "keys where a copy of the data does not take them along")
    try:
        info = path.stat()
        if info.st_size > KEY_FILE_BYTES_MAX:
            raise KeyFileError(f"key file {path} is over {KEY_FILE_BYTES_MAX} bytes")
        body = orjson.loads(path.read_bytes())
    except OSError as error:
        raise KeyFileError(f"reading key file {path} failed: {error}") from None
    except orjson.JSONDecodeError as error:
        raise KeyFileError(f"key file {path} is not JSON: {error}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"key file {path} is readable by others (mode "
                           f"{stat.S_IMODE(info.st_mode):o}); chmod 600 {path}")
    return _parse(body, path)


def _parse(body: object, path: Path) -> Keyring:
    if not isinstance(body, dict) or body.get("v") != 1 or not isinstance(body.get("keys"), dict):
        raise KeyFileError(f"key file {path}: expected {{\"v\": 1, \"current\": ..., "
                           "\"keys\": {...}}")
    keys: dict[str, bytes] = {}
    for kid, encoded in body["keys"].items():
        try:
            secret = base64.b64decode(encoded, validate=True)
        except (ValueError, TypeError):
            raise KeyFileError(f"key file {path}: key {kid!r} is not base64") from None
        if len(secret) != KEY_BYTES:
            raise KeyFileError(f"key file {path}: key {kid!r} has {len(secret)} bytes, "
                               f"expected {KEY_BYTES}")
        keys[str(kid)] = secret
    current = body.get("current")
    if current not in keys or len(keys) > KEYS_PER_RING_MAX:
        raise KeyFileError(f"key file {path}: \"current\" must name one of its keys "
                           f"(at most {KEYS_PER_RING_MAX})")
    return Keyring(str(current), keys)


def add_key(path: Path) -> str:
    """Add a fresh random key to the file (created 0600 if missing); it becomes current."""
    path = Path(path)
    ring = load_keyring(path) if path.exists() else None
    keys = dict(ring.keys) if ring else {}
    if len(keys) >= KEYS_PER_RING_MAX:
        raise KeyFileError(f"key file {path} holds {KEYS_PER_RING_MAX} keys; remove old ones")
    kid = secrets.token_hex(KID_CHARS // 2)
    while kid in keys:
        kid = secrets.token_hex(KID_CHARS // 2)
    keys[kid] = secrets.token_bytes(KEY_BYTES)
    body = {"v": 1, "current": kid,
            "keys": {k: base64.b64encode(v).decode() for k, v in keys.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(orjson.dumps(body, option=orjson.OPT_INDENT_2))
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    return kid


# -- which files this process uses ---------------------------------------------------------

_paths: dict[str, Path | None] = {}
_rings: dict[Path, Keyring] = {}


def configure_key_paths(record: Path | None, wrap: Path | None) -> None:
    """Set by the CLI from --record-keys / --wrap-keys (else the environment decides)."""
    _paths.clear()
    _paths[RECORD_KEYS_ENV] = record
    _paths[WRAP_KEYS_ENV] = wrap
    _rings.clear()


def default_keys_dir() -> Path:
    """$GENKI_KEYS_DIR, else $XDG_CONFIG_HOME/genki, else ~/.config/genki."""
    explicit = os.environ.get(KEYS_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "genki"


def configured_path(env: str) -> Path:
    """The file the flag, else the environment variable `env`, else the default key
    directory names."""
    path = _paths.get(env)
    if path is not None:
        return path
    value = os.environ.get(env)
    return Path(value) if value else default_keys_dir() / DEFAULT_KEY_FILES[env]


def _create_if_absent(path: Path) -> None:
    """A new key file at the default place, unless one is there (two processes starting
    at once both end up with the same file: the second link fails, it reads the first)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    add_key(temporary)
    try:
        os.link(temporary, path)
        log.warning("created the key file %s (0600); every process of this installation "
                    "must use the same file (copy it to other hosts, or set %s)", path,
                    " / ".join(DEFAULT_KEY_FILES))
    except FileExistsError:
        pass
    finally:
        temporary.unlink()


def resolve_keyring(env: str, explicit: Path | None = None,
                    data_dirs: tuple[Path, ...] = ()) -> Keyring:
    """The keyring of `explicit`, else of the flag / environment / default file (the
    default one is created on first use); refused inside a data directory."""
    path = explicit or configured_path(env)
    if explicit is None and path == default_keys_dir() / DEFAULT_KEY_FILES[env]:
        _create_if_absent(path)
    ring = _rings.get(path)
    if ring is None or data_dirs:
        ring = _rings[path] = load_keyring(path, data_dirs)
    return ring


def configured_keyring(env: str) -> Keyring:
    return resolve_keyring(env)


def record_keys() -> Keyring:
    return configured_keyring(RECORD_KEYS_ENV)


def wrap_keys() -> Keyring:
    return configured_keyring(WRAP_KEYS_ENV)


def add_key_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record-keys", type=Path, default=None, metavar="FILE",
                        help=f"record authenticator keys (default ${RECORD_KEYS_ENV}); the API "
                             "signs, workers verify; never give them to a gateway")
    parser.add_argument("--wrap-keys", type=Path, default=None, metavar="FILE",
                        help=f"keys wrapping the per-person data keys on genki.keys "
                             f"(default ${WRAP_KEYS_ENV})")


def _cmd_add(args: argparse.Namespace) -> int:
    kid = add_key(args.file)
    print(f"{args.file}: added key {kid}, now current")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    ring = load_keyring(args.file)
    for kid in ring.keys:
        print(f"{kid}{' (current)' if kid == ring.current else ''}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    keys = subparsers.add_parser(
        "kafka-keys", help="key files of the Kafka runtime (record authenticators, data-key wrapping)")
    actions = keys.add_subparsers(dest="kafka_keys_command", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="add a new key and make it current (creates the file)")
    add.add_argument("file", type=Path)
    add.set_defaults(func=_cmd_add)
    listing = actions.add_parser("list", help="key ids (no secrets)")
    listing.add_argument("file", type=Path)
    listing.set_defaults(func=_cmd_list)
