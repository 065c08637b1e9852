"""GPTQ: quantize a weight column by column, compensating each rounding error in the later columns.

Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers" (2023).

GPTQ is SparseGPT's optimal-brain-surgeon loop with "round to the grid" in place of "set to 0": with the
upper Cholesky factor ``U`` of the damped ``H^{-1}``, column ``i`` is rounded to ``q`` and
``W[:, i:] -= ((w - q) / U_ii) * U[i, i:]`` (same blocked lazy updates, damping retries, dead-column handling
and exact loss as `prune_sparsegpt`, which runs the code: `solve_obs`). A group's scale and zero-point are
fixed when the loop reaches the group's first column, from the group's current (updated) weights.

Act-order (``scheme.act_order``) processes columns by descending ``diag(H)``, the inputs with the most
energy first while many columns are left to absorb their error. Groups are consecutive in THAT order:
``g_idx[c] = (position of c in the order) // group_size``, which compressed-tensors' ``weight_g_idx`` (and
GPTQ's ``desc_act``) express; formats without a per-column group index cannot store it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from oneshot.solvers import PruneResult
from oneshot.solvers.masks import check_weight
from oneshot.solvers.quant import QuantScheme, check_group_size
from oneshot.solvers.sparsegpt import (
    ObsFactor,
    check_block_size_and_damp,
    hessian_cols,
    hessian_of,
    solve_obs,
)
from oneshot.stats import InputStats

__all__ = ["quantize_gptq"]


def quantize_gptq(
    weight: Tensor,
    stats: InputStats | Tensor | ObsFactor,
    scheme: QuantScheme,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    mask: Tensor | None = None,
) -> PruneResult:
    """Quantize ``weight`` with GPTQ.

    Args:
        weight: (rows, cols) Linear weight (not modified).
        stats: input statistics with a Hessian (``hessian=True``), the (cols, cols) Hessian itself, or its
            `factorize` result (same ``damp`` and act-order), shared by the layers reading the same input.
        scheme: bits, group size (must divide cols), symmetric or not, act-order, scale dtype.
        block_size: columns per lazy-update block (blocks also start at every group start).
        damp: added to diag(H) as ``damp * mean(diag(H))`` over the live columns; 0 is allowed.
        mask: optional (rows, cols) bool, True = already pruned (e.g. ``PruneResult.mask`` of any solver):
            those weights are set to exactly 0 (code = zero-point) and their error is propagated like a
            rounding error, so the sparsity pattern is kept exactly.

    Returns:
        PruneResult with the (rows, cols) dequantized weight in the input dtype (exactly on the grid for
        float32/float64 weights), the mask (``mask`` or all False, plus dead input columns, which are
        zeroed), the exact loss ``||(W - W_q) X^T||_F^2 / n`` for the undamped H, and ``quant``: the
        (rows, cols) codes, (rows, groups) scales and zero-points, and the (cols,) ``g_idx``.

    Raises:
        ValueError: bad arguments (shapes, a group size that does not divide cols, a bad mask).
        SolverError: the Hessian is non-finite or cannot be factorised even after damping retries.
    """
    if not isinstance(scheme, QuantScheme):
        raise ValueError(f"scheme must be a QuantScheme (e.g. QuantScheme.parse('w4a16')), got {scheme!r}")
    hessian = hessian_of(stats, "gptq")
    check_weight(weight, hessian_cols(hessian))
    check_group_size(weight.shape[1], scheme.group_size)
    check_block_size_and_damp(block_size, damp)
    if mask is None:
        mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    elif mask.dtype != torch.bool or mask.shape != weight.shape:
        raise ValueError(
            f"mask must be a bool tensor shaped like the weight {tuple(weight.shape)}, got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    return solve_obs(
        weight,
        hessian,
        sparsity=0.0,
        pattern=None,
        block_size=block_size,
        damp=damp,
        quant=scheme,
        fixed_mask=mask,
    )
