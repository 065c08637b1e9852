"""Memory guards (#15 item 4): one factorisation per shared Hessian, in place, with unchanged results;
magnitude/Wanda build no Hessian without --layer-loss; the device budget counts Hessians and eager masks."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import transformers as tf

import oneshot.pruner as pruner_mod
from oneshot import PruneConfig, prune
from oneshot.config import QuantConfig
from oneshot.pruner import _store_device, device_reserve, prune_and_quantize
from oneshot.solvers import QuantScheme, prune_sparsegpt, quantize_gptq
from oneshot.solvers.sparsegpt import factorize, inverse_cholesky
from oneshot.stats import InputStats
from oneshot.walker import find_blocks
from tests.test_solvers import correlated_inputs
from tests.test_walker import _arch, _ids

F64 = torch.float64


def _hessian(cols: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = correlated_inputs(4 * cols, cols, seed=seed).to(dtype)
    return x.T @ x / x.shape[0]


def test_in_place_factor_equals_the_three_fresh_factorisations() -> None:
    """The in-place LAPACK sequence is bit for bit the out-of-place one (cholesky, inverse, cholesky)."""
    h = _hessian(96)
    before = h.clone()
    upper, damp_used = inverse_cholesky(h, 0.01)
    damped = h.clone()
    damped.diagonal().add_(0.01 * float(h.diagonal().mean()))
    lower = torch.linalg.cholesky(damped)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    assert damp_used == 0.01
    assert torch.equal(upper, expected)
    assert torch.equal(h, before)  # the caller's Hessian is not modified


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_shared_factor_gives_the_weights_of_per_layer_factorisation(pattern: tuple[int, int] | None) -> None:
    """q/k/v read one input: one factor for the three equals factorising the Hessian for each of them."""
    h = _hessian(64)
    h[:, 5] = h[5, :] = 0.0  # a dead input column
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(rows, 64, generator=g) for rows in (64, 32, 32)]
    factor = factorize(h, damp=0.01)
    for w in weights:
        alone = prune_sparsegpt(w, h, sparsity=0.5, pattern=pattern, block_size=16, damp=0.01)
        shared = prune_sparsegpt(w, factor, sparsity=0.5, pattern=pattern, block_size=16, damp=0.01)
        assert torch.equal(alone.weight, shared.weight) and torch.equal(alone.mask, shared.mask)
        assert shared.loss == pytest.approx(alone.loss, rel=1e-9)


def test_shared_factor_with_act_order_and_a_mismatch_is_refused() -> None:
    h = _hessian(64, dtype=F64)
    w = torch.randn(16, 64, dtype=F64, generator=torch.Generator().manual_seed(1))
    scheme = QuantScheme.parse("w4a16", group_size=32, act_order=True)
    factor = factorize(h, damp=0.01, act_order=True)
    alone = quantize_gptq(w, h, scheme, block_size=16)
    shared = quantize_gptq(w, factor, scheme, block_size=16)
    assert torch.equal(alone.weight, shared.weight)
    with pytest.raises(ValueError, match="damp"):
        quantize_gptq(w, factor, scheme, block_size=16, damp=0.1)
    with pytest.raises(ValueError, match="act_order"):
        prune_sparsegpt(w, factor, sparsity=0.5, damp=0.01)


def test_take_hessian_is_the_hessian_and_spends_the_stats() -> None:
    x = correlated_inputs(50, 12)
    a, b = InputStats(12, hessian=True, dtype=F64), InputStats(12, hessian=True, dtype=F64)
    a.add(x)
    b.add(x)
    h = a.hessian
    assert h is not None and torch.equal(b.take_hessian(), h)
    assert b.n == 50 and b.has_hessian
    for spent in (lambda: b.hessian, lambda: b.sq_norms, lambda: b.add(x), b.take_hessian):
        with pytest.raises(ValueError, match="taken"):
            spent()


class _PerLayer:
    """Stands in for the pruner's shared factors: every layer factorises its own Hessian."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get(self, stats: Any, weight: Any) -> None:
        return None

    def done(self, stats: Any) -> None:
        pass


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("quant", [False, True])
def test_pruner_factorises_once_per_input_with_the_weights_of_per_layer_solves(
    monkeypatch: pytest.MonkeyPatch, quant: bool
) -> None:
    model = _arch("llama").eval()
    twin = copy.deepcopy(model)
    ids = _ids()
    config = PruneConfig(method="sparsegpt", pattern="2:4")
    calls: list[int] = []
    real = pruner_mod.factorize

    def counting(hessian: torch.Tensor, **kwargs: Any) -> Any:
        calls.append(int(hessian.shape[0]))
        return real(hessian, **kwargs)

    def run(m: torch.nn.Module) -> None:
        if quant:
            prune_and_quantize(
                m, ids, config, QuantConfig("w4a16", group_size=32), batch_size=2, progress=False
            )
        else:
            prune(m, ids, config, batch_size=2, progress=False)

    monkeypatch.setattr(pruner_mod, "factorize", counting)
    run(model)
    # per block: q/k/v share one input, gate/up one; o_proj and down_proj one each (hidden 64, inter 128)
    assert sorted(calls) == sorted([64, 64, 64, 128] * 2)
    with monkeypatch.context() as m:
        m.setattr(pruner_mod, "_SharedFactors", _PerLayer)
        run(twin)
    assert len(calls) == 8  # the per-layer run never used the shared factors
    ours, theirs = _weights(model), _weights(twin)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("layer_loss", [False, True])
