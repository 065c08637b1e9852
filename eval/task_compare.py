"""Zero-shot tasks, dense vs pruned: which tasks lost accuracy beyond noise, and the task table.

Pure Python on `oneshot.runfolder.TaskRecord` (no torch, no lm-eval), so the report and the model card use
it without the evaluation code.

**Headline metric** (`headline_metric`): ``acc_norm`` where the task reports it (arc_easy, arc_challenge,
piqa, hellaswag, openbookqa), else ``acc`` (winogrande, boolq, rte, lambada_openai), the convention of the
Wanda and SparseGPT tables. The mean over tasks (the papers' "mean" column) is the mean of it; it is
reported, never used as a threshold.

**Flag rule** (`compare_tasks`), per task on the headline metric:

- the drop test: when both records hold per-document results on the same documents (same count, same
  ``docs_hash``), a paired one-sided McNemar test: under "no change" each discordant document (right in
  one model, wrong in the other) is equally likely to fall either way, so the p-value of a drop is the
  exact binomial tail P(X >= b), X ~ Bin(b + c, 1/2), with b = right in dense and wrong in pruned,
  c = the reverse (exact at every size: computed in log space, no normal approximation needed). The
  standard error is that of the mean per-document difference. Without per-document results (records
  written before them, a cached old baseline) or on different documents, an unpaired two-proportion
  z-test (pooled, one-sided), which ignores that the documents are shared and so errs towards not
  flagging; the row says which test ran and why;
- the drop p-values are Holm-corrected over all compared tasks at family-wise error ``alpha`` (0.05);
- the chance gate: the dense score must be above chance, one-sided binomial test of the dense count
  against the chance level (mean of 1 / choices over the documents; 0 for lambada) at ``alpha``.

Scores measured under other settings (task version, n-shot, document limit or count) are never compared:
the row is "not comparable", says which setting differs, and keeps only the pruned score.

A task is **flagged** when its Holm-corrected drop is significant and its dense score is above chance; a
task whose dense score is not above chance is "at chance" and never flagged (its accuracy carries no
signal to lose); otherwise "not significant". A task without the numbers a test needs is "not tested".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from oneshot.eval.flags import holm, normal_sf
from oneshot.runfolder import TaskDelta, TaskFlags, TaskRecord, from_dict, to_dict

__all__ = [
    "ALPHA",
    "KNOWN_CHANCE",
    "TaskScore",
    "TaskTable",
    "binomial_sf",
    "compare_tasks",
    "headline_metric",
    "mcnemar_drop",
    "task_comparison",
    "task_table",
    "two_proportion_drop",
]

ALPHA = 0.05  # family-wise error of the task flags (Holm) and level of the chance gate
HEADLINE_ORDER = ("acc_norm", "acc")
# chance level of the offline tasks' accuracy, for records written before `TaskRecord.chance`
KNOWN_CHANCE = {
    "arc_easy": 0.25,
    "arc_challenge": 0.25,
    "hellaswag": 0.25,
    "openbookqa": 0.25,
    "piqa": 0.5,
    "winogrande": 0.5,
    "boolq": 0.5,
    "rte": 0.5,
    "lambada_openai": 0.0,
}

TaskRecords = Mapping[str, TaskRecord | Mapping[str, Any]]


def headline_metric(*records: TaskRecord) -> str | None:
    """The metric a task is compared and averaged on: ``acc_norm`` where every record has it, else ``acc``
    (None when a record has neither). For lm-eval's tasks of the pruning papers that is acc_norm for
    arc_easy, arc_challenge, piqa, hellaswag and openbookqa, acc for winogrande, boolq, rte and
    lambada_openai, as the Wanda and SparseGPT tables report them."""
    for metric in HEADLINE_ORDER:
        if records and all(r.get(metric) is not None for r in records):
            return metric
    return None


# --------------------------------------------------------------------------------------------------------
# Tests


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact in float64 (terms summed in log space)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    lg_n = math.lgamma(n + 1)
    terms = [
        lg_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
        for i in range(k, n + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


@dataclass(frozen=True)
class PairedDrop:
    """McNemar's test of a drop on the same documents."""

    b: int  # right in dense, wrong in pruned
    c: int  # wrong in dense, right in pruned
    n: int
    delta: float  # (c - b) / n: pruned - dense
    se: float | None  # standard error of the mean per-document difference (None for n < 2)
    p_value: float  # one-sided: P(X >= b), X ~ Bin(b + c, 1/2)


def mcnemar_drop(dense: Sequence[int], pruned: Sequence[int]) -> PairedDrop:
    """One-sided exact McNemar test of "pruned is worse" on paired 0/1 outcomes (the same documents)."""
    if len(dense) != len(pruned):
        raise ValueError(f"paired outcomes of different lengths: {len(dense)} and {len(pruned)}")
    n = len(dense)
    b = sum(1 for d, p in zip(dense, pruned, strict=True) if d and not p)
    c = sum(1 for d, p in zip(dense, pruned, strict=True) if p and not d)
    delta = (c - b) / n if n else 0.0
    se = None
    if n >= 2:  # per-document differences are -1, 0, +1: sum of squares b + c
        var = max(0.0, ((b + c) - n * delta * delta) / (n - 1))
        se = math.sqrt(var / n)
    return PairedDrop(b, c, n, delta, se, binomial_sf(b, b + c, 0.5))


