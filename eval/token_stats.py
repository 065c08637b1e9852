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

__all__ = ["BLOCK_TOKENS", "SliceStats", "next_token_stats"]

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


BLOCK_TOKENS = 32
"""Consecutive predicted tokens of a window that form one cluster of the standard error: neighbouring tokens'
NLL differences are correlated, so the per-token formula would overstate the evidence."""


@dataclass
class SliceStats:
    """Running sums over the predicted tokens of a slice (float64).

    The standard error of the mean NLL difference is cluster-robust: every window is cut into blocks of
    `BLOCK_TOKENS` consecutive tokens, and ``se^2 = G / (G - 1) * sum_g (S_g - n_g * d)^2 / n^2`` with
    ``S_g`` the block's sum of differences, ``n_g`` its token count, ``d`` the mean difference and ``G`` the
    number of blocks (the ratio-estimator variance of a clustered mean). It needs only the running sums of
    ``S_g^2``, ``S_g n_g`` and ``n_g^2``.
    """

    tokens: int = 0
    windows: int = 0
    nll_dense: float = 0.0
    nll_pruned: float = 0.0
    kl: float = 0.0
    delta_sq: float = 0.0  # sum of (nll_pruned - nll_dense)^2 over tokens
    blocks: int = 0  # G
    block_sq: float = 0.0  # sum_g S_g^2
    block_cross: float = 0.0  # sum_g S_g n_g
    block_n_sq: float = 0.0  # sum_g n_g^2

    def add(self, nll_d: torch.Tensor, nll_p: torch.Tensor, kl: torch.Tensor) -> None:
        """Add the (T,) per-token values of one window."""
        d = nll_p.double() - nll_d.double()
        self.tokens += nll_d.numel()
        self.nll_dense += float(nll_d.double().sum())
        self.nll_pruned += float(nll_p.double().sum())
        self.kl += float(kl.double().sum())
        self.delta_sq += float((d * d).sum())
        for block in d.split(BLOCK_TOKENS):
            s, n = float(block.sum()), block.numel()
            self.blocks += 1
            self.block_sq += s * s
            self.block_cross += s * n
            self.block_n_sq += n * n

    def merge(self, other: SliceStats) -> None:
        """Add another slice's sums (its windows and blocks stay clusters of their own)."""
        for name in (
            "tokens", "windows", "nll_dense", "nll_pruned", "kl", "delta_sq",
            "blocks", "block_sq", "block_cross", "block_n_sq",
        ):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def delta_se(self) -> float | None:
        """Cluster-robust standard error of the mean per-token NLL difference (None below 2 blocks)."""
        n, g = self.tokens, self.blocks
        if n == 0 or g < 2:
            return None
        d = (self.nll_pruned - self.nll_dense) / n
        ss = self.block_sq - 2 * d * self.block_cross + d * d * self.block_n_sq
        return math.sqrt(max(0.0, ss) * g / (g - 1)) / n

    def to_dict(self) -> dict[str, Any]:
        """Means over tokens; ``rel_degradation = ppl_pruned / ppl_dense - 1``."""
        n = self.tokens
        if n == 0:
            return {"tokens": 0, "windows": self.windows}
        md, mp = self.nll_dense / n, self.nll_pruned / n
        delta = mp - md
        return {
            "tokens": n,
            "windows": self.windows,
            "blocks": self.blocks,
            "nll_dense": md,
            "nll_pruned": mp,
            "ppl_dense": _exp(md),
            "ppl_pruned": _exp(mp),
            "delta_nll": delta,
            "delta_nll_se": self.delta_se(),
            "rel_degradation": math.expm1(delta) if delta < 700 else math.inf,
            "kl": self.kl / n,
        }


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf
