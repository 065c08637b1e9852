"""Compressed formats: exact round trips, hand-computed layouts, errors, safetensors files and their size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oneshot.kernels.formats import (
    BitmaskWeight,
    Sparse24Weight,
    compress,
    compress_24,
    compress_bitmask,
    is_24_sparse,
    load_sparse,
    save_sparse,
)

REPO = Path(__file__).resolve().parent.parent
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude entries of every group of 4 columns."""
    groups = w.reshape(w.shape[0], -1, 4)  # (N, K/4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(w.shape)


def random_24(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A 2:4 weight that also has groups with 1 and 0 nonzeros."""
    g = _gen(seed)
    w = prune_24(torch.randn(n, k, generator=g))
    w[torch.rand(n, k, generator=g) < 0.15] = 0
    return w.to(dtype)


def random_unstructured(n: int, k: int, dtype: torch.dtype, seed: int, sparsity: float = 0.5) -> torch.Tensor:
    """Random mask at ``sparsity``, plus an all-zero row and a fully dense row."""
    g = _gen(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    w[0] = 0
    w[-1] = torch.randn(k, generator=g).abs() + 0.1
    return w.to(dtype)


def test_24_hand_computed_layout() -> None:
    # Groups: [0, a, 0, b] -> positions (1, 3); [c, 0, 0, 0] -> (0, 1) with a stored zero.
    w = torch.tensor([[0.0, 2.0, 0.0, -3.0, 5.0, 0.0, 0.0, 0.0]])
    c = compress_24(w)
    assert torch.equal(c.values, torch.tensor([[2.0, -3.0, 5.0, 0.0]]))
    # Positions 1, 3, 0, 1 packed two bits each, low bits first: 1 | 3 << 2 | 0 << 4 | 1 << 6 = 77.
    assert c.meta.tolist() == [[77]]
    assert torch.equal(c.decompress(), w)


def test_bitmask_hand_computed_layout() -> None:
    w = torch.zeros(2, 16)
    w[0, 1] = 1.0
    w[0, 9] = 2.0
    w[1, 0] = 3.0
    w[1, 15] = 4.0
    c = compress_bitmask(w, tile=8)
    assert c.values.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert c.bitmask.tolist() == [[0b10, 0b10], [0b1, 0b10000000]]
    assert c.offsets.tolist() == [[0, 1], [2, 3]]  # first value of each (row, 8-column tile)
    assert torch.equal(c.decompress(), w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 576), (33, 1536), (5, 12), (1, 4)])
def test_24_round_trip(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    w = random_24(*shape, dtype=dtype, seed=sum(shape))
    c = compress_24(w)
    n, k = shape
    assert c.values.shape == (n, k // 2) and c.values.dtype == dtype
    assert c.meta.shape == (n, -(-k // 8)) and c.meta.dtype == torch.uint8
    c.validate()
    out = c.decompress()
    assert out.dtype == dtype
    assert torch.equal(out, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "tile"), [((7, 576), 256), ((33, 1536), 64), ((4, 13), 8), ((3, 100), 32)])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_bitmask_round_trip(dtype: torch.dtype, shape: tuple[int, int], tile: int, sparsity: float) -> None:
    w = random_unstructured(*shape, dtype=dtype, seed=sum(shape), sparsity=sparsity)
    c = compress_bitmask(w, tile)
    n, k = shape
    assert c.nnz == int((w != 0).sum())
    assert c.bitmask.shape == (n, -(-k // 8)) and c.offsets.shape == (n, -(-k // tile))
    c.validate()
    assert torch.equal(c.decompress(), w)
    assert torch.equal(c.mask(), w != 0)


def test_24_rejects_three_nonzeros_with_location() -> None:
    w = prune_24(torch.randn(4, 16, generator=_gen(1)))
    w[2, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    assert not is_24_sparse(w)
    with pytest.raises(ValueError, match=r"not 2:4 sparse.*row 2, columns 8\.\.11"):
        compress_24(w)


def test_24_rejects_bad_k_and_bad_input() -> None:
    with pytest.raises(ValueError, match="% 4"):
        compress_24(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="2-D"):
        compress_24(torch.zeros(8))
    with pytest.raises(ValueError, match="floating"):
        compress_bitmask(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 8"):
        compress_bitmask(torch.zeros(2, 8), tile=12)
    with pytest.raises(ValueError, match="choose one of"):
        compress(torch.zeros(2, 8), "4:8")  # type: ignore[arg-type]


def test_corruption_is_detected() -> None:
    c = compress_24(random_24(3, 16, torch.float32, 0))
    bad = Sparse24Weight(c.values, torch.zeros_like(c.meta), c.shape)  # both positions 0
    with pytest.raises(ValueError, match="distinct"):
        bad.validate()
    b = compress_bitmask(random_unstructured(3, 40, torch.float32, 0), tile=8)
    shifted = BitmaskWeight(b.values, b.bitmask, b.offsets + 1, b.shape, b.tile)
    with pytest.raises(ValueError, match="offsets"):
        shifted.validate()
    with pytest.raises(ValueError, match="values shape"):
        Sparse24Weight(c.values[:, :-1], c.meta, c.shape)


def test_save_load_round_trip(tmp_path: Path) -> None:
    w24 = random_24(9, 576, torch.bfloat16, 3)
    wbm = random_unstructured(11, 1536, torch.float16, 4)
    dense = torch.randn(5, generator=_gen(5))
    path = tmp_path / "w.safetensors"
    save_sparse(
        path,
        {"a.weight": compress_24(w24), "b.weight": compress_bitmask(wbm, 128), "a.bias": dense},
        {"note": "hello"},
    )
    loaded, meta = load_sparse(path)
    assert meta["note"] == "hello"
    assert set(loaded) == {"a.weight", "b.weight", "a.bias"}
    a, b = loaded["a.weight"], loaded["b.weight"]
    assert isinstance(a, Sparse24Weight) and isinstance(b, BitmaskWeight)
    assert b.tile == 128
    assert torch.equal(a.decompress(), w24) and torch.equal(b.decompress(), wbm)
    assert torch.equal(loaded["a.bias"], dense)  # type: ignore[arg-type]


@pytest.mark.parametrize("format", ["2:4", "bitmask"])
def test_disk_size_of_half_sparse_bf16(tmp_path: Path, format: str) -> None:
    from safetensors.torch import save_file

    n, k = 256, 1536
    if format == "2:4":
        w = prune_24(torch.randn(n, k, generator=_gen(7))).bfloat16()
    else:
        w = torch.randn(n, k, generator=_gen(7))
        w[torch.rand(n, k, generator=_gen(8)) < 0.5] = 0
        w = w.bfloat16()
    save_file({"w": w}, tmp_path / "dense.safetensors")
    save_sparse(tmp_path / "sparse.safetensors", {"w": compress(w, format)})  # type: ignore[arg-type]
    ratio = (tmp_path / "sparse.safetensors").stat().st_size / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio <= 0.6, f"{format}: compressed file is {ratio:.3f} of dense"


def test_to_moves_and_casts() -> None:
    c = compress_24(random_24(4, 32, torch.float32, 9)).to(dtype=torch.float16)
    assert c.values.dtype == torch.float16 and c.meta.dtype == torch.uint8
    b = compress_bitmask(random_unstructured(4, 32, torch.float32, 9)).to("cpu", torch.bfloat16)
    assert b.values.dtype == torch.bfloat16 and b.offsets.dtype == torch.int32


def test_import_has_no_side_effects_and_works_without_triton() -> None:
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"  # make `import triton` fail
        "import torch\n"
        "from oneshot import kernels\n"
        "import oneshot.kernels.bench\n"
        "assert not kernels.triton_available()\n"
        "assert not torch.cuda.is_initialized()\n"
        "w = torch.zeros(4, 8); w[:, ::4] = 1\n"
        "lin = kernels.SparseLinear(kernels.compress_24(w))\n"
        "x = torch.randn(3, 8)\n"
        "assert torch.equal(lin(x), x @ w.T)\n"
        "try:\n"
        "    kernels.sparse24_matmul(x, kernels.compress_24(w))\n"
        "except RuntimeError as err:\n"
        "    assert 'triton' in str(err)\n"
        "else:\n"
        "    raise AssertionError('expected RuntimeError without triton')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
