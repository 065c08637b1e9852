"""Decode GEMV / skinny GEMM ``y = x @ W^T + b`` (M <= 16) with a bitmask ``W``: Triton kernel and reference.

Built for the weight-bandwidth-bound decode regime: each program reads its ``(BN, BK)`` weight tile once in
compressed form (``(BN, BK/8)`` mask bytes + the tile's nonzeros) and never builds the dense tile. Per mask
byte ``j`` (8 columns) it counts the set bits (popcount), takes the exclusive prefix sum of the counts along
the row tile (``tl.cumsum``) to find where the byte's nonzeros start in ``values``, then walks the byte's 8
bits, loading the value of each set bit and multiplying it with input column ``8j + c``. Products accumulate
element-wise in fp32 ``(block_m, BN, BK/8)`` registers, reduced once at the end. A program handles
``block_m`` input rows (1, 2, 4 or 8: batched decode), reading each weight tile once for all of them. A
program starts from the stored offset of its first tile, so K can be split across programs at multiples of
the format's offset tile.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from ._common import (
    KernelConfig,
    accumulate_dtype,
    check_launchable,
    default_config,
    finish_split,
    flatten_input,
    k_per_split,
    k_tail,
    prepare_output,
)
from .formats import BitmaskWeight

__all__ = ["bitmask_gemv", "bitmask_gemv_reference"]


def bitmask_gemv_reference(x: Tensor, weight: BitmaskWeight, bias: Tensor | None = None) -> Tensor:
    """Pure-torch ``x @ W^T + bias`` over the stored nonzeros only (a segment sum per row).

    Args:
        x: ``(..., K)`` input.
        weight: bitmask compressed ``(N, K)`` weight.
        bias: optional ``(N,)``.

    Returns:
        ``(..., N)`` in ``x.dtype``, accumulated in fp32 (fp64 for fp64 inputs).
    """
    n, k = weight.shape
    acc = accumulate_dtype(x.dtype)
    rows, cols = weight.mask().nonzero(as_tuple=True)  # row-major, the order of ``values``
    x2 = x.reshape(-1, k).to(acc)  # (M, K)
    products = x2[:, cols] * weight.values.to(acc)  # (M, nnz)
    y = torch.zeros(x2.shape[0], n, dtype=acc, device=x.device).index_add_(1, rows, products)  # (M, N)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def bitmask_gemv_kernel(
        x_ptr,  # (M, K)
        values_ptr,  # (nnz,)
        bitmask_ptr,  # (N, ceil(K/8)) uint8
        offsets_ptr,  # (N, ceil(K/tile)) int32
        bias_ptr,  # (N,)
        out_ptr,  # (M, N), or (splits, M, N) fp32 for split-K
        M,
        N,
        K,
        stride_xm,
        stride_bn,
        stride_on,
        stride_om,
        stride_os,
        k_split,  # columns per split, a multiple of BLOCK_K and of tile
        tile,
        HAS_BIAS: tl.constexpr,
        K_TAIL: tl.constexpr,  # 0: K % BLOCK_K == 0, else masked
        ROWS: tl.constexpr,  # input rows per program, sharing each weight tile
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        BLOCK_J: tl.constexpr = BLOCK_K // 8  # mask bytes per row tile
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_m = pid_m * ROWS + tl.arange(0, ROWS)
        m_ok = offs_m < M
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # (ROWS, 1)

        acc = tl.zeros((ROWS, BLOCK_N, BLOCK_J), dtype=tl.float32)
        k_lo = pid_s * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        # Index in values of each row's first entry at or after column k_lo.
        base = tl.load(offsets_ptr + offs_n * stride_on + k_lo // tile, mask=n_ok, other=0)  # (BN,)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_j = k0 // 8 + tl.arange(0, BLOCK_J)
            mask_ptrs = bitmask_ptr + offs_n[:, None] * stride_bn + offs_j[None, :]
            if K_TAIL == 0:
                packed = tl.load(mask_ptrs, mask=n_ok[:, None], other=0)
            else:
                packed = tl.load(mask_ptrs, mask=n_ok[:, None] & (offs_j * 8 < K)[None, :], other=0)
            packed = packed.to(tl.int32)  # (BN, BJ); bits past K are zero
            count = packed - ((packed >> 1) & 0x55)  # popcount of each byte
            count = (count & 0x33) + ((count >> 2) & 0x33)
            count = (count + (count >> 4)) & 0x0F
            index = base[:, None] + tl.cumsum(count, axis=1) - count  # (BN, BJ): first value of each byte
            base += tl.sum(count, axis=1)
            for c in tl.static_range(8):
                bit = (packed >> c) & 1
                w = tl.load(
                    values_ptr + index, mask=bit != 0, other=0.0
                )  # (BN, BJ), 0 where the bit is clear
                index += bit
                col = offs_j * 8 + c
                if K_TAIL == 0:  # constexpr branch: no K mask when K is whole tiles
                    xc = tl.load(x_rows + col[None, :], mask=m_ok[:, None], other=0.0)  # (ROWS, BJ)
                else:
                    xc = tl.load(x_rows + col[None, :], mask=m_ok[:, None] & (col < K)[None, :], other=0.0)
                acc += w.to(tl.float32)[None, :, :] * xc.to(tl.float32)[:, None, :]

        y = tl.sum(acc, axis=2)  # (ROWS, BN)
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    return bitmask_gemv_kernel


def bitmask_gemv(
    x: Tensor,
    weight: BitmaskWeight,
    bias: Tensor | None = None,
    *,
    config: KernelConfig | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``x @ W^T + bias`` for few input rows (decode), reading the bitmask weight once (Triton).

    Args:
        x: ``(..., K)`` input, same dtype and device as the weight values; meant for ``M <= 16`` rows.
        weight: bitmask compressed ``(N, K)`` weight.
        bias: optional ``(N,)``.
        config: a decode-kernel config (``block_m`` 1, 2, 4 or 8: rows per program, each weight tile read
            once for them); if None, ``default_config`` for ``min(M, 4)`` rows (always a decode config).
        out: optional contiguous ``(..., N)`` output buffer of ``x.dtype``.

    Returns:
        ``(..., N)`` in ``x.dtype``.
    """
    n, k = weight.shape
    x2 = flatten_input(x, k, weight.dtype, weight.device)  # (M, K)
    check_launchable(x2)
    m = x2.shape[0]
    cfg = config or default_config(min(m, 4), n, k, x2.device)
    if cfg.use_dot:
        raise ValueError(f"bitmask_gemv takes block_m 1 to 8, got {cfg.block_m}; use bitmask_matmul")
    k_split, splits = k_per_split(k, cfg, align=weight.tile)
    result, target = prepare_output(x, n, out, splits)
    if m == 0:
        return result
    values = weight.values.contiguous() if weight.nnz else weight.values.new_zeros(1)  # unread if nnz == 0
    bitmask = weight.bitmask if weight.bitmask.stride(-1) == 1 else weight.bitmask.contiguous()
    offsets = weight.offsets if weight.offsets.stride(-1) == 1 else weight.offsets.contiguous()
    fused_bias = bias is not None and splits == 1
    grid = (-(-n // cfg.block_n), -(-m // cfg.block_m), splits)
    _kernel()[grid](
        x2,
        values,
        bitmask,
        offsets,
        bias if fused_bias else values,
        target,
        m,
        n,
        k,
        x2.stride(0),
        bitmask.stride(0),
        offsets.stride(0),
        target.stride(-2),
        target.stride(0) if splits > 1 else 0,
        k_split,
        weight.tile,
        HAS_BIAS=fused_bias,
        K_TAIL=k_tail(k, cfg.block_k),
        ROWS=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if splits > 1:
        finish_split(result, target, bias)
    return result
