"""Compiled Triton kernels, dispatch and CUDA graphs on a GPU (marked ``cuda``).

Run on a machine with a CUDA GPU, with ``TRITON_INTERPRET`` unset (Triton reads it once, at import)::

    env -u TRITON_INTERPRET .venv/bin/python -m pytest -q -p no:cacheprovider -m cuda

scripts/test.sh runs this set as its own step when ``torch.cuda.is_available()``. tests/conftest.py skips
these tests without CUDA or triton and while ``TRITON_INTERPRET`` is on.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oneshot import kernels
from oneshot.kernels import SparseLinear, candidate_configs, compress_24, compress_bitmask
from oneshot.kernels._common import decode_candidates

pytestmark = pytest.mark.cuda


def _weights(n: int, k: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    groups = w.reshape(n, -1, 4)
    drop = groups.abs().topk(2, dim=-1, largest=False).indices
    w24 = groups.scatter(-1, drop, 0.0).reshape(n, k).to(dtype)
    wbm = w.masked_fill(torch.rand(n, k, device="cuda", generator=g) < 0.5, 0.0).to(dtype)
    return w24, wbm


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (576, 1536), (1540, 1540)])
@pytest.mark.parametrize("m", [1, 3, 16, 77, 512])
def test_compiled_kernels_match_reference(dtype: torch.dtype, n: int, k: int, m: int) -> None:
    w24, wbm = _weights(n, k, dtype, seed=n + k + m)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for weight, op, reference in (
        (compress_24(w24), kernels.sparse24_matmul, kernels.sparse24_matmul_reference),
        (compress_bitmask(wbm), kernels.bitmask_matmul, kernels.bitmask_matmul_reference),
    ):
        expected = reference(x, weight, bias).float()
        scale = float(expected.abs().max())
        for config in candidate_configs(m, n, k, x.device):
            out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            y = op(x, weight, bias, config=config, out=out)
            torch.testing.assert_close(
                y.float(), expected, rtol=tol, atol=tol * scale, msg=lambda s, c=config: f"{c}\n{s}"
            )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("n", "k", "group"), [(4096, 4096, 128), (576, 1536, 32), (1540, 1540, 128)])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_compiled_int4_kernel_matches_reference(
    dtype: torch.dtype, n: int, k: int, group: int, m: int, symmetric: bool
) -> None:
    """The 2:4-int4 decode kernel over every decode config the dispatcher may time (1540: a half-filled
    metadata byte and a 4-column last group)."""
    w24, _ = _weights(n, k, dtype, seed=n + k + m + 1)
    weight = kernels.quantize_24_int4(w24, group, symmetric)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    expected = kernels.sparse24_int4_gemv_reference(x, weight, bias).float()
    scale = float(expected.abs().max())
    for config in decode_candidates(m, n, k, x.device):
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        y = kernels.sparse24_int4_gemv(x, weight, bias, config=config, out=out)
        torch.testing.assert_close(
            y.float(), expected, rtol=tol, atol=tol * scale, msg=lambda s, c=config: f"{c}\n{s}"
        )


def test_dispatched_int4_layer_matches_dequantized_dense_and_captures_in_a_cuda_graph() -> None:
    w24, _ = _weights(2048, 1024, torch.bfloat16, seed=3)
    linear = nn.Linear(1024, 2048, bias=True, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w24)
    layer = SparseLinear.from_linear(linear, "2:4-int4", dispatcher=kernels.Dispatcher(reps=5, persist=False))
    with torch.no_grad():
        linear.weight.copy_(layer.dense())  # the dequantized dense layer
    for m in (1, 7, 300):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y, want = layer(x), linear(x)
        plan = layer.last_plan
        assert plan is not None and {"dense", "decompress"} <= set(plan.timings_ms) and plan.vs_dense
        assert plan.config is None or not plan.config.use_dot  # only the decode kernel exists
        torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)  # plan M=1 outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y.float(), linear(x).float(), rtol=2e-2, atol=2e-2 * float(y.abs().max()))


@pytest.mark.parametrize("fmt", ["2:4", "bitmask"])
def test_dispatched_layer_matches_dense_and_captures_in_a_cuda_graph(fmt: str) -> None:
    w24, wbm = _weights(2048, 1024, torch.bfloat16, seed=0)
    linear = nn.Linear(1024, 2048, bias=True, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(w24 if fmt == "2:4" else wbm)
    layer = SparseLinear.from_linear(linear, fmt, dispatcher=kernels.Dispatcher(reps=5, persist=False))
    for m in (1, 7, 300):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y, want = layer(x), linear(x)
        plan = layer.last_plan
        # Timed against the original dense layer and its own decompress fallback.
        assert plan is not None and {"dense", "decompress"} <= set(plan.timings_ms) and plan.vs_dense
        torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2 * float(want.abs().max()))

    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)  # plan M=1 outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer(x)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y.float(), linear(x).float(), rtol=2e-2, atol=2e-2 * float(y.abs().max()))


def test_forced_cusparselt_backend_where_supported() -> None:
    w24, _ = _weights(1024, 1024, torch.float16, seed=1)
    layer = SparseLinear(compress_24(w24), backend="cusparselt")
    x = torch.randn(64, 1024, device="cuda", dtype=torch.float16)
    try:
        y = layer(x)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"semi-structured sparsity unsupported here: {err}")
    torch.testing.assert_close(y, x @ w24.T, rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize("fmt", ["2:4", "bitmask"])
def test_dispatched_layer_compiles_without_graph_breaks(fmt: str) -> None:
    w24, wbm = _weights(1024, 1024, torch.float16, seed=2)
    linear = nn.Linear(1024, 1024, bias=True, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        linear.weight.copy_(w24 if fmt == "2:4" else wbm)
    layer = SparseLinear.from_linear(linear, fmt, dispatcher=kernels.Dispatcher(reps=3, persist=False))
    for backend in ("auto", "triton"):
        layer.backend = backend
        x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
        torch._dynamo.reset()
        with torch.no_grad():
            want = layer(x)  # eager first: the plan for M=1 is timed, the trace reuses it
            got = torch.compile(layer, fullgraph=True)(x)
        torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
