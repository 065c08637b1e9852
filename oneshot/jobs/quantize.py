"""The `oneshot quantize` job: GPTQ over a model or an earlier run folder, written as a new run folder.

The same frame as `oneshot prune` (`oneshot.jobs.prune.run_job`: the output taken first, the group size
checked against every layer's width on a weightless skeleton before any weight is read, quick perplexity
before and after, the folder written atomically) around `oneshot.pruner.quantize`. Weights that are exactly 0
(a pruned run's) stay 0.

A run folder of `oneshot prune`, `shrink` or `recover` as the source keeps its record (what was pruned or
shrunk, how, its recoveries): the new record is that one with a ``quantization`` section that states this
pass's own run settings, calibration, command and quick perplexity before and after. A plain model gives a
record of kind ``quantize``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from oneshot.checks import check_quantizable, model_skeleton
from oneshot.config import QuantConfig, RunConfig
from oneshot.jobs.prune import GRIDS, Finish, RunError, RunResult, run_job
from oneshot.models import load_model_config, max_positions
from oneshot.pruner import quantize
from oneshot.runfolder import RUN_FILE, QuickEval, RunRecord
from oneshot.streaming import StreamedModel

__all__ = ["run_quantize", "source_record"]

logger = logging.getLogger(__name__)


def source_record(spec: str | None) -> tuple[Path, RunRecord] | None:
    """The run folder and record of ``spec`` when it is an oneshot run folder, else None. A run that is
    already quantized is refused (its weights are on a grid: quantize the run it was made from)."""
    if spec is None:
        return None
    folder = Path(str(spec)).expanduser()
    if not (folder / RUN_FILE).is_file():
        return None
    record = RunRecord.load(folder)  # a broken record is an error naming the file
    if record.quantization is not None:
        q = record.quantization
        raise RunError(
            f"{folder} is already quantized ({q.label}): "
            + (
                f"quantize the run it was made from ({q.source_run})"
                if q.source_run
                else "quantize its source model, or a run pruned without --quantize"
            )
        )
    return folder, record


def _check(quant: QuantConfig, spec: str | None) -> tuple[int | None, bool]:
    model_config = load_model_config(spec)
    skeleton = model_skeleton(model_config)
    if skeleton is not None:
        check_quantizable(skeleton, quant)
    return max_positions(model_config), skeleton is not None


def _merge(record: RunRecord, source: tuple[Path, RunRecord] | None) -> RunRecord:
    """This pass's settings into its ``quantization`` section; with a source run folder, that run's record
    with this section added (its quick check: dense -> quantized when the windows are the same)."""
    q = record.quantized
    q.run, q.calibration, q.command, q.started = (
        record.run,
        record.calibration,
        record.command,
        record.started,
    )
    q.ppl_before, q.ppl_after = record.quick_eval.dense, record.quick_eval.pruned
    q.total_seconds = record.total_seconds or q.total_seconds
    if source is None:
        return record
    folder, earlier = source
    q.source_run = str(folder.resolve())
    dense = earlier.quick_eval.dense
    after = q.ppl_after
    comparable = dense is not None and after is not None and after.mismatch(dense) is None
    earlier.quick_eval = QuickEval(dense=dense, pruned=after) if comparable else QuickEval()
    earlier.quantization = q
    earlier.versions = record.versions
    earlier.files = None  # recomputed for the new folder
    return earlier


def run_quantize(
    quant: QuantConfig,
    run: RunConfig,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
    argv: list[str] | None = None,
    finish: Sequence[Finish] = (),
) -> RunResult:
    """Load ``run.model`` (a model or a run folder), quantize every Linear of its decoder blocks with GPTQ on
    ``run``'s calibration windows, check a few perplexity windows before and after, and save a run folder at
    ``out``: the fake-quantized checkpoint (plain float), ``quantization.safetensors``, the record."""
    if run.export is not None:
        raise RunError("--export writes sparse formats; use `oneshot export RUN_DIR` for quantized formats")
    source = source_record(run.model)

    def operate(
        model: Any, calib: Any, checkpoint: Any = None, stream: StreamedModel | None = None
    ) -> dict[str, Any]:  # (quantize runs are not checkpointed: no resume key)
        q = quantize(
            model,
            calib,
            quant,
            device=run.device,
            batch_size=run.batch_size,
            progress=progress,
            stream=stream,
        )
        return {"quantization": q.record, GRIDS: q.weights}

    return run_job(
        run,
        out,
        check=lambda spec: _check(quant, spec),
        check_loaded=lambda model: check_quantizable(model, quant),
        operate=operate,
        label="quantized",
        overwrite=overwrite,
        progress=progress,
        argv=argv,
        finish=finish,
        finalize=lambda record: _merge(record, source),
        stream_blockers=["--calib self"] if str(run.calib).strip().lower() == "self" else [],
        parallel=True,
    )
