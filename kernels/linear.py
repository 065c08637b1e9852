"""``SparseLinear`` and ``convert``: swap pruned ``nn.Linear`` layers for compressed ones.

``convert(model, "2:4" | "2:4-int4" | "bitmask" | "auto")`` replaces, in place, every ``nn.Linear`` whose
weight is pruned (2:4: every group of 4 input columns has at least 2 zeros; bitmask: any zeros) by a
``SparseLinear`` that stores the compressed weight and multiplies with the fastest backend for each input
size (see ``kernels.dispatch``: on CUDA the candidates are timed against the original dense layer,
``F.linear`` on the dense weight, in the same process). Output embeddings (``lm_head``) and weights shared
with another module are left alone. The model's ``forward``/``generate`` are unchanged, and a converted model compiles with
``torch.compile(fullgraph=True)``: the Triton and reference paths are the custom ops of ``kernels.ops``.

``"2:4-int4"`` also stores the kept values as 4-bit codes on a per-group grid (``Sparse24Int4Weight``). With
``grid=`` (per layer scales/zero-points, or a quantized run folder: ``read_int4_grid``) the weights must lie
on it and the conversion is exact; without, they are rounded to nearest on a fresh grid (``group_size``,
``symmetric``), which changes the model. The converted layer computes the dequantized dense layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oneshot.walker import matches_ignore

from . import ops
from .dispatch import BACKENDS, Dispatcher, DispatchKey, Plan, default_dispatcher, m_bucket
from .formats import (
    DEFAULT_TILE,
    BitmaskWeight,
    Int4Grid,
    Sparse24Int4Weight,
    Sparse24Weight,
    SparseWeight,
    compress_24,
    compress_24_int4,
    compress_bitmask,
    is_24_sparse,
    quantize_24_int4,
)

__all__ = [
    "FORMATS",
    "ConvertSummary",
    "LayerReport",
    "SparseLinear",
    "convert",
    "densify",
    "read_int4_grid",
    "summarize",
]

FORMATS = ("2:4", "2:4-int4", "bitmask", "auto")
DEFAULT_IGNORE = ("lm_head",)
_PARTS = {
    "2:4": ("values", "meta"),
    "2:4-int4": ("codes", "meta", "scales", "zeros"),
    "bitmask": ("values", "bitmask", "offsets"),
}
_SCALE_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
_UNTIMED_DENSE = Plan("dense")


class SparseLinear(nn.Module):
    """A linear layer ``y = x @ W^T + b`` whose ``(N, K)`` weight is stored compressed.

    Buffers: ``weight_values`` and ``weight_meta`` (2:4) or ``weight_values``, ``weight_bitmask`` and
    ``weight_offsets`` (bitmask); see ``kernels.formats``. ``.to(dtype)``/``.to(device)`` convert them like
    any buffer. 2:4-int4: ``weight_codes``, ``weight_meta``, ``weight_scales`` (the scales' bit pattern as
    int16/int32, so that ``.to(dtype)`` leaves the grid alone) and ``weight_zeros`` (asymmetric grids);
    ``.to(dtype)`` changes the dtype the weight is dequantized to and computed in (``compute_dtype``).

    Args:
        weight: the compressed weight.
        bias: optional ``(N,)``.
        backend: ``"auto"`` (on CUDA: time the candidates once per input size against the original dense
            layer and cache the plan, see ``kernels.dispatch``; elsewhere: dense), or force ``"triton"``,
            ``"dense"`` (``F.linear`` on the kept dense copy, else decompress + ``F.linear``),
            ``"cusparselt"`` (2:4 on CUDA) or ``"reference"`` (the pure-torch ``*_reference`` ops, fp32
            accumulation).
        keep_dense: also keep the decompressed weight (not saved). The dense fallback is then exactly the
            original layer, so ``"auto"`` picks a sparse kernel only where it measured faster than the dense
            layer and is never slower than it beyond timing noise; costs the dense weight's memory on top of
            the compressed one. Without it the fallback decompresses on every call, and ``"auto"`` may pick
            a sparse kernel that is slower than the dense layer but faster than that (``last_plan.vs_dense``
            tells).
        dispatcher: plan cache; the process-wide ``default_dispatcher()`` if None.
    """

    weight_values: Tensor
    dense_weight: Tensor | None

    def __init__(
        self,
        weight: SparseWeight,
        bias: Tensor | None = None,
        *,
        backend: str = "auto",
        keep_dense: bool = False,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        if backend == "cusparselt" and not isinstance(weight, Sparse24Weight):
            raise ValueError("the 'cusparselt' backend needs a 2:4 weight")
        self.sparse_format: str = weight.format
        self.out_features, self.in_features = weight.shape
        self.tile = weight.tile if isinstance(weight, BitmaskWeight) else 0
        self.group_size = weight.group_size if isinstance(weight, Sparse24Int4Weight) else 0
        self.scale_dtype: torch.dtype | None = None
        for part, tensor in weight.tensors().items():
            if part == "scales":
                self.scale_dtype = tensor.dtype
                tensor = tensor.view(_SCALE_BITS[tensor.dtype])
            self.register_buffer(f"weight_{part}", tensor)
        if isinstance(weight, Sparse24Int4Weight):
            # Empty; follows .to(dtype)/.to(device) and so holds the dtype the weight is dequantized to.
            probe = torch.empty(0, dtype=weight.dtype, device=weight.device)
            self.register_buffer("weight_dtype_probe", probe, persistent=False)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({self.out_features},)")
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.backend = backend
        self.dispatcher = dispatcher
        self.register_buffer("dense_weight", weight.decompress() if keep_dense else None, persistent=False)
        self._semi_structured: Tensor | None = None
        self._weight_view: SparseWeight | None = None
        self._int4_key: tuple[object, ...] = ()
        self.last_plan: Plan | None = None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        format: str,
        *,
        tile: int = DEFAULT_TILE,
        backend: str = "auto",
        keep_dense: bool = False,
        dispatcher: Dispatcher | None = None,
        group_size: int | None = 128,
        symmetric: bool = True,
        grid: Int4Grid | None = None,
    ) -> SparseLinear:
        """Compress ``linear.weight`` (``"2:4"``, ``"2:4-int4"`` or ``"bitmask"``); raises ValueError if it is
        not 2:4 (or, with ``grid``, not on that 4-bit grid).

        ``"2:4-int4"``: with ``grid`` the weight must lie on it (exact); without, it is rounded to nearest on
        a new grid of ``group_size`` columns (None: one per row), symmetric or not.
        """
        w = linear.weight.detach()
        weight: SparseWeight
        if format == "2:4":
            weight = compress_24(w)
        elif format == "2:4-int4":
            if grid is None:
                weight = quantize_24_int4(w, group_size, symmetric)
            else:
                zeros = None if grid.zeros is None else grid.zeros.to(w.device)
                weight = compress_24_int4(w, grid.scales.to(w.device), zeros, grid.group_size)
        elif format == "bitmask":
            weight = compress_bitmask(w, tile)
        else:
            raise ValueError(f"unknown sparse format {format!r}; choose one of '2:4', '2:4-int4', 'bitmask'")
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight, bias, backend=backend, keep_dense=keep_dense, dispatcher=dispatcher)

    @property
    def _key_prefix(self) -> tuple[str, int, int, bool, bool]:
        return (
            self.sparse_format,
            self.out_features,
            self.in_features,
            self.bias is not None,
            self.keeps_dense,
        )

    @property
    def keeps_dense(self) -> bool:
        return self.dense_weight is not None

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype inputs are cast to and the weight is (de)compressed to."""
        if self.sparse_format == "2:4-int4":
            return self.get_buffer("weight_dtype_probe").dtype
        return self.weight_values.dtype

    def _scales(self) -> Tensor:
        """2:4-int4: the scales in their own dtype (a view of the ``weight_scales`` bits)."""
        if self.scale_dtype is None:
            raise ValueError(f"a {self.sparse_format} layer has no scales")
        return self.get_buffer("weight_scales").view(self.scale_dtype)

    def _zeros(self) -> Tensor | None:
        return self._buffers.get("weight_zeros")

    @property
    def weight_compressed(self) -> SparseWeight:
        """The compressed weight as a ``Sparse24Weight``/``Sparse24Int4Weight``/``BitmaskWeight`` view of the
        buffers."""
        shape = (self.out_features, self.in_features)
        if self.sparse_format == "2:4-int4":
            key = (*(self._buffers.get(f"weight_{p}") for p in _PARTS["2:4-int4"]), self.compute_dtype)
            if self._weight_view is None or any(a is not b for a, b in zip(key, self._int4_key, strict=True)):
                codes, meta = self.get_buffer("weight_codes"), self.get_buffer("weight_meta")
                self._weight_view = Sparse24Int4Weight(
                    codes, meta, self._scales(), self._zeros(), shape, self.group_size, self.compute_dtype
                )
                self._int4_key = key  # rebuilt when .to() replaces the buffers or changes the dtype
            return self._weight_view
        parts = [self.get_buffer(f"weight_{p}") for p in _PARTS[self.sparse_format]]
        view = self._weight_view
        if view is None or any(a is not b for a, b in zip(view.tensors().values(), parts, strict=True)):
            if self.sparse_format == "2:4":
                view = Sparse24Weight(parts[0], parts[1], shape)
            else:
                view = BitmaskWeight(parts[0], parts[1], parts[2], shape, self.tile)
            self._weight_view = view  # rebuilt when .to() replaces the buffers
        return view

    def dense(self) -> Tensor:
        """The dense ``(N, K)`` weight (the kept copy, or decompressed now)."""
        if self.dense_weight is not None:
            return self.dense_weight
        return self.weight_compressed.decompress()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the decompressed weight."""
        w = self.dense()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        grid = ""
        if self.sparse_format == "2:4-int4":
            kind = "symmetric" if self._zeros() is None else "asymmetric"
            grid = f", group_size={self.group_size}, {kind}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={self.sparse_format}{grid}, backend={self.backend}"
        )

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (..., K) -> (..., N) in the weight dtype."""
        dtype = self.compute_dtype
        if x.dtype != dtype:
            x = x.to(dtype)
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        plan = self._plan(x2)
        self.last_plan = plan
        return self.run(plan, x2).view(*x.shape[:-1], self.out_features)

    def run(self, plan: Plan, x2: Tensor) -> Tensor:
        """Execute ``plan`` on ``x2`` (M, K); returns (M, N)."""
        if plan.backend in ("triton", "reference"):
            config = ops.config_fields(plan.config)
            if self.sparse_format == "2:4":
                meta = self.get_buffer("weight_meta")
                return ops.sparse24_linear(x2, self.weight_values, meta, self.bias, plan.backend, config)
            if self.sparse_format == "2:4-int4":
                codes, meta = self.get_buffer("weight_codes"), self.get_buffer("weight_meta")
                return ops.sparse24_int4_linear(
                    x2,
                    codes,
                    meta,
                    self._scales(),
                    self._zeros(),
                    self.bias,
                    self.group_size,
                    plan.backend,
                    config,
                )
            bitmask, offsets = self.get_buffer("weight_bitmask"), self.get_buffer("weight_offsets")
            return ops.bitmask_linear(
                x2, self.weight_values, bitmask, offsets, self.bias, self.tile, plan.backend, config
            )
        if plan.backend == "dense":
            return F.linear(x2, self.dense(), self.bias)
        if plan.backend == "cusparselt":
            return F.linear(x2, self._semi_structured_weight(), self.bias)
        raise ValueError(f"unknown plan backend {plan.backend!r}")

    def _plan(self, x2: Tensor) -> Plan:
        if self.backend != "auto":
            return Plan(self.backend)
        dispatcher = self.dispatcher or default_dispatcher()
        if x2.device.type not in dispatcher.devices:
            return _UNTIMED_DENSE
        m = x2.shape[0]
        if torch.compiler.is_compiling():
            return _plan_while_tracing(dispatcher, *self._key_prefix, m, x2.dtype, x2.device)
        key = DispatchKey(*self._key_prefix, m_bucket(m), x2.dtype, x2.device)
        cached = dispatcher.cached(key)
        if cached is not None:
            return cached

        def dense_call() -> Callable[[], Tensor]:
            weight, bias = self.dense(), self.bias  # the kept copy, or decompressed once here (untimed)
            return lambda: F.linear(x2, weight, bias)  # what the original nn.Linear runs

        plan = dispatcher.plan(
            key,
            m,
            lambda p: self.run(p, x2),
            dense=dense_call,
            # fp16/bf16 only: cuSPARSELt/CUTLASS would run fp32 as TF32, silently losing precision.
            allow_cusparselt=self.sparse_format == "2:4" and x2.dtype in (torch.float16, torch.bfloat16),
        )
        if plan.backend != "cusparselt":
            self._semi_structured = None  # built only for timing: free it
        return plan

    def _semi_structured_weight(self) -> Tensor:
        w = self._semi_structured
        if w is None or w.device != self.weight_values.device or w.dtype != self.weight_values.dtype:
            from torch.sparse import to_sparse_semi_structured

            w = to_sparse_semi_structured(self.dense())
            self._semi_structured = w
        return w


