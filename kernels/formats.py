"""Compressed weight formats for sparse inference: 2:4 and unstructured bitmask.

A weight is the ``(N, K)`` matrix of an ``nn.Linear`` (out features ``N``, in features ``K``); both formats
compress along ``K`` so that a kernel computing ``y = x @ W^T`` reads each row's compressed data once.

2:4 (``Sparse24Weight``)
    ``values``: ``(N, K/2)``, the two kept entries of every group of 4 columns, in column order.
    ``meta``: ``(N, ceil(K/8))`` uint8; kept value ``j`` of a row has in-group position
    ``(meta[:, j // 4] >> (2 * (j % 4))) & 3``, i.e. one byte holds the positions of two groups.
    1.125 bytes per element for a 16-bit dtype (0.5625 of dense).

Bitmask (``BitmaskWeight``)
    ``values``: ``(nnz,)``, the nonzeros in row-major order.
    ``bitmask``: ``(N, ceil(K/8))`` uint8; column ``k`` is nonzero iff ``(bitmask[:, k // 8] >> (k % 8)) & 1``.
    ``offsets``: ``(N, ceil(K/tile))`` int32; index into ``values`` of the first nonzero at or after column
    ``t * tile`` of each row, so a kernel can start at any tile boundary (split-K) and count the rest of
    the way with an in-tile prefix sum over the bits.

Both round-trip exactly: ``decompress(compress(w))`` is equal to ``w`` (a ``-0.0`` that is not stored comes
back as ``+0.0``, which compares equal). ``save_sparse``/``load_sparse`` store a dict of dense and compressed
tensors in one safetensors file; a compressed entry ``name`` becomes ``name.values``, ``name.meta`` (2:4) or
``name.values``, ``name.bitmask``, ``name.offsets`` (bitmask), described by JSON in the file metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_TILE",
    "SPARSE_METADATA_KEY",
    "BitmaskWeight",
    "Sparse24Weight",
    "SparseWeight",
    "compress",
    "compress_24",
    "compress_bitmask",
    "is_24_sparse",
    "load_sparse",
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


SparseWeight: TypeAlias = Sparse24Weight | BitmaskWeight
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
        tensors: name -> dense tensor or ``Sparse24Weight``/``BitmaskWeight``.
        metadata: extra string metadata (the key ``"oneshot.sparse"`` is reserved).
    """
    from safetensors.torch import save_file

    flat: dict[str, Tensor] = {}
    described: dict[str, dict[str, object]] = {}
    for name, value in tensors.items():
        if isinstance(value, Tensor):
            flat[name] = value.detach().contiguous().cpu()
            continue
        if not isinstance(value, Sparse24Weight | BitmaskWeight):
            raise TypeError(f"{name}: expected a Tensor or a sparse weight, got {type(value).__name__}")
        entry: dict[str, object] = {"format": value.format, "shape": list(value.shape)}
        if isinstance(value, BitmaskWeight):
            entry["tile"] = value.tile
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
