"""`genki demo`: the whole embedded default, end to end, on a simulated city.

Simulates the programme's fleet, ingests it into a fresh data directory, runs
the rules into the ledger, redeems points at a few partner shops, prints what
happened and ends with a ledger verification. No broker, no services.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from engine.errors import InsufficientPoints, UsageError
from engine.ingest.cli import ingest_paths
from engine.ingest.log import EmbeddedLog
from engine.progress import progress_bar

DEMO_REDEMPTIONS = 12
DEMO_RISK_ROWS = 10
SIMULATED_BULK_FILES = ("10-samples.ndjson", "20-activities.ndjson")


def _fresh_data_dir(given: Path | None) -> tuple[Path, bool]:
    if given is None:
        return Path(tempfile.mkdtemp(prefix="genki-demo-")), True
    if given.exists() and any(given.iterdir()):
        raise UsageError(f"demo: {given} is not empty; give a new or empty --data-dir")
    given.mkdir(parents=True, exist_ok=True)
    return given, False


def _simulate(args: argparse.Namespace, out: Path, console: Console) -> dict:
    from engine.sim import SimConfig, simulate

    config = SimConfig(participants=args.participants, app_users=args.app_users, days=args.days,
                       seed=args.seed)
    with console.status(f"simulating {config.participants:,} watch participants and "
                        f"{config.app_users:,} app users for {config.days} days"):
        manifest = simulate(config, out)
    return manifest if isinstance(manifest, dict) else manifest.as_dict()


def _redeem_at_shops(data_dir: Path, sim_dir: Path, console: Console) -> list[tuple]:
    from engine.ledger import Ledger

    shops = [shop["id"] for shop in orjson.loads((sim_dir / "shops.json").read_bytes())]
    done = []
    users = [orjson.loads(line)["user_id"]
             for line in (sim_dir / "00-profiles.ndjson").read_bytes().splitlines() if line]
    with Ledger.open(data_dir) as ledger:
        balances = sorted(((ledger.balance(u), u) for u in users), reverse=True)
        top = [(user, balance) for balance, user in balances[:DEMO_REDEMPTIONS]]
        for i, (user_id, balance) in enumerate(top):
            shop = shops[i % min(len(shops), 4)]
            points = max(1, balance // 2) if i % 5 else balance + 10
            try:
                entry = ledger.redeem(user_id, points, shop, f"{shop}-T1", f"demo-{i}",
                                      int(time.time() * 1000))
                done.append((shop, user_id, points, "ok", entry.entry_id))
            except InsufficientPoints as error:
                done.append((shop, user_id, points, "refused", str(error)))
    return done


def _cmd_demo(args: argparse.Namespace) -> int:
    console = Console(stderr=False, quiet=args.json, width=None if sys.stdout.isatty() else 120)
    started = time.perf_counter()
    data_dir, temporary = _fresh_data_dir(args.data_dir)
    sim_dir = data_dir / "simulated"
    report: dict[str, object] = {"data_dir": str(data_dir)}
    report["simulated"] = _simulate(args, sim_dir, console)
    with EmbeddedLog.open(data_dir) as log:
        counts = ingest_paths(log, [str(sim_dir)], show_progress=console.is_terminal)
    report["ingest"] = counts.as_dict()
    console.print(f"[bold]ingested[/] {counts.received:,} records: {counts.accepted:,} accepted, "
                  f"{counts.rejected:,} rejected to the dead-letter store; "
                  f"{counts.accepted_samples:,} samples stored, "
                  f"{counts.duplicate_samples:,} duplicate samples counted once")
    for reason, count in sorted(counts.rejected_by_reason.items()):
        console.print(f"    rejected {reason}: {count}")
    if not args.keep_input:
        for bulky in SIMULATED_BULK_FILES:  # in the log now; the same seed makes them again
            (sim_dir / bulky).unlink(missing_ok=True)
    _run_stages(args, data_dir, sim_dir, console, report)
    report["seconds"] = round(time.perf_counter() - started, 1)
    console.print(f"\n[bold]done[/] in {report['seconds']} s")
    if args.json:
        sys.stdout.write(orjson.dumps(report, default=str).decode() + "\n")
    if args.serve:
        return _serve(data_dir, console)
    if temporary and args.discard:
        shutil.rmtree(data_dir, ignore_errors=True)
    else:
        console.print(f"data directory {data_dir} (report: {data_dir / 'report.html'}); look "
                      f"around with `genki status --data-dir {data_dir}` or `genki flags "
                      f"--data-dir {data_dir}`" + (f"; remove it with `rm -rf {data_dir}`"
                                                   if temporary else ""))
    return 0 if report.get("verify_ok", True) else 1


def _run_stages(args: argparse.Namespace, data_dir: Path, sim_dir: Path, console: Console,
                report: dict[str, object]) -> None:
    from engine.pipeline import run_pipeline
    from engine.pipeline_cli import print_risk_list

    with progress_bar("rules", enabled=console.is_terminal) as advance:
        summary = run_pipeline(data_dir, on_chunk=lambda n, s: advance(n, f"{s:,} samples"))
    report["run"] = summary.as_dict()
    console.print(f"[bold]rules[/] {summary.samples:,} samples and {summary.activities:,} "
                  f"activities → {summary.awards_appended:,} awards, "
                  f"{summary.points_awarded:,} points; flags raised {summary.flags_raised}, "
                  f"cleared {summary.flags_cleared} ({summary.seconds} s)")
    for family, points in sorted(summary.points_by_rule.items()):
        console.print(f"    {family}: {points:,} points")
    redemptions = _redeem_at_shops(data_dir, sim_dir, console)
    report["redemptions"] = redemptions
    table = Table(title="redemptions at partner shops")
    for column in ("shop", "user", "points", "result"):
        table.add_column(column)
    for shop, user, points, result, detail in redemptions:
        table.add_row(shop, user, str(points), result if result == "ok" else detail)
    console.print(table)
    print_risk_list(data_dir, console, limit=DEMO_RISK_ROWS)
    if not args.no_research:
        _research(data_dir, console, report)
    _verify(data_dir, console, report)


def _research(data_dir: Path, console: Console, report: dict[str, object]) -> None:
    """The researchers' Parquet export and the programme report, as a city would hand them round."""
    import secrets

    from replay.export import export_embedded
    from replay.report import write_report

    key_file = data_dir / "demo-pseudonym.key"
    key_file.write_text(secrets.token_hex(32))
    key_file.chmod(0o600)
    with console.status("writing pseudonymised Parquet for researchers"):
        manifest = export_embedded(data_dir, data_dir / "research", key_file.read_bytes())
    report["replay"] = manifest.__dict__
    rows = ", ".join(f"{name} {count:,}" for name, count in manifest.rows.items())
    console.print(f"[bold]replay[/] {data_dir / 'research'}: {rows} rows; "
                  f"{manifest.users_left_out_no_consent:,} people left out (no research consent)")
    with console.status("writing the programme report"):
        html_path, csv_path = write_report(data_dir, data_dir / "report.html")
    report["report"] = str(html_path)
    console.print(f"[bold]report[/] {html_path} (risk list {csv_path.name})")


