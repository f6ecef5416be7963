"""`genki whatif`: the whole history re-evaluated under other rules, the live ledger untouched.

The same vectorised core as the live pipeline runs over the embedded log from
its first position; its awards and flag events are compared per user with the
live ledger's awards and flags. Nothing is written to the data directory.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import GenkiError, UsageError
from engine.ingest.log import EmbeddedLog, UserShare
from engine.ledger import LEDGER_FILE_NAME, Ledger
from engine.pipeline import LOG_RECORDS_PER_CHUNK, chunks, open_engine, read_batches
from engine.rules.config import load_rules
from replay.export import Pseudonymiser, parse_window

WHATIF_WORKERS_MAX = 8
WHATIF_RECORDS_PER_WORKER_MIN = 200_000  # below, a worker (~1 s to start) saves nothing

DIFF_SCHEMA = pa.schema([("user", pa.string()), ("live_points", pa.int64()),
                         ("whatif_points", pa.int64()), ("delta_points", pa.int64()),
                         ("live_flags_raised", pa.int64()), ("whatif_flags_raised", pa.int64())])


@dataclass
class WhatIfResult:
    rules_version: str
    live_points: int = 0
    whatif_points: int = 0
    users_affected: int = 0
    users_total: int = 0
    flags_raised_live: int = 0
    flags_raised_whatif: int = 0
    flags_cleared_live: int = 0
    flags_cleared_whatif: int = 0
    samples: int = 0
    seconds: float = 0.0
    workers: int = 1
    peak_rss_mib: int = 0  # this process's peak plus each worker's: a bound on memory at once
    points_by_rule_whatif: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _in_window(day: str | None, window: tuple[str | None, str | None]) -> bool:
    since, until = window
    return day is None or ((since is None or day >= since) and (until is None or day <= until))


def _live(data_dir: Path, window: tuple[str | None, str | None]) -> tuple[Counter, Counter, Counter]:
    points: Counter = Counter()
    raised: Counter = Counter()
    cleared: Counter = Counter()
    if not (data_dir / LEDGER_FILE_NAME).exists():
        return points, raised, cleared
    with Ledger.open_read_only(data_dir) as ledger:
        points.update(ledger.award_points_by_user(*window))
        for rows in ledger.iter_flag_rows(("seq", "user_id", "day", "state")):
            for _, user, day, state in rows:
                if _in_window(day, window):
                    (raised if state == "raised" else cleared)[user] += 1
    return points, raised, cleared


@dataclass
class _Tally:
    """What-if awards per engine user index and per rule, summed from award columns."""

    window: tuple[int | None, int | None]
    points: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    awarded: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    by_rule: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    rule_awards: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def add(self, columns: tuple[np.ndarray, ...], users: int, rules: int) -> None:
        user, day, rule, _, amount = columns
        since, until = self.window
        keep = np.ones(len(day), bool)
        if since is not None:
            keep &= day >= since
        if until is not None:
            keep &= day <= until
        user, rule, amount = user[keep], rule[keep], amount[keep].astype(np.int64)
        self.points = _grown(self.points, users)
        self.awarded = _grown(self.awarded, users)
        self.by_rule = _grown(self.by_rule, rules)
        self.rule_awards = _grown(self.rule_awards, rules)
        if not len(user):
            return
        self.points += np.rint(np.bincount(user, weights=amount, minlength=users)).astype(np.int64)
        self.awarded |= np.bincount(user, minlength=users) > 0
        self.by_rule += np.rint(np.bincount(rule, weights=amount, minlength=rules)).astype(np.int64)
        self.rule_awards += np.bincount(rule, minlength=rules)


def _grown(values: np.ndarray, size: int) -> np.ndarray:
    if len(values) >= size:
        return values
    return np.concatenate([values, np.zeros(size - len(values), values.dtype)])


@dataclass
class _ShareResult:
    """One share's what-if: points per person, per rule family, flag events per person."""

    points: Counter
    by_family: dict[str, int]
    raised: Counter
    cleared: Counter
    samples: int
    peak_rss_mib: int = 0  # of the worker process (0: evaluated in the caller's)

    def to_json(self) -> bytes:
        return orjson.dumps({"points": self.points, "by_family": self.by_family,
                             "raised": self.raised, "cleared": self.cleared,
                             "samples": self.samples, "peak_rss_mib": _peak_rss_mib()})

    @classmethod
    def of_json(cls, data: bytes) -> _ShareResult:
        fields = orjson.loads(data)
        return cls(Counter(fields["points"]), fields["by_family"], Counter(fields["raised"]),
                   Counter(fields["cleared"]), fields["samples"], fields["peak_rss_mib"])


