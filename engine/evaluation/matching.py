"""Propensity-score matching, balance and effects: pure functions over arrays.

Design (Hachioji's group A / group B): every treated person gets the control
with the nearest logit propensity score inside the same exact stratum (age
band x sex x cohort x baseline frailty status), with replacement, within a
caliper of CALIPER_SD_LOGIT standard deviations of the logit score (Austin
2011); treated people without such a control are left out and counted. The
propensity model is scikit-learn's unpenalised logistic regression. Intervals
come from a bootstrap that resamples people and re-does the whole estimation
(score, matching, effect) each time, so they include the matching's own noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engine.errors import GenkiError

CALIPER_SD_LOGIT = 0.2
PS_CLIP = 1e-6
LOGISTIC_ITERATIONS_MAX = 1_000
LOGISTIC_C_UNPENALISED = 1e12  # inverse penalty strength: effectively none
BOOTSTRAP_REPLICATES_DEFAULT = 200
BOOTSTRAP_REPLICATES_MAX = 10_000
CONFIDENCE_LEVEL = 0.95
SMD_BALANCED_MAX = 0.1


class EvaluationError(GenkiError):
    exit_code = 11
    code = "evaluation"


@dataclass(frozen=True)
class Design:
    """Covariates for the score (columns of x) and the exact strata."""

    names: list[str]
    x: np.ndarray  # (people, covariates) float64
    strata: np.ndarray  # int64 stratum code per person
    treated: np.ndarray  # bool


@dataclass(frozen=True)
class Matches:
    treated: np.ndarray  # person index of each matched treated person
    control: np.ndarray  # person index of the control matched to it
    ps: np.ndarray  # propensity score per person
    treated_unmatched: int


def propensity_scores(x: np.ndarray, treated: np.ndarray) -> np.ndarray:
    try:
        from sklearn.linear_model import LogisticRegression
    except ModuleNotFoundError:
        raise EvaluationError("evaluate: scikit-learn is not installed; install genki with the "
                              "`eval` extra (pip install 'genki[eval]')") from None
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    z = (x - x.mean(axis=0)) / scale
    model = LogisticRegression(C=LOGISTIC_C_UNPENALISED, max_iter=LOGISTIC_ITERATIONS_MAX)
    model.fit(z, treated.astype(np.int64))
    return np.clip(model.predict_proba(z)[:, 1], PS_CLIP, 1 - PS_CLIP)


def nearest_matches(design: Design, ps: np.ndarray) -> Matches:
    logit = np.log(ps / (1 - ps))
    caliper = CALIPER_SD_LOGIT * float(logit.std())
    treated_out: list[np.ndarray] = []
    control_out: list[np.ndarray] = []
    order = np.lexsort((logit, design.strata))
    strata_sorted = design.strata[order]
    bounds = np.flatnonzero(np.diff(strata_sorted)) + 1
    for block in np.split(order, bounds):
        is_t = design.treated[block]
        t, c = block[is_t], block[~is_t]
        if not len(t) or not len(c):
            continue
        c_logit = logit[c]  # sorted within the block
        pos = np.searchsorted(c_logit, logit[t])
        left = np.clip(pos - 1, 0, len(c) - 1)
        right = np.clip(pos, 0, len(c) - 1)
        pick = np.where(np.abs(c_logit[left] - logit[t]) <= np.abs(c_logit[right] - logit[t]),
                        left, right)
        ok = np.abs(c_logit[pick] - logit[t]) <= caliper
        treated_out.append(t[ok])
        control_out.append(c[pick[ok]])
    matched_t = np.concatenate(treated_out) if treated_out else np.zeros(0, np.int64)
    matched_c = np.concatenate(control_out) if control_out else np.zeros(0, np.int64)
    return Matches(matched_t, matched_c, ps, int(design.treated.sum()) - len(matched_t))


def match(design: Design) -> Matches:
    if design.treated.all() or not design.treated.any():
        raise EvaluationError(
            f"evaluate: {int(design.treated.sum())} of {len(design.treated)} people are treated; "
            "a comparison needs both treated and untreated people")
    return nearest_matches(design, propensity_scores(design.x, design.treated))


def smd(treated_values: np.ndarray, control_values: np.ndarray, treated_all: np.ndarray,
        control_all: np.ndarray) -> float:
    """Standardised mean difference; the denominator is the pooled SD before matching."""
    pooled = np.sqrt((treated_all.var(ddof=1) + control_all.var(ddof=1)) / 2) \
        if len(treated_all) > 1 and len(control_all) > 1 else 0.0
    difference = float(treated_values.mean() - control_values.mean()) \
        if len(treated_values) and len(control_values) else 0.0
    if pooled == 0:
        return 0.0
    return difference / float(pooled)


def balance_rows(design: Design, matches: Matches) -> list[dict[str, object]]:
    t_all, c_all = design.treated, ~design.treated
    rows: list[dict[str, object]] = []
    for k, name in enumerate(design.names):
        col = design.x[:, k]
        before = smd(col[t_all], col[c_all], col[t_all], col[c_all])
        after = smd(col[matches.treated], col[matches.control], col[t_all], col[c_all])
        rows.append({
            "covariate": name,
            "mean_treated": round(float(col[t_all].mean()), 6),
            "mean_control_before": round(float(col[c_all].mean()), 6),
            "smd_before": round(before, 6),
            "mean_treated_matched": round(float(col[matches.treated].mean()), 6)
            if len(matches.treated) else None,
            "mean_control_after": round(float(col[matches.control].mean()), 6)
            if len(matches.control) else None,
            "smd_after": round(after, 6)})
    return rows


Estimator = Callable[[np.ndarray, Matches | None, np.ndarray], dict[str, float]]


def binary_effect(y: np.ndarray, matches: Matches | None, treated: np.ndarray) -> dict[str, float]:
    """Risk in each group, risk difference and ratio (matched, or naive when matches is None)."""
    if matches is None:
        yt, yc = y[treated], y[~treated]
    else:
        yt, yc = y[matches.treated], y[matches.control]
    risk_t = float(yt.mean()) if len(yt) else float("nan")
    risk_c = float(yc.mean()) if len(yc) else float("nan")
    return {"risk_treated": risk_t, "risk_control": risk_c, "risk_difference": risk_t - risk_c,
            "risk_ratio": risk_t / risk_c if risk_c > 0 else float("nan")}


def continuous_effect(y: np.ndarray, matches: Matches | None,
                      treated: np.ndarray) -> dict[str, float]:
    """Mean in each group and their difference (y may be a change: difference-in-differences)."""
    if matches is None:
        yt, yc = y[treated], y[~treated]
    else:
        yt, yc = y[matches.treated], y[matches.control]
    mean_t = float(yt.mean()) if len(yt) else float("nan")
    mean_c = float(yc.mean()) if len(yc) else float("nan")
    return {"mean_treated": mean_t, "mean_control": mean_c, "difference": mean_t - mean_c}


def bootstrap(design: Design, outcomes: dict[str, tuple[np.ndarray, Estimator]], replicates: int,
              seed: int, *, matched: bool) -> dict[str, dict[str, tuple[float, float]]]:
    """Percentile intervals per outcome, resampling people and re-doing score and matching."""
    if not 1 <= replicates <= BOOTSTRAP_REPLICATES_MAX:
        raise EvaluationError(f"evaluate: --bootstrap {replicates} outside "
                              f"[1, {BOOTSTRAP_REPLICATES_MAX}]")
    rng = np.random.default_rng(seed)
    n = len(design.treated)
    draws: dict[str, dict[str, list[float]]] = {label: {} for label in outcomes}
    for _ in range(replicates):
        pick = rng.integers(0, n, n)
        sample = Design(design.names, design.x[pick], design.strata[pick], design.treated[pick])
        if sample.treated.all() or not sample.treated.any():
            continue
        found = nearest_matches(sample, propensity_scores(sample.x, sample.treated)) \
            if matched else None
        for label, (y, estimator) in outcomes.items():
            for name, value in estimator(y[pick], found, sample.treated).items():
                draws[label].setdefault(name, []).append(value)
    tail = (1 - CONFIDENCE_LEVEL) / 2
    return {label: {name: (float(np.nanquantile(v, tail)), float(np.nanquantile(v, 1 - tail)))
                    for name, v in by_name.items()}
            for label, by_name in draws.items()}
