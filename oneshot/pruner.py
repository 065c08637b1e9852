"""`prune(model, calibration, config) -> PruneReport`: one-shot pruning of an in-memory causal LM.

One calibration pass per block: the block runs on the calibration activations with input hooks, every
Linear in it is pruned by the chosen solver, and (``propagate="pruned"``) the block runs again so the
next block calibrates on what the pruned model really produces. Only the current block sits on the
compute device; calibration activations stay there when they fit and on the CPU otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from oneshot.config import PruneConfig
from oneshot.solvers import SolverError, get_solver
from oneshot.walker import (
    InputCollector,
    capture_block_calls,
    find_blocks,
    find_linears,
    get_weight,
    move_non_block_modules,
    run_block,
    set_weight,
)

__all__ = ["BlockReport", "LayerReport", "PruneReport", "prune", "resolve_device"]

logger = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    sparsity: float  # fraction of zeros after pruning
    loss: float | None  # ||(W - W')X^T||^2 / n on the calibration inputs (None when no Hessian was kept)
    seconds: float


@dataclass
class BlockReport:
    index: int
    seconds: float
    output_error: float | None  # ||Y_dense - Y_pruned||^2 / ||Y_dense||^2 of the block on calibration data


@dataclass
class PruneReport:
    config: dict[str, Any]
    layers: list[LayerReport] = field(default_factory=list)
    blocks: list[BlockReport] = field(default_factory=list)
    total_seconds: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    device: str = "cpu"
    pruned_params: int = 0
    zero_params: int = 0

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over all pruned layers (zeros / parameters)."""
        return self.zero_params / self.pruned_params if self.pruned_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sparsity"] = self.sparsity
        return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available: use --device cpu or auto")
    return dev


