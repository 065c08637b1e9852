"""The compressed-tensors ``pack-quantized`` layout of weight-only integer quantization (W4A16, W8A16).

Facts of the format (as the `compressed-tensors` package reads it; this module only writes it):

- every quantized ``nn.Linear`` ``<name>`` is stored as ``<name>.weight_packed`` (int32, (rows,
  ceil(cols * bits / 32))), ``<name>.weight_scale`` ((rows, groups); (rows, 1) per channel),
  ``<name>.weight_shape`` (int64 ``[rows, cols]``) and, asymmetric only, ``<name>.weight_zero_point``
  packed the same way along the rows ((ceil(rows * bits / 32), groups)); a bias stays ``<name>.bias``;
- codes are signed, ``[-2^(b-1), 2^(b-1) - 1]``, and ``W = scale * (code - zero_point)`` with a signed
  zero-point; packing adds ``2^(b-1)`` and lays code ``i`` of a row at bit ``i * b`` of a little-endian
  stream of int32 words (no code straddles a word for 4 and 8 bits);
- ``config.json`` gets ``quantization_config``: ``quant_method`` ``compressed-tensors``, ``format``
  ``pack-quantized``, one config group targeting ``Linear`` with the weight arguments (``num_bits``, ``type``
  int, ``symmetric``, ``strategy`` group or channel, ``group_size``, ``dynamic`` false), no input or output
  activation quantization, ``quantization_status`` ``compressed`` and ``ignore`` = every other Linear
  (``lm_head`` first). Never a ``sparsity_config``: current vLLM refuses models that carry one.

Column reordering with a group index (GPTQ's act-order, ``actorder="group"``) is no longer read by
compressed-tensors: such runs are refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from oneshot.exporters import ExportError
from oneshot.solvers.quant import QuantizedWeight

__all__ = ["FORMAT", "pack_rows", "quantization_config", "tensors_of", "unpack_rows"]

FORMAT = "pack-quantized"


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """(rows, cols) signed int8 codes -> (rows, ceil(cols * bits / 32)) int32 words (see the module docstring)."""
    if bits not in (4, 8):
        raise ValueError(f"pack_rows packs 4- or 8-bit codes, not {bits}")
    rows, cols = codes.shape
    per_word = 32 // bits
    words = math.ceil(cols * bits / 32)
    unsigned = codes.to(torch.int64) + (1 << (bits - 1))  # (rows, cols) in [0, 2^bits)
    if bool((unsigned < 0).any()) or bool((unsigned >= (1 << bits)).any()):
        raise ValueError(f"codes outside the signed {bits}-bit range")
    padded = torch.zeros(rows, words * per_word, dtype=torch.int64)
    padded[:, :cols] = unsigned
    shifts = torch.arange(per_word, dtype=torch.int64) * bits  # (per_word,)
    packed = (padded.reshape(rows, words, per_word) << shifts).sum(-1)  # (rows, words) in [0, 2^32)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)  # the same bits as int32
    return packed.to(torch.int32)


def unpack_rows(packed: Tensor, bits: int, cols: int) -> Tensor:
    """The inverse of `pack_rows`: (rows, words) int32 -> (rows, cols) signed int8 codes."""
    per_word = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF  # (rows, words) unsigned
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    unsigned = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (rows, words, per_word)
    return (unsigned.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


def _signed(values: Tensor, bits: int, symmetric: bool) -> Tensor:
    """Our codes / zero-points in compressed-tensors' signed range (asymmetric ones are unsigned here)."""
    out = values.to(torch.int16)
    return (out if symmetric else out - (1 << (bits - 1))).to(torch.int8)


def tensors_of(name: str, q: QuantizedWeight, dtype: torch.dtype) -> dict[str, Tensor]:
    """The pack-quantized tensors of the Linear ``name`` (``dtype``: the scales' dtype in the checkpoint)."""
    scheme = q.scheme
    rows, cols = q.codes.shape
    if scheme.act_order and not torch.equal(
        q.g_idx.cpu(), torch.arange(cols, dtype=torch.int32) // (scheme.group_size or cols)
    ):
        raise ExportError(
            f"{name} was quantized with --act-order: its groups follow a column order (g_idx) that "
            "compressed-tensors no longer reads; quantize without --act-order to export this format"
        )
    out = {
        f"{name}.weight_packed": pack_rows(_signed(q.codes, scheme.bits, scheme.symmetric), scheme.bits),
        f"{name}.weight_scale": q.scales.to(dtype).contiguous(),
        f"{name}.weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
    }
    if not scheme.symmetric:
        zp = _signed(q.zeros, scheme.bits, scheme.symmetric)  # (rows, groups)
        out[f"{name}.weight_zero_point"] = pack_rows(zp.t().contiguous(), scheme.bits).t().contiguous()
    return out


def quantization_config(
    bits: int, group_size: int | None, symmetric: bool, ignore: list[str]
) -> dict[str, Any]:
    """config.json's ``quantization_config`` (see the module docstring); ``ignore``: the Linear layers left
    in float (``lm_head`` and every Linear not quantized)."""
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "group_size": group_size,
        "strategy": "group" if group_size else "channel",
        "dynamic": False,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": FORMAT,
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