def _peak_rss_mib() -> int:
    """This process's peak RSS. Linux's VmHWM belongs to the address space, so it starts
    anew at exec (ru_maxrss would carry over whatever forked us)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # KiB on Linux


def _evaluate_share(data_dir: Path, rules_path: Path, position: int,
                    window: tuple[str | None, str | None], share: UserShare | None,
                    chunk_records: int) -> _ShareResult:
    """The rules over log positions 1..position, for the people of `share` (None: all)."""
    rules = load_rules(rules_path)
    tally = _Tally(parse_window(*window))
    raised: Counter = Counter()
    cleared: Counter = Counter()
    samples = 0
    with EmbeddedLog.open(data_dir, writer=False) as log:
        if share is not None:
            log.read_share(share)
        engine = open_engine(log, rules)
        for lo, hi in chunks(0, position, chunk_records):
            sample_batch, activity_batch = read_batches(log, lo, hi)
            output = engine.process(sample_batch, activity_batch)
            samples += len(sample_batch.ts_ms)
            tally.add(output.award_columns, engine.grid.users, len(engine.points.rule_table))
            for flag in output.flags:
                if _in_window(flag.day, window):
                    (raised if flag.state == "raised" else cleared)[flag.user_id] += 1
    user_ids = engine.grid.user_ids
    points = Counter({user_ids[i]: int(tally.points[i])
                      for i in np.flatnonzero(tally.awarded).tolist()})
    by_family: dict[str, int] = {}
    for spec, amount, awards in zip(engine.points.rule_table, tally.by_rule.tolist(),
                                    tally.rule_awards.tolist(), strict=True):
        if awards:
            family = spec.name.split(".")[0]
            by_family[family] = by_family.get(family, 0) + amount
    return _ShareResult(points, by_family, raised, cleared, samples)


def workers_default() -> int:
    return min(len(os.sched_getaffinity(0)), WHATIF_WORKERS_MAX)


def _evaluate(data_dir: Path, rules_path: Path, position: int,
              window: tuple[str | None, str | None], workers: int,
              ) -> tuple[list[_ShareResult], tuple[Counter, Counter, Counter]]:
    """The shares' what-ifs and the live ledger's tallies. With workers > 1, shares 1..N-1
    each run in a fresh interpreter (`python -m replay.whatif`: nothing of this process is
    inherited) and share 0 in this one, which has its modules loaded already (a worker's
    start-up is ~1 CPU s of imports), while a thread reads the live ledger (SQLite
    releases the GIL while it aggregates)."""
    if workers == 1:
        shares = [_evaluate_share(data_dir, rules_path, position, window, None,
                                  LOG_RECORDS_PER_CHUNK)]
        return shares, _live(data_dir, window)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), *filter(None, [env.get("PYTHONPATH")])])
    processes = [subprocess.Popen(
        [sys.executable, "-m", "replay.whatif", str(data_dir), str(rules_path), str(position),
         window[0] or "", window[1] or "", str(index), str(workers)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for index in range(1, workers)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="genki-whatif-live") as pool:
        try:
            live = pool.submit(_live, data_dir, window)
            shares = [_evaluate_share(data_dir, rules_path, position, window,
                                      UserShare(0, workers), LOG_RECORDS_PER_CHUNK * workers)]
            for process in processes:
                out, err = process.communicate()
                if process.returncode != 0:
                    raise GenkiError(f"whatif: a worker failed (exit {process.returncode}): "
                                     f"{err.decode(errors='replace').strip()[-2000:]}")
                shares.append(_ShareResult.of_json(out))
            return shares, live.result()
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()


def _share_main(argv: list[str]) -> None:
    """A worker: one share's what-if as JSON on stdout."""
    data_dir, rules_path, position, since, until, index, count = argv
    result = _evaluate_share(Path(data_dir), Path(rules_path), int(position),
                             (since or None, until or None), UserShare(int(index), int(count)),
                             LOG_RECORDS_PER_CHUNK * int(count))  # one process's samples a chunk
    sys.stdout.buffer.write(result.to_json())