def _verify(data_dir: Path, console: Console, report: dict[str, object]) -> None:
    from engine.ledger import Ledger

    with Ledger.open(data_dir) as ledger:
        result = ledger.verify()
        head = ledger.head()
    report["ledger_head"] = head
    report["verify_ok"] = result.ok
    console.print(f"[bold]ledger[/] {head['entries']:,} entries, "
                  f"{head['points_outstanding']:,} points outstanding, chain head "
                  f"{head['chain_head'][:16]}…")
    console.print(f"[bold]ledger verify[/]: {'OK' if result.ok else 'FAILED ' + str(result)}")


def _serve(data_dir: Path, console: Console) -> int:
    from engine.api.cli import serve_demo

    return serve_demo(data_dir, console)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="simulate a city, ingest, award, redeem, verify")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="new or empty directory to keep (default: a temporary one)")
    parser.add_argument("--participants", type=int, default=1500)
    parser.add_argument("--app-users", type=int, default=12000)
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--discard", action="store_true",
                        help="remove the temporary data directory at the end")
    parser.add_argument("--keep-input", action="store_true",
                        help="keep the simulated NDJSON files after ingesting them")
    parser.add_argument("--serve", action="store_true",
                        help="then serve the HTTP API with a ready app key and shop key")
    parser.add_argument("--no-research", action="store_true",
                        help="skip the Parquet export and the HTML report")
    parser.add_argument("--json", action="store_true", help="print a JSON report instead")
    parser.set_defaults(func=_cmd_demo)
