"""Quantization in float64: grids (every weight on its group's grid, zero exactly representable), GPTQ
against a plain unblocked float64 re-derivation, exact losses, act-order group indices, and SparseGPT with
joint pruning + quantization (exact zero counts, pruned weights at the zero-point)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from oneshot.config import ConfigError
from oneshot.solvers import (
    PruneResult,
    QuantizedWeight,
    QuantScheme,
    prune_sparsegpt,
    prune_wanda,
    quantize_gptq,
)
from oneshot.solvers.quant import (
    check_group_size,
    dequantize,
    fake_quantize,
    group_grid,
    group_index,
    group_params,
    quantize,
    quantize_rtn,
)
from oneshot.stats import InputStats
from tests.test_solvers import _gen, correlated_inputs

F64 = torch.float64
SCHEMES = [
    QuantScheme(bits=4, group_size=32),
    QuantScheme(bits=4, group_size=32, symmetric=False),
    QuantScheme(bits=8, group_size=None),
    QuantScheme(bits=4, group_size=None, symmetric=False),
    QuantScheme(bits=8, group_size=64, symmetric=False, scale_dtype="float32"),
    QuantScheme(bits=4, group_size=32, scale_dtype="bfloat16"),
]


def direct_loss(weight: torch.Tensor, new: torch.Tensor, x: torch.Tensor) -> float:
    """||(W - W') X^T||_F^2 / n from the explicit inputs."""
    return ((weight.double() - new.double()) @ x.T).square().sum().item() / x.shape[0]


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = correlated_inputs(400, 128, seed=1)
    weight = torch.randn(12, 128, generator=_gen(2), dtype=F64)
    return weight, x, x.T @ x / x.shape[0]


def assert_on_grid(weight: torch.Tensor, q: QuantizedWeight) -> None:
    """Every stored weight is scale * (code - zero) of its group; codes and zero-points in range."""
    scheme = q.scheme
    rows, cols = weight.shape
    groups = 1 if scheme.group_size is None else cols // scheme.group_size
    assert q.codes.shape == (rows, cols) and q.codes.dtype == scheme.code_dtype
    assert q.scales.shape == (rows, groups) and q.scales.dtype == scheme.scale_torch_dtype
    assert q.zeros.shape == (rows, groups) and q.zeros.dtype == scheme.code_dtype
    assert q.g_idx.shape == (cols,) and q.g_idx.dtype == torch.int32
    assert torch.bincount(q.g_idx.long(), minlength=groups).tolist() == [cols // groups] * groups
    codes = q.codes.long()
    assert int(codes.min()) >= scheme.qmin and int(codes.max()) <= scheme.qmax
    assert scheme.qmin <= int(q.zeros.long().min()) and int(q.zeros.long().max()) <= scheme.qmax
    if scheme.symmetric:
        assert (q.zeros == 0).all()
    assert (q.scales > 0).all() and torch.isfinite(q.scales).all()
    for c in range(cols):  # explicit per-column loop: the group of column c and its own scale
        g = int(q.g_idx[c])
        expected = q.scales[:, g].to(F64) * (codes[:, c] - q.zeros[:, g].long()).to(F64)
        assert torch.equal(weight[:, c].to(F64), expected), f"column {c} is off its grid"


# ---------------------------------------------------------------------------------------------- schemes


def test_scheme_presets_parse_and_normalise() -> None:
    assert QuantScheme.parse("w4a16") == QuantScheme(bits=4, group_size=128, symmetric=True)
    assert QuantScheme.parse("W8A16") == QuantScheme(bits=8, group_size=None)
    assert QuantScheme.parse("w4a16_asym", group_size=64).symmetric is False
    assert QuantScheme(group_size=-1).group_size is None
    four, eight = QuantScheme(bits=4), QuantScheme(bits=8, symmetric=False)
    assert (four.qmin, four.qmax, four.code_dtype) == (-8, 7, torch.int8)
    assert (eight.qmin, eight.qmax, eight.code_dtype) == (0, 255, torch.uint8)
    assert dataclasses.asdict(QuantScheme()) == {
        "bits": 4,
        "group_size": 128,
        "symmetric": True,
        "act_order": False,
        "scale_dtype": "float16",
        "clip": "minmax",
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bits": 3}, "unsupported bits 3: choose one of 4, 8"),
        ({"bits": True}, "unsupported bits"),
        ({"group_size": 100}, r"unsupported group size 100: choose 32, 64, 128 or -1"),
        ({"group_size": 0}, "unsupported group size 0"),
        ({"group_size": 64.0}, "unsupported group size 64.0"),
        ({"symmetric": "yes"}, "symmetric must be True or False"),
        ({"scale_dtype": "float8"}, "choose one of float16, bfloat16, float32"),
    ],
)
def test_bad_scheme_is_one_clear_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        QuantScheme(**kwargs)  # type: ignore[arg-type]


def test_unknown_scheme_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="w4a16, w4a16-asym, w8a16"):
        QuantScheme.parse("w3a16")


