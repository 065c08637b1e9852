"""oneshot: one-shot pruning of Hugging Face causal LMs (magnitude, Wanda, SparseGPT)."""

from oneshot.config import PruneConfig, parse_pattern
from oneshot.data import calibration_windows
from oneshot.models import load_model
from oneshot.pruner import PruneReport, prune

__all__ = ["PruneConfig", "PruneReport", "calibration_windows", "load_model", "parse_pattern", "prune"]
__version__ = "0.1.0"
