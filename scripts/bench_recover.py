"""Recovery benchmark (`oneshot recover`, issue #12) on the embedded SmolLM2-135M-Instruct.

Sources: the protocol runs (calibration c4, 32 windows x 2048 tokens, seed 0) of SparseGPT 2:4, SparseGPT 50 %
unstructured and `oneshot shrink --intermediate-size 1152`, made here with the `oneshot` command when missing.
Each is recovered with ``blockwise``, with ``distill``, and with both (``distill`` on the ``blockwise`` output),
every recovery one `oneshot recover` subprocess with the token budget given below. Every model is evaluated on
WikiText-2, the first 40 windows x 2048 tokens of the raw test set, in its own subprocess.

Printed: perplexity before, after each recovery, x dense, tokens trained on, wall time of the recovery
command, training time, peak memory (process peak RSS, both models included), and the structure check done
HERE from the weight files (independent of the training code and of `oneshot.verify`): weights zero in the
source and non-zero after, N:M groups with fewer than N zeros, tensor shapes.

    python scripts/bench_recover.py                                   # everything (hours on 2 cores)
    python scripts/bench_recover.py --sources 2of4 --methods blockwise # one row
    python scripts/bench_recover.py --smoke                           # tiny budgets, a quick end-to-end check
    python scripts/bench_recover.py --reuse                           # keep results made with the same recipe

``--reuse`` keeps a recovery or an evaluation already in ``--out`` when it was made by the same command and the
same code (commit and a hash of the uncommitted changes to the library).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from benchlib import SOURCES, code_version, evaluate, logger, recipe_ok, run_oneshot, source  # noqa: E402

# issue #12: (before, target) perplexity; the shrunk target is relative to dense
TARGETS = {"2of4": (98.6, 60.0), "50": (44.2, 34.0), "i1152": (None, "1.3 x dense")}
NM = {"2of4": (2, 4)}
_log = logger("bench_recover")


def _source(name: str, args: argparse.Namespace) -> Path:
    return source(name, Path(args.out) / "sources" / name, args.data_dir, _log)


def _evaluate(folder: Path | None, args: argparse.Namespace, result: Path) -> dict:
    return evaluate(folder, args, result, _log)


def _structure(source: Path, result: Path, nm: tuple[int, int] | None, masked: bool = True) -> dict:
    """Zeros of the source checkpoint revived in the result, N:M groups broken, shapes changed: read from
    the two model.safetensors files here, with nothing of oneshot. ``masked`` False (a shrunk source, whose
    few zeros are not a sparsity pattern): only the shapes count for ``exact``."""
    from safetensors.torch import load_file

    before, after = load_file(str(source / "model.safetensors")), load_file(str(result / "model.safetensors"))
    out = {"tensors": 0, "zeros_before": 0, "revived": 0, "nm_groups": 0, "nm_broken": 0, "shapes_changed": 0}
    out["missing"] = sorted(set(before) ^ set(after))
    for key, b in before.items():
        a = after.get(key)
        if a is None:
            continue
        if a.shape != b.shape:
            out["shapes_changed"] += 1
            continue
        if ".layers." not in key or b.ndim != 2:
            continue
        zero = b == 0
        out["tensors"] += 1
        out["zeros_before"] += int(zero.sum())
        out["revived"] += int((zero & (a != 0)).sum())
        if nm is not None:
            groups = (a.reshape(-1, nm[1]) == 0).sum(-1)
            out["nm_groups"] += groups.numel()
            out["nm_broken"] += int((groups < nm[0]).sum())
    out["masked"] = masked
    out["exact"] = (
        not out["missing"]
        and out["shapes_changed"] == 0
        and (not masked or out["revived"] == 0)
        and out["nm_broken"] == 0
    )
    return out


def _recover(name: str, method: str, src: Path, args: argparse.Namespace) -> dict:
    """One `oneshot recover` (``both``: distill on the blockwise output) with its wall time."""
    base = Path(args.out) / "recovered"
    if method == "both":
        src = base / f"{name}-blockwise"
        if not (src / "oneshot.json").exists():
            raise SystemExit(f"'both' needs the blockwise result {src}: include blockwise in --methods")
        real = "distill"
    else:
        real = method
    folder = base / f"{name}-{method}"
    opts = shlex.split(args.blockwise if real == "blockwise" else args.distill)
    cmd = [
        "recover",
        str(src),
        "--method",
        real,
        *opts,
        "--eval-windows",
        "0",
        "--out",
        str(folder),
        "--quiet",
    ]
    cmd += ["--overwrite"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    result = Path(args.out) / f"recover-{name}-{method}.json"
    recipe = [*cmd, *code_version()]
    if method == "both":  # depends on the blockwise result it starts from
        recipe.append(json.loads((src / "oneshot.json").read_text())["recoveries"][-1]["started"])
    old = recipe_ok(result, recipe, args.reuse, _log)
    if old is not None and (folder / "oneshot.json").exists():
        return old
    wall = run_oneshot(cmd, _log)
    rec = json.loads((folder / "oneshot.json").read_text())["recoveries"][-1]
    res = {
        "folder": str(folder),
        "command": ["oneshot", *cmd],
        "wall_seconds": wall,
        "train_seconds": rec["seconds"],
        "tokens_seen": rec["tokens_seen"],
        "windows": rec["windows"],
        "unique_tokens": rec["windows"] * int(opts[opts.index("--seqlen") + 1])
        if "--seqlen" in opts
        else None,
        "steps": rec["steps"],
        "peak_memory_bytes": rec["peak_memory_bytes"],
        "record_masks": rec["masks"],
        "structure": _structure(
            Path(args.out) / "sources" / name, folder, NM.get(name), masked=SOURCES[name][0] == "prune"
        ),
        "bench_recipe": recipe,
    }
    result.write_text(json.dumps(res, indent=2))
    return res


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sources", default="2of4,50,i1152")
    parser.add_argument("--methods", default="blockwise,distill,both")
    parser.add_argument(
        "--blockwise",
        default="--tokens 131072 --seqlen 512 --epochs 2 --batch-size 8 --lr 2e-4",
        help="options of the blockwise recoveries",
    )
    parser.add_argument(
        "--distill",
        default="--tokens 196608 --seqlen 512 --batch-size 4 --lr 1e-4",
        help="options of the distill recoveries",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny budgets and 2 short eval windows")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--data-dir", default=os.environ.get("ONESHOT_DATA_DIR"))
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-recover"))
    args = parser.parse_args()
    if args.smoke:
        args.blockwise = "--tokens 1024 --seqlen 128 --epochs 1 --batch-size 4"
        args.distill = "--tokens 1024 --seqlen 128 --batch-size 4"
        args.eval_windows, args.eval_seqlen = 2, 256
        args.out = str(Path(args.out).with_name(Path(args.out).name + "-smoke"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sources = args.sources.split(",")
    methods = args.methods.split(",")
    results: dict = {"args": vars(args), "dense": _evaluate(None, args, out / "eval-dense.json")}
    dense = results["dense"]["ppl"]
    _log(f"dense: ppl {dense:.3f}")
    for name in sources:
        src = _source(name, args)
        row = results[name] = {"before": _evaluate(src, args, out / f"eval-{name}.json")}
        _log(f"{name}: before {row['before']['ppl']:.3f}")
        for method in methods:
            rec = _recover(name, method, src, args)
            rec["eval"] = _evaluate(Path(rec["folder"]), args, out / f"eval-{name}-{method}.json")
            row[method] = rec
            _log(
                f"{name} {method}: ppl {rec['eval']['ppl']:.3f} ({rec['tokens_seen']:,} tokens, "
                f"{rec['wall_seconds']:.0f} s, structure exact: {rec['structure']['exact']})"
            )
            (out / "results.json").write_text(json.dumps(results, indent=2))

    print(
        f"\nSmolLM2-135M-Instruct (embedded GGUF, float32); sources: protocol runs (c4 32 x 2048, seed 0); "
        f"WikiText-2 test, first {args.eval_windows} windows x {args.eval_seqlen}; recovery data c4 (train "
        f"sample), {os.cpu_count()} CPU threads\n\nblockwise: {args.blockwise}\ndistill:   {args.distill}\n"
        "both:      distill (same options) on the blockwise result; its time and tokens are the two summed\n"
        "training tokens: windows x seqlen drawn for the recovery; token passes: tokens through the trained part "
        "(blockwise: x epochs x blocks, each block trains on every window)\n"
    )
    print(
        "| model | recovery | ppl | x dense | training tokens | token passes | wall time | train time | peak memory "
        "| revived | N:M broken | shapes | target |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    print(f"| dense | - | {dense:.2f} | 1.00 | - | - | - | - | - | - | - | - | - |")
    for name in sources:
        row = results[name]
        before, target = TARGETS[name]
        tgt = f"<= {target}" if isinstance(target, float) else target
        print(
            f"| {name} | none | {row['before']['ppl']:.2f} | {row['before']['ppl'] / dense:.2f} | - | - | - | - | - | "
            f"- | - | - | issue: {before if before is not None else '-'} |"
        )
        for method in methods:
            r = row[method]
            s = r["structure"]
            passes, wall, train = r["tokens_seen"], r["wall_seconds"], r["train_seconds"]
            unique = r.get("unique_tokens") or 0
            if method == "both":
                first = row.get("blockwise") or {}
                passes += first.get("tokens_seen", 0)
                unique += first.get("unique_tokens") or 0
                wall += first.get("wall_seconds", 0.0)
                train += first.get("train_seconds", 0.0)
            ppl = r["eval"]["ppl"]
            print(
                f"| {name} | {method} | {ppl:.2f} | {ppl / dense:.2f} | {unique:,} | {passes:,} | {wall / 60:.1f} min | "
                f"{train / 60:.1f} min | {r['peak_memory_bytes'] / 2**30:.2f} GiB | {s['revived'] if s.get('masked', True) else 'n/a'} | "
                f"{s['nm_broken'] if name in NM else '-'} | {'same' if not s['shapes_changed'] and not s['missing'] else 'CHANGED'} "
                f"| {tgt} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
