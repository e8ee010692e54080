"""``cpsc-ray report``: tables and plots from the results of runs and experiments (no Ray, no torch)."""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser("report", help="tables and plots comparing methods and datasets from results")
    report.add_argument(
        "results", nargs="+", metavar="RESULTS", help="storage roots or results/ directories (local paths or URIs)"
    )
    report.add_argument("-o", "--out", required=True, metavar="OUT_DIR", help="local directory to write the report to")
    report.add_argument("--experiments", nargs="+", metavar="EXP", help="report only these experiments")
    report.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from cpsc_ray.results.report import build_report

    page = build_report(args.results, args.out, args.experiments)
    print(f"report: {page} (report.md, summary.parquet and cross_dataset.parquet beside it)")
    return 0
