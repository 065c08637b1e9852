"""The sparse matmuls as PyTorch custom ops, so ``torch.compile`` and CUDA graphs see one opaque call.

``torch.ops.oneshot.sparse24_linear(x, values, meta, bias, backend, config)`` and
``torch.ops.oneshot.bitmask_linear(x, values, bitmask, offsets, bias, tile, backend, config)`` and
``torch.ops.oneshot.sparse24_int4_linear(x, codes, meta, scales, zeros, bias, group_size, backend, config)``
compute ``x @ W^T + bias`` for a compressed ``(N, K)`` weight given by its tensors (see ``kernels.formats``):

* ``backend="reference"``: the pure-torch ``*_reference`` function (any device, fp32 accumulation);
* ``backend="triton"``: the Triton kernel (CUDA, or the CPU under ``TRITON_INTERPRET=1``), with ``config``
  the seven ``KernelConfig`` fields (block_m, block_n, block_k, split_k, group_m, num_warps, num_stages) or
  empty for ``default_config``. The 2:4-int4 op has only the decode kernel (``block_m`` 1 to 8; empty
  config: ``decode_config``).

Each op has a fake (meta) implementation giving the ``(..., N)`` output of ``x.dtype``, so a model of
``SparseLinear`` layers compiles with ``fullgraph=True``, and an autograd formula for ``x`` and ``bias``
(the compressed weight gets no gradient). ``SparseLinear`` calls these ops for its ``"triton"`` and
``"reference"`` backends. They are registered when ``oneshot.kernels`` is imported (no Triton import, no
CUDA initialisation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._common import KernelConfig
from .bitmask_matmul import bitmask_matmul, bitmask_matmul_reference
from .formats import BitmaskWeight, Sparse24Int4Weight, Sparse24Weight
from .sparse24_int4_gemv import sparse24_int4_gemv, sparse24_int4_gemv_reference
from .sparse24_matmul import sparse24_matmul, sparse24_matmul_reference

__all__ = ["OP_BACKENDS", "bitmask_linear", "config_fields", "sparse24_int4_linear", "sparse24_linear"]

OP_BACKENDS = ("reference", "triton")
"""Valid ``backend`` arguments of the ops."""


def config_fields(config: KernelConfig | None) -> list[int]:
    """The ``config`` argument of the ops for ``config`` (empty for the default)."""
    if config is None:
        return []
    return [int(getattr(config, f.name)) for f in dataclasses.fields(KernelConfig)]


def _config(fields: Sequence[int]) -> KernelConfig | None:
    if not fields:
        return None
    names = [f.name for f in dataclasses.fields(KernelConfig)]
    if len(fields) != len(names):
        raise ValueError(f"config needs {len(names)} integers ({', '.join(names)}), got {list(fields)}")
    return KernelConfig(**dict(zip(names, (int(v) for v in fields), strict=True)))


def _check_backend(backend: str) -> None:
    if backend not in OP_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(OP_BACKENDS)}")


@torch.library.custom_op("oneshot::sparse24_linear", mutates_args=())
def sparse24_linear(
    x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None, backend: str, config: Sequence[int]
) -> Tensor:
    """``x`` (..., K) @ W^T + bias -> (..., N) for the 2:4 weight ``values`` (N, K/2), ``meta`` (N, ceil(K/8))."""
    _check_backend(backend)
    weight = Sparse24Weight(values, meta, (values.shape[0], x.shape[-1]))
    if backend == "reference":
        return sparse24_matmul_reference(x, weight, bias)
    return sparse24_matmul(x, weight, bias, config=_config(config))


@torch.library.custom_op("oneshot::bitmask_linear", mutates_args=())
def bitmask_linear(
    x: Tensor,
    values: Tensor,
    bitmask: Tensor,
    offsets: Tensor,
    bias: Tensor | None,
    tile: int,
    backend: str,
    config: Sequence[int],
) -> Tensor:
    """``x`` (..., K) @ W^T + bias -> (..., N) for the bitmask weight ``values`` (nnz,), ``bitmask``
    (N, ceil(K/8)), ``offsets`` (N, ceil(K/tile))."""
    _check_backend(backend)
    weight = BitmaskWeight(values, bitmask, offsets, (bitmask.shape[0], x.shape[-1]), tile)
    if backend == "reference":
        return bitmask_matmul_reference(x, weight, bias)
    return bitmask_matmul(x, weight, bias, config=_config(config))


def _int4_weight(
    x: Tensor, codes: Tensor, meta: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int
) -> Sparse24Int4Weight:
    return Sparse24Int4Weight(codes, meta, scales, zeros, (codes.shape[0], x.shape[-1]), group_size, x.dtype)


@torch.library.custom_op("oneshot::sparse24_int4_linear", mutates_args=())
def sparse24_int4_linear(
    x: Tensor,
    codes: Tensor,
    meta: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bias: Tensor | None,
    group_size: int,
    backend: str,
    config: Sequence[int],
) -> Tensor:
    """``x`` (..., K) @ W^T + bias -> (..., N) for the 2:4-int4 weight ``codes`` (N, K/4), ``meta``
    (N, ceil(K/8)), ``scales`` and ``zeros`` (N, ceil(K/group_size); zeros None: symmetric), dequantized in
    ``x.dtype``."""
    _check_backend(backend)
    weight = _int4_weight(x, codes, meta, scales, zeros, group_size)
    if backend == "reference":
        return sparse24_int4_gemv_reference(x, weight, bias)
    return sparse24_int4_gemv(x, weight, bias, config=_config(config))


def _fake_output(x: Tensor, n: int, bias: Tensor | None) -> Tensor:
    if bias is not None:
        torch._check(bias.shape == (n,), lambda: f"bias shape {tuple(bias.shape)} != ({n},)")
    return x.new_empty((*x.shape[:-1], n))  # (..., N)


@sparse24_linear.register_fake
def _sparse24_fake(
    x: Tensor, values: Tensor, meta: Tensor, bias: Tensor | None, backend: str, config: Sequence[int]
) -> Tensor:
    torch._check(values.dim() == 2 and values.shape[1] * 2 == x.shape[-1], lambda: "values must be (N, K/2)")
    return _fake_output(x, values.shape[0], bias)


@bitmask_linear.register_fake
def _bitmask_fake(
    x: Tensor,
    values: Tensor,
    bitmask: Tensor,
    offsets: Tensor,
    bias: Tensor | None,
    tile: int,
    backend: str,
    config: Sequence[int],
) -> Tensor:
    torch._check(bitmask.dim() == 2, lambda: "bitmask must be (N, ceil(K/8))")
    return _fake_output(x, bitmask.shape[0], bias)


@sparse24_int4_linear.register_fake
def _sparse24_int4_fake(
    x: Tensor,
    codes: Tensor,
    meta: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bias: Tensor | None,
    group_size: int,
    backend: str,
    config: Sequence[int],
) -> Tensor:
    torch._check(codes.dim() == 2 and codes.shape[1] * 4 == x.shape[-1], lambda: "codes must be (N, K/4)")
    return _fake_output(x, codes.shape[0], bias)


def _grads(grad: Tensor, dense: Tensor, want_x: bool, want_bias: bool) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``x`` and ``bias`` from ``grad`` (..., N) and the dense weight (N, K)."""
    grad_x = grad @ dense.to(grad.dtype) if want_x else None  # (..., K)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if want_bias else None  # (N,)
    return grad_x, grad_bias


