"""`oneshot prune`: arguments -> `PruneConfig` + `RunConfig` -> the prune job -> card and report -> a summary."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from oneshot.config import (
    ALLOCATIONS,
    DTYPES,
    METHODS,
    PROPAGATE,
    QUANT_CLIPS,
    QUANT_SCHEMES,
    TARGETS,
    UNCALIBRATED,
    AllocationConfig,
    ConfigError,
    PruneConfig,
    QuantConfig,
    RunConfig,
    parse_pattern,
)
from oneshot.distributed import is_worker_process
from oneshot.errors import Interrupted
from oneshot.runfolder import RunRecord

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

PRUNE_EXAMPLES = """examples:
  oneshot prune --method sparsegpt --pattern 2:4 --out runs/smollm2-2of4
  oneshot prune --model ./my-llama --method wanda --sparsity 0.5 --nsamples 64 --seqlen 1024 --out runs/w50
  oneshot prune --model org/model --calib my_corpus.jsonl --ignore '*.mlp.down_proj' --out runs/m
  oneshot prune --pattern 2:4 --quantize w4a16 --group-size 64 --out runs/2of4-w4   # one pass, zeros kept
  oneshot prune ... --out runs/w50 --overwrite   # replaces an earlier oneshot output, nothing else
  oneshot prune --sparsity 0.7 --allocation owl --out runs/owl70        # per-block sparsities from outliers
  oneshot sensitivity --sparsities 0.5,0.6,0.7,0.8,0.9 --out sens/
  oneshot prune --sparsity 0.7 --allocation sensitivity --sensitivity-file sens/sensitivity.json --out runs/s70
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, examples kept as written."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "prune",
        help="prune a model with magnitude, Wanda or SparseGPT",
        description="Prune every Linear layer of the decoder blocks in one calibration pass and write a "
        "run folder: checkpoint (loads with plain transformers), oneshot.json record, model card, report.",
        epilog=PRUNE_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    add_model_argument(p)
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
    p.add_argument("--damp", type=float, default=0.01, help="SparseGPT damping, relative to mean(diag(H))")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT lazy-update block size (columns)")
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
        "--target",
        default="local",
        choices=TARGETS,
        help="what each layer is solved to reproduce from the pruned model's inputs: its own dense output "
        "(local, the published SparseGPT/Wanda) or the DENSE model's output (dense: also corrects the error "
        "the pruned blocks before it left; runs the dense model beside the pruned one and keeps an "
        "(in x in) cross-statistic per input; sparsegpt and wanda)",
    )
    p.add_argument(
        "--target-damp",
        type=float,
        default=0.1,
        help="--target dense: ridge of the least-squares target toward the dense weight, relative to "
        "mean(diag H) (SparseGPT's own solve keeps --damp)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run on --out from its last complete block (same options; the result "
        "is bit for bit that of an uninterrupted run). Every block is checkpointed in the output's "
        "temporary folder; a run started without --resume while one exists says so and stops",
    )
    p.add_argument(
        "--layer-loss",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="magnitude/Wanda: also build the (in_features x in_features) Hessians that give the exact "
        "per-layer reconstruction loss (off: no Hessian is built, the loss is reported as n/a; SparseGPT "
        "always reports it)",
    )
    p.add_argument(
        "--allocation",
        default="uniform",
        choices=ALLOCATIONS,
        help="how the sparsity is spread over the matrices: the same everywhere, OWL (blocks with more "
        "activation outliers pruned less) or from measured loss curves (least summed loss); the overall "
        "sparsity stays the target. With an N:M pattern a matrix is N:M or dense (--sparsity may then be "
        "below N/M)",
    )
    p.add_argument(
        "--owl-m", type=float, default=5.0, help="OWL: outlier = Wanda score above M x the block mean"
    )
    p.add_argument(
        "--owl-lambda", type=float, default=0.08, help="OWL: block sparsities within target +- lambda"
    )
    p.add_argument(
        "--sensitivity-file",
        default=None,
        help="--allocation sensitivity: the sensitivity.json of `oneshot sensitivity` (same model, method and "
        "pattern); without it the curves are measured first (the target and +-0.1, +-0.2)",
    )
    add_quant_arguments(p, required=False)
    add_run_arguments(p, out_help="output folder (default: runs/<model>-<method>-<pattern>[-<scheme>])")
    p.add_argument(
        "--export",
        default=None,
        choices=["2:4", "bitmask"],
        help="also write the compressed form for the sparse kernels into <out>/compressed-<format>/",
    )
    return p