@torch.compiler.assume_constant_result
def _plan_while_tracing(
    dispatcher: Dispatcher,
    format: str,
    n: int,
    k: int,
    has_bias: bool,
    keeps_dense: bool,
    m: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Plan:
    """The plan ``torch.compile`` bakes into the graph: a timed one from memory or the plan file, else the
    untimed heuristic (nothing can be timed on the fake tensors of a trace; run the model once before
    compiling, or keep a plan file, to compile timed plans). Dynamo runs this eagerly, on plain values."""
    key = DispatchKey(format, n, k, has_bias, keeps_dense, m_bucket(m), dtype, device)
    return dispatcher.lookup(key) or dispatcher.heuristic(m, n, k, device, format)


@dataclass(frozen=True)
class LayerReport:
    """What ``convert`` did with one ``nn.Linear``."""

    name: str
    shape: tuple[int, int]
    sparsity: float
    format: str | None  # None: left dense
    dense_bytes: int
    stored_bytes: int  # bytes after conversion (== dense_bytes if left dense)
    reason: str = ""


@dataclass
class ConvertSummary:
    """Per-layer results of ``convert``; ``str()`` gives a table."""

    layers: list[LayerReport] = field(default_factory=list)

    @property
    def converted(self) -> list[LayerReport]:
        return [r for r in self.layers if r.format is not None]

    @property
    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.format is None]

    @property
    def dense_bytes(self) -> int:
        return sum(r.dense_bytes for r in self.layers)

    @property
    def stored_bytes(self) -> int:
        return sum(r.stored_bytes for r in self.layers)

    def counts(self) -> dict[str, int]:
        """Number of layers per outcome: ``"2:4"``, ``"bitmask"``, ``"dense"``."""
        out: dict[str, int] = {}
        for r in self.layers:
            key = r.format or "dense"
            out[key] = out.get(key, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"{'layer':<48} {'shape':>13} {'sparsity':>8} {'format':>8}  note"]
        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            lines.append(f"{r.name:<48} {shape:>13} {r.sparsity:>8.3f} {r.format or 'dense':>8}  {r.reason}")
        ratio = self.stored_bytes / self.dense_bytes if self.dense_bytes else 1.0
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts().items()))
        lines.append(
            f"{counts}; linear weights {self.dense_bytes / 2**20:.1f} MiB -> "
            f"{self.stored_bytes / 2**20:.1f} MiB ({ratio:.3f} of dense)"
        )
        return "\n".join(lines)


