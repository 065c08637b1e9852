"""Long-tail degradation: where does pruning hurt more than the headline perplexity says?

`longtail_report` runs the dense and the pruned model once over the same token windows of several
*slices* of text and compares them per slice; this module only orchestrates. The parts:

- `oneshot.eval.slices`: the text slices (FLORES, Tatoeba, HumanEval, GSM8K, MATH) and their sampling;
- `oneshot.eval.frequency`: the token-frequency buckets ``freq/1`` … ``freq/5``, ``freq/unseen``;
- `oneshot.eval.token_stats`: per-token NLL of both models, KL(dense || pruned), per-slice sums;
- `oneshot.eval.flags`: the flag rule; task accuracies are compared by `oneshot.eval.task_compare`.

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
- Controls ``<language slice>:en``: the English side of exactly the sentences a language slice holds. Each
  language slice is compared with its control (``vs_control``): how much more it degrades than the same
  content in English, which separates "this language suffers" from "this kind of text suffers".

**Aggregate** = the reference windows: about ``reference_tokens`` tokens in windows of
``min(seqlen, max_tokens_per_slice)`` tokens at seeded random, non-overlapping positions of the whole
WikiText-2 test stream (the C4 validation sample when WikiText-2 is missing; all slice tokens pooled when
both are), so that the aggregate and the frequency buckets hold tokens of many articles.

**Flags** (`oneshot.eval.flags.flag_slices`), on the NLL (log) scale, where "twice as much" does not drift
with the sparsity level: a slice is flagged when its mean per-token NLL increase ``delta_nll`` exceeds
``factor * max(aggregate delta_nll, 0)`` significantly: one-sided z-test with the cluster-robust standard
errors of both (clusters of `BLOCK_TOKENS` consecutive tokens, since neighbouring tokens are correlated),
Holm-corrected over all tested slices at family-wise error 0.05. A slice of fewer than 4 clusters is
"too small" and not tested. Every slice reports its token count, its SE, the p-value and the status.

Sampling is deterministic for a seed: each slice shuffles its sentences / documents with
``random.Random(f"{seed}/{source}")``, keeps up to ``limit`` of them, and keeps as many leading ones whole
as fit in ``max_tokens_per_slice`` tokens once joined (sentences with a newline, documents with a blank
line; a single longer document is cut), cut into windows of ``seqlen`` (the last, shorter window is
kept). A missing data file skips that slice with a note naming the expected path.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from oneshot.eval.corpora import PPL_DATASETS, EvalDataError, ppl_token_ids
from oneshot.eval.flags import ALPHA, control_comparison, flag_slices
from oneshot.eval.frequency import N_FREQ_BUCKETS, FrequencyBuckets, frequency_buckets, token_counts
from oneshot.eval.slices import available_slices
from oneshot.eval.task_compare import task_comparison
from oneshot.eval.token_stats import BLOCK_TOKENS, SliceStats, next_token_stats
from oneshot.models import max_positions

__all__ = ["FORMAT", "longtail_report"]

logger = logging.getLogger(__name__)

FORMAT = "oneshot-longtail/1"
REFERENCES = ("wikitext2", "c4")  # the aggregate's text, in order of preference (files: PPL_DATASETS)


def _budget(texts: list[str], joiner: str, tokenizer: Any, max_tokens: int) -> int:
    """The largest ``k >= 1`` whose first ``k`` texts, joined, tokenize to at most ``max_tokens`` tokens."""
    k = 1
    while k < len(texts):
        n = len(tokenizer(joiner.join(texts[: k + 1]), verbose=False).input_ids)
        if n > max_tokens:
            break
        k += 1
    return k


def _ids(texts: list[str], joiner: str, tokenizer: Any, max_tokens: int) -> torch.Tensor:
    """The token ids of the joined texts, at most ``max_tokens`` -> (tokens,) int64."""
    ids = tokenizer(joiner.join(texts), return_tensors="pt", verbose=False).input_ids.reshape(-1)
    return ids[:max_tokens].to(torch.long)


def _cut(ids: torch.Tensor, seqlen: int) -> list[torch.Tensor]:
    """Non-overlapping windows of a (tokens,) stream; the last shorter one is kept if it predicts anything."""
    return [ids[s : s + seqlen] for s in range(0, ids.numel(), seqlen) if ids[s : s + seqlen].numel() >= 2]


def _vocab(model: Any, tokenizer: Any) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    size = int(emb.weight.shape[0]) if emb is not None and hasattr(emb, "weight") else 0
    return max(size, len(tokenizer))


def _reference_windows(
    tokenizer: Any, data_dir: Path | None, n_tokens: int, length: int, seed: int
) -> tuple[list[torch.Tensor], str, dict[str, Any]]:
    """Windows of ``length`` tokens at seeded random, non-overlapping positions of the whole WikiText-2 test
    stream (C4 validation when missing), about ``n_tokens`` in all -> (windows, name, where they came from).

    Spreading the windows over the corpus puts tokens of many articles into the aggregate and so into
    every frequency bucket (the first tokens of the file are one or two articles)."""
    errors = []
    for name in REFERENCES:
        try:
            stream = ppl_token_ids(name, tokenizer, data_dir).reshape(-1)
        except EvalDataError as exc:
            errors.append(str(exc))
            continue
        length = max(2, min(length, stream.numel()))
        slots = stream.numel() // length
        count = min(slots, max(1, math.ceil(n_tokens / length)))
        starts = sorted(s * length for s in random.Random(f"{seed}/reference").sample(range(slots), count))
        where = {"corpus_tokens": int(stream.numel()), "window_tokens": length, "starts": starts}
        return [stream[s : s + length] for s in starts], name, where
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
    reference_tokens: int = 8192,
    frequency_docs: int | None = None,
    factor: float = 2.0,
    controls: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Dense vs pruned on long-tail slices (see the module docstring for every definition).

    ``limit``: sentences / documents sampled per slice (None = all, then ``max_tokens_per_slice`` caps
    it). ``slices``: names from `available_slices` (None = all). ``reference_tokens``: tokens of the
    aggregate windows that the frequency buckets partition, spread over the reference corpus in windows of
    ``min(seqlen, max_tokens_per_slice)`` tokens. ``frequency_docs``: C4 train documents counted for the
    frequency table (None = all 1000). ``controls``: also run the English side of every language slice's
    sentences. Returns a JSON-serialisable dict.

    Cost: two forwards (dense and pruned) over about ``55 * max_tokens_per_slice + reference_tokens``
    tokens with every slice and control present (English controls are shorter than their language);
    SmolLM2-135M on 2 CPU cores takes about 10 s per 512-token window pair, so 15-20 minutes there, and
    seconds on a GPU.
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

    # 1. token windows of every slice and control (cheap) ---------------------------------------------------
    skipped: list[dict[str, str]] = []
    plan: list[tuple[str, dict[str, Any], list[torch.Tensor]]] = []
    control_plan: list[tuple[str, dict[str, Any], list[torch.Tensor]]] = []
    control_of: dict[str, str] = {}
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
        k = _budget(piece.texts, piece.joiner, tokenizer, max_tokens_per_slice)
        ids = _ids(piece.texts[:k], piece.joiner, tokenizer, max_tokens_per_slice)
        meta = {"name": name, "group": piece.group, "source": piece.source, "texts": k}
        plan.append((name, meta, _cut(ids, seqlen)))
        if controls and piece.control is not None:
            cname = f"{name}:en"
            en = _ids(piece.control[:k], piece.joiner, tokenizer, max_tokens_per_slice)
            cmeta = {"name": cname, "group": "control", "source": piece.control_source, "texts": k}
            control_plan.append((cname, cmeta, _cut(en, seqlen)))
            control_of[name] = cname

    ref_windows: list[torch.Tensor] = []
    ref_name: str | None = None
    ref_where: dict[str, Any] = {}
    try:
        ref_windows, ref_name, ref_where = _reference_windows(
            tokenizer, base, reference_tokens, min(seqlen, max_tokens_per_slice), seed
        )
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
                    f"aggregate windows ({len(ref_windows)} windows at random positions of {ref_name}) is "
                    "assigned to the bucket of its id"
                ),
            )
        except EvalDataError as exc:
            skipped.append({"name": "freq/*", "reason": str(exc)})
            logger.warning("frequency buckets skipped: %s", exc)

    # 2. one pass of both models over every window -------------------------------------------------------
    every = plan + control_plan
    stats = {name: SliceStats() for name, _, _ in every}
    ref_stats = SliceStats()
    pooled = SliceStats()
    n_b = len(buckets.names) if buckets is not None else 0
    bucket_stats = [SliceStats() for _ in range(n_b)]
    control_names = set(control_of.values())
    jobs: list[tuple[str | None, torch.Tensor]] = [(None, w) for w in ref_windows]
    jobs += [(name, w) for name, _, ws in every for w in ws]
    with _Models(dense_model, pruned_model, device) as models:
        for name, w in tqdm(jobs, desc="long-tail", unit="window", disable=not progress, leave=False):
            nd, np_, kl, targets = models.window(w)
            if name is not None:
                stats[name].add(nd, np_, kl)
                stats[name].windows += 1
                if name not in control_names:
                    pooled.add(nd, np_, kl)
                    pooled.windows += 1
                continue
            ref_stats.add(nd, np_, kl)
            ref_stats.windows += 1
            if buckets is not None:
                b = buckets.bucket_of[targets.clamp(max=buckets.bucket_of.numel() - 1)]
                for i in torch.unique(b).tolist():
                    mask = b == i
                    bucket_stats[i].add(nd[mask], np_[mask], kl[mask])
                    bucket_stats[i].windows += 1

    # 3. aggregate, flags, controls ------------------------------------------------------------------------
    out_slices: list[dict[str, Any]] = []
    if buckets is not None:
        for i, bname in enumerate(buckets.names):
            info = buckets.info[i]
            entry = {"name": bname, "group": "frequency", "source": ref_name, "label": info["label"]}
            out_slices.append({**entry, **bucket_stats[i].to_dict()})
    for name, meta, _ in plan:
        out_slices.append({**meta, **stats[name].to_dict()})
    out_controls = [{**meta, **stats[name].to_dict()} for name, meta, _ in control_plan]

    if ref_stats.tokens:
        aggregate = {"name": ref_name, "source": PPL_DATASETS[ref_name or "wikitext2"], **ref_stats.to_dict()}
        aggregate["definition"] = (
            f"{ref_stats.windows} windows of {ref_where.get('window_tokens')} tokens at seeded random positions "
            f"of the {ref_name} test stream ({ref_where.get('corpus_tokens')} tokens)"
        )
        aggregate["window_starts"] = ref_where.get("starts")
    else:
        aggregate = {"name": "pooled", "source": "all slices", **pooled.to_dict()}
        aggregate["definition"] = "all tokens of all slices together (no reference text available)"
    flagged = flag_slices(out_slices, aggregate, factor)
    by_control = {c["name"]: c for c in out_controls}
    for s in out_slices:
        control = by_control.get(control_of.get(s["name"], ""))
        s["vs_control"] = control_comparison(s, control) if control is not None else None
    agg_delta = aggregate.get("delta_nll")
    if agg_delta is not None and agg_delta <= 0:
        notes.append(
            "the aggregate shows no degradation: a slice is flagged when its own increase is significant"
        )

    tasks = task_comparison(task_results, baseline_task_results) if task_results else None
    return {
        "format": FORMAT,
        "definitions": {
            "nll": "mean next-token negative log-likelihood over the slice's predicted tokens (nats)",
            "ppl": "exp(nll)",
            "kl": "mean over predicted tokens of KL(dense || pruned) of the next-token distributions (nats)",
            "rel_degradation": "ppl_pruned / ppl_dense - 1 = exp(nll_pruned - nll_dense) - 1",
            "delta_nll": "nll_pruned - nll_dense: the mean per-token NLL increase (paired, same tokens)",
            "delta_nll_se": (
                f"cluster-robust standard error of delta_nll, clusters of {BLOCK_TOKENS} consecutive tokens"
            ),
            "flag": (
                f"delta_nll > {factor:g} x the aggregate's delta_nll (0 when the aggregate does not degrade), "
                f"one-sided z-test with both standard errors, Holm-corrected over the slices at {ALPHA:g}"
            ),
            "vs_control": (
                "a language slice against the English side of the same sentences: excess_nll = delta_nll - "
                "the control's delta_nll, with its SE and one-sided p-value; ratio = delta_nll / the control's"
            ),
            "aggregate": aggregate["definition"],
        },
        "seed": seed,
        "limit": limit,
        "seqlen": seqlen,
        "max_tokens_per_slice": max_tokens_per_slice,
        "reference_tokens": reference_tokens,
        "factor": factor,
        "alpha": ALPHA,
        "aggregate": aggregate,
        "pooled": {"name": "pooled", **pooled.to_dict()},
        "slices": out_slices,
        "controls": out_controls,
        "flagged": flagged,
        "frequency": freq_info,
        "tasks": tasks,
        "skipped": skipped,
        "notes": notes,
        "seconds": time.perf_counter() - t0,
    }
