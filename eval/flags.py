"""Flag rules of the long-tail report: which slices degrade significantly more than the aggregate.

Plain dicts and floats (no torch), so the report writer can use it without the evaluation code. The rule
(`flag_slices`) works on the NLL (log) scale, where "twice as much" does not drift with the sparsity level:
a slice is flagged when its mean per-token NLL increase exceeds ``factor`` times the aggregate's (0 when the
aggregate does not degrade) by more than noise: a one-sided z-test with both cluster-robust standard
errors, Holm-corrected over the slices tested (`holm`) at family-wise error `ALPHA`. `control_comparison`
sets a language slice against the English side of the same sentences. The test helpers (`normal_sf`,
`holm`) are shared with the task comparison (`oneshot.eval.task_compare`).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["ALPHA", "control_comparison", "flag_slices", "holm", "normal_sf"]


ALPHA = 0.05  # family-wise error rate of the slice flags (Holm over the slices tested)
MIN_BLOCKS = 4  # clusters of BLOCK_TOKENS tokens a slice needs before it is tested


def normal_sf(z: float) -> float:
    """P(Z >= z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def holm(p_values: dict[str, float], alpha: float = ALPHA) -> set[str]:
    """The names whose one-sided tests are rejected by Holm's step-down procedure at family-wise ``alpha``."""
    order = sorted(p_values, key=lambda k: (p_values[k], k))
    m = len(order)
    rejected: set[str] = set()
    for rank, name in enumerate(order):
        if p_values[name] > alpha / (m - rank):
            break
        rejected.add(name)
    return rejected


def excess_test(delta: float, se: float, base: float, base_se: float) -> tuple[float, float, float]:
    """One-sided test of ``delta > base`` for two independent estimates -> (excess, its SE, p-value).

    With a zero standard error the p-value is 0 for a positive excess and 1 otherwise."""
    excess = delta - base
    sd = math.sqrt(se * se + base_se * base_se)
    if sd == 0.0:
        return excess, 0.0, 0.0 if excess > 0 else 1.0
    return excess, sd, normal_sf(excess / sd)


def flag_slices(
    slices: list[dict[str, Any]],
    aggregate: dict[str, Any] | None,
    factor: float = 2.0,
    *,
    alpha: float = ALPHA,
    min_blocks: int = MIN_BLOCKS,
) -> list[str]:
    """Test every slice against the aggregate; set the test's fields on each slice dict; the flagged names.

    On the log scale: a slice degrades "``factor`` times as much" as the aggregate when its mean per-token
    NLL increase ``delta_nll`` is at least ``factor * max(aggregate delta_nll, 0)`` (with no aggregate
    increase, any increase counts). The one-sided z-test of ``delta_nll > factor * aggregate delta_nll``
    uses both cluster-robust standard errors (slice and aggregate taken as independent, which overstates
    the variance for slices that share tokens with the aggregate, i.e. errs towards not flagging); the
    slices' p-values are corrected with Holm's procedure (family-wise error ``alpha``). A slice with
    fewer than ``min_blocks`` clusters is "too small" and not tested.

    Fields set: ``ratio_to_aggregate`` (delta_nll / aggregate delta_nll when the latter is > 0),
    ``excess_nll`` and ``excess_se`` (delta_nll - factor * aggregate delta_nll, its SE), ``p_value``,
    ``status`` (flagged | not significant | too small) and ``flagged``.
    """
    agg_delta = (aggregate or {}).get("delta_nll")
    agg_se = (aggregate or {}).get("delta_nll_se") or 0.0
    degrading = agg_delta is not None and agg_delta > 0
    base = factor * float(agg_delta) if agg_delta is not None and degrading else 0.0
    base_se = factor * agg_se if degrading else 0.0
    p_values: dict[str, float] = {}
    for s in slices:
        s["ratio_to_aggregate"] = s["delta_nll"] / agg_delta if degrading and "delta_nll" in s else None
        s["flagged"] = False
        delta, se = s.get("delta_nll"), s.get("delta_nll_se")
        if delta is None or se is None or (s.get("blocks") or 0) < min_blocks:
            s.update(excess_nll=None, excess_se=None, p_value=None, status="too small")
            continue
        excess, sd, p = excess_test(delta, se, base, base_se)
        s.update(excess_nll=excess, excess_se=sd, p_value=p, status="not significant")
        p_values[s["name"]] = p
    flagged = holm(p_values, alpha)
    for s in slices:
        if s["name"] in flagged:
            s["flagged"], s["status"] = True, "flagged"
    return [s["name"] for s in slices if s["flagged"]]


def control_comparison(lang: dict[str, Any], control: dict[str, Any]) -> dict[str, Any] | None:
    """A language slice against its English control on the same sentences: the NLL increase beyond the
    control's (``excess_nll``, its SE, one-sided p-value of excess > 0) and the ratio of the increases."""
    d_l, se_l = lang.get("delta_nll"), lang.get("delta_nll_se")
    d_c, se_c = control.get("delta_nll"), control.get("delta_nll_se")
    if d_l is None or d_c is None:
        return None
    excess, sd, p = excess_test(d_l, se_l or 0.0, d_c, se_c or 0.0)
    return {
        "control": control.get("name"),
        "control_tokens": control.get("tokens"),
        "control_delta_nll": d_c,
        "control_delta_nll_se": se_c,
        "control_rel_degradation": control.get("rel_degradation"),
        "excess_nll": excess,
        "excess_se": sd,
        "p_value": p,
        "ratio": d_l / d_c if d_c > 0 else None,
    }
