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

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from engine.consent import PeriodIndex, lifecycle
from engine.errors import RulesError
from engine.faults import crash_point
from engine.ingest.log import EmbeddedLog
from engine.ledger import Ledger
from engine.ledger.writer import AwardWriter
from engine.rules.batch import ActivityBatch, Profiles, SampleBatch
from engine.rules.config import Rules, load_rules
from engine.rules.engine import RulesEngine, RulesOutput
from engine.rules.risk import META_RULES_JSON
from engine.snapshots import SnapshotInfo, iter_valid, write_snapshot

log_line = logging.getLogger(__name__)

RULES_DEFAULT_PATH = Path(__file__).resolve().parent.parent / "rules" / "default.toml"
LOG_RECORDS_PER_CHUNK = 20_000
SNAPSHOT_INTERVAL_RECORDS = 200_000
# Snapshots mid-run are spaced by at least their own size / this many bytes per log
# position, so writing them stays a small share of a long catch-up run however large the
# state grows: the full fleet's state is ~300 MB (about 1.5 s to write and fsync), a
# catch-up run processes a position in ~50 us; 256 bytes a position puts a snapshot every
# ~1.2 M positions (~60 s of processing, also the most a crash makes a run re-read).
SNAPSHOT_BYTES_PER_RECORD = 256
META_LOG_POSITION = "log_position"
META_RULES_VERSION = "rules_version"


