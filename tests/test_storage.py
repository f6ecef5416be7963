"""Files genki writes are private: directories 0700, files 0600 (engine.storage)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from engine.storage import open_sqlite, private_umask
from tests.conftest import REPO_ROOT, genki_cmd


def genki(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(genki_cmd(*args), cwd=REPO_ROOT, capture_output=True, check=False,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def modes_under(root: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in sorted(root.rglob("*")):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


@pytest.fixture(scope="module")
def programme(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small programme run through the CLI with a umask that would share everything."""
    root = tmp_path_factory.mktemp("modes")
    pseudonym_key = tmp_path_factory.mktemp("secrets") / "pseudonym.key"
    pseudonym_key.write_bytes(b"k" * 32)
    data, simulated = root / "data", root / "simulated"
    env = {"GENKI_UMASK": ""}  # the default: private
    old = os.umask(0o002)
    try:
        genki("simulate", "--participants", "4", "--app-users", "4", "--days", "15",
              "--shops", "2", "--out", str(simulated), env=env)
        genki("ingest", str(simulated), "--data-dir", str(data), env=env)
        genki("run", "--data-dir", str(data), env=env)
        genki("keys", "create", "--role", "shop", "--shop", "S1", "--data-dir", str(data),
              env=env)
        genki("replay", "--to", str(data / "export"), "--k", "1", "--pseudonym-key-file",
              str(pseudonym_key), "--data-dir", str(data), env=env)
    finally:
        os.umask(old)
    return root


def test_every_directory_genki_writes_is_0700(programme: Path) -> None:
    directories = {name: mode for name, mode in modes_under(programme).items()
                   if name != "." and (programme / name).is_dir()}
    assert {"data", "simulated", "data/export"} <= set(directories)
    assert {name: oct(mode) for name, mode in directories.items() if mode != 0o700} == {}


def test_every_file_genki_writes_is_0600(programme: Path) -> None:
    files = {name: mode for name, mode in modes_under(programme).items()
             if name != "." and (programme / name).is_file()}
    assert {"data/ledger.sqlite", "data/api.sqlite"} <= set(files)
    assert any(name.endswith(".parquet") for name in files)
    assert {name: oct(mode) for name, mode in files.items() if mode != 0o600} == {}


def test_open_sqlite_creates_private_files_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        db = open_sqlite(tmp_path / "x.sqlite", busy_wait_s_max=1.0)
        db.execute("CREATE TABLE t (a)")
        db.execute("INSERT INTO t VALUES (1)")
        names = sorted(p.name for p in tmp_path.iterdir())
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in tmp_path.iterdir()}
        db.close()
    finally:
        os.umask(old)
    assert names == ["x.sqlite", "x.sqlite-shm", "x.sqlite-wal"]
    assert set(modes.values()) == {"0o600"}


def test_genki_umask_can_share_with_a_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENKI_UMASK", "027")
    old = private_umask()
    try:
        assert os.umask(0o077) == 0o027
    finally:
        os.umask(old)


def test_an_empty_data_directory_made_beforehand_becomes_private(tmp_path: Path) -> None:
    data = tmp_path / "made-by-hand"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    other = tmp_path / "not-genki"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    os.chmod(other, 0o755)
    genki("keys", "create", "--role", "app", "--data-dir", str(data), env={"GENKI_UMASK": ""})
    genki("status", "--data-dir", str(other), env={"GENKI_UMASK": ""})
    assert oct(stat.S_IMODE(data.stat().st_mode)) == "0o700"
    assert oct(stat.S_IMODE(other.stat().st_mode)) == "0o755"  # not genki's: left alone
