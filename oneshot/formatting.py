"""Formatting shared by everything that prints or renders results: the model card, the report, the CLI.

One copy of each: numbers (fixed digits, or the compact form tables use), percentages, byte sizes,
Markdown tables, self-contained HTML pages (tables, text with `code`, embedded PNG images; no script, no
network), and the names derived from a run (layer kinds, pattern slugs and descriptions).
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable
from typing import Any

__all__ = [
    "MISSING",
    "compact",
    "finite",
    "fixed",
    "html_image",
    "html_page",
    "html_table",
    "html_text",
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


_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; background: #fff; padding: 0 1em; }
h1 { border-bottom: 2px solid #1f77b4; padding-bottom: .2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f0f4f8; }
tr.flag td { background: #fde2e2; }
img { max-width: 100%; border: 1px solid #eee; margin: .5em 0; }
code { background: #f4f4f4; padding: 1px 4px; }
"""


def html_text(s: str) -> str:
    """Escaped text; spans between backticks become ``<code>``."""
    parts = html.escape(s).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def html_table(header: list[str], rows: Iterable[list[str]], flagged: Iterable[bool] | None = None) -> str:
    """An HTML table of escaped cells; rows whose ``flagged`` entry is true are highlighted."""
    rows = list(rows)
    flags = list(flagged) if flagged is not None else [False] * len(rows)
    out = [
        "<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead><tbody>"
    ]
    for row, flag in zip(rows, flags, strict=True):
        cls = ' class="flag"' if flag else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def html_image(png: bytes, alt: str) -> str:
    """An ``<img>`` holding the PNG itself (base64), so the page needs no other file."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def html_page(title: str, body: Iterable[str]) -> str:
    """A self-contained HTML page: ``title`` as its title and heading, then the ``body`` fragments."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        # An inline empty icon: the browser asks for no favicon.ico (no failed request, no console error).
        '<link rel="icon" href="data:,">',
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *body,
        "</body></html>",
    ]
    return "\n".join(out) + "\n"


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
