"""Flag rules: which slices and tasks degrade much more than the aggregate after pruning.

This module owns the flag rule and the dense-vs-pruned task comparison; it works on plain dicts (no
torch), so the report writer can use it without the evaluation code. A slice is **flagged** when
``rel_degradation >= factor * aggregate rel_degradation`` and the aggregate degradation is positive
(with no aggregate degradation nothing is flagged). Task accuracies are compared the same way: relative
accuracy drop ``1 - acc_pruned / acc_dense`` against the drop of the mean accuracy.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["flag_slices", "task_deltas"]


def flag_slices(slices: list[dict[str, Any]], aggregate_rel: float | None, factor: float = 2.0) -> list[str]:
    """Set ``flagged`` and ``ratio_to_aggregate`` on every slice dict; return the flagged names.

    A slice is flagged when ``rel_degradation >= factor * aggregate_rel`` and ``aggregate_rel > 0``.
    """
    flagged = []
    for s in slices:
        rel = s.get("rel_degradation")
        if aggregate_rel is None or aggregate_rel <= 0 or rel is None:
            s["ratio_to_aggregate"], s["flagged"] = None, False
            continue
        s["ratio_to_aggregate"] = rel / aggregate_rel
        s["flagged"] = bool(rel >= factor * aggregate_rel)
        if s["flagged"]:
            flagged.append(s["name"])
    return flagged


def _task_table(results: dict[str, Any] | None) -> dict[str, Any]:
    if not results:
        return {}
    inner = results.get("tasks") if isinstance(results.get("tasks"), dict) else results
    return {k: v for k, v in (inner or {}).items() if isinstance(v, dict) and v.get("acc") is not None}


def task_deltas(
    task_results: dict[str, Any] | None, baseline_task_results: dict[str, Any] | None, factor: float = 2.0
) -> dict[str, Any]:
    """Per-task accuracy of dense (baseline) vs pruned, with flags.

    Both arguments: ``{task: {"acc": f, "acc_stderr": f, "acc_norm": f|None, "n": i, ...}}`` (or a dict
    holding that under ``"tasks"``). ``delta = acc_pruned - acc_dense``;
    ``rel_degradation = 1 - acc_pruned / acc_dense`` (the relative accuracy drop). The aggregate is the
    same on the mean accuracy over the common tasks; a task is flagged when its drop is at least
    ``factor`` times the aggregate drop and that drop is positive.
    """
    pruned, dense = _task_table(task_results), _task_table(baseline_task_results)
    common = [t for t in sorted(pruned) if t in dense]
    rows: list[dict[str, Any]] = []
    for t in common:
        p, d = pruned[t], dense[t]
        ap, ad = float(p["acc"]), float(d["acc"])
        row: dict[str, Any] = {
            "name": t,
            "acc_dense": ad,
            "acc_pruned": ap,
            "delta": ap - ad,
            "rel_degradation": (1.0 - ap / ad) if ad > 0 else None,
            "n": p.get("n"),
        }
        sp, sd = p.get("acc_stderr"), d.get("acc_stderr")
        row["delta_stderr"] = (
            math.sqrt(float(sp) ** 2 + float(sd) ** 2) if sp is not None and sd is not None else None
        )
        if p.get("acc_norm") is not None and d.get("acc_norm") is not None:
            row["acc_norm_dense"], row["acc_norm_pruned"] = float(d["acc_norm"]), float(p["acc_norm"])
            row["delta_norm"] = row["acc_norm_pruned"] - row["acc_norm_dense"]
        rows.append(row)
    out: dict[str, Any] = {"tasks": rows, "aggregate": None, "flagged": []}
    if rows:
        md = sum(r["acc_dense"] for r in rows) / len(rows)
        mp = sum(r["acc_pruned"] for r in rows) / len(rows)
        agg = (1.0 - mp / md) if md > 0 else None
        out["aggregate"] = {"acc_dense": md, "acc_pruned": mp, "delta": mp - md, "rel_degradation": agg}
        out["flagged"] = flag_slices(rows, agg, factor)
    missing = sorted(set(pruned) ^ set(dense))
    if missing:
        out["note"] = f"tasks without both a dense and a pruned result are left out: {', '.join(missing)}"
    return out
