"""Generate a fleet's wire records, in the order a gateway would deliver them.

Data is generated block by block (people x days x minutes as numpy arrays),
serialised once per record with orjson onto a scratch file, then written
sorted by delivery time. The same config gives the same bytes: every random
draw comes from a generator keyed by (seed, stream, block), never the clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from engine.clock import DAY_MS, day_start_ms
from engine.sim import care
from engine.sim.activities import make_activities, serialise_activities
from engine.sim.config import SimConfig
from engine.sim.faults import (
    ACTIVITIES_FILE,
    FAULT_KIND_BY_NAME,
    SAMPLES_FILE,
    Fault,
    FaultContext,
    fault_counts,
    make_faults,
)
from engine.sim.manifest import MANIFEST_FILE, RunCounts, SimManifest, build_manifest
from engine.sim.population import (
    MINUTES_PER_DAY,
    Population,
    make_population,
    make_shops,
    make_venues,
)
from engine.sim.segments import SegmentStats, phone_syncs, serialise_block, watch_syncs
from engine.sim.spill import Spill
from engine.sim.vitals import PHONE_HOURS, Block, phone_block, watch_block

PROFILES_FILE = "00-profiles.ndjson"
VENUES_FILE = "venues.json"
SHOPS_FILE = "shops.json"
FAULTS_FILE = "faults.json"
SPILL_SUFFIX = ".partial"
WATCH_BLOCK_CELLS_MAX = 4_000_000  # user-day-minutes generated at once (bounds memory)
PHONE_BLOCK_CELLS_MAX = 2_000_000  # user-day-hours generated at once
DUPLICATE_DELAY_MS = (60_000, 36 * 3_600_000)
BASE_MARGIN_MS = 7 * DAY_MS  # segment keys count from this long before the start

# Random streams: each (stream, block) pair gets its own generator.
STREAM_VENUES, STREAM_SHOPS, STREAM_PEOPLE = 0, 1, 2
STREAM_WATCH, STREAM_PHONE, STREAM_ACTIVITIES, STREAM_DUPLICATES, STREAM_FAULTS = 3, 4, 5, 6, 7

Progress = Callable[[str, int, int], None]


def rng_for(config: SimConfig, stream: int, block: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(stream, block)))


@dataclass
class _Records:
    """One output file before sorting: records (on a spill), delivery times, faults."""

    name: str
    spill: Spill
    delivery_parts: list[np.ndarray] = field(default_factory=list)
    good: int = 0
    fault_rows: list[tuple[int, str]] = field(default_factory=list)  # (record index, kind)

    def delivery(self) -> np.ndarray:
        parts = [p.astype(np.int64) for p in self.delivery_parts]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def add_duplicates(self, index: np.ndarray, delay_ms: np.ndarray) -> None:
        good_delivery = self.delivery()[: self.good]
        for i in index.tolist():
            self.spill.repeat(i)
        self.delivery_parts.append(good_delivery[index] + delay_ms)

    def add_faults(self, faults: list[Fault]) -> None:
        for fault in faults:
            self.fault_rows.append((len(self.spill), fault.kind))
            self.spill.append(fault.line)
        self.delivery_parts.append(np.array([f.delivery_ms for f in faults], dtype=np.int64))

    def write(self, out: Path) -> tuple[dict[str, int], list[dict[str, object]]]:
        """Write in arrival order; returns file stats and the fault records' line numbers."""
        delivery = self.delivery()
        assert len(delivery) == len(self.spill)
        order = np.argsort(delivery, kind="stable")
        line_of = np.empty_like(order)
        line_of[order] = np.arange(1, len(order) + 1)
        size = self.spill.write_in_order(out / self.name, order)
        rows = sorted((int(line_of[i]), kind) for i, kind in self.fault_rows)
        faults: list[dict[str, object]] = [
            {"line": line, "kind": kind, "reason": FAULT_KIND_BY_NAME[kind].reason.value}
            for line, kind in rows]
        stats = {"records": len(self.spill), "bytes": size, "good": self.good,
                 "exact_duplicates": len(self.spill) - self.good - len(self.fault_rows),
                 "faults": len(self.fault_rows)}
        return stats, faults