def _store_device(device: torch.device, nbytes: int) -> torch.device:
    """Keep calibration activations on the compute device when three copies fit in half its free memory."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if 3 * nbytes < free // 2 else torch.device("cpu")


def _check_finite(name: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise ValueError(
            f"layer {name} has NaN/Inf weights before pruning: the model is corrupt or overflowed "
            "in this dtype (try --dtype float32)"
        )


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


@torch.no_grad()
def prune(
    model: nn.Module, calibration: torch.Tensor, config: PruneConfig, *, progress: bool = True
) -> PruneReport:
    """Prune every Linear inside the decoder blocks of ``model`` in place.

    ``calibration``: (nsamples, seqlen) int64 token ids. Embeddings and the LM head stay dense.
    Returns a `PruneReport` with per-layer sparsity, reconstruction loss and time.
    """
    from tqdm.auto import tqdm

    if calibration.ndim != 2 or calibration.shape[0] < 1:
        raise ValueError(
            f"calibration must be (nsamples, seqlen) token ids, got shape {tuple(calibration.shape)}"
        )
    max_pos = _max_positions(model)
    if max_pos is not None and calibration.shape[1] > max_pos:
        raise ValueError(f"seqlen {calibration.shape[1]} exceeds the model's context of {max_pos} tokens")

    start = time.perf_counter()
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    solver = get_solver(config.method)
    nm = config.nm
    sparsity = float(config.sparsity or 0.0)
    need_stats = config.method != "magnitude" or config.layer_loss
    keep_hessian = config.method == "sparsegpt" or config.layer_loss
    solver_kwargs: dict[str, Any] = {"sparsity": sparsity, "pattern": nm}
    if config.method == "sparsegpt":
        solver_kwargs.update(block_size=config.block_size, damp=config.damp)

    blocks_name, blocks = find_blocks(model)
    report = PruneReport(config=config.to_dict(), device=str(device))
    model_config: Any = model.config
    hidden_size = int(getattr(model_config.get_text_config(), "hidden_size", 0) or 0)
    act_bytes = calibration.numel() * hidden_size * torch.finfo(next(model.parameters()).dtype).bits // 8
    store = _store_device(device, act_bytes)

    prev_cache = getattr(model_config, "use_cache", None)
    was_training = model.training
    model.eval()
    if hasattr(model_config, "use_cache"):
        model_config.use_cache = False
    try:
        move_non_block_modules(model, blocks, device)
        batches = list(calibration.split(config.batch_size))
        hidden, calls = capture_block_calls(model, blocks, batches, device, store)
        move_non_block_modules(model, blocks, torch.device("cpu"))

        bar = tqdm(
            range(len(blocks)),
            desc=f"{config.method} {config.pattern}",
            unit="block",
            disable=not progress,
            dynamic_ncols=True,
        )
        for i in bar:
            t_block = time.perf_counter()
            block = blocks[i]
            block.to(device)
            layers = find_linears(block, f"{blocks_name}.{i}", config.ignore)
            for name, layer in layers.items():
                _check_finite(name, get_weight(layer))

            dense_out: list[torch.Tensor] | None = None
            collector = InputCollector(layers, keep_hessian, device) if need_stats else None
            if collector is not None or config.propagate == "dense":
                dense_out = []
                with collector.hooks() if collector is not None else contextlib.nullcontext():
                    for b, h in enumerate(hidden):
                        if collector is not None:
                            collector.new_batch()
                        dense_out.append(_finite(run_block(block, h, calls[i][b], device), i).to(store))

            block_loss = 0.0
            for name, layer in layers.items():
                t_layer = time.perf_counter()
                stats = collector.stats.get(name) if collector is not None else None
                weight = get_weight(layer)
                try:
                    result = solver(weight, stats, **solver_kwargs)
                except SolverError as exc:
                    raise SolverError(f"layer {name}: {exc}") from exc
                set_weight(layer, result.weight)
                zeros = int((result.weight == 0).sum())
                report.pruned_params += weight.numel()
                report.zero_params += zeros
                loss = None if result.loss is None else float(result.loss)
                block_loss += loss or 0.0
                report.layers.append(
                    LayerReport(
                        name,
                        (weight.shape[0], weight.shape[1]),
                        zeros / weight.numel(),
                        loss,
                        time.perf_counter() - t_layer,
                    )
                )
            del collector

            output_error: float | None = None
            if config.propagate == "pruned":
                new_hidden = []
                num = den = 0.0
                for b, h in enumerate(hidden):
                    out = _finite(run_block(block, h, calls[i][b], device), i)
                    if dense_out is not None:
                        ref = dense_out[b].to(out.device)
                        num += float((ref.float() - out.float()).pow(2).sum())
                        den += float(ref.float().pow(2).sum())
                    new_hidden.append(out.to(store))
                output_error = num / den if den > 0 else None
                hidden = new_hidden
            else:
                assert dense_out is not None
                hidden = dense_out
            dense_out = None
            if device.type != "cpu":
                block.to("cpu")
            seconds = time.perf_counter() - t_block
            report.blocks.append(BlockReport(i, seconds, output_error))
            logger.info(
                "block %d/%d: %d layers, sparsity %.4f, loss %s, output error %s, %.1fs",
                i + 1,
                len(blocks),
                len(layers),
                sum(r.sparsity * r.shape[0] * r.shape[1] for r in report.layers[-len(layers) :])
                / max(1, sum(r.shape[0] * r.shape[1] for r in report.layers[-len(layers) :])),
                f"{block_loss:.4g}" if keep_hessian else "n/a",
                "n/a" if output_error is None else f"{output_error:.3g}",
                seconds,
            )
        bar.close()
    except torch.OutOfMemoryError as exc:
        raise RuntimeError(
            f"out of memory while pruning: lower --batch-size (now {config.batch_size}), --nsamples or --seqlen, "
            "or use --device cpu"
        ) from exc
    finally:
        move_non_block_modules(model, blocks, torch.device("cpu"))
        if prev_cache is not None:
            model_config.use_cache = prev_cache
        model.train(was_training)

    report.total_seconds = time.perf_counter() - start
    report.peak_memory_bytes, report.peak_memory_kind = _peak_memory(device)
    return report


def _finite(out: torch.Tensor, block: int) -> torch.Tensor:
    if not torch.isfinite(out).all():
        raise ValueError(
            f"block {block} produced NaN/Inf activations: the model overflows in this dtype "
            "(try --dtype float32) or its weights are corrupt"
        )
    return out


def _max_positions(model: nn.Module) -> int | None:
    cfg = model.config.get_text_config()  # type: ignore[operator,union-attr]
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
