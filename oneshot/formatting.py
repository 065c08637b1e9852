"""Formatting shared by everything that prints or renders results: the model card, the report, the CLI.

One copy of each: numbers (fixed digits, or the compact form tables use), percentages, byte sizes,
Markdown tables, and the names derived from a run (layer kinds, pattern slugs and descriptions).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

__all__ = [
    "MISSING",
    "compact",
    "finite",
    "fixed",
    "human_bytes",
    "layer_kind",
    "md_table",
    "pattern_slug",
    "pattern_text",
    "pct",
]

MISSING = "-"  # what a table shows for a value that was not measured


def finite(value: Any) -> float | None:
    """A finite float, or None (JSON null, NaN, inf, booleans, non-numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def fixed(value: Any, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; `MISSING` when it is not a finite number."""
    v = finite(value)
    return MISSING if v is None else f"{v:.{digits}f}"


def compact(value: Any, digits: int = 3) -> str:
    """Table form: integers with thousands separators, floats with ``digits`` decimals (significant digits
    when very large or small), yes/no for booleans, `MISSING` for None, NaN and inf spelled out."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return (
            f"{value:.{digits}g}"
            if abs(value) >= 1e4 or (value and abs(value) < 1e-3)
            else f"{value:.{digits}f}"
        )
    return str(value)


def pct(value: Any) -> str:
    """A relative change as a signed percentage (0.1234 -> "+12.34%"); `MISSING` when not finite."""
    v = finite(value)
    return MISSING if v is None else f"{100 * v:+.2f}%"


def human_bytes(n: Any) -> str:
    """1536 -> "1.50 KiB"; `MISSING` for nothing."""
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return MISSING
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def md_table(header: list[str], rows: Iterable[list[str]]) -> str:
    """A Markdown table; ``|`` inside cells is escaped."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def layer_kind(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj`` (the part after the block index);
    ``model.layers.3.mlp.experts.down_proj[7]`` -> ``mlp.experts.down_proj`` (all experts together)."""
    name = re.sub(r"\[\d+\]$", "", name)
    m = re.match(r"^(?:.*?\.)?\d+\.(.+)$", name)
    return m.group(1) if m else name


def pattern_slug(pattern: str) -> str:
    """ "2:4" -> "2of4" (as in run folder and export names); "unstructured" stays."""
    return pattern.replace(":", "of")


def pattern_text(pattern: str) -> str:
    """A sentence-part describing a sparsity pattern."""
    if pattern == "unstructured":
        return "unstructured (each weight matrix pruned anywhere)"
    if ":" not in pattern:
        return pattern
    n, _, m = pattern.partition(":")
    return f"{pattern} semi-structured ({n} zeros in every {m} consecutive input weights of each row)"
