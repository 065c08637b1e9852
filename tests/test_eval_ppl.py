"""Perplexity: hand-computed NLL, windowing, limit and tail, the corpora protocols, and SmolLM2."""

from __future__ import annotations

import gzip
import importlib
import itertools
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from oneshot.data import DataFileError, read_jsonl
from oneshot.eval.corpora import C4_WINDOWS, PPL_DATASETS, EvalDataError, ppl_data, ppl_text, ppl_token_ids
from oneshot.eval.perplexity import perplexity, window_nll, windows


class Bigram(torch.nn.Module):
    """Logits depend on the current token only: logits[b, t] = table[ids[b, t]]."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=gen, dtype=torch.float64) * 2)
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        self.calls += 1
        return SimpleNamespace(logits=self.table[input_ids])


def _explicit_nll(table: torch.Tensor, chunks: list[list[int]]) -> tuple[float, int]:
    """Sum of -log softmax(table[prev])[next] with plain Python arithmetic, and the token count."""
    rows = table.tolist()
    total, count = 0.0, 0
    for chunk in chunks:
        for prev, nxt in itertools.pairwise(chunk):
            row = rows[prev]
            peak = max(row)
            log_z = peak + math.log(sum(math.exp(v - peak) for v in row))
            total += log_z - row[nxt]
            count += 1
    return total, count


def test_perplexity_matches_hand_computed_nll() -> None:
    vocab, seqlen = 11, 7
    model = Bigram(vocab)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, 4 * seqlen + 3), generator=gen)  # 4 windows + a 3-token tail
    res = perplexity(model, ids, seqlen, batch_size=3)
    chunks = [ids[0, i * seqlen : (i + 1) * seqlen].tolist() for i in range(4)]  # tail dropped
    total, count = _explicit_nll(model.table.detach(), chunks)
    assert res.windows == 4 and res.seqlen == seqlen
    assert res.tokens == count == 4 * (seqlen - 1)
    assert res.nll == pytest.approx(total / count, rel=1e-12)
    assert res.value == pytest.approx(math.exp(total / count), rel=1e-12)
    assert model.calls == 2  # batches of 3 + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_window_nll_in_chunks_equals_one_log_softmax(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    vocab = 13
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 10, vocab, generator=gen) * 3).to(dtype)  # 30 rows
    ids = torch.randint(0, vocab, (3, 10), generator=gen)
    logp = torch.log_softmax(logits.double(), dim=-1)[:, :-1]  # (3, 9, vocab)
    expected = -logp.gather(-1, ids[:, 1:, None]).sum()
    # 7 rows per chunk: chunks straddle windows and the last one is short
    monkeypatch.setattr(
        importlib.import_module("oneshot.eval.perplexity"), "_CHUNK_BYTES", {"cpu": 7 * vocab * 4}
    )
    got = window_nll(logits, ids)
    assert got.dtype == torch.float64
    tol = 1e-5 if dtype == torch.float32 else 1e-4  # bf16 logits are upcast exactly; fp32 log-softmax
    assert float(got) == pytest.approx(float(expected), rel=tol)


def test_perplexity_real_model_against_log_softmax_loop(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(2)
    seqlen = 16
    ids = torch.randint(0, model.config.vocab_size, (1, 3 * seqlen + 5), generator=gen)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            chunk = ids[:, w * seqlen : (w + 1) * seqlen]
            logits = model(chunk).logits[0].double()  # (seqlen, vocab)
            for t in range(seqlen - 1):
                logp = logits[t] - torch.logsumexp(logits[t], dim=0)
                total -= float(logp[chunk[0, t + 1]])
                count += 1
    for batch_size in (1, 2, 3):
        res = perplexity(model, ids, seqlen, batch_size)
        assert res.tokens == count
        assert res.nll == pytest.approx(total / count, rel=1e-5)


def test_windows_limit_and_tail() -> None:
    ids = torch.arange(23)
    w = windows(ids, 5)
    assert w.shape == (4, 5) and w[-1, -1] == 19  # 3-token tail dropped
    assert windows(ids.view(1, -1), 5, limit=2).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert windows(ids, 5, limit=100).shape == (4, 5)
    with pytest.raises(ValueError, match="limit"):
        windows(ids, 5, limit=0)
    with pytest.raises(ValueError, match="shorter than one window"):
        windows(ids, 24)
    with pytest.raises(ValueError, match="seqlen"):
        windows(ids, 1)


def test_limit_scores_the_first_windows() -> None:
    model = Bigram(9, seed=3)
    ids = torch.randint(0, 9, (1, 60), generator=torch.Generator().manual_seed(4))
    limited = perplexity(model, ids, 10, 4, limit=2)
    first = perplexity(model, ids[:, :20], 10)
    assert limited.windows == 2 and limited.nll == pytest.approx(first.nll, rel=1e-12)


def _write_c4(root: Path, docs: list[str]) -> None:
    path = root / PPL_DATASETS["c4"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for doc in docs:
            fh.write(json.dumps({"text": doc, "timestamp": "", "url": ""}) + "\n")


def test_c4_protocol_window_statement(tmp_path: Path, tiny_tokenizer) -> None:
    docs = [f"document {i} says the quick brown fox jumps over the lazy dog." for i in range(1200)]
    _write_c4(tmp_path, docs)
    # enough text for the protocol's 256 windows of 8 tokens: cut to 256 * 8 tokens
    data = ppl_data("c4", tiny_tokenizer, 8, tmp_path)
    assert data.max_windows == C4_WINDOWS
    assert data.input_ids.shape == (1, C4_WINDOWS * 8)
    assert "first 1100 of 1200 documents" in data.note and "the protocol's 256 windows" in data.note
    expected = tiny_tokenizer(" ".join(docs[:1100]), return_tensors="pt").input_ids[:, : 256 * 8]
    assert torch.equal(data.input_ids, expected)
    # a long window: fewer windows than the protocol asks for, and the note says so
    data = ppl_data("c4", tiny_tokenizer, 512, tmp_path)
    held = data.input_ids.shape[-1] // 512
    assert 0 < held < C4_WINDOWS
    assert f"only {held} windows" in data.note
    res = perplexity(Bigram(len(tiny_tokenizer)), data.input_ids, 512, limit=data.max_windows)
    assert res.windows == held


def test_wikitext2_protocol(data_dir: Path, tiny_tokenizer) -> None:
    raw = (data_dir / PPL_DATASETS["wikitext2"]).read_text(encoding="utf-8")
    rows = [(line + "\n") if line.strip() else "" for line in raw.split("\n")[:-1]]
    assert len(rows) == 4358
    text = ppl_text("wikitext2", data_dir)
    assert text == "\n\n".join(rows)
    data = ppl_data("wikitext2", tiny_tokenizer, 128, data_dir)
    assert data.max_windows is None
    assert torch.equal(data.input_ids, ppl_token_ids("wikitext2", tiny_tokenizer, data_dir))
    assert "every non-overlapping window of 128" in data.note


def test_local_text_file_and_bad_names(tmp_path: Path, tiny_tokenizer) -> None:
    path = tmp_path / "my.txt"
    path.write_text("pruning removes weights. " * 50)
    data = ppl_data(str(path), tiny_tokenizer, 16)
    assert data.input_ids.shape[-1] > 16 and data.max_windows is None and str(path.name) in data.note
    with pytest.raises(ValueError, match="wikitext2, c4"):
        ppl_data("ptb", tiny_tokenizer, 16)
    with pytest.raises(EvalDataError, match=r"expected wikitext-2-raw/wiki\.test\.raw"):
        ppl_data("wikitext2", tiny_tokenizer, 16, tmp_path)


@pytest.mark.slow
def test_smollm2_wikitext2_two_windows(smollm2, data_dir: Path) -> None:
    data = ppl_data("wikitext2", smollm2.tokenizer, 2048, data_dir)
    res = perplexity(smollm2.model, data.input_ids, 2048, limit=2)
    assert res.windows == 2 and res.tokens == 2 * 2047
    assert math.isfinite(res.value) and 8.0 < res.value < 60.0  # first 40 windows average 20.35


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([b'{"text": "a"}', b"", b'{"text": broken'], r"line 3 is not valid JSON"),
        ([b'{"text": "a"}', b'["text"]'], r"line 2 is not a JSON object"),
        ([b'{"text": "a"}', b'{"body": "b"}'], r"line 2 has no 'text' field"),
        ([b'{"text": "a"}', b'{"text": "caf\xe9"}'], r"line 2 is not UTF-8 text \(byte 13"),
    ],
    ids=["json", "object", "field", "utf8"],
)
def test_malformed_c4_names_the_file_and_line(tmp_path: Path, lines: list[bytes], expected: str) -> None:
    """The evaluation corpora read JSONL through oneshot.data.read_jsonl: one line naming file and line."""
    path = tmp_path / PPL_DATASETS["c4"]
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wb") as fh:
        fh.write(b"\n".join(lines) + b"\n")
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(path))}: {expected}") as err:
        ppl_text("c4", tmp_path)
    assert "\n" not in str(err.value)
    path.write_bytes(b'{"text": "not gzip"}\n')
    with pytest.raises(DataFileError, match=rf"^cannot read {re.escape(str(path))}: "):
        ppl_text("c4", tmp_path)


def test_read_jsonl_plain_and_gzip(tmp_path: Path) -> None:
    rows = [{"text": "one", "n": 1}, {"text": "twö", "n": 2}]
    plain, packed = tmp_path / "a.jsonl", tmp_path / "a.jsonl.gz"
    plain.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_jsonl(plain) == rows and read_jsonl(packed, required=("text", "n")) == rows
    with pytest.raises(DataFileError, match=r"line 1 has no 'missing' field"):
        read_jsonl(plain, required=("missing",))
    with pytest.raises(DataFileError, match=r"cannot read .*nothere\.jsonl: No such file"):
        read_jsonl(tmp_path / "nothere.jsonl")
