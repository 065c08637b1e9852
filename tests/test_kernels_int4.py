"""2:4 with 4-bit group-quantized kept values (``Sparse24Int4Weight``, format ``"2:4-int4"``): the layout,
exact round trips on a given grid, errors, the reference against a float64 dequantize + matmul, the Triton
decode kernel under the CPU interpreter (tests marked ``interpreter``, run with ``TRITON_INTERPRET=1``),
``SparseLinear``/``convert`` on the CPU (the dequantized dense layer, bit for bit), the grid of a quantized
run folder, files and sizes.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from oneshot import kernels
from oneshot.kernels import (
    Int4Grid,
    KernelConfig,
    Sparse24Int4Weight,
    SparseLinear,
    compress_24,
    compress_24_int4,
    convert,
    load_sparse,
    quantize_24_int4,
    read_int4_grid,
    save_sparse,
    sparse24_int4_gemv,
    sparse24_int4_gemv_reference,
)
from oneshot.kernels._common import decode_candidates
from oneshot.solvers.quant import QuantScheme, quantize_rtn
from tests.test_kernels_dispatch import FakeTimer, decompressions  # noqa: F401  (fixture)
from tests.test_kernels_linear import logits, prompt, pruned_llama

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCALE_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (rtol, atol relative to the largest output): kernel and reference both accumulate in fp32 and round once.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3)}


def random_24(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A 2:4 weight (N, K) that also has groups with 1 and 0 nonzeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    groups = w.reshape(n, -1, 4)  # (N, K/4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    w = (groups * torch.zeros_like(groups).scatter_(-1, keep, 1.0)).reshape(n, k)
    w[torch.rand(n, k, generator=g) < 0.1] = 0
    return w.to(dtype)


def run_grid(weight: torch.Tensor, group_size: int | None, symmetric: bool) -> tuple[torch.Tensor, Int4Grid]:
    """What a quantized run holds: the fake-quantized weight (in its dtype) and its grid, from the
    quantization code (``oneshot.solvers.quant``, round to nearest)."""
    scheme = QuantScheme(bits=4, group_size=group_size, symmetric=symmetric)
    q = quantize_rtn(weight, scheme)
    fake = q.dequantize(torch.float32).to(weight.dtype)
    return fake, Int4Grid(q.scales, None if symmetric else q.zeros, group_size)


# ------------------------------------------------------------------------------------------------ format


def test_hand_computed_layout() -> None:
    # Symmetric, one group of 8, scale 1: groups [0, 2, 0, -3] -> positions (1, 3), codes 2, -3 -> u 10, 5;
    # [5, 0, 0, 0] -> positions (0, 1) with a stored zero, codes 5, 0 -> u 13, 8.
    w = torch.tensor([[0.0, 2.0, 0.0, -3.0, 5.0, 0.0, 0.0, 0.0]])
    q = compress_24_int4(w, torch.ones(1, 1, dtype=torch.float16), None, 8)
    assert q.codes.tolist() == [[10 | 5 << 4, 13 | 8 << 4]]
    assert q.meta.tolist() == compress_24(w).meta.tolist() == [[1 | 3 << 2 | 0 << 4 | 1 << 6]]
    assert q.symmetric and q.group_size == 8 and q.dtype == torch.float32 and q.format == "2:4-int4"
    assert torch.equal(q.decompress(), w)
    # Asymmetric, zero-point 3, scale 0.5: 2.0 -> u 7, -1.5 -> u 0, a stored zero -> u 3.
    w = torch.tensor([[0.0, 2.0, 0.0, -1.5, 0.0, 0.0, 0.0, 0.5]])
    q = compress_24_int4(w, torch.full((1, 1), 0.5), torch.full((1, 1), 3), 8)
    assert q.codes.tolist() == [[7 | 0 << 4, 3 | 4 << 4]] and q.zeros is not None
    assert torch.equal(q.decompress(), w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("k", "group"), [(576, 64), (1536, 128), (1024, None), (256, 32)])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_round_trip_on_the_grid_of_a_quantized_run(
    dtype: torch.dtype, k: int, group: int | None, symmetric: bool
) -> None:
    fake, grid = run_grid(random_24(24, k, dtype, seed=k), group, symmetric)
    q = compress_24_int4(fake, grid.scales, grid.zeros, grid.group_size)
    back = q.decompress()
    assert back.dtype == dtype and torch.equal(back, fake)
    assert torch.equal(back.signbit(), fake.signbit())  # bit for bit, signs of zeros included
    assert q.scales.dtype == grid.scales.dtype and q.group_size == (group or k)
    # quantize_24_int4 is the same round to nearest
    rtn = quantize_24_int4(random_24(24, k, dtype, seed=k), group, symmetric)
    assert torch.equal(rtn.decompress(), fake) and torch.equal(rtn.codes, q.codes)
    assert torch.equal(rtn.scales, q.scales)


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=str)
@pytest.mark.parametrize("k", [576, 1540])
def test_groups_that_do_not_divide_k_and_scale_dtypes(scale_dtype: torch.dtype, k: int) -> None:
    w = random_24(12, k, torch.bfloat16, seed=3)
    q = quantize_24_int4(w, 128, symmetric=False, scale_dtype=scale_dtype)
    assert q.scales.shape == (12, -(-k // 128)) and q.scales.dtype == scale_dtype
    back = q.decompress()
    again = compress_24_int4(back, q.scales, q.zeros, 128)
    assert torch.equal(again.decompress(), back) and torch.equal(again.codes, q.codes)
    # The short last group has the grid its columns alone give (padding with zeros changes nothing).
    tail = w[:, 1536 if k == 1540 else 512 :]
    alone = quantize_24_int4(tail, None, symmetric=False, scale_dtype=scale_dtype)
    assert torch.equal(alone.scales[:, 0], q.scales[:, -1])
    assert torch.equal(alone.decompress(), back[:, -tail.shape[1] :])
    err = (back.float() - w.float()).abs().max()
    assert 0 < err <= float(q.scales.float().max())  # rounded, within a step


def test_errors() -> None:
    w = random_24(8, 64, torch.float32, seed=1)
    fake, grid = run_grid(w, 32, True)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        compress_24_int4(torch.ones(8, 64), grid.scales, None, 32)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        quantize_24_int4(torch.ones(8, 64))
    off = fake.clone()
    sparse = compress_24(off)
    j = int(sparse.values[2].nonzero()[0])  # the first kept nonzero of row 2
    col = int(sparse.positions()[2, j]) + 4 * (j // 2)
    off[2, col] += 0.25 * float(grid.scales[2, col // 32])
    with pytest.raises(ValueError, match=rf"not on the 4-bit grid: 1 of .* row 2, column {col}"):
        compress_24_int4(off, grid.scales, None, 32)
    with pytest.raises(ValueError, match="not on the 4-bit grid"):  # another layer's grid
        compress_24_int4(fake, grid.scales.roll(1, dims=0), None, 32)
    with pytest.raises(ValueError, match="not on the 4-bit grid"):  # a symmetric grid read as asymmetric
        compress_24_int4(fake, grid.scales, torch.zeros(8, 2, dtype=torch.int8), 32)
    with pytest.raises(ValueError, match="scales must be"):
        compress_24_int4(fake, grid.scales[:, :1], None, 32)
    with pytest.raises(ValueError, match="scales must be"):
        compress_24_int4(fake, grid.scales.to(torch.float64), None, 32)
    with pytest.raises(ValueError, match="positive"):
        compress_24_int4(fake, torch.zeros_like(grid.scales), None, 32)
    with pytest.raises(ValueError, match=r"0\.\.15"):
        compress_24_int4(fake, grid.scales, torch.full((8, 2), 16), 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        compress_24_int4(fake, grid.scales, None, 12)
    q = compress_24_int4(fake, grid.scales, None, 32)
    with pytest.raises(ValueError, match="codes must be"):
        Sparse24Int4Weight(q.codes[:, 1:], q.meta, q.scales, None, q.shape, 32, q.dtype)
    q.validate()
    with pytest.raises(ValueError, match="positive"):
        Sparse24Int4Weight(q.codes, q.meta, -q.scales, None, q.shape, 32, q.dtype).validate()


def test_nbytes_against_fp16() -> None:
    n, k = 4096, 4096
    q = quantize_24_int4(random_24(n, k, torch.float16, seed=0), 128)
    expected = n * k // 4 + n * k // 8 + 2 * n * (k // 128)  # codes, meta, fp16 scales
    assert q.nbytes == expected
    ratio = 2 * n * k / q.nbytes
    print(f"2:4-int4 g128 sym: {q.nbytes / (n * k):.4f} bytes/weight, {ratio:.3f}x fewer than fp16")
    assert 5.1 < ratio <= 16 / 3  # 5.12x; 2:4 + 4 bits without scales is the 5.33x floor
    asym = quantize_24_int4(random_24(n, k, torch.float16, seed=0), 128, symmetric=False)
    assert asym.nbytes == expected + n * (k // 128)  # + uint8 zero-points
    assert 2 * n * k / asym.nbytes > 5.0


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_save_load_round_trip(tmp_path: Path, symmetric: bool) -> None:
    q = quantize_24_int4(random_24(20, 1540, torch.bfloat16, seed=5), 64, symmetric)
    path = tmp_path / "w.safetensors"
    save_sparse(path, {"layer.weight": q, "bias": torch.ones(3)}, {"note": "x"})
    tensors, meta = load_sparse(path)
    back = tensors["layer.weight"]
    assert (
        isinstance(back, Sparse24Int4Weight)
        and meta == {"note": "x"}
        and torch.equal(tensors["bias"], torch.ones(3))
    )
    assert back.dtype == torch.bfloat16 and back.group_size == 64 and back.symmetric == symmetric
    for name, t in q.tensors().items():
        assert torch.equal(back.tensors()[name], t) and back.tensors()[name].dtype == t.dtype
    assert set(back.tensors()) == ({"codes", "meta", "scales"} | (set() if symmetric else {"zeros"}))
    assert torch.equal(back.decompress(), q.decompress()) and back.nbytes == q.nbytes
    assert path.stat().st_size < q.nbytes + 4096


# --------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_reference_against_float64(dtype: torch.dtype, symmetric: bool) -> None:
    fake, grid = run_grid(random_24(36, 256, dtype, seed=7), 32, symmetric)
    q = compress_24_int4(fake, grid.scales, grid.zeros, 32)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 5, 256, generator=g).to(dtype)
    bias = torch.randn(36, generator=g).to(dtype)
    y = sparse24_int4_gemv_reference(x, q, bias)
    want = (x.double() @ fake.double().T + bias.double()).to(dtype)  # the dequantized dense layer
    assert y.shape == (2, 5, 36) and y.dtype == dtype
    rtol, atol = TOLERANCE[dtype]
    scale = float(want.double().abs().max())
    torch.testing.assert_close(y.double(), want.double(), rtol=rtol, atol=atol * scale)


def test_decode_candidates() -> None:
    cpu = torch.device("cpu")
    for m in (1, 3, 8, 11, 16):
        configs = decode_candidates(m, 84, 1536, cpu)
        assert configs and not any(c.use_dot for c in configs) and len(set(configs)) == len(configs)
    assert decode_candidates(17, 84, 1536, cpu) == []


# ------------------------------------------------------------------------------- Triton, CPU interpreter


def _check_kernel(
    m: int,
    n: int,
    k: int,
    config: KernelConfig | None,
    dtype: torch.dtype,
    *,
    group: int | None = 128,
    symmetric: bool = True,
    bias: bool = True,
) -> None:
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    q = quantize_24_int4(random_24(n, k, dtype, seed=seed), group, symmetric)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype)
    y = sparse24_int4_gemv(x, q, b, config=config, out=out)
    assert y.data_ptr() == out.data_ptr()
    expected = sparse24_int4_gemv_reference(x, q, b)
    msg = f"M={m} N={n} K={k} {dtype} group={group} sym={symmetric} {config} seed={seed}"
    assert not torch.isnan(y).any(), msg
    rtol, atol = TOLERANCE[dtype]
    scale = float(expected.float().abs().max()) or 1.0
    torch.testing.assert_close(
        y.float(), expected.float(), rtol=rtol, atol=atol * scale, msg=lambda s: f"{msg}\n{s}"
    )


# N = 84 is not a multiple of the tile; 576 = 2 * 256 + 64 leaves a K tail (and 4.5 groups of 128); 1540 ends
# in a half-filled metadata byte and a 4-column last group; M = 3 in one program of 4 rows, 11 over two of 8.
KERNEL_CASES = [
    pytest.param(1, 84, 576, KernelConfig(1, 32, 256), torch.float32, 128, True, id="M1-K576-fp32"),
    pytest.param(
        1, 84, 1536, KernelConfig(1, 16, 256, split_k=3), torch.bfloat16, 128, False, id="M1-K1536-split3"
    ),
    pytest.param(3, 84, 1540, KernelConfig(4, 16, 512), torch.float16, 128, True, id="M3-rows4-K1540"),
    pytest.param(
        3, 84, 1540, KernelConfig(1, 8, 256, split_k=2), torch.bfloat16, 64, False, id="M3-K1540-split2"
    ),
    pytest.param(8, 84, 576, KernelConfig(8, 32, 512), torch.float32, 32, False, id="M8-rows8-K576-wide"),
    pytest.param(
        11, 84, 1536, KernelConfig(8, 16, 256, split_k=3), torch.float16, None, True, id="M11-split3"
    ),
    pytest.param(11, 84, 1540, KernelConfig(2, 32, 1024), torch.float32, None, False, id="M11-rows2-K1540"),
    pytest.param(3, 84, 576, None, torch.bfloat16, 64, True, id="M3-default-config"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize(("m", "n", "k", "config", "dtype", "group", "symmetric"), KERNEL_CASES)
def test_kernel_matches_reference(
    m: int,
    n: int,
    k: int,
    config: KernelConfig | None,
    dtype: torch.dtype,
    group: int | None,
    symmetric: bool,
) -> None:
    _check_kernel(m, n, k, config, dtype, group=group, symmetric=symmetric)


@pytest.mark.interpreter
def test_kernel_without_bias_batched_input_and_errors() -> None:
    _check_kernel(1, 84, 576, KernelConfig(1, 16, 256, split_k=2), torch.float32, bias=False)
    q = quantize_24_int4(random_24(84, 576, torch.float32, seed=2), 64)
    x = torch.randn(2, 3, 576)
    y = sparse24_int4_gemv(x, q, config=KernelConfig(4, 16, 256))
    torch.testing.assert_close(y, sparse24_int4_gemv_reference(x, q), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="only a decode kernel"):
        sparse24_int4_gemv(x, q, config=KernelConfig(16, 32, 64))
    with pytest.raises(ValueError, match="dtype"):
        sparse24_int4_gemv(x.half(), q)


@pytest.mark.interpreter
def test_forced_triton_layer_matches_dense() -> None:
    linear = nn.Linear(576, 84, bias=True)
    with torch.no_grad():
        linear.weight.copy_(random_24(84, 576, torch.float32, seed=9))
    layer = SparseLinear.from_linear(linear, "2:4-int4", group_size=64, symmetric=False, backend="triton")
    dense = nn.Linear(576, 84)
    with torch.no_grad():
        dense.weight.copy_(layer.dense())
        dense.bias.copy_(linear.bias)
        x = torch.randn(2, 3, 576)
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------- SparseLinear, convert


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_convert_rounds_to_nearest_and_equals_the_dequantized_dense_model(dtype: torch.dtype) -> None:
    model = pruned_llama(seed=21).to(dtype)
    dense = copy.deepcopy(model)
    summary = convert(model, "2:4-int4", group_size=32, symmetric=False)
    assert summary.counts() == {"2:4-int4": 14, "dense": 1}  # 7 projections x 2 blocks; lm_head left alone
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, SparseLinear) and layer.group_size == 32 and "asymmetric" in repr(layer)
    for name, module in dense.named_modules():
        if isinstance(module, nn.Linear) and "lm_head" not in name:
            sparse = model.get_submodule(name)
            assert isinstance(sparse, SparseLinear)
            fake = quantize_24_int4(module.weight.detach(), 32, symmetric=False).decompress()
            assert torch.equal(sparse.dense(), fake)
            with torch.no_grad():
                module.weight.copy_(fake)
    ids = prompt(seed=22)
    assert torch.equal(logits(model, ids), logits(dense, ids))  # CPU: decompress + F.linear, bit for bit
    assert layer.last_plan is not None and layer.last_plan.backend == "dense"
    for module in model.modules():
        if isinstance(module, SparseLinear):
            module.backend = "reference"
    rtol, atol = TOLERANCE[dtype]
    want = logits(dense, ids).float()
    torch.testing.assert_close(
        logits(model, ids).float(), want, rtol=rtol, atol=atol * float(want.abs().max())
    )
    converted = summary.converted
    assert sum(r.stored_bytes for r in converted) < 0.25 * sum(r.dense_bytes for r in converted)


def test_convert_uses_a_given_grid_exactly_and_checks_it() -> None:
    model = pruned_llama(seed=23)
    grids: dict[str, Int4Grid] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "lm_head" not in name:
            fake, grids[name] = run_grid(module.weight.detach(), 32, True)
            with torch.no_grad():
                module.weight.copy_(fake)  # the quantized run's checkpoint
    dense = copy.deepcopy(model)
    convert(model, "2:4-int4", grid=grids)
    ids = prompt(seed=24)
    assert torch.equal(logits(model, ids), logits(dense, ids))
    layer = model.model.layers[1].self_attn.q_proj
    assert isinstance(layer, SparseLinear)
    assert torch.equal(layer.weight_compressed.scales, grids["model.layers.1.self_attn.q_proj"].scales)

    partial = {k: v for k, v in grids.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match=r"no entry for model\.layers\.1\.mlp\.up_proj"):
        convert(copy.deepcopy(dense), "2:4-int4", grid=partial)
    convert(copy.deepcopy(dense), "2:4-int4", grid=partial, ignore=["layers.1.mlp.up_proj"])
    moved = copy.deepcopy(dense)
    with torch.no_grad():
        moved.model.layers[0].mlp.gate_proj.weight.mul_(1.01)
    with pytest.raises(
        ValueError, match=r"model\.layers\.0\.mlp\.gate_proj: weight is not on the 4-bit grid"
    ):
        convert(moved, "2:4-int4", grid=grids)
    with pytest.raises(ValueError, match="2:4-int4"):
        convert(copy.deepcopy(dense), "2:4", grid=grids)


def test_grid_of_a_quantized_run_folder(tmp_path: Path) -> None:
    from oneshot.runfolder import write_quant_file

    model = pruned_llama(seed=25)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "lm_head" not in name:
            q = quantize_rtn(module.weight.detach(), QuantScheme(bits=4, group_size=64, symmetric=False))
            with torch.no_grad():
                module.weight.copy_(q.dequantize())
            tensors |= {f"{name}.weight_scale": q.scales, f"{name}.weight_zero_point": q.zeros}
            tensors[f"{name}.weight_g_idx"] = q.g_idx
    facts = {"bits": 4, "group_size": 64, "symmetric": False, "act_order": False, "scale_dtype": "float16"}
    write_quant_file(tmp_path, tensors, facts)
    grids = read_int4_grid(tmp_path)
    assert len(grids) == 14 and all(g.zeros is not None and g.group_size == 64 for g in grids.values())
    dense = copy.deepcopy(model)
    assert convert(model, "2:4-int4", grid=tmp_path).counts()["2:4-int4"] == 14
    ids = prompt(seed=26)
    assert torch.equal(logits(model, ids), logits(dense, ids))

    write_quant_file(tmp_path, tensors, {**facts, "bits": 8})
    with pytest.raises(ValueError, match="4-bit"):
        read_int4_grid(tmp_path)
    write_quant_file(tmp_path, tensors, {**facts, "act_order": True})
    with pytest.raises(ValueError, match="act-order"):
        read_int4_grid(tmp_path)


def test_module_api_dtype_and_compressed_checkpoint(tmp_path: Path) -> None:
    model = pruned_llama(seed=27)
    convert(model, "2:4-int4", group_size=64)
    layer = model.model.layers[0].self_attn.o_proj
    assert isinstance(layer, SparseLinear)
    assert set(layer.state_dict()) == {"weight_codes", "weight_meta", "weight_scales"}  # symmetric: no zeros
    scales = layer.weight_compressed.scales.clone()
    assert scales.dtype == torch.float16 and layer.compute_dtype == torch.float32
    ids = prompt(seed=28)
    want = logits(model, ids)
    kernels.save_compressed(model, tmp_path)
    loaded = kernels.load_compressed(tmp_path)
    assert torch.equal(logits(loaded, ids), want)
    assert kernels.summarize(loaded).counts() == {"2:4-int4": 14}
    # .to(dtype) changes what the weight is dequantized to; the grid is kept bit for bit.
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half.compute_dtype == torch.bfloat16 and torch.equal(half.weight_compressed.scales, scales)
    assert half.get_buffer("weight_scales").dtype == torch.int16  # the scales' bits, untouched by .to()
    assert torch.equal(half.dense(), layer.weight_compressed.decompress(torch.bfloat16))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert half(x).dtype == torch.bfloat16 and layer(x.double()).dtype == torch.float32
    back = layer.to_linear()
    assert torch.equal(back.weight, layer.dense())


def test_dispatcher_offers_only_the_decode_kernel(decompressions: list[int]) -> None:  # noqa: F811
    timer = FakeTimer({"dense": 1.0, "decompress": 3.0, "triton": 5.0}, decompressions)
    linear = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        linear.weight.copy_(random_24(48, 64, torch.float32, seed=30))
    layer = SparseLinear.from_linear(linear, "2:4-int4", group_size=32, dispatcher=timer)
    for m, decode in ((3, True), (20, False)):
        with torch.no_grad():
            y = layer(torch.randn(m, 64))
        plan = layer.last_plan
        assert plan is not None and plan.backend == "dense" and y.shape == (m, 48)
        triton = [name for name in plan.timings_ms if name.startswith("triton:")]
        assert bool(triton) == decode and {"dense", "decompress"} <= set(plan.timings_ms)
        assert all(int(name.split(":")[1].split("x")[0]) <= 8 for name in triton)  # block_m 1..8
    keys = {key.format for key in timer.plans}
    assert keys == {"2:4-int4"}


@pytest.mark.compile
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_opcheck_and_compile(symmetric: bool) -> None:
    from oneshot.kernels.ops import sparse24_int4_linear

    q = quantize_24_int4(random_24(24, 64, torch.float32, seed=31), 32, symmetric)
    bias = torch.randn(24)
    for x in (torch.randn(5, 64), torch.randn(2, 3, 64, requires_grad=True)):
        args = (x, q.codes, q.meta, q.scales, q.zeros, bias, 32, "reference", [])
        torch.library.opcheck(sparse24_int4_linear, args)
        torch.testing.assert_close(sparse24_int4_linear(*args), x @ q.decompress().T + bias)
    linear = nn.Linear(64, 24)
    with torch.no_grad():
        linear.weight.copy_(q.decompress())
    layer = SparseLinear.from_linear(
        linear, "2:4-int4", grid=Int4Grid(q.scales, q.zeros, 32), backend="reference"
    )
    x = torch.randn(3, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        torch.testing.assert_close(got, linear(x), rtol=1e-5, atol=1e-5)
