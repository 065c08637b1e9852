"""Token-frequency buckets of the long-tail report: how often each token id occurs in a reference corpus.

This module owns the counting of token ids over the C4 train sample (`token_counts`) and their split into
buckets of equal token mass (`frequency_buckets`). Ids are sorted by count (ties by id); the seen ids
are cut into ``n_buckets`` buckets of equal token mass in C4 (``freq/1`` = the few most frequent ids
that make up the first fifth of all C4 tokens, ``freq/5`` = the long tail of rare ids that make up the
last fifth); ids never seen in the sample form ``freq/unseen``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from oneshot.data import read_jsonl
from oneshot.eval.corpora import find_data_file

__all__ = ["C4_TRAIN", "N_FREQ_BUCKETS", "FrequencyBuckets", "frequency_buckets", "token_counts"]

C4_TRAIN = "c4/c4-train.00000-of-01024.first1000.jsonl.gz"
N_FREQ_BUCKETS = 5


def token_counts(
    tokenizer: Any, vocab_size: int, data_dir: str | os.PathLike[str] | None = None, docs: int | None = None
) -> tuple[torch.Tensor, str]:
    """Occurrences of every token id in the C4 train sample -> ((vocab_size,) int64, source path).

    ``docs``: the first documents counted (None = all). Raises `EvalDataError` when the file is missing.
    """
    path = find_data_file(C4_TRAIN, data_dir)
    rows = [str(r["text"]) for r in read_jsonl(path, required=("text",))][:docs]
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
