"""Launch helpers shared by the sparse matmul kernels: tile configs, input checks, split-K reduction."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "KernelConfig",
    "candidate_configs",
    "default_config",
    "interpreting",
    "triton_available",
]


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one sparse matmul launch.

    ``block_m`` 1, 2, 4 or 8 selects the decode kernel (``*_gemv``: one program per ``block_m`` input rows
    and ``block_n`` weight rows, each weight tile read once for those rows, CUDA cores, the dense tile is
    never built); ``block_m >= 16`` the tile kernel (``*_matmul``:
    expands ``(block_n, block_k)`` weight tiles on chip into ``tl.dot``). ``split_k > 1`` splits K across
    programs and sums fp32 partials afterwards (fills the GPU when there are few output tiles); the split
    used can be smaller because K is only split at multiples of ``block_k`` (and of the bitmask tile).
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value <= 0 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.block_k < 32:
            raise ValueError(f"block_k must be >= 32, got {self.block_k}")
        if self.block_m >= 16 and self.block_n < 16:
            raise ValueError(f"tl.dot tiles need block_n >= 16, got {self.block_n}")
        if self.split_k < 1 or self.group_m < 1 or self.num_stages < 1:
            raise ValueError("split_k, group_m and num_stages must be >= 1")

    @property
    def use_dot(self) -> bool:
        return self.block_m >= 16


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off")


@functools.cache
def triton_available() -> bool:
    """True if ``import triton`` works (checked once, without importing at module import time)."""
    try:
        if importlib.util.find_spec("triton") is None:
            return False
        import triton  # noqa: F401
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (import blocked)
        return False
    return True


@functools.cache
def _num_sms(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def _split_for(programs: int, k: int, block_k: int, device: torch.device) -> int:
    """Split K so that about two programs per SM run, keeping at least two K-tiles per split."""
    target = 2 * _sm_count(device)
    programs = max(programs, 1)
    if programs >= target:
        return 1
    return max(1, min(target // programs, k // (2 * block_k), 16))


# (block_n, block_k, num_warps) of the decode kernel; (block_m, block_n, block_k, num_warps, num_stages) of
# the tl.dot kernel for skinny, medium and large M. Picked from the usual Triton GEMM tile sizes, not tuned or
# checked for register spills on a GPU: the dispatcher times them and leaves out any that fail to launch.
_GEMV_TILES = [(8, 512, 4), (8, 1024, 4), (16, 512, 4), (16, 1024, 8), (32, 256, 4), (4, 1024, 4)]
_DOT_SKINNY = [(16, 32, 128, 4, 2), (16, 64, 128, 4, 2), (16, 128, 128, 8, 3)]
_DOT_MEDIUM = [(32, 64, 64, 4, 3), (64, 64, 64, 4, 3), (64, 128, 64, 8, 3)]
_DOT_LARGE = [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 8, 3), (128, 64, 64, 4, 3)]


GEMV_MAX_ROWS = 8  # input rows one decode program handles at most (each weight tile read once for them)


def gemv_rows(m: int) -> int:
    """Rows per decode program for M input rows: the power of two >= M, at most `GEMV_MAX_ROWS`."""
    return min(GEMV_MAX_ROWS, 1 << max(0, m - 1).bit_length())


def _gemv(
    m: int,
    n: int,
    k: int,
    block_n: int,
    block_k: int,
    warps: int,
    device: torch.device,
    rows: int | None = None,
) -> KernelConfig:
    rows = gemv_rows(m) if rows is None else rows
    split = _split_for(math.ceil(n / block_n) * math.ceil(m / rows), k, block_k, device)
    return KernelConfig(rows, block_n, block_k, split, num_warps=warps)


def _dot(
    m: int, n: int, k: int, tile: tuple[int, int, int, int, int], device: torch.device, split: bool
) -> KernelConfig:
    bm, bn, bk, warps, stages = tile
    programs = math.ceil(m / bm) * math.ceil(n / bn)
    s = _split_for(programs, k, bk, device) if split else 1
    return KernelConfig(bm, bn, bk, s, num_warps=warps, num_stages=stages)


def decode_config(m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """The default decode-kernel config (``gemv_rows(M)`` rows per program) for any M."""
    return _gemv(max(m, 1), n, k, 8, 512 if k >= 512 else 256, 4, device)


def decode_candidates(m: int, n: int, k: int, device: torch.device) -> list[KernelConfig]:
    """The decode-kernel configs of `candidate_configs` (M <= 16; none above), ``decode_config`` first:
    what the dispatcher times for formats that have only a decode kernel (2:4-int4)."""
    if max(m, 1) > 16:
        return []
    out = [decode_config(m, n, k, device)]
    out += [c for c in candidate_configs(m, n, k, device) if not c.use_dot and c not in out]
    return out


def default_config(m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """A reasonable config for ``(M, K) @ (N, K)^T`` without timing anything."""
    m = max(m, 1)
    if m <= 4:
        return _gemv(m, n, k, 8, 512 if k >= 512 else 256, 4, device)
    if m <= 16:
        return _dot(m, n, k, _DOT_SKINNY[1], device, split=True)
    if m <= 64:
        return _dot(m, n, k, _DOT_MEDIUM[1], device, split=True)
    return _dot(m, n, k, _DOT_LARGE[0], device, split=False)


def candidate_configs(m: int, n: int, k: int, device: torch.device) -> list[KernelConfig]:
    """Configs the dispatcher times for one ``(M, N, K)``; the default comes first.

    Decode-kernel configs are offered for M <= 16, each with and without split-K, with ``gemv_rows(M)`` rows
    per program and (for M > 1) also with one row per program.
    """
    m = max(m, 1)
    out = [default_config(m, n, k, device)]
    options: list[KernelConfig] = []
    if m <= 16:
        for bn, bk, warps in _GEMV_TILES:
            for rows in dict.fromkeys((gemv_rows(m), 1)):
                cfg = _gemv(m, n, k, bn, bk, warps, device, rows)
                options += [cfg, dataclasses.replace(cfg, split_k=1)]
        options += [_dot(m, n, k, tile, device, split=True) for tile in _DOT_SKINNY]
    elif m <= 64:
        options += [_dot(m, n, k, tile, device, split=True) for tile in _DOT_MEDIUM]
    else:
        options += [_dot(m, n, k, tile, device, split=False) for tile in _DOT_LARGE]
    for cfg in options:
        if cfg not in out:
            out.append(cfg)
    return out


def k_per_split(k: int, config: KernelConfig, align: int = 1) -> tuple[int, int]:
    """``(columns per split, number of splits)``; splits start at multiples of ``lcm(block_k, align)``."""
    quantum = math.lcm(config.block_k, align)
    chunk = math.ceil(math.ceil(k / config.split_k) / quantum) * quantum
    return chunk, math.ceil(k / chunk)


def k_tail(k: int, block_k: int) -> int:
    """How the decode kernels mask K: 0 no tail, 1 whole-byte tail (K % 8 == 0), 2 half-byte tail."""
    if k % block_k == 0:
        return 0
    return 1 if k % 8 == 0 else 2


def flatten_input(x: Tensor, k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``x`` (..., K) as a 2-D ``(M, K)`` tensor with unit stride along K."""
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects K = {k}")
    if x.dtype != dtype:
        raise ValueError(f"input dtype {x.dtype} != weight dtype {dtype}")
    if x.device != device:
        raise ValueError(f"input on {x.device}, weight on {device}")
    x2 = x.reshape(-1, k)  # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _imported_for_interpreter() -> bool:
    """True if triton's own @jit helpers (tl.cdiv, ...) were built for the interpreter.

    Triton decorates its standard library when ``triton`` is first imported, so ``TRITON_INTERPRET=1`` set
    after that import leaves them compiled-mode and interpreted kernels that call them fail.
    """
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.cdiv, InterpretedFunction)