def add_quant_arguments(p: argparse.ArgumentParser, *, required: bool) -> None:
    """The quantization options (`QuantConfig`): ``--quantize`` on `oneshot prune`, ``--scheme`` on
    `oneshot quantize`."""
    flag = "--scheme" if required else "--quantize"
    p.add_argument(
        flag,
        dest="scheme",
        default="w4a16" if required else None,
        help=f"weight-only integer scheme, one of {', '.join(QUANT_SCHEMES)} (activations stay 16-bit)"
        + ("" if required else "; the pruned weights stay exactly 0 (SparseGPT: one joint solve)"),
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="input columns per scale: 32, 64, 128, or -1 for one scale per output channel (default: the "
        "scheme's, w4a16 128, w8a16 per channel); must divide every quantized layer's width",
    )
    grid = p.add_mutually_exclusive_group()
    grid.add_argument(
        "--sym", dest="symmetric", action="store_true", default=True, help="signed codes, zero-point 0"
    )
    grid.add_argument(
        "--asym", dest="symmetric", action="store_false", help="unsigned codes with an integer zero-point"
    )
    p.add_argument(
        "--act-order",
        action="store_true",
        help="GPTQ takes the columns by descending activation energy (groups follow that order: g_idx)"
        + ("" if required else "; not with pruning in the same pass"),
    )
    p.add_argument(
        "--clip",
        choices=QUANT_CLIPS,
        default=None,
        help="how each group's range is chosen: minmax (the group's min and max; default) or mse (the shrunken "
        "range with the least rounding error, each weight weighted by its OBS cost; measured better for "
        "quantization alone and unstructured pruning, worse for N:M pruning in the same pass)",
    )
    p.add_argument(
        "--sink-weight",
        type=float,
        default=None,
        help="extra weight of each calibration window's first token (the attention sink) in the statistics "
        "of the q/k/v projections, as a fraction of the window length; 0 = every token once "
        + (
            "(default: 0.5)"
            if required
            else "(default: 0.5; 0 with --target dense, which does not take it, and with magnitude pruning)"
        ),
    )


def quant_config_from_args(args: argparse.Namespace, *, damp: float, block_size: int) -> QuantConfig | None:
    """`QuantConfig` of the quantization options, or None without a scheme; the group options without one
    are an error."""
    if args.scheme is None:
        given = [
            f
            for f, v in (
                ("--group-size", args.group_size),
                ("--act-order", args.act_order),
                ("--clip", args.clip is not None),
            )
            if v
        ]
        if given or not args.symmetric:
            raise ConfigError(
                f"{', '.join(given) or '--asym'} needs --quantize SCHEME (e.g. --quantize w4a16)"
            )
        return None
    return QuantConfig(
        scheme=args.scheme,
        group_size=args.group_size,
        symmetric=args.symmetric,
        act_order=args.act_order,
        damp=damp,
        block_size=block_size,
        **({} if args.sink_weight is None else {"sink_weight": args.sink_weight}),
        **({} if args.clip is None else {"clip": args.clip}),
    )


def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="local folder, Hub id or .gguf file; default: the embedded SmolLM2-135M-Instruct",
    )


