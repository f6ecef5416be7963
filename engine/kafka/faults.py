"""Crash points: a real SIGKILL at a named step, for restart tests.

`GENKI_KAFKA_CRASH_AT="<point>:<n>"` makes the worker kill itself with SIGKILL
(no cleanup, no flush: what a power cut or OOM kill does) the n-th time it
reaches <point>. Unset, a crash point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "GENKI_KAFKA_CRASH_AT"
POINTS: tuple[str, ...] = (
    "after_ingest",    # inputs stored, pipeline not run
    "after_pipeline",  # ledger durable, nothing published
    "after_publish",   # outputs acknowledged, Kafka offsets not committed
    "after_commit",    # a whole cycle done
)
_hits: dict[str, int] = {}


def crash_point(point: str) -> None:
    assert point in POINTS, point
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
