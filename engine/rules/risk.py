"""The care-prevention risk list: people with raised flags, frailty status, severity.

Severities come from the rules that built the ledger: the pipeline records the
rules (canonical JSON) in the ledger's meta under META_RULES_JSON; flag events
carry their rules_version, looked up there, then among the shipped rules files,
then the default rules. Frailty status follows the revised J-CHS criteria that
wearables measure (engine.rules.flags.frailty_status), plus exhaustion and weakness
when questionnaire answers are given (load_questionnaire); the list is sorted by
status (frail, pre-frail, robust), then severity, then user id.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import orjson

from engine.errors import RulesError, UsageError
from engine.rules.config import (
    RULES_DEFAULT_PATH,
    FlagRules,
    Rules,
    default_rules,
    load_rules,
    parse_rules_data,
)
from engine.rules.flags import FRAILTY_STATUSES, frailty_status
from engine.schemas import FlagEvent

META_RULES_JSON = "rules_json"


@dataclass
class RiskFlag:
    flag: str
    since: str
    evidence: dict[str, object]


@dataclass
class RiskRow:
    """One person on the care-prevention risk list."""

    user_id: str
    severity: int = 0
    flags: list[RiskFlag] = field(default_factory=list)
    frailty_status: str = "robust"

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@lru_cache(maxsize=1)
def shipped_rules() -> dict[str, Rules]:
    """Rules files shipped next to the default one, by version."""
    found: dict[str, Rules] = {}
    for path in sorted(RULES_DEFAULT_PATH.parent.glob("*.toml")):
        try:
            rules = load_rules(path)
        except RulesError:
            continue
        found.setdefault(rules.version, rules)
    return found


class SeverityBook:
    """Flag rules by rules version: the ledger's own, the shipped files, the default."""

    def __init__(self, get_meta: Callable[[str], str | None] | None = None) -> None:
        self.by_version: dict[str, FlagRules] = {v: r.flags for v, r in shipped_rules().items()}
        text = get_meta(META_RULES_JSON) if get_meta is not None else None
        if text:
            rules = parse_rules_data(orjson.loads(text), "rules recorded in the ledger")
            self.by_version[rules.version] = rules.flags
        self.fallback = default_rules().flags

    def severity(self, flag: str, rules_version: str) -> int:
        return self.by_version.get(rules_version, self.fallback).severity_of(flag)


QUESTIONNAIRE_COLUMNS = ("user_id", "exhaustion", "weakness")
QUESTIONNAIRE_BYTES_MAX = 64 * 1024 * 1024
_YES, _NO = {"1", "yes", "true", "y"}, {"0", "no", "false", "n", ""}


def load_questionnaire(path: Path) -> dict[str, int]:
    """The J-CHS questionnaire items wearables cannot measure, per person: a CSV with
    columns user_id, exhaustion, weakness (1/0, yes/no, true/false; empty = no).
    Returns the number of those criteria each listed person meets."""
    try:
        if path.stat().st_size > QUESTIONNAIRE_BYTES_MAX:
            raise UsageError(f"{path}: over {QUESTIONNAIRE_BYTES_MAX} bytes")
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"{path}: cannot read questionnaire answers: {error.strerror}") from None
    rows = csv.reader(io.StringIO(text))
    header = [cell.strip() for cell in next(rows, [])]
    if tuple(header) != QUESTIONNAIRE_COLUMNS:
        raise UsageError(f"{path}: header must be {','.join(QUESTIONNAIRE_COLUMNS)}, "
                         f"got {','.join(header)}")
    met: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        if len(row) != len(QUESTIONNAIRE_COLUMNS) or not row[0].strip():
            raise UsageError(f"{path}:{line}: expected user_id,exhaustion,weakness")
        count = 0
        for name, cell in zip(QUESTIONNAIRE_COLUMNS[1:], row[1:], strict=True):
            value = cell.strip().lower()
            if value not in _YES | _NO:
                raise UsageError(f"{path}:{line}: {name} must be 1/0, yes/no or true/false, "
                                 f"got {cell!r}")
            count += value in _YES
        met[row[0].strip()] = count
    return met


def risk_rows(flags: Iterable[FlagEvent], book: SeverityBook,
              questionnaire: Mapping[str, int] | None = None) -> list[RiskRow]:
    """Raised flags grouped per person, with frailty status and summed severity;
    questionnaire: criteria met per person among exhaustion and weakness."""
    by_user: dict[str, RiskRow] = {}
    for event in flags:
        name = str(event.flag.value)
        row = by_user.setdefault(event.user_id, RiskRow(event.user_id))
        row.severity += book.severity(name, event.rules_version)
        row.flags.append(RiskFlag(name, event.day, dict(event.evidence)))
    answers = questionnaire or {}
    for row in by_user.values():
        row.frailty_status = frailty_status({f.flag for f in row.flags},
                                            answers.get(row.user_id, 0))
    return sorted(by_user.values(), key=lambda r: (FRAILTY_STATUSES.index(r.frailty_status),
                                                   -r.severity, r.user_id))


@lru_cache(maxsize=1)
def shipped_book() -> SeverityBook:
    """Severities without a ledger at hand (the HTTP API): shipped rules, then default."""
    return SeverityBook()


def person_summaries(rows: Iterable[RiskRow]) -> list[dict[str, object]]:
    """The risk list without evidence: who, frailty status, severity, which flags."""
    return [{"user_id": r.user_id, "frailty_status": r.frailty_status, "severity": r.severity,
             "flags": [f.flag for f in r.flags]} for r in rows]
