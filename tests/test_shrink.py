"""`oneshot.shrink` on tiny random models of every supported architecture: the shrunk model saves, reloads
with plain transformers to the same logits, has the target shapes, and the re-fits are the least-squares
solutions of a float64 re-derivation."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from torch import nn

from oneshot.config import ConfigError, ShrinkConfig
from oneshot.shrink import ShrinkError, check_shrink, shrink
from oneshot.walker import find_blocks, get_weight

V = 96


def _common(**over: object) -> dict:
    base: dict = dict(
        vocab_size=V,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    base.update(over)
    return base


def _config(arch: str) -> tf.PretrainedConfig:
    if arch == "llama":  # GQA, untied
        return tf.LlamaConfig(**_common(intermediate_size=96, tie_word_embeddings=False))
    if arch == "llama_bias":  # biases on q/k/v/o and the MLP, tied embeddings
        return tf.LlamaConfig(
            **_common(intermediate_size=96, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
        )
    if arch == "qwen2":  # q/k/v biases, o_proj without
        return tf.Qwen2Config(**_common(intermediate_size=96, tie_word_embeddings=True))
    if arch == "gemma3":  # layer types, q/k norms, explicit head_dim
        return tf.Gemma3TextConfig(
            **_common(
                intermediate_size=96,
                head_dim=16,
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            )
        )
    if arch == "gpt2":  # Conv1D, biases everywhere, fused attention
        return tf.GPT2Config(
            vocab_size=V,
            n_embd=64,
            n_layer=4,
            n_head=4,
            n_positions=128,
            n_inner=96,
            bos_token_id=0,
            eos_token_id=1,
        )
    if arch == "mixtral":
        return tf.MixtralConfig(**_common(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2))
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **_common(
                head_dim=8,
                intermediate_size=64,
                moe_intermediate_size=48,
                num_experts=6,
                num_experts_per_tok=2,
            )
        )
    if arch == "gpt_oss":
        return tf.GptOssConfig(
            **_common(
                head_dim=8,
                intermediate_size=48,
                num_local_experts=4,
                num_experts_per_tok=2,
                layer_types=["sliding_attention", "full_attention"] * 2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            )
        )
    raise KeyError(arch)


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_config(arch), attn_implementation="eager")
    # random init leaves biases at zero: give them values so that folding into them is exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                p.normal_(0, 0.1)
    return model.eval()


def _ids(n: int = 6, seqlen: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, V, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _reload_equal(model: nn.Module, tmp_path, ids: torch.Tensor) -> nn.Module:
    model.save_pretrained(tmp_path)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = again(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    return again


DENSE_ARCHS = ["llama", "llama_bias", "qwen2", "gemma3", "gpt2"]


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_mlp_width_shrinks_reloads_and_equals(arch: str, tmp_path) -> None:
    model = _model(arch)
    report = shrink(model, _ids(), ShrinkConfig(intermediate_size=40), device="cpu", progress=False)
    again = _reload_equal(model, tmp_path, _ids(2, 16, seed=5))
    cfg = again.config
    assert (cfg.n_inner if arch == "gpt2" else cfg.intermediate_size) == 40
    _, blocks = find_blocks(again)
    mlps = [r for r in report.removals if r.kind == "mlp channels"]
    assert len(mlps) == 4 and all(r.after == 40 and len(r.removed) == 56 for r in mlps)
    for block in blocks:
        consumer = block.mlp.c_proj if arch == "gpt2" else block.mlp.down_proj
        assert get_weight(consumer).shape[1] == 40
    assert report.params_after < report.params_before
    assert report.config_changes["n_inner" if arch == "gpt2" else "intermediate_size"] == [96, 40]


@pytest.mark.parametrize("arch", ["llama", "llama_bias", "qwen2", "gemma3", "gpt_oss"])
def test_kv_groups_shrink_reloads_and_equals(arch: str, tmp_path) -> None:
    model = _model(arch)
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    report = shrink(model, _ids(), ShrinkConfig(num_key_value_heads=1), device="cpu", progress=False)
    again = _reload_equal(model, tmp_path, _ids(2, 16, seed=5))
    assert again.config.num_key_value_heads == 1
    assert again.config.num_attention_heads == heads // kv
    head_dim = again.config.head_dim
    _, blocks = find_blocks(again)
    for block in blocks:
        assert block.self_attn.k_proj.weight.shape[0] == head_dim
        assert block.self_attn.q_proj.weight.shape[0] == heads // kv * head_dim
    assert all(r.after == 1 and len(r.removed) == kv - 1 for r in report.removals if r.kind == "kv groups")


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "gpt_oss"])
def test_drop_layers_updates_per_layer_lists(arch: str, tmp_path) -> None:
    model = _model(arch)
    types_before = list(getattr(model.config, "layer_types", None) or [])
    report = shrink(model, _ids(), ShrinkConfig(drop_layers=2), device="cpu", progress=False)
    assert len(report.dropped_layers) == 2 and len(report.layer_scores) == 4
    kept = [i for i in range(4) if i not in report.dropped_layers]
    # the dropped blocks are those that change their input least
    assert max(report.layer_scores[i] for i in report.dropped_layers) <= min(
        report.layer_scores[i] for i in kept
    )
    again = _reload_equal(model, tmp_path, _ids(2, 16, seed=5))
    assert again.config.num_hidden_layers == 2
    if types_before:
        assert again.config.layer_types == [types_before[i] for i in kept]


def test_generate_after_drop_uses_renumbered_cache(tmp_path) -> None:
    model = _model("llama")
    shrink(model, _ids(), ShrinkConfig(drop_layers=1, intermediate_size=64), device="cpu", progress=False)
    again = _reload_equal(model, tmp_path, _ids(1, 8))
    prompt = _ids(1, 8, seed=9)
    with torch.no_grad():
        a = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        b = again.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_experts_shrink_reloads_and_equals(arch: str, tmp_path) -> None:
    model = _model(arch)
    before = model.config.num_local_experts if arch != "qwen3_moe" else model.config.num_experts
    report = shrink(model, _ids(), ShrinkConfig(num_experts=2), device="cpu", progress=False)
    again = _reload_equal(model, tmp_path, _ids(2, 16, seed=5))
    after = again.config.num_local_experts if arch != "qwen3_moe" else again.config.num_experts
    assert after == 2
    removals = [r for r in report.removals if r.kind == "experts"]
    assert len(removals) == 4 and all(r.before == before and len(r.removed) == before - 2 for r in removals)


def test_experts_removed_are_the_least_used() -> None:
    """An expert whose output is zero carries no router-weighted output: it goes first, in every layer."""
    model = _model("mixtral")
    with torch.no_grad():
        for block in find_blocks(model)[1]:
            block.mlp.experts.down_proj[2].zero_()
    report = shrink(model, _ids(), ShrinkConfig(num_experts=3), device="cpu", progress=False)
    removals = [r for r in report.removals if r.kind == "experts"]
    assert [r.removed for r in removals] == [[2]] * 4
    assert all(sum(r.extra["tokens_per_expert"]) == 6 * 24 * 2 for r in removals)  # every token, top-2


@pytest.mark.parametrize(
    ("arch", "mlp_bias", "damp"),
    [
        ("llama_bias", "auto", 0.0),
        ("llama_bias", "auto", 0.05),
        ("llama", "auto", 0.05),
        ("llama", "keep", 0.05),
    ],
)
def test_mlp_refit_is_the_float64_least_squares_solution(arch: str, mlp_bias: str, damp: float) -> None:
    """Last block's down_proj (its inputs do not depend on other shrunk layers' re-fits once the block's own
    producers are sliced): the re-fitted weight solves min ||X W^T - X_K W'^T||^2 + lam tokens ||W'||^2, with
    lam = damp * mean of the kept inputs' second moments. With a bias (the model's own, or the one that
    ``mlp_bias="auto"`` switches on for a Llama without): centred, an unpenalised intercept; ``keep``: none."""
    model = _model(arch).double()
    ids = _ids()
    last = find_blocks(model)[1][-1]
    # inputs of the last down_proj as the shrink sees them: the earlier blocks are shrunk first
    config = ShrinkConfig(
        intermediate_size=40, damp=damp, score="activation", refit_target="layer", mlp_bias=mlp_bias
    )
    w0 = last.mlp.down_proj.weight.detach().clone()
    b0 = last.mlp.down_proj.bias.detach().clone() if last.mlp.down_proj.bias is not None else 0.0
    captured: list[torch.Tensor] = []
    handle = last.mlp.down_proj.register_forward_pre_hook(
        lambda _m, a: captured.append(a[0].detach().reshape(-1, a[0].shape[-1]).clone())
    )
    try:
        report = shrink(model, ids, config, device="cpu", batch_size=100, progress=False)
    finally:
        handle.remove()
    x = captured[0].double()  # first call: the statistics pass of the last block, still 96 wide
    assert x.shape[1] == 96
    removal = [r for r in report.removals if r.kind == "mlp channels"][-1]
    keep = torch.tensor(sorted(set(range(96)) - set(removal.removed)))
    with_bias = arch == "llama_bias" or mlp_bias == "auto"
    assert model.config.mlp_bias is with_bias
    assert ("mlp_bias" in report.config_changes) is (arch == "llama" and mlp_bias == "auto")
    # reference: ridge lstsq (ridge rows appended), float64; with an unpenalised intercept on centred data
    target = x @ w0.T + b0  # (tokens, out)
    xk = x[:, keep]
    xc, tc = (xk - xk.mean(dim=0), target - target.mean(dim=0)) if with_bias else (xk, target)
    lam = damp * float(xc.pow(2).mean(dim=0).mean())
    k, tokens = len(keep), x.shape[0]
    design = torch.cat([xc, (lam * tokens) ** 0.5 * torch.eye(k, dtype=x.dtype)])
    rhs = torch.cat([tc, torch.zeros(k, target.shape[1], dtype=x.dtype)])
    weight = torch.linalg.lstsq(design, rhs).solution.T  # (out, k)
    torch.testing.assert_close(last.mlp.down_proj.weight.detach(), weight, rtol=1e-6, atol=1e-8)
    bias = target.mean(dim=0) - weight @ xk.mean(dim=0) if with_bias else torch.zeros(target.shape[1])
    if with_bias:
        torch.testing.assert_close(last.mlp.down_proj.bias.detach(), bias, rtol=1e-6, atol=1e-8)
        assert last.mlp.up_proj.bias.shape == (40,)
        assert arch == "llama_bias" or not last.mlp.up_proj.bias.any()  # switched on: zero producer biases
    else:
        assert last.mlp.down_proj.bias is None
    # the reported loss is the residual of that fit per token
    resid = target - xk @ weight.T - bias
    assert removal.loss == pytest.approx(float(resid.pow(2).sum() / tokens), rel=1e-6)


def test_dense_target_pulls_the_block_back_to_the_unshrunk_output() -> None:
    """The first block (whose input is the unshrunk model's), KV groups and MLP channels removed: re-fitting down_proj to the unshrunk block's output
    (the default) leaves a smaller block output error than re-fitting it to its own output, which cannot
    undo the attention's error (a mutation that drops the correction term fails here)."""
    errors = {}
    for target in ("dense", "layer"):
        model = _model("llama")
        config = ShrinkConfig(intermediate_size=48, num_key_value_heads=2, damp=0.0, refit_target=target)
        report = shrink(model, _ids(8, 32), config, device="cpu", progress=False)
        errors[target] = report.blocks[0].output_error
    assert errors["dense"] < 0.9 * errors["layer"]


def test_auto_score_keeps_the_better_of_both() -> None:
    model = _model("llama")
    report = shrink(model, _ids(), ShrinkConfig(intermediate_size=48), device="cpu", progress=False)
    for r in (r for r in report.removals if r.kind == "mlp channels"):
        assert set(r.losses) == {"obs", "activation"}
        assert r.loss == pytest.approx(min(r.losses.values()), rel=1e-9)
        assert r.score == min(r.losses, key=lambda k: r.losses[k])


def test_refit_beats_slicing_without_it() -> None:
    """Removing channels and re-fitting leaves a smaller block output error than removing the same channels
    without the re-fit (a mutation that skips the re-fit fails here)."""
    ids = _ids(8, 32)
    model = _model("llama")
    ref = _model("llama")
    with torch.no_grad():
        dense_logits = ref(input_ids=ids).logits
    report = shrink(model, ids, ShrinkConfig(intermediate_size=48), device="cpu", progress=False)
    with torch.no_grad():
        for block, removal in zip(
            find_blocks(ref)[1], [r for r in report.removals if r.kind == "mlp channels"], strict=False
        ):
            keep = torch.tensor(sorted(set(range(96)) - set(removal.removed)))
            for lin in (block.mlp.gate_proj, block.mlp.up_proj):
                lin.weight.data = lin.weight.data[keep]
            block.mlp.down_proj.weight.data = block.mlp.down_proj.weight.data[:, keep]
        sliced = ref(input_ids=ids).logits
        refitted = model(input_ids=ids).logits
    assert (refitted - dense_logits).pow(2).mean() < 0.8 * (sliced - dense_logits).pow(2).mean()


def test_params_budget_is_met_and_reported(tmp_path) -> None:
    model = _model("llama")
    report = shrink(model, _ids(), ShrinkConfig(params=0.6), device="cpu", progress=False)
    assert report.choice is not None
    assert report.block_params_after <= 0.6 * report.block_params_before
    assert report.block_params_after == report.choice.block_params
    _reload_equal(model, tmp_path, _ids(2, 16, seed=5))


@pytest.mark.parametrize("mlp_bias", ["keep", "auto"])
def test_params_budget_counts_the_biases_a_width_cut_adds(mlp_bias: str, tmp_path) -> None:
    """One block (nothing to drop): the budget is met by narrower widths, and with ``mlp_bias="auto"`` the
    biases that the cut switches on are counted in the budget and the record."""
    torch.manual_seed(0)
    config = _config("llama")
    config.num_hidden_layers = 1
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    report = shrink(model, _ids(), ShrinkConfig(params=0.7, mlp_bias=mlp_bias), device="cpu", progress=False)
    choice = report.choice
    assert choice is not None and choice.drop == [] and choice.intermediate_size is not None
    assert report.block_params_after == choice.block_params <= 0.7 * report.block_params_before
    assert model.config.mlp_bias is (mlp_bias == "auto")
    _reload_equal(model, tmp_path, _ids(2, 16, seed=5))


def test_chooser_prices_a_run_of_dropped_blocks_by_skipping_it_whole() -> None:
    """Synthetic costs: two adjacent blocks are each cheap to skip alone but expensive together; a budget that
    needs two blocks gone then drops two apart, and the predicted cost is the kept blocks' width costs plus
    each dropped run's span cost (a chooser that sums single-block costs drops the neighbours)."""
    from oneshot.shrink import _Survey, block_sites, choose_budget

    model = _model("llama")
    blocks = find_blocks(model)[1]
    sites = [block_sites(b, f"layers.{i}", model.config) for i, b in enumerate(blocks)]
    n = len(blocks)
    span = [[1.0 * (j - i) if j > i else 0.0 for j in range(n + 1)] for i in range(n + 1)]
    span[1][2] = span[2][3] = 0.1  # blocks 1 and 2 alone: cheap
    span[1][3] = 5.0  # both together: expensive
    span[0][1], span[3][4] = 0.5, 0.6
    expensive_width = [[0.0] + [100.0] * 200 for _ in range(n)]  # any width cut costs more than any drop
    survey = _Survey(
        drop_cost=[0.0] * n,
        drop_error=[span[i][i + 1] for i in range(n)],
        mlp_curve=expensive_width,
        attn_curve=[[0.0] + [100.0] * 4 for _ in range(n)],
        span_error=span,
    )
    choice = choose_budget(survey, sites, blocks, fraction=0.5)
    assert choice.intermediate_size is None and choice.num_key_value_heads is None
    # {0, 2}: 0.5 + 0.1 beats {1, 3}: 0.1 + 0.6 and the neighbours {1, 2}, 0.1 + 0.1 alone but 5.0 together
    assert choice.drop == [0, 2] and choice.predicted_cost == pytest.approx(0.6)


def test_mlp_bias_option_is_parsed_and_checked() -> None:
    import argparse

    from oneshot.cli.shrink import add_parser, configs_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    config, _ = configs_from_args(
        parser.parse_args(["shrink", "--intermediate-size", "8", "--mlp-bias", "auto"])
    )
    assert config.mlp_bias == "auto"
    config, _ = configs_from_args(parser.parse_args(["shrink", "--intermediate-size", "8"]))
    assert config.mlp_bias == "keep" and config.damp == 0.001
    with pytest.raises(ConfigError, match="mlp_bias"):
        ShrinkConfig(intermediate_size=8, mlp_bias="on")


@pytest.mark.parametrize(
    ("arch", "kwargs", "words"),
    [
        ("llama", {"intermediate_size": 96}, "not smaller"),
        ("llama", {"intermediate_size": 500}, "not smaller"),
        ("llama", {"num_key_value_heads": 4}, "not smaller"),
        ("llama", {"drop_layers": 4}, "all 4"),
        ("llama", {"num_experts": 2}, "no mixture-of-experts"),
        ("mixtral", {"num_experts": 1}, "top-k"),
        ("mixtral", {"intermediate_size": 16}, "--num-experts"),
        ("gpt2", {"num_key_value_heads": 1}, "cannot be removed"),
    ],
)
def test_bad_targets_are_refused_before_any_work(arch: str, kwargs: dict, words: str) -> None:
    model = _model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ShrinkError, match=words):
        check_shrink(ShrinkConfig(**kwargs), model)
    with pytest.raises(ShrinkError, match=words):
        shrink(model, _ids(), ShrinkConfig(**kwargs), device="cpu", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"intermediate_size": 0}, {"drop_layers": -1}, {"params": 1.0}, {"params": 0.5, "drop_layers": 2}],
)
def test_bad_shrink_configs(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        ShrinkConfig(**kwargs)


def test_cli_writes_a_run_folder_that_loads_verifies_and_reports(
    tmp_path, tiny_llama_dir, calib_txt, data_dir, capsys
) -> None:
    from huggingface_hub import ModelCard

    from oneshot.cli import main
    from oneshot.runfolder import RunRecord

    out = tmp_path / "shrunk"
    argv = [
        "shrink",
        "--model",
        str(tiny_llama_dir),
        "--calib",
        str(calib_txt),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--intermediate-size",
        "64",
        "--num-key-value-heads",
        "1",
        "--drop-layers",
        "1",
        "--mlp-bias",
        "auto",
        "--eval-windows",
        "1",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "-q",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "intermediate_size" in printed and "128 -> 64" in printed and "dense" in printed
    record = RunRecord.load(out)
    cfg, rep = record.shrunk
    assert record.kind == "shrink" and record.config is None and record.prune is None
    assert cfg.intermediate_size == 64 and rep.layers_after == 1
    assert rep.config_changes == {
        "num_hidden_layers": [2, 1],
        "intermediate_size": [128, 64],
        "num_attention_heads": [4, 2],
        "num_key_value_heads": [2, 1],
        "mlp_bias": [False, True],  # switched on: the removed channels' mean is in down_proj's bias
    }
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.mlp_bias is True and model.model.layers[0].mlp.down_proj.bias is not None
    assert model.config.intermediate_size == 64 and model.config.num_hidden_layers == 1
    assert model.config.num_key_value_heads == 1
    assert sum(p.numel() for p in model.parameters()) == rep.params_after < rep.params_before
    card = ModelCard.load(out / "README.md")
    assert {"shrunk", "structured-pruning"} <= set(card.data.tags)
    assert card.data.to_dict()["oneshot"]["params_after"] == rep.params_after
    assert record.quick_eval.pruned is not None and (out / "report" / "report.md").is_file()
    # the upload check accepts it, and refuses it once config.json no longer matches the record
    assert main(["push", str(out), "--repo-id", "me/x", "--dry-run"]) == 0
    assert f"{rep.params_after:,} parameters" in capsys.readouterr().out
    capsys.readouterr()
    # a record that claims other figures than the checkpoint's is refused (its hashes still match)
    data = json.loads((out / "oneshot.json").read_text())
    data["shrink"]["params_after"] += 1
    (out / "oneshot.json").write_text(json.dumps(data))
    assert main(["push", str(out), "--repo-id", "me/x", "--dry-run"]) == 2
    assert "the files do not describe the same model" in capsys.readouterr().err


def test_best_drop_sets_match_brute_force() -> None:
    """The dynamic program over blocks finds, for every number of dropped blocks, the cheapest set: kept
    blocks' costs plus one span cost per maximal run of dropped blocks (checked against every subset)."""
    import itertools
    import random

    from oneshot.shrink import best_drop_sets

    rng = random.Random(0)
    n = 7
    span = [
        [rng.uniform(0.1, 1.0) * (j - i) ** 1.5 if j > i else 0.0 for j in range(n + 1)] for i in range(n + 1)
    ]
    keep = [rng.uniform(0.0, 0.5) for _ in range(n)]

    def cost(drop: tuple[int, ...]) -> float:
        total = sum(keep[k] for k in range(n) if k not in drop)
        runs: list[list[int]] = []
        for k in drop:
            if runs and runs[-1][-1] == k - 1:
                runs[-1].append(k)
            else:
                runs.append([k])
        return total + sum(span[r[0]][r[-1] + 1] for r in runs)

    best = best_drop_sets(span, keep)
    assert len(best) == n
    for d in range(n):
        expected = min(cost(c) for c in itertools.combinations(range(n), d))
        assert best[d][0] == pytest.approx(expected, rel=1e-12)
        assert len(best[d][1]) == d and cost(tuple(best[d][1])) == pytest.approx(expected, rel=1e-12)


def test_weighted_moments_give_weighted_least_squares_losses() -> None:
    """With per-token weights (the --params chooser's 1 / ||stream_t||^2), the statistics give every re-fit
    the loss sum_t w_t ||D (x_t - mean_w)||^2 / tokens, centred about the weighted mean (float64 check)."""
    from oneshot.shrink import _Moments

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64) + 3.0
    w = torch.rand(50, generator=g, dtype=torch.float64) + 0.1
    m = _Moments(6, torch.device("cpu"))
    m.add(x[:20], w[:20])
    m.add(x[20:], w[20:])
    mean = (w[:, None] * x).sum(dim=0) / w.sum()
    torch.testing.assert_close(m.mean, mean)
    d = torch.randn(3, 6, generator=g, dtype=torch.float64)
    for centred, xs in ((False, x), (True, x - mean)):
        expected = float((w * (xs @ d.T).pow(2).sum(dim=1)).sum() / 50)
        assert float(((d @ m.hessian(centred)) * d).sum()) == pytest.approx(expected, rel=1e-10)
