"""Recovery fine-tuning of a pruned or shrunk model toward its dense teacher, with the sparsity kept exact.

Two methods, both training only the parameters of the decoder blocks (embeddings, final norm and LM head
stay as they are):

- `recover_blockwise`: block by block. Block ``i`` of the student sees the hidden states that came through
  the student blocks recovered before it; its target is the teacher's block on those very inputs; the loss
  is the per-token relative error ``mean_t ||out_t - target_t||^2 / ||target_t||^2`` (a plain MSE would be
  ruled by the few tokens with massive activations). One block is on the compute device at a time.
- `recover_distill`: end to end, KL(teacher || student) on the next-token distributions, plus
  ``hidden_weight`` times the normalised hidden-state error of every block (SquareHead), through
  `accelerate` (mixed precision, several processes) with gradient checkpointing.

`MaskedParams` keeps the pattern: gradients of pruned weights are zeroed before each optimizer step (so
AdamW's moments of them stay zero) and the weights are masked again after it (so nothing, weight decay
included, can revive one). The optimiser is AdamW; the learning rate warms up linearly, then decays on a
cosine to 10 % (`lr_factor`). Training state is handed to a `Checkpointer` every few minutes; passing it
back as ``state`` continues a run to the same result as an uninterrupted one (the data order is a
function of the seed, block and epoch only).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from oneshot.config import RecoverConfig
from oneshot.errors import OneshotError
from oneshot.models import resolve_device
from oneshot.walker import BlockCall, capture_block_calls, find_blocks, move_non_block_modules, run_block

__all__ = [
    "Checkpointer",
    "MaskedParams",
    "RecoverError",
    "TrainResult",
    "block_parameters",
    "lr_factor",
    "recover_blockwise",
    "recover_distill",
    "relative_mse",
    "sparsity_masks",
]

logger = logging.getLogger(__name__)

STATE_VERSION = 1
CURVE_POINTS = 200  # at most this many points of the loss curve are recorded


class RecoverError(OneshotError):
    """Recovery cannot run as asked (the message says why and what to change)."""


# --- masks -----------------------------------------------------------------------------------------------


def block_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of the decoder blocks by their qualified names (what recovery trains)."""
    blocks_name, blocks = find_blocks(model)
    return {f"{blocks_name}.{name}": p for name, p in blocks.named_parameters()}


