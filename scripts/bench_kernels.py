#!/usr/bin/env python
"""Benchmark the sparse kernels against dense cuBLAS and PyTorch's semi-structured sparsity on one CUDA GPU.

The kernel table times, per weight shape (N x K) and M (tokens per call): the original dense nn.Linear
(cuBLAS), torch.sparse.to_sparse_semi_structured (cuSPARSELt/CUTLASS), our 2:4 and bitmask Triton kernels
and the 2:4-int4 decode kernel (4-bit codes, M <= 16) (best tile config) and the dispatched SparseLinear,
with GB/s against the measured copy bandwidth. A full run adds decode tokens/s of a Llama-7B-shaped model
and SmolLM2-135M (generate() and CUDA graphs) and checks the targets (H100/H200): decode M=1 2:4 >= 1.6x
dense and bitmask >= 1.4x on Llama-class shapes, 2:4-int4 >= 3x there at M <= 16, the dispatched module
>= 0.95x dense everywhere. Everything it runs lives in oneshot.kernels.bench.

Examples::

    python scripts/bench_kernels.py --quick                        # kernel table only, a few minutes
    python scripts/bench_kernels.py --json kernels.json --strict   # everything
    python scripts/bench_kernels.py --shapes llama3-70b-tp8,llama3-8b --m 1,2,8,32,128,256 --skip-e2e

Shape presets (--shapes, comma-separated, merged): smollm2-135m, llama2-7b, llama3-8b, llama3-70b (the
q/k/v/o/gate/up/down projections, GQA k/v included), each optionally as one tensor-parallel shard
<model>-tp<N> (q/k/v/gate/up split N, o/down split K), or explicit NxK.

Exit status: 0 after a run (1 with --strict when a target is missed); 2 when no CUDA device is available,
in which case nothing is measured; 2 also for invalid options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Import this checkout's oneshot even when run as `python scripts/bench_kernels.py` from anywhere.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from oneshot.kernels import bench  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="also write all measurements to this JSON file")
    p.add_argument(
        "--shapes",
        help=f"comma-separated presets or NxK ({bench.DEFAULT_SHAPES}; --quick: {bench.QUICK_SHAPES})",
    )
    p.add_argument(
        "--m",
        help="comma-separated M values (tokens per call) "
        f"({','.join(map(str, bench.DEFAULT_M))}; --quick: {','.join(map(str, bench.QUICK_M))})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="kernel table only, sized for a few minutes on an H100/H200: Llama-3-8B shapes, 4 M values, "
        "4 tile configs per kernel, short timing, no decode runs (--shapes/--m still apply)",
    )
    p.add_argument("--skip-e2e", action="store_true", help="skip the decode tokens/s runs")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps per end-to-end measurement")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        options = bench.resolve_options(
            shapes=args.shapes,
            m=args.m,
            quick=args.quick,
            skip_e2e=args.skip_e2e,
            new_tokens=args.new_tokens,
            strict=args.strict,
            json_path=args.json,
        )
    except ValueError as err:
        print(f"bench_kernels: error: {err}", file=sys.stderr)
        return 2
    return bench.run(options)


if __name__ == "__main__":
    sys.exit(main())
