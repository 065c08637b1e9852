"""The report as text: one list of sections, written as Markdown (`render_md`) and as self-contained HTML
(`render_html`: plots embedded as base64 PNG, no script, no network)."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Union

from oneshot.card import allocation_blocks, allocation_rows
from oneshot.eval.report_model import Report, ReportRun
from oneshot.eval.task_compare import TaskTable
from oneshot.formatting import (
    MISSING,
    compact,
    html_image,
    html_page,
    html_table,
    html_text,
    human_bytes,
    md_table,
    pct,
)
from oneshot.runfolder import LongtailRecord, SliceRecord, TaskFlags

__all__ = [
    "FLAG",
    "longtail_rule",
    "render_html",
    "render_md",
    "task_comparison_table",
    "task_rule",
    "task_score_table",
]

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


def _allocation_section(r: ReportRun) -> Section | None:
    """How `--allocation` spread the sparsity: its settings and the sparsity of every decoder block."""
    a = r.allocation
    if a is None:
        return None
    body: list[Item] = [Table(["setting", "value"], allocation_rows(a))]
    head, rows = allocation_blocks(a)
    if rows:
        body += [
            f"Sparsity per decoder block chosen by `--allocation {a.config.method}` (every matrix's own is in "
            "oneshot.json and in the per-layer plot above):",
            Table(head, rows),
        ]
    if a.source:
        body.append(f"Allocation input: {a.source} ({a.seconds:.1f} s before the pruning walk).")
    return f"Allocation: {r.summary.name}", body


def _pm(value: float | None, se: float | None, digits: int = 3) -> str:
    """``value ± 1.96 se`` (a 95 % interval), or the value alone."""
    if value is None:
        return MISSING
    if se is None:
        return f"{value:+.{digits}f}"
    return f"{value:+.{digits}f} ± {1.96 * se:.{digits}f}"


def _versus_english(s: SliceRecord) -> str:
    vs = s.vs_control
    if not vs or vs.get("excess_nll") is None:
        return ""
    return f"{_pm(vs['excess_nll'], vs.get('excess_se'))} (p {compact(vs.get('p_value'), 2)})"


def longtail_rule(lt: LongtailRecord) -> str:
    """The flag rule a long-tail record was made with, in one sentence."""
    if lt.alpha is None:
        return (
            f"a slice was flagged when its relative degradation was at least {compact(lt.factor, 2)} x the "
            "aggregate's (a record made before flags tested significance: read the flags with care)"
        )
    return (
        f"a slice is flagged ({FLAG}) when its NLL increase exceeds {compact(lt.factor, 2)} x the aggregate's "
        f"significantly (one-sided test with both standard errors, Holm-corrected over the slices at "
        f"{compact(lt.alpha, 2)}); slices of fewer than 4 clusters of tokens are too small to test"
    )


def _longtail_section(i: int, r: ReportRun) -> Section | None:
    lt = r.longtail
    if lt is None:
        return None
    agg = lt.aggregate
    body: list[Item] = [
        f"Aggregate: {(agg.definition or agg.name) if agg else MISSING}: ppl {compact(agg.ppl_dense if agg else None)} -> "
        f"{compact(agg.ppl_pruned if agg else None)} ({pct(agg.rel_degradation if agg else None)}), NLL increase "
        f"{_pm(agg.delta_nll if agg else None, agg.delta_nll_se if agg else None)} nats per token (95 % "
        f"interval), mean KL {compact(agg.kl if agg else None, 4)}. Change = ppl_pruned / ppl_dense - 1; "
        f"{longtail_rule(lt)}. 'vs English' is a language's NLL increase minus that of the English side of "
        "the same sentences.",
        Plot(f"longtail-{i + 1}"),
        Table(
            [
                "slice",
                "group",
                "tokens",
                "dense ppl",
                "pruned ppl",
                "change",
                "NLL increase (95 %)",
                "x aggregate",
                "vs English",
                "p",
                "status",
            ],
            [
                [
                    s.name,
                    s.group or "",
                    compact(s.tokens),
                    compact(s.ppl_dense),
                    compact(s.ppl_pruned),
                    pct(s.rel_degradation),
                    _pm(s.delta_nll, s.delta_nll_se),
                    compact(s.ratio_to_aggregate, 2),
                    _versus_english(s),
                    compact(s.p_value, 2),
                    FLAG if s.flagged else (s.status or ""),
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


def task_rule(alpha: float | None) -> str:
    """The task flag rule a comparison was made with, in one sentence."""
    if alpha is None:
        return (
            "a task was flagged when its relative accuracy drop was at least twice that of the mean (a "
            "comparison made before flags tested significance: read its flags with care)"
        )
    return (
        f"a task is flagged ({FLAG}) when the drop of its headline metric is significant (one-sided McNemar "
        "test on the same documents, or an unpaired two-proportion z-test where per-document results are "
        f"missing; Holm-corrected over the compared tasks at {alpha:g}) and the dense score is above chance "
        f"(one-sided binomial test at {alpha:g}); a task whose dense score is not above chance is 'at chance' "
        "and never flagged. The mean is reported, never used as a threshold"
    )


def _digits(metric: str) -> int:
    return 3 if metric in ("perplexity", "word_perplexity", "byte_perplexity") else 4


def _plus(value: float | None, digits: int) -> str:
    return MISSING if value is None else f"{value:+.{digits}f}"


def task_score_table(t: TaskTable) -> Table:
    """Every metric of every task as lm-eval prints them (value ± stderr), the dense values beside when
    there is a baseline, and the mean of the headline metric (marked *) over the tasks."""
    dense = t.baseline is not None
    header = ["task", "version", "n-shot", "n", "limit", "metric"]
    header += ["dense", "± stderr", "pruned", "± stderr", "delta"] if dense else ["value", "± stderr"]
    rows = []
    for s in t.scores:
        d = _digits(s.metric)
        row = [
            s.task,
            s.version or MISSING,
            compact(s.num_fewshot),
            compact(s.n),
            compact(s.limit),
            s.metric + (" *" if s.headline else ""),
        ]
        if dense:
            row += [compact(s.dense, d), compact(s.dense_stderr, 4)]
        row += [compact(s.value, d), compact(s.stderr, 4)]
        if dense:
            row.append(_plus(s.value - s.dense if s.value is not None and s.dense is not None else None, d))
        rows.append(row)
    if t.mean:
        pm, dm = t.mean.get("pruned"), t.mean.get("dense")
        row = ["mean", "", "", "", "", f"* over {compact(t.mean.get('tasks'))} tasks"]
        if dense:
            row += [compact(dm, 4), ""]
        row += [compact(pm, 4), ""]
        if dense:
            row.append(_plus(pm - dm if pm is not None and dm is not None else None, 4))
        rows.append(row)
    return Table(header, rows)


def task_comparison_table(flags: TaskFlags) -> Table:
    """Dense vs pruned on each task's headline metric: delta, its SE, the test and the status."""
    header = ["task", "metric", "n", "chance", "dense", "pruned", "delta (points)", "SE (points)"]
    header += ["p (drop)", "test", "status"]
    rows = []
    for r in flags.tasks:
        rows.append(
            [
                r.name,
                r.metric or MISSING,
                compact(r.n),
                compact(r.chance, 2),
                compact(r.dense, 4),
                compact(r.pruned, 4),
                _plus(None if r.delta is None else 100 * r.delta, 2),
                compact(None if r.se is None else 100 * r.se, 2),
                compact(r.p_value, 3),
                r.test or (r.note or MISSING),
                FLAG if r.flagged else (r.status or ""),
            ]
        )
    return Table(header, rows, [r.flagged for r in flags.tasks])


