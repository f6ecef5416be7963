"""The evaluation section of `genki report`: indicators, and the latest `genki evaluate` result.

Aggregates only: shares and counts per month, the balance table and effect
estimates; no person appears. Plots are inline SVG (text stays text), so the
one HTML file is still the whole report.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import orjson

from engine.evaluation.evaluate import EVALUATION_DIR, EVALUATION_FILE
from engine.evaluation.indicators import compute_indicators
from engine.evaluation.matching import SMD_BALANCED_MAX


def _svg(figure: plt.Figure) -> str:
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "genki"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    text = buffer.getvalue()
    return f'<figure class="svg">{text[text.index("<svg"):]}</figure>'


def _figures(*figures: str | None) -> str:
    return "".join(f for f in figures if f)


def _table(headers: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pct(value: object) -> str:
    return "–" if value is None else f"{float(value):.1%}"  # type: ignore[arg-type]


def _plot_participation(months: list[dict]) -> str | None:  # type: ignore[type-arg]
    if not months:
        return None
    labels = [m["month"] for m in months]
    figure, axis = plt.subplots(figsize=(8, 3.2))
    axis.plot(labels, [m["monthly_share"] for m in months], marker="o", label="at least monthly")
    axis.plot(labels, [m["weekly_share"] if m["weekly_share"] is not None else float("nan")
                       for m in months], marker="s", label="at least weekly")
    axis.set_ylim(0, 1)
    axis.set_ylabel("share of people")
    axis.set_title("Attending a community venue (aged 65+, research-consenting)")
    axis.legend()
    return _svg(figure)


def indicators_html(data_dir: Path, k: int = 1) -> str:
    result = compute_indicators(data_dir)
    months: list[dict] = [m for m in result["months"]  # type: ignore[attr-defined,type-arg]
                          if m["people"] >= k]
    kinds = sorted({k for m in months for k in m["by_venue_kind"]})
    rows = [[m["month"], f"{m['people']:,}", _pct(m["weekly_share"]), _pct(m["monthly_share"]),
             *(_pct(m["by_venue_kind"].get(k, {}).get("monthly_share")) for k in kinds),
             f"{m['points_awarded']:,}", f"{m['points_redeemed']:,}",
             f"{m['people_flagged']:,} ({_pct(m['people_flagged_share'])})"] for m in months]
    image = _figures(_plot_participation(months))
    return (f"<h2>Indicators</h2><p>{html.escape(str(result['population']))}; "
            f"{int(result['people_left_out_no_consent']):,} people without research consent "  # type: ignore[call-overload]
            "are left out. Weekly: at least once in every whole Monday–Sunday week of the "
            f"month. Months with fewer than {k} people are not shown.</p>"
            + _table(["month", "people 65+", "weekly", "monthly",
                      *(f"monthly: {k}" for k in kinds), "points awarded", "points redeemed",
                      "people flagged"], rows) + image)


def _plot_balance(balance: list[dict]) -> str:  # type: ignore[type-arg]
    figure, axis = plt.subplots(figsize=(7, 0.28 * len(balance) + 1.2))
    names = [r["covariate"] for r in balance]
    axis.scatter([abs(r["smd_before"]) for r in balance], names, label="before matching",
                 color="#d9822b")
    axis.scatter([abs(r["smd_after"]) for r in balance], names, label="after matching",
                 color="#2b83d9")
    axis.axvline(SMD_BALANCED_MAX, color="#888", linestyle="--")
    axis.set_xlabel("|standardised mean difference|")
    axis.set_title("Covariate balance")
    axis.legend(loc="lower right")
    return _svg(figure)


def _plottable(value: dict | None) -> bool:  # type: ignore[type-arg]
    return bool(value and value.get("estimate") is not None and value.get("ci95")
                and None not in value["ci95"])


def _plot_effect(report: dict) -> str | None:  # type: ignore[type-arg]
    name = "difference" if report["outcome"] == "steps" else "risk_difference"
    rows = [(label, report[key][name]) for label, key in (("matched", "effect"),
                                                          ("naive", "naive"))
            if _plottable(report.get(key, {}).get(name))]
    if not rows:
        return None
    figure, axis = plt.subplots(figsize=(7, 1.8))
    for y, (label, value) in enumerate(rows):
        low, high = value["ci95"]
        estimate = value["estimate"]  # a percentile interval need not contain it
        axis.errorbar([estimate], [y], xerr=[[max(0.0, estimate - low)], [max(0.0, high - estimate)]],
                      fmt="o", capsize=4, color="#2b83d9" if label == "matched" else "#d9822b")
        axis.plot([low, high], [y, y], color="#2b83d9" if label == "matched" else "#d9822b")
    axis.set_yticks(range(len(rows)), [r[0] for r in rows])
    axis.axvline(0, color="#888", linewidth=1)
    axis.set_xlabel(f"{name.replace('_', ' ')} with 95% bootstrap interval")
    axis.set_title(f"Effect on {report['outcome'].replace('_', ' ')}")
    return _svg(figure)


def _effect_rows(report: dict) -> list[list[object]]:  # type: ignore[type-arg]
    rows = []
    for label, key in (("matched", "effect"), ("naive", "naive")):
        for name, value in report.get(key, {}).items():
            ci = value.get("ci95")
            interval = f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci and None not in ci else "–"
            estimate = "–" if value["estimate"] is None else f"{value['estimate']:.4g}"
            rows.append([label, name.replace("_", " "), estimate, interval])
    for key, value in report.items():
        if key.endswith("_per_1000") and isinstance(value, dict):
            d = value["difference"]
            rows.append([key.split("_")[0].replace("effect", "matched"),
                         "care cost difference, yen per year per 1,000 participants",
                         f"{d['estimate']:,.0f}", f"[{d['ci95'][0]:,.0f}, {d['ci95'][1]:,.0f}]"])
    return rows


def evaluation_html(data_dir: Path, k: int = 1) -> str:
    path = data_dir / EVALUATION_DIR / EVALUATION_FILE
    if not path.exists():
        return ("<h2>Programme evaluation</h2><p>No evaluation yet: run <code>genki link</code> "
                "and <code>genki evaluate</code>.</p>")
    report = orjson.loads(path.read_bytes())
    people, design = report["people"], report["design"]
    if min(people["treated_matched"], people["controls_used"]) < k:
        return (f"<h2>Programme evaluation</h2><p>The latest evaluation compared fewer than {k} "
                "people in a group; not shown in an aggregate report.</p>")
    treatment = design["treatment"]
    what = (f"campaign {treatment['campaign']}" if treatment.get("campaign")
            else f"{treatment.get('kind') or 'any activity'}"
                 + (f" at {', '.join(treatment['venues'])}" if treatment.get("venues") else ""))
    balance_rows = [[r["covariate"], f"{r['mean_treated']:.3f}", f"{r['mean_control_before']:.3f}",
                     f"{r['smd_before']:.3f}", f"{r['smd_after']:.3f}"] for r in report["balance"]]
    images = _figures(_plot_balance(report["balance"]), _plot_effect(report))
    return (
        "<h2>Programme evaluation</h2>"
        f"<p>Treated: at least {treatment['attendances_min']} days of {html.escape(what)} "
        f"between {treatment['since']} and {treatment['until']}; baseline "
        f"{design['baseline']['since']} to {design['baseline']['until']}; outcome "
        f"<b>{html.escape(report['outcome'])}</b>. {people['treated']:,} treated and "
        f"{people['controls']:,} untreated research-consenting people aged {design['age_min']}+; "
        f"{people['treated_matched']:,} treated matched ({people['treated_unmatched']:,} without "
        f"a control within the caliper). Largest |SMD| after matching: "
        f"{report['smd_after_max']:.3f} ({'balanced' if report['balanced'] else 'NOT balanced'}, "
        f"threshold {SMD_BALANCED_MAX}).</p>"
        + _table(["", "estimate", "value", "95% interval"],
                 [[r[0], r[1], r[2], r[3]] for r in _effect_rows(report)])
        + _table(["covariate", "mean treated", "mean untreated", "SMD before", "SMD after"],
                 balance_rows)
        + images)


def evaluation_section(data_dir: Path, k: int = 1) -> str:
    """HTML for `genki report`: indicators first, then the latest evaluation; groups of fewer
    than k people are not shown (the report's k-anonymity threshold)."""
    return indicators_html(data_dir, k) + evaluation_html(data_dir, k)
