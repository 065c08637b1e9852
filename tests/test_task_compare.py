"""The dense-vs-pruned task comparison: exact tests checked against direct computations, and the flag rule
on synthetic models of known significance (noise, a planted drop, a task at chance)."""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction
from pathlib import Path

import pytest

from oneshot.eval.task_compare import (
    binomial_sf,
    compare_tasks,
    headline_metric,
    mcnemar_drop,
    task_comparison,
    task_table,
    two_proportion_drop,
)
from oneshot.runfolder import EvalRecord, TaskRecord, pack_bits, unpack_bits

N = 400


def exact_sf(k: int, n: int, p: Fraction) -> float:
    """P(X >= k), X ~ Bin(n, p), in exact rational arithmetic."""
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(max(k, 0), n + 1)))


def record(
    bits: list[int], chance: float = 0.25, metric: str = "acc_norm", docs: str = "docs-a"
) -> TaskRecord:
    """A task record with per-document outcomes of ``metric`` (``acc`` too, for acc_norm tasks)."""
    value = sum(bits) / len(bits)
    extra = {"acc": value, "acc_stderr": 0.02, metric: value, f"{metric}_stderr": 0.02}
    correct = {m: pack_bits(bits) for m in {"acc", metric}}
    return TaskRecord(
        n=len(bits), source="local:x", chance=chance, correct=correct, docs_hash=docs, extra=extra
    )


def dense_bits(rng: random.Random, acc: float, n: int = N) -> list[int]:
    right = round(acc * n)
    bits = [1] * right + [0] * (n - right)
    rng.shuffle(bits)
    return bits


def noisy(rng: random.Random, bits: list[int], flips: int) -> list[int]:
    """``bits`` with ``flips`` documents changed, each one way or the other by a fair coin (no true change:
    the null hypothesis of McNemar's test)."""
    out = list(bits)
    right = [i for i, b in enumerate(out) if b]
    wrong = [i for i, b in enumerate(out) if not b]
    rng.shuffle(right), rng.shuffle(wrong)
    for _ in range(flips):
        pool = right if rng.random() < 0.5 else wrong
        if pool:
            i = pool.pop()
            out[i] = 1 - out[i]
    return out


def planted_drop(rng: random.Random, bits: list[int], fraction: float) -> list[int]:
    """``bits`` with ``fraction`` of the correct documents turned wrong."""
    out = list(bits)
    right = [i for i, b in enumerate(out) if b]
    for i in rng.sample(right, round(fraction * len(right))):
        out[i] = 0
    return out


# --- the tests themselves ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "n", "p"),
    [
        *[(0, 10, "1/2"), (7, 10, "1/2"), (10, 10, "1/2"), (11, 10, "1/2"), (30, 100, "1/4")],
        *[(104, 400, "1/4"), (260, 400, "3/5"), (3, 50, "1/50"), (1, 1, "1/2"), (45, 60, "1/2")],
    ],
)
def test_binomial_sf_is_exact(k: int, n: int, p: str) -> None:
    assert binomial_sf(k, n, float(Fraction(p))) == pytest.approx(exact_sf(k, n, Fraction(p)), rel=1e-9)


def test_binomial_sf_edges_and_scipy() -> None:
    assert binomial_sf(0, 5, 0.0) == 1.0 and binomial_sf(1, 5, 0.0) == 0.0 and binomial_sf(5, 5, 1.0) == 1.0
    assert binomial_sf(6, 5, 0.5) == 0.0
    assert binomial_sf(5000, 10042, 0.25) < 1e-300 or binomial_sf(5000, 10042, 0.25) == 0.0  # no overflow
    stats = pytest.importorskip("scipy.stats")
    for k, n, p in [(2600, 10042, 0.25), (150, 277, 0.5), (1300, 2376, 0.5)]:
        assert binomial_sf(k, n, p) == pytest.approx(float(stats.binom.sf(k - 1, n, p)), rel=1e-9)


