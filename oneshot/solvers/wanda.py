"""Wanda: prune by ``|W_ij| * ||X_j||_2``, compared within each output row.

Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (2023). The score weighs
each weight by the norm of the input feature it multiplies; unstructured sparsity is applied per output
row (as in the paper), an N:M pattern per group of m consecutive input weights of a row. No weight update.
"""

from __future__ import annotations

import torch
from torch import Tensor

from oneshot.solvers import Pattern, PruneResult
from oneshot.solvers.masks import check_sparsity, check_weight, select_mask
from oneshot.stats import InputStats, reconstruction_loss

__all__ = ["prune_wanda"]


def prune_wanda(
    weight: Tensor,
    stats: InputStats,
    *,
    sparsity: float,
    pattern: Pattern = None,
) -> PruneResult:
    """Zero the weights with the smallest ``|W_ij| * ||X_j||_2`` in each row (or N:M group).

    Args:
        weight: (rows, cols) Linear weight (not modified).
        stats: input statistics of the layer (squared input norms; a Hessian only for the loss).
        sparsity: fraction pruned in every row (unstructured); ignored for an N:M pattern.
        pattern: (n, m) = n zeros per m consecutive input weights of a row, or None for unstructured.

    Returns:
        PruneResult with the (rows, cols) pruned weight (input dtype/device), the bool mask (True = pruned,
        floor or ceil of ``cols * sparsity`` per row for unstructured, exactly ``round(rows * cols * sparsity)``
        in the layer) and ``trace(dW H dW^T)`` or None.
    """
    check_weight(weight, stats.cols)
    check_sparsity(sparsity)
    w = weight.detach()
    dtype = torch.float64 if torch.float64 in (w.dtype, stats.dtype) else torch.float32
    # ||X_j||_2 up to the common factor sqrt(n), which does not change the ranking.
    norms = stats.sq_norms.to(device=w.device, dtype=dtype).sqrt()  # (cols,)
    score = w.to(dtype).abs() * norms  # (rows, cols)
    mask = select_mask(score, sparsity, pattern, group="row")
    hessian = stats.hessian
    loss = None if hessian is None else reconstruction_loss(torch.where(mask, w, 0), hessian)
    return PruneResult(weight=w.masked_fill(mask, 0), mask=mask, loss=loss)
