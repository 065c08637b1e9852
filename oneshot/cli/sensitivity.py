"""`oneshot sensitivity`: per-layer reconstruction loss at several sparsities -> a sensitivity folder."""

from __future__ import annotations

import argparse
import os
from typing import Any

from oneshot.cli.prune import HelpFormatter, add_model_argument
from oneshot.config import DTYPES, METHODS, ConfigError, PruneConfig, RunConfig

__all__ = ["add_parser", "run"]

EXAMPLES = """examples:
  oneshot sensitivity --method sparsegpt --sparsities 0.3,0.5,0.7 --out sens/
  oneshot sensitivity --method sparsegpt --pattern 2:4 --out sens-2of4/
  oneshot prune --sparsity 0.6 --allocation sensitivity --sensitivity-file sens/sensitivity.json --out runs/s60
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sensitivity",
        help="measure every layer's reconstruction loss at several sparsities",
        description="One calibration pass per block of the dense model (each block on the dense outputs of the "
        "one before): the Hessian of every layer's input once, then every layer pruned at each sparsity "
        "(its reconstruction loss) and every block with all its layers at each sparsity (its output error). "
        "Writes sensitivity.json (for `oneshot prune --allocation sensitivity`), sensitivity.md, a heat "
        "map sensitivity.png and sensitivity.html (everything on one self-contained page).",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    add_model_argument(p)
    p.add_argument("--method", default="sparsegpt", help=f"one of {', '.join(METHODS)}")
    p.add_argument(
        "--sparsities",
        default=None,
        help="comma list of fractions in (0, 1) (default 0.3,0.5,0.7; with --pattern N:M only N/M)",
    )
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M (e.g. 2:4)")
    p.add_argument("--damp", type=float, default=0.01, help="SparseGPT damping, relative to mean(diag(H))")
    p.add_argument("--blocksize", type=int, default=128, help="SparseGPT lazy-update block size (columns)")
    p.add_argument("--ignore", action="append", default=[], help="layers not measured (fnmatch, repeatable)")
    p.add_argument(
        "--sink-weight",
        type=float,
        default=None,
        help="extra weight of each calibration window's first token in the q/k/v statistics, as in `oneshot "
        "prune` (default: 0.5, its default; measure with the value the pruning will use)",
    )
    p.add_argument(
        "--error-windows",
        type=int,
        default=8,
        help="calibration windows the block output errors are measured on (0: none)",
    )
    p.add_argument(
        "--calib", default="c4", help="c4, wikitext2, self, a text/jsonl/parquet file, or hf:DATASET_ID"
    )
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration window draw")
    p.add_argument("--data-dir", default=None, help="offline data directory (default: $ONESHOT_DATA_DIR)")
    p.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per block forward")
    p.add_argument("--out", default=None, help="output folder (default: runs/sensitivity-<method>-<pattern>)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out when it is an earlier sensitivity folder"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-block lines")
    return p


def _parse_sparsities(text: str | None) -> list[float]:
    if text is None:
        return []
    out = []
    for part in text.split(","):
        try:
            out.append(float(part))
        except ValueError:
            raise ConfigError(
                f"--sparsities must be a comma list of fractions, got {part.strip()!r}"
            ) from None
    return out


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from oneshot.jobs.sensitivity import HTML_FILE, TABLE_FILE, run_sensitivity

    config = PruneConfig(
        method=args.method,
        pattern=args.pattern,
        damp=args.damp,
        block_size=args.blocksize,
        ignore=tuple(args.ignore),
        propagate="dense",
        sink_weight=args.sink_weight,
    )
    sparsities = _parse_sparsities(args.sparsities)
    if not sparsities and config.nm is None:
        sparsities = [0.3, 0.5, 0.7]
    run_config = RunConfig(
        model=args.model,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        seed=args.seed,
        data_dir=args.data_dir or os.environ.get("ONESHOT_DATA_DIR"),
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        eval_windows=0,
    )
    if args.out is not None and not str(args.out).strip():
        raise ConfigError("--out is empty: give a folder name")
    out = args.out or os.path.join("runs", f"sensitivity-{config.method}-{config.pattern.replace(':', 'of')}")
    if isinstance(args.error_windows, int) and args.error_windows < 0:
        raise ConfigError(f"--error-windows must be >= 0, got {args.error_windows}")
    result = run_sensitivity(
        config,
        run_config,
        sparsities,
        out,
        error_windows=args.error_windows,
        overwrite=args.overwrite,
        progress=not args.quiet,
        argv=["oneshot", *argv],
    )
    rec = result.record
    print(
        f"{len(rec.layers)} matrices x {len(rec.sparsities)} sparsities ({', '.join(f'{s:g}' for s in rec.sparsities)}) "
        f"measured in {rec.total_seconds:.1f} s on {rec.device}\n"
        f"output  {result.out} (sensitivity.json, {TABLE_FILE}, sensitivity.png, {HTML_FILE})"
    )
    return 0
