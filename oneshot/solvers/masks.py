"""Pruning masks from scores: exact top-k per group and N:M per group of M consecutive weights.

Every mask is a bool tensor with True where the weight is PRUNED. Both selectors prune exactly the
requested number of lowest scores per group: entries below the k-th smallest score are pruned, and
entries equal to it are pruned in index order until exactly ``k`` are (ties broken by position, as a stable
sort would). The threshold rule ``score <= sorted[k]`` (which prunes ``k + 1`` or more weights, more with
ties) is never used.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "check_pattern",
    "check_sparsity",
    "check_weight",
    "group_counts",
    "lowest_k_mask",
    "nm_mask",
    "prune_count",
    "select_mask",
    "sparsity_of",
    "topk_mask",
]

Group = Literal["row", "layer"]
_GROUPS: tuple[str, ...] = ("row", "layer")


def prune_count(numel: int, sparsity: float) -> int:
    """Number of weights to prune in a group of ``numel``: ``round(numel * sparsity)`` (Python rounding)."""
    check_sparsity(sparsity)
    return round(numel * sparsity)


def group_counts(groups: int, group_numel: int, sparsity: float) -> list[int]:
    """Prune counts of ``groups`` groups of ``group_numel`` weights, summing to exactly
    ``round(groups * group_numel * sparsity)``.

    Cumulative rounding: group ``g`` gets ``round((g + 1) * c) - round(g * c)`` with ``c = group_numel *
    sparsity``, i.e. floor(c) or ceil(c), spread evenly. Rounding each group on its own instead would make
    the achieved sparsity drift from the request (at 0.999 with 64 columns every row would round to 64:
    all weights pruned).
    """
    check_sparsity(sparsity)
    per_group = group_numel * sparsity
    cum = [round(g * per_group) for g in range(groups + 1)]
    return [b - a for a, b in itertools.pairwise(cum)]


def check_sparsity(sparsity: float) -> None:
    """Raise ValueError unless ``sparsity`` is a finite fraction in [0, 1]."""
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool):
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if not math.isfinite(sparsity) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1], got {sparsity!r}")


def check_pattern(pattern: tuple[int, int] | None, cols: int | None = None) -> None:
    """Validate an N:M pattern (n zeros in every m consecutive weights); None (unstructured) passes.

    With ``cols`` given, also require ``cols % m == 0`` so that every row splits into whole groups.
    """
    if pattern is None:
        return
    try:
        n, m = pattern
    except (TypeError, ValueError):
        raise ValueError(f"pattern must be None or a pair (n, m), got {pattern!r}") from None
    if not (isinstance(n, int) and isinstance(m, int)) or isinstance(n, bool) or isinstance(m, bool):
        raise ValueError(f"pattern (n, m) must hold integers, got {pattern!r}")
    if m < 1 or not 0 <= n <= m:
        raise ValueError(f"pattern (n, m) needs m >= 1 and 0 <= n <= m, got {pattern!r}")
    if cols is not None and cols % m != 0:
        raise ValueError(
            f"{n}:{m} pattern needs the number of input columns to be a multiple of {m}, "
            f"but the weight has {cols} columns"
        )


def check_weight(weight: Tensor, cols: int | None = None) -> None:
    """Raise ValueError unless ``weight`` is a finite floating-point (rows, cols) matrix.

    With ``cols`` given (the statistics' input width), the column counts must agree.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (rows, cols), got shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be floating point, got {weight.dtype}")
    if cols is not None and weight.shape[1] != cols:
        raise ValueError(f"weight has {weight.shape[1]} input columns but the input statistics have {cols}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"weight of shape {tuple(weight.shape)} contains NaN or Inf")


def _check_score(score: Tensor) -> None:
    if score.is_complex() or score.dtype == torch.bool:
        raise ValueError(f"score must be a real tensor, got dtype {score.dtype}")
    if torch.isnan(score).any():
        raise ValueError("score contains NaN; cannot rank weights for pruning")


def _lowest_k(score: Tensor, k: int) -> Tensor:
    """Bool mask of exactly the ``k`` lowest entries in each row of a 2-D ``score`` (groups, group_size).

    Entries tied with the k-th value are pruned in index order, so the result equals the first ``k`` of a
    stable ascending sort, at the cost of a selection (``kthvalue``) instead of a full sort.
    """
    if k <= 0:
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    kth = torch.kthvalue(score, k, dim=1, keepdim=True).values  # (groups, 1)
    below = score < kth  # (groups, group_size), fewer than k per row
    ties = score == kth
    missing = k - below.sum(dim=1, keepdim=True)  # (groups, 1), >= 1
    return below | (ties & (ties.cumsum(dim=1) <= missing))


def topk_mask(score: Tensor, sparsity: float, group: Group = "row") -> Tensor:
    """Prune exactly ``round(numel * sparsity)`` lowest scores of the tensor, compared per group.

    Args:
        score: importance of each weight, shape (rows, cols) (any shape for ``group="layer"``; for
            ``group="row"`` the last dimension is the row).
        sparsity: fraction to prune in [0, 1].
        group: ``"row"`` compares scores within each row (last dimension), each row pruning
            floor or ceil of ``cols * sparsity`` (`group_counts`, so that the tensor's total is exact);
            ``"layer"`` compares all entries of the tensor at once.

    Returns:
        bool tensor shaped like ``score``, True = prune.
    """
    if group not in _GROUPS:
        raise ValueError(f"unknown group {group!r}: choose one of {', '.join(_GROUPS)}")
    check_sparsity(sparsity)
    _check_score(score)
    if score.numel() == 0:
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if group == "row":
        if score.dim() == 0:
            raise ValueError("group='row' needs a score with at least one dimension")
        flat = score.reshape(-1, score.shape[-1])  # (rows, cols)
    else:
        flat = score.reshape(1, -1)  # (1, numel)
    counts = torch.tensor(group_counts(flat.shape[0], flat.shape[1], sparsity), device=flat.device)  # (rows,)
    low, high = int(counts.min()), int(counts.max())
    mask = _lowest_k(flat, low)
    if high != low:
        mask = torch.where((counts == high)[:, None], _lowest_k(flat, high), mask)
    return mask.reshape(score.shape)


def lowest_k_mask(score: Tensor, k: int) -> Tensor:
    """Prune exactly the ``k`` lowest scores of the whole tensor (ties broken by position)."""
    _check_score(score)
    if not 0 <= k <= score.numel():
        raise ValueError(f"cannot prune {k} of {score.numel()} weights")
    return _lowest_k(score.reshape(1, -1), k).reshape(score.shape)


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """Prune exactly the ``n`` lowest scores in every group of ``m`` consecutive entries of a row.

    Args:
        score: shape (rows, cols) (or (..., cols)) with ``cols % m == 0``.
        n: weights pruned per group, 0 <= n <= m.
        m: group length along the last dimension.

    Returns:
        bool tensor shaped like ``score``, True = prune.
    """
    check_pattern((n, m))
    if score.dim() == 0 or score.shape[-1] % m != 0:
        raise ValueError(
            f"{n}:{m} mask needs the last dimension to be a multiple of {m}, got score of shape "
            f"{tuple(score.shape)}"
        )
    _check_score(score)
    groups = score.reshape(-1, m)  # (rows * cols / m, m)
    return _lowest_k(groups, n).reshape(score.shape)


def sparsity_of(mask_or_weight: Tensor) -> float:
    """Fraction of pruned entries: True entries of a bool mask, or exact zeros of a weight."""
    if mask_or_weight.numel() == 0:
        return 0.0
    pruned = mask_or_weight if mask_or_weight.dtype == torch.bool else mask_or_weight == 0
    return int(pruned.sum().item()) / mask_or_weight.numel()


def select_mask(
    score: Tensor, sparsity: float, pattern: tuple[int, int] | None, group: Group = "row"
) -> Tensor:
    """Mask from a (rows, cols) score: ``nm_mask`` for an (n, m) pattern, else ``topk_mask`` per ``group``.

    For an N:M pattern the mask comes from the pattern alone and ``sparsity`` is not used (callers pass
    n / m).
    """
    if pattern is not None:
        check_pattern(pattern, score.shape[-1])
        return nm_mask(score, *pattern)
    return topk_mask(score, sparsity, group)
