"""The genki topics, their configs, and creating / checking them on a broker.

Every input topic and genki.ledger use the same partition count and the same
key (user_id, default murmur2 partitioner), so partition N of each holds the
same users and one worker owns all of a user's streams and ledger entries.
Inputs keep their records forever: a worker that takes over a partition
without its directory rebuilds it by re-reading the partition from offset 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from engine.errors import GenkiError
from engine.kafka.client import MESSAGE_BYTES_MAX, admin_settings, topic_name

PARTITIONS_DEFAULT = 12
PARTITIONS_MAX = 1_000
REPLICATION_DEFAULT = 1
RETENTION_FOREVER_MS = "-1"
FLAGS_RETENTION_MS = str(400 * 86_400_000)
DLQ_RETENTION_MS = str(30 * 86_400_000)
ADMIN_TIMEOUT_MS = 30_000

PROFILES = "genki.profiles"
CONSENT = "genki.consent"
SAMPLES = "genki.samples"
ACTIVITIES = "genki.activities"
REDEMPTIONS = "genki.redemptions"
LEDGER = "genki.ledger"
FLAGS = "genki.flags"
DLQ = "genki.dlq"
SNAPSHOTS = "genki.snapshots"
# Per-person data keys (engine.kafka.personal): compacted, key = user id, tombstone = erased.
KEYS = "genki.keys"
# Processing order within one partition and cycle: profiles before the samples
# they give targets to; redemptions after the awards that pay for them.
INPUT_TOPICS: tuple[str, ...] = (PROFILES, CONSENT, SAMPLES, ACTIVITIES, REDEMPTIONS)
LOG_TOPICS: tuple[str, ...] = (PROFILES, CONSENT, SAMPLES, ACTIVITIES)
COPARTITIONED_TOPICS: tuple[str, ...] = (*INPUT_TOPICS, LEDGER, FLAGS, KEYS)
# A tombstone's predecessors are compacted away within this long (crypto-shredding on the
# broker's disks), and the tombstone itself is kept this long for readers to see.
KEYS_COMPACTION_LAG_MS_MAX = str(86_400_000)
KEYS_SEGMENT_MS = str(3_600_000)
KEYS_TOMBSTONE_RETENTION_MS = str(7 * 86_400_000)


class TopicsError(GenkiError):
    exit_code = 7
    code = "kafka_topics"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    configs: dict[str, str] = field(default_factory=dict)
    why: str = ""


_INPUT = {"retention.ms": RETENTION_FOREVER_MS, "retention.bytes": "-1",
          "cleanup.policy": "delete", "max.message.bytes": str(MESSAGE_BYTES_MAX)}

TOPIC_SPECS: tuple[TopicSpec, ...] = (
    TopicSpec(PROFILES, {"cleanup.policy": "compact", "max.message.bytes": str(MESSAGE_BYTES_MAX),
                         "min.compaction.lag.ms": "3600000"},
              "latest profile per user; compacted, so never expires"),
    TopicSpec(CONSENT, _INPUT, "consent and membership changes with effective times; kept "
                               "forever (not compacted: the history decides consent periods)"),
    TopicSpec(SAMPLES, _INPUT, "sample segments; kept forever so partitions can be rebuilt"),
    TopicSpec(ACTIVITIES, _INPUT, "activity events; kept forever"),
    TopicSpec(REDEMPTIONS, _INPUT, "shop redemption and refund requests; kept forever"),
    TopicSpec(LEDGER, {"retention.ms": RETENTION_FOREVER_MS, "retention.bytes": "-1",
                       "cleanup.policy": "delete", "max.message.bytes": str(MESSAGE_BYTES_MAX)},
              "the journal: changelog of balances, restores redemptions on takeover"),
    TopicSpec(FLAGS, {"retention.ms": FLAGS_RETENTION_MS, "cleanup.policy": "delete"},
              "frailty flag changes (the ledger keeps them too)"),
    TopicSpec(KEYS, {"cleanup.policy": "compact", "min.compaction.lag.ms": "0",
                     "max.compaction.lag.ms": KEYS_COMPACTION_LAG_MS_MAX,
                     "segment.ms": KEYS_SEGMENT_MS, "min.cleanable.dirty.ratio": "0.01",
                     "delete.retention.ms": KEYS_TOMBSTONE_RETENTION_MS},
              "per-person data keys, wrapped; a tombstone erases a person (compacted)"),
    TopicSpec(SNAPSHOTS, {"cleanup.policy": "compact", "max.message.bytes": str(MESSAGE_BYTES_MAX),
                          "min.compaction.lag.ms": "3600000"},
              "rules and dedup state per partition at a log position, in chunks keyed by "
              "partition and chunk (compacted: the latest snapshot survives); a new owner "
              "without the partition's directory starts from it"),
    TopicSpec(DLQ, {"retention.ms": DLQ_RETENTION_MS, "cleanup.policy": "delete",
                    "max.message.bytes": str(2 * MESSAGE_BYTES_MAX)},
              "rejected inputs with reasons (each partition log keeps its own too)"),
)


@dataclass(frozen=True)
class TopicResult:
    name: str
    partitions: int
    created: bool


def admin_client(bootstrap: str) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**admin_settings(bootstrap, "admin", ADMIN_TIMEOUT_MS))


async def create_topics(bootstrap: str, partitions: int = PARTITIONS_DEFAULT,
                        replication: int = REPLICATION_DEFAULT,
                        prefix: str = "") -> list[TopicResult]:
    """Create the missing genki topics; check that existing ones are co-partitioned.

    Safe to run again (a deployment's init job runs it on every start).
    """
    if not 1 <= partitions <= PARTITIONS_MAX:
        raise TopicsError(f"--partitions must be 1..{PARTITIONS_MAX}, got {partitions}")
    admin = admin_client(bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [spec for spec in TOPIC_SPECS if topic_name(prefix, spec.name) not in existing]
        if missing:
            response = await admin.create_topics(
                [NewTopic(topic_name(prefix, spec.name), partitions, replication,
                          topic_configs=dict(spec.configs)) for spec in missing],
                timeout_ms=ADMIN_TIMEOUT_MS)
            _raise_on_errors(response.topic_errors)
        counts = await partition_counts(admin, [topic_name(prefix, s.name) for s in TOPIC_SPECS])
    finally:
        await admin.close()
    created = {topic_name(prefix, spec.name) for spec in missing}
    check_copartitioned(counts, prefix)
    return [TopicResult(name, counts[name], name in created) for name in counts]


def _raise_on_errors(topic_errors: list) -> None:
    topic_already_exists = 36
    for name, code, message in (tuple(error)[:3] for error in topic_errors):
        if code not in (0, topic_already_exists):
            raise TopicsError(f"creating topic {name} failed: error {code} {message or ''}")


async def partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for described in await admin.describe_topics(names):
        if described["error_code"] != 0:
            raise TopicsError(f"topic {described['topic']} is missing (error "
                              f"{described['error_code']}); run `genki topics create`")
        counts[described["topic"]] = len(described["partitions"])
    return counts


def check_copartitioned(counts: dict[str, int], prefix: str) -> int:
    """The common partition count of the co-partitioned topics, or TopicsError."""
    names = [topic_name(prefix, name) for name in COPARTITIONED_TOPICS]
    missing = [name for name in names if name not in counts]
    if missing:
        raise TopicsError(f"topic {missing[0]} is missing; run `genki topics create`")
    found = {name: counts[name] for name in names}
    if len(set(found.values())) != 1:
        listing = ", ".join(f"{name}={count}" for name, count in found.items())
        raise TopicsError("input topics and genki.ledger must have the same partition count "
                          f"(users are co-partitioned by user_id); found {listing}")
    return next(iter(found.values()))
