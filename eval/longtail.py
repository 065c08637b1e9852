"""Long-tail degradation: where does pruning hurt more than the headline perplexity says?

`longtail_report` runs the dense and the pruned model once over the same token windows of several
*slices* of text and compares them per slice; this module only orchestrates. The parts:

- `oneshot.eval.slices`: the text slices (FLORES, Tatoeba, HumanEval, GSM8K, MATH) and their sampling;
- `oneshot.eval.frequency`: the token-frequency buckets ``freq/1`` … ``freq/5``, ``freq/unseen``;
- `oneshot.eval.token_stats`: per-token NLL of both models, KL(dense || pruned), per-slice sums;
- `oneshot.eval.flags`: the flag rule, and the same comparison for task accuracies (`task_deltas`).

Definitions. For every predicted token: ``nll_dense``, ``nll_pruned`` (next-token negative
log-likelihood, nats) and ``kl`` = KL(dense || pruned) of the two next-token distributions (nats). Per
slice: mean NLL of each model, perplexity = exp(mean NLL), mean KL, token count, and the **relative
degradation** ``rel_degradation = ppl_pruned / ppl_dense - 1 = exp(nll_pruned - nll_dense) - 1``
(0 = no loss; 0.25 = perplexity 25 % higher after pruning).

Slices:

- ``freq/1`` … ``freq/5``, ``freq/unseen``: token-frequency buckets. Token ids are counted over the C4
  train sample tokenized with the model's tokenizer and cut into 5 buckets of equal token mass in C4
  (``freq/1`` = most frequent, ``freq/5`` = the long tail of rare ids); ids never seen in the sample
  form ``freq/unseen``. Each *predicted* token of the reference windows (below) is assigned to the
  bucket of its id, so the buckets partition the aggregate's tokens.
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

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from oneshot.eval.corpora import PPL_DATASETS, EvalDataError, ppl_text
from oneshot.eval.flags import flag_slices, task_deltas
from oneshot.eval.frequency import N_FREQ_BUCKETS, FrequencyBuckets, frequency_buckets, token_counts
from oneshot.eval.slices import SliceText, available_slices
from oneshot.eval.token_stats import SliceStats, next_token_stats
from oneshot.models import max_positions

__all__ = ["FORMAT", "longtail_report"]

logger = logging.getLogger(__name__)

FORMAT = "oneshot-longtail/1"
REFERENCES = ("wikitext2", "c4")  # the aggregate's text, in order of preference (files: PPL_DATASETS)


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


def _vocab(model: Any, tokenizer: Any) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    size = int(emb.weight.shape[0]) if emb is not None and hasattr(emb, "weight") else 0
    return max(size, len(tokenizer))


def _reference_ids(tokenizer: Any, data_dir: Path | None, n_tokens: int) -> tuple[torch.Tensor, str]:
    """The first ``n_tokens`` of WikiText-2 test (C4 validation when missing) -> ((tokens,), name)."""
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
    max_pos = max_positions(dense_model.config)
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
        aggregate = {"name": ref_name, "source": PPL_DATASETS[ref_name or "wikitext2"], **ref_stats.to_dict()}
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
