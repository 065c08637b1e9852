"""Solver invariants in float64: exact losses, exact zero counts per group, N:M groups, idempotence,
hand-computed cases, dead columns, Cholesky failure handling and dtype round trips."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import pytest
import torch

from oneshot.solvers import (
    SOLVERS,
    PruneResult,
    SolverError,
    get_solver,
    prune_magnitude,
    prune_sparsegpt,
    prune_wanda,
)
from oneshot.solvers.masks import lowest_k_mask, nm_mask, topk_mask
from oneshot.solvers.sparsegpt import _damping_schedule
from oneshot.stats import InputStats, reconstruction_loss

F64 = torch.float64
NM_PATTERNS = [(2, 4), (4, 8), (1, 4), (3, 8)]
SPARSEGPT_LOGGER = "oneshot.solvers.sparsegpt"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlated_inputs(tokens: int, cols: int, seed: int = 0) -> torch.Tensor:
    """(tokens, cols) float64 LLM-like inputs: a few shared latent factors plus noise, uneven scales."""
    g = _gen(seed)
    latent = torch.randn(tokens, 8, generator=g, dtype=F64) @ torch.randn(8, cols, generator=g, dtype=F64)
    noise = 0.3 * torch.randn(tokens, cols, generator=g, dtype=F64)
    scales = torch.logspace(-0.5, 0.5, cols, dtype=F64)[torch.randperm(cols, generator=g)]
    return (latent + noise) * scales


def stats_of(x: torch.Tensor, hessian: bool = True) -> InputStats:
    stats = InputStats(x.shape[1], hessian=hessian, dtype=F64)
    stats.add(x)
    return stats


def direct_loss(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """||(W - W') X^T||_F^2 / n computed from the explicit inputs."""
    return ((weight.double() - pruned.double()) @ x.T).square().sum().item() / x.shape[0]


def run(
    name: str, weight: torch.Tensor, stats: InputStats, *, block_size: int = 128, **kwargs: object
) -> PruneResult:
    """Any solver; SparseGPT undamped (exact losses) with the given block size."""
    if name == "sparsegpt":
        kwargs = {"damp": 0.0, "block_size": block_size, **kwargs}
    return get_solver(name)(weight, stats, **kwargs)


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, InputStats]:
    x = correlated_inputs(400, 64, seed=1)
    weight = torch.randn(24, 64, generator=_gen(2), dtype=F64)
    return weight, x, stats_of(x)


# --------------------------------------------------------------------------------------------- registry


def test_registry_and_unknown_name() -> None:
    expected = {"magnitude": prune_magnitude, "wanda": prune_wanda, "sparsegpt": prune_sparsegpt}
    assert expected == SOLVERS
    assert get_solver("wanda") is prune_wanda
    with pytest.raises(ValueError, match="magnitude, wanda, sparsegpt"):
        get_solver("obc")


# ---------------------------------------------------------------------------------- shared invariants


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("pattern", [None, *NM_PATTERNS])
def test_invariants(name: str, pattern: tuple[int, int] | None, layer) -> None:
    weight, x, stats = layer
    original = weight.clone()
    sparsity = 0.5 if pattern is None else pattern[0] / pattern[1]
    result = run(name, weight, stats, sparsity=sparsity, pattern=pattern)
    assert torch.equal(weight, original), "the input weight must not be modified"
    assert result.weight.shape == weight.shape and result.weight.dtype == weight.dtype
    assert result.mask.dtype == torch.bool and result.mask.shape == weight.shape
    assert (result.weight[result.mask] == 0).all()
    n, m = (1, 2) if pattern is None else pattern
    assert int(result.mask.sum()) == weight.numel() // m * n
    if pattern is not None:
        groups = result.mask.reshape(weight.shape[0], -1, m)  # (rows, cols / m, m)
        assert (groups.sum(dim=-1) == n).all()
        assert ((result.weight == 0).reshape(weight.shape[0], -1, m).sum(dim=-1) == n).all()
    assert result.loss == pytest.approx(direct_loss(weight, result.weight, x), rel=1e-8)
    if name != "sparsegpt":
        assert torch.equal(result.weight, weight.masked_fill(result.mask, 0))


