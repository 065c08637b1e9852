"""`oneshot eval`: arguments -> `EvalConfig` -> the evaluation job -> the card refreshed -> a summary."""

from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import Any

from oneshot.runfolder import EvalRecord

__all__ = ["DEFAULT_TASKS", "add_parser", "format_summary", "run"]

DEFAULT_TASKS = "arc_easy,arc_challenge,piqa,hellaswag,winogrande,boolq,openbookqa,rte,lambada_openai"

logger = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to an argparse ``add_subparsers()`` object."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "eval",
        help="perplexity and zero-shot tasks of a model or a pruned run folder",
        description=(
            "Evaluate a model or run folder: perplexity under the standard protocol and lm-eval zero-shot "
            f"tasks (offline from the data directory: {DEFAULT_TASKS})."
        ),
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="run folder (oneshot.json + checkpoint), model folder, .gguf file or Hub id; "
        "default: the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--ppl",
        default="wikitext2",
        help="comma-separated perplexity datasets: wikitext2, c4, or text files; 'none' skips (wikitext2)",
    )
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window length in tokens (2048)")
    p.add_argument(
        "--ppl-windows",
        type=int,
        default=None,
        help="quick check: only the first N perplexity windows (default: the protocol's)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="quick check: only the first N documents of every task (default: all)",
    )
    p.add_argument(
        "--tasks",
        default="",
        help=f"comma-separated lm-eval tasks ('paper' = {DEFAULT_TASKS}); any lm-eval name online",
    )
    p.add_argument("--longtail", action="store_true", help="long-tail slices against the dense model")
    p.add_argument(
        "--longtail-seqlen",
        type=int,
        default=None,
        help="window length of the long-tail slices (default: --seqlen, capped by the model's context)",
    )
    p.add_argument(
        "--longtail-tokens",
        type=int,
        default=1024,
        help="tokens per long-tail slice (whole sentences / documents up to this budget) (1024)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        help="dense model or run folder evaluated alongside (results cached by fingerprint)",
    )
    p.add_argument("--json", default=None, help="write the results (oneshot-eval/1) to this file")
    p.add_argument(
        "--data-dir",
        default=None,
        help="offline data directory (default: $ONESHOT_DATA_DIR, ./data, ../shared/data)",
    )
    p.add_argument(
        "--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on CUDA, fp32 on CPU)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (auto)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows / requests per forward (default: 1 and 8 on the CPU, 8 and 32 on CUDA)",
    )
    p.add_argument(
        "--bootstrap-iters",
        type=int,
        default=100_000,
        help="lm-eval bootstrap iterations for the stderr of non-mean metrics; 0 = no stderr (100000)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the long-tail sampling (0)")
    p.add_argument("--no-cache", action="store_true", help="recompute the baseline even when cached")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _split(text: str | None) -> tuple[str, ...]:
    if not text or text.strip().lower() == "none":
        return ()
    items: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if part == "paper":
            items.extend(DEFAULT_TASKS.split(","))
        elif part:
            items.append(part)
    return tuple(dict.fromkeys(items))


def _fmt(value: float | int | str | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def format_summary(result: EvalRecord) -> str:
    """A plain-text table of perplexities and task metrics, with the baseline beside when present."""
    base = result.baseline
    lines = [f"model        {result.model}  ({result.dtype} on {result.device})"]
    if base is not None:
        lines.append(f"baseline     {base.model}{'  (cached)' if base.cached else ''}")
    for name, ppl in result.ppl.items():
        row = f"ppl {name:<9} {_fmt(ppl.value)}"
        bppl = base.ppl.get(name) if base is not None else None
        if bppl is not None:
            row += f"   baseline {_fmt(bppl.value)}"
        row += f"   ({ppl.windows} windows x {ppl.seqlen} tokens)"
        lines.append(row)
    for name, task in result.tasks.items():
        metrics = [f"acc {_fmt(task.get('acc'))}"]
        if task.get("acc_norm") is not None:
            metrics.append(f"acc_norm {_fmt(task.get('acc_norm'))}")
        if task.get("perplexity") is not None:
            metrics.append(f"ppl {_fmt(task.get('perplexity'), 3)}")
        row = f"{name:<13} " + "  ".join(metrics)
        btask = base.tasks.get(name) if base is not None else None
        if btask is not None:
            row += f"   baseline acc {_fmt(btask.get('acc'))}"
        row += f"   (n={task.n}, {str(task.source).split(':', 1)[0]})"
        lines.append(row)
    if result.longtail is not None:
        lines.append("longtail     included in the JSON")
    lines.append(f"time         {result.seconds or 0.0:.1f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from oneshot.eval.evaluate import EvalConfig, EvalInputError, evaluate

    if args.quiet:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    config = EvalConfig(
        ppl=_split(args.ppl),
        seqlen=args.seqlen,
        ppl_windows=args.ppl_windows,
        limit=args.limit,
        tasks=_split(args.tasks),
        baseline=args.baseline,
        longtail=args.longtail,
        longtail_seqlen=args.longtail_seqlen,
        longtail_tokens=args.longtail_tokens,
        seed=args.seed,
        data_dir=args.data_dir or os.environ.get("ONESHOT_DATA_DIR"),
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        bootstrap_iters=args.bootstrap_iters,
        cache=not args.no_cache,
    )
    json_out = Path(args.json).expanduser() if args.json else None
    if json_out is not None:
        if json_out.is_dir():
            raise EvalInputError(f"--json {args.json} is a folder; give a file name")
        if not json_out.parent.exists():
            raise EvalInputError(f"--json {args.json}: folder {json_out.parent} does not exist")
    result = evaluate(args.model, config, progress=not args.quiet)
    if result.run_dir is not None:
        _refresh_card(Path(result.run_dir))
    if json_out is not None:
        result.save(json_out)
    print(format_summary(result))
    if json_out is not None:
        print(f"results      {args.json}")
    return 0


def _refresh_card(run_dir: Path) -> None:
    """Rewrite the run's model card so it carries the new eval.json results (a failure is a warning: the
    card is derived and `oneshot card` rewrites it)."""
    from oneshot.card import write_card

    try:
        write_card(run_dir)
    except Exception as exc:
        logger.warning("could not refresh the model card in %s: %s", run_dir, exc)
