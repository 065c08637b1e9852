"""Scale guards of issue #15: the solver's scratch memory (item 4) and crash-safe resume (item 2).

``memory``: the peak scratch memory of one SparseGPT solve of a (rows, cols) fp32 layer, measured as the
process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs) above the resident size
with the Hessian and the weight allocated, each measurement in a fresh subprocess. "before" runs the
solver of the git revision ``--before`` (default 2ab0513, the last commit before this work; loaded from ``git show``), "after" the working tree;
"after, shared" is the pruner's path: the statistics give their Hessian up (`InputStats.take_hessian`),
it is factorised once (`factorize`) and the layer solved from the factor. Figures in units of one Hessian
(cols x cols x 4 bytes). Defaults: down_proj of a 7B Llama (4096 x 11008) and 4096 input columns (its
gate_proj, 11008 x 4096).

``resume``: a synthetic small Llama is pruned by ``oneshot prune`` in a subprocess that is killed with
SIGKILL at a random block; ``oneshot prune --resume`` finishes the run, and every tensor of the result
is compared byte for byte with an uninterrupted run.

    python scripts/bench_scale.py memory                 # 4096x11008 and 11008x4096, before and after
    python scripts/bench_scale.py memory --shapes 512x2048
    python scripts/bench_scale.py resume --seed 3
    python scripts/bench_scale.py stream                 # 64 blocks, 4.3 GiB of safetensors, 1 GiB limit
    python scripts/bench_scale.py distributed            # embedded SmolLM2, 8 x 512: 1 vs 2 gloo processes

``stream``: a synthetic Llama whose safetensors are at least 4 x the memory limit imposed on the pruning
process (``RLIMIT_DATA``: its heap and anonymous memory, where every tensor lives) is pruned with
``--offload disk``; the same command with ``--offload none`` under the same limit shows it would not fit.
A smaller copy (same width and seed, fewer blocks) is pruned streamed under the limit and in memory without
it, and the outputs are compared tensor by tensor and file by file; the peak RSS of the two streamed runs
shows what the layer count costs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BEFORE = "2ab0513"  # the last commit with the old solver (issue #15 item 4 landed after it)

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _measure_child(variant: str, rows: int, cols: int, before_file: str) -> dict:
    """One measurement, in its own process: peak resident bytes above the baseline during one solve."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    g = torch.Generator().manual_seed(0)
    rank = 256
    a = torch.randn(cols, rank, generator=g)
    hessian = a @ a.T / rank  # (cols, cols), positive definite after the ridge
    hessian.diagonal().add_(0.1)
    del a
    weight = torch.randn(rows, cols, generator=g)
    kwargs = {"sparsity": 0.5, "pattern": None, "block_size": 128, "damp": 0.01}
    if variant == "before":
        spec = importlib.util.spec_from_file_location("sparsegpt_before", before_file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        solve = module.prune_sparsegpt
    else:
        from oneshot.solvers.sparsegpt import factorize, prune_sparsegpt

        solve = prune_sparsegpt
    if variant == "after, shared":
        from oneshot.stats import InputStats

        stats = InputStats(cols, hessian=True)
        stats._sum = hessian  # the running sum X^T X with n = 1: the Hessian itself
        stats.n = 1
        del hessian
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the resident high-water mark
    base = _status("VmRSS")
    t0 = time.perf_counter()
    if variant == "after, shared":
        h = stats.take_hessian()
        factor = factorize(h, damp=0.01)
        del h
        result = solve(weight, factor, **kwargs)
        del factor
    else:
        result = solve(weight, hessian, **kwargs)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - base
    assert result.weight.shape == (rows, cols)
    return {"variant": variant, "rows": rows, "cols": cols, "peak_bytes": peak, "seconds": seconds}


def _memory(args: argparse.Namespace) -> int:
    before = subprocess.run(
        ["git", "show", f"{args.before}:oneshot/solvers/sparsegpt.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.TemporaryDirectory() as tmp:
        before_file = Path(tmp) / "sparsegpt_before.py"
        before_file.write_text(before)
        print(f"solver scratch (peak resident bytes above Hessian + weight), before = {args.before}")
        print(f"{'layer (rows x cols)':>22} {'variant':>14} {'peak MiB':>9} {'Hessians':>9} {'seconds':>8}")
        for shape in args.shapes:
            rows, cols = (int(v) for v in shape.lower().split("x"))
            for variant in ("before", "after", "after, shared"):
                out = subprocess.run(
                    [sys.executable, __file__, "_child", variant, str(rows), str(cols), str(before_file)],
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                hess = r["peak_bytes"] / (4 * cols * cols)
                print(
                    f"{f'{rows} x {cols}':>22} {variant:>14} {r['peak_bytes'] / 2**20:9.0f} {hess:9.2f} "
                    f"{r['seconds']:8.1f}",
                    flush=True,
                )
    return 0


def _synthetic_llama(
    folder: Path, layers: int, hidden: int, seed: int, max_shard_size: str = "50GB", name: str = "model"
) -> Path:
    """A random Llama (``layers`` blocks of width ``hidden``) with a byte-level BPE tokenizer, saved."""
    import random

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(400)
    ]
    text = " ".join(rng.choice(words) for _ in range(40_000))
    (folder / "calib.txt").write_text(text)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        vocab_size=len(fast),
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model_dir = folder / name
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir, max_shard_size=max_shard_size)
    del model
    fast.save_pretrained(model_dir)
    return model_dir


def _tensor_bytes(folder: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Every tensor of every safetensors file under ``folder``: dtype, shape, sha256 of its bytes."""
    import hashlib

    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                t = fh.get_tensor(k).contiguous()
                raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
                out[f"{f.relative_to(folder)}:{k}"] = (
                    str(t.dtype),
                    tuple(t.shape),
                    hashlib.sha256(raw).hexdigest(),
                )
    return out


def _resume(args: argparse.Namespace) -> int:
    import random

    rng = random.Random(args.seed)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = _synthetic_llama(tmp, args.layers, args.hidden, args.seed)
        base = [
            sys.executable,
            "-m",
            "oneshot",
            "prune",
            "--model",
            str(model_dir),
            "--calib",
            str(tmp / "calib.txt"),
        ]
        base += ["--method", args.method, "--pattern", args.pattern, "--nsamples", str(args.nsamples)]
        base += ["--seqlen", str(args.seqlen), "--eval-windows", "0", "-q"]
        t0 = time.perf_counter()
        subprocess.run([*base, "--out", str(tmp / "reference")], check=True, env=env, capture_output=True)
        uninterrupted = time.perf_counter() - t0
        kill_at = rng.randint(1, args.layers - 1)  # killed once this many blocks are checkpointed
        out = tmp / "resumed"
        proc = subprocess.Popen(
            [*base, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        done = 0
        while proc.poll() is None:
            states = list(tmp.glob(".resumed.tmp-*/.resume/state.json"))
            if states:
                try:
                    done = int(json.loads(states[0].read_text())["next_block"])
                except (OSError, ValueError, KeyError):
                    done = 0
                if done >= kill_at:
                    proc.kill()  # SIGKILL
                    break
            time.sleep(0.01)
        code = proc.wait()
        if code != -9:
            print(f"the run was not killed (exit {code}, {done} blocks done): use a larger --layers/--hidden")
            return 1
        print(f"killed with SIGKILL after {done} of {args.layers} blocks (random target {kill_at})")
        again = subprocess.run([*base, "--out", str(out)], env=env, capture_output=True, text=True)
        print(f"the same command again: exit {again.returncode}: {again.stderr.strip().splitlines()[-1]}")
        t0 = time.perf_counter()
        subprocess.run([*base, "--out", str(out), "--resume"], check=True, env=env, capture_output=True)
        resumed = time.perf_counter() - t0
        ref, got = _tensor_bytes(tmp / "reference"), _tensor_bytes(out)
        same = ref.keys() == got.keys() and all(ref[k] == got[k] for k in ref)
        print(
            f"uninterrupted {uninterrupted:.1f}s; resume {resumed:.1f}s; {len(ref)} tensors compared byte for "
            f"byte: {'identical' if same else 'DIFFERENT'}"
        )
        leftovers = [p.name for p in tmp.iterdir() if p.name.startswith(".resumed")]
        print(f"left beside the output: {leftovers or 'nothing'}")
        return 0 if same and not leftovers else 1


# `oneshot` with the process's own resident high-water mark (VmHWM) printed to stderr at exit: the rusage
# of a child would also count the pages it shared with this process when it was forked
_HWM_WRAPPER = r"""
import atexit, sys
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("\nBENCH_VMHWM %d\n" % (int(line.split()[1]) * 1024))
atexit.register(_hwm)
from oneshot.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _limited_run(cmd: list[str], limit: int | None, env: dict[str, str]) -> tuple[int, int, float, str]:
    """``oneshot`` with the arguments ``cmd``, its data segment (heap and anonymous memory: every tensor)
    limited to ``limit`` bytes (``RLIMIT_DATA``); returns exit status, its peak RSS (VmHWM, bytes), wall
    seconds and the last line of its stderr."""
    import resource

    def limit_memory() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _HWM_WRAPPER, *cmd],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit_memory,
    )
    seconds = time.perf_counter() - t0
    peak, lines = 0, []
    for ln in proc.stderr.splitlines():
        if ln.startswith("BENCH_VMHWM "):
            peak = int(ln.split()[1])
        elif ln.strip():
            lines.append(ln.strip())
    return proc.returncode, peak, seconds, lines[-1] if lines else ""


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _stream(args: argparse.Namespace) -> int:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    limit = int(args.limit_gib * 2**30)
    gib = 2**30
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        big = _synthetic_llama(tmp, args.layers, args.hidden, args.seed, max_shard_size="2GB", name="big")
        small = _synthetic_llama(
            tmp, args.small_layers, args.hidden, args.seed, max_shard_size="2GB", name="small"
        )
        size = _folder_bytes(big)
        print(
            f"synthetic Llama: {args.layers} blocks of width {args.hidden}, safetensors {size / gib:.2f} GiB in "
            f"{len(list(big.glob('*.safetensors')))} shards ({time.perf_counter() - t0:.0f} s to make); "
            f"memory limit {args.limit_gib:g} GiB (RLIMIT_DATA: heap and anonymous memory) = "
            f"checkpoint / {size / limit:.2f}"
        )
        if size < 4 * limit:
            print("the checkpoint is not 4 x the limit: raise --layers/--hidden or lower --limit-gib")
            return 1

        def prune(model: Path, out: str, offload: str) -> list[str]:
            cmd = [
                "prune",
                "--model",
                str(model),
                "--calib",
                str(tmp / "calib.txt"),
            ]
            cmd += ["--method", args.method, "--pattern", args.pattern, "--nsamples", str(args.nsamples)]
            cmd += ["--seqlen", str(args.seqlen), "--eval-windows", "0", "-q", "--offload", offload]
            return [*cmd, "--out", str(tmp / out)]

        rows = []
        ok = True
        code, peak, secs, tail = _limited_run(prune(big, "big-in-memory", "none"), limit, env)
        rows.append(
            ("in memory", args.layers, code, peak, secs, "refused: " + tail[:90] if code else "completed")
        )
        code, peak_big, secs, tail = _limited_run(prune(big, "big-streamed", "disk"), limit, env)
        ok &= code == 0
        out_size = _folder_bytes(tmp / "big-streamed") if code == 0 else 0
        rows.append(
            (
                "streamed",
                args.layers,
                code,
                peak_big,
                secs,
                f"output {out_size / gib:.2f} GiB" if code == 0 else tail,
            )
        )
        if code == 0:
            shutil.rmtree(tmp / "big-streamed")
        code, peak_small, secs, tail = _limited_run(prune(small, "small-streamed", "disk"), limit, env)
        ok &= code == 0
        rows.append(("streamed", args.small_layers, code, peak_small, secs, "" if code == 0 else tail))
        code, peak_mem, secs, tail = _limited_run(prune(small, "small-in-memory", "none"), None, env)
        ok &= code == 0
        same = False
        if ok:
            ref, got = _tensor_bytes(tmp / "small-in-memory"), _tensor_bytes(tmp / "small-streamed")
            same = ref.keys() == got.keys() and all(ref[k] == got[k] for k in ref)
            files = sorted(
                p.name for p in (tmp / "small-in-memory").iterdir() if p.suffix in (".json", ".safetensors")
            )
            files = [f for f in files if f != "oneshot.json"]
            identical_files = all(
                (tmp / "small-in-memory" / f).read_bytes() == (tmp / "small-streamed" / f).read_bytes()
                for f in files
            )
            rows.append(
                (
                    "in memory (no limit)",
                    args.small_layers,
                    code,
                    peak_mem,
                    secs,
                    f"{len(ref)} tensors vs streamed: {'identical' if same else 'DIFFERENT'}; "
                    f"{len(files)} files byte for byte: {'identical' if identical_files else 'DIFFERENT'}",
                )
            )
            same &= identical_files
        print()
        print("| run | blocks | exit | peak RSS | wall | result |")
        print("|---|---:|---:|---:|---:|---|")
        for name, layers, code, peak, secs, what in rows:
            print(f"| {name} | {layers} | {code} | {peak / 2**20:.0f} MiB | {secs:.0f} s | {what} |")
        print()
        if ok:
            print(
                f"peak RSS streamed: {peak_big / 2**20:.0f} MiB at {args.layers} blocks vs {peak_small / 2**20:.0f} MiB "
                f"at {args.small_layers} blocks (checkpoints {size / gib:.2f} vs {_folder_bytes(small) / gib:.2f} GiB)"
            )
        return 0 if ok and same else 1


def _load_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _compare(a: dict, b: dict) -> str:
    import torch

    masks = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a)
    equal = sum(torch.equal(a[k], b[k]) for k in a)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return f"{equal} of {len(a)} tensors bitwise equal, {masks:,} mask entries differ, largest difference {worst:.3g}"


