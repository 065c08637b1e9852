"""What the benchmark scripts share: the protocol source runs, subprocess steps, result reuse, evaluation.

Every step a benchmark times runs in its own subprocess (`oneshot ...`, or this file as a script for a
WikiText-2 perplexity), so that one model's memory and threads never leak into the next measurement.
A step's result is a JSON file with a ``bench_recipe``: the command and the code version (commit and a hash
of the uncommitted changes to the library). ``--reuse`` keeps a result whose recipe is the same.

    python scripts/benchlib.py --eval-folder RUN_DIR|dense --result OUT.json [--eval-windows N] [--eval-seqlen L]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the standard protocol: calibration c4, 32 windows x 2048 tokens, seed 0 (no quick evaluation in the run)
PROTOCOL = ["--calib", "c4", "--nsamples", "32", "--seqlen", "2048", "--seed", "0", "--eval-windows", "0"]
SOURCES = {
    "2of4": ["prune", "--method", "sparsegpt", "--pattern", "2:4", *PROTOCOL],
    "50": ["prune", "--method", "sparsegpt", "--sparsity", "0.5", "--pattern", "unstructured", *PROTOCOL],
    "i1152": ["shrink", "--intermediate-size", "1152", *PROTOCOL],
}


def env() -> dict[str, str]:
    out = dict(os.environ)
    out.setdefault("HF_HUB_OFFLINE", "1")
    out.setdefault("TOKENIZERS_PARALLELISM", "false")
    return out


def oneshot_cmd() -> list[str]:
    return [sys.executable, "-m", "oneshot"]


def code_version() -> list[str]:
    """The library's committed trees (oneshot/, kernels/, eval/: a commit that changes only scripts or docs
    keeps them) and a hash of the uncommitted changes to them (part of every recipe)."""
    dirs = ["oneshot", "kernels", "eval"]
    try:
        trees = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", *[f"HEAD:{d}" for d in dirs]],
            capture_output=True,
            text=True,
        )
        dirty = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD", "--", *dirs], capture_output=True)
        return [*trees.stdout.split(), hashlib.sha256(dirty.stdout).hexdigest()[:16]]
    except OSError:
        return ["unknown"]


def logger(name: str):
    def log(msg: str) -> None:
        print(f"[{name}] {msg}", file=sys.stderr, flush=True)

    return log


def recipe_ok(path: Path, recipe: list[str], reuse: bool, log=print) -> dict | None:
    """The earlier result at ``path`` when ``reuse`` and it was made with the same recipe, else None."""
    if reuse and path.exists():
        old = json.loads(path.read_text())
        if old.get("bench_recipe") == recipe:
            log(f"reusing {path}")
            return old
        log(f"{path} was made with other options or code: recomputing")
    return None


def run_oneshot(cmd: list[str], log=print) -> float:
    """Run ``oneshot CMD`` (raises on failure); its wall time in seconds."""
    log(f"oneshot {shlex.join(cmd)}")
    t0 = time.perf_counter()
    subprocess.run([*oneshot_cmd(), *cmd], check=True, env=env())
    return time.perf_counter() - t0


def source(name: str, folder: Path, data_dir: str | None, log=print) -> Path:
    """The protocol run folder ``SOURCES[name]`` at ``folder``, made when missing (an existing one is kept
    when its recorded command starts with the protocol command)."""
    cmd = [*SOURCES[name], "--out", str(folder), "--quiet", "--overwrite"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    record = folder / "oneshot.json"
    if record.exists():
        made = json.loads(record.read_text()).get("command", [])[1:]
        if [a for a in made if a != "--overwrite"][: len(SOURCES[name])] == SOURCES[name]:
            return folder
    log(f"making the source run {name}")
    run_oneshot(cmd, log)
    return folder


def evaluate(folder: Path | None, args: argparse.Namespace, result: Path, log=print) -> dict:
    """WikiText-2 perplexity (first ``args.eval_windows`` x ``args.eval_seqlen`` of the test set) of a run
    folder (None: the embedded dense model), in a subprocess; reused per ``args.reuse``."""
    recipe = ["eval", str(folder), str(args.eval_windows), str(args.eval_seqlen), *code_version()]
    if folder is not None and (folder / "oneshot.json").exists():
        files = json.loads((folder / "oneshot.json").read_text()).get("files") or {}
        recipe.append(hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16])
    old = recipe_ok(result, recipe, args.reuse, log)
    if old is not None:
        return old
    cmd = [sys.executable, __file__, "--eval-folder", "dense" if folder is None else str(folder)]
    cmd += ["--result", str(result), "--eval-windows", str(args.eval_windows)]
    cmd += ["--eval-seqlen", str(args.eval_seqlen)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    subprocess.run(cmd, check=True, env=env())
    res = json.loads(result.read_text())
    res["bench_recipe"] = recipe
    result.write_text(json.dumps(res, indent=2))
    return res


def _eval_step(args: argparse.Namespace) -> dict:
    from oneshot import load_model
    from oneshot.eval.corpora import ppl_token_ids
    from oneshot.eval.perplexity import perplexity

    loaded = load_model(None if args.eval_folder == "dense" else args.eval_folder)
    ids = ppl_token_ids("wikitext2", loaded.tokenizer, args.data_dir)
    t0 = time.perf_counter()
    res = perplexity(
        loaded.model, ids, args.eval_seqlen, batch_size=1, limit=args.eval_windows, progress=False
    )
    seen, params = set(), 0
    for p in loaded.model.parameters():  # tied weights counted once
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    return {
        "ppl": res.value,
        "windows": res.windows,
        "seqlen": res.seqlen,
        "seconds": time.perf_counter() - t0,
        "parameters": params,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--eval-folder", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--data-dir", default=os.environ.get("ONESHOT_DATA_DIR"))
    a = parser.parse_args()
    Path(a.result).write_text(json.dumps(_eval_step(a), indent=2))
