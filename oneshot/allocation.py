"""Non-uniform sparsity: which weight matrix gets which sparsity under one global parameter budget.

Two allocators, both exact in the count of pruned weights (the parameter-weighted mean of the chosen
sparsities is the target, up to the rounding of one weight per matrix, and the per-matrix counts add up to
``round(target * weights)``):

- `owl_sparsities`: OWL, outlier-weighted layerwise sparsity (Yin et al., "Outlier Weighed Layerwise
  Sparsity (OWL)", 2023). Per decoder block the outlier ratio ``D`` is the fraction of Wanda scores
  ``|W_ij| * ||X_j||_2`` of all its matrices (pooled) above ``M`` x their mean. ``D`` is scaled to
  ``[0, 2 lambda]`` (min to max over the blocks), and block ``l`` gets sparsity ``s - (D'_l - mean D')``: more
  outliers, fewer weights pruned. The sparsities are clipped to ``[s - lambda, s + lambda]`` and shifted
  (bisection) until their parameter-weighted mean is exactly ``s`` again (the paper's plain mean is the
  same for blocks of equal size).
- `allocate_curves`: per matrix a reconstruction-loss curve measured at a few sparsities (`oneshot
  sensitivity`), linearly interpolated (0 at sparsity 0), never extrapolated past the largest measured
  sparsity. A dynamic program over the matrices on a grid of sparsities (1 % by default, plus the measured
  points) finds the least summed loss whose pruned weights reach the budget; the few weights it overshoots
  (or, where the budget had to be coarsened, misses) are then moved along the interpolated curves where
  they cost least, so the count is exact.

With an N:M pattern a matrix is either N:M or dense: `owl_dense_blocks` keeps the blocks with the most
outliers dense, `allocate_curves` with the two options {0, N/M} per matrix chooses by the knapsack; the
achieved sparsity is then the nearest one at or above the target that whole matrices allow.

`allocate` runs the statistics (`oneshot.sensitivity`) on a model and returns the `AllocationRecord` whose
``sparsities`` go to `oneshot.prune(..., layer_sparsity=...)`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from oneshot.checks import prunable_layers
from oneshot.config import AllocationConfig, PruneConfig
from oneshot.errors import OneshotError
from oneshot.runfolder import AllocationRecord, SensitivityRecord
from oneshot.sensitivity import owl_statistics, scan_sensitivity

__all__ = [
    "AllocationError",
    "CurveAllocation",
    "allocate",
    "allocate_curves",
    "check_sensitivity",
    "exact_counts",
    "interpolate",
    "on_the_fly_sparsities",
    "owl_dense_blocks",
    "owl_sparsities",
]

logger = logging.getLogger(__name__)

_MAX_UNITS = 20_000  # budget resolution of the dynamic program (states per matrix)


class AllocationError(OneshotError, ValueError):
    """An allocation that cannot be met (a target above what the bounds or the measured curves allow)."""


# --------------------------------------------------------------------------------------------------------
# OWL


def owl_sparsities(ratios: Sequence[float], params: Sequence[int], target: float, lam: float) -> list[float]:
    """OWL sparsity of every block from its outlier ratio ``ratios[l]`` and its weights ``params[l]``.

    Sparsities lie in ``[max(0, target - lam), target + lam]`` and their ``params``-weighted mean is
    ``target`` (to float precision). `AllocationError` when ``target + lam >= 1``.
    """
    if len(ratios) != len(params) or not ratios:
        raise ValueError("owl_sparsities needs one outlier ratio and one weight count per block")
    if not 0.0 <= target < 1.0 or lam < 0:
        raise AllocationError(f"target sparsity must be in [0, 1) and lambda >= 0, got {target}, {lam}")
    if target + lam >= 1.0:
        raise AllocationError(
            f"--owl-lambda {lam:g} is too large for sparsity {target:g}: blocks would reach {target + lam:g} >= 1"
        )
    d = np.asarray(ratios, dtype=np.float64)  # (blocks,)
    w = np.asarray(params, dtype=np.float64)
    w = w / w.sum()
    spread = d.max() - d.min()
    scaled = (d - d.min()) / spread * 2 * lam if spread > 0 else np.zeros_like(d)  # in [0, 2 lam]
    raw = target - (scaled - scaled.mean())  # more outliers -> lower sparsity
    lo, hi = max(0.0, target - lam), target + lam

    def mean_at(shift: float) -> float:
        return float((w * np.clip(raw + shift, lo, hi)).sum())

    a, b = lo - raw.max(), hi - raw.min()  # mean_at(a) = lo <= target <= hi = mean_at(b)
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mean_at(mid) < target:
            a = mid
        else:
            b = mid
    return [float(x) for x in np.clip(raw + 0.5 * (a + b), lo, hi)]


def owl_dense_blocks(
    ratios: Sequence[float], params: Sequence[int], target: float, nm_sparsity: float
) -> list[int]:
    """Under an N:M pattern (sparsity ``nm_sparsity``), the blocks OWL keeps dense: the most outlier-heavy
    first, every one whose removal from the pruned set still leaves at least ``target`` overall."""
    if target > nm_sparsity + 1e-12:
        raise AllocationError(f"target sparsity {target:g} is above the pattern's {nm_sparsity:g}")
    total = sum(params)
    pruned = total
    dense: list[int] = []
    for i in sorted(range(len(ratios)), key=lambda j: (-ratios[j], j)):
        if nm_sparsity * (pruned - params[i]) >= target * total - 1e-9:
            dense.append(i)
            pruned -= params[i]
    return sorted(dense)


def exact_counts(params: Sequence[int], sparsities: Sequence[float], target: float) -> list[int]:
    """Pruned weights per matrix, near ``params[i] * sparsities[i]`` (cumulative rounding), adding up to
    exactly ``round(target * sum(params))`` (the few weights of difference go to the largest matrices)."""
    total = sum(params)
    want = round(target * total)
    counts: list[int] = []
    cum = 0.0
    done = 0
    for n, s in zip(params, sparsities, strict=True):
        cum += n * s
        k = min(max(round(cum) - done, 0), n)
        counts.append(k)
        done += k
    residual = want - done
    for i in sorted(range(len(params)), key=lambda j: -params[j]):
        if residual == 0:
            break
        step = min(residual, params[i] - counts[i]) if residual > 0 else max(residual, -counts[i])
        counts[i] += step
        residual -= step
    if residual:
        raise AllocationError(f"cannot prune {want} of {total} weights")
    return counts


# --------------------------------------------------------------------------------------------------------
# Loss curves


def interpolate(curve: Sequence[tuple[float, float]], s: float) -> float:
    """The loss at sparsity ``s`` on a measured curve [(sparsity, loss), ...] (linear between the points)."""
    xs = [p[0] for p in curve]
    ys = [p[1] for p in curve]
    if s > xs[-1] + 1e-12 or s < xs[0] - 1e-12:
        raise ValueError(f"sparsity {s} outside the measured range [{xs[0]}, {xs[-1]}]")
    return float(np.interp(s, xs, ys))


def _loss_at(curve: Sequence[tuple[float, float]], k: int, n: int) -> float:
    """The interpolated loss of ``k`` of ``n`` weights pruned (``round(n * s)`` may pass the last measured
    sparsity ``s`` by half a weight: that counts as ``s``)."""
    return interpolate(curve, min(k / n, curve[-1][0]))


def _clean_curve(curve: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    points = {0.0: 0.0}
    for s, loss in curve:
        if not (math.isfinite(s) and math.isfinite(loss)):
            raise AllocationError(f"a loss curve holds a non-finite point ({s}, {loss})")
        points[round(float(s), 12)] = float(loss)
    return sorted(points.items())


@dataclass
class CurveAllocation:
    """The result of `allocate_curves`: pruned weights per matrix, their sparsities, the summed loss."""

    counts: list[int]
    sparsities: list[float]
    loss: float


def _knapsack(costs: list[np.ndarray], weights: list[np.ndarray], need: int) -> list[int]:
    """Index of one option per item, least summed cost with summed weight >= ``need`` (a dynamic program
    over the budget; exact when the budget fits ``_MAX_UNITS`` states after dividing by the common factor,
    else the weights are rounded down and the budget up, which never under-shoots)."""
    g = need
    for w in weights:
        g = math.gcd(g, *(int(x) for x in w))
    unit = max(g, 1, -(-need // _MAX_UNITS))
    units = [w // unit for w in weights]  # rounded down
    top = -(-need // unit)
    top = min(top, sum(int(u.max()) for u in units))  # coarse units may make the exact budget unreachable
    dp = np.full(top + 1, np.inf)
    dp[0] = 0.0
    choice = np.zeros((len(costs), top + 1), dtype=np.int32)
    came = np.zeros((len(costs), top + 1), dtype=np.int64)
    states = np.arange(top + 1)
    for i, (cost, wu) in enumerate(zip(costs, units, strict=True)):
        new = np.full(top + 1, np.inf)
        arg = np.zeros(top + 1, dtype=np.int32)
        src = np.zeros(top + 1, dtype=np.int64)
        for j, (c, w) in enumerate(zip(cost, wu, strict=True)):
            cand = dp + c
            dest = np.minimum(states + int(w), top)
            better = cand < new[dest]
            if int(w) == 0:
                new[better], arg[better], src[better] = cand[better], j, states[better]
                continue
            # states below top - w map one to one; all above collapse onto top
            k = max(0, top - int(w))
            head = better[:k]
            new[dest[:k][head]] = cand[:k][head]
            arg[dest[:k][head]] = j
            src[dest[:k][head]] = states[:k][head]
            tail = cand[k:]
            if tail.size:
                b = int(np.argmin(tail))
                if tail[b] < new[top]:
                    new[top], arg[top], src[top] = tail[b], j, k + b
        dp = new
        choice[i], came[i] = arg, src
    if not np.isfinite(dp[top]):
        raise AllocationError("no choice of the measured sparsities reaches the budget")
    picks = [0] * len(costs)
    t = top
    for i in range(len(costs) - 1, -1, -1):
        picks[i] = int(choice[i, t])
        t = int(came[i, t])
    return picks


def allocate_curves(
    curves: Sequence[Sequence[tuple[float, float]]],
    params: Sequence[int],
    target: float,
    *,
    grid: float = 0.01,
    pattern_sparsity: float | None = None,
) -> CurveAllocation:
    """Per-matrix sparsities of least summed interpolated loss with exactly ``round(target * sum(params))``
    weights pruned (unstructured), or, with ``pattern_sparsity`` (N/M), the matrices to keep at N:M (the
    others dense, sparsity 0) whose pruned weights reach the target.

    ``curves[i]``: measured (sparsity, loss) points of matrix ``i`` (0 at sparsity 0 is added); a matrix is
    never given more than its largest measured sparsity. `AllocationError` when the target is above what
    the curves allow.
    """
    if len(curves) != len(params) or not curves:
        raise ValueError("allocate_curves needs one curve and one weight count per matrix")
    if not 0.0 <= target < 1.0:
        raise AllocationError(f"target sparsity must be in [0, 1), got {target}")
    total = sum(params)
    need = round(target * total)
    clean = [_clean_curve(c) for c in curves]
    if pattern_sparsity is not None:
        options = [[0.0, pattern_sparsity] for _ in clean]
        for c in clean:
            if all(abs(s - pattern_sparsity) > 1e-9 for s, _ in c):
                raise AllocationError(
                    f"a loss curve was not measured at the pattern's sparsity {pattern_sparsity:g}"
                )
    else:
        options = []
        for c in clean:
            top = c[-1][0]
            steps = math.floor(top / grid + 1e-9)
            opts = {round(i * grid, 12) for i in range(steps + 1)} | {s for s, _ in c}
            options.append(sorted(opts))
    capacity = sum(round(n * max(o)) for n, o in zip(params, options, strict=True))
    if capacity < need:
        raise AllocationError(
            f"target sparsity {target:g} is above what the measured curves allow ({capacity / total:.4f}: "
            "every matrix at its largest measured sparsity); measure higher sparsities"
        )
    costs = [np.array([interpolate(c, s) for s in o]) for c, o in zip(clean, options, strict=True)]
    weights = [
        np.array([round(n * s) for s in o], dtype=np.int64) for n, o in zip(params, options, strict=True)
    ]
    picks = _knapsack(costs, weights, need)
    counts = [int(w[p]) for w, p in zip(weights, picks, strict=True)]
    if pattern_sparsity is None:
        counts = _exchange(clean, params, _fix_count(clean, params, counts, need))
    sparsities = [k / n for k, n in zip(counts, params, strict=True)]
    loss = sum(_loss_at(c, k, n) for c, k, n in zip(clean, counts, params, strict=True))
    return CurveAllocation(counts, sparsities, loss)


def _fix_count(
    curves: list[list[tuple[float, float]]], params: Sequence[int], counts: list[int], need: int
) -> list[int]:
    """Move the pruned-weight counts along the interpolated curves until they add up to ``need``: removing
    where a weight saves the most loss, adding where it costs the least (segment by segment)."""
    counts = list(counts)
    bps = [sorted({round(n * s) for s, _ in c}) for c, n in zip(curves, params, strict=True)]

    def loss(i: int, k: int) -> float:
        return _loss_at(curves[i], k, params[i])

    residual = need - sum(counts)
    while residual != 0:
        best, best_slope, best_room = -1, 0.0, 0
        for i, k in enumerate(counts):
            if residual < 0:
                lower = [b for b in bps[i] if b < k]
                if not lower:
                    continue
                room = k - lower[-1]
                slope = (loss(i, k) - loss(i, lower[-1])) / room
                if best < 0 or slope > best_slope:
                    best, best_slope, best_room = i, slope, room
            else:
                upper = [b for b in bps[i] if b > k]
                if not upper:
                    continue
                room = upper[0] - k
                slope = (loss(i, upper[0]) - loss(i, k)) / room
                if best < 0 or slope < best_slope:
                    best, best_slope, best_room = i, slope, room
        if best < 0:
            raise AllocationError("the measured curves cannot meet the exact budget")
        step = min(abs(residual), best_room)
        counts[best] += step if residual > 0 else -step
        residual = need - sum(counts)
    return counts


def _slopes(
    curve: list[tuple[float, float]], bps: list[int], n: int, k: int
) -> tuple[float | None, int, float | None, int]:
    """(loss per weight removed, weights to the breakpoint below, loss per weight added, weights to the one
    above) at ``k`` of ``n`` pruned; None where there is no segment."""
    lower = [b for b in bps if b < k]
    upper = [b for b in bps if b > k]
    here = _loss_at(curve, k, n)
    down = (here - _loss_at(curve, lower[-1], n)) / (k - lower[-1]) if lower else None
    up = (_loss_at(curve, upper[0], n) - here) / (upper[0] - k) if upper else None
    return down, (k - lower[-1]) if lower else 0, up, (upper[0] - k) if upper else 0


def _exchange(curves: list[list[tuple[float, float]]], params: Sequence[int], counts: list[int]) -> list[int]:
    """Greedy exchange at a fixed total: move pruned weights from the matrix where one saves the most loss
    to the one where one costs the least, segment by segment, while that lowers the summed loss (the
    optimum for convex curves; never worse otherwise)."""
    counts = list(counts)
    bps = [sorted({round(n * s) for s, _ in c}) for c, n in zip(curves, params, strict=True)]
    for _ in range(100 * sum(len(b) for b in bps)):
        slopes = [_slopes(c, b, n, k) for c, b, n, k in zip(curves, bps, params, counts, strict=True)]
        downs = sorted(((sl[0], i) for i, sl in enumerate(slopes) if sl[0] is not None), reverse=True)
        ups = sorted((sl[2], i) for i, sl in enumerate(slopes) if sl[2] is not None)
        pair = None
        for d, i in downs[:2]:
            for u, j in ups[:2]:
                if i != j and d - u > 1e-12 * max(1.0, abs(d)) and (pair is None or d - u > pair[0]):
                    pair = (d - u, i, j)
        if pair is None:
            break
        _, i, j = pair
        step = min(slopes[i][1], slopes[j][3])
        counts[i] -= step
        counts[j] += step
    return counts


def on_the_fly_sparsities(target: float) -> list[float]:
    """The sparsities measured when ``--allocation sensitivity`` has no ``--sensitivity-file``: the target
    and 0.1, 0.2 either side, within [0.05, 0.95]."""
    return sorted({round(min(0.95, max(0.05, target + d)), 4) for d in (-0.2, -0.1, 0.0, 0.1, 0.2)})


# --------------------------------------------------------------------------------------------------------
# On a model


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.no_grad()
def allocate(
    model: nn.Module,
    calibration: torch.Tensor,
    config: PruneConfig,
    allocation: AllocationConfig,
    *,
    sensitivity: SensitivityRecord | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    progress: bool = True,
) -> AllocationRecord:
    """The per-matrix sparsities of ``allocation`` for ``model`` (not modified).

    ``owl``: one pass over the blocks on the DENSE model (each block calibrated on the dense outputs of the
    block before; Wanda statistics only, no Hessian): about one calibration forward of the model, on top of
    the pruning walk. ``sensitivity``: the curves of ``sensitivity`` (a `oneshot sensitivity` record), or
    measured now (`oneshot.sensitivity.scan_sensitivity` at `on_the_fly_sparsities`, or N/M for a pattern).
    """
    allocation.check_against(config)
    target = allocation.target(config)
    nm = config.nm
    nm_sparsity = nm[0] / nm[1] if nm is not None else None
    rec = AllocationRecord(config=allocation, target=target)
    t0 = time.perf_counter()
    if allocation.method == "uniform":
        raise AllocationError(
            "allocate() is for --allocation owl or sensitivity; uniform needs no allocation"
        )
    if allocation.method == "owl":
        stats = owl_statistics(
            model,
            calibration,
            config,
            m=allocation.owl_m,
            device=device,
            batch_size=batch_size,
            progress=progress,
        )
        ratios = [b.outlier_ratio for b in stats]
        bparams = [b.params for b in stats]
        if nm_sparsity is not None:
            dense = set(owl_dense_blocks(ratios, bparams, target, nm_sparsity))
            block_sparsity = [0.0 if i in dense else nm_sparsity for i in range(len(stats))]
        else:
            block_sparsity = owl_sparsities(ratios, bparams, target, allocation.owl_lambda)
        names = [n for b in stats for n in b.names]
        params = [p for b in stats for p in b.layer_params]
        per_layer = [block_sparsity[i] for i, b in enumerate(stats) for _ in b.names]
        for b, s in zip(stats, block_sparsity, strict=True):
            rec.blocks.append(
                {"index": b.index, "params": b.params, "sparsity": s, "outlier_ratio": b.outlier_ratio}
            )
        rec.source = "owl statistics pass (dense model, Wanda scores)"
    else:
        if sensitivity is None:
            sparsities = [nm_sparsity] if nm_sparsity is not None else on_the_fly_sparsities(target)
            sensitivity = scan_sensitivity(
                model,
                calibration,
                config,
                sparsities,
                device=device,
                batch_size=batch_size,
                progress=progress,
            )
            rec.source = f"measured before pruning at {', '.join(f'{s:g}' for s in sparsities)}"
        elif allocation.sensitivity_file:
            path = Path(allocation.sensitivity_file)
            rec.source = str(path)
            file = path / "sensitivity.json" if path.is_dir() else path
            rec.source_sha256 = _file_sha256(file) if file.is_file() else None
        wanted = prunable_layers(model, config.ignore)
        check_sensitivity(sensitivity, config, list(wanted))
        names, params, curves = [], [], []
        for layer in (x for x in sensitivity.layers if x.name in wanted):
            names.append(layer.name)
            params.append(layer.shape[0] * layer.shape[1])
            curve = sensitivity.curve(layer.name)
            # no calibration tokens: fixed at the target (magnitude-pruned by the walk)
            fixed = nm_sparsity if nm_sparsity is not None else target
            curves.append(curve if curve is not None else [(fixed, 0.0)])
        result = allocate_curves(curves, params, target, pattern_sparsity=nm_sparsity)
        per_layer = result.sparsities
        rec.predicted_loss = result.loss
        if nm_sparsity is None:
            uniform_ok = all(c[-1][0] >= target - 1e-12 for c in (_clean_curve(c) for c in curves))
            rec.uniform_loss = (
                sum(interpolate(_clean_curve(c), target) for c in curves) if uniform_ok else None
            )
        else:
            rec.uniform_loss = sum(interpolate(_clean_curve(c), nm_sparsity) for c in curves)
        blocks: dict[int, list[int]] = {}
        for layer, n, s in zip(
            (x for x in sensitivity.layers if x.name in wanted), params, per_layer, strict=True
        ):
            blocks.setdefault(layer.block, [0, 0])
            blocks[layer.block][0] += n
            blocks[layer.block][1] += round(n * s)
        rec.blocks = [
            {"index": i, "params": p, "sparsity": z / p if p else 0.0} for i, (p, z) in sorted(blocks.items())
        ]
    if nm_sparsity is None:
        counts = exact_counts(params, per_layer, target)
        rec.sparsities = {n: k / p for n, k, p in zip(names, counts, params, strict=True)}
    else:
        rec.sparsities = dict(zip(names, per_layer, strict=True))
        rec.dense = [n for n, s in zip(names, per_layer, strict=True) if s == 0.0]
    rec.params = sum(params)
    rec.zeros = sum(round(p * rec.sparsities[n]) for n, p in zip(names, params, strict=True))
    rec.seconds = time.perf_counter() - t0
    if nm_sparsity is not None:
        rec.note = (
            f"pattern {config.pattern}: a matrix is {config.pattern} or dense; {len(rec.dense)} kept dense, "
            f"overall {rec.zeros / max(1, rec.params):.4f} (target {target:g}; whole matrices only)"
        )
    return rec


def check_sensitivity(
    record: SensitivityRecord,
    config: PruneConfig,
    layers: Sequence[str] | None = None,
    target: float | None = None,
) -> None:
    """A sensitivity record fits this pruning: the same method and pattern, (``layers``: the names of the
    matrices the run would prune) the same matrices, and (``target``, unstructured) measured far enough to
    reach the target. `AllocationError` naming what differs."""
    if record.config.sink_weight != config.sink_weight:
        logger.warning(
            "the sensitivity file was measured with --sink-weight %g, this run prunes with %g: the curves are "
            "used as they are",
            record.config.sink_weight or 0.0,
            config.sink_weight or 0.0,
        )
    if record.config.method != config.method or record.config.pattern != config.pattern:
        raise AllocationError(
            f"the sensitivity file was measured with {record.config.method} {record.config.pattern}, this run "
            f"prunes with {config.method} {config.pattern}: measure again with the same --method and --pattern"
        )
    if target is not None and config.nm is None and record.layers:
        top = max(record.sparsities)
        if target > top + 1e-12:
            raise AllocationError(
                f"target sparsity {target:g} is above the largest sparsity the sensitivity file measured ({top:g}): "
                "measure higher sparsities (oneshot sensitivity --sparsities ...)"
            )
    if layers is not None:
        have = {layer.name for layer in record.layers}
        missing = [n for n in layers if n not in have]
        if missing:
            raise AllocationError(
                f"the sensitivity file has no curve for {missing[0]} ({len(missing)} matrices like it): it was "
                "measured on another model or with other --ignore patterns"
            )
