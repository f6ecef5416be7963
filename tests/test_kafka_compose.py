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
    assert all(w["depends_on"]["topics"]["condition"] == "service_completed_successfully"
               for w in workers)


def test_genki_services_reach_kafka_on_its_internal_listener(services: dict[str, dict]) -> None:
    for name in ("topics", "worker-1", "worker-2"):
        command = services[name]["command"]
        assert command[command.index("--bootstrap") + 1] == "kafka:9092"
