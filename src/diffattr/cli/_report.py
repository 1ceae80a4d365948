"""``diffattr report``: an HTML page of a run's attributions, and PNG figures for papers."""

from __future__ import annotations

import argparse
from typing import Any

from diffattr.report import write_report


def add_parser(commands: Any) -> None:
    """Register ``diffattr report``."""
    report = commands.add_parser(
        "report", help="write a self-contained HTML report of a run, and PNG figures for papers"
    )
    report.add_argument(
        "run_dir", help="output directory of diffattr attribute (scores/<method>/, run.json)"
    )
    report.add_argument(
        "--out",
        metavar="FILE",
        help="HTML file (default: RUN_DIR/report.html); figures go to the folder of that name "
        "without .html",
    )
    report.add_argument(
        "--k", type=int, default=5, help="proponents and opponents per query (default: 5)"
    )
    report.add_argument(
        "--max-queries",
        type=int,
        default=50,
        metavar="N",
        help="show the first N queries (default: 50)",
    )
    report.add_argument(
        "--lds",
        metavar="FILE",
        help="LDS results from diffattr lds score --out (default: RUN_DIR/lds.json if present)",
    )
    report.set_defaults(run=report_command)


def report_command(args: argparse.Namespace) -> None:
    """``diffattr report``."""
    path = write_report(
        args.run_dir, args.out, k=args.k, max_queries=args.max_queries, lds=args.lds
    )
    print(f"report: {path} (open it in a browser; PNG figures in {path.with_suffix('')}/)")
