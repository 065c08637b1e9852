"""Compressed weight formats for sparse inference: 2:4, 2:4 with 4-bit values, and unstructured bitmask.

A weight is the ``(N, K)`` matrix of an ``nn.Linear`` (out features ``N``, in features ``K``); every format
compresses along ``K`` so that a kernel computing ``y = x @ W^T`` reads each row's compressed data once.

2:4 (``Sparse24Weight``)
    ``values``: ``(N, K/2)``, the two kept entries of every group of 4 columns, in column order.
    ``meta``: ``(N, ceil(K/8))`` uint8; kept value ``j`` of a row has in-group position
    ``(meta[:, j // 4] >> (2 * (j % 4))) & 3``, i.e. one byte holds the positions of two groups.
    1.125 bytes per element for a 16-bit dtype (0.5625 of dense).

2:4 with 4-bit group-quantized values (``Sparse24Int4Weight``, format ``"2:4-int4"``)
    ``meta``: as for 2:4. ``codes``: ``(N, K/4)`` uint8, the 4-bit code ``u`` (0..15) of kept value ``j`` in
    bits ``4 * (j % 2)`` of byte ``j // 2`` (low nibble first). ``scales``: ``(N, ceil(K/G))`` float16,
    bfloat16 or float32; ``zeros``: ``(N, ceil(K/G))`` uint8 integer zero-points (asymmetric), or None
    (symmetric: the zero-point is fixed at 8, i.e. ``u = code + 8`` for signed codes -8..7). A group runs
    over ``G`` ORIGINAL columns (the grid of ``oneshot prune --quantize w4a16 --group-size G``: the kept
    values of columns ``g*G .. g*G+G-1`` share one scale; the last group may be shorter). Kept value ``j``
    (column ``c``) is ``float32(scales[:, c // G]) * (u - zero)`` rounded to ``dtype``, the dense weight's
    dtype; a kept zero is ``u == zero`` and pruned entries are not stored, so zeros stay exactly 0.
    0.375 bytes per element plus the scales (``2 / G`` for 16-bit scales): 0.39 for G = 128, 5.1x less than
    16-bit dense.

Bitmask (``BitmaskWeight``)
    ``values``: ``(nnz,)``, the nonzeros in row-major order.
    ``bitmask``: ``(N, ceil(K/8))`` uint8; column ``k`` is nonzero iff ``(bitmask[:, k // 8] >> (k % 8)) & 1``.
    ``offsets``: ``(N, ceil(K/tile))`` int32; index into ``values`` of the first nonzero at or after column
    ``t * tile`` of each row, so a kernel can start at any tile boundary (split-K) and count the rest of
    the way with an in-tile prefix sum over the bits.

All round-trip exactly: ``decompress(compress(w))`` is equal to ``w`` (2:4-int4: a ``w`` on the given grid;
a ``-0.0`` that is not stored comes back as ``+0.0``, which compares equal). ``save_sparse``/``load_sparse`` store a dict of dense and compressed
tensors in one safetensors file; a compressed entry ``name`` becomes ``name.values``, ``name.meta`` (2:4) or
``name.values``, ``name.bitmask``, ``name.offsets`` (bitmask) or ``name.codes``, ``name.meta``,
``name.scales`` (and ``name.zeros`` when asymmetric; 2:4-int4), described by JSON in the file metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeAlias

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_TILE",
    "INT4_SCALE_DTYPES",
    "SPARSE_METADATA_KEY",
    "SPARSE_TYPES",
    "BitmaskWeight",
    "Int4Grid",
    "Sparse24Int4Weight",
    "Sparse24Weight",
    "SparseWeight",
    "compress",
    "compress_24",
    "compress_24_int4",
    "compress_bitmask",
    "is_24_sparse",
    "load_sparse",
    "quantize_24_int4",
    "save_sparse",
]

DEFAULT_TILE = 256
"""Columns per bitmask offset entry (a multiple of 8)."""

SPARSE_METADATA_KEY = "oneshot.sparse"
"""safetensors metadata key holding the JSON description of compressed entries."""

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Sparse24Weight:
    """A 2:4 compressed ``(N, K)`` weight.

    Attributes:
        values: ``(N, K/2)`` kept values, in column order within each group of 4.
        meta: ``(N, ceil(K/8))`` uint8, four 2-bit in-group positions per byte (low bits first).
        shape: the dense shape ``(N, K)``.
    """

    values: Tensor
    meta: Tensor
    shape: tuple[int, int]

    format = "2:4"

    def __post_init__(self) -> None:
        n, k = self.shape
        if k % 4:
            raise ValueError(f"2:4 needs K % 4 == 0, got shape {self.shape}")
        if tuple(self.values.shape) != (n, k // 2):
            raise ValueError(f"values shape {tuple(self.values.shape)} != {(n, k // 2)} for {self.shape}")
        if tuple(self.meta.shape) != (n, _cdiv(k, 8)) or self.meta.dtype != torch.uint8:
            raise ValueError(
                f"meta must be uint8 of shape {(n, _cdiv(k, 8))}, got {self.meta.dtype} {tuple(self.meta.shape)}"
            )

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed tensors."""
        return _nbytes(self.values) + _nbytes(self.meta)

    def tensors(self) -> dict[str, Tensor]:
        return {"values": self.values, "meta": self.meta}

    def positions(self) -> Tensor:
        """In-group position (0..3) of every kept value, ``(N, K/2)`` int64."""
        n, k = self.shape
        shifts = torch.arange(0, 8, 2, device=self.meta.device, dtype=torch.int32)
        pos = (self.meta.to(torch.int32).unsqueeze(-1) >> shifts) & 3  # (N, ceil(K/8), 4)
        return pos.reshape(n, -1)[:, : k // 2].long()

    def decompress(self) -> Tensor:
        """The dense ``(N, K)`` tensor."""
        n, k = self.shape
        pair = torch.arange(k // 2, device=self.values.device) // 2  # group of each kept value
        cols = pair * 4 + self.positions()  # (N, K/2)
        dense = torch.zeros(n, k, dtype=self.values.dtype, device=self.values.device)
        return dense.scatter_(1, cols, self.values)

    def validate(self) -> None:
        """Raise ValueError unless the two kept positions of every group are distinct and ascending."""
        pos = self.positions().reshape(self.shape[0], -1, 2)
        if not bool((pos[..., 0] < pos[..., 1]).all()):
            raise ValueError("corrupt 2:4 metadata: kept positions of a group must be distinct and ascending")

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Sparse24Weight:
        return Sparse24Weight(self.values.to(device=device, dtype=dtype), self.meta.to(device), self.shape)


@dataclass(frozen=True)
class BitmaskWeight:
    """An unstructured-sparse ``(N, K)`` weight stored as nonzero values plus a bitmask.

    Attributes:
        values: ``(nnz,)`` nonzeros in row-major order.
        bitmask: ``(N, ceil(K/8))`` uint8, bit ``k % 8`` of byte ``k // 8`` set iff column ``k`` is stored.
        offsets: ``(N, ceil(K/tile))`` int32, index in ``values`` of each row's first entry at or after
            column ``t * tile``.
        shape: the dense shape ``(N, K)``.
        tile: columns per ``offsets`` entry, a multiple of 8.
    """

    values: Tensor
    bitmask: Tensor
    offsets: Tensor
    shape: tuple[int, int]
    tile: int = DEFAULT_TILE

    format = "bitmask"

    def __post_init__(self) -> None:
        n, k = self.shape
        if self.tile <= 0 or self.tile % 8:
            raise ValueError(f"tile must be a positive multiple of 8, got {self.tile}")
        if self.values.dim() != 1:
            raise ValueError(f"values must be 1-D, got shape {tuple(self.values.shape)}")
        if tuple(self.bitmask.shape) != (n, _cdiv(k, 8)) or self.bitmask.dtype != torch.uint8:
            raise ValueError(
                f"bitmask must be uint8 of shape {(n, _cdiv(k, 8))}, got "
                f"{self.bitmask.dtype} {tuple(self.bitmask.shape)}"
            )
        if tuple(self.offsets.shape) != (n, _cdiv(k, self.tile)) or self.offsets.dtype != torch.int32:
            raise ValueError(
                f"offsets must be int32 of shape {(n, _cdiv(k, self.tile))}, got "
                f"{self.offsets.dtype} {tuple(self.offsets.shape)}"
            )

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed tensors."""
        return _nbytes(self.values) + _nbytes(self.bitmask) + _nbytes(self.offsets)

    def tensors(self) -> dict[str, Tensor]:
        return {"values": self.values, "bitmask": self.bitmask, "offsets": self.offsets}

    def mask(self) -> Tensor:
        """The ``(N, K)`` bool mask of stored entries."""
        n, k = self.shape
        shifts = torch.arange(8, device=self.bitmask.device, dtype=torch.int32)
        bits = (self.bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1  # (N, ceil(K/8), 8)
        return bits.reshape(n, -1)[:, :k].bool()

    def decompress(self) -> Tensor:
        """The dense ``(N, K)`` tensor."""
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        return dense.masked_scatter_(self.mask(), self.values)

    def validate(self) -> None:
        """Raise ValueError if the offsets or the value count disagree with the bitmask."""
        expected = _tile_offsets(self.mask(), self.tile)
        if not torch.equal(expected.to(self.offsets.device), self.offsets):
            raise ValueError("corrupt bitmask weight: offsets do not match the bitmask")
        count = int(self.mask().sum())
        if count != self.nnz:
            raise ValueError(f"corrupt bitmask weight: bitmask has {count} entries, values has {self.nnz}")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> BitmaskWeight:
        return BitmaskWeight(
            self.values.to(device=device, dtype=dtype),
            self.bitmask.to(device),
            self.offsets.to(device),
            self.shape,
            self.tile,
        )


INT4_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""dtypes the scales of a ``Sparse24Int4Weight`` may have."""

_SYMMETRIC_ZERO = 8  # the fixed zero-point of symmetric 4-bit grids: u = code + 8 for codes -8..7


class Int4Grid(NamedTuple):
    """The 4-bit grid of one ``(N, K)`` weight: what ``compress_24_int4`` needs besides the weight.

    Attributes:
        scales: ``(N, ceil(K/group_size))`` float16, bfloat16 or float32, all > 0.
        zeros: ``(N, ceil(K/group_size))`` integer zero-points in 0..15 (asymmetric), or None (symmetric).
        group_size: original input columns per group, or None for one group per row.
    """

    scales: Tensor
    zeros: Tensor | None
    group_size: int | None


@dataclass(frozen=True)
class Sparse24Int4Weight:
    """A 2:4 compressed ``(N, K)`` weight whose kept values are 4-bit codes on a per-group grid.

    Attributes:
        codes: ``(N, K/4)`` uint8, two 4-bit codes per byte (kept value ``2i`` in the low nibble of byte
            ``i``, ``2i + 1`` in the high nibble).
        meta: ``(N, ceil(K/8))`` uint8, the 2:4 positions (as in ``Sparse24Weight``).
        scales: ``(N, ceil(K/group_size))`` float16/bfloat16/float32, one per group of ``group_size``
            original columns.
        zeros: ``(N, ceil(K/group_size))`` uint8 zero-points in 0..15, or None for a symmetric grid (fixed
            zero-point 8).
        shape: the dense shape ``(N, K)``.
        group_size: original columns per group: a multiple of 8, or ``>= K`` (one group per row).
        dtype: the dense weight's dtype: what ``decompress`` returns and the kernels take inputs in.
    """

    codes: Tensor
    meta: Tensor
    scales: Tensor
    zeros: Tensor | None
    shape: tuple[int, int]
    group_size: int
    dtype: torch.dtype

    format = "2:4-int4"

    def __post_init__(self) -> None:
        n, k = self.shape
        _check_int4_group(k, self.group_size)
        groups = _cdiv(k, self.group_size)
        if tuple(self.codes.shape) != (n, k // 4) or self.codes.dtype != torch.uint8:
            got = f"{self.codes.dtype} {tuple(self.codes.shape)}"
            raise ValueError(f"codes must be uint8 of shape {(n, k // 4)}, got {got}")
        if tuple(self.meta.shape) != (n, _cdiv(k, 8)) or self.meta.dtype != torch.uint8:
            got = f"{self.meta.dtype} {tuple(self.meta.shape)}"
            raise ValueError(f"meta must be uint8 of shape {(n, _cdiv(k, 8))}, got {got}")
        if tuple(self.scales.shape) != (n, groups) or self.scales.dtype not in INT4_SCALE_DTYPES:
            raise ValueError(
                f"scales must be float16, bfloat16 or float32 of shape {(n, groups)}, got "
                f"{self.scales.dtype} {tuple(self.scales.shape)}"
            )
        if self.zeros is not None and (
            tuple(self.zeros.shape) != (n, groups) or self.zeros.dtype != torch.uint8
        ):
            raise ValueError(
                f"zeros must be None or uint8 of shape {(n, groups)}, got "
                f"{self.zeros.dtype} {tuple(self.zeros.shape)}"
            )
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {self.dtype}")

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed tensors (codes, metadata, scales and zero-points)."""
        return sum(_nbytes(t) for t in self.tensors().values())

    def tensors(self) -> dict[str, Tensor]:
        parts = {"codes": self.codes, "meta": self.meta, "scales": self.scales}
        if self.zeros is not None:
            parts["zeros"] = self.zeros
        return parts

    def unpacked_codes(self) -> Tensor:
        """The 4-bit code (0..15) of every kept value, ``(N, K/2)`` int32."""
        n, _ = self.shape
        shifts = torch.tensor([0, 4], device=self.codes.device, dtype=torch.int32)
        return ((self.codes.to(torch.int32).unsqueeze(-1) >> shifts) & 15).reshape(n, -1)  # (N, K/2)

    def kept_groups(self) -> Tensor:
        """The scale group of every kept value, ``(K/2,)`` int64 (the same for every row)."""
        k = self.shape[1]
        first_column = torch.arange(k // 2, device=self.codes.device) // 2 * 4  # column of each 2:4 group
        return first_column // self.group_size

    def values(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dequantized kept values ``(N, K/2)`` in ``dtype`` (default ``self.dtype``).

        ``scale * (code - zero)`` is evaluated in float32 (float64 for float64), which is exact for 16-bit
        scales, then rounded once to the target dtype, as ``oneshot.solvers.quant.dequantize`` does.
        """
        target = dtype or self.dtype
        work = torch.float64 if target == torch.float64 else torch.float32
        index = self.kept_groups()
        scale = self.scales[:, index].to(work)  # (N, K/2)
        zero = _SYMMETRIC_ZERO if self.zeros is None else self.zeros[:, index].to(work)
        return (scale * (self.unpacked_codes().to(work) - zero)).to(target)

    def as_sparse24(self, dtype: torch.dtype | None = None) -> Sparse24Weight:
        """The same weight as a ``Sparse24Weight`` with dequantized values."""
        return Sparse24Weight(self.values(dtype), self.meta, self.shape)

    def decompress(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense ``(N, K)`` tensor in ``dtype`` (default ``self.dtype``)."""
        return self.as_sparse24(dtype).decompress()

    def validate(self) -> None:
        """Raise ValueError unless the 2:4 positions are valid and every scale is positive and finite."""
        n, k = self.shape
        Sparse24Weight(self.codes.new_empty(n, k // 2), self.meta, self.shape).validate()
        if not bool((torch.isfinite(self.scales) & (self.scales > 0)).all()):
            raise ValueError("corrupt 2:4-int4 weight: scales must be positive and finite")
        if self.zeros is not None and self.zeros.numel() and int(self.zeros.amax()) > 15:
            raise ValueError("corrupt 2:4-int4 weight: zero-points must be in 0..15")

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Sparse24Int4Weight:
        """Move the tensors to ``device``; ``dtype`` changes the dense dtype only (the grid is kept)."""
        return Sparse24Int4Weight(
            self.codes.to(device),
            self.meta.to(device),
            self.scales.to(device),
            None if self.zeros is None else self.zeros.to(device),
            self.shape,
            self.group_size,
            dtype or self.dtype,
        )


SparseWeight: TypeAlias = Sparse24Weight | Sparse24Int4Weight | BitmaskWeight
SPARSE_TYPES = (Sparse24Weight, Sparse24Int4Weight, BitmaskWeight)
FormatName = Literal["2:4", "bitmask"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _check_matrix(weight: Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D (N, K) weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {weight.dtype}")


def _pack_bits(bits: Tensor, bits_per_item: int) -> Tensor:
    """Pack ``(N, L)`` small integers (< 2**bits_per_item) little-end-first into ``(N, ceil(L*b/8))`` uint8."""
    per_byte = 8 // bits_per_item
    n, length = bits.shape
    pad = _cdiv(length, per_byte) * per_byte - length
    padded = torch.nn.functional.pad(bits.to(torch.int32), (0, pad))
    shifts = torch.arange(0, 8, bits_per_item, device=bits.device, dtype=torch.int32)
    packed = (padded.reshape(n, -1, per_byte) << shifts).sum(-1)  # (N, ceil(L/per_byte))
    return packed.to(torch.uint8)


def is_24_sparse(weight: Tensor) -> bool:
    """True if ``K % 4 == 0`` and every group of 4 consecutive columns has at least 2 zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    nonzero = (weight != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return bool((nonzero <= 2).all())


def compress_24(weight: Tensor) -> Sparse24Weight:
    """Compress an ``(N, K)`` weight with at most 2 nonzeros in every group of 4 columns.

    Groups with fewer than 2 nonzeros also store zeros (the lowest free positions), so every group keeps
    exactly two entries. Raises ValueError if ``K % 4 != 0`` or a group has more than 2 nonzeros.
    """
    _check_matrix(weight)
    n, k = weight.shape
    if k % 4:
        raise ValueError(f"2:4 compression needs in_features % 4 == 0, got shape {(n, k)}")
    groups = weight.reshape(n, k // 4, 4)  # (N, G, 4)
    nonzero = groups != 0
    bad = nonzero.sum(-1) > 2
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"weight is not 2:4 sparse: {int(bad.sum())} of {bad.numel()} groups of 4 have more than 2 "
            f"nonzeros (first: row {row}, columns {4 * group}..{4 * group + 3}); prune it with a 2:4 mask "
            "first or use the bitmask format"
        )
    position = torch.arange(4, device=weight.device)
    # Nonzeros first, then the lowest free positions; sorted so each group's pair is ascending.
    score = nonzero.to(torch.int32) * 4 + (3 - position).to(torch.int32)
    kept = score.topk(2, dim=-1).indices.sort(dim=-1).values  # (N, G, 2)
    values = groups.gather(-1, kept).reshape(n, k // 2)
    meta = _pack_bits(kept.reshape(n, k // 2), 2)  # (N, ceil(K/8))
    return Sparse24Weight(values.contiguous(), meta, (n, k))


def _tile_offsets(mask: Tensor, tile: int) -> Tensor:
    """``(N, ceil(K/tile))`` int32 index of the first stored entry of each row tile in row-major order."""
    n, k = mask.shape
    counts = torch.nn.functional.pad(mask.to(torch.int64), (0, _cdiv(k, tile) * tile - k))
    per_tile = counts.reshape(n, -1, tile).sum(-1)  # (N, T)
    flat = per_tile.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat  # exclusive prefix over (row, tile) in row-major order
    return starts.reshape(per_tile.shape).to(torch.int32)


def compress_bitmask(weight: Tensor, tile: int = DEFAULT_TILE) -> BitmaskWeight:
    """Compress an ``(N, K)`` weight by storing its nonzeros and a bit per element.

    Args:
        weight: ``(N, K)`` floating-point tensor, any sparsity.
        tile: columns per offset entry (a multiple of 8); kernels split K only at tile boundaries.
    """
    _check_matrix(weight)
    if tile <= 0 or tile % 8:
        raise ValueError(f"tile must be a positive multiple of 8, got {tile}")
    mask = weight != 0  # (N, K)
    if int(mask.sum()) >= 2**31:
        raise ValueError("bitmask format uses int32 offsets: a weight must have fewer than 2**31 nonzeros")
    values = weight[mask]  # (nnz,) row-major order
    n, k = weight.shape
    return BitmaskWeight(values.contiguous(), _pack_bits(mask, 1), _tile_offsets(mask, tile), (n, k), tile)


def _check_int4_group(k: int, group_size: int) -> None:
    if (
        not isinstance(group_size, int)
        or isinstance(group_size, bool)
        or group_size <= 0
        or (group_size % 8 and group_size < k)
    ):
        raise ValueError(
            f"2:4-int4 group size must be a positive multiple of 8 (or >= K = {k}: one group per row), "
            f"got {group_size!r}"
        )


def _resolve_group(k: int, group_size: int | None) -> int:
    """``group_size`` with None / -1 (one group per row) as K."""
    if group_size is None or (group_size == -1 and not isinstance(group_size, bool)):
        return k
    _check_int4_group(k, group_size)
    return group_size


def compress_24_int4(
    weight: Tensor, scales: Tensor, zeros: Tensor | None = None, group_size: int | None = 128
) -> Sparse24Int4Weight:
    """Compress a 2:4 ``(N, K)`` weight whose kept values already lie on a 4-bit grid.

    The round trip is exact: ``compress_24_int4(w, ...).decompress()`` equals ``w`` bit for bit (in
    ``w.dtype``), for a weight that is ``float32(scale) * (code - zero)`` rounded to its dtype, as the
    checkpoint of ``oneshot prune --quantize w4a16`` holds.

    Args:
        weight: ``(N, K)`` floating-point weight, at most 2 nonzeros in every group of 4 columns.
        scales: ``(N, ceil(K/group_size))`` float16, bfloat16 or float32 (the grid's dtype is kept).
        zeros: ``(N, ceil(K/group_size))`` integer zero-points in 0..15 (asymmetric grid, codes 0..15), or
            None for a symmetric grid (codes -8..7, zero-point 0). The all-zero ``zeros`` a symmetric
            ``QuantizedWeight`` carries must be passed as None: it means codes -8..7, not 0..15.
        group_size: original input columns per scale (a multiple of 8; the last group may be shorter),
            or None / -1 for one scale per row.

    Raises:
        ValueError: if the weight is not 2:4 sparse, the grid has the wrong shape or dtype, or a kept value
            is not on its group's grid (names the count and the first such entry).
    """
    sparse = compress_24(weight)
    n, k = sparse.shape
    group = _resolve_group(k, group_size)
    groups = _cdiv(k, group)
    if tuple(scales.shape) != (n, groups) or scales.dtype not in INT4_SCALE_DTYPES:
        raise ValueError(
            f"scales must be float16, bfloat16 or float32 of shape {(n, groups)} (N, ceil(K/{group})), got "
            f"{scales.dtype} {tuple(scales.shape)}"
        )
    if not bool((torch.isfinite(scales) & (scales > 0)).all()):
        raise ValueError("scales must be positive and finite")
    if zeros is not None:
        if tuple(zeros.shape) != (n, groups) or zeros.dtype.is_floating_point or zeros.dtype == torch.bool:
            raise ValueError(
                f"zeros must be an integer tensor of shape {(n, groups)} or None (symmetric), got "
                f"{zeros.dtype} {tuple(zeros.shape)}"
            )
        if zeros.numel() and (int(zeros.amin()) < 0 or int(zeros.amax()) > 15):
            raise ValueError("4-bit zero-points must be integers in 0..15")
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    template = Sparse24Int4Weight(
        sparse.meta.new_zeros(n, k // 4),
        sparse.meta,
        scales.contiguous(),
        None if zeros is None else zeros.to(torch.uint8).contiguous(),
        (n, k),
        group,
        weight.dtype,
    )
    index = template.kept_groups()  # (K/2,)
    scale = scales[:, index].to(work)  # (N, K/2)
    zero = (
        torch.full_like(scale, _SYMMETRIC_ZERO)
        if template.zeros is None
        else template.zeros[:, index].to(work)
    )
    kept = sparse.values.to(work)  # (N, K/2)
    codes = torch.round(kept / scale) + zero
    back = (scale * (codes.clamp(0, 15) - zero)).to(weight.dtype)
    off = (codes < 0) | (codes > 15) | (back != sparse.values)
    if bool(off.any()):
        row, j = (int(i) for i in off.nonzero()[0])
        column = int(sparse.positions()[row, j]) + 4 * (j // 2)
        value, scale_of = float(sparse.values[row, j]), float(scales[row, column // group])
        raise ValueError(
            f"weight is not on the 4-bit grid: {int(off.sum())} of {off.numel()} kept values are not "
            f"scale * (code - zero) of their group (first: row {row}, column {column}, value {value!r}, "
            f"scale {scale_of!r}); pass the grid the weight was quantized with, or use quantize_24_int4 "
            "to round it"
        )
    packed = _pack_bits(codes.to(torch.int32), 4)  # (N, K/4)
    return Sparse24Int4Weight(
        packed, sparse.meta, template.scales, template.zeros, (n, k), group, weight.dtype
    )


def quantize_24_int4(
    weight: Tensor,
    group_size: int | None = 128,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float16,
) -> Sparse24Int4Weight:
    """Round a 2:4 ``(N, K)`` weight to nearest on a 4-bit grid and compress it (for weights without a
    quantized run's grid).

    The grid is that of ``oneshot.solvers.quant`` (``group_params``/``quantize``, round-to-nearest) over
    the dense weight, pruned zeros included; a K that is not a multiple of ``group_size`` gets a shorter
    last group (its grid is that of the group padded with zeros, which leaves it unchanged). Pruned
    weights stay exactly 0; kept weights may round to 0.

    Args:
        weight: ``(N, K)`` 2:4-sparse floating-point weight.
        group_size: 32, 64 or 128 columns per scale, or None / -1 for one scale per row.
        symmetric: codes -8..7 with zero-point 0; else codes 0..15 with an integer zero-point.
        scale_dtype: float16, bfloat16 or float32.

    Returns:
        The compressed weight; ``decompress()`` is the fake-quantized weight in ``weight.dtype``.
    """
    from oneshot.solvers.quant import SCALE_DTYPES, QuantScheme, quantize_rtn

    _check_matrix(weight)
    if not is_24_sparse(weight):
        compress_24(weight)  # raises the 2:4 error with its details
    names = {dtype: name for name, dtype in SCALE_DTYPES.items()}
    if scale_dtype not in names:
        raise ValueError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {scale_dtype}")
    k = weight.shape[1]
    group = None if group_size is None or group_size == -1 else group_size
    scheme = QuantScheme(bits=4, group_size=group, symmetric=symmetric, scale_dtype=names[scale_dtype])
    padded = weight.detach()
    if group is not None and k % group:
        padded = torch.nn.functional.pad(padded, (0, _cdiv(k, group) * group - k))  # (N, groups * group)
    q = quantize_rtn(padded, scheme)
    fake = q.dequantize(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    fake = fake[:, :k].to(weight.dtype)  # (N, K) on the grid, zeros where pruned
    zeros = None if symmetric else q.zeros
    return compress_24_int4(fake, q.scales, zeros, k if group is None else group)


def compress(weight: Tensor, format: FormatName) -> SparseWeight:
    """Compress ``weight`` into ``format`` (``"2:4"`` or ``"bitmask"``)."""
    if format == "2:4":
        return compress_24(weight)
    if format == "bitmask":
        return compress_bitmask(weight)
    raise ValueError(f"unknown sparse format {format!r}; choose one of '2:4', 'bitmask'")


def save_sparse(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor | SparseWeight],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write dense tensors and compressed weights to one safetensors file.

    Args:
        path: output file.
        tensors: name -> dense tensor or ``Sparse24Weight``/``Sparse24Int4Weight``/``BitmaskWeight``.
        metadata: extra string metadata (the key ``"oneshot.sparse"`` is reserved).
    """
    from safetensors.torch import save_file

    flat: dict[str, Tensor] = {}
    described: dict[str, dict[str, object]] = {}
    for name, value in tensors.items():
        if isinstance(value, Tensor):
            flat[name] = value.detach().contiguous().cpu()
            continue
        if not isinstance(value, SPARSE_TYPES):
            raise TypeError(f"{name}: expected a Tensor or a sparse weight, got {type(value).__name__}")
        entry: dict[str, object] = {"format": value.format, "shape": list(value.shape)}
        if isinstance(value, BitmaskWeight):
            entry["tile"] = value.tile
        if isinstance(value, Sparse24Int4Weight):
            entry["group_size"] = value.group_size
            entry["dtype"] = str(value.dtype).removeprefix("torch.")
            entry["symmetric"] = value.symmetric
        described[name] = entry
        for part, tensor in value.tensors().items():
            flat[f"{name}.{part}"] = tensor.detach().contiguous().cpu()
    meta = dict(metadata or {})
    if SPARSE_METADATA_KEY in meta:
        raise ValueError(f"metadata key {SPARSE_METADATA_KEY!r} is reserved")
    meta[SPARSE_METADATA_KEY] = json.dumps({"version": _FORMAT_VERSION, "tensors": described})
    save_file(flat, os.fspath(path), metadata=meta)


def load_sparse(
    path: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[dict[str, Tensor | SparseWeight], dict[str, str]]:
    """Read a file written by ``save_sparse``.

    Returns:
        ``(tensors, metadata)``: name -> dense tensor or sparse weight, and the remaining string metadata.
    """
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        metadata = dict(f.metadata() or {})
        flat = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    info = json.loads(metadata.pop(SPARSE_METADATA_KEY, '{"version": 1, "tensors": {}}'))
    if info.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported sparse format version {info.get('version')}")
    out: dict[str, Tensor | SparseWeight] = {}
    for name, entry in info["tensors"].items():
        shape = (int(entry["shape"][0]), int(entry["shape"][1]))
        weight: SparseWeight
        if entry["format"] == "2:4":
            weight = Sparse24Weight(flat.pop(f"{name}.values"), flat.pop(f"{name}.meta"), shape)
        elif entry["format"] == "2:4-int4":
            dtype = getattr(torch, str(entry["dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{path}: entry {name!r} has unknown dtype {entry['dtype']!r}")
            weight = Sparse24Int4Weight(
                flat.pop(f"{name}.codes"),
                flat.pop(f"{name}.meta"),
                flat.pop(f"{name}.scales"),
                None if entry["symmetric"] else flat.pop(f"{name}.zeros"),
                shape,
                int(entry["group_size"]),
                dtype,
            )
        elif entry["format"] == "bitmask":
            weight = BitmaskWeight(
                flat.pop(f"{name}.values"),
                flat.pop(f"{name}.bitmask"),
                flat.pop(f"{name}.offsets"),
                shape,
                int(entry["tile"]),
            )
        else:
            raise ValueError(f"{path}: entry {name!r} has unknown format {entry['format']!r}")
        out[name] = weight
    out.update(flat)
    return out, metadata
