"""`write_report(run_dirs, baseline, out)`: report.md, report.json and a self-contained report.html.

Inputs per run directory: ``oneshot.json`` (written by ``oneshot prune``; required) and ``eval.json``
(written by ``oneshot eval``; optional). Without ``eval.json`` the report uses the quick evaluation stored
in ``oneshot.json`` (dense and pruned perplexity on a few windows) and says so. ``baseline`` is the dense
model's evaluation (a folder with ``eval.json`` or the file itself); it supplies dense numbers a run's own
``eval.json`` lacks.

Plots (matplotlib, Agg canvas, no pyplot state) are embedded in the HTML as base64 PNG and written to
``plots/`` for the Markdown: per-layer sparsity and reconstruction loss with the per-block output error,
perplexity vs sparsity when several runs are given, degradation per long-tail slice with its flags, and
task accuracy deltas. The HTML needs no network and no JavaScript.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oneshot.eval.longtail import task_deltas

__all__ = ["REPORT_FILES", "build_report", "load_run", "write_report"]

logger = logging.getLogger(__name__)

RUN_FILE = "oneshot.json"
EVAL_FILE = "eval.json"
REPORT_FILES = ("report.md", "report.json", "report.html")
PLOTS_DIR = "plots"
FORMAT = "oneshot-report/1"
_FLAG = "FLAG"
_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------------------------------
# Loading


def _read_json(path: Path, what: str, fmt_prefix: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a {what} record (expected a JSON object)")
    fmt = data.get("format")
    if fmt is not None and not str(fmt).startswith(fmt_prefix):
        raise ValueError(f"{path} has format {fmt!r}, expected {fmt_prefix}N (a {what} record)")
    return data


def load_run(run_dir: PathLike) -> dict[str, Any]:
    """``{"dir", "name", "run": oneshot.json, "eval": eval.json or None}`` of a run directory."""
    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"run directory {folder} does not exist")
    run_file = folder / RUN_FILE
    if not run_file.is_file():
        raise FileNotFoundError(f"{run_file} not found: {folder} is not an `oneshot prune` output folder")
    run = _read_json(run_file, "oneshot prune", "oneshot-run/")
    if not isinstance(run.get("prune"), dict):
        raise ValueError(f"{run_file} has no 'prune' section")
    eval_file = folder / EVAL_FILE
    ev = _read_json(eval_file, "oneshot eval", "oneshot-eval/") if eval_file.is_file() else None
    return {"dir": str(folder.resolve()), "name": folder.resolve().name, "run": run, "eval": ev}


def _load_baseline(path: PathLike) -> dict[str, Any]:
    p = Path(path).expanduser()
    file = p / EVAL_FILE if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(
            f"baseline {file} not found: pass the dense model's `oneshot eval` folder or its {EVAL_FILE}"
        )
    data = _read_json(file, "oneshot eval", "oneshot-eval/")
    return {"path": str(file.resolve()), "eval": data}


# --------------------------------------------------------------------------------------------------------
# The report record


def _rel(dense: float | None, pruned: float | None) -> float | None:
    if dense is None or pruned is None or not dense:
        return None
    return pruned / dense - 1.0


def _ppl_rows(run: dict[str, Any], baseline: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Perplexity rows: eval.json (``oneshot eval``) when present, else the quick check of oneshot.json."""
    rows: list[dict[str, Any]] = []
    ev = run["eval"] or {}
    own_base = (ev.get("baseline") or {}).get("ppl") or {}
    ext_base = ((baseline or {}).get("eval") or {}).get("ppl") or {}
    for ds, res in (ev.get("ppl") or {}).items():
        if not isinstance(res, dict) or res.get("value") is None:
            continue
        dense = own_base.get(ds) or ext_base.get(ds) or {}
        rows.append(
            {
                "dataset": ds,
                "kind": "eval",
                "dense": dense.get("value"),
                "dense_from": "eval.json baseline" if ds in own_base else ("--baseline" if dense else None),
                "pruned": res["value"],
                "rel_degradation": _rel(dense.get("value"), res["value"]),
                "windows": res.get("windows"),
                "seqlen": res.get("seqlen"),
                "tokens": res.get("tokens"),
                "note": res.get("note") or "",
            }
        )
    quick = run["run"].get("quick_eval") or {}
    if not rows and quick.get("pruned"):
        d, p = quick.get("dense") or {}, quick["pruned"]
        rows.append(
            {
                "dataset": p.get("dataset", "wikitext2"),
                "kind": "quick",
                "dense": d.get("value"),
                "dense_from": "quick_eval" if d else None,
                "pruned": p.get("value"),
                "rel_degradation": _rel(d.get("value"), p.get("value")),
                "windows": p.get("windows"),
                "seqlen": p.get("seqlen"),
                "tokens": p.get("tokens"),
                "note": p.get("note")
                or f"quick check: first {p.get('windows')} windows, not the full protocol",
            }
        )
    return rows


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    rec = run["run"]
    cfg = rec.get("config") or {}
    pr = rec.get("prune") or {}
    src = rec.get("source") or {}
    return {
        "name": run["name"],
        "dir": run["dir"],
        "model": src.get("base_model") or src.get("path") or cfg.get("model") or "default",
        "model_type": rec.get("model_type"),
        "method": cfg.get("method"),
        "pattern": cfg.get("pattern"),
        "target_sparsity": cfg.get("sparsity"),
        "sparsity": pr.get("sparsity"),
        "pruned_params": pr.get("pruned_params"),
        "calibration": (
            f"{cfg.get('calib')}: {cfg.get('nsamples')} x {cfg.get('seqlen')} tokens, seed {cfg.get('seed')}"
            if cfg.get("calib")
            else None
        ),
        "prune_seconds": pr.get("total_seconds"),
        "peak_memory_bytes": pr.get("peak_memory_bytes"),
        "peak_memory_kind": pr.get("peak_memory_kind"),
        "device": pr.get("device"),
        "started": rec.get("started"),
        "command": " ".join(map(str, rec.get("command") or [])),
        "has_eval": run["eval"] is not None,
        "evaluation": "eval.json"
        if run["eval"] is not None
        else ("quick check only" if (rec.get("quick_eval") or {}).get("pruned") else "none"),
    }


