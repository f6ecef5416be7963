"""The Kafka runtime's ledger as one: all partition ledgers of a data directory.

Users are partitioned, so the partition ledgers hold disjoint entries; their
union is what the embedded runtime's single ledger holds for the same input,
and its content digest (engine.ledger.canonical, order independent) is the
same number.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from engine.kafka.partition import PARTITION_DIR_PREFIX
from engine.ledger import LEDGER_FILE_NAME
from engine.ledger.canonical import content_bytes, content_digest
from engine.ledger.store import read_contents


@dataclass(frozen=True)
class CombinedLedger:
    partitions: list[int]
    entries: int
    content_digest: str
    balances: dict[str, int]
    points_outstanding: int

    def as_dict(self) -> dict[str, object]:
        return {"partitions": self.partitions, "entries": self.entries,
                "content_digest": self.content_digest, "users": len(self.balances),
                "points_outstanding": self.points_outstanding}


def partition_numbers(data_dir: Path) -> list[int]:
    found = []
    for path in data_dir.glob(f"{PARTITION_DIR_PREFIX}*"):
        suffix = path.name[len(PARTITION_DIR_PREFIX):]
        if suffix.isdigit() and (path / LEDGER_FILE_NAME).exists():
            found.append(int(suffix))
    return sorted(found)


def combined_ledger(data_dir: Path) -> CombinedLedger:
    """The partition ledgers of a worker's data directory as one ledger."""
    numbers = partition_numbers(data_dir)
    return combine([data_dir / f"{PARTITION_DIR_PREFIX}{n}" for n in numbers], numbers)


def combine(ledger_dirs: list[Path], numbers: list[int] | None = None) -> CombinedLedger:
    """Ledgers holding disjoint users as one (an embedded data dir alone: that ledger)."""
    rows: list[tuple] = []
    erased: list[bytes] = []
    owner: dict[str, Path] = {}
    for directory in ledger_dirs:
        part, part_erased = read_contents(directory / LEDGER_FILE_NAME)
        erased.extend(part_erased)
        for row in part:
            previous = owner.setdefault(row[1], directory)
            assert previous == directory, f"user {row[1]} has entries in {previous} and " \
                                          f"{directory}: topics are not co-partitioned"
        rows.extend(part)
    rows.sort(key=lambda row: row[0].encode())
    assert all(a[0] != b[0] for a, b in itertools.pairwise(rows)), "duplicate entry_id"
    balances: dict[str, int] = {}
    for row in rows:
        balances[row[1]] = balances.get(row[1], 0) + row[3]
    digest = content_digest([content_bytes(*row) for row in rows] + sorted(erased))
    return CombinedLedger(numbers or [], len(rows) + len(erased), digest, dict(sorted(balances.items())),
                          sum(balances.values()))
