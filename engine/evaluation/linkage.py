"""Anonymised linkage of care-insurance outcomes: `genki link --care-data FILE.csv`.

The care-insurance side and genki compute the same keyed HMAC pseudonym of a
person (replay's Pseudonymiser, domain "user") with a shared key; nobody
exchanges raw ids. The care file's first line carries a key check value (the
pseudonym of a fixed text under the key), so a file made with another key is
refused before anything is linked; on top of that, too few consenting people
found in the file is refused (a wrong key matches nobody). The linked table is
kept keyed by pseudonym, never by user id, in <data>/linkage/.

File format (UTF-8 CSV):

    # genki-care-data v=1 key_check=<16 hex>
    pseudonym,care_level,certified_on,care_cost_yen_per_month
    3f2a...,care_1,2029-04-17,118000
    9b1c...,,,0

care_level is empty (no certification) or one of CARE_LEVELS; certified_on is the
certification date (YYYY-MM-DD) and is set exactly when care_level is.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import GenkiError, UsageError
from engine.evaluation.consent import research_consenting
from engine.ingest.log import EmbeddedLog

CARE_DATA_VERSION = 1
CARE_DATA_MAGIC = "# genki-care-data"
CARE_DATA_COLUMNS = ("pseudonym", "care_level", "certified_on", "care_cost_yen_per_month")
# Long-term care insurance certification levels: 要支援1-2, 要介護1-5.
CARE_LEVELS = ("support_1", "support_2", "care_1", "care_2", "care_3", "care_4", "care_5")
CARE_COST_YEN_PER_MONTH_MAX = 2_000_000
CARE_FILE_BYTES_MAX = 2 * 1024**3
CARE_ROWS_MAX = 10_000_000
KEY_CHECK_DOMAIN = "key_check"
KEY_CHECK_TEXT = "genki care-data linkage"
KEY_CHECK_HEX_CHARS = 16
PSEUDONYM_DOMAIN_USER = "user"
LINK_MATCH_FRACTION_MIN_DEFAULT = 0.5
LINKAGE_DIR = "linkage"
LINKED_CARE_FILE = "care.parquet"
LINK_MANIFEST_FILE = "manifest.json"
_PSEUDONYM_RE = re.compile(r"^[0-9a-f]{32}$")
_HEADER_RE = re.compile(r"^# genki-care-data v=(\d+) key_check=([0-9a-f]+)\s*$")

LINKED_SCHEMA = pa.schema([
    ("pseudonym", pa.string()), ("care_level", pa.string()), ("certified_on", pa.date32()),
    ("care_cost_yen_per_month", pa.int64())])


class LinkageError(GenkiError):
    """Linkage refused: wrong or missing key, malformed file, too few matches."""

    exit_code = 10
    code = "linkage"


def pseudonymiser(key: bytes):  # type: ignore[no-untyped-def]
    from replay.export import Pseudonymiser

    return Pseudonymiser(key)


def read_key_file(path: Path | None, command: str) -> bytes:
    """The shared pseudonym key (the same file `genki replay` takes)."""
    if path is None:
        raise UsageError(f"{command}: --pseudonym-key-file is required (the key `genki replay` "
                         "uses; the care-data side computes its pseudonyms with the same key)")
    try:
        key = path.read_bytes().strip()
    except OSError as error:
        raise UsageError(f"{command}: cannot read the pseudonym key file {path}: "
                         f"{error.strerror}") from None
    from replay.export import PSEUDONYM_KEY_BYTES_MIN

    if len(key) < PSEUDONYM_KEY_BYTES_MIN:
        raise UsageError(f"{command}: the pseudonym key in {path} must be at least "
                         f"{PSEUDONYM_KEY_BYTES_MIN} bytes")
    return key


def key_check(key: bytes) -> str:
    """A value that identifies the key without revealing it (a key check value)."""
    return str(pseudonymiser(key)(KEY_CHECK_DOMAIN, KEY_CHECK_TEXT))[:KEY_CHECK_HEX_CHARS]


def header_line(key: bytes) -> str:
    return f"{CARE_DATA_MAGIC} v={CARE_DATA_VERSION} key_check={key_check(key)}"


@dataclass(frozen=True)
class CareRecord:
    pseudonym: str
    care_level: str | None
    certified_on: dt.date | None
    care_cost_yen_per_month: int


def format_care_csv(key: bytes, records: list[CareRecord]) -> bytes:
    stream = io.StringIO()
    stream.write(header_line(key) + "\n")
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(CARE_DATA_COLUMNS)
    for r in sorted(records, key=lambda r: r.pseudonym):
        writer.writerow([r.pseudonym, r.care_level or "",
                         r.certified_on.isoformat() if r.certified_on else "",
                         r.care_cost_yen_per_month])
    return stream.getvalue().encode()


def parse_care_csv(raw: bytes, key: bytes, *, require_key_check: bool = True) -> list[CareRecord]:
    """Validated records; any bad line refuses the whole file (a half-linked file misleads)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LinkageError(f"link: the care file is not UTF-8 ({error.reason} at byte "
                           f"{error.start})") from None
    lines = text.splitlines()
    first = 0
    if lines and lines[0].startswith("#"):
        match = _HEADER_RE.match(lines[0])
        if match is None or lines[0].split(" v=")[0] != CARE_DATA_MAGIC:
            raise LinkageError("link: line 1: not a genki care-data header "
                               f"('{CARE_DATA_MAGIC} v=1 key_check=<hex>')")
        if int(match.group(1)) != CARE_DATA_VERSION:
            raise LinkageError(f"link: care-data version {match.group(1)} is not supported "
                               f"(expected {CARE_DATA_VERSION})")
        if match.group(2) != key_check(key):
            raise LinkageError(
                f"link: the care file was pseudonymised with another key (its key check "
                f"{match.group(2)} differs from this key's {key_check(key)}); nothing linked. "
                "Use the key shared with the care-data side.")
        first = 1
    elif require_key_check:
        raise LinkageError("link: the care file has no key check line "
                           f"('{CARE_DATA_MAGIC} v=1 key_check=...'); pass --no-key-check to "
                           "rely on the match-rate check alone")
    rows = list(csv.reader(lines[first:]))
    if not rows or tuple(c.strip() for c in rows[0]) != CARE_DATA_COLUMNS:
        raise LinkageError(f"link: line {first + 1}: the columns must be "
                           f"{','.join(CARE_DATA_COLUMNS)}")
    if len(rows) - 1 > CARE_ROWS_MAX:
        raise LinkageError(f"link: {len(rows) - 1:,} records exceed the limit of {CARE_ROWS_MAX:,}")
    records: list[CareRecord] = []
    seen: set[str] = set()
    for number, row in enumerate(rows[1:], start=first + 2):
        record = _record(row, number)
        if record.pseudonym in seen:
            raise LinkageError(f"link: line {number}: pseudonym {record.pseudonym} appears twice")
        seen.add(record.pseudonym)
        records.append(record)
    return records