def test_group_size_that_does_not_divide_the_width_names_it_and_suggests_one() -> None:
    with pytest.raises(ConfigError) as info:
        check_group_size(576, 128, layer="model.layers.0.mlp.down_proj")  # SmolLM2's hidden size
    message = str(info.value)
    assert "576" in message and "not a multiple of 128" in message and "group size 64" in message
    assert "model.layers.0.mlp.down_proj" in message
    with pytest.raises(ConfigError, match=r"per-channel scales \(group size -1\)"):
        check_group_size(100, 32)  # no valid group size divides 100
    check_group_size(576, 64)
    check_group_size(576, None)
    check_group_size(100, -1)
    weight = torch.randn(4, 576, dtype=F64)
    with pytest.raises(ConfigError, match="not a multiple of 128"):
        quantize_gptq(weight, torch.eye(576, dtype=F64), QuantScheme.parse("w4a16"))
    with pytest.raises(ConfigError, match="not a multiple of 128"):
        prune_sparsegpt(weight, torch.eye(576, dtype=F64), sparsity=0.5, quant=QuantScheme.parse("w4a16"))


# ------------------------------------------------------------------------------------------------ grids


def test_mse_clipping_trades_an_outlier_for_a_finer_grid() -> None:
    """Gaussian weights with one outlier: minmax spends the grid on the outlier, mse clips it (a finer grid
    for the other 63); a heavy error weight on the outlier keeps it on the grid; 0 stays on every grid."""
    row = 0.1 * torch.randn(1, 64, generator=_gen(3), dtype=F64)
    row[0, 7] = 0.5
    minmax = QuantScheme(bits=4, group_size=None, scale_dtype="float32")
    mse = dataclasses.replace(minmax, clip="mse")
    s0, z0 = group_params(row, minmax)
    s1, z1 = group_params(row, mse)

    def error(scale: torch.Tensor, zero: torch.Tensor, weights: torch.Tensor | float = 1.0) -> float:
        q = dequantize(quantize(row, scale, zero, minmax), scale, zero, F64)
        return float(((q - row).square() * weights).sum())

    assert s0.item() == pytest.approx(0.5 / 7)
    assert s1.item() < s0.item() and error(s1, z1) < 0.9 * error(s0, z0)
    ref_scale, ref_zero = reference_mse_grid(row, torch.ones(1, 64, dtype=F64), minmax)
    assert torch.equal(s1, ref_scale) and torch.equal(z1, ref_zero)
    heavy = torch.ones(64, dtype=F64)
    heavy[7] = 1e4
    s2, z2 = group_grid(row, mse, heavy)
    assert s2.item() > s1.item() and error(s2, z2, heavy) <= error(s0, z0, heavy)
    asym = dataclasses.replace(mse, symmetric=False)
    for w in (row, -row, row.abs()):
        scale, zero = group_params(w, asym)
        assert scale.item() < (w.max() - w.min().clamp(max=0)).item() / 15  # clipped
        zero_code = quantize(torch.zeros(1, 1, dtype=F64), scale, zero, asym)
        assert dequantize(zero_code, scale, zero, F64).item() == 0.0


