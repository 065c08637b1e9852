"""``y = x @ W^T + b`` with a 2:4 compressed ``W`` (prefill / larger M): Triton kernel and reference.

The kernel reads each weight tile once in compressed form (``(BN, BK/2)`` values + ``(BN, BK/8)`` metadata
bytes, 1.125 bytes per element in 16-bit), expands it to a dense ``(BN, BK)`` tile in registers and
multiplies the ``(BM, BK)`` input tile with it by ``tl.dot`` on tensor cores (``block_m >= 16``), with
grouped program ordering so weight tiles are reused from L2 and optional split-K for skinny M. Configs with
``block_m`` 1 to 8 go to the decode kernel (``sparse24_gemv``), which never builds the dense tile.

Accumulation is fp32; the output has the input dtype.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor

from ._common import (
    KernelConfig,
    accumulate_dtype,
    check_launchable,
    default_config,
    dot_flags,
    finish_split,
    flatten_input,
    k_per_split,
    prepare_output,
)
from .formats import Sparse24Weight
from .sparse24_gemv import sparse24_gemv

__all__ = ["sparse24_matmul", "sparse24_matmul_reference"]


def sparse24_matmul_reference(x: Tensor, weight: Sparse24Weight, bias: Tensor | None = None) -> Tensor:
    """Pure-torch ``x @ W^T + bias`` accumulated in fp32 (fp64 for fp64 inputs).

    Args:
        x: ``(..., K)`` input.
        weight: 2:4 compressed ``(N, K)`` weight.
        bias: optional ``(N,)``.

    Returns:
        ``(..., N)`` in ``x.dtype``.
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
    def sparse24_matmul_kernel(
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
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        DOT_UPCAST: tl.constexpr,
    ):
        pid = tl.program_id(0)
        pid_s = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # Grouped ordering: GROUP_M row blocks walk the N blocks together, sharing weight tiles in L2.
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        half_k = K // 2
        meta_cols = (K + 7) // 8
        shifts = (tl.arange(0, 4) * 2).to(tl.uint8)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_s * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            # Metadata: one byte per 8 columns, four 2-bit positions, low bits first.
            offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            packed = tl.load(
                meta_ptr + offs_n[:, None] * stride_mn + offs_b[None, :],
                mask=n_ok[:, None] & (offs_b < meta_cols)[None, :],
                other=0,
            )  # (BN, BK/8)
            pos = tl.reshape((packed[:, :, None] >> shifts[None, None, :]) & 3, (BLOCK_N, BLOCK_K // 2))
            offs_v = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            vals = tl.load(
                values_ptr + offs_n[:, None] * stride_vn + offs_v[None, :],
                mask=n_ok[:, None] & (offs_v < half_k)[None, :],
                other=0.0,
            )  # (BN, BK/2)
            # Each group keeps two values at ascending positions p0 < p1: p0 in 0..2, p1 in 1..3.
            v0, v1 = tl.split(tl.reshape(vals, (BLOCK_N, BLOCK_K // 4, 2)))
            p0, p1 = tl.split(tl.reshape(pos, (BLOCK_N, BLOCK_K // 4, 2)))
            zero = tl.zeros_like(v0)
            d0 = tl.where(p0 == 0, v0, zero)
            d1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))
            d2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))
            d3 = tl.where(p1 == 3, v1, zero)
            # join(join(d0, d2), join(d1, d3))[n, g, i, j] = d_{2i+j}: row-major flatten gives column 4g+2i+j.
            w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, BLOCK_K))  # (BN, BK)

            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                mask=m_ok[:, None] & (offs_k < K)[None, :],
                other=0.0,
            )  # (BM, BK)
            if DOT_UPCAST:
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    return sparse24_matmul_kernel


def sparse24_matmul(
    x: Tensor,
    weight: Sparse24Weight,
    bias: Tensor | None = None,
    *,
    config: KernelConfig | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``x @ W^T + bias`` with the 2:4 weight expanded on chip (Triton).

    Args:
        x: ``(..., K)`` input, same dtype and device as the weight values.
        weight: 2:4 compressed ``(N, K)`` weight.
        bias: optional ``(N,)``.
        config: tile sizes; ``default_config(M, N, K)`` if None. ``block_m`` 1 runs ``sparse24_gemv``.
        out: optional contiguous ``(..., N)`` output buffer of ``x.dtype``.

    Returns:
        ``(..., N)`` in ``x.dtype``.
    """
    n, k = weight.shape
    x2 = flatten_input(x, k, weight.dtype, weight.device)  # (M, K)
    check_launchable(x2)
    m = x2.shape[0]
    cfg = config or default_config(m, n, k, x2.device)
    if not cfg.use_dot:
        return sparse24_gemv(x, weight, bias, config=cfg, out=out)
    k_split, splits = k_per_split(k, cfg)
    result, target = prepare_output(x, n, out, splits)
    if m == 0:
        return result
    values = weight.values if weight.values.stride(-1) == 1 else weight.values.contiguous()
    meta = weight.meta if weight.meta.stride(-1) == 1 else weight.meta.contiguous()
    precision, upcast = dot_flags(x2.dtype)
    fused_bias = bias is not None and splits == 1
    grid = (-(-m // cfg.block_m) * -(-n // cfg.block_n), splits)
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
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        DOT_PRECISION=precision,
        DOT_UPCAST=upcast,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if splits > 1:
        finish_split(result, target, bias)
    return result
