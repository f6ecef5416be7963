"""docker-compose.yml runs real genki commands against an Apache Kafka in KRaft mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from engine.cli import build_parser

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"
GENKI_SERVICES = {"topics": "topics", "worker-1": "worker", "worker-2": "worker", "api": "serve"}


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def test_kafka_is_the_official_image_in_kraft_mode(services: dict[str, dict]) -> None:
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert any(v.endswith(":/var/lib/kafka/data") for v in kafka["volumes"])


@pytest.mark.parametrize(("service", "subcommand"), sorted(GENKI_SERVICES.items()))
def test_service_command_is_a_genki_subcommand(services: dict[str, dict], service: str,
                                               subcommand: str) -> None:
    command = services[service]["command"]
    assert command[0] == subcommand
    parser = build_parser()
    if subcommand not in parser._subparsers._group_actions[0].choices:
        pytest.skip(f"`genki {subcommand}` is not built yet")
    args = parser.parse_args(command)
    assert callable(args.func)


def test_genki_services_use_the_genki_entrypoint_image(services: dict[str, dict]) -> None:
    images = {services[name]["image"] for name in GENKI_SERVICES}
    assert images == {"genki:local"}
    assert "ENTRYPOINT [\"genki\"]" in services["topics"]["build"]["dockerfile_inline"]


def test_workers_share_a_group_and_one_partitions_volume_the_api_reads(
        services: dict[str, dict]) -> None:
    workers = [services["worker-1"], services["worker-2"]]
    groups = {w["command"][w["command"].index("--group") + 1] for w in workers}
    volumes = {w["volumes"][0].split(":")[0] for w in workers}
    assert groups == {"genki"} and volumes == {"partitions"}
    api = services["api"]
    assert "partitions:/partitions:ro" in api["volumes"]
    command = api["command"]
    assert command[command.index("--partitions-dir") + 1] == "/partitions"
    assert command[command.index("--bootstrap") + 1] == "kafka:9092"
    assert all(w["depends_on"]["acls"]["condition"] == "service_completed_successfully"
               for w in workers)
    assert services["acls"]["depends_on"]["topics"]["condition"] == \
        "service_completed_successfully"


def _env(service: dict) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def test_genki_services_reach_kafka_on_its_internal_listener_with_sasl_over_tls(
        services: dict[str, dict]) -> None:
    for name in ("topics", "worker-1", "worker-2", "api"):
        env = _env(services[name])
        command = services[name]["command"]
        bootstrap = command[command.index("--bootstrap") + 1] if "--bootstrap" in command \
            else env["GENKI_BOOTSTRAP"]
        assert bootstrap == "kafka:9092"
        assert env["GENKI_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert env["GENKI_KAFKA_SSL_CAFILE"] == "/certs/ca.pem"
        assert env["GENKI_KAFKA_SASL_PASSWORD_FILE"].startswith("/run/secrets/")


def test_every_published_kafka_port_is_sasl_over_tls(services: dict[str, dict]) -> None:
    env = _env(services["kafka"])
    protocols = dict(item.split(":") for item in
                     env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    ports = {int(listener.rsplit(":", 1)[1]): listener.split("://")[0]
             for listener in env["KAFKA_LISTENERS"].split(",")}
    published = [int(str(p).split(":")[1].split("/")[0]) for p in services["kafka"]["ports"]]
    assert published == [9094]
    assert {protocols[ports[port]] for port in published} == {"SASL_SSL"}
    assert {name: protocol for name, protocol in protocols.items() if name != "CONTROLLER"} \
        == {"BROKER": "SASL_SSL", "EXTERNAL": "SASL_SSL"}
    assert "PLAINTEXT" not in {protocols[name] for name in ("BROKER", "EXTERNAL")}


def test_the_broker_denies_what_no_acl_allows(services: dict[str, dict]) -> None:
    env = _env(services["kafka"])
    assert env["KAFKA_AUTHORIZER_CLASS_NAME"].endswith("StandardAuthorizer")
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"


def _acl_grants(services: dict[str, dict]) -> list[tuple[str, set[str], set[str]]]:
    """(principal, operations, topics) of every kafka-acls.sh call of the acls job."""
    script = " ".join(services["acls"]["command"])
    grants = []
    for call in script.split("$$ACL")[1:]:
        words = call.replace("&&", " ").split()
        principal = words[words.index("--allow-principal") + 1]
        operations = {words[i + 1] for i, w in enumerate(words) if w == "--operation"}
        topics = {words[i + 1] for i, w in enumerate(words) if w == "--topic"}
        grants.append((principal, operations, topics))
    return grants


def test_only_the_api_may_write_redemptions_and_only_workers_the_outputs(
        services: dict[str, dict]) -> None:
    writers: dict[str, set[str]] = {}
    for principal, operations, topics in _acl_grants(services):
        if "Write" in operations:
            for topic in topics:
                writers.setdefault(topic, set()).add(principal)
    assert writers["genki.redemptions"] == {"User:api"}
    assert writers["genki.ledger"] == writers["genki.flags"] == writers["genki.dlq"] \
        == {"User:worker"}
    # the API's HTTP gateway (POST /v1/ingest) publishes inputs as a gateway does
    assert writers["genki.samples"] == writers["genki.activities"] \
        == writers["genki.profiles"] == writers["genki.consent"] \
        == {"User:gateway", "User:api"}
    assert writers["genki.keys"] == {"User:gateway", "User:api", "User:worker", "User:privacy"}


def test_passwords_come_from_compose_secrets_not_the_file(services: dict[str, dict]) -> None:
    text = COMPOSE.read_text()
    assert "GENKI_KAFKA_SASL_PASSWORD:" not in text
    assert all("${GENKI_KAFKA_ADMIN_PASSWORD:?" in value
               for key, value in _env(services["kafka"]).items() if key.endswith("JAAS_CONFIG")
               and "PlainLoginModule" in value)
