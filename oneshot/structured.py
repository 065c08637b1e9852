"""Structured pruning math: which input units (columns, or groups of columns) of a consumer layer to remove,
and the least-squares re-fit of that layer on the units kept.

A consumer layer ``W`` (out, n) reads ``n`` input units (MLP channels for ``down_proj``; the head_dim-wide
column groups of the heads of a GQA group for ``o_proj``). With ``H = X^T X / tokens`` of its inputs:

- `refit`: ``W' = W H[:, K] (H[K, K] + lam I)^-1`` minimises ``||W X^T - W' X_K^T||^2`` over the kept units
  ``K`` (the damped normal equations, solved in float64 by default);
- `obs_removal_order`: greedy optimal-brain-surgeon removal of one group at a time (ZipLM-style): the group
  whose removal, with the best compensation of the remaining units, costs least goes first. Its weight
  updates are exactly the re-fit on the remaining units, and the costs add up to the re-fit loss;
- `activation_scores`: the cheap score ``||X_j|| * ||W[:, j]||`` per unit.

Pure functions on tensors (no modules, no state); all losses are ``||dW X^T||^2 / tokens = tr(dW H dW^T)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["activation_scores", "nested_refit_losses", "obs_removal_order", "refit", "refit_loss"]


def _damped(hessian: Tensor, damp: float) -> Tensor:
    h = hessian.clone()
    diag = h.diagonal()
    scale = float(diag.mean()) if diag.numel() else 1.0
    diag += damp * scale
    return h


def refit(
    weight: Tensor,
    hessian: Tensor,
    keep: Tensor,
    *,
    damp: float = 0.0,
    dtype: torch.dtype = torch.float64,
    cross: Tensor | None = None,
) -> Tensor:
    """The least-squares re-fit of ``weight`` (out, n) on the kept input units ``keep`` (k indices).

    Returns the (out, k) weight minimising ``tr((W S - W') H' (W S - W')^T)`` in the sense above: ``W' =
    W H[:, K] (H[K, K] + lam I)^-1`` with ``lam = damp * mean(diag H[K, K])``; in ``weight``'s dtype.
    ``cross`` (out, n) = ``E^T X / tokens`` re-fits to the shifted target ``X W^T + E`` instead (a
    correction ``E`` (tokens, out) the layer should add): ``W' = (W H[:, K] + cross[:, K]) (H[K, K] + lam I)^-1``.
    """
    w = weight.to(dtype)
    h = hessian.to(device=weight.device, dtype=dtype)
    keep = keep.to(weight.device)
    hkk = _damped(h[keep][:, keep], damp)  # (k, k)
    rhs = w @ h[:, keep]  # (out, k)
    if cross is not None:
        rhs = rhs + cross.to(device=weight.device, dtype=dtype)[:, keep]
    solved = torch.linalg.solve(hkk, rhs.T).T  # (out, k): rhs hkk^-1 (hkk symmetric)
    return solved.to(weight.dtype)


def refit_loss(weight: Tensor, hessian: Tensor, keep: Tensor, new_weight: Tensor) -> float:
    """``||W X^T - W' X_K^T||^2 / tokens`` of a re-fit: ``tr(D H D^T)`` with ``D = W - W' S^T`` in float64."""
    w = weight.to(torch.float64)
    full = torch.zeros_like(w)
    full[:, keep.to(w.device)] = new_weight.to(torch.float64)
    d = w - full  # (out, n)
    return float(((d @ hessian.to(device=w.device, dtype=torch.float64)) * d).sum())


def nested_refit_losses(weight: Tensor, hessian: Tensor, order: Tensor, *, damp: float = 0.0) -> Tensor:
    """The re-fit loss of keeping the first ``k`` units of ``order`` (most important first), for every ``k``
    from 0 to n at once -> (n + 1,) float64.

    With ``P`` the permutation, ``L L^T = P^T (H + lam I) P`` (Cholesky) and ``Z = L^-1 (W H P)^T``, the loss of
    the prefix ``K = order[:k]`` is ``tr(W H W^T) - sum_{i < k} ||Z_i||^2``: forward substitution gives every
    prefix's solution in one triangular solve. ``lam = damp * mean(diag H)`` for every ``k`` (`refit` damps
    with the mean over the kept units; the two agree at ``damp = 0``).
    """
    w = weight.to(torch.float64)
    h = hessian.to(device=w.device, dtype=torch.float64)
    idx = order.to(w.device)
    hp = _damped(h, damp)[idx][:, idx]  # (n, n)
    chol = torch.linalg.cholesky(hp)
    b = (w @ h[:, idx]).T  # (n, out)
    z = torch.linalg.solve_triangular(chol, b, upper=False)  # (n, out)
    explained = torch.cat([z.new_zeros(1), torch.cumsum(z.pow(2).sum(dim=1), dim=0)])  # (n + 1,)
    total = ((w @ h) * w).sum()
    return (total - explained).clamp_min(0.0)


def activation_scores(weight: Tensor, sq_norms: Tensor, group: int = 1) -> Tensor:
    """``||X_j|| * ||W[:, j]||`` per unit, summed over each group of ``group`` consecutive columns -> (n / group,)."""
    score = sq_norms.to(torch.float64).sqrt() * weight.to(torch.float64).norm(dim=0)  # (n,)
    return score.reshape(-1, group).sum(dim=1)


def obs_removal_order(
    weight: Tensor, hessian: Tensor, *, remove: int, group: int = 1, damp: float = 0.01
) -> tuple[list[int], list[float], Tensor]:
    """Remove ``remove`` groups of ``group`` consecutive input columns greedily by OBS.

    At each step the cost of removing group ``G`` with the best compensation of the other columns is
    ``tr(W_G (Hinv_GG)^-1 W_G^T)`` (``Hinv = (H + lam I)^-1`` restricted to the columns still there); the
    cheapest goes, ``W`` and ``Hinv`` are updated (``W -= W_G Hinv_GG^-1 Hinv_G:``, ``Hinv -= Hinv_:G
    Hinv_GG^-1 Hinv_G:``). Float64 throughout.

    Returns ``(removed group indices in order, their costs, the compensated (out, n) weight)``; the removed
    columns of the weight are zero and the others equal `refit` on the columns kept (same damping).
    """
    w = weight.to(torch.float64).clone()  # (out, n)
    n = w.shape[1]
    if n % group != 0:
        raise ValueError(f"{n} columns do not split into groups of {group}")
    groups = n // group
    if not 0 <= remove < groups:
        raise ValueError(f"cannot remove {remove} of {groups} groups (at least one must stay)")
    hinv = torch.linalg.inv(_damped(hessian.to(device=w.device, dtype=torch.float64), damp))  # (n, n)
    alive = torch.ones(groups, dtype=torch.bool)
    order: list[int] = []
    costs: list[float] = []
    cols = torch.arange(n, device=w.device).reshape(groups, group)  # (groups, group)
    if group == 1:  # the same steps with scalar pivots: no batched inverses
        return _obs_single_columns(w, hinv, remove, weight.dtype)
    for _ in range(remove):
        live = torch.nonzero(alive).flatten()  # (G,)
        idx = cols[live]  # (G, group)
        blocks = hinv[idx[:, :, None], idx[:, None, :]]  # (G, group, group)
        block_inv = torch.linalg.inv(blocks)  # (G, group, group)
        wg = w[:, idx]  # (out, G, group)
        cost = torch.einsum("ogi,gij,ogj->g", wg, block_inv, wg)  # (G,)
        pick = int(torch.argmin(cost))
        best, best_cost = int(live[pick]), float(cost[pick])
        idx, inv = idx[pick], block_inv[pick]
        w -= w[:, idx] @ inv @ hinv[idx, :]
        hinv -= hinv[:, idx] @ inv @ hinv[idx, :]
        w[:, idx] = 0.0
        hinv[idx, :] = 0.0
        hinv[:, idx] = 0.0
        alive[best] = False
        order.append(best)
        costs.append(best_cost)
    return order, costs, w.to(weight.dtype)


def _obs_single_columns(
    w: Tensor, hinv: Tensor, remove: int, dtype: torch.dtype
) -> tuple[list[int], list[float], Tensor]:
    """`obs_removal_order` for ``group == 1``: cost ``||W[:, j]||^2 / Hinv[j, j]``, rank-1 updates."""
    n = w.shape[1]
    sq = (w * w).sum(dim=0)  # (n,) column norms, kept up to date
    dead = torch.zeros(n, dtype=torch.bool, device=w.device)
    order: list[int] = []
    costs: list[float] = []
    for _ in range(remove):
        cost = torch.where(dead, torch.inf, sq / hinv.diagonal())  # (n,)
        j = int(torch.argmin(cost))
        row = hinv[j, :] / hinv[j, j]  # (n,)
        col = w[:, j].clone()  # (out,)
        # ||W[:, k] - col row_k||^2 = sq_k - 2 row_k (col . W[:, k]) + row_k^2 ||col||^2
        sq += row * (row * float(col @ col) - 2.0 * (col @ w))
        w.addr_(col, row, alpha=-1.0)
        hinv.addr_(hinv[:, j].clone(), row, alpha=-1.0)
        w[:, j] = 0.0
        hinv[j, :] = 0.0
        hinv[:, j] = 0.0
        hinv[j, j] = 1.0  # keeps the division above finite; the column is dead
        dead[j] = True
        order.append(j)
        costs.append(float(cost[j]))
    return order, costs, w.to(dtype)