@dataclass
class _Chunk:
    """A chunk evaluated by the rules, its append in flight."""

    records: int
    samples: int
    activities: int
    output: RulesOutput


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
    snapshot_position: int | None = None  # where the rules state came from (None: in memory)
    replayed_records: int = 0  # processed positions re-read to rebuild the rules state

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
    from the newest valid snapshot plus the processed log after it (the whole
    processed log when there is none); later runs feed it only what is new. A
    snapshot is written after the ledger commits, at the end of a run and during
    it every `snapshot_interval` positions (`snapshot_records`, or the last
    snapshot's size / `snapshot_bytes_per_record` when that is more: a large state
    is written less often), with the state pruned to what rules can still read.
    New profiles change the engine's inputs (step targets): the caller
    invalidates, and snapshots of other profiles are not used.
    """

    def __init__(self, rules: Rules, chunk_records: int = LOG_RECORDS_PER_CHUNK, *,
                 snapshot_records: int = SNAPSHOT_INTERVAL_RECORDS,
                 snapshot_bytes_per_record: int = SNAPSHOT_BYTES_PER_RECORD,
                 snapshot_at_end: bool = True) -> None:
        assert chunk_records > 0 and snapshot_records > 0 and snapshot_bytes_per_record > 0
        self.rules = rules
        self._rules_json = rules.canonical_json().decode()  # in the ledger meta: severities
        self.chunk_records = chunk_records
        self.snapshot_records = snapshot_records
        self.snapshot_bytes_per_record = snapshot_bytes_per_record
        self.snapshot_at_end = snapshot_at_end
        self._engine: RulesEngine | None = None
        self._position = -1  # log position the in-memory engine has seen
        self._snapshot_position = -1  # position of the newest snapshot written or loaded
        self._snapshot_bytes = 0  # size of the newest snapshot written (0: none yet)
        self.snapshots_written = 0
        self.loaded: SnapshotInfo | None = None

    @property
    def snapshot_interval(self) -> int:
        """Positions between two mid-run snapshots, as the newest one's size sets it."""
        return max(self.snapshot_records,
                   -(-self._snapshot_bytes // self.snapshot_bytes_per_record))

    def invalidate(self) -> None:
        self._engine, self._position = None, -1

    def run(self, log: EmbeddedLog, ledger: Ledger,
            on_chunk: Callable[[int, int], None] | None = None, *,
            writer: AwardWriter | None = None) -> RunSummary:
        """Process the log past the ledger's position into the ledger.

        With a `writer` (engine.ledger.writer, started on the ledger's data directory),
        each chunk's append runs in its process while this one reads and evaluates the
        next chunk: the same appends in the same order, each committing its position.
        """
        _check_rules_version(ledger, self.rules)
        done = int(ledger.get_meta(META_LOG_POSITION) or 0)
        end = log.position()
        summary = RunSummary(position_before=done, position_after=max(done, end),
                             rules_version=self.rules.version)
        if end <= done:
            return summary
        engine = self._engine_at(log, done, summary)
        in_flight: _Chunk | None = None  # appending in the writer
        for lo, hi in chunks(done, end, self.chunk_records):
            samples, activities = read_batches(log, lo, hi)
            output = engine.process(samples, activities)
            self._position = -1  # unknown until every append below commits
            if in_flight is not None:
                self._appended(in_flight, summary, on_chunk, writer)
            crash_point("pipeline_before_append")
            meta = {META_LOG_POSITION: str(hi), META_RULES_VERSION: self.rules.version,
                    META_RULES_JSON: self._rules_json}
            in_flight = _Chunk(hi - lo, len(samples.ts_ms), len(activities.ts_ms), output)
            if writer is None:
                ledger.append_awards(output.award_entries, flags=output.flags, meta=meta)
            else:
                writer.submit(ledger, output.award_entries, output.flags, meta)
                ledger.copy_wal()  # the chunks before, while the writer appends this one
            snapshot_due = hi - self._snapshot_position >= self.snapshot_interval or (
                hi == end and self.snapshot_at_end)
            if writer is None or snapshot_due:  # a snapshot holds the state at hi: wait
                self._appended(in_flight, summary, on_chunk, writer)
                in_flight = None
                self._position = hi
                if snapshot_due:
                    self.snapshot(log)
        if in_flight is not None:
            self._appended(in_flight, summary, on_chunk, writer)
            self._position = end
        _settle_leavers(log, ledger, self.rules)
        return summary

    @staticmethod
    def _appended(chunk: _Chunk, summary: RunSummary,
                  on_chunk: Callable[[int, int], None] | None,
                  writer: AwardWriter | None) -> None:
        """The chunk's append has committed (waits for the writer's)."""
        if writer is not None:
            writer.wait()
        crash_point("pipeline_after_append")
        _count(summary, chunk.samples, chunk.activities, chunk.output)
        if on_chunk is not None:
            on_chunk(chunk.records, summary.samples)

    @property
    def engine_position(self) -> int:
        """Log position the in-memory engine has seen (-1: none or unknown)."""
        return self._position if self._engine is not None else -1

    def pruned_engine(self, log: EmbeddedLog, ledger: Ledger) -> RulesEngine:
        """The engine at the ledger's position (loaded if need be), pruned."""
        done = int(ledger.get_meta(META_LOG_POSITION) or 0)
        engine = self._engine_at(log, done, RunSummary())
        engine.prune(log.late_window_days_max())
        return engine

    def snapshot(self, log: EmbeddedLog, extra: dict[str, Any] | None = None) -> Path | None:
        """Write the engine's state at the position it has seen (the ledger holds it)."""
        if self._engine is None or self._position < 0 or log.data_dir is None:
            return None
        window = log.late_window_days_max()
        self._engine.prune(window)
        info = SnapshotInfo(self._position, self.rules.version, log.profiles_digest(), window,
                            extra or {})
        path = write_snapshot(log.data_dir, self._engine.state(), info)
        self._snapshot_position = self._position
        self._snapshot_bytes = path.stat().st_size
        self.snapshots_written += 1
        return path

    def _engine_at(self, log: EmbeddedLog, done: int, summary: RunSummary) -> RulesEngine:
        if self._engine is not None and self._position == done:
            return self._engine
        engine, at = self._from_snapshot(log, done)
        if at < done:
            summary.replayed_records = done - at
        if at == 0 and done > 0:
            log_line.warning("no usable engine snapshot in %s: replaying the whole processed log "
                             "(%d positions) to rebuild the rules state", log.data_dir, done)
        for lo, hi in chunks(at, done, self.chunk_records):
            engine.process(*read_batches(log, lo, hi))
        summary.snapshot_position = at
        self._engine, self._position = engine, done
        return engine

    def _from_snapshot(self, log: EmbeddedLog, done: int) -> tuple[RulesEngine, int]:
        self.loaded = None
        if log.data_dir is None or done == 0:
            return open_engine(log, self.rules), 0
        digest, window = log.profiles_digest(), log.late_window_days_max()
        for state, info in iter_valid(log.data_dir, done):
            why = _unusable(info, self.rules.version, digest, window)
            if why:
                log_line.warning("engine snapshot at position %d not used: %s", info.position, why)
                continue
            try:
                engine = open_engine(log, self.rules)
                engine.load_state(state)
            except (ValueError, KeyError, IndexError) as error:
                log_line.warning("engine snapshot at position %d not loadable (%s)",
                                 info.position, error)
                continue
            self.loaded = info
            self._snapshot_position = info.position
            return engine, info.position
        return open_engine(log, self.rules), 0


def _unusable(info: SnapshotInfo, rules_version: str, profiles_digest: str,
              window: int) -> str | None:
    if info.rules_version != rules_version:
        return f"rules version {info.rules_version}, not {rules_version}"
    if info.profiles_digest != profiles_digest:
        return "profiles changed since it was written"
    if info.late_window_days < window:
        return f"pruned for a {info.late_window_days}-day late window, log uses {window}"
    return None


def run_pipeline(
    data_dir: Path, rules_path: Path | None = None, *, chunk_records: int = LOG_RECORDS_PER_CHUNK,
    on_chunk: Callable[[int, int], None] | None = None,
) -> RunSummary:
    """Process everything pending in data_dir's log into its ledger."""
    started = time.perf_counter()
    pipeline = Pipeline(load_rules(rules_path or RULES_DEFAULT_PATH), chunk_records)
    writer = None
    if _pending_records(data_dir) > chunk_records:  # two chunks or more: the overlap pays
        writer = AwardWriter.start(data_dir)  # forked before this process opens the ledger
    try:
        with EmbeddedLog.open(data_dir, writer=False) as log, Ledger.open(data_dir) as ledger:
            summary = pipeline.run(log, ledger, on_chunk, writer=writer)
    finally:
        if writer is not None:
            writer.close()
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _pending_records(data_dir: Path) -> int:
    """Log positions past the ledger's, read on connections closed again before the fork."""
    with EmbeddedLog.open(data_dir, writer=False) as log:
        end = log.position()
    with Ledger.open(data_dir) as ledger:
        return end - int(ledger.get_meta(META_LOG_POSITION) or 0)


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


def _count(summary: RunSummary, samples: int, activities: int, output: RulesOutput) -> None:
    summary.samples += samples
    summary.activities += activities
    awards = output.award_entries
    summary.awards_appended += len(awards)
    summary.points_awarded += awards.points_total
    for rule, points in awards.points_by_rule().items():
        family = rule.split(".")[0]
        summary.points_by_rule[family] = summary.points_by_rule.get(family, 0) + points
    for flag in output.flags:
        if flag.state == "raised":
            summary.flags_raised += 1
        else:
            summary.flags_cleared += 1