def test_hand_computed_grids() -> None:
    w = torch.tensor([[-1.0, 0.5, 0.0, 3.0]], dtype=F64)
    sym = QuantScheme(bits=4, group_size=None, scale_dtype="float32")
    scale, zero = group_params(w, sym)
    assert scale.item() == pytest.approx(3 / 7) and zero.item() == 0  # max|w| / (2^3 - 1)
    assert quantize(w, scale, zero, sym).tolist() == [[-2, 1, 0, 7]]
    asym = dataclasses.replace(sym, symmetric=False)
    scale, zero = group_params(w, asym)
    assert scale.item() == pytest.approx(4 / 15) and zero.item() == 4  # round(1 / (4/15)) = round(3.75)
    codes = quantize(w, scale, zero, asym)
    assert codes.tolist() == [[0, 6, 4, 15]]
    assert dequantize(codes, scale, zero, F64)[0, 2].item() == 0.0  # real 0 is code 4 = the zero-point
    positive = torch.tensor([[0.5, 1.0, 2.0, 3.0]], dtype=F64)  # the grid is widened to contain 0
    scale, zero = group_params(positive, asym)
    assert scale.item() == pytest.approx(3 / 15) and zero.item() == 0
    scale, zero = group_params(torch.zeros(2, 4, dtype=F64), asym)  # all-zero rows: scale 1, codes 0
    assert scale.tolist() == [[1.0], [1.0]] and zero.tolist() == [[0], [0]]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_round_to_nearest_is_on_the_grid_and_within_half_a_step(scheme: QuantScheme) -> None:
    weight = (
        torch.randn(10, 128, generator=_gen(3), dtype=F64) * torch.logspace(-2, 1, 10, dtype=F64)[:, None]
    )
    q = quantize_rtn(weight, scheme)
    w_q, scales, zeros = fake_quantize(weight, scheme)
    assert torch.equal(scales, q.scales) and torch.equal(zeros, q.zeros)
    assert_on_grid(w_q, q)
    step = q.scales.to(F64)[:, q.g_idx.long()]  # (rows, cols)
    # half a step; asymmetric grids can lose up to one step at an end (integer zero-point), and scales are
    # rounded to their dtype (bfloat16: 2^-9 relative)
    slack = 0.5 if scheme.symmetric else 1.0
    assert ((weight - w_q).abs() <= slack * step * (1 + 2**-7)).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_exact_zeros_stay_zero(symmetric: bool) -> None:
    weight = torch.randn(6, 64, generator=_gen(4), dtype=F64)
    weight[:, ::3] = 0.0
    weight[0] = weight[0].abs() + 0.5  # one row entirely >= 0 (apart from its zeros), one <= 0
    weight[1] = -weight[1].abs() - 0.5
    weight[:, 5] = 0.0
    weight[0, ::3] = weight[1, ::3] = 0.0
    scheme = QuantScheme(bits=4, group_size=32, symmetric=symmetric)
    w_q, _, _ = fake_quantize(weight, scheme)
    assert (w_q[weight == 0] == 0).all()
    x = correlated_inputs(200, 64, seed=5)
    x[:, 5] = 0.0  # a dead column as well
    result = quantize_gptq(weight, x.T @ x / 200, scheme, mask=weight == 0, block_size=16)
    assert result.quant is not None
    assert (result.weight[weight == 0] == 0).all()
    index = result.quant.g_idx.long()
    assert torch.equal(result.quant.codes[weight == 0], result.quant.zeros[:, index][weight == 0])
    assert_on_grid(result.weight, result.quant)


# ------------------------------------------------------------------------------------------------- GPTQ


