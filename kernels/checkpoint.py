"""Build sparse models from checkpoints, and save/load the compressed form directly.

* ``load_sparse_model(folder)``: a pruned (dense-with-zeros) Hugging Face checkpoint ->
  ``from_pretrained`` + ``convert``; a folder written by ``save_compressed`` -> ``load_compressed``.
* ``save_compressed(model, folder)``: ``sparse_model.safetensors`` (compressed ``SparseLinear`` weights as
  ``<layer>.weight.values`` / ``.meta`` / ``.bitmask`` / ``.offsets`` + every other tensor dense, see
  ``kernels.formats.save_sparse``) next to the model's ``config.json``, generation config and, if given,
  the tokenizer files.
* ``load_compressed(folder)``: rebuilds the model skeleton from ``config.json`` without allocating dense
  weights and fills it with the stored tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .dispatch import Dispatcher
from .formats import SPARSE_TYPES, SparseWeight, load_sparse, save_sparse
from .linear import ConvertSummary, SparseLinear, convert, summarize

__all__ = ["COMPRESSED_WEIGHTS", "load_compressed", "load_sparse_model", "save_compressed"]

COMPRESSED_WEIGHTS = "sparse_model.safetensors"
_MODEL_METADATA_KEY = "oneshot.model"


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def save_compressed(model: nn.Module, folder: str | os.PathLike[str], *, tokenizer: Any = None) -> Path:
    """Write ``model`` (after ``convert``) in compressed form to ``folder``.

    Tensors shared between modules (tied embeddings) are stored once and re-linked on load.

    Args:
        model: a model whose pruned layers are ``SparseLinear`` (other tensors are stored dense).
        folder: output folder (created if needed).
        tokenizer: a tokenizer (``save_pretrained`` is called) or a folder to copy tokenizer files from;
            if None, they are copied from ``model.name_or_path`` when that is a local folder.

    Returns:
        The path of the weights file.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor | SparseWeight] = {}
    sparse_prefixes: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            tensors[f"{name}.weight"] = module.weight_compressed
            sparse_prefixes.append(f"{name}.weight_")
    aliases: dict[str, str] = {}
    first_of: dict[tuple[int, int, tuple[int, ...], torch.dtype], str] = {}
    for key, value in model.state_dict().items():
        if any(key.startswith(p) for p in sparse_prefixes):
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.dtype)
        if value.numel() and ident in first_of:
            aliases[key] = first_of[ident]
            continue
        first_of[ident] = key
        tensors[key] = value
    info = {"sparse_layers": [p[: -len(".weight_")] for p in sparse_prefixes], "aliases": aliases}
    path = out / COMPRESSED_WEIGHTS
    save_sparse(path, tensors, {"format": "pt", _MODEL_METADATA_KEY: json.dumps(info)})
    config = getattr(model, "config", None)
    if config is not None:
        config.save_pretrained(out)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    else:
        source = Path(tokenizer if tokenizer is not None else getattr(model, "name_or_path", "") or "")
        if str(source) and source.is_dir() and source.resolve() != out.resolve():
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, out / name)
    return path


def load_compressed(
    folder: str | os.PathLike[str],
    *,
    device: torch.device | str = "cpu",
    backend: str = "auto",
    keep_dense: bool = False,
    dispatcher: Dispatcher | None = None,
    model_class: Any = None,
) -> nn.Module:
    """Load a model written by ``save_compressed``; compressed layers come back as ``SparseLinear``.

    Args:
        folder: the folder holding ``sparse_model.safetensors`` and ``config.json``.
        device: where to put the tensors.
        backend, keep_dense, dispatcher: passed to every ``SparseLinear``.
        model_class: a class with ``from_config`` (default ``transformers.AutoModelForCausalLM``).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    src = Path(folder)
    tensors, metadata = load_sparse(src / COMPRESSED_WEIGHTS, device=device)
    info = json.loads(metadata.get(_MODEL_METADATA_KEY, '{"aliases": {}}'))
    dtypes = [t.dtype for t in tensors.values() if isinstance(t, SPARSE_TYPES)]
    dtypes += [t.dtype for t in tensors.values() if isinstance(t, Tensor) and t.is_floating_point()]
    config = AutoConfig.from_pretrained(src)
    cls = model_class or AutoModelForCausalLM
    # Parameters on the meta device (no memory, no init); buffers such as rotary tables are real.
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtypes[0] if dtypes else None)
    dense = {name: t for name, t in tensors.items() if isinstance(t, Tensor)}
    for name, value in tensors.items():
        if isinstance(value, Tensor):
            continue
        if not name.endswith(".weight"):
            raise ValueError(f"{src}: compressed entry {name!r} is not a layer weight")
        layer = name[: -len(".weight")]
        bias = dense.pop(f"{layer}.bias", None)
        module = SparseLinear(value, bias, backend=backend, keep_dense=keep_dense, dispatcher=dispatcher)
        parent_name, _, child = layer.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    for alias, original in info.get("aliases", {}).items():
        dense[alias] = dense[original]
    result = model.load_state_dict(dense, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"{src}: tensors not in the model: {result.unexpected_keys[:8]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if missing:
        raise ValueError(f"{src}: no stored values for {missing[:8]} ({len(missing)} in all)")
    model.to(device)
    return model.eval()


def load_sparse_model(
    folder: str | os.PathLike[str],
    format: str = "auto",
    *,
    ignore: tuple[str, ...] = (),
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    keep_dense: bool = False,
    dispatcher: Dispatcher | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[nn.Module, ConvertSummary]:
    """Build a sparse model from a pruned checkpoint folder (or a ``save_compressed`` folder).

    A pruned checkpoint is loaded with ``AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
    **from_pretrained_kwargs)`` (e.g. ``gguf_file=...``), moved to ``device`` and converted with
    ``convert(model, format, ignore=ignore, ...)``. A compressed folder is loaded with ``load_compressed``.

    Returns:
        ``(model, summary)`` with the model in eval mode.
    """
    from transformers import AutoModelForCausalLM

    src = Path(folder)
    if (src / COMPRESSED_WEIGHTS).is_file():
        model = load_compressed(
            src, device=device or "cpu", backend=backend, keep_dense=keep_dense, dispatcher=dispatcher
        )
        if dtype is not None:
            model.to(dtype)
        return model, summarize(model)
    pretrained: nn.Module = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **from_pretrained_kwargs)
    if device is not None:
        pretrained.to(device)
    summary = convert(
        pretrained, format, ignore=ignore, backend=backend, keep_dense=keep_dense, dispatcher=dispatcher
    )
    return pretrained.eval(), summary
