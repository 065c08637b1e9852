"""Allocation benchmark (issue #16) on the embedded SmolLM2-135M-Instruct: uniform vs OWL vs sensitivity,
each with the local and the dense layer objective (``--target local|dense``).

Protocol (as scripts/bench_prune.py): calibration c4, 32 windows x 2048 tokens, seed 0; WikiText-2 perplexity
on the first 40 windows x 2048 tokens of the raw test set. For SparseGPT and Wanda at 50 %, 60 %, 70 %
unstructured and at 2:4, each with ``--allocation uniform``, ``owl`` and ``sensitivity`` (the curves of one
`oneshot sensitivity` scan per method and pattern, read with ``--sensitivity-file``), and each of those with
``--target local`` and ``--target dense`` (``--variants`` picks rows of that grid): perplexity, achieved
sparsity (zeros over the pruned matrices, from the record), the compute time of the command (allocation +
pruning walk) and its wall time. Every step is an `oneshot` command in its own subprocess (scripts/benchlib.py).

The targets printed at the end:
- 50 %: the best SparseGPT variant's perplexity <= 41.5;
- 70 %: the best variant >= 25 % lower than uniform SparseGPT 70 % of the same run;
- 2:4: the best variant <= 95.4 (at 2:4 = 50 % every matrix must be 2:4: the allocations have no freedom);
- the sensitivity scan at 0.3, 0.5, 0.7 (SparseGPT, a scan of its own) <= 1.5 x one SparseGPT run (uniform
  50 %): the compute times recorded by both commands on the same machine.

    python scripts/bench_allocate.py                 # everything (hours on 2 cores)
    python scripts/bench_allocate.py --smoke         # 2 windows x 256 tokens for calibration and evaluation
    python scripts/bench_allocate.py --reuse         # keep results made by the same command and code
    python scripts/bench_allocate.py --methods sparsegpt --variants 0.5/uniform/local,0.5/uniform/dense
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from benchlib import code_version, evaluate, logger, recipe_ok, run_oneshot  # noqa: E402

_log = logger("bench_allocate")
METHODS = ("sparsegpt", "wanda")
TARGETS = ("0.5", "0.6", "0.7", "2:4")
ALLOCATIONS = ("uniform", "owl", "sensitivity")
OBJECTIVES = ("local", "dense")  # --target of `oneshot prune`
SCAN_SPARSITIES = (
    "0.3,0.4,0.5,0.6,0.7,0.8,0.9"  # the curves the allocations read (70 % needs points above it)
)
COST_SPARSITIES = "0.3,0.5,0.7"  # the scan, timed against one SparseGPT run
SMOKE_SCAN_SPARSITIES = "0.5,0.7,0.9"  # --smoke: fewer solves (a SparseGPT solve is ~0.5 s on 2 CPU cores)
GOALS = {"50": 41.5, "70_gain": 0.25, "2:4": 95.4, "scan_ratio": 1.5}


def _protocol(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model] if args.model else []
    out += ["--calib", "c4", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", "0"]
    if args.data_dir:
        out += ["--data-dir", args.data_dir]
    return out


def _step(name: str, cmd: list[str], folder: Path, args: argparse.Namespace) -> dict:
    """Run ``oneshot CMD`` into ``folder`` unless ``--reuse`` finds the same recipe; its record and times."""
    result = folder.parent / f"{folder.name}.step.json"
    recipe = [*cmd, *code_version()]
    old = recipe_ok(result, recipe, args.reuse, _log)
    if old is not None:
        return old
    wall = run_oneshot([*cmd, "--out", str(folder), "--overwrite", "--quiet"], _log)
    res: dict = {"name": name, "wall_seconds": wall, "bench_recipe": recipe}
    record_file = folder / "oneshot.json"
    if record_file.exists():
        rec = json.loads(record_file.read_text())
        prune = rec.get("prune") or {}
        alloc = rec.get("allocation") or {}
        res.update(
            sparsity=prune.get("zero_params", 0) / max(1, prune.get("pruned_params", 1)),
            block_sparsity=prune.get("matrix_zero_params", 0) / max(1, prune.get("matrix_params", 1)),
            prune_seconds=prune.get("total_seconds"),
            allocation_seconds=alloc.get("seconds", 0.0),
            allocation_achieved=alloc.get("achieved"),
            dense_by_allocation=len(alloc.get("dense") or []),
        )
    else:
        rec = json.loads((folder / "sensitivity.json").read_text())
        res.update(scan_seconds=rec.get("total_seconds"), sparsities=rec.get("sparsities"))
    result.write_text(json.dumps(res, indent=2))
    return res


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(REPO / "runs" / "bench_allocate"), help="bench folder")
    parser.add_argument("--model", default=None, help="another model than the embedded SmolLM2 (a check)")
    parser.add_argument("--nsamples", type=int, default=None, help="32 (smoke: 2)")
    parser.add_argument("--seqlen", type=int, default=None, help="2048 (smoke: 256)")
    parser.add_argument("--eval-windows", type=int, default=None, help="40 (smoke: 2)")
    parser.add_argument("--eval-seqlen", type=int, default=None, help="2048 (smoke: 256)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma list of sparsities and/or 2:4")
    parser.add_argument("--allocations", default=",".join(ALLOCATIONS))
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="--target values: local,dense")
    parser.add_argument(
        "--variants",
        default=None,
        help="only these rows of the targets x allocations x objectives grid, per method: a comma list of "
        "TARGET/ALLOCATION/OBJECTIVE (e.g. 0.7/owl/dense,2:4/uniform/local)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="2 windows x 256 tokens (calibration and eval), curves at 0.5,0.7,0.9 only",
    )
    parser.add_argument("--reuse", action="store_true", help="keep results made by the same command and code")
    parser.add_argument("--data-dir", default=os.environ.get("ONESHOT_DATA_DIR"))
    args = parser.parse_args()
    for name, full, smoke in (
        ("nsamples", 32, 2),
        ("seqlen", 2048, 256),
        ("eval_windows", 40, 2),
        ("eval_seqlen", 2048, 256),
    ):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    if args.smoke:
        args.out = str(Path(args.out).with_name(Path(args.out).name + "-smoke"))
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    targets = args.targets.split(",")
    allocations = args.allocations.split(",")
    objectives = args.objectives.split(",")
    grid = [(t, a, o) for t in targets for a in allocations for o in objectives]
    if args.variants:
        grid = [tuple(v.split("/")) for v in args.variants.split(",")]  # type: ignore[misc]

        def _target_ok(t: str) -> bool:
            try:
                return t == "2:4" or 0.0 < float(t) < 1.0
            except ValueError:
                return False

        bad = [
            v
            for v in grid
            if len(v) != 3 or not _target_ok(v[0]) or v[1] not in ALLOCATIONS or v[2] not in OBJECTIVES
        ]
        if bad:
            parser.error(
                f"--variants: TARGET/ALLOCATION/OBJECTIVE with {ALLOCATIONS} and {OBJECTIVES}: {bad}"
            )
    proto = _protocol(args)

    dense = evaluate(Path(args.model) if args.model else None, args, out / "dense.eval.json", _log)
    scans: dict[tuple[str, str], dict] = {}
    cost_scan = None
    if "sparsegpt" in methods:
        cost_cmd = ["sensitivity", "--method", "sparsegpt", *proto, "--sparsities", COST_SPARSITIES]
        cost_scan = _step("scan cost", cost_cmd, out / "runs" / "sens-cost-sparsegpt", args)
    rows: list[dict] = []
    for method in methods:
        scanned = {"2:4" if t == "2:4" else "unstructured" for t, a, _ in grid if a == "sensitivity"}
        for pattern in sorted(scanned, reverse=True):
            folder = out / "runs" / f"sens-{method}-{pattern.replace(':', 'of')}"
            cmd = ["sensitivity", "--method", method, "--pattern", pattern, *proto]
            if pattern == "unstructured":
                cmd += ["--sparsities", SMOKE_SCAN_SPARSITIES if args.smoke else SCAN_SPARSITIES]
            scans[(method, pattern)] = _step(f"scan {method} {pattern}", cmd, folder, args)
            scans[(method, pattern)]["folder"] = str(folder)
        for target, allocation, objective in grid:
            pattern = "2:4" if target == "2:4" else "unstructured"
            name = f"{method}-{target.replace(':', 'of')}-{allocation}" + (
                "-dense" if objective == "dense" else ""
            )
            folder = out / "runs" / name
            cmd = ["prune", "--method", method, "--pattern", pattern, *proto, "--eval-windows", "0"]
            if pattern == "unstructured":
                cmd += ["--sparsity", target]
            cmd += ["--allocation", allocation, "--target", objective]
            if allocation == "sensitivity":
                cmd += [
                    "--sensitivity-file",
                    str(Path(scans[(method, pattern)]["folder"]) / "sensitivity.json"),
                ]
            res = _step(name, cmd, folder, args)
            res.update(method=method, target=target, allocation=allocation, objective=objective)
            res["ppl"] = evaluate(folder, args, out / f"{name}.eval.json", _log)["ppl"]
            _log(f"{name}: ppl {res['ppl']:.2f}, sparsity {res['sparsity']:.4f}")
            rows.append(res)

    print(
        f"\n{args.model or 'SmolLM2-135M-Instruct (embedded GGUF, float32)'}, calibration c4 {args.nsamples} x {args.seqlen} seed 0, "
        f"WikiText-2 test first {dense['windows']} windows x {dense['seqlen']}; dense ppl {dense['ppl']:.2f}"
        + (" (SMOKE: not the protocol)" if args.smoke else "")
        + "\n"
    )
    print(
        "| method | target | allocation | objective | ppl | achieved sparsity | all block matrices | compute (s) | wall (s) |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        compute = (r.get("prune_seconds") or 0.0) + (r.get("allocation_seconds") or 0.0)
        print(
            f"| {r['method']} | {r['target']} | {r['allocation']} | {r['objective']} | {r['ppl']:.2f} | {r['sparsity']:.4f} | "
            f"{r['block_sparsity']:.4f} | {compute:.0f} | {r['wall_seconds']:.0f} |"
        )
    for (method, pattern), scan in scans.items():
        print(
            f"\nsensitivity scan {method} {pattern} ({', '.join(f'{s:g}' for s in scan.get('sparsities') or [])}): "
            f"{scan.get('scan_seconds', 0.0):.0f} s compute, {scan['wall_seconds']:.0f} s wall"
        )

    def best(method: str | None, target: str) -> dict | None:
        cands = [r for r in rows if r["target"] == target and (method is None or r["method"] == method)]
        return min(cands, key=lambda r: r["ppl"]) if cands else None

    def uniform(method: str, target: str) -> dict | None:
        want = (method, target, "uniform", "local")  # the published algorithm
        return next(
            (r for r in rows if (r["method"], r["target"], r["allocation"], r["objective"]) == want), None
        )

    print("\n| target | measured | goal | met |")
    print("|---|---|---|---|")
    b50 = best("sparsegpt", "0.5")
    if b50 is not None:
        print(
            f"| 50 % | best SparseGPT ({b50['allocation']}, {b50['objective']}) {b50['ppl']:.2f} | <= {GOALS['50']} | {'yes' if b50['ppl'] <= GOALS['50'] else 'no'} |"
        )
    b70, u70 = best(None, "0.7"), uniform("sparsegpt", "0.7")
    if b70 is not None and u70 is not None:
        gain = 1.0 - b70["ppl"] / u70["ppl"]
        print(
            f"| 70 % | best ({b70['method']} {b70['allocation']} {b70['objective']}) {b70['ppl']:.2f} vs uniform SparseGPT "
            f"{u70['ppl']:.2f}: {100 * gain:.1f} % lower | >= {100 * GOALS['70_gain']:.0f} % lower | "
            f"{'yes' if gain >= GOALS['70_gain'] else 'no'} |"
        )
    b24 = best(None, "2:4")
    if b24 is not None:
        print(
            f"| 2:4 | best ({b24['method']} {b24['allocation']} {b24['objective']}) {b24['ppl']:.2f} | <= {GOALS['2:4']} | {'yes' if b24['ppl'] <= GOALS['2:4'] else 'no'} |"
        )
    u50 = uniform("sparsegpt", "0.5")
    scan = cost_scan
    if u50 is not None and scan is not None and u50.get("prune_seconds"):
        ratio = (scan.get("scan_seconds") or 0.0) / u50["prune_seconds"]
        print(
            f"| scan cost | SparseGPT scan at {len(scan.get('sparsities') or [])} sparsities {scan.get('scan_seconds', 0.0):.0f} s "
            f"/ SparseGPT 50 % prune {u50['prune_seconds']:.0f} s = {ratio:.2f}x | <= {GOALS['scan_ratio']}x | "
            f"{'yes' if ratio <= GOALS['scan_ratio'] else 'no'} |"
        )
    (out / "results.json").write_text(
        json.dumps(
            {
                "args": vars(args),
                "dense": dense,
                "rows": rows,
                "scans": {f"{m} {p}": s for (m, p), s in scans.items()},
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
