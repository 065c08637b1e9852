"""Statistics of the dense model, block by block: loss curves (`scan_sensitivity`) and OWL outlier ratios.

Both walk the decoder blocks like `oneshot.prune` (the same capture of every block's call, the same plan of
targets, the same input hooks and solvers) but never change the model: every block is calibrated on the
DENSE outputs of the block before, so each matrix is measured in the dense model's context.

`scan_sensitivity` costs, per block: one forward with the input hooks (the Hessian of every input, once),
then per requested sparsity one solve per matrix reusing that Hessian (SparseGPT: its one factorisation;
Wanda / magnitude: the same statistics), and one forward of the block on the first ``error_windows``
calibration windows per sparsity for the block's output error. A SparseGPT run costs one forward with the
hooks, one solve per matrix and a second full forward (the pruned outputs); with three sparsities and the
default 8 error windows of 32, the scan stays within about 1.5x of it when solves are cheap next to the
forwards (small models, long calibration sets), as on SmolLM2.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from oneshot.config import PruneConfig
from oneshot.models import max_positions, resolve_device
from oneshot.moe import ExpertCollector
from oneshot.pruner import BlockPlan, PruneError, _check_finite, _finite, _store_device, plan_block
from oneshot.runfolder import SensitivityBlock, SensitivityLayer, SensitivityRecord
from oneshot.solvers import SolverError, get_solver
from oneshot.solvers.sparsegpt import ObsFactor, factorize
from oneshot.stats import InputStats
from oneshot.walker import (
    BlockCall,
    InputCollector,
    capture_block_calls,
    find_blocks,
    move_non_block_modules,
    run_block,
)

__all__ = ["BlockOutliers", "DenseBlock", "owl_statistics", "scan_sensitivity", "walk_dense"]

logger = logging.getLogger(__name__)


@dataclass
class DenseBlock:
    """One block reached by `walk_dense`: its plan, the statistics of every target's input, its (dense)
    inputs and outputs per calibration batch, and how it is called."""

    index: int
    block: nn.Module
    plan: BlockPlan
    stats: dict[str, InputStats]
    hidden: list[torch.Tensor]
    outputs: list[torch.Tensor]
    calls: list[BlockCall]
    device: torch.device


@contextlib.contextmanager
def walk_dense(
    model: nn.Module,
    calibration: torch.Tensor,
    config: PruneConfig,
    *,
    hessian: bool,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "statistics",
) -> Iterator[Iterator[DenseBlock]]:
    """A context giving an iterator over the blocks of the dense model, each with its statistics (Hessians
    when ``hessian``); the model is left as it was (the caller must restore any weight it changes)."""
    if calibration.ndim != 2 or calibration.shape[0] < 1:
        raise PruneError(
            f"calibration must be (nsamples, seqlen) token ids, got shape {tuple(calibration.shape)}"
        )
    max_pos = max_positions(model.config)
    if max_pos is not None and calibration.shape[1] > max_pos:
        raise PruneError(f"seqlen {calibration.shape[1]} exceeds the model's context of {max_pos} tokens")
    dev = resolve_device(device)
    blocks_name, blocks = find_blocks(model)
    model_config: Any = model.config
    hidden_size = int(getattr(model_config.get_text_config(), "hidden_size", 0) or 0)
    act_bytes = calibration.numel() * hidden_size * torch.finfo(next(model.parameters()).dtype).bits // 8
    store = _store_device(dev, act_bytes)
    prev_cache = getattr(model_config, "use_cache", None)
    was_training = model.training
    model.eval()
    if hasattr(model_config, "use_cache"):
        model_config.use_cache = False

    def gen() -> Iterator[DenseBlock]:
        from tqdm.auto import tqdm

        move_non_block_modules(model, blocks, dev)
        batches = list(calibration.split(batch_size))
        hidden, calls = capture_block_calls(model, blocks, batches, dev, store, progress=progress)
        move_non_block_modules(model, blocks, torch.device("cpu"))
        for i in tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress, dynamic_ncols=True):
            block = blocks[i]
            block.to(dev)
            plan = plan_block(block, f"{blocks_name}.{i}", config.ignore)
            for target in plan.targets:
                _check_finite(target.name, target.weight)
            collector = InputCollector(plan.linears, hessian, dev, sink_weight=config.sink_weight or 0.0)
            experts = (
                ExpertCollector(plan.experts, {t.name for t in plan.targets}, hessian, dev)
                if plan.experts
                else None
            )
            outputs = []
            with contextlib.ExitStack() as hooks:
                hooks.enter_context(collector.hooks())
                if experts is not None:
                    hooks.enter_context(experts.hooks())
                for b, h in enumerate(hidden):
                    collector.new_batch()
                    outputs.append(_finite(run_block(block, h, calls[i][b], dev), i).to(store))
            stats = {**collector.stats, **(experts.stats if experts is not None else {})}
            yield DenseBlock(i, block, plan, stats, hidden, outputs, calls[i], dev)
            if dev.type != "cpu":
                block.to("cpu")
            hidden = outputs

    try:
        yield gen()
    except torch.OutOfMemoryError as exc:
        raise PruneError(
            f"out of memory while measuring: lower --batch-size (now {batch_size}), --nsamples or --seqlen, "
            "or use --device cpu"
        ) from exc
    finally:
        move_non_block_modules(model, blocks, torch.device("cpu"))
        for block in blocks:
            block.to("cpu")
        if prev_cache is not None:
            model_config.use_cache = prev_cache
        model.train(was_training)


@dataclass
class BlockOutliers:
    """OWL's statistics of one block: the matrices, their weights and the pooled outlier ratio."""

    index: int
    names: list[str] = field(default_factory=list)
    layer_params: list[int] = field(default_factory=list)
    params: int = 0
    outlier_ratio: float = 0.0  # fraction of Wanda scores above M x the block's mean score


