"""Long-tail degradation: where does pruning hurt more than the headline perplexity says?

The dense and the pruned model run once over the same token windows of several *slices* of text; for
every predicted token we record

- ``nll_dense``, ``nll_pruned``: next-token negative log-likelihood (nats) under each model;
- ``kl``: KL(dense || pruned) = sum_v p_dense(v) * (log p_dense(v) - log p_pruned(v)) of the two
  next-token distributions (nats), computed in float32 in row chunks so that the vocab-sized logits
  (49152 for SmolLM2) never need more than a few MB at once.

Per slice: mean NLL of each model, perplexity = exp(mean NLL), mean KL, token count, and the
**relative degradation** ``rel_degradation = ppl_pruned / ppl_dense - 1 = exp(nll_pruned - nll_dense) - 1``
(0 = no loss; 0.25 = perplexity 25 % higher after pruning).

Slices:

- ``freq/1`` … ``freq/5``, ``freq/unseen``: token-frequency buckets. Token ids are counted over the C4
  train sample tokenized with the model's tokenizer and sorted by count (ties by id); the seen ids are cut
  into 5 buckets of equal token mass in C4 (``freq/1`` = the few most frequent ids that make up the first
  fifth of all C4 tokens, ``freq/5`` = the long tail of rare ids that make up the last fifth); ids never
  seen in the sample form ``freq/unseen``. Each *predicted* token of the reference windows (below) is
  assigned to the bucket of its id, so the buckets partition the aggregate's tokens.
- ``flores/<lang>`` (ne, si, km, ps) and ``flores/en`` (the aligned English sides of the same sampled
  sentences), ``tatoeba/<lang>`` for every Tatoeba language file and ``tatoeba/eng`` (aligned English),
  ``code/humaneval`` (prompt + canonical solution), ``math/gsm8k`` (question + answer, calculator
  annotations ``<<…>>`` removed) and ``math/competition`` (MATH problem + worked solution).

**Aggregate** = the reference windows: the first ``reference_tokens`` tokens of the WikiText-2 test set
(the C4 validation sample when WikiText-2 is missing; all slice tokens pooled when both are). A slice is
**flagged** when ``rel_degradation >= 2 * aggregate rel_degradation`` and the aggregate degradation is
positive (with no aggregate degradation nothing is flagged). Task accuracies (when given) are compared the
same way: relative accuracy drop ``1 - acc_pruned / acc_dense`` against the drop of the mean accuracy.

Sampling is deterministic for a seed: each slice shuffles its sentences / documents with
``random.Random(f"{seed}/{source}")``, keeps up to ``limit`` of them, joins them (sentences with a newline,
documents with a blank line), tokenizes the text once and keeps its first ``max_tokens_per_slice`` tokens,
cut into windows of ``seqlen`` (the last, shorter window is kept). A missing data file skips that slice
with a note naming the expected path.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from oneshot.data import data_dir_candidates
from oneshot.eval.corpora import EvalDataError

__all__ = [
    "FLORES_LANGS",
    "SLICES",
    "TATOEBA_LANGS",
    "FrequencyBuckets",
    "SliceStats",
    "available_slices",
    "flag_slices",
    "frequency_buckets",
    "longtail_report",
    "next_token_stats",
    "slice_texts",
    "task_deltas",
    "token_counts",
]

logger = logging.getLogger(__name__)

FORMAT = "oneshot-longtail/1"
FLORES_DIR = "multilingual/flores_v1"
TATOEBA_DIR = "multilingual/tatoeba"
FLORES_LANGS = ("ne", "si", "km", "ps")
TATOEBA_LANGS = (
    "amh", "ara", "cmn", "deu", "fin", "fra", "heb", "hin", "jpn", "kat", "kaz",
    "kor", "mon", "pol", "rus", "spa", "swh", "tel", "tur", "vie", "xho",
)  # fmt: skip
C4_TRAIN = "c4/c4-train.00000-of-01024.first1000.jsonl.gz"
REFERENCES = {"wikitext2": "wikitext-2-raw/wiki.test.raw", "c4": "c4/c4-validation.sample2000.jsonl.gz"}
HUMANEVAL = "code/HumanEval.jsonl.gz"
GSM8K = "math/gsm8k_test.jsonl"
MATH = "math/hendrycks_math_test.llmfoundry.jsonl.gz"
N_FREQ_BUCKETS = 5
_CHUNK_ELEMENTS = 1 << 22  # rows x vocab of fp32 log-probs handled at once (16 MB)


# --------------------------------------------------------------------------------------------------------
# Slice texts


@dataclass
class SliceText:
    """The sampled texts of one slice, in the order they are joined."""

    texts: list[str]
    joiner: str  # "\n" between sentences, "\n\n" between documents
    group: str  # language | code | math
    source: str  # relative path(s) in the data directory


Builder = Callable[[Path | None, int, int | None], SliceText]


def _find(rel: str, data_dir: Path | None) -> Path:
    looked = []
    for base in data_dir_candidates(data_dir):
        path = base / rel
        looked.append(str(path))
        if path.is_file():
            return path
    raise EvalDataError(f"missing data file: expected {rel} (looked at {', '.join(looked)})")


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    opener: Any = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _sample(n: int, key: str, seed: int, limit: int | None) -> list[int]:
    """Indices 0..n-1 shuffled by a generator seeded with ``f"{seed}/{key}"``, at most ``limit``."""
    rng = random.Random(f"{seed}/{key}")
    k = n if limit is None else min(n, max(0, limit))
    return rng.sample(range(n), k)


def _aligned(src: list[str], tgt: list[str], what: str) -> None:
    if len(src) != len(tgt):
        raise EvalDataError(f"{what}: the two sides are not line-aligned ({len(src)} vs {len(tgt)} lines)")


def _parallel(
    pairs: list[tuple[str, str, str]], data_dir: Path | None, seed: int, limit: int | None, side: int
) -> tuple[list[str], list[str]]:
    """Sampled lines of parallel files. ``pairs``: (key, foreign rel path, English rel path); ``side`` 0
    gives the foreign side of the first pair, 1 the English sides of every pair found, interleaved."""
    per_pair: list[list[str]] = []
    sources: list[str] = []
    missing: list[str] = []
    for key, rel_x, rel_en in pairs:
        try:
            x, en = _lines(_find(rel_x, data_dir)), _lines(_find(rel_en, data_dir))
        except EvalDataError as exc:
            if side == 0:
                raise
            missing.append(str(exc))
            continue
        _aligned(x, en, rel_x)
        keep = [i for i in _sample(len(x), key, seed, None) if x[i].strip() and en[i].strip()]
        keep = keep if limit is None else keep[:limit]
        per_pair.append([(x if side == 0 else en)[i].strip() for i in keep])
        sources.append(rel_x if side == 0 else rel_en)
    if not per_pair:
        raise EvalDataError("; ".join(missing) or "no parallel files")
    # English sides: interleave the pairs so that a token budget takes a fair share of each.
    out = [s for group in _interleave(per_pair) for s in group]
    return (out if limit is None else out[:limit]), sources


def _interleave(lists: list[list[str]]) -> list[list[str]]:
    longest = max(len(x) for x in lists)
    return [[x[i] for x in lists if i < len(x)] for i in range(longest)]


def _flores(lang: str) -> Builder:
    def build(data_dir: Path | None, seed: int, limit: int | None) -> SliceText:
        rel = f"{FLORES_DIR}/wikipedia.devtest.{lang}-en"
        texts, src = _parallel([(f"flores/{lang}", f"{rel}.{lang}", f"{rel}.en")], data_dir, seed, limit, 0)
        return SliceText(texts, "\n", "language", ", ".join(src))

    return build


def _flores_en(data_dir: Path | None, seed: int, limit: int | None) -> SliceText:
    pairs = [
        (
            f"flores/{lang}",
            f"{FLORES_DIR}/wikipedia.devtest.{lang}-en.{lang}",
            f"{FLORES_DIR}/wikipedia.devtest.{lang}-en.en",
        )
        for lang in FLORES_LANGS
    ]
    texts, src = _parallel(pairs, data_dir, seed, limit, 1)
    return SliceText(texts, "\n", "language", ", ".join(src))


def _tatoeba_pair(lang: str) -> tuple[str, str, str]:
    return (
        f"tatoeba/{lang}",
        f"{TATOEBA_DIR}/tatoeba.{lang}-eng.{lang}",
        f"{TATOEBA_DIR}/tatoeba.{lang}-eng.eng",
    )


def _tatoeba(lang: str) -> Builder:
    def build(data_dir: Path | None, seed: int, limit: int | None) -> SliceText:
        texts, src = _parallel([_tatoeba_pair(lang)], data_dir, seed, limit, 0)
        return SliceText(texts, "\n", "language", ", ".join(src))

    return build


def _tatoeba_langs(data_dir: Path | None) -> list[str]:
    """Known Tatoeba languages plus any other ``tatoeba.xxx-eng.xxx`` file in the data directory."""
    langs = set(TATOEBA_LANGS)
    for base in data_dir_candidates(data_dir):
        folder = base / TATOEBA_DIR
        if folder.is_dir():
            for path in folder.glob("tatoeba.*-eng.*"):
                m = re.fullmatch(r"tatoeba\.([a-z]+)-eng\.([a-z]+)", path.name)
                if m and m.group(1) == m.group(2) and m.group(1) != "eng":
                    langs.add(m.group(1))
            break
    return sorted(langs)


def _tatoeba_en(data_dir: Path | None, seed: int, limit: int | None) -> SliceText:
    pairs = [_tatoeba_pair(lang) for lang in _tatoeba_langs(data_dir)]
    texts, src = _parallel(pairs, data_dir, seed, limit, 1)
    return SliceText(texts, "\n", "language", f"{TATOEBA_DIR}/tatoeba.*-eng.eng ({len(src)} files)")


def _docs(rel: str, key: str, make: Callable[[dict[str, Any]], str], group: str) -> Builder:
    def build(data_dir: Path | None, seed: int, limit: int | None) -> SliceText:
        path = _find(rel, data_dir)
        try:
            rows = [make(r) for r in _jsonl(path)]
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise EvalDataError(f"{path}: unexpected record layout ({type(exc).__name__}: {exc})") from exc
        rows = [r for r in rows if r.strip()]
        return SliceText([rows[i] for i in _sample(len(rows), key, seed, limit)], "\n\n", group, rel)

    return build


def _humaneval(r: dict[str, Any]) -> str:
    return str(r["prompt"]) + str(r["canonical_solution"])


def _gsm8k(r: dict[str, Any]) -> str:
    answer = re.sub(r"<<[^>]*>>", "", str(r["answer"]))  # calculator annotations
    return f"{r['question']}\n{answer}"


def _math(r: dict[str, Any]) -> str:
    solution = r.get("chain_of_thought") or r["answer"]
    return f"{r['context']}\n{solution}"


SLICES: dict[str, Builder] = {
    **{f"flores/{lang}": _flores(lang) for lang in FLORES_LANGS},
    "flores/en": _flores_en,
    **{f"tatoeba/{lang}": _tatoeba(lang) for lang in TATOEBA_LANGS},
    "tatoeba/eng": _tatoeba_en,
    "code/humaneval": _docs(HUMANEVAL, "code/humaneval", _humaneval, "code"),
    "math/gsm8k": _docs(GSM8K, "math/gsm8k", _gsm8k, "math"),
    "math/competition": _docs(MATH, "math/competition", _math, "math"),
}
"""Text slices: name -> builder(data_dir, seed, limit). The frequency buckets are computed separately."""


def available_slices(data_dir: str | os.PathLike[str] | None = None) -> dict[str, Builder]:
    """`SLICES` plus a ``tatoeba/<lang>`` slice for every other Tatoeba language file in the data dir."""
    out = dict(SLICES)
    base = Path(data_dir) if data_dir is not None else None
    for lang in _tatoeba_langs(base):
        out.setdefault(f"tatoeba/{lang}", _tatoeba(lang))
    return out


def slice_texts(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, seed: int = 0, limit: int | None = None
) -> SliceText:
    """The sampled texts of one slice (raises `EvalDataError` when its data file is missing)."""
    registry = available_slices(data_dir)
    if name not in registry:
        raise ValueError(f"unknown long-tail slice {name!r}: choose from {', '.join(sorted(registry))}")
    return registry[name](Path(data_dir) if data_dir is not None else None, seed, limit)


def _budget_ids(piece: SliceText, tokenizer: Any, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` token ids of the joined texts -> (tokens,) int64.

    Tokenizes a growing prefix of the texts (doubling) so a large corpus is never tokenized whole."""
    n = min(len(piece.texts), 16)
    while True:
        text = piece.joiner.join(piece.texts[:n])
        ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids.reshape(-1)
        if ids.numel() > max_tokens or n >= len(piece.texts):
            return ids[:max_tokens].to(torch.long)
        n = min(2 * n, len(piece.texts))


