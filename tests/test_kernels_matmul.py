"""Triton sparse matmul kernels against their pure-torch references, on the CPU interpreter.

The kernel tests are marked ``interpreter``: they run in their own pytest process with ``TRITON_INTERPRET=1``
in its environment (``TRITON_INTERPRET=1 pytest -m interpreter``; scripts/test.sh does this), so the same
Triton code that runs on a GPU runs here on numpy; without the variable they are skipped. The compiled
kernels are checked on a GPU by test_kernels_cuda.py. Shapes cover the SmolLM2 K values (576, 1536), K with a
half-filled metadata byte (1540), odd M, N not a multiple of the tile, split-K (including the splits the
config chooser picks for a GPU's SM count) and every tile config the dispatcher may pick. Outputs are
poisoned with NaN before each launch; inputs are drawn fresh per test (seed in the message).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

import oneshot.kernels._common as common
from oneshot.kernels import (
    BitmaskWeight,
    KernelConfig,
    Sparse24Weight,
    bitmask_gemv,
    bitmask_gemv_reference,
    bitmask_matmul,
    bitmask_matmul_reference,
    candidate_configs,
    compress_24,
    compress_bitmask,
    default_config,
    sparse24_gemv,
    sparse24_gemv_reference,
    sparse24_matmul,
    sparse24_matmul_reference,
)

interpreter = pytest.mark.interpreter
DEVICE = torch.device("cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = ["2:4", "bitmask"]
# (rtol, atol relative to the largest output): both sides accumulate in fp32 and round once, so results
# differ by at most about one output ulp.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3)}


def _seed() -> int:
    return random.randrange(2**31)


def _weight(fmt: str, n: int, k: int, dtype: torch.dtype, g: torch.Generator, tile: int = 256):
    w = torch.randn(n, k, generator=g)
    if fmt == "2:4":
        groups = w.reshape(n, -1, 4)
        keep = groups.abs().topk(2, dim=-1).indices
        w = (groups * torch.zeros_like(groups).scatter_(-1, keep, 1.0)).reshape(n, k)
        w[torch.rand(n, k, generator=g) < 0.1] = 0  # some groups keep fewer than 2 nonzeros
        return compress_24(w.to(dtype).to(DEVICE))
    w[torch.rand(n, k, generator=g) < 0.5] = 0
    w[0] = 0  # an empty row
    w[-1] = torch.randn(k, generator=g).abs() + 0.1  # a full row
    return compress_bitmask(w.to(dtype).to(DEVICE), tile)


OPS: dict[tuple[str, str], tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]] = {
    ("2:4", "gemv"): (sparse24_gemv, sparse24_gemv_reference),
    ("2:4", "matmul"): (sparse24_matmul, sparse24_matmul_reference),
    ("bitmask", "gemv"): (bitmask_gemv, bitmask_gemv_reference),
    ("bitmask", "matmul"): (bitmask_matmul, bitmask_matmul_reference),
}


def _ops(fmt: str, config: KernelConfig | None = None) -> tuple[Callable[..., torch.Tensor], ...]:
    """The Triton op for ``config`` (decode kernel for block_m == 1) and its reference."""
    return OPS[fmt, "gemv" if config is not None and not config.use_dot else "matmul"]


def _check(
    fmt: str,
    m: int | tuple[int, ...],
    n: int,
    k: int,
    dtype: torch.dtype,
    config: KernelConfig | None,
    *,
    bias: bool = True,
    tile: int = 256,
) -> None:
    seed = _seed()
    g = torch.Generator().manual_seed(seed)
    weight = _weight(fmt, n, k, dtype, g, tile)
    lead = (m,) if isinstance(m, int) else m
    x = torch.randn(*lead, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    op, reference = _ops(fmt, config)
    out = torch.full((*lead, n), float("nan"), dtype=dtype, device=DEVICE)
    y = op(x, weight, b, config=config, out=out)
    assert y.data_ptr() == out.data_ptr() and y.shape == (*lead, n)
    expected = reference(x, weight, b)
    msg = f"{fmt} M={m} N={n} K={k} {dtype} {config} seed={seed}"
    assert not torch.isnan(y).any(), msg
    rtol, atol = TOLERANCE[dtype]
    scale = float(expected.float().abs().max()) or 1.0
    torch.testing.assert_close(
        y.float(), expected.float(), rtol=rtol, atol=atol * scale, msg=lambda s: f"{msg}\n{s}"
    )


# Decode kernel (block_m 1 to 8 rows per program), skinny tl.dot (block_m 16) and GEMM tiles (block_m 32).
# N = 84 is not a multiple of 8, 16, 32 or 64; 576 = 2 * 256 + 64 leaves a K tail; 1536 = 6 * 256 does not.
# Batched decode: M = 3 in one program of 4 rows (the 4th masked), M = 11 over two programs of 8 rows.
CASES = [
    pytest.param(1, 84, 576, KernelConfig(1, 32, 256), id="decode-M1-K576"),
    pytest.param(1, 84, 1536, KernelConfig(1, 16, 256, split_k=3), id="decode-M1-K1536-split3"),
    pytest.param(3, 84, 1536, KernelConfig(1, 8, 512), id="decode-M3-K1536"),
    pytest.param(3, 84, 1536, KernelConfig(4, 8, 512), id="decode-M3-rows4-K1536"),
    pytest.param(2, 84, 576, KernelConfig(2, 32, 256), id="decode-M2-rows2-K576"),
    pytest.param(11, 84, 1536, KernelConfig(8, 16, 256, split_k=3), id="decode-M11-rows8-split3"),
    pytest.param(5, 84, 576, KernelConfig(1, 64, 1024), id="decode-M5-K576-wide"),
    pytest.param(5, 84, 576, KernelConfig(8, 64, 1024), id="decode-M5-rows8-K576-wide"),
    pytest.param(7, 84, 576, KernelConfig(16, 64, 128, split_k=2), id="skinny-dot-M7-K576-split2"),
    pytest.param(33, 84, 1536, KernelConfig(32, 64, 128), id="gemm-M33-K1536"),
]


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("m", "n", "k", "config"), CASES)
def test_kernel_matches_reference(
    fmt: str, dtype: torch.dtype, m: int, n: int, k: int, config: KernelConfig
) -> None:
    _check(fmt, m, n, k, dtype, config, bias=m % 2 == 1)


@interpreter
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("m", "config"),
    [
        (1, KernelConfig(1, 16, 256)),
        (2, KernelConfig(1, 8, 512, split_k=2)),
        (3, KernelConfig(4, 16, 256, split_k=2)),
        (5, None),
        (17, None),
    ],
)
def test_k_with_half_filled_metadata_byte(fmt: str, m: int, config: KernelConfig | None) -> None:
    # K = 1540: K % 8 == 4 (the last metadata/bitmask byte is half used) and K % 32 != 0.
    _check(fmt, m, 24, 1540, torch.float32, config, tile=64)


@interpreter
@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_hands_decode_configs_to_the_gemv_kernel(fmt: str) -> None:
    g = torch.Generator().manual_seed(2)
    weight = _weight(fmt, 40, 576, torch.float32, g)
    x = torch.randn(3, 576, generator=g).to(DEVICE)
    matmul, _ = OPS[fmt, "matmul"]
    gemv, _ = OPS[fmt, "gemv"]
    config = KernelConfig(1, 16, 256)
    assert torch.equal(matmul(x, weight, config=config), gemv(x, weight, config=config))
    with pytest.raises(ValueError, match="block_m"):
        gemv(x, weight, config=KernelConfig(16, 16, 64))


@interpreter
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 40, 100])
def test_every_candidate_config(fmt: str, m: int) -> None:
    """Every config the dispatcher may time gives the reference result (fp16, N and K with tails)."""
    n, k = 40, 576
    for config in candidate_configs(m, n, k, DEVICE):
        _check(fmt, m, n, k, torch.float16, config, bias=False)


@interpreter
@pytest.mark.parametrize("fmt", FORMATS)
def test_default_config_batched_input(fmt: str) -> None:
    _check(fmt, (2, 3), 40, 576, torch.bfloat16, None)


@interpreter
@pytest.mark.parametrize("config", [KernelConfig(1, 16, 64, split_k=5), KernelConfig(16, 16, 64, split_k=5)])
def test_bitmask_split_k_aligns_to_the_offset_tile(config: KernelConfig) -> None:
    # block_k 64 with a 128-column offset tile: splits must start at multiples of 128.
    _check("bitmask", 2, 40, 1536, torch.float32, config, tile=128)


H100_SMS = 132  # also H200; the chooser aims at two programs per SM


# K = 2304 = 9 * 256 is not a multiple of the chunk a split covers, so the last split is shorter (and ends in
# a partial tile for block_k 512 / 1024). M 1: decode kernel; M 5: skinny tl.dot; M 33: medium tl.dot.
@interpreter
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_split_k_configs_chosen_for_a_gpu(monkeypatch: pytest.MonkeyPatch, fmt: str, m: int) -> None:
    """The split-K launches the config chooser picks on an H100, run on the interpreter.

    On the CPU the chooser sees one SM and never splits K; with the SM count patched to an H100's it splits
    the few output tiles of a skinny problem across K, and every such candidate (the default first) must give
    the reference result, fused bias included (added after the split partials are summed).
    """
    n, k = 40, 2304
    monkeypatch.setattr(common, "_sm_count", lambda device: H100_SMS)
    align = 256 if fmt == "bitmask" else 1  # the bitmask offset tile used by _check
    assert default_config(m, n, k, DEVICE).split_k > 1
    configs = [c for c in candidate_configs(m, n, k, DEVICE) if common.k_per_split(k, c, align)[1] > 1]
    assert configs[0] == default_config(m, n, k, DEVICE)  # the default launch really splits
    for config in configs:
        _check(fmt, m, n, k, torch.float16, config)
    # Large M fills the GPU with output tiles: no split.
    assert default_config(4096, n, k, DEVICE).split_k == 1


@interpreter
@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_input_and_bad_arguments(fmt: str) -> None:
    g = torch.Generator().manual_seed(0)
    weight = _weight(fmt, 16, 64, torch.float32, g)
    op, _ = _ops(fmt)
    assert op(torch.empty(0, 64, device=DEVICE), weight).shape == (0, 16)
    with pytest.raises(ValueError, match="K = 64"):
        op(torch.randn(2, 32, device=DEVICE), weight)
    with pytest.raises(ValueError, match="dtype"):
        op(torch.randn(2, 64, device=DEVICE, dtype=torch.float16), weight)
    with pytest.raises(ValueError, match="out must be"):
        op(torch.randn(2, 64, device=DEVICE), weight, out=torch.empty(2, 15, device=DEVICE))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="power of two"):
        KernelConfig(1, 48, 256)
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        KernelConfig(6, 32, 128)
    assert not KernelConfig(8, 32, 128).use_dot and KernelConfig(16, 32, 128).use_dot
    with pytest.raises(ValueError, match="block_k"):
        KernelConfig(1, 32, 16)
    with pytest.raises(ValueError, match="block_n"):
        KernelConfig(16, 8, 64)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", ["gemv", "matmul"])
def test_references_match_dense_matmul_in_float64(fmt: str, kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    weight = _weight(fmt, 24, 68, torch.float64, g)
    assert isinstance(weight, Sparse24Weight | BitmaskWeight)
    x = torch.randn(2, 5, 68, dtype=torch.float64, generator=g).to(DEVICE)
    bias = torch.randn(24, dtype=torch.float64, generator=g).to(DEVICE)
    _, reference = OPS[fmt, kind]
    torch.testing.assert_close(
        reference(x, weight, bias), x @ weight.decompress().T + bias, rtol=1e-12, atol=1e-12
    )


def test_decode_configs_batch_rows() -> None:
    """Batched decode: a decode program takes the power of two >= M rows (at most 8), and the dispatcher
    also times one row per program."""
    from oneshot.kernels._common import gemv_rows

    assert [gemv_rows(m) for m in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 8, 8]
    cpu = torch.device("cpu")
    assert default_config(1, 4096, 4096, cpu).block_m == 1
    assert default_config(3, 4096, 4096, cpu).block_m == 4
    for m, rows in ((3, 4), (12, 8)):
        decode = {c.block_m for c in candidate_configs(m, 4096, 4096, cpu) if not c.use_dot}
        assert decode == {rows, 1}, (m, decode)
