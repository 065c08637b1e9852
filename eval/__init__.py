"""Evaluation of pruned models: perplexity (standard protocol) and, later, lm-eval tasks and long-tail slices."""

from eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