def _distributed(args: argparse.Namespace) -> int:
    """N processes (gloo, cores / N threads each) against one process, with the default batching and with the
    ranks' own (their batch of windows per forward and their thread count), on the same model."""
    threads = os.cpu_count() or 1
    per_rank = -(-args.nsamples // args.nproc)
    rank_batch = min(args.batch_size, per_rank)
    rank_threads = max(1, threads // args.nproc)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        common = [
            "prune",
            "--method",
            args.method,
            "--pattern",
            args.pattern,
            "--nsamples",
            str(args.nsamples),
        ]
        common += ["--seqlen", str(args.seqlen), "--eval-windows", str(args.eval_windows), "-q"]
        if args.model:
            common += ["--model", args.model]
        plan = [
            ("1 process", 1, args.batch_size, threads),
            (
                f"1 process, batch {rank_batch}, {rank_threads} thread(s) (as each rank)",
                1,
                rank_batch,
                rank_threads,
            ),
            (
                f"{args.nproc} processes (gloo), {rank_threads} thread(s) each",
                args.nproc,
                args.batch_size,
                rank_threads,
            ),
        ]
        runs = []
        for label, world, batch, nthreads in plan:
            out = tmp / f"run{len(runs)}"
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(nthreads)}
            cmd = [*common, "--batch-size", str(batch), "--out", str(out)]
            if world == 1:
                cmd = [sys.executable, "-m", "oneshot", *cmd]
            else:
                launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world)]
                launch += ["--master-addr", "127.0.0.1", "--master-port", str(args.port), "-m", "oneshot"]
                cmd = [*launch, *cmd]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if proc.returncode != 0:
                print(f"{label}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
                return 1
            runs.append((label, seconds, json.loads((out / "oneshot.json").read_text()), _load_tensors(out)))
        print(
            f"model {args.model or 'embedded SmolLM2-135M'}; {args.method} {args.pattern}; calibration "
            f"{args.nsamples} x {args.seqlen}, --batch-size {args.batch_size}; quick WikiText-2 check "
            f"{args.eval_windows} windows; {threads} cores"
        )
        print()
        print("| run | wall | prune time | quick ppl dense | quick ppl pruned | sparsity |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, seconds, rec, _ in runs:
            q = rec.get("quick_eval") or {}
            dense, pruned = (q.get("dense") or {}).get("value"), (q.get("pruned") or {}).get("value")
            fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
            sparsity = rec["prune"]["zero_params"] / rec["prune"]["pruned_params"]
            print(
                f"| {label} | {seconds:.0f} s | {rec['prune']['total_seconds']:.0f} s | {fmt(dense)} | "
                f"{fmt(pruned)} | {sparsity:.6f} |"
            )
        print()
        same = _compare(runs[1][3], runs[2][3])
        print(f"- {runs[2][0]} vs {runs[1][0]}: {same}")
        print(f"- {runs[2][0]} vs {runs[0][0]}: {_compare(runs[0][3], runs[2][3])}")
        print(
            f"- {runs[1][0]} vs {runs[0][0]} (fp32 reassociation alone): {_compare(runs[0][3], runs[1][3])}"
        )
        return 0 if same.startswith(f"{len(runs[1][3])} of") else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        variant, rows, cols, before_file = argv[1], int(argv[2]), int(argv[3]), argv[4]
        print(json.dumps(_measure_child(variant, rows, cols, before_file)))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    mem = sub.add_parser("memory", help="the solver's peak scratch memory, before and after")
    mem.add_argument("--shapes", nargs="+", default=["4096x11008", "11008x4096"], help="ROWSxCOLS")
    mem.add_argument(
        "--before",
        default=BEFORE,
        help=f"git revision of the 'before' solver (default {BEFORE}: the last commit before the memory work)",
    )
    res = sub.add_parser("resume", help="kill -9 at a random block, resume, compare the bytes")
    res.add_argument("--seed", type=int, default=0, help="model, data and the block to kill at")
    res.add_argument("--layers", type=int, default=8)
    res.add_argument("--hidden", type=int, default=256)
    res.add_argument("--method", default="sparsegpt")
    res.add_argument("--pattern", default="unstructured")
    res.add_argument("--nsamples", type=int, default=16)
    res.add_argument("--seqlen", type=int, default=128)
    stream = sub.add_parser("stream", help="prune a checkpoint 4x the memory limit by streaming from disk")
    stream.add_argument("--layers", type=int, default=64)
    stream.add_argument(
        "--small-layers", type=int, default=8, help="the smaller copy compared with the in-memory run"
    )
    stream.add_argument("--hidden", type=int, default=1280)
    stream.add_argument("--limit-gib", type=float, default=1.0, help="RLIMIT_DATA of the pruning processes")
    stream.add_argument("--seed", type=int, default=0)
    stream.add_argument("--method", default="wanda")
    stream.add_argument("--pattern", default="unstructured")
    stream.add_argument("--nsamples", type=int, default=8)
    stream.add_argument("--seqlen", type=int, default=128)
    stream.add_argument(
        "--tmp", default=None, help="where the checkpoints go (about 3 x the checkpoint size)"
    )
    dist = sub.add_parser("distributed", help="torchrun --nproc-per-node N (gloo) against one process")
    dist.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    dist.add_argument("--nproc", type=int, default=2)
    dist.add_argument("--method", default="sparsegpt")
    dist.add_argument("--pattern", default="unstructured")
    dist.add_argument("--nsamples", type=int, default=8)
    dist.add_argument("--seqlen", type=int, default=512)
    dist.add_argument("--eval-windows", type=int, default=4)
    dist.add_argument("--batch-size", type=int, default=8)
    dist.add_argument("--port", type=int, default=29512)
    dist.add_argument("--tmp", default=None)
    args = parser.parse_args(argv)
    if args.what == "distributed":
        return _distributed(args)
    if args.what == "stream":
        return _stream(args)
    if args.what == "memory":
        return _memory(args)
    if args.what == "resume":
        return _resume(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
