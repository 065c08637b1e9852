"""Several processes (#15 item 3): ``torchrun --nproc-per-node 2 -m oneshot prune`` with gloo on the CPU gives
the single-process result to fp32 reduction tolerance (masks identical), and rank 0 alone writes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oneshot.cli import main
from oneshot.runfolder import RUN_FILE
from tests.conftest import prune_args, tiny_llama_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer), num_hidden_layers=3))
    path = tmp_path_factory.mktemp("tiny-llama-3")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MASTER_ADDR": "127.0.0.1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "oneshot", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "options",
    [
        ["--method", "sparsegpt"],
        ["--method", "wanda", "--pattern", "2:4"],
        ["--method", "sparsegpt", "--target", "dense", "--offload", "disk"],
    ],
)
def test_two_processes_prune_like_one(
    tmp_path: Path, model_dir: Path, calib_txt: Path, data_dir: Path, options: list[str]
) -> None:
    # 4 windows in batches of 2: one batch per rank, the batches of the one-process run; with one thread
    # each the sums are the same fp32 additions, so the result must be the same bit for bit
    one, two = tmp_path / "one", tmp_path / "two"
    args = prune_args(model_dir, calib_txt, data_dir, one, *options)
    args[args.index("--nsamples") + 1] = "4"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    args[args.index("--out") + 1] = str(two)
    proc = _torchrun(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("achieved sparsity") == 1  # rank 0 alone reports
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"
    rec_one, rec_two = (json.loads((d / RUN_FILE).read_text()) for d in (one, two))
    assert rec_two["prune"]["zero_params"] == rec_one["prune"]["zero_params"]
    assert rec_two["calibration"] == rec_one["calibration"]  # the whole calibration set, not a rank's share
    errors = [
        (x["output_error"], y["output_error"])
        for x, y in zip(rec_one["prune"]["blocks"], rec_two["prune"]["blocks"], strict=True)
    ]
    assert all(x == y for x, y in errors), errors  # reduced over the ranks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # nothing else written by a worker


def test_too_few_windows_and_resume_are_refused(
    tmp_path: Path, model_dir: Path, calib_txt: Path, data_dir: Path
) -> None:
    args = prune_args(model_dir, calib_txt, data_dir, tmp_path / "out")
    args[args.index("--nsamples") + 1] = "1"
    proc = _torchrun(args, cwd=tmp_path)
    assert proc.returncode != 0 and "cannot be split over 2 processes" in proc.stderr
    proc = _torchrun(
        [*prune_args(model_dir, calib_txt, data_dir, tmp_path / "out2"), "--resume"], cwd=tmp_path
    )
    assert proc.returncode != 0 and "--resume is not supported with several processes" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_a_rank_that_fails_stops_the_run_with_its_message(
    tmp_path: Path, model_dir: Path, calib_txt: Path, data_dir: Path
) -> None:
    """An error on one rank only (here rank 1 at block 1) must end the run at once with that error, not
    leave the other rank waiting in a collective until it times out."""
    script = tmp_path / "fail_on_rank1.py"
    script.write_text(
        "import os, sys\n"
        "import oneshot.pruner as pruner\n"
        "from oneshot.cli import main\n"
        "real = pruner.plan_block\n"
        "def plan_block(block, prefix, ignore):\n"
        "    if os.environ.get('RANK') == '1' and prefix.endswith('.1'):\n"
        "        raise pruner.PruneError('injected failure on rank 1')\n"
        "    return real(block, prefix, ignore)\n"
        "pruner.plan_block = plan_block\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
    ]
    cmd += ["--master-port", str(_free_port()), str(script)]
    cmd += prune_args(model_dir, calib_txt, data_dir, tmp_path / "out")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_solves_are_divided_and_shared_inputs_stay_together(monkeypatch: pytest.MonkeyPatch) -> None:
    from oneshot import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    layers = [
        ("q", (64, 64)),
        ("k", (32, 64)),
        ("v", (32, 64)),
        ("o", (64, 64)),
        ("gate", (172, 64)),
        ("up", (172, 64)),
        ("down", (64, 172)),
    ]
    reads = {"q": "x", "k": "x", "v": "x", "o": "a", "gate": "h", "up": "h", "down": "m"}
    owner = distributed.assign_solves(layers, lambda name: reads[name])
    assert owner["q"] == owner["k"] == owner["v"] and owner["gate"] == owner["up"]
    assert set(owner.values()) == {0, 1}  # both ranks solve
    assert owner["down"] != owner["gate"]  # the two largest groups go to different ranks