def build_report(runs: Sequence[dict[str, Any]], baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report.json record of loaded runs (`load_run`) and an optional loaded baseline."""
    out_runs = []
    for run in runs:
        ev = run["eval"] or {}
        tasks = None
        if not ev.get("tasks") and (ev.get("longtail") or {}).get("tasks"):
            tasks = ev["longtail"]["tasks"]  # the deltas longtail_report computed
        elif ev.get("tasks"):
            base_tasks = (ev.get("baseline") or {}).get("tasks") or ((baseline or {}).get("eval") or {}).get(
                "tasks"
            )
            tasks = task_deltas(ev["tasks"], base_tasks) if base_tasks else None
            if tasks is None:
                tasks = {
                    "tasks": [],
                    "pruned_only": ev["tasks"],
                    "note": "no dense task results to compare with",
                }
        pr = run["run"].get("prune") or {}
        out_runs.append(
            {
                "summary": _summary(run),
                "config": run["run"].get("config") or {},
                "perplexity": _ppl_rows(run, baseline),
                "tasks": tasks,
                "longtail": ev.get("longtail"),
                "layers": pr.get("layers") or [],
                "blocks": pr.get("blocks") or [],
            }
        )
    return {
        "format": FORMAT,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "baseline": (baseline or {}).get("path"),
        "runs": out_runs,
    }


# --------------------------------------------------------------------------------------------------------
# Plots (matplotlib Figure + Agg canvas: no pyplot, no global backend switch)


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


def _layer_kind(name: str) -> str:
    return re.sub(r"\[\d+\]$", "", name).rsplit(".", 1)[-1]


def _plot_layers(run: dict[str, Any]) -> bytes | None:
    from matplotlib.ticker import MaxNLocator

    layers = run["layers"]
    if not layers:
        return None
    blocks = [b for b in run["blocks"] if b.get("output_error") is not None]
    fig = _figure(10, 7.5 if blocks else 5.5)
    axes = fig.subplots(3 if blocks else 2, 1)
    kinds = list(dict.fromkeys(_layer_kind(x["name"]) for x in layers))
    color = {k: _COLORS[i % len(_COLORS)] for i, k in enumerate(kinds)}
    target = run["summary"].get("target_sparsity")
    for k in kinds:
        idx = [i for i, x in enumerate(layers) if _layer_kind(x["name"]) == k]
        axes[0].scatter(idx, [layers[i]["sparsity"] for i in idx], s=12, color=color[k], label=k)
        lidx = [i for i in idx if layers[i].get("loss") is not None and layers[i]["loss"] > 0]
        if lidx:
            axes[1].scatter(lidx, [layers[i]["loss"] for i in lidx], s=12, color=color[k], label=k)
    if target is not None:
        axes[0].axhline(float(target), color="black", lw=0.8, ls="--", label="target")
    axes[0].set_ylabel("sparsity (fraction of zeros)")
    axes[0].set_title(f"{run['summary']['name']}: per-layer sparsity")
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes[1].set_ylabel("reconstruction loss")
    axes[1].set_xlabel("layer (in pruning order)")
    axes[1].set_title("per-layer reconstruction loss ||(W - W')X||² / n")
    if any(x.get("loss") for x in layers):
        axes[1].set_yscale("log")
    else:
        axes[1].text(0.5, 0.5, "no reconstruction loss recorded", ha="center", transform=axes[1].transAxes)
    axes[0].set_xlabel("layer (in pruning order)")
    if blocks:
        axes[2].plot([b["index"] for b in blocks], [b["output_error"] for b in blocks], marker="o", ms=3)
        axes[2].set_yscale("log")
        axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[2].set_xlabel("block")
        axes[2].set_ylabel("relative output error")
        axes[2].set_title("per-block output error ||Y - Y'||² / ||Y||² on calibration data")
    return _png(fig)


def _plot_ppl_vs_sparsity(report: dict[str, Any]) -> bytes | None:
    points: dict[tuple[str, str], list[tuple[float, float]]] = {}
    dense: dict[str, float] = {}
    for r in report["runs"]:
        sp = r["summary"].get("sparsity")
        for row in r["perplexity"]:
            if sp is None or row.get("pruned") is None:
                continue
            label = f"{row['dataset']} ({row['kind']})"
            series = f"{r['summary'].get('method')} {r['summary'].get('pattern')}"
            points.setdefault((label, series), []).append((float(sp), float(row["pruned"])))
            if row.get("dense") is not None:
                dense.setdefault(label, float(row["dense"]))
    if not points:
        return None
    fig = _figure(8, 5)
    ax = fig.subplots()
    for i, ((label, series), pts) in enumerate(sorted(points.items())):
        pts.sort()
        if label in dense:
            pts = [(0.0, dense[label]), *pts]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=_COLORS[i % len(_COLORS)])
        ax.plot([], [], marker="o", color=_COLORS[i % len(_COLORS)], label=f"{label}: {series}")
    ax.set_xlabel("achieved sparsity (0 = dense)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.set_title("perplexity vs sparsity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def _plot_longtail(run: dict[str, Any]) -> bytes | None:
    lt = run.get("longtail") or {}
    rows = [s for s in lt.get("slices") or [] if s.get("rel_degradation") is not None]
    if not rows:
        return None
    agg = (lt.get("aggregate") or {}).get("rel_degradation")
    factor = float(lt.get("factor") or 2.0)
    fig = _figure(11, max(3.5, 0.24 * len(rows) + 1.5))
    ax, ax2 = fig.subplots(1, 2, sharey=True, width_ratios=[2, 1])
    y = list(range(len(rows)))[::-1]
    colors = ["#d62728" if s.get("flagged") else "#1f77b4" for s in rows]
    ax.barh(y, [100 * s["rel_degradation"] for s in rows], color=colors)
    ax.set_yticks(y, [s["name"] + (" ⚑" if s.get("flagged") else "") for s in rows], fontsize=8)
    if agg is not None:
        ax.axvline(100 * agg, color="black", lw=1, label=f"aggregate {100 * agg:.2f}%")
        if agg > 0:
            ax.axvline(100 * factor * agg, color="black", lw=1, ls="--", label=f"flag threshold {factor:g}x")
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("relative degradation: ppl_pruned / ppl_dense - 1 (%)")
    ax.set_title(f"{run['summary']['name']}: degradation per slice (red = flagged)")
    ax.legend(fontsize=8, loc="lower right")
    ax2.barh(y, [s.get("kl") or 0.0 for s in rows], color=colors)
    ax2.set_xlabel("mean KL(dense || pruned) (nats)")
    ax2.set_title("next-token KL")
    return _png(fig)


def _plot_tasks(report: dict[str, Any]) -> bytes | None:
    series = [(r["summary"]["name"], (r.get("tasks") or {}).get("tasks") or []) for r in report["runs"]]
    series = [(n, rows) for n, rows in series if rows]
    if not series:
        return None
    names = sorted({row["name"] for _, rows in series for row in rows})
    fig = _figure(max(6, 0.9 * len(names) * max(1, len(series)) + 2), 4.5)
    ax = fig.subplots()
    width = 0.8 / len(series)
    for j, (run_name, rows) in enumerate(series):
        by = {row["name"]: row for row in rows}
        xs = [i + (j - (len(series) - 1) / 2) * width for i, t in enumerate(names) if t in by]
        vals = [100 * by[t]["delta"] for t in names if t in by]
        errs = [100 * (by[t].get("delta_stderr") or 0.0) for t in names if t in by]
        ax.bar(xs, vals, width, yerr=errs, capsize=2, label=run_name, color=_COLORS[j % len(_COLORS)])
        present = [t for t in names if t in by]
        flagged = [(x, v) for x, v, t in zip(xs, vals, present, strict=True) if by[t].get("flagged")]
        if flagged:  # a red outline on flagged bars, kept out of the legend
            ax.bar(
                [x for x, _ in flagged], [v for _, v in flagged], width, fill=False, edgecolor="#d62728", lw=2
            )
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy pruned - dense (points)")
    ax.set_title("task accuracy deltas (±1 combined stderr; red edge = flagged)")
    ax.legend(fontsize=8)
    return _png(fig)


def _plots(report: dict[str, Any]) -> list[tuple[str, str, bytes]]:
    """[(file stem, caption, png bytes)] for every plot that has data."""
    out: list[tuple[str, str, bytes]] = []
    for i, r in enumerate(report["runs"]):
        png = _plot_layers(r)
        if png:
            out.append((f"layers-{i + 1}", f"{r['summary']['name']}: per-layer sparsity and loss", png))
    png = _plot_ppl_vs_sparsity(report) if len(report["runs"]) > 1 else None
    if png:
        out.append(("ppl-vs-sparsity", "perplexity vs sparsity", png))
    for i, r in enumerate(report["runs"]):
        png = _plot_longtail(r)
        if png:
            out.append((f"longtail-{i + 1}", f"{r['summary']['name']}: long-tail degradation", png))
    png = _plot_tasks(report)
    if png:
        out.append(("tasks", "task accuracy deltas", png))
    return out


# --------------------------------------------------------------------------------------------------------
# Rendering: one list of sections, written as Markdown and as HTML


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isinf(x) or math.isnan(x):
            return str(x)
        return f"{x:.{digits}g}" if abs(x) >= 1e4 or (x and abs(x) < 1e-3) else f"{x:.{digits}f}"
    return str(x)


def _pct(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):+.2f}%"


def _bytes(n: Any) -> str:
    if not n:
        return "–"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


Table = tuple[list[str], list[list[str]], list[bool]]  # header, rows, highlighted rows


def _sections(report: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """[(heading, [paragraph str | Table | ("plot", stem)])]."""
    sections: list[tuple[str, list[Any]]] = []
    runs = report["runs"]
    rows = [
        [
            r["summary"]["name"],
            str(r["summary"]["model"]),
            " ".join(str(x) for x in (r["summary"]["method"], r["summary"]["pattern"]) if x) or "–",
            _f(r["summary"]["target_sparsity"]),
            _f(r["summary"]["sparsity"], 4),
            _f(r["summary"]["calibration"]),
            _f(r["summary"]["prune_seconds"], 1)
            + (" s" if r["summary"]["prune_seconds"] is not None else ""),
            _bytes(r["summary"]["peak_memory_bytes"]),
            r["summary"]["evaluation"],
        ]
        for r in runs
    ]
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
    intro = [f"{len(runs)} run(s). Baseline: {report['baseline'] or 'none given'}."]
    sections.append(("Runs", [*intro, (header, rows, [False] * len(rows))]))

    ppl_rows, notes = [], []
    for r in runs:
        for p in r["perplexity"]:
            ppl_rows.append(
                [
                    r["summary"]["name"],
                    p["dataset"],
                    "quick check (oneshot prune)" if p["kind"] == "quick" else "oneshot eval",
                    _f(p["dense"]),
                    _f(p["pruned"]),
                    _pct(p["rel_degradation"]),
                    f"{_f(p['windows'])} x {_f(p['seqlen'])}",
                    p["note"],
                ]
            )
        if not r["perplexity"]:
            notes.append(f"{r['summary']['name']}: no perplexity recorded")
    body: list[Any] = []
    if ppl_rows:
        header = ["run", "dataset", "source", "dense ppl", "pruned ppl", "change", "windows x seqlen", "note"]
        body.append((header, ppl_rows, [False] * len(ppl_rows)))
    body += notes
    if len(runs) > 1:
        body.append(("plot", "ppl-vs-sparsity"))
    sections.append(("Perplexity", body))

    for i, r in enumerate(runs):
        name = r["summary"]["name"]
        layers = r["layers"]
        body = [f"Command: `{r['summary']['command']}`" if r["summary"]["command"] else ""]
        if layers:
            worst = sorted((x for x in layers if x.get("loss") is not None), key=lambda x: -x["loss"])[:5]
            body.append(("plot", f"layers-{i + 1}"))
            if worst:
                body.append("Largest reconstruction losses:")
                body.append(
                    (
                        ["layer", "shape", "sparsity", "loss", "seconds"],
                        [
                            [
                                x["name"],
                                "x".join(map(str, x.get("shape") or [])),
                                _f(x["sparsity"], 4),
                                _f(x["loss"]),
                                _f(x["seconds"], 2),
                            ]
                            for x in worst
                        ],
                        [False] * len(worst),
                    )
                )
        else:
            body.append("No per-layer records.")
        sections.append((f"Layers: {name}", body))

    for i, r in enumerate(runs):
        lt = r.get("longtail")
        if not lt:
            continue
        agg = lt.get("aggregate") or {}
        body = [
            f"Aggregate: {agg.get('definition', agg.get('name'))}: ppl {_f(agg.get('ppl_dense'))} -> "
            f"{_f(agg.get('ppl_pruned'))} ({_pct(agg.get('rel_degradation'))}), mean KL {_f(agg.get('kl'), 4)}. "
            f"Relative degradation = ppl_pruned / ppl_dense - 1; a slice is flagged ({_FLAG}) when it is at "
            f"least {_f(lt.get('factor', 2.0), 2)} x the aggregate's.",
            ("plot", f"longtail-{i + 1}"),
        ]
        slices = lt.get("slices") or []
        body.append(
            (
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
                        s["name"],
                        s.get("group", ""),
                        _f(s.get("tokens")),
                        _f(s.get("ppl_dense")),
                        _f(s.get("ppl_pruned")),
                        _pct(s.get("rel_degradation")),
                        _f(s.get("ratio_to_aggregate"), 2),
                        _f(s.get("kl"), 4),
                        _FLAG if s.get("flagged") else "",
                    ]
                    for s in slices
                ],
                [bool(s.get("flagged")) for s in slices],
            )
        )
        flagged = lt.get("flagged") or []
        body.append(f"Flagged slices: {', '.join(flagged) if flagged else 'none'}.")
        freq = lt.get("frequency") or {}
        buckets = freq.get("buckets") or []
        if buckets:
            body.append(
                f"Frequency buckets: token ids ranked by their count in {freq.get('reference_corpus')} "
                f"({_f(freq.get('reference_corpus_tokens'))} tokens), cut into {freq.get('n_buckets')} buckets of "
                f"equal token mass; ids never seen form freq/unseen. Each predicted token of the aggregate "
                f"windows ({freq.get('evaluated_on')}) counts in the bucket of its id."
            )
            body.append(
                (
                    [
                        "bucket",
                        "token ids",
                        "frequency ranks",
                        "occurrences per id",
                        "share of reference tokens",
                    ],
                    [
                        [
                            b["name"],
                            _f(b.get("types")),
                            f"{b['rank_first']}-{b['rank_last']}"
                            if b.get("types") and "rank_first" in b
                            else "–",
                            f"{b['count_min']}-{b['count_max']}" if "count_min" in b else "0",
                            _pct(b.get("mass")).lstrip("+") if "mass" in b else "–",
                        ]
                        for b in buckets
                    ],
                    [False] * len(buckets),
                )
            )
        for s in lt.get("skipped") or []:
            body.append(f"Skipped {s['name']}: {s['reason']}")
        for n in lt.get("notes") or []:
            body.append(f"Note: {n}")
        sections.append((f"Long-tail degradation: {r['summary']['name']}", body))

    task_rows, flags, tnotes = [], [], []
    for r in runs:
        t = r.get("tasks") or {}
        for row in t.get("tasks") or []:
            task_rows.append(
                [
                    r["summary"]["name"],
                    row["name"],
                    _f(row.get("n")),
                    _f(row["acc_dense"], 4),
                    _f(row["acc_pruned"], 4),
                    f"{100 * row['delta']:+.2f}",
                    _f(None if row.get("delta_stderr") is None else 100 * row["delta_stderr"], 2),
                    _FLAG if row.get("flagged") else "",
                ]
            )
            flags.append(bool(row.get("flagged")))
        if t.get("note"):
            tnotes.append(f"{r['summary']['name']}: {t['note']}")
    if task_rows or tnotes:
        body = [
            (
                ["run", "task", "n", "dense acc", "pruned acc", "delta (points)", "± stderr", "flag"],
                task_rows,
                flags,
            ),
            "A task is flagged when its relative accuracy drop (1 - acc_pruned / acc_dense) is at least twice "
            "the drop of the mean accuracy over the tasks.",
            *tnotes,
        ]
        if task_rows:
            body.insert(0, ("plot", "tasks"))
        sections.append(("Tasks", body))
    return sections


def _md_table(t: Table) -> str:
    header, rows, _ = t
    esc = [[c.replace("|", "\\|") for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in esc]
    return "\n".join(lines)


def _render_md(report: dict[str, Any], plots: dict[str, str]) -> str:
    out = [f"# oneshot report\n\nGenerated {report['generated']}.\n"]
    for heading, body in _sections(report):
        out.append(f"## {heading}\n")
        for item in body:
            if isinstance(item, str):
                if item:
                    out.append(item + "\n")
            elif item[0] == "plot":
                if item[1] in plots:
                    out.append(f"![{item[1]}]({PLOTS_DIR}/{item[1]}.png)\n")
            else:
                out.append(_md_table(item) + "\n")
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


def _render_html(report: dict[str, Any], plots: dict[str, tuple[str, bytes]]) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>oneshot report</title>",
        # An inline empty icon: the browser asks for no favicon.ico (no failed request, no console error).
        '<link rel="icon" href="data:,">',
        f"<style>{_CSS}</style></head><body>",
        "<h1>oneshot report</h1>",
        f"<p>Generated {html.escape(report['generated'])}.</p>",
    ]
    for heading, body in _sections(report):
        out.append(f"<h2>{html.escape(heading)}</h2>")
        for item in body:
            if isinstance(item, str):
                if item:
                    out.append(f"<p>{_html_text(item)}</p>")
            elif item[0] == "plot":
                if item[1] in plots:
                    caption, png = plots[item[1]]
                    data = base64.b64encode(png).decode("ascii")
                    out.append(f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">')
            else:
                header, rows, hl = item
                out.append(
                    "<table><thead><tr>"
                    + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                    + "</tr></thead><tbody>"
                )
                for row, flag in zip(rows, hl, strict=True):
                    cls = ' class="flag"' if flag else ""
                    out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
                out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------------
# Writing


def _check_out(out: Path, inputs: list[Path]) -> None:
    """Refuse to replace a folder that holds anything but a previous report, or one of the inputs."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    for p in inputs:
        if out == p or out in p.parents:
            raise ValueError(f"--out {out} would replace the input {p}: choose another folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in (*REPORT_FILES, PLOTS_DIR))
        if foreign:
            raise FileExistsError(
                f"--out {out} exists and holds other files ({', '.join(foreign[:5])}): choose a new or report folder"
            )


def write_report(
    run_dirs: Sequence[PathLike], baseline: PathLike | None = None, out: PathLike = "report"
) -> dict[str, Path]:
    """Write ``report.md``, ``report.json``, ``report.html`` (and ``plots/*.png``) into ``out``.

    ``run_dirs``: `oneshot prune` output folders (each must hold ``oneshot.json``; ``eval.json`` is
    optional). ``baseline``: the dense model's ``oneshot eval`` folder or eval.json. Files are written to a
    temporary folder beside ``out`` and renamed at the end; an existing ``out`` is replaced only when it
    holds nothing but a previous report. Returns ``{"md", "json", "html", "plots"}`` -> final paths.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    names = [r["name"] for r in runs]
    for r in runs:  # folders with the same name in different places: name them parent/name
        if names.count(r["name"]) > 1:
            r["name"] = "/".join(Path(r["dir"]).parts[-2:])
    base = _load_baseline(baseline) if baseline is not None else None
    out_path = Path(out).expanduser().resolve()
    _check_out(out_path, [Path(r["dir"]) for r in runs])
    report = build_report(runs, base)
    plots = _plots(report)
    report["plots"] = [f"{PLOTS_DIR}/{stem}.png" for stem, _, _ in plots]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    try:
        (tmp / PLOTS_DIR).mkdir()
        for stem, _, png in plots:
            (tmp / PLOTS_DIR / f"{stem}.png").write_bytes(png)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(_render_md(report, {s: c for s, c, _ in plots}), encoding="utf-8")
        html_plots = {s: (c, png) for s, c, png in plots}
        (tmp / "report.html").write_text(_render_html(report, html_plots), encoding="utf-8")
        if out_path.exists():
            old = out_path.with_name(f".{out_path.name}.old-{os.getpid()}")
            out_path.rename(old)
            tmp.rename(out_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("report written to %s", out_path)
    return {
        "md": out_path / "report.md",
        "json": out_path / "report.json",
        "html": out_path / "report.html",
        "plots": out_path / PLOTS_DIR,
    }
