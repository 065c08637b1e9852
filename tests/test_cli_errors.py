"""Every bad input and risky output of `oneshot prune` as a table: command, exit code, the message's key words,
and the file-system state afterwards.

Each case runs in a fresh workspace (the current directory) holding a copy of the tiny model, calibration
text and whatever the case sets up. An error case must leave the workspace byte-identical (the model folder
included: nothing created, nothing deleted); a success case may only add or replace what it names.
Cases that need a process of their own (a second run at the same time, kill -9, Ctrl-C) follow the table.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from oneshot.cli import main
from oneshot.output import MARKER_FILE, OutputSlot, reserve_output

REPO = Path(__file__).resolve().parent.parent
RUN_RECORD = {"format": "oneshot-run/1", "prune": {"layers": []}}


# ------------------------------------------------------------------------------------------- workspace


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> "dir" or the sha256 of the file's bytes, for everything under ``root``."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _save_model(model: Any, folder: Path, tokenizer_from: Path) -> None:
    model.save_pretrained(folder)
    for f in tokenizer_from.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)


def _with_tensor(ws: Path, name: str, key: str, change: Callable[[torch.Tensor], None]) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(ws / "model", ws / name)
    tensors = load_file(ws / name / "model.safetensors")
    change(tensors[key])
    save_file(tensors, ws / name / "model.safetensors", metadata={"format": "pt"})


def _replace_tensor(folder: Path, key: str, value: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors[key] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _bert(ws: Path, name: str, cls: str) -> None:
    import transformers

    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=300
    )
    torch.manual_seed(0)
    _save_model(getattr(transformers, cls)(config), ws / name, ws / "model")


def _headless(ws: Path) -> None:
    from transformers import LlamaModel

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    _save_model(LlamaModel(tiny_llama_config(tie_word_embeddings=False)), ws / "headless", ws / "model")


def _truncate(ws: Path) -> None:
    shutil.copytree(ws / "model", ws / "trunc")
    f = ws / "trunc" / "model.safetensors"
    with f.open("r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


def _config_only(ws: Path) -> None:
    (ws / "conf").mkdir()
    shutil.copy(ws / "model" / "config.json", ws / "conf" / "config.json")


def _broken_config(ws: Path) -> None:
    shutil.copytree(ws / "model", ws / "badconf")
    (ws / "badconf" / "config.json").write_text('{"model_type": "llama",')


def _earlier_output(ws: Path, name: str, **record: Any) -> None:
    (ws / name).mkdir(parents=True)
    (ws / name / "oneshot.json").write_text(json.dumps({**RUN_RECORD, **record}))
    (ws / name / "model.safetensors").write_text("previous run")
    if record.get("files"):
        (ws / name / "notes.txt").write_text("the user's notes")


def _runs_dir(ws: Path) -> None:
    _earlier_output(ws, "runs/a")
    (ws / "runs" / "notes.txt").write_text("my notes")


def _leftover(ws: Path, marked: bool, **facts: Any) -> None:
    tmp = ws / (".out.tmp-999999-deadbeef" if marked else ".out.tmp-legacy1")
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    if marked:
        marker = {"pid": 999999, "host": socket.gethostname(), "out": str(ws / "out"), **facts}
        (tmp / MARKER_FILE).write_text(json.dumps(marker))


def _locked(ws: Path) -> Any:
    return reserve_output(ws / "out", overwrite=False)  # another run holds "out" (kept open during the case)


def _calib_files(ws: Path) -> None:
    (ws / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    (ws / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (ws / "notext.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    (ws / "short.txt").write_text("a few words only, repeated. " * 8)


@dataclass(frozen=True)
class Case:
    args: str  # appended to the base command; {data} is the shared data directory
    code: int
    words: tuple[str, ...]  # all must appear in stderr (or stdout for a success)
    setup: Callable[[Path], Any] | None = None
    changed: tuple[str, ...] = ()  # top-level entries a success case may create, replace or remove
    base: bool = True  # prefix with the base command (model, calibration, small sizes)


BASE = "prune --model model --calib calib.txt --nsamples 2 --seqlen 16 --eval-windows 0 -q"
SHRINK = (
    "shrink --model model --calib calib.txt --nsamples 2 --seqlen 16 --eval-windows 0 -q --data-dir {data}"
)
MINIMAL_RECORD = {
    "format": "oneshot-run/4",
    "config": None,
    "prune": None,
    "run": {},
    "source": {"kind": "local"},
}
QUANTIZE = "quantize {model} --calib calib.txt --nsamples 2 --seqlen 16 --eval-windows 0 -q --data-dir {data}"


def _pruned_run(ws: Path, name: str) -> None:
    """A finished run folder of `oneshot prune` (unquantized)."""
    argv = [
        *BASE.split(),
        "--data-dir",
        os.environ.get("ONESHOT_DATA_DIR", str(REPO.parent / "shared" / "data")),
    ]
    assert main([*argv, "--out", name]) == 0


def _quantized_run(ws: Path) -> None:
    """A run folder whose record says it is quantized already."""
    shutil.copytree(ws / "model", ws / "qrun")
    quantization = {
        "config": {"scheme": "w4a16", "group_size": 64},
        "solver": "gptq",
        "bits": 4,
        "group_size": 64,
        "symmetric": True,
        "act_order": False,
    }
    record = {
        "format": "oneshot-run/4",
        "config": None,
        "prune": None,
        "run": {},
        "source": {"kind": "local"},
    }
    record["quantization"] = quantization
    (ws / "qrun" / "oneshot.json").write_text(json.dumps(record))


_TINY_SHAPES = {
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (32, 64),
    "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (128, 64),
    "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128),
}


def _sens_file(ws: Path, pattern: str = "unstructured", prefix: str = "model.layers") -> None:
    """A hand-written `oneshot sensitivity` record for the tiny model, measured at 0.5 and 0.7."""
    layers = [
        {"name": f"{prefix}.{b}.{k}", "block": b, "shape": list(shape), "losses": [0.1, 0.3]}
        for b in range(2)
        for k, shape in _TINY_SHAPES.items()
    ]
    record = {
        "format": "oneshot-sensitivity/1",
        "config": {"method": "sparsegpt", "pattern": pattern},
        "sparsities": [0.5, 0.7],
        "layers": layers,
    }
    (ws / "sens").mkdir()
    (ws / "sens" / "sensitivity.json").write_text(json.dumps(record))


SENS = "sensitivity --model model --calib calib.txt --nsamples 2 --seqlen 16 -q --data-dir {data}"


def _tiny_mixtral(folder: Path) -> None:
    import transformers as tf

    config = tf.MixtralConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    tf.MixtralForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder.parent / "model" / name, folder / name)


CASES: dict[str, Case] = {
    # --- data loss: --out and --overwrite
    "out-is-the-model": Case("--out model --overwrite", 2, ("is the model source",)),
    "out-is-the-model-and-an-earlier-run": Case(  # pruning a pruned run into itself
        "--model pruned --out pruned --overwrite",
        2,
        ("is the model source",),
        lambda ws: (
            shutil.copytree(ws / "model", ws / "pruned"),
            (ws / "pruned" / "oneshot.json").write_text(json.dumps(RUN_RECORD)),
        ),
    ),
    "out-contains-the-model": Case(
        "--model zoo/m --out zoo --overwrite",
        2,
        ("contains the model source",),
        lambda ws: shutil.copytree(ws / "model", ws / "zoo" / "m"),
    ),
    "out-is-cwd": Case("--out . --overwrite", 2, ("is the current directory",)),
    "out-is-a-parent-of-cwd": Case("--out .. --overwrite", 2, ("a parent of the current directory",)),
    "out-is-the-data-dir": Case(
        "--data-dir fakedata --out fakedata --overwrite",
        2,
        ("is the data directory",),
        lambda ws: _earlier_output(ws, "fakedata"),
    ),
    "out-contains-the-calibration-file": Case(
        "--calib texts/c.txt --out texts --overwrite",
        2,
        ("contains the calibration file",),
        lambda ws: (ws / "texts").mkdir() or shutil.copy(ws / "calib.txt", ws / "texts" / "c.txt"),
    ),
    "overwrite-a-folder-of-runs": Case(
        "--out runs --overwrite", 2, ("not an earlier oneshot output", "--overwrite only replaces"), _runs_dir
    ),
    "out-not-empty": Case("--out runs", 2, ("exists and is not empty", "--overwrite"), _runs_dir),
    "out-is-a-file": Case(
        "--out notes.txt", 2, ("exists and is not a folder",), lambda ws: (ws / "notes.txt").write_text("x")
    ),
    "out-below-a-file": Case("--out calib.txt/sub", 2, ("calib.txt is a file, not a folder",)),
    "out-in-proc": Case("--out /proc/oneshot-out", 2, ("cannot", "/proc")),
    "out-taken-by-another-run": Case(
        "--out out", 2, ("another oneshot run (pid", "is writing --out", "out"), _locked
    ),
    "overwrite-an-earlier-output": Case(
        "--out prev --overwrite", 0, ("achieved sparsity",), lambda ws: _earlier_output(ws, "prev"), ("prev",)
    ),
    "leftover-of-a-dead-run-is-removed": Case(
        "--out out",
        0,
        ("removing", ".out.tmp-999999-deadbeef", "the unfinished output of an interrupted run (pid 999999"),
        lambda ws: _leftover(ws, marked=True),
        ("out", ".out.tmp-999999-deadbeef"),
    ),
    "leftover-of-another-output-is-kept": Case(  # marked by a run whose --out was another folder
        "--out out",
        0,
        (".out.tmp-999999-deadbeef", "left alone"),
        lambda ws: _leftover(ws, marked=True, out=str(ws / "elsewhere")),
        ("out",),
    ),
    "leftover-of-a-live-run-is-kept": Case(
        "--out out",
        0,
        (".out.tmp-999999-deadbeef", "belongs to a running process"),
        lambda ws: _leftover(ws, marked=True, pid=os.getppid()),
        ("out",),
    ),
    "kept-output-is-kept": Case(
        "--out out",
        0,
        (".out.tmp-999999-deadbeef", "finished output that could not be moved"),
        lambda ws: _leftover(ws, marked=True, kept=True),
        ("out",),
    ),
    "glob-characters-in-out": Case(  # '[u]' must not match the live temporary folder of --out u
        "--out 'o[u]t'", 0, ("achieved sparsity",), lambda ws: _leftover(ws, marked=True), ("o[u]t",)
    ),
    "out-is-a-symlink": Case(
        "--out link --overwrite",
        2,
        ("is a symbolic link",),
        lambda ws: (_earlier_output(ws, "real"), (ws / "link").symlink_to(ws / "real")),
    ),
    "overwrite-an-output-holding-user-files": Case(
        "--out prev --overwrite",
        2,
        ("also holds notes.txt", "did not write"),
        lambda ws: _earlier_output(ws, "prev", files={"model.safetensors": {}}),
    ),
    "out-inside-the-model": Case("--out model/run", 2, ("is inside the model source",)),
    "overwrite-an-output-holding-hidden-and-nested-user-files": Case(
        "--out prev --overwrite",
        2,
        ("also holds", ".git/HEAD", "report/notes.md"),
        lambda ws: (
            _earlier_output(ws, "prev", files={"model.safetensors": {}}),
            (ws / "prev" / "notes.txt").unlink(),
            (ws / "prev" / ".git").mkdir(),
            (ws / "prev" / ".git" / "HEAD").write_text("ref: refs/heads/main"),
            (ws / "prev" / "report").mkdir(),
            (ws / "prev" / "report" / "notes.md").write_text("mine"),
        ),
    ),
    "overwrite-an-old-output-without-hashes-holding-user-files": Case(
        "--out prev --overwrite",
        2,
        ("also holds", "ckpt/a.bin", "notes.txt"),
        lambda ws: (
            _earlier_output(ws, "prev"),
            (ws / "prev" / "notes.txt").write_text("precious"),
            (ws / "prev" / "ckpt").mkdir(),
            (ws / "prev" / "ckpt" / "a.bin").write_text("x"),
        ),
    ),
    "created-parents-are-removed-on-error": Case("--out new/sub/out --pattern 3:7", 2, ("multiple of 7",)),
    "unmarked-leftover-is-reported-and-kept": Case(
        "--out out", 0, (".out.tmp-legacy1", "left alone"), lambda ws: _leftover(ws, marked=False), ("out",)
    ),
    # --- silently wrong results
    "encoder-checkpoint": Case(
        "--model bert --out out",
        2,
        ("BertForMaskedLM", "not a causal language model"),
        lambda ws: _bert(ws, "bert", "BertForMaskedLM"),
    ),
    "encoder-loaded-as-causal-lm": Case(
        "--model bertlm --out out",
        2,
        ("not a causal language model", "depend on later tokens"),
        lambda ws: _bert(ws, "bertlm", "BertLMHeadModel"),
    ),
    "headless-decoder": Case(
        "--model headless --out out", 2, ("lm_head.weight", "missing", "randomly"), _headless
    ),
    "ignore-everything": Case(
        "--ignore '*' --out out", 2, ("keeps all 14 prunable weight matrices dense", "nothing")
    ),
    "ignore-pattern-matching-nothing": Case(
        "--ignore '*.mlp.nothing' --out out",
        0,
        ("'*.mlp.nothing' matches no prunable layer",),
        None,
        ("out",),
    ),
    "wanda-at-0.999-prunes-0.999": Case(
        "--method wanda --sparsity 0.999 --out out",
        0,
        ("achieved sparsity  0.9990 (73,656 / 73,728",),
        None,
        ("out",),
    ),
    "nan-in-a-norm": Case(
        "--model nan_norm --out out",
        2,
        ("model.layers.0.input_layernorm.weight", "NaN/Inf"),
        lambda ws: _with_tensor(
            ws, "nan_norm", "model.layers.0.input_layernorm.weight", lambda t: t.__setitem__(3, float("nan"))
        ),
    ),
    "nan-in-a-linear": Case(
        "--model nan_lin --out out",
        2,
        ("model.layers.1.mlp.down_proj.weight", "NaN/Inf"),
        lambda ws: _with_tensor(
            ws,
            "nan_lin",
            "model.layers.1.mlp.down_proj.weight",
            lambda t: t.__setitem__((0, 0), float("inf")),
        ),
    ),
    "more-windows-than-the-corpus-holds": Case(
        "--calib short.txt --nsamples 64 --out out",
        0,
        ("non-overlapping windows of 16 tokens", "64 windows were requested", "overlap"),
        _calib_files,
        ("out",),
    ),
    # --- late or unclear failures
    "pattern-does-not-divide-the-width": Case(
        "--pattern 3:7 --out out", 2, ("multiple of 7", "q_proj has 64")
    ),
    "device-cuda-x": Case("--device cuda:x --out out", 2, ("unknown device 'cuda:x'",)),
    "device-cuda-out-of-range": Case(
        f"--device cuda:{torch.cuda.device_count()} --out out",
        2,
        (f"--device cuda:{torch.cuda.device_count()}",)
        + (("this machine has",) if torch.cuda.is_available() else ("no CUDA device",)),
    ),
    "calibration-not-utf8": Case(
        "--calib latin1.txt --out out", 2, ("latin1.txt", "not UTF-8"), _calib_files
    ),
    "calibration-malformed-jsonl": Case(
        "--calib bad.jsonl --out out", 2, ("bad.jsonl", "line 2", "not valid JSON"), _calib_files
    ),
    "calibration-record-without-text": Case(
        "--calib notext.jsonl --out out", 2, ("notext.jsonl", "line 2", "no 'text' field"), _calib_files
    ),
    "calibration-json-not-a-list": Case(
        "--calib str.json --out out",
        2,
        ("str.json", "list of records"),
        lambda ws: (ws / "str.json").write_text('"just a string"'),
    ),
    "calibration-null-text": Case(
        "--calib null.jsonl --out out",
        2,
        ("null.jsonl", "line 1", "NoneType, not a string"),
        lambda ws: (ws / "null.jsonl").write_text('{"text": null}\n{"text": "words"}\n'),
    ),
    "weights-of-the-wrong-shape": Case(
        "--model shapew --out out",
        2,
        ("wrong shape", "shapew"),
        lambda ws: (
            _with_tensor(ws, "shapew", "model.layers.1.mlp.up_proj.weight", lambda t: None)
            or _replace_tensor(ws / "shapew", "model.layers.1.mlp.up_proj.weight", torch.zeros(100, 64))
        ),
    ),
    "corrupt-gguf": Case(
        "--model bad.gguf --out out",
        2,
        ("cannot read the GGUF file", "bad.gguf"),
        lambda ws: (ws / "bad.gguf").write_bytes(b"GGUF" + bytes(100)),
    ),
    "argument-of-the-wrong-type": Case("--nsamples abc --out out", 2, ("invalid int value: 'abc'",)),
    "seed-out-of-range": Case("--seed 99999999999999999999999 --out out", 2, ("seed must be an integer in",)),
    "empty-out": Case("--out ''", 2, ("--out is empty",)),
    "calibration-missing": Case("--calib nothere.txt --out out", 2, ("unknown calibration source",)),
    "calibration-folder": Case("--calib model --out out", 2, ("is a folder",)),
    "eval-seqlen-zero": Case("--eval-seqlen 0 --out out", 2, ("--eval-seqlen must be at least 2",)),
    "eval-seqlen-one": Case("--eval-seqlen 1 --out out", 2, ("--eval-seqlen must be at least 2",)),
    "eval-seqlen-beyond-context": Case("--eval-seqlen 4096 --out out", 2, ("--eval-seqlen 4096 exceeds",)),
    "seqlen-beyond-context": Case("--seqlen 4096 --out out", 2, ("--seqlen 4096 exceeds", "128 tokens")),
    "unknown-offload": Case("--offload ram --out out", 2, ("unknown --offload 'ram'", "auto, none, disk")),
    "offload-share-above-one": Case(
        "--offload-share 1.5 --out out", 2, ("--offload-share must be in (0, 1]",)
    ),
    "offload-disk-with-export": Case(
        "--offload disk --pattern 2:4 --export 2:4 --out out", 2, ("--offload disk cannot be combined",)
    ),
    "truncated-weights": Case(
        "--model trunc --out out", 2, ("trunc/model.safetensors", "corrupt or truncated"), _truncate
    ),
    "config-without-weights": Case(
        "--model conf --out out", 2, ("has a config.json but no weights",), _config_only
    ),
    "broken-config-json": Case(
        "--model badconf --out out", 2, ("badconf/config.json", "not valid JSON"), _broken_config
    ),
    # --- checks that already held before (kept so they keep holding)
    "sparsity-out-of-range": Case("--sparsity 1.5 --out out", 2, ("sparsity must be a fraction",)),
    "pattern-invalid": Case("--pattern 4:2 --out out", 2, ("N:M needs 0 < N < M",)),
    "sparsity-contradicts-pattern": Case("--pattern 2:4 --sparsity 0.3 --out out", 2, ("contradicts",)),
    "method-unknown": Case("--method obs --out out", 2, ("unknown method 'obs'",)),
    "target-dense-with-magnitude": Case(
        "--method magnitude --target dense --out out", 2, ("--target dense needs calibration statistics",)
    ),
    "target-dense-with-propagate-dense": Case(
        "--target dense --propagate dense --out out", 2, ("the dense target is the local one",)
    ),
    "target-dense-with-moe-experts": Case(
        "--model moe --target dense --out out",
        2,
        ("--target dense does not support mixture-of-experts blocks",),
        lambda ws: _tiny_mixtral(ws / "moe"),
    ),
    "nsamples-zero": Case("--nsamples 0 --out out", 2, ("nsamples must be a positive integer",)),
    "seqlen-zero": Case("--seqlen 0 --out out", 2, ("seqlen must be a positive integer",)),
    "model-missing": Case("--model ./nothere --out out", 2, ("does not exist",)),
    "hub-id-offline": Case(
        "--model some-org/not-cached --out out", 2, ("cannot reach the Hugging Face Hub",)
    ),
    "eval-windows-negative": Case("--eval-windows -1 --out out", 2, ("--eval-windows must be",)),
    # --- oneshot shrink: bad targets are one line, exit 2, nothing written
    "shrink-no-target": Case(f"{SHRINK} --out out", 2, ("nothing to shrink",), base=False),
    "shrink-wider-than-the-model": Case(
        f"{SHRINK} --intermediate-size 500 --out out",
        2,
        ("--intermediate-size 500 is not smaller", "128"),
        base=False,
    ),
    "shrink-kv-heads-not-fewer": Case(
        f"{SHRINK} --num-key-value-heads 2 --out out",
        2,
        ("not smaller than the model's 2 KV heads",),
        base=False,
    ),
    "shrink-drop-every-layer": Case(
        f"{SHRINK} --drop-layers 2 --out out", 2, ("would remove all 2 decoder blocks",), base=False
    ),
    "shrink-params-with-a-width": Case(
        f"{SHRINK} --params 0.5 --intermediate-size 64 --out out", 2, ("--params chooses",), base=False
    ),
    "shrink-params-out-of-range": Case(
        f"{SHRINK} --params 1.5 --out out", 2, ("--params must be",), base=False
    ),
    "shrink-experts-of-a-dense-model": Case(
        f"{SHRINK} --num-experts 2 --out out", 2, ("no mixture-of-experts layers",), base=False
    ),
    "shrink-experts-below-top-k": Case(
        f"{SHRINK} --model moe --num-experts 1 --out out",
        2,
        ("below the 2 experts each token is routed to",),
        lambda ws: _tiny_mixtral(ws / "moe"),
        base=False,
    ),
    "shrink-unknown-mlp-bias": Case(
        f"{SHRINK} --intermediate-size 64 --mlp-bias on --out out",
        2,
        ("--mlp-bias", "invalid choice"),
        base=False,
    ),
    "shrink-negative-damp": Case(
        f"{SHRINK} --intermediate-size 64 --damp -1 --out out", 2, ("damp must be",), base=False
    ),
    # --- quantization: `oneshot prune --quantize` and `oneshot quantize`; checked before any weight is read
    "quantize-unknown-scheme": Case(
        "--quantize w3a16 --out out", 2, ("unknown quantization scheme 'w3a16'",)
    ),
    "quantize-unsupported-group-size": Case(
        "--quantize w4a16 --group-size 100 --out out",
        2,
        ("unsupported --group-size 100", "32, 64, 128 or -1"),
    ),
    "quantize-group-size-does-not-fit-the-model": Case(  # the tiny model's widths are 64 and 128
        "--quantize w4a16 --out out",
        2,
        ("--group-size 128 does not fit", "has 64 input columns", "use --group-size 64"),
    ),
    "quantize-group-size-without-a-scheme": Case(
        "--group-size 64 --out out", 2, ("--group-size needs --quantize SCHEME",)
    ),
    "quantize-clip-without-a-scheme": Case("--clip mse --out out", 2, ("--clip needs --quantize SCHEME",)),
    "quantize-unknown-clip": Case(
        "--quantize w4a16 --group-size 32 --clip max --out out", 2, ("invalid choice: 'max'", "minmax", "mse")
    ),
    "quantize-act-order-with-pruning": Case(
        "--quantize w4a16 --group-size 64 --act-order --out out", 2, ("--act-order cannot be combined",)
    ),
    "quantize-nm-group-across-quantization-groups": Case(
        "--pattern 1:64 --quantize w4a16 --group-size 32 --out out", 2, ("not a multiple of 64",)
    ),
    "prune-sink-weight-with-the-dense-target": Case(
        "--sink-weight 0.5 --target dense --out out",
        2,
        ("--sink-weight cannot be combined with --target dense",),
    ),
    "quantize-negative-sink-weight": Case(
        "--quantize w4a16 --group-size 32 --sink-weight -1 --out out",
        2,
        ("sink_weight must be a number in [0, 16]",),
    ),
    "quantize-command-sink-weight-too-large": Case(
        QUANTIZE.format(model="model", data="{data}") + " --group-size 32 --sink-weight 100 --out out",
        2,
        ("sink_weight must be a number in [0, 16]", "got 100.0"),
        base=False,
    ),
    "quantize-sink-weight-with-the-dense-target": Case(
        "--quantize w4a16 --group-size 32 --sink-weight 0.5 --target dense --out out",
        2,
        ("--sink-weight cannot be combined with --target dense",),
    ),
    "quantize-sym-and-asym": Case(
        "--quantize w4a16 --sym --asym --out out", 2, ("not allowed with argument",)
    ),
    "prune-and-quantize": Case(
        "--pattern 2:4 --quantize w4a16 --group-size 32 --clip mse --out out",
        0,
        ("quantization", "w4a16, groups of 32, symmetric, mse clipping", "bits per weight"),
        None,
        ("out",),
    ),
    "quantize-command-unknown-scheme": Case(
        QUANTIZE.format(model="model", data="{data}") + " --scheme w4 --out out",
        2,
        ("unknown quantization scheme 'w4'",),
        base=False,
    ),
    "quantize-command-group-size-does-not-fit": Case(
        QUANTIZE.format(model="model", data="{data}") + " --group-size 128 --out out",
        2,
        ("--group-size 128 does not fit", "use --group-size 64"),
        base=False,
    ),
    "quantize-command-already-quantized": Case(
        QUANTIZE.format(model="qrun", data="{data}") + " --group-size 64 --out out",
        2,
        ("qrun is already quantized", "w4a16, groups of 64"),
        _quantized_run,
        base=False,
    ),
    "quantize-command-broken-record": Case(
        QUANTIZE.format(model="broken", data="{data}") + " --group-size 64 --out out",
        2,
        ("broken/oneshot.json", "not valid JSON"),
        lambda ws: (
            shutil.copytree(ws / "model", ws / "broken"),
            (ws / "broken" / "oneshot.json").write_text('{"format": '),
        ),
        base=False,
    ),
    "quantize-command-out-is-the-model": Case(
        QUANTIZE.format(model="model", data="{data}") + " --group-size 64 --out model --overwrite",
        2,
        ("is the model source",),
        base=False,
    ),
    "quantize-command": Case(
        QUANTIZE.format(model="model", data="{data}") + " --scheme w8a16 --asym --out out",
        0,
        ("w8a16, one scale per output channel, asymmetric", "bits per weight"),
        None,
        ("out",),
        base=False,
    ),
    # --- oneshot export: a bad request is one line before anything is written
    "export-not-a-run-folder": Case(
        "export model --format gguf --out exp", 2, ("model/oneshot.json not found",), base=False
    ),
    "export-unknown-format": Case(
        "export run --format onnx --out exp", 2, ("--format", "invalid choice: 'onnx'"), base=False
    ),
    "export-unknown-gguf-type": Case(
        "export run --format gguf --gguf-type q4_k --out exp", 2, ("invalid choice: 'q4_k'",), base=False
    ),
    "export-gguf-type-with-compressed-tensors": Case(
        "export run --format compressed-tensors --gguf-type f16 --out exp",
        2,
        ("--gguf-type is an option of --format gguf",),
        lambda ws: _pruned_run(ws, "run"),
        base=False,
    ),
    "export-compressed-tensors-of-an-unquantized-run": Case(
        "export run --format compressed-tensors --out exp",
        2,
        ("run is not quantized", "oneshot quantize"),
        lambda ws: _pruned_run(ws, "run"),
        base=False,
    ),
    "export-gguf-of-an-unsupported-architecture": Case(
        "export moe --format gguf --out exp",
        2,
        ("GGUF export supports the architectures llama, qwen2", "'mixtral'"),
        lambda ws: (
            _tiny_mixtral(ws / "moe"),
            (ws / "moe" / "oneshot.json").write_text(json.dumps(MINIMAL_RECORD)),
        ),
        base=False,
    ),
    "export-out-is-the-run-folder": Case(
        "export run --format gguf --out run --overwrite",
        2,
        ("is the run folder",),
        lambda ws: _pruned_run(ws, "run"),
        base=False,
    ),
    "export-gguf": Case(
        "export run --format gguf --gguf-type f32 --out exp",
        0,
        ("gguf (f32, llama)", "within 1e-05"),
        lambda ws: _pruned_run(ws, "run"),
        ("exp",),
        base=False,
    ),
    "export-help": Case("export --help", 0, ("examples:", "--format", "--gguf-type"), base=False),
    "quantize-help": Case("quantize --help", 0, ("examples:", "--scheme", "--group-size"), base=False),
    "shrink-help": Case("shrink --help", 0, ("examples:", "--intermediate-size", "--params"), base=False),
    "recover-help": Case("recover --help", 0, ("examples:", "--method", "--resume", "--teacher"), base=False),
    "recover-tokens-0": Case(
        "recover model --tokens 0", 2, ("--tokens must be a positive integer",), base=False
    ),
    "recover-a-quantized-run": Case(
        "recover qrun --out out",
        2,
        ("qrun is quantized", "recover the run before quantizing"),
        _quantized_run,
        base=False,
    ),
    "recover-not-a-run-folder": Case("recover model --out out", 2, ("oneshot.json not found",), base=False),
    # --- non-uniform allocation and `oneshot sensitivity`
    "allocation-owl-lambda-too-large": Case(
        "--sparsity 0.95 --allocation owl --out out", 2, ("--owl-lambda 0.08 is too large", "below 0.05")
    ),
    "allocation-above-the-pattern": Case(
        "--pattern 2:4 --sparsity 0.6 --allocation owl --out out", 2, ("above what pattern 2:4 allows",)
    ),
    "allocation-unknown": Case("--allocation greedy --out out", 2, ("invalid choice", "greedy")),
    "allocation-above-the-measured-curves": Case(
        "--sparsity 0.8 --allocation sensitivity --sensitivity-file sens/sensitivity.json --out out",
        2,
        ("above the largest sparsity the sensitivity file measured (0.7)",),
        _sens_file,
    ),
    "allocation-file-of-another-pattern": Case(
        "--pattern 2:4 --allocation sensitivity --sensitivity-file sens --out out",
        2,
        ("measured with sparsegpt unstructured", "prunes with sparsegpt 2:4"),
        _sens_file,
    ),
    "allocation-file-of-another-model": Case(
        "--sparsity 0.6 --allocation sensitivity --sensitivity-file sens/sensitivity.json --out out",
        2,
        ("no curve for model.layers.0.self_attn.q_proj",),
        lambda ws: _sens_file(ws, prefix="transformer.h"),
    ),
    "allocation-file-missing": Case(
        "--allocation sensitivity --sensitivity-file nope.json --out out", 2, ("nope.json not found",)
    ),
    "sensitivity-file-without-allocation": Case(
        "--sensitivity-file sens --out out", 2, ("--sensitivity-file needs --allocation sensitivity",)
    ),
    "allocation-negative-owl-lambda": Case(
        "--allocation uniform --sparsity 0.5 --owl-lambda -1 --out out",
        2,
        ("--owl-lambda must be a finite number",),
    ),
    "sensitivity-bad-sparsities": Case(
        f"{SENS} --sparsities 0.5,1.2 --out sens-out", 2, ("fractions in (0, 1)", "1.2"), base=False
    ),
    "sensitivity-sparsities-not-numbers": Case(
        f"{SENS} --sparsities 0.5,half --out sens-out", 2, ("comma list of fractions", "half"), base=False
    ),
    "sensitivity-negative-sink-weight": Case(
        f"{SENS} --sink-weight -1 --out sens-out", 2, ("sink_weight must be a number in [0, 16]",), base=False
    ),
    "sensitivity-pattern-with-other-sparsities": Case(
        f"{SENS} --pattern 2:4 --sparsities 0.3 --out sens-out",
        2,
        ("the only sparsity measured is 0.5",),
        base=False,
    ),
    "sensitivity-overwrite-a-run-folder": Case(
        f"{SENS} --out prev --overwrite",
        2,
        ("not an earlier `oneshot sensitivity` output",),
        lambda ws: _earlier_output(ws, "prev"),
        base=False,
    ),
    "sensitivity-writes-its-folder": Case(
        f"{SENS} --sparsities 0.5 --out sens-out",
        0,
        ("sensitivity.json", "sens-out"),
        changed=("sens-out",),
        base=False,
    ),
    "sensitivity-help": Case(
        "sensitivity --help", 0, ("examples:", "--sparsities", "--error-windows"), base=False
    ),
    # --- the command itself
    "version": Case("--version", 0, ("oneshot 0.1.0",), base=False),
    "help-has-examples": Case(
        "prune --help", 0, ("examples:", "--seed", "calibration window draw"), base=False
    ),
}


def _argv(case: Case, data_dir: Path) -> list[str]:
    import shlex

    args = case.args.replace("{data}", str(data_dir))
    text = f"{BASE} {args}" if case.base else args
    argv = shlex.split(text)
    if case.base and "--data-dir" not in argv:
        argv += ["--data-dir", str(data_dir)]
    return argv


@pytest.fixture()
def workspace(tmp_path: Path, tiny_llama_dir: Path, calib_txt: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(tiny_llama_dir, ws / "model")
    shutil.copy(calib_txt, ws / "calib.txt")
    monkeypatch.chdir(ws)
    return ws


@pytest.mark.parametrize("name", list(CASES))
def test_cli_case(name: str, workspace: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES[name]
    made = case.setup(workspace) if case.setup else None
    held = made if isinstance(made, OutputSlot) else None
    before = snapshot(workspace)
    model_before = snapshot(workspace / "model")
    capsys.readouterr()
    try:
        try:
            code = main(_argv(case, data_dir))
        except SystemExit as exc:  # argparse's --version / --help
            code = int(exc.code or 0)
        after = snapshot(workspace)  # the other run's lock and temporary folder are still there
    finally:
        if held is not None:
            held.release()
    out, err = capsys.readouterr()
    text = out + err
    assert code == case.code, text
    for word in case.words:
        assert word in text, f"{word!r} not in:\n{text}"
    assert snapshot(workspace / "model") == model_before, "the model folder changed"
    if code != 0:
        errors = [line for line in err.splitlines() if line.startswith("oneshot: error: ")]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert after == before, "an error case changed the workspace"
        return
    changed = set(case.changed)
    top = lambda rel: rel.split("/")[0]  # noqa: E731
    assert {k: v for k, v in before.items() if top(k) not in changed} == {
        k: v for k, v in after.items() if top(k) not in changed
    }, "a success case touched something it does not own"
    for rel in changed:
        if rel.startswith(".out.tmp-999999"):
            assert rel not in after
        elif rel == "o[u]t":
            assert ".out.tmp-999999-deadbeef/model.safetensors" in after
        elif rel in ("out", "prev"):
            assert (workspace / rel / "oneshot.json").is_file() and not (
                workspace / rel / MARKER_FILE
            ).exists()
    if "prev" in changed:
        assert (workspace / "prev" / "model.safetensors").read_bytes() != b"previous run"  # replaced
    assert not [k for k in after if k.endswith(".lock")], "a lock file was left behind"


# ------------------------------------------------------------------------------------------- interruptions


def test_ctrl_c_during_the_compute_writes_nothing(
    workspace: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import oneshot.jobs.prune

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(oneshot.jobs.prune, "prune", interrupted)
    before = snapshot(workspace)
    code = main(_argv(Case("--out out", 130, ()), data_dir))
    err = capsys.readouterr().err
    assert code == 130 and "interrupted; nothing was written to" in err and "out" in err
    assert snapshot(workspace) == before


def test_ctrl_c_after_the_final_rename_says_the_output_is_complete(
    workspace: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import oneshot.eval.report

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(oneshot.eval.report, "write_report", interrupted)
    code = main(_argv(Case("--out out", 130, ()), data_dir))
    err = capsys.readouterr().err
    assert code == 130 and f"the output {workspace / 'out'} is complete" in err, err
    assert (workspace / "out" / "model.safetensors").is_file() and (
        workspace / "out" / "oneshot.json"
    ).is_file()
    assert not (workspace / "out" / MARKER_FILE).exists()


def test_ctrl_c_while_importing_is_exit_130(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import builtins

    real_import = builtins.__import__

    def slow_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "oneshot.jobs.prune":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", slow_import)
    out = tmp_path / "x"
    # (a missing model: should the interruption not happen, the run fails in a second instead of pruning)
    assert main(["prune", "--model", str(tmp_path / "none"), "--out", str(out), "-q"]) == 130
    assert not out.exists() and not list(tmp_path.iterdir())  # interrupted before anything was touched
    assert capsys.readouterr().err.strip() == "oneshot: interrupted"


def test_describe_turns_environment_errors_into_one_line() -> None:
    from oneshot.errors import describe

    assert describe(PermissionError(13, "Permission denied", "/x/model.safetensors")) == (
        "permission denied: /x/model.safetensors (Permission denied)"
    )
    oom = describe(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert oom is not None and "--batch-size" in oom and "Tried to allocate" in oom
    assert describe(RuntimeError("a bug")) is None  # bugs keep their traceback


# ------------------------------------------------------------------------------------------- other processes

_SLOW_RUN = """
import sys, time
import oneshot.jobs.prune as job
real = job.write_run_folder
def slow(model, tok, folder, record, **kw):
    real(model, tok, folder, record, **kw)
    print("SAVED", flush=True)
    time.sleep(120)
