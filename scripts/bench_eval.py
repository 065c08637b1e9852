"""Evaluation overhead: WikiText-2 perplexity vs a plain loop of ``model(input_ids)`` over the same windows.

Protocol (issue #3, part 6): the embedded SmolLM2-135M (float32 on the CPU, bfloat16 on CUDA), WikiText-2
test rows joined with "\\n\\n", tokenized once, non-overlapping windows of 2048 tokens. Timed:

- ``plain``: ``for w in windows: model(w[None])`` under ``torch.no_grad()`` (the forward passes alone);
- ``eval``: `eval.perplexity.perplexity` over the same windows (forwards + NLL), and the same plus the
  tokenization of the test set (``eval+tok``).

The requirement is ``eval <= 1.10 * plain``. The two alternate in chunks of ``--chunk`` windows (plain on
the chunk, then eval on the same chunk) so drift in machine load hits both alike; the best of
``--repeats`` passes is reported next to the median. The full run takes about 2 x 10 minutes per pass on
2 CPU cores; ``--limit N`` times the first N windows only. Run it on an otherwise idle machine.

    python scripts/bench_eval.py --limit 8
    python scripts/bench_eval.py                 # full test set (141 windows)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2-135M)")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--limit", type=int, default=None, help="first N windows only (quick check)")
    parser.add_argument("--batch-size", type=int, default=None, help="perplexity batch (1 on CPU, 8 on CUDA)")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the windows")
    parser.add_argument("--chunk", type=int, default=4, help="windows per plain/eval alternation")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)

    from oneshot.eval.corpora import encode, ppl_text
    from oneshot.eval.perplexity import perplexity, windows
    from oneshot.models import load_model, resolve_device
    from oneshot.runfolder import library_versions

    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    batch = args.batch_size or (8 if device.type == "cuda" else 1)
    torch.set_grad_enabled(False)
    loaded = load_model(args.model, dtype=dtype)
    model = loaded.model.to(device)
    text = ppl_text("wikitext2", args.data_dir)

    t0 = time.perf_counter()
    ids = loaded.tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    tok_seconds = time.perf_counter() - t0
    ids_t = torch.tensor(ids, dtype=torch.long).reshape(1, -1)
    chunks = windows(ids_t, args.seqlen, args.limit)  # (windows, seqlen)
    n = chunks.shape[0]
    print(
        f"model {args.model or 'SmolLM2-135M (embedded)'}, {dtype} on {device}, {n} windows x {args.seqlen} "
        f"tokens, perplexity batch {batch}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    model(input_ids=chunks[:1].to(device))  # warm-up (allocator, kernels)
    _sync(device)

    # Interleaved in chunks of --chunk windows (plain, then eval, on the same windows) so that changes in
    # machine load hit both measurements alike; totals are summed over the chunks.
    plain_times: list[float] = []
    eval_times: list[float] = []
    nll_sum, tokens = 0.0, 0
    for rep in range(args.repeats):
        plain_t, eval_t = 0.0, 0.0
        nll_sum, tokens = 0.0, 0
        for start in range(0, n, args.chunk):
            part = chunks[start : start + args.chunk]  # (k, seqlen)
            t0 = time.perf_counter()
            for w in range(part.shape[0]):
                model(part[w : w + 1].to(device))
            _sync(device)
            plain_t += time.perf_counter() - t0

            t0 = time.perf_counter()
            res = perplexity(model, part.reshape(1, -1), args.seqlen, batch, device=device)
            _sync(device)
            eval_t += time.perf_counter() - t0
            nll_sum += res.nll * res.tokens
            tokens += res.tokens
            done = start + part.shape[0]
            print(
                f"  {done}/{n} windows: plain {plain_t:.1f} s, eval {eval_t:.1f} s "
                f"({eval_t / plain_t - 1:+.1%}), ppl so far {math.exp(nll_sum / tokens):.4f}",
                flush=True,
            )
        plain_times.append(plain_t)
        eval_times.append(eval_t)
        print(f"pass {rep + 1}: plain {plain_t:.1f} s, eval {eval_t:.1f} s ({eval_t / plain_t - 1:+.1%})")
    result = SimpleNamespace(value=math.exp(nll_sum / tokens), windows=n, tokens=tokens)
    # the tokenization of the test set through the eval code path (eval.corpora.encode)
    t0 = time.perf_counter()
    encode(loaded.tokenizer, text)
    enc_seconds = time.perf_counter() - t0
    plain, ev = min(plain_times), min(eval_times)
    figures = {
        "windows": n,
        "seqlen": args.seqlen,
        "device": str(device),
        "dtype": dtype,
        "batch_size": batch,
        "ppl": result.value,
        "plain_seconds_best": plain,
        "eval_seconds_best": ev,
        "plain_seconds_median": statistics.median(plain_times),
        "eval_seconds_median": statistics.median(eval_times),
        "tokenize_seconds": tok_seconds,
        "encode_seconds": enc_seconds,
        "overhead": ev / plain - 1,
        "overhead_with_tokenization": (ev + enc_seconds) / plain - 1,
        "versions": library_versions(),
    }
    print(f"wikitext2 perplexity {result.value:.4f} ({result.windows} windows, {result.tokens} tokens)")
    print(f"plain model(input_ids) loop  {plain:8.2f} s  ({plain / n:.3f} s/window)")
    print(f"eval.perplexity              {ev:8.2f} s  ({ev / n:.3f} s/window)")
    print(f"tokenization of the test set {enc_seconds:8.2f} s")
    print(
        f"overhead: {figures['overhead']:+.1%} (forwards + NLL), {figures['overhead_with_tokenization']:+.1%} "
        f"with tokenization; requirement <= +10%: {'met' if figures['overhead_with_tokenization'] <= 0.10 else 'NOT met'}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
