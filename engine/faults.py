"""Crash points: a real SIGKILL at a named step, for restart tests.

`GENKI_CRASH_AT="<point>:<n>"` makes the process kill itself with SIGKILL (no
cleanup, no flush: what a power cut or an OOM kill does) the n-th time it
reaches <point> (n defaults to 1). Unset, a crash point costs one environment
lookup. Every point is named here, once, with the step it follows, so a test
can walk all of them and a typo fails loudly instead of never firing.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "GENKI_CRASH_AT"
POINTS: dict[str, str] = {
    # Kafka worker cycle (engine/kafka/worker.py)
    "after_ingest": "Kafka inputs stored in the partition log, pipeline not run",
    "after_pipeline": "ledger durable, nothing published",
    "after_publish": "outputs acknowledged, Kafka offsets not committed",
    "after_commit": "a whole Kafka cycle done",
    # Embedded pipeline (engine/pipeline.py)
    "pipeline_before_append": "a chunk evaluated by the rules, ledger not yet written",
    "pipeline_after_append": "a chunk's entries and log position committed to the ledger",
    # Ledger (engine/ledger/store.py)
    "ledger_before_commit": "a ledger transaction's rows and commit record written, not committed",
    "ledger_after_commit": "an append's transaction committed (entries, flags, meta, commit)",
    "ledger_erase_before_checkpoint": "an erasure committed, WAL not yet truncated",
    # Erasure of a person (engine/erasure.py)
    "erasure_after_log": "a person's log rows deleted (and device enrolments), ledger not yet",
    "erasure_before_done": "every store erased, the audit log's done row not yet written",
    # HTTP API shop commands (engine/api/service.py)
    "api_after_claims": "a batch of shop requests claimed (api.sqlite), ledger not written",
    "api_after_ledger": "a batch's ledger transaction committed, no answer sent",
    # Engine snapshots (engine/snapshots.py)
    "snapshot_mid_write": "a snapshot's header written to its temporary file, arrays not",
    "snapshot_before_rename": "a snapshot's temporary file complete and fsynced, not renamed",
    "snapshot_after_rename": "a snapshot renamed into place, older ones not yet removed",
    # genki ingest (engine/ingest/cli.py)
    "ingest_after_batch": "a batch of input lines committed to the log, the next not yet stored",
    # Log archive (engine/ingest/log.py)
    "archive_before_commit": "archive Parquet files written, log rows not yet deleted",
    "convert_legacy_before_commit": "a log's one-row-per-record samples written as blocks,"
                                    " the rows not yet deleted nor committed",
}
_hits: dict[str, int] = {}


class CrashSpecError(ValueError):
    """GENKI_CRASH_AT names no known point or has a bad count."""


def parse_crash_spec(spec: str) -> tuple[str, int]:
    name, _, count = spec.partition(":")
    if name not in POINTS:
        raise CrashSpecError(f"{CRASH_ENV}={spec!r}: unknown crash point {name!r}; "
                             f"known: {', '.join(POINTS)}")
    if count and (not count.isdigit() or int(count) < 1):
        raise CrashSpecError(f"{CRASH_ENV}={spec!r}: count must be a positive integer")
    return name, int(count or 1)


def crash_point(point: str) -> None:
    assert point in POINTS, f"crash point {point!r} is not registered in engine/faults.py"
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    name, count = parse_crash_spec(spec)
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] >= count:
        os.kill(os.getpid(), signal.SIGKILL)