def whatif(data_dir: Path, rules_path: Path, *, since: str | None = None,
           until: str | None = None, out: Path | None = None,
           pseudonym_key: bytes | None = None, workers: int | None = None) -> WhatIfResult:
    """`workers` processes each re-evaluate a share of the people (default: one per core;
    logs under WHATIF_RECORDS_PER_WORKER_MIN records per worker use fewer)."""
    started = time.perf_counter()
    parse_window(since, until)  # validates the dates
    window = (since, until)
    if workers is not None and not 1 <= workers <= WHATIF_WORKERS_MAX:
        raise UsageError(f"whatif: --workers must be 1..{WHATIF_WORKERS_MAX}, not {workers}")
    rules = load_rules(rules_path)
    result = WhatIfResult(rules_version=rules.version)
    with EmbeddedLog.open(data_dir, writer=False) as log:
        position = log.position()
    if workers is None:
        workers = max(1, min(workers_default(), position // WHATIF_RECORDS_PER_WORKER_MIN))
    shares, (live_points, live_raised, live_cleared) = _evaluate(
        data_dir, rules_path, position, window, workers)
    points: Counter = Counter()
    raised: Counter = Counter()
    cleared: Counter = Counter()
    result.workers = workers
    result.peak_rss_mib = _peak_rss_mib() + sum(share.peak_rss_mib for share in shares)
    for share in shares:
        points.update(share.points)
        raised.update(share.raised)
        cleared.update(share.cleared)
        result.samples += share.samples
        for family, amount in share.by_family.items():
            result.points_by_rule_whatif[family] = \
                result.points_by_rule_whatif.get(family, 0) + amount
    result.points_by_rule_whatif = dict(sorted(result.points_by_rule_whatif.items()))
    users = sorted(set(points) | set(live_points) | set(raised) | set(live_raised))
    result.users_total = len(users)
    result.users_affected = sum(1 for u in users if points[u] != live_points[u])
    result.live_points, result.whatif_points = sum(live_points.values()), sum(points.values())
    result.flags_raised_live, result.flags_raised_whatif = sum(live_raised.values()), sum(raised.values())
    result.flags_cleared_live = sum(live_cleared.values())
    result.flags_cleared_whatif = sum(cleared.values())
    if out is not None:
        _write_difference(out, users, points, live_points, raised, live_raised, pseudonym_key)
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _write_difference(out: Path, users: list[str], points: Counter, live: Counter,
                      raised: Counter, live_raised: Counter, key: bytes | None) -> None:
    name = Pseudonymiser(key) if key is not None else None
    table = pa.Table.from_pydict({
        "user": [name("user", u) if name else u for u in users],
        "live_points": [live[u] for u in users],
        "whatif_points": [points[u] for u in users],
        "delta_points": [points[u] - live[u] for u in users],
        "live_flags_raised": [live_raised[u] for u in users],
        "whatif_flags_raised": [raised[u] for u in users]}, schema=DIFF_SCHEMA)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    pq.write_table(table, staging, compression="zstd")
    staging.replace(out)


if __name__ == "__main__":
    _share_main(sys.argv[1:])