def simulate(config: SimConfig, out: Path, progress: Progress | None = None,
             care_key: bytes | None = None) -> SimManifest:
    """Write a simulated fleet's records into out; returns its manifest.

    With care_key, also the care-insurance side's outcome file (engine.sim.care).
    """
    report = progress or (lambda stage, done, total: None)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # a manifest marks a complete output
    venues = make_venues(config.venues, rng_for(config, STREAM_VENUES))
    shops = make_shops(config.shops, rng_for(config, STREAM_SHOPS))
    pop = make_population(config, venues, rng_for(config, STREAM_PEOPLE))
    pop = care.assign_class_regulars(pop, venues, rng_for(config, care.STREAM_CARE, 0))
    day0_ms = day_start_ms(config.start_day)
    with (Spill(out / (SAMPLES_FILE + SPILL_SUFFIX)) as sample_spill,
          Spill(out / (ACTIVITIES_FILE + SPILL_SUFFIX)) as activity_spill):
        samples = _Records(SAMPLES_FILE, sample_spill)
        segments, has_samples, app_active = _generate_samples(config, pop, day0_ms, samples, report)
        report("activities", 0, 1)
        acts = make_activities(pop, venues, app_active, config.days, config.start_day, day0_ms,
                               config.late_fraction, rng_for(config, STREAM_ACTIVITIES, 0))
        activities = _Records(ACTIVITIES_FILE, activity_spill, [acts.delivery_ms], len(acts))
        serialise_activities(pop, venues, acts, rng_for(config, STREAM_ACTIVITIES, 1), activity_spill)
        report("activities", 1, 1)
        if care_key is not None:
            care.write_care_data(config, pop, acts, day0_ms, out, care_key,
                                 rng_for(config, care.STREAM_CARE, 1))

        duplicated = _add_duplicates(config, samples, activities)
        ctx = FaultContext(
            pop=pop, venues=venues, days=config.days, day0_ms=day0_ms, has_samples=has_samples,
            read_activity=activity_spill.read, activity_user=acts.user,
            activity_delivery_ms=acts.delivery_ms,
            samples_done_ms=int(samples.delivery().max(initial=day0_ms)),
            activities_done_ms=int(activities.delivery().max(initial=day0_ms)))
        good = samples.good + activities.good
        counts = fault_counts(round(config.bad_fraction * good) if config.bad_fraction > 0 else 0, ctx)
        faults = make_faults(counts, ctx, rng_for(config, STREAM_FAULTS))
        for records in (samples, activities):
            records.add_faults([f for f in faults if FAULT_KIND_BY_NAME[f.kind].file == records.name])

        report("write", 0, 2)
        files = {PROFILES_FILE: _write_profiles(out / PROFILES_FILE, pop)}
        fault_lines: dict[str, list[dict[str, object]]] = {PROFILES_FILE: []}
        for step, records in enumerate((samples, activities), start=1):
            files[records.name], fault_lines[records.name] = records.write(out)
            report("write", step, 2)
        duplicate_samples = _samples_per_metric(sample_spill, duplicated)
    _write_json(out / VENUES_FILE, venues.as_json())
    _write_json(out / SHOPS_FILE, shops)
    _write_json(out / FAULTS_FILE, fault_lines)
    run = RunCounts(segments, acts, counts, files, duplicate_samples)
    data = build_manifest(config, pop, run, day0_ms)
    _write_json(out / MANIFEST_FILE, data)
    return SimManifest(out, data)


def _generate_samples(config: SimConfig, pop: Population, day0_ms: int, output: _Records,
                      report: Progress) -> tuple[SegmentStats, np.ndarray, np.ndarray]:
    """Every sample segment, block by block; also who sent samples and the app users' active days."""
    base_ms = day0_ms - BASE_MARGIN_MS
    stats = SegmentStats()
    has_samples = np.zeros(pop.n, dtype=bool)
    watch_users = max(1, WATCH_BLOCK_CELLS_MAX // (config.days * MINUTES_PER_DAY))
    phone_users = max(1, PHONE_BLOCK_CELLS_MAX // (config.days * PHONE_HOURS))
    blocks = ([("watch", lo, min(lo + watch_users, pop.n_watch))
               for lo in range(0, pop.n_watch, watch_users)]
              + [("phone", lo, min(lo + phone_users, pop.n))
                 for lo in range(pop.n_watch, pop.n, phone_users)])
    active_parts = []
    for number, (kind, lo, hi) in enumerate(blocks):
        block = Block(pop, lo, hi, config.days, config.start_day, day0_ms)
        stream = STREAM_WATCH if kind == "watch" else STREAM_PHONE
        data_rng, sync_rng, id_rng = (rng_for(config, stream, 3 * number + k) for k in range(3))
        if kind == "watch":
            block_samples = watch_block(block, data_rng)
            syncs = watch_syncs(block, sync_rng, config.resync_fraction, config.late_fraction)
        else:
            block_samples, active = phone_block(block, data_rng)
            active_parts.append(active)
            syncs = phone_syncs(block, active, sync_rng, config.resync_fraction, config.late_fraction)
        delivery, block_stats = serialise_block(pop, block_samples, syncs, base_ms, id_rng, output.spill)
        output.delivery_parts.append(delivery)
        stats.add(block_stats)
        for sample in block_samples.values():
            has_samples[sample.user] = True
        report("samples", number + 1, len(blocks))
    output.good = len(output.spill)
    app_active = (np.concatenate(active_parts) if active_parts
                  else np.zeros((0, config.days), dtype=bool))
    return stats, has_samples, app_active


def _add_duplicates(config: SimConfig, samples: _Records, activities: _Records) -> np.ndarray:
    """Re-send a fraction of all good records byte for byte, some time after the original.

    Returns the indices of the duplicated sample records.
    """
    rng = rng_for(config, STREAM_DUPLICATES)
    good = samples.good + activities.good
    count = round(config.duplicate_fraction * good)
    index = np.sort(rng.choice(good, size=count, replace=False)) if count else np.zeros(0, np.int64)
    delay = rng.integers(*DUPLICATE_DELAY_MS, size=count)
    of_samples = index < samples.good
    samples.add_duplicates(index[of_samples], delay[of_samples])
    activities.add_duplicates(index[~of_samples] - samples.good, delay[~of_samples])
    return index[of_samples]


def _samples_per_metric(spill: Spill, index: np.ndarray) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i in index.tolist():
        body = orjson.loads(spill.read(i))
        counts[body["metric"]] = counts.get(body["metric"], 0) + len(body["ts_ms"])
    return counts


def _write_profiles(path: Path, pop: Population) -> dict[str, int]:
    content = b"".join(orjson.dumps(profile) + b"\n" for profile in pop.profiles())
    path.write_bytes(content)
    return {"records": pop.n, "bytes": len(content), "good": pop.n, "exact_duplicates": 0,
            "faults": 0}


def _write_json(path: Path, body: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n")
    tmp.replace(path)
