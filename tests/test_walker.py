"""The block walker on tiny random models of every supported architecture."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf
from torch import nn

from oneshot import PruneConfig, prune
from oneshot.pruner import DENSE_UNCALIBRATED
from oneshot.runfolder import DenseMatrix
from oneshot.solvers import get_solver
from oneshot.stats import InputStats
from oneshot.walker import (
    InputCollector,
    capture_block_calls,
    find_blocks,
    find_linears,
    get_weight,
    is_sink_layer,
    run_block,
)

V = 128
COMMON = dict(vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _arch(name: str, layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    types = (["sliding_attention", "full_attention"] * layers)[:layers]
    att = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **COMMON,
    )
    if name == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**att))
    if name == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**att, sliding_window=None))
    if name == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**att))
    if name == "gemma":
        return tf.GemmaForCausalLM(tf.GemmaConfig(**att, head_dim=16))
    if name == "gemma2":
        # sliding window shorter than the sequence: the two blocks get different masks
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**att, head_dim=16, sliding_window=8, layer_types=types))
    if name == "gemma3":
        return tf.Gemma3ForCausalLM(
            tf.Gemma3TextConfig(**att, head_dim=16, sliding_window=8, layer_types=types)
        )
    if name == "phi3":
        return tf.Phi3ForCausalLM(tf.Phi3Config(**att))
    if name == "opt":
        return tf.OPTForCausalLM(
            tf.OPTConfig(
                hidden_size=64,
                ffn_dim=128,
                num_hidden_layers=layers,
                num_attention_heads=4,
                word_embed_proj_dim=64,
                max_position_embeddings=128,
                **COMMON,
            )
        )
    if name == "gpt2":
        return tf.GPT2LMHeadModel(
            tf.GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=128, **COMMON)
        )
    raise KeyError(name)


ARCHS = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3", "phi3", "opt", "gpt2"]


def _ids(n: int = 5, seqlen: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, V, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_replay_reproduces_the_models_own_hidden_states(arch: str) -> None:
    """Capturing block calls and replaying the blocks one by one gives the model's own hidden states.

    Three blocks, so that the output of a block with a different mask/rotary type than block 0 is checked
    (the last entry of hidden_states is taken after the final norm)."""
    model = _arch(arch, layers=3).eval()
    ids = _ids()
    _, blocks = find_blocks(model)
    assert len(blocks) == 3
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        batches = list(ids.split(2))
        hidden, calls = capture_block_calls(model, blocks, batches, torch.device("cpu"), torch.device("cpu"))
        # the embedding output feeds block 0
        torch.testing.assert_close(torch.cat(hidden), ref[0], rtol=1e-5, atol=1e-5)
        for i, block in enumerate(blocks):
            hidden = [run_block(block, h, calls[i][b], torch.device("cpu")) for b, h in enumerate(hidden)]
            if i < len(blocks) - 1:  # the last entry of hidden_states is after the final norm
                torch.testing.assert_close(torch.cat(hidden), ref[i + 1], rtol=1e-4, atol=1e-5)
    assert all(type(b).__name__ != "_Recorder" for b in blocks)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_every_architecture_2of4(arch: str, method: str) -> None:
    model = _arch(arch).eval()
    emb_before = model.get_input_embeddings().weight.clone()
    head_before = model.get_output_embeddings().weight.clone()
    ids = _ids()
    report = prune(
        model,
        ids,
        PruneConfig(method=method, pattern="2:4"),
        batch_size=2,
        progress=False,
    )
    name, blocks = find_blocks(model)
    linears = {n: m for i, b in enumerate(blocks) for n, m in find_linears(b, f"{name}.{i}").items()}
    assert {r.name for r in report.layers} == set(linears)
    assert len(linears) >= 4 * len(blocks)
    for lname, layer in linears.items():
        w = get_weight(layer)
        zeros = (w.reshape(-1, 4) == 0).sum(dim=1)
        assert (zeros >= 2).all(), lname
    assert abs(report.sparsity - 0.5) < 1e-3
    torch.testing.assert_close(model.get_input_embeddings().weight, emb_before, rtol=0, atol=0)
    torch.testing.assert_close(model.get_output_embeddings().weight, head_before, rtol=0, atol=0)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert len(report.blocks) == 2 and all(
        b.output_error is not None and b.output_error > 0 for b in report.blocks
    )


def _reference_block(
    model: nn.Module, block_index: int, ids: torch.Tensor, batch_size: int, config: PruneConfig
) -> dict[str, torch.Tensor]:
    """Run the solver directly on the inputs that each Linear of one block sees in ``model`` (the q/k/v
    inputs' first tokens weighted by ``config.sink_weight``, as the walk does by default)."""
    name, blocks = find_blocks(model)
    layers = find_linears(blocks[block_index], f"{name}.{block_index}")
    stats = {
        n: InputStats(
            get_weight(m).shape[1],
            hessian=True,
            first_token_weight=config.sink_weight if is_sink_layer(n) else 0.0,
        )
        for n, m in layers.items()
    }
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: stats[n].add(args[0])) for n, m in layers.items()
    ]
    try:
        with torch.no_grad():
            for batch in ids.split(batch_size):
                model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    solver = get_solver(config.method)
    extra = {"block_size": config.block_size, "damp": config.damp} if config.method == "sparsegpt" else {}
    return {
        n: solver(
            get_weight(m).clone(), stats[n], sparsity=config.sparsity, pattern=config.nm, **extra
        ).weight
        for n, m in layers.items()
    }


