"""oneshot.eval: standard perplexity, lm-eval zero-shot tasks, long-tail slices and reports.

Imported as ``oneshot.eval`` (this folder is linked into the package). Submodules are imported explicitly,
e.g. ``from oneshot.eval.perplexity import perplexity``; nothing is re-exported here so that no function
shadows the submodule of the same name.
"""