def two_proportion_drop(dense: float, n_dense: int, pruned: float, n_pruned: int) -> tuple[float, float]:
    """Unpaired one-sided z-test of ``pruned < dense`` (pooled proportion) -> (p-value, SE of the
    difference, unpooled)."""
    se = math.sqrt(dense * (1 - dense) / n_dense + pruned * (1 - pruned) / n_pruned)
    pooled = (dense * n_dense + pruned * n_pruned) / (n_dense + n_pruned)
    sd = math.sqrt(pooled * (1 - pooled) * (1 / n_dense + 1 / n_pruned))
    if sd == 0.0:
        return 1.0, se
    return normal_sf((dense - pruned) / sd), se


# --------------------------------------------------------------------------------------------------------
# The comparison


def _records(tasks: TaskRecords | None) -> dict[str, TaskRecord]:
    if not tasks:
        return {}
    wrapped = tasks.get("tasks")  # a {"tasks": {...}} wrapper
    inner = wrapped if isinstance(wrapped, Mapping) else tasks
    out: dict[str, TaskRecord] = {}
    for name, rec in (inner or {}).items():
        if isinstance(rec, TaskRecord):
            out[name] = rec
        elif isinstance(rec, Mapping):
            out[name] = from_dict(TaskRecord, dict(rec))
    return out


def _pairing_problem(dense: TaskRecord, pruned: TaskRecord, metric: str) -> str | None:
    """Why the two records cannot be compared document by document (None when they can)."""
    have_d, have_p = dense.outcomes(metric) is not None, pruned.outcomes(metric) is not None
    if not have_d and not have_p:
        return "no per-document results in either record"
    if not have_d:
        return "no per-document results in the dense record"
    if not have_p:
        return "no per-document results in the pruned record"
    if dense.n != pruned.n:
        return f"different documents ({dense.n} dense vs {pruned.n} pruned)"
    if dense.docs_hash is None or dense.docs_hash != pruned.docs_hash:
        return "different documents (their hashes differ)"
    return None


def _settings_mismatch(dense: TaskRecord, pruned: TaskRecord) -> str | None:
    """Why two task records were measured under other settings (task version, n-shot, document limit,
    document count), or None; a setting a record lacks (older records) is not compared."""
    reasons = []
    for what, d, p in (
        ("task version", dense.version, pruned.version),
        ("n-shot", dense.num_fewshot, pruned.num_fewshot),
        ("limit", dense.limit, pruned.limit),
        ("documents", dense.n, pruned.n),
    ):
        if d is not None and p is not None and d != p:
            reasons.append(f"{what} {p} vs {d} dense")
    return "; ".join(reasons) or None


def _chance(name: str, dense: TaskRecord, pruned: TaskRecord) -> float | None:
    for c in (dense.chance, pruned.chance):
        if c is not None:
            return c
    return KNOWN_CHANCE.get(name)


def _compare(name: str, pruned: TaskRecord, dense: TaskRecord) -> TaskDelta:
    metric = headline_metric(pruned, dense)
    row = TaskDelta(name=name, metric=metric, n=pruned.n, n_dense=dense.n, status="not tested")
    if metric is None:
        row.note = "no acc or acc_norm in both records"
        return row
    vd, vp = dense.get(metric), pruned.get(metric)
    why = _settings_mismatch(dense, pruned)
    if why is not None:  # never compare scores measured under other settings: say so instead
        row.pruned, row.status, row.note = vp, "not comparable", f"not comparable: {why}"
        return row
    row.dense, row.pruned = vd, vp
    row.delta = vp - vd if vd is not None and vp is not None else None
    row.chance = _chance(name, dense, pruned)
    problem = _pairing_problem(dense, pruned, metric)
    bits_d, bits_p = dense.outcomes(metric), pruned.outcomes(metric)
    if problem is None and bits_d is not None and bits_p is not None:
        test = mcnemar_drop(bits_d, bits_p)
        row.paired, row.test = True, "McNemar exact (paired)"
        row.discordant = [test.b, test.c]
        row.dense, row.pruned = sum(bits_d) / test.n, sum(bits_p) / test.n
        row.delta, row.se, row.p_value = test.delta, test.se, test.p_value
        k_dense, n_dense = sum(bits_d), test.n
    else:
        row.note = f"unpaired: {problem}"
        if vd is None or vp is None or not dense.n or not pruned.n:
            row.note += "; no document counts, nothing tested"
            return row
        row.test = "two-proportion z (unpaired)"
        row.p_value, row.se = two_proportion_drop(vd, dense.n, vp, pruned.n)
        k_dense, n_dense = round(vd * dense.n), dense.n
    if row.chance is not None:
        row.p_chance = binomial_sf(k_dense, n_dense, row.chance)
    else:
        row.note = "; ".join(x for x in (row.note, "chance level unknown: not checked") if x)
    return row


def compare_tasks(pruned: TaskRecords, dense: TaskRecords | None, *, alpha: float = ALPHA) -> TaskFlags:
    """Dense vs pruned on every task both have, with the flags of the module docstring's rule.

    ``pruned`` and ``dense``: task name -> `TaskRecord` (or its dict form, or a dict holding that under
    ``"tasks"``). Rows follow the order of ``pruned``."""
    p_recs, d_recs = _records(pruned), _records(dense)
    rows = [_compare(name, rec, d_recs[name]) for name, rec in p_recs.items() if name in d_recs]
    p_values = {r.name: r.p_value for r in rows if r.p_value is not None}
    rejected = holm(p_values, alpha)
    for r in rows:
        if r.p_value is None:
            continue
        if r.p_chance is not None and r.p_chance > alpha:
            r.status = "at chance"
        elif r.name in rejected and (r.delta or 0.0) < 0:
            r.status, r.flagged = "flagged", True
        else:
            r.status = "not significant"
    out = TaskFlags(tasks=rows, flagged=[r.name for r in rows if r.flagged], alpha=alpha)
    scored = [r for r in rows if r.dense is not None and r.pruned is not None]
    if scored:
        md = math.fsum(r.dense or 0.0 for r in scored) / len(scored)
        mp = math.fsum(r.pruned or 0.0 for r in scored) / len(scored)
        out.aggregate = {"dense": md, "pruned": mp, "delta": mp - md, "tasks": len(scored)}
    missing = sorted(set(p_recs) ^ set(d_recs))
    if not d_recs:
        out.note = "no dense task results to compare with"
    elif missing:
        out.note = f"tasks without both a dense and a pruned result are left out: {', '.join(missing)}"
    return out


def task_comparison(
    task_results: TaskRecords | None, baseline_task_results: TaskRecords | None, *, alpha: float = ALPHA
) -> dict[str, Any]:
    """`compare_tasks` on plain dicts, as a plain dict (the long-tail report's ``tasks``)."""
    result: dict[str, Any] = to_dict(compare_tasks(task_results or {}, baseline_task_results, alpha=alpha))
    return result


# --------------------------------------------------------------------------------------------------------
# The task table: every metric of every task, as lm-eval prints it, with the dense values beside


@dataclass
class TaskScore:
    """One row of the task table: one metric of one task."""

    task: str
    metric: str
    value: float | None
    stderr: float | None = None
    dense: float | None = None
    dense_stderr: float | None = None
    headline: bool = False  # the metric of the mean and of the comparison
    n: int | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    version: str | None = None


@dataclass
class TaskTable:
    """The tasks of one evaluation: every metric (`TaskScore`), the mean of the headline metric, the
    comparison with the dense model when there is one, and notes (local task copies, limits)."""

    baseline: str | None  # which dense results were used (None: none)
    lm_eval: str | None = None  # lm-eval's version
    scores: list[TaskScore] = field(default_factory=list)
    mean: dict[str, float | None] = field(default_factory=dict)  # pruned, dense, tasks
    comparison: TaskFlags | None = None
    notes: list[str] = field(default_factory=list)


def task_table(
    pruned: TaskRecords,
    dense: TaskRecords | None = None,
    baseline: str | None = None,
    *,
    lm_eval: str | None = None,
    alpha: float = ALPHA,
) -> TaskTable:
    """The task table of ``pruned`` (with ``dense`` beside it when given; ``baseline`` names those;
    ``lm_eval``: the lm-eval version that computed them)."""
    p_recs, d_recs = _records(pruned), _records(dense)
    table = TaskTable(baseline=baseline if d_recs else None, lm_eval=lm_eval)
    heads: dict[str, tuple[float, float | None]] = {}
    for name, rec in p_recs.items():
        d = d_recs.get(name)
        head = headline_metric(rec)
        for metric, value in rec.metrics.items():
            table.scores.append(
                TaskScore(
                    task=name,
                    metric=metric,
                    value=value,
                    stderr=rec.stderr(metric),
                    dense=d.get(metric) if d is not None else None,
                    dense_stderr=d.stderr(metric) if d is not None else None,
                    headline=metric == head,
                    n=rec.n,
                    num_fewshot=rec.num_fewshot,
                    limit=rec.limit,
                    version=rec.version,
                )
            )
        if head is not None:
            heads[name] = (rec.get(head) or 0.0, d.get(head) if d is not None else None)
        if rec.differences and (rec.source or "").startswith("local"):
            table.notes.append(f"{name} (local copy): {rec.differences}")
    if heads:
        dense_vals = [dv for _, dv in heads.values()]
        table.mean = {
            "pruned": math.fsum(pv for pv, _ in heads.values()) / len(heads),
            "dense": math.fsum(v for v in dense_vals if v is not None) / len(heads)
            if d_recs and all(v is not None for v in dense_vals)
            else None,
            "tasks": len(heads),
        }
    if d_recs:
        table.comparison = compare_tasks(p_recs, d_recs, alpha=alpha)
    limits = sorted({r.limit for r in p_recs.values() if r.limit})
    if limits:
        table.notes.insert(
            0, f"Limited to the first {', '.join(map(str, limits))} documents per task: a quick check."
        )
    return table