def test_mcnemar_against_a_direct_binomial_computation() -> None:
    # 12 documents right only in dense (b), 3 right only in pruned (c), 385 concordant
    dense = [1] * 12 + [0] * 3 + [1] * 200 + [0] * 185
    pruned = [0] * 12 + [1] * 3 + [1] * 200 + [0] * 185
    test = mcnemar_drop(dense, pruned)
    assert (test.b, test.c, test.n) == (12, 3, 400)
    direct = Fraction(sum(math.comb(15, i) for i in range(12, 16)), 2**15)  # P(X >= 12), X ~ Bin(15, 1/2)
    assert test.p_value == pytest.approx(float(direct), rel=1e-12)
    assert test.delta == pytest.approx(-9 / 400)
    diffs = [p - d for d, p in zip(dense, pruned, strict=True)]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1))
    assert test.se == pytest.approx(sd / math.sqrt(len(diffs)))
    assert mcnemar_drop([1, 0], [1, 0]).p_value == 1.0  # no discordant pair: no evidence
    assert mcnemar_drop(pruned, dense).p_value == pytest.approx(exact_sf(3, 15, Fraction(1, 2)))
    with pytest.raises(ValueError, match="different lengths"):
        mcnemar_drop([1], [1, 0])


def test_two_proportion_drop() -> None:
    p, se = two_proportion_drop(0.6, 400, 0.5, 400)
    pooled = 0.55
    z = 0.1 / math.sqrt(pooled * (1 - pooled) * (2 / 400))
    assert p == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))
    assert se == pytest.approx(math.sqrt(0.6 * 0.4 / 400 + 0.5 * 0.5 / 400))
    assert two_proportion_drop(1.0, 10, 1.0, 10)[0] == 1.0


