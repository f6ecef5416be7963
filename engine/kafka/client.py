"""Client settings shared by every genki Kafka client, and their limits.

TLS and SASL (PLAIN, SCRAM-SHA-256/512) are defined here once, from flags or
GENKI_KAFKA_* environment variables, and every producer, consumer and admin
client genki makes gets them through producer_settings / consumer_settings /
admin_settings.

Idempotent producers and transactions are off on purpose: the design must not
need them (the test broker, tansu, has neither). Exactly-once *effects* come
from deterministic ids and offsets stored with the state they produced.
"""

from __future__ import annotations

import argparse
import functools
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import UsageError
from engine.schemas import RECORD_BYTES_MAX

CLIENT_ID_PREFIX = "genki"
# A record may be RECORD_BYTES_MAX plus key and headers; batches hold many.
MESSAGE_BYTES_MAX = 2 * RECORD_BYTES_MAX
PRODUCE_BATCH_BYTES_MAX = 1_048_576
PRODUCE_LINGER_MS = 20
PRODUCE_REQUEST_TIMEOUT_MS = 60_000
FETCH_PARTITION_BYTES_MAX = 8 * 1_048_576
FETCH_BYTES_MAX = 64 * 1_048_576
# How long the broker may hold a fetch that finds no new records (Kafka's default is
# 500 ms). aiokafka sends no new fetch for a partition while one is in flight, and tansu
# answers a held fetch only when its wait ends, so whatever lands meanwhile waits for it:
# the worker reading busy topics beside empty ones stalled up to half a second a batch
# (segment records 1.26-1.68 M -> 1.46-2.25 M samples/s at 20-100 ms), and a redemption
# through Kafka (API -> worker -> API) took 193-232 ms, 36-61 ms at 20 ms. Idle, a
# consumer then asks 50 times a second.
FETCH_WAIT_MS = 20
# Readers that read partitions to their end and stop (takeover restores, snapshots, the
# keys topic) look for the broker's answer this often: an empty partition took 1.0 s to
# read (the fetch held, then a 500 ms poll for records that never came), 0.05 s so.
READ_TO_END_POLL_MS = 50
COMPRESSIONS: tuple[str, ...] = ("auto", "none", "gzip", "snappy", "lz4", "zstd")


def resolve_compression(name: str) -> str:
    """"auto": lz4, else zstd when their codec (aiokafka uses cramjam) is installed,
    else none. gzip always works but costs ~5x the publish time of none here
    (about 11 MB/s on one core)."""
    assert name in COMPRESSIONS, name
    if name != "auto":
        return name
    from aiokafka.codec import has_lz4, has_zstd

    return "lz4" if has_lz4() else "zstd" if has_zstd() else "none"


def producer_settings(bootstrap: str, client_id: str, compression: str = "auto",
                      linger_ms: int = PRODUCE_LINGER_MS) -> dict[str, Any]:
    compression = resolve_compression(compression)
    return {
        "bootstrap_servers": bootstrap,
        "client_id": f"{CLIENT_ID_PREFIX}-{client_id}",
        "enable_idempotence": False,
        "acks": "all",
        "linger_ms": linger_ms,
        "max_batch_size": PRODUCE_BATCH_BYTES_MAX,
        "max_request_size": MESSAGE_BYTES_MAX + PRODUCE_BATCH_BYTES_MAX,
        "compression_type": None if compression == "none" else compression,
        "request_timeout_ms": PRODUCE_REQUEST_TIMEOUT_MS,
        **current_security().client_kwargs(),
    }


def consumer_settings(bootstrap: str, client_id: str) -> dict[str, Any]:
    return {
        "bootstrap_servers": bootstrap,
        "client_id": f"{CLIENT_ID_PREFIX}-{client_id}",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": FETCH_PARTITION_BYTES_MAX,
        "fetch_max_bytes": FETCH_BYTES_MAX,
        "isolation_level": "read_uncommitted",
        "fetch_max_wait_ms": FETCH_WAIT_MS,
        **current_security().client_kwargs(),
    }


def topic_name(prefix: str, name: str) -> str:
    """A topic's name on the broker; the prefix isolates tenants or test runs."""
    return f"{prefix}{name}"


# -- TLS and SASL --------------------------------------------------------------------------
#
# Every genki Kafka client (worker, publish, topics, serve --bootstrap, replay --source
# kafka, the API bridge, restores) gets its connection settings from here: flags on the
# command line (add_security_args), else GENKI_KAFKA_* environment variables.

