"""`oneshot export`: a run folder -> a compressed-tensors folder or a GGUF file, read back and checked."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from oneshot.cli.prune import HelpFormatter

__all__ = ["add_parser", "run"]

EXPORT_EXAMPLES = """examples:
  oneshot export runs/smollm2-2of4-w4a16-g64 --format compressed-tensors --out export/2of4-w4   # vLLM
  oneshot export runs/smollm2-2of4-w4a16-g64 --format gguf --gguf-type q8_0 --out export/gguf   # llama.cpp
  oneshot export runs/smollm2-i1152 --format gguf --gguf-type f16 --out export/i1152-f16         # any run
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    from oneshot.jobs.export import FORMATS, GGUF_TYPES

    p = sub.add_parser(
        "export",
        help="pack a run folder for vLLM (compressed-tensors) or llama.cpp / Ollama (GGUF)",
        description="Write a run folder in another runtime's format, load it back with that format's own "
        "reader and compare its logits with the run's model. compressed-tensors: the quantized matrices "
        "packed (pack-quantized, W4A16 / W8A16, lm_head and unquantized layers ignored), config.json with "
        "quantization_config and no sparsity_config. gguf: one .gguf file (f32, f16 or q8_0) with llama.cpp's "
        "tensor names, metadata and the tokenizer (Llama / SmolLM2, Qwen2).",
        epilog=EXPORT_EXAMPLES,
        formatter_class=HelpFormatter,
    )
    p.add_argument("run_dir", help="a run folder of oneshot prune / quantize / shrink / recover")
    p.add_argument("--format", dest="fmt", required=True, choices=FORMATS, help="the export format")
    p.add_argument(
        "--gguf-type",
        default=None,
        choices=GGUF_TYPES,
        help="GGUF tensor type of the weight matrices (default f16; norms stay f32)",
    )
    p.add_argument("--out", required=True, help="export folder (taken like a run folder)")
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="compressed-tensors: weights in shards of at most this size (bytes or e.g. 500MB, 5GB) with a "
        "model.safetensors.index.json, as transformers writes them",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace --out when it is an earlier export (nothing else)"
    )
    p.add_argument("--no-check", action="store_true", help="skip reading the export back to compare logits")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from oneshot.jobs.export import run_export

    result = run_export(
        args.run_dir,
        args.fmt,
        args.out,
        gguf_type=args.gguf_type,
        overwrite=args.overwrite,
        check=not args.no_check,
        argv=["oneshot", *argv],
        max_shard_size=int(args.max_shard_size) if args.max_shard_size.isdigit() else args.max_shard_size,
    )
    m = result.manifest
    rows = [("format", m.format + (f" ({m.gguf_type}, {m.architecture})" if m.gguf_type else ""))]
    if m.scheme:
        rows.append(("quantization", m.scheme))
    total = sum(f.bytes for f in m.files.values())
    rows.append(("files", f"{len(m.files)} ({total:,} bytes)"))
    c = m.check
    if c is None:
        rows.append(("check", "skipped (--no-check)"))
    elif c.max_abs_diff is None:
        rows.append(("check", c.note or "not run"))
    else:
        verdict = "reported" if c.tolerance is None else f"within {c.tolerance:g}"
        rows.append(
            (
                "check",
                f"{c.loader}: max |logit difference| {c.max_abs_diff:.3g} over {c.tokens} tokens (logits up to "
                f"{c.max_abs_logit:.3g}; {verdict})" + (f"; {c.note}" if c.note else ""),
            )
        )
    rows.append(("output", str(Path(result.out))))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    return 0