def _cut(ids: torch.Tensor, seqlen: int) -> list[torch.Tensor]:
    """Non-overlapping windows of a (tokens,) stream; the last shorter one is kept if it predicts anything."""
    return [ids[s : s + seqlen] for s in range(0, ids.numel(), seqlen) if ids[s : s + seqlen].numel() >= 2]


# --------------------------------------------------------------------------------------------------------
# Token frequency buckets


def token_counts(
    tokenizer: Any, vocab_size: int, data_dir: str | os.PathLike[str] | None = None, docs: int | None = None
) -> tuple[torch.Tensor, str]:
    """Occurrences of every token id in the C4 train sample -> ((vocab_size,) int64, source path)."""
    path = _find(C4_TRAIN, Path(data_dir) if data_dir is not None else None)
    rows = [str(r["text"]) for r in _jsonl(path)][:docs]
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for start in range(0, len(rows), 64):
        enc = tokenizer(rows[start : start + 64], add_special_tokens=False, verbose=False).input_ids
        flat = torch.tensor([t for doc in enc for t in doc], dtype=torch.long)
        flat = flat[flat < vocab_size]
        counts += torch.bincount(flat, minlength=vocab_size)
    return counts, str(path)


@dataclass
class FrequencyBuckets:
    """Token id -> frequency bucket. Buckets 0..n-1 hold seen ids from most to least frequent, with
    about equal reference-corpus token mass each; bucket n holds the ids never seen."""

    bucket_of: torch.Tensor  # (vocab,) int64
    names: list[str]
    info: list[dict[str, Any]] = field(default_factory=list)


