"""`genki rules check [FILE]` and `genki rules show [FILE]`."""

from __future__ import annotations

import argparse
from pathlib import Path

import orjson

from engine.rules.config import RULES_DEFAULT_PATH, Rules, load_rules
from engine.rules.flags import FLAG_NAMES


def summary(rules: Rules) -> list[str]:
    steps = rules.points.steps
    tiers = ", ".join(f"{t.steps_min} steps -> {t.points}" for t in steps.tiers)
    bands = ", ".join(f"{b.age_min}+ {b.percent}%" for b in steps.target.bands) or "none"
    levels = ", ".join(f"{lv.name} ({lv.days_min} days) +{lv.points}"
                       for lv in rules.points.streak.levels) or "none"
    activities = ", ".join(
        f"{kind} {rule.points}/{rule.once_per}" for kind, rule in
        zip(("checkin", "meal", "brain_training", "volunteer", "class"),
            rules.points.activities.by_kind(), strict=True))
    lines = [
        f"step tiers: {tiers} (cap {steps.points_per_day_max}/day)",
        f"age bands: {bands}; default {steps.target.percent_default}%",
        f"streak: target tier {rules.points.streak.target_tier}; {levels}",
        f"activities: {activities}",
        f"campaigns: {len(rules.campaigns)}"
        + "".join(f"\n  {c.name}: {c.kind} {c.start}..{c.end} on {', '.join(c.applies_to)}"
                  for c in rules.campaigns),
    ]
    flags = rules.flags
    enabled = [name for name in FLAG_NAMES if flags.section(name).enabled]
    lines.append(f"flags: {len(enabled)} enabled ({', '.join(enabled)}); "
                 f"settle {flags.settle_days} days")
    return lines


def _cmd_check(args: argparse.Namespace) -> int:
    rules = load_rules(args.file)
    print(f"{args.file}: ok, version {rules.version}")
    for line in summary(rules):
        print(f"  {line}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    rules = load_rules(args.file)
    document = {"version": rules.version, "rules": rules.normalised()}
    print(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("rules", help="validate or show a rules file")
    commands = parser.add_subparsers(dest="rules_command", metavar="ACTION", required=True)
    check = commands.add_parser("check", help="validate a rules file; print its version")
    check.add_argument("file", nargs="?", type=Path, default=RULES_DEFAULT_PATH)
    check.set_defaults(func=_cmd_check)
    show = commands.add_parser("show", help="print the normalised rules as JSON")
    show.add_argument("file", nargs="?", type=Path, default=RULES_DEFAULT_PATH)
    show.set_defaults(func=_cmd_show)
