"""The `oneshot prune` job: check, reserve the output, load, calibrate, evaluate dense, prune, evaluate, save.

Everything that needs only the arguments and the model's config is checked before the weights are loaded;
the output folder is taken (locked and test-written, `oneshot.output`) before anything else. Outputs are
written to a temporary folder beside ``out`` and moved into place at the end, so an interrupted run never
leaves a folder that looks complete, and an interruption message says exactly what is on disk.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oneshot.config import PruneConfig
from oneshot.data import calibration_windows, load_text_source, resolve_data_dir
from oneshot.errors import Interrupted, OneshotError
from oneshot.models import check_finite, load_model, model_location, strip_quantization
from oneshot.output import RUN_FILE, OutputSlot, reserve_output
from oneshot.pruner import PruneReport, prune, resolve_device

__all__ = [
    "EXPORT_FORMATS",
    "FORBIDDEN_CONFIG_KEYS",
    "RUN_FILE",
    "RunError",
    "RunResult",
    "export_folder",
    "file_hashes",
    "library_versions",
    "run_prune",
    "save_pruned",
    "write_run_folder",
]

logger = logging.getLogger(__name__)

FORMAT = "oneshot-run/1"
# files `oneshot eval` / `oneshot card` rewrite later: not covered by the content hashes
DERIVED_FILES = ("README.md", "eval.json", RUN_FILE)
DERIVED_DIRS = ("report",)


class RunError(OneshotError):
    """A run that cannot start or whose result would be wrong (the message says which)."""


@dataclass
class RunResult:
    out: Path
    report: PruneReport
    record: dict[str, Any] = field(default_factory=dict)


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("oneshot", "torch", "transformers", "accelerate", "safetensors", "gguf", "triton", "lm_eval"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


EXPORT_FORMATS = ("2:4", "bitmask")


def export_folder(fmt: str) -> str:
    """Sub-folder of a run that holds the compressed form for the sparse kernels."""
    return f"compressed-{fmt.replace(':', 'of')}"


def file_hashes(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file of a run folder except hidden ones and the derived ones (card, eval,
    record, report).

    Recorded in ``oneshot.json`` at save time; `oneshot push` verifies them, so a changed weight is caught.
    """
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        hidden = any(part.startswith(".") for part in rel.split("/"))
        if hidden or not path.is_file() or rel in DERIVED_FILES or rel.split("/")[0] in DERIVED_DIRS:
            continue
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        out[rel] = {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}
    return out


def write_run_folder(
    model: Any, tokenizer: Any, folder: Path, record: dict[str, Any], *, export: str | None = None
) -> None:
    """Write checkpoint (safetensors, sharded when large), tokenizer, ``oneshot.json`` (with the content
    hashes of every file) and the model card (``README.md``, `oneshot.card`) into an existing ``folder``.
    config.json never carries a quantization or sparsity config.

    ``export`` ("2:4" or "bitmask") also writes the compressed form for ``kernels`` into
    ``compressed-<format>/``; the model's pruned Linear layers are converted in place for that.
    """
    strip_quantization(model)
    model.save_pretrained(folder, max_shard_size="2GB")
    tokenizer.save_pretrained(folder)
    if export is not None:
        from oneshot import kernels

        summary = kernels.convert(model, export)
        kernels.save_compressed(model, folder / export_folder(export), tokenizer=tokenizer)
        record["export"] = {
            "format": export,
            "folder": export_folder(export),
            "layers": summary.counts(),
            # bytes of the converted layers' weights: dense vs compressed
            "dense_bytes": sum(r.dense_bytes for r in summary.converted),
            "stored_bytes": sum(r.stored_bytes for r in summary.converted),
        }
    _drop_config_keys(folder / "config.json")
    record["files"] = file_hashes(folder)
    (folder / RUN_FILE).write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    _write_card(folder)


def save_pruned(
    model: Any,
    tokenizer: Any,
    out: Path,
    record: dict[str, Any],
    *,
    overwrite: bool,
    export: str | None = None,
) -> Path:
    """`write_run_folder` into ``out`` atomically: reserved first (`oneshot.output.reserve_output`),
    moved into place at the end. Returns the final folder."""
    with reserve_output(out, overwrite=overwrite) as slot:
        assert slot.tmp is not None
        write_run_folder(model, tokenizer, slot.tmp, record, export=export)
        slot.commit()
    return slot.out


