"""Pruning benchmark on the embedded SmolLM2-135M-Instruct.

Protocol (issue #2): calibration ``c4``, 32 windows x 2048 tokens, seed 0; WikiText-2 perplexity on the
first 40 windows x 2048 tokens of the raw test set. For magnitude, Wanda and SparseGPT at 50 %
unstructured and 2:4: perplexity, achieved sparsity, prune wall time and peak memory, next to the
reference figures measured with llm-compressor 0.14 on the same slice of the same 2-core machine.

Each pruning run executes in its own subprocess so that its peak memory is its own.

    python scripts/bench_prune.py                    # the full protocol (about 30-40 min on 2 cores)
    python scripts/bench_prune.py --nsamples 4 --seqlen 256 --eval-windows 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFERENCE = {  # llm-compressor 0.14 on this machine, same calibration and evaluation slice (issue #2)
    "dense": {"ppl": 20.35},
    ("sparsegpt", "unstructured"): {"ppl": 44.25, "seconds": 934.0},
    ("wanda", "unstructured"): {"ppl": 47.21, "seconds": 786.0},
    ("sparsegpt", "2:4"): {"ppl": 97.33, "seconds": 934.0},
    ("wanda", "2:4"): {"ppl": 190.53, "seconds": 786.0},
}
RUNS = [(m, p) for p in ("unstructured", "2:4") for m in ("magnitude", "wanda", "sparsegpt")]


def _single(args: argparse.Namespace) -> dict:
    import torch

    from oneshot import PruneConfig, calibration_windows, load_model, prune
    from oneshot.eval.corpora import ppl_token_ids
    from oneshot.eval.perplexity import perplexity

    torch.manual_seed(0)
    t0 = time.perf_counter()
    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    test_ids = ppl_token_ids("wikitext2", tok, args.data_dir)
    out: dict = {"method": args.method, "pattern": args.pattern}
    if args.method != "dense":
        # the published algorithms (every token once), as the llm-compressor reference rows
        cfg = PruneConfig(method=args.method, pattern=args.pattern, sink_weight=0.0)
        calib, _ = calibration_windows(
            "c4", tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, data_dir=args.data_dir
        )
        report = prune(model, calib, cfg, device=args.device, batch_size=args.batch_size, progress=False)
        out.update(
            sparsity=report.sparsity,
            prune_seconds=report.total_seconds,
            peak_memory_bytes=report.peak_memory_bytes,
            peak_memory_kind=report.peak_memory_kind,
        )
    t_eval = time.perf_counter()
    res = perplexity(model, test_ids, args.eval_seqlen, batch_size=1, limit=args.eval_windows)
    out.update(
        ppl=res.value,
        eval_windows=res.windows,
        eval_seqlen=res.seqlen,
        eval_seconds=time.perf_counter() - t_eval,
        process_seconds=time.perf_counter() - t0,
    )
    if args.method == "dense":
        import resource

        out.update(peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return out


def _fmt_ref(key: tuple[str, str], field: str, fmt: str) -> str:
    ref = REFERENCE.get(key, {}).get(field)
    return "—" if ref is None else format(ref, fmt)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0, help="calibration seed (the protocol's is 0)")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=os.environ.get("ONESHOT_DATA_DIR"))
    parser.add_argument(
        "--runs",
        default=",".join(f"{m}:{p}" for m, p in RUNS),
        help="comma list of METHOD:PATTERN (pattern 'unstructured' or N:M)",
    )
    parser.add_argument("--json", default=None, help="write all results to this file")
    parser.add_argument("--single", nargs=2, metavar=("METHOD", "PATTERN"), help=argparse.SUPPRESS)
    parser.add_argument("--single-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single:
        args.method, args.pattern = args.single
        Path(args.single_out).write_text(json.dumps(_single(args)))
        return 0

    wanted = [("dense", "-")]
    for item in args.runs.split(","):
        method, _, pattern = item.strip().partition(":")
        wanted.append((method, pattern.replace("of", ":") if pattern else "unstructured"))
        if pattern.count(":") == 0 and pattern not in ("", "unstructured"):
            raise SystemExit(f"bad run {item!r}: use METHOD:unstructured or METHOD:N:M")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, pattern in wanted:
            path = Path(tmp) / f"{method}-{pattern.replace(':', 'of')}.json"
            cmd = [
                sys.executable,
                __file__,
                "--single",
                method,
                pattern,
                "--single-out",
                str(path),
                "--nsamples",
                str(args.nsamples),
                "--seqlen",
                str(args.seqlen),
                "--eval-windows",
                str(args.eval_windows),
                "--eval-seqlen",
                str(args.eval_seqlen),
                "--batch-size",
                str(args.batch_size),
                "--seed",
                str(args.seed),
                "--device",
                args.device,
            ]
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            print(f"[bench] {method} {pattern} ...", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
            res = json.loads(path.read_text())
            results.append(res)
            print(
                f"[bench] {method} {pattern}: ppl {res['ppl']:.2f}"
                + (f", prune {res['prune_seconds']:.0f} s" if "prune_seconds" in res else ""),
                file=sys.stderr,
                flush=True,
            )

    dense = results[0]
    print(
        f"\nSmolLM2-135M-Instruct (embedded GGUF, float32), calibration c4 {args.nsamples} x {args.seqlen} seed {args.seed}, "
        f"WikiText-2 test first {dense['eval_windows']} windows x {dense['eval_seqlen']}\n"
    )
    print(
        "| method | pattern | ppl | reference ppl (llm-compressor 0.14) | achieved sparsity | prune time (s) | "
        "reference time (s) | peak memory (GiB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print(
        f"| dense | - | {dense['ppl']:.2f} | {REFERENCE['dense']['ppl']:.2f} | 0 | - | - | "
        f"{dense['peak_memory_bytes'] / 2**30:.2f} |"
    )
    for res in results[1:]:
        key = (res["method"], res["pattern"])
        print(
            f"| {res['method']} | {res['pattern']} | {res['ppl']:.2f} | {_fmt_ref(key, 'ppl', '.2f')} | "
            f"{res['sparsity']:.4f} | {res['prune_seconds']:.0f} | {_fmt_ref(key, 'seconds', '.0f')} | "
            f"{res['peak_memory_bytes'] / 2**30:.2f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
