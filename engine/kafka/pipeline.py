"""engine.pipeline.run_pipeline, kept open between a worker's batches.

run_pipeline rebuilds the rules engine's state by replaying the processed part
of the log on every call: right for a command that runs once, quadratic for a
worker that calls it once per fetched batch. This keeps one engine per
partition in memory and feeds it only what is new, with the same helpers, the
same chunking and the same ledger meta (position and rules version committed
with the entries), so the ledger is exactly the one run_pipeline would write
and either can continue where the other stopped. New profiles change the
engine's inputs (step targets), so they invalidate it: the next run replays,
as run_pipeline would.
"""

from __future__ import annotations

from pathlib import Path

from engine.errors import RulesError
from engine.ingest.log import EmbeddedLog
from engine.ledger import Ledger


class PartitionPipeline:
    def __init__(self, rules_path: Path | None) -> None:
        from engine.pipeline import RULES_DEFAULT_PATH
        from engine.rules.config import load_rules

        self.rules = load_rules(rules_path or RULES_DEFAULT_PATH)
        self._engine: object | None = None
        self._position = -1  # log position the in-memory engine has seen

    def invalidate(self) -> None:
        self._engine = None
        self._position = -1

    def run(self, log: EmbeddedLog, ledger: Ledger) -> dict[str, int]:
        """Process the log past the ledger's position; counts of what was appended."""
        from engine.pipeline import (
            LOG_RECORDS_PER_CHUNK,
            META_LOG_POSITION,
            META_RULES_VERSION,
            chunks,
            open_engine,
            read_batches,
        )

        stored = ledger.get_meta(META_RULES_VERSION)
        if stored is not None and stored != self.rules.version:
            raise RulesError(f"partition ledger was built with rules version {stored}, the "
                             f"worker runs {self.rules.version}; start the worker with the "
                             "rules the ledger was built with")
        done = int(ledger.get_meta(META_LOG_POSITION) or 0)
        end = log.position()
        counts = {"samples": 0, "activities": 0, "awards": 0, "flags": 0}
        if end <= done:
            return counts
        if self._engine is None or self._position != done:
            self._engine = open_engine(log, self.rules)
            for lo, hi in chunks(0, done, LOG_RECORDS_PER_CHUNK):
                self._engine.process(*read_batches(log, lo, hi))  # type: ignore[attr-defined]
            self._position = done
        for lo, hi in chunks(done, end, LOG_RECORDS_PER_CHUNK):
            samples, activities = read_batches(log, lo, hi)
            output = self._engine.process(samples, activities)  # type: ignore[attr-defined]
            self._position = -1  # unknown until the append below commits
            ledger.append(output.awards, flags=output.flags,
                          meta={META_LOG_POSITION: str(hi), META_RULES_VERSION: self.rules.version})
            self._position = hi
            counts["samples"] += len(samples.ts_ms)
            counts["activities"] += len(activities.ts_ms)
            counts["awards"] += len(output.awards)
            counts["flags"] += len(output.flags)
        return counts
