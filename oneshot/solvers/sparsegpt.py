"""SparseGPT: prune with optimal-brain-surgeon updates of the remaining weights.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (2023).

With ``H = X^T X / n`` and ``U`` the upper Cholesky factor of ``H^{-1}`` (``H^{-1} = U^T U``), columns are
processed left to right. Removing column ``i`` of a row to value ``q`` (0 if pruned, unchanged otherwise)
costs ``(w - q)^2 / U_ii^2`` and is compensated exactly by ``W[:, i:] -= ((w - q) / U_ii) * U[i, i:]``.
Updates are applied eagerly inside a block of ``block_size`` columns and lazily (one matmul) to the columns
after it. The per-column costs add up to ``trace(dW H dW^T) = ||(W - W') X^T||_F^2 / n`` for the Hessian
that was factorised; with damping ``H + lam I`` the reported loss subtracts ``lam ||dW||_F^2`` again, so it is
always the exact loss for the undamped H.

Masks: unstructured sparsity selects, per block of columns ``[i1, i2)``, exactly
``round(rows * i2 * sparsity) - round(rows * i1 * sparsity)`` weights (so the layer prunes exactly
``round(rows * cols * sparsity)``) with the lowest ``w^2 / U_ii^2`` in the (rows, block) tile, using the weights as updated by all
previous blocks. An (n, m) pattern selects, when reaching column ``i`` with ``i % m == 0``, the n lowest
``w^2 / U_ii^2`` of columns ``i .. i+m-1`` in each row, using the current (updated) weights.

Quantization (``quant=``, and GPTQ in `oneshot.solvers.gptq`, which runs the same code via `solve_obs`):
``q`` is 0 for a pruned weight and the weight rounded to its group's grid otherwise, with the same update.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from oneshot.config import ConfigError
from oneshot.solvers import Pattern, PruneResult, SolverError
from oneshot.solvers.masks import check_pattern, check_sparsity, check_weight, lowest_k_mask, nm_mask
from oneshot.solvers.quant import ColumnQuantizer, QuantScheme, check_group_size
from oneshot.stats import InputStats

__all__ = [
    "ObsFactor",
    "check_block_size_and_damp",
    "factorize",
    "hessian_cols",
    "hessian_of",
    "inverse_cholesky",
    "prune_sparsegpt",
    "solve_obs",
]

logger = logging.getLogger(__name__)

_RETRY_FACTOR = 10.0  # damping multiplier per Cholesky retry
_MAX_RETRIES = 3
_MIN_RETRY_DAMP = 1e-4  # first retry damping when damp == 0
_MAX_RETRY_DAMP = 1.0  # retries never add more than mean(diag(H)) to the diagonal
_INNER = 16  # columns per eagerly-updated panel inside a lazy-update block
_CHUNK = 256  # rows / columns per chunk of the checks that avoid (cols, cols) temporaries


def _damping_schedule(damp: float) -> Iterator[float]:
    """``damp``, then up to ``_MAX_RETRIES`` values growing by ``_RETRY_FACTOR``, capped at 1.0."""
    yield damp
    current = damp
    for _ in range(_MAX_RETRIES):
        nxt = min(max(current * _RETRY_FACTOR, _MIN_RETRY_DAMP), max(_MAX_RETRY_DAMP, damp))
        if nxt <= current:
            return
        current = nxt
        yield current


def _check_hessian(hessian: Tensor, dtype: torch.dtype) -> Tensor:
    """Raise SolverError on a non-finite Hessian or a negative diagonal; return diag(H) as ``dtype``.

    The check runs over row chunks, so it needs no (cols, cols) temporary."""
    cols = hessian.shape[0]
    for r1 in range(0, cols, _CHUNK):
        if not bool(torch.isfinite(hessian[r1 : r1 + _CHUNK].to(dtype)).all()):
            raise SolverError("the Hessian contains NaN or Inf; check the calibration activations")
    diag = hessian.diagonal().to(dtype=dtype, copy=True)  # (cols,)
    if bool((diag < 0).any()):
        raise SolverError("the Hessian has negative diagonal entries; it is not X^T X / n of real inputs")
    return diag


def _all_finite(matrix: Tensor) -> bool:
    return all(
        bool(torch.isfinite(matrix[:, c1 : c1 + _CHUNK]).all()) for c1 in range(0, matrix.shape[1], _CHUNK)
    )


def _factor_in_place(
    work: Tensor, fill: Callable[[], None], damp: float, scale: float
) -> tuple[Tensor, float]:
    """Damp, factorise, invert and factorise again in the column-major (cols, cols) buffer ``work``.

    ``fill()`` writes the undamped Hessian into ``work`` (again before every retry). LAPACK works in place on
    a column-major buffer, so no step allocates another (cols, cols) matrix, and the arithmetic is that of
    ``cholesky -> cholesky_inverse -> cholesky(upper=True)`` on fresh tensors (bit for bit).
    Returns ``(work, damp_used)`` with ``work`` holding the upper factor ``U``: ``(H + lam I)^{-1} = U^T U``.
    """
    info = torch.zeros((), dtype=torch.int32, device=work.device)
    tried: list[float] = []
    for d in _damping_schedule(damp):
        fill()
        work.diagonal().add_(d * scale)
        if tried:
            logger.warning(
                "Cholesky factorisation failed with damp=%g; retrying with damp=%g (results are less "
                "accurate; more calibration samples or a higher --damp avoid this)",
                tried[-1],
                d,
            )
        tried.append(d)
        try:
            torch.linalg.cholesky_ex(work, out=(work, info))  # lower L: H + lam I = L L^T
            if int(info.item()) != 0:
                continue
            torch.cholesky_inverse(work, out=work)  # (H + lam I)^{-1}
            torch.linalg.cholesky_ex(work, upper=True, out=(work, info))
        except torch.linalg.LinAlgError:
            continue
        if int(info.item()) == 0 and _all_finite(work):
            return work, d
    cols = work.shape[0]
    raise SolverError(
        f"Cholesky factorisation of the {cols}x{cols} Hessian failed with "
        f"damp={', '.join(f'{d:g}' for d in tried)} (relative to mean(diag(H)) = {scale:g}); the Hessian "
        "is not positive definite. Raise --damp or use more calibration samples (or float32 statistics)."
    )


def _column_major(cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised (cols, cols) column-major matrix, the layout LAPACK factorises in place."""
    return torch.empty((cols, cols), dtype=dtype, device=device).mT


