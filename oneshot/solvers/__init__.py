"""Pure one-shot pruning solvers: weight (rows, cols) + input statistics -> pruned weight, mask, loss.

Every solver has the signature ``solver(weight, stats, *, sparsity, pattern=None, ...) -> PruneResult``
and is a pure function (no module, no state, no printing). Registry: ``SOLVERS`` / ``get_solver``.
Quantization: ``quantize_gptq(weight, stats, scheme, ...)`` (GPTQ, the same OBS code as SparseGPT), and
``prune_sparsegpt(..., quant=scheme)`` for pruning and quantization in one pass; grids in `solvers.quant`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import torch

from oneshot.errors import OneshotError
from oneshot.solvers.quant import QuantizedWeight, QuantScheme

__all__ = [
    "SOLVERS",
    "Pattern",
    "PruneResult",
    "QuantScheme",
    "QuantizedWeight",
    "SolverError",
    "get_solver",
    "prune_magnitude",
    "prune_sparsegpt",
    "prune_wanda",
    "quantize_gptq",
]

Pattern: TypeAlias = tuple[int, int] | None
"""(n, m): n ZEROS in every m consecutive input weights of a row; None = unstructured."""


@dataclass(frozen=True)
class PruneResult:
    """Result of pruning one Linear weight.

    Attributes:
        weight: (rows, cols) pruned weight, same dtype/device as the input weight.
        mask: (rows, cols) bool, True where the weight was pruned (``weight[mask] == 0`` holds).
        loss: ``||(W - W') X^T||_F^2 / n = trace(dW H dW^T)`` when a Hessian is known, else None.
        quant: the integer codes, scales and zero-points when the weight was also quantized (``weight`` is
            then their dequantization), else None.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    loss: float | None
    quant: QuantizedWeight | None = None


class SolverError(OneshotError, RuntimeError):
    """A solver could not produce a result (e.g. the Hessian could not be factorised)."""


# The solver modules import PruneResult / SolverError from this package, so they are imported only after
# those names exist (keeps a single definition without a separate types module).
from oneshot.solvers.gptq import quantize_gptq  # noqa: E402
from oneshot.solvers.magnitude import prune_magnitude  # noqa: E402
from oneshot.solvers.sparsegpt import prune_sparsegpt  # noqa: E402
from oneshot.solvers.wanda import prune_wanda  # noqa: E402

SOLVERS: dict[str, Callable[..., PruneResult]] = {
    "magnitude": prune_magnitude,
    "wanda": prune_wanda,
    "sparsegpt": prune_sparsegpt,
}


def get_solver(name: str) -> Callable[..., PruneResult]:
    """Solver registered under ``name``; ValueError listing the valid choices otherwise."""
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver {name!r}: choose one of {', '.join(SOLVERS)}") from None