def test_pack_bits_round_trip() -> None:
    rng = random.Random(0)
    for n in (0, 1, 3, 4, 5, 17, 400, 10042):
        bits = [rng.randint(0, 1) for _ in range(n)]
        packed = pack_bits(bits)
        assert len(packed) == -(-n // 4) and unpack_bits(packed, n) == bits
    assert pack_bits([1, 0, 0, 0, 1]) == "88"
    assert unpack_bits("88", 9) is None and unpack_bits("zz", 8) is None
    with pytest.raises(ValueError):
        pack_bits([2])


def test_headline_metric() -> None:
    norm = TaskRecord(extra={"acc": 0.5, "acc_norm": 0.6})
    plain = TaskRecord(extra={"acc": 0.5, "acc_norm": None, "perplexity": 20.0})
    assert headline_metric(norm) == "acc_norm" and headline_metric(plain) == "acc"
    assert headline_metric(norm, plain) == "acc"  # the metric both have
    assert headline_metric(TaskRecord(extra={"perplexity": 3.0})) is None


def test_pure_noise_is_not_flagged() -> None:
    rng = random.Random(13)
    dense = {f"task{i}": record(dense_bits(rng, 0.45 + 0.05 * i)) for i in range(8)}
    pruned = {
        name: record(noisy(rng, rec.outcomes("acc_norm") or [], 30), docs=rec.docs_hash or "")
        for name, rec in dense.items()
    }
    out = compare_tasks(pruned, dense)
    assert out.flagged == [] and {r.status for r in out.tasks} == {"not significant"}
    assert all(r.paired and r.test == "McNemar exact (paired)" for r in out.tasks)
    # family-wise: over many noisy pairs of 8 tasks, a false flag in a few draws at most (expected <= 5 %)
    families_with_a_flag = 0
    for seed in range(40):
        r = random.Random(seed)
        dense = {f"t{i}": record(dense_bits(r, 0.6)) for i in range(8)}
        pruned = {k: record(noisy(r, v.outcomes("acc_norm") or [], 30)) for k, v in dense.items()}
        families_with_a_flag += bool(compare_tasks(pruned, dense).flagged)
    assert families_with_a_flag <= 4


def test_mcnemar_keeps_its_level() -> None:
    """Under no change each discordant pair falls either way with probability 1/2: the probability that the
    p-value is <= alpha is at most alpha, for every number of discordant pairs (computed exactly)."""
    for m in range(1, 80):
        level = sum(
            Fraction(math.comb(m, b), 2**m)
            for b in range(m + 1)
            if mcnemar_drop([1] * b + [0] * (m - b), [0] * b + [1] * (m - b)).p_value <= 0.05
        )
        assert level <= Fraction(5, 100), m


def test_planted_drop_is_flagged() -> None:
    rng = random.Random(7)
    dense = {f"task{i}": record(dense_bits(rng, 0.6)) for i in range(8)}
    pruned = {}
    for name, rec in dense.items():
        bits = noisy(rng, rec.outcomes("acc_norm") or [], 20)
        if name == "task3":
            bits = planted_drop(rng, bits, 0.15)  # 15 % of the correct documents now wrong
        pruned[name] = record(bits)
    out = compare_tasks(pruned, dense)
    assert out.flagged == ["task3"]
    row = next(r for r in out.tasks if r.name == "task3")
    assert row.status == "flagged" and row.flagged and row.p_value is not None and row.p_value < 0.05 / 8
    assert row.delta is not None and row.delta < -0.05 and row.discordant is not None
    assert row.delta == pytest.approx((row.discordant[1] - row.discordant[0]) / N)
    agg = out.aggregate or {}
    assert agg["tasks"] == 8 and agg["delta"] == pytest.approx(sum(r.delta or 0 for r in out.tasks) / 8)


def test_dense_at_chance_is_never_flagged() -> None:
    rng = random.Random(3)
    bits = dense_bits(rng, 0.26)  # 4 choices: chance 0.25; 104 of 400 is not significantly above it
    pruned = planted_drop(rng, bits, 0.5)  # a large, significant drop
    out = compare_tasks({"hellaswag": record(pruned)}, {"hellaswag": record(bits)})
    row = out.tasks[0]
    assert row.p_value is not None and row.p_value < 1e-6  # the drop itself is significant
    assert row.p_chance == pytest.approx(exact_sf(104, N, Fraction(1, 4)), rel=1e-9) and row.p_chance > 0.05
    assert row.status == "at chance" and not row.flagged and out.flagged == []
    # the same drop from a dense score well above chance is flagged
    bits = dense_bits(rng, 0.40)
    out = compare_tasks({"hellaswag": record(planted_drop(rng, bits, 0.5))}, {"hellaswag": record(bits)})
    assert out.flagged == ["hellaswag"] and out.tasks[0].p_chance < 1e-6


def _with_discordant(b: int, c: int, n: int = N) -> tuple[TaskRecord, TaskRecord]:
    """Dense and pruned records with exactly ``b`` documents right only in dense, ``c`` only in pruned."""
    rest = n - b - c
    both = rest * 7 // 10  # right in both: the dense score is well above chance
    dense = [1] * b + [0] * c + [1] * both + [0] * (rest - both)
    pruned = [0] * b + [1] * c + [1] * both + [0] * (rest - both)
    return record(dense, chance=0.5, metric="acc"), record(pruned, chance=0.5, metric="acc")


def test_holm_over_the_compared_tasks() -> None:
    p_one = float(Fraction(sum(math.comb(15, i) for i in range(12, 16)), 2**15))  # b=12, c=3: 0.0176
    assert 0.05 / 3 < p_one < 0.05
    d, p = _with_discordant(12, 3)
    alone = compare_tasks({"a": p}, {"a": d})
    assert alone.flagged == ["a"] and alone.tasks[0].p_value == pytest.approx(p_one)
    three = compare_tasks({k: p for k in "abc"}, {k: d for k in "abc"})
    assert three.flagged == [] and {r.status for r in three.tasks} == {"not significant"}
    # one strong drop passes 0.05 / 3; the next must pass 0.05 / 2, and 0.0176 does
    d_strong, p_strong = _with_discordant(30, 2)
    mixed = compare_tasks(
        {"a": p, "b": p_strong, "c": record([1, 0] * 200)}, {"a": d, "b": d_strong, "c": record([1, 0] * 200)}
    )
    assert mixed.flagged == ["a", "b"]
    # an improvement is never flagged
    up = compare_tasks({"a": d}, {"a": p})
    assert up.flagged == [] and up.tasks[0].delta is not None and up.tasks[0].delta > 0


def test_unpaired_fallback() -> None:
    rng = random.Random(5)
    bits = dense_bits(rng, 0.6)
    pruned = record(planted_drop(rng, bits, 0.3))
    old_dense = TaskRecord(n=N, extra={"acc": 0.6, "acc_stderr": 0.0245, "acc_norm": 0.6})  # no per-doc
    out = compare_tasks({"arc_easy": pruned}, {"arc_easy": old_dense})
    row = out.tasks[0]
    assert not row.paired and row.test == "two-proportion z (unpaired)"
    assert row.note == "unpaired: no per-document results in the dense record"
    expected_p, expected_se = two_proportion_drop(0.6, N, pruned.get("acc_norm") or 0.0, N)
    assert row.p_value == pytest.approx(expected_p) and row.se == pytest.approx(expected_se)
    assert row.chance == 0.25 and row.flagged  # chance level of a known task, for old records
    # different documents: same counts but another hash, or other counts
    assert "hashes differ" in (
        compare_tasks({"t": record(bits, docs="b")}, {"t": record(bits)}).tasks[0].note or ""
    )
    # other settings: never compared, the row says why and keeps only the pruned score
    short = compare_tasks({"t": record(bits[:100])}, {"t": record(bits)})
    assert short.tasks[0].status == "not comparable" and short.tasks[0].dense is None and short.flagged == []
    assert "documents 100 vs 400 dense" in (short.tasks[0].note or "")
    for field, a, b, words in (
        ("version", "2.0", "1.0", "task version 2.0 vs 1.0"),
        ("num_fewshot", 5, 0, "n-shot 5"),
    ):
        p_rec, d_rec = record(planted_drop(rng, bits, 0.3)), record(bits)
        setattr(p_rec, field, a)
        setattr(d_rec, field, b)
        row = compare_tasks({"t": p_rec}, {"t": d_rec}).tasks[0]
        assert row.status == "not comparable" and words in (row.note or "") and not row.flagged
    # no document counts: nothing to test
    nothing = compare_tasks({"t": TaskRecord(extra={"acc": 0.5})}, {"t": TaskRecord(extra={"acc": 0.6})})
    assert nothing.tasks[0].status == "not tested" and nothing.flagged == []


def test_old_records_load_and_compare(tmp_path: Path) -> None:
    old = {
        "format": "oneshot-eval/1",
        "tasks": {"piqa": {"acc": 0.55, "acc_stderr": 0.011, "acc_norm": 0.56, "n": 1838, "source": "local"}},
        "baseline": {"tasks": {"piqa": {"acc": 0.62, "acc_stderr": 0.011, "acc_norm": 0.63, "n": 1838}}},
        "longtail": {
            "tasks": {
                "tasks": [
                    {"name": "piqa", "acc_dense": 0.62, "acc_pruned": 0.55, "delta": -0.07, "flagged": True}
                ],
                "aggregate": {"acc_dense": 0.62, "acc_pruned": 0.55},
                "flagged": ["piqa"],
            }
        },
    }
    (tmp_path / "eval.json").write_text(json.dumps(old))
    ev = EvalRecord.load(tmp_path)
    piqa = ev.tasks["piqa"]
    assert piqa.correct == {} and piqa.outcomes("acc") is None and piqa.chance is None
    assert piqa.metrics == {"acc": 0.55, "acc_norm": 0.56}
    assert ev.longtail is not None and ev.longtail.tasks is not None
    row = ev.longtail.tasks.tasks[0]
    assert row.delta == -0.07 and row.extra["acc_dense"] == 0.62 and ev.longtail.tasks.alpha is None
    assert ev.baseline is not None
    out = compare_tasks(ev.tasks, ev.baseline.tasks)
    assert out.tasks[0].metric == "acc_norm" and not out.tasks[0].paired and out.flagged == ["piqa"]
    # the plain-dict form the long-tail report uses
    as_dict = task_comparison({"piqa": old["tasks"]["piqa"]}, {"tasks": old["baseline"]["tasks"]})
    assert as_dict["flagged"] == ["piqa"] and as_dict["tasks"][0]["status"] == "flagged"


def test_task_table_with_and_without_baseline() -> None:
    lam = TaskRecord(n=10, extra={"acc": 0.3, "acc_stderr": 0.1, "acc_norm": None, "perplexity": 40.0})
    arc = TaskRecord(
        n=10,
        num_fewshot=0,
        version="1.0",
        source="local:/x",
        differences="Every item has 4 choices. More.",
        extra={"acc": 0.4, "acc_stderr": 0.1, "acc_norm": 0.5, "acc_norm_stderr": 0.1},
    )
    alone = task_table({"arc_easy": arc, "lambada_openai": lam})
    assert alone.baseline is None and alone.comparison is None
    assert [(s.task, s.metric, s.headline) for s in alone.scores] == [
        ("arc_easy", "acc", False),
        ("arc_easy", "acc_norm", True),
        ("lambada_openai", "acc", True),
        ("lambada_openai", "perplexity", False),
    ]
    assert alone.mean == {"pruned": pytest.approx(0.4), "dense": None, "tasks": 2}
    assert alone.notes == ["arc_easy (local copy): Every item has 4 choices. More."]
    dense = {"arc_easy": TaskRecord(n=10, extra={"acc": 0.5, "acc_norm": 0.7}), "lambada_openai": lam}
    both = task_table({"arc_easy": arc, "lambada_openai": lam}, dense, "dense.json")
    assert both.baseline == "dense.json" and both.comparison is not None
    assert both.scores[1].dense == 0.7 and both.mean["dense"] == pytest.approx(0.5)
