"""`oneshot shrink`: arguments -> `ShrinkConfig` + `RunConfig` -> the shrink job -> card and report -> a summary."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from oneshot.cli.prune import (
    HelpFormatter,
    add_model_argument,
    add_run_arguments,
    check_out,
    model_stem,
    run_config_from_args,
    summary_tail,
    write_run_report,
)
from oneshot.config import MLP_BIAS_CHOICES, REFIT_TARGETS, SHRINK_SCORES, RunConfig, ShrinkConfig
from oneshot.runfolder import RunRecord

__all__ = ["add_parser", "run"]

SHRINK_EXAMPLES = """examples:
  oneshot shrink --intermediate-size 1152 --calib c4 --nsamples 32 --out runs/smollm2-i1152
  oneshot shrink --model ./my-llama --num-key-value-heads 2 --drop-layers 4 --out runs/small
  oneshot shrink --params 0.7 --out runs/p70          # chooses widths and blocks from measured costs
  oneshot shrink --model ./my-mixtral --num-experts 6 --out runs/e6
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "shrink",
        help="structured pruning: a smaller dense model (fewer channels, KV heads, blocks or experts)",
        description="Remove whole units (MLP channels, GQA groups, decoder blocks, experts) chosen on calibration "
        "data, re-fit the layers that read them by least squares, and write a smaller dense checkpoint with a "
        "standard config that plain transformers loads: a run folder with oneshot.json, model card and report. "
        "Give at least one target.",
        epilog=SHRINK_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    add_model_argument(p)
    p.add_argument("--intermediate-size", type=int, default=None, help="MLP width of every layer")
    p.add_argument(
        "--num-key-value-heads",
        type=int,
        default=None,
        help="KV heads to keep; each removed KV head takes its query heads along (head_dim is kept)",
    )
    p.add_argument(
        "--drop-layers",
        type=int,
        default=0,
        help="decoder blocks to remove (those that change their input least on the calibration data)",
    )
    p.add_argument(
        "--params",
        type=float,
        default=None,
        help="keep this fraction of the decoder-block parameters; widths, KV heads and dropped blocks chosen "
        "from measured costs (not with the three targets above)",
    )
    p.add_argument("--num-experts", type=int, default=None, help="MoE: experts to keep per layer")
    p.add_argument(
        "--score",
        default="auto",
        choices=SHRINK_SCORES,
        help="MLP channel choice: obs (greedy optimal brain surgeon), activation (||X_j|| * ||W_j||) or "
        "auto (per layer the one whose re-fit leaves the smaller error)",
    )
    p.add_argument(
        "--refit-target",
        default="layer",
        choices=REFIT_TARGETS,
        help="what the MLP's down projection is re-fitted to: its own output on its current inputs (layer), or "
        "the unshrunk model's block output (dense: also absorbs the errors of earlier blocks and removed heads; "
        "measured worse on SmolLM2, see BENCHMARKS.md)",
    )
    p.add_argument(
        "--mlp-bias",
        default=ShrinkConfig.mlp_bias,
        choices=MLP_BIAS_CHOICES,
        help="auto: where the config has an mlp_bias switch that is off (Llama), shrinking the MLP width switches "
        "it on and the removed channels' mean moves into down_proj's bias; keep: leave the config as it is "
        "(auto measured no better on SmolLM2, see BENCHMARKS.md)",
    )
    p.add_argument(
        "--damp",
        type=float,
        default=ShrinkConfig.damp,
        help="damping of the re-fit and OBS normal equations, relative to mean(diag(H)); 0.001 measured better "
        "than 0.01 on SmolLM2 (see BENCHMARKS.md)",
    )
    add_run_arguments(p, out_help="output folder (default: runs/<model>-shrunk-<targets>)")
    p.set_defaults(nsamples=32)
    return p


def configs_from_args(args: argparse.Namespace) -> tuple[ShrinkConfig, RunConfig]:
    config = ShrinkConfig(
        intermediate_size=args.intermediate_size,
        num_key_value_heads=args.num_key_value_heads,
        drop_layers=args.drop_layers,
        params=args.params,
        num_experts=args.num_experts,
        score=args.score,
        damp=args.damp,
        refit_target=args.refit_target,
        mlp_bias=args.mlp_bias,
    )
    return config, run_config_from_args(args)


def default_out(config: ShrinkConfig, run: RunConfig) -> str:
    """``runs/<model>-shrunk-<targets>``, e.g. ``runs/smollm2-135m-shrunk-i1152-l24``."""
    parts = [
        f"{tag}{value:g}" if isinstance(value, float) else f"{tag}{value}"
        for tag, value in (
            ("i", config.intermediate_size),
            ("kv", config.num_key_value_heads),
            ("drop", config.drop_layers or None),
            ("p", config.params),
            ("e", config.num_experts),
        )
        if value is not None
    ]
    return os.path.join("runs", f"{model_stem(run)}-shrunk-{'-'.join(parts)}")


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from oneshot.card import write_card
    from oneshot.jobs.shrink import run_shrink

    config, run_config = configs_from_args(args)
    check_out(args.out)
    result = run_shrink(
        config,
        run_config,
        args.out or default_out(config, run_config),
        overwrite=args.overwrite,
        progress=not args.quiet,
        argv=["oneshot", *argv],
        finish=[write_card],
    )
    write_run_report(result.out)
    print(summary(result.record, result.out))
    return 0


def summary(record: RunRecord, out: Path) -> str:
    """The lines `oneshot shrink` prints at the end."""
    _, rep = record.shrunk
    run_cfg = record.run
    rows = [(key, f"{before} -> {after}") for key, (before, after) in rep.config_changes.items()]
    rows.append(
        (
            "parameters",
            f"{rep.params_before:,} -> {rep.params_after:,} ({rep.params_after / max(1, rep.params_before):.3f}; "
            f"decoder blocks {rep.block_params_after / max(1, rep.block_params_before):.3f})",
        )
    )
    if rep.choice is not None:
        ch = rep.choice
        rows.append(
            (
                "--params chose",
                f"intermediate size {ch.intermediate_size or 'unchanged'}, KV heads "
                f"{ch.num_key_value_heads or 'unchanged'}, dropped blocks {ch.drop or 'none'}",
            )
        )
    elif rep.dropped_layers:
        rows.append(("dropped blocks", ", ".join(str(i) for i in rep.dropped_layers)))
    rows += [
        (
            "calibration",
            f"{run_cfg.calib}: {run_cfg.nsamples} x {run_cfg.seqlen} tokens, seed {run_cfg.seed}",
        ),
        ("shrink time", f"{rep.total_seconds:.1f} s on {rep.device}"),
    ]
    return summary_tail(rows, record, out, "shrunk")
