"""Structured-pruning math against float64 re-derivations: the least-squares re-fit and greedy OBS removal."""

from __future__ import annotations

import pytest
import torch

from oneshot.structured import activation_scores, nested_refit_losses, obs_removal_order, refit, refit_loss

F64 = torch.float64


def _data(
    tokens: int = 400, n: int = 24, out: int = 6, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g, dtype=F64)
    x = torch.randn(tokens, n, generator=g, dtype=F64) @ mix  # correlated inputs (tokens, n)
    w = torch.randn(out, n, generator=g, dtype=F64)
    return x, w, x.T @ x / tokens


def test_refit_is_the_least_squares_solution() -> None:
    x, w, h = _data()
    keep = torch.tensor([0, 2, 3, 7, 8, 11, 15, 20, 23])
    new = refit(w, h, keep)
    # float64 re-derivation: min ||X W^T - X_K W'^T||^2 by lstsq on the data itself
    expected = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    torch.testing.assert_close(new, expected, rtol=1e-9, atol=1e-9)
    direct = ((x @ w.T - x[:, keep] @ new.T) ** 2).sum().item() / x.shape[0]
    assert refit_loss(w, h, keep, new) == pytest.approx(direct, rel=1e-9)
    # the re-fit beats simply dropping the columns
    assert refit_loss(w, h, keep, new) < refit_loss(w, h, keep, w[:, keep])


@pytest.mark.parametrize("group", [1, 3])
def test_greedy_obs_compensation_equals_the_refit_and_costs_add_up(group: int) -> None:
    _, w, h = _data()
    remove = 12 // group
    order, costs, compensated = obs_removal_order(w, h, remove=remove, group=group, damp=0.0)
    assert len(order) == len(set(order)) == remove
    removed = torch.tensor([g * group + i for g in order for i in range(group)])
    keep = torch.tensor([j for j in range(w.shape[1]) if j not in set(removed.tolist())])
    assert (compensated[:, removed] == 0).all()
    new = refit(w, h, keep)  # the re-fit on the columns kept
    torch.testing.assert_close(compensated[:, keep], new, rtol=1e-8, atol=1e-8)
    assert sum(costs) == pytest.approx(refit_loss(w, h, keep, new), rel=1e-8)
    # greedy: each step removes the cheapest group at that point, so no single other choice was cheaper
    first = order[0]
    hinv = torch.linalg.inv(h)
    for g in range(w.shape[1] // group):
        idx = torch.arange(g * group, (g + 1) * group)
        cost = ((w[:, idx] @ torch.linalg.inv(hinv[idx][:, idx])) * w[:, idx]).sum().item()
        assert cost >= costs[0] - 1e-12 or g == first


def test_activation_scores_and_bad_arguments() -> None:
    _, w, h = _data()
    score = activation_scores(w, h.diagonal(), group=3)
    expected = (h.diagonal().sqrt() * w.norm(dim=0)).reshape(-1, 3).sum(dim=1)
    torch.testing.assert_close(score, expected)
    with pytest.raises(ValueError, match="groups of 5"):
        obs_removal_order(w, h, remove=1, group=5)
    with pytest.raises(ValueError, match="at least one must stay"):
        obs_removal_order(w, h, remove=24)


def test_nested_losses_equal_each_prefix_refit() -> None:
    _, w, h = _data()
    order = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(3))
    losses = nested_refit_losses(w, h, order)
    assert losses.shape == (w.shape[1] + 1,)
    assert losses[0] == pytest.approx(float(((w @ h) * w).sum()), rel=1e-10)  # nothing kept
    assert losses[-1] == pytest.approx(0.0, abs=1e-8)  # everything kept
    for k in (1, 5, 9, 17):
        keep = order[:k]
        assert losses[k] == pytest.approx(refit_loss(w, h, keep, refit(w, h, keep)), rel=1e-8)
    assert bool((losses[1:] <= losses[:-1] + 1e-9).all())  # more units kept never costs more


def test_refit_to_a_shifted_target_is_its_least_squares_solution() -> None:
    x, w, h = _data()
    e = torch.randn(x.shape[0], w.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    keep = torch.tensor([1, 4, 5, 9, 10, 16, 22])
    new = refit(w, h, keep, cross=e.T @ x / x.shape[0])
    expected = torch.linalg.lstsq(x[:, keep], x @ w.T + e).solution.T
    torch.testing.assert_close(new, expected, rtol=1e-9, atol=1e-9)
