"""Apple Health import throughput: a generated export.xml → wire records, streamed.

Prints Record elements/s for `engine.importers.import_source("apple", ...)` (parse,
map, unit conversion, overlap check, segment packing) and the ratio to the floor
measured in the same run: `iterparse` over the same file clearing each element
(what any streaming reader of the export must at least pay). Also the peak RSS,
which must not grow with the file (elements are cleared as they are handled).

    .venv/bin/python benchmarks/importers.py [--records 500000] [--json]
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from xml.etree.ElementTree import iterparse

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.importers import ImportOptions, import_source
from engine.importers.core import ImportResult

T0_S = 1_788_188_400  # 2026-09-01T00:00+09:00


def _date(ts_s: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S +0900", time.gmtime(ts_s + 9 * 3600))


def write_export(path: Path, records: int) -> None:
    """Minute steps from a phone, heart rate every minute from a watch, alternating."""
    with open(path, "w", encoding="utf-8") as out:
        out.write('<?xml version="1.0" encoding="UTF-8"?>\n<HealthData locale="ja_JP">\n')
        for i in range(records):
            minute = T0_S + (i // 2) * 60
            if i % 2:
                out.write(f' <Record type="HKQuantityTypeIdentifierHeartRate" sourceName="Watch"'
                          f' unit="count/min" startDate="{_date(minute)}"'
                          f' endDate="{_date(minute)}" value="{60 + i % 40}"/>\n')
            else:
                out.write(f' <Record type="HKQuantityTypeIdentifierStepCount" sourceName="Phone"'
                          f' unit="count" startDate="{_date(minute)}"'
                          f' endDate="{_date(minute + 60)}" value="{i % 90}"/>\n')
        out.write("</HealthData>\n")


def floor_iterparse(path: Path) -> int:
    count = 0
    with open(path, "rb") as stream:
        for _, element in iterparse(stream, events=("end",)):
            if element.tag == "Record":
                count += 1
                element.clear()
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "export.xml"
        write_export(path, args.records)
        size_mb = path.stat().st_size / 1e6
        started = time.perf_counter()
        assert floor_iterparse(path) == args.records
        floor_s = time.perf_counter() - started
        totals = ImportResult()

        def sink(part: ImportResult) -> None:
            totals.samples += part.samples
            totals.lines.extend(b"" for _ in part.lines)  # count only; memory stays flat
            totals.unmapped.extend(part.unmapped)

        started = time.perf_counter()
        with open(path, "rb") as stream:
            result = import_source("apple", stream, ImportOptions(user_id="U1"), sink=sink)
        import_s = time.perf_counter() - started
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    figures = {
        "records": args.records, "export_mb": round(size_mb, 1), "items": result.items,
        "samples": totals.samples, "wire_records": len(totals.lines),
        "unmapped": len(totals.unmapped),
        "import_records_per_s": round(args.records / import_s),
        "iterparse_floor_records_per_s": round(args.records / floor_s),
        "ratio_to_floor": round(floor_s / import_s, 3), "peak_rss_mb": round(rss_mb),
        "python": platform.python_version(),
    }
    if args.json:
        print(orjson.dumps(figures).decode())
    else:
        for name, value in figures.items():
            print(f"{name:>30}: {value:,}" if isinstance(value, int) else f"{name:>30}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