# keys that would make loaders treat the dense-stored checkpoint as quantized or compressed
FORBIDDEN_CONFIG_KEYS = ("quantization_config", "sparsity_config")


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


def _write_card(folder: Path) -> None:
    """The model card (README.md) from the folder's oneshot.json; a failure is a warning, like the report."""
    try:
        from oneshot.card import write_card

        write_card(folder)
    except Exception as exc:  # the card is derived from oneshot.json: never lose a checkpoint over it
        logger.warning("could not write the model card into %s: %s", folder, exc)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def quick_perplexity(
    model: Any,
    tokenizer: Any,
    config: PruneConfig,
    windows: int,
    seqlen: int,
    *,
    label: str,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Perplexity on the first few WikiText-2 test windows (a quick check, not the full protocol).

    A non-finite result is an error: a model that gives NaN is broken, whatever the pruning reports.
    """
    from oneshot.eval.corpora import EvalDataError, ppl_token_ids
    from oneshot.eval.perplexity import perplexity

    try:
        ids = ppl_token_ids("wikitext2", tokenizer, config.data_dir)
    except EvalDataError as exc:
        logger.warning("quick evaluation skipped: %s", exc)
        return None
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
    device = resolve_device(config.device)
    model.to(device)
    try:
        res = perplexity(model, ids, seqlen, batch_size=1, limit=windows, device=device, progress=progress)
    finally:
        model.to("cpu")
    if not math.isfinite(res.value):
        raise RunError(
            f"the {label} model's quick perplexity is {res.value} (NaN/Inf logits): the "
            + (
                "model overflows in this dtype (try --dtype float32) or its weights are corrupt"
                if label == "dense"
                else "pruned model is broken; nothing was written"
            )
        )
    out = res.to_dict()
    out.update(
        dataset="wikitext2",
        note=f"quick check: first {res.windows} windows of the test set, not the full protocol",
    )
    return out


def _protected_paths(config: PruneConfig) -> list[tuple[str, Path]]:
    """Paths the output must neither be nor contain."""
    out: list[tuple[str, Path]] = []
    model = model_location(config.model)
    if model is not None:
        out.append(("model source", model))
    data = resolve_data_dir(config.data_dir)
    if data is not None:
        out.append(("data directory", data))
    calib = Path(str(config.calib)).expanduser()
    if calib.is_file():
        out.append(("calibration file", calib))
    return out


def check_run_arguments(
    config: PruneConfig, *, eval_windows: int, eval_seqlen: int | None, export: str | None
) -> None:
    """Everything that needs only the arguments (cheap; before the output is touched)."""
    if isinstance(eval_windows, bool) or not isinstance(eval_windows, int) or eval_windows < 0:
        raise RunError(
            f"--eval-windows must be an integer >= 0 (0 skips the quick check), got {eval_windows!r}"
        )
    if eval_seqlen is not None and (isinstance(eval_seqlen, bool) or eval_seqlen < 2):
        raise RunError(
            f"--eval-seqlen must be at least 2 tokens, got {eval_seqlen!r} (leave it out to use --seqlen)"
        )
    if eval_windows > 0 and eval_seqlen is None and config.seqlen < 2:
        raise RunError(
            "the quick check needs windows of at least 2 tokens: pass --eval-seqlen or --eval-windows 0"
        )
    if export is not None:
        if export not in EXPORT_FORMATS:
            raise RunError(f"unknown export format {export!r}: choose one of {', '.join(EXPORT_FORMATS)}")
        if export == "2:4" and config.pattern != "2:4":
            raise RunError(f"--export 2:4 needs --pattern 2:4 (got {config.pattern}); use --export bitmask")
    try:
        device = resolve_device(config.device)
    except (RuntimeError, ValueError) as exc:
        raise RunError(f"--device {config.device}: {str(exc).splitlines()[0]}") from exc
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise RunError(
            f"--device {config.device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
        )


def run_prune(
    config: PruneConfig,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    eval_windows: int = 8,
    eval_seqlen: int | None = None,
    progress: bool = True,
    argv: list[str] | None = None,
    export: str | None = None,
) -> RunResult:
    """Load ``config.model``, calibrate, prune, evaluate a few windows and save everything to ``out``.

    Raises `OneshotError` subclasses for bad input (before any expensive step where the check allows it)
    and `Interrupted` on Ctrl-C, saying what is on disk.
    """
    check_run_arguments(config, eval_windows=eval_windows, eval_seqlen=eval_seqlen, export=export)
    try:
        slot = reserve_output(out, overwrite=overwrite, protected=_protected_paths(config))
    except KeyboardInterrupt as exc:
        raise Interrupted(f"interrupted; nothing was written to {out}") from exc
    try:
        result = _run_in_slot(
            slot,
            config,
            eval_windows=eval_windows,
            eval_seqlen=eval_seqlen,
            progress=progress,
            argv=argv,
            export=export,
        )
    except KeyboardInterrupt as exc:
        raise Interrupted(f"interrupted; {slot.state()}") from exc
    finally:
        slot.release()
    return result


def _run_in_slot(
    slot: OutputSlot,
    config: PruneConfig,
    *,
    eval_windows: int,
    eval_seqlen: int | None,
    progress: bool,
    argv: list[str] | None,
    export: str | None,
) -> RunResult:
    from oneshot.checks import check_layers, check_prunable

    t0 = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    documents = None
    if str(config.calib).strip().lower() != "self":
        documents = load_text_source(config.calib, config.data_dir)  # unreadable data fails before the model
    max_pos, checked = check_prunable(config)  # the model's config and a weightless skeleton
    if max_pos is not None and config.seqlen > max_pos:
        raise RunError(f"--seqlen {config.seqlen} exceeds the model's context of {max_pos} tokens")
    if eval_seqlen is not None and max_pos is not None and eval_seqlen > max_pos:
        raise RunError(f"--eval-seqlen {eval_seqlen} exceeds the model's context of {max_pos} tokens")

    logger.info("loading %s", config.model or "the embedded SmolLM2-135M-Instruct")
    loaded = load_model(config.model, dtype=config.dtype)
    model, tok = loaded.model, loaded.tokenizer
    if not checked:  # no meta skeleton for this model: the same checks on the loaded one
        check_layers(model, config)
    calib, calib_info = calibration_windows(
        config.calib,
        tok,
        nsamples=config.nsamples,
        seqlen=config.seqlen,
        seed=config.seed,
        data_dir=config.data_dir,
        model=model,
        documents=documents,
    )
    eval_seq = min(eval_seqlen or config.seqlen, max_pos or config.seqlen)
    quick: dict[str, Any] = {}
    if eval_windows > 0:
        dense = quick_perplexity(model, tok, config, eval_windows, eval_seq, label="dense", progress=progress)
        if dense is not None:
            quick["dense"] = dense
    report = prune(model, calib, config, progress=progress)
    if eval_windows > 0 and quick:
        pruned = quick_perplexity(
            model, tok, config, eval_windows, eval_seq, label="pruned", progress=progress
        )
        if pruned is not None:
            quick["pruned"] = pruned

    record: dict[str, Any] = {
        "format": FORMAT,
        "config": config.to_dict(),
        "command": argv if argv is not None else sys.argv,
        "started": started,
        "source": loaded.source,
        "model_type": getattr(model.config, "model_type", None),
        "calibration": calib_info,
        "versions": library_versions(),
        "prune": report.to_dict(),
        "quick_eval": quick,
        "total_seconds": None,
    }
    record["total_seconds"] = time.perf_counter() - t0
    assert slot.tmp is not None
    check_finite(model, "the pruned model")  # never save NaN, whatever the quick check did or skipped
    logger.info("writing %s", slot.out)
    write_run_folder(model, tok, slot.tmp, record, export=export)
    slot.commit()
    _write_run_report(slot.out)
    return RunResult(slot.out, report, record)


def _write_run_report(run_dir: Path) -> None:
    """The run's own report (report.md/json/html in ``<run>/report``); the checkpoint is complete without it,
    so a failure here is a warning, not an error."""
    try:
        from oneshot.eval.report import write_report

        write_report([run_dir], out=run_dir / "report")
    except Exception as exc:  # the report is an extra: never lose a finished checkpoint over it
        logger.warning("could not write the report into %s: %s", run_dir / "report", exc)
