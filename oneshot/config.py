"""The one configuration object of a pruning run.

`PruneConfig` is frozen: every field is validated and normalised in ``__post_init__`` so that a config
that exists is a config that can run. Bad user input raises ``ValueError`` with the valid choices.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from oneshot.errors import OneshotError

__all__ = [
    "DTYPES",
    "METHODS",
    "PROPAGATE",
    "UNCALIBRATED",
    "ConfigError",
    "PruneConfig",
    "parse_pattern",
]

METHODS = ("magnitude", "wanda", "sparsegpt")
DTYPES = ("float32", "bfloat16", "float16")
PROPAGATE = ("pruned", "dense")
UNCALIBRATED = ("magnitude", "dense")
DEVICES = ("auto", "cpu", "cuda")

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class ConfigError(OneshotError, ValueError):
    """An invalid setting; the message lists the valid choices."""


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """Parse ``"unstructured"`` -> None and ``"N:M"`` -> (N, M) with 0 < N < M.

    N:M means N zeros in every M consecutive input weights of a row (2:4 keeps 2 of 4).
    """
    text = str(pattern).strip().lower()
    if text in ("unstructured", "none", ""):
        return None
    match = _NM_RE.match(text)
    if not match:
        raise ConfigError(
            f"invalid pattern {pattern!r}: expected 'unstructured' or 'N:M' with integers 0 < N < M "
            "(e.g. 2:4, 4:8)"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError(
            f"invalid pattern {pattern!r}: N:M needs 0 < N < M (N zeros in every M weights), e.g. 2:4 or 4:8"
        )
    return n, m


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides the result of a pruning run.

    Defaults follow the standard SparseGPT / Wanda protocol: 128 calibration windows of 2048 tokens from
    C4, seed 0, sparsity 50 %, pruned activations propagated to the next block.
    """

    method: str = "sparsegpt"
    sparsity: float | None = None  # None -> 0.5 for unstructured, N/M for an N:M pattern
    pattern: str = "unstructured"  # "unstructured" or "N:M"
    calib: str = "c4"  # c4 | wikitext2 | self | PATH | hf:DATASET_ID
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    damp: float = 0.01  # SparseGPT: damping relative to mean(diag(H))
    block_size: int = 128  # SparseGPT: columns per lazy-update block
    ignore: tuple[str, ...] = ()  # fnmatch patterns of Linear names to keep dense
    propagate: str = "pruned"  # feed the pruned ("pruned") or the dense ("dense") block outputs forward
    dtype: str = "float32"
    device: str = "auto"
    batch_size: int = 8  # calibration windows per block forward
    layer_loss: bool = True  # also collect Hessians for magnitude/Wanda to report exact per-layer loss
    # weights that receive no calibration tokens (an MoE expert no token was routed to, a Linear that never
    # runs): "magnitude" prunes them by magnitude with a warning, "dense" keeps them dense (reported)
    uncalibrated: str = "magnitude"
    model: str | None = None  # path, Hub id or .gguf file; None -> embedded SmolLM2-135M-Instruct
    data_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance, not used by the algorithm

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        method = str(self.method).strip().lower()
        if method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        set_(self, "method", method)

        nm = parse_pattern(self.pattern)
        set_(self, "pattern", "unstructured" if nm is None else f"{nm[0]}:{nm[1]}")
        sparsity = self.sparsity
        if sparsity is not None:
            try:
                sparsity = float(sparsity)
            except (TypeError, ValueError):
                raise ConfigError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}") from None
            if not math.isfinite(sparsity) or not 0.0 <= sparsity < 1.0:
                raise ConfigError(f"sparsity must be a fraction in [0, 1), got {self.sparsity!r}")
        if nm is not None:
            implied = nm[0] / nm[1]
            if sparsity is not None and abs(sparsity - implied) > 1e-9:
                raise ConfigError(
                    f"sparsity {sparsity} contradicts pattern {self.pattern} (which prunes {implied:g}); "
                    f"pass --sparsity {implied:g} or leave it out"
                )
            sparsity = implied
        set_(self, "sparsity", 0.5 if sparsity is None else sparsity)

        for name in ("nsamples", "seqlen", "batch_size", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if not math.isfinite(float(self.damp)) or float(self.damp) < 0:
            raise ConfigError(f"damp must be a finite number >= 0, got {self.damp!r}")
        set_(self, "damp", float(self.damp))
        if self.propagate not in PROPAGATE:
            raise ConfigError(f"unknown propagate {self.propagate!r}: choose one of {', '.join(PROPAGATE)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if not _DEVICE_RE.match(str(self.device)):
            raise ConfigError(
                f"unknown device {self.device!r}: choose one of {', '.join(DEVICES)} or cuda:N (e.g. cuda:0)"
            )
        if self.uncalibrated not in UNCALIBRATED:
            raise ConfigError(
                f"unknown uncalibrated {self.uncalibrated!r}: choose one of {', '.join(UNCALIBRATED)}"
            )
        set_(self, "ignore", tuple(str(p) for p in self.ignore))
        if not str(self.calib).strip():
            raise ConfigError("calib must name a source: c4, wikitext2, self, a file path or hf:DATASET_ID")

    @property
    def nm(self) -> tuple[int, int] | None:
        """The parsed pattern: (N, M) or None for unstructured."""
        return parse_pattern(self.pattern)

    def replace(self, **changes: Any) -> PruneConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        out = dataclasses.asdict(self)
        out["ignore"] = list(self.ignore)
        return out
