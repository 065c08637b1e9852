"""Integer weight grids for weight-only quantization (w4a16, w8a16): the scheme, per-group scales and
zero-points, round-to-nearest, and the column quantizer that the OBS solvers (GPTQ, SparseGPT with
quantization) call column by column.

Data layout (rows = out_features, cols = in_features, ``groups = cols // group_size``, or 1 group per output
channel when ``group_size`` is None)::

    codes   (rows, cols)    int8 in [-2^(b-1), 2^(b-1) - 1]  (symmetric)   e.g. [-8, 7] for 4 bits
                            uint8 in [0, 2^b - 1]            (asymmetric)  e.g. [0, 15]
    scales  (rows, groups)  scheme.scale_dtype (float16 by default), always > 0
    zeros   (rows, groups)  same integer dtype as codes; all 0 for symmetric grids
    g_idx   (cols,)         int32 group of every column: ``col // group_size`` in the original column order,
                            or, under act-order, ``position // group_size`` with ``position`` the column's
                            place in the processing order (GPTQ's ``desc_act`` / compressed-tensors'
                            ``actorder="group"``: groups are contiguous in processing order, not in memory)

    W[r, c] = scales[r, g_idx[c]] * (codes[r, c] - zeros[r, g_idx[c]])

The product is evaluated in float32 (float64 for float64 weights); with float16/bfloat16 scales and at most
8-bit codes it is exact in float32, so every dequantized weight is exactly a grid point.

Grids (``lo``, ``hi`` = min and max of a row's weights in the group):

* symmetric: ``scale = max(|lo|, |hi|) / (2^(b-1) - 1)``, zero-point 0; the largest magnitude maps to
  ``±(2^(b-1) - 1)`` and the extra level ``-2^(b-1)`` is only reached by clamping (GPTQ's updates can push a
  weight past the group's range).
* asymmetric: the range is widened to contain 0 (``lo <= 0 <= hi``), ``scale = (hi - lo) / (2^b - 1)`` and the
  zero-point is the INTEGER ``z = clamp(round(-lo / scale), 0, 2^b - 1)``; real 0 is coded as ``z`` and
  dequantizes to ``scale * (z - z) = 0`` exactly. (A float zero-point such as GGUF's Q4_1 minimum would not
  keep pruned weights at 0.)

``clip="mse"`` (``--clip mse``) searches, per row and group, the shrunken ranges ``[p lo, p hi]`` for ``p`` from 1
down to `CLIP_LOWEST` in `CLIP_STEPS` equal steps and keeps the grid whose rounding error is smallest: the
squared error summed over the group, each column weighted by ``1 / [H^-1]_jj^2`` where an OBS solver supplies
it (the cost GPTQ charges for rounding that weight, before its error is propagated). Clipping a few outliers
buys a finer grid for all other weights of the group. Both ends shrink together, so 0 stays on the grid.

Scales are rounded to ``scale_dtype`` before any code is computed, so the stored scales are the grid. A group
whose scale is 0 (all weights 0) or underflows ``scale_dtype`` gets scale 1: its weights map to the zero level.

compressed-tensors stores asymmetric codes and zero-points in the signed range: subtract ``2^(b-1)`` from
both (the difference, and so the weight, is unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from oneshot.config import QUANT_CLIPS, ConfigError, QuantConfig

__all__ = [
    "BITS",
    "CLIPS",
    "GROUP_SIZES",
    "SCALE_DTYPES",
    "SCHEMES",
    "ColumnQuantizer",
    "QuantScheme",
    "QuantizedWeight",
    "check_group_size",
    "dequantize",
    "fake_quantize",
    "group_grid",
    "group_index",
    "group_params",
    "packed_bits",
    "quantize",
    "quantize_rtn",
    "recover_codes",
    "scheme_of",
]

BITS = (4, 8)
CLIPS = QUANT_CLIPS  # how a group's range is chosen: its min and max, or the searched range (docstring)
CLIP_STEPS = 40
CLIP_LOWEST = 0.5
GROUP_SIZES = (32, 64, 128)  # what GPTQ/Marlin-style kernels take; None (or -1) = one scale per output row
SCALE_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
SCHEMES: dict[str, dict[str, Any]] = {  # compressed-tensors' preset names
    "w4a16": {"bits": 4, "group_size": 128, "symmetric": True},
    "w4a16-asym": {"bits": 4, "group_size": 128, "symmetric": False},
    "w8a16": {"bits": 8, "group_size": None, "symmetric": True},
}


def _group_choices() -> str:
    return ", ".join(str(g) for g in GROUP_SIZES) + " or -1 (per output channel)"


@dataclass(frozen=True)
class QuantScheme:
    """A weight-only integer quantization scheme (activations stay in 16 bits).

    Attributes:
        bits: 4 or 8.
        group_size: input columns sharing one scale (32, 64 or 128), or None (``-1`` is accepted and stored
            as None) for one scale per output channel.
        symmetric: signed codes with zero-point 0; otherwise unsigned codes with an integer zero-point.
        act_order: GPTQ processes columns by descending ``diag(H)``; groups follow that order (see the
            module docstring, ``g_idx``). Only for quantization alone, not together with pruning.
        scale_dtype: dtype the scales are stored in (and rounded to before use): float16, bfloat16, float32.
        clip: ``minmax`` (every group's grid spans its weights) or ``mse`` (the shrunken range with the least
            rounding error, module docstring).
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    act_order: bool = False
    scale_dtype: str = "float16"
    clip: str = "minmax"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in BITS:
            raise ConfigError(f"unsupported bits {self.bits!r}: choose one of {', '.join(map(str, BITS))}")
        group = self.group_size
        if group == -1 and not isinstance(group, bool):
            object.__setattr__(self, "group_size", None)
        elif group is not None and (
            not isinstance(group, int) or isinstance(group, bool) or group not in GROUP_SIZES
        ):
            raise ConfigError(f"unsupported group size {group!r}: choose {_group_choices()}")
        for name in ("symmetric", "act_order"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(
                f"unsupported scale dtype {self.scale_dtype!r}: choose one of {', '.join(SCALE_DTYPES)}"
            )
        if self.clip not in CLIPS:
            raise ConfigError(f"unsupported clip {self.clip!r}: choose one of {', '.join(CLIPS)}")

    @classmethod
    def parse(cls, name: str, **overrides: Any) -> QuantScheme:
        """Scheme of a preset name (``w4a16``, ``w4a16-asym``, ``w8a16``; case and ``_``/``-`` ignored),
        with fields overridden by keyword (``QuantScheme.parse("w4a16", group_size=64)``)."""
        key = str(name).strip().lower().replace("_", "-")
        if key not in SCHEMES:
            raise ConfigError(f"unknown quantization scheme {name!r}: choose one of {', '.join(SCHEMES)}")
        return cls(**{**SCHEMES[key], **overrides})

    @property
    def qmin(self) -> int:
        """Smallest code: ``-2^(b-1)`` (symmetric) or 0."""
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest code: ``2^(b-1) - 1`` (symmetric) or ``2^b - 1``."""
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """int8 for symmetric codes, uint8 for asymmetric codes and zero-points (one code per byte)."""
        return torch.int8 if self.symmetric else torch.uint8

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def groups(self, cols: int) -> int:
        """Number of scale groups per row for ``cols`` input columns (checked with `check_group_size`)."""
        check_group_size(cols, self.group_size)
        return 1 if self.group_size is None else cols // self.group_size


def scheme_of(config: QuantConfig) -> QuantScheme:
    """The grid of a `QuantConfig` (its scheme's bits, the resolved group size, symmetric, act-order, clip)."""
    return QuantScheme(
        bits=config.bits,
        group_size=config.groups,
        symmetric=config.symmetric,
        act_order=config.act_order,
        clip=config.clip,
    )


def packed_bits(rows: int, cols: int, scheme: QuantScheme) -> int:
    """Bits of a (rows, cols) matrix in the packed form: codes at ``bits`` bits, one scale per group (and a
    zero-point at ``bits`` bits when asymmetric), and a 32-bit group index per column under act-order."""
    groups = scheme.groups(cols)
    scale_bits = torch.finfo(scheme.scale_torch_dtype).bits
    out = rows * cols * scheme.bits + rows * groups * scale_bits
    if not scheme.symmetric:
        out += rows * groups * scheme.bits
    if scheme.act_order:
        out += cols * 32
    return out


def check_group_size(cols: int, group_size: int | None, *, layer: str | None = None) -> None:
    """Raise ConfigError unless ``group_size`` is valid and divides the layer's ``cols`` input columns.

    The message names the width and suggests a group size that divides it (576 with 128 -> 64), or
    per-channel scales when none does.
    """
    if group_size is None or group_size == -1:
        return
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ConfigError(f"unsupported group size {group_size!r}: choose {_group_choices()}")
    if cols % group_size == 0:
        return
    fits = [g for g in GROUP_SIZES if cols % g == 0]
    smaller = [g for g in fits if g < group_size]
    what = f"{layer} has" if layer else "the layer has"
    advice = "use per-channel scales (group size -1)"
    if fits:
        best = max(smaller) if smaller else min(fits)
        advice = f"use group size {best} ({cols} = {cols // best} x {best}) or per-channel scales (-1)"
    raise ConfigError(
        f"group size {group_size} does not fit: {what} {cols} input columns, which is not a multiple of "
        f"{group_size}; {advice}"
    )


def group_index(cols: int, group_size: int | None, order: Tensor | None = None) -> Tensor:
    """(cols,) int32 group of every column.

    Without ``order``: ``col // group_size``. With ``order`` (the processing order, ``order[j]`` = original
    column at position j, as under act-order): ``g_idx[order[j]] = j // group_size``. Per-channel: all 0.
    """
    step = cols if group_size is None else group_size
    by_position = torch.arange(cols, dtype=torch.int32) // step  # (cols,)
    if order is None:
        return by_position
    g_idx = torch.empty(cols, dtype=torch.int32)
    g_idx[order.cpu()] = by_position
    return g_idx


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _grid_from_range(lo: Tensor, hi: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    """Scale (``scale_dtype``) and zero-point (code dtype) of groups with minima ``lo`` and maxima ``hi``."""
    if scheme.symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / scheme.qmax
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # the grid must contain 0
        scale = (hi - lo) / scheme.qmax
    scale = scale.to(scheme.scale_torch_dtype)  # the stored scale IS the grid
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(
            f"weights up to {float(torch.maximum(lo.abs(), hi.abs()).max()):g} overflow {scheme.scale_dtype} "
            "scales; use scale_dtype='float32'"
        )
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero (or underflowing) groups
    if scheme.symmetric:
        zero = torch.zeros(scale.shape, dtype=scheme.code_dtype, device=scale.device)
    else:
        zero = torch.round(-lo / scale.to(lo.dtype)).clamp_(0, scheme.qmax).to(scheme.code_dtype)
    return scale, zero


def group_grid(w: Tensor, scheme: QuantScheme, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Scale and zero-point, both (n,), of ``n`` groups given as the rows of ``w`` (n, size): the groups' min
    and max, or with ``scheme.clip == "mse"`` the searched range (module docstring). ``weights`` (n, size) or
    (size,): the error weight of every entry (0 leaves an entry out; None = 1)."""
    w = w.detach().to(_work_dtype(w))
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    if scheme.clip == "minmax":
        return _grid_from_range(lo, hi, scheme)

    # every candidate range at once: (steps + 1, n) grids, (steps + 1, n, size) rounding errors
    shrink = 1.0 - torch.arange(CLIP_STEPS + 1, dtype=w.dtype, device=w.device) * (
        (1.0 - CLIP_LOWEST) / CLIP_STEPS
    )
    scales, zeros = _grid_from_range(lo * shrink[:, None], hi * shrink[:, None], scheme)
    s, z = scales[..., None].to(w.dtype), zeros[..., None].to(w.dtype)
    err = (torch.round(w / s).add_(z).clamp_(scheme.qmin, scheme.qmax).sub_(z).mul_(s) - w).square_()
    if weights is not None:
        err.mul_(weights.to(w.dtype))
    best = err.sum(dim=-1).argmin(dim=0, keepdim=True)  # (1, n): the first (widest) of equal errors
    return scales.gather(0, best)[0], zeros.gather(0, best)[0]


def group_params(weight: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor]:
    """Round-to-nearest grid of a (rows, cols) weight: ``(scales, zeros)``, both (rows, groups)."""
    rows, cols = weight.shape
    groups = scheme.groups(cols)
    scale, zero = group_grid(weight.reshape(rows * groups, cols // groups), scheme)
    return scale.reshape(rows, groups), zero.reshape(rows, groups)


def quantize(weight: Tensor, scale: Tensor, zero: Tensor, scheme: QuantScheme) -> Tensor:
    """Integer codes ``clamp(round(w / scale) + zero, qmin, qmax)`` in ``scheme.code_dtype``.

    ``scale`` and ``zero`` broadcast against ``weight`` (e.g. (rows, 1) for one column group, or
    ``scales[:, g_idx]`` for a whole matrix). Ties round to even (``torch.round``).
    """
    dtype = _work_dtype(weight)
    codes = torch.round(weight.to(dtype) / scale.to(dtype)) + zero.to(dtype)
    return codes.clamp_(scheme.qmin, scheme.qmax).to(scheme.code_dtype)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``scale * (codes - zero)`` in ``dtype`` (broadcasting as in `quantize`); exact in float32."""
    return scale.to(dtype) * (codes.to(dtype) - zero.to(dtype))


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized (rows, cols) weight in the layout of the module docstring.

    Attributes:
        codes: (rows, cols) int8 (symmetric) or uint8 (asymmetric) codes; pruned weights hold the zero-point.
        scales: (rows, groups) in ``scheme.scale_dtype``.
        zeros: (rows, groups) in ``scheme.code_dtype`` (all 0 when symmetric).
        g_idx: (cols,) int32 group of every column.
        scheme: the scheme the codes were made with.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    scheme: QuantScheme

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(rows, cols) ``scales[:, g_idx] * (codes - zeros[:, g_idx])`` in ``dtype``."""
        g_idx = self.g_idx.to(device=self.codes.device, dtype=torch.long)
        return dequantize(self.codes, self.scales[:, g_idx], self.zeros[:, g_idx], dtype)


def quantize_rtn(weight: Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Round-to-nearest quantization of a (rows, cols) weight (``act_order`` needs a Hessian: ignored)."""
    scales, zeros = group_params(weight, scheme)  # (rows, groups)
    g_idx = group_index(weight.shape[1], scheme.group_size).to(weight.device)
    index = g_idx.long()
    codes = quantize(weight.detach(), scales[:, index], zeros[:, index], scheme)  # (rows, cols)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, scheme=scheme)


def fake_quantize(weight: Tensor, scheme: QuantScheme) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest: ``(w_q, scales, zeros)`` with the (rows, cols) dequantized weight in the weight's
    dtype (exactly on the grid for float32/float64 weights) and the (rows, groups) scales and zero-points."""
    q = quantize_rtn(weight, scheme)
    return q.dequantize(_work_dtype(weight)).to(weight.dtype), q.scales, q.zeros


class ColumnQuantizer:
    """Quantizes a transposed weight (cols, rows) one column at a time for an OBS solver.

    The solver calls `start_group` when its column loop reaches the first column of a group (with the
    group's CURRENT, already updated weights), then `column` for every column in processing order.
    Positions are processing positions; ``order`` (act-order) maps them to original columns for `result`.
    """

    def __init__(
        self,
        scheme: QuantScheme,
        cols: int,
        rows: int,
        *,
        device: torch.device,
        dtype: torch.dtype,
        order: Tensor | None = None,
    ) -> None:
        self.scheme = scheme
        self.group_cols = cols if scheme.group_size is None else scheme.group_size
        groups = scheme.groups(cols)
        self.dtype = dtype
        self.order = order
        self.codes_t = torch.empty(cols, rows, dtype=scheme.code_dtype, device=device)  # (cols, rows)
        self.scales_t = torch.empty(groups, rows, dtype=scheme.scale_torch_dtype, device=device)
        self.zeros_t = torch.empty(groups, rows, dtype=scheme.code_dtype, device=device)
        self._scale = torch.empty(0)  # (rows,) current group's grid in the work dtype
        self._zero = torch.empty(0)

    @property
    def group_starts(self) -> range:
        """Processing positions where a group begins."""
        return range(0, self.codes_t.shape[0], self.group_cols)

    def start_group(self, position: int, w_group: Tensor, weights: Tensor | None = None) -> None:
        """Fix the grid of the group starting at ``position`` from its current weights (size, rows);
        ``weights`` (size, rows) or (size, 1): the error weights of `group_grid` (``--clip mse``)."""
        group = position // self.group_cols
        scale, zero = group_grid(
            w_group.t(), self.scheme, None if weights is None else weights.t()
        )  # (rows,)
        self.scales_t[group], self.zeros_t[group] = scale, zero
        self._scale, self._zero = scale.to(self.dtype), zero.to(self.dtype)

    def column(self, position: int, w: Tensor, pruned: Tensor | None = None) -> Tensor:
        """Code column ``position`` (values ``w``, (rows,)); pruned entries get the zero-point.

        Returns the dequantized column (rows,) in the work dtype, exactly 0 where pruned.
        """
        code = torch.round(w / self._scale).add_(self._zero).clamp_(self.scheme.qmin, self.scheme.qmax)
        if pruned is not None:
            code = torch.where(pruned, self._zero, code)
        self.codes_t[position] = code.to(self.scheme.code_dtype)
        return dequantize(code, self._scale, self._zero, self.dtype)

    def result(self) -> QuantizedWeight:
        """The codes in original column order, (rows, cols), with (rows, groups) scales and zero-points."""
        codes_t = self.codes_t
        if self.order is not None:
            codes_t = torch.empty_like(codes_t)
            codes_t[self.order] = self.codes_t  # row j of the processing order is original column order[j]
        cols = codes_t.shape[0]
        return QuantizedWeight(
            codes=codes_t.t().contiguous(),
            scales=self.scales_t.t().contiguous(),
            zeros=self.zeros_t.t().contiguous(),
            g_idx=group_index(cols, self.scheme.group_size, self.order).to(codes_t.device),
            scheme=self.scheme,
        )


def recover_codes(
    weight: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor, scheme: QuantScheme
) -> tuple[QuantizedWeight, int]:
    """The codes of a stored fake-quantized (rows, cols) ``weight`` from its grid, and how many weights are
    NOT exactly ``scale * (code - zero)`` cast to the weight's dtype (0 for an untouched quantized weight).

    ``scales``, ``zeros``: (rows, groups); ``g_idx``: (cols,) group of every column."""
    index = g_idx.to(device=weight.device, dtype=torch.long)
    scale, zero = scales[:, index], zeros[:, index]  # (rows, cols)
    codes = quantize(weight, scale, zero, scheme)
    back = dequantize(codes, scale, zero, _work_dtype(weight)).to(weight.dtype)
    off = int((back != weight).sum())
    return QuantizedWeight(
        codes=codes, scales=scales, zeros=zeros, g_idx=g_idx.to(torch.int32), scheme=scheme
    ), off
