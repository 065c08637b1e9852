"""GGUF files for llama.cpp and Ollama, written with the ``gguf`` package's `GGUFWriter`.

Supported architectures (``config.json``'s ``model_type`` -> llama.cpp's ``general.architecture``): ``llama``
(Llama, SmolLM2, shrunk ones included) and ``qwen2``. Facts of the format this module follows:

- tensor names come from the ``gguf`` package's own map for the architecture (``blk.N.attn_q.weight``, ...);
  ``output.weight`` is left out when the embeddings are tied (readers tie them back);
- llama: llama.cpp's rotary layout differs from transformers' for ``q_proj`` / ``k_proj``; their rows are
  permuted within each head (pairs interleaved) as llama.cpp's converter does, and readers undo it. qwen2
  uses the layout as it is;
- metadata: ``<arch>.context_length``, ``embedding_length``, ``block_count``, ``feed_forward_length``,
  ``attention.head_count`` / ``head_count_kv``, ``attention.layer_norm_rms_epsilon``, ``rope.freq_base``,
  ``rope.dimension_count`` (the head size; ``attention.key_length`` / ``value_length`` too when it is not
  hidden / heads), ``vocab_size``, ``general.file_type``;
- tokenizer (byte-level BPE only, i.e. ``tokenizer.ggml.model = "gpt2"``): every token by id, its type
  (1 normal, 3 control for special added tokens, 4 user-defined for other added tokens), the merges, the
  pre-tokenizer name (``tokenizer.ggml.pre``: carried from the GGUF the model came from, else ``qwen2`` for
  Qwen2 and ``gpt-2`` for a plain byte-level split; otherwise left out, with a warning), the special token
  ids, whether BOS is added, and the chat template;
- types: ``f32``; ``f16``; ``q8_0`` (blocks of 32 weights with one f16 scale, llama.cpp's quantizer from the
  ``gguf`` package) for 2-D weights whose width is a multiple of 32, f16 otherwise. 1-D tensors (norms,
  biases) are always f32.

Anything else (Gemma 3 and other architectures, biases llama.cpp's llama graph would not read, RoPE scaling,
non-BPE tokenizers) is refused with one line before anything is written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oneshot.exporters import ExportError

__all__ = ["ARCHITECTURES", "check_architecture", "gguf_loader", "gguf_name", "permute_rotary", "write_gguf"]

logger = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # config.json model_type -> GGUF architecture
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's LlamaFileType
Q8_BLOCK = 32


def check_architecture(config: dict[str, Any]) -> str:
    """The GGUF architecture of a ``config.json``; `ExportError` (one line) for what this export cannot
    write faithfully."""
    model_type = str(config.get("model_type"))
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ExportError(
            f"GGUF export supports the architectures {', '.join(ARCHITECTURES)} (Llama and SmolLM2, Qwen2); "
            f"this model is {model_type!r}"
        )
    rope = config.get("rope_scaling")
    params = config.get("rope_parameters") or {}
    kind = (rope or {}).get("rope_type") or (rope or {}).get("type") or params.get("rope_type")
    if kind not in (None, "default"):
        raise ExportError(f"GGUF export writes no RoPE scaling; this model uses rope_type {kind!r}")
    if arch == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        raise ExportError(
            "GGUF export of llama models with attention or MLP biases is not supported (transformers' GGUF "
            "reader would drop them): e.g. a shrink with --mlp-bias auto"
        )
    return arch


def gguf_name(run_dir: Path, gguf_type: str) -> str:
    """The file name inside the export folder: ``<run folder name>-<type>.gguf``."""
    return f"{Path(run_dir).resolve().name}-{gguf_type}.gguf"


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' q/k rows (each head: the first half of the rotary pairs, then the second) in llama.cpp's
    order (each head: pairs interleaved). (rows, cols) -> (rows, cols)."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return dict(config.get("text_config") or config)


def _tensor_data(tensor: torch.Tensor, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) of one tensor in the export's type."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    array = tensor.detach().to(torch.float32).cpu().numpy()
    if array.ndim < 2 or gguf_type == "f32":
        return array.astype(np.float32), None
    if gguf_type == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        return quantize(array, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def _pre_tokenizer(run_dir: Path, arch: str, tokenizer_json: dict[str, Any]) -> str | None:
    record = run_dir / "oneshot.json"
    if record.is_file():  # a model that came from a GGUF file: its own pre-tokenizer name
        try:
            source = json.loads(record.read_text()).get("source") or {}
        except ValueError:
            source = {}
        path = source.get("path")
        if source.get("kind") in ("default", "gguf") and path and Path(path).is_file():
            from gguf import GGUFReader

            field = GGUFReader(path).fields.get("tokenizer.ggml.pre")
            if field is not None:
                return str(field.contents())
    if arch == "qwen2":
        return "qwen2"
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return None


def _add_tokenizer(writer: Any, run_dir: Path, arch: str) -> None:
    from gguf import TokenType
    from transformers import AutoTokenizer

    path = run_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"GGUF export needs a fast tokenizer: {path} is missing")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(
            f"GGUF export writes byte-level BPE tokenizers only; {path} is a {model.get('type')} tokenizer"
        )
    tok = AutoTokenizer.from_pretrained(str(run_dir))
    vocab = tok.get_vocab()  # token -> id, added tokens included
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(TokenType.UNUSED)] * size
    for token, index in vocab.items():
        tokens[index], types[index] = token, int(TokenType.NORMAL)
    for added in data.get("added_tokens") or []:
        index = int(added["id"])
        types[index] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    pre = _pre_tokenizer(run_dir, arch, data)
    if pre is None:
        logger.warning(
            "no llama.cpp pre-tokenizer name is known for this tokenizer: llama.cpp uses its default"
        )
    else:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("unk_token_id", writer.add_unk_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = getattr(tok, name, None)
        if isinstance(value, int):
            add(value)
    ids = tok("a")["input_ids"]
    writer.add_add_bos_token(bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def write_gguf(run_dir: Path, folder: Path, gguf_type: str, weights: dict[str, torch.Tensor]) -> str:
    """Write ``<folder>/<gguf_name>`` from the run's ``config.json``, tokenizer and ``weights`` (the
    checkpoint's tensors by transformers name); returns the file name."""
    from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter, get_tensor_name_map

    config = json.loads((run_dir / "config.json").read_text())
    arch = check_architecture(config)
    text = _text_config(config)
    hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    blocks = int(text["num_hidden_layers"])
    rope = text.get("rope_parameters") or {}
    theta = float(text.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    name = gguf_name(run_dir, gguf_type)
    writer = GGUFWriter(str(folder / name), arch)
    writer.add_name(Path(run_dir).resolve().name)
    writer.add_file_type(FILE_TYPES[gguf_type])
    writer.add_context_length(int(text.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(int(text["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(float(text.get("rms_norm_eps") or 1e-6))
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != hidden:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(text["vocab_size"]))
    writer.add_quantization_version(2)
    _add_tokenizer(writer, run_dir, arch)

    arch_id = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch)
    assert isinstance(arch_id, MODEL_ARCH)
    names = get_tensor_name_map(arch_id, blocks)
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    for key, tensor in weights.items():
        if key == "lm_head.weight" and tied:
            continue
        base, _, suffix = key.rpartition(".")
        target = names.get_name(base)
        if target is None:
            raise ExportError(f"the tensor {key} has no GGUF name in llama.cpp's {arch} layout")
        if arch == "llama" and target.endswith(("attn_q", "attn_k")):
            tensor = permute_rotary(tensor, heads if target.endswith("attn_q") else kv_heads)
        data, raw = _tensor_data(tensor, gguf_type)
        writer.add_tensor(f"{target}.{suffix}", data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return name


def gguf_loader(folder: Path, name: str) -> Any:
    """A function loading the GGUF file back with transformers' own GGUF reader (float32)."""

    def load() -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32).eval()

    return load
