"""`oneshot recover`: arguments -> `RecoverConfig` -> the recover job -> card and report -> a summary."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from oneshot.cli.prune import HelpFormatter, check_out, summary_tail, write_run_report
from oneshot.config import MIXED_PRECISION, RECOVER_METHODS, RecoverConfig
from oneshot.runfolder import RunRecord

__all__ = ["add_parser", "run"]

RECOVER_EXAMPLES = """examples:
  oneshot recover runs/smollm2-2of4 --method blockwise --tokens 200000 --epochs 2
  oneshot recover runs/smollm2-2of4 --method distill --tokens 100000 --lr 5e-5 --out runs/2of4-kd
  oneshot recover runs/smollm2-2of4-recovered --method distill --out runs/2of4-both   # blockwise, then distill
  oneshot recover runs/smollm2-2of4 --method blockwise --resume                       # after an interruption
  accelerate launch -m oneshot recover runs/big-2of4 --method distill --mixed-precision bf16   # several GPUs
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    d = RecoverConfig()
    p = sub.add_parser(
        "recover",
        help="fine-tune a pruned or shrunk run toward its dense teacher, the sparsity pattern kept exact",
        description="Recovery fine-tuning of the decoder blocks of a run folder of `oneshot prune` or `oneshot "
        "shrink`: blockwise (each block fitted to the teacher's block on the same inputs, one block at a time) "
        "or distill (end-to-end KL to the teacher's logits, optionally plus the hidden states of every block). "
        "Pruned weights stay exactly zero, N:M groups intact, shapes unchanged; the finished checkpoint is "
        "checked against the run's from the weight files. Writes a new run folder (record with the recovery "
        "section, card, report).",
        epilog=RECOVER_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder of `oneshot prune` or `oneshot shrink`")
    p.add_argument(
        "--teacher",
        default=None,
        help="the dense model (folder, Hub id or .gguf); default: the base model recorded in RUN_DIR/oneshot.json",
    )
    p.add_argument("--method", default=d.method, choices=RECOVER_METHODS, help="blockwise or distill")
    p.add_argument(
        "--data",
        default=d.data,
        help="training text: c4, wikitext2 (train/validation, never the test split), self, a "
        ".txt/.jsonl/.jsonl.gz/.parquet file, or hf:DATASET_ID",
    )
    p.add_argument(
        "--tokens", type=int, default=d.tokens, help="training tokens (windows = tokens // seqlen)"
    )
    p.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per training window")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the window draw and of the data order")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of AdamW")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per micro-batch")
    p.add_argument(
        "--grad-accum", type=int, default=d.grad_accum, help="distill: micro-batches per optimizer step"
    )
    p.add_argument(
        "--epochs", type=int, default=d.epochs, help="passes over the windows (blockwise: per block)"
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (matrices)")
    p.add_argument(
        "--warmup",
        type=float,
        default=d.warmup,
        help="fraction of the steps with a linear learning-rate warm-up",
    )
    p.add_argument(
        "--hidden-weight",
        type=float,
        default=d.hidden_weight,
        help="distill: weight of the normalised hidden-state error of every block (SquareHead; 0 = logits only)",
    )
    p.add_argument(
        "--mixed-precision",
        default=d.mixed_precision,
        choices=MIXED_PRECISION,
        help="distill, via accelerate",
    )
    p.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="distill: keep every activation (faster, more memory)",
    )
    p.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=d.checkpoint_minutes,
        help="write the resumable training state this often (0 = after every step)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    p.add_argument(
        "--data-dir",
        default=None,
        help="offline data directory (default: $ONESHOT_DATA_DIR, ./data, ../shared/data)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--eval-windows",
        type=int,
        default=8,
        help="quick WikiText-2 perplexity windows of teacher, model before and after (0 = skip)",
    )
    p.add_argument(
        "--eval-seqlen", type=int, default=None, help="quick evaluation window length (default: --seqlen)"
    )
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR-recovered)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out when it is an earlier oneshot output (never any other folder)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-block lines")
    return p


def config_from_args(args: argparse.Namespace) -> RecoverConfig:
    return RecoverConfig(
        method=args.method,
        data=args.data,
        tokens=args.tokens,
        seqlen=args.seqlen,
        seed=args.seed,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        epochs=args.epochs,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        hidden_weight=args.hidden_weight,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_minutes=args.checkpoint_minutes,
    )


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from oneshot.card import write_card
    from oneshot.jobs.recover import run_recover

    config = config_from_args(args)
    check_out(args.out)
    result = run_recover(
        args.run_dir,
        config,
        args.out,
        teacher=args.teacher,
        data_dir=args.data_dir,
        device=args.device,
        eval_windows=args.eval_windows,
        eval_seqlen=args.eval_seqlen,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
        argv=["oneshot", *argv],
        finish=[write_card],
    )
    write_run_report(result.out)
    print(summary(result.record, result.out))
    return 0


def summary(record: RunRecord, out: Path) -> str:
    """The lines `oneshot recover` prints at the end."""
    rec = record.recoveries[-1]
    cfg = rec.config
    rows = [
        ("method", f"{cfg.method} ({rec.steps} steps, lr {cfg.lr:g}, {cfg.epochs} epoch(s))"),
        (
            "data",
            f"{cfg.data}: {rec.windows} x {cfg.seqlen} tokens, seed {cfg.seed} ({rec.tokens_seen:,} tokens trained on)",
        ),
        (
            "recovery time",
            f"{rec.seconds:.1f} s on {rec.device}" + (f", resumed {rec.resumed}x" if rec.resumed else ""),
        ),
    ]
    if rec.masks is not None:
        m = rec.masks
        pattern = (
            f"{m.matrices} matrices, {m.pruned_before:,} pruned weights, {m.revived} revived"
            + (f", {m.nm} groups broken: {m.nm_broken} of {m.nm_groups:,}" if m.nm else "")
            if m.matrices
            else "shapes unchanged"
        )
        rows.append(("structure", f"{'exact' if m.exact else 'BROKEN'}: {pattern} (checked from the files)"))
    if rec.ppl_before is not None and rec.ppl_after is not None:
        rows.append(
            (
                "wikitext2 ppl (quick)",
                f"before {rec.ppl_before.value:.3f} -> recovered {rec.ppl_after.value:.3f}"
                + (f" (dense {rec.ppl_teacher.value:.3f})" if rec.ppl_teacher is not None else "")
                + f"; {rec.ppl_after.windows} windows x {rec.ppl_after.seqlen} tokens, not the full protocol",
            )
        )
        rows.append(("output", str(out)))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
    return summary_tail(rows, record, out, "recovered")
