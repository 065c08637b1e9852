"""The `oneshot prune` job: check, reserve the output, load, calibrate, evaluate dense, prune, evaluate, save.

Everything that needs only the arguments and the model's config is checked before the weights are loaded;
the output folder is taken (locked and test-written, `oneshot.output`) before anything else. Outputs are
written to a temporary folder beside ``out`` and moved into place at the end, so an interrupted run never
leaves a folder that looks complete, and an interruption message says exactly what is on disk.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oneshot import distributed
from oneshot.allocation import allocate, check_sensitivity
from oneshot.checks import check_layers, check_prunable, check_quantizable, model_skeleton, prunable_layers
from oneshot.config import AllocationConfig, PruneConfig, QuantConfig, RunConfig
from oneshot.data import calibration_windows, load_text_source, resolve_data_dir
from oneshot.errors import Interrupted, OneshotError
from oneshot.models import (
    check_finite,
    load_model,
    load_model_config,
    max_positions,
    model_location,
    resolve_device,
    resolve_dtype,
    strip_quantization,
)
from oneshot.output import OutputSlot, reserve_output
from oneshot.pruner import prune, prune_and_quantize
from oneshot.resume import BlockCheckpoint, ResumeError, fingerprint_tensor
from oneshot.runfolder import (
    FORBIDDEN_CONFIG_KEYS,
    QUANT_FILE,
    AllocationRecord,
    Calibration,
    ExportRecord,
    PerplexityRecord,
    PruneReport,
    QuickEval,
    RunRecord,
    SensitivityRecord,
    Source,
    file_hashes,
    from_dict,
    library_versions,
    to_dict,
    write_quant_file,
)
from oneshot.solvers import QuantizedWeight
from oneshot.streaming import MAX_SHARD_SIZE, StreamedModel, load_streamed, plan_offload

__all__ = [
    "RunError",
    "RunResult",
    "export_folder",
    "quick_perplexity",
    "run_job",
    "run_prune",
    "save_pruned",
    "write_run_folder",
]

logger = logging.getLogger(__name__)

Finish = Callable[[Path], object]  # a step run on the finished folder before it is moved into place
Finalize = Callable[[RunRecord], RunRecord]  # the record a job writes, from the one the frame built
GRIDS = "quant_weights"  # the key of `operate`'s result that carries the grids of a quantized model


class RunError(OneshotError):
    """A run that cannot start or whose result would be wrong (the message says which)."""


@dataclass
class RunResult:
    out: Path
    record: RunRecord


def export_folder(fmt: str) -> str:
    """Sub-folder of a run that holds the compressed form for the sparse kernels."""
    return f"compressed-{fmt.replace(':', 'of')}"


def write_run_folder(
    model: Any,
    tokenizer: Any,
    folder: Path,
    record: RunRecord,
    *,
    grids: dict[str, QuantizedWeight] | None = None,
    stream: StreamedModel | None = None,
) -> None:
    """Write checkpoint (safetensors, sharded when large), tokenizer and ``oneshot.json`` (with the content
    hashes of every file) into an existing ``folder``. config.json never carries a quantization or sparsity
    config: a quantized model is stored fake-quantized (plain float on the grid), its ``grids`` (scales,
    zero-points, g_idx per matrix) in ``quantization.safetensors`` beside it, and the sizes go into
    ``record.quantization``. ``record.run.export`` ("2:4" or "bitmask") also writes the compressed form for
    `oneshot.kernels` into ``compressed-<format>/`` (the model's pruned Linear layers are converted in place).
    ``stream``: the weights are already in ``folder`` (written block by block); only the index and the
    config files are left to write, as ``save_pretrained`` writes them.
    """
    strip_quantization(model)
    if stream is not None:
        if record.run.export is not None:
            raise RunError("--export needs the whole model in memory; it cannot follow a streamed run")
        stream.finish_output()
    else:
        model.save_pretrained(folder, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(folder)
    q = record.quantization
    if q is not None:
        if grids is None:
            raise RunError("a quantized run needs its grids to be written (scales, zero-points)")
        tensors: dict[str, Any] = {}
        for name, g in grids.items():
            tensors[f"{name}.weight_scale"] = g.scales
            tensors[f"{name}.weight_zero_point"] = g.zeros
            tensors[f"{name}.weight_g_idx"] = g.g_idx
        facts = {
            "scheme": q.config.scheme,
            "bits": q.bits,
            "group_size": q.group_size,
            "symmetric": q.symmetric,
            "act_order": q.act_order,
            "scale_dtype": q.scale_dtype,
        }
        q.file_bytes = write_quant_file(folder, tensors, facts).stat().st_size
        q.checkpoint_bytes = sum(
            f.stat().st_size for f in folder.glob("*.safetensors") if f.name != QUANT_FILE
        )
    export = record.run.export
    if export is not None:
        from oneshot import kernels

        summary = kernels.convert(model, export)
        kernels.save_compressed(model, folder / export_folder(export), tokenizer=tokenizer)
        record.export = ExportRecord(
            format=export,
            folder=export_folder(export),
            layers=summary.counts(),
            dense_bytes=sum(r.dense_bytes for r in summary.converted),
            stored_bytes=sum(r.stored_bytes for r in summary.converted),
        )
    _drop_config_keys(folder / "config.json")
    record.files = file_hashes(folder)
    record.save(folder)


def save_pruned(
    model: Any,
    tokenizer: Any,
    out: str | os.PathLike[str],
    record: RunRecord,
    *,
    overwrite: bool,
    finish: Sequence[Finish] = (),
) -> Path:
    """`write_run_folder` into ``out`` atomically: reserved first (`oneshot.output.reserve_output`), the
    ``finish`` steps run on the finished folder, moved into place at the end. Returns the final folder."""
    with reserve_output(out, overwrite=overwrite) as slot:
        assert slot.tmp is not None
        write_run_folder(model, tokenizer, slot.tmp, record)
        for step in finish:
            step(slot.tmp)
        slot.commit()
    return slot.out


def _drop_config_keys(config_json: Path) -> None:
    """Remove ``quantization_config`` / ``sparsity_config`` from a written config.json, should any remain."""
    if not config_json.is_file():
        return
    data = json.loads(config_json.read_text())
    found = [k for k in FORBIDDEN_CONFIG_KEYS if k in data]
    if found:
        logger.warning("removed %s from config.json: the checkpoint is plain dense float", ", ".join(found))
        for key in found:
            del data[key]
        config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def quick_perplexity(
    model: Any,
    tokenizer: Any,
    run: RunConfig,
    seqlen: int,
    *,
    label: str,
    progress: bool = True,
    stream: StreamedModel | None = None,
) -> PerplexityRecord | None:
    """Perplexity on the first ``run.eval_windows`` WikiText-2 test windows (a quick check, not the full
    protocol). A non-finite result is an error: a model that gives NaN is broken, whatever was reported."""
    from oneshot.eval.corpora import EvalDataError, ppl_token_ids
    from oneshot.eval.perplexity import perplexity

    try:
        ids = ppl_token_ids("wikitext2", tokenizer, run.data_dir)
    except EvalDataError as exc:
        logger.warning("quick evaluation skipped: %s", exc)
        return None
    windows = run.eval_windows
    available = ids.shape[-1] // seqlen
    if available == 0:
        raise RunError(
            f"the WikiText-2 test set ({ids.shape[-1]} tokens) is shorter than one quick-check window of {seqlen} "
            "tokens: lower --eval-seqlen or pass --eval-windows 0"
        )
    if available < windows:
        logger.warning(
            "--eval-windows %d: the WikiText-2 test set holds only %d windows of %d tokens; using %d",
            windows,
            available,
            seqlen,
            available,
        )
    logger.info("quick WikiText-2 perplexity of the %s model: %d windows x %d tokens", label, windows, seqlen)
    device = resolve_device(run.device)
    if stream is not None:  # block by block: from the source before pruning, from the output after it
        written = label != "dense"
        res = stream.perplexity(ids, seqlen, limit=windows, device=device, written=written)
    else:
        model.to(device)
        try:
            res = perplexity(
                model, ids, seqlen, batch_size=1, limit=windows, device=device, progress=progress
            )
        finally:
            model.to("cpu")
    if not math.isfinite(res.value):
        raise RunError(
            f"the {label} model's quick perplexity is {res.value} (NaN/Inf logits): the "
            + (
                "model overflows in this dtype (try --dtype float32) or its weights are corrupt"
                if label == "dense"
                else f"{label} model is broken; nothing was written"
            )
        )
    return PerplexityRecord(
        **res.to_dict(),
        dataset="wikitext2",
        note=f"quick check: first {res.windows} windows of the test set, not the full protocol",
    )


def _protected_paths(run: RunConfig) -> list[tuple[str, Path]]:
    """Paths the output must neither be nor contain."""
    out: list[tuple[str, Path]] = []
    model = model_location(run.model)
    if model is not None:
        out.append(("model source", model))
    data = resolve_data_dir(run.data_dir)
    if data is not None:
        out.append(("data directory", data))
    calib = Path(str(run.calib)).expanduser()
    if calib.is_file():
        out.append(("calibration file", calib))
    return out


def run_prune(
    config: PruneConfig,
    run: RunConfig,
    out: str | os.PathLike[str],
    *,
    quant: QuantConfig | None = None,
    allocation: AllocationConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    argv: list[str] | None = None,
    finish: Sequence[Finish] = (),
    resume: bool = False,
) -> RunResult:
    """Load ``run.model``, calibrate, prune with ``config``, evaluate a few windows and save the run folder
    to ``out`` (the ``finish`` steps, e.g. writing the model card, run on it before it is moved into place).

    After every block a checkpoint goes into the output's temporary folder (`oneshot.resume`); an
    interrupted run is continued by the same call with ``resume`` (bit for bit the same result), and a
    call without ``resume`` refuses to start while one exists. The configuration must be the same.

    ``quant``: also quantize every pruned matrix in the same pass (`oneshot.pruner.prune_and_quantize`); the
    group size is checked against every layer's width before the weights are loaded.
    ``allocation``: per-matrix sparsities (`oneshot.allocation.allocate`, before the pruning walk), recorded
    in ``oneshot.json`` under ``allocation``; a sensitivity file is read and checked against the model's
    matrices before any weight is loaded.

    Raises `OneshotError` subclasses for bad input (before any expensive step where the check allows it)
    and `Interrupted` on Ctrl-C, saying what is on disk.
    """
    run.check_against(config)
    if quant is not None:
        quant.check_against(config)
    if allocation is not None and allocation.method == "uniform":
        allocation.check_against(config)
        allocation = None
    sensitivity: SensitivityRecord | None = None
    if allocation is not None:
        allocation.check_against(config)
        if allocation.sensitivity_file is not None:
            sensitivity = SensitivityRecord.load(Path(allocation.sensitivity_file))
            check_sensitivity(sensitivity, config, target=allocation.target(config))

    def operate(
        model: Any, calib: Any, checkpoint: BlockCheckpoint | None = None, stream: StreamedModel | None = None
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(device=run.device, batch_size=run.batch_size, progress=progress)
        fields: dict[str, Any] = {"config": config}
        layer_sparsity = None
        if allocation is not None:
            fields["allocation"] = allocate(
                model, calib, config, allocation, sensitivity=sensitivity, **kwargs
            )
            layer_sparsity = fields["allocation"].sparsities
        if quant is None:
            fields["prune"] = prune(
                model,
                calib,
                config,
                layer_sparsity=layer_sparsity,
                checkpoint=checkpoint,
                stream=stream,
                **kwargs,
            )
        else:
            report, q = prune_and_quantize(
                model,
                calib,
                config,
                quant,
                layer_sparsity=layer_sparsity,
                checkpoint=checkpoint,
                stream=stream,
                **kwargs,
            )
            fields.update({"prune": report, "quantization": q.record, GRIDS: q.weights})
        if allocation is not None:
            _achieved(fields["allocation"], fields["prune"])
        return fields

    def check(spec: str | None) -> tuple[int | None, bool]:
        if quant is None and sensitivity is None:
            return check_prunable(config, spec)
        model_config = load_model_config(spec)
        skeleton = model_skeleton(model_config)
        if skeleton is not None:
            check_loaded(skeleton)
        return max_positions(model_config), skeleton is not None

    def check_loaded(model: Any) -> None:
        check_layers(model, config)
        if quant is not None:
            check_quantizable(model, quant, config.ignore)
        if sensitivity is not None:
            check_sensitivity(sensitivity, config, list(prunable_layers(model, config.ignore)))

    blockers = [
        flag
        for flag, on in (
            (f"--export {run.export}", run.export is not None),
            (f"--allocation {allocation.method if allocation else ''}", allocation is not None),
            ("--calib self", str(run.calib).strip().lower() == "self"),
        )
        if on
    ]
    return run_job(
        run,
        out,
        check=check,
        check_loaded=check_loaded,
        operate=operate,
        label="pruned",
        stream_blockers=blockers,
        parallel=True,
        overwrite=overwrite,
        progress=progress,
        argv=argv,
        finish=finish,
        resume=resume,
        resume_key=_resume_key(config, run, quant, allocation),
    )


def _resume_key(
    config: PruneConfig, run: RunConfig, quant: QuantConfig | None, allocation: AllocationConfig | None
) -> dict[str, Any]:
    """The options a checkpoint must have been made with (the quick evaluation and the export aside)."""
    key: dict[str, Any] = {f"--{k.replace('_', '-')}": v for k, v in to_dict(run).items()}
    for name in ("--eval-windows", "--eval-seqlen", "--export", "--offload", "--offload-share"):
        key.pop(name, None)
    key.update(
        {
            "job": "prune",
            "pruning": to_dict(config),
            "quantization": None if quant is None else to_dict(quant),
            "allocation": None if allocation is None else to_dict(allocation),
        }
    )
    return key


def _achieved(rec: AllocationRecord, report: PruneReport) -> None:
    """The allocation's achieved sparsity: zeros / weights over the matrices it covered, after pruning."""
    zeros = sum(
        round(layer.sparsity * layer.shape[0] * layer.shape[1])
        for layer in report.layers
        if layer.name in rec.sparsities
    )
    rec.zeros = zeros
    rec.achieved = zeros / rec.params if rec.params else None


def run_job(
    run: RunConfig,
    out: str | os.PathLike[str],
    *,
    check: Callable[[str | None], tuple[int | None, bool]],
    check_loaded: Callable[[Any], None],
    operate: Callable[..., dict[str, Any]],
    label: str,
    overwrite: bool,
    progress: bool,
    argv: list[str] | None,
    finish: Sequence[Finish],
    finalize: Finalize | None = None,
    resume: bool = False,
    resume_key: dict[str, Any] | None = None,
    stream_blockers: list[str] | None = None,
    parallel: bool = False,
) -> RunResult:
    """The frame every model-changing job shares: take the output, read the data, ``check`` the model spec
    (its config and a weightless skeleton: returns the context length and whether the layer checks ran),
    load, ``check_loaded`` when they did not, calibrate, quick dense perplexity, ``operate(model,
    calibration)`` (returns the algorithm's `RunRecord` fields, and the grids of a quantized model under
    ``GRIDS``), quick perplexity again, ``finalize`` the record (e.g. merge it into an earlier run's), save
    atomically.

    ``resume_key`` (the options that fix the result): the job checkpoints its blocks (`oneshot.resume`),
    ``operate`` gets the `BlockCheckpoint` as a third argument, and ``resume`` continues an interrupted
    run on ``out`` (refused, one line, when its options differ).

    ``stream_blockers``: the job can stream the blocks from disk (``run.offload``, `oneshot.streaming`) but
    for these options of it, which need the whole model in memory; None: it cannot stream at all. A
    streaming job's ``operate`` gets the `StreamedModel` as ``stream=``. ``parallel``: ``operate`` is the
    block walk, which several processes share (`oneshot.distributed`); other jobs refuse them."""
    resolve_device(run.device)  # a device this machine does not have fails now
    if distributed.setup(run.device) > 1:
        if not parallel:
            distributed.finish()
            raise RunError(f"the {label} job runs in one process; start it without torchrun")
        if resume:
            raise RunError("--resume is not supported with several processes: resume with one process")
        if not distributed.is_main():  # a worker: its share of the calibration, no output of its own
            try:
                return _run_in_slot(
                    None,
                    run,
                    check=check,
                    check_loaded=check_loaded,
                    operate=operate,
                    label=label,
                    progress=False,
                    argv=argv,
                    finish=(),
                    finalize=finalize,
                    stream_blockers=stream_blockers,
                    out=Path(out),
                )
            finally:
                distributed.finish()
    try:
        slot = reserve_output(out, overwrite=overwrite, protected=_protected_paths(run), resume=resume)
    except KeyboardInterrupt as exc:
        raise Interrupted(f"interrupted; nothing was written to {out}") from exc
    try:
        if resume_key is not None and slot.tmp is not None:
            BlockCheckpoint(slot.tmp, resume_key).check(resume_key)  # the options, before any loading
        return _run_in_slot(
            slot,
            run,
            check=check,
            check_loaded=check_loaded,
            operate=operate,
            label=label,
            progress=progress,
            argv=argv,
            finish=finish,
            finalize=finalize,
            resume_key=resume_key,
            stream_blockers=stream_blockers,
        )
    except KeyboardInterrupt as exc:
        raise Interrupted(f"interrupted; {slot.state()}") from exc
    except OneshotError as exc:  # a definitive failure writes nothing; an interruption or a crash keeps
        if not isinstance(exc, ResumeError):  # the checkpoint, and so does a refused resume
            slot.forget_checkpoint()
        raise
    finally:
        slot.release()
        distributed.finish()


def _run_in_slot(
    slot: OutputSlot | None,
    run: RunConfig,
    *,
    check: Callable[[str | None], tuple[int | None, bool]],
    check_loaded: Callable[[Any], None],
    operate: Callable[..., dict[str, Any]],
    label: str,
    progress: bool,
    argv: list[str] | None,
    finish: Sequence[Finish],
    finalize: Finalize | None,
    resume_key: dict[str, Any] | None = None,
    stream_blockers: list[str] | None = None,
    out: Path | None = None,
) -> RunResult:
    """`run_job` inside its output slot; ``slot`` None: a worker of a multi-process run (`oneshot.distributed`),
    which calibrates on its share of the windows and writes nothing (its record goes to ``out`` unwritten)."""
    t0 = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    documents = None
    if str(run.calib).strip().lower() != "self":
        documents = load_text_source(run.calib, run.data_dir)  # unreadable data fails before the model
    max_pos, checked = check(run.model)  # the model's config and a weightless skeleton
    if max_pos is not None and run.seqlen > max_pos:
        raise RunError(f"--seqlen {run.seqlen} exceeds the model's context of {max_pos} tokens")
    if run.eval_seqlen is not None and max_pos is not None and run.eval_seqlen > max_pos:
        raise RunError(f"--eval-seqlen {run.eval_seqlen} exceeds the model's context of {max_pos} tokens")

    stream: StreamedModel | None = None
    if stream_blockers is None and run.offload == "disk":
        raise RunError("--offload disk is not supported by this job: it needs the whole model in memory")
    if stream_blockers is not None and run.offload != "none":
        dtype = resolve_dtype(run.dtype)
        plan = plan_offload(
            run.offload, load_model_config(run.model), dtype, run.offload_share, stream_blockers
        )
        if plan.stream:
            logger.info("streaming the decoder blocks from disk, one at a time (%s)", plan.reason)
            stream, tok, source = load_streamed(run.model, dtype)
            model = stream.model
    if stream is None:
        logger.info("loading %s", run.model or "the embedded SmolLM2-135M-Instruct")
        loaded = load_model(run.model, dtype=run.dtype)
        model, tok, source = loaded.model, loaded.tokenizer, loaded.source
    if not checked:  # no meta skeleton for this model: the same checks on the loaded one
        check_loaded(model)
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
    eval_seq = min(run.eval_seqlen or run.seqlen, max_pos or run.seqlen)
    quick = QuickEval()
    checkpoint = None
    if resume_key is not None and slot is not None and slot.tmp is not None and distributed.world_size() == 1:
        import torch
        import transformers

        data_key = {
            "calibration token ids (sha256)": fingerprint_tensor(calib),
            "model source": source,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        checkpoint = BlockCheckpoint(slot.tmp, {**resume_key, **data_key})
        checkpoint.check()  # the model and the calibration windows, before any compute
    if run.eval_windows > 0 and slot is not None:
        quick.dense = quick_perplexity(
            model, tok, run, eval_seq, label="dense", progress=progress, stream=stream
        )
    if stream is not None:
        if slot is not None:
            assert slot.tmp is not None
            stream.start_output(slot.tmp)  # the weights outside the blocks now, each block when it is done
        fields = operate(model, calib, checkpoint, stream=stream)
    else:
        fields = operate(model, calib) if checkpoint is None else operate(model, calib, checkpoint)
    grids = fields.pop(GRIDS, None)
    if run.eval_windows > 0 and quick.dense is not None:
        quick.pruned = quick_perplexity(
            model, tok, run, eval_seq, label=label, progress=progress, stream=stream
        )

    record = RunRecord(
        config=fields.pop("config", None),
        run=run,
        source=from_dict(Source, source),
        prune=fields.pop("prune", None),
        command=list(argv if argv is not None else sys.argv),
        started=started,
        model_type=getattr(model.config, "model_type", None),
        calibration=from_dict(Calibration, calib_info),
        versions=library_versions(),
        quick_eval=quick,
        **fields,
    )
    record.total_seconds = time.perf_counter() - t0
    if finalize is not None:
        record = finalize(record)
    if slot is None:  # a worker: rank 0 writes
        assert out is not None
        return RunResult(out, record)
    assert slot.tmp is not None
    if stream is None:  # (streamed: every solve and every block output was checked finite)
        check_finite(model, f"the {label} model")  # never save NaN, whatever the quick check did or skipped
    logger.info("writing %s", slot.out)
    if checkpoint is not None:
        checkpoint.clear()  # the folder becomes the output (a failure from here on starts over)
    write_run_folder(model, tok, slot.tmp, record, grids=grids, stream=stream)
    for step in finish:
        step(slot.tmp)
    slot.commit()
    return RunResult(slot.out, record)