job.write_run_folder = slow
from oneshot.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(data_dir: Path) -> dict[str, str]:
    return {**os.environ, "ONESHOT_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def test_a_second_run_fails_fast_and_kill_9_leftovers_are_cleaned(
    workspace: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run killed with -9 while saving: a second run on the same --out refused at once while the first is
    alive; after the kill, the next run reports and removes the leftover and completes."""
    argv = _argv(Case("--out out", 0, ()), data_dir)
    first = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RUN, *argv],
        cwd=workspace,
        env=_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout is not None
        line = first.stdout.readline()  # the first run is now inside its save, holding the output
        assert line.strip() == "SAVED", first.stderr.read() if first.stderr else ""
        t0 = time.perf_counter()
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and f"another oneshot run (pid {first.pid}" in err, err
        assert time.perf_counter() - t0 < 10  # refused before loading anything
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    leftovers = [p.name for p in workspace.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(leftovers) == 1 and (workspace / leftovers[0] / MARKER_FILE).is_file()
    assert not (workspace / "out").exists()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0 and f"removing {workspace / leftovers[0]}" in err and "no longer running" in err, err
    assert sorted(p.name for p in workspace.iterdir() if p.name.startswith(".")) == []
    assert (workspace / "out" / "oneshot.json").is_file()


# ------------------------------------------------------------------------------------------- other commands


@pytest.mark.parametrize(
    "argv",
    [
        ["card", "{run}"],
        ["eval", "{run}", "--ppl", "wikitext2", "--ppl-windows", "1", "--seqlen", "16"],
        ["report", "{run}", "--out", "{ws}/report"],
        ["push", "{run}", "--repo-id", "me/x", "--dry-run"],
    ],
    ids=["card", "eval", "report", "push"],
)
def test_a_broken_record_names_its_file(
    argv: list[str], workspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = workspace / "run"
    shutil.copytree(workspace / "model", run)
    (run / "oneshot.json").write_text('{"format": "oneshot-run/1", "prune": ')
    before = snapshot(workspace)
    code = main([a.format(run=run, ws=workspace) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("oneshot: error: ")]
    assert code == 2 and len(lines) == 1 and "oneshot.json" in lines[0] and "Traceback" not in err, err
    assert snapshot(workspace) == before


def test_eval_checks_the_baseline_before_evaluating_the_model(
    workspace: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import oneshot.eval.evaluate

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the main model was loaded before the baseline was checked")

    monkeypatch.setattr(oneshot.eval.evaluate, "_load", must_not_run)
    for baseline, words in (("./no-such-model", "does not exist"), ("conf", "no weights")):
        if baseline == "conf":
            _config_only(workspace)
        code = main(
            ["eval", "model", "--baseline", baseline, "--ppl-windows", "1", "--data-dir", str(data_dir)]
        )
        err = capsys.readouterr().err
        assert code == 2 and words in err, err


def test_a_non_finite_quick_perplexity_is_an_error(
    workspace: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = importlib.import_module("oneshot.eval.perplexity")
    real = module.perplexity
    calls: list[int] = []

    def nan_after_pruning(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the pruned model's check
            result.value = float("nan")
        return result

    monkeypatch.setattr(module, "perplexity", nan_after_pruning)
    before = snapshot(workspace)
    argv = _argv(Case("--out out --eval-windows 1", 2, ()), data_dir)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "pruned model's quick perplexity is nan" in err, err
    assert snapshot(workspace) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_weight_file_is_named(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(workspace / "model", workspace / "locked")
    (workspace / "locked" / "model.safetensors").chmod(0)
    code = main(["prune", "--model", "locked", "--calib", "calib.txt", "--out", "out", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "locked/model.safetensors: permission denied" in err, err


def test_the_layer_checks_run_on_the_loaded_model_when_no_skeleton_can_be_built(
    workspace: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import oneshot.checks

    monkeypatch.setattr(oneshot.checks, "model_skeleton", lambda config: None)
    before = snapshot(workspace)
    code = main(_argv(Case("--ignore '*' --out out", 2, ()), data_dir))
    err = capsys.readouterr().err
    assert code == 2 and "nothing would be pruned" in err, err
    assert snapshot(workspace) == before


def test_prune_refuses_to_report_success_when_nothing_was_pruned(tiny_llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from oneshot import PruneConfig, prune
    from oneshot.pruner import PruneError

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(PruneError, match="nothing was pruned"):
        prune(model, ids, PruneConfig(ignore=("*",)), device="cpu", progress=False)