def _record(row: list[str], number: int) -> CareRecord:
    if len(row) != len(CARE_DATA_COLUMNS):
        raise LinkageError(f"link: line {number}: expected {len(CARE_DATA_COLUMNS)} fields, "
                           f"got {len(row)}")
    pseudonym, level, certified, cost = (c.strip() for c in row)
    if not _PSEUDONYM_RE.match(pseudonym):
        raise LinkageError(f"link: line {number}: pseudonym must be 32 lowercase hex characters")
    if level and level not in CARE_LEVELS:
        raise LinkageError(f"link: line {number}: care_level {level!r} is not one of "
                           f"{', '.join(CARE_LEVELS)} (or empty)")
    if bool(level) != bool(certified):
        raise LinkageError(f"link: line {number}: certified_on must be set exactly when "
                           "care_level is")
    try:
        certified_on = dt.date.fromisoformat(certified) if certified else None
    except ValueError:
        raise LinkageError(f"link: line {number}: certified_on {certified!r} is not "
                           "YYYY-MM-DD") from None
    try:
        cost_yen = int(cost)
    except ValueError:
        raise LinkageError(f"link: line {number}: care_cost_yen_per_month {cost!r} is not a "
                           "whole number of yen") from None
    if not 0 <= cost_yen <= CARE_COST_YEN_PER_MONTH_MAX:
        raise LinkageError(f"link: line {number}: care_cost_yen_per_month {cost_yen} outside "
                           f"[0, {CARE_COST_YEN_PER_MONTH_MAX}]")
    return CareRecord(pseudonym, level or None, certified_on, cost_yen)


