"""`oneshot card RUN_DIR`: (re)write the model card of a run folder from its records."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "card",
        help="(re)write the model card README.md of a run folder from its oneshot.json and eval.json",
    )
    p.add_argument("run_dir", help="folder written by `oneshot prune`")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from oneshot.card import write_card

    print(write_card(Path(args.run_dir).expanduser()))
    return 0
