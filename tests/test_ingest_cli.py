from __future__ import annotations

import subprocess
from pathlib import Path

import orjson

from engine.schemas import DeadLetter
from tests.conftest import genki_cmd
from tests.test_ingest import T0, segment


def _run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(genki_cmd(*args), input=stdin, capture_output=True, check=False)


def test_ingest_from_stdin_prints_counts_as_json(data_dir: Path) -> None:
    lines = orjson.dumps(segment("u1", [T0, T0 + 60_000], [1.0, 2.0])) + b"\n\nnot json\n"
    result = _run("ingest", "-", "--json", "--data-dir", str(data_dir), stdin=lines)
    assert result.returncode == 0, result.stderr
    counts = orjson.loads(result.stdout)
    assert {k: counts[k] for k in ("received", "accepted", "rejected", "duplicate_samples",
                                   "accepted_samples")} == {
        "received": 2, "accepted": 1, "rejected": 1, "duplicate_samples": 0, "accepted_samples": 2}


def test_dlq_json_lines_are_dead_letter_wire_records(data_dir: Path) -> None:
    _run("ingest", "-", "--data-dir", str(data_dir), stdin=b"{oops\n")
    result = _run("dlq", "--json", "--data-dir", str(data_dir))
    (line,) = result.stdout.splitlines()
    body = orjson.loads(line)
    body.pop("id")
    letter = DeadLetter.model_validate(body)
    assert letter.source == "stdin" and letter.offset == 1
    assert letter.reason.startswith("invalid_json: record: ")


def test_a_dead_letter_names_its_own_line_number_after_blank_lines(data_dir: Path) -> None:
    good = orjson.dumps(segment("u1", [T0], [1.0]))
    lines = b"\n".join([good, b"", b"   ", b"not json", b"\r", b"{oops", good]) + b"\n"
    _run("ingest", "-", "--data-dir", str(data_dir), stdin=lines)
    result = _run("dlq", "--json", "--data-dir", str(data_dir))
    offsets = [orjson.loads(line)["offset"] for line in result.stdout.splitlines()]
    assert offsets == [4, 6]  # the lines' numbers in the input, blank lines counted


def test_ingest_of_a_directory_reads_its_ndjson_files_in_name_order(tmp_path: Path,
                                                                     data_dir: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "b.ndjson").write_bytes(orjson.dumps(segment("u2", [T0 + 1], [1.0])) + b"\n")
    (tmp_path / "in" / "a.ndjson").write_bytes(orjson.dumps(segment("u1", [T0], [1.0])) + b"\n")
    (tmp_path / "in" / "notes.txt").write_text("not a record")
    result = _run("ingest", str(tmp_path / "in"), "--json", "--data-dir", str(data_dir))
    assert orjson.loads(result.stdout)["accepted"] == 2


def test_missing_input_file_is_a_usage_error(data_dir: Path) -> None:
    result = _run("ingest", "/nonexistent/file.ndjson", "--data-dir", str(data_dir))
    assert result.returncode == 2
    assert b"no such file or directory: /nonexistent/file.ndjson" in result.stderr


def test_a_batch_size_outside_its_limits_is_a_usage_error(data_dir: Path) -> None:
    line = orjson.dumps(segment("u1", [T0], [1.0])) + b"\n"
    for size in ("0", "20001"):
        result = _run("ingest", "-", "--batch-lines", size, "--data-dir", str(data_dir),
                      stdin=line)
        assert result.returncode == 2
        assert b"--batch-lines: 1..20000" in result.stderr
    stored = _run("ingest", "-", "--batch-lines", "20000", "--json", "--data-dir",
                  str(data_dir), stdin=line)
    assert orjson.loads(stored.stdout)["accepted"] == 1
