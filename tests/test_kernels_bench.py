"""The kernel benchmark (oneshot.kernels.bench, scripts/bench_kernels.py): options, presets, targets, and its
measuring and reporting code on the CPU (a stand-in timer, the Triton interpreter) and on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from oneshot import kernels
from oneshot.kernels import bench
from oneshot.kernels.bench import Row, Shape, check_targets, parse_m, parse_shapes, resolve_options

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "bench_kernels.py"


def _shapes(spec: str) -> dict[tuple[int, int], str]:
    return {(s.n, s.k): s.name for s in parse_shapes(spec)}


def test_llama3_presets_include_gqa_and_tensor_parallel_shards() -> None:
    assert _shapes("llama3-8b") == {
        (4096, 4096): "llama3-8b q_proj/o_proj",
        (1024, 4096): "llama3-8b k_proj/v_proj",  # 8 KV heads of 128
        (14336, 4096): "llama3-8b gate_proj/up_proj",
        (4096, 14336): "llama3-8b down_proj",
    }
    assert set(_shapes("llama3-70b")) == {(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)}
    # One of 8 shards: column-parallel q/k/v/gate/up split N, row-parallel o/down split K.
    assert _shapes("llama3-70b-tp8") == {
        (1024, 8192): "llama3-70b-tp8 q_proj",
        (128, 8192): "llama3-70b-tp8 k_proj/v_proj",
        (8192, 1024): "llama3-70b-tp8 o_proj",
        (3584, 8192): "llama3-70b-tp8 gate_proj/up_proj",
        (8192, 3584): "llama3-70b-tp8 down_proj",
    }
    assert _shapes("llama3-8b-tp16")[(128, 4096)] == "llama3-8b-tp16 k_proj/v_proj"  # one replicated KV head
    assert set(_shapes("smollm2-135m")) == {(576, 576), (192, 576), (1536, 576), (576, 1536)}


def test_shape_lists_merge_duplicates_and_reject_bad_entries() -> None:
    shapes = parse_shapes("llama2-7b, llama3-8b,48x576,4096x4096")
    assert len(shapes) == len({(s.n, s.k) for s in shapes}) == 7
    assert _shapes("llama2-7b,llama3-8b,4096x4096")[(4096, 4096)] == (
        "llama2-7b q_proj/k_proj/v_proj/o_proj, llama3-8b q_proj/o_proj, 4096x4096"
    )
    assert parse_shapes("48x576") == [Shape(48, 576, "48x576")]
    with pytest.raises(ValueError, match="preset"):
        parse_shapes("llama4-9b")
    with pytest.raises(ValueError, match="multiple of 4"):
        parse_shapes("64x30")
    with pytest.raises(ValueError, match="tensor parallelism"):
        parse_shapes("smollm2-135m-tp2")  # 9 heads
    with pytest.raises(ValueError, match="no shapes"):
        parse_shapes(" , ")


def test_options_default_and_quick() -> None:
    assert {2, 8, 32, 128, 256} <= set(bench.DEFAULT_M)
    assert parse_m("1, 2,8,2") == [1, 2, 8]
    for bad in ("", "0,4", "1;2"):
        with pytest.raises(ValueError, match="--m"):
            parse_m(bad)

    full = resolve_options()
    assert full.e2e and full.kept_dense and full.max_configs is None and not full.quick
    assert full.m_values == bench.DEFAULT_M
    full_shapes = {(s.n, s.k) for s in full.shapes}
    assert {(576, 1536), (4096, 11008), (1024, 4096), (8192, 28672)} <= full_shapes
    assert not resolve_options(skip_e2e=True).e2e

    quick = resolve_options(quick=True, new_tokens=64)
    assert quick.quick and not quick.e2e and not quick.kept_dense and quick.max_configs == 4
    assert [(s.n, s.k) for s in quick.shapes] == [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
    assert quick.m_values == bench.QUICK_M and quick.rep_ms < full.rep_ms
    explicit = resolve_options(quick=True, shapes="llama3-70b-tp8", m="2,256")
    assert explicit.m_values == (2, 256) and (128, 8192) in {(s.n, s.k) for s in explicit.shapes}
    with pytest.raises(ValueError, match="new-tokens"):
        resolve_options(new_tokens=1)


def _row(n: int, k: int, m: int, **times: float | None) -> Row:
    return Row(n, k, m, dense_ms=1.0, **times)  # type: ignore[arg-type]


def test_targets() -> None:
    fast = dict(sparse24_ms=0.5, bitmask_ms=0.6, dispatch24_ms=0.5, dispatch_bitmask_ms=0.6)
    assert check_targets([_row(4096, 4096, 1, **fast), _row(8192, 28672, 1, **fast)]) == []
    # Decode targets hold for Llama-class weights only (N * K >= 4096^2); dispatch >= 0.95x everywhere.
    slow = dict(sparse24_ms=0.8, bitmask_ms=None, dispatch24_ms=1.1, dispatch_bitmask_ms=1.0)
    missed = check_targets(
        [_row(4096, 4096, 1, **slow), _row(1024, 4096, 1, **slow), _row(4096, 4096, 64, **slow)]
    )
    assert missed == [
        "4096x4096 M=1 2:4: 1.25x < 1.6x",
        "4096x4096 M=1 bitmask: n/a < 1.4x",
        "4096x4096 M=1 dispatch 2:4: 0.91x < 0.95x",
        "1024x4096 M=1 dispatch 2:4: 0.91x < 0.95x",
        "4096x4096 M=64 dispatch 2:4: 0.91x < 0.95x",
    ]


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True
    )


def test_script_help_and_bad_options() -> None:
    proc = _script("--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--quick", "--shapes", "--m", "--json", "--skip-e2e", "--new-tokens", "--strict"):
        assert option in proc.stdout
    assert "llama3-70b" in proc.stdout and "-tp<N>" in proc.stdout
    proc = _script("--shapes", "gpt5")
    assert proc.returncode == 2 and "unknown shape 'gpt5'" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only exit path")
def test_script_exits_2_without_cuda() -> None:
    proc = _script("--quick")
    assert proc.returncode == 2, proc.stderr
    assert "CUDA device is required" in proc.stderr


def _cpu_timer(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _pruned_tiny_llama() -> nn.Module:
    from tests.test_kernels_linear import tiny_llama

    model = tiny_llama(seed=15)
    bench.prune_model_24_(model)
    return model


@pytest.mark.interpreter
def test_bench_internals_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark's measuring and reporting code, with a CPU timer in place of do_bench."""
    cpu = torch.device("cpu")
    rows = [
        bench.bench_shape(48, 576, 1, cpu, _cpu_timer, max_configs=2, name="tiny"),
        bench.bench_shape(48, 576, 20, cpu, _cpu_timer, max_configs=1, kept_dense=False, name="tiny"),
    ]
    for r in rows:
        assert r.dense_ms and r.sparse24_ms and r.bitmask_ms and r.dispatch24_ms and r.dispatch_bitmask_ms
        assert r.sparse24_config and r.bitmask_config
        assert r.cusparselt_ms is None and not r.semi_structured  # no semi-structured sparsity on the CPU
    assert rows[0].dispatch24_kept_ms and rows[0].dispatch_bitmask_kept_ms
    assert rows[1].dispatch24_kept_ms is None  # kept_dense=False (--quick)
    bench.print_kernel_table(rows, peak_gbps=1000.0)
    out = capsys.readouterr().out
    assert "| tiny | 48x576 | 20 |" in out and "nn.Linear" in out and "to_sparse_semi_structured" in out
    assert isinstance(check_targets(rows), list)


def test_static_cache_decode_loop_on_a_converted_model() -> None:
    """The CUDA-graph decode measurement's step loop, run eagerly (the reference backend stands in)."""
    model = _pruned_tiny_llama()
    assert kernels.convert(model, "2:4", backend="reference").counts()["2:4"] == 14
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(16))
    assert bench.graph_tokens_per_s(model, ids, steps=3, use_graph=False) > 0


@pytest.mark.cuda
def test_bench_run_on_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One small row through the whole run (bandwidth, GEMM rate, table, targets, JSON) with compiled kernels."""
    out = tmp_path / "bench.json"
    options = bench.BenchOptions(
        (Shape(1024, 4096, "kv"),), (1, 64), e2e=False, max_configs=2, warmup_ms=2, rep_ms=5, json=out
    )
    assert bench.run(options) == 0
    assert "| kv | 1024x4096 | 64 |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    for row in result["rows"]:
        assert row["dense_ms"] > 0 and row["sparse24_ms"] > 0 and row["bitmask_ms"] > 0
        assert row["dispatch24_ms"] > 0 and row["dispatch_bitmask_kept_ms"] > 0
    assert result["copy_gbps"] > 0 and result["options"]["max_configs"] == 2
