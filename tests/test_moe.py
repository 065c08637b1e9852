"""Fused MoE experts (transformers 5): generic expert math, per-expert statistics, pruning and reporting.

Tiny random Mixtral, Qwen3-MoE and GPT-OSS models (hidden 32, 2 layers, 4-8 experts, top-2). Mixtral and
Qwen3-MoE store experts as (E, out, in); GPT-OSS transposed, (E, in, out), with biases and an interleaved,
clamped SwiGLU.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

from oneshot import PruneConfig, prune
from oneshot.moe import (
    combine_experts,
    expert_activations,
    expert_matrix,
    find_experts,
    find_routers,
    is_supported_experts,
)
from oneshot.pruner import DENSE_IGNORED, DENSE_ROUTER, DENSE_UNCALIBRATED
from oneshot.runfolder import DenseMatrix
from oneshot.solvers import get_solver
from oneshot.stats import InputStats
from oneshot.walker import find_blocks

V = 128
H = 32
ARCHS = ["mixtral", "qwen3_moe", "gpt_oss"]


def _common() -> dict:
    """Settings shared by every tiny MoE config."""
    return dict(
        vocab_size=V,
        hidden_size=H,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        num_experts_per_tok=2,
    )


def _config(arch: str) -> tf.PretrainedConfig:
    common = _common()
    if arch == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=48, num_local_experts=4)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common, head_dim=8, intermediate_size=64, moe_intermediate_size=48, num_experts=8
        )
    if arch == "gpt_oss":
        return tf.GptOssConfig(
            **common,
            head_dim=8,
            intermediate_size=48,
            num_local_experts=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    raise KeyError(arch)


def _model(arch: str, *, scale_experts: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_config(arch)).float().eval()
    if scale_experts:  # O(1) expert outputs, so that tolerances mean something
        with torch.no_grad():
            for experts in find_experts(model.model, "model").values():
                for p in experts.parameters():
                    p.normal_(0.0, 1.0 / math.sqrt(H))
    return model


def _moe_block(model: nn.Module, layer: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(MoE module, its router, its experts) of one decoder layer."""
    mlp = model.model.layers[layer].mlp
    router = mlp.router if hasattr(mlp, "router") else mlp.gate
    return mlp, router, mlp.experts