def inverse_cholesky(hessian: Tensor, damp: float, scale: float | None = None) -> tuple[Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + damp * scale * I)^{-1}``, i.e. ``(H + ...)^{-1} = U^T U``.

    Args:
        hessian: symmetric positive (semi-)definite (cols, cols) matrix; not modified.
        damp: damping relative to ``scale``.
        scale: damping unit; ``mean(diag(hessian))`` when None.

    If a factorisation fails (not positive definite, or non-finite output), the damping is multiplied by
    10 up to 3 times (at most ``1.0 * scale``) with a logged warning; then SolverError is raised. There is
    no identity fallback (that would silently turn SparseGPT into magnitude pruning).

    Memory: one (cols, cols) buffer, which becomes ``U``; everything is computed in place in it.

    Returns:
        ``(U, damp_used)``: the (cols, cols) upper factor and the relative damping that succeeded.
    """
    if scale is None:
        scale = float(hessian.diagonal().mean().item())
    work = _column_major(hessian.shape[0], hessian.dtype, hessian.device)

    def fill() -> None:
        work.copy_(hessian)

    return _factor_in_place(work, fill, damp, scale)


@dataclass(frozen=True)
class ObsFactor:
    """A factorised Hessian, computed once and shared by every layer reading the same input (q/k/v, gate/up).

    Attributes:
        upper: (cols, cols) upper Cholesky factor ``U`` of ``(H + lam I)^{-1}`` in processing order.
        dead: (cols,) bool, inputs with ``diag(H) == 0`` (no calibration signal), in processing order.
        order: (cols,) processing order (act-order: descending ``diag(H)``), or None for the natural one.
        scale: mean(diag(H)) over the live inputs: the unit of the damping.
        damp: the relative damping asked for; ``damp_used``: the one that succeeded (after retries).
    """

    upper: Tensor
    dead: Tensor
    order: Tensor | None
    scale: float
    damp: float
    damp_used: float

    @property
    def cols(self) -> int:
        return int(self.upper.shape[0])


def factorize(
    hessian: Tensor,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> ObsFactor:
    """Factorise the (cols, cols) Hessian for `solve_obs` (`prune_sparsegpt`, `quantize_gptq`) once.

    ``hessian`` is not modified; the caller may free it afterwards (the factor does not refer to it).
    ``dtype``: float32, or float64 for float64 weights (default: float64 iff the Hessian is); ``device``:
    that of the weights (default: the Hessian's). Memory: one (cols, cols) matrix (the factor) and (cols,)
    vectors; act-order permutes the Hessian into the factor's buffer by row chunks.

    Raises:
        ValueError: a bad ``damp`` or a non-square Hessian.
        SolverError: the Hessian is non-finite or cannot be factorised even after damping retries.
    """
    if not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    _check_square(hessian)
    if dtype is None:
        dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    device = hessian.device if device is None else torch.device(device)
    cols = hessian.shape[0]
    diag = _check_hessian(hessian, dtype).to(device)  # (cols,)
    dead = diag == 0  # (cols,) inputs that were always zero: no calibration signal
    live_diag = diag[~dead]
    scale = float(live_diag.mean().item()) if live_diag.numel() else 1.0
    order = None  # processing order: order[j] = original column processed j-th
    if act_order:
        order = torch.argsort(diag, descending=True, stable=True)  # (cols,)
        dead = dead[order]
    work = _column_major(cols, dtype, device)

    def fill() -> None:
        if order is None:
            work.copy_(hessian)
        else:  # H[order][:, order], a chunk of rows at a time
            src_order = order.to(hessian.device)
            for r1 in range(0, cols, _CHUNK):
                rows = hessian.index_select(0, src_order[r1 : r1 + _CHUNK])  # (chunk, cols)
                work[r1 : r1 + _CHUNK].copy_(rows.index_select(1, src_order))
        work.diagonal()[dead] = 1.0

    upper, damp_used = _factor_in_place(work, fill, damp, scale)
    return ObsFactor(upper, dead, order, scale, float(damp), damp_used)


def hessian_of(stats: InputStats | Tensor | ObsFactor, method: str = "sparsegpt") -> Tensor | ObsFactor:
    """The (cols, cols) Hessian of ``stats`` (or ``stats`` itself, or a `factorize` result as it is);
    ValueError naming ``method`` if absent."""
    if isinstance(stats, ObsFactor):
        return stats
    if isinstance(stats, Tensor):
        hessian = stats
    else:
        hessian_or_none = stats.hessian
        if hessian_or_none is None:
            raise ValueError(f"{method} needs the input Hessian: build InputStats(..., hessian=True)")
        hessian = hessian_or_none
    _check_square(hessian)
    return hessian


def _check_square(hessian: Tensor) -> None:
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"Hessian must be a square (cols, cols) matrix, got {tuple(hessian.shape)}")


def hessian_cols(hessian: Tensor | ObsFactor) -> int:
    """Input features of a Hessian or of its factor."""
    return hessian.cols if isinstance(hessian, ObsFactor) else int(hessian.shape[0])


def check_block_size_and_damp(block_size: int, damp: float) -> None:
    """Raise ValueError unless ``block_size`` is a positive integer and ``damp`` a finite number >= 0."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")


