"""The embedded runtime's pipeline: log → rules → ledger, crash safe.

The ledger's meta holds the last log position whose outputs it contains, written
in the same transaction as those outputs. A run first replays the processed part
of the log through the rules engine to rebuild its state (outputs discarded: they
are in the ledger already), then processes the rest in chunks. Because the
engine's output does not depend on how the log is chunked and entry ids come from
their causes, a run killed at any moment and started again ends with the ledger
of a run that was never interrupted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from engine.consent import PeriodIndex, lifecycle
from engine.errors import RulesError
from engine.faults import crash_point
from engine.ingest.log import EmbeddedLog
from engine.ledger import Ledger
from engine.rules.batch import ActivityBatch, Profiles, SampleBatch
from engine.rules.config import Rules, load_rules
from engine.rules.engine import RulesEngine, RulesOutput

RULES_DEFAULT_PATH = Path(__file__).resolve().parent.parent / "rules" / "default.toml"
LOG_RECORDS_PER_CHUNK = 20_000
META_LOG_POSITION = "log_position"
META_RULES_VERSION = "rules_version"


@dataclass
class RunSummary:
    position_before: int = 0
    position_after: int = 0
    samples: int = 0
    activities: int = 0
    awards_appended: int = 0
    points_awarded: int = 0
    flags_raised: int = 0
    flags_cleared: int = 0
    seconds: float = 0.0
    rules_version: str = ""
    points_by_rule: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def profiles_of(log: EmbeddedLog) -> Profiles:
    bodies = [orjson.loads(body) for body in log.profiles()]
    return Profiles(
        user_ids=[b["user_id"] for b in bodies],
        birth_year=np.array([b["birth_year"] for b in bodies], dtype=np.int16),
        sex=np.array([b["sex"] for b in bodies], dtype=object),
    )


def read_batches(log: EmbeddedLog, after: int, upto: int) -> tuple[SampleBatch, ActivityBatch]:
    samples = log.read_samples(after, upto)
    activities = log.read_activities(after, upto)
    return SampleBatch(**samples.__dict__), ActivityBatch(**activities.__dict__)


def chunks(after: int, upto: int, size: int) -> Iterator[tuple[int, int]]:
    assert size > 0
    for lo in range(after, upto, size):
        yield lo, min(lo + size, upto)


def open_engine(log: EmbeddedLog, rules: Rules) -> RulesEngine:
    away = lifecycle(log.lifecycle_events()).away_periods()
    return RulesEngine(rules, profiles_of(log), away=PeriodIndex(away) if away else None)


class Pipeline:
    """The rules engine over one log and ledger, kept open between runs.

    The first run (and any run after `invalidate`) rebuilds the engine's state
    by replaying the processed part of the log; later runs feed it only what is
    new. A worker that runs once per fetched batch thus pays the replay once,
    not once per batch. New profiles change the engine's inputs (step targets):
    the caller invalidates, and the next run replays.
    """

    def __init__(self, rules: Rules, chunk_records: int = LOG_RECORDS_PER_CHUNK) -> None:
        assert chunk_records > 0
        self.rules = rules
        self.chunk_records = chunk_records
        self._engine: RulesEngine | None = None
        self._position = -1  # log position the in-memory engine has seen

    def invalidate(self) -> None:
        self._engine, self._position = None, -1

    def run(self, log: EmbeddedLog, ledger: Ledger,
            on_chunk: Callable[[int, int], None] | None = None) -> RunSummary:
        """Process the log past the ledger's position into the ledger."""
        _check_rules_version(ledger, self.rules)
        done = int(ledger.get_meta(META_LOG_POSITION) or 0)
        end = log.position()
        summary = RunSummary(position_before=done, position_after=max(done, end),
                             rules_version=self.rules.version)
        if end <= done:
            return summary
        engine = self._engine_at(log, done)
        for lo, hi in chunks(done, end, self.chunk_records):
            samples, activities = read_batches(log, lo, hi)
            output = engine.process(samples, activities)
            self._position = -1  # unknown until the append below commits
            crash_point("pipeline_before_append")
            ledger.append(output.awards, flags=output.flags,
                          meta={META_LOG_POSITION: str(hi), META_RULES_VERSION: self.rules.version})
            self._position = hi
            crash_point("pipeline_after_append")
            _count(summary, samples, activities, output)
            if on_chunk is not None:
                on_chunk(hi - lo, summary.samples)
        _settle_leavers(log, ledger, self.rules)
        return summary

    def _engine_at(self, log: EmbeddedLog, done: int) -> RulesEngine:
        if self._engine is None or self._position != done:
            self._engine = open_engine(log, self.rules)
            for lo, hi in chunks(0, done, self.chunk_records):
                self._engine.process(*read_batches(log, lo, hi))
            self._position = done
        return self._engine


def run_pipeline(
    data_dir: Path, rules_path: Path | None = None, *, chunk_records: int = LOG_RECORDS_PER_CHUNK,
    on_chunk: Callable[[int, int], None] | None = None,
) -> RunSummary:
    """Process everything pending in data_dir's log into its ledger."""
    started = time.perf_counter()
    pipeline = Pipeline(load_rules(rules_path or RULES_DEFAULT_PATH), chunk_records)
    with EmbeddedLog.open(data_dir, writer=False) as log, Ledger.open(data_dir) as ledger:
        summary = pipeline.run(log, ledger, on_chunk)
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _settle_leavers(log: EmbeddedLog, ledger: Ledger, rules: Rules) -> None:
    """Close the balances of people who left, when the rules say so (engine.leaving)."""
    if rules.leaving is None or rules.leaving.balance != "settle":
        return
    from engine.leaving import settlement_drafts

    drafts = settlement_drafts(ledger, lifecycle(log.lifecycle_events()).away_periods(), rules)
    if drafts:
        ledger.append(drafts)


def _check_rules_version(ledger: Ledger, rules: Rules) -> None:
    stored = ledger.get_meta(META_RULES_VERSION)
    if stored is not None and stored != rules.version:
        raise RulesError(
            f"this ledger was built with rules version {stored}, but the rules given are "
            f"version {rules.version}; awards already made cannot change under a live ledger. "
            "Compare with `genki whatif --rules FILE`, or start a new data directory.")


def _count(summary: RunSummary, samples: SampleBatch, activities: ActivityBatch,
           output: RulesOutput) -> None:
    summary.samples += len(samples.ts_ms)
    summary.activities += len(activities.ts_ms)
    for draft in output.awards:
        summary.awards_appended += 1
        summary.points_awarded += draft.points
        family = (draft.rule or "").split(".")[0]
        summary.points_by_rule[family] = summary.points_by_rule.get(family, 0) + draft.points
    for flag in output.flags:
        if flag.state == "raised":
            summary.flags_raised += 1
        else:
            summary.flags_cleared += 1
