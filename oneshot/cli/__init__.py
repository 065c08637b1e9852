"""The `oneshot` command line: one package, one error handler.

Each command is a module with ``add_parser(subparsers)`` and ``run(args, argv) -> exit code``: it turns
arguments into configs, calls a job (`oneshot.jobs`, `oneshot.eval.evaluate`) and the publishing steps
(`oneshot.card`, `oneshot.eval.report`, `oneshot.hub`), and prints a summary. Errors are not caught per
command: `main` turns every `OneshotError` (and the few environment errors `oneshot.errors.describe` knows)
into one line ``oneshot: error: ...`` and its exit code, Ctrl-C into exit 130 with what is on disk.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import NoReturn

from oneshot.cli import card, evaluate, export, prune, push, quantize, recover, report, sensitivity, shrink
from oneshot.errors import Interrupted

__all__ = ["build_parser", "main"]

COMMANDS = {
    "prune": prune,
    "sensitivity": sensitivity,
    "shrink": shrink,
    "recover": recover,
    "quantize": quantize,
    "export": export,
    "eval": evaluate,
    "report": report,
    "push": push,
    "card": card,
}

EXAMPLES = """examples:
  # the embedded SmolLM2-135M, SparseGPT 2:4, standard C4 calibration; checkpoint + record + card + report
  oneshot prune --method sparsegpt --pattern 2:4 --calib c4 --out runs/smollm2-2of4
  # a local model, Wanda 50 %, keep the down projections dense
  oneshot prune --model ./my-llama --method wanda --sparsity 0.5 --ignore '*.mlp.down_proj' --out runs/w50
  # structured pruning: a smaller dense model (MLP width 1536 -> 1152), faster on every runtime
  oneshot shrink --intermediate-size 1152 --out runs/smollm2-i1152
  # 2:4 and 4-bit weights in one pass; packed for vLLM (compressed-tensors) or llama.cpp (GGUF)
  oneshot prune --pattern 2:4 --quantize w4a16 --group-size 64 --out runs/smollm2-2of4-w4
  oneshot export runs/smollm2-2of4-w4 --format compressed-tensors --out export/smollm2-2of4-w4
  # recovery fine-tuning toward the dense model, pruned weights kept exactly zero
  oneshot recover runs/smollm2-2of4 --method blockwise --tokens 200000
  # perplexity and the nine zero-shot tasks against the dense model; a report; a Hub upload check
  oneshot eval runs/smollm2-2of4 --tasks paper --baseline default
  oneshot report runs/smollm2-2of4 --out report
  oneshot push runs/smollm2-2of4 --repo-id you/smollm2-2of4 --dry-run
"""


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line ``oneshot: error: ...`` and exit 2, like every other error (the usage is
    one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"oneshot: error: {self.prog.split()[-1]}: {message} (see {self.prog} --help)\n")


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


def build_parser() -> argparse.ArgumentParser:
    from oneshot import __version__

    parser = OneLineParser(
        prog="oneshot",
        description="One-shot pruning of causal LMs (magnitude, Wanda, SparseGPT), with honest evaluation.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"oneshot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `oneshot` command. Exit codes: 0 done, 2 bad input or a fixable problem (one line on stderr),
    130 interrupted (with what is on disk); anything else is a bug and keeps its traceback."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        _setup_logging(getattr(args, "quiet", False))
        return int(COMMANDS[args.command].run(args, argv))
    except Interrupted as exc:
        print(f"oneshot: {exc.message}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `oneshot ... | head`: the reader left; nothing more to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
