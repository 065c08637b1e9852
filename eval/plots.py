"""The report's figures (matplotlib Figure + Agg canvas: no pyplot, no global backend switch).

`draw_plots(report)` returns ``[(file stem, caption, png bytes)]`` for every figure that has data:
per-layer sparsity and loss with the per-block output error, perplexity vs sparsity (several runs),
degradation per long-tail slice with its flags, and task accuracy deltas.
"""

from __future__ import annotations

import io
from typing import Any

from oneshot.eval.report_model import Report, ReportRun
from oneshot.formatting import layer_kind

__all__ = ["COLORS", "draw_plots"]

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plot_layers(run: ReportRun) -> bytes | None:
    from matplotlib.ticker import MaxNLocator

    layers = run.layers
    if not layers:
        return None
    blocks = [b for b in run.blocks if b.output_error is not None]
    fig = _figure(10, 7.5 if blocks else 5.5)
    axes = fig.subplots(3 if blocks else 2, 1)
    kinds = list(dict.fromkeys(layer_kind(x.name) for x in layers))
    color = {k: COLORS[i % len(COLORS)] for i, k in enumerate(kinds)}
    for k in kinds:
        idx = [i for i, x in enumerate(layers) if layer_kind(x.name) == k]
        axes[0].scatter(idx, [layers[i].sparsity for i in idx], s=12, color=color[k], label=k)
        lidx = [i for i in idx if (layers[i].loss or 0) > 0]
        if lidx:
            axes[1].scatter(lidx, [layers[i].loss for i in lidx], s=12, color=color[k], label=k)
    axes[0].axhline(run.summary.target_sparsity, color="black", lw=0.8, ls="--", label="target")
    axes[0].set_ylabel("sparsity (fraction of zeros)")
    axes[0].set_title(f"{run.summary.name}: per-layer sparsity")
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes[1].set_ylabel("reconstruction loss")
    axes[1].set_xlabel("layer (in pruning order)")
    axes[1].set_title("per-layer reconstruction loss ||(W - W')X||² / n")
    if any(x.loss for x in layers):
        axes[1].set_yscale("log")
    else:
        axes[1].text(0.5, 0.5, "no reconstruction loss recorded", ha="center", transform=axes[1].transAxes)
    axes[0].set_xlabel("layer (in pruning order)")
    if blocks:
        axes[2].plot([b.index for b in blocks], [b.output_error for b in blocks], marker="o", ms=3)
        axes[2].set_yscale("log")
        axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[2].set_xlabel("block")
        axes[2].set_ylabel("relative output error")
        axes[2].set_title("per-block output error ||Y - Y'||² / ||Y||² on calibration data")
    return _png(fig)