def prune_sparsegpt(
    weight: Tensor,
    stats: InputStats | Tensor | ObsFactor,
    *,
    sparsity: float,
    pattern: Pattern = None,
    block_size: int = 128,
    damp: float = 0.01,
    quant: QuantScheme | None = None,
) -> PruneResult:
    """Prune ``weight`` with SparseGPT's blocked OBS updates, optionally quantizing it in the same pass.

    Args:
        weight: (rows, cols) Linear weight (not modified).
        stats: input statistics with a Hessian (``hessian=True``), the (cols, cols) Hessian itself, or its
            `factorize` result (made with the same ``damp``), shared by the layers reading the same input.
        sparsity: fraction pruned in every (rows, block) tile (unstructured); ignored for an N:M pattern.
        pattern: (n, m) = n zeros per m consecutive input weights of a row, or None for unstructured.
        block_size: columns per lazy-update block (and per unstructured mask tile). For an N:M pattern it
            is rounded down to a multiple of m (at least m), which does not change the result.
        damp: added to diag(H) as ``damp * mean(diag(H))`` over the live columns; 0 is allowed.
        quant: joint pruning + quantization: every column is pruned (set to exactly 0) or rounded to its
            group's grid, and the error ``(w - q) / U_ii`` is propagated to the later columns in both cases
            (GPTQ's update). A group's grid is fixed when the loop reaches the group's first column, from
            the current (updated) weights of the whole group. ``group_size`` must divide cols (and be a
            multiple of m for an N:M pattern); ``act_order`` is refused (the mask tiles and N:M groups
            follow the original column order). None: pruning only, exactly as without the argument.

    Masks under ``quant``: the same selection rules and exact counts; the first tile (first N:M group) is
    the mask of pruning alone, later ones can differ because the quantization error of earlier columns has
    been propagated into the weights they are chosen from. Kept weights may also round to 0.

    Returns:
        PruneResult with the (rows, cols) updated weight in the input dtype/device, the bool mask
        (True = pruned; also True on dead input columns, whose weights are zeroed) and the exact loss
        ``||(W - W') X^T||_F^2 / n = trace(dW H dW^T)`` for the undamped H. It is computed without a
        matmul: the OBS costs ``sum (w - q)^2 / U_ii^2`` add up to ``trace(dW (H + lam I) dW^T)`` for the
        damped Hessian, so ``lam * ||dW||_F^2`` is subtracted (nothing at ``damp=0``). With ``quant``,
        ``result.quant`` holds the codes, scales and zero-points (pruned weights: code = zero-point) and
        ``weight`` is their dequantization (exactly on the grid for float32/float64 weights).

    Raises:
        ValueError: bad arguments (shapes, sparsity, pattern, cols % m != 0, a group size that does not fit).
        SolverError: the Hessian is non-finite or cannot be factorised even after damping retries.
    """
    hessian = hessian_of(stats)
    check_weight(weight, hessian_cols(hessian))
    check_sparsity(sparsity)
    cols = weight.shape[1]
    check_pattern(pattern, cols)
    check_block_size_and_damp(block_size, damp)
    if quant is not None:
        _check_joint(quant, pattern, cols)
    if pattern is not None:
        block_size = max(pattern[1], block_size - block_size % pattern[1])
    return solve_obs(
        weight, hessian, sparsity=sparsity, pattern=pattern, block_size=block_size, damp=damp, quant=quant
    )


