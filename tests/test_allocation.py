"""Non-uniform sparsity: OWL, the loss-curve allocator against brute force, the sensitivity scan, and
`oneshot prune --allocation` / `oneshot sensitivity` end to end on a tiny model."""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from oneshot import PruneConfig, prune
from oneshot.allocation import (
    AllocationError,
    _knapsack,
    allocate,
    allocate_curves,
    exact_counts,
    interpolate,
    owl_dense_blocks,
    owl_sparsities,
)
from oneshot.cli import main
from oneshot.config import AllocationConfig, ConfigError
from oneshot.jobs.sensitivity import HTML_FILE, PLOT_FILE, TABLE_FILE, write_outputs
from oneshot.runfolder import RUN_FILE, RunRecord, SensitivityRecord
from oneshot.sensitivity import scan_sensitivity
from tests.conftest import tiny_llama_config

# ------------------------------------------------------------------------------------------------ OWL


@pytest.mark.parametrize("seed", range(5))
def test_owl_sparsities_average_exactly_to_the_target_within_the_bounds(seed: int) -> None:
    rng = random.Random(seed)
    blocks = rng.randint(2, 12)
    ratios = [rng.random() * 0.05 for _ in range(blocks)]
    params = [rng.choice([1000, 4096, 7777, 20000]) for _ in range(blocks)]  # unequal blocks: weighted mean
    target, lam = rng.choice([0.5, 0.6, 0.7]), rng.choice([0.02, 0.08, 0.2])
    s = owl_sparsities(ratios, params, target, lam)
    weighted = sum(p * x for p, x in zip(params, s, strict=True)) / sum(params)
    assert weighted == pytest.approx(target, abs=1e-12)
    assert all(target - lam - 1e-12 <= x <= target + lam + 1e-12 for x in s)
    order = sorted(range(blocks), key=lambda i: ratios[i])
    assert all(s[a] >= s[b] - 1e-12 for a, b in itertools.pairwise(order)), (
        "more outliers must mean fewer pruned"
    )
    counts = exact_counts(params, s, target)
    assert sum(counts) == round(target * sum(params))
    assert all(abs(k - n * x) <= 1.0 for k, n, x in zip(counts, params, s, strict=True))


def test_owl_follows_the_paper_for_equal_blocks() -> None:
    """Equal blocks: sparsity = s - (D' - mean D') with D' = (D - min) / (max - min) * 2 lambda (the paper's
    density D' - mean + (1 - s)); clipped to [s - lambda, s + lambda] and shifted back to the mean."""
    # no clipping needed: D' = 0, 0.1, 0.2
    assert owl_sparsities([0.01, 0.02, 0.03], [10, 10, 10], 0.6, 0.1) == pytest.approx([0.7, 0.6, 0.5])
    # D' = 0, 0.2/3, 0.2 -> 0.6889, 0.6222, 0.4889; the last is clipped to 0.5, the other two shift down
    # together by 1/180 so that the mean is 0.6 again
    got = owl_sparsities([0.01, 0.02, 0.04], [10, 10, 10], 0.6, 0.1)
    assert got == pytest.approx([41 / 60, 37 / 60, 0.5])


def test_owl_bounds_that_cannot_be_met_are_errors() -> None:
    with pytest.raises(AllocationError, match="too large"):
        owl_sparsities([0.1, 0.2], [1, 1], 0.95, 0.08)
    with pytest.raises(ConfigError, match="too large"):
        AllocationConfig(method="owl", owl_lambda=0.3).check_against(PruneConfig(sparsity=0.8))
    with pytest.raises(ConfigError, match="above what pattern 2:4 allows"):
        AllocationConfig(method="sensitivity", sparsity=0.6).check_against(PruneConfig(pattern="2:4"))


def test_owl_with_a_pattern_keeps_the_most_outlier_heavy_blocks_dense() -> None:
    dense = owl_dense_blocks([0.01, 0.05, 0.03, 0.02], [100, 100, 100, 100], 0.375, 0.5)
    assert dense == [1]  # 0.5 * 300 / 400 = 0.375: exactly one block can stay dense
    assert owl_dense_blocks([0.01, 0.05], [100, 100], 0.5, 0.5) == []


# ---------------------------------------------------------------------------------- loss-curve allocator


