"""`oneshot` command line: a thin layer from arguments to `PruneConfig` to `run_prune`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from oneshot.config import DTYPES, METHODS, PROPAGATE, PruneConfig

__all__ = ["build_parser", "main"]

logger = logging.getLogger("oneshot")


class _TqdmHandler(logging.Handler):
    """Log lines that do not break tqdm progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _setup_logging(quiet: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("oneshot", "eval", "kernels"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(logging.WARNING if quiet else logging.INFO)
        log.propagate = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oneshot", description="One-shot pruning of causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prune",
        help="prune a model with magnitude, Wanda or SparseGPT",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help="local folder, Hub id or .gguf file; default: the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument("--method", default="sparsegpt", help=f"one of {', '.join(METHODS)}")
    p.add_argument(
        "--sparsity",
        default=None,
        help="fraction of weights to prune in [0, 1); default 0.5 (N/M for an N:M pattern)",
    )
    p.add_argument(
        "--pattern",
        default="unstructured",
        help="'unstructured' or N:M (N zeros in every M consecutive input weights, e.g. 2:4, 4:8)",
    )
    p.add_argument(
        "--calib",
        default="c4",
        help="c4, wikitext2, self, a .txt/.jsonl/.jsonl.gz/.parquet file, or hf:DATASET_ID",
    )
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data-dir",
        default=None,
        help="offline data directory (default: $ONESHOT_DATA_DIR, ./data, ../shared/data)",
    )
    p.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--damp", type=float, default=0.01, help="SparseGPT damping, relative to mean(diag(H))")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT lazy-update block size (columns)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per block forward")
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        help="keep Linear layers whose name matches this pattern dense (fnmatch, repeatable)",
    )
    p.add_argument("--propagate", default="pruned", help=f"one of {', '.join(PROPAGATE)}")
    p.add_argument(
        "--no-layer-loss",
        action="store_true",
        help="magnitude/Wanda: skip the Hessians that give the exact per-layer reconstruction loss",
    )
    p.add_argument(
        "--eval-windows",
        type=int,
        default=8,
        help="quick WikiText-2 perplexity windows before/after pruning (0 = skip)",
    )
    p.add_argument(
        "--eval-seqlen", type=int, default=None, help="quick evaluation window length (default: --seqlen)"
    )
    p.add_argument(
        "--export",
        default=None,
        choices=["2:4", "bitmask"],
        help="also write the compressed form for the sparse kernels into <out>/compressed-<format>/",
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/<model>-<method>-<pattern>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-block lines")
    from eval.cli import add_eval_parser
    from eval.report_cli import add_report_parser
    from oneshot.push import add_push_parser

    add_eval_parser(sub)
    add_report_parser(sub)
    add_push_parser(sub)
    c = sub.add_parser(
        "card",
        help="(re)write the model card README.md of a run folder from its oneshot.json and eval.json",
    )
    c.add_argument("run_dir", help="folder written by `oneshot prune`")
    c.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return parser


def _config_from_args(args: argparse.Namespace) -> PruneConfig:
    return PruneConfig(
        method=args.method,
        sparsity=args.sparsity,
        pattern=args.pattern,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        damp=args.damp,
        block_size=args.blocksize,
        ignore=tuple(args.ignore),
        propagate=args.propagate,
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        layer_loss=not args.no_layer_loss,
        model=args.model,
        data_dir=args.data_dir or os.environ.get("ONESHOT_DATA_DIR"),
    )


def _default_out(config: PruneConfig) -> str:
    name = (
        "smollm2-135m"
        if config.model is None
        else os.path.basename(str(config.model).rstrip("/")).removesuffix(".gguf")
    )
    pattern = config.pattern.replace(":", "of")
    suffix = f"-{config.sparsity:g}" if config.pattern == "unstructured" else ""
    return os.path.join("runs", f"{name}-{config.method}-{pattern}{suffix}")


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _summary(result: Any) -> str:
    rep = result.report
    cfg = rep.config
    rows = [
        ("method", cfg["method"]),
        ("pattern", cfg["pattern"]),
        ("target sparsity", f"{cfg['sparsity']:.4f}"),
        (
            "achieved sparsity",
            f"{rep.sparsity:.4f} ({rep.zero_params:,} / {rep.pruned_params:,} weights in {len(rep.layers)} layers)",
        ),
        ("calibration", f"{cfg['calib']}: {cfg['nsamples']} x {cfg['seqlen']} tokens, seed {cfg['seed']}"),
        ("prune time", f"{rep.total_seconds:.1f} s on {rep.device}"),
        ("peak memory", f"{_fmt_bytes(rep.peak_memory_bytes)} ({rep.peak_memory_kind})"),
    ]
    quick = result.record.get("quick_eval") or {}
    if "dense" in quick and "pruned" in quick:
        d, p = quick["dense"], quick["pruned"]
        rows.append(
            (
                "wikitext2 ppl (quick)",
                f"dense {d['value']:.3f} -> pruned {p['value']:.3f} ({d['windows']} windows x {d['seqlen']} tokens, not the full protocol)",
            )
        )
    rows.append(("output", str(result.out)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet)
    if args.command == "prune":
        return _prune(args, argv)
    if args.command == "eval":
        from eval.cli import run_eval

        return run_eval(args)
    if args.command == "report":
        from eval.report_cli import run_report

        return run_report(args)
    if args.command == "push":
        from oneshot.push import run_push

        return run_push(args)
    if args.command == "card":
        return _card(args)
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return 2


def _card(args: argparse.Namespace) -> int:
    from oneshot.card import write_card

    try:
        path = write_card(Path(args.run_dir).expanduser())
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"oneshot: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _prune(args: argparse.Namespace, argv: list[str]) -> int:
    from oneshot.data import CalibrationError
    from oneshot.models import ModelLoadError
    from oneshot.run import check_output_dir, run_prune
    from oneshot.solvers import SolverError

    try:
        config = _config_from_args(args)
        if args.eval_windows < 0:
            raise ValueError("--eval-windows must be >= 0")
        out = args.out or _default_out(config)
        check_output_dir(Path(out).expanduser(), args.overwrite)
        result = run_prune(
            config,
            out,
            overwrite=args.overwrite,
            eval_windows=args.eval_windows,
            eval_seqlen=args.eval_seqlen,
            progress=not args.quiet,
            argv=["oneshot", *argv],
            export=args.export,
        )
    except (
        ValueError,
        FileExistsError,
        ModelLoadError,
        CalibrationError,
        SolverError,
        FileNotFoundError,
    ) as exc:
        print(f"oneshot: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("oneshot: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(_summary(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
