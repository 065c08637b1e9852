"""Running statistics of a Linear layer's calibration inputs, shared by every solver.

For inputs ``X`` of shape (n_tokens, cols) the solvers need

* the Hessian of the layer-wise reconstruction loss, ``H = X^T X / n`` (cols, cols) -- SparseGPT, and the
  exact loss ``trace(dW H dW^T) = ||dW X^T||_F^2 / n`` of any pruned weight;
* the squared input-feature norms ``sum_t x_tj^2 / n`` (cols,) -- Wanda (``||X_j||_2`` up to the constant
  factor ``sqrt(n)``, which does not change any ranking);
* with ``cross``, ``X^T X_ref / n`` (cols, cols), where ``X_ref`` are the same tokens' inputs to the same layer
  in a reference forward (the dense model's, for ``--target dense``: `oneshot.solvers.target`).

With ``first_token_weight`` w, the first token of every sequence counts ``1 + w * seq`` times in every sum
(the attention sink of the q/k/v inputs, `oneshot.config.QuantConfig.sink_weight`), ``n`` still counting
tokens; losses computed from such statistics weight that token the same way.

Accumulation: raw sums (``X^T X`` or ``sum_t x_tj^2``) are kept in ``dtype`` and divided by the token count
only when read. One matmul per ``add``; no rescaling of the running state, so summing the same tokens in any
batching gives the same sums up to floating-point reassociation. With fp32 the sums stay far from overflow for
realistic activations (|x| < 1e4 and 1e9 tokens still fit easily).
"""

from __future__ import annotations

