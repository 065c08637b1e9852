"""Running statistics of a Linear layer's calibration inputs, shared by every solver.

For inputs ``X`` of shape (n_tokens, cols) the solvers need

* the Hessian of the layer-wise reconstruction loss, ``H = X^T X / n`` (cols, cols) -- SparseGPT, and the
  exact loss ``trace(dW H dW^T) = ||dW X^T||_F^2 / n`` of any pruned weight;
* the squared input-feature norms ``sum_t x_tj^2 / n`` (cols,) -- Wanda (``||X_j||_2`` up to the constant
  factor ``sqrt(n)``, which does not change any ranking).

Accumulation: raw sums (``X^T X`` or ``sum_t x_tj^2``) are kept in ``dtype`` and divided by the token count
only when read. One matmul per ``add``; no rescaling of the running state, so summing the same tokens in any
batching gives the same sums up to floating-point reassociation. With fp32 the sums stay far from overflow for
realistic activations (|x| < 1e4 and 1e9 tokens still fit easily).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["InputStats", "reconstruction_loss"]


class InputStats:
    """Running statistics of one Linear layer's inputs ``X`` of shape (n_tokens, cols).

    Args:
        cols: input features of the layer (``in_features``).
        hessian: keep the full (cols, cols) ``X^T X`` (needed by SparseGPT and for exact losses); otherwise
            only the (cols,) squared column norms are kept (enough for Wanda).
        device: where the sums live (normally the compute device of the block).
        dtype: accumulation dtype (fp32 by default; float64 in tests).
    """

    def __init__(
        self,
        cols: int,
        *,
        hessian: bool,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
            raise ValueError(f"cols must be a positive integer, got {cols!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.cols = cols
        self.device = torch.device(device)
        self.dtype = dtype
        self.n = 0  # tokens seen so far
        self._full = bool(hessian)
        # Raw sums: (cols, cols) sum_t x_t^T x_t with the Hessian, else (cols,) sum_t x_t^2.
        shape = (cols, cols) if self._full else (cols,)
        self._sum: Tensor | None = torch.zeros(shape, device=self.device, dtype=dtype)

    @property
    def has_hessian(self) -> bool:
        """Whether the full ``X^T X`` is kept."""
        return self._full

    def add(self, x: Tensor) -> None:
        """Add a batch of inputs ``x`` of shape (..., cols); any float dtype, cast to ``self.dtype``.

        Raises ValueError on a wrong last dimension or on non-finite activations (the running sums are left
        untouched in that case).
        """
        if x.dim() == 0 or x.shape[-1] != self.cols:
            raise ValueError(f"expected inputs of shape (..., {self.cols}), got {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.cols).to(device=self.device, dtype=self.dtype)  # (tokens, cols)
        tokens = x.shape[0]
        if tokens == 0:
            return
        # Every non-finite x_tj makes the diagonal entry sum_t x_tj^2 non-finite, and so does an overflow;
        # checking the (small) product instead of x also catches the latter.
        part = x.T @ x if self._full else x.square().sum(dim=0)  # (cols, cols) or (cols,)
        if not bool(torch.isfinite(part).all()):
            raise ValueError(
                "InputStats.add: non-finite activations (NaN/Inf, or overflow in "
                f"{self.dtype}) in the calibration inputs of a layer with {self.cols} input features; "
                "check the model dtype (try float32) and the calibration data"
            )
        self._live_sum().add_(part)
        self.n += tokens

    def _live_sum(self) -> Tensor:
        if self._sum is None:
            raise ValueError("InputStats: the Hessian was taken (take_hessian); these statistics are spent")
        return self._sum

    def _require_tokens(self) -> Tensor:
        """The running sum; ValueError when no tokens were seen or the Hessian was taken."""
        total = self._live_sum()
        if self.n == 0:
            raise ValueError("InputStats has seen no tokens; call add() with calibration inputs first")
        return total

    @property
    def hessian(self) -> Tensor | None:
        """``X^T X / n``, shape (cols, cols), or None when built with ``hessian=False``. A new tensor."""
        if not self._full:
            return None
        return self._require_tokens() / self.n

    def take_hessian(self) -> Tensor:
        """``X^T X / n`` computed in place in the running sum, which these statistics give up: no (cols, cols)
        copy is made, and the Hessian is freed as soon as the caller drops it. Afterwards ``n`` and
        ``has_hessian`` still answer, while ``add``, ``hessian``, ``sq_norms`` and ``take_hessian`` raise
        ValueError. Bit for bit equal to ``hessian``."""
        if not self._full:
            raise ValueError("InputStats.take_hessian: built with hessian=False")
        hessian = self._require_tokens().div_(self.n)
        self._sum = None
        return hessian

    @property
    def sq_norms(self) -> Tensor:
        """``sum_t x_tj^2 / n``, shape (cols,) (equals ``diag(hessian)`` when the Hessian is kept)."""
        total = self._require_tokens()
        return (torch.diagonal(total) if self._full else total) / self.n

    def __repr__(self) -> str:
        return (
            f"InputStats(cols={self.cols}, hessian={self.has_hessian}, n={self.n}, "
            f"device={self.device}, dtype={self.dtype})"
        )


def reconstruction_loss(delta: Tensor, hessian: Tensor) -> float:
    """Layer-wise reconstruction loss ``trace(dW H dW^T) = ||dW X^T||_F^2 / n``.

    Args:
        delta: weight change ``W - W'``, shape (rows, cols).
        hessian: ``X^T X / n``, shape (cols, cols).

    Computed in float64 when either input is float64, else in float32, on ``delta``'s device.
    """
    dtype = torch.float64 if torch.float64 in (delta.dtype, hessian.dtype) else torch.float32
    d = delta.to(dtype)
    h = hessian.to(device=delta.device, dtype=dtype)
    return float(((d @ h) * d).sum().item())