@torch.no_grad()
def owl_statistics(
    model: nn.Module,
    calibration: torch.Tensor,
    config: PruneConfig,
    *,
    m: float = 5.0,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    progress: bool = True,
) -> list[BlockOutliers]:
    """Per block, OWL's outlier ratio: the fraction of the Wanda scores ``|W_ij| * ||X_j||`` of all its
    matrices (pooled) above ``m`` times their mean, on the dense model (no Hessians: one forward per block).
    Matrices without calibration tokens count with their weights but not in the ratio."""
    out: list[BlockOutliers] = []
    with walk_dense(
        model,
        calibration,
        config,
        hessian=False,
        device=device,
        batch_size=batch_size,
        progress=progress,
        desc="owl statistics",
    ) as walk:
        for blk in walk:
            rec = BlockOutliers(blk.index)
            scores: list[torch.Tensor] = []
            for target in blk.plan.targets:
                rec.names.append(target.name)
                rec.layer_params.append(target.weight.numel())
                st = blk.stats.get(target.name)
                if st is None or st.n == 0:
                    continue
                norms = st.sq_norms.sqrt().to(target.weight.device)  # (cols,)
                scores.append(
                    (target.weight.float().abs() * norms[None, :].float()).flatten()
                )  # (rows*cols,)
            rec.params = sum(rec.layer_params)
            if scores:
                pooled = torch.cat(scores)
                rec.outlier_ratio = float((pooled > m * pooled.mean()).float().mean())
            out.append(rec)
    return out