def _shared_parameters(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def convert(
    model: nn.Module,
    format: str = "auto",
    *,
    ignore: Sequence[str] = (),
    include_lm_head: bool = False,
    min_sparsity: float = 0.3,
    tile: int = DEFAULT_TILE,
    group_size: int | None = 128,
    symmetric: bool = True,
    grid: Mapping[str, Int4Grid] | str | os.PathLike[str] | None = None,
    backend: str = "auto",
    keep_dense: bool = False,
    dispatcher: Dispatcher | None = None,
) -> ConvertSummary:
    """Replace pruned ``nn.Linear`` layers of ``model`` by ``SparseLinear`` in place.

    Args:
        model: any module; its dense weights should already hold the pruned zeros.
        format: ``"2:4"`` (layers whose every group of 4 input columns has >= 2 zeros), ``"2:4-int4"`` (the
            same layers, kept values as 4-bit codes; see ``grid``), ``"bitmask"`` (layers with any zero) or
            ``"auto"`` (2:4 where valid, else bitmask when the sparsity is at least ``min_sparsity``, else
            left dense; never 4-bit).
        ignore: glob patterns of module names to leave dense, matched against the full name or its trailing
            dotted parts (``"mlp.down_proj"``, ``"model.layers.0.*"``).
        include_lm_head: also convert the output embedding (``lm_head``); skipped by default, as are
            weights shared with another module (tied embeddings).
        min_sparsity: lowest sparsity converted to bitmask by ``"auto"`` (below it the bitmask is not
            smaller or faster than dense).
        tile: bitmask offset tile (columns).
        group_size, symmetric: ``"2:4-int4"`` without ``grid``: the grid weights are rounded to (nearest),
            ``group_size`` original columns per scale (32, 64, 128; None: one per row).
        grid: ``"2:4-int4"``: module name -> ``Int4Grid`` (the weights must lie exactly on it), or a
            quantized run folder (``oneshot prune --quantize w4a16``; read with ``read_int4_grid``). Every
            2:4 layer converted must have an entry.
        backend, keep_dense, dispatcher: passed to every ``SparseLinear``.

    Returns:
        A ``ConvertSummary`` with one entry per ``nn.Linear`` considered.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if grid is not None and format != "2:4-int4":
        raise ValueError(f"grid is for format '2:4-int4', not {format!r}")
    grids = read_int4_grid(grid) if isinstance(grid, str | os.PathLike) else grid
    patterns = tuple(ignore) + (() if include_lm_head else DEFAULT_IGNORE)
    output_embeddings: Any = None
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output) and not include_lm_head:
        output_embeddings = get_output()
    shared = _shared_parameters(model)
    summary = ConvertSummary()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        w = module.weight
        shape = (module.out_features, module.in_features)
        dense_bytes = w.numel() * w.element_size()
        sparsity = float("nan")
        chosen: str | None = None
        if matches_ignore(name, tuple(ignore)):
            reason = "ignored"
        elif matches_ignore(name, patterns) or module is output_embeddings:
            reason = "output embedding"
        elif id(w) in shared:
            reason = "weight shared with another module"
        elif w.device.type == "meta" or not w.is_floating_point():
            reason = f"weight is {w.dtype} on {w.device}"
        else:
            sparsity = float((w == 0).sum()) / w.numel()
            chosen, reason = _choose_format(w, format, sparsity, min_sparsity)
        if chosen is None:
            summary.layers.append(LayerReport(name, shape, sparsity, None, dense_bytes, dense_bytes, reason))
            continue
        layer_grid = None
        if chosen == "2:4-int4" and grids is not None:
            layer_grid = grids.get(name)
            if layer_grid is None:
                raise ValueError(
                    f"the grid has no entry for {name}, a 2:4 layer: pass the grid of every layer converted "
                    "(or leave it out with ignore=)"
                )
        try:
            new = SparseLinear.from_linear(
                module,
                chosen,
                tile=tile,
                group_size=group_size,
                symmetric=symmetric,
                grid=layer_grid,
                backend=backend,
                keep_dense=keep_dense,
                dispatcher=dispatcher,
            )
        except ValueError as err:
            if chosen != "2:4-int4":
                raise
            raise ValueError(f"{name}: {err}") from err
        _replace(model, name, new)
        stored = new.weight_compressed.nbytes
        summary.layers.append(LayerReport(name, shape, sparsity, chosen, dense_bytes, stored, reason))
    return summary


def _choose_format(w: Tensor, format: str, sparsity: float, min_sparsity: float) -> tuple[str | None, str]:
    """``(format or None, reason if None)`` for one weight."""
    if format in ("2:4", "2:4-int4"):
        return (format, "") if is_24_sparse(w) else (None, "not 2:4 sparse")
    if format == "bitmask":
        return ("bitmask", "") if sparsity > 0 else (None, "no zeros")
    if is_24_sparse(w):
        return "2:4", ""
    if sparsity >= min_sparsity and sparsity > 0:
        return "bitmask", ""
    return None, f"sparsity {sparsity:.3f} < min_sparsity {min_sparsity}"


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def densify(model: nn.Module) -> int:
    """Replace every ``SparseLinear`` of ``model`` by an equivalent ``nn.Linear``; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            _replace(model, name, module.to_linear())
            count += 1
    return count


def summarize(model: nn.Module) -> ConvertSummary:
    """A ``ConvertSummary`` of the ``SparseLinear`` layers already in ``model``."""
    summary = ConvertSummary()
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            weight = module.weight_compressed
            n, k = weight.shape
            dense_bytes = n * k * module.compute_dtype.itemsize
            if isinstance(weight, BitmaskWeight):
                nonzero = weight.nnz
            elif isinstance(weight, Sparse24Int4Weight):
                nonzero = int((weight.values() != 0).sum())
            else:
                nonzero = int((weight.values != 0).sum())
            summary.layers.append(
                LayerReport(
                    name, (n, k), 1 - nonzero / (n * k), module.sparse_format, dense_bytes, weight.nbytes
                )
            )
    return summary


def read_int4_grid(folder: str | os.PathLike[str]) -> dict[str, Int4Grid]:
    """The 4-bit grids of a quantized run folder (``oneshot prune --quantize w4a16``), by module name.

    Reads its ``quantization.safetensors`` (``oneshot.runfolder.read_quant_file``). Matrices of fused MoE
    experts (``name[i]``, not ``nn.Linear`` modules) are left out.

    Raises:
        ValueError: the run is not 4-bit, uses act-order (groups not contiguous in column order) or a
            grid's group index is not ``column // group_size``.
    """
    from oneshot.runfolder import read_quant_file

    tensors, facts = read_quant_file(Path(folder))
    if facts.get("bits") != 4:
        raise ValueError(f"{folder}: 2:4-int4 needs a 4-bit run, this one has {facts.get('bits')} bits")
    if facts.get("act_order"):
        raise ValueError(f"{folder}: act-order groups are not contiguous columns; 2:4-int4 cannot use them")
    symmetric = bool(facts.get("symmetric", True))
    group_size = facts.get("group_size")
    out: dict[str, Int4Grid] = {}
    for name, parts in tensors.items():
        if name.endswith("]"):
            continue
        scales, zeros, g_idx = (parts[p] for p in ("weight_scale", "weight_zero_point", "weight_g_idx"))
        cols = g_idx.numel()
        step = cols if group_size is None else int(group_size)
        if not torch.equal(g_idx.long(), torch.arange(cols) // step):
            raise ValueError(f"{folder}: the group index of {name} is not column // {step}")
        out[name] = Int4Grid(scales, None if symmetric else zeros, group_size)
    return out
