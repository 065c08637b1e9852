"""Resume (#15 item 2): a run interrupted after block k (Ctrl-C in the process, or SIGKILL) continues with
``--resume`` to the bytes of an uninterrupted run; other options are refused; --resume needs a run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import oneshot.pruner as pruner_mod
from oneshot import PruneConfig, prune
from oneshot.cli import main
from oneshot.output import RESUME_DIR, RESUME_STATE
from oneshot.resume import BlockCheckpoint, ResumeError
from tests.conftest import prune_args, tiny_llama_config

REPO = Path(__file__).resolve().parents[1]
LAYERS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A tiny random Llama with 4 blocks (so that a run can stop in the middle)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer), num_hidden_layers=LAYERS))
    path = tmp_path_factory.mktemp("tiny-llama-4")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of every safetensors file in the folder (checkpoint and quantization grids): dtype,
    shape and bytes."""
    found: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
    files = sorted(folder.rglob("*.safetensors"))
    assert files
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                t = fh.get_tensor(k).contiguous()
                raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
                found[f"{f.relative_to(folder)}:{k}"] = (str(t.dtype), tuple(t.shape), raw)
    return found


def _assert_same_bytes(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key] == tb[key], f"{key} differs"


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, block: int) -> list[int]:
    """Ctrl-C right after block ``block`` is checkpointed; returns the list of saved block indices."""
    saved: list[int] = []
    real = BlockCheckpoint.save

    def save(self: BlockCheckpoint, index: int, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        real(self, index, *args, **kwargs)
        saved.append(index)
        if index == block:
            raise KeyboardInterrupt

    monkeypatch.setattr(BlockCheckpoint, "save", save)
    return saved


def _leftovers(tmp_path: Path) -> list[Path]:
    return [p for p in tmp_path.iterdir() if p.name.startswith(".pruned.tmp-")]


@pytest.mark.parametrize(
    ("options", "stop"),
    [
        (["--method", "sparsegpt"], 1),
        (["--method", "wanda", "--pattern", "2:4"], 2),
        (["--method", "sparsegpt", "--target", "dense"], 1),
        (["--method", "wanda", "--target", "dense"], 2),
        (["--method", "sparsegpt", "--pattern", "2:4", "--quantize", "w4a16", "--group-size", "32"], 0),
    ],
)
def test_interrupted_run_resumes_to_the_bytes_of_an_uninterrupted_run(
    tmp_path: Path,
    model_dir: Path,
    calib_txt: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    options: list[str],
    stop: int,
) -> None:
    ref = tmp_path / "reference"
    code, _, err = _run(prune_args(model_dir, calib_txt, data_dir, ref, *options), capsys)
    assert code == 0, err
    if "--target" in options:  # the card names the layer objective
        assert "`--target dense`" in (ref / "README.md").read_text()

    out = tmp_path / "pruned"
    with monkeypatch.context() as m:
        saved = _interrupt_after(m, stop)
        code, _, err = _run(prune_args(model_dir, calib_txt, data_dir, out, *options), capsys)
    assert code == 130 and saved == list(range(stop + 1))
    assert "--resume" in err and f"{stop + 1} of {LAYERS} blocks done" in err, err
    assert not out.exists() and len(_leftovers(tmp_path)) == 1

    # the same command again says that an interrupted run exists and how to continue it
    code, _, err = _run(prune_args(model_dir, calib_txt, data_dir, out, *options), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "interrupted run" in err and "--resume" in err and f"{stop + 1} of {LAYERS}" in err

    with monkeypatch.context() as m:
        saved = _interrupt_after(m, -1)  # records the blocks this run prunes
        code, _, err = _run(prune_args(model_dir, calib_txt, data_dir, out, *options, "--resume"), capsys)
    assert code == 0, err
    assert saved == list(range(stop + 1, LAYERS))  # the finished blocks are not pruned again
    _assert_same_bytes(ref, out)
    assert not _leftovers(tmp_path) and not (out / RESUME_DIR).exists()
    assert not list(tmp_path.glob(".pruned.lock"))


def test_a_run_killed_with_sigkill_resumes(
    tmp_path: Path, model_dir: Path, calib_txt: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ref = tmp_path / "reference"
    assert _run(prune_args(model_dir, calib_txt, data_dir, ref), capsys)[0] == 0
    out = tmp_path / "pruned"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from oneshot.resume import BlockCheckpoint
        from oneshot.cli import main
        real = BlockCheckpoint.save
        def save(self, index, *args, **kwargs):
            real(self, index, *args, **kwargs)
            if index == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        BlockCheckpoint.save = save
        sys.exit(main({prune_args(model_dir, calib_txt, data_dir, out)!r}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (tmp,) = _leftovers(tmp_path)
    assert (tmp / RESUME_DIR / RESUME_STATE).is_file()
    code, _, err = _run(prune_args(model_dir, calib_txt, data_dir, out, "--resume"), capsys)
    assert code == 0, err
    _assert_same_bytes(ref, out)
    assert not _leftovers(tmp_path)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["--method", "wanda"], "pruning"),
        (["--sparsity", "0.6"], "pruning"),
        (["--seed", "1"], "--seed"),
        (["--nsamples", "4"], "--nsamples"),
    ],
)
def test_resume_with_other_options_is_refused(
    tmp_path: Path,
    model_dir: Path,
    calib_txt: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    change: list[str],
    named: str,
) -> None:
    out = tmp_path / "pruned"
    with monkeypatch.context() as m:
        _interrupt_after(m, 0)
        assert _run(prune_args(model_dir, calib_txt, data_dir, out), capsys)[0] == 130
    code, _, err = _run(prune_args(model_dir, calib_txt, data_dir, out, *change, "--resume"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot resume" in err and named in err
    (tmp,) = _leftovers(tmp_path)  # the checkpoint is kept for the right command
    assert (tmp / RESUME_DIR / RESUME_STATE).is_file()
    assert _run(prune_args(model_dir, calib_txt, data_dir, out, "--resume"), capsys)[0] == 0


def test_resume_with_another_model_is_refused(tmp_path: Path, model_dir: Path) -> None:
    """The data part of the fingerprint (model source, calibration ids) is checked after loading."""
    ckpt = BlockCheckpoint(tmp_path, {"model source": {"path": "a"}, "--seed": 0})
    ckpt.folder.mkdir()
    (ckpt.folder / RESUME_STATE).write_text(
        '{"format": "oneshot-resume/1", "key": {"model source": {"path": "b"}, "--seed": 0}, "next_block": 1}'
    )
    with pytest.raises(ResumeError, match="model source"):
        ckpt.check()
    ckpt.check({"--seed": 0})  # the options alone match


def test_resume_without_an_interrupted_run_is_an_error(
    tmp_path: Path, model_dir: Path, calib_txt: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pruned"
    code, _, err = _run(prune_args(model_dir, calib_txt, data_dir, out, "--resume"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no interrupted run" in err and str(out) in err
    assert not list(tmp_path.iterdir())  # nothing left behind


def test_resumed_walk_restores_the_rng_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block k of a resumed walk starts with the RNG state an uninterrupted walk had there."""
    from transformers import LlamaForCausalLM

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_llama_config(300, num_hidden_layers=LAYERS)).eval()

    ids = torch.randint(2, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    states: list[torch.Tensor] = []
    real_plan = pruner_mod.plan_block

    def plan(*args, **kwargs):  # type: ignore[no-untyped-def]
        states.append(torch.get_rng_state())
        torch.rand(3)  # the walk consumes random numbers: the state moves from block to block
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(pruner_mod, "plan_block", plan)
    config = PruneConfig(method="wanda")
    torch.manual_seed(7)
    prune(fresh(), ids, config, batch_size=2, progress=False)
    expected = list(states)
    assert not torch.equal(expected[1], expected[2])

    states.clear()
    ckpt = BlockCheckpoint(tmp_path, {"k": 1})
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        torch.manual_seed(7)
        with pytest.raises(KeyboardInterrupt):
            prune(fresh(), ids, config, batch_size=2, progress=False, checkpoint=ckpt)
    states.clear()
    torch.manual_seed(1234)  # whatever happened in between
    prune(fresh(), ids, config, batch_size=2, progress=False, checkpoint=ckpt)
    assert len(states) == LAYERS - 2
    for got, want in zip(states, expected[2:], strict=True):
        assert torch.equal(got, want)
    assert os.path.isdir(ckpt.folder)


def test_an_error_after_a_checkpoint_leaves_nothing(
    tmp_path: Path,
    model_dir: Path,
    calib_txt: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A definitive failure (an error, not an interruption) keeps no checkpoint: nothing is written."""
    real = BlockCheckpoint.save

    def save(self: BlockCheckpoint, index: int, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        real(self, index, *args, **kwargs)
        if index == 1:
            raise pruner_mod.PruneError("out of memory while pruning (simulated)")

    monkeypatch.setattr(BlockCheckpoint, "save", save)
    code, _, err = _run(prune_args(model_dir, calib_txt, data_dir, tmp_path / "pruned"), capsys)
    assert code == 2 and "simulated" in err
    assert not list(tmp_path.iterdir())
