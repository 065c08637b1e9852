"""Compression benchmark (issue #14) on the embedded SmolLM2-135M-Instruct: quantization alone and composed
with pruning or shrinking, and the exports that runtimes load.

Rows (standard protocol: calibration c4, 32 windows x 2048 tokens, seed 0; every model evaluated on
WikiText-2, the first 40 windows x 2048 tokens of the raw test set, in its own subprocess):

- dense; dense W8A16 (`oneshot quantize`, one scale per output channel); dense W4A16 g64 (GPTQ);
- SparseGPT 50 % and SparseGPT 50 % + W4A16 in one joint pass (`oneshot prune --quantize`);
- SparseGPT 2:4 and SparseGPT 2:4 + W4A16 joint;
- shrunk (a) (`oneshot shrink --intermediate-size 1152`) and shrunk (a) + W4A16 (`oneshot quantize` on it).

Every quantized run is exported as compressed-tensors (pack-quantized) and the shrunk float run as GGUF f16
and q8_0 (``--gguf-rows``); `oneshot export` reads each export back with its runtime's reader (transformers +
compressed-tensors, transformers' GGUF reader) and compares logits with the run's model: the check is printed.

Printed per row: perplexity, x its unquantized source, the target, bits per Linear weight and the ratio to
fp16 measured HERE from the export files (safetensors headers / GGUF tensor table: the bytes of the decoder
Linear weights with their scales, zero-points and group indices, over their element count), the run's
safetensors checkpoint size (float, fake-quantized), the export size, the time of the command that made the
run and of the export.

    python scripts/bench_compress.py                      # everything (about an hour on 2 cores)
    python scripts/bench_compress.py --rows dense,dense-w8a16
    python scripts/bench_compress.py --smoke              # 2 short calibration/eval windows, a quick check
    python scripts/bench_compress.py --reuse              # keep results made by the same command and code
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import struct
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from benchlib import PROTOCOL, SOURCES, code_version, evaluate, logger, recipe_ok, run_oneshot, source  # noqa: E402

_log = logger("bench_compress")
W4 = ["--scheme", "w4a16", "--group-size", "64"]
# name -> (label, what makes it, the unquantized row it is compared with, allowed ratio)
ROWS: dict[str, tuple[str, str, str | None, float | None]] = {
    "dense": ("dense", "dense", None, None),
    "dense-w8a16": ("dense W8A16 (per channel)", "quantize dense w8a16", "dense", 1.01),
    "dense-w4a16": ("dense W4A16 g64 (GPTQ)", "quantize dense w4a16", "dense", 1.05),
    "50": ("SparseGPT 50 %", "source 50", None, None),
    "50-w4a16": ("SparseGPT 50 % + W4A16 g64 (joint)", "joint 50", "50", 1.05),
    "2of4": ("SparseGPT 2:4", "source 2of4", None, None),
    "2of4-w4a16": ("SparseGPT 2:4 + W4A16 g64 (joint)", "joint 2of4", "2of4", 1.05),
    "i1152": ("shrunk (a) i1152", "source i1152", None, None),
    "i1152-w4a16": ("shrunk (a) + W4A16 g64 (GPTQ)", "quantize i1152 w4a16", "i1152", 1.05),
}
# quantized runs are exported as compressed-tensors; float runs as GGUF with these types (--gguf-rows picks
# which: a pruned float run's GGUF has the dense model's size, as its checkpoint does)
GGUF_TYPES = ["f16", "q8_0"]
LINEAR_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")
GGUF_LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


def _ct_linear(folder: Path) -> tuple[int, int]:
    """(bytes, weights) of the packed decoder Linear layers of a compressed-tensors export, from the
    safetensors headers: every tensor of a layer that has ``weight_packed``; weights = prod(weight_shape)."""
    import numpy as np
    from safetensors.numpy import load_file

    nbytes = weights = 0
    for path in sorted(folder.glob("*.safetensors")):
        header = _safetensors_header(path)
        shapes = {}
        for name, info in header.items():
            if name == "__metadata__" or not name.endswith(LINEAR_SUFFIXES):
                continue
            start, end = info["data_offsets"]
            nbytes += end - start
            if name.endswith("weight_shape"):
                shapes[name] = None
        if shapes:
            arrays = load_file(str(path))
            weights += sum(int(np.prod(arrays[k])) for k in shapes)
    return nbytes, weights


def _gguf_linear(path: Path) -> tuple[int, int]:
    """(bytes, weights) of the decoder Linear weight tensors of a GGUF file, from its tensor table."""
    from gguf import GGUFReader

    nbytes = weights = 0
    for t in GGUFReader(str(path)).tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in GGUF_LINEAR and parts[3] == "weight":
            nbytes += int(t.n_bytes)
            weights += int(t.n_elements)
    return nbytes, weights


def _files_bytes(folder: Path, pattern: str, skip: tuple[str, ...] = ()) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern) if p.name not in skip)


def _make(name: str, args: argparse.Namespace, out: Path) -> dict:
    """The run folder of a row (made, or the protocol source reused) and the wall time of its command."""
    how = ROWS[name][1].split()
    if how[0] == "dense":
        return {"folder": None, "wall_seconds": None}
    if how[0] == "source":
        folder = Path(args.sources_dir) / how[1]
        made = (folder / "oneshot.json").exists()
        source(how[1], folder, args.data_dir, _log)
        rec = json.loads((folder / "oneshot.json").read_text())
        seconds = rec.get("total_seconds")
        return {"folder": str(folder), "wall_seconds": seconds, "reused_source": made}
    folder = out / "runs" / name
    if how[0] == "quantize":
        from oneshot.models import default_model_path

        model = str(default_model_path()) if how[1] == "dense" else str(Path(args.sources_dir) / how[1])
        if how[1] != "dense":
            source(how[1], Path(model), args.data_dir, _log)
        opts = W4 if how[2] == "w4a16" else ["--scheme", "w8a16"]
        cmd = ["quantize", model, *opts, *PROTOCOL, *shlex.split(args.quant_options)]
    else:  # joint prune + quantize
        cmd = [
            *SOURCES[how[1]],
            "--quantize",
            "w4a16",
            "--group-size",
            "64",
            *shlex.split(args.quant_options),
        ]
    if args.smoke:
        cmd = [*cmd, "--nsamples", "2", "--seqlen", "256"]
    cmd += ["--out", str(folder), "--overwrite", "--quiet"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    result = out / f"make-{name}.json"
    recipe = [*cmd, *code_version()]
    old = recipe_ok(result, recipe, args.reuse, _log)
    if old is not None and (folder / "oneshot.json").exists():
        return old
    res = {
        "folder": str(folder),
        "wall_seconds": run_oneshot(cmd, _log),
        "command": cmd,
        "bench_recipe": recipe,
    }
    result.write_text(json.dumps(res, indent=2))
    return res


def _export(
    name: str, run: Path, fmt: str, gguf_type: str | None, args: argparse.Namespace, out: Path
) -> dict:
    tag = f"{name}-{gguf_type}" if gguf_type else f"{name}-ct"
    folder = out / "exports" / tag
    cmd = ["export", str(run), "--format", fmt, "--out", str(folder), "--overwrite", "--quiet"]
    if gguf_type:
        cmd += ["--gguf-type", gguf_type]
    result = out / f"export-{tag}.json"
    recipe = [*cmd, *code_version(), json.dumps(json.loads((run / "oneshot.json").read_text()).get("files"))]
    old = recipe_ok(result, recipe, args.reuse, _log)
    if old is not None and folder.exists():
        return old
    wall = run_oneshot(cmd, _log)
    manifest = json.loads((folder / "oneshot-export.json").read_text())
    if gguf_type:
        gguf_file = next(folder.glob("*.gguf"))
        lin_bytes, lin_weights = _gguf_linear(gguf_file)
        size = gguf_file.stat().st_size
    else:
        lin_bytes, lin_weights = _ct_linear(folder)
        size = _files_bytes(folder, "*.safetensors")
    res = {
        "folder": str(folder),
        "format": fmt,
        "gguf_type": gguf_type,
        "wall_seconds": wall,
        "bytes": size,
        "linear_bytes": lin_bytes,
        "linear_weights": lin_weights,
        "check": manifest.get("check"),
        "bench_recipe": recipe,
    }
    result.write_text(json.dumps(res, indent=2))
    return res


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _check(check: dict | None) -> str:
    if not check or check.get("max_abs_diff") is None:
        return (check or {}).get("note") or "-"
    tol = check.get("tolerance")
    verdict = "reported" if tol is None else ("pass" if check.get("passed") else "FAIL")
    return f"{check['max_abs_diff']:.2g}" + (
        f" (tol {tol:g}, {verdict})" if tol is not None else " (reported)"
    )


def _table(results: dict, names: list[str], args: argparse.Namespace) -> None:
    print(
        f"\nSmolLM2-135M-Instruct (embedded GGUF, float32); calibration c4 32 x 2048 seed 0; WikiText-2 test, first "
        f"{args.eval_windows} windows x {args.eval_seqlen}; {os.cpu_count()} CPU threads; quantization options: "
        f"w4a16 {' '.join(W4[2:])} {args.quant_options}\n"
        "bits/weight and x fp16: the decoder Linear weights in the export (codes, scales, zero-points, g_idx), "
        "read from the export's files; checkpoint: the run's float safetensors (fake-quantized weights); "
        "check: max |logit difference| of the export read back by its runtime's reader vs the run's model\n"
    )
    print(
        "| model | ppl | x source | target | export | bits/weight | x fp16 (Linear) | checkpoint | export size "
        "| run time | export time | read-back check |"
    )
    print("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name in names:
        r = results[name]
        label, _, ref, limit = ROWS[name]
        ppl = r["eval"]["ppl"]
        ratio = f"{ppl / results[ref]['eval']['ppl']:.3f}" if ref in results else "-"
        target = "-"
        if ref is not None and limit is not None:
            met = ref in results and ppl <= limit * results[ref]["eval"]["ppl"]
            target = f"<= {limit:.2f} x {ref}: {'met' if met else 'NOT MET'}"
        ckpt = r.get("checkpoint_bytes")
        time_run = r["make"].get("wall_seconds")
        exports = r.get("exports") or [None]
        for i, e in enumerate(exports):
            first = i == 0
            cells = [
                label if first else "",
                f"{ppl:.2f}" if first else "",
                ratio if first else "",
                target if first else "",
            ]
            if e is None:
                cells += ["-", "32 (fp32)" if first else "", "-", _mb(ckpt), "-"]
                cells += [f"{time_run / 60:.1f} min" if time_run else "-", "-", "-"]
            else:
                bits = 8 * e["linear_bytes"] / max(1, e["linear_weights"])
                fmt = f"GGUF {e['gguf_type']}" if e["gguf_type"] else "compressed-tensors"
                x16 = e["linear_bytes"] / max(1, 2 * e["linear_weights"])
                if name.endswith("w4a16"):
                    x16s = f"{x16:.3f} (<= 0.35: {'met' if x16 <= 0.35 else 'NOT MET'})"
                else:
                    x16s = f"{x16:.3f}"
                cells += [fmt, f"{bits:.2f}", x16s, _mb(ckpt) if first else "", _mb(e["bytes"])]
                run_t = f"{time_run / 60:.1f} min" if (first and time_run) else ""
                cells += [run_t, f"{e['wall_seconds']:.0f} s", _check(e["check"])]
            print("| " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument(
        "--quant-options", default="", help="extra options of every quantization (e.g. --act-order)"
    )
    parser.add_argument(
        "--gguf-rows", default="i1152", help="float rows exported as GGUF f16 and q8_0 (comma-separated)"
    )
    parser.add_argument("--smoke", action="store_true", help="2 short calibration and eval windows")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--data-dir", default=os.environ.get("ONESHOT_DATA_DIR"))
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-compress"))
    parser.add_argument(
        "--sources-dir",
        default=None,
        help="the protocol source runs (made there when missing; default: runs/bench-recover/sources, which "
        "bench_recover.py shares)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.eval_windows, args.eval_seqlen = 2, 256
        args.out = str(Path(args.out).with_name(Path(args.out).name + "-smoke"))
        args.sources_dir = args.sources_dir or str(Path(args.out) / "sources")
    args.sources_dir = args.sources_dir or str(REPO / "runs" / "bench-recover" / "sources")
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.smoke:  # the smoke sources are short runs of their own
        for key in ("2of4", "50", "i1152"):
            SOURCES[key] = [*SOURCES[key], "--nsamples", "2", "--seqlen", "256"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(args)}
    for name in names:
        make = _make(name, args, out)
        folder = Path(make["folder"]) if make["folder"] else None
        row = results[name] = {"make": make, "eval": evaluate(folder, args, out / f"eval-{name}.json", _log)}
        if folder is None:
            row["checkpoint_bytes"] = 4 * row["eval"]["parameters"]  # float32, tied weights once: computed
        else:
            row["checkpoint_bytes"] = _files_bytes(
                folder, "*.safetensors", skip=("quantization.safetensors",)
            )
            rec = json.loads((folder / "oneshot.json").read_text())
            if rec.get("quantization"):
                row["exports"] = [_export(name, folder, "compressed-tensors", None, args, out)]
            elif name in args.gguf_rows.split(","):
                row["exports"] = [_export(name, folder, "gguf", t, args, out) for t in GGUF_TYPES]
        _log(f"{name}: ppl {row['eval']['ppl']:.3f}")
        (out / "results.json").write_text(json.dumps(results, indent=2))
    _table(results, names, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