SECURITY_PROTOCOLS: tuple[str, ...] = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SECRET_FILE_BYTES_MAX = 4_096
ENV_SECURITY_PROTOCOL = "GENKI_KAFKA_SECURITY_PROTOCOL"
ENV_SASL_MECHANISM = "GENKI_KAFKA_SASL_MECHANISM"
ENV_SASL_USERNAME = "GENKI_KAFKA_SASL_USERNAME"
ENV_SASL_PASSWORD = "GENKI_KAFKA_SASL_PASSWORD"
ENV_SASL_PASSWORD_FILE = "GENKI_KAFKA_SASL_PASSWORD_FILE"
ENV_SSL_CAFILE = "GENKI_KAFKA_SSL_CAFILE"
ENV_SSL_CERTFILE = "GENKI_KAFKA_SSL_CERTFILE"
ENV_SSL_KEYFILE = "GENKI_KAFKA_SSL_KEYFILE"
ENV_SSL_KEY_PASSWORD_FILE = "GENKI_KAFKA_SSL_KEY_PASSWORD_FILE"
ENV_SSL_CHECK_HOSTNAME = "GENKI_KAFKA_SSL_CHECK_HOSTNAME"


class KafkaSecurityError(UsageError):
    code = "kafka_security"


@dataclass(frozen=True)
class KafkaSecurity:
    """How a client authenticates and encrypts its broker connections."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: str | None = field(default=None, repr=False)
    ssl_check_hostname: bool = True

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def check(self) -> KafkaSecurity:
        """Self, or KafkaSecurityError naming what is missing or contradictory."""
        if self.protocol not in SECURITY_PROTOCOLS:
            raise KafkaSecurityError(f"--security-protocol must be one of "
                                     f"{', '.join(SECURITY_PROTOCOLS)}, got {self.protocol!r}")
        if self.uses_sasl:
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise KafkaSecurityError(
                    f"{self.protocol} needs --sasl-mechanism (or ${ENV_SASL_MECHANISM}), one of "
                    f"{', '.join(SASL_MECHANISMS)}; got {self.sasl_mechanism!r}")
            if not self.sasl_username or self.sasl_password is None:
                raise KafkaSecurityError(
                    f"{self.protocol} needs --sasl-username and --sasl-password-file (or "
                    f"${ENV_SASL_USERNAME} and ${ENV_SASL_PASSWORD_FILE})")
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password:
            raise KafkaSecurityError(f"SASL settings given but --security-protocol is "
                                     f"{self.protocol}; use SASL_SSL (or SASL_PLAINTEXT)")
        tls_files = (self.ssl_cafile, self.ssl_certfile, self.ssl_keyfile)
        if not self.uses_tls and any(tls_files):
            raise KafkaSecurityError(f"TLS files given but --security-protocol is "
                                     f"{self.protocol}; use SSL or SASL_SSL")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise KafkaSecurityError("a client certificate needs both --ssl-certfile and "
                                     "--ssl-keyfile")
        for path in tls_files:
            if path and not Path(path).is_file():
                raise KafkaSecurityError(f"TLS file {path} does not exist")
        return self

    def client_kwargs(self) -> dict[str, Any]:
        """The aiokafka producer/consumer/admin keyword arguments."""
        kwargs: dict[str, Any] = {"security_protocol": self.protocol}
        if self.uses_tls:
            kwargs["ssl_context"] = _ssl_context(self)
        if self.uses_sasl:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password
        return kwargs


@functools.lru_cache(maxsize=8)
def _ssl_context(security: KafkaSecurity) -> ssl.SSLContext:
    """Verifies the broker against --ssl-cafile (else the system's CAs), TLS 1.2 or newer;
    presents a client certificate when one is given (mutual TLS)."""
    from aiokafka.helpers import create_ssl_context

    try:
        context = create_ssl_context(cafile=security.ssl_cafile, certfile=security.ssl_certfile,
                                     keyfile=security.ssl_keyfile,
                                     password=security.ssl_key_password)
    except (OSError, ssl.SSLError) as error:
        raise KafkaSecurityError(f"loading the TLS files failed: {error}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = security.ssl_check_hostname
    return context


def read_secret_file(path: str | Path, what: str) -> str:
    """A password from a file (not the command line, where `ps` shows it); one line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise KafkaSecurityError(f"reading the {what} file {path} failed: {error}") from None
    if len(raw) > SECRET_FILE_BYTES_MAX:
        raise KafkaSecurityError(f"the {what} file {path} is over {SECRET_FILE_BYTES_MAX} bytes")
    return raw.decode().rstrip("\r\n")


def security_from(args: Any = None, environ: Mapping[str, str] | None = None) -> KafkaSecurity:
    """Flags (when given) over GENKI_KAFKA_* environment variables over PLAINTEXT."""
    env = os.environ if environ is None else environ

    def pick(attr: str, name: str) -> str | None:
        value = getattr(args, attr, None) if args is not None else None
        return str(value) if value not in (None, "") else (env.get(name) or None)

    password_file = pick("sasl_password_file", ENV_SASL_PASSWORD_FILE)
    password = read_secret_file(password_file, "SASL password") if password_file \
        else env.get(ENV_SASL_PASSWORD)
    key_password_file = pick("ssl_key_password_file", ENV_SSL_KEY_PASSWORD_FILE)
    no_check = bool(getattr(args, "ssl_no_check_hostname", False)) or \
        env.get(ENV_SSL_CHECK_HOSTNAME, "1").lower() in ("0", "false", "no")
    return KafkaSecurity(
        protocol=(pick("security_protocol", ENV_SECURITY_PROTOCOL) or "PLAINTEXT").upper(),
        sasl_mechanism=(pick("sasl_mechanism", ENV_SASL_MECHANISM) or "").upper() or None,
        sasl_username=pick("sasl_username", ENV_SASL_USERNAME),
        sasl_password=password,
        ssl_cafile=pick("ssl_cafile", ENV_SSL_CAFILE),
        ssl_certfile=pick("ssl_certfile", ENV_SSL_CERTFILE),
        ssl_keyfile=pick("ssl_keyfile", ENV_SSL_KEYFILE),
        ssl_key_password=read_secret_file(key_password_file, "TLS key password")
        if key_password_file else None,
        ssl_check_hostname=not no_check,
    ).check()


_configured: KafkaSecurity | None = None


def configure_security(security: KafkaSecurity | None) -> None:
    """Set the process's client security (the CLI does, from flags); None: back to env."""
    global _configured
    _configured = security


def current_security() -> KafkaSecurity:
    return _configured if _configured is not None else security_from(None)


def add_security_args(parser: argparse.ArgumentParser) -> None:
    """The TLS/SASL flags every Kafka command takes (each defaults to its GENKI_KAFKA_* env),
    and the key files (--record-keys, --wrap-keys)."""
    group = parser.add_argument_group("Kafka TLS and SASL")
    group.add_argument("--security-protocol", type=str.upper, choices=SECURITY_PROTOCOLS,
                       default=None, help=f"default ${ENV_SECURITY_PROTOCOL} or PLAINTEXT")
    group.add_argument("--sasl-mechanism", type=str.upper, choices=SASL_MECHANISMS,
                       default=None, help=f"default ${ENV_SASL_MECHANISM}")
    group.add_argument("--sasl-username", default=None, help=f"default ${ENV_SASL_USERNAME}")
    group.add_argument("--sasl-password-file", default=None,
                       help=f"a file holding the password (default ${ENV_SASL_PASSWORD_FILE}, "
                            f"or the password itself in ${ENV_SASL_PASSWORD})")
    group.add_argument("--ssl-cafile", default=None,
                       help=f"CA bundle to verify the broker (default ${ENV_SSL_CAFILE}, else "
                            "the system's CAs)")
    group.add_argument("--ssl-certfile", default=None,
                       help=f"client certificate for mutual TLS (default ${ENV_SSL_CERTFILE})")
    group.add_argument("--ssl-keyfile", default=None,
                       help=f"its private key (default ${ENV_SSL_KEYFILE})")
    group.add_argument("--ssl-key-password-file", default=None,
                       help=f"password of the private key (default ${ENV_SSL_KEY_PASSWORD_FILE})")
    group.add_argument("--ssl-no-check-hostname", action="store_true",
                       help="accept a broker certificate for another host name (still "
                            "verified against the CA)")
    from engine.kafka.keys import add_key_args

    add_key_args(parser)
    parser.set_defaults(_kafka_security_args=True)


def apply_security_args(args: argparse.Namespace) -> None:
    """Called once by `genki` after parsing: commands with the flags configure the process
    (TLS/SASL, and the record-key and wrap-key files)."""
    if getattr(args, "_kafka_security_args", False):
        from engine.kafka.keys import configure_key_paths

        configure_security(security_from(args))
        configure_key_paths(getattr(args, "record_keys", None), getattr(args, "wrap_keys", None))


def admin_settings(bootstrap: str, client_id: str, request_timeout_ms: int) -> dict[str, Any]:
    return {"bootstrap_servers": bootstrap, "client_id": f"{CLIENT_ID_PREFIX}-{client_id}",
            "request_timeout_ms": request_timeout_ms, **current_security().client_kwargs()}