@torch.no_grad()
def scan_sensitivity(
    model: nn.Module,
    calibration: torch.Tensor,
    config: PruneConfig,
    sparsities: Sequence[float],
    *,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    error_windows: int = 8,
    progress: bool = True,
) -> SensitivityRecord:
    """Reconstruction loss of every prunable matrix at each of ``sparsities`` (the pruning of ``config``:
    method, pattern, damping), and every block's output error with all its matrices at each sparsity.

    The Hessian of every input is accumulated once per block and reused for every sparsity; the blocks are
    calibrated on the dense outputs. ``model`` is unchanged afterwards. With an N:M pattern the one
    sparsity is N/M. Returns a `SensitivityRecord` (config, sparsities, layers, blocks, seconds, device).
    """
    levels = [float(s) for s in sparsities]
    if not levels or any(not 0.0 < s < 1.0 for s in levels) or len(set(levels)) != len(levels):
        raise PruneError(f"sparsities must be distinct fractions in (0, 1), got {list(sparsities)}")
    nm = config.nm
    if nm is not None and levels != [nm[0] / nm[1]]:
        raise PruneError(f"with pattern {config.pattern} the only sparsity measured is {nm[0] / nm[1]:g}")
    levels.sort()
    if isinstance(error_windows, bool) or not isinstance(error_windows, int) or error_windows < 0:
        raise PruneError(f"error_windows must be an integer >= 0, got {error_windows!r}")
    start = time.perf_counter()
    solver = get_solver(config.method)
    kwargs: dict[str, Any] = {"pattern": nm}
    if config.method == "sparsegpt":
        kwargs.update(block_size=config.block_size, damp=config.damp)
    record = SensitivityRecord(config=config, sparsities=levels, device=str(resolve_device(device)))
    error_batches = -(-min(error_windows, calibration.shape[0]) // batch_size) if error_windows else 0
    record.error_windows = min(error_windows, calibration.shape[0])
    with walk_dense(
        model,
        calibration,
        config,
        hessian=True,
        device=device,
        batch_size=batch_size,
        progress=progress,
        desc=f"sensitivity {config.method} {config.pattern}",
    ) as walk:
        for blk in walk:
            t_block = time.perf_counter()
            # SparseGPT: one factorisation per distinct input (q/k/v share theirs) for every matrix and sparsity
            factors: dict[int, ObsFactor] = {}
            originals = {t.name: t.weight.clone() for t in blk.plan.targets}
            layers = {
                t.name: SensitivityLayer(t.name, blk.index, (t.weight.shape[0], t.weight.shape[1]))
                for t in blk.plan.targets
            }
            errors: list[float | None] = []
            try:
                for s in levels:
                    for target in blk.plan.targets:
                        st = blk.stats.get(target.name)
                        if st is None or st.n == 0:
                            layers[target.name].losses.append(None)
                            continue
                        try:
                            source: InputStats | ObsFactor = st
                            if config.method == "sparsegpt":
                                if id(st) not in factors:
                                    h = st.hessian
                                    assert h is not None
                                    weight = originals[target.name]
                                    dtype = (
                                        torch.float64
                                        if torch.float64 in (weight.dtype, h.dtype)
                                        else torch.float32
                                    )
                                    factors[id(st)] = factorize(
                                        h, damp=config.damp, dtype=dtype, device=weight.device
                                    )
                                    del h
                                source = factors[id(st)]
                            result = solver(originals[target.name], source, sparsity=s, **kwargs)
                        except SolverError as exc:
                            raise SolverError(f"layer {target.name}: {exc}") from exc
                        layers[target.name].losses.append(None if result.loss is None else float(result.loss))
                        target.write(result.weight)
                    errors.append(_output_error(blk, error_batches))
                    for target in blk.plan.targets:
                        target.write(originals[target.name])
            finally:
                for target in blk.plan.targets:
                    target.write(originals[target.name])
            record.layers.extend(layers.values())
            record.blocks.append(SensitivityBlock(blk.index, errors, time.perf_counter() - t_block))
            logger.info(
                "block %d: %d matrices, output error %s",
                blk.index,
                len(layers),
                ", ".join("n/a" if e is None else f"{e:.3g}" for e in errors),
            )
    record.total_seconds = time.perf_counter() - start
    return record


def _output_error(blk: DenseBlock, batches: int) -> float | None:
    """||Y_dense - Y||^2 / ||Y_dense||^2 of the block as it is now, on its first ``batches`` batches."""
    num = den = 0.0
    for b in range(min(batches, len(blk.hidden))):
        out = _finite(run_block(blk.block, blk.hidden[b], blk.calls[b], blk.device), blk.index).float()
        ref = blk.outputs[b].to(out.device).float()
        num += float((ref - out).pow(2).sum())
        den += float(ref.pow(2).sum())
    return num / den if den > 0 else None
