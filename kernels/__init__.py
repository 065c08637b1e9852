"""Sparse inference for pruned models: compressed formats, Triton kernels, ``SparseLinear`` and ``convert``.

* ``formats``: 2:4 (``Sparse24Weight``) and bitmask (``BitmaskWeight``) compression with exact round trips,
  2:4 with 4-bit group-quantized kept values (``Sparse24Int4Weight``: ``compress_24_int4`` from a weight on
  a given grid, exact; ``quantize_24_int4`` rounds to nearest), and a safetensors layout
  (``save_sparse``/``load_sparse``).
* ``sparse24_gemv``/``bitmask_gemv``: decode kernels (few input rows) that read the compressed weight once
  and never build the dense tile; ``sparse24_matmul``/``bitmask_matmul``: tile kernels that expand weight
  tiles on chip into ``tl.dot``; ``sparse24_int4_gemv``: the 2:4-int4 decode kernel (dequantizes the
  4-bit codes in registers; no tile kernel: larger M decompresses). Each has a pure-torch ``*_reference``
  next to it.
* ``Dispatcher``: picks, per (format, shape, M bucket, dtype, device), the fastest of our kernels,
  cuSPARSELt and the layer's dense fallback by timing once on CUDA, against the original dense layer
  (``F.linear`` on the dense weight) timed in the same process; caches the plan and persists the timings
  (``$ONESHOT_CACHE/dispatch-plans.json``). Without CUDA the dense path is used.
* ``SparseLinear``/``convert``/``densify``: swap pruned ``nn.Linear`` layers in a model; ``generate()`` is
  unchanged. ``keep_dense=True`` also keeps the dense weight, so the fallback is exactly the dense layer.
  ``convert(model, "2:4-int4", grid=run_folder)`` uses a quantized run's grid exactly (``read_int4_grid``);
  without ``grid`` it rounds to nearest (``group_size``, ``symmetric``).
* ``ops``: the custom ops ``torch.ops.oneshot.sparse24_linear``/``bitmask_linear``/``sparse24_int4_linear``
  (fake tensor and
  autograd implementations included), so a converted model compiles with ``torch.compile(fullgraph=True)``.
* ``load_sparse_model``/``save_compressed``/``load_compressed``: pruned checkpoint -> sparse model, and the
  compressed form on disk.
* ``bench`` (imported on demand): what ``scripts/bench_kernels.py`` measures on a GPU.

Importing this package does not import Triton (kernels are built on first use) and touches no GPU. To run the
Triton kernels on the CPU interpreter, set ``TRITON_INTERPRET=1`` before ``triton`` is first imported and
force ``backend="triton"``.

Typical use::

    from oneshot import kernels

    summary = kernels.convert(model, "2:4")  # swap pruned nn.Linear layers in place
    print(summary)
    kernels.save_compressed(model, "out/", tokenizer=tok)
    model = kernels.load_compressed("out/", device="cuda")
"""

import sys as _sys

if __name__ == "kernels":
    # Imported under the top-level name `kernels`: the repository root is on sys.path (python -m run from a
    # checkout, pytest's rootdir). That name belongs to the Hugging Face `kernels` package, which
    # transformers >= 5.25 installs and imports (`from kernels import ...` in its hub_kernels module). Hand the
    # name to the installed package, so transformers works from a checkout; this package is only ever meant
    # to be imported as `oneshot.kernels`. Without an installed `kernels` the name stays an empty module.
    from importlib.machinery import PathFinder as _PathFinder
    from importlib.util import module_from_spec as _module_from_spec
    from os.path import dirname as _dirname
    from os.path import realpath as _realpath

    _ours = _dirname(_realpath(__file__))  # this folder, also reached through the oneshot/kernels link
    for _entry in list(_sys.path):
        _spec = _PathFinder.find_spec("kernels", [_entry])
        _where = (
            None
            if _spec is None
            else (_spec.origin or next(iter(_spec.submodule_search_locations or []), None))
        )
        if _spec is None or _spec.loader is None or _where is None or _dirname(_realpath(_where)) == _ours:
            continue
        _installed = _module_from_spec(_spec)
        _sys.modules["kernels"] = _installed
        _spec.loader.exec_module(_installed)
        break
else:
    from ._common import KernelConfig, candidate_configs, default_config, interpreting, triton_available
    from .bitmask_gemv import bitmask_gemv, bitmask_gemv_reference
    from .bitmask_matmul import bitmask_matmul, bitmask_matmul_reference
    from .checkpoint import COMPRESSED_WEIGHTS, load_compressed, load_sparse_model, save_compressed
    from .dispatch import BACKENDS, Dispatcher, DispatchKey, Plan, default_dispatcher, m_bucket
    from .formats import (
        BitmaskWeight,
        Int4Grid,
        Sparse24Int4Weight,
        Sparse24Weight,
        SparseWeight,
        compress,
        compress_24,
        compress_24_int4,
        compress_bitmask,
        is_24_sparse,
        load_sparse,
        quantize_24_int4,
        save_sparse,
    )
    from .linear import (
        FORMATS,
        ConvertSummary,
        LayerReport,
        SparseLinear,
        convert,
        densify,
        read_int4_grid,
        summarize,
    )
    from .sparse24_gemv import sparse24_gemv, sparse24_gemv_reference
    from .sparse24_int4_gemv import sparse24_int4_gemv, sparse24_int4_gemv_reference
    from .sparse24_matmul import sparse24_matmul, sparse24_matmul_reference

    __all__ = [
        "BACKENDS",
        "COMPRESSED_WEIGHTS",
        "FORMATS",
        "BitmaskWeight",
        "ConvertSummary",
        "DispatchKey",
        "Dispatcher",
        "Int4Grid",
        "KernelConfig",
        "LayerReport",
        "Plan",
        "Sparse24Int4Weight",
        "Sparse24Weight",
        "SparseLinear",
        "SparseWeight",
        "bitmask_gemv",
        "bitmask_gemv_reference",
        "bitmask_matmul",
        "bitmask_matmul_reference",
        "candidate_configs",
        "compress",
        "compress_24",
        "compress_24_int4",
        "compress_bitmask",
        "convert",
        "default_config",
        "default_dispatcher",
        "densify",
        "interpreting",
        "is_24_sparse",
        "load_compressed",
        "load_sparse",
        "load_sparse_model",
        "m_bucket",
        "quantize_24_int4",
        "read_int4_grid",
        "save_compressed",
        "save_sparse",
        "sparse24_gemv",
        "sparse24_gemv_reference",
        "sparse24_int4_gemv",
        "sparse24_int4_gemv_reference",
        "sparse24_matmul",
        "sparse24_matmul_reference",
        "summarize",
        "triton_available",
    ]
