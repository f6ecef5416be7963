"""The forked award writer (engine.ledger.writer): the appends `Ledger.append_awards` makes,
errors raised by the caller as its own, and one fate for the pair under kill -9."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.entries import EntryDraft
from engine.ledger import Ledger
from engine.ledger.errors import EntryExistsWithDifferent
from engine.ledger.writer import AwardWriter
from engine.schemas import EntryKind
from tests.test_ledger_awards import awards_batch


def _contents(data_dir: Path) -> tuple[dict, dict]:
    with Ledger.open(data_dir) as ledger:
        assert ledger.verify().ok
        head = ledger.head()
        return ({key: head[key] for key in ("entries", "points_outstanding", "content_digest")},
                {"meta": ledger.get_meta("position")})


def test_the_writer_appends_what_append_awards_appends(tmp_path: Path) -> None:
    rng = random.Random(7)
    ids: list[str] = []
    batches = [awards_batch(rng, 300, ids) for _ in range(4)]
    here, forked = tmp_path / "here", tmp_path / "forked"
    with Ledger.open(here) as ledger:
        for n, batch in enumerate(batches):
            ledger.append_awards(batch, meta={"position": str(n)})
    writer = AwardWriter.start(forked)
    assert writer is not None
    try:
        with Ledger.open(forked) as ledger:
            for n, batch in enumerate(batches):
                writer.submit(ledger, batch, (), {"position": str(n)})
                writer.wait()
    finally:
        writer.close()
    assert _contents(forked) == _contents(here)


def test_an_append_the_writer_refuses_is_raised_by_the_caller(tmp_path: Path) -> None:
    rng = random.Random(8)
    ids: list[str] = []
    first, second = awards_batch(rng, 50, ids), awards_batch(rng, 50, ids)
    clash = EntryDraft(second.entry_id[3], "P00001", EntryKind.award, 999_999, "2024-04-29", 1,
                       "other", None, "r1")
    writer = AwardWriter.start(tmp_path)
    assert writer is not None
    try:
        with Ledger.open(tmp_path) as ledger:
            ledger.append([clash])
            writer.submit(ledger, first, (), {"position": "1"})
            writer.wait()
            writer.submit(ledger, second, (), {"position": "2"})
            with pytest.raises(EntryExistsWithDifferent):
                writer.wait()
            third = awards_batch(rng, 50, ids)  # later appends go on, in this process
            writer.submit(ledger, third, (), {"position": "3"})
            writer.wait()
            assert ledger.get_meta("position") == "3"
            assert ledger.head()["entries"] == 1 + 50 + 50
    finally:
        writer.close()
