"""`oneshot report RUN_DIR [RUN_DIR ...] [--baseline DENSE] --out report/`."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``report`` on the ``add_subparsers()`` object of the ``oneshot`` parser."""
    p = subparsers.add_parser(
        "report",
        help="write report.md, report.json and a self-contained report.html for pruning runs",
        description=(
            "Summarise `oneshot prune` output folders (oneshot.json, and eval.json when `oneshot eval` ran): "
            "per-layer sparsity and loss, perplexity (vs sparsity for several runs), long-tail slices with "
            "flags, task deltas."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="`oneshot prune` output folder(s)")
    p.add_argument(
        "--baseline",
        default=None,
        metavar="DENSE",
        help="the dense model's `oneshot eval` folder (or its eval.json), for dense numbers a run lacks",
    )
    p.add_argument("--out", default="report", help="output folder (replaced if it holds a previous report)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return p


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from oneshot.eval.report import write_report

    paths = write_report(args.run_dirs, baseline=args.baseline, out=args.out)
    if not args.quiet:
        for key in ("html", "md", "json"):
            print(f"{key:5} {paths[key]}")
    return 0