def _plot_ppl_vs_sparsity(report: Report) -> bytes | None:
    points: dict[tuple[str, str], list[tuple[float, float]]] = {}
    dense: dict[str, float] = {}
    for r in report.runs:
        for row in r.perplexity:
            label = f"{row.dataset} ({row.kind})"
            series = f"{r.summary.method} {r.summary.pattern}"
            points.setdefault((label, series), []).append((r.summary.sparsity, row.pruned))
            if row.dense is not None:
                dense.setdefault(label, row.dense)
    if not points:
        return None
    fig = _figure(8, 5)
    ax = fig.subplots()
    for i, ((label, series), pts) in enumerate(sorted(points.items())):
        pts.sort()
        if label in dense:
            pts = [(0.0, dense[label]), *pts]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=COLORS[i % len(COLORS)])
        ax.plot([], [], marker="o", color=COLORS[i % len(COLORS)], label=f"{label}: {series}")
    ax.set_xlabel("achieved sparsity (0 = dense)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title("perplexity vs sparsity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def _plot_longtail(run: ReportRun) -> bytes | None:
    lt = run.longtail
    rows = [s for s in lt.slices if s.delta_nll is not None] if lt is not None else []
    if lt is None or not rows:
        return None
    agg = lt.aggregate.delta_nll if lt.aggregate is not None else None
    fig = _figure(11, max(3.5, 0.24 * len(rows) + 1.5))
    ax, ax2 = fig.subplots(1, 2, sharey=True, width_ratios=[2, 1])
    y = list(range(len(rows)))[::-1]
    colors = ["#d62728" if s.flagged else "#1f77b4" for s in rows]
    err = [1.96 * s.delta_nll_se if s.delta_nll_se is not None else 0.0 for s in rows]
    ax.barh(y, [s.delta_nll or 0.0 for s in rows], xerr=err, color=colors, ecolor="#555555", capsize=2)
    ax.set_yticks(y, [s.name + (" ⚑" if s.flagged else "") for s in rows], fontsize=8)
    if agg is not None:
        ax.axvline(agg, color="black", lw=1, label=f"aggregate {agg:+.3f}")
        ax.axvline(
            lt.factor * max(agg, 0.0), color="black", lw=1, ls="--", label=f"flag threshold {lt.factor:g}x"
        )
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("NLL increase per token, nll_pruned - nll_dense (nats; bars: 95 % interval)")
    ax.set_title(f"{run.summary.name}: degradation per slice (red = flagged)")
    ax.legend(fontsize=8, loc="lower right")
    ax2.barh(y, [s.kl or 0.0 for s in rows], color=colors)
    ax2.set_xlabel("mean KL(dense || pruned) (nats)")
    ax2.set_title("next-token KL")
    return _png(fig)


def _plot_tasks(report: Report) -> bytes | None:
    series = [
        (r.summary.name, [x for x in r.tasks.comparison.tasks if x.delta is not None])
        for r in report.runs
        if r.tasks is not None and r.tasks.comparison is not None
    ]
    series = [(name, rows) for name, rows in series if rows]
    if not series:
        return None
    names = sorted({row.name for _, rows in series for row in rows})
    fig = _figure(max(6, 0.9 * len(names) * max(1, len(series)) + 2), 4.5)
    ax = fig.subplots()
    width = 0.8 / len(series)
    for j, (run_name, rows) in enumerate(series):
        by = {row.name: row for row in rows}
        present = [t for t in names if t in by]
        xs = [i + (j - (len(series) - 1) / 2) * width for i, t in enumerate(names) if t in by]
        vals = [100 * (by[t].delta or 0.0) for t in present]
        errs = [100 * (by[t].se or 0.0) for t in present]
        ax.bar(xs, vals, width, yerr=errs, capsize=2, label=run_name, color=COLORS[j % len(COLORS)])
        flagged = [(x, v) for x, v, t in zip(xs, vals, present, strict=True) if by[t].flagged]
        if flagged:  # a red outline on flagged bars, kept out of the legend
            ax.bar(
                [x for x, _ in flagged], [v for _, v in flagged], width, fill=False, edgecolor="#d62728", lw=2
            )
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("headline metric pruned - dense (points)")
    ax.set_title("task deltas on acc_norm / acc (±1 SE, paired where possible; red edge = flagged)")
    ax.legend(fontsize=8)
    return _png(fig)


def draw_plots(report: Report) -> list[tuple[str, str, bytes]]:
    """[(file stem, caption, png bytes)] for every plot that has data."""
    out: list[tuple[str, str, bytes]] = []
    for i, r in enumerate(report.runs):
        png = _plot_layers(r)
        if png:
            out.append((f"layers-{i + 1}", f"{r.summary.name}: per-layer sparsity and loss", png))
    png = _plot_ppl_vs_sparsity(report) if len(report.runs) > 1 else None
    if png:
        out.append(("ppl-vs-sparsity", "perplexity vs sparsity", png))
    for i, r in enumerate(report.runs):
        png = _plot_longtail(r)
        if png:
            out.append((f"longtail-{i + 1}", f"{r.summary.name}: long-tail degradation", png))
    png = _plot_tasks(report)
    if png:
        out.append(("tasks", "task accuracy deltas", png))
    return out