def sparsity_masks(model: nn.Module, layers: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """Keep-masks (bool, True = trainable) of the pruned weights of ``model``'s decoder blocks.

    ``layers``: the pruned matrices named in the run record (``name`` or ``name[expert]`` of a fused expert
    tensor); their weights' zeros are frozen. None (a shrunk model): no masks. Any weight with an exact zero
    that the record names is masked, so the pattern after recovery contains the pattern before it.
    """
    if layers is None:
        return {}
    wanted = {name.split("[", 1)[0] for name in layers}
    masks: dict[str, torch.Tensor] = {}
    for name, p in block_parameters(model).items():
        if p.ndim < 2:
            continue
        module = name.rsplit(".", 1)[0]
        if name in wanted or module in wanted:
            keep = p.detach() != 0
            if not bool(keep.all()):
                masks[name] = keep
    if layers and not masks:
        raise RecoverError(
            "the run record names pruned matrices but none of them has a zero weight in the checkpoint: "
            "the run folder's weights do not belong to its record"
        )
    return masks


class MaskedParams:
    """Pruned weights of a set of parameters held at exactly zero around optimizer steps."""

    def __init__(self, params: dict[str, nn.Parameter], masks: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(masks) - set(params))
        if missing:
            raise RecoverError(f"masks for parameters that are not trained: {', '.join(missing[:3])}")
        self.pairs = [(params[name], mask.to(params[name].device)) for name, mask in masks.items()]

    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights (before the step: AdamW's moments of them stay zero)."""
        for p, keep in self.pairs:
            if p.grad is not None:
                p.grad.masked_fill_(~keep, 0)

    @torch.no_grad()
    def mask_weights(self) -> None:
        """Set pruned weights to exactly zero (after the step: decay or momentum cannot revive one)."""
        for p, keep in self.pairs:
            p.masked_fill_(~keep, 0)

    def revived(self) -> int:
        """Pruned weights that are not zero now (0 unless something bypassed the masks)."""
        return sum(int((p.detach()[~keep] != 0).sum()) for p, keep in self.pairs)


def _optimizer(params: dict[str, nn.Parameter], config: RecoverConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms and biases). The fused implementation where every
    parameter is float on a CPU or CUDA device: on this 2-core CPU its step over 86 M parameters took 0.19 s
    against 0.45-0.66 s for the default."""
    decay = [p for p in params.values() if p.ndim >= 2]
    rest = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params.values())
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, fused=fused or None)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based) of ``total``: linear warm-up over
    ``warmup`` of the steps, then cosine decay from 1 to 0.1."""
    warm = math.ceil(warmup * total)
    if step < warm:
        return (step + 1) / (warm + 1)
    span = max(1, total - warm)
    progress = min(1.0, (step - warm) / span)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def relative_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``||out_t - target_t||^2 / ||target_t||^2`` for (..., hidden) tensors."""
    err = (out.float() - target.float()).pow(2).sum(-1)
    ref = target.float().pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
    return (err / ref).mean()


# --- checkpoints -----------------------------------------------------------------------------------------


class Checkpointer:
    """Hands the training state to ``save`` at step boundaries, every ``minutes`` of work (0: every step).

    ``on_step(global_step)`` runs after every optimizer step (and after a checkpoint due at that step).
    """

    def __init__(
        self,
        save: Callable[[dict[str, Any]], None] | None,
        minutes: float,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.save_fn, self.seconds, self.on_step = save, minutes * 60.0, on_step
        self.last = time.monotonic()
        self.saved = 0

    def step(self, global_step: int, state: Callable[[], dict[str, Any]], *, final: bool = False) -> None:
        if self.save_fn is not None and (final or time.monotonic() - self.last >= self.seconds):
            self.save_fn({"version": STATE_VERSION, **state()})
            self.last = time.monotonic()
            self.saved += 1
        if self.on_step is not None:
            self.on_step(global_step)


def _param_state(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu", copy=True) for name, p in params.items()}


@torch.no_grad()
def _load_params(params: dict[str, nn.Parameter], saved: dict[str, torch.Tensor]) -> None:
    if set(saved) != set(params):
        raise RecoverError("the saved recovery state holds other parameters than this model: start afresh")
    for name, p in params.items():
        p.copy_(saved[name].to(p.device, p.dtype))


# --- results ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a recovery did (the job turns it into the run record)."""

    steps: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0  # training time, summed over resumed parts
    curve: list[list[float]] = field(default_factory=list)  # [step, tokens seen, mean loss since the last]
    blocks: list[dict[str, Any]] = field(default_factory=list)  # blockwise: per block before/after
    resumed: int = 0
    device: str = "cpu"
    total_steps: int = 0


class _Curve:
    """Mean loss per interval of ``every`` steps."""

    def __init__(self, total_steps: int, points: list[list[float]]) -> None:
        self.every = max(1, math.ceil(total_steps / CURVE_POINTS))
        self.points = points
        self.acc: list[float] = []

    def add(self, step: int, tokens: int, loss: float, *, last: bool = False) -> None:
        self.acc.append(loss)
        if step % self.every == 0 or last:
            self.points.append([step, tokens, sum(self.acc) / len(self.acc)])
            self.acc = []


def _check_state(state: dict[str, Any] | None, method: str, fields: dict[str, Any]) -> None:
    if state is None:
        return
    if state.get("version") != STATE_VERSION or state.get("method") != method:
        raise RecoverError("the saved recovery state is of another method or oneshot version: start afresh")
    if state.get("fields") != fields:
        changed = sorted(k for k in fields if state.get("fields", {}).get(k) != fields[k])
        raise RecoverError(
            "--resume needs the options of the interrupted run; these differ: "
            + ", ".join(f"{k} (was {state.get('fields', {}).get(k)!r}, now {fields[k]!r})" for k in changed)
        )


@contextlib.contextmanager
def _frozen_except(model: nn.Module, trainable: dict[str, nn.Parameter]) -> Iterator[None]:
    """requires_grad only on ``trainable`` for the duration; restored afterwards."""
    before = {id(p): p.requires_grad for p in model.parameters()}
    ids = {id(p) for p in trainable.values()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in ids)
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(before[id(p)])


def _check_finite_loss(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise RecoverError(f"the recovery loss became {float(loss)} at {where}: lower --lr")


# --- blockwise -------------------------------------------------------------------------------------------


def _batches(windows: torch.Tensor, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Windows in a seeded random order, cut into batches of ``batch_size``."""
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    return list(windows[order].split(batch_size))


def _epoch_order(n: int, seed: int, *salt: int) -> list[int]:
    gen = torch.Generator().manual_seed(hash((seed, *salt)) % (2**63))
    return torch.randperm(n, generator=gen).tolist()


def recover_blockwise(
    student: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    config: RecoverConfig,
    *,
    masks: dict[str, torch.Tensor],
    block_map: Sequence[int],
    device: str | torch.device = "auto",
    state: dict[str, Any] | None = None,
    checkpointer: Checkpointer | None = None,
    progress: bool = True,
) -> TrainResult:
    """Recover ``student`` in place, block by block, on ``windows`` (n, seqlen) token ids.

    ``block_map[i]``: the teacher block that student block ``i`` stands for (blocks a shrink dropped are
    missing). ``masks``: keep-masks by parameter name (`sparsity_masks`).
    """
    from tqdm.auto import tqdm

    device = resolve_device(device)
    fields = config.result_fields()
    _check_state(state, "blockwise", fields)
    s_name, s_blocks = find_blocks(student)
    _, t_blocks = find_blocks(teacher)
    if len(block_map) != len(s_blocks) or any(not 0 <= j < len(t_blocks) for j in block_map):
        raise RecoverError(
            f"the student's {len(s_blocks)} blocks do not map onto the teacher's {len(t_blocks)} blocks"
        )
    params = block_parameters(student)
    masked = MaskedParams(params, masks)
    masked.mask_weights()
    result = TrainResult(device=str(device))
    start_block, start_step = 0, 0
    saved_opt: dict[str, Any] | None = None
    if state is not None:
        _load_params(params, state["params"])
        start_block, start_step = int(state["block"]), int(state["step"])
        saved_opt = state["optimizer"]
        result.steps, result.tokens_seen = int(state["steps"]), int(state["tokens_seen"])
        result.seconds, result.curve = float(state["seconds"]), list(state["curve"])
        result.blocks, result.resumed = list(state["blocks"]), int(state["resumed"]) + 1
    batches = _batches(windows, config.batch_size, config.seed)
    per_block = config.epochs * len(batches)
    total_steps = result.total_steps = per_block * len(s_blocks)
    curve = _Curve(total_steps, result.curve)
    t0 = time.perf_counter() - result.seconds

    models = (student, teacher)
    was = [(m.training, getattr(m.config, "use_cache", None)) for m in models]
    for m in models:
        m.eval()
        if hasattr(m.config, "use_cache"):
            m.config.use_cache = False
    try:
        with torch.no_grad():
            hidden, s_calls = _capture(student, s_blocks, batches, device, progress)
            _, t_calls = _capture(teacher, t_blocks, batches, device, progress)
            for i in range(start_block):  # resumed: the recovered blocks' outputs again
                hidden = _propagate(s_blocks[i], hidden, s_calls[i], device)
        bar = tqdm(
            total=total_steps * windows.shape[1] * config.batch_size,
            initial=result.tokens_seen,
            desc="blockwise",
            unit="tok",
            unit_scale=True,
            disable=not progress,
            dynamic_ncols=True,
        )
        for i in range(start_block, len(s_blocks)):
            t_block = time.perf_counter()
            j = block_map[i]
            block, t_block_mod = s_blocks[i], t_blocks[j]
            block.to(device)
            t_block_mod.to(device)
            with torch.no_grad():
                targets = [
                    run_block(t_block_mod, h, t_calls[j][b], device).to(h.device)
                    for b, h in enumerate(hidden)
                ]
            if device.type != "cpu":
                t_block_mod.to("cpu")
            if i != start_block or state is None:
                with torch.no_grad():
                    before = _block_error(block, hidden, targets, s_calls[i], device)
                result.blocks.append({"block": i, "teacher_block": j, "loss_before": before})
            prefix = f"{s_name}.{i}."
            block_params = {n: p for n, p in params.items() if n.startswith(prefix)}
            opt = _optimizer(block_params, config)
            first = start_step if i == start_block else 0
            if i == start_block and saved_opt is not None:
                opt.load_state_dict(saved_opt)
            block_masked = MaskedParams(block_params, {n: m for n, m in masks.items() if n in block_params})
            with _frozen_except(block, block_params):  # eval mode: no dropout, the fit is deterministic
                for step in range(first, per_block):
                    epoch, k = divmod(step, len(batches))
                    b = _epoch_order(len(batches), config.seed, i, epoch)[k]
                    _set_lr(opt, config.lr * lr_factor(step, per_block, config.warmup))
                    out = run_block(block, hidden[b], s_calls[i][b], device)
                    loss = relative_mse(out, targets[b].to(device))
                    _check_finite_loss(loss, f"block {i}, step {step + 1}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    block_masked.mask_grads()
                    opt.step()
                    block_masked.mask_weights()
                    tokens = hidden[b].shape[0] * hidden[b].shape[1]
                    result.steps += 1
                    result.tokens_seen += tokens
                    curve.add(
                        result.steps,
                        result.tokens_seen,
                        float(loss.detach()),
                        last=result.steps == total_steps,
                    )
                    bar.update(tokens)
                    bar.set_postfix(block=f"{i + 1}/{len(s_blocks)}", loss=f"{float(loss.detach()):.4g}")
                    if checkpointer is not None and step + 1 < per_block:
                        checkpointer.step(
                            result.steps, _blockwise_state(result, params, fields, t0, i, step + 1, opt)
                        )
            with torch.no_grad():
                new_hidden = _propagate(block, hidden, s_calls[i], device)
                after = sum(
                    float(relative_mse(h.to(device), t.to(device))) * h.shape[0]
                    for h, t in zip(new_hidden, targets, strict=True)
                ) / sum(h.shape[0] for h in new_hidden)
            hidden = new_hidden
            result.blocks[-1].update(loss_after=after, seconds=time.perf_counter() - t_block)
            if device.type != "cpu":
                block.to("cpu")
            logger.info(
                "block %d/%d: relative error to the teacher block %.4g -> %.4g (%.1fs)",
                i + 1,
                len(s_blocks),
                result.blocks[-1]["loss_before"],
                after,
                time.perf_counter() - t_block,
            )
            saved_opt = None
            if checkpointer is not None:  # a block boundary: the next block starts afresh
                checkpointer.step(result.steps, _blockwise_state(result, params, fields, t0, i + 1, 0, None))
        bar.close()
    except torch.OutOfMemoryError as exc:
        raise RecoverError(
            f"out of memory in blockwise recovery: lower --batch-size (now {config.batch_size}) or --tokens, "
            "or use --device cpu"
        ) from exc
    finally:
        for m, (training, cache) in zip(models, was, strict=True):
            move_non_block_modules(m, find_blocks(m)[1], torch.device("cpu"))
            find_blocks(m)[1].to("cpu")
            m.train(training)
            if cache is not None:
                m.config.use_cache = cache  # type: ignore[union-attr]
    if masked.revived():
        raise RecoverError("pruned weights became non-zero during recovery (a bug): nothing is saved")
    result.seconds = time.perf_counter() - t0
    return result


def _blockwise_state(
    result: TrainResult,
    params: dict[str, nn.Parameter],
    fields: dict[str, Any],
    t0: float,
    block: int,
    step: int,
    opt: torch.optim.Optimizer | None,
) -> Callable[[], dict[str, Any]]:
    """The state to resume blockwise recovery at ``step`` of ``block`` (built only when saved)."""

    def snapshot() -> dict[str, Any]:
        result.seconds = time.perf_counter() - t0
        return {
            "method": "blockwise",
            "fields": fields,
            "block": block,
            "step": step,
            "optimizer": opt.state_dict() if opt is not None else None,
            "params": _param_state(params),
            **_result_state(result),
        }

    return snapshot


def _result_state(result: TrainResult) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "seconds": result.seconds,
        "curve": [list(p) for p in result.curve],
        "blocks": [dict(b) for b in result.blocks],
        "resumed": result.resumed,
        "total_steps": result.total_steps,
    }


def _capture(
    model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], device: torch.device, progress: bool
) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    move_non_block_modules(model, blocks, device)
    try:
        return capture_block_calls(model, blocks, batches, device, torch.device("cpu"), progress=progress)
    finally:
        move_non_block_modules(model, blocks, torch.device("cpu"))


def _propagate(
    block: nn.Module, hidden: list[torch.Tensor], calls: list[BlockCall], device: torch.device
) -> list[torch.Tensor]:
    block.to(device)
    return [run_block(block, h, calls[b], device).to(h.device) for b, h in enumerate(hidden)]


def _block_error(
    block: nn.Module,
    hidden: list[torch.Tensor],
    targets: list[torch.Tensor],
    calls: list[BlockCall],
    device: torch.device,
) -> float:
    total = 0.0
    for b, h in enumerate(hidden):
        out = run_block(block, h, calls[b], device)
        total += float(relative_mse(out, targets[b].to(device))) * h.shape[0]
    return total / sum(h.shape[0] for h in hidden)


# --- distill ---------------------------------------------------------------------------------------------


def _accelerator(device: torch.device, mixed_precision: str) -> Any:
    """An `accelerate.Accelerator`; its process-wide state is set up again when an earlier recovery in this
    process used another mixed precision (the distributed setup itself is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    try:
        return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)
    except ValueError:
        AcceleratorState._reset_state(reset_partial_state=False)
        return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)


KL_CHUNK_ROWS = 64  # positions per chunk of the fused KL (a chunk's fp32 rows stay in cache)


class _ChunkedKL(torch.autograd.Function):
    """KL(teacher || student) summed over positions, and its gradient, in one chunked pass.

    The gradient of ``sum_v p_v (log p_v - log q_v)`` with respect to the student's logits is ``q - p``, so
    it is computed with the loss and stored: no autograd graph over the (positions, vocab) softmax, and
    no full-size float32 temporaries beside it. Rows are (positions, vocab); accumulation is float32.
    """

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[0], KL_CHUNK_ROWS):
            rows = slice(start, start + KL_CHUNK_ROWS)
            log_q = torch.log_softmax(student[rows].float(), dim=-1)
            log_p = torch.log_softmax(teacher[rows].float(), dim=-1)
            p = log_p.exp()
            total += (p * (log_p - log_q)).sum()
            if grad is not None:
                grad[rows] = log_q.exp_().sub_(p)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None
        return (grad.float() * grad_out.float()).to(grad.dtype), None


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions, mean over positions. (..., vocab) logits.

    Computed in float32 chunks of positions with its gradient fused (``_ChunkedKL``): on a CPU the
    plain autograd formula over a 49k vocabulary cost as much time as the student's forward.
    """
    s = student_logits.flatten(0, -2)
    t = teacher_logits.detach().flatten(0, -2)
    return _ChunkedKL.apply(s, t) / s.shape[0]


def _enable_checkpointing(model: nn.Module) -> Callable[[], None] | None:
    """Switch on transformers' activation (gradient) checkpointing; returns how to switch it off again, or None
    when the model does not support it or had it on already."""
    m: Any = model
    if not getattr(m, "supports_gradient_checkpointing", False):
        return None
    if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.x
        if m.is_activation_checkpointing:
            return None
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return m.activation_checkpointing_disable  # type: ignore[no-any-return]
    if m.is_gradient_checkpointing:
        return None
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m.gradient_checkpointing_disable  # type: ignore[no-any-return]


@contextlib.contextmanager
def _block_outputs(blocks: nn.ModuleList, sink: dict[int, torch.Tensor]) -> Iterator[None]:
    """Forward hooks storing each block's output hidden states in ``sink`` by block index."""

    def hook(index: int) -> Any:
        def fn(module: nn.Module, args: Any, out: Any) -> None:
            sink[index] = out[0] if isinstance(out, (tuple, list)) else out

        return fn

    handles = [blk.register_forward_hook(hook(i)) for i, blk in enumerate(blocks)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def recover_distill(
    student: nn.Module,
    teacher: nn.Module,
    windows: torch.Tensor,
    config: RecoverConfig,
    *,
    masks: dict[str, torch.Tensor],
    block_map: Sequence[int],
    device: str | torch.device = "auto",
    state: dict[str, Any] | None = None,
    checkpointer: Checkpointer | None = None,
    progress: bool = True,
) -> TrainResult:
    """Distil ``teacher`` into ``student`` (in place) on ``windows`` (n, seqlen) token ids, end to end.

    ``epochs`` passes over the windows in a seeded order; each optimizer step takes ``grad_accum``
    micro-batches of ``batch_size`` windows. Through `accelerate`: ``mixed_precision`` and, when launched
    with ``accelerate launch``, several processes (each takes every n-th micro-batch; checkpoints are written
    by the main process).
    """
    from tqdm.auto import tqdm

    device = resolve_device(device)
    fields = config.result_fields()
    _check_state(state, "distill", fields)
    _, s_blocks = find_blocks(student)
    _, t_blocks = find_blocks(teacher)
    if len(block_map) != len(s_blocks):
        raise RecoverError(
            f"the student's {len(s_blocks)} blocks do not map onto the teacher's {len(t_blocks)} blocks"
        )
    accelerator = _accelerator(device, config.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    params = block_parameters(student)
    masked = MaskedParams(params, masks)
    masked.mask_weights()
    result = TrainResult(device=str(accelerator.device))
    opt = _optimizer(params, config)
    start_step = 0
    if state is not None:
        _load_params(params, state["params"])
        opt.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        result.steps, result.tokens_seen = int(state["steps"]), int(state["tokens_seen"])
        result.seconds, result.curve = float(state["seconds"]), list(state["curve"])
        result.resumed = int(state["resumed"]) + 1
    n = windows.shape[0]
    micro = math.ceil(n / config.batch_size)
    per_epoch = math.ceil(micro / config.grad_accum)
    total_steps = result.total_steps = per_epoch * config.epochs
    curve = _Curve(total_steps, result.curve)
    t0 = time.perf_counter() - result.seconds

    was_training = student.training
    caches = [getattr(m.config, "use_cache", None) for m in (student, teacher)]
    for m in (student, teacher):
        if hasattr(m.config, "use_cache"):
            m.config.use_cache = False
    checkpointing = _enable_checkpointing(student) if config.gradient_checkpointing else None
    teacher.eval()
    teacher_grad = [p.requires_grad for p in teacher.parameters()]
    teacher.requires_grad_(False)
    teacher.to(accelerator.device)
    torch.manual_seed(config.seed)
    own_forward = student.__dict__.get("forward")
    model, opt = accelerator.prepare(student, opt)
    if state is not None and accelerator.scaler is not None and state.get("scaler") is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    s_out: dict[int, torch.Tensor] = {}
    t_out: dict[int, torch.Tensor] = {}
    bar = tqdm(
        total=total_steps * config.grad_accum * config.batch_size * windows.shape[1],
        initial=result.tokens_seen,
        desc="distill",
        unit="tok",
        unit_scale=True,
        disable=not progress or not accelerator.is_main_process,
        dynamic_ncols=True,
    )
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_frozen_except(student, params))
            if config.hidden_weight:
                stack.enter_context(_block_outputs(s_blocks, s_out))
                stack.enter_context(_block_outputs(t_blocks, t_out))
            model.train()  # for gradient checkpointing; dropout stays off (a deterministic fit)
            for mod in student.modules():
                if isinstance(mod, nn.Dropout):
                    mod.eval()
            for step in range(start_step, total_steps):
                epoch, k = divmod(step, per_epoch)
                order = _epoch_order(n, config.seed, epoch)
                _set_lr(opt, config.lr * lr_factor(step, total_steps, config.warmup))
                chunks = [
                    order[c * config.batch_size : (c + 1) * config.batch_size]
                    for c in range(k * config.grad_accum, min(micro, (k + 1) * config.grad_accum))
                ]
                mine = [c for idx, c in enumerate(chunks) if idx % world == rank]
                step_loss, step_tokens = 0.0, 0
                opt.zero_grad(set_to_none=True)
                for idx, chunk in enumerate(mine):
                    ids = windows[chunk].to(accelerator.device)
                    sync = idx == len(mine) - 1
                    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                        with torch.no_grad(), accelerator.autocast():
                            t_logits = teacher(input_ids=ids, use_cache=False).logits
                        s_logits = model(input_ids=ids, use_cache=False).logits
                        loss = kl_to_teacher(s_logits, t_logits)
                        del t_logits
                        if config.hidden_weight:
                            hidden_loss = sum(
                                relative_mse(s_out[i], t_out[j]) for i, j in enumerate(block_map)
                            ) / len(block_map)
                            loss = loss + config.hidden_weight * hidden_loss
                        _check_finite_loss(loss, f"step {step + 1}")
                        accelerator.backward(loss * (len(chunk) / sum(len(c) for c in chunks)) * world)
                    step_loss += float(loss.detach()) * len(chunk)
                    step_tokens += ids.numel()
                    s_out.clear()
                    t_out.clear()
                masked.mask_grads()
                opt.step()
                masked.mask_weights()
                step_loss = float(
                    accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "sum")
                )
                step_tokens = int(
                    accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), "sum")
                )
                loss_value = step_loss / max(1, sum(len(c) for c in chunks))
                result.steps += 1
                result.tokens_seen += step_tokens
                curve.add(result.steps, result.tokens_seen, loss_value, last=step + 1 == total_steps)
                bar.update(step_tokens)
                bar.set_postfix(loss=f"{loss_value:.4g}")
                if checkpointer is not None and accelerator.is_main_process:

                    def snapshot(step: int = step) -> dict[str, Any]:
                        result.seconds = time.perf_counter() - t0
                        return {
                            "method": "distill",
                            "fields": fields,
                            "step": step + 1,
                            "params": _param_state(params),
                            "optimizer": opt.state_dict(),
                            "scaler": accelerator.scaler.state_dict()
                            if accelerator.scaler is not None
                            else None,
                            **_result_state(result),
                        }

                    checkpointer.step(result.steps, snapshot)
        bar.close()
    except torch.OutOfMemoryError as exc:
        raise RecoverError(
            f"out of memory in distillation: lower --batch-size (now {config.batch_size}) and raise --grad-accum, "
            "or pass --mixed-precision bf16"
        ) from exc
    finally:
        # accelerate patches an autocast wrapper onto the instance's forward: put back exactly what was there
        student.__dict__.pop("_original_forward", None)
        student.__dict__.pop("forward", None)
        if own_forward is not None:
            student.__dict__["forward"] = own_forward
        accelerator.free_memory()
        if checkpointing is not None:
            checkpointing()
        student.to("cpu")
        teacher.to("cpu")
        for p, flag in zip(teacher.parameters(), teacher_grad, strict=True):
            p.requires_grad_(flag)
        student.train(was_training)
        for m, cache in zip((student, teacher), caches, strict=True):
            if cache is not None:
                m.config.use_cache = cache  # type: ignore[union-attr]
    if masked.revived():
        raise RecoverError("pruned weights became non-zero during recovery (a bug): nothing is saved")
    result.seconds = time.perf_counter() - t0
    return result


RECOVERERS: dict[str, Callable[..., TrainResult]] = {
    "blockwise": recover_blockwise,
    "distill": recover_distill,
}
