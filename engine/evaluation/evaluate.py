"""`genki evaluate`: did the programme change outcomes? A matched comparison.

Treatment comes from genki's own data (attendance days of a kind or at given
venues within the treatment period, or award days of a campaign); the outcome
from linked care data (care-need onset, care costs) or from genki (frailty
flags, daily steps). Controls are matched on baseline covariates (see
engine.evaluation.matching). Everyone is research-consenting and appears under
a pseudonym only.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from engine.clock import day_to_iso, iso_to_day
from engine.errors import UsageError
from engine.evaluation import design as defaults
from engine.evaluation.linkage import PSEUDONYM_DOMAIN_USER, load_linked, pseudonymiser
from engine.evaluation.matching import (
    BOOTSTRAP_REPLICATES_DEFAULT,
    SMD_BALANCED_MAX,
    Design,
    Estimator,
    EvaluationError,
    Matches,
    balance_rows,
    binary_effect,
    bootstrap,
    continuous_effect,
    match,
)
from engine.evaluation.programme import ProgrammeData, load_programme, raised_flags_on

OUTCOMES = ("care_onset", "frailty", "steps")
BASELINE_STEP_DAYS_MIN = 7
PERIOD_STEP_DAYS_MIN = 7
MONTHS_PER_YEAR = 12
PER_PARTICIPANTS = 1_000
EVALUATION_DIR = "evaluation"
EVALUATION_FILE = "evaluation.json"
SEX_CODES = ("F", "M", "X")
PERSON_TABLE_LEFT_OUT = ("age_years",)  # a quasi-identifier: people.parquet keeps the age band
STRATUM_SEX_SPAN, STRATUM_BAND_SPAN = 4, 64


@dataclass(frozen=True)
class EvaluationSpec:
    outcome: str | None = None  # default: care_onset when care data is linked, else steps
    kind: str | None = None
    venues: tuple[str, ...] | None = None
    campaign: str | None = None
    attendances_min: int | None = None
    baseline_from: str | None = None
    baseline_until: str | None = None
    since: str | None = None
    until: str | None = None
    followup_days: int = defaults.FOLLOWUP_DAYS_DEFAULT
    age_min: int = defaults.AGE_YEARS_MIN_DEFAULT
    bootstrap: int = BOOTSTRAP_REPLICATES_DEFAULT
    seed: int = 0


@dataclass(frozen=True)
class Windows:
    baseline: tuple[int, int]
    period: tuple[int, int]


def _day(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    try:
        return iso_to_day(text)
    except ValueError:
        raise UsageError(f"evaluate: {flag} {text!r} is not a date (YYYY-MM-DD)") from None


def windows_of(spec: EvaluationSpec, data: ProgrammeData) -> Windows:
    extent = data.data_days()
    if extent is None:
        raise EvaluationError("evaluate: no steps or activities of consenting people in the log")
    first, last = extent
    b_from = _day(spec.baseline_from, "--baseline-from") or first
    b_until = _day(spec.baseline_until, "--baseline-until")
    if b_until is None:
        b_until = b_from + defaults.baseline_days_default(last - b_from + 1) - 1
    since = _day(spec.since, "--since") or b_until + 1
    until = _day(spec.until, "--until") or last
    if not b_from <= b_until < since <= until:
        raise UsageError(f"evaluate: need baseline-from <= baseline-until < since <= until, got "
                         f"{day_to_iso(b_from)}, {day_to_iso(b_until)}, {day_to_iso(since)}, "
                         f"{day_to_iso(until)}")
    return Windows((b_from, b_until), (since, until))


def treatment_counts(data: ProgrammeData, spec: EvaluationSpec, period: tuple[int, int],
                     ) -> tuple[np.ndarray, dict[str, object]]:
    """Per person, the distinct days that count as taking part, and the definition used."""
    lo, hi = period
    if spec.campaign is not None:
        rule = f"campaign.{spec.campaign}"
        mask = ((data.entry_kind == "award") & (data.entry_day >= lo) & (data.entry_day <= hi)
                & np.array([str(r) == rule or str(r).startswith(rule + ".")
                            for r in data.entry_rule], dtype=bool))
        person, day = data.entry_person[mask], data.entry_day[mask]
        definition: dict[str, object] = {"campaign": spec.campaign}
    else:
        kind = spec.kind or (None if spec.venues else defaults.TREATMENT_KIND_DEFAULT)
        mask = (data.act_day >= lo) & (data.act_day <= hi)
        if kind is not None:
            mask &= data.act_kind == kind
        if spec.venues:
            mask &= np.isin(data.act_venue, np.array(spec.venues, dtype=object))
        person, day = data.act_person[mask], data.act_day[mask]
        definition = {"kind": kind, "venues": list(spec.venues) if spec.venues else None}
    pairs = np.unique(person * (1 << 20) + day)
    counts = np.bincount(pairs >> 20, minlength=data.n) if len(pairs) else np.zeros(data.n, int)
    return counts.astype(np.int64), definition


def _mean_steps(data: ProgrammeData, window: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    inside = (data.steps_day >= window[0]) & (data.steps_day <= window[1])
    days = np.bincount(data.steps_person[inside], minlength=data.n)
    total = np.bincount(data.steps_person[inside], weights=data.steps[inside], minlength=data.n)
    return np.where(days > 0, total / np.maximum(days, 1), 0.0), days


def _covariates(data: ProgrammeData, age: np.ndarray, steps: np.ndarray, frail: np.ndarray,
                people: np.ndarray) -> tuple[list[str], np.ndarray, list[int], np.ndarray]:
    """Balance-table columns, which of them feed the score, and exact strata codes."""
    bands = [defaults.age_band(int(a)) for a in age[people]]
    band_names = sorted(set(bands), key=lambda b: int(b.rstrip("+").split("-")[0]))
    sex = data.sex[people]
    watch = (data.cohort[people] == "watch_trial").astype(float)
    columns: dict[str, np.ndarray] = {"age_years": age[people].astype(float)}
    for band in band_names:
        columns[f"age_band_{band}"] = np.array([b == band for b in bands], dtype=float)
    for code in SEX_CODES:
        if (sex == code).any():
            columns[f"sex_{code}"] = (sex == code).astype(float)
    columns["cohort_watch_trial"] = watch
    columns["baseline_steps_per_day"] = steps[people]
    columns["baseline_steps_log"] = np.log(np.maximum(steps[people], 1.0))
    columns["baseline_frail"] = frail[people].astype(float)
    names = list(columns)
    score = [names.index(n) for n in ("age_years", "cohort_watch_trial", "baseline_steps_per_day",
                                       "baseline_steps_log", "baseline_frail")]
    score += [names.index(f"sex_{c}") for c in ("F",) if f"sex_{c}" in columns]
    band_code = np.array([band_names.index(b) for b in bands], dtype=np.int64)
    sex_code = np.array([SEX_CODES.index(s) if s in SEX_CODES else 3 for s in sex], np.int64)
    strata = ((band_code * STRATUM_SEX_SPAN + sex_code) * 2 + watch.astype(np.int64)) * 2 \
        + frail[people].astype(np.int64)
    return names, np.column_stack(list(columns.values())), score, strata


def evaluate(data_dir: Path, key: bytes, spec: EvaluationSpec,
             out: Path | None = None) -> dict[str, object]:
    """Runs the matched comparison; writes evaluation.json and Parquet tables into out."""
    if spec.outcome is not None and spec.outcome not in OUTCOMES:
        raise UsageError(f"evaluate: --outcome must be one of {', '.join(OUTCOMES)}")
    pseudo = pseudonymiser(key)
    linked = load_linked(data_dir, key)
    outcome = spec.outcome or ("care_onset" if linked is not None else "steps")
    if outcome == "care_onset" and linked is None:
        raise EvaluationError("evaluate: --outcome care_onset needs linked care data; run "
                              "`genki link --care-data FILE.csv --pseudonym-key-file K` first")
    data = load_programme(data_dir)
    win = windows_of(spec, data)
    age = iso_to_year(win.baseline[0]) - data.birth_year
    base_steps, base_days = _mean_steps(data, win.baseline)
    period_steps, period_days = _mean_steps(data, win.period)
    frail = raised_flags_on(data, win.baseline[1]) > 0
    counts, definition = treatment_counts(data, spec, win.period)
    needed = spec.attendances_min or defaults.attendances_min_default(
        win.period[1] - win.period[0] + 1)
    if needed < 1:
        raise UsageError("evaluate: --min-attendances must be at least 1")
    pseudonyms = np.array([pseudo(PSEUDONYM_DOMAIN_USER, u) for u in data.user_ids], dtype=object)
    excluded: dict[str, int] = {}
    eligible = np.ones(data.n, dtype=bool)

    def exclude(reason: str, mask: np.ndarray) -> None:
        nonlocal eligible
        excluded[reason] = int((eligible & mask).sum())
        eligible &= ~mask

    exclude("under_age_min", age < spec.age_min)
    exclude("enrolled_after_baseline", data.enrolled_day > win.baseline[1])
    exclude("too_few_baseline_step_days", base_days < BASELINE_STEP_DAYS_MIN)
    y, cost = _outcome(outcome, data, win, spec, linked, pseudonyms, period_steps, period_days,
                       base_steps, exclude)
    people = np.flatnonzero(eligible)
    treated = counts[people] >= needed
    names, x, score, strata = _covariates(data, age, base_steps, frail, people)
    design_all = Design(names, x, strata, treated)
    design_score = Design([names[k] for k in score], x[:, score], strata, treated)
    matches = match(design_score)
    balance = balance_rows(design_all, matches)
    result = _effects(outcome, y[people], None if cost is None else cost[people], design_score,
                      matches, spec)
    smd_after = max(abs(float(r["smd_after"])) for r in balance)  # type: ignore[arg-type]
    report: dict[str, object] = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "outcome": outcome,
        "design": {
            "treatment": {**definition, "attendances_min": needed,
                          "since": day_to_iso(win.period[0]), "until": day_to_iso(win.period[1])},
            "baseline": {"since": day_to_iso(win.baseline[0]),
                         "until": day_to_iso(win.baseline[1])},
            "followup_until": day_to_iso(win.period[1] + spec.followup_days)
            if outcome == "care_onset" else None,
            "age_min": spec.age_min, "matching": "propensity score nearest neighbour within "
            "exact strata (age band, sex, cohort, baseline frailty), with replacement, caliper "
            "0.2 SD of the logit score", "score_covariates": design_score.names,
            "bootstrap_replicates": spec.bootstrap, "seed": spec.seed},
        "people": {
            "consenting": data.n, "left_out_no_consent": data.people_left_out_no_consent,
            "excluded": excluded, "analysed": len(people), "treated": int(treated.sum()),
            "controls": int((~treated).sum()), "treated_matched": len(matches.treated),
            "treated_unmatched": matches.treated_unmatched,
            "controls_used": len(np.unique(matches.control))},
        "balance": balance,
        "smd_after_max": round(smd_after, 6),
        "balanced": smd_after < SMD_BALANCED_MAX,
        **result,
    }
    if linked is not None:
        report["linkage"] = {k: linked[1][k] for k in ("care_file", "linked", "created_at")}
    target = out or data_dir / EVALUATION_DIR
    _write_outputs(target, report, pseudonyms[people], counts[people], treated, design_all,
                   matches, y[people])
    return report


def iso_to_year(day: int) -> int:
    return int(day_to_iso(day)[:4])


def _outcome(outcome: str, data: ProgrammeData, win: Windows, spec: EvaluationSpec,
             linked: tuple[pa.Table, dict[str, object]] | None, pseudonyms: np.ndarray,
             period_steps: np.ndarray, period_days: np.ndarray, base_steps: np.ndarray,
             exclude) -> tuple[np.ndarray, np.ndarray | None]:  # type: ignore[no-untyped-def]
    """Outcome per person (float) and, with care data, the yearly care cost at follow-up end."""
    if outcome == "frailty":
        return (raised_flags_on(data, win.period[1]) > 0).astype(float), None
    if outcome == "steps":
        exclude("too_few_period_step_days", period_days < PERIOD_STEP_DAYS_MIN)
        return period_steps - base_steps, None
    assert linked is not None
    table = linked[0].to_pydict()
    found = {p: i for i, p in enumerate(table["pseudonym"])}
    row = np.array([found.get(p, -1) for p in pseudonyms], dtype=np.int64)
    exclude("not_in_care_data", row < 0)
    certified = np.array([
        iso_to_day(table["certified_on"][r].isoformat())
        if r >= 0 and table["certified_on"][r] is not None else -1 for r in row], np.int64)
    exclude("certified_before_period", (certified >= 0) & (certified <= win.baseline[1]))
    end = win.period[1] + spec.followup_days
    onset = (certified > win.baseline[1]) & (certified <= end)
    monthly = np.array([table["care_cost_yen_per_month"][r] if r >= 0 else 0 for r in row],
                       dtype=float)
    return onset.astype(float), np.where(onset, MONTHS_PER_YEAR * monthly, 0.0)


def _with_ci(point: dict[str, float], intervals: dict[str, tuple[float, float]],
             scale: float = 1.0) -> dict[str, object]:
    return {name: {"estimate": _round(value * scale),
                   "ci95": [_round(v * scale) for v in intervals[name]]
                   if name in intervals else None}
            for name, value in point.items()}


def _round(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 6)


def _effects(outcome: str, y: np.ndarray, cost: np.ndarray | None, design: Design,
             matches: Matches, spec: EvaluationSpec) -> dict[str, object]:
    estimator = continuous_effect if outcome == "steps" else binary_effect
    outcomes: dict[str, tuple[np.ndarray, Estimator]] = {"outcome": (y, estimator)}
    if cost is not None:
        outcomes["cost"] = (cost, continuous_effect)
    cost_label = f"care_cost_yen_per_year_per_{PER_PARTICIPANTS}"
    result: dict[str, object] = {}
    for label, found, matched in (("effect", matches, True), ("naive", None, False)):
        ci = bootstrap(design, outcomes, spec.bootstrap, spec.seed, matched=matched)
        result[label] = _with_ci(estimator(y, found, design.treated), ci["outcome"])
        if cost is not None:
            result[f"{label}_{cost_label}"] = _with_ci(
                continuous_effect(cost, found, design.treated), ci["cost"], PER_PARTICIPANTS)
    if outcome == "steps":
        result["effect_kind"] = "difference-in-differences of mean daily steps"
    return result


def _write_outputs(target: Path, report: dict[str, object], pseudonyms: np.ndarray,
                   counts: np.ndarray, treated: np.ndarray, design: Design, matches: Matches,
                   y: np.ndarray) -> None:
    target.mkdir(parents=True, exist_ok=True)
    times = np.bincount(matches.control, minlength=len(treated))
    people = {"pseudonym": pseudonyms.tolist(), "attendance_days": counts.tolist(),
              "treated": treated.tolist(), "propensity_score": matches.ps.tolist(),
              "matched_as_control": times.tolist(), "outcome": y.tolist()}
    for k, name in enumerate(design.names):
        if name not in PERSON_TABLE_LEFT_OUT:
            people[name] = design.x[:, k].tolist()
    pq.write_table(pa.table(people), target / "people.parquet")
    pq.write_table(pa.table({
        "treated": pseudonyms[matches.treated].tolist(),
        "control": pseudonyms[matches.control].tolist(),
        "ps_treated": matches.ps[matches.treated].tolist(),
        "ps_control": matches.ps[matches.control].tolist()}), target / "pairs.parquet")
    pq.write_table(pa.Table.from_pylist(report["balance"]),  # type: ignore[arg-type]
                   target / "balance.parquet")
    tmp = target / (EVALUATION_FILE + ".tmp")
    tmp.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    tmp.replace(target / EVALUATION_FILE)


def spec_dict(spec: EvaluationSpec) -> dict[str, object]:
    return asdict(spec)
