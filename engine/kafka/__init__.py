"""The Kafka runtime: topics, the reference gateway, and consumer-group workers.

Each worker owns whole user partitions: partition N of every input topic (all
keyed by user_id, all with the same partition count) is processed together into
a partition data directory `<data-dir>/p<N>/` holding that partition's
EmbeddedLog and ledger, by the same pure core as the embedded runtime.

Modules: `topics` (names, configs, creation), `client` (shared client
settings), `publish` (the reference gateway), `assignor` (co-partitioned
assignment), `partition` (one partition's stores and pipeline), `worker` (the
consumer-group loop), `cli`.
"""
