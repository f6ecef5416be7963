"""Signed heads: a consistent rewrite by someone without the private key is detected."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import orjson
import pytest

from engine.cli import main
from engine.config import SIGNING_KEY_ENV
from engine.errors import LedgerError, UsageError
from engine.ledger import GENESIS_HASH, Ledger, canonical_bytes, chain_hash
from engine.ledger.canonical import dumps
from engine.ledger.signing import create_key_pair, load_verifier
from tests.test_ledger import TS_MS, award, flag


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A signing key pair kept outside every test's data directory."""
    private, public, _ = create_key_pair(tmp_path_factory.mktemp("keys") / "ledger-signing")
    return private, public


@pytest.fixture(scope="module")
def other_public_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_key_pair(tmp_path_factory.mktemp("other") / "other")[1]


def fill(data_dir: Path, signing_key: Path | None) -> None:
    """Four commits: awards (two appends), a redemption, flags with the processed position."""
    with Ledger.open(data_dir, signing_key=signing_key) as ledger:
        ledger.append([award("P1", 10, 1), award("P2", 5, 2)], meta={"log_position": "1"})
        ledger.append([award("P1", 7, 3), award("P2", 3, 4)], meta={"log_position": "2"})
        ledger.redeem("P1", 4, "S1", "T1", "k1", TS_MS + 1)
        ledger.append([], flags=[flag("f1", "P2", "raised", "2024-05-01")],
                      meta={"log_position": "3"})