@pytest.mark.parametrize(
    "method,pattern,sink",
    [
        ("sparsegpt", "unstructured", None),
        ("wanda", "2:4", None),
        ("sparsegpt", "4:8", None),
        ("sparsegpt", "unstructured", 0.0),  # the published algorithm: every token once
    ],
)
def test_walker_equals_solver_on_captured_inputs(method: str, pattern: str, sink: float | None) -> None:
    """Block 0 is pruned from the dense inputs; block 1 from the outputs of the pruned block 0."""
    torch.manual_seed(0)
    dense = _arch("llama").eval()
    ids = _ids(6, 32)
    config = PruneConfig(method=method, pattern=pattern, sink_weight=sink)
    pruned = _arch("llama").eval()
    pruned.load_state_dict(dense.state_dict())
    prune(pruned, ids, config, batch_size=3, progress=False)
    name, pblocks = find_blocks(pruned)

    ref0 = _reference_block(dense, 0, ids, 3, config)
    for n, w in ref0.items():
        got = get_weight(find_linears(pblocks[0], f"{name}.0")[n])
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-6)
    # block 1 sees what pruned block 0 produces (propagate="pruned")
    mixed = _arch("llama").eval()
    mixed.load_state_dict(dense.state_dict())
    _, mblocks = find_blocks(mixed)
    mblocks[0].load_state_dict(pblocks[0].state_dict())
    ref1 = _reference_block(mixed, 1, ids, 3, config)
    for n, w in ref1.items():
        got = get_weight(find_linears(pblocks[1], f"{name}.1")[n])
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-6)


def test_propagate_dense_uses_dense_inputs_for_every_block() -> None:
    dense = _arch("llama").eval()
    ids = _ids(4, 32)
    config = PruneConfig(method="wanda", pattern="unstructured", propagate="dense")
    pruned = _arch("llama").eval()
    pruned.load_state_dict(dense.state_dict())
    report = prune(pruned, ids, config, batch_size=2, progress=False)
    name, pblocks = find_blocks(pruned)
    ref1 = _reference_block(dense, 1, ids, 2, config)
    for n, w in ref1.items():
        torch.testing.assert_close(
            get_weight(find_linears(pblocks[1], f"{name}.1")[n]), w, rtol=1e-6, atol=1e-6
        )
    assert all(b.output_error is None for b in report.blocks)


def test_collector_shares_stats_of_layers_reading_the_same_tensor() -> None:
    model = _arch("llama").eval()
    name, blocks = find_blocks(model)
    layers = find_linears(blocks[0], f"{name}.0")
    col = InputCollector(layers, hessian=False, device=torch.device("cpu"))
    with col.hooks(), torch.no_grad():
        for batch in _ids(4, 16).split(2):
            col.new_batch()
            model(input_ids=batch)
    short = {n.rsplit(".", 1)[-1]: n for n in layers}
    assert col.stats[short["q_proj"]] is col.stats[short["k_proj"]] is col.stats[short["v_proj"]]
    assert col.stats[short["gate_proj"]] is col.stats[short["up_proj"]]
    assert col.stats[short["o_proj"]] is not col.stats[short["q_proj"]]
    assert col.stats[short["down_proj"]] is not col.stats[short["gate_proj"]]
    assert col.stats[short["q_proj"]].n == 4 * 16
    assert all(not h for m in layers.values() for h in (m._forward_pre_hooks,))


