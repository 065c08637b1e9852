"""Perplexity under the standard protocol (GPTQ / SparseGPT / Wanda).

The test text is tokenized once and cut into non-overlapping windows of ``seqlen`` tokens (the tail
shorter than a window is dropped); perplexity = exp(mean next-token NLL over every predicted token).
Data loading is kept apart (`eval.corpora`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["PerplexityResult", "perplexity", "windows"]


@dataclass
class PerplexityResult:
    value: float  # exp(mean NLL)
    nll: float  # mean next-token negative log-likelihood (nats)
    windows: int
    seqlen: int
    tokens: int  # predicted tokens (windows * (seqlen - 1))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def windows(input_ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of a (1, N) or (N,) token stream -> (windows, seqlen)."""
    flat = input_ids.reshape(-1)
    count = flat.numel() // seqlen
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 window, got {limit}")
        count = min(count, limit)
    if count < 1:
        raise ValueError(f"text has {flat.numel()} tokens, shorter than one window of {seqlen}")
    return flat[: count * seqlen].reshape(count, seqlen)


@torch.no_grad()
def perplexity(
    model: Any,
    input_ids: torch.Tensor,
    seqlen: int,
    batch_size: int = 1,
    *,
    limit: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on a token stream, in non-overlapping windows of ``seqlen``."""
    from tqdm.auto import tqdm

    chunks = windows(input_ids, seqlen, limit)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    total = 0.0
    count = 0
    for start in tqdm(
        range(0, chunks.shape[0], batch_size),
        desc="perplexity",
        unit="batch",
        disable=not progress,
        leave=False,
    ):
        batch = chunks[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += batch[:, 1:].numel()
        del logits
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, chunks.shape[0], seqlen, count)