def _random_curves(
    rng: random.Random, layers: int, points: list[float], convex: bool
) -> list[list[tuple[float, float]]]:
    curves = []
    for _ in range(layers):
        if convex:
            scale = rng.uniform(0.5, 3.0)
            curves.append([(s, scale * s * s) for s in points])
        else:  # increasing, not convex
            losses = sorted(rng.uniform(0, 5) for _ in points)
            curves.append(list(zip(points, losses, strict=True)))
    return curves


def _grid_brute_force(curves, params, need, options):
    best = math.inf
    for combo in itertools.product(*options):
        if sum(round(n * s) for n, s in zip(params, combo, strict=True)) >= need:
            best = min(
                best, sum(interpolate([(0.0, 0.0), *c], s) for c, s in zip(curves, combo, strict=True))
            )
    return best


def _continuous_brute_force(curves, params, need):
    """The exact optimum over the interpolated curves: all matrices at breakpoints but at most one."""
    bps = [[0.0, *(s for s, _ in c)] for c in curves]
    full = [[(0.0, 0.0), *c] for c in curves]
    best = math.inf
    for free in range(len(curves)):
        others = [i for i in range(len(curves)) if i != free]
        for combo in itertools.product(*(bps[i] for i in others)):
            fixed = sum(params[i] * s for i, s in zip(others, combo, strict=True))
            s_free = (need - fixed) / params[free]
            if -1e-12 <= s_free <= bps[free][-1] + 1e-12:
                loss = sum(interpolate(full[i], s) for i, s in zip(others, combo, strict=True))
                best = min(best, loss + interpolate(full[free], min(max(s_free, 0.0), bps[free][-1])))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_dynamic_program_equals_brute_force_on_the_grid(seed: int) -> None:
    rng = random.Random(seed)
    points = [0.25, 0.5, 0.75]
    params = [40, 80, 120, 160][: rng.choice([3, 4])]
    curves = _random_curves(rng, len(params), points, convex=False)
    need = round(rng.choice([0.3, 0.5, 0.6]) * sum(params))
    options = [[0.0, *points] for _ in params]
    costs = [
        np.array([interpolate([(0.0, 0.0), *c], s) for s in o]) for c, o in zip(curves, options, strict=True)
    ]
    weights = [
        np.array([round(n * s) for s in o], dtype=np.int64) for n, o in zip(params, options, strict=True)
    ]
    picks = _knapsack(costs, weights, need)
    got = sum(float(c[p]) for c, p in zip(costs, picks, strict=True))
    assert sum(int(w[p]) for w, p in zip(weights, picks, strict=True)) >= need
    assert got == pytest.approx(_grid_brute_force(curves, params, need, options), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("convex", [True, False])
def test_the_allocator_is_exact_in_count_and_near_the_brute_force_optimum(seed: int, convex: bool) -> None:
    rng = random.Random(100 + seed)
    points = [0.25, 0.5, 0.75]
    params = [40, 80, 120]
    curves = _random_curves(rng, len(params), points, convex)
    target = rng.choice([0.3, 0.45, 0.55, 0.7])
    need = round(target * sum(params))
    result = allocate_curves(curves, params, target, grid=0.25)
    assert sum(result.counts) == need, "the achieved count must be the target exactly"
    assert all(0 <= k <= round(n * 0.75) for k, n in zip(result.counts, params, strict=True))
    optimum = _continuous_brute_force(curves, params, need)
    grid_best = _grid_brute_force(curves, params, need, [[0.0, *points]] * len(params))
    assert result.loss >= optimum - 1e-9
    assert result.loss <= grid_best + 1e-9, "no worse than the best grid choice"
    if convex:
        assert result.loss == pytest.approx(optimum, rel=1e-9, abs=1e-12)


def test_the_allocator_with_a_pattern_keeps_whole_matrices_dense() -> None:
    rng = random.Random(7)
    params = [64, 128, 256, 64, 512]
    curves = [[(0.5, rng.uniform(0.1, 4.0))] for _ in params]
    target = 0.35
    result = allocate_curves(curves, params, target, pattern_sparsity=0.5)
    assert set(result.sparsities) <= {0.0, 0.5}
    achieved = sum(result.counts) / sum(params)
    assert achieved >= target
    best = min(
        sum(c[0][1] for c, on in zip(curves, combo, strict=True) if on)
        for combo in itertools.product([0, 1], repeat=len(params))
        if sum(n // 2 for n, on in zip(params, combo, strict=True) if on) >= round(target * sum(params))
    )
    assert result.loss == pytest.approx(best)


def test_a_target_above_the_measured_curves_is_an_error() -> None:
    with pytest.raises(AllocationError, match="above what the measured curves allow"):
        allocate_curves([[(0.5, 1.0)], [(0.7, 1.0)]], [10, 10], 0.65)


# ---------------------------------------------------------------------------------- on a tiny model


@pytest.fixture()
def tiny() -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    calib = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    return model, calib


def test_the_scan_reuses_one_hessian_and_matches_a_uniform_prune(tiny, tmp_path: Path) -> None:
    model, calib = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = PruneConfig(method="sparsegpt", propagate="dense")
    rec = scan_sensitivity(model, calib, cfg, [0.7, 0.3, 0.5], progress=False)
    assert rec.sparsities == [0.3, 0.5, 0.7]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the scan changed the model"
    assert len(rec.layers) == 14 and len(rec.blocks) == 2
    for layer in rec.layers:
        assert all(a < b for a, b in itertools.pairwise(layer.losses)), layer
    for block in rec.blocks:
        assert all(a < b for a, b in itertools.pairwise(block.output_error)), block
    # a uniform prune on the dense block inputs (propagate=dense) reports the scan's loss for every layer
    for s in (0.3, 0.7):
        pruned = copy.deepcopy(model)
        report = prune(pruned, calib, cfg.replace(sparsity=s), progress=False)
        got = {x.name: x.loss for x in report.layers}
        for layer in rec.layers:
            assert layer.losses[rec.sparsities.index(s)] == pytest.approx(got[layer.name], rel=1e-5)
    write_outputs(rec, tmp_path)
    again = SensitivityRecord.load(tmp_path)
    assert again.sparsities == rec.sparsities and again.layers[3].losses == rec.layers[3].losses
    assert (tmp_path / TABLE_FILE).read_text().count("| `model.layers.") == 14
    assert (tmp_path / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / HTML_FILE).read_text()  # one self-contained page: the heat map and both tables
    assert page.count('src="data:image/png;base64,') == 1 and "<script" not in page
    assert page.count("<td>model.layers.") == 14 and page.count("<tr><td>1</td>") == 1
    assert "sensitivity.png" not in page
    # without matplotlib (the `eval` extra) the json and the table are still written, with a warning
    import oneshot.jobs.sensitivity as job

    def no_matplotlib(_record: object) -> bytes:
        raise ImportError("No module named 'matplotlib'")

    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(job, "heat_map", no_matplotlib)
        write_outputs(rec, bare)
    assert {p.name for p in bare.iterdir()} == {"sensitivity.json", TABLE_FILE, HTML_FILE}
    assert "<img" not in (bare / HTML_FILE).read_text()


@pytest.mark.parametrize("method", ["owl", "sensitivity"])
def test_allocate_then_prune_hits_the_target_exactly(tiny, method: str) -> None:
    model, calib = tiny
    cfg = PruneConfig(method="sparsegpt", sparsity=0.6)
    rec = allocate(model, calib, cfg, AllocationConfig(method=method), progress=False)
    assert len(rec.sparsities) == 14 and len(set(round(v, 3) for v in rec.sparsities.values())) > 1
    report = prune(model, calib, cfg, progress=False, layer_sparsity=rec.sparsities)
    assert report.zero_params == round(0.6 * report.pruned_params)
    for layer in report.layers:
        assert layer.sparsity == pytest.approx(rec.sparsities[layer.name], abs=1e-12)
    if method == "sensitivity":
        assert rec.predicted_loss is not None and rec.uniform_loss is not None
        assert rec.predicted_loss <= rec.uniform_loss


# ---------------------------------------------------------------------------------- CLI end to end


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _zeros(folder: Path) -> tuple[int, int, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    picked = {k: v for k, v in tensors.items() if k.endswith("proj.weight")}
    return sum(int((v == 0).sum()) for v in picked.values()), sum(v.numel() for v in picked.values()), picked


def _base(model: Path, calib: Path, data_dir: Path) -> list[str]:
    return [
        "--model", str(model), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32",
        "--data-dir", str(data_dir), "-q",
    ]  # fmt: skip


@pytest.mark.parametrize("allocation", ["owl", "sensitivity-file", "sensitivity"])
def test_prune_with_an_allocation_records_the_sparsities_and_meets_the_target(
    allocation: str, tmp_path: Path, tiny_llama_dir: Path, calib_txt: Path, data_dir: Path, capsys
) -> None:
    base = _base(tiny_llama_dir, calib_txt, data_dir)
    extra = ["--allocation", allocation.split("-")[0]]
    if allocation == "sensitivity-file":
        code, out, err = _cli(
            ["sensitivity", *base, "--sparsities", "0.4,0.6,0.8", "--out", str(tmp_path / "sens")], capsys
        )
        assert code == 0, err
        assert {p.name for p in (tmp_path / "sens").iterdir()} == {
            "sensitivity.json",
            TABLE_FILE,
            PLOT_FILE,
            HTML_FILE,
        }
        extra += ["--sensitivity-file", str(tmp_path / "sens" / "sensitivity.json")]
    out_dir = tmp_path / "run"
    code, out, err = _cli(
        ["prune", *base, "--sparsity", "0.6", "--eval-windows", "0", *extra, "--out", str(out_dir)], capsys
    )
    assert code == 0, err
    assert "allocation" in out
    record = RunRecord.load(out_dir)
    assert record.allocation is not None and record.allocation.config.method == allocation.split("-")[0]
    chosen = record.allocation.sparsities
    assert len(chosen) == 14 and max(chosen.values()) - min(chosen.values()) > 0.01
    zeros, total, tensors = _zeros(out_dir)
    assert abs(zeros - 0.6 * total) <= 1e-4 * total
    assert record.allocation.achieved == pytest.approx(zeros / total)
    for name, s in chosen.items():
        w = tensors[f"{name}.weight"]
        assert int((w == 0).sum()) == round(s * w.numel()), name
    assert "allocation" in (out_dir / "README.md").read_text()
    # the run's report shows the allocation: its settings and one row per decoder block
    report = (out_dir / "report" / "report.md").read_text()
    section = report[report.index("## Allocation: ") :]
    assert f"`--allocation {allocation.split('-')[0]}`" in section
    blocks = record.allocation.blocks
    assert len(blocks) == 2 and all(
        f"| {b['index']} | {b['params']:,} | {b['sparsity']:.4f} |" in section for b in blocks
    )
    assert "Allocation: " in (out_dir / "report" / "report.html").read_text()


def test_prune_with_a_pattern_moves_whole_matrices_to_dense(
    tmp_path: Path, tiny_llama_dir: Path, calib_txt: Path, data_dir: Path, capsys
) -> None:
    base = _base(tiny_llama_dir, calib_txt, data_dir)
    out_dir = tmp_path / "run"
    code, out, err = _cli(
        ["prune", *base, "--pattern", "2:4", "--sparsity", "0.4", "--allocation", "sensitivity",
         "--eval-windows", "0", "--out", str(out_dir)],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    record = RunRecord.load(out_dir)
    a = record.allocation
    assert a is not None and a.dense and "whole matrices only" in (a.note or "") and "allocation note" in out
    zeros, total, tensors = _zeros(out_dir)
    assert zeros / total >= 0.4 and zeros / total == pytest.approx(a.achieved)
    for name, s in a.sparsities.items():
        w = tensors[f"{name}.weight"]
        if s == 0.0:
            assert int((w == 0).sum()) == 0, name
        else:  # every group of 4 holds at least 2 zeros
            assert bool(((w.reshape(-1, 4) == 0).sum(dim=1) >= 2).all()), name


def test_records_without_an_allocation_still_load(tmp_path: Path) -> None:
    old = {
        "format": "oneshot-run/4",
        "config": {"method": "wanda"},
        "prune": {"layers": []},
        "run": {},
        "source": {"kind": "local"},
    }
    (tmp_path / RUN_FILE).write_text(json.dumps(old))
    record = RunRecord.load(tmp_path)
    assert record.allocation is None and record.config is not None and record.config.method == "wanda"
