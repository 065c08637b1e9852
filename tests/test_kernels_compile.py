"""The custom ops (``torch.ops.oneshot.*``) and ``torch.compile`` of converted layers, on the CPU.

``opcheck`` checks each op's schema, fake (meta) implementation, autograd registration and AOT dispatch
on the pure-torch reference path. ``torch.compile(fullgraph=True)`` fails on any graph break, so a layer
that compiles with it is one graph. The inductor backend needs a C++ compiler; without one ``aot_eager``
(which still traces the whole graph with fake tensors) is used.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

from oneshot.kernels import SparseLinear, compress_24, compress_bitmask, convert
from oneshot.kernels.ops import bitmask_linear, config_fields, sparse24_linear
from tests.test_kernels_dispatch import FakeTimer, decompressions  # noqa: F401  (fixture)
from tests.test_kernels_linear import prune_24_, prune_unstructured_

pytestmark = pytest.mark.compile

COMPILER = "inductor" if shutil.which("g++") or shutil.which("clang++") else "aot_eager"


def _weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(24, 64, generator=g)
    groups = w.reshape(24, -1, 4)
    drop = groups.abs().topk(2, dim=-1, largest=False).indices
    w24 = groups.scatter(-1, drop, 0.0).reshape(24, 64)
    wbm = w.masked_fill(torch.rand(24, 64, generator=g) < 0.6, 0.0)
    return w24, wbm


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_reference(bias: bool) -> None:
    w24, wbm = _weights()
    b = torch.randn(24) if bias else None
    c24, cbm = compress_24(w24), compress_bitmask(wbm, tile=32)
    for x in (torch.randn(5, 64), torch.randn(2, 3, 64, requires_grad=True)):
        torch.library.opcheck(sparse24_linear, (x, c24.values, c24.meta, b, "reference", []))
        torch.library.opcheck(
            bitmask_linear, (x, cbm.values, cbm.bitmask, cbm.offsets, b, cbm.tile, "reference", [])
        )
        want24 = x @ w24.T + (0 if b is None else b)
        torch.testing.assert_close(sparse24_linear(x, c24.values, c24.meta, b, "reference", []), want24)


def test_op_gradients_match_dense() -> None:
    w24, _ = _weights(1)
    c24 = compress_24(w24)
    bias = torch.randn(24, requires_grad=True)
    x = torch.randn(4, 64, requires_grad=True)
    sparse24_linear(x, c24.values, c24.meta, bias, "reference", []).square().sum().backward()
    assert x.grad is not None and bias.grad is not None
    gx, gb = x.grad.clone(), bias.grad.clone()
    x.grad = bias.grad = None
    torch.nn.functional.linear(x, w24, bias).square().sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gb, bias.grad)


def test_op_arguments_are_checked() -> None:
    w24, _ = _weights()
    c24 = compress_24(w24)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="choose one of"):
        sparse24_linear(x, c24.values, c24.meta, None, "fast", [])
    with pytest.raises(ValueError, match="7 integers"):
        sparse24_linear(x, c24.values, c24.meta, None, "triton", [16, 32])
    assert config_fields(None) == []


def _model() -> nn.Module:
    """Two pruned layers: one becomes 2:4, the other bitmask."""
    torch.manual_seed(0)
    first, second = nn.Linear(64, 48), nn.Linear(48, 32)
    prune_24_(first)
    prune_unstructured_(second, 0.6)
    return nn.Sequential(first, nn.GELU(), second).eval()


def _compiled_matches_eager(model: nn.Module, x: torch.Tensor, backend: str = COMPILER) -> torch.Tensor:
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, fullgraph=True, backend=backend)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return got


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_converted_model_compiles_without_graph_breaks(backend: str) -> None:
    dense = _model()
    model = copy.deepcopy(dense)
    assert convert(model, "auto", backend=backend).counts() == {"2:4": 1, "bitmask": 1}
    x = torch.randn(2, 5, 64)
    got = _compiled_matches_eager(model, x)
    with torch.no_grad():
        torch.testing.assert_close(got, dense(x), rtol=1e-5, atol=1e-5)


def test_dispatched_layer_compiles_with_its_plans(decompressions: list[int]) -> None:  # noqa: F811
    """Under torch.compile nothing is timed: a plan timed before (or, without one, the heuristic) is used."""
    dense = _model()
    model = copy.deepcopy(dense)
    timer = FakeTimer({"dense": 1.0, "decompress": 3.0, "triton": 5.0}, decompressions)
    convert(model, "auto", dispatcher=timer)
    x = torch.randn(3, 64)
    with torch.no_grad():
        model(x)  # eager: times and caches the plans
    timed = dict(timer.calls)
    assert timed
    _compiled_matches_eager(model, x, backend="aot_eager")
    assert timer.calls == timed  # the trace timed nothing

    fresh = FakeTimer({"dense": 1.0, "decompress": 3.0, "triton": 5.0}, decompressions)
    for module in model.modules():
        if isinstance(module, SparseLinear):
            module.dispatcher = fresh
    torch._dynamo.reset()
    x = torch.randn(4, 64)
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(got, dense(x), rtol=1e-5, atol=1e-5)
    assert fresh.calls == {}  # no plan: the untimed heuristic (dense on the CPU)


@pytest.mark.interpreter
def test_triton_backend_compiles_on_the_interpreter() -> None:
    dense = _model()
    model = copy.deepcopy(dense)
    convert(model, "auto", backend="triton")
    x = torch.randn(3, 64)
    got = _compiled_matches_eager(model, x, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(got, dense(x), rtol=1e-4, atol=1e-4)
