"""``--target dense``: solve each layer to reproduce the DENSE model's output from the PRUNED model's inputs.

A Linear with weight ``W`` (rows, cols) sees inputs ``X`` (n, cols) in the pruned model, while the same tokens
reached it as ``X_d`` in the dense model. The local objective ``||X W^T - X W'^T||^2`` only undoes this
layer's own pruning; the dense target also corrects what the pruned prefix already changed:

    min_W' ||X_d W^T - X W'^T||^2 + lam ||W' - W||^2,   lam = damp * mean(diag H)

With ``H = X^T X / n`` and ``C = X^T X_d / n`` the unconstrained optimum solves ``(H + lam I) W*^T = C W^T +
lam W^T``, that is

    W* = W + W T,   T = (C - H)^T (H + lam I)^-1

and (for lam = 0) ``||X_d W^T - X W'^T||^2 = ||X (W* - W')^T||^2 + const`` for every W', so the solvers run
unchanged on ``W*`` with the same ``H``: SparseGPT's OBS updates, Wanda's scores ``|W*_ij| ||X_j||``. The
ridge pulls toward ``W`` (not toward 0): where ``X_d = X`` (block 0, ``--propagate dense``) ``C = H`` and
``W* = W`` exactly, so the dense target equals the local one there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from oneshot.solvers import SolverError

__all__ = ["dense_target_map", "retarget"]


def dense_target_map(hessian: Tensor, cross: Tensor, *, damp: float = 0.01) -> Tensor:
    """``T = (C - H)^T (H + lam I)^-1`` (cols, cols) with ``lam = damp * mean(diag H)`` over the live inputs.

    ``hessian``: ``X^T X / n``; ``cross``: ``X^T X_d / n`` (`InputStats.cross`). Inputs that were always 0
    in the pruned model (a zero diagonal) carry no signal: their columns of ``T`` are 0, so ``W*[:, j] =
    W[:, j]``. Computed in float64
    when either input is float64, else float32; the damping is multiplied by 10 (up to 4 times) when the
    factorisation fails.

    Raises:
        ValueError: mismatched or non-square shapes, a bad ``damp``.
        SolverError: non-finite statistics, or no factorisation even after the retries.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1] or cross.shape != hessian.shape:
        raise ValueError(
            f"dense_target_map: need square Hessian and cross-statistics of one shape, got "
            f"{tuple(hessian.shape)} and {tuple(cross.shape)}"
        )
    if not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    dtype = torch.float64 if torch.float64 in (hessian.dtype, cross.dtype) else torch.float32
    h = hessian.to(dtype)
    c = cross.to(device=h.device, dtype=dtype)
    if not (bool(torch.isfinite(h).all()) and bool(torch.isfinite(c).all())):
        raise SolverError("dense_target_map: non-finite Hessian or cross-statistics")
    diag = torch.diagonal(h)
    dead = diag == 0  # (cols,) inputs that were always 0 in the pruned model
    live = diag[~dead]
    scale = float(live.mean()) if live.numel() else 1.0
    rhs = c - h  # (cols, cols): the right-hand sides of (H + lam I) M = C - H
    del c
    rhs[dead] = 0.0
    lam = damp * scale
    for _ in range(5):
        damped = h.clone()
        damped.diagonal().add_(lam)
        damped.diagonal()[dead] = 1.0
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            m = torch.cholesky_solve(rhs, chol)  # (H + lam I)^-1 (C - H)
            del chol
            if bool(torch.isfinite(m).all()):
                return m.T.contiguous()
            del m
        lam = max(lam * 10.0, 1e-6 * scale)
    raise SolverError("dense_target_map: the damped Hessian could not be factorised (raise --target-damp)")


def retarget(weight: Tensor, tmap: Tensor) -> Tensor:
    """``W* = W + W T`` in the map's dtype, returned in ``weight``'s dtype and device."""
    w = weight.to(device=tmap.device, dtype=tmap.dtype)
    return (w + w @ tmap).to(device=weight.device, dtype=weight.dtype)
