"""`genki link`, `genki evaluate` and `genki indicators`: programme evaluation (EBPM)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

from engine.config import add_data_dir_arg, data_dir_of
from engine.evaluation import design
from engine.evaluation.matching import BOOTSTRAP_REPLICATES_DEFAULT


def _cmd_link(args: argparse.Namespace) -> int:
    from engine.evaluation.linkage import link_care_data, read_key_file

    key = read_key_file(args.pseudonym_key_file, "link")
    manifest = link_care_data(data_dir_of(args), args.care_data, key,
                              require_key_check=not args.no_key_check,
                              match_fraction_min=args.min_match_fraction)
    if args.json:
        sys.stdout.write(orjson.dumps(manifest.as_dict()).decode() + "\n")
    else:
        print(f"linked {manifest.linked:,} of {manifest.records:,} care records to consenting "
              f"people ({manifest.consenting_people_found_fraction:.1%} of "
              f"{manifest.consenting_people:,} consenting people found; "
              f"{manifest.records_not_linked:,} records not linked)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from engine.evaluation.evaluate import EvaluationSpec, evaluate
    from engine.evaluation.linkage import read_key_file

    key = read_key_file(args.pseudonym_key_file, "evaluate")
    spec = EvaluationSpec(
        outcome=args.outcome, kind=args.kind,
        venues=tuple(v for v in args.venues.split(",") if v) if args.venues else None,
        campaign=args.campaign, attendances_min=args.min_attendances,
        baseline_from=args.baseline_from, baseline_until=args.baseline_until,
        since=args.since, until=args.until, followup_days=args.followup_days,
        age_min=args.age_min, bootstrap=args.bootstrap, seed=args.seed)
    report = evaluate(data_dir_of(args), key, spec, args.out)
    if args.json:
        sys.stdout.write(orjson.dumps(report).decode() + "\n")
        return 0
    _print_report(report)
    return 0


def _print_report(report: dict) -> None:  # type: ignore[type-arg]
    people = report["people"]
    print(f"outcome {report['outcome']}: {people['treated']:,} treated, {people['controls']:,} "
          f"controls; {people['treated_matched']:,} treated matched "
          f"({people['treated_unmatched']:,} without a control in the caliper)")
    print(f"{'covariate':<28} {'SMD before':>10} {'SMD after':>10}")
    for row in report["balance"]:
        print(f"{row['covariate']:<28} {row['smd_before']:>10.3f} {row['smd_after']:>10.3f}")
    for label in ("effect", "naive"):
        parts = []
        for name, value in report[label].items():
            ci = value["ci95"]
            interval = f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci and None not in ci else ""
            parts.append(f"{name} {value['estimate']:.4g}{interval}")
        print(f"{'matched' if label == 'effect' else 'naive':<8} " + "; ".join(parts))
    for key, value in report.items():
        if key.endswith("per_1000") and isinstance(value, dict):
            difference = value["difference"]
            print(f"{key}: {difference['estimate']:,.0f} yen, 95% interval "
                  f"[{difference['ci95'][0]:,.0f}, {difference['ci95'][1]:,.0f}]")


def _cmd_indicators(args: argparse.Namespace) -> int:
    from engine.evaluation.indicators import compute_indicators, format_indicators

    venue_kinds = _venue_kinds(args.venues_file) if args.venues_file else None
    result = compute_indicators(data_dir_of(args), venue_kinds=venue_kinds,
                                age_min=args.age_min)
    if args.json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    else:
        print(format_indicators(result))
    return 0


def _venue_kinds(path: Path) -> dict[str, str]:
    from engine.errors import UsageError

    try:
        rows = orjson.loads(path.read_bytes())
        return {str(r["id"]): str(r["kind"]) for r in rows}
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as error:
        raise UsageError(f"indicators: --venues-file {path} must be a JSON list of "
                         f"{{id, kind}} objects (like simulate's venues.json): {error}") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "link", help="link care-insurance outcomes to consenting people by shared pseudonym")
    parser.add_argument("--care-data", type=Path, required=True, help="care-data CSV file")
    parser.add_argument("--pseudonym-key-file", type=Path, default=None,
                        help="the pseudonym key shared with the care-data side (as for replay)")
    parser.add_argument("--no-key-check", action="store_true",
                        help="accept a file without a key check line (the match-rate check "
                             "still applies)")
    parser.add_argument("--min-match-fraction", type=float, default=0.5,
                        help="refuse when fewer consenting people are found (default "
                             "%(default)s)")
    parser.add_argument("--json", action="store_true")
    add_data_dir_arg(parser)
    parser.set_defaults(func=_cmd_link)

    parser = subparsers.add_parser(
        "evaluate", help="matched comparison of participants and non-participants")
    parser.add_argument("--pseudonym-key-file", type=Path, default=None)
    parser.add_argument("--outcome", choices=["care_onset", "frailty", "steps"], default=None,
                        help="default: care_onset when care data is linked, else steps")
    parser.add_argument("--kind", default=None,
                        help=f"activity kind that counts as taking part (default "
                             f"{design.TREATMENT_KIND_DEFAULT}, or any kind with --venues)")
    parser.add_argument("--venues", default=None, help="comma-separated venue ids that count")
    parser.add_argument("--campaign", default=None,
                        help="treatment = days awarded points by this campaign")
    parser.add_argument("--min-attendances", type=int, default=None,
                        help="distinct days needed in the period (default one per fortnight)")
    parser.add_argument("--baseline-from", default=None, help="YYYY-MM-DD (default: first day)")
    parser.add_argument("--baseline-until", default=None,
                        help=f"YYYY-MM-DD (default: {design.BASELINE_DAYS_MAX} days or half the "
                             "data)")
    parser.add_argument("--since", default=None, help="treatment period start (default: after "
                                                      "the baseline)")
    parser.add_argument("--until", default=None, help="treatment period end (default: last day)")
    parser.add_argument("--followup-days", type=int, default=design.FOLLOWUP_DAYS_DEFAULT,
                        help="care-need onset counted this long after the period (default "
                             "%(default)s)")
    parser.add_argument("--age-min", type=int, default=design.AGE_YEARS_MIN_DEFAULT)
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP_REPLICATES_DEFAULT,
                        help="bootstrap replicates for the 95%% intervals (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default <data>/evaluation)")
    parser.add_argument("--json", action="store_true")
    add_data_dir_arg(parser)
    parser.set_defaults(func=_cmd_evaluate)

    parser = subparsers.add_parser(
        "indicators", help="participation in community venues, points, redemptions, frailty")
    parser.add_argument("--venues-file", type=Path, default=None,
                        help="venue kinds, a JSON list of {id, kind} (default: activity kind)")
    parser.add_argument("--age-min", type=int, default=design.AGE_YEARS_MIN_DEFAULT)
    parser.add_argument("--json", action="store_true")
    add_data_dir_arg(parser)
    parser.set_defaults(func=_cmd_indicators)