def _tasks_section(report: Report) -> Section | None:
    body: list[Item] = []
    alpha: float | None = None
    for r in report.runs:
        t = r.tasks
        if t is None:
            continue
        lm_eval = f"lm-eval {t.lm_eval}, " if t.lm_eval else ""
        body.append(
            f"{r.summary.name} ({lm_eval}zero-shot unless n-shot says otherwise). Baseline: "
            + (
                t.baseline
                or "none: no dense task results (`oneshot eval --baseline` or `oneshot report --baseline`)"
            )
            + "."
        )
        body.append(task_score_table(t))
        c = t.comparison
        if c is not None:
            alpha = c.alpha if c.alpha is not None else alpha
            body.append(task_comparison_table(c))
            unpaired = [f"{x.name} ({x.note})" for x in c.tasks if x.note]
            body.append(
                f"Flagged tasks: {', '.join(c.flagged) if c.flagged else 'none'}."
                + (f" Notes: {'; '.join(unpaired)}." if unpaired else "")
                + (f" Note: {c.note}." if c.note else "")
            )
        body += [f"Note: {n}" for n in t.notes]
    if not body:
        return None
    has_comparison = any(r.tasks is not None and r.tasks.comparison is not None for r in report.runs)
    head: list[Item] = [Plot("tasks")] if has_comparison else []
    head.append(
        "Metrics as lm-eval reports them (± its standard error). * = the headline metric: acc_norm where the "
        "task has it, else acc, as the Wanda and SparseGPT tables report; the mean row averages it over the "
        "tasks (the papers' mean column)." + (f" Rule: {task_rule(alpha)}." if has_comparison else "")
    )
    return "Tasks", head + body


def sections(report: Report) -> list[Section]:
    """Every section of the report, in order: runs, perplexity, layers, allocation, long-tail, tasks."""
    out = [_runs_section(report), _perplexity_section(report)]
    out += [_layers_section(i, r) for i, r in enumerate(report.runs)]
    out += [s for r in report.runs if (s := _allocation_section(r)) is not None]
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


def render_html(report: Report, plots: dict[str, tuple[str, bytes]]) -> str:
    """report.html, self-contained; ``plots``: stem -> (caption, png bytes)."""
    out = [f"<p>Generated {html.escape(report.generated)}.</p>"]
    for heading, body in sections(report):
        out.append(f"<h2>{html.escape(heading)}</h2>")
        for item in body:
            if isinstance(item, str):
                if item:
                    out.append(f"<p>{html_text(item)}</p>")
            elif isinstance(item, Plot):
                if item.stem in plots:
                    caption, png = plots[item.stem]
                    out.append(html_image(png, caption))
            else:
                out.append(html_table(item.header, item.rows, item.flagged))
    return html_page("oneshot report", out)