@pytest.mark.parametrize("name", ["magnitude", "wanda"])
def test_loss_is_none_without_a_hessian(name: str, layer) -> None:
    weight, x, _ = layer
    result = get_solver(name)(weight, stats_of(x, hessian=False), sparsity=0.5)
    assert result.loss is None
    assert prune_magnitude(weight, sparsity=0.5).loss is None


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_pruning_a_pruned_weight_again_changes_nothing(name: str, pattern, layer) -> None:
    weight, _, stats = layer
    first = run(name, weight, stats, sparsity=0.5, pattern=pattern, block_size=16)
    second = run(name, first.weight, stats, sparsity=0.5, pattern=pattern, block_size=16)
    assert torch.equal(second.mask, first.mask)
    assert torch.equal(second.weight, first.weight)
    assert second.loss == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_512_weights_at_half_sparsity_prune_exactly_256_even_with_ties(name: str) -> None:
    # Integer weights with many ties; identity Hessian so Wanda and SparseGPT scores tie as well.
    weight = (torch.arange(512, dtype=F64).remainder(5) - 2)[torch.randperm(512, generator=_gen(3))]
    weight = weight.reshape(2, 256)
    x = torch.eye(256, dtype=F64)
    result = run(name, weight, stats_of(x), sparsity=0.5, block_size=256)
    assert int(result.mask.sum()) == 256
    assert int((result.weight == 0).sum()) == 256  # the zeros of the input are among the pruned
    if name == "wanda":
        assert result.mask.sum(dim=1).tolist() == [128, 128]


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtype_is_kept(name: str, dtype: torch.dtype) -> None:
    x = correlated_inputs(200, 32, seed=4).float()
    stats = InputStats(32, hessian=True)
    stats.add(x.to(dtype))
    weight = torch.randn(8, 32, generator=_gen(5)).to(dtype)
    for pattern in (None, (2, 4)):
        result = get_solver(name)(weight, stats, sparsity=0.5, pattern=pattern)
        assert result.weight.dtype == dtype and result.weight.device == weight.device
        assert torch.isfinite(result.weight).all()
        assert (result.weight[result.mask] == 0).all()
        assert int(result.mask.sum()) == 128
        assert result.loss is not None and math.isfinite(result.loss)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_bad_arguments_raise(name: str) -> None:
    solver = get_solver(name)
    x = torch.randn(20, 10, dtype=F64)
    with pytest.raises(ValueError, match="10 columns"):
        solver(torch.randn(3, 10, dtype=F64), stats_of(x), sparsity=0.5, pattern=(2, 4))
    with pytest.raises(ValueError, match="12 input columns"):
        solver(torch.randn(3, 12, dtype=F64), stats_of(x), sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity"):
        solver(torch.randn(3, 10, dtype=F64), stats_of(x), sparsity=1.5)
    bad = torch.randn(3, 10, dtype=F64)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        solver(bad, stats_of(x), sparsity=0.5)


# ---------------------------------------------------------------------------- magnitude and Wanda


def test_hand_computed_unstructured_magnitude_vs_wanda() -> None:
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]], dtype=F64)
    # One token x = [1, 1, 10, 10]: ||X_j|| = [1, 1, 10, 10] (up to sqrt(n) = 1).
    stats = stats_of(torch.tensor([[1.0, 1.0, 10.0, 10.0]], dtype=F64), hessian=False)
    # Magnitude compares the whole layer: the four smallest |W| are 1, 1, 2, 2.
    mag = prune_magnitude(weight, stats, sparsity=0.5)
    assert mag.mask.tolist() == [[True, True, False, False], [False, False, True, True]]
    # Wanda scores [[1, 2, 30, 40], [4, 3, 20, 10]] and compares per row.
    wanda = prune_wanda(weight, stats, sparsity=0.5)
    assert wanda.mask.tolist() == [[True, True, False, False], [True, True, False, False]]
    assert wanda.weight.tolist() == [[0.0, 0.0, 3.0, 4.0], [0.0, 0.0, 2.0, 1.0]]


