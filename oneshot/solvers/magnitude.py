"""Magnitude pruning: drop the weights with the smallest ``|W_ij|``.

The classic baseline compares magnitudes over the whole layer (unstructured); an N:M pattern picks the n
smallest ``|W_ij|`` in every group of m consecutive input weights of a row. Input statistics are optional
and only used to report the exact reconstruction loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from oneshot.solvers import Pattern, PruneResult
from oneshot.solvers.masks import check_sparsity, check_weight, select_mask
from oneshot.stats import InputStats, reconstruction_loss

__all__ = ["prune_magnitude"]


def prune_magnitude(
    weight: Tensor,
    stats: InputStats | None = None,
    *,
    sparsity: float,
    pattern: Pattern = None,
) -> PruneResult:
    """Zero the smallest-magnitude weights.

    Args:
        weight: (rows, cols) Linear weight (not modified).
        stats: optional input statistics of the layer; with a Hessian the exact loss is reported.
        sparsity: fraction of the layer's weights to prune (unstructured); ignored for an N:M pattern.
        pattern: (n, m) = n zeros per m consecutive input weights of a row, or None for unstructured.

    Returns:
        PruneResult with the (rows, cols) pruned weight (input dtype/device), the bool mask (True = pruned,
        exactly ``round(rows * cols * sparsity)`` for unstructured) and ``trace(dW H dW^T)`` or None.
    """
    check_weight(weight, None if stats is None else stats.cols)
    check_sparsity(sparsity)
    # (rows, cols); fp32 holds every bf16/fp16 value exactly, float64 stays float64
    score = weight.detach().abs().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    mask = select_mask(score, sparsity, pattern, group="layer")
    pruned = weight.detach().masked_fill(mask, 0)
    hessian = None if stats is None else stats.hessian
    loss = None if hessian is None else reconstruction_loss(torch.where(mask, weight.detach(), 0), hessian)
    return PruneResult(weight=pruned, mask=mask, loss=loss)