def add_run_arguments(p: argparse.ArgumentParser, *, out_help: str) -> None:
    """The data and execution options every model-changing command shares (`RunConfig` and the output)."""
    p.add_argument(
        "--calib",
        default="c4",
        help="c4, wikitext2, self, a .txt/.jsonl/.jsonl.gz/.parquet file, or hf:DATASET_ID",
    )
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the calibration window draw (and of 'self' text)"
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="offline data directory (default: $ONESHOT_DATA_DIR, ./data, ../shared/data)",
    )
    p.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per block forward")
    p.add_argument(
        "--offload",
        default="auto",
        help="disk: stream the decoder blocks from the checkpoint one at a time and write each to the output "
        "when done (models larger than RAM; prune and quantize); none: load the whole model; auto: disk when "
        "the weights exceed --offload-share of the available RAM (default auto)",
    )
    p.add_argument(
        "--offload-share",
        type=float,
        default=0.5,
        help="--offload auto streams when the weights in --dtype exceed this share of the available RAM (0.5)",
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
    p.add_argument("--out", default=None, help=out_help)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out when it is an earlier oneshot output (never any other folder)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-block lines")


def run_config_from_args(args: argparse.Namespace, export: str | None = None) -> RunConfig:
    """`RunConfig` of the shared options (validated)."""
    return RunConfig(
        model=args.model,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        data_dir=args.data_dir or os.environ.get("ONESHOT_DATA_DIR"),
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        eval_windows=args.eval_windows,
        eval_seqlen=args.eval_seqlen,
        export=export,
        offload=args.offload,
        offload_share=args.offload_share,
    )


def allocation_from_args(args: argparse.Namespace) -> AllocationConfig:
    """The allocation options; with an N:M pattern and a non-uniform allocation ``--sparsity`` is the overall
    target (the matrices that stay N:M are at N/M)."""
    nm_target = args.allocation != "uniform" and parse_pattern(args.pattern) is not None
    return AllocationConfig(
        method=args.allocation,
        sparsity=args.sparsity if nm_target else None,
        owl_m=args.owl_m,
        owl_lambda=args.owl_lambda,
        sensitivity_file=args.sensitivity_file,
    )


def configs_from_args(args: argparse.Namespace) -> tuple[PruneConfig, RunConfig]:
    """The algorithm and the run settings of ``oneshot prune``'s arguments (validated)."""
    nm_target = (
        getattr(args, "allocation", "uniform") != "uniform" and parse_pattern(args.pattern) is not None
    )
    config = PruneConfig(
        method=args.method,
        sparsity=None if nm_target else args.sparsity,
        pattern=args.pattern,
        damp=args.damp,
        block_size=args.blocksize,
        ignore=tuple(args.ignore),
        propagate=args.propagate,
        layer_loss=args.layer_loss,
        uncalibrated=args.uncalibrated,
        target=args.target,
        sink_weight=getattr(args, "sink_weight", None),
        target_damp=args.target_damp,
    )
    return config, run_config_from_args(args, args.export)


def default_out(config: PruneConfig, run: RunConfig, quant: QuantConfig | None = None) -> str:
    """``runs/<model>-<method>-<pattern>[-<sparsity>][-<scheme>-g<group>]``."""
    pattern = config.pattern.replace(":", "of")
    suffix = f"-{config.sparsity:g}" if config.pattern == "unstructured" else ""
    if quant is not None:
        suffix += f"-{quant_slug(quant)}"
    return os.path.join("runs", f"{model_stem(run)}-{config.method}-{pattern}{suffix}")


def quant_slug(quant: QuantConfig) -> str:
    """``w4a16-g64`` / ``w8a16-ch-asym``."""
    group = f"g{quant.groups}" if quant.groups else "ch"
    return (
        f"{quant.scheme}-{group}"
        + ("" if quant.symmetric else "-asym")
        + ("-act" if quant.act_order else "")
        + ("-mse" if quant.clip == "mse" else "")
    )


def model_stem(run: RunConfig) -> str:
    """A short name of the run's model for default output folders."""
    if run.model is None:
        name = "smollm2-135m"
    elif Path(str(run.model)).expanduser().exists():
        name = Path(str(run.model)).expanduser().resolve().name.removesuffix(".gguf")
    else:
        name = str(run.model).rstrip("/").split("/")[-1]
    return name


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from oneshot.card import write_card
    from oneshot.jobs.prune import run_prune

    config, run_config = configs_from_args(args)
    quant = quant_config_from_args(args, damp=config.damp, block_size=config.block_size)
    allocation = allocation_from_args(args)
    allocation.check_against(config)
    check_out(args.out)
    out = args.out or default_out(config, run_config, quant)
    if args.out is None and allocation.method != "uniform":
        out += f"-{allocation.method}" + (
            f"-{allocation.sparsity:g}" if allocation.sparsity is not None else ""
        )
    result = run_prune(
        config,
        run_config,
        out,
        quant=quant,
        allocation=allocation,
        overwrite=args.overwrite,
        progress=not args.quiet,
        argv=["oneshot", *argv],
        finish=[write_card],  # the card is part of the atomic folder
        resume=args.resume,
    )
    if is_worker_process():  # rank > 0 of a multi-process run: rank 0 wrote and reports
        return 0
    write_run_report(result.out)
    print(summary(result.record, result.out))
    return 0


def check_out(out: str | None) -> None:
    if out is not None and not str(out).strip():
        raise ConfigError("--out is empty: give a folder name (or leave --out out for a folder under runs/)")


def write_run_report(run_dir: Path) -> None:
    """The run's own report (report.md/json/html in ``<run>/report``); the checkpoint is complete without it,
    so a failure here is a warning, not an error."""
    from oneshot.eval.report import write_report

    try:
        write_report([run_dir], out=run_dir / "report")
    except KeyboardInterrupt as exc:
        raise Interrupted(
            f"interrupted; the output {run_dir} is complete (its report/ may be missing)"
        ) from exc
    except Exception as exc:  # the report is an extra: never lose a finished checkpoint over it
        logger.warning("could not write the report into %s: %s", run_dir / "report", exc)


def _fmt_bytes(n: int) -> str:
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def summary(record: RunRecord, out: Path) -> str:
    """The lines `oneshot prune` prints at the end."""
    from oneshot.pruner import dense_summary

    (cfg, rep), run_cfg = record.pruned, record.run
    rows = [
        ("method", cfg.method),
        ("pattern", cfg.pattern),
        ("target sparsity", f"{cfg.sparsity:.4f}"),
        (
            "achieved sparsity",
            f"{rep.sparsity:.4f} ({rep.zero_params:,} / {rep.pruned_params:,} weights in {len(rep.layers)} "
            "pruned matrices)",
        ),
    ]
    if rep.dense_matrices or rep.matrix_params != rep.pruned_params:
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
    if record.quantization is not None:
        rows += quant_rows(record)
    if record.allocation is not None:
        rows += allocation_rows(record)
    rows += [
        (
            "calibration",
            f"{run_cfg.calib}: {run_cfg.nsamples} x {run_cfg.seqlen} tokens, seed {run_cfg.seed}",
        ),
        ("prune time", f"{rep.total_seconds:.1f} s on {rep.device}"),
        ("peak memory", f"{_fmt_bytes(rep.peak_memory_bytes)} ({rep.peak_memory_kind})"),
    ]
    return summary_tail(rows, record, out, "pruned")


def allocation_rows(record: RunRecord) -> list[tuple[str, str]]:
    """Summary lines of a non-uniform allocation: the target, what was achieved, the spread."""
    a = record.allocation
    assert a is not None
    values = list(a.sparsities.values())
    rows = [
        (
            "allocation",
            f"{a.config.method}: target {a.target:.4f}, achieved {a.achieved if a.achieved is not None else float('nan'):.4f} "
            f"over the {len(values)} allocated matrices ({a.zeros:,} / {a.params:,} weights); per matrix "
            f"{min(values):.4f} .. {max(values):.4f}",
        )
    ]
    if a.note:
        rows.append(("allocation note", a.note))
    if a.predicted_loss is not None:
        uniform = f" (uniform: {a.uniform_loss:.4g})" if a.uniform_loss is not None else ""
        rows.append(("predicted loss", f"{a.predicted_loss:.4g} summed over the matrices{uniform}"))
    rows.append(("allocation time", f"{a.seconds:.1f} s ({a.source})"))
    return rows


def quant_rows(record: RunRecord) -> list[tuple[str, str]]:
    """Summary lines of a quantized run: the scheme, bits per weight, sizes, the weights rounded to 0."""
    q = record.quantized
    rows = [
        ("quantization", f"{q.label} ({q.solver}): {q.bits_per_weight:.3f} bits per weight"),
        (
            "quantized weights",
            f"{q.quantized_params:,} in {len(q.layers)} matrices; {q.rounded_to_zero:,} rounded to 0",
        ),
        (
            "sizes",
            f"checkpoint {_fmt_bytes(q.checkpoint_bytes)} (fake-quantized float), quantized matrices "
            f"{_fmt_bytes(q.dense_bytes)} -> {_fmt_bytes(q.packed_bytes)} packed (`oneshot export`)",
        ),
    ]
    if record.prune is not None:
        zeros, _ = record.stored_zeros()
        rows.append(
            ("zeros stored", f"{zeros / max(1, record.prune.pruned_params):.4f} of the pruned matrices")
        )
    return rows


def summary_tail(rows: list[tuple[str, str]], record: RunRecord, out: Path, label: str) -> str:
    """The end every job summary shares (the quick perplexity, the output) and the aligned text of all rows."""
    dense, after = record.quick_eval.dense, record.quick_eval.pruned
    if dense is not None and after is not None:
        rows.append(
            (
                "wikitext2 ppl (quick)",
                f"dense {dense.value:.3f} -> {label} {after.value:.3f} ({dense.windows} windows x {dense.seqlen} "
                "tokens, not the full protocol)",
            )
        )
    rows.append(("output", str(out)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