def _ids(n: int = 4, seqlen: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, V, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _block_matrices(model: nn.Module) -> tuple[int, int]:
    """(parameters, zeros) over every weight matrix of the decoder blocks (stacked biases excluded)."""
    _, blocks = find_blocks(model)
    params = zeros = 0
    for name, p in blocks.named_parameters():
        if p.dim() >= 2 and not name.endswith("bias"):
            params += p.numel()
            zeros += int((p == 0).sum())
    return params, zeros


def _expert_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every expert matrix of the model as an (out_features, in_features) tensor, by report name."""
    out = {}
    for mod_name, experts in find_experts(model.model, "model").items():
        first = "gate_up_proj" if experts.has_gate else "up_proj"
        for param in (first, "down_proj"):
            for e in range(getattr(experts, param).shape[0]):
                out[f"{mod_name}.{param}[{e}]"] = expert_matrix(experts, param, e)
    return out


# --- the generic expert forward ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_generic_forward_equals_the_experts_module(arch: str, impl: str) -> None:
    """sum over routed experts x routing weights of the generic expert forward == the module's output."""
    dtype = torch.float32 if impl == "grouped_mm" else torch.float64  # grouped_mm has no float64 kernel
    model = _model(arch, scale_experts=True).to(dtype)
    model.config._experts_implementation = impl
    _, router, experts = _moe_block(model, 0)
    assert is_supported_experts(experts)
    experts.config._experts_implementation = impl
    hidden = torch.randn(40, H, dtype=dtype, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, weights, index = router(hidden)
        ref = experts(hidden, index, weights)
        got = combine_experts(experts, hidden, index, weights)
    assert ref.abs().mean() > 0.05  # not a vanishing output
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    assert len(index.unique()) == experts.down_proj.shape[0]  # every expert took part


def test_gpt_oss_layout_is_transposed_interleaved_and_biased() -> None:
    """The GPT-OSS expert matrix view is the transpose of the stored slice, and its activations are the
    interleaved, clamped SwiGLU with biases (written out here by hand)."""
    model = _model("gpt_oss", scale_experts=True).double()
    _, _, experts = _moe_block(model, 0)
    assert experts.is_transposed and experts.has_bias
    e = 2
    assert expert_matrix(experts, "gate_up_proj", e).shape == (96, H)  # (2I, H): (out, in)
    assert torch.equal(expert_matrix(experts, "down_proj", e), experts.down_proj[e].t())
    x = torch.randn(7, H, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 20  # clamps act
    gu = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
    gate, up = gu[:, ::2].clamp(max=experts.limit), gu[:, 1::2].clamp(-experts.limit, experts.limit)
    ref = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    with torch.no_grad():
        torch.testing.assert_close(expert_activations(experts, e, x), ref, rtol=1e-12, atol=1e-12)
    assert (gu[:, ::2] > experts.limit).any() and (gu[:, 1::2].abs() > experts.limit).any()


# --- pruning -----------------------------------------------------------------------------------------------


def _zeros_as_the_solver_prunes(name: str, w: torch.Tensor, method: str, pattern: str) -> None:
    """Exactly the solver's count of zeros in an (out, in) matrix at 50 % / 2:4 (in <= block_size)."""
    rows, cols = w.shape
    if pattern == "2:4":
        assert ((w.reshape(rows, cols // 4, 4) == 0).sum(-1) == 2).all(), name  # groups along in_features
    elif method == "wanda":  # per output row
        assert ((w == 0).sum(1) == round(cols * 0.5)).all(), name
    else:  # magnitude: per matrix; sparsegpt: per (rows, block) tile, one tile here
        assert int((w == 0).sum()) == round(rows * cols * 0.5), name


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("arch", ARCHS)
def test_prune_reaches_every_expert(arch: str, method: str, pattern: str) -> None:
    model = _model(arch)
    routers_before = {n: w.clone() for n, w in find_routers(model.model.layers[0], "x").items()}
    assert routers_before
    report = prune(
        model,
        _ids(),
        PruneConfig(method=method, pattern=pattern),
        device="cpu",
        batch_size=2,
        progress=False,
    )
    experts = _expert_matrices(model)
    assert len(experts) == 2 * 2 * _moe_block(model, 0)[2].down_proj.shape[0]
    for name, w in experts.items():
        _zeros_as_the_solver_prunes(name, w, method, pattern)
    reported = {r.name: r for r in report.layers}
    assert set(experts) <= set(reported)
    assert all(reported[n].shape == tuple(w.shape) for n, w in experts.items())
    if method == "sparsegpt":
        assert all(reported[n].loss is not None and reported[n].loss > 0 for n in experts)

    params, zeros = _block_matrices(model)
    assert (report.matrix_params, report.matrix_zero_params) == (params, zeros)
    assert report.block_sparsity == pytest.approx(zeros / params)
    assert 0.45 < report.block_sparsity < 0.5  # only the routers (E x H) stay dense
    assert report.to_dict()["block_sparsity"] == report.block_sparsity

    routers = {
        n: w for i in range(2) for n, w in find_routers(model.model.layers[i], f"model.layers.{i}").items()
    }
    assert len(routers) == 2
    dense = {d.name: d for d in report.dense_matrices}
    assert set(dense) == set(routers)
    assert all(d.reason == DENSE_ROUTER and d.params == routers[n].numel() for n, d in dense.items())
    for w_before, w_after in zip(
        routers_before.values(), find_routers(model.model.layers[0], "x").values(), strict=True
    ):
        assert torch.equal(w_before, w_after)
    assert report.uncalibrated == []
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_ids()).logits).all()


def _routed_stats(model: nn.Module, ids: torch.Tensor, arch: str) -> dict[str, dict[int, InputStats]]:
    """Layer-0 expert statistics from scratch: the MoE input captured by a hook, the router run by hand,
    and the activations that feed ``down_proj`` written out per architecture."""
    mlp, router, experts = _moe_block(model, 0)
    captured: list[torch.Tensor] = []
    handle = mlp.register_forward_pre_hook(lambda mod, args: captured.append(args[0].reshape(-1, H)))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    (hidden,) = captured
    with torch.no_grad():
        _, _, index = router(hidden)
    stats: dict[str, dict[int, InputStats]] = {"gate_up_proj": {}, "down_proj": {}}
    for e in range(experts.down_proj.shape[0]):
        x = hidden[(index == e).any(dim=1)]  # the tokens routed to expert e
        assert 0 < x.shape[0] < hidden.shape[0]
        with torch.no_grad():
            if arch == "gpt_oss":
                gu = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
                gate = gu[:, ::2].clamp(max=experts.limit)
                act = (
                    (gu[:, 1::2].clamp(-experts.limit, experts.limit) + 1)
                    * gate
                    * torch.sigmoid(gate * 1.702)
                )
            else:
                gate, up = (x @ experts.gate_up_proj[e].t()).chunk(2, dim=-1)
                act = F.silu(gate) * up
        for param, inputs in (("gate_up_proj", x), ("down_proj", act)):
            stats[param][e] = InputStats(inputs.shape[1], hessian=True)
            stats[param][e].add(inputs)
    return stats


@pytest.mark.parametrize(
    "arch,method,pattern",
    [
        ("mixtral", "wanda", "unstructured"),
        ("mixtral", "sparsegpt", "unstructured"),
        ("gpt_oss", "wanda", "2:4"),
        ("gpt_oss", "sparsegpt", "unstructured"),
        ("qwen3_moe", "sparsegpt", "2:4"),
    ],
)
def test_each_expert_is_pruned_from_its_own_routed_tokens(arch: str, method: str, pattern: str) -> None:
    """Layer 0's expert matrices equal the solver run directly on each expert's weight with statistics of
    exactly the tokens routed to it."""
    ids = _ids(4, 16)
    dense = _model(arch)
    config = PruneConfig(method=method, pattern=pattern)
    stats = _routed_stats(dense, ids, arch)
    pruned = _model(arch)
    prune(pruned, ids, config, device="cpu", batch_size=4, progress=False)
    solver = get_solver(method)
    extra = {"block_size": config.block_size, "damp": config.damp} if method == "sparsegpt" else {}
    _, _, dense_experts = _moe_block(dense, 0)
    _, _, pruned_experts = _moe_block(pruned, 0)
    for param, per_expert in stats.items():
        for e, st in per_expert.items():
            w = expert_matrix(dense_experts, param, e)
            ref = solver(w.clone(), st, sparsity=config.sparsity, pattern=config.nm, **extra).weight
            got = expert_matrix(pruned_experts, param, e)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=f"{param}[{e}]")
            assert torch.equal(got == 0, ref == 0), f"{param}[{e}]"


@pytest.mark.parametrize("policy", ["magnitude", "dense"])
def test_expert_without_tokens_follows_uncalibrated(policy: str, caplog: pytest.LogCaptureFixture) -> None:
    model = _model("gpt_oss")
    _, router, experts = _moe_block(model, 0)
    with torch.no_grad():
        router.bias[3] = -1e4  # expert 3 of layer 0 is never chosen
    before = {p: expert_matrix(experts, p, 3).clone() for p in ("gate_up_proj", "down_proj")}
    names = [f"model.layers.0.mlp.experts.{p}[3]" for p in ("gate_up_proj", "down_proj")]
    config = PruneConfig(method="sparsegpt", uncalibrated=policy)
    with caplog.at_level(logging.WARNING, logger="oneshot.pruner"):
        report = prune(model, _ids(), config, device="cpu", progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(all(n in m for n in names) for m in warnings), warnings
    reported = {r.name: r for r in report.layers}
    dense = {d.name: d for d in report.dense_matrices}
    if policy == "magnitude":
        assert report.uncalibrated == names
        for p, name in zip(before, names, strict=True):
            ref = get_solver("magnitude")(before[p], None, sparsity=0.5).weight
            assert torch.equal(expert_matrix(experts, p, 3), ref)
            assert reported[name].loss is None and reported[name].sparsity == 0.5
            assert name not in dense
    else:
        assert report.uncalibrated == []
        for p, name in zip(before, names, strict=True):
            assert torch.equal(expert_matrix(experts, p, 3), before[p])
            assert dense[name] == DenseMatrix(name, before[p].numel(), DENSE_UNCALIBRATED)
            assert name not in reported
    # the other experts of the layer still have tokens and are pruned from them
    assert reported["model.layers.0.mlp.experts.down_proj[2]"].loss is not None
    params, zeros = _block_matrices(model)
    assert report.block_sparsity == pytest.approx(zeros / params)


def test_ignore_keeps_expert_tensors_dense() -> None:
    model = _model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = PruneConfig(
        method="wanda",
        ignore=("*.0.mlp.experts*", "*1.mlp.experts.down_proj[[]2]"),
    )
    report = prune(model, _ids(), config, device="cpu", progress=False)
    after = model.state_dict()
    for k in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        assert torch.equal(before[k], after[k])
    assert torch.equal(
        before["model.layers.1.mlp.experts.down_proj"][2], after["model.layers.1.mlp.experts.down_proj"][2]
    )
    assert not torch.equal(
        before["model.layers.1.mlp.experts.down_proj"][1], after["model.layers.1.mlp.experts.down_proj"][1]
    )
    ignored = {d.name: d.params for d in report.dense_matrices if d.reason == DENSE_IGNORED}
    assert ignored == {
        "model.layers.0.mlp.experts.gate_up_proj": 4 * 96 * H,
        "model.layers.0.mlp.experts.down_proj": 4 * H * 48,
        "model.layers.1.mlp.experts.down_proj[2]": H * 48,
    }
    assert not any(r.name.startswith("model.layers.0.mlp.experts") for r in report.layers)
    params, zeros = _block_matrices(model)
    assert report.block_sparsity == pytest.approx(zeros / params) and report.block_sparsity < 0.3


def test_shared_expert_linears_get_statistics_and_gates_stay_dense() -> None:
    """Qwen2-MoE: fused experts, a shared-expert MLP of nn.Linear, a router and a 1-row shared-expert gate."""
    torch.manual_seed(0)
    cfg = tf.Qwen2MoeConfig(
        **_common(),
        intermediate_size=64,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=64,
        num_experts=4,
    )
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    gate_before = model.model.layers[0].mlp.shared_expert_gate.weight.clone()
    report = prune(model, _ids(), PruneConfig(method="sparsegpt"), device="cpu", progress=False)
    reported = {r.name: r for r in report.layers}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        r = reported[f"model.layers.0.mlp.shared_expert.{proj}"]
        assert r.loss is not None and r.sparsity == 0.5
    assert torch.equal(model.model.layers[0].mlp.shared_expert_gate.weight, gate_before)
    dense = {d.name: d.reason for d in report.dense_matrices}
    assert dense == {
        f"model.layers.{i}.mlp.{g}.weight": DENSE_ROUTER
        for i in range(2)
        for g in ("gate", "shared_expert_gate")
    }
    assert report.uncalibrated == []
    params, zeros = _block_matrices(model)
    assert report.block_sparsity == pytest.approx(zeros / params)


# ------------------------------------------------------------------------------------- the whole job


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_cli_prunes_experts_and_reports_what_stays_dense(
    arch: str, tmp_path, tiny_tokenizer, calib_txt, data_dir, capsys: pytest.CaptureFixture[str]
) -> None:
    """`oneshot prune` on a saved MoE checkpoint: summary, record and card state the sparsity over every
    block matrix and the routers left dense; `oneshot push --dry-run` verifies the expert slices."""
    import json

    from oneshot.cli import main
    from oneshot.verify import _measured_block_sparsity, _measured_sparsity

    folder = tmp_path / arch
    config = _config(arch)
    config.vocab_size = len(tiny_tokenizer)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    out = tmp_path / "out"
    argv = [
        "prune",
        "--model",
        str(folder),
        "--method",
        "wanda",
        "--pattern",
        "2:4",
        "--calib",
        str(calib_txt),
    ]
    argv += ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "1", "--data-dir", str(data_dir)]
    assert main([*argv, "--out", str(out), "-q"]) == 0, capsys.readouterr().err
    summary = capsys.readouterr().out
    assert "all block matrices" in summary and "router (kept dense)" in summary, summary
    record = json.loads((out / "oneshot.json").read_text())["prune"]
    names = [x["name"] for x in record["layers"]]
    assert any(n.endswith("experts.down_proj[3]") for n in names)
    assert 0.49 < record["block_sparsity"] < 0.5 == record["sparsity"]
    assert {d["reason"] for d in record["dense_matrices"]} == {DENSE_ROUTER}
    card = (out / "README.md").read_text()
    assert "block_sparsity:" in card and "all block weight matrices" in card and "router (kept dense)" in card
    # transformers may save fused experts per expert (Mixtral's legacy w1/w2/w3 names): the verification of
    # `oneshot push` then checks the block sparsity over whatever names are on disk
    where = dict.fromkeys(_keys(out), "model.safetensors")
    fused_on_disk = any(n.endswith("experts.down_proj") for n in where)
    measured = _measured_sparsity(out, names, where)
    assert measured == (pytest.approx(0.5, abs=1e-12) if fused_on_disk else None)
    block, _ = _measured_block_sparsity(out, names, where)
    assert block == pytest.approx(record["block_sparsity"], abs=1e-12)
    assert main(["push", str(out), "--repo-id", "me/moe", "--dry-run", "-q"]) == 0, capsys.readouterr().err
    # and plain transformers loads the experts back pruned
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out)
    experts = find_experts(reloaded.model, "model")["model.layers.1.mlp.experts"]
    assert int((experts.down_proj == 0).sum()) == experts.down_proj.numel() // 2


def _keys(folder) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        return list(fh.keys())


def test_config_checks_see_the_experts_before_loading() -> None:
    """`oneshot.checks` on a weightless (meta) Mixtral: --ignore and N:M checks cover the expert matrices."""
    from oneshot.checks import ConfigCheckError, check_layers, model_skeleton, prunable_layers

    skeleton = model_skeleton(_config("mixtral"))
    assert skeleton is not None and next(skeleton.parameters()).device.type == "meta"
    every = prunable_layers(skeleton)
    assert "model.layers.1.mlp.experts.gate_up_proj[3]" in every and every[
        "model.layers.1.mlp.experts.gate_up_proj[3]"
    ] == (96, H)
    assert not any("gate." in n and "experts" not in n for n in every)  # routers are not prunable
    assert all("experts" not in n for n in prunable_layers(skeleton, ("*experts*",)))
    with pytest.raises(ConfigCheckError, match="keeps all"):
        check_layers(skeleton, PruneConfig(ignore=("*",)))
    with pytest.raises(ConfigCheckError, match="multiple of 5"):  # hidden 32, expert intermediate 48
        check_layers(skeleton, PruneConfig(pattern="2:5", ignore=("*self_attn*",)))
