"""`prune(model, calibration, config) -> PruneReport`: one-shot pruning of an in-memory causal LM.

One calibration pass per block: the block runs on the calibration activations with input hooks, every
Linear in it and every expert matrix of its fused MoE experts modules (`oneshot.moe`, statistics from the
tokens routed to each expert) is pruned by the chosen solver, and (``propagate="pruned"``) the block runs
again so the next block calibrates on what the pruned model really produces. Only the current block sits
on the compute device; calibration activations stay there when they fit and on the CPU otherwise.

Weights that receive no calibration tokens (an expert no token was routed to, a Linear that never runs)
follow ``config.uncalibrated``. Routers stay dense. The report measures the achieved sparsity over every
weight matrix of the blocks and names each matrix left dense with the reason.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import resource
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from oneshot import distributed
from oneshot.config import PruneConfig, QuantConfig
from oneshot.errors import OneshotError
from oneshot.models import max_positions, resolve_device
from oneshot.moe import (
    ExpertCollector,
    expert_matrix,
    expert_matrix_name,
    expert_param_names,
    find_experts,
    find_routers,
    is_supported_experts,
    num_experts,
    set_expert_matrix,
)
from oneshot.resume import BlockCheckpoint
from oneshot.runfolder import (
    BlockReport,
    DenseMatrix,
    LayerReport,
    PruneReport,
    QuantizationRecord,
    QuantLayer,
)
from oneshot.solvers import (
    PruneResult,
    QuantizedWeight,
    QuantScheme,
    SolverError,
    get_solver,
    prune_magnitude,
    quantize_gptq,
)
from oneshot.solvers.quant import check_group_size, packed_bits, quantize_rtn, scheme_of
from oneshot.solvers.sparsegpt import ObsFactor, factorize
from oneshot.solvers.target import dense_target_map, retarget
from oneshot.stats import InputStats
from oneshot.streaming import StreamedModel
from oneshot.walker import (
    InputCollector,
    capture_block_calls,
    find_blocks,
    find_linears,
    get_weight,
    matches_ignore,
    move_non_block_modules,
    record_inputs,
    run_block,
    set_weight,
)

__all__ = [
    "DENSE_ALLOCATION",
    "DENSE_IGNORED",
    "DENSE_OTHER",
    "DENSE_ROUTER",
    "DENSE_UNCALIBRATED",
    "DENSE_UNSUPPORTED_EXPERTS",
    "BlockPlan",
    "BlockReport",
    "LayerReport",
    "PruneError",
    "PruneReport",
    "QuantizedModel",
    "Target",
    "dense_summary",
    "device_reserve",
    "peak_memory",
    "plan_block",
    "prune",
    "prune_and_quantize",
    "quantize",
]

logger = logging.getLogger(__name__)


class PruneError(OneshotError, ValueError):
    """The model cannot be pruned as asked (NaN activations, too long windows, out of memory)."""


# Reasons recorded in PruneReport.dense_matrices for weight matrices of the blocks left dense.
DENSE_ROUTER = "router (kept dense)"
DENSE_IGNORED = "--ignore"
DENSE_UNCALIBRATED = "no calibration tokens (--uncalibrated dense)"
DENSE_UNSUPPORTED_EXPERTS = "experts module without use_experts_implementation layout flags (not supported)"
DENSE_OTHER = "not a Linear or fused experts weight (not supported)"
DENSE_ALLOCATION = "kept dense by the allocation (--allocation with an N:M pattern)"


@dataclass
class Target:
    """One weight matrix to prune: a Linear's weight or one expert's slice of a fused experts tensor."""

    name: str
    weight: torch.Tensor  # (out_features, in_features) view of the parameter
    write: Callable[[torch.Tensor], None]  # writes an (out_features, in_features) weight back in place


@dataclass
class BlockPlan:
    """What to do with every weight matrix of one block."""

    targets: list[Target] = field(default_factory=list)
    linears: dict[str, nn.Module] = field(default_factory=dict)  # Linears to prune (statistics hooks)
    experts: dict[str, nn.Module] = field(default_factory=dict)  # experts modules with matrices to prune
    dense: list[DenseMatrix] = field(default_factory=list)  # matrices kept dense before calibration
    accounted: set[int] = field(default_factory=set)  # ids of the parameters covered by the two above


@dataclass
class QuantizedModel:
    """What `quantize` / `prune_and_quantize` did: the record section (scheme, per-matrix loss, sizes) and the
    grid of every quantized matrix (codes, scales, zero-points, g_idx; on the CPU). The model's weights are
    the dequantized ones."""

    record: QuantizationRecord
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)


def _dense(name: str, params: int, reason: str) -> DenseMatrix:
    return DenseMatrix(name, int(params), reason)


def plan_block(block: nn.Module, prefix: str, ignore: tuple[str, ...]) -> BlockPlan:
    """Targets to prune and matrices to keep dense: routers, ``--ignore`` matches, unsupported experts.

    ``--ignore`` patterns match Linear names, experts tensor names (``...mlp.experts.down_proj``) and
    single expert matrices (``...mlp.experts.down_proj[3]``; in fnmatch, ``[[]`` stands for ``[``).
    """
    plan = BlockPlan()
    for name, w in find_routers(block, prefix).items():
        plan.dense.append(_dense(name, w.numel(), DENSE_ROUTER))
        plan.accounted.add(id(w))
    for name, layer in find_linears(block, prefix).items():
        w = get_weight(layer)  # (out_features, in_features)
        weight_id = id(layer.weight)
        if weight_id in plan.accounted:  # a router that is an nn.Linear
            continue
        plan.accounted.add(weight_id)
        if matches_ignore(name, ignore):
            plan.dense.append(_dense(name, w.numel(), DENSE_IGNORED))
            continue
        plan.linears[name] = layer
        plan.targets.append(Target(name, w, functools.partial(set_weight, layer)))
    for mod_name, experts in find_experts(block, prefix).items():
        supported = is_supported_experts(experts)
        names = expert_param_names(experts) if supported else ("gate_up_proj", "up_proj", "down_proj")
        for param in names:
            tensor = experts._parameters.get(param)
            if tensor is None:
                continue
            plan.accounted.add(id(tensor))
            full = f"{mod_name}.{param}"
            if not supported or matches_ignore(full, ignore):
                reason = DENSE_IGNORED if supported else DENSE_UNSUPPORTED_EXPERTS
                plan.dense.append(_dense(full, tensor.numel(), reason))
                continue
            for e in range(num_experts(experts)):
                name = expert_matrix_name(mod_name, param, e)
                if matches_ignore(name, ignore):
                    plan.dense.append(_dense(name, tensor[e].numel(), DENSE_IGNORED))
                    continue
                write = functools.partial(set_expert_matrix, experts, param, e)
                plan.targets.append(Target(name, expert_matrix(experts, param, e), write))
                plan.experts[mod_name] = experts
    return plan


def _census(block: nn.Module, prefix: str, accounted: set[int]) -> tuple[int, int, list[DenseMatrix]]:
    """(parameters, zeros) over every weight matrix of a block, and dense entries for the matrices that no
    plan covers. Weight matrices: every >= 2-D parameter except stacked per-expert biases (``*_bias``)."""
    params = zeros = 0
    others: list[DenseMatrix] = []
    for rel, p in block.named_parameters():
        if p.dim() < 2 or rel.rsplit(".", 1)[-1].endswith("bias"):
            continue
        params += p.numel()
        zeros += int((p == 0).sum())
        if id(p) not in accounted:
            others.append(_dense(f"{prefix}.{rel}", p.numel(), DENSE_OTHER))
    return params, zeros, others


class _SharedFactors:
    """One `factorize` per distinct input statistics of a block (q/k/v read one input, gate/up one),
    dropped after the last layer that reads it. With ``release`` the statistics give their Hessian up to
    the factorisation (`InputStats.take_hessian`), so it is freed once factorised."""

    def __init__(self, stats: list[InputStats], *, damp: float, act_order: bool, release: bool) -> None:
        self.damp, self.act_order, self.release = damp, act_order, release
        self.left: dict[int, int] = {}
        for st in stats:
            self.left[id(st)] = self.left.get(id(st), 0) + 1
        self.cache: dict[int, ObsFactor] = {}

    def get(self, stats: InputStats, weight: torch.Tensor) -> ObsFactor:
        factor = self.cache.get(id(stats))
        if factor is None:
            hessian = stats.take_hessian() if self.release else stats.hessian
            assert hessian is not None
            dtype = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
            factor = factorize(
                hessian, damp=self.damp, act_order=self.act_order, dtype=dtype, device=weight.device
            )
            del hessian
            self.cache[id(stats)] = factor
        return factor

    def done(self, stats: InputStats) -> None:
        self.left[id(stats)] = self.left.get(id(stats), 1) - 1
        if self.left[id(stats)] <= 0:
            self.cache.pop(id(stats), None)


class _DenseTargetMaps:
    """``--target dense``: one `dense_target_map` per distinct input statistics of a block (q/k/v share one),
    computed before the OBS factorisation takes the Hessian and dropped after the last layer reading it."""

    def __init__(self, stats: list[InputStats], *, damp: float) -> None:
        self.damp = damp
        self.left: dict[int, int] = {}
        for st in stats:
            self.left[id(st)] = self.left.get(id(st), 0) + 1
        self.cache: dict[int, torch.Tensor] = {}

    def weight(self, stats: InputStats, weight: torch.Tensor) -> torch.Tensor:
        """``W*``: the weight whose local solve reproduces the dense model's output (`retarget`)."""
        tmap = self.cache.get(id(stats))
        if tmap is None:
            hessian = stats.hessian
            assert hessian is not None
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            tmap = dense_target_map(hessian.to(dtype), stats.take_cross().to(dtype), damp=self.damp)
            del hessian
            self.cache[id(stats)] = tmap
        self.left[id(stats)] = self.left.get(id(stats), 1) - 1
        out = retarget(weight, tmap)
        if self.left[id(stats)] <= 0:
            self.cache.pop(id(stats), None)
        return out


@dataclass
class _Solved:
    """One matrix's outcome: the new weight (None when kept dense), its pruned zeros, losses and the grid of
    a quantized run; what `oneshot.distributed.exchange` sends from the rank that solved it to the others."""

    weight: torch.Tensor | None
    zeros: int
    loss: float | None
    qloss: float | None
    grid: QuantizedWeight | None
    uncalibrated: bool = False
    dense: bool = False  # uncalibrated and kept dense (--uncalibrated dense)
    seconds: float = 0.0


class _StageDone(Exception):
    """Raised by a hook once every layer of the current stage has seen its input: the rest of the block
    forward is not needed for that stage's statistics."""


def _stop_hook(pending: set[str], name: str) -> Callable[..., None]:
    """A pre-hook that marks ``name`` as reached and stops the forward once ``pending`` is empty."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        pending.discard(name)
        if not pending:
            raise _StageDone

    return hook


def _block_statistics(
    block: nn.Module,
    plan: BlockPlan,
    hidden: list[torch.Tensor],
    calls: list[Any],
    reference: list[torch.Tensor] | None,
    *,
    device: torch.device,
    store: torch.device,
    index: int,
    stats: bool,
    hessian: bool,
    outputs: list[torch.Tensor],
    sink_weight: float = 0.0,
) -> Iterator[tuple[list[Target], dict[str, InputStats]]]:
    """The statistics of a block's targets, as (targets, statistics by name) stages to prune in turn.

    Local target (``reference`` None): one stage, every target, from one forward per batch of the dense block
    on ``hidden``; its outputs go to ``outputs``.

    Dense target: first the dense block runs on the dense model's inputs ``reference``, keeping every layer's
    input and the block outputs (``outputs``). Then the layers are pruned stage by stage in the order the
    forward reaches them, layers reading one tensor together (q/k/v, then o, then gate/up, then down): each
    stage's statistics come from a forward of the block as pruned so far, stopped once the stage's layers
    have their inputs, so a layer is solved on the inputs the pruned layers before it really produce (a
    later layer would otherwise correct again what an earlier one of its block already corrected).

    ``sink_weight``: the attention-input layers' first-token weight (`InputStats.first_token_weight`), local
    target only.
    """
    if reference is None:
        collector = InputCollector(plan.linears, hessian, device, sink_weight=sink_weight) if stats else None
        expert_collector = (
            ExpertCollector(plan.experts, {t.name for t in plan.targets}, hessian, device)
            if stats and plan.experts
            else None
        )
        for b, h in enumerate(hidden):
            with contextlib.ExitStack() as hooks:
                if collector is not None:
                    hooks.enter_context(collector.hooks())
                    collector.new_batch()
                if expert_collector is not None:
                    hooks.enter_context(expert_collector.hooks())
                outputs.append(_finite(run_block(block, h, calls[b], device), index).to(store))
        yield (
            plan.targets,
            {
                **(collector.stats if collector is not None else {}),
                **(expert_collector.stats if expert_collector is not None else {}),
            },
        )
        return

    # the dense model: every layer's input per batch (a tensor read by several layers is kept once)
    ref_inputs: list[dict[str, torch.Tensor]] = []
    order: list[list[str]] = []  # stages: names in the order the forward reaches them, grouped by input
    for b, r in enumerate(reference):
        try:
            with record_inputs(plan.linears) as seen:
                outputs.append(_finite(run_block(block, r, calls[b], device), index).to(store))
        except ValueError as exc:
            raise PruneError(f"--target dense cannot pair the inputs of block {index}: {exc}") from None
        moved: dict[int, torch.Tensor] = {}
        for t in seen.values():
            if id(t) not in moved:
                moved[id(t)] = t.to(store)
        ref_inputs.append({n: moved[id(t)] for n, t in seen.items()})
        del moved
        if b == 0:
            last: torch.Tensor | None = None
            for name, t in seen.items():
                if last is not None and t is last:
                    order[-1].append(name)
                else:
                    order.append([name])
                last = t
        del seen
    by_name = {t.name: t for t in plan.targets}
    for names in order:
        layers = {n: plan.linears[n] for n in names}
        collector = InputCollector(layers, hessian, device, cross=True)
        pending: set[str] = set()
        for b, h in enumerate(hidden):
            pending.update(names)
            with collector.hooks():
                handles = [mod.register_forward_pre_hook(_stop_hook(pending, n)) for n, mod in layers.items()]
                try:
                    collector.new_batch(reference={n: ref_inputs[b][n] for n in names})
                    run_block(block, h, calls[b], device)
                except _StageDone:
                    pass
                finally:
                    for handle in handles:
                        handle.remove()
        for kept in ref_inputs:  # this stage's dense inputs are spent
            for n in names:
                kept.pop(n, None)
        yield [by_name[n] for n in names if n in by_name], collector.stats
        del collector
    # layers the dense forward never reached have no statistics (reported as uncalibrated)
    reached = {n for names in order for n in names}
    rest = [t for t in plan.targets if t.name not in reached]
    if rest:
        yield rest, {}


def _store_device(
    device: torch.device, nbytes: int, *, reserved: int = 0, free: int | None = None
) -> torch.device:
    """Keep calibration activations on the compute device when three copies fit in half of its free memory
    less ``reserved`` (what a block needs besides them: `device_reserve`). ``free``: measured when None."""
    if device.type != "cuda":
        return device
    if free is None:
        free, _ = torch.cuda.mem_get_info(device)
    return device if 3 * nbytes < max(0, free - reserved) // 2 else torch.device("cpu")


def device_reserve(
    model: nn.Module, calibration: torch.Tensor, config: PruneConfig, *, hessians: bool
) -> int:
    """Bytes the compute device holds besides the calibration activations while a block is pruned.

    * The Hessians (``hessians``): a float32 (cols, cols) sum per pruned matrix of the largest block (an
      upper bound: layers reading the same input share one), plus one factorisation of the widest.
    * The attention masks of eager attention, kept on the device with every block's captured call: a
      (batch, 1, seqlen, seqlen) mask per batch and per kind of layer (full / sliding window); SDPA and
      flash attention pass no such tensor for causal windows.
    """
    _, blocks = find_blocks(model)
    total = 0
    if hessians:
        widest = 0
        per_block = 0
        for block in blocks:
            plan = plan_block(block, "block", config.ignore)
            cols = [int(t.weight.shape[1]) for t in plan.targets]
            per_block = max(per_block, sum(c * c for c in cols))
            widest = max([widest, *cols])
        total += 4 * (per_block + widest * widest)
    model_config: Any = model.config
    text_config = model_config.get_text_config()
    if getattr(model_config, "_attn_implementation", None) == "eager":
        kinds = len(set(getattr(text_config, "layer_types", None) or ["full_attention"]))
        nsamples, seqlen = calibration.shape
        elsize = torch.finfo(next(model.parameters()).dtype).bits // 8
        total += kinds * nsamples * seqlen * seqlen * elsize
    return total


def _check_finite(name: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise PruneError(
            f"layer {name} has NaN/Inf weights before pruning: the model is corrupt or overflowed "
            "in this dtype (try --dtype float32)"
        )


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


def prune(
    model: nn.Module,
    calibration: torch.Tensor,
    config: PruneConfig,
    *,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    progress: bool = True,
    layer_sparsity: Mapping[str, float] | None = None,
    checkpoint: BlockCheckpoint | None = None,
    stream: StreamedModel | None = None,
) -> PruneReport:
    """Prune every Linear and every expert matrix inside the decoder blocks of ``model`` in place.

    ``calibration``: (nsamples, seqlen) int64 token ids. ``device``: where each block runs ("auto": CUDA
    when available); ``batch_size``: calibration windows per block forward. Embeddings, the LM head and MoE
    routers stay dense.
    ``layer_sparsity``: the sparsity of single matrices by name (`oneshot.allocation`), the others at
    ``config.sparsity``; with an N:M pattern a matrix is N:M or, at 0, kept dense (`DENSE_ALLOCATION`).
    ``checkpoint``: after every block, persist what the next one needs (`oneshot.resume`); when it holds
    a state, continue from it (the result is bit for bit that of an uninterrupted run).
    ``stream``: ``model`` is its skeleton (`oneshot.streaming`): each block is read from disk before it is
    pruned and written to the output (`StreamedModel.start_output`) and freed after.
    Returns a `PruneReport` with per-matrix sparsity, reconstruction loss and time, the sparsity over all
    weight matrices of the blocks and the list of matrices left dense with the reason.
    """
    report, _ = _walk(
        model,
        calibration,
        config,
        None,
        device=device,
        batch_size=batch_size,
        progress=progress,
        layer_sparsity=layer_sparsity,
        checkpoint=checkpoint,
        stream=stream,
    )
    return report


def prune_and_quantize(
    model: nn.Module,
    calibration: torch.Tensor,
    config: PruneConfig,
    quant: QuantConfig,
    *,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    progress: bool = True,
    layer_sparsity: Mapping[str, float] | None = None,
    checkpoint: BlockCheckpoint | None = None,
    stream: StreamedModel | None = None,
) -> tuple[PruneReport, QuantizedModel]:
    """`prune`, every pruned matrix also quantized in the same block pass: SparseGPT prunes and rounds in one
    OBS solve (`prune_sparsegpt(quant=...)`); magnitude and Wanda prune, then GPTQ quantizes with the zeros
    as a fixed mask. Pruned weights stay exactly 0; the next block calibrates on the quantized block's
    outputs (``config.propagate == "pruned"``). Matrices kept dense (``--ignore``, routers) are not quantized.

    The report's zeros are those of the pruning; ``QuantizedModel.record`` counts the weights rounded to 0.
    """
    quant.check_against(config)
    report, q = _walk(
        model,
        calibration,
        config,
        quant,
        device=device,
        batch_size=batch_size,
        progress=progress,
        layer_sparsity=layer_sparsity,
        checkpoint=checkpoint,
        stream=stream,
    )
    assert q is not None
    return report, q


def quantize(
    model: nn.Module,
    calibration: torch.Tensor,
    quant: QuantConfig,
    *,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    progress: bool = True,
    stream: StreamedModel | None = None,
) -> QuantizedModel:
    """Quantize every Linear and expert matrix of the decoder blocks with GPTQ, through the same block walk
    as `prune` (the next block calibrates on the quantized block's outputs). Weights that are exactly 0 (a
    pruned model's) are a fixed mask: they stay 0. Matrices without calibration tokens get round-to-nearest."""
    config = PruneConfig(method="sparsegpt", sparsity=0.0, damp=quant.damp, block_size=quant.block_size)
    _, q = _walk(
        model,
        calibration,
        config,
        quant,
        quant_only=True,
        device=device,
        batch_size=batch_size,
        progress=progress,
        stream=stream,
    )
    assert q is not None
    return q


def _exact_loss(weight: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor | None) -> float | None:
    """``trace(dW H dW^T) = ||(W - W') X^T||^2 / n`` in float32 (float64 for float64 weights)."""
    if hessian is None:
        return None
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    d = (weight.to(dtype) - new.to(dtype)).to(hessian.device)  # (rows, cols)
    return float(((d @ hessian.to(dtype)) * d).sum())


def _quant_solve(
    weight: torch.Tensor,
    stats: Any,
    config: PruneConfig,
    quant: QuantConfig,
    scheme: QuantScheme,
    *,
    quant_only: bool,
    solver: Callable[..., PruneResult],
    solver_kwargs: dict[str, Any],
    factor: ObsFactor | None = None,
) -> tuple[PruneResult, int, float | None]:
    """One calibrated matrix pruned and quantized (or quantized only): the result (weight = dequantized, mask
    = the pruned weights), the zeros of the pruning and the loss of the whole step against ``weight``.
    ``factor``: the shared factorisation of ``stats``' Hessian for the OBS solve (None: factorised here)."""
    obs = stats if factor is None else factor
    if quant_only:
        zeros = weight == 0  # a pruned model's zeros stay zeros
        result = quantize_gptq(weight, obs, scheme, block_size=quant.block_size, damp=quant.damp, mask=zeros)
        return result, int(zeros.sum()), result.loss
    if config.method == "sparsegpt":
        result = solver(weight, obs, **solver_kwargs, quant=scheme)
        return result, int(result.mask.sum()), result.loss
    pruned = solver(weight, stats, **solver_kwargs)
    zeros = pruned.weight == 0
    q = quantize_gptq(pruned.weight, obs, scheme, block_size=quant.block_size, damp=quant.damp, mask=zeros)
    result = PruneResult(weight=q.weight, mask=pruned.mask, loss=pruned.loss, quant=q.quant)
    return result, int(zeros.sum()), _exact_loss(weight, q.weight, stats.hessian)


@torch.no_grad()
def _walk(
    model: nn.Module,
    calibration: torch.Tensor,
    config: PruneConfig,
    quant: QuantConfig | None,
    *,
    quant_only: bool = False,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    progress: bool = True,
    layer_sparsity: Mapping[str, float] | None = None,
    checkpoint: BlockCheckpoint | None = None,
    stream: StreamedModel | None = None,
) -> tuple[PruneReport, QuantizedModel | None]:
    """The block walk of `prune`, `prune_and_quantize` and `quantize`."""
    from tqdm.auto import tqdm

    if calibration.ndim != 2 or calibration.shape[0] < 1:
        raise PruneError(
            f"calibration must be (nsamples, seqlen) token ids, got shape {tuple(calibration.shape)}"
        )
    max_pos = max_positions(model.config)
    if max_pos is not None and calibration.shape[1] > max_pos:
        raise PruneError(f"seqlen {calibration.shape[1]} exceeds the model's context of {max_pos} tokens")

    start = time.perf_counter()
    device = distributed.local_device(resolve_device(device))
    world = distributed.world_size()
    if world > 1:  # every rank walks its share of the windows; the statistics are summed over the ranks
        if checkpoint is not None:
            raise distributed.DistributedError("a run of several processes cannot be checkpointed or resumed")
        calibration = distributed.shard(calibration)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PruneError(f"batch_size must be a positive integer, got {batch_size!r}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    solver = get_solver(config.method)
    nm = config.nm
    sparsity = float(config.sparsity or 0.0)
    # --target dense: the dense model runs beside the pruned one (`reference`: its inputs of each block)
    dense_target = config.target == "dense" and not quant_only
    if dense_target and quant is not None and quant.sink_weight:
        # the staged cross-statistics of --target dense weight every token once; the record says so
        logger.info("the sink weight does not apply with --target dense: every token counts once")
        quant = quant.replace(sink_weight=0.0)
    need_stats = config.method != "magnitude" or config.layer_loss or quant is not None
    keep_hessian = config.method == "sparsegpt" or config.layer_loss or quant is not None or dense_target
    solver_kwargs: dict[str, Any] = {"sparsity": sparsity, "pattern": nm}
    if config.method == "sparsegpt":
        solver_kwargs.update(block_size=config.block_size, damp=config.damp)
    scheme = scheme_of(quant) if quant is not None else None
    # The OBS solve (SparseGPT, GPTQ) factorises each distinct input's Hessian once for all the layers
    # reading it; the statistics give their Hessian up when nothing else reads it (exact losses do).
    obs_solve: dict[str, Any] | None = None
    if quant_only or (config.method != "sparsegpt" and quant is not None):
        assert quant is not None and scheme is not None
        obs_solve = {"damp": quant.damp, "act_order": scheme.act_order, "release": quant_only}
    elif config.method == "sparsegpt":
        obs_solve = {"damp": config.damp, "act_order": False, "release": True}
    qrec: QuantizationRecord | None = None
    qweights: dict[str, QuantizedWeight] = {}
    if quant is not None and scheme is not None:
        qrec = QuantizationRecord(
            config=quant,
            solver="gptq" if quant_only or config.method != "sparsegpt" else "sparsegpt",
            bits=scheme.bits,
            group_size=scheme.group_size,
            symmetric=scheme.symmetric,
            act_order=scheme.act_order,
            scale_dtype=scheme.scale_dtype,
        )
    qbits = 0
    what = f"gptq {quant.label}" if quant_only and quant is not None else f"{config.method} {config.pattern}"

    blocks_name, blocks = find_blocks(model)
    if world > 1 and any(find_experts(blk, "b") for blk in blocks):
        raise distributed.DistributedError(
            "mixture-of-experts blocks are not supported with several processes (the ranks route their tokens "
            "to different experts); run one process"
        )
    if dense_target:
        moe = [j for j, blk in enumerate(blocks) if find_routers(blk, "b") or find_experts(blk, "b")]
        if moe:
            raise PruneError(
                f"--target dense does not support mixture-of-experts blocks ({len(moe)} here, from block "
                f"{moe[0]}): the dense and the pruned model route tokens to different experts, so their inputs "
                "cannot be paired; use --target local"
            )
    report = PruneReport(device=str(device))
    model_config: Any = model.config
    hidden_size = int(getattr(model_config.get_text_config(), "hidden_size", 0) or 0)
    act_bytes = calibration.numel() * hidden_size * torch.finfo(next(model.parameters()).dtype).bits // 8
    reserved = (
        device_reserve(model, calibration, config, hessians=keep_hessian) if device.type == "cuda" else 0
    )
    # --target dense also holds the dense stream, its outputs and one block's dense layer inputs (about 3x
    # the activations of the local walk, whose budget counts 3 copies)
    store = _store_device(device, act_bytes * (3 if dense_target else 1), reserved=reserved)

    prev_cache = getattr(model_config, "use_cache", None)
    was_training = model.training
    model.eval()
    if hasattr(model_config, "use_cache"):
        model_config.use_cache = False
    try:
        move_non_block_modules(model, blocks, device)
        batches = list(calibration.split(batch_size))
        logger.info(
            "capturing the inputs of the %d blocks: %d calibration batches of %d x %d tokens",
            len(blocks),
            len(batches),
            batches[0].shape[0],
            calibration.shape[1],
        )
        hidden, calls = capture_block_calls(model, blocks, batches, device, store, progress=progress)
        move_non_block_modules(model, blocks, torch.device("cpu"))
        reference: list[torch.Tensor] | None = list(hidden) if dense_target else None
        first = 0
        resumed = None if checkpoint is None else checkpoint.load(len(blocks), scheme)
        if checkpoint is not None and resumed is not None:  # blocks 0 .. first-1 are done: restore them
            first = resumed.next_block
            for j in range(first):
                if stream is not None:  # materialise, restore, write to the output, free
                    stream.load_block(j)
                checkpoint.restore_block(j, blocks[j])
                if stream is not None:
                    stream.store_block(j)
            hidden = [h.to(store) for h in resumed.hidden]
            if dense_target:
                if resumed.reference is None:
                    raise PruneError("cannot resume: the checkpoint has no dense inputs for --target dense")
                reference = [r.to(store) for r in resumed.reference]
            torch.set_rng_state(resumed.rng)
            resumed.report.device = report.device
            report = resumed.report
            if qrec is not None and resumed.quant is not None:
                qrec, qbits = resumed.quant, resumed.qbits
                qweights.update(resumed.grids)
            logger.info("resuming at block %d of %d", first + 1, len(blocks))
            del resumed

        bar = tqdm(
            range(first, len(blocks)),
            initial=first,
            total=len(blocks),
            desc=what,
            unit="block",
            disable=not progress or not distributed.is_main(),
            dynamic_ncols=True,
        )
        for i in bar:
            t_block = time.perf_counter()
            block = stream.load_block(i) if stream is not None else blocks[i]
            block.to(device)
            plan = plan_block(block, f"{blocks_name}.{i}", config.ignore)
            if layer_sparsity is not None and nm is not None:  # N:M or kept dense, nothing between
                for target in [t for t in plan.targets if layer_sparsity.get(t.name) == 0.0]:
                    plan.targets.remove(target)
                    plan.dense.append(_dense(target.name, target.weight.numel(), DENSE_ALLOCATION))
            for target in plan.targets:
                _check_finite(target.name, target.weight)
                if scheme is not None:
                    check_group_size(target.weight.shape[1], scheme.group_size, layer=target.name)

            block_loss = 0.0
            block_layers: list[LayerReport] = []
            block_rounded = 0  # weights quantization rounded to 0 (counted apart from the pruning's zeros)
            missing: list[str] = []  # targets without calibration tokens
            # the dense outputs: the per-block output error and --propagate dense; with --target dense, the
            # dense model's outputs of the block (the reference stream) take their place
            dense_out: list[torch.Tensor] = []
            reference_out: list[torch.Tensor] = []
            stages = _block_statistics(
                block,
                plan,
                hidden,
                calls[i],
                reference,
                device=device,
                store=store,
                index=i,
                stats=need_stats,
                hessian=keep_hessian,
                outputs=reference_out if dense_target else dense_out,
                sink_weight=quant.sink_weight if quant is not None else config.sink_weight or 0.0,
            )
            for stage_targets, stats_of in stages:
                distributed.all_reduce_stats(stats_of[n] for n in sorted(stats_of))
                # several processes: each solves its share of the stage (layers reading one input together)
                owner = distributed.assign_solves(
                    [(t.name, tuple(t.weight.shape)) for t in stage_targets],
                    {name: id(st) for name, st in stats_of.items()}.get,  # which layers share an input
                )
                mine = [t for t in stage_targets if owner[t.name] == distributed.rank()]
                factors = (
                    _SharedFactors([stats_of[t.name] for t in mine if t.name in stats_of], **obs_solve)
                    if obs_solve is not None
                    else None
                )
                retargets = (
                    _DenseTargetMaps(
                        [stats_of[t.name] for t in mine if t.name in stats_of], damp=config.target_damp
                    )
                    if dense_target
                    else None
                )

                def solve_target(
                    target: Target,
                    stats_of: dict[str, InputStats],
                    factors: _SharedFactors | None,
                    retargets: _DenseTargetMaps | None,
                ) -> _Solved:
                    t_layer = time.perf_counter()
                    stats = stats_of.get(target.name)
                    weight = target.weight
                    qloss: float | None = None
                    layer_kwargs = solver_kwargs
                    if layer_sparsity is not None and nm is None and target.name in layer_sparsity:
                        layer_kwargs = {**solver_kwargs, "sparsity": float(layer_sparsity[target.name])}
                    uncalibrated = (config.method != "magnitude" or scheme is not None) and (
                        stats is None or stats.n == 0
                    )
                    if uncalibrated:
                        if config.uncalibrated == "dense":
                            return _Solved(None, 0, None, None, None, uncalibrated=True, dense=True)
                        result = (
                            PruneResult(weight, weight == 0, None)
                            if quant_only
                            else prune_magnitude(weight, None, sparsity=layer_kwargs["sparsity"], pattern=nm)
                        )
                        zeros = int((result.weight == 0).sum())
                        if scheme is not None:  # no Hessian: round to nearest (zeros stay zeros)
                            rtn = quantize_rtn(result.weight, scheme)
                            result = PruneResult(rtn.dequantize(weight.dtype), result.mask, None, rtn)
                    else:
                        try:
                            source = weight  # what the solver reproduces: W, or W* for --target dense
                            if retargets is not None and stats is not None:
                                source = retargets.weight(
                                    stats, weight
                                )  # before the factor takes the Hessian
                            factor = None if factors is None or stats is None else factors.get(stats, weight)
                            if scheme is None or quant is None:
                                result = solver(source, stats if factor is None else factor, **layer_kwargs)
                                zeros = int((result.weight == 0).sum())
                            else:
                                result, zeros, qloss = _quant_solve(
                                    source,
                                    stats,
                                    config,
                                    quant,
                                    scheme,
                                    quant_only=quant_only,
                                    solver=solver,
                                    solver_kwargs=layer_kwargs,
                                    factor=factor,
                                )
                            del factor
                        except SolverError as exc:
                            raise SolverError(f"layer {target.name}: {exc}") from exc
                        if factors is not None and stats is not None:
                            factors.done(stats)
                    if not bool(torch.isfinite(result.weight).all()):
                        raise PruneError(
                            f"pruning {target.name} produced NaN/Inf weights (overflow in {weight.dtype}?): "
                            "try --dtype float32 or more --damp; nothing was written"
                        )
                    q = result.quant
                    grid = (
                        QuantizedWeight(q.codes.cpu(), q.scales.cpu(), q.zeros.cpu(), q.g_idx.cpu(), q.scheme)
                        if qrec is not None and scheme is not None and q is not None
                        else None
                    )
                    loss = None if result.loss is None else float(result.loss)
                    seconds = time.perf_counter() - t_layer
                    return _Solved(
                        result.weight, zeros, loss, qloss, grid, uncalibrated=uncalibrated, seconds=seconds
                    )

                def apply(
                    target: Target,
                    solved: _Solved,
                    plan: BlockPlan,
                    missing: list[str],
                    block_layers: list[LayerReport],
                ) -> None:
                    nonlocal block_rounded, block_loss, qbits
                    weight = target.weight
                    if solved.uncalibrated:
                        missing.append(target.name)
                    if solved.dense:
                        plan.dense.append(_dense(target.name, weight.numel(), DENSE_UNCALIBRATED))
                        return
                    if solved.uncalibrated:
                        report.uncalibrated.append(target.name)
                    assert solved.weight is not None
                    target.write(solved.weight)
                    report.pruned_params += weight.numel()
                    report.zero_params += solved.zeros
                    if qrec is not None and scheme is not None and solved.grid is not None:
                        qweights[target.name] = solved.grid
                        rounded = int((solved.weight == 0).sum()) - solved.zeros
                        block_rounded += rounded
                        rows, cols = weight.shape
                        qbits += packed_bits(rows, cols, scheme)
                        qrec.quantized_params += weight.numel()
                        qrec.rounded_to_zero += rounded
                        qrec.dense_bytes += weight.numel() * weight.element_size()
                        qrec.layers.append(
                            QuantLayer(target.name, (rows, cols), solved.qloss, solved.seconds, rounded)
                        )
                    block_loss += solved.loss or 0.0
                    block_layers.append(
                        LayerReport(
                            target.name,
                            (weight.shape[0], weight.shape[1]),
                            solved.zeros / weight.numel(),
                            solved.loss,
                            solved.seconds,
                        )
                    )

                if world == 1:
                    for target in stage_targets:  # solved and written one by one
                        apply(
                            target,
                            solve_target(target, stats_of, factors, retargets),
                            plan,
                            missing,
                            block_layers,
                        )
                else:  # every rank solves its own layers, then each result goes from its owner to all
                    done = {t.name: solve_target(t, stats_of, factors, retargets) for t in mine}
                    for target in stage_targets:
                        got = distributed.exchange(
                            done.get(target.name), owner[target.name], target.weight, _Solved
                        )
                        apply(target, got, plan, missing, block_layers)
                    del done
                del factors, retargets, stats_of
            if missing:
                logger.warning(
                    "block %d: %d weight(s) received no calibration tokens (an expert no token was routed to, "
                    "or a layer that never ran), %s: %s",
                    i,
                    len(missing),
                    "kept dense (--uncalibrated dense)"
                    if config.uncalibrated == "dense"
                    else "pruned by magnitude instead (--uncalibrated magnitude)",
                    ", ".join(missing),
                )
            report.layers.extend(block_layers)
            params, zeros_all, others = _census(block, f"{blocks_name}.{i}", plan.accounted)
            report.matrix_params += params
            zeros_all -= block_rounded  # the census counts zeros after quantization
            report.matrix_zero_params += zeros_all
            report.dense_matrices.extend(plan.dense + others)

            output_error: float | None = None
            if config.propagate == "pruned":
                new_hidden = []
                num = den = 0.0
                compare = reference_out if dense_target else dense_out  # --target dense: the dense model's
                for b, h in enumerate(hidden):
                    out = _finite(run_block(block, h, calls[i][b], device), i)
                    if compare:
                        ref = compare[b].to(out.device)
                        num += float((ref.float() - out.float()).pow(2).sum())
                        den += float(ref.float().pow(2).sum())
                    new_hidden.append(out.to(store))
                num, den = distributed.all_reduce_sum([num, den], device)
                output_error = num / den if den > 0 else None
                hidden = new_hidden
                if reference is not None:
                    reference = reference_out
            else:
                hidden = dense_out
            del dense_out, reference_out
            if device.type != "cpu":
                block.to("cpu")
            seconds = time.perf_counter() - t_block
            report.blocks.append(BlockReport(i, seconds, output_error))
            logger.info(
                "block %d/%d: %d matrices pruned, block sparsity %.4f, loss %s, output error %s, %.1fs",
                i + 1,
                len(blocks),
                len(block_layers),
                zeros_all / max(1, params),
                f"{block_loss:.4g}" if keep_hessian else "n/a",
                "n/a" if output_error is None else f"{output_error:.3g}",
                seconds,
            )
            if checkpoint is not None:
                names = {r.name for r in block_layers}
                checkpoint.save(
                    i,
                    block,
                    hidden,
                    report,
                    blocks=len(blocks),
                    quant=qrec,
                    qbits=qbits,
                    grids={n: g for n, g in qweights.items() if n in names},
                    reference=reference,
                )
            if stream is not None:
                stream.store_block(i)
        bar.close()
    except torch.OutOfMemoryError as exc:
        raise PruneError(
            f"out of memory while pruning: lower --batch-size (now {batch_size}), --nsamples or --seqlen, "
            "or use --device cpu"
        ) from exc
    finally:
        move_non_block_modules(model, blocks, torch.device("cpu"))
        if prev_cache is not None:
            model_config.use_cache = prev_cache
        model.train(was_training)

    if report.pruned_params == 0 and quant_only:
        raise PruneError(
            f"nothing was quantized: every weight matrix of the {len(blocks)} blocks was kept dense "
            f"({dense_summary(report.dense_matrices)})"
        )
    if report.pruned_params == 0:
        raise PruneError(
            f"nothing was pruned: every weight matrix of the {len(blocks)} blocks was kept dense "
            f"({dense_summary(report.dense_matrices)})"
        )
    unexpected = [
        d for d in report.dense_matrices if d.reason not in (DENSE_ROUTER, DENSE_IGNORED, DENSE_ALLOCATION)
    ]
    if unexpected:
        share = sum(d.params for d in unexpected) / max(1, report.matrix_params)
        logger.warning(
            "%.1f %% of the block weights were left dense, not by request: %s",
            100 * share,
            dense_summary(unexpected),
        )
    report.total_seconds = time.perf_counter() - start
    report.peak_memory_bytes, report.peak_memory_kind = peak_memory(device)
    report.streamed = stream is not None
    if qrec is None:
        return report, None
    qrec.bits_per_weight = qbits / max(1, qrec.quantized_params)
    qrec.packed_bytes = -(-qbits // 8)
    qrec.blocks = list(report.blocks)
    qrec.total_seconds = report.total_seconds
    qrec.device = report.device
    return report, QuantizedModel(qrec, qweights)


def dense_summary(dense_matrices: list[DenseMatrix]) -> str:
    """``dense_matrices`` of a report grouped by reason: "3 x router (kept dense) (384 weights); ..."."""
    groups: dict[str, list[int]] = {}
    for entry in dense_matrices:
        groups.setdefault(entry.reason, []).append(entry.params)
    return "; ".join(f"{len(v)} x {k} ({sum(v):,} weights)" for k, v in groups.items()) or "none"


def _finite(out: torch.Tensor, block: int) -> torch.Tensor:
    if not torch.isfinite(out).all():
        raise PruneError(
            f"block {block} produced NaN/Inf activations: the model overflows in this dtype "
            "(try --dtype float32) or its weights are corrupt"
        )
    return out
