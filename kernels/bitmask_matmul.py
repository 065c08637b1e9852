"""``y = x @ W^T + b`` with a bitmask compressed ``W`` (prefill / larger M): Triton kernel and reference.

The kernel reads each weight tile once in compressed form (``(BN, BK/8)`` mask bytes + the tile's nonzeros,
about 1.13 bytes per element for a 50%-sparse 16-bit weight) and expands it to a dense ``(BN, BK)`` tile in
registers: the value index of a set bit is the row's running offset plus the in-tile exclusive prefix sum
of the bits (``tl.cumsum``). ``tl.dot`` then multiplies the ``(BM, BK)`` input tile with it on tensor cores
(``block_m >= 16``), with grouped program ordering so weight tiles are reused from L2. A program starts from
the stored offset of its first tile, so K can be split across programs at multiples of the format's offset
tile. Configs with ``block_m`` 1 to 8 go to the decode kernel (``bitmask_gemv``).

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
from .bitmask_gemv import bitmask_gemv
from .formats import BitmaskWeight

__all__ = ["bitmask_matmul", "bitmask_matmul_reference"]


def bitmask_matmul_reference(x: Tensor, weight: BitmaskWeight, bias: Tensor | None = None) -> Tensor:
    """Pure-torch ``x @ W^T + bias`` accumulated in fp32 (fp64 for fp64 inputs).

    Args:
        x: ``(..., K)`` input.
        weight: bitmask compressed ``(N, K)`` weight.
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
    def bitmask_matmul_kernel(
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
        mask_cols = (K + 7) // 8
        shifts = tl.arange(0, 8).to(tl.uint8)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_s * k_split
        k_hi = tl.minimum(k_lo + k_split, K)
        # Index in values of each row's first entry at or after column k_lo.
        base = tl.load(offsets_ptr + offs_n * stride_on + k_lo // tile, mask=n_ok, other=0)  # (BN,)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_b = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            packed = tl.load(
                bitmask_ptr + offs_n[:, None] * stride_bn + offs_b[None, :],
                mask=n_ok[:, None] & (offs_b < mask_cols)[None, :],
                other=0,
            )  # (BN, BK/8); padding bits past K are zero
            bits = tl.reshape((packed[:, :, None] >> shifts[None, None, :]) & 1, (BLOCK_N, BLOCK_K))
            bits = bits.to(tl.int32)  # (BN, BK)
            before = tl.cumsum(bits, axis=1) - bits  # exclusive in-tile prefix
            w = tl.load(values_ptr + (base[:, None] + before), mask=bits != 0, other=0.0)  # (BN, BK)
            base += tl.sum(bits, axis=1)

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

    return bitmask_matmul_kernel


def bitmask_matmul(
    x: Tensor,
    weight: BitmaskWeight,
    bias: Tensor | None = None,
    *,
    config: KernelConfig | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``x @ W^T + bias`` with the bitmask weight expanded on chip (Triton).

    Args:
        x: ``(..., K)`` input, same dtype and device as the weight values.
        weight: bitmask compressed ``(N, K)`` weight.
        bias: optional ``(N,)``.
        config: tile sizes; ``default_config(M, N, K)`` if None. ``block_m`` 1 runs ``bitmask_gemv``.
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
        return bitmask_gemv(x, weight, bias, config=cfg, out=out)
    k_split, splits = k_per_split(k, cfg, align=weight.tile)
    result, target = prepare_output(x, n, out, splits)
    if m == 0:
        return result
    values = weight.values.contiguous() if weight.nnz else weight.values.new_zeros(1)  # unread if nnz == 0
    bitmask = weight.bitmask if weight.bitmask.stride(-1) == 1 else weight.bitmask.contiguous()
    offsets = weight.offsets if weight.offsets.stride(-1) == 1 else weight.offsets.contiguous()
    precision, upcast = dot_flags(x2.dtype)
    fused_bias = bias is not None and splits == 1
    grid = (-(-m // cfg.block_m) * -(-n // cfg.block_n), splits)
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
