"""Packed forms of a quantized model for other runtimes: `compressed_tensors` (vLLM, transformers with the
`compressed-tensors` package) and `gguf` (llama.cpp, Ollama). Pure functions from weights and grids to
tensors, configs and files; `oneshot.jobs.export` reads the run folder and writes the export folder."""

from __future__ import annotations

from oneshot.errors import OneshotError

__all__ = ["ExportError"]


class ExportError(OneshotError):
    """A run folder that cannot be exported as asked (the message says why and what would work)."""
