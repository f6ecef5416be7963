"""`genki report`: a self-contained HTML programme report, and the staff-only risk list.

What a city team hands around: who took part, points awarded by rule, redemptions
by partner shop, the weekly step distribution, frailty flags raised and cleared
over time and check-ins by venue. Plots are PNGs embedded as data URIs, so the
one HTML file is the whole report.

The HTML holds aggregates only: no user ids, and nothing about a group of fewer
than k people (venues visited by fewer than k people are pooled as
"suppressed", a cohort's week with fewer than k people is not plotted). The
identifiable high-risk list is a separate CSV whose name says STAFF-ONLY: it is
for care-prevention staff, not for handing around.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import orjson

from engine.clock import day_to_iso, iso_to_day, tokyo_days, week_of_day, week_start_day
from engine.errors import UsageError
from engine.ingest.log import EmbeddedLog
from engine.ledger import LEDGER_FILE_NAME, Ledger
from engine.pipeline_cli import RiskRow, risk_list
from engine.rules.flags import FRAILTY_STATUSES
from engine.schemas import ACTIVITY_KINDS, METRIC_BY_NAME

LOG_RECORDS_PER_CHUNK = 20_000
VENUES_SHOWN_MAX = 25
K_DEFAULT = 5
STAFF_RISK_LIST_SUFFIX = "-STAFF-ONLY-risk-list.csv"
SUPPRESSED_VENUES = "(venues with fewer than k people)"


@dataclass
class ReportData:
    first_day: int
    last_day: int
    cohort: dict[str, str] = field(default_factory=dict)
    active_users: set[str] = field(default_factory=set)
    weekly_steps: dict[tuple[int, str], list[float]] = field(default_factory=dict)
    checkins_by_venue: Counter = field(default_factory=Counter)
    people_by_venue: dict[str, set[str]] = field(default_factory=dict)
    activities_by_kind: Counter = field(default_factory=Counter)
    points_by_rule_week: dict[tuple[int, str], int] = field(default_factory=dict)
    redemptions_by_shop: dict[str, list[int]] = field(default_factory=dict)
    flags_by_week: dict[tuple[int, str], int] = field(default_factory=dict)
    samples: int = 0


def month_window(month: str | None) -> tuple[int | None, int | None]:
    if month is None:
        return None, None
    try:
        first = dt.date.fromisoformat(month + "-01")
    except ValueError:
        raise UsageError(f"report: --month must be YYYY-MM, got {month!r}") from None
    following = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return iso_to_day(first.isoformat()), iso_to_day(following.isoformat()) - 1


def _in(day: int, window: tuple[int | None, int | None]) -> bool:
    return (window[0] is None or day >= window[0]) and (window[1] is None or day <= window[1])


def _collect_log(log: EmbeddedLog, data: ReportData, window: tuple[int | None, int | None]) -> None:
    steps_code = METRIC_BY_NAME["steps"].code
    daily: dict[tuple[int, int], float] = defaultdict(float)  # (user, day) -> steps
    names: list[str] = []
    index: dict[str, int] = {}
    end = log.position()
    for lo in range(0, end, LOG_RECORDS_PER_CHUNK):
        hi = min(lo + LOG_RECORDS_PER_CHUNK, end)
        cols = log.read_samples(lo, hi)
        data.samples += len(cols.ts_ms)
        days = tokyo_days(cols.ts_ms)
        keep = (cols.metric == steps_code) & _mask(days, window)
        global_idx = np.array([index.setdefault(u, len(index)) for u in cols.users], dtype=np.int64)
        if len(index) > len(names):
            names.extend(list(index)[len(names):])
        users = global_idx[cols.user_idx[keep]]
        keys, sums = _group_sum(users, days[keep], cols.value[keep])
        for (user, day), total in zip(keys, sums, strict=True):
            daily[(user, day)] += total
        acts = log.read_activities(lo, hi)
        for u, kind, ts, venue in zip(acts.user_idx.tolist(), acts.kind.tolist(),
                                      acts.ts_ms.tolist(), acts.venue_id, strict=True):
            day = int(tokyo_days(np.array([ts]))[0])
            if not _in(day, window):
                continue
            data.active_users.add(acts.users[u])
            data.activities_by_kind[ACTIVITY_KINDS[kind]] += 1
            if venue:
                data.checkins_by_venue[venue] += 1
                data.people_by_venue.setdefault(venue, set()).add(acts.users[u])
    for (user, day), total in daily.items():
        name = names[user]
        data.active_users.add(name)
        cohort = data.cohort.get(name, "app" if name.startswith("A") else "watch_trial")
        data.weekly_steps.setdefault((int(week_of_day(day)), cohort), []).append(total)


def _mask(days: np.ndarray, window: tuple[int | None, int | None]) -> np.ndarray:
    mask = np.ones(len(days), dtype=bool)
    if window[0] is not None:
        mask &= days >= window[0]
    if window[1] is not None:
        mask &= days <= window[1]
    return mask


def _group_sum(users: np.ndarray, days: np.ndarray, values: np.ndarray) -> tuple[list, list]:
    if not len(users):
        return [], []
    key = users * 100_000 + days.astype(np.int64)
    unique, inverse = np.unique(key, return_inverse=True)
    sums = np.bincount(inverse, weights=values)
    return [(int(k // 100_000), int(k % 100_000)) for k in unique], sums.tolist()


def _collect_ledger(data_dir: Path, data: ReportData, window: tuple[int | None, int | None]) -> None:
    if not (data_dir / LEDGER_FILE_NAME).exists():
        return
    with Ledger.open_read_only(data_dir) as ledger:
        rows = (row[1:] for page in ledger.iter_entry_rows(
            ("seq", "kind", "points", "day", "ts_ms", "rule", "ref")) for row in page)
        for kind, points, day, ts_ms, rule, ref in rows:
            entry_day = iso_to_day(day) if day else int(tokyo_days(np.array([ts_ms]))[0])
            if not _in(entry_day, window):
                continue
            week = int(week_of_day(entry_day))
            if kind == "award":
                family = (rule or "other").split(".")[0]
                data.points_by_rule_week[(week, family)] = \
                    data.points_by_rule_week.get((week, family), 0) + points
            elif kind in ("redeem", "refund") and ref:
                shop = orjson.loads(ref).get("shop", "?")
                totals = data.redemptions_by_shop.setdefault(shop, [0, 0, 0])
                if kind == "redeem":
                    totals[0] += -points
                    totals[2] += 1
                else:
                    totals[1] += points
        for state, day in (row[1:] for page in ledger.iter_flag_rows(("seq", "state", "day"))
                           for row in page):
            flag_day = iso_to_day(day)
            if _in(flag_day, window):
                key = (int(week_of_day(flag_day)), state)
                data.flags_by_week[key] = data.flags_by_week.get(key, 0) + 1


def _png(figure: plt.Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _week_label(week: int) -> str:
    return day_to_iso(week_start_day(week))[5:]


def suppress_small_groups(data: ReportData, k: int) -> None:
    """Pool venues with fewer than k people; drop step boxes of fewer than k people."""
    rare = {venue for venue, people in data.people_by_venue.items() if len(people) < k}
    for venue in rare:
        data.checkins_by_venue[SUPPRESSED_VENUES] += data.checkins_by_venue.pop(venue)
    data.people_by_venue.clear()
    data.weekly_steps = {key: values for key, values in data.weekly_steps.items()
                         if len(values) >= k}


def _plot_steps(data: ReportData) -> str | None:
    if not data.weekly_steps:
        return None
    weeks = sorted({w for w, _ in data.weekly_steps})
    figure, axis = plt.subplots(figsize=(8, 3.6))
    for offset, (cohort, color) in enumerate((("watch_trial", "#d9822b"), ("app", "#2b83d9"))):
        series = [data.weekly_steps.get((w, cohort), []) for w in weeks]
        positions = [i * 3 + offset for i in range(len(weeks))]
        if any(series):
            parts = axis.boxplot([s or [0] for s in series], positions=positions, widths=0.8,
                                 patch_artist=True, showfliers=False)
            for box in parts["boxes"]:
                box.set_facecolor(color)
            axis.plot([], [], color=color, lw=6, label=cohort.replace("_", " "))
    axis.set_xticks([i * 3 + 0.5 for i in range(len(weeks))], [_week_label(w) for w in weeks])
    axis.set_ylabel("steps per day")
    axis.set_xlabel("week starting (Monday)")
    axis.legend(loc="upper right")
    axis.set_title("Daily steps per person, by week")
    return _png(figure)


def _plot_stacked(series: dict[tuple[int, str], int], title: str, ylabel: str) -> str | None:
    if not series:
        return None
    weeks = sorted({w for w, _ in series})
    names = sorted({n for _, n in series})
    figure, axis = plt.subplots(figsize=(8, 3.2))
    bottom = np.zeros(len(weeks))
    for name in names:
        values = np.array([series.get((w, name), 0) for w in weeks], dtype=float)
        axis.bar([_week_label(w) for w in weeks], values, bottom=bottom, label=name)
        bottom += values
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend()
    return _png(figure)


def _plot_venues(data: ReportData) -> str | None:
    if not data.checkins_by_venue:
        return None
    top = data.checkins_by_venue.most_common(VENUES_SHOWN_MAX)
    figure, axis = plt.subplots(figsize=(8, 3.6))
    axis.bar([v for v, _ in top], [c for _, c in top], color="#4c9a5f")
    axis.set_ylabel("check-ins, classes, volunteering")
    axis.set_title(f"Attendance by venue (top {len(top)})")
    axis.tick_params(axis="x", rotation=70, labelsize=7)
    return _png(figure)


def collect(data_dir: Path, month: str | None) -> ReportData:
    window = month_window(month)
    with EmbeddedLog.open(data_dir, writer=False) as log:
        cohorts = {p["user_id"]: p["cohort"] for p in map(orjson.loads, log.profiles())}
        data = ReportData(first_day=window[0] or 0, last_day=window[1] or 0, cohort=cohorts)
        _collect_log(log, data, window)
    _collect_ledger(data_dir, data, window)
    return data


def write_report(data_dir: Path, out: Path, month: str | None = None,
                 k: int = K_DEFAULT) -> tuple[Path, Path]:
    """Writes the aggregate HTML report and, beside it, the staff-only identifiable risk
    list CSV; returns both paths."""
    if not 1 <= k <= 1_000:
        raise UsageError(f"report: --k must be 1..1000, got {k}")
    data = collect(data_dir, month)
    suppress_small_groups(data, k)
    risks = risk_list(data_dir) if (data_dir / "ledger.sqlite").exists() else []
    csv_path = out.with_name(out.stem + STAFF_RISK_LIST_SUFFIX)
    out.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["user_id", "severity", "flag", "since", "evidence", "frailty_status"])
        for row in risks:
            for flag in row.flags:
                writer.writerow([row.user_id, row.severity, flag.flag, flag.since,
                                 orjson.dumps(flag.evidence).decode(), row.frailty_status])
    out.parent.mkdir(parents=True, exist_ok=True)
    from engine.evaluation.report import evaluation_section

    page = _html(data, risks, month, k)
    out.write_text(page.replace("</body>", evaluation_section(data_dir, k) + "</body>", 1),
                   encoding="utf-8")
    return out, csv_path


def _table(headers: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(data: ReportData, risks: list[RiskRow], month: str | None, k: int) -> str:
    cohorts = Counter(data.cohort.get(u, "unknown") for u in data.active_users)
    points_by_rule: Counter[str] = Counter()
    for (_, family), points in data.points_by_rule_week.items():
        points_by_rule[family] += points
    flags: Counter[str] = Counter()
    for (_, state), count in data.flags_by_week.items():
        flags[state] += count
    shops = sorted(data.redemptions_by_shop.items(), key=lambda kv: -kv[1][0])
    figures = [_plot_steps(data),
               _plot_stacked(data.points_by_rule_week, "Points awarded by rule, by week", "points"),
               _plot_stacked(data.flags_by_week, "Frailty flags raised and cleared, by week", "flags"),
               _plot_venues(data)]
    images = "".join(f'<figure><img alt="plot" src="{src}"></figure>' for src in figures if src)
    period = f"month {month}" if month else "the whole programme period"
    by_flag: Counter[str] = Counter(f.flag for r in risks for f in r.flags)
    by_severity: Counter[str] = Counter(str(r.severity) for r in risks)
    by_status: Counter[str] = Counter(r.frailty_status for r in risks)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>genki programme report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
h1 {{ border-bottom: 3px solid #d9822b; }} table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f4efe9; }} td:first-child {{ text-align: left; }}
.cards {{ display: flex; gap: 1em; flex-wrap: wrap; }}
.card {{ background: #f4efe9; padding: 0.8em 1.2em; border-radius: 6px; }}
.card b {{ display: block; font-size: 1.6em; }} figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>genki programme report</h1>
<p>Health points and frailty prevention, {html.escape(period)}. Generated
{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} from the embedded log and ledger.</p>
<div class="cards">
<div class="card"><b>{len(data.active_users):,}</b>people active</div>
<div class="card"><b>{cohorts.get('watch_trial', 0):,}</b>smartwatch trial</div>
<div class="card"><b>{cohorts.get('app', 0):,}</b>app users</div>
<div class="card"><b>{sum(points_by_rule.values()):,}</b>points awarded</div>
<div class="card"><b>{sum(v[0] for v in data.redemptions_by_shop.values()):,}</b>points redeemed</div>
<div class="card"><b>{flags.get('raised', 0):,}</b>flags raised</div>
<div class="card"><b>{data.samples:,}</b>samples processed</div>
</div>
<h2>Points awarded by rule</h2>
{_table(["rule", "points"], [[k, f"{v:,}"] for k, v in points_by_rule.most_common()])}
<h2>Redemptions by partner shop</h2>
{_table(["shop", "redeemed", "refunded", "net", "redemptions"],
        [[s, f"{v[0]:,}", f"{v[1]:,}", f"{v[0] - v[1]:,}", v[2]] for s, v in shops])}
<h2>Activities</h2>
{_table(["kind", "events"], [[k, f"{v:,}"] for k, v in data.activities_by_kind.most_common()])}
<h2>Trends</h2>
{images}
<h2>Frailty risk</h2>
<p>{len(risks):,} people have raised frailty flags. This report shows counts only; the
identifiable list is a separate staff-only output.</p>
{_table(["frailty status (revised J-CHS, wearable criteria)", "people"],
        [[s, f"{by_status[s]:,}"] for s in FRAILTY_STATUSES if by_status[s]])}
{_table(["flag", "people"], [[f, f"{n:,}"] for f, n in by_flag.most_common()])}
{_table(["severity", "people"], [[s, f"{n:,}"] for s, n in sorted(by_severity.items())])}
<p>Aggregates only: no person is named, and groups of fewer than {k} people are
suppressed (venues pooled, weekly step boxes left out).</p>
</body></html>
"""
