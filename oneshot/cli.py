"""`oneshot` command line: a thin layer from arguments to `PruneConfig` to `run_prune`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from oneshot.config import DTYPES, METHODS, PROPAGATE, UNCALIBRATED, PruneConfig
from oneshot.errors import Interrupted

__all__ = ["build_parser", "main"]

logger = logging.getLogger("oneshot")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, examples kept as written."""


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
    log = logging.getLogger("oneshot")  # oneshot.eval and oneshot.kernels log below it
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False
    if quiet:  # transformers' own bars (loading / writing weights) too
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()


EXAMPLES = """examples:
  # the embedded SmolLM2-135M, SparseGPT 2:4, standard C4 calibration; checkpoint + record + card + report
  oneshot prune --method sparsegpt --pattern 2:4 --calib c4 --out runs/smollm2-2of4
  # a local model, Wanda 50 %, keep the down projections dense
  oneshot prune --model ./my-llama --method wanda --sparsity 0.5 --ignore '*.mlp.down_proj' --out runs/w50
  # perplexity and the nine zero-shot tasks against the dense model; a report; a Hub upload check
  oneshot eval runs/smollm2-2of4 --tasks paper --baseline default
  oneshot report runs/smollm2-2of4 --out report
  oneshot push runs/smollm2-2of4 --repo-id you/smollm2-2of4 --dry-run
"""

PRUNE_EXAMPLES = """examples:
  oneshot prune --method sparsegpt --pattern 2:4 --out runs/smollm2-2of4
  oneshot prune --model ./my-llama --method wanda --sparsity 0.5 --nsamples 64 --seqlen 1024 --out runs/w50
  oneshot prune --model org/model --calib my_corpus.jsonl --ignore '*.mlp.down_proj' --out runs/m
  oneshot prune ... --out runs/w50 --overwrite   # replaces an earlier oneshot output, nothing else
"""


def build_parser() -> argparse.ArgumentParser:
    from oneshot import __version__

    parser = argparse.ArgumentParser(
        prog="oneshot",
        description="One-shot pruning of causal LMs (magnitude, Wanda, SparseGPT), with honest evaluation.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"oneshot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prune",
        help="prune a model with magnitude, Wanda or SparseGPT",
        description="Prune every Linear layer of the decoder blocks in one calibration pass and write a "
        "run folder: checkpoint (loads with plain transformers), oneshot.json record, model card, report.",
        epilog=PRUNE_EXAMPLES,
        formatter_class=_HelpFormatter,
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
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window draw (and of 'self' text)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="offline data directory (default: $ONESHOT_DATA_DIR, ./data, ../shared/data)",
    )
    p.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
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
        "--uncalibrated",
        default="magnitude",
        choices=UNCALIBRATED,
        help="weights that receive no calibration tokens (an MoE expert no token was routed to, a Linear "
        "that never runs): prune them by magnitude with a warning, or keep them dense (reported either way)",
    )
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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out when it is an earlier oneshot output (never any other folder)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-block lines")
    from oneshot.eval.cli import add_eval_parser
    from oneshot.eval.report_cli import add_report_parser
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
        uncalibrated=args.uncalibrated,
        model=args.model,
        data_dir=args.data_dir or os.environ.get("ONESHOT_DATA_DIR"),
    )


def _default_out(config: PruneConfig) -> str:
    name = (
        "smollm2-135m"
        if config.model is None
        else Path(str(config.model)).expanduser().resolve().name.removesuffix(".gguf")
        if Path(str(config.model)).expanduser().exists()
        else str(config.model).rstrip("/").split("/")[-1]
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
            f"{rep.sparsity:.4f} ({rep.zero_params:,} / {rep.pruned_params:,} weights in {len(rep.layers)} "
            "pruned matrices)",
        ),
    ]
    if rep.dense_matrices or rep.matrix_params != rep.pruned_params:
        from oneshot.pruner import dense_summary

        rows.append(
            (
                "all block matrices",
                f"{rep.block_sparsity:.4f} ({rep.matrix_zero_params:,} / {rep.matrix_params:,} weights, "
                "pruned or not)",
            )
        )
        rows.append(("left dense", dense_summary(rep.dense_matrices)))
    if rep.uncalibrated:
        rows.append(("no calibration tokens", f"{len(rep.uncalibrated)} matrices pruned by magnitude"))
    rows += [
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
    """The `oneshot` command. Exit codes: 0 done, 2 bad input or a fixable problem (one line on stderr),
    130 interrupted (with what is on disk); anything else is a bug and keeps its traceback."""
    try:
        return _main(argv)
    except Interrupted as exc:
        print(f"oneshot: {exc.message}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("oneshot: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from oneshot.errors import describe

        message = describe(exc)
        if message is None:
            raise
        print(f"oneshot: error: {message}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet)
    if args.command == "prune":
        return _prune(args, argv)
    if args.command == "eval":
        from oneshot.eval.cli import run_eval

        return run_eval(args)
    if args.command == "report":
        from oneshot.eval.report_cli import run_report

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
    from oneshot.run import run_prune

    try:
        config = _config_from_args(args)
        result = run_prune(
            config,
            args.out or _default_out(config),
            overwrite=args.overwrite,
            eval_windows=args.eval_windows,
            eval_seqlen=args.eval_seqlen,
            progress=not args.quiet,
            argv=["oneshot", *argv],
            export=args.export,
        )
    except ValueError as exc:  # user-facing checks deep in the core still raise plain ValueError
        print(f"oneshot: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(_summary(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
