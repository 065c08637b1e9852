"""`oneshot prune` end to end: tiny local model, the real SmolLM2, and every bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from oneshot.cli import main


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _zero_fraction(folder: Path, suffixes: tuple[str, ...]) -> tuple[float, dict[str, torch.Tensor]]:
    tensors = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                tensors[k] = fh.get_tensor(k)
    picked = [v for k, v in tensors.items() if k.endswith(suffixes)]
    zeros = sum(int((v == 0).sum()) for v in picked)
    return zeros / sum(v.numel() for v in picked), tensors


def test_cli_end_to_end_tiny(
    tmp_path: Path, tiny_llama_dir: Path, calib_txt: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pruned"
    code, stdout, err = _run(
        [
            "prune",
            "--model",
            str(tiny_llama_dir),
            "--method",
            "sparsegpt",
            "--pattern",
            "2:4",
            "--calib",
            str(calib_txt),
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--seed",
            "0",
            "--eval-windows",
            "2",
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    assert str(out.resolve()) in stdout and "achieved sparsity" in stdout and "dense" in stdout
    assert {"config.json", "model.safetensors", "oneshot.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    record = json.loads((out / "oneshot.json").read_text())
    assert record["config"]["method"] == "sparsegpt" and record["config"]["pattern"] == "2:4"
    assert record["calibration"]["nsamples"] == 4 and record["versions"]["torch"]
    layers = record["prune"]["layers"]
    assert len(layers) == 14 and all({"sparsity", "loss", "seconds"} <= set(x) for x in layers)
    assert record["prune"]["peak_memory_bytes"] > 0 and record["total_seconds"] > 0
    assert record["quick_eval"]["dense"]["windows"] == 2 and record["quick_eval"]["pruned"]["value"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and "sparsity_config" not in cfg

    frac, _ = _zero_fraction(out, ("proj.weight",))
    assert abs(frac - 0.5) < 1e-3
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert ((q.reshape(-1, 4) == 0).sum(1) >= 2).all()
    assert torch.isfinite(model(**tok("the quick fox", return_tensors="pt")).logits).all()

    # an existing non-empty --out is refused without --overwrite, and replaced with it
    code, _, err = _run(
        [
            "prune",
            "--model",
            str(tiny_llama_dir),
            "--calib",
            str(calib_txt),
            "--nsamples",
            "2",
            "--seqlen",
            "16",
            "--eval-windows",
            "0",
            "--out",
            str(out),
            "-q",
        ],
        capsys,
    )
    assert code == 2 and "--overwrite" in err
    code, _, err = _run(
        [
            "prune",
            "--model",
            str(tiny_llama_dir),
            "--method",
            "magnitude",
            "--calib",
            str(calib_txt),
            "--nsamples",
            "2",
            "--seqlen",
            "16",
            "--eval-windows",
            "0",
            "--out",
            str(out),
            "--overwrite",
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads((out / "oneshot.json").read_text())["config"]["method"] == "magnitude"


BAD = [
    (["--sparsity", "1.0"], "sparsity"),
    (["--sparsity", "-0.2"], "sparsity"),
    (["--pattern", "3:2"], "pattern"),
    (["--pattern", "2:0"], "pattern"),
    (["--pattern", "a:b"], "pattern"),
    (["--method", "optimal-brain-surgeon"], "magnitude, wanda, sparsegpt"),
    (["--nsamples", "0"], "nsamples"),
    (["--seqlen", "4096"], "exceeds the model's context of 128"),
    (["--model", "/definitely/not/here"], "does not exist"),
    (["--model", "./not-here.gguf"], "does not exist"),
    (["--model", "nobody-org/no-such-model-xyz"], "Hugging Face Hub"),
    (["--calib", "nope-corpus"], "unknown calibration source"),
]


@pytest.mark.parametrize("extra,match", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_is_one_clear_line_and_writes_nothing(
    extra: list[str],
    match: str,
    tmp_path: Path,
    tiny_llama_dir: Path,
    calib_txt: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [
        "prune",
        "--model",
        str(tiny_llama_dir),
        "--calib",
        str(calib_txt),
        "--nsamples",
        "2",
        "--seqlen",
        "16",
        "--eval-windows",
        "0",
        "--out",
        str(tmp_path / "out"),
        "-q",
    ]
    args = args + extra  # later options win in argparse
    code, _, err = _run(args, capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("oneshot: error")]
    assert len(lines) == 1 and match in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_short_corpus_and_nan_weights(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    base = [
        "prune",
        "--model",
        str(tiny_llama_dir),
        "--nsamples",
        "2",
        "--seqlen",
        "64",
        "--eval-windows",
        "0",
        "-q",
    ]
    code, _, err = _run([*base, "--calib", str(short), "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "shorter than one window" in err
    assert not (tmp_path / "a").exists()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 3] = float("nan")
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(broken)
    calib = tmp_path / "calib.txt"
    calib.write_text("words and more words " * 200)
    code, _, err = _run(
        [
            "prune",
            "--model",
            str(broken),
            "--calib",
            str(calib),
            "--nsamples",
            "2",
            "--seqlen",
            "16",
            "--eval-windows",
            "0",
            "--out",
            str(tmp_path / "b"),
            "-q",
        ],
        capsys,
    )
    assert code == 2 and "NaN/Inf" in err and "layers.1.mlp.down_proj" in err
    assert not (tmp_path / "b").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "calib.txt", "short.txt"]


@pytest.mark.slow
def test_cli_on_smollm2(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], smollm2) -> None:
    """The real embedded default: a few short windows, Wanda 2:4 on C4 from the data directory."""
    out = tmp_path / "smol"
    code, _, err = _run(
        [
            "prune",
            "--method",
            "wanda",
            "--pattern",
            "2:4",
            "--calib",
            "c4",
            "--nsamples",
            "4",
            "--seqlen",
            "128",
            "--eval-windows",
            "2",
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    record = json.loads((out / "oneshot.json").read_text())
    assert record["source"]["kind"] == "default" and record["model_type"] == "llama"
    assert len(record["prune"]["layers"]) == 30 * 7
    assert abs(record["prune"]["sparsity"] - 0.5) < 1e-4
    dense, pruned = record["quick_eval"]["dense"]["value"], record["quick_eval"]["pruned"]["value"]
    assert 5 < dense < pruned < 10 * dense
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    frac, _ = _zero_fraction(out, ("proj.weight",))
    assert abs(frac - 0.5) < 1e-4
    assert os.path.getsize(out / "model.safetensors") > 100e6


@pytest.mark.parametrize("fmt", ["2:4", "bitmask"])
def test_export_compressed_form(
    fmt: str, tmp_path: Path, tiny_llama_dir: Path, calib_txt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from oneshot import kernels

    out = tmp_path / "run"
    code, _, err = _run(
        [
            "prune",
            "--model",
            str(tiny_llama_dir),
            "--method",
            "wanda",
            "--pattern",
            "2:4",
            "--calib",
            str(calib_txt),
            "--nsamples",
            "2",
            "--seqlen",
            "32",
            "--eval-windows",
            "0",
            "--export",
            fmt,
            "--out",
            str(out),
            "-q",
        ],
        capsys,
    )
    assert code == 0, err
    record = json.loads((out / "oneshot.json").read_text())
    folder = out / record["export"]["folder"]
    assert record["export"]["layers"].get(fmt) == 14
    assert record["export"]["stored_bytes"] <= 0.6 * record["export"]["dense_bytes"]
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(out).eval()
    sparse = kernels.load_compressed(folder).eval()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


def test_export_24_needs_a_24_pattern(
    tmp_path: Path, tiny_llama_dir: Path, calib_txt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(
        [
            "prune",
            "--model",
            str(tiny_llama_dir),
            "--calib",
            str(calib_txt),
            "--nsamples",
            "2",
            "--seqlen",
            "16",
            "--export",
            "2:4",
            "--out",
            str(tmp_path / "x"),
            "-q",
        ],
        capsys,
    )
    assert code == 2 and "--pattern 2:4" in err and not (tmp_path / "x").exists()