def test_magnitude_and_wanda_build_hessians_only_for_layer_loss(
    monkeypatch: pytest.MonkeyPatch, method: str, layer_loss: bool
) -> None:
    accumulations = {"hessian": 0, "norms": 0}
    real_add = InputStats.add

    def counting_add(self: InputStats, x: torch.Tensor) -> None:
        accumulations["hessian" if self.has_hessian else "norms"] += 1
        real_add(self, x)

    monkeypatch.setattr(InputStats, "add", counting_add)
    model = _arch("llama").eval()
    report = prune(
        model, _ids(), PruneConfig(method=method, layer_loss=layer_loss), batch_size=2, progress=False
    )
    if layer_loss:
        assert accumulations["hessian"] > 0 and accumulations["norms"] == 0
        assert all(r.loss is not None and r.loss > 0 for r in report.layers)
    else:
        assert accumulations["hessian"] == 0
        assert accumulations["norms"] == (
            0 if method == "magnitude" else 4 * 2 * 3
        )  # 4 inputs, 2 blocks, 3 batches
        assert all(r.loss is None for r in report.layers)
    assert all(b.output_error is not None and b.output_error > 0 for b in report.blocks)
    assert abs(report.sparsity - 0.5) < 1e-3


def test_layer_loss_is_off_by_default_and_a_cli_switch() -> None:
    import argparse

    from oneshot.cli.prune import add_parser, configs_from_args

    assert PruneConfig().layer_loss is False
    sub = argparse.ArgumentParser().add_subparsers()
    parser = add_parser(sub)
    for argv, expected in (([], False), (["--layer-loss"], True), (["--no-layer-loss"], False)):
        config, _ = configs_from_args(parser.parse_args(["--method", "wanda", *argv]))
        assert config.layer_loss is expected


def test_device_reserve_counts_hessians_and_eager_masks() -> None:
    config = tf.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    ids = _ids(n=6, seqlen=24)
    cfg = PruneConfig(method="sparsegpt")
    sdpa = tf.LlamaForCausalLM(config)
    sdpa.config._attn_implementation = "sdpa"
    hessians = device_reserve(sdpa, ids, cfg, hessians=True)
    # 7 matrices: q, k, v, o, gate, up read 64 inputs, down 128; one factorisation of the widest
    assert hessians == 4 * (6 * 64 * 64 + 128 * 128 + 128 * 128)
    assert device_reserve(sdpa, ids, cfg, hessians=False) == 0
    eager = copy.deepcopy(sdpa)
    eager.config._attn_implementation = "eager"
    assert device_reserve(eager, ids, cfg, hessians=False) == 6 * 24 * 24 * 4  # one fp32 mask per window
    _, blocks = find_blocks(eager)
    assert len(blocks) == 2


def test_store_device_leaves_room_for_the_reserve() -> None:
    cuda = torch.device("cuda")
    assert _store_device(cuda, 100, free=1000) == cuda
    assert _store_device(cuda, 100, reserved=500, free=1000) == torch.device("cpu")
    assert _store_device(torch.device("cpu"), 10**12, reserved=10**12) == torch.device("cpu")