def test_ignore_keeps_layers_dense() -> None:
    model = _arch("llama").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune(
        model,
        _ids(4, 16),
        PruneConfig(method="magnitude", ignore=("down_proj", "*.1.self_attn.*")),
        progress=False,
    )
    names = {r.name for r in report.layers}
    assert not any(n.endswith("down_proj") for n in names)
    assert not any(".1.self_attn." in n for n in names)
    after = model.state_dict()
    for k in before:
        if k.endswith("down_proj.weight") or ".1.self_attn." in k:
            assert torch.equal(before[k], after[k]), k


def test_seqlen_beyond_context_and_nonfinite_inputs() -> None:
    model = _arch("llama").eval()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        prune(model, torch.zeros(1, 256, dtype=torch.long), PruneConfig(), progress=False)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="up_proj"):
        prune(model, _ids(2, 16), PruneConfig(), progress=False)
    model = _arch("llama").eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"non-finite|NaN/Inf"):
        prune(model, _ids(2, 16), PruneConfig(), progress=False)


@pytest.mark.parametrize("policy", ["magnitude", "dense"])
def test_linear_that_never_runs_follows_uncalibrated(policy: str, caplog: pytest.LogCaptureFixture) -> None:
    """A Linear that receives no calibration tokens: pruned by magnitude with a warning, or kept dense."""
    model = _arch("llama").eval()
    model.model.layers[0].mlp.unused = nn.Linear(64, 32, bias=False)  # never called by the block
    before = model.model.layers[0].mlp.unused.weight.detach().clone()
    name = "model.layers.0.mlp.unused"
    config = PruneConfig(method="wanda", uncalibrated=policy)
    with caplog.at_level(logging.WARNING, logger="oneshot.pruner"):
        report = prune(model, _ids(4, 16), config, device="cpu", progress=False)
    assert any(name in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    after = model.model.layers[0].mlp.unused.weight
    reported = {r.name: r for r in report.layers}
    dense = {d.name: d for d in report.dense_matrices}
    if policy == "magnitude":
        assert torch.equal(after, get_solver("magnitude")(before, None, sparsity=0.5).weight)
        assert report.uncalibrated == [name] and reported[name].loss is None and name not in dense
    else:
        assert torch.equal(after, before)
        assert report.uncalibrated == [] and name not in reported
        assert dense[name] == DenseMatrix(name, 64 * 32, DENSE_UNCALIBRATED)
    assert reported["model.layers.0.mlp.down_proj"].sparsity == 0.5  # the others are calibrated as usual
    zeros = sum(int((p == 0).sum()) for n, p in model.model.layers.named_parameters() if p.dim() >= 2)
    params = sum(p.numel() for p in model.model.layers.parameters() if p.dim() >= 2)
    assert (report.matrix_zero_params, report.matrix_params) == (zeros, params)
    assert report.to_dict()["block_sparsity"] == pytest.approx(zeros / params)


def test_dense_blocks_are_reported_with_their_reason() -> None:
    """Every weight matrix of the blocks is counted; the ignored ones are listed with "--ignore"."""
    model = _arch("llama").eval()
    report = prune(
        model,
        _ids(4, 16),
        PruneConfig(method="magnitude", ignore=("*.1.mlp.*",)),
        progress=False,
    )
    ignored = {f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert {d.name for d in report.dense_matrices} == ignored
    assert all(d.reason == "--ignore" and d.params == 64 * 128 for d in report.dense_matrices)
    assert report.matrix_params == report.pruned_params + 3 * 64 * 128
    assert report.block_sparsity == pytest.approx(report.zero_params / report.matrix_params)
    assert report.sparsity == 0.5 and report.uncalibrated == []