def _check_joint(quant: QuantScheme, pattern: Pattern, cols: int) -> None:
    if not isinstance(quant, QuantScheme):
        raise ValueError(f"quant must be a QuantScheme or None, got {quant!r}")
    check_group_size(cols, quant.group_size)
    if quant.act_order:
        raise ConfigError(
            "act_order cannot be combined with pruning: the mask tiles and N:M groups follow the original "
            "column order. Use act_order=False, or prune first and quantize with quantize_gptq(mask=...)"
        )
    if pattern is not None and quant.group_size is not None and quant.group_size % pattern[1] != 0:
        raise ConfigError(
            f"group size {quant.group_size} is not a multiple of {pattern[1]}: an {pattern[0]}:{pattern[1]} "
            "group would straddle two quantization groups"
        )


def solve_obs(
    weight: Tensor,
    hessian: Tensor | ObsFactor,
    *,
    sparsity: float,
    pattern: Pattern,
    block_size: int,
    damp: float,
    quant: QuantScheme | None = None,
    fixed_mask: Tensor | None = None,
) -> PruneResult:
    """The shared OBS core of SparseGPT and GPTQ on checked arguments (see `prune_sparsegpt`).

    ``hessian``: the (cols, cols) Hessian (not modified), or its `factorize` result made with the same
    ``damp`` and act-order (then nothing of size (cols, cols) is allocated here). ``fixed_mask`` (rows, cols),
    True = prune, replaces the mask selection (``sparsity`` and ``pattern`` are then unused).
    ``quant.act_order`` processes the columns by descending ``diag(H)`` (dead columns last); everything
    returned is in the original column order.

    Memory besides the inputs and the factor: the (cols, rows) working weight and mask, then the result.
    """
    act_order = quant is not None and quant.act_order
    if isinstance(hessian, ObsFactor):
        factor = hessian
        dtype = torch.float64 if weight.dtype == torch.float64 else factor.upper.dtype
        if factor.upper.dtype != dtype:
            raise ValueError(
                f"a {factor.upper.dtype} factor cannot solve {weight.dtype} weights: factorize(dtype={dtype})"
            )
        if factor.damp != damp or (factor.order is not None) != act_order:
            raise ValueError(
                f"the factor was made with damp={factor.damp:g}, act_order={factor.order is not None}; "
                f"this solve asks for damp={damp:g}, act_order={act_order}"
            )
    else:
        dtype = torch.float64 if torch.float64 in (weight.dtype, hessian.dtype) else torch.float32
        factor = factorize(hessian, damp=damp, act_order=act_order, dtype=dtype, device=weight.device)
    upper = factor.upper.to(weight.device)  # (cols, cols)
    dead = factor.dead.to(weight.device)  # (cols,)
    order = None if factor.order is None else factor.order.to(weight.device)
    damp_used, scale = factor.damp_used, factor.scale
    del factor  # a factor made here is freed with ``upper``

    cols, rows = weight.shape[1], weight.shape[0]
    w_t = torch.empty((cols, rows), dtype=dtype, device=weight.device)  # column i of W is row i here
    w_t.copy_(weight.detach().t())
    fixed_t = None if fixed_mask is None else fixed_mask.to(weight.device).t().contiguous()  # (cols, rows)
    if order is not None:
        w_t = w_t.index_select(0, order)
        fixed_t = None if fixed_t is None else fixed_t[order]
    w_t[dead] = 0.0  # no loss either way: X has zeros there
    grid = None
    if quant is not None:
        grid = ColumnQuantizer(quant, cols, rows, device=w_t.device, dtype=dtype, order=order)
    mask_t, damped_loss = _sparsegpt_columns(w_t, upper, sparsity, pattern, block_size, grid, fixed_t)
    del upper
    mask_t[dead] = True
    loss = damped_loss
    if damp_used > 0:  # remove the damping term lam * ||dW||^2 (dead columns: dW == 0 here)
        loss -= damp_used * scale * _moved_square(weight, w_t, dead, order)
    if order is not None:
        inverse = torch.argsort(order)  # back to the original column order
        w_t, mask_t = w_t.index_select(0, inverse), mask_t[inverse]
    out = torch.empty((rows, cols), dtype=weight.dtype, device=weight.device)
    out.copy_(w_t.t())
    del w_t
    return PruneResult(
        weight=out,
        mask=mask_t.t().contiguous(),
        loss=loss,
        quant=None if grid is None else grid.result(),
    )