def _sparse24_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, values, meta, _, _, _ = inputs
    ctx.save_for_backward(values, meta)
    ctx.shape = (values.shape[0], x.shape[-1])


def _sparse24_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    values, meta = ctx.saved_tensors
    dense = Sparse24Weight(values, meta, ctx.shape).decompress()
    grad_x, grad_bias = _grads(grad, dense, ctx.needs_input_grad[0], ctx.needs_input_grad[3])
    return grad_x, None, None, grad_bias, None, None


def _bitmask_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, values, bitmask, offsets, _, tile, _, _ = inputs
    ctx.save_for_backward(values, bitmask, offsets)
    ctx.shape = (bitmask.shape[0], x.shape[-1])
    ctx.tile = tile


def _bitmask_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    values, bitmask, offsets = ctx.saved_tensors
    dense = BitmaskWeight(values, bitmask, offsets, ctx.shape, ctx.tile).decompress()
    grad_x, grad_bias = _grads(grad, dense, ctx.needs_input_grad[0], ctx.needs_input_grad[4])
    return grad_x, None, None, None, grad_bias, None, None, None


def _int4_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, codes, meta, scales, zeros, _, group_size, _, _ = inputs
    ctx.save_for_backward(codes, meta, scales, zeros)
    ctx.k, ctx.group_size, ctx.dtype = x.shape[-1], group_size, x.dtype


def _int4_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    codes, meta, scales, zeros = ctx.saved_tensors
    shape = (codes.shape[0], ctx.k)
    dense = Sparse24Int4Weight(codes, meta, scales, zeros, shape, ctx.group_size, ctx.dtype).decompress()
    grad_x, grad_bias = _grads(grad, dense, ctx.needs_input_grad[0], ctx.needs_input_grad[5])
    return grad_x, None, None, None, None, grad_bias, None, None, None


sparse24_linear.register_autograd(_sparse24_backward, setup_context=_sparse24_setup)
sparse24_int4_linear.register_autograd(_int4_backward, setup_context=_int4_setup)
bitmask_linear.register_autograd(_bitmask_backward, setup_context=_bitmask_setup)
