"""Decode GEMV / skinny GEMM ``y = x @ W^T + b`` (M <= 16) with a 2:4 ``W`` whose kept values are 4-bit
group-quantized (``Sparse24Int4Weight``): Triton kernel and pure-torch reference.

The kernel has the structure of ``sparse24_gemv``: each program takes ``block_m`` input rows (1, 2, 4 or 8)
and ``block_n`` weight rows, reads every ``(BN, BK)`` weight tile once in compressed form and never builds
the dense tile. Per metadata byte ``j`` (8 columns, 2 groups of 4, 4 kept values) it reads the byte's two
code bytes (four 4-bit codes), dequantizes them in registers as ``float32(scale) * (code - zero)`` with the
scale and zero-point of the group holding column ``8j`` (a quantization group spans a multiple of 8
columns, or the whole row, so one byte never straddles two), rounds the weight to the input dtype (so the
product is the one the dequantized dense layer computes) and multiplies it with the input column its 2-bit
position selects, accumulating fp32 ``(block_m, BN, BK/8)`` partials that are reduced once at the end.
Split-K sums fp32 partials afterwards; K may end in a half-filled metadata byte (K % 8 == 4) and need not
be a multiple of the group size.

Bytes per weight element read: 0.25 (codes) + 0.125 (metadata) + the scale (and zero-point) of its group
spread over ``group_size`` columns, i.e. 0.39 for fp16 scales in groups of 128.

Loads, per program and K step (what can be 16-byte vector loads on a GPU):

* codes: ``BK/4`` contiguous bytes of each weight row, loaded flat (``BN, BK/4``) and split in registers,
  so rows with ``K % 64 == 0`` (16-byte aligned row starts) can use 16-byte loads;
* metadata: ``BK/8`` contiguous bytes per row, as in ``sparse24_gemv`` (16-byte loads for ``K % 128 == 0``);
* inputs: 8 contiguous elements per metadata byte (16 bytes in fp16/bf16) for every row of the block;
* scales and zero-points: NOT vector loads: one gathered element per metadata byte (the same address for
  ``group_size / 8`` consecutive bytes; served by L1, a small fraction of the traffic).

Kept simple and correct first; not tuned on a GPU.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor

from ._common import (
    KernelConfig,
    accumulate_dtype,
    check_launchable,
    decode_config,
    finish_split,
    flatten_input,
    k_per_split,
    k_tail,
    prepare_output,
)
from .formats import Sparse24Int4Weight

__all__ = ["sparse24_int4_gemv", "sparse24_int4_gemv_reference"]


def sparse24_int4_gemv_reference(x: Tensor, weight: Sparse24Int4Weight, bias: Tensor | None = None) -> Tensor:
    """Pure-torch ``x @ W^T + bias``: dequantize the weight (exactly as ``weight.decompress()``, in the
    weight's dtype), then multiply in fp32.

    Args:
        x: ``(..., K)`` input.
        weight: 2:4-int4 compressed ``(N, K)`` weight.
        bias: optional ``(N,)``.

    Returns:
        ``(..., N)`` in ``x.dtype``, accumulated in fp32 (fp64 for fp64 inputs).
    """
    acc = accumulate_dtype(x.dtype)
    y = x.to(acc) @ weight.decompress().to(acc).T  # (..., N)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def sparse24_int4_gemv_kernel(
        x_ptr,  # (M, K)
        codes_ptr,  # (N, K/4) uint8, two 4-bit codes per byte, low nibble first
        meta_ptr,  # (N, ceil(K/8)) uint8
        scales_ptr,  # (N, ceil(K/GROUP))
        zeros_ptr,  # (N, ceil(K/GROUP)) uint8 (unused when symmetric)
        bias_ptr,  # (N,)
        out_ptr,  # (M, N), or (splits, M, N) fp32 for split-K
        M,
        N,
        K,
        stride_xm,
        stride_cn,
        stride_mn,
        stride_sn,
        stride_zn,
        stride_om,
        stride_os,
        k_split,  # columns per split, a multiple of BLOCK_K
        HAS_BIAS: tl.constexpr,
        HAS_ZERO: tl.constexpr,  # False: symmetric, zero-point 8
        GROUP: tl.constexpr,  # columns per scale group: a multiple of 8, or >= K
        K_TAIL: tl.constexpr,  # 0: K % BLOCK_K == 0; 1: K % 8 == 0; 2: K % 8 == 4
        ROWS: tl.constexpr,  # input rows per program, sharing each weight tile
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        BLOCK_J: tl.constexpr = BLOCK_K // 8  # metadata bytes (8 columns, 4 kept values) per row tile
        BLOCK_Q: tl.constexpr = BLOCK_K // 4  # code bytes (2 kept values each) per row tile
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_m = pid_m * ROWS + tl.arange(0, ROWS)
        m_ok = offs_m < M
        octet = tl.arange(0, 8)
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None, None] * stride_xm  # (ROWS, 1, 1)
        rows_n = offs_n.to(tl.int64)[:, None]  # (BN, 1)
        wdtype = x_ptr.dtype.element_ty

        acc = tl.zeros((ROWS, BLOCK_N, BLOCK_J), dtype=tl.float32)
        k_lo = pid_s * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_j = k0 // 8 + tl.arange(0, BLOCK_J)
            offs_q = k0 // 4 + tl.arange(0, BLOCK_Q)  # flat: code bytes 2j, 2j + 1 of metadata byte j
            offs_x = offs_j[:, None] * 8 + octet[None, :]  # (BJ, 8): the byte's eight input columns
            offs_g = (offs_j * 8) // GROUP  # (BJ,) scale group of the byte's columns
            meta_ptrs = meta_ptr + rows_n * stride_mn + offs_j[None, :]
            code_ptrs = codes_ptr + rows_n * stride_cn + offs_q[None, :]
            scale_ptrs = scales_ptr + rows_n * stride_sn + offs_g[None, :]
            zero_ptrs = zeros_ptr + rows_n * stride_zn + offs_g[None, :]
            if K_TAIL == 0:
                w_ok = n_ok[:, None]
                q_ok = n_ok[:, None]
                x_ok = m_ok[:, None, None]
            else:
                w_ok = n_ok[:, None] & (offs_j * 8 < K)[None, :]
                q_ok = n_ok[:, None] & (offs_q < K // 4)[None, :]  # a half-filled byte has one code byte
                x_ok = m_ok[:, None, None] & (offs_x < K)[None, :, :]
            packed = tl.load(meta_ptrs, mask=w_ok, other=0).to(tl.int32)  # (BN, BJ)
            codes = tl.load(code_ptrs, mask=q_ok, other=0).to(tl.int32)  # (BN, BQ)
            scale = tl.load(scale_ptrs, mask=w_ok, other=0.0).to(tl.float32)  # (BN, BJ); 0 where masked
            if HAS_ZERO:
                zero = tl.load(zero_ptrs, mask=w_ok, other=0).to(tl.float32)
            else:
                zero = tl.full((BLOCK_N, BLOCK_J), 8.0, dtype=tl.float32)
            xs = tl.load(x_rows + offs_x[None, :, :], mask=x_ok, other=0.0)  # (ROWS, BJ, 8)

            # codes (BN, BQ) -> (BN, BJ, 2): byte c of metadata byte j holds values 4j + 2c (low nibble)
            # and 4j + 2c + 1 (high nibble).
            c0, c1 = tl.split(tl.reshape(codes, (BLOCK_N, BLOCK_J, 2)))
            # Dequantize in fp32, then round to the input dtype: the dense layer's weight.
            v0 = ((((c0 & 15).to(tl.float32) - zero) * scale).to(wdtype).to(tl.float32))[None, :, :]
            v1 = ((((c0 >> 4).to(tl.float32) - zero) * scale).to(wdtype).to(tl.float32))[None, :, :]
            v2 = ((((c1 & 15).to(tl.float32) - zero) * scale).to(wdtype).to(tl.float32))[None, :, :]
            v3 = ((((c1 >> 4).to(tl.float32) - zero) * scale).to(wdtype).to(tl.float32))[None, :, :]

            # xs (ROWS, BJ, 8) -> [r, j, a, b, c] = column 8j + 4a + 2b + c of row r (as in sparse24_gemv).
            xs = xs.to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(xs, (ROWS, BLOCK_J, 2, 2, 2)))
            x_e0, x_e1 = tl.split(x_even)  # columns 8j + 4a + {0, 2}
            x_o0, x_o1 = tl.split(x_odd)  # columns 8j + 4a + {1, 3}
            x0, x4 = tl.split(x_e0)
            x2, x6 = tl.split(x_e1)
            x1, x5 = tl.split(x_o0)
            x3, x7 = tl.split(x_o1)
            x0, x1, x2, x3 = x0[:, None, :], x1[:, None, :], x2[:, None, :], x3[:, None, :]
            x4, x5, x6, x7 = x4[:, None, :], x5[:, None, :], x6[:, None, :], x7[:, None, :]
            # Group 2j: values 4j, 4j+1 at columns 8j..8j+3; group 2j+1: values 4j+2, 4j+3 at 8j+4..8j+7.
            p0 = (packed & 3)[None, :, :]
            p1 = ((packed >> 2) & 3)[None, :, :]
            xf = tl.where(p0 == 0, x0, tl.where(p0 == 1, x1, x2))
            xs = tl.where(p1 == 1, x1, tl.where(p1 == 2, x2, x3))
            acc += v0 * xf + v1 * xs
            p0 = ((packed >> 4) & 3)[None, :, :]
            p1 = ((packed >> 6) & 3)[None, :, :]
            xf = tl.where(p0 == 0, x4, tl.where(p0 == 1, x5, x6))
            xs = tl.where(p1 == 1, x5, tl.where(p1 == 2, x6, x7))
            acc += v2 * xf + v3 * xs  # a missing second group (K % 8 == 4) meets inputs masked to 0

        y = tl.sum(acc, axis=2)  # (ROWS, BN)
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    return sparse24_int4_gemv_kernel


def _unit_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def sparse24_int4_gemv(
    x: Tensor,
    weight: Sparse24Int4Weight,
    bias: Tensor | None = None,
    *,
    config: KernelConfig | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``x @ W^T + bias`` for few input rows (decode), reading the 2:4-int4 weight once (Triton).

    Args:
        x: ``(..., K)`` input of ``weight.dtype`` on the weight's device; meant for ``M <= 16`` rows.
        weight: 2:4-int4 compressed ``(N, K)`` weight.
        bias: optional ``(N,)``.
        config: a decode-kernel config (``block_m`` 1, 2, 4 or 8: rows per program); if None,
            ``decode_config(M, N, K)``. There is no ``tl.dot`` kernel for this format: a config with
            ``block_m >= 16`` is a ValueError.
        out: optional contiguous ``(..., N)`` output buffer of ``x.dtype``.

    Returns:
        ``(..., N)`` in ``x.dtype``.
    """
    n, k = weight.shape
    x2 = flatten_input(x, k, weight.dtype, weight.device)  # (M, K)
    check_launchable(x2)
    m = x2.shape[0]
    cfg = config or decode_config(m, n, k, x2.device)
    if cfg.use_dot:
        raise ValueError(
            f"sparse24_int4_gemv takes block_m 1 to 8, got {cfg.block_m}; the 2:4-int4 format has only a "
            "decode kernel (larger M: decompress + F.linear)"
        )
    k_split, splits = k_per_split(k, cfg)
    result, target = prepare_output(x, n, out, splits)
    if m == 0:
        return result
    codes, meta, scales = _unit_stride(weight.codes), _unit_stride(weight.meta), _unit_stride(weight.scales)
    zeros = codes if weight.zeros is None else _unit_stride(weight.zeros)
    fused_bias = bias is not None and splits == 1
    grid = (-(-n // cfg.block_n), -(-m // cfg.block_m), splits)
    _kernel()[grid](
        x2,
        codes,
        meta,
        scales,
        zeros,
        bias if fused_bias else scales,
        target,
        m,
        n,
        k,
        x2.stride(0),
        codes.stride(0),
        meta.stride(0),
        scales.stride(0),
        zeros.stride(0),
        target.stride(-2),
        target.stride(0) if splits > 1 else 0,
        k_split,
        HAS_BIAS=fused_bias,
        HAS_ZERO=weight.zeros is not None,
        GROUP=weight.group_size,
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
