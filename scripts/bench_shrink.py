"""Structured-pruning benchmark (`oneshot shrink`, issue #11) on the embedded SmolLM2-135M-Instruct.

Protocol: calibration ``c4``, 32 windows x 2048 tokens, seed 0; WikiText-2 perplexity on the first 40 windows
x 2048 tokens of the raw test set. Targets: (a) ``--intermediate-size 1152``, (b) ``--drop-layers 6``,
(c) ``--params 0.70``. For each: perplexity, parameters, safetensors size, shrink time, and whether the saved
folder reloaded with plain transformers gives the in-memory logits (max abs difference). Then CPU speed in
ONE process, dense and shrunk models alternating: prefill tokens/s (1 x 512) and greedy decode tokens/s
(64 new tokens, batch 1), medians of ``--repeats``.

The peer, torch-pruning 1.6.1, runs target (a) in its own virtual environment (`scripts/setup_peer_venv.sh`,
`scripts/peer_torch_pruning.py`) with magnitude and Taylor importance on the very same calibration token ids;
its saved model is evaluated here on the same windows.

    python scripts/bench_shrink.py                     # the full protocol (about 50 min on 2 cores)
    python scripts/bench_shrink.py --nsamples 2 --seqlen 256 --eval-windows 2 --repeats 1 --no-peer  # smoke
    python scripts/bench_shrink.py --targets a --no-peer --damp 0.0001   # another damping
    python scripts/bench_shrink.py --reuse   # keep the results already in --out, compute the missing ones

``--reuse`` takes a dense or target result already in ``--out`` when it was made with the same options and
the same code (commit and uncommitted changes to the library) and computes the others; the peer's results
are taken as they are (delete a file to have it computed again); the speed table is always measured anew.

Each shrink and each evaluation runs in its own subprocess; results go to ``--out`` (default runs/bench-shrink).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER_PYTHON = REPO / ".peer-venv" / "torch-pruning" / "bin" / "python"
TARGETS = {
    "a": ("--intermediate-size 1152", {"intermediate_size": 1152}),
    "b": ("--drop-layers 6", {"drop_layers": 6}),
    "c": ("--params 0.70", {"params": 0.70}),
}
# issue #11: torch-pruning 1.6.1 on target (a) with this protocol (the targets are relative to its best row)
PEER_REFERENCE = {"taylor": 40.7, "magnitude": "> 1e6"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _ppl(model, tok, args) -> float:
    from oneshot.eval.corpora import ppl_token_ids
    from oneshot.eval.perplexity import perplexity

    ids = ppl_token_ids("wikitext2", tok, args.data_dir)
    return perplexity(
        model, ids, args.eval_seqlen, batch_size=1, limit=args.eval_windows, progress=False
    ).value


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _shrink_one(args: argparse.Namespace) -> dict:
    """One target: shrink in memory, save, reload with plain transformers and compare logits, evaluate."""
    import torch
    from transformers import AutoModelForCausalLM

    from oneshot import load_model
    from oneshot.config import ShrinkConfig
    from oneshot.data import calibration_windows
    from oneshot.shrink import shrink

    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    calib, _ = calibration_windows(
        "c4", tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, data_dir=args.data_dir
    )
    torch.save(calib, Path(args.out) / "calib.pt")  # the peer prunes on exactly these token ids
    _, kwargs = TARGETS[args.target]
    if args.damp is not None:
        kwargs = {**kwargs, "damp": args.damp}
    report = shrink(model, calib, ShrinkConfig(**kwargs), device="cpu", batch_size=8, progress=False)
    folder = Path(args.out) / f"target-{args.target}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    probe = calib[:1, :256]
    with torch.no_grad():
        diff = float((model(input_ids=probe).logits - again(input_ids=probe).logits).abs().max())
    mlp = [r for r in report.removals if r.kind == "mlp channels"]
    return {
        "target": args.target,
        "flags": TARGETS[args.target][0],
        "ppl": _ppl(again, tok, args),
        "params": sum(p.numel() for p in again.parameters()),
        "params_before": report.params_before,
        "block_params": report.block_params_after,
        "block_params_before": report.block_params_before,
        "safetensors_bytes": _folder_size(folder),
        "shrink_seconds": report.total_seconds,
        "reload_max_abs_logit_diff": diff,
        "config_changes": report.config_changes,
        "dropped": report.dropped_layers,
        "choice": None if report.choice is None else vars(report.choice),
        "mlp_score_counts": {s: sum(r.score == s for r in mlp) for s in ("obs", "activation")},
        "mlp_loss_sums": {s: sum(r.losses.get(s, 0.0) for r in mlp) for s in ("obs", "activation")},
        "folder": str(folder),
    }


def _eval_folder(args: argparse.Namespace) -> dict:
    from oneshot import load_model

    folder = Path(args.eval_folder)
    loaded = load_model(None) if args.eval_folder == "dense" else load_model(str(folder))
    out = {
        "ppl": _ppl(loaded.model, loaded.tokenizer, args),
        "params": sum(p.numel() for p in loaded.model.parameters()),
    }
    if args.eval_folder != "dense":
        out["safetensors_bytes"] = _folder_size(folder)
    return out


def _speed(args: argparse.Namespace) -> dict:
    """Prefill and decode tokens/s of the dense model and every shrunk folder, alternating in one process."""
    import torch
    from transformers import AutoModelForCausalLM

    from oneshot import load_model

    loaded = load_model(None)
    models = {"dense": loaded.model.eval()}
    for folder in args.speed_folders:
        models[Path(folder).name] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = loaded.tokenizer("The history of the city begins " * 200, return_tensors="pt").input_ids
    prefill_ids, prompt = ids[:, :512], ids[:, :16]
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in models}
    with torch.no_grad():
        for m in models.values():  # warm-up
            m(input_ids=prompt)
        for _ in range(args.repeats):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(input_ids=prefill_ids, use_cache=True)
                times[name]["prefill"].append(prefill_ids.shape[1] / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                out = m.generate(
                    prompt,
                    max_new_tokens=64,
                    min_new_tokens=64,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=0,
                )
                new = out.shape[1] - prompt.shape[1]
                times[name]["decode"].append(new / (time.perf_counter() - t0))
    return {
        name: {kind: statistics.median(v) for kind, v in t.items()} | {"samples": len(t["decode"])}
        for name, t in times.items()
    } | {"threads": torch.get_num_threads(), "repeats": args.repeats}


def _sub(args: argparse.Namespace, extra: list[str], result: Path, python: str = sys.executable) -> dict:
    cmd = [
        python,
        __file__,
        *extra,
        "--result",
        str(result),
        "--out",
        args.out,
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--seed",
        str(args.seed),
        "--eval-windows",
        str(args.eval_windows),
        "--eval-seqlen",
        str(args.eval_seqlen),
        "--repeats",
        str(args.repeats),
    ]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.damp is not None:
        cmd += ["--damp", str(args.damp)]
    recipe = [*cmd[1:], *_code_version()]  # what the result depends on (not the interpreter's path)
    if args.reuse and result.exists():
        old = json.loads(result.read_text())
        if old.get("bench_recipe") == recipe:
            print(f"[bench_shrink] reusing {result}", file=sys.stderr, flush=True)
            return old
        print(f"[bench_shrink] {result} was made with other options or code: recomputing", file=sys.stderr)
    subprocess.run(cmd, check=True, env=_env())
    res = json.loads(result.read_text())
    res["bench_recipe"] = recipe
    result.write_text(json.dumps(res, indent=2))
    return res


def _code_version() -> list[str]:
    """The git commit and whether the working tree differs from it (a result of other code is not reused)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "diff", "HEAD", "--", "oneshot", "kernels", "eval"], capture_output=True
        )
        digest = hashlib.sha256(dirty.stdout).hexdigest()[:16]
        return [head.stdout.strip(), digest]
    except OSError:
        return ["unknown"]