def reference_gptq(
    weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Plain float64 GPTQ: one column at a time, the explicit inverse Hessian downdated after each column.

    Returns (dequantized weight, codes, scales, zeros, loss) in the original column order.
    """
    rows, cols = weight.shape
    order = torch.arange(cols)
    if scheme.act_order:
        order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    w = weight.to(F64)[:, order].clone()  # (rows, cols) in processing order
    hinv = torch.linalg.inv(hessian.to(F64)[order][:, order])  # (cols, cols)
    pruned = torch.zeros(rows, cols, dtype=torch.bool) if mask is None else mask[:, order]
    size = scheme.group_size or cols
    one_group = dataclasses.replace(scheme, group_size=None, clip="minmax")
    # --clip mse weighs each column by 1 / d_j^2, d_j = the downdated inverse's diagonal when column j's turn
    # comes (it does not depend on the weights): collected by one pass of the same downdates
    turn_d, h = [], hinv.clone()
    for j in range(cols):
        turn_d.append(float(h[j, j]))
        h = h - torch.outer(h[:, j], h[j, :]) / h[j, j]
    codes = torch.empty(rows, cols, dtype=scheme.code_dtype)
    scales, zeros = [], []
    loss = 0.0
    for i in range(cols):
        if i % size == 0:  # the group's grid from its current, updated weights
            group = w[:, i : i + size]
            if scheme.clip == "mse":
                weights = (
                    torch.tensor(turn_d[i : i + size], dtype=F64).reciprocal() * ~pruned[:, i : i + size]
                )
                scale, zero = reference_mse_grid(group, weights, one_group)
            else:
                scale, zero = group_params(group, one_group)  # (rows, 1)
            scales.append(scale)
            zeros.append(zero)
        code = quantize(w[:, i : i + 1], scale, zero, scheme)  # (rows, 1)
        code[pruned[:, i : i + 1]] = zero[pruned[:, i : i + 1]]
        q = dequantize(code, scale, zero, F64)[:, 0]  # (rows,)
        d = hinv[i, i]
        loss += ((w[:, i] - q).square() / d).sum().item()
        w[:, i:] -= torch.outer((w[:, i] - q) / d, hinv[i, i:])
        w[:, i] = q
        codes[:, i] = code[:, 0]
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / d  # inverse of H without column i
    inverse = torch.argsort(order)
    return w[:, inverse], codes[:, inverse], torch.cat(scales, 1), torch.cat(zeros, 1), loss


def reference_mse_grid(
    group: torch.Tensor, weights: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """``--clip mse`` row by row: the grids of the ranges [p lo, p hi], p = 1, 1 - 1/80, ..., 1/2 (the grid of
    a range is the min/max grid of its two ends), the first with the least weighted squared error wins."""
    scales, zeros = [], []
    for r in range(group.shape[0]):
        lo, hi = group[r].min(), group[r].max()
        best = None
        for k in range(41):
            p = 1 - k / 80
            scale, zero = group_params(torch.stack([lo * p, hi * p])[None], scheme)  # (1, 1)
            q = dequantize(quantize(group[r : r + 1], scale, zero, scheme), scale, zero, F64)
            err = float(((q - group[r : r + 1]).square() * weights[r]).sum())
            if best is None or err < best[0]:
                best = (err, scale, zero)
        assert best is not None
        scales.append(best[1])
        zeros.append(best[2])
    return torch.cat(scales), torch.cat(zeros)


GPTQ_CASES = [
    QuantScheme(bits=4, group_size=32),
    QuantScheme(bits=4, group_size=32, symmetric=False),
    QuantScheme(bits=4, group_size=None),
    QuantScheme(bits=8, group_size=64, symmetric=False),
    QuantScheme(bits=4, group_size=32, act_order=True),
    QuantScheme(bits=4, group_size=None, symmetric=False, act_order=True),
    QuantScheme(bits=4, group_size=32, clip="mse"),
    QuantScheme(bits=4, group_size=32, symmetric=False, act_order=True, clip="mse"),
]


@pytest.mark.parametrize("scheme", GPTQ_CASES, ids=str)
@pytest.mark.parametrize("block_size", [16, 48, 128])
def test_gptq_equals_the_float64_reference(scheme: QuantScheme, block_size: int, layer) -> None:
    weight, _, hessian = layer
    result = quantize_gptq(weight, hessian, scheme, block_size=block_size, damp=0.0)
    ref_weight, ref_codes, ref_scales, ref_zeros, ref_loss = reference_gptq(weight, hessian, scheme)
    assert result.quant is not None
    assert torch.equal(result.quant.codes, ref_codes)
    assert torch.equal(result.quant.scales, ref_scales) and torch.equal(result.quant.zeros, ref_zeros)
    torch.testing.assert_close(result.weight, ref_weight, rtol=0, atol=1e-12)
    assert result.loss == pytest.approx(ref_loss, rel=1e-9)
    assert_on_grid(result.weight, result.quant)
    assert not result.mask.any()


@pytest.mark.parametrize("scheme", [GPTQ_CASES[0], GPTQ_CASES[4]], ids=str)
def test_gptq_in_float32_matches_the_float64_reference(scheme: QuantScheme, layer) -> None:
    weight, x, hessian = layer
    result = quantize_gptq(weight.float(), hessian.float(), scheme, damp=0.0)
    _, ref_codes, _, _, ref_loss = reference_gptq(weight, hessian, scheme)
    assert result.weight.dtype == torch.float32 and result.quant is not None
    # A code can flip where w / scale is within float32 rounding of a .5 tie; the rest of that row then
    # differs slightly. Nearly all codes agree, and the loss too.
    assert (result.quant.codes == ref_codes).double().mean() > 0.99
    assert result.loss == pytest.approx(ref_loss, rel=1e-3)
    assert result.loss == pytest.approx(direct_loss(weight, result.weight, x), rel=1e-3)
    assert_on_grid(result.weight, result.quant)


@pytest.mark.parametrize("damp", [0.0, 0.01, 0.3])
@pytest.mark.parametrize("scheme", [GPTQ_CASES[1], GPTQ_CASES[4]], ids=str)
def test_gptq_loss_is_the_exact_undamped_loss(damp: float, scheme: QuantScheme) -> None:
    x = correlated_inputs(300, 96, seed=6)
    x[:, 7] = 0.0  # a dead column: zeroed (code = zero-point) and masked
    stats = InputStats(96, hessian=True, dtype=F64)
    stats.add(x)
    weight = torch.randn(9, 96, generator=_gen(7), dtype=F64)
    result = quantize_gptq(weight, stats, scheme, block_size=32, damp=damp)
    assert result.loss == pytest.approx(direct_loss(weight, result.weight, x), rel=1e-8)
    assert result.mask[:, 7].all() and int(result.mask.sum()) == 9
    assert (result.weight[:, 7] == 0).all() and result.quant is not None
    assert_on_grid(result.weight, result.quant)


@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, group_size=32), QuantScheme(bits=4, group_size=None)])
def test_gptq_beats_round_to_nearest(scheme: QuantScheme, layer) -> None:
    weight, x, hessian = layer
    gptq = quantize_gptq(weight, hessian, scheme)
    rtn = quantize_rtn(weight, scheme).dequantize(F64)
    assert gptq.loss is not None
    assert gptq.loss < 0.5 * direct_loss(weight, rtn, x), (gptq.loss, direct_loss(weight, rtn, x))


def test_act_order_group_index_follows_the_processing_order(layer) -> None:
    weight, _, hessian = layer
    scheme = QuantScheme(bits=4, group_size=32, act_order=True)
    result = quantize_gptq(weight, hessian, scheme)
    assert result.quant is not None
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    assert torch.equal(result.quant.g_idx[order], torch.arange(128, dtype=torch.int32) // 32)
    assert torch.equal(result.quant.g_idx, group_index(128, 32, order))
    assert not torch.equal(result.quant.g_idx, group_index(128, 32))  # non-monotonic: needs g_idx
    assert torch.equal(result.weight, result.quant.dequantize(F64))
    plain = quantize_gptq(weight, hessian, dataclasses.replace(scheme, act_order=False))
    assert plain.quant is not None and torch.equal(
        plain.quant.g_idx, torch.arange(128, dtype=torch.int32) // 32
    )


def test_gptq_keeps_a_given_sparsity_mask_exactly(layer) -> None:
    weight, x, hessian = layer
    pruned = prune_wanda(weight, stats_of(x), sparsity=0.5, pattern=(2, 4))
    result = quantize_gptq(pruned.weight, hessian, QuantScheme(bits=4, group_size=32), mask=pruned.mask)
    assert torch.equal(result.mask, pruned.mask)
    assert (result.weight[pruned.mask] == 0).all()
    assert (result.weight.reshape(12, -1, 4) == 0).sum(dim=-1).ge(2).all()
    assert result.quant is not None and (result.quant.codes[pruned.mask] == 0).all()  # symmetric: code 0
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        quantize_gptq(weight, hessian, QuantScheme(bits=4, group_size=32), mask=pruned.mask.float())


def stats_of(x: torch.Tensor) -> InputStats:
    stats = InputStats(x.shape[1], hessian=True, dtype=F64)
    stats.add(x)
    return stats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gptq_keeps_the_dtype_and_the_codes_are_the_truth(dtype: torch.dtype, layer) -> None:
    weight, _, hessian = layer
    result = quantize_gptq(weight.to(dtype), hessian.float(), QuantScheme(bits=4, group_size=32))
    assert result.weight.dtype == dtype and result.quant is not None
    # fp32 solve; the returned weight is the fp32 grid value rounded once to the weight dtype
    assert torch.equal(result.weight, result.quant.dequantize(torch.float32).to(dtype))


def test_bad_gptq_arguments_raise(layer) -> None:
    weight, x, hessian = layer
    with pytest.raises(ValueError, match="QuantScheme"):
        quantize_gptq(weight, hessian, "w4a16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hessian=True"):
        stats = InputStats(128, hessian=False, dtype=F64)
        stats.add(x)
        quantize_gptq(weight, stats, QuantScheme())
    with pytest.raises(ValueError, match="block_size"):
        quantize_gptq(weight, hessian, QuantScheme(), block_size=0)
    with pytest.raises(TypeError):
        quantize_gptq(weight, hessian, QuantScheme(), 128)  # type: ignore[misc]


# ---------------------------------------------------------------------------- joint pruning + quantization


@pytest.mark.parametrize("pattern", [None, (2, 4), (4, 8)])
@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(bits=4, group_size=32),
        QuantScheme(bits=4, group_size=None, symmetric=False),
        QuantScheme(bits=4, group_size=32, symmetric=False, clip="mse"),
    ],
    ids=str,
)
def test_joint_prune_and_quantize(pattern, scheme: QuantScheme) -> None:
    x = correlated_inputs(400, 96, seed=8)
    x[:, 11] = 0.0  # a dead column
    hessian = x.T @ x / 400
    weight = torch.randn(16, 96, generator=_gen(9), dtype=F64)
    sparsity = 0.5 if pattern is None else pattern[0] / pattern[1]
    kwargs = {"sparsity": sparsity, "pattern": pattern, "block_size": 32, "damp": 0.0}
    joint = prune_sparsegpt(weight, hessian, quant=scheme, **kwargs)  # type: ignore[arg-type]
    alone = prune_sparsegpt(weight, hessian, **kwargs)  # type: ignore[arg-type]
    q = joint.quant
    assert q is not None and alone.quant is None
    # exact counts, as for pruning alone; kept weights may round to 0 as well
    if pattern is None:
        assert int(joint.mask.sum()) == int(alone.mask.sum())
    else:
        assert (joint.mask.reshape(16, -1, pattern[1]).sum(dim=-1) >= pattern[0]).all()
        live = torch.ones(96, dtype=torch.bool)
        live[8:16] = False  # the N:M group holding the dead column: all of it is masked
        groups = joint.mask[:, live].reshape(16, -1, pattern[1])
        assert (groups.sum(dim=-1) == pattern[0]).all()
    assert joint.mask[:, 11].all()
    assert (joint.weight[joint.mask] == 0).all()
    index = q.g_idx.long()
    assert torch.equal(q.codes[joint.mask], q.zeros[:, index][joint.mask])  # pruned = the zero-point
    assert_on_grid(joint.weight, q)
    assert joint.loss == pytest.approx(direct_loss(weight, joint.weight, x), rel=1e-8)
    assert joint.loss >= alone.loss  # type: ignore[operator]
    # What holds for the masks: the first tile (first M columns) is chosen before any error is propagated,
    # so it equals pruning alone; later tiles are chosen from weights that carry quantization errors.
    first = 32 if pattern is None else pattern[1]
    assert torch.equal(joint.mask[:, :first], alone.mask[:, :first])


def test_joint_with_sparsity_zero_is_gptq(layer) -> None:
    weight, _, hessian = layer
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    joint = prune_sparsegpt(weight, hessian, sparsity=0.0, quant=scheme, block_size=64, damp=0.01)
    gptq = quantize_gptq(weight, hessian, scheme, block_size=64, damp=0.01)
    assert joint.quant is not None and gptq.quant is not None
    assert torch.equal(joint.weight, gptq.weight) and torch.equal(joint.quant.codes, gptq.quant.codes)
    assert joint.loss == gptq.loss


def test_joint_refuses_act_order_and_misaligned_groups(layer) -> None:
    weight, _, hessian = layer
    with pytest.raises(ConfigError, match="act_order cannot be combined with pruning"):
        prune_sparsegpt(weight, hessian, sparsity=0.5, quant=QuantScheme(group_size=32, act_order=True))
    weight96 = torch.randn(4, 96, dtype=F64)
    with pytest.raises(ConfigError, match="group size 32 is not a multiple of 3"):
        prune_sparsegpt(
            weight96,
            torch.eye(96, dtype=F64),
            sparsity=1 / 3,
            pattern=(1, 3),
            quant=QuantScheme(group_size=32),
        )


def test_prune_result_without_quantization_has_no_codes(layer) -> None:
    weight, _, hessian = layer
    result = prune_sparsegpt(weight, hessian, sparsity=0.5)
    assert isinstance(result, PruneResult) and result.quant is None