def test_hand_computed_wanda_2_4() -> None:
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0]], dtype=F64)
    stats = stats_of(torch.tensor([[4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 10.0]], dtype=F64), hessian=False)
    # Scores |W| * ||X_j||: [4, 2, 3, 4 | 5, 6, 7, 80].
    wanda = prune_wanda(weight, stats, sparsity=0.5, pattern=(2, 4))
    assert wanda.mask.tolist() == [[False, True, True, False, True, True, False, False]]
    assert wanda.weight.tolist() == [[1.0, 0.0, 0.0, -4.0, 0.0, 0.0, 7.0, -8.0]]
    mag = prune_magnitude(weight, stats, sparsity=0.5, pattern=(2, 4))
    assert mag.mask.tolist() == [[True, True, False, False, True, True, False, False]]


def test_wanda_prunes_lowest_scores_per_row(layer) -> None:
    weight, x, stats = layer
    result = prune_wanda(weight, stats, sparsity=0.3)
    per_row = result.mask.sum(dim=1).tolist()
    assert set(per_row) <= {19, 20} and sum(per_row) == round(weight.numel() * 0.3)  # 64 * 0.3 = 19.2
    score = weight.abs() * x.norm(dim=0)
    for s, m in zip(score, result.mask, strict=True):
        assert s[m].max() < s[~m].min()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.001, 0.01, 0.5, 0.99, 0.999])
def test_achieved_sparsity_equals_the_request_at_extreme_values(layer, method: str, sparsity: float) -> None:
    """Wanda rounded per row: at 0.999 with 64 columns every row pruned 64 of 64 (achieved 1.0)."""
    weight, _, stats = layer
    extra = {"block_size": 16, "damp": 0.01} if method == "sparsegpt" else {}
    result = get_solver(method)(weight, stats, sparsity=sparsity, **extra)
    assert int((result.weight == 0).sum()) == int(result.mask.sum()) == round(weight.numel() * sparsity)


def test_magnitude_prunes_lowest_magnitudes_of_the_layer(layer) -> None:
    weight, _, _ = layer
    result = prune_magnitude(weight, sparsity=0.3)
    assert int(result.mask.sum()) == round(weight.numel() * 0.3)
    assert weight.abs()[result.mask].max() < weight.abs()[~result.mask].min()


# ----------------------------------------------------------------------------------------- SparseGPT


def test_sparsegpt_hand_computed_2_columns() -> None:
    # H = [[2, 1], [1, 2]], W = [1, 3]. Scores w^2 / [H^-1]_ii = 1 / (2/3) and 9 / (2/3): column 0 goes;
    # the optimal compensation minimises 2 - 2 t + 2 t^2 ... over the second weight: W' = [0, 3.5], loss 1.5.
    hessian = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=F64)
    weight = torch.tensor([[1.0, 3.0]], dtype=F64)
    result = prune_sparsegpt(weight, hessian, sparsity=0.5, damp=0.0)
    assert result.mask.tolist() == [[True, False]]
    torch.testing.assert_close(result.weight, torch.tensor([[0.0, 3.5]], dtype=F64), rtol=1e-14, atol=1e-14)
    assert result.loss == pytest.approx(1.5, rel=1e-14)


