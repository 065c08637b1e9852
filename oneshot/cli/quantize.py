"""`oneshot quantize`: arguments -> `QuantConfig` + `RunConfig` -> the quantize job -> card -> a summary."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from oneshot.cli.prune import (
    HelpFormatter,
    add_quant_arguments,
    add_run_arguments,
    check_out,
    model_stem,
    quant_config_from_args,
    quant_rows,
    run_config_from_args,
    summary_tail,
    write_run_report,
)
from oneshot.config import QuantConfig, RunConfig
from oneshot.distributed import is_worker_process
from oneshot.runfolder import RunRecord

__all__ = ["add_parser", "run"]

QUANTIZE_EXAMPLES = """examples:
  oneshot quantize runs/smollm2-i1152 --scheme w4a16 --group-size 64 --calib c4 --nsamples 128
  oneshot quantize ./my-llama --scheme w8a16 --out runs/my-llama-w8          # a plain model
  oneshot quantize runs/2of4-recovered --scheme w4a16 --group-size 64 --asym --act-order
  oneshot export runs/smollm2-i1152-w4a16-g64 --format compressed-tensors --out export/
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "quantize",
        help="weight-only GPTQ quantization (w4a16, w8a16) of a model or a run folder",
        description="Quantize every Linear layer of the decoder blocks with GPTQ in one calibration pass (the "
        "block walk and propagation of `oneshot prune`); weights that are exactly 0 stay 0, so a pruned, "
        "shrunk or recovered run folder keeps its structure. Writes a run folder: the fake-quantized "
        "checkpoint (plain float, loads with transformers), quantization.safetensors (scales, zero-points, "
        "g_idx), oneshot.json and the model card; `oneshot export` packs it.",
        epilog=QUANTIZE_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "model", help="a run folder of oneshot prune/shrink/recover, a model folder, Hub id or .gguf"
    )
    add_quant_arguments(p, required=True)
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ damping, relative to mean(diag(H))")
    p.add_argument("--blocksize", type=int, default=128, help="GPTQ lazy-update block size (columns)")
    add_run_arguments(p, out_help="output folder (default: <model>-<scheme>-g<group> under runs/)")
    return p


def default_out(quant: QuantConfig, run: RunConfig) -> str:
    from oneshot.cli.prune import quant_slug

    return os.path.join("runs", f"{model_stem(run)}-{quant_slug(quant)}")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from oneshot.card import write_card
    from oneshot.jobs.quantize import run_quantize

    quant = quant_config_from_args(args, damp=args.damp, block_size=args.blocksize)
    assert quant is not None  # --scheme has a default
    run_config = run_config_from_args(args)
    check_out(args.out)
    result = run_quantize(
        quant,
        run_config,
        args.out or default_out(quant, run_config),
        overwrite=args.overwrite,
        progress=not args.quiet,
        argv=["oneshot", *argv],
        finish=[write_card],
    )
    if is_worker_process():  # rank > 0 of a multi-process run: rank 0 wrote and reports
        return 0
    write_run_report(result.out)
    print(summary(result.record, result.out))
    return 0


def summary(record: RunRecord, out: Path) -> str:
    """The lines `oneshot quantize` prints at the end."""
    q = record.quantized
    run_cfg = q.run or record.run
    rows: list[tuple[str, str]] = []
    if q.source_run:
        rows.append(("source run", f"{q.source_run} (oneshot {record.kind})"))
    rows += quant_rows(record)
    rows += [
        (
            "calibration",
            f"{run_cfg.calib}: {run_cfg.nsamples} x {run_cfg.seqlen} tokens, seed {run_cfg.seed}",
        ),
        ("quantize time", f"{q.total_seconds:.1f} s on {q.device}"),
    ]
    before, after = q.ppl_before, q.ppl_after
    if before is not None and after is not None and record.quick_eval.pruned is None:
        rows.append(
            (
                "wikitext2 ppl (quick)",
                f"before {before.value:.3f} -> quantized {after.value:.3f} ({before.windows} windows x "
                f"{before.seqlen} tokens, not the full protocol)",
            )
        )
    return summary_tail(rows, record, out, "quantized")