def _gib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5, help="speed measurements per model (median)")
    parser.add_argument("--targets", default="a,b,c")
    parser.add_argument("--no-peer", action="store_true", help="skip torch-pruning")
    parser.add_argument("--damp", type=float, default=None, help="shrink damping (default: ShrinkConfig's)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the dense and per-target results already in --out (same options) instead of recomputing "
        "them; speed is always measured anew",
    )
    parser.add_argument("--data-dir", default=os.environ.get("ONESHOT_DATA_DIR"))
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-shrink"))
    parser.add_argument("--target", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--eval-folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--speed-folders", nargs="*", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.result:  # a subprocess step
        if args.target:
            res = _shrink_one(args)
        elif args.eval_folder:
            res = _eval_folder(args)
        else:
            res = _speed(args)
        Path(args.result).write_text(json.dumps(res, indent=2))
        return 0

    log = lambda msg: print(f"[bench_shrink] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    results: dict = {"args": vars(args)}
    log("dense perplexity ...")
    results["dense"] = _sub(args, ["--eval-folder", "dense"], out / "dense.json")
    log(f"dense: ppl {results['dense']['ppl']:.3f}")
    folders = []
    for t in args.targets.split(","):
        log(f"target ({t}) {TARGETS[t][0]} ...")
        results[t] = _sub(args, ["--target", t], out / f"target-{t}.json")
        folders.append(results[t]["folder"])
        log(f"({t}): ppl {results[t]['ppl']:.3f}, shrink {results[t]['shrink_seconds']:.0f} s")
    peers: dict = {}
    if not args.no_peer and "a" in args.targets.split(","):
        if not PEER_PYTHON.exists():
            log("setting up the torch-pruning venv (scripts/setup_peer_venv.sh) ...")
            subprocess.run(["bash", str(REPO / "scripts" / "setup_peer_venv.sh")], check=True)
        from oneshot.models import _convert_gguf, default_model_path

        model_dir, _ = _convert_gguf(default_model_path())  # the dequantized folder load_model(None) reads
        for importance in ("magnitude", "taylor"):
            log(f"torch-pruning {importance} ...")
            folder = out / f"peer-{importance}"
            cmd = [
                str(PEER_PYTHON),
                str(REPO / "scripts" / "peer_torch_pruning.py"),
                "--model",
                str(model_dir),
                "--calib-ids",
                str(out / "calib.pt"),
                "--importance",
                importance,
                "--intermediate-size",
                "1152",
                "--out",
                str(folder),
                "--json",
                str(out / f"peer-{importance}-prune.json"),
            ]
            if not (args.reuse and (out / f"peer-{importance}-prune.json").exists()):
                subprocess.run(cmd, check=True, env=_env())
            peer = json.loads((out / f"peer-{importance}-prune.json").read_text())
            peer.update(_sub(args, ["--eval-folder", str(folder)], out / f"peer-{importance}.json"))
            peers[importance] = peer
            log(f"torch-pruning {importance}: ppl {peer['ppl']:.3f}")
    results["peer"] = peers
    log("speed (alternating, one process) ...")
    (out / "speed.json").unlink(missing_ok=True)  # measured anew, also with --reuse
    results["speed"] = _sub(args, ["--speed-folders", *folders], out / "speed.json")
    (out / "results.json").write_text(json.dumps(results, indent=2))

    dense, speed = results["dense"], results["speed"]
    print(
        f"\nSmolLM2-135M-Instruct (embedded GGUF, float32); calibration c4 {args.nsamples} x {args.seqlen} seed "
        f"{args.seed}; WikiText-2 test, first {args.eval_windows} windows x {args.eval_seqlen}; CPU speed with "
        f"{speed['threads']} threads, medians of {speed['repeats']}, dense and shrunk alternating in one process\n"
    )
    print(
        "| model | ppl | x dense | params | safetensors | shrink time | prefill tok/s (1x512) | decode tok/s (64) "
        "| decode x dense | reload max abs logit diff |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    sd = speed["dense"]
    print(
        f"| dense | {dense['ppl']:.2f} | 1.00 | {dense['params']:,} | - | - | {sd['prefill']:.0f} | "
        f"{sd['decode']:.1f} | 1.00 | - |"
    )
    for t in args.targets.split(","):
        r = results[t]
        s = speed[f"target-{t}"]
        print(
            f"| ({t}) `{r['flags']}` | {r['ppl']:.2f} | {r['ppl'] / dense['ppl']:.2f} | {r['params']:,} | "
            f"{_gib(r['safetensors_bytes'])} | {r['shrink_seconds']:.0f} s | {s['prefill']:.0f} | {s['decode']:.1f} | "
            f"{s['decode'] / sd['decode']:.2f} | {r['reload_max_abs_logit_diff']:.1e} |"
        )
    for importance, p in peers.items():
        print(
            f"| torch-pruning {p.get('version', '?')} {importance}, (a) | {p['ppl']:.2f} | {p['ppl'] / dense['ppl']:.2f} | "
            f"{p['params']:,} | {_gib(p['safetensors_bytes'])} | {p['seconds']:.0f} s | - | - | - | - |"
        )
    if peers:
        best = min(p["ppl"] for p in peers.values())
        if "a" in results:
            print(
                f"\n(a) vs the better torch-pruning row: {results['a']['ppl'] / best:.3f}x (target <= 0.75); "
                f"vs dense {results['a']['ppl'] / dense['ppl']:.3f}x (target <= 1.5). Issue #11's reference for "
                f"torch-pruning on this protocol: taylor {PEER_REFERENCE['taylor']}, magnitude {PEER_REFERENCE['magnitude']}."
            )
    for t in args.targets.split(","):
        r = results[t]
        if r.get("choice"):
            print(f"\n(c) --params chose: {r['choice']}")
        if r["mlp_score_counts"]["obs"] + r["mlp_score_counts"]["activation"]:
            print(
                f"({t}) MLP channel score chosen per layer: {r['mlp_score_counts']}; summed re-fit error "
                f"obs {r['mlp_loss_sums']['obs']:.4g} vs activation {r['mlp_loss_sums']['activation']:.4g}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
