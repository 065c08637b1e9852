"""`write_report(run_dirs, baseline, out)`: report.md, report.json and a self-contained report.html.

Inputs per run directory: its records, ``oneshot.json`` (`RunRecord`, required) and ``eval.json``
(`EvalRecord`, when ``oneshot eval`` ran). Without ``eval.json`` the report uses the quick evaluation stored
in ``oneshot.json`` (dense and pruned perplexity on a few windows) and says so. ``baseline`` is the dense
model's evaluation (a folder with ``eval.json`` or the file itself); it supplies dense numbers a run's own
``eval.json`` lacks.

This module builds the report's own record (`Report`, written as ``report.json``) from those records and
writes the folder; `oneshot.eval.plots` draws the figures and `oneshot.eval.render` writes Markdown and
HTML from the same `Report`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oneshot.errors import OneshotError
from oneshot.eval.plots import draw_plots
from oneshot.eval.render import render_html, render_md
from oneshot.eval.report_model import PerplexityRow, Report, ReportRun, RunSummary
from oneshot.eval.task_compare import TaskTable, task_table
from oneshot.output import reserve_output
from oneshot.runfolder import (
    EVAL_FILE,
    BlockReport,
    EvalRecord,
    PerplexityRecord,
    RunRecord,
)

__all__ = [
    "PLOTS_DIR",
    "REPORT_FILES",
    "LoadedRun",
    "ReportError",
    "build_report",
    "load_run",
    "write_report",
]

logger = logging.getLogger(__name__)

REPORT_FILES = ("report.md", "report.json", "report.html")
PLOTS_DIR = "plots"

PathLike = str | os.PathLike[str]


class ReportError(OneshotError):
    """The report cannot be written as asked (no runs, an output folder it may not replace)."""


# --------------------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedRun:
    dir: Path
    name: str
    run: RunRecord
    eval: EvalRecord | None


def load_run(run_dir: PathLike) -> LoadedRun:
    """The records of a run directory (`RecordError` naming the file when one is missing or broken)."""
    folder = Path(run_dir).expanduser()
    if not folder.is_dir():
        raise ReportError(f"run directory {folder} does not exist")
    return LoadedRun(
        folder.resolve(), folder.resolve().name, RunRecord.load(folder), EvalRecord.load_optional(folder)
    )


# --------------------------------------------------------------------------------------------------------
# The report record


def _rel(dense: float | None, pruned: float | None) -> float | None:
    if dense is None or pruned is None or not dense:
        return None
    return pruned / dense - 1.0


def _row(
    dataset: str, kind: str, dense: PerplexityRecord | None, dense_from: str | None, pruned: PerplexityRecord
) -> PerplexityRow:
    return PerplexityRow(
        dataset=dataset,
        kind=kind,
        dense=dense.value if dense is not None else None,
        dense_from=dense_from if dense is not None else None,
        pruned=pruned.value,
        rel_degradation=_rel(dense.value if dense is not None else None, pruned.value),
        windows=pruned.windows,
        seqlen=pruned.seqlen,
        tokens=pruned.tokens,
        note=pruned.note
        or (f"quick check: first {pruned.windows} windows, not the full protocol" if kind == "quick" else ""),
    )


def _ppl_rows(run: LoadedRun, baseline: EvalRecord | None) -> list[PerplexityRow]:
    """Perplexity rows: eval.json (``oneshot eval``) when present, else the quick check of oneshot.json."""
    rows: list[PerplexityRow] = []
    ev = run.eval
    if ev is not None:
        own = ev.baseline.ppl if ev.baseline is not None else {}
        ext = baseline.ppl if baseline is not None else {}
        for dataset, res in ev.ppl.items():
            dense, origin = (
                (own[dataset], "eval.json baseline") if dataset in own else (ext.get(dataset), "--baseline")
            )
            why = res.mismatch(dense) if dense is not None else None
            if why is not None:  # never compare measurements of other windows or data: say so instead
                row = _row(dataset, "eval", None, None, res)
                row.note = f"{origin} not comparable ({why}): left out; {row.note}".rstrip("; ")
                rows.append(row)
                continue
            rows.append(_row(dataset, "eval", dense, origin, res))
    quick = run.run.quick_eval
    if not rows and quick.pruned is not None:
        rows.append(
            _row(quick.pruned.dataset or "wikitext2", "quick", quick.dense, "quick_eval", quick.pruned)
        )
    return rows


def _summary(run: LoadedRun) -> RunSummary:
    rec, run_cfg = run.run, run.run.run
    quick = rec.quick_eval.pruned is not None
    if rec.kind == "shrink":  # removed share of the decoder-block parameters in the sparsity columns
        scfg, srep = rec.shrunk
        removed = 1.0 - srep.block_params_after / max(1, srep.block_params_before)
        what: dict[str, Any] = dict(
            method="shrink",
            pattern=", ".join(f"{k} {v[0]}->{v[1]}" for k, v in srep.config_changes.items()) or "-",
            target_sparsity=1.0 - scfg.params if scfg.params is not None else removed,
            sparsity=removed,
            pruned_params=srep.block_params_before,
            prune_seconds=srep.total_seconds or None,
            peak_memory_bytes=0,
            peak_memory_kind="",
            device=srep.device,
        )
    elif rec.kind == "quantize":  # a plain model quantized: no weight removed
        q = rec.quantized
        what = dict(
            method=f"quantize ({q.solver})",
            pattern=q.label,
            target_sparsity=0.0,
            sparsity=0.0,
            pruned_params=q.quantized_params,
            prune_seconds=q.total_seconds or None,
            peak_memory_bytes=0,
            peak_memory_kind="",
            device=q.device,
        )
    else:
        cfg, pr = rec.pruned
        quant = f" + {rec.quantization.config.scheme}" if rec.quantization is not None else ""
        what = dict(
            method=cfg.method,
            pattern=cfg.pattern + quant,
            target_sparsity=float(cfg.sparsity or 0.0),
            sparsity=pr.sparsity,
            pruned_params=pr.pruned_params,
            prune_seconds=pr.total_seconds or None,
            peak_memory_bytes=pr.peak_memory_bytes,
            peak_memory_kind=pr.peak_memory_kind,
            device=pr.device,
        )
    return RunSummary(
        name=run.name,
        dir=str(run.dir),
        model=rec.source.base_model or rec.source.path or run_cfg.model or "default",
        model_type=rec.model_type,
        calibration=f"{run_cfg.calib}: {run_cfg.nsamples} x {run_cfg.seqlen} tokens, seed {run_cfg.seed}",
        **what,
        started=rec.started,
        command=" ".join(rec.command),
        has_eval=run.eval is not None,
        evaluation="eval.json" if run.eval is not None else ("quick check only" if quick else "none"),
    )


def _tasks(run: LoadedRun, baseline: EvalRecord | None, baseline_path: str | None) -> TaskTable | None:
    """The task table of a run: its eval.json's own dense baseline when that has task results, else the
    tasks of ``oneshot report --baseline``; without either, the pruned scores alone."""
    ev = run.eval
    if ev is None or not ev.tasks:
        return None
    own = ev.baseline
    if own is not None and own.tasks:
        cached = ", read from the cache" if own.cached else ""
        model = own.model or "unnamed"
        label = f"the dense model `{model}`, evaluated alongside (`oneshot eval --baseline`){cached}"
        return task_table(ev.tasks, own.tasks, label, lm_eval=ev.versions.get("lm_eval"))
    if baseline is not None and baseline.tasks:
        label = f"`oneshot report --baseline {baseline_path}` ({baseline.model or 'model not recorded'})"
        return task_table(ev.tasks, baseline.tasks, label, lm_eval=ev.versions.get("lm_eval"))
    return task_table(ev.tasks, lm_eval=ev.versions.get("lm_eval"))


def _algorithm(record: RunRecord) -> dict[str, Any]:
    algorithm = record.config if record.config is not None else record.shrink_config
    return algorithm.to_dict() if algorithm is not None else {}


def _blocks(record: RunRecord) -> list[BlockReport]:
    """Per-block output errors of the run's own pass (prune, shrink or a plain quantize)."""
    if record.prune is not None:
        return record.prune.blocks
    if record.shrink is not None:
        return record.shrink.blocks
    return record.quantization.blocks if record.quantization is not None else []


