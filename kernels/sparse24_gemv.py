"""Decode GEMV / skinny GEMM ``y = x @ W^T + b`` (M <= 16) with a 2:4 ``W``: Triton kernel and reference.

Built for the weight-bandwidth-bound decode regime: each program reads its ``(BN, BK)`` weight tile once in
compressed form (``(BN, BK/8)`` metadata bytes + ``(BN, BK/2)`` values: 1.125 bytes per element in 16-bit)
and never builds the dense tile. It works per metadata byte ``j`` (8 columns, 2 groups, 4 kept values): the
byte's four 2-bit positions select, for every kept value, which of the 4 input columns of its group it
multiplies, and the products accumulate element-wise in fp32 ``(BN, BK/8)`` registers that are reduced
once at the end. Each program handles ``block_m`` input rows (1, 2, 4 or 8: batched decode): it reads a
weight tile once and multiplies it with every row's inputs, accumulating ``(block_m, BN, BK/8)`` fp32
partials, so M rows cost one read of the weight per ``block_m`` rows instead of one per row. K can be split
across programs (fp32 partials summed afterwards) to fill the GPU when N is small.
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
from .formats import Sparse24Weight

__all__ = ["sparse24_gemv", "sparse24_gemv_reference"]


def sparse24_gemv_reference(x: Tensor, weight: Sparse24Weight, bias: Tensor | None = None) -> Tensor:
    """Pure-torch ``x @ W^T + bias``, gathering the input columns each kept value multiplies.

    Args:
        x: ``(..., K)`` input.
        weight: 2:4 compressed ``(N, K)`` weight.
        bias: optional ``(N,)``.

    Returns:
        ``(..., N)`` in ``x.dtype``, accumulated in fp32 (fp64 for fp64 inputs).
    """
    n, k = weight.shape
    acc = accumulate_dtype(x.dtype)
    group = torch.arange(k // 2, device=weight.device) // 2  # group of each kept value
    cols = weight.positions() + 4 * group  # (N, K/2): input column of each kept value
    x2 = x.reshape(-1, k).to(acc)  # (M, K)
    gathered = x2[:, cols]  # (M, N, K/2)
    y = (gathered * weight.values.to(acc)).sum(-1)  # (M, N)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def sparse24_gemv_kernel(
        x_ptr,  # (M, K)
        values_ptr,  # (N, K/2)
        meta_ptr,  # (N, ceil(K/8)) uint8
        bias_ptr,  # (N,)
        out_ptr,  # (M, N), or (splits, M, N) fp32 for split-K
        M,
        N,
        K,
        stride_xm,
        stride_vn,
        stride_mn,
        stride_om,
        stride_os,
        k_split,  # columns per split, a multiple of BLOCK_K
        HAS_BIAS: tl.constexpr,
        K_TAIL: tl.constexpr,  # 0: K % BLOCK_K == 0; 1: K % 8 == 0; 2: K % 8 == 4
        ROWS: tl.constexpr,  # input rows per program, sharing each weight tile
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        BLOCK_J: tl.constexpr = BLOCK_K // 8  # metadata bytes (8 columns, 4 kept values) per row tile
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_m = pid_m * ROWS + tl.arange(0, ROWS)
        m_ok = offs_m < M
        half_k = K // 2
        quad = tl.arange(0, 4)
        octet = tl.arange(0, 8)
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None, None] * stride_xm  # (ROWS, 1, 1)

        acc = tl.zeros((ROWS, BLOCK_N, BLOCK_J), dtype=tl.float32)
        k_lo = pid_s * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_j = k0 // 8 + tl.arange(0, BLOCK_J)
            offs_v = offs_j[:, None] * 4 + quad[None, :]  # (BJ, 4): the byte's four kept values
            offs_x = offs_j[:, None] * 8 + octet[None, :]  # (BJ, 8): the byte's eight input columns
            meta_ptrs = meta_ptr + offs_n[:, None] * stride_mn + offs_j[None, :]
            value_ptrs = values_ptr + offs_n[:, None, None] * stride_vn + offs_v[None, :, :]
            if K_TAIL == 0:
                packed = tl.load(meta_ptrs, mask=n_ok[:, None], other=0)
                vals = tl.load(value_ptrs, mask=n_ok[:, None, None], other=0.0)
                xs = tl.load(x_rows + offs_x[None, :, :], mask=m_ok[:, None, None], other=0.0)
            else:
                j_ok = offs_j * 8 < K
                packed = tl.load(meta_ptrs, mask=n_ok[:, None] & j_ok[None, :], other=0)
                if K_TAIL == 1:  # noqa: SIM108 (whole bytes: the mask is constant over a byte)
                    v_ok = j_ok[:, None]
                else:  # the last byte holds one group
                    v_ok = offs_v < half_k
                vals = tl.load(value_ptrs, mask=n_ok[:, None, None] & v_ok[None, :, :], other=0.0)
                xs = tl.load(
                    x_rows + offs_x[None, :, :],
                    mask=m_ok[:, None, None] & (offs_x < K)[None, :, :],
                    other=0.0,
                )
            packed = packed.to(tl.int32)  # (BN, BJ): positions of values 4j..4j+3, 2 bits each, low first
            # vals (BN, BJ, 4) -> [.., a, c] = value 4j + 2a + c; split c, then a.
            even, odd = tl.split(tl.reshape(vals, (BLOCK_N, BLOCK_J, 2, 2)))
            v0, v2 = tl.split(even)
            v1, v3 = tl.split(odd)
            # xs (ROWS, BJ, 8) -> [r, j, a, b, c] = column 8j + 4a + 2b + c of row r.
            xs = xs.to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(xs, (ROWS, BLOCK_J, 2, 2, 2)))
            x_e0, x_e1 = tl.split(x_even)  # columns 8j + 4a + {0, 2}
            x_o0, x_o1 = tl.split(x_odd)  # columns 8j + 4a + {1, 3}
            x0, x4 = tl.split(x_e0)
            x2, x6 = tl.split(x_e1)
            x1, x5 = tl.split(x_o0)
            x3, x7 = tl.split(x_o1)
            # Group 2j (values 4j, 4j+1; columns 8j..8j+3) and group 2j+1 (values 4j+2, 4j+3; columns
            # 8j+4..8j+7). Positions ascend: the first kept value sits at 0..2, the second at 1..3.
            # Broadcast: positions and values (1, BN, BJ), inputs (ROWS, 1, BJ).
            x0, x1, x2, x3 = x0[:, None, :], x1[:, None, :], x2[:, None, :], x3[:, None, :]
            x4, x5, x6, x7 = x4[:, None, :], x5[:, None, :], x6[:, None, :], x7[:, None, :]
            p0 = (packed & 3)[None, :, :]
            p1 = ((packed >> 2) & 3)[None, :, :]
            xf = tl.where(p0 == 0, x0, tl.where(p0 == 1, x1, x2))
            xs = tl.where(p1 == 1, x1, tl.where(p1 == 2, x2, x3))
            acc += v0.to(tl.float32)[None, :, :] * xf + v1.to(tl.float32)[None, :, :] * xs
            p0 = ((packed >> 4) & 3)[None, :, :]
            p1 = ((packed >> 6) & 3)[None, :, :]
            xf = tl.where(p0 == 0, x4, tl.where(p0 == 1, x5, x6))
            xs = tl.where(p1 == 1, x5, tl.where(p1 == 2, x6, x7))
            acc += v2.to(tl.float32)[None, :, :] * xf + v3.to(tl.float32)[None, :, :] * xs

        y = tl.sum(acc, axis=2)  # (ROWS, BN)
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    return sparse24_gemv_kernel


def sparse24_gemv(
    x: Tensor,
    weight: Sparse24Weight,
    bias: Tensor | None = None,
    *,
    config: KernelConfig | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``x @ W^T + bias`` for few input rows (decode), reading the 2:4 weight once (Triton).

    Args:
        x: ``(..., K)`` input, same dtype and device as the weight values; meant for ``M <= 16`` rows.
        weight: 2:4 compressed ``(N, K)`` weight.
        bias: optional ``(N,)``.
        config: a decode-kernel config (``block_m`` 1, 2, 4 or 8: rows per program); if None,
            ``default_config`` for ``min(M, 4)`` rows (always a decode config).
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
        raise ValueError(f"sparse24_gemv takes block_m 1 to 8, got {cfg.block_m}; use sparse24_matmul")
    k_split, splits = k_per_split(k, cfg)
    result, target = prepare_output(x, n, out, splits)
    if m == 0:
        return result
    values = weight.values if weight.values.stride(-1) == 1 else weight.values.contiguous()
    meta = weight.meta if weight.meta.stride(-1) == 1 else weight.meta.contiguous()
    fused_bias = bias is not None and splits == 1
    grid = (-(-n // cfg.block_n), -(-m // cfg.block_m), splits)
    _kernel()[grid](
        x2,
        values,
        meta,
        bias if fused_bias else values,
        target,
        m,
        n,
        k,
        x2.stride(0),
        values.stride(0),
        meta.stride(0),
        target.stride(-2),
        target.stride(0) if splits > 1 else 0,
        k_split,
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