@pytest.mark.parametrize("block_size", [1, 7, 16, 64, 128])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.8])
def test_sparsegpt_loss_is_exact_and_counts_are_exact_per_block(block_size: int, sparsity: float) -> None:
    cols = 100  # not a multiple of most block sizes: the last tile is narrower
    x = correlated_inputs(300, cols, seed=6)
    weight = torch.randn(9, cols, generator=_gen(7), dtype=F64)
    result = prune_sparsegpt(weight, stats_of(x), sparsity=sparsity, block_size=block_size, damp=0.0)
    assert result.loss == pytest.approx(direct_loss(weight, result.weight, x), rel=1e-8)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        tile = result.mask[:, i1:i2]  # cumulative rounding: each tile floor/ceil, the layer exact
        assert int(tile.sum()) == round(9 * i2 * sparsity) - round(9 * i1 * sparsity)
        assert abs(int(tile.sum()) - tile.numel() * sparsity) < 1
    assert int(result.mask.sum()) == round(weight.numel() * sparsity)
    assert (result.weight[result.mask] == 0).all()
    assert (result.weight[~result.mask] != 0).all()


def naive_obs(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None, block: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Column-by-column OBS with explicit inverses of the trailing Hessian H[i:, i:] (no Cholesky)."""
    w = weight.clone()
    rows, cols = w.shape
    d2 = torch.stack([torch.linalg.inv(hessian[j:, j:])[0, 0] for j in range(cols)])  # (cols,)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    loss = 0.0
    for i in range(cols):
        if pattern is None and i % block == 0:
            end = min(i + block, cols)
            k = round(rows * end * sparsity) - round(rows * i * sparsity)  # tiles add up to the layer's count
            mask[:, i:end] = lowest_k_mask(w[:, i:end] ** 2 / d2[i:end], k)
        if pattern is not None and i % pattern[1] == 0:
            m = pattern[1]
            mask[:, i : i + m] = nm_mask(w[:, i : i + m] ** 2 / d2[i : i + m], *pattern)
        inv = torch.linalg.inv(hessian[i:, i:])
        removed = torch.where(mask[:, i], w[:, i], 0.0)  # (rows,)
        loss += (removed**2 / inv[0, 0]).sum().item()
        w[:, i:] -= removed[:, None] / inv[0, 0] * inv[0][None, :]
    return w.masked_fill(mask, 0.0), mask, loss


@pytest.mark.parametrize("pattern, block", [(None, 16), (None, 40), ((2, 4), 128), ((3, 8), 16)])
def test_sparsegpt_equals_naive_sequential_obs(pattern, block: int) -> None:
    x = correlated_inputs(200, 40, seed=17)
    hessian = x.T @ x / 200
    weight = torch.randn(7, 40, generator=_gen(18), dtype=F64)
    result = prune_sparsegpt(weight, hessian, sparsity=0.5, pattern=pattern, block_size=block, damp=0.0)
    ref_weight, ref_mask, ref_loss = naive_obs(weight, hessian, 0.5, pattern, block)
    assert torch.equal(result.mask, ref_mask)
    torch.testing.assert_close(result.weight, ref_weight, rtol=1e-9, atol=1e-9)
    assert result.loss == pytest.approx(ref_loss, rel=1e-9)


@pytest.mark.parametrize("damp", [0.01, 0.3])
@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_loss_is_the_undamped_loss_with_damping(damp: float, pattern) -> None:
    x = correlated_inputs(300, 48, seed=19)
    x[:, 5] = 0.0  # a dead column as well
    weight = torch.randn(9, 48, generator=_gen(20), dtype=F64)
    result = prune_sparsegpt(weight, stats_of(x), sparsity=0.5, pattern=pattern, block_size=16, damp=damp)
    assert result.loss == pytest.approx(direct_loss(weight, result.weight, x), rel=1e-8)


def test_sparsegpt_with_identity_hessian_is_magnitude_per_tile() -> None:
    weight = torch.randn(6, 40, generator=_gen(8), dtype=F64)
    result = prune_sparsegpt(weight, torch.eye(40, dtype=F64), sparsity=0.5, block_size=16, damp=0.0)
    expected = torch.cat(
        [topk_mask(weight[:, i : i + 16].abs(), 0.5, "layer") for i in range(0, 40, 16)], dim=1
    )
    assert torch.equal(result.mask, expected)
    assert torch.equal(result.weight, weight.masked_fill(expected, 0))


def test_sparsegpt_nm_does_not_depend_on_block_size(layer) -> None:
    weight, _, stats = layer
    ref = prune_sparsegpt(weight, stats, sparsity=0.5, pattern=(2, 4), block_size=64, damp=0.0)
    for block_size in (4, 6, 13):  # 6 and 13 are rounded down to multiples of 4
        other = prune_sparsegpt(weight, stats, sparsity=0.5, pattern=(2, 4), block_size=block_size, damp=0.0)
        assert torch.equal(other.mask, ref.mask)
        torch.testing.assert_close(other.weight, ref.weight, rtol=1e-10, atol=1e-10)


def test_sparsegpt_accepts_a_hessian_tensor_and_rejects_stats_without_one(layer) -> None:
    weight, x, stats = layer
    from_stats = prune_sparsegpt(weight, stats, sparsity=0.5)
    from_tensor = prune_sparsegpt(weight, x.T @ x / x.shape[0], sparsity=0.5)
    assert torch.equal(from_stats.mask, from_tensor.mask)
    torch.testing.assert_close(from_stats.weight, from_tensor.weight, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="hessian=True"):
        prune_sparsegpt(weight, stats_of(x, hessian=False), sparsity=0.5)


def test_sparsity_zero_keeps_the_weight(layer) -> None:
    weight, _, stats = layer
    result = prune_sparsegpt(weight, stats, sparsity=0.0)
    assert not result.mask.any()
    assert torch.equal(result.weight, weight)
    assert result.loss == 0.0


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_and_wanda(pattern) -> None:
    x = correlated_inputs(600, 96, seed=9)
    stats = stats_of(x)
    weight = torch.randn(32, 96, generator=_gen(10), dtype=F64)
    losses = {
        name: direct_loss(weight, run(name, weight, stats, sparsity=0.5, pattern=pattern).weight, x)
        for name in SOLVERS
    }
    assert losses["sparsegpt"] < 0.5 * min(losses["magnitude"], losses["wanda"]), losses
    assert losses["wanda"] < losses["magnitude"], losses  # uneven input scales favour Wanda


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_dead_columns_are_zeroed_and_masked(pattern) -> None:
    x = correlated_inputs(300, 32, seed=11)
    dead = [3, 10, 11]
    x[:, dead] = 0.0
    weight = torch.randn(8, 32, generator=_gen(12), dtype=F64)
    result = prune_sparsegpt(weight, stats_of(x), sparsity=0.5, pattern=pattern, block_size=16, damp=0.0)
    assert (result.weight[:, dead] == 0).all()
    assert result.mask[:, dead].all()
    assert torch.isfinite(result.weight).all()
    assert result.loss == pytest.approx(direct_loss(weight, result.weight, x), rel=1e-8)
    if pattern is not None:
        assert (result.mask.reshape(8, -1, 4).sum(dim=-1) == 2).all()


def test_nan_hessian_raises_solver_error(layer) -> None:
    weight, x, _ = layer
    hessian = x.T @ x / x.shape[0]
    hessian[5, 7] = float("nan")
    with pytest.raises(SolverError, match="NaN"):
        prune_sparsegpt(weight, hessian, sparsity=0.5)


def test_hopeless_hessian_retries_then_raises(caplog: pytest.LogCaptureFixture) -> None:
    # Unit diagonal, off-diagonal 5: eigenvalues 36 and -4 (7 times); no damping up to 1.0 fixes it.
    hessian = torch.full((8, 8), 5.0, dtype=F64).fill_diagonal_(1.0)
    weight = torch.randn(4, 8, generator=_gen(13), dtype=F64)
    with (
        caplog.at_level(logging.WARNING, logger=SPARSEGPT_LOGGER),
        pytest.raises(SolverError, match="--damp"),
    ):
        prune_sparsegpt(weight, hessian, sparsity=0.5, damp=0.01)
    retries = [r for r in caplog.records if r.name == SPARSEGPT_LOGGER and "retrying" in r.message]
    assert len(retries) == 2  # damp 0.1 and 1.0


def test_slightly_indefinite_hessian_retries_with_more_damping(caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(20, 48, generator=_gen(14), dtype=F64)  # 20 tokens < 48 columns: H is singular
    hessian = x.T @ x / 20
    mean_diag = hessian.diagonal().mean()
    hessian -= 0.05 * mean_diag * torch.eye(48, dtype=F64)  # smallest eigenvalue -0.05 * mean(diag)
    weight = torch.randn(6, 48, generator=_gen(15), dtype=F64)
    with caplog.at_level(logging.WARNING, logger=SPARSEGPT_LOGGER):
        result = prune_sparsegpt(weight, hessian, sparsity=0.5, damp=0.01)
    assert any("damp=0.1" in r.getMessage() for r in caplog.records if r.name == SPARSEGPT_LOGGER)
    # The retry is exactly damping 0.1 (not an identity fallback).
    expected = prune_sparsegpt(weight, hessian, sparsity=0.5, damp=0.1)
    assert torch.equal(result.mask, expected.mask)
    assert torch.equal(result.weight, expected.weight)
    identity_like = prune_sparsegpt(weight, torch.eye(48, dtype=F64), sparsity=0.5)
    assert not torch.equal(result.weight, identity_like.weight)
    delta = weight - result.weight
    assert result.loss == pytest.approx(((delta @ hessian) * delta).sum().item(), rel=1e-8)


def test_damping_schedule() -> None:
    assert list(_damping_schedule(0.01)) == pytest.approx([0.01, 0.1, 1.0])
    assert list(_damping_schedule(0.0)) == pytest.approx([0.0, 1e-4, 1e-3, 1e-2])
    assert list(_damping_schedule(0.5)) == pytest.approx([0.5, 1.0])
    assert list(_damping_schedule(2.0)) == [2.0]


def test_sparsegpt_smollm2_sized_layer() -> None:
    rows, cols = 1536, 576  # SmolLM2 gate/up projection; 576 columns = 4.5 blocks of 128
    g = _gen(16)
    x = torch.randn(1024, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / math.sqrt(cols))
    stats = InputStats(cols, hessian=True)
    stats.add(x)
    weight = torch.randn(rows, cols, generator=g) * 0.02
    result = prune_sparsegpt(weight, stats, sparsity=0.5)
    for i1 in range(0, cols, 128):  # 576 = 4.5 blocks: the last tile has 64 columns
        tile = result.mask[:, i1 : i1 + 128]
        assert int(tile.sum()) == round(tile.numel() * 0.5)
    assert (result.weight[result.mask] == 0).all() and torch.isfinite(result.weight).all()
    assert stats.hessian is not None
    exact = reconstruction_loss((weight - result.weight).double(), stats.hessian.double())
    assert result.loss == pytest.approx(exact, rel=1e-4)  # fp32 solve, damping term removed
    nm = prune_sparsegpt(weight, stats, sparsity=0.5, pattern=(2, 4))
    assert (nm.mask.reshape(rows, -1, 4).sum(dim=-1) == 2).all()
    wanda = prune_wanda(weight, stats, sparsity=0.5)
    assert result.loss is not None and wanda.loss is not None and result.loss < wanda.loss


def test_solver_signatures_are_callable_with_keywords(layer) -> None:
    weight, _, stats = layer
    fns: list[Callable[..., PruneResult]] = [prune_magnitude, prune_wanda, prune_sparsegpt]
    for fn in fns:
        with pytest.raises(TypeError):
            fn(weight, stats, 0.5)  # sparsity is keyword-only