def build_report(
    runs: Sequence[LoadedRun], baseline: EvalRecord | None = None, baseline_path: str | None = None
) -> Report:
    """The report record of loaded runs (`load_run`) and an optional dense baseline evaluation."""
    return Report(
        generated=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        baseline=baseline_path,
        runs=[
            ReportRun(
                summary=_summary(run),
                config={**_algorithm(run.run), **run.run.run.to_dict()},
                perplexity=_ppl_rows(run, baseline),
                tasks=_tasks(run, baseline, baseline_path),
                longtail=run.eval.longtail if run.eval is not None else None,
                layers=run.run.prune.layers if run.run.prune is not None else [],
                blocks=_blocks(run.run),
                allocation=run.run.allocation,
            )
            for run in runs
        ],
    )


# --------------------------------------------------------------------------------------------------------
# Writing


def _report_folder_rule(folder: Path) -> str | None:
    """An existing report folder may be replaced; a folder holding anything else may not."""
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in (*REPORT_FILES, PLOTS_DIR))
    if foreign:
        return f"exists and holds other files ({', '.join(foreign[:5])}): choose a new or report folder"
    return None


def write_report(
    run_dirs: Sequence[PathLike], baseline: PathLike | None = None, out: PathLike = "report"
) -> dict[str, Path]:
    """Write ``report.md``, ``report.json``, ``report.html`` (and ``plots/*.png``) into ``out``.

    ``run_dirs``: `oneshot prune` output folders (each must hold ``oneshot.json``; ``eval.json`` is
    optional). ``baseline``: the dense model's ``oneshot eval`` folder or eval.json. The folder is taken and
    replaced atomically (`oneshot.output`); an existing ``out`` is replaced only when it holds nothing but a
    previous report. Returns ``{"md", "json", "html", "plots"}`` -> final paths.
    """
    if not run_dirs:
        raise ReportError("give at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # folders with the same name in different places: name them parent/name
        if names.count(r.name) > 1:
            r.name = "/".join(r.dir.parts[-2:])
    base = base_path = None
    if baseline is not None:
        path = Path(baseline).expanduser()
        if not (path / EVAL_FILE if path.is_dir() else path).is_file():
            raise ReportError(
                f"baseline {path} not found or holds no {EVAL_FILE}: pass the dense model's `oneshot eval` "
                f"folder or its {EVAL_FILE}"
            )
        base = EvalRecord.load(path)
        base_path = str(path.resolve())
    report = build_report(runs, base, base_path)
    plots = draw_plots(report)
    report.plots = [f"{PLOTS_DIR}/{stem}.png" for stem, _, _ in plots]
    protected = [("input run folder", r.dir) for r in runs]
    with reserve_output(out, overwrite=True, protected=protected, replaceable=_report_folder_rule) as slot:
        tmp = slot.tmp
        assert tmp is not None
        (tmp / PLOTS_DIR).mkdir()
        for stem, _, png in plots:
            (tmp / PLOTS_DIR / f"{stem}.png").write_bytes(png)
        (tmp / "report.json").write_text(report.to_json(), encoding="utf-8")
        (tmp / "report.md").write_text(render_md(report, {s: c for s, c, _ in plots}), encoding="utf-8")
        (tmp / "report.html").write_text(
            render_html(report, {s: (c, png) for s, c, png in plots}), encoding="utf-8"
        )
        slot.commit()
    logger.debug("report written to %s", slot.out)
    return {
        "md": slot.out / "report.md",
        "json": slot.out / "report.json",
        "html": slot.out / "report.html",
        "plots": slot.out / PLOTS_DIR,
    }
