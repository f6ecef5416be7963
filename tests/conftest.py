from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "genki-data"
    path.mkdir()
    return path


def genki_cmd(*args: str) -> list[str]:
    """The genki CLI as a subprocess command line (a real process, not an import)."""
    return [sys.executable, "-m", "engine.cli", *args]


@pytest.fixture(autouse=True)
def _no_genki_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GENKI_HOME", raising=False)


@pytest.fixture(autouse=True, scope="session")
def _keys_dir_of_the_test_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Default Kafka key files (engine.kafka.keys) go to a directory of this run, never
    to the home directory of whoever runs the tests."""
    import os

    os.environ["GENKI_KEYS_DIR"] = str(tmp_path_factory.mktemp("genki-keys"))
