"""Long-tail degradation: per-token statistics, frequency buckets, flags, determinism, missing data."""

from __future__ import annotations

import copy
import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from oneshot.eval.flags import flag_slices, holm
from oneshot.eval.frequency import frequency_buckets
from oneshot.eval.longtail import longtail_report
from oneshot.eval.slices import SLICES, TATOEBA_LANGS, slice_texts
from oneshot.eval.token_stats import BLOCK_TOKENS, SliceStats, next_token_stats
from tests.conftest import TEXT, tiny_llama_config

SENTENCES = [s.strip() + "." for s in TEXT[:400].split(".") if s.strip()]


def _write_gz_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def make_fake_data(root: Path, *, complete: bool = True) -> Path:
    """A small data directory with the layout of shared/data (a few files per slice kind)."""
    lines = [f"{s} Number {i} of the story." for i, s in enumerate(SENTENCES * 4)]
    (root / "wikitext-2-raw").mkdir(parents=True, exist_ok=True)
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text(
        "\n".join(f" {x} " if i % 3 else " " for i, x in enumerate(lines * 3)) + "\n"
    )
    _write_gz_jsonl(root / "c4" / "c4-train.00000-of-01024.first1000.jsonl.gz", [{"text": TEXT[:2000]}] * 3)
    _write_gz_jsonl(
        root / "code" / "HumanEval.jsonl.gz",
        [
            {"prompt": f"def f{i}(x):\n    '''Add {i}.'''\n", "canonical_solution": f"    return x + {i}\n"}
            for i in range(6)
        ],
    )
    flores = root / "multilingual" / "flores_v1"
    flores.mkdir(parents=True, exist_ok=True)
    (flores / "wikipedia.devtest.ne-en.ne").write_text("\n".join(f"नेपाली वाक्य {i}" for i in range(20)) + "\n")
    (flores / "wikipedia.devtest.ne-en.en").write_text("\n".join(lines[:20]) + "\n")
    if complete:
        tat = root / "multilingual" / "tatoeba"
        tat.mkdir(parents=True, exist_ok=True)
        (tat / "tatoeba.deu-eng.deu").write_text("\n".join(f"Das ist Satz {i}." for i in range(15)) + "\n")
        (tat / "tatoeba.deu-eng.eng").write_text(
            "\n".join(f"This is sentence {i}." for i in range(15)) + "\n"
        )
        math_dir = root / "math"
        math_dir.mkdir(parents=True, exist_ok=True)
        (math_dir / "gsm8k_test.jsonl").write_text(
            "\n".join(
                json.dumps(
                    {"question": f"What is {i}+1?", "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
                )
                for i in range(8)
            )
            + "\n"
        )
        _write_gz_jsonl(
            math_dir / "hendrycks_math_test.llmfoundry.jsonl.gz",
            [
                {
                    "context": f"Find $x$ if $x={i}$.",
                    "answer": str(i),
                    "chain_of_thought": f"So $x=\\boxed{{{i}}}$.",
                }
                for i in range(8)
            ],
        )
    return root


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny_models(tiny_tokenizer):
    """A tiny random Llama and a copy with half of every projection weight zeroed (magnitude, per layer)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    dense = LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer))).eval()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        for name, p in pruned.named_parameters():
            if name.endswith("proj.weight"):
                k = p.numel() // 2
                thr = p.abs().flatten().kthvalue(k).values
                p.mul_((p.abs() > thr).to(p.dtype))
    return dense, pruned


SMALL = dict(limit=6, max_tokens_per_slice=96, seqlen=64, reference_tokens=256)


def test_next_token_stats_matches_direct_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(11, 37, generator=gen) * 3
    p = d + torch.randn(11, 37, generator=gen)
    t = torch.randint(0, 37, (11,), generator=gen)
    nd, np_, kl = next_token_stats(d, p, t, chunk_rows=4)  # 3 chunks, the last one short
    ld, lp = d.double().log_softmax(-1), p.double().log_softmax(-1)
    torch.testing.assert_close(nd.double(), F.nll_loss(ld, t, reduction="none"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(np_.double(), F.nll_loss(lp, t, reduction="none"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), (ld.exp() * (ld - lp)).sum(-1), rtol=1e-4, atol=1e-5)
    assert (kl >= 0).all()
    # identical logits: KL exactly 0, same NLL
    nd2, np2, kl2 = next_token_stats(d, d.clone(), t)
    assert torch.equal(nd2, np2) and torch.count_nonzero(kl2) == 0
    with pytest.raises(ValueError, match="tokens, vocab"):
        next_token_stats(d, p[:, :5], t)


def test_identical_models_give_zero_kl_and_no_degradation(
    tiny_models, tiny_tokenizer, fake_data: Path
) -> None:
    dense, _ = tiny_models
    rep = longtail_report(dense, copy.deepcopy(dense), tiny_tokenizer, fake_data, **SMALL)
    assert rep["aggregate"]["rel_degradation"] == 0 and rep["aggregate"]["kl"] == 0
    measured = [s for s in rep["slices"] if s["tokens"]]
    assert len(measured) >= 8
    for s in measured:
        assert s["kl"] == 0 and s["rel_degradation"] == 0 and s["nll_dense"] == s["nll_pruned"]
        assert not s["flagged"]
    assert rep["flagged"] == [] and any("no degradation" in n for n in rep["notes"])


def test_slice_numbers_equal_a_direct_computation(tiny_models, tiny_tokenizer, fake_data: Path) -> None:
    dense, pruned = tiny_models
    rep = longtail_report(
        dense, pruned, tiny_tokenizer, fake_data, slices=["code/humaneval"], frequency=False, **SMALL
    )
    (s,) = rep["slices"]
    piece = slice_texts("code/humaneval", fake_data, seed=0, limit=SMALL["limit"])
    # whole documents, as many as fit in 96 tokens once joined
    counts = [len(tiny_tokenizer(piece.joiner.join(piece.texts[:k])).input_ids) for k in range(1, 7)]
    keep = max(k for k in range(1, 7) if counts[k - 1] <= 96)
    assert keep < len(piece.texts)
    ids = tiny_tokenizer(piece.joiner.join(piece.texts[:keep]), return_tensors="pt").input_ids[0]
    nll_d, nll_p, kls = [], [], []
    with torch.no_grad():
        for w in ids.split(64):  # the windows: 64 tokens, then the rest
            ld = dense(input_ids=w[None]).logits[0, :-1].double().log_softmax(-1)
            lp = pruned(input_ids=w[None]).logits[0, :-1].double().log_softmax(-1)
            tgt = w[1:]
            nll_d.append(-ld.gather(1, tgt[:, None]).squeeze(1))
            nll_p.append(-lp.gather(1, tgt[:, None]).squeeze(1))
            kls.append((ld.exp() * (ld - lp)).sum(-1))
    md, mp, mk = torch.cat(nll_d).mean().item(), torch.cat(nll_p).mean().item(), torch.cat(kls).mean().item()
    assert s["tokens"] == ids.numel() - 2 and s["windows"] == 2 and s["texts"] == keep
    assert s["nll_dense"] == pytest.approx(md, rel=1e-5) and s["nll_pruned"] == pytest.approx(mp, rel=1e-5)
    assert s["kl"] == pytest.approx(mk, rel=1e-4) and s["kl"] > 0
    assert s["ppl_pruned"] == pytest.approx(math.exp(mp), rel=1e-5)
    assert s["rel_degradation"] == pytest.approx(math.exp(mp - md) - 1, rel=1e-4, abs=1e-7)


def test_frequency_buckets_on_a_hand_made_table() -> None:
    counts = torch.tensor([40, 0, 20, 20, 8, 4, 4, 2, 1, 1, 0])  # total 100
    fb = frequency_buckets(counts, n_buckets=5)
    # ranks: id0 (mass before 0), id2 (40), id3 (60, tie with id2 broken by id), id4 (80), id5.. (88..99)
    # bucket = floor(5 * mass_before / 100); unseen ids (1, 10) -> bucket 5
    assert fb.bucket_of.tolist() == [0, 5, 2, 3, 4, 4, 4, 4, 4, 4, 5]
    assert fb.names == ["freq/1", "freq/2", "freq/3", "freq/4", "freq/5", "freq/unseen"]
    info = {b["name"]: b for b in fb.info}
    assert info["freq/1"]["types"] == 1 and info["freq/2"]["types"] == 0 and info["freq/5"]["types"] == 6
    assert info["freq/5"]["rank_first"] == 4 and info["freq/5"]["rank_last"] == 9
    assert info["freq/5"]["mass"] == pytest.approx(0.20) and info["freq/unseen"]["types"] == 2
    # evenly spread counts give equal-size buckets
    even = frequency_buckets(torch.ones(10, dtype=torch.long), n_buckets=5)
    assert even.bucket_of.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ValueError):
        frequency_buckets(counts, n_buckets=0)


def test_buckets_partition_the_aggregate(tiny_models, tiny_tokenizer, fake_data: Path) -> None:
    dense, pruned = tiny_models
    rep = longtail_report(dense, pruned, tiny_tokenizer, fake_data, slices=[], **SMALL)
    buckets = [s for s in rep["slices"] if s["group"] == "frequency"]
    assert len(buckets) == 6 and rep["frequency"]["n_buckets"] == 5
    agg = rep["aggregate"]
    assert agg["name"] == "wikitext2" and sum(b["tokens"] for b in buckets) == agg["tokens"] == 252
    nll = sum(b["nll_dense"] * b["tokens"] for b in buckets if b["tokens"]) / agg["tokens"]
    assert nll == pytest.approx(agg["nll_dense"], rel=1e-9)


def _synthetic(name: str, shift: float, gen: torch.Generator, tokens: int = 4096, noise: float = 1.0) -> dict:
    """A slice whose per-token NLL increase is ``shift`` + noise, in windows of 512, summed by SliceStats.

    The noise is autocorrelated within a block of 8 tokens (one draw per 8 tokens plus a smaller
    independent part), as neighbouring tokens' NLL changes are."""
    st = SliceStats()
    for _ in range(tokens // 512):
        base = torch.rand(512, generator=gen, dtype=torch.float64) * 5
        shared = torch.randn(64, generator=gen, dtype=torch.float64).repeat_interleave(8)
        d = shift + noise * (shared + 0.3 * torch.randn(512, generator=gen, dtype=torch.float64))
        st.add(base, base + d, d.abs())
        st.windows += 1
    return {"name": name, **st.to_dict()}


def test_slice_se_is_the_cluster_robust_se_of_a_direct_computation() -> None:
    gen = torch.Generator().manual_seed(1)
    st = SliceStats()
    diffs = []
    for length in (64, 40, 7):  # blocks of 32: 2, 2 (32 + 8), 1 (7)
        nd = torch.rand(length, generator=gen, dtype=torch.float64)
        np_ = nd + torch.randn(length, generator=gen, dtype=torch.float64)
        st.add(nd, np_, torch.zeros(length))
        diffs.append(np_ - nd)
    blocks = [blk for d in diffs for blk in d.split(BLOCK_TOKENS)]
    n, g = sum(x.numel() for x in blocks), len(blocks)
    mean = torch.cat(diffs).mean()
    ss = sum(float((x.sum() - x.numel() * mean) ** 2) for x in blocks)
    assert st.blocks == g == 5
    assert st.to_dict()["delta_nll_se"] == pytest.approx(math.sqrt(ss * g / (g - 1)) / n, rel=1e-9)
    merged = SliceStats()
    merged.merge(st)
    merged.merge(st)
    assert merged.blocks == 10 and merged.to_dict()["delta_nll"] == pytest.approx(st.to_dict()["delta_nll"])


def test_flags_no_flag_on_pure_noise_and_a_flag_on_a_planted_degradation() -> None:
    gen = torch.Generator().manual_seed(0)
    # 200 repetitions of 30 slices that degrade exactly like the aggregate (pure noise around the same
    # shift): with Holm at 0.05 the family-wise false flag rate must stay near or below 5 %
    false_families = 0
    for _ in range(200):
        agg = _synthetic("agg", 0.10, gen, tokens=8192)
        slices = [_synthetic(f"s{i}", 0.10, gen, tokens=1024) for i in range(30)]
        false_families += bool(flag_slices(slices, agg, factor=1.0))
    assert false_families <= 20  # 10 % allows for sampling error around 5 %
    # planted degradations are found among 28 slices of pure noise
    agg = _synthetic("agg", 0.10, gen, tokens=32768, noise=0.5)
    planted = [_synthetic(f"s{i}", 0.10, gen, tokens=1024, noise=0.5) for i in range(30)]
    planted[7] = _synthetic("s7", 0.60, gen, tokens=1024, noise=0.5)  # six times the aggregate's increase
    planted[11] = _synthetic("s11", 0.40, gen, tokens=1024, noise=0.1)  # four times, little noise
    assert flag_slices(planted, agg, factor=2.0) == ["s7", "s11"]
    s7 = planted[7]
    assert s7["status"] == "flagged" and s7["ratio_to_aggregate"] == pytest.approx(6.0, rel=0.3)
    assert s7["excess_nll"] == pytest.approx(s7["delta_nll"] - 2 * agg["delta_nll"])
    assert all(s["status"] == "not significant" for s in planted if not s["flagged"])
    # a slice twice as bad on the NLL scale, but only that: not flagged at factor 2
    again = [_synthetic("twice", 0.20, gen, tokens=1024, noise=0.5)]
    assert flag_slices(again, agg, factor=2.0) == []


def test_flag_edge_cases() -> None:
    gen = torch.Generator().manual_seed(2)
    agg = _synthetic("agg", 0.0, gen, tokens=8192, noise=0.01)
    same = {"name": "same", "tokens": 100, "blocks": 8, "delta_nll": 0.0, "delta_nll_se": 0.0}
    tiny = {"name": "tiny", "tokens": 60, "blocks": 2, "delta_nll": 5.0, "delta_nll_se": 0.1}
    bad = _synthetic("bad", 0.5, gen, tokens=1024, noise=0.2)
    empty = {"name": "empty", "tokens": 0}
    rows = [same, tiny, bad, empty]
    # no aggregate degradation: a slice is flagged when its own increase is significant
    assert flag_slices(rows, agg) == ["bad"]
    assert same["status"] == "not significant" and same["p_value"] == 1.0
    assert tiny["status"] == "too small" and empty["status"] == "too small"
    assert all(r["ratio_to_aggregate"] is None for r in rows)
    assert holm({"a": 0.01, "b": 0.02, "c": 0.04}, 0.05) == {
        "a",
        "b",
        "c",
    }  # .01 <= .05/3, .02 <= .05/2, .04 <= .05
    assert holm({"a": 0.03, "b": 0.04, "c": 0.001}, 0.05) == {"c"}  # .03 > .05/2 stops: b is kept too
    assert holm({"a": 0.02, "b": 0.001}, 0.05) == {"a", "b"}
    assert holm({}, 0.05) == set()


def test_language_slices_against_their_english_control(tiny_models, tiny_tokenizer, fake_data: Path) -> None:
    dense, pruned = tiny_models
    rep = longtail_report(
        dense,
        pruned,
        tiny_tokenizer,
        fake_data,
        slices=["flores/ne", "tatoeba/deu"],
        frequency=False,
        **SMALL,
    )
    controls = {c["name"]: c for c in rep["controls"]}
    assert set(controls) == {"flores/ne:en", "tatoeba/deu:en"}
    by = {s["name"]: s for s in rep["slices"]}
    for name in ("flores/ne", "tatoeba/deu"):
        c = controls[f"{name}:en"]
        assert c["group"] == "control" and c["texts"] == by[name]["texts"] and c["tokens"] > 0
        vs = by[name]["vs_control"]
        assert vs["control"] == f"{name}:en"
        assert vs["excess_nll"] == pytest.approx(by[name]["delta_nll"] - c["delta_nll"])
    # the control holds the English side of exactly the sentences of its language slice
    piece = slice_texts("tatoeba/deu", fake_data, seed=0, limit=SMALL["limit"])
    assert [t.split()[-1] for t in piece.texts] == [t.split()[-1] for t in piece.control]
    assert rep["pooled"]["tokens"] == sum(s["tokens"] for s in rep["slices"])  # controls not pooled


def test_deterministic_for_a_seed(tiny_models, tiny_tokenizer, fake_data: Path) -> None:
    a = slice_texts("flores/ne", fake_data, seed=0, limit=5)
    b = slice_texts("flores/ne", fake_data, seed=0, limit=5)
    c = slice_texts("flores/ne", fake_data, seed=1, limit=5)
    assert a.texts == b.texts and a.texts != c.texts and len(a.texts) == 5
    # the English slice holds the aligned English sides of the same sampled sentences
    en = slice_texts("flores/en", fake_data, seed=0, limit=5)
    idx = [int(t.rsplit(" ", 1)[1]) for t in a.texts]
    lines = (fake_data / "multilingual/flores_v1/wikipedia.devtest.ne-en.en").read_text().split("\n")
    assert en.texts == [lines[i] for i in idx]
    dense, pruned = tiny_models
    kw = dict(slices=["flores/ne", "math/gsm8k"], **SMALL)
    r1 = longtail_report(dense, pruned, tiny_tokenizer, fake_data, seed=3, **kw)
    r2 = longtail_report(dense, pruned, tiny_tokenizer, fake_data, seed=3, **kw)
    r1.pop("seconds"), r2.pop("seconds")
    assert r1 == r2
    gsm = slice_texts("math/gsm8k", fake_data, seed=3)
    assert "<<" not in "".join(gsm.texts) and "#### " in gsm.texts[0]


def test_missing_data_is_skipped_with_the_expected_path(tiny_models, tiny_tokenizer, tmp_path: Path) -> None:
    data = make_fake_data(tmp_path / "partial", complete=False)
    dense, pruned = tiny_models
    rep = longtail_report(dense, pruned, tiny_tokenizer, data, **SMALL)
    skipped = {s["name"]: s["reason"] for s in rep["skipped"]}
    assert "multilingual/tatoeba/tatoeba.deu-eng.deu" in skipped["tatoeba/deu"]
    assert "math/gsm8k_test.jsonl" in skipped["math/gsm8k"] and "flores/si" in skipped
    measured = {s["name"] for s in rep["slices"] if s["tokens"]}
    assert {"flores/ne", "flores/en", "code/humaneval"} <= measured
    # nothing at all: every slice skipped, still a report
    empty = longtail_report(dense, pruned, tiny_tokenizer, tmp_path / "nothing", **SMALL)
    assert not empty["slices"] and empty["skipped"] and empty["notes"]
    with pytest.raises(ValueError, match=r"unknown long-tail slice.*choose from.*code/humaneval"):
        longtail_report(dense, pruned, tiny_tokenizer, data, slices=["klingon"])
    with pytest.raises(ValueError, match="choose from"):
        slice_texts("nope", data)


def test_malformed_slice_file_is_an_eval_data_error_naming_the_line(tmp_path: Path) -> None:
    """A broken JSONL record skips the slice like a missing file (EvalDataError), naming file and line."""
    from oneshot.eval.corpora import EvalDataError

    bad = tmp_path / "math" / "gsm8k_test.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": \n')
    with pytest.raises(EvalDataError, match=r"gsm8k_test\.jsonl: line 2 is not valid JSON"):
        slice_texts("math/gsm8k", tmp_path)
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(EvalDataError, match=r"gsm8k_test\.jsonl: unexpected record layout \(KeyError"):
        slice_texts("math/gsm8k", tmp_path)


def test_every_slice_loads_from_the_shared_data(data_dir: Path) -> None:
    assert {f"tatoeba/{x}" for x in TATOEBA_LANGS} | {"tatoeba/eng", "flores/en"} <= set(SLICES)
    for name in SLICES:
        piece = slice_texts(name, data_dir, seed=0, limit=3)
        assert len(piece.texts) == 3 and all(t.strip() for t in piece.texts), name
    cot = slice_texts("math/competition", data_dir, seed=0, limit=1).texts[0]
    assert "boxed" in cot
    code = slice_texts("code/humaneval", data_dir, seed=0, limit=1).texts[0]
    assert "def " in code and "return" in code
