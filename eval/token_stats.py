"""Per-token statistics of a dense and a pruned model on the same tokens, and their running sums.

This module owns the numbers of the long-tail report: for every predicted token

- ``nll_dense``, ``nll_pruned``: next-token negative log-likelihood (nats) under each model;
- ``kl``: KL(dense || pruned) = sum_v p_dense(v) * (log p_dense(v) - log p_pruned(v)) of the two
  next-token distributions (nats), computed in float32 in row chunks so that the vocab-sized logits
  (49152 for SmolLM2) never need more than a few MB at once;

and per slice (`SliceStats`): mean NLL of each model, perplexity = exp(mean NLL), mean KL, token count
and ``rel_degradation = ppl_pruned / ppl_dense - 1 = exp(nll_pruned - nll_dense) - 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SliceStats", "next_token_stats"]

_CHUNK_ELEMENTS = 1 << 22  # rows x vocab of fp32 log-probs handled at once (16 MB)


def next_token_stats(
    dense_logits: torch.Tensor,
    pruned_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position NLL of both models and KL(dense || pruned), in float32.

    ``dense_logits``, ``pruned_logits``: (T, V) logits predicting ``targets`` (T,) (already shifted:
    row t predicts targets[t]). Rows are processed in chunks of ``chunk_rows`` (default: about 4M
    elements per chunk) so that only a few (chunk, V) float32 tensors exist at once.
    Returns ``nll_dense`` (T,), ``nll_pruned`` (T,), ``kl`` (T,).
    """
    if dense_logits.shape != pruned_logits.shape or dense_logits.ndim != 2:
        raise ValueError(
            f"dense and pruned logits must both be (tokens, vocab), got {tuple(dense_logits.shape)} "
            f"and {tuple(pruned_logits.shape)}"
        )
    rows, vocab = dense_logits.shape
    if targets.shape != (rows,):
        raise ValueError(f"targets must be ({rows},), got {tuple(targets.shape)}")
    step = chunk_rows or max(1, _CHUNK_ELEMENTS // max(1, vocab))
    nll_d, nll_p, kl = [], [], []
    pruned_logits = pruned_logits.to(dense_logits.device)
    targets = targets.to(dense_logits.device)
    for s in range(0, rows, step):
        ld = F.log_softmax(dense_logits[s : s + step].float(), dim=-1)  # (chunk, V)
        lp = F.log_softmax(pruned_logits[s : s + step].float(), dim=-1)  # (chunk, V)
        t = targets[s : s + step, None]  # (chunk, 1)
        nll_d.append(-ld.gather(1, t).squeeze(1))
        nll_p.append(-lp.gather(1, t).squeeze(1))
        kl.append((ld.exp() * (ld - lp)).sum(-1))
        del ld, lp
    return torch.cat(nll_d).cpu(), torch.cat(nll_p).cpu(), torch.cat(kl).cpu()


@dataclass
class SliceStats:
    """Running sums over the predicted tokens of a slice (float64)."""

    tokens: int = 0
    windows: int = 0
    nll_dense: float = 0.0
    nll_pruned: float = 0.0
    kl: float = 0.0
    delta_sq: float = 0.0  # sum of (nll_pruned - nll_dense)^2, for a standard error

    def add(self, nll_d: torch.Tensor, nll_p: torch.Tensor, kl: torch.Tensor) -> None:
        """Add the (T,) per-token values of one window."""
        d = nll_p.double() - nll_d.double()
        self.tokens += nll_d.numel()
        self.nll_dense += float(nll_d.double().sum())
        self.nll_pruned += float(nll_p.double().sum())
        self.kl += float(kl.double().sum())
        self.delta_sq += float((d * d).sum())

    def to_dict(self) -> dict[str, Any]:
        """Means over tokens; ``rel_degradation = ppl_pruned / ppl_dense - 1``."""
        n = self.tokens
        if n == 0:
            return {"tokens": 0, "windows": self.windows}
        md, mp = self.nll_dense / n, self.nll_pruned / n
        delta = mp - md
        var = max(0.0, self.delta_sq / n - delta * delta)
        return {
            "tokens": n,
            "windows": self.windows,
            "nll_dense": md,
            "nll_pruned": mp,
            "ppl_dense": _exp(md),
            "ppl_pruned": _exp(mp),
            "delta_nll": delta,
            "delta_nll_se": math.sqrt(var / (n - 1)) if n > 1 else None,
            "rel_degradation": math.expm1(delta) if delta < 700 else math.inf,
            "kl": self.kl / n,
        }


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf
