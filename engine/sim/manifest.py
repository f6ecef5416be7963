"""manifest.json: what a simulation wrote, and the counts an ingest of it must reproduce.

Key meanings (all counts exact):
* files[name]: records (lines), bytes, good, exact_duplicates, faults.
* samples_written[metric]: samples in good sample lines, every line counted
  (so re-sync overlaps and exact duplicate lines count again);
  samples_unique[metric]: distinct (user_id, device_id, metric, ts_ms) keys.
  An ingest accepts sum(samples_unique) and finds the rest duplicates.
* faults[kind]: {reason, file, count}; faults_by_reason: reason -> count.
  faults.json gives each fault record's 1-based line number in its file.
* exact_duplicates: lines re-sent byte for byte, per file, and their samples.
* overlapping_resyncs: records re-sending the tail of an earlier segment under a
  new upload_id, and how many samples they re-send.
* late_uploads: syncs delivered 1-5 days late, their records, late app events.
* ground_truth: per flag, the people it should find, with the onset day of their
  condition and the day they began to recover (null if they did not); see
  engine.sim.truth. ground_truth_unscored: per flag, people whose truth is
  borderline or not observable in the period (they count neither way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from engine.clock import DAY_MS, day_to_iso
from engine.schemas import METRIC_NAMES
from engine.sim.activities import KIND_NAMES, Activities
from engine.sim.config import SimConfig
from engine.sim.faults import ACTIVITIES_FILE, FAULT_KIND_BY_NAME, SAMPLES_FILE
from engine.sim.population import Population
from engine.sim.segments import SegmentStats
from engine.sim.truth import ground_truth

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class SimManifest:
    """The manifest as written (data is exactly manifest.json's content)."""

    out: Path
    data: dict[str, object] = field(repr=False)

    def __getitem__(self, key: str) -> object:
        return self.data[key]

    def as_dict(self) -> dict[str, object]:
        return self.data

    @property
    def files(self) -> dict[str, dict[str, int]]:
        return self.data["files"]  # type: ignore[return-value]

    @property
    def faults(self) -> dict[str, dict[str, object]]:
        return self.data["faults"]  # type: ignore[return-value]

    @property
    def total_samples(self) -> int:
        return int(sum(self.data["samples_written"].values()))  # type: ignore[attr-defined]

    @property
    def unique_samples(self) -> int:
        return int(sum(self.data["samples_unique"].values()))  # type: ignore[attr-defined]

    @property
    def total_records(self) -> int:
        return int(sum(f["records"] for f in self.files.values()))

    @property
    def total_bytes(self) -> int:
        return int(sum(f["bytes"] for f in self.files.values()))

    @classmethod
    def load(cls, out: Path) -> SimManifest:
        return cls(out, orjson.loads((out / MANIFEST_FILE).read_bytes()))


@dataclass(frozen=True)
class RunCounts:
    """What the generators counted while writing, for the manifest."""

    segments: SegmentStats
    activities: Activities
    fault_counts: dict[str, int]
    files: dict[str, dict[str, int]]
    duplicate_samples: dict[str, int]  # metric -> samples in exact duplicate lines


def build_manifest(config: SimConfig, pop: Population, run: RunCounts, day0_ms: int) -> dict[str, object]:
    seg, acts = run.segments, run.activities
    written = {m: seg.samples_written.get(m, 0) + run.duplicate_samples.get(m, 0) for m in METRIC_NAMES}
    faults = {name: {"reason": FAULT_KIND_BY_NAME[name].reason.value,
                     "file": FAULT_KIND_BY_NAME[name].file, "count": count}
              for name, count in run.fault_counts.items()}
    by_reason: dict[str, int] = {}
    for name, count in run.fault_counts.items():
        reason = FAULT_KIND_BY_NAME[name].reason.value
        by_reason[reason] = by_reason.get(reason, 0) + count
    kinds = np.bincount(acts.kind, minlength=len(KIND_NAMES))
    truth = ground_truth(pop, config.days, config.start_day)
    files = run.files
    return {
        "v": MANIFEST_VERSION,
        "generator": "genki simulate",
        "config": config.as_dict(),
        "period": {"first_day": config.start,
                   "last_day": day_to_iso(config.start_day + config.days - 1),
                   "days": config.days, "first_ts_ms": day0_ms,
                   "end_ts_ms": day0_ms + config.days * DAY_MS},
        "users": {"total": pop.n, "watch_trial": pop.n_watch, "app": pop.n_app,
                  "research_consent": int(pop.consent.sum())},
        "files": files,
        "samples_written": written,
        "samples_unique": {m: seg.samples_unique.get(m, 0) for m in METRIC_NAMES},
        "activities": {name: int(kinds[i]) for i, name in enumerate(KIND_NAMES)},
        "double_scans": int(acts.double_scan.sum()),
        "faults": faults,
        "faults_by_reason": dict(sorted(by_reason.items())),
        "exact_duplicates": {SAMPLES_FILE: files[SAMPLES_FILE]["exact_duplicates"],
                             ACTIVITIES_FILE: files[ACTIVITIES_FILE]["exact_duplicates"],
                             "samples": int(sum(run.duplicate_samples.values()))},
        "overlapping_resyncs": {"records": seg.resync_records, "samples": seg.resync_samples},
        "late_uploads": {"syncs": seg.late_syncs, "sample_records": seg.late_records,
                         "activities": int(acts.late.sum())},
        "ground_truth": truth["flags"],
        "ground_truth_unscored": truth["unscored"],
    }


