"""Co-partitioned, sticky partition assignment for genki workers.

A worker must own partition N of *every* input topic at once (they hold the
same users), so the unit of assignment is the partition number, not the
topic-partition. Kafka's default assignors work per topic-partition and only
co-partition by accident. Numbers stay with the member that owned them before
when that keeps the split balanced, so a rebalance moves as few partition
directories between hosts as it can (a moved partition is rebuilt).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import orjson
from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

ASSIGNOR_NAME = "genki-copartitioned"
_VERSION = 0
log = logging.getLogger(__name__)


def assign_numbers(count: int, owned: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
    """Partition numbers 0..count-1 per member: balanced (sizes differ by at most
    one), members keep what they owned where the balance allows, deterministic."""
    assert count >= 0 and owned
    members = sorted(owned)
    quota_low, extra = divmod(count, len(members))
    # Members that owned the most keep the larger quotas (fewer moves).
    by_claim = sorted(members, key=lambda m: (-len(set(owned[m])), m))
    quota = {m: quota_low + (1 if rank < extra else 0) for rank, m in enumerate(by_claim)}
    result: dict[str, list[int]] = {m: [] for m in members}
    taken: set[int] = set()
    for member in members:
        for number in sorted(set(owned[member])):
            if 0 <= number < count and number not in taken and len(result[member]) < quota[member]:
                result[member].append(number)
                taken.add(number)
    free = [n for n in range(count) if n not in taken]
    for member in members:
        while len(result[member]) < quota[member]:
            result[member].append(free.pop(0))
    assert not free and sum(len(v) for v in result.values()) == count
    return {m: sorted(v) for m, v in result.items()}


class CoPartitionedAssignor(AbstractPartitionAssignor):
    """One instance per consumer: it remembers the numbers it owns for stickiness."""

    name = ASSIGNOR_NAME
    version = _VERSION

    def __init__(self) -> None:
        self.owned: list[int] = []

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:  # type: ignore[override]
        user_data = orjson.dumps({"owned": self.owned})
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), user_data)

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:  # type: ignore[override]
        self.owned = sorted({tp.partition for tp in assignment.partitions()})

    def assign(self, cluster: ClusterMetadata,  # type: ignore[override]
               members: Mapping[str, ConsumerProtocolMemberMetadata],
               ) -> dict[str, ConsumerProtocolMemberAssignment]:
        topics = sorted({topic for meta in members.values() for topic in meta.subscription})
        counts = {t: len(cluster.partitions_for_topic(t) or ()) for t in topics}
        count = min(counts.values(), default=0)
        if len(set(counts.values())) > 1:
            log.error("subscribed topics have different partition counts %s; assigning only "
                      "partitions 0..%d", counts, count - 1)
        numbers = assign_numbers(count, {m: _owned(meta) for m, meta in members.items()})
        return {
            member: ConsumerProtocolMemberAssignment(
                self.version,
                [(t, numbers[member]) for t in sorted(members[member].subscription)],
                b"")
            for member in members
        }


def _owned(meta: ConsumerProtocolMemberMetadata) -> list[int]:
    try:
        value = orjson.loads(meta.user_data or b"{}").get("owned", [])
    except (orjson.JSONDecodeError, AttributeError):
        return []
    return [n for n in value if isinstance(n, int)]
