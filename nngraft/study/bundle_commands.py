"""``nngraft bundle RUN`` and ``nngraft reproduce BUNDLE``: a run in one file, rerun elsewhere and
compared row by row (:mod:`nngraft.study.bundle`, :mod:`nngraft.study.reproduce`; docs/bundle.md)."""

from __future__ import annotations

import argparse
import json

from ..cli.registry import alert, command, console, out
from ..util.checks import non_negative_number_arg
from .bundle import PACK_LIMIT_MB
from .summary import wide_console


def _bundle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="the run folder (what nngraft run -o DIR, nngraft sweep or nngraft demo "
                   "--out wrote)")
    p.add_argument("-o", "--output", metavar="FILE", help="the bundle to write: NAME.zip or NAME.tar.gz "
                   "(default: RUN.bundle.zip beside the folder)")
    p.add_argument("--pack-donor", choices=["auto", "always", "never"], default="auto",
                   help=f"put F's weights in the bundle: auto (default) packs a LoRA adapter or a folder of at most "
                   f"--pack-limit-mb; always; never (F by reference: its path or hub id and fingerprint)")
    p.add_argument("--pack-limit-mb", type=non_negative_number_arg, default=PACK_LIMIT_MB,
                   help=f"with --pack-donor auto, pack F when its folder holds at most this many MB (default "
                   f"{PACK_LIMIT_MB:g})")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("bundle", _bundle_args)
def cmd_bundle(args: argparse.Namespace) -> int:
    """Pack a run folder into one file (records + F's weights when small, else by reference)."""
    from rich.table import Table

    from .bundle import describe_size, make_bundle

    outcome = make_bundle(args.run, args.output, pack_donor=args.pack_donor, limit_mb=args.pack_limit_mb,
                          overwrite=args.force, console=console, show_progress=not args.no_progress)
    table = Table(title=f"{outcome.path} ({describe_size(outcome.size)}, {outcome.files} files)")
    for column in ("model", "donor", "source", "in the bundle", "why"):
        table.add_column(column)
    for plan in outcome.donors:
        where = "yes" if plan.packed else ("no (rebuilt)" if plan.why.startswith("a tiny") else "no (by reference)")
        table.add_row(plan.model, plan.role, plan.source, where, plan.why)
    wide_console(out, 160).print(table)
    for note in outcome.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"rerun it anywhere with: nngraft reproduce {outcome.path}")
    return 0


def _reproduce_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle nngraft bundle wrote (.zip or .tar.gz)")
    p.add_argument("--model", metavar="PATH", help="P, when it is not where the run loaded it from (checked against "
                   "the recorded fingerprint)")
    p.add_argument("--donor", metavar="PATH", help="F, when the bundle holds it by reference and it is not at its "
                   "recorded path, or to use your copy (checked against the recorded fingerprint)")
    p.add_argument("--device", default="auto", help="cpu, cuda, … (default auto)")
    p.add_argument("-o", "--output", metavar="DIR", help="a new folder for the unpacked bundle, the rerun's results "
                   "and report.json (default: a temporary folder, removed)")
    p.add_argument("--atol", type=non_negative_number_arg, help="absolute tolerance per number (default 1e-5; 2e-2 "
                   "for half-precision runs)")
    p.add_argument("--rtol", type=non_negative_number_arg, help="relative tolerance per number (default as --atol)")
    p.add_argument("--rows", action="store_true", help="print every row's verdict (default: only rows that differ)")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout instead of tables")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("reproduce", _reproduce_args, runs_models=True)
def cmd_reproduce(args: argparse.Namespace) -> int:
    """Rerun a bundle here and report, row by row, what matched within what tolerance (exit 1 if not)."""
    from .reproduce import report_tables, reproduce

    report = reproduce(args.bundle, model=args.model, donor=args.donor, device=args.device, output=args.output,
                       atol=args.atol, rtol=args.rtol, show_progress=not args.no_progress, console=console)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        wide = wide_console(out, 160)
        for table in report_tables(report, all_rows=args.rows):
            wide.print(table)
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if report.changed_files:
        alert(f"[yellow]warning:[/yellow] {', '.join(report.changed_files)} changed since the bundle was made "
              "(their sha256 differs from the one bundle.json records)")
    if args.output:
        console.print(f"report: {args.output}/report.json; the rerun's results: {report.rerun}")
    if not report.ok:
        counts = report.counts
        alert(f"[red]not reproduced:[/red] {counts['mismatch']} of {counts['rows']} rows differ beyond the tolerance"
              + (f", {counts['missing']} were not recomputed" if counts["missing"] else ""))
        return 1
    return 0
