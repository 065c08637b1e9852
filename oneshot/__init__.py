"""oneshot: one-shot pruning of Hugging Face causal LMs (magnitude, Wanda, SparseGPT; structured shrinking).

The public names are imported on first use, so ``import oneshot`` (and the CLI's start) stays light: torch
and transformers load only when something needs them, inside the CLI's error handling.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "PruneConfig",
    "PruneReport",
    "RunConfig",
    "ShrinkConfig",
    "ShrinkReport",
    "calibration_windows",
    "load_model",
    "parse_pattern",
    "prune",
    "run_prune",
    "run_shrink",
]
__version__ = "0.1.0"

_HOME = {
    "PruneConfig": "oneshot.config",
    "RunConfig": "oneshot.config",
    "run_prune": "oneshot.jobs.prune",
    "ShrinkConfig": "oneshot.config",
    "ShrinkReport": "oneshot.runfolder",
    "run_shrink": "oneshot.jobs.shrink",  # the in-memory function is oneshot.shrink.shrink
    "parse_pattern": "oneshot.config",
    "calibration_windows": "oneshot.data",
    "load_model": "oneshot.models",
    "PruneReport": "oneshot.pruner",
    "prune": "oneshot.pruner",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'oneshot' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
