"""The `oneshot sensitivity` job: per-layer loss curves of the dense model, written as a folder.

The same checks and output guarantees as `oneshot prune`: the sparsities and the model's layers are
checked before any weight is loaded (a weightless skeleton), the output folder is taken first (locked,
test-written) and moved into place at the end. The folder holds `SENSITIVITY_FILE` (the record, read by
``oneshot prune --allocation sensitivity --sensitivity-file``), ``sensitivity.md`` (a Markdown table of the
losses and the block output errors), ``sensitivity.png`` (a heat map, matrix x sparsity, of log10 loss) and
``sensitivity.html`` (all of it on one self-contained page).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oneshot.checks import check_prunable
from oneshot.config import ConfigError, PruneConfig, RunConfig
from oneshot.data import calibration_windows, load_text_source
from oneshot.errors import Interrupted
from oneshot.formatting import html_image, html_page, html_table, html_text, md_table
from oneshot.jobs.prune import RunError, _protected_paths
from oneshot.models import load_model, resolve_device
from oneshot.output import reserve_output
from oneshot.runfolder import (
    SENSITIVITY_FILE,
    SENSITIVITY_FORMAT,
    Calibration,
    SensitivityRecord,
    Source,
    from_dict,
    library_versions,
)
from oneshot.sensitivity import scan_sensitivity

__all__ = [
    "HTML_FILE",
    "PLOT_FILE",
    "TABLE_FILE",
    "SensitivityResult",
    "check_sparsities",
    "run_sensitivity",
    "write_outputs",
]

TABLE_FILE = "sensitivity.md"
PLOT_FILE = "sensitivity.png"
HTML_FILE = "sensitivity.html"
_OURS = (SENSITIVITY_FILE, TABLE_FILE, PLOT_FILE, HTML_FILE)


@dataclass
class SensitivityResult:
    out: Path
    record: SensitivityRecord


def check_sparsities(sparsities: Sequence[float], config: PruneConfig) -> list[float]:
    """Sorted distinct fractions in (0, 1); with an N:M pattern exactly N/M (also when none are given)."""
    nm = config.nm
    if nm is not None:
        implied = nm[0] / nm[1]
        if any(abs(s - implied) > 1e-9 for s in sparsities):
            raise ConfigError(
                f"with --pattern {config.pattern} a matrix is pruned {config.pattern} or not at all: the only "
                f"sparsity measured is {implied:g} (leave --sparsities out)"
            )
        return [implied]
    if not sparsities:
        raise ConfigError("--sparsities is empty: give fractions such as 0.3,0.5,0.7")
    bad = [s for s in sparsities if not (math.isfinite(s) and 0.0 < s < 1.0)]
    if bad:
        raise ConfigError(f"--sparsities must be fractions in (0, 1), got {bad[0]!r}")
    if len(set(sparsities)) != len(sparsities):
        raise ConfigError("--sparsities lists a value twice")
    return sorted(float(s) for s in sparsities)


def _sensitivity_folder_rule(folder: Path) -> str | None:
    """--overwrite replaces an earlier `oneshot sensitivity` folder holding nothing but its own files."""
    try:
        data = json.loads((folder / SENSITIVITY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith(f"{SENSITIVITY_FORMAT}/"):
        return (
            f"is not an earlier `oneshot sensitivity` output (no {SENSITIVITY_FILE}): --overwrite only replaces "
            "folders oneshot wrote; choose another folder"
        )
    foreign = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name not in _OURS)
    if foreign:
        return f"holds {', '.join(foreign[:5])}, which `oneshot sensitivity` did not write: choose another folder"
    return None


def run_sensitivity(
    config: PruneConfig,
    run: RunConfig,
    sparsities: Sequence[float],
    out: str | os.PathLike[str],
    *,
    error_windows: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    argv: list[str] | None = None,
) -> SensitivityResult:
    """Measure the loss curves of ``run.model`` for the pruning ``config`` at ``sparsities`` and write the
    sensitivity folder ``out`` atomically. `OneshotError` for bad input, before any weight is loaded."""
    levels = check_sparsities(sparsities, config)
    resolve_device(run.device)
    try:
        slot = reserve_output(
            out, overwrite=overwrite, protected=_protected_paths(run), replaceable=_sensitivity_folder_rule
        )
    except KeyboardInterrupt as exc:
        raise Interrupted(f"interrupted; nothing was written to {out}") from exc
    try:
        t0 = time.perf_counter()
        started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        documents = None
        if str(run.calib).strip().lower() != "self":
            documents = load_text_source(run.calib, run.data_dir)
        max_pos, _ = check_prunable(config, run.model)
        if max_pos is not None and run.seqlen > max_pos:
            raise RunError(f"--seqlen {run.seqlen} exceeds the model's context of {max_pos} tokens")
        loaded = load_model(run.model, dtype=run.dtype)
        model, tok = loaded.model, loaded.tokenizer
        calib, calib_info = calibration_windows(
            run.calib,
            tok,
            nsamples=run.nsamples,
            seqlen=run.seqlen,
            seed=run.seed,
            data_dir=run.data_dir,
            model=model,
            documents=documents,
        )
        record = scan_sensitivity(
            model,
            calib,
            config,
            levels,
            device=run.device,
            batch_size=run.batch_size,
            error_windows=error_windows,
            progress=progress,
        )
        record.run = run
        record.source = from_dict(Source, loaded.source)
        record.calibration = from_dict(Calibration, calib_info)
        record.model_type = getattr(model.config, "model_type", None)
        record.command = list(argv if argv is not None else sys.argv)
        record.started = started
        record.versions = library_versions()
        record.total_seconds = time.perf_counter() - t0
        assert slot.tmp is not None
        write_outputs(record, slot.tmp)
        slot.commit()
        return SensitivityResult(slot.out, record)
    except KeyboardInterrupt as exc:
        raise Interrupted(f"interrupted; {slot.state()}") from exc
    finally:
        slot.release()


def write_outputs(record: SensitivityRecord, folder: Path) -> None:
    """``sensitivity.json``, the Markdown table, the heat map and the HTML page (tables and the heat map
    embedded: one file to open or share) into an existing ``folder``."""
    record.save(folder)
    (folder / TABLE_FILE).write_text(markdown_table(record), encoding="utf-8")
    png: bytes | None = None
    try:
        png = heat_map(record)
    except ImportError:  # matplotlib comes with the `eval` extra
        print(
            f"oneshot: warning: matplotlib is not installed, so {PLOT_FILE} is not drawn "
            "(pip install 'oneshot[eval]'); the json, the table and the page are written without it",
            file=sys.stderr,
        )
    if png is not None:
        (folder / PLOT_FILE).write_bytes(png)
    (folder / HTML_FILE).write_text(html_report(record, png), encoding="utf-8")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _intro(record: SensitivityRecord) -> str:
    calib = record.calibration
    return (
        "Reconstruction loss ||(W - W')X^T||^2 / n of every matrix pruned alone at each sparsity, on the dense "
        f"model's inputs (calibration {calib.source if calib else '?'}: {calib.nsamples if calib else '?'} x "
        f"{calib.seqlen if calib else '?'} tokens, seed {calib.seed if calib else '?'}); "
        f"{record.total_seconds:.1f} s on {record.device}."
    )


def _error_intro(record: SensitivityRecord) -> str:
    return (
        "Block output error ||Y_dense - Y||^2 / ||Y_dense||^2 with every matrix of the block at the sparsity "
        f"(first {record.error_windows} calibration windows):"
    )


def _loss_table(record: SensitivityRecord) -> tuple[list[str], list[list[str]]]:
    header = ["matrix", *(f"loss @ {s:g}" for s in record.sparsities)]
    return header, [[f"`{x.name}`", *(_fmt(v) for v in x.losses)] for x in record.layers]


def _error_table(record: SensitivityRecord) -> tuple[list[str], list[list[str]]]:
    header = ["block", *(f"error @ {s:g}" for s in record.sparsities)]
    return header, [[str(b.index), *(_fmt(v) for v in b.output_error)] for b in record.blocks]


def markdown_table(record: SensitivityRecord) -> str:
    """Per-matrix losses at every sparsity, then per-block output errors."""
    cfg = record.config
    lines = [f"# Sensitivity: {cfg.method} {cfg.pattern}", "", _intro(record), ""]
    lines += [md_table(*_loss_table(record)), "", _error_intro(record), "", md_table(*_error_table(record))]
    return "\n".join(lines) + "\n"


def html_report(record: SensitivityRecord, png: bytes | None) -> str:
    """The self-contained page of the scan: settings, the heat map (when drawn), both tables."""
    cfg = record.config
    source = record.source
    model = (source.base_model or source.path) if source is not None else None
    body = [
        f"<p>{html_text(_intro(record))}</p>",
        html_table(
            ["setting", "value"],
            [
                ["model", str(model or (record.run.model if record.run else None) or "default")],
                ["method, pattern", f"{cfg.method}, {cfg.pattern}"],
                ["sparsities", ", ".join(f"{s:g}" for s in record.sparsities)],
                ["command", " ".join(record.command)],
                ["started", record.started or "-"],
            ],
        ),
    ]
    if png is not None:
        body.append(html_image(png, f"log10 reconstruction loss ({cfg.method} {cfg.pattern})"))
    header, rows = _loss_table(record)
    body.append(html_table(header, [[r[0].strip("`"), *r[1:]] for r in rows]))
    body += [f"<p>{html_text(_error_intro(record))}</p>", html_table(*_error_table(record))]
    return html_page(f"oneshot sensitivity: {cfg.method} {cfg.pattern}", body)


def heat_map(record: SensitivityRecord) -> bytes:
    """PNG: matrices (rows) x sparsities (columns), colour = log10 of the loss."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = np.array(
        [
            [math.log10(v) if v is not None and v > 0 else np.nan for v in layer.losses]
            for layer in record.layers
        ],
        dtype=float,
    ).reshape(len(record.layers), len(record.sparsities))
    height = min(40.0, max(3.0, 0.12 * len(record.layers) + 1.5))
    fig = Figure(
        figsize=(max(4.0, 1.0 * len(record.sparsities) + 3.5), height), dpi=100, layout="constrained"
    )
    FigureCanvasAgg(fig)
    ax: Any = fig.add_subplot(1, 1, 1)
    image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(record.sparsities)), [f"{s:g}" for s in record.sparsities])
    step = max(1, len(record.layers) // 60)
    ax.set_yticks(
        range(0, len(record.layers), step),
        [record.layers[i].name for i in range(0, len(record.layers), step)],
        fontsize=6,
    )
    ax.set_xlabel("sparsity")
    ax.set_title(f"log10 reconstruction loss ({record.config.method} {record.config.pattern})")
    fig.colorbar(image, ax=ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
