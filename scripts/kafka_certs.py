"""Create a private CA and the Kafka broker's TLS certificate for docker-compose (idempotent).

    python scripts/kafka_certs.py DIR [HOSTNAME ...]

Writes DIR/ca.pem (give it to clients: --ssl-cafile / GENKI_KAFKA_SSL_CAFILE),
DIR/ca.key (keep it offline after the first run), DIR/kafka.pem (the broker's
PKCS#8 key and certificate chain, Kafka's PEM keystore) for the host names given
(default: kafka, localhost). Existing files are kept, so a restart never
rotates the broker's certificate under its clients.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_VALID_DAYS = 825


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def main(directory: Path, hosts: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "kafka.pem").exists():
        print(f"{directory}/kafka.pem exists; kept")
        return
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("genki Kafka CA"))
          .issuer_name(_name("genki Kafka CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CERT_VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    _write_private(directory / "ca.key", _key_pem(ca_key))
    _write_private(directory / "kafka.pem",
                   _key_pem(key) + cert.public_bytes(pem) + ca.public_bytes(pem))
    print(f"wrote {directory}/ca.pem, ca.key, kafka.pem for {', '.join(hosts)}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2:] or ["kafka", "localhost"])
