"""SparseLinear, convert, compressed checkpoints and dispatch, on a tiny random Llama (CPU).

Without CUDA the automatic backend is dense, which must reproduce the dense model exactly. The forced Triton
backend must match it within dtype tolerance: those tests are marked ``interpreter`` and run on the CPU
interpreter in their own pytest process (``TRITON_INTERPRET=1 pytest -m interpreter``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from oneshot import kernels
from oneshot.kernels import (
    KernelConfig,
    Plan,
    SparseLinear,
    convert,
    densify,
    load_compressed,
    save_compressed,
)
from oneshot.kernels.dispatch import Dispatcher, m_bucket


def tiny_llama(seed: int = 0, **overrides: object) -> nn.Module:
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=128, **overrides)).eval()


@torch.no_grad()
def prune_24_(linear: nn.Linear) -> None:
    """In-place magnitude 2:4: zero the 2 smallest |w| of every group of 4 input columns."""
    w = linear.weight
    groups = w.reshape(w.shape[0], -1, 4)
    drop = groups.abs().topk(2, dim=-1, largest=False).indices
    groups.scatter_(-1, drop, 0.0)


@torch.no_grad()
def prune_unstructured_(linear: nn.Linear, sparsity: float) -> None:
    w = linear.weight
    k = round(w.numel() * sparsity)
    drop = w.abs().flatten().topk(k, largest=False).indices
    w.view(-1)[drop] = 0.0


def pruned_llama(seed: int = 0, **overrides: object) -> nn.Module:
    model = tiny_llama(seed, **overrides)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "lm_head" not in name:
            prune_24_(module)
    return model


def prompt(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@torch.no_grad()
def greedy(model: nn.Module, ids: torch.Tensor, new: int = 8) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)


def test_convert_24_auto_backend_reproduces_dense_model_exactly() -> None:
    dense = pruned_llama()
    sparse = copy.deepcopy(dense)
    summary = convert(sparse, "2:4")
    assert summary.counts() == {"2:4": 14, "dense": 1}
    assert [r.name for r in summary.skipped] == ["lm_head"]
    assert isinstance(sparse.model.layers[0].mlp.down_proj, SparseLinear)
    assert isinstance(sparse.lm_head, nn.Linear)
    ids = prompt()
    assert torch.equal(logits(sparse, ids), logits(dense, ids))
    assert sparse.model.layers[0].self_attn.q_proj.last_plan == Plan("dense")  # no CUDA: untimed dense
    assert torch.equal(greedy(sparse, ids[:1]), greedy(dense, ids[:1]))
    # fp32 2:4: half the values plus 2 bits per kept value = 0.5 + 1/32 of dense (0.5625 for 16-bit).
    converted = summary.converted
    ratio = sum(r.stored_bytes for r in converted) / sum(r.dense_bytes for r in converted)
    assert ratio == pytest.approx(0.5 + 1 / 32)


@pytest.mark.interpreter
@pytest.mark.parametrize("fmt", ["2:4", "bitmask"])
def test_convert_triton_backend_matches_dense_fp32(fmt: str) -> None:
    dense = pruned_llama(seed=2)
    sparse = copy.deepcopy(dense)
    convert(sparse, fmt, backend="triton")
    ids = prompt(seed=3)
    torch.testing.assert_close(logits(sparse, ids), logits(dense, ids), rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy(sparse, ids[:1], new=5), greedy(dense, ids[:1], new=5))


@pytest.mark.interpreter
def test_convert_triton_backend_matches_dense_bf16() -> None:
    dense = pruned_llama(seed=4).to(torch.bfloat16)
    sparse = copy.deepcopy(dense)
    convert(sparse, "2:4", backend="triton")
    ids = prompt(batch=1, length=5, seed=5)
    got, want = logits(sparse, ids).float(), logits(dense, ids).float()
    # Two bf16 layers whose matmuls round at different points: a few bf16 ulps of the logit scale.
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * scale)
    assert float((got - want).abs().mean()) < 0.01 * scale


def test_reference_backend_matches_dense() -> None:
    dense = pruned_llama(seed=6)
    sparse = copy.deepcopy(dense)
    convert(sparse, "2:4", backend="reference")
    ids = prompt(seed=7)
    torch.testing.assert_close(logits(sparse, ids), logits(dense, ids), rtol=1e-5, atol=1e-5)


def test_auto_format_choice_ignore_and_reasons() -> None:
    model = tiny_llama(seed=8)
    layers = model.model.layers
    for proj in ("gate_proj", "up_proj", "down_proj"):
        prune_24_(getattr(layers[0].mlp, proj))
    prune_unstructured_(layers[1].self_attn.q_proj, 0.6)  # unstructured, pays off
    prune_unstructured_(layers[1].self_attn.k_proj, 0.1)  # too sparse-light for the bitmask
    prune_24_(layers[1].mlp.down_proj)  # 2:4 but ignored by pattern
    prune_24_(model.lm_head)  # 2:4 but the output embedding
    dense = copy.deepcopy(model)
    summary = convert(model, "auto", ignore=["layers.1.mlp.*"])
    by_name = {r.name: r for r in summary.layers}
    assert by_name["model.layers.0.mlp.gate_proj"].format == "2:4"
    assert by_name["model.layers.1.self_attn.q_proj"].format == "bitmask"
    assert by_name["model.layers.1.self_attn.q_proj"].sparsity == pytest.approx(0.6, abs=1e-3)
    assert by_name["model.layers.1.self_attn.k_proj"].format is None
    assert "min_sparsity" in by_name["model.layers.1.self_attn.k_proj"].reason
    assert by_name["model.layers.1.mlp.down_proj"].reason == "ignored"
    assert by_name["lm_head"].reason == "output embedding"
    assert by_name["model.layers.0.self_attn.v_proj"].format is None  # dense
    assert isinstance(model.model.layers[1].self_attn.q_proj, SparseLinear)
    assert "bitmask" in str(summary)
    ids = prompt(seed=9)
    assert torch.equal(logits(model, ids), logits(dense, ids))

    only_24 = copy.deepcopy(dense)
    counts = convert(only_24, "2:4").counts()
    assert counts == {"2:4": 4, "dense": 11}  # layer 0 MLP + layer 1 down_proj; lm_head skipped
    everything = copy.deepcopy(dense)
    counts = convert(everything, "bitmask", include_lm_head=True).counts()
    assert counts == {"bitmask": 7, "dense": 8}  # every layer with a zero, lm_head included
    with pytest.raises(ValueError, match="choose one of"):
        convert(copy.deepcopy(dense), "1:4")
    with pytest.raises(ValueError, match="backend"):
        convert(copy.deepcopy(dense), "2:4", backend="fast")


def test_tied_output_embedding_is_skipped() -> None:
    model = pruned_llama(seed=10, tie_word_embeddings=True)
    summary = convert(model, "2:4", include_lm_head=True)
    lm_head = next(r for r in summary.layers if r.name == "lm_head")
    assert lm_head.format is None and "shared" in lm_head.reason


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w0")


@pytest.mark.parametrize(("tied", "dtype"), [(False, torch.float32), (True, torch.bfloat16)])
def test_save_and_load_compressed(tmp_path: Path, tied: bool, dtype: torch.dtype) -> None:
    model = pruned_llama(seed=11, tie_word_embeddings=tied).to(dtype)
    prune_unstructured_(model.model.layers[1].mlp.down_proj, 0.0)  # reset below to unstructured
    with torch.no_grad():
        w = model.model.layers[1].mlp.down_proj.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    prune_unstructured_(model.model.layers[1].mlp.down_proj, 0.7)
    summary = convert(model, "auto")
    assert summary.counts()["bitmask"] == 1
    path = save_compressed(model, tmp_path, tokenizer=_tiny_tokenizer())
    files = {p.name for p in tmp_path.iterdir()}
    assert {"sparse_model.safetensors", "config.json", "tokenizer.json"} <= files
    assert path == tmp_path / "sparse_model.safetensors"

    loaded = load_compressed(tmp_path)
    assert next(loaded.parameters()).dtype == dtype
    for name, tensor in model.state_dict().items():  # every stored tensor comes back bit-identical
        assert torch.equal(loaded.state_dict()[name], tensor), name
    formats = {n: m.sparse_format for n, m in loaded.named_modules() if isinstance(m, SparseLinear)}
    assert formats == {n: m.sparse_format for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    if tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = prompt(seed=12)
    want = logits(model, ids)
    if dtype == torch.float32:
        assert torch.equal(logits(loaded, ids), want)
    else:
        # `model.to(bfloat16)` also rounded its rotary inv_freq buffer (not saved, rebuilt in fp32 on load).
        torch.testing.assert_close(logits(loaded, ids), want, rtol=0.05, atol=0.05 * float(want.abs().max()))

    again, summary2 = kernels.load_sparse_model(tmp_path)  # detects the compressed folder
    assert summary2.counts() == {"2:4": 13, "bitmask": 1}
    assert torch.equal(logits(again, ids), logits(loaded, ids))


def test_load_sparse_model_from_pruned_checkpoint(tmp_path: Path) -> None:
    dense = pruned_llama(seed=13)
    pruned_dir, out_dir = tmp_path / "pruned", tmp_path / "compressed"
    dense.save_pretrained(pruned_dir)
    _tiny_tokenizer().save_pretrained(pruned_dir)
    model, summary = kernels.load_sparse_model(pruned_dir, "2:4", ignore=("layers.0.*",))
    assert summary.counts() == {"2:4": 7, "dense": 8}
    ids = prompt(seed=14)
    assert torch.equal(logits(model, ids), logits(dense, ids))
    save_compressed(model, out_dir)  # tokenizer files come along from the source folder
    assert (out_dir / "tokenizer.json").is_file() and (out_dir / "config.json").is_file()
    assert torch.equal(logits(load_compressed(out_dir), ids), logits(dense, ids))


def test_sparse_linear_module_api() -> None:
    linear = nn.Linear(64, 24, bias=True)
    prune_24_(linear)
    sparse = SparseLinear.from_linear(linear, "2:4", keep_dense=True)
    assert sparse.keeps_dense and "dense_weight" not in sparse.state_dict()
    assert set(sparse.state_dict()) == {"weight_values", "weight_meta", "bias"}
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert torch.equal(sparse(x), linear(x))
        assert sparse(x.double()).dtype == torch.float32  # inputs are cast to the weight dtype
        back = sparse.to_linear()
        assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)
        half = copy.deepcopy(sparse).to(torch.float16)
        assert (
            half.weight_values.dtype == torch.float16 and half.get_buffer("weight_meta").dtype == torch.uint8
        )
    with pytest.raises(ValueError, match="backend"):
        SparseLinear(sparse.weight_compressed, backend="fastest")
    with pytest.raises(ValueError, match="2:4"):
        SparseLinear.from_linear(nn.Linear(8, 4), "2:4")
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    prune_unstructured_(model[0], 0.5)
    convert(model, "bitmask")
    assert isinstance(model[0], SparseLinear) and densify(model) == 1 and isinstance(model[0], nn.Linear)


def test_m_buckets_and_heuristic() -> None:
    assert [m_bucket(m) for m in (0, 1, 7, 16, 17, 64, 65, 4096)] == [1, 1, 7, 16, 32, 64, 128, 4096]
    assert Dispatcher().heuristic(1, 64, 64, torch.device("cpu")) == Plan("dense")
    assert KernelConfig(16, 32, 64).use_dot and not KernelConfig(1, 32, 64).use_dot
