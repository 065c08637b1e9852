"""`oneshot recover`: masks exact under every optimizer step, resume equality, the loss going down, the teacher
untouched, the structure check from the files, and the job / CLI around it (tiny random models, CPU)."""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from oneshot.config import ConfigError, PruneConfig, RecoverConfig
from oneshot.pruner import prune
from oneshot.recover import (
    Checkpointer,
    MaskedParams,
    block_parameters,
    kl_to_teacher,
    lr_factor,
    recover_blockwise,
    recover_distill,
    relative_mse,
    sparsity_masks,
)
from tests.conftest import tiny_llama_config

RECOVERERS = {"blockwise": recover_blockwise, "distill": recover_distill}


@pytest.fixture(scope="module")
def pair() -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """(teacher, SparseGPT 2:4 student, keep-masks) of a tiny random Llama with 3 blocks."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(300, num_hidden_layers=3)).eval()
    student = copy.deepcopy(teacher)
    calib = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    report = prune(
        student, calib, PruneConfig(method="sparsegpt", pattern="2:4"), device="cpu", progress=False
    )
    masks = sparsity_masks(student, [layer.name for layer in report.layers])
    return teacher, student, masks


def _windows(n: int = 8, seqlen: int = 32, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, 300, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _config(method: str, **kw: Any) -> RecoverConfig:
    base: dict[str, Any] = dict(method=method, tokens=8 * 32, seqlen=32, batch_size=2, lr=1e-3, warmup=0.0)
    if method == "distill":
        base["gradient_checkpointing"] = True
    base.update(kw)
    return RecoverConfig(**base)


def _params(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_masks_cover_exactly_the_pruned_zeros(pair: Any) -> None:
    _, student, masks = pair
    params = block_parameters(student)
    assert len(masks) == 3 * 7  # q k v o gate up down in each of 3 blocks
    for name, keep in masks.items():
        w = params[name].detach()
        assert torch.equal(keep, w != 0)
        assert int((~keep).reshape(-1, 4).sum(-1).min()) >= 2  # a 2:4 pattern
    assert sparsity_masks(student, None) == {}  # a shrunk model: nothing frozen


@pytest.mark.parametrize("method", ["blockwise", "distill"])
def test_pruned_weights_stay_exactly_zero_after_every_step_even_with_weight_decay(
    method: str, pair: Any
) -> None:
    teacher, student, masks = pair
    student = copy.deepcopy(student)
    params = block_parameters(student)
    steps: list[int] = []

    def check(step: int) -> None:
        steps.append(step)
        for name, keep in masks.items():
            w = params[name].detach()
            assert int((w[~keep] != 0).sum()) == 0, f"{name} revived at step {step}"
            assert int((w == 0).reshape(-1, 4).sum(-1).min()) >= 2, f"{name}: a 2:4 group broken"

    config = _config(method, weight_decay=0.5, lr=5e-2)  # strong decay and steps: both would move zeros
    before = _params(student)
    RECOVERERS[method](
        student,
        teacher,
        _windows(),
        config,
        masks=masks,
        block_map=[0, 1, 2],
        device="cpu",
        checkpointer=Checkpointer(None, 0.0, check),
        progress=False,
    )
    assert len(steps) == (12 if method == "blockwise" else 4)
    moved = [n for n in masks if not torch.equal(before[n], params[n].detach())]
    assert len(moved) == len(masks), "the kept weights were not trained"


def test_masked_params_zero_the_gradients_of_pruned_weights() -> None:
    p = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    keep = p.detach() != 0
    masked = MaskedParams({"w": p}, {"w": keep})
    p.grad = torch.ones_like(p)
    masked.mask_grads()
    assert torch.equal(p.grad, keep.float())
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1)
    opt.step()
    masked.mask_weights()
    assert float(opt.state[p]["exp_avg"][0, 1]) == 0.0  # no momentum builds up on a pruned weight
    assert torch.equal(p.detach() == 0, ~keep)


@pytest.mark.parametrize("method", ["blockwise", "distill"])
def test_resume_continues_to_the_same_result(method: str, pair: Any) -> None:
    teacher, student0, masks = pair
    config = _config(method, epochs=2, weight_decay=0.01)
    kwargs: dict[str, Any] = dict(masks=masks, block_map=[0, 1, 2], device="cpu", progress=False)
    windows = _windows()

    full = copy.deepcopy(student0)
    done = RECOVERERS[method](full, teacher, windows, config, **kwargs)

    states: list[dict[str, Any]] = []

    class Stop(Exception):
        pass

    def stop(step: int) -> None:
        if step == 5:
            raise Stop

    part = copy.deepcopy(student0)
    with pytest.raises(Stop):
        RECOVERERS[method](
            part,
            teacher,
            windows,
            config,
            checkpointer=Checkpointer(lambda s: states.append(copy.deepcopy(s)), 0.0, stop),
            **kwargs,
        )
    assert states and states[-1]["steps"] == 5
    resumed = copy.deepcopy(student0)  # a fresh process: the original weights plus the saved state
    again = RECOVERERS[method](resumed, teacher, windows, config, state=states[-1], **kwargs)
    for name, p in full.named_parameters():
        assert torch.equal(p, dict(resumed.named_parameters())[name]), name
    assert again.steps == done.steps and again.tokens_seen == done.tokens_seen and again.resumed == 1
    assert [p[:2] for p in again.curve] == [p[:2] for p in done.curve]
    with pytest.raises(Exception, match="differ: lr"):
        RECOVERERS[method](
            copy.deepcopy(student0), teacher, windows, config.replace(lr=0.5), state=states[-1], **kwargs
        )


def test_blockwise_lowers_every_blocks_error_and_distill_the_kl(pair: Any) -> None:
    teacher, student0, masks = pair
    windows = _windows()
    kwargs: dict[str, Any] = dict(masks=masks, block_map=[0, 1, 2], device="cpu", progress=False)
    student = copy.deepcopy(student0)
    res = recover_blockwise(student, teacher, windows, _config("blockwise", epochs=4), **kwargs)
    assert len(res.blocks) == 3
    for b in res.blocks:
        assert b["loss_after"] < 0.7 * b["loss_before"], b

    def kl(model: Any) -> float:
        with torch.no_grad():
            return float(kl_to_teacher(model(windows).logits, teacher(windows).logits))

    student = copy.deepcopy(student0)
    before = kl(student)
    res = recover_distill(
        student, teacher, windows, _config("distill", epochs=4, hidden_weight=0.5), **kwargs
    )
    assert kl(student) < 0.7 * before
    assert res.curve[-1][2] < res.curve[0][2]


def test_the_teacher_stays_in_eval_mode_and_is_never_updated(pair: Any) -> None:
    teacher, student0, masks = pair
    before = _params(teacher)
    modes: list[bool] = []
    handle = teacher.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    block_modes: list[bool] = []
    hooks = [
        b.register_forward_pre_hook(lambda mod, args: block_modes.append(mod.training))
        for b in teacher.model.layers
    ]
    try:
        for method in ("distill", "blockwise"):
            RECOVERERS[method](
                copy.deepcopy(student0),
                teacher,
                _windows(),
                _config(method),
                masks=masks,
                block_map=[0, 1, 2],
                device="cpu",
                progress=False,
            )
    finally:
        handle.remove()
        for h in hooks:
            h.remove()
    assert modes and not any(modes)
    assert block_modes and not any(block_modes)
    for name, p in teacher.named_parameters():
        assert torch.equal(p, before[name]), name
        assert p.grad is None
    assert not teacher.training


def test_relative_mse_and_kl_against_direct_formulas() -> None:
    gen = torch.Generator().manual_seed(0)
    out, target = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    d = out.double() - target.double()
    ref = ((d**2).sum(-1) / (target.double() ** 2).sum(-1)).mean()
    assert abs(float(relative_mse(out, target)) - float(ref)) < 1e-6
    s, t = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen)
    pt = torch.softmax(t.double(), -1)
    ref_kl = (pt * (torch.log_softmax(t.double(), -1) - torch.log_softmax(s.double(), -1))).sum(-1).mean()
    assert abs(float(kl_to_teacher(s, t)) - float(ref_kl)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kl_value_and_gradient_against_float64_autograd(dtype: torch.dtype) -> None:
    # 3 x 50 positions span several chunks of the fused pass (64 rows), the last one partial
    gen = torch.Generator().manual_seed(1)
    s = (3 * torch.randn(3, 50, 11, generator=gen)).to(dtype).requires_grad_(True)
    t = (3 * torch.randn(3, 50, 11, generator=gen)).to(dtype)
    s64 = s.detach().double().requires_grad_(True)
    log_p = torch.log_softmax(t.double(), -1)
    ref = (log_p.exp() * (log_p - torch.log_softmax(s64, -1))).sum(-1).mean()
    (2.5 * ref).backward()
    loss = kl_to_teacher(s, t)
    (2.5 * loss).backward()
    assert loss.dtype == torch.float32
    assert abs(float(loss) - float(ref)) < 1e-5
    assert s.grad is not None and s.grad.dtype == dtype
    # float32: exact to rounding; bfloat16: the stored gradient and the product are each rounded once
    rel = 1e-5 if dtype == torch.float32 else 1e-2
    err = (s.grad.double() - s64.grad).abs()
    assert bool((err <= rel * s64.grad.abs() + 1e-9).all()), float(err.max())
    # no gradient asked for: the value alone
    assert abs(float(kl_to_teacher(s.detach(), t)) - float(ref)) < 1e-5


def test_lr_schedule_warms_up_then_decays_to_a_tenth() -> None:
    f = [lr_factor(s, 100, 0.1) for s in range(100)]
    assert f[0] < f[5] < f[9] <= 1.0
    assert abs(f[10] - 1.0) < 1e-9
    assert all(a >= b for a, b in itertools.pairwise(f[10:]))
    assert 0.1 <= f[-1] < 0.11
    assert lr_factor(0, 1, 0.0) == 1.0


def test_recover_config_rejects_bad_values() -> None:
    for kwargs, words in (
        ({"tokens": 0}, "--tokens must be a positive integer"),
        ({"tokens": 100, "seqlen": 512}, "less than one window"),
        ({"method": "lora"}, "blockwise, distill"),
        ({"lr": 0}, "--lr must be"),
        ({"lr": float("nan")}, "--lr must be"),
        ({"warmup": 1.0}, "--warmup"),
        ({"mixed_precision": "fp8"}, "no, bf16, fp16"),
        ({"method": "blockwise", "hidden_weight": 1.0}, "options of --method distill"),
    ):
        with pytest.raises(ConfigError, match=words):
            RecoverConfig(**kwargs)
    assert RecoverConfig(tokens=2048, seqlen=512).windows == 4


# --- the job and the command -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Any) -> dict[str, Path]:
    """A tiny teacher folder and three run folders made from it: SparseGPT 2:4, 50 % and a shrink."""
    from transformers import LlamaForCausalLM

    from oneshot.cli import main
    from tests.conftest import TEXT

    root = tmp_path_factory.mktemp("recover-runs")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer), num_hidden_layers=3))
    model.save_pretrained(root / "teacher")
    tiny_tokenizer.save_pretrained(root / "teacher")
    (root / "calib.txt").write_text(TEXT)
    common = ["--model", str(root / "teacher"), "--calib", str(root / "calib.txt"), "--nsamples", "4"]
    common += ["--seqlen", "32", "--eval-windows", "0", "-q"]
    assert main(["prune", *common, "--pattern", "2:4", "--out", str(root / "p24")]) == 0
    assert main(["prune", *common, "--sparsity", "0.5", "--out", str(root / "p50")]) == 0
    assert (
        main(["shrink", *common, "--intermediate-size", "64", "--drop-layers", "1", "--out", str(root / "s")])
        == 0
    )
    return {"root": root, "teacher": root / "teacher", "calib": root / "calib.txt", "p24": root / "p24"} | {
        "p50": root / "p50",
        "s": root / "s",
    }


def _recover_args(runs: dict[str, Path], run: str, out: Path, *extra: str) -> list[str]:
    return [
        "recover",
        str(runs[run]),
        "--data",
        str(runs["calib"]),
        "--tokens",
        "256",
        "--seqlen",
        "32",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--eval-windows",
        "0",
        "--out",
        str(out),
        "-q",
        *extra,
    ]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("run,method", [("p24", "blockwise"), ("p50", "distill"), ("s", "blockwise")])
def test_recover_writes_a_run_folder_with_the_structure_proved(
    run: str, method: str, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    from oneshot.cli import main
    from oneshot.runfolder import RunRecord

    out = tmp_path / "rec"
    assert main(_recover_args(runs, run, out, "--method", method)) == 0
    text = capsys.readouterr().out
    assert "structure" in text and "exact" in text
    record = RunRecord.load(out)
    rec = record.recoveries[-1]
    assert rec.config.method == method and rec.steps > 0 and rec.masks is not None and rec.masks.exact
    assert rec.teacher.path == str(runs["teacher"].resolve())
    assert record.kind == RunRecord.load(runs[run]).kind
    if run == "s":
        assert rec.masks.matrices == 0 and rec.masks.shapes_equal
        assert [b["teacher_block"] for b in rec.blocks] == [
            j for j in range(3) if j not in record.shrunk[1].dropped_layers
        ]
    else:
        assert rec.masks.revived == 0 and rec.masks.pruned_before > 0
        assert (rec.masks.nm == "2:4") == (run == "p24")
    before, after = _weights(runs[run]), _weights(out)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(".layers." in k for k in changed)  # only the decoder blocks are trained
    for k in before:
        assert before[k].shape == after[k].shape
        if run != "s" and k.endswith("proj.weight"):
            assert int(((before[k] == 0) & (after[k] != 0)).sum()) == 0
    AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    card = (out / "README.md").read_text()
    assert "Recovery" in card and method in card
    # a second pass (blockwise, then distill) records both, in order
    if run == "p24":
        out2 = tmp_path / "rec2"
        again = _recover_args(runs, run, out2, "--method", "distill")
        again[1] = str(out)
        assert main(again) == 0
        assert [r.config.method for r in RunRecord.load(out2).recoveries] == ["blockwise", "distill"]


def test_an_interrupted_recovery_resumes_to_the_same_weights(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from oneshot.config import RecoverConfig
    from oneshot.errors import Interrupted
    from oneshot.jobs.recover import run_recover, state_folder
    from oneshot.recover import RecoverError

    config = RecoverConfig(
        method="blockwise",
        data=str(runs["calib"]),
        tokens=256,
        seqlen=32,
        batch_size=2,
        lr=1e-3,
        epochs=2,
        checkpoint_minutes=0.0,
    )
    kwargs: dict[str, Any] = dict(eval_windows=0, progress=False)
    run_recover(runs["p24"], config, tmp_path / "full", **kwargs)

    def stop(step: int) -> None:
        if step == 11:
            raise KeyboardInterrupt

    out = tmp_path / "part"
    with pytest.raises(Interrupted, match="--resume"):
        run_recover(runs["p24"], config, out, on_step=stop, **kwargs)
    assert not out.exists() and (state_folder(out) / "state.pt").is_file()
    with pytest.raises(RecoverError, match="pass --resume"):
        run_recover(runs["p24"], config, out, **kwargs)
    with pytest.raises(RecoverError, match="differ: lr"):
        run_recover(runs["p24"], config.replace(lr=1e-2), out, resume=True, **kwargs)
    result = run_recover(runs["p24"], config, out, resume=True, **kwargs)
    assert result.record.recoveries[-1].resumed == 1
    assert not state_folder(out).exists()
    full, part = _weights(tmp_path / "full"), _weights(out)
    for k in full:
        assert torch.equal(full[k], part[k]), k
    with pytest.raises(RecoverError, match="no saved recovery state"):
        run_recover(runs["p24"], config, tmp_path / "other", resume=True, **kwargs)


def test_the_structure_check_reads_the_files(runs: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from oneshot.patterns import compare_patterns

    layers = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    same = compare_patterns(runs["p24"], runs["p24"], layers, (2, 4))
    assert same.exact and same.revived == 0 and same.nm_groups > 0
    copy_dir = tmp_path / "c"
    shutil.copytree(runs["p24"], copy_dir)
    tensors = _weights(copy_dir)
    w = tensors["model.layers.1.mlp.down_proj.weight"]
    zero = (w == 0).nonzero()[0]
    w[zero[0], zero[1]] = 1.0  # one pruned weight revived: a 2:4 group broken
    save_file(tensors, str(copy_dir / "model.safetensors"), metadata={"format": "pt"})
    bad = compare_patterns(runs["p24"], copy_dir, layers, (2, 4))
    assert bad.revived == 1 and bad.nm_broken == 1 and not bad.exact
    assert not compare_patterns(runs["p24"], runs["s"], None, None).shapes_equal


def _edit_record(src: Path, dst: Path, **run: Any) -> None:
    shutil.copytree(src, dst)
    data = json.loads((dst / "oneshot.json").read_text())
    data["run"].update(run)
    (dst / "oneshot.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "case,words",
    [
        ("teacher-gone", ("no teacher found", "--teacher")),
        ("bad-teacher", ("no teacher found", "--teacher")),
        ("not-a-run", ("oneshot.json not found",)),
        ("not-a-folder", ("is not a folder",)),
        ("tokens-0", ("--tokens must be a positive integer",)),
        ("short-data", ("shorter than one window",)),
        ("eval-text", ("the text perplexity is measured on",)),
        ("wrong-teacher", ("does not match", "hidden_size")),
    ],
)
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(
    case: str,
    words: tuple[str, ...],
    runs: dict[str, Path],
    tmp_path: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from transformers import LlamaForCausalLM

    from oneshot.cli import main
    from tests.test_cli_errors import snapshot

    ws = tmp_path / "ws"
    ws.mkdir()
    run = ws / "run"
    out = ws / "out"
    args = _recover_args(runs, "p24", out)
    args[1] = str(run)
    if case == "teacher-gone":
        _edit_record(runs["p24"], run, model=str(ws / "deleted-model"))
    else:
        shutil.copytree(runs["p24"], run)
    if case == "bad-teacher":
        args += ["--teacher", str(ws / "nowhere")]
    elif case == "not-a-run":
        (run / "oneshot.json").unlink()
    elif case == "not-a-folder":
        args[1] = str(run / "config.json")
    elif case == "tokens-0":
        args[args.index("--tokens") + 1] = "0"
    elif case == "short-data":
        (ws / "short.txt").write_text("a few words")
        args[args.index("--data") + 1] = str(ws / "short.txt")
    elif case == "eval-text":
        args[args.index("--data") + 1] = str(data_dir / "wikitext-2-raw" / "wiki.test.raw")
    elif case == "wrong-teacher":
        LlamaForCausalLM(tiny_llama_config(300, hidden_size=32, num_hidden_layers=3)).save_pretrained(
            ws / "other"
        )
        shutil.copy(runs["teacher"] / "tokenizer.json", ws / "other")
        args += ["--teacher", str(ws / "other")]
    before = snapshot(ws)
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("oneshot: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in errors[0], errors[0]
    assert snapshot(ws) == before, "an error case changed the workspace"


def test_distill_in_bf16_keeps_the_masks_and_leaves_the_forward_unpatched(pair: Any) -> None:
    teacher, student0, masks = pair
    student = copy.deepcopy(student0)
    config = _config("distill", mixed_precision="bf16")
    recover_distill(
        student, teacher, _windows(), config, masks=masks, block_map=[0, 1, 2], device="cpu", progress=False
    )
    params = block_parameters(student)
    for name, keep in masks.items():
        assert int((params[name].detach()[~keep] != 0).sum()) == 0
    assert "forward" not in student.__dict__ and "_original_forward" not in student.__dict__
    assert next(student.parameters()).dtype == torch.float32
    # and a later float32 recovery in the same process works (accelerate's process-wide state is reset)
    recover_distill(
        student,
        teacher,
        _windows(),
        _config("distill"),
        masks=masks,
        block_map=[0, 1, 2],
        device="cpu",
        progress=False,
    )
