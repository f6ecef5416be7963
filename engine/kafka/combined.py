"""The Kafka runtime's ledger as one: all partition ledgers of a data directory.

Users are partitioned, so the partition ledgers hold disjoint entries; their
union is what the embedded runtime's single ledger holds for the same input,
and its content digest (engine.ledger.canonical, order independent) is the
same number.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
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
    """Ledgers holding disjoint users as one (an embedded data dir alone: that ledger).

    The partitions' entries are merged in entry_id order as they are read, so
    memory holds balances, not entries."""
    balances: dict[str, int] = {}
    owner: dict[str, Path] = {}
    rows_count = 0

    def contents(sources: Sequence[Iterator[tuple[tuple, Path]]]) -> Iterator[bytes]:
        nonlocal rows_count
        previous: str | None = None
        for row, directory in heapq.merge(*sources, key=lambda item: item[0][0]):
            assert row[0] != previous, f"duplicate entry_id {row[0]}"
            first = owner.setdefault(row[1], directory)
            assert first == directory, f"user {row[1]} has entries in {first} and " \
                                       f"{directory}: topics are not co-partitioned"
            balances[row[1]] = balances.get(row[1], 0) + row[3]
            rows_count += 1
            previous = row[0]
            yield content_bytes(*row)

    with ExitStack() as stack:
        sources, erased = [], []
        for directory in ledger_dirs:
            rows, part_erased = stack.enter_context(read_contents(directory / LEDGER_FILE_NAME))
            sources.append(zip(rows, itertools.repeat(directory)))
            erased.extend(part_erased)
        digest = content_digest(itertools.chain(contents(sources), sorted(erased)))
    return CombinedLedger(numbers or [], rows_count + len(erased), digest, dict(sorted(balances.items())),
                          sum(balances.values()))