def frequency_buckets(counts: torch.Tensor, n_buckets: int = N_FREQ_BUCKETS) -> FrequencyBuckets:
    """Split token ids into ``n_buckets`` equal-mass frequency buckets plus an ``unseen`` bucket.

    ``counts``: (vocab,) occurrences in the reference corpus. Ids are ranked by count (descending, ties
    by id); an id of rank r goes to bucket ``floor(n_buckets * mass_before(r) / total)``, where
    ``mass_before`` is the count of all higher-ranked ids. Ids with count 0 go to bucket ``n_buckets``.
    """
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    counts = counts.reshape(-1).to(torch.long)
    vocab = counts.numel()
    ids = torch.arange(vocab)
    # rank by count descending, ties by ascending id (stable sort on -count)
    order = torch.sort(-counts, stable=True).indices
    sorted_counts = counts[order]
    total = int(counts.sum())
    bucket_of = torch.full((vocab,), n_buckets, dtype=torch.long)
    if total > 0:
        before = torch.cumsum(sorted_counts, 0) - sorted_counts  # mass of higher-ranked ids
        b = torch.clamp((before * n_buckets) // total, max=n_buckets - 1)
        b = torch.where(sorted_counts > 0, b, torch.full_like(b, n_buckets))
        bucket_of[order] = b
    names = [f"freq/{i + 1}" for i in range(n_buckets)] + ["freq/unseen"]
    rank = torch.empty(vocab, dtype=torch.long)
    rank[order] = ids
    info = []
    for i, name in enumerate(names):
        sel = bucket_of == i
        n = int(sel.sum())
        entry: dict[str, Any] = {"name": name, "bucket": i, "types": n}
        if n:
            entry.update(
                rank_first=int(rank[sel].min()) + 1,
                rank_last=int(rank[sel].max()) + 1,
                count_max=int(counts[sel].max()),
                count_min=int(counts[sel].min()),
                mass=float(counts[sel].sum()) / total if total else 0.0,
            )
        entry["label"] = _bucket_label(entry, n_buckets)
        info.append(entry)
    return FrequencyBuckets(bucket_of, names, info)


def _bucket_label(entry: dict[str, Any], n_buckets: int) -> str:
    i = entry["bucket"]
    if i == n_buckets:
        return "ids unseen in the reference corpus"
    if not entry["types"]:
        return "empty"
    where = "most frequent" if i == 0 else ("rarest seen" if i == n_buckets - 1 else f"bucket {i + 1}")
    return (
        f"{where}: ranks {entry['rank_first']}-{entry['rank_last']}, "
        f"{entry['count_min']}-{entry['count_max']} occurrences"
    )


# --------------------------------------------------------------------------------------------------------
# Per-token statistics


def next_token_stats(
    dense_logits: torch.Tensor,
    pruned_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position NLL of both models and KL(dense || pruned), in float32.

    ``dense_logits``, ``pruned_logits``: (T, V) logits predicting ``targets`` (T,) (already shifted:
    row t predicts targets[t]). Rows are processed in chunks of ``chunk_rows`` (default: about 4M
    elements per chunk) so that only a few (chunk, V) float32 tensors exist at once.
    Returns ``nll_dense`` (T,), ``nll_pruned`` (T,), ``kl`` (T,).
    """
    if dense_logits.shape != pruned_logits.shape or dense_logits.ndim != 2:
        raise ValueError(
            f"dense and pruned logits must both be (tokens, vocab), got {tuple(dense_logits.shape)} "
            f"and {tuple(pruned_logits.shape)}"
        )
    rows, vocab = dense_logits.shape
    if targets.shape != (rows,):
        raise ValueError(f"targets must be ({rows},), got {tuple(targets.shape)}")
    step = chunk_rows or max(1, _CHUNK_ELEMENTS // max(1, vocab))
    nll_d, nll_p, kl = [], [], []
    pruned_logits = pruned_logits.to(dense_logits.device)
    targets = targets.to(dense_logits.device)
    for s in range(0, rows, step):
        ld = F.log_softmax(dense_logits[s : s + step].float(), dim=-1)  # (chunk, V)
        lp = F.log_softmax(pruned_logits[s : s + step].float(), dim=-1)  # (chunk, V)
        t = targets[s : s + step, None]  # (chunk, 1)
        nll_d.append(-ld.gather(1, t).squeeze(1))
        nll_p.append(-lp.gather(1, t).squeeze(1))
        kl.append((ld.exp() * (ld - lp)).sum(-1))
        del ld, lp
    return torch.cat(nll_d).cpu(), torch.cat(nll_p).cpu(), torch.cat(kl).cpu()


@dataclass
class SliceStats:
    """Running sums over the predicted tokens of a slice (float64)."""

    tokens: int = 0
    windows: int = 0
    nll_dense: float = 0.0
    nll_pruned: float = 0.0
    kl: float = 0.0
    delta_sq: float = 0.0  # sum of (nll_pruned - nll_dense)^2, for a standard error

    def add(self, nll_d: torch.Tensor, nll_p: torch.Tensor, kl: torch.Tensor) -> None:
        d = nll_p.double() - nll_d.double()
        self.tokens += nll_d.numel()
        self.nll_dense += float(nll_d.double().sum())
        self.nll_pruned += float(nll_p.double().sum())
        self.kl += float(kl.double().sum())
        self.delta_sq += float((d * d).sum())

    def to_dict(self) -> dict[str, Any]:
        """Means over tokens; ``rel_degradation = ppl_pruned / ppl_dense - 1``."""
        n = self.tokens
        if n == 0:
            return {"tokens": 0, "windows": self.windows}
        md, mp = self.nll_dense / n, self.nll_pruned / n
        delta = mp - md
        var = max(0.0, self.delta_sq / n - delta * delta)
        return {
            "tokens": n,
            "windows": self.windows,
            "nll_dense": md,
            "nll_pruned": mp,
            "ppl_dense": _exp(md),
            "ppl_pruned": _exp(mp),
            "delta_nll": delta,
            "delta_nll_se": math.sqrt(var / (n - 1)) if n > 1 else None,
            "rel_degradation": math.expm1(delta) if delta < 700 else math.inf,
            "kl": self.kl / n,
        }


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


# --------------------------------------------------------------------------------------------------------
# Flags and task deltas


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


# --------------------------------------------------------------------------------------------------------
# The report


def _max_positions(model: Any) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _vocab(model: Any, tokenizer: Any) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    size = int(emb.weight.shape[0]) if emb is not None and hasattr(emb, "weight") else 0
    return max(size, len(tokenizer))


def _reference_ids(tokenizer: Any, data_dir: Path | None, n_tokens: int) -> tuple[torch.Tensor, str]:
    """The first ``n_tokens`` of WikiText-2 test (C4 validation when missing) -> ((tokens,), name)."""
    from oneshot.eval.corpora import ppl_text

    errors = []
    for name in REFERENCES:
        try:
            text = ppl_text(name, data_dir)
        except EvalDataError as exc:
            errors.append(str(exc))
            continue
        # a generous character prefix so the whole corpus is never tokenized for a few windows
        prefix = text[: max(64 * n_tokens, 4096)]
        ids = tokenizer(prefix, return_tensors="pt", verbose=False).input_ids.reshape(-1)
        return ids[:n_tokens].to(torch.long), name
    raise EvalDataError("; ".join(errors))


class _Models:
    """Runs dense and pruned on the same window; optionally moves both to ``device`` for the duration."""

    def __init__(self, dense: Any, pruned: Any, device: torch.device | str | None) -> None:
        self.dense, self.pruned = dense, pruned
        self.device = torch.device(device) if device is not None else None
        self._restore: list[tuple[Any, torch.device, bool]] = []

    def __enter__(self) -> _Models:
        for m in (self.dense, self.pruned):
            self._restore.append((m, next(m.parameters()).device, m.training))
            if self.device is not None:
                m.to(self.device)
            m.eval()
        return self

    def __exit__(self, *exc: object) -> None:
        for m, dev, training in self._restore:
            if self.device is not None:
                m.to(dev)
            m.train(training)

    @torch.no_grad()
    def window(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L,) ids -> nll_dense, nll_pruned, kl, targets, each (L-1,)."""
        logits = []
        for m in (self.dense, self.pruned):
            dev = next(m.parameters()).device
            out = m(input_ids=ids[None].to(dev), use_cache=False).logits[0, :-1]  # (L-1, V)
            logits.append(out)
        targets = ids[1:]
        nd, np_, kl = next_token_stats(logits[0], logits[1], targets)
        return nd, np_, kl, targets


def longtail_report(
    dense_model: Any,
    pruned_model: Any,
    tokenizer: Any,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    limit: int | None = None,
    max_tokens_per_slice: int = 1024,
    seqlen: int = 512,
    device: torch.device | str | None = None,
    task_results: dict[str, Any] | None = None,
    baseline_task_results: dict[str, Any] | None = None,
    slices: list[str] | None = None,
    frequency: bool = True,
    n_buckets: int = N_FREQ_BUCKETS,
    reference_tokens: int = 4096,
    frequency_docs: int | None = None,
    factor: float = 2.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Dense vs pruned on long-tail slices (see the module docstring for every definition).

    ``limit``: sentences / documents sampled per slice (None = all, then ``max_tokens_per_slice`` caps
    it). ``slices``: names from `available_slices` (None = all). ``reference_tokens``: tokens of the
    aggregate windows that the frequency buckets partition. ``frequency_docs``: C4 train documents
    counted for the frequency table (None = all 1000). Returns a JSON-serialisable dict.

    Cost: two forwards (dense and pruned) over about ``31 * max_tokens_per_slice + reference_tokens``
    tokens with every slice present (about 36k tokens with the defaults); SmolLM2-135M on 2 CPU cores
    takes about 10 s per 512-token window pair, so about 12 minutes there, and seconds on a GPU.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if max_tokens_per_slice < 2:
        raise ValueError(f"max_tokens_per_slice must be >= 2, got {max_tokens_per_slice}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all), got {limit}")
    base = Path(data_dir).expanduser() if data_dir is not None else None
    registry = available_slices(base)
    names = list(registry) if slices is None else list(slices)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(
            f"unknown long-tail slice(s) {', '.join(map(repr, unknown))}: choose from {', '.join(sorted(registry))}"
        )
    notes: list[str] = []
    max_pos = _max_positions(dense_model)
    if max_pos is not None and seqlen > max_pos:
        notes.append(f"seqlen lowered from {seqlen} to the model's context of {max_pos} tokens")
        seqlen = max_pos

    # 1. token windows of every slice (cheap) ------------------------------------------------------------
    skipped: list[dict[str, str]] = []
    plan: list[tuple[str, dict[str, Any], list[torch.Tensor]]] = []
    for name in names:
        try:
            piece = registry[name](base, seed, limit)
        except EvalDataError as exc:
            skipped.append({"name": name, "reason": str(exc)})
            logger.warning("long-tail slice %s skipped: %s", name, exc)
            continue
        if not piece.texts:
            skipped.append({"name": name, "reason": "no text"})
            continue
        ids = _budget_ids(piece, tokenizer, max_tokens_per_slice)
        meta = {"name": name, "group": piece.group, "source": piece.source, "texts": len(piece.texts)}
        plan.append((name, meta, _cut(ids, seqlen)))

    ref_windows: list[torch.Tensor] = []
    ref_name: str | None = None
    try:
        ref_ids, ref_name = _reference_ids(tokenizer, base, reference_tokens)
        ref_windows = _cut(ref_ids, seqlen)
    except EvalDataError as exc:
        notes.append(f"no reference text for the aggregate and the frequency buckets: {exc}")

    buckets: FrequencyBuckets | None = None
    freq_info: dict[str, Any] = {"enabled": frequency}
    if frequency and ref_windows:
        try:
            counts, src = token_counts(tokenizer, _vocab(dense_model, tokenizer), base, frequency_docs)
            buckets = frequency_buckets(counts, n_buckets)
            freq_info.update(
                reference_corpus=src,
                reference_corpus_tokens=int(counts.sum()),
                evaluated_on=ref_name,
                n_buckets=n_buckets,
                buckets=buckets.info,
                definition=(
                    "ids ranked by count in the reference corpus; seen ids cut into equal-mass buckets "
                    "(freq/1 = most frequent); ids with count 0 form freq/unseen; each predicted token of the "
                    "aggregate windows is assigned to the bucket of its id"
                ),
            )
        except EvalDataError as exc:
            skipped.append({"name": "freq/*", "reason": str(exc)})
            logger.warning("frequency buckets skipped: %s", exc)

    # 2. one pass of both models over every window -------------------------------------------------------
    stats = {name: SliceStats() for name, _, _ in plan}
    ref_stats = SliceStats()
    pooled = SliceStats()
    nb = n_buckets + 1
    bucket_sums = torch.zeros(4, nb, dtype=torch.float64)  # rows: tokens, nll_dense, nll_pruned, kl
    bucket_delta_sq = torch.zeros(nb, dtype=torch.float64)
    bucket_windows = torch.zeros(nb, dtype=torch.long)
    jobs: list[tuple[str | None, torch.Tensor]] = [(None, w) for w in ref_windows]
    jobs += [(name, w) for name, _, ws in plan for w in ws]
    with _Models(dense_model, pruned_model, device) as models:
        for name, w in tqdm(jobs, desc="long-tail", unit="window", disable=not progress, leave=False):
            nd, np_, kl, targets = models.window(w)
            if name is not None:
                stats[name].add(nd, np_, kl)
                stats[name].windows += 1
                pooled.add(nd, np_, kl)
                pooled.windows += 1
                continue
            ref_stats.add(nd, np_, kl)
            ref_stats.windows += 1
            if buckets is not None:
                b = buckets.bucket_of[targets.clamp(max=buckets.bucket_of.numel() - 1)]
                vals = torch.stack([torch.ones_like(nd), nd, np_, kl]).double()  # (4, L-1)
                bucket_sums.index_add_(1, b, vals)
                d = (np_ - nd).double()
                bucket_delta_sq.index_add_(0, b, d * d)
                bucket_windows[torch.unique(b)] += 1

    # 3. aggregate, flags --------------------------------------------------------------------------------
    out_slices: list[dict[str, Any]] = []
    if buckets is not None:
        for i, bname in enumerate(buckets.names):
            bs = SliceStats(
                tokens=int(bucket_sums[0, i]),
                windows=int(bucket_windows[i]),
                nll_dense=float(bucket_sums[1, i]),
                nll_pruned=float(bucket_sums[2, i]),
                kl=float(bucket_sums[3, i]),
                delta_sq=float(bucket_delta_sq[i]),
            )
            info = buckets.info[i]
            entry = {"name": bname, "group": "frequency", "source": ref_name, "label": info["label"]}
            out_slices.append({**entry, **bs.to_dict()})
    for name, meta, _ in plan:
        out_slices.append({**meta, **stats[name].to_dict()})

    if ref_stats.tokens:
        aggregate = {"name": ref_name, "source": REFERENCES[ref_name or "wikitext2"], **ref_stats.to_dict()}
        aggregate["definition"] = f"the first {ref_stats.tokens + ref_stats.windows} tokens of {ref_name}"
    else:
        aggregate = {"name": "pooled", "source": "all slices", **pooled.to_dict()}
        aggregate["definition"] = "all tokens of all slices together (no reference text available)"
    agg_rel = aggregate.get("rel_degradation")
    flagged = flag_slices(out_slices, agg_rel, factor)
    if agg_rel is not None and agg_rel <= 0:
        notes.append("the aggregate shows no degradation, so no slice is flagged")

    tasks = task_deltas(task_results, baseline_task_results, factor) if task_results else None
    return {
        "format": FORMAT,
        "definitions": {
            "nll": "mean next-token negative log-likelihood over the slice's predicted tokens (nats)",
            "ppl": "exp(nll)",
            "kl": "mean over predicted tokens of KL(dense || pruned) of the next-token distributions (nats)",
            "rel_degradation": "ppl_pruned / ppl_dense - 1 = exp(nll_pruned - nll_dense) - 1",
            "delta_nll_se": "standard error of the mean per-token (nll_pruned - nll_dense)",
            "flag": f"rel_degradation >= {factor:g} x the aggregate's rel_degradation (and the aggregate's > 0)",
            "aggregate": aggregate["definition"],
        },
        "seed": seed,
        "limit": limit,
        "seqlen": seqlen,
        "max_tokens_per_slice": max_tokens_per_slice,
        "factor": factor,
        "aggregate": aggregate,
        "pooled": {"name": "pooled", **pooled.to_dict()},
        "slices": out_slices,
        "flagged": flagged,
        "frequency": freq_info,
        "tasks": tasks,
        "skipped": skipped,
        "notes": notes,
        "seconds": time.perf_counter() - t0,
    }