def rewrite_points(path: Path, seq: int, points: int) -> None:
    """The attack: edit one entry's points and recompute every hash, commit and balance.

    What someone who can write the file (but holds no signing key) can do
    with the public spec: the signatures stay as they were.
    """
    raw = sqlite3.connect(path)
    triggers = dict(raw.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
                                "AND name IN ('journal_no_update', 'commits_no_update')"))
    for name in triggers:
        raw.execute(f"DROP TRIGGER {name}")
    raw.execute("UPDATE journal SET points = ? WHERE seq = ?", (points, seq))
    prev = raw.execute("SELECT hash FROM journal WHERE seq = ?", (seq - 1,)).fetchone()
    prev_hash = prev[0] if prev else GENESIS_HASH
    for row in raw.execute("SELECT seq, subject, entry, kind, points, day, ts_ms, rule, ref, "
                           "rules_version FROM journal WHERE seq >= ? ORDER BY seq",
                           (seq,)).fetchall():
        digest = chain_hash(prev_hash, canonical_bytes(*row))
        raw.execute("UPDATE journal SET prev_hash = ?, hash = ? WHERE seq = ?",
                    (prev_hash, digest, row[0]))
        prev_hash = digest
    hashes = dict(raw.execute("SELECT seq, hash FROM journal"))
    prev_hash = GENESIS_HASH
    for number, body in raw.execute("SELECT seq, body FROM commits ORDER BY seq").fetchall():
        record = orjson.loads(body)
        head_seq = record["entries"][0]
        record["entries"] = [head_seq, hashes[head_seq] if head_seq else GENESIS_HASH]
        new_body = dumps(record)
        digest = chain_hash(prev_hash, new_body)
        raw.execute("UPDATE commits SET body = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                    (new_body.decode(), prev_hash, digest, number))
        prev_hash = digest
    raw.execute("UPDATE balances SET points = (SELECT SUM(j.points) FROM journal AS j "
                "JOIN entry_links AS l ON l.seq = j.seq WHERE l.user_id = balances.user_id)")
    for sql in triggers.values():
        raw.execute(sql)
    raw.commit()
    raw.close()


def test_keys_signing_create_writes_a_private_0600_and_a_public_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys" / "head"
    assert main(["keys", "signing", "create", "--out", str(out), "--json"]) == 0
    created = orjson.loads(capsys.readouterr().out)
    assert created["private_key"] == str(out)
    assert created["public_key"] == str(out) + ".pub"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert load_verifier(Path(created["public_key"])).key_id == created["key_id"]
    assert main(["keys", "signing", "create", "--out", str(out)]) == UsageError.exit_code


def test_every_commit_is_signed_and_verifies(data_dir: Path, keys: tuple[Path, Path]) -> None:
    fill(data_dir, keys[0])
    with Ledger.open(data_dir) as ledger:
        result = ledger.verify(public_key=load_verifier(keys[1]))
        assert result.ok, result.problem
        assert (result.commits_checked, result.signatures_checked) == (4, 4)
        assert ledger.head()["signed_by"] == load_verifier(keys[1]).key_id


def test_signatures_by_another_key_fail(data_dir: Path, keys: tuple[Path, Path],
                                        other_public_key: Path) -> None:
    fill(data_dir, keys[0])
    with Ledger.open(data_dir) as ledger:
        result = ledger.verify(public_key=load_verifier(other_public_key))
    assert (result.ok, result.first_bad_commit, result.first_bad_seq) == (False, 1, 1)


def test_consistent_rewrite_passes_plain_verify_but_fails_with_the_public_key(
        data_dir: Path, keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    fill(data_dir, keys[0])
    rewrite_points(data_dir / "ledger.sqlite", 3, 700)  # P1's second award: 7 → 700
    with Ledger.open(data_dir) as ledger:
        assert ledger.balance("P1") == 10 + 700 - 4
        plain = ledger.verify()
        assert plain.ok, plain.problem
        signed = ledger.verify(public_key=load_verifier(keys[1]))
    assert (signed.ok, signed.first_bad_commit, signed.first_bad_seq) == (False, 2, 3)
    assert "rewritten after it was signed" in signed.problem
    base = ["--data-dir", str(data_dir)]
    assert main(["ledger", "verify", *base]) == 0
    capsys.readouterr()
    assert main(["ledger", "verify", "--public-key", str(keys[1]), *base]) == 6
    assert "first bad seq 3: first bad commit 2:" in capsys.readouterr().err


def test_a_tail_appended_without_the_key_fails_with_the_public_key(
        data_dir: Path, keys: tuple[Path, Path]) -> None:
    fill(data_dir, keys[0])
    with Ledger.open(data_dir) as ledger:  # no signing key: an unsigned commit
        ledger.append([award("P3", 99, 9)])
        result = ledger.verify(public_key=load_verifier(keys[1]))
        assert ledger.verify().ok
    assert (result.ok, result.first_bad_commit) == (False, 5)
    assert "newest commit 5 is not signed" in result.problem


def test_signed_head_is_witnessed_and_a_rewrite_loses_it(
        data_dir: Path, keys: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    fill(data_dir, keys[0])
    base = ["--data-dir", str(data_dir)]
    assert main(["ledger", "head", "--signed", *base]) == 0
    head = orjson.loads(capsys.readouterr().out)
    assert (head["seq"], head["key_id"]) == (4, load_verifier(keys[1]).key_id)
    assert head["commit"]["flags"][0] == 1 and head["meta"] == {"log_position": "3"}
    witness = tmp_path / "head.json"
    witness.write_bytes(orjson.dumps(head))
    with Ledger.open(data_dir, signing_key=keys[0]) as ledger:
        ledger.append([award("P1", 1, 5)], meta={"log_position": "4"})  # the chain goes on
    check = ["ledger", "verify", "--public-key", str(keys[1]), "--witness", str(witness), *base]
    assert main(check) == 0
    assert "witnessed head found" in capsys.readouterr().out
    rewrite_points(data_dir / "ledger.sqlite", 1, 1000)
    assert main(check) == 6
    assert "first bad commit" in capsys.readouterr().err
    with Ledger.open(data_dir) as ledger:
        result = ledger.verify(public_key=None, witness=None)
        assert result.ok
        with pytest.raises(UsageError, match="needs --public-key"):
            ledger.verify(witness=head)


def test_witness_check_names_a_rewritten_head(data_dir: Path, keys: tuple[Path, Path]) -> None:
    fill(data_dir, keys[0])
    with Ledger.open(data_dir, signing_key=keys[0]) as ledger:
        head = ledger.signed_head()
    rewrite_points(data_dir / "ledger.sqlite", 1, 1000)
    with Ledger.open(data_dir, signing_key=keys[0]) as ledger:
        ledger.append([award("P1", 1, 6)])  # re-signed from here on by the key holder
        result = ledger.verify(public_key=load_verifier(keys[1]), witness=head)
    assert not result.ok and result.first_bad_commit == 1


def test_head_signed_seals_an_unsigned_head_when_given_the_key(
        data_dir: Path, keys: tuple[Path, Path]) -> None:
    fill(data_dir, None)
    with Ledger.open(data_dir) as ledger, pytest.raises(LedgerError, match="not signed"):
        ledger.signed_head()
    with Ledger.open(data_dir, signing_key=keys[0]) as ledger:
        head = ledger.signed_head()
        assert head["seq"] == 5 and head["commit"]["meta"] == {}
        assert ledger.verify(public_key=load_verifier(keys[1])).ok


def test_signing_key_from_the_environment(data_dir: Path, keys: tuple[Path, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIGNING_KEY_ENV, str(keys[0]))
    with Ledger.open(data_dir) as ledger:
        ledger.append([award("P1", 1, 1)])
        assert ledger.signing_key_id == load_verifier(keys[1]).key_id
    monkeypatch.delenv(SIGNING_KEY_ENV)
    with Ledger.open(data_dir) as ledger:
        assert ledger.signing_key_id is None
        assert ledger.verify(public_key=load_verifier(keys[1])).signatures_checked == 1


def test_cli_signing_key_flag_signs_a_redemption(data_dir: Path, keys: tuple[Path, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIGNING_KEY_ENV, "")  # main() sets it from the flag; undone after
    with Ledger.open(data_dir) as ledger:
        ledger.append([award("P1", 10, 1)])
    assert main(["redeem", "P1", "3", "--shop", "S1", "--terminal", "T1", "--key", "k",
                 "--data-dir", str(data_dir), "--signing-key", str(keys[0])]) == 0
    with Ledger.open(data_dir) as ledger:
        result = ledger.verify(public_key=load_verifier(keys[1]))
    assert result.ok and result.signatures_checked == 1


def test_a_signing_key_inside_the_data_directory_is_refused(data_dir: Path) -> None:
    private, _, _ = create_key_pair(data_dir / "signing")
    with pytest.raises(LedgerError, match="inside the data directory"):
        Ledger.open(data_dir, signing_key=private)


def test_keys_signing_create_refuses_a_path_inside_the_data_directory(data_dir: Path) -> None:
    out = data_dir / "signing"
    assert main(["keys", "signing", "create", "--out", str(out), "--data-dir",
                 str(data_dir)]) == UsageError.exit_code
    assert not out.exists()