def check_launchable(x: Tensor) -> None:
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the sparse Triton kernels support float16, bfloat16 and float32, got {x.dtype}")
    if not triton_available():
        raise RuntimeError(
            "the sparse Triton kernels need the 'triton' package: pip install 'oneshot[kernels]'"
        )
    if interpreting():
        if not _imported_for_interpreter():
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after triton was imported; set it before the first import "
                "of triton (e.g. at the top of the script or in the environment)"
            )
    elif x.device.type != "cuda":
        raise RuntimeError(
            f"the sparse Triton kernels run on CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 to run "
            "them on the CPU interpreter, or use the *_reference functions"
        )


def prepare_output(x: Tensor, n: int, out: Tensor | None, splits: int) -> tuple[Tensor, Tensor]:
    """``(result, target)``: the ``(..., N)`` result and the buffer the kernel writes.

    The target is the ``(M, N)`` view of the result, or an fp32 ``(splits, M, N)`` workspace for split-K.
    """
    shape = (*x.shape[:-1], n)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {shape}")
    m = math.prod(x.shape[:-1])
    if splits == 1:
        return out, out.view(m, n)
    return out, torch.empty((splits, m, n), dtype=torch.float32, device=x.device)


def finish_split(out: Tensor, workspace: Tensor, bias: Tensor | None) -> Tensor:
    """Sum the fp32 split-K partials ``(splits, M, N)``, add the bias and write ``out`` (..., N)."""
    total = workspace.sum(0)  # (M, N)
    if bias is not None:
        total += bias.float()
    out.view(total.shape).copy_(total)
    return out


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16/32-bit inputs, fp64 for fp64: what the references accumulate in."""
    return torch.promote_types(dtype, torch.float32)


def dot_flags(dtype: torch.dtype) -> tuple[str, bool]:
    """``(input_precision, upcast)`` for ``tl.dot`` on ``dtype`` inputs.

    fp32 uses "ieee" (no silent TF32). The CPU interpreter multiplies bf16 bit patterns as integers in
    ``tl.dot`` (triton 3.x ``interpreter.create_dot``), so under it bf16 tiles are upcast to fp32 first.
    """
    if dtype == torch.float32:
        return "ieee", False
    return "tf32", dtype == torch.bfloat16 and interpreting()
