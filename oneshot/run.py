"""The `oneshot prune` job: load, calibrate, evaluate dense, prune, evaluate pruned, save.

Outputs are written to a temporary folder beside ``out`` and renamed at the end, so an interrupted run
never leaves a folder that looks complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from oneshot.config import PruneConfig
from oneshot.data import calibration_windows
from oneshot.models import load_model, strip_quantization
from oneshot.pruner import PruneReport, prune, resolve_device

__all__ = [
    "EXPORT_FORMATS",
    "FORBIDDEN_CONFIG_KEYS",
    "RUN_FILE",
    "RunResult",
    "check_output_dir",
    "export_folder",
    "library_versions",
    "run_prune",
    "save_pruned",
]

logger = logging.getLogger(__name__)

RUN_FILE = "oneshot.json"


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


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing non-empty folder unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {out} exists and is not empty: pass --overwrite or choose another folder"
        )


EXPORT_FORMATS = ("2:4", "bitmask")


def export_folder(fmt: str) -> str:
    """Sub-folder of a run that holds the compressed form for the sparse kernels."""
    return f"compressed-{fmt.replace(':', 'of')}"


def save_pruned(
    model: Any,
    tokenizer: Any,
    out: Path,
    record: dict[str, Any],
    *,
    overwrite: bool,
    export: str | None = None,
) -> None:
    """Write checkpoint (safetensors, sharded when large), tokenizer, ``oneshot.json`` and the model card
    (``README.md``, `oneshot.card`) atomically. config.json never carries a quantization or sparsity config.

    ``export`` ("2:4" or "bitmask") also writes the compressed form for ``kernels`` into
    ``compressed-<format>/``; the model's pruned Linear layers are converted in place for that.
    """
    out = out.resolve()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        strip_quantization(model)
        model.save_pretrained(tmp, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        if export is not None:
            import kernels

            summary = kernels.convert(model, export)
            kernels.save_compressed(model, tmp / export_folder(export), tokenizer=tokenizer)
            record["export"] = {
                "format": export,
                "folder": export_folder(export),
                "layers": summary.counts(),
                # bytes of the converted layers' weights: dense vs compressed
                "dense_bytes": sum(r.dense_bytes for r in summary.converted),
                "stored_bytes": sum(r.stored_bytes for r in summary.converted),
            }
        _drop_config_keys(tmp / "config.json")
        (tmp / RUN_FILE).write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
        _write_card(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def quick_perplexity(
    model: Any, tokenizer: Any, config: PruneConfig, windows: int, seqlen: int
) -> dict[str, Any] | None:
    """Perplexity on the first few WikiText-2 test windows (a quick check, not the full protocol)."""
    from eval.corpora import EvalDataError, ppl_token_ids
    from eval.perplexity import perplexity

    try:
        ids = ppl_token_ids("wikitext2", tokenizer, config.data_dir)
    except EvalDataError as exc:
        logger.warning("quick evaluation skipped: %s", exc)
        return None
    device = resolve_device(config.device)
    model.to(device)
    try:
        res = perplexity(model, ids, seqlen, batch_size=1, limit=windows, device=device)
    finally:
        model.to("cpu")
    out = res.to_dict()
    out.update(
        dataset="wikitext2",
        note=f"quick check: first {res.windows} windows of the test set, not the full protocol",
    )
    return out


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
    """Load ``config.model``, calibrate, prune, evaluate a few windows and save everything to ``out``."""
    out_path = Path(out).expanduser()
    check_output_dir(out_path, overwrite)  # fail before any work
    if export is not None:
        if export not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {export!r}: choose one of {', '.join(EXPORT_FORMATS)}")
        if export == "2:4" and config.pattern != "2:4":
            raise ValueError(f"--export 2:4 needs --pattern 2:4 (got {config.pattern}); use --export bitmask")
    t0 = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    loaded = load_model(config.model, dtype=config.dtype)
    model, tok = loaded.model, loaded.tokenizer
    from oneshot.pruner import _max_positions

    max_pos = _max_positions(model)
    if max_pos is not None and config.seqlen > max_pos:
        raise ValueError(f"--seqlen {config.seqlen} exceeds the model's context of {max_pos} tokens")
    calib, calib_info = calibration_windows(
        config.calib,
        tok,
        nsamples=config.nsamples,
        seqlen=config.seqlen,
        seed=config.seed,
        data_dir=config.data_dir,
        model=model,
    )
    eval_seq = min(eval_seqlen or config.seqlen, max_pos or config.seqlen)
    quick: dict[str, Any] = {}
    if eval_windows > 0:
        dense = quick_perplexity(model, tok, config, eval_windows, eval_seq)
        if dense is not None:
            quick["dense"] = dense
    report = prune(model, calib, config, progress=progress)
    if eval_windows > 0 and quick:
        pruned = quick_perplexity(model, tok, config, eval_windows, eval_seq)
        if pruned is not None:
            quick["pruned"] = pruned

    record: dict[str, Any] = {
        "format": "oneshot-run/1",
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
    save_pruned(model, tok, out_path, record, overwrite=overwrite, export=export)
    _write_run_report(out_path.resolve())
    return RunResult(out_path.resolve(), report, record)


def _write_run_report(run_dir: Path) -> None:
    """The run's own report (report.md/json/html in ``<run>/report``); the checkpoint is complete without it,
    so a failure here is a warning, not an error."""
    try:
        from eval.report import write_report

        write_report([run_dir], out=run_dir / "report")
    except Exception as exc:  # the report is an extra: never lose a finished checkpoint over it
        logger.warning("could not write the report into %s: %s", run_dir / "report", exc)
