"""InputStats: X^T X / n and squared input norms over several add() calls, in float64."""

from __future__ import annotations

import pytest
import torch

from oneshot.stats import InputStats, reconstruction_loss

COLS = 12


def _batches(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 5, COLS), (7, COLS), (2, 1, 4, COLS), (0, COLS), (1, COLS)]
    return [torch.randn(*s, generator=g, dtype=torch.float64) * 3 + 1 for s in shapes]


def _stacked(batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([b.reshape(-1, COLS) for b in batches])  # (tokens, cols)


def test_hessian_and_sq_norms_equal_direct_computation() -> None:
    batches = _batches()
    stats = InputStats(COLS, hessian=True, dtype=torch.float64)
    for b in batches:
        stats.add(b)
    x = _stacked(batches)
    assert stats.n == x.shape[0] == 15 + 7 + 8 + 0 + 1
    hessian = stats.hessian
    assert hessian is not None
    assert hessian.shape == (COLS, COLS) and hessian.dtype == torch.float64
    torch.testing.assert_close(hessian, x.T @ x / x.shape[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.sq_norms, torch.diagonal(hessian), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.sq_norms, x.square().mean(dim=0), rtol=1e-12, atol=0)


def test_sq_norms_without_hessian() -> None:
    batches = _batches(seed=1)
    stats = InputStats(COLS, hessian=False, dtype=torch.float64)
    for b in batches:
        stats.add(b)
    x = _stacked(batches)
    assert stats.hessian is None
    assert not stats.has_hessian
    assert stats.sq_norms.shape == (COLS,)
    torch.testing.assert_close(stats.sq_norms, x.square().sum(dim=0) / x.shape[0], rtol=1e-12, atol=0)


def test_batching_does_not_change_the_statistics() -> None:
    x = _stacked(_batches(seed=2))
    one = InputStats(COLS, hessian=True, dtype=torch.float64)
    one.add(x)
    many = InputStats(COLS, hessian=True, dtype=torch.float64)
    for chunk in x.split(4):
        many.add(chunk.unsqueeze(0))
    assert one.n == many.n
    torch.testing.assert_close(one.hessian, many.hessian, rtol=1e-12, atol=1e-12)


def test_low_precision_inputs_are_cast_to_the_accumulation_dtype() -> None:
    x = torch.randn(9, COLS, dtype=torch.float64).to(torch.bfloat16)
    stats = InputStats(COLS, hessian=True, dtype=torch.float64)
    stats.add(x)
    exact = x.double()
    torch.testing.assert_close(stats.hessian, exact.T @ exact / 9, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hessian", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_raise_and_leave_state_untouched(hessian: bool, bad: float) -> None:
    stats = InputStats(COLS, hessian=hessian, dtype=torch.float64)
    good = torch.randn(4, COLS, dtype=torch.float64)
    stats.add(good)
    before = stats.sq_norms.clone()
    x = torch.randn(2, 3, COLS, dtype=torch.float64)
    x[1, 2, 5] = bad
    with pytest.raises(ValueError, match="non-finite activations"):
        stats.add(x)
    assert stats.n == 4
    torch.testing.assert_close(stats.sq_norms, before, rtol=0, atol=0)


def test_fp32_overflow_is_reported_as_non_finite() -> None:
    stats = InputStats(COLS, hessian=True)
    with pytest.raises(ValueError, match="non-finite activations"):
        stats.add(torch.full((2, COLS), 1e30))


def test_wrong_width_and_empty_stats_raise() -> None:
    stats = InputStats(COLS, hessian=True)
    with pytest.raises(ValueError, match="no tokens"):
        _ = stats.hessian
    with pytest.raises(ValueError, match="no tokens"):
        _ = stats.sq_norms
    with pytest.raises(ValueError, match=r"\(\.\.\., 12\)"):
        stats.add(torch.randn(3, COLS + 1))
    with pytest.raises(ValueError, match="positive integer"):
        InputStats(0, hessian=True)


def test_reconstruction_loss_equals_direct_norm() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, COLS, generator=g, dtype=torch.float64)
    delta = torch.randn(5, COLS, generator=g, dtype=torch.float64)
    stats = InputStats(COLS, hessian=True, dtype=torch.float64)
    stats.add(x)
    assert stats.hessian is not None
    direct = (delta @ x.T).square().sum().item() / 50
    assert reconstruction_loss(delta, stats.hessian) == pytest.approx(direct, rel=1e-12)


def test_first_token_weight_adds_the_first_token_of_every_sequence() -> None:
    """(X^T X + w * seq * X_0^T X_0) / n with X_0 the first token of every sequence; n counts tokens."""
    g = torch.Generator().manual_seed(5)
    batches = [
        torch.randn(3, 6, COLS, generator=g, dtype=torch.float64),
        torch.randn(6, COLS, generator=g, dtype=torch.float64),
    ]
    w = 0.5
    for hessian in (True, False):
        stats = InputStats(COLS, hessian=hessian, dtype=torch.float64, first_token_weight=w)
        for b in batches:
            stats.add(b)
        x = _stacked(batches)
        first = torch.cat([batches[0][:, 0], batches[1][:1]])  # (4, cols): a 2-D input is one sequence
        assert stats.n == x.shape[0] == 24
        expected = (x.T @ x + w * 6 * first.T @ first) / 24
        if hessian:
            torch.testing.assert_close(stats.hessian, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.sq_norms, torch.diagonal(expected), rtol=1e-12, atol=1e-12)
    plain = InputStats(COLS, hessian=True, dtype=torch.float64)
    plain.add(batches[0])
    weighted = InputStats(COLS, hessian=True, dtype=torch.float64, first_token_weight=w)
    weighted.add(batches[0])
    assert not torch.allclose(plain.hessian, weighted.hessian)


def test_first_token_weight_is_checked() -> None:
    with pytest.raises(ValueError, match="first_token_weight must be"):
        InputStats(COLS, hessian=True, first_token_weight=-1.0)
    with pytest.raises(ValueError, match="cross statistics"):
        InputStats(COLS, hessian=True, cross=True, first_token_weight=0.5)


def test_the_collector_weights_only_the_attention_input_layers() -> None:
    """A parallel-attention block (attention and MLP read one normed tensor): q/k/v share weighted
    statistics, the MLP's fc_in reading the same tensor keeps plain statistics of its own."""
    from torch import nn

    from oneshot.walker import InputCollector

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.v_proj, self.fc_in = (nn.Linear(COLS, 4, dtype=torch.float64) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q_proj(x).sum() + self.v_proj(x).sum() + self.fc_in(x).sum()

    block = Block()
    layers = dict(block.named_children())
    x = torch.randn(2, 5, COLS, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for weight in (0.0, 0.5):
        collector = InputCollector(layers, True, torch.device("cpu"), sink_weight=weight)
        with collector.hooks():
            collector.new_batch()
            block(x.float().double())
        st = collector.stats
        assert st["q_proj"] is st["v_proj"] and (st["fc_in"] is st["q_proj"]) == (weight == 0.0)
        flat = x.reshape(-1, COLS)
        plain = flat.T @ flat / 10
        torch.testing.assert_close(st["fc_in"].hessian.double(), plain, rtol=1e-5, atol=1e-5)
        first = x[:, 0]
        torch.testing.assert_close(
            st["q_proj"].hessian.double(), plain + weight * 5 * first.T @ first / 10, rtol=1e-5, atol=1e-5
        )
