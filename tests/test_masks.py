"""Mask selectors: exact counts per group, lowest scores pruned, deterministic ties, N:M groups."""

from __future__ import annotations

import math

import pytest
import torch

from oneshot.solvers.masks import group_counts, nm_mask, prune_count, select_mask, sparsity_of, topk_mask


def _ties_512() -> torch.Tensor:
    # 512 scores taking only 4 values: the median value is shared by 128 entries.
    return torch.arange(512).remainder(4).to(torch.float32)[torch.randperm(512, generator=_gen(0))]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_threshold_trap_prunes_too_many_but_topk_mask_does_not() -> None:
    score = _ties_512()
    k = 256
    # The `score <= sorted[k]` rule of the reference code over-prunes (here by a lot, because of ties).
    assert int((score <= score.sort().values[k]).sum()) > k
    for group in ("layer", "row"):
        mask = topk_mask(score.reshape(1, 512), 0.5, group)
        assert int(mask.sum()) == k
        assert score[mask.flatten()].max() <= score[~mask.flatten()].min()


def test_threshold_trap_without_ties() -> None:
    score = torch.randn(512, generator=_gen(1))
    assert int((score <= score.sort().values[256]).sum()) == 257
    assert int(topk_mask(score, 0.5, "layer").sum()) == 256


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.77, 1.0])
def test_topk_row_prunes_exactly_k_lowest_per_row(sparsity: float) -> None:
    score = torch.randn(7, 33, generator=_gen(2), dtype=torch.float64)
    mask = topk_mask(score, sparsity, "row")
    assert mask.dtype == torch.bool and mask.shape == score.shape
    per_row = mask.sum(dim=1).tolist()
    assert sum(per_row) == round(7 * 33 * sparsity)  # the tensor's total is exact
    assert set(per_row) <= {math.floor(33 * sparsity), math.ceil(33 * sparsity)}
    for row, m, k in zip(score, mask, per_row, strict=True):
        if 0 < k < 33:
            assert row[m].max() < row[~m].min()


@pytest.mark.parametrize("sparsity", [0.001, 0.01, 0.3, 0.99, 0.999])
@pytest.mark.parametrize("shape", [(64, 64), (5, 7), (3, 1000)])
def test_row_counts_add_up_to_the_requested_total(sparsity: float, shape: tuple[int, int]) -> None:
    """Rounding each row on its own would prune every weight at 0.999 with 64 columns (63.9 -> 64)."""
    rows, cols = shape
    counts = group_counts(rows, cols, sparsity)
    assert sum(counts) == round(rows * cols * sparsity)
    assert set(counts) <= {math.floor(cols * sparsity), math.ceil(cols * sparsity)}
    mask = topk_mask(torch.rand(shape, generator=_gen(4)), sparsity, "row")
    assert int(mask.sum()) == round(rows * cols * sparsity)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_topk_layer_prunes_exactly_k_lowest_of_the_tensor(sparsity: float) -> None:
    score = torch.randn(6, 40, generator=_gen(3), dtype=torch.float64).abs() * torch.arange(1, 7)[:, None]
    mask = topk_mask(score, sparsity, "layer")
    k = round(240 * sparsity)
    assert int(mask.sum()) == k
    if 0 < k < 240:
        assert score[mask].max() < score[~mask].min()
    if 0 < k < 240 and sparsity == 0.5:
        # Whole-layer comparison: rows with small scores lose more than half of their entries.
        assert int(mask[0].sum()) > 20 > int(mask[5].sum())


def test_ties_are_broken_by_position() -> None:
    score = torch.zeros(2, 8)
    expected_row = torch.tensor([True] * 3 + [False] * 5)
    mask = topk_mask(score, 3 / 8, "row")
    assert torch.equal(mask, expected_row.expand(2, 8))
    layer = topk_mask(score, 0.25, "layer")
    assert torch.equal(layer.flatten(), torch.tensor([True] * 4 + [False] * 12))
    nm = nm_mask(torch.ones(1, 8), 2, 4)
    assert nm.tolist() == [[True, True, False, False, True, True, False, False]]


def test_prune_count_is_round() -> None:
    assert prune_count(512, 0.5) == 256
    assert prune_count(33, 0.3) == 10  # 9.9
    assert prune_count(10, 0.14) == 1  # 1.4
    assert prune_count(7, 0.0) == 0 and prune_count(7, 1.0) == 7


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 8), (1, 2), (0, 4), (4, 4), (5, 16)])
def test_nm_mask_prunes_exactly_n_lowest_per_group(n: int, m: int) -> None:
    score = torch.randn(5, 48, generator=_gen(4), dtype=torch.float64)
    mask = nm_mask(score, n, m)
    groups = mask.reshape(5, 48 // m, m)
    assert (groups.sum(dim=-1) == n).all()
    sg = score.reshape(5, 48 // m, m)
    if 0 < n < m:
        pruned_max = sg.masked_fill(~groups, -float("inf")).amax(dim=-1)
        kept_min = sg.masked_fill(groups, float("inf")).amin(dim=-1)
        assert (pruned_max < kept_min).all()


def test_nm_mask_hand_computed() -> None:
    score = torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 5.0, 7.0, 6.0]])
    assert nm_mask(score, 2, 4).tolist() == [[True, False, True, False, False, True, False, True]]
    assert nm_mask(score, 1, 4).tolist() == [[True, False, False, False, False, True, False, False]]
    assert nm_mask(score, 3, 8).tolist() == [[True, False, True, True, False, False, False, False]]


def test_nm_mask_rejects_ragged_rows_naming_the_shape() -> None:
    with pytest.raises(ValueError, match=r"\(3, 10\)"):
        nm_mask(torch.randn(3, 10), 2, 4)
    with pytest.raises(ValueError, match="10 columns"):
        select_mask(torch.randn(3, 10), 0.5, (2, 4))
    with pytest.raises(ValueError, match="0 <= n <= m"):
        nm_mask(torch.randn(3, 8), 5, 4)


def test_invalid_arguments_raise() -> None:
    score = torch.randn(4, 8)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            topk_mask(score, bad, "row")
    with pytest.raises(ValueError, match="row, layer"):
        topk_mask(score, 0.5, "block")  # type: ignore[arg-type]
    score[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(score, 0.5, "row")


def test_select_mask_dispatch_and_sparsity_of() -> None:
    score = torch.randn(4, 16, generator=_gen(5))
    assert torch.equal(select_mask(score, 0.25, None, "row"), topk_mask(score, 0.25, "row"))
    assert torch.equal(select_mask(score, 0.5, (2, 4)), nm_mask(score, 2, 4))
    assert sparsity_of(nm_mask(score, 1, 4)) == 0.25
    assert sparsity_of(torch.tensor([[0.0, 1.0], [2.0, 0.0]])) == 0.5