def _moved_square(weight: Tensor, w_t: Tensor, dead: Tensor, order: Tensor | None) -> float:
    """``||W - W'||_F^2`` over the live columns, ``w_t`` = W'^T in processing order, by column chunks."""
    total = 0.0
    cols = w_t.shape[0]
    for c1 in range(0, cols, _CHUNK):
        c2 = min(c1 + _CHUNK, cols)
        idx = torch.arange(c1, c2, device=w_t.device) if order is None else order[c1:c2]
        start = weight.detach().index_select(1, idx).t().to(w_t.dtype)  # (chunk, rows)
        start[dead[c1:c2]] = 0.0
        total += float((start - w_t[c1:c2]).square().sum().item())
    return total


def _sparsegpt_columns(
    w_t: Tensor,
    upper: Tensor,
    sparsity: float,
    pattern: Pattern,
    block_size: int,
    grid: ColumnQuantizer | None = None,
    fixed_t: Tensor | None = None,
) -> tuple[Tensor, float]:
    """Prune (and quantize, with ``grid``) the transposed weight ``w_t`` (cols, rows) in place.

    Returns the (cols, rows) mask and the summed OBS costs ``sum ((w - q) / U_ii)^2``.

    Working on W^T keeps every column of W contiguous and makes the in-block updates row slices. With a
    grid, blocks also start at every group start, so that a group's grid is fixed from weights that carry
    the updates of every earlier column; unstructured mask tiles stay ``block_size`` wide.
    """
    cols, rows = w_t.shape
    diag = upper.diagonal()  # (cols,)
    mask_t = (
        torch.zeros(cols, rows, dtype=torch.bool, device=w_t.device) if fixed_t is None else fixed_t.clone()
    )
    loss = torch.zeros((), dtype=w_t.dtype, device=w_t.device)
    select_nm = fixed_t is None and pattern is not None
    n, m = (0, 1) if pattern is None else pattern
    # cumulative rounding: tile counts add up to exactly round(rows * cols * sparsity)
    pruned_before = [round(rows * i * sparsity) for i in range(cols + 1)] if pattern is None else []
    starts = list(range(0, cols, block_size))
    group_starts = set() if grid is None else set(grid.group_starts)
    starts = sorted(set(starts) | group_starts)
    for i1, i2 in zip(starts, [*starts[1:], cols], strict=True):
        w_b = w_t[i1:i2]  # (count, rows) view
        u_b = upper[i1:i2, i1:i2]  # (count, count)
        d_b = diag[i1:i2, None]  # (count, 1)
        m_b = mask_t[i1:i2]  # (count, rows) view
        err_b = torch.empty_like(w_b)  # (count, rows): (w - q) / d per processed column
        if fixed_t is None and pattern is None and i1 % block_size == 0:  # a mask tile starts
            t2 = min(i1 + block_size, cols)
            k = pruned_before[t2] - pruned_before[i1]
            mask_t[i1:t2] = lowest_k_mask(w_t[i1:t2].square() / diag[i1:t2, None].square(), k)
        if grid is not None and i1 in group_starts:  # current weights of the whole group
            g2 = i1 + grid.group_cols
            weights = None
            if grid.scheme.clip == "mse":  # OBS rounding costs; weights already known to be pruned left out
                weights = diag[i1:g2, None].square().reciprocal() * ~mask_t[i1:g2]  # (N:M: none known yet)
            grid.start_group(i1, w_t[i1:g2], weights)
        # (count, rows): 1/d where pruned, else 0 (N:M: filled per group as its mask is chosen)
        err_scale = torch.empty_like(w_b) if select_nm else m_b / d_b
        count = i2 - i1
        # Two-level lazy updates: rank-1 updates touch only a narrow panel of ``inner`` columns; the rest
        # of the block gets one matmul per panel. Same arithmetic as eager in-block updates, far less
        # memory traffic (the per-column update of the whole block is memory-bound on a CPU).
        inner = _INNER if pattern is None else max(pattern[1], _INNER - _INNER % pattern[1])
        for j1 in range(0, count, inner):
            j2 = min(j1 + inner, count)
            for i in range(j1, j2):
                if select_nm and i % m == 0:
                    score = (w_b[i : i + m].square() / d_b[i : i + m].square()).t()  # (rows, m)
                    m_b[i : i + m] = nm_mask(score, n, m).t()
                    torch.div(m_b[i : i + m], d_b[i : i + m], out=err_scale[i : i + m])
                if grid is None:
                    torch.mul(w_b[i], err_scale[i], out=err_b[i])
                    # W[:, j] -= err * U[i, j] for i <= j < j2; for j == i this takes a pruned weight to ~0.
                    w_b[i:j2].addr_(u_b[i, i:j2], err_b[i], alpha=-1)
                else:  # round to the grid (0 where pruned); the error is propagated as for pruning
                    q = grid.column(i1 + i, w_b[i], m_b[i])  # (rows,)
                    torch.sub(w_b[i], q, out=err_b[i]).div_(d_b[i])
                    w_b[i:j2].addr_(u_b[i, i:j2], err_b[i], alpha=-1)
                    w_b[i] = q  # exactly on the grid (the update leaves rounding residue)
            if j2 < count:
                w_b[j2:].addmm_(u_b[j1:j2, j2:].t(), err_b[j1:j2], alpha=-1)  # (count - j2, rows)
        w_b.masked_fill_(m_b, 0.0)  # exact zeros where pruned (the update leaves rounding residue)
        loss += err_b.square().sum()
        if i2 < cols:
            w_t[i2:].addmm_(upper[i1:i2, i2:].t(), err_b, alpha=-1)  # lazy update of later columns
    return mask_t, float(loss.item())
