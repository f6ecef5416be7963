"""Kafka clients over TLS (mutual) and SASL, against the real tansu broker.

TLS: tansu cannot serve TLS itself (see tests/kafka_tls.py), so a TLS front with
real certificates stands before it and tansu advertises the front; every genki
connection is then TLS. SASL: tansu --authentication refuses clients that do not
authenticate; SCRAM users cannot be created on it (`tansu user create` cannot
authenticate itself and memory storage does not survive a restart), so a
successful SCRAM login was only checked against the documentation (docs/kafka.md).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from engine.kafka.client import (
    KafkaSecurity,
    KafkaSecurityError,
    configure_security,
    consumer_settings,
    current_security,
    security_from,
)
from engine.kafka.combined import combined_ledger

pytest.register_assert_rewrite("tests.kafka_fixtures")
from tests.kafka_fixtures import REPO_ROOT, Fleet, free_port, genki, kafka_keys, tansu_broker
from tests.kafka_tls import Pki, make_pki, tls_front

pytest_plugins = ["tests.kafka_fixtures"]

PARTITIONS = 2


@dataclass(frozen=True)
class TlsBroker:
    bootstrap: str
    pki: Pki

    def args(self, *, client_cert: bool = True) -> list[str]:
        args = ["--bootstrap", self.bootstrap, "--security-protocol", "SSL",
                "--ssl-cafile", str(self.pki.ca)]
        if client_cert:
            args += ["--ssl-certfile", str(self.pki.client_cert),
                     "--ssl-keyfile", str(self.pki.client_key)]
        return args


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    directory = tmp_path_factory.mktemp("tls")
    pki = make_pki(directory)
    front = free_port()
    with kafka_keys(tmp_path_factory.mktemp("kafka-keys")), \
            tansu_broker(directory / "tansu.log", advertised_port=front) as plain, \
            tls_front(pki, front, int(plain.rsplit(":", 1)[1]), require_client_cert=True):
        yield TlsBroker(f"127.0.0.1:{front}", pki)


def _genki_fails(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    result = subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, **(env or {})}, check=False)
    assert result.returncode != 0, result.stdout
    return result


def test_topics_publish_and_worker_over_mutual_tls_give_the_embedded_ledger(
        tls_broker: TlsBroker, fleet: Fleet, tmp_path: Path) -> None:
    genki("topics", "create", *tls_broker.args(), "--partitions", str(PARTITIONS))
    genki("publish", str(fleet.path), *tls_broker.args())
    pki = tls_broker.pki
    env = {"GENKI_KAFKA_SECURITY_PROTOCOL": "SSL", "GENKI_KAFKA_SSL_CAFILE": str(pki.ca),
           "GENKI_KAFKA_SSL_CERTFILE": str(pki.client_cert),
           "GENKI_KAFKA_SSL_KEYFILE": str(pki.client_key)}
    summary = orjson.loads(genki("worker", "--bootstrap", tls_broker.bootstrap, "--data-dir",
                                 str(tmp_path), "--until-idle", "--json",
                                 "--session-timeout-ms", "2000", env=env).stdout)
    assert summary["partitions"] == list(range(PARTITIONS))
    assert combined_ledger(tmp_path).content_digest == fleet.embedded.content_digest


def test_a_broker_certificate_from_another_ca_is_refused(tls_broker: TlsBroker,
                                                        tmp_path: Path) -> None:
    other = make_pki(tmp_path, "another CA")
    args = tls_broker.args()
    args[args.index("--ssl-cafile") + 1] = str(other.ca)
    result = _genki_fails("topics", "create", *args)
    assert result.returncode == 8
    assert "genki: Kafka:" in result.stderr


def test_a_client_without_a_certificate_is_refused_by_a_mutual_tls_broker(
        tls_broker: TlsBroker) -> None:
    result = _genki_fails("topics", "create", *tls_broker.args(client_cert=False))
    assert result.returncode == 8


def test_a_plaintext_client_cannot_talk_to_the_tls_listener(tls_broker: TlsBroker) -> None:
    result = _genki_fails("topics", "create", "--bootstrap", tls_broker.bootstrap)
    assert result.returncode == 8


def test_tansu_with_authentication_refuses_a_client_that_does_not_authenticate(
        tmp_path: Path) -> None:
    with tansu_broker(tmp_path / "tansu.log", extra_args=("--authentication",)) as bootstrap:
        result = _genki_fails("topics", "create", "--bootstrap", bootstrap)
    assert result.returncode == 8


# -- the settings themselves -------------------------------------------------------------


def test_flags_override_the_environment_and_passwords_come_from_files(tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret\n")
    env = {"GENKI_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "GENKI_KAFKA_SASL_MECHANISM": "PLAIN",
           "GENKI_KAFKA_SASL_USERNAME": "env-user", "GENKI_KAFKA_SASL_PASSWORD": "env-pw"}

    class Args:
        sasl_mechanism = "SCRAM-SHA-512"
        sasl_username = "worker-1"
        sasl_password_file = str(password)

    security = security_from(Args(), env)
    assert (security.protocol, security.sasl_mechanism, security.sasl_username,
            security.sasl_password) == ("SASL_SSL", "SCRAM-SHA-512", "worker-1", "s3cret")
    assert security_from(None, env).sasl_password == "env-pw"
    assert "s3cret" not in repr(security)


def test_every_client_gets_the_configured_security(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    configure_security(KafkaSecurity("SASL_SSL", "SCRAM-SHA-256", "api", "pw",
                                     ssl_cafile=str(pki.ca)).check())
    try:
        settings = consumer_settings("127.0.0.1:9093", "api")
        assert settings["security_protocol"] == "SASL_SSL"
        assert settings["sasl_mechanism"] == "SCRAM-SHA-256"
        assert settings["sasl_plain_username"] == "api"
        assert settings["ssl_context"].check_hostname is True
    finally:
        configure_security(None)
    assert current_security().protocol in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")


@pytest.mark.parametrize(("security", "names"), [
    (KafkaSecurity("SASL_SSL"), "--sasl-mechanism"),
    (KafkaSecurity("SASL_SSL", "SCRAM-SHA-256"), "--sasl-username"),
    (KafkaSecurity("PLAINTEXT", "PLAIN", "u", "p"), "SASL settings given"),
    (KafkaSecurity("PLAINTEXT", ssl_cafile="/ca.pem"), "TLS files given"),
    (KafkaSecurity("SSL", ssl_certfile="/c.pem"), "--ssl-keyfile"),
    (KafkaSecurity("SSL", ssl_cafile="/nonexistent/ca.pem"), "does not exist"),
])
def test_incomplete_or_contradictory_settings_are_usage_errors(security: KafkaSecurity,
                                                               names: str) -> None:
    with pytest.raises(KafkaSecurityError, match=names):
        security.check()


@pytest.mark.parametrize("command", [
    ["worker", "--data-dir", "d"], ["publish", "x.ndjson"], ["topics", "create"],
    ["serve", "--bootstrap", "b:9093"], ["replay", "--source", "kafka", "--to", "out"],
])
def test_every_kafka_command_takes_the_tls_and_sasl_flags(command: list[str]) -> None:
    from engine.cli import build_parser

    flags = ["--security-protocol", "SASL_SSL", "--sasl-mechanism", "SCRAM-SHA-256",
             "--sasl-username", "u", "--sasl-password-file", "/p", "--ssl-cafile", "/ca.pem",
             "--ssl-certfile", "/c.pem", "--ssl-keyfile", "/k.pem",
             "--record-keys", "/r.json", "--wrap-keys", "/w.json"]
    args = build_parser().parse_args([*command, *flags])
    assert (args.security_protocol, args.sasl_mechanism, args.sasl_username,
            args.sasl_password_file, args.ssl_cafile, args.ssl_certfile, args.ssl_keyfile) == (
        "SASL_SSL", "SCRAM-SHA-256", "u", "/p", "/ca.pem", "/c.pem", "/k.pem")
    assert (str(args.record_keys), str(args.wrap_keys)) == ("/r.json", "/w.json")
