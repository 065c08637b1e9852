"""The report as text: one list of sections, written as Markdown (`render_md`) and as self-contained HTML
(`render_html`: plots embedded as base64 PNG, no script, no network)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Union

from oneshot.eval.report_model import Report, ReportRun
from oneshot.formatting import MISSING, compact, human_bytes, md_table, pct

__all__ = ["FLAG", "render_html", "render_md"]

FLAG = "FLAG"
PLOTS_DIR = "plots"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    flagged: list[bool] = field(default_factory=list)  # highlighted rows

    def __post_init__(self) -> None:
        if not self.flagged:
            self.flagged = [False] * len(self.rows)


@dataclass
class Plot:
    stem: str


Item = Union[str, Table, Plot]  # noqa: UP007 - a runtime alias
Section = tuple[str, list[Item]]


def _runs_section(report: Report) -> Section:
    rows = []
    for r in report.runs:
        s = r.summary
        rows.append(
            [
                s.name,
                s.model,
                f"{s.method} {s.pattern}",
                compact(s.target_sparsity),
                compact(s.sparsity, 4),
                s.calibration,
                f"{s.prune_seconds:.1f} s" if s.prune_seconds is not None else MISSING,
                human_bytes(s.peak_memory_bytes),
                s.evaluation,
            ]
        )
    header = [
        "run",
        "model",
        "method",
        "target",
        "achieved sparsity",
        "calibration",
        "time",
        "peak mem",
        "eval",
    ]
    intro = f"{len(report.runs)} run(s). Baseline: {report.baseline or 'none given'}."
    return "Runs", [intro, Table(header, rows)]


def _perplexity_section(report: Report) -> Section:
    rows, notes = [], []
    for r in report.runs:
        for p in r.perplexity:
            rows.append(
                [
                    r.summary.name,
                    p.dataset,
                    "quick check (oneshot prune)" if p.kind == "quick" else "oneshot eval",
                    compact(p.dense),
                    compact(p.pruned),
                    pct(p.rel_degradation),
                    f"{compact(p.windows)} x {compact(p.seqlen)}",
                    p.note,
                ]
            )
        if not r.perplexity:
            notes.append(f"{r.summary.name}: no perplexity recorded")
    body: list[Item] = []
    if rows:
        header = ["run", "dataset", "source", "dense ppl", "pruned ppl", "change", "windows x seqlen", "note"]
        body.append(Table(header, rows))
    body += notes
    if len(report.runs) > 1:
        body.append(Plot("ppl-vs-sparsity"))
    return "Perplexity", body


def _layers_section(i: int, r: ReportRun) -> Section:
    body: list[Item] = [f"Command: `{r.summary.command}`" if r.summary.command else ""]
    if not r.layers:
        return f"Layers: {r.summary.name}", [*body, "No per-layer records."]
    body.append(Plot(f"layers-{i + 1}"))
    worst = sorted((x for x in r.layers if x.loss is not None), key=lambda x: -(x.loss or 0.0))[:5]
    if worst:
        body.append("Largest reconstruction losses:")
        body.append(
            Table(
                ["layer", "shape", "sparsity", "loss", "seconds"],
                [
                    [
                        x.name,
                        "x".join(map(str, x.shape)),
                        compact(x.sparsity, 4),
                        compact(x.loss),
                        compact(x.seconds, 2),
                    ]
                    for x in worst
                ],
            )
        )
    return f"Layers: {r.summary.name}", body


def _longtail_section(i: int, r: ReportRun) -> Section | None:
    lt = r.longtail
    if lt is None:
        return None
    agg = lt.aggregate
    body: list[Item] = [
        f"Aggregate: {(agg.definition or agg.name) if agg else MISSING}: ppl {compact(agg.ppl_dense if agg else None)} -> "
        f"{compact(agg.ppl_pruned if agg else None)} ({pct(agg.rel_degradation if agg else None)}), mean KL "
        f"{compact(agg.kl if agg else None, 4)}. Relative degradation = ppl_pruned / ppl_dense - 1; a slice is "
        f"flagged ({FLAG}) when it is at least {compact(lt.factor, 2)} x the aggregate's.",
        Plot(f"longtail-{i + 1}"),
        Table(
            [
                "slice",
                "group",
                "tokens",
                "dense ppl",
                "pruned ppl",
                "change",
                "x aggregate",
                "mean KL",
                "flag",
            ],
            [
                [
                    s.name,
                    s.group or "",
                    compact(s.tokens),
                    compact(s.ppl_dense),
                    compact(s.ppl_pruned),
                    pct(s.rel_degradation),
                    compact(s.ratio_to_aggregate, 2),
                    compact(s.kl, 4),
                    FLAG if s.flagged else "",
                ]
                for s in lt.slices
            ],
            [s.flagged for s in lt.slices],
        ),
        f"Flagged slices: {', '.join(lt.flagged) if lt.flagged else 'none'}.",
    ]
    freq = lt.frequency
    if freq is not None and freq.buckets:
        body.append(
            f"Frequency buckets: token ids ranked by their count in {freq.reference_corpus} "
            f"({compact(freq.reference_corpus_tokens)} tokens), cut into {freq.n_buckets} buckets of "
            f"equal token mass; ids never seen form freq/unseen. Each predicted token of the aggregate "
            f"windows ({freq.evaluated_on}) counts in the bucket of its id."
        )
        body.append(
            Table(
                ["bucket", "token ids", "frequency ranks", "occurrences per id", "share of reference tokens"],
                [
                    [
                        b.name,
                        compact(b.types),
                        f"{b.rank_first}-{b.rank_last}" if b.types and b.rank_first is not None else MISSING,
                        f"{b.count_min}-{b.count_max}" if b.count_min is not None else "0",
                        pct(b.mass).lstrip("+") if b.mass is not None else MISSING,
                    ]
                    for b in freq.buckets
                ],
            )
        )
    body += [f"Skipped {s.name}: {s.reason}" for s in lt.skipped]
    body += [f"Note: {n}" for n in lt.notes]
    return f"Long-tail degradation: {r.summary.name}", body


def _tasks_section(report: Report) -> Section | None:
    rows, flags, notes = [], [], []
    for r in report.runs:
        t = r.tasks
        if t is None:
            continue
        for row in t.tasks:
            rows.append(
                [
                    r.summary.name,
                    row.name,
                    compact(row.n),
                    compact(row.acc_dense, 4),
                    compact(row.acc_pruned, 4),
                    f"{100 * row.delta:+.2f}",
                    compact(None if row.delta_stderr is None else 100 * row.delta_stderr, 2),
                    FLAG if row.flagged else "",
                ]
            )
            flags.append(row.flagged)
        if t.note:
            notes.append(f"{r.summary.name}: {t.note}")
    if not rows and not notes:
        return None
    body: list[Item] = [Plot("tasks")] if rows else []
    body += [
        Table(
            ["run", "task", "n", "dense acc", "pruned acc", "delta (points)", "± stderr", "flag"], rows, flags
        ),
        "A task is flagged when its relative accuracy drop (1 - acc_pruned / acc_dense) is at least twice "
        "the drop of the mean accuracy over the tasks.",
        *notes,
    ]
    return "Tasks", body


def sections(report: Report) -> list[Section]:
    """Every section of the report, in order: runs, perplexity, layers, long-tail, tasks."""
    out = [_runs_section(report), _perplexity_section(report)]
    out += [_layers_section(i, r) for i, r in enumerate(report.runs)]
    out += [s for i, r in enumerate(report.runs) if (s := _longtail_section(i, r)) is not None]
    tasks = _tasks_section(report)
    return out + ([tasks] if tasks is not None else [])


def render_md(report: Report, plots: dict[str, str]) -> str:
    """report.md; ``plots``: stem -> caption of the figures that exist (in ``plots/``)."""
    out = [f"# oneshot report\n\nGenerated {report.generated}.\n"]
    for heading, body in sections(report):
        out.append(f"## {heading}\n")
        for item in body:
            if isinstance(item, str):
                if item:
                    out.append(item + "\n")
            elif isinstance(item, Plot):
                if item.stem in plots:
                    out.append(f"![{item.stem}]({PLOTS_DIR}/{item.stem}.png)\n")
            else:
                out.append(md_table(item.header, item.rows) + "\n")
    return "\n".join(out)


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


def _html_text(s: str) -> str:
    parts = html.escape(s).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_table(t: Table) -> str:
    out = [
        "<table><thead><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
        + "</tr></thead><tbody>"
    ]
    for row, flag in zip(t.rows, t.flagged, strict=True):
        cls = ' class="flag"' if flag else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def render_html(report: Report, plots: dict[str, tuple[str, bytes]]) -> str:
    """report.html, self-contained; ``plots``: stem -> (caption, png bytes)."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>oneshot report</title>",
        # An inline empty icon: the browser asks for no favicon.ico (no failed request, no console error).
        '<link rel="icon" href="data:,">',
        f"<style>{_CSS}</style></head><body>",
        "<h1>oneshot report</h1>",
        f"<p>Generated {html.escape(report.generated)}.</p>",
    ]
    for heading, body in sections(report):
        out.append(f"<h2>{html.escape(heading)}</h2>")
        for item in body:
            if isinstance(item, str):
                if item:
                    out.append(f"<p>{_html_text(item)}</p>")
            elif isinstance(item, Plot):
                if item.stem in plots:
                    caption, png = plots[item.stem]
                    data = base64.b64encode(png).decode("ascii")
                    out.append(f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">')
            else:
                out.append(_html_table(item))
    out.append("</body></html>")
    return "\n".join(out) + "\n"