@dataclass
class LinkManifest:
    created_at: str
    care_file: str
    care_file_sha256: str
    key_check: str
    key_check_in_file: bool
    records: int
    linked: int
    records_not_linked: int
    consenting_people: int
    consenting_people_found_fraction: float
    people_left_out_no_consent: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def link_care_data(data_dir: Path, care_file: Path, key: bytes, *,
                   require_key_check: bool = True,
                   match_fraction_min: float = LINK_MATCH_FRACTION_MIN_DEFAULT) -> LinkManifest:
    """Link care records to consenting genki people; writes <data>/linkage/ atomically."""
    if not 0.0 <= match_fraction_min <= 1.0:
        raise UsageError(f"link: --min-match-fraction {match_fraction_min} outside [0, 1]")
    try:
        size = care_file.stat().st_size
        if size > CARE_FILE_BYTES_MAX:
            raise LinkageError(f"link: {care_file} is {size:,} bytes, over the limit of "
                               f"{CARE_FILE_BYTES_MAX:,}")
        raw = care_file.read_bytes()
    except OSError as error:
        raise UsageError(f"link: cannot read {care_file}: {error.strerror}") from None
    has_check = raw.startswith(CARE_DATA_MAGIC.encode())
    records = parse_care_csv(raw, key, require_key_check=require_key_check)
    with EmbeddedLog.open(data_dir, writer=False) as log:
        consenting, refused = research_consenting(log)
    pseudo = pseudonymiser(key)
    wanted = {pseudo(PSEUDONYM_DOMAIN_USER, user) for user in consenting}
    linked = [r for r in records if r.pseudonym in wanted]
    found = len(linked) / len(wanted) if wanted else 0.0
    if not linked or found < match_fraction_min:
        raise LinkageError(
            f"link: only {len(linked):,} of {len(wanted):,} consenting people were found among "
            f"{len(records):,} care records ({found:.1%} < {match_fraction_min:.0%}); a wrong "
            "key matches nobody, so nothing was linked. Check the key, or lower "
            "--min-match-fraction if the care file covers only part of the programme.")
    manifest = LinkManifest(
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        care_file=care_file.name, care_file_sha256=hashlib.sha256(raw).hexdigest(),
        key_check=key_check(key), key_check_in_file=has_check, records=len(records),
        linked=len(linked), records_not_linked=len(records) - len(linked),
        consenting_people=len(wanted), consenting_people_found_fraction=round(found, 6),
        people_left_out_no_consent=refused)
    _write_linkage(data_dir / LINKAGE_DIR, linked, manifest)
    return manifest


def _write_linkage(target: Path, linked: list[CareRecord], manifest: LinkManifest) -> None:
    staging = target.with_name(f".{target.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    table = pa.table({
        "pseudonym": [r.pseudonym for r in linked],
        "care_level": [r.care_level for r in linked],
        "certified_on": [r.certified_on for r in linked],
        "care_cost_yen_per_month": [r.care_cost_yen_per_month for r in linked]},
        schema=LINKED_SCHEMA)
    pq.write_table(table, staging / LINKED_CARE_FILE)
    (staging / LINK_MANIFEST_FILE).write_bytes(
        orjson.dumps(manifest.as_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)


def load_linked(data_dir: Path, key: bytes) -> tuple[pa.Table, dict[str, object]] | None:
    """The linked care table, or None when nothing was linked; refuses another key."""
    directory = data_dir / LINKAGE_DIR
    if not (directory / LINK_MANIFEST_FILE).exists():
        return None
    manifest = orjson.loads((directory / LINK_MANIFEST_FILE).read_bytes())
    if manifest["key_check"] != key_check(key):
        raise LinkageError("evaluate: the linked care data was linked with another pseudonym "
                           "key; use the same key as `genki link`, or link again")
    return pq.read_table(directory / LINKED_CARE_FILE), manifest