import math

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
        cross: also keep ``X^T X_ref``; every `add` then takes the reference inputs of the same tokens.
        first_token_weight: the first token of every sequence (inputs shaped (..., seq, cols)) counts
            ``1 + first_token_weight * seq`` times in the sums (the attention sink, see
            `oneshot.config.QuantConfig.sink_weight`); ``n`` still counts tokens, so ``hessian`` is
            ``(X^T X + w seq X_0^T X_0) / n``. 0: every token once.
    """

    def __init__(
        self,
        cols: int,
        *,
        hessian: bool,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        cross: bool = False,
        first_token_weight: float = 0.0,
    ) -> None:
        if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
            raise ValueError(f"cols must be a positive integer, got {cols!r}")
        if not math.isfinite(first_token_weight) or first_token_weight < 0:
            raise ValueError(f"first_token_weight must be a finite number >= 0, got {first_token_weight!r}")
        if first_token_weight and cross:
            raise ValueError("first_token_weight cannot be combined with cross statistics")
        self.first_token_weight = float(first_token_weight)
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
        # sum_t x_t^T x_ref_t, (cols, cols): the cross-statistics of --target dense
        self._cross: Tensor | None = (
            torch.zeros((cols, cols), device=self.device, dtype=dtype) if cross else None
        )
        self._has_cross = bool(cross)

    @property
    def has_hessian(self) -> bool:
        """Whether the full ``X^T X`` is kept."""
        return self._full

    @property
    def has_cross(self) -> bool:
        """Whether ``X^T X_ref`` is kept (built with ``cross=True``)."""
        return self._has_cross

    def add(self, x: Tensor, reference: Tensor | None = None) -> None:
        """Add a batch of inputs ``x`` of shape (..., cols); any float dtype, cast to ``self.dtype``.
        ``reference``: with ``cross``, the same tokens' inputs in the reference forward (the same shape).

        Raises ValueError on a wrong last dimension, a missing or misshapen reference, or non-finite
        activations (the running sums are left untouched in those cases).
        """
        if x.dim() == 0 or x.shape[-1] != self.cols:
            raise ValueError(f"expected inputs of shape (..., {self.cols}), got {tuple(x.shape)}")
        if self._has_cross and (reference is None or reference.shape != x.shape):
            got = None if reference is None else tuple(reference.shape)
            raise ValueError(f"cross statistics need reference inputs of shape {tuple(x.shape)}, got {got}")
        first = None
        if self.first_token_weight and x.dim() >= 2 and x.shape[-2] > 0:
            seq = x.shape[-2]
            first = x.detach()[..., 0, :].reshape(-1, self.cols).to(device=self.device, dtype=self.dtype)
            first = first * math.sqrt(self.first_token_weight * seq)  # (sequences, cols)
        x = x.detach().reshape(-1, self.cols).to(device=self.device, dtype=self.dtype)  # (tokens, cols)
        tokens = x.shape[0]
        if tokens == 0:
            return

        # Every non-finite x_tj makes the diagonal entry sum_t x_tj^2 non-finite, and so does an overflow;
        # checking the (small) product instead of x also catches the latter.
        part = x.T @ x if self._full else x.square().sum(dim=0)  # (cols, cols) or (cols,)
        if first is not None:
            part += first.T @ first if self._full else first.square().sum(dim=0)
        if not bool(torch.isfinite(part).all()):
            raise ValueError(
                "InputStats.add: non-finite activations (NaN/Inf, or overflow in "
                f"{self.dtype}) in the calibration inputs of a layer with {self.cols} input features; "
                "check the model dtype (try float32) and the calibration data"
            )
        cross = None
        if self._has_cross:
            assert reference is not None
            ref = reference.detach().reshape(-1, self.cols).to(device=self.device, dtype=self.dtype)
            cross = x.T @ ref  # (cols, cols)
            if not bool(torch.isfinite(cross).all()):
                raise ValueError(
                    f"InputStats.add: non-finite reference activations in a layer with {self.cols} inputs"
                )
        self._live_sum().add_(part)
        if cross is not None:
            if self._cross is None:
                raise ValueError("InputStats: the cross-statistics were taken (take_cross)")
            self._cross.add_(cross)
        self.n += tokens

    def all_reduce(self) -> None:
        """Sum the running sums and the token count over the processes of the default ``torch.distributed``
        group (`oneshot.distributed`): afterwards every rank holds the statistics of all ranks' tokens."""
        import torch.distributed as dist

        dist.all_reduce(self._live_sum())
        if self._cross is not None:
            dist.all_reduce(self._cross)
        n = torch.tensor([self.n], dtype=torch.int64, device=self.device)
        dist.all_reduce(n)
        self.n = int(n.item())

    def _live_sum(self) -> Tensor:
        if self._sum is None:
            raise ValueError("InputStats: the Hessian was taken (take_hessian); these statistics are spent")
        return self._sum

    def _check_seen(self) -> None:
        if self.n == 0:
            raise ValueError("InputStats has seen no tokens; call add() with calibration inputs first")

    def _require_tokens(self) -> Tensor:
        """The running sum; ValueError when no tokens were seen or the Hessian was taken."""
        total = self._live_sum()
        self._check_seen()
        return total

    @property
    def hessian(self) -> Tensor | None:
        """``X^T X / n`` (with ``first_token_weight``, the first tokens' extra term included), shape
        (cols, cols), or None when built with ``hessian=False``. A new tensor."""
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
    def cross(self) -> Tensor | None:
        """``X^T X_ref / n``, shape (cols, cols), or None without ``cross``. A new tensor."""
        if not self._has_cross:
            return None
        if self._cross is None:
            raise ValueError("InputStats: the cross-statistics were taken (take_cross)")
        self._check_seen()
        return self._cross / self.n

    def take_cross(self) -> Tensor:
        """``X^T X_ref / n`` computed in place in its running sum, which is given up (as `take_hessian`)."""
        if self._cross is None:
            raise ValueError("InputStats.take_cross: no cross-statistics (built without cross, or taken)")
        self._check_seen()
        cross = self._cross.div_(self.n)
        self._cross = None
        return cross

    @property
    def sq_norms(self) -> Tensor:
        """``sum_t x_tj^2 / n``, shape (cols,) (equals ``diag(hessian)`` when the Hessian is kept)."""
        total = self._require_tokens()
        return (torch.diagonal(total) if self._full else total) / self.n

    def __repr__(self) -> str:
        return (
            f"InputStats(cols={self.cols}, hessian={self.has_hessian}, cross={self.has_cross}, n={self.n}, "
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
