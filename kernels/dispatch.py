"""Choose the fastest way to multiply by a compressed weight: time once per shape, cache, persist.

A plan is picked per ``DispatchKey`` (format, N, K, bias, dense copy kept, M bucket, dtype, device) by
timing, on the layer's own input:

* ``"dense"``: the original dense layer, i.e. ``F.linear`` on the dense weight, the op ``nn.Linear`` runs.
  A layer that keeps no dense copy decompresses its weight once before this timing (not timed) and frees it
  afterwards, so this is the real dense baseline, not a decompress-and-multiply straw man;
* ``"decompress"`` (layers without a dense copy only): what their dense fallback really costs, decompression
  plus ``F.linear``;
* ``"triton"``: our kernels (``sparse24_matmul`` / ``bitmask_matmul``) over a few tile configs; for the
  formats that have only a decode kernel (``DECODE_ONLY_FORMATS``: 2:4-int4, ``sparse24_int4_gemv``) the
  decode configs, and none above M = 16;
* ``"cusparselt"``: ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt or CUTLASS), 2:4 fp16/bf16 only,
  where the device and shape support it (the layer keeps that representation only while a plan uses it).

The layer then runs the fastest of the sparse candidates and its own dense fallback (``"dense"`` with a kept
copy, else ``"decompress"``); a sparse candidate must beat the fallback by ``margin``. Every plan records the
timings, and ``Plan.vs_dense`` is the original dense layer's time over the chosen plan's, both measured in
the same process on the same input. What that guarantees:

* with ``keep_dense=True`` the fallback *is* the original dense layer, so a sparse kernel is chosen only
  when it measured faster than the dense layer, and the plan is never slower than it beyond timing noise;
* without a dense copy a sparse kernel can be chosen although it is slower than the original dense layer
  (when it is still faster than decompress + ``F.linear``); ``vs_dense < 1`` and the log say so.

Plans are persisted (``plans_file``, default ``$ONESHOT_CACHE/dispatch-plans.json``; the environment
variable ``ONESHOT_DISPATCH_PLANS`` names another file, or ``off`` disables it) keyed by the GPU (name and
SM count), the torch, CUDA, Triton and oneshot versions and the ``DispatchKey``; the file holds the
timings, and the choice is made again from them on load, so a model's first call in a new process does not
time again. A corrupt file is ignored with a warning (and replaced on the next save).

Without CUDA the plan is ``"dense"`` untimed (decompress + ``F.linear``, bit-identical to the dense model);
Triton under ``TRITON_INTERPRET=1`` is only used when a layer's backend is forced to ``"triton"``. M is
bucketed (exact up to 16, then powers of two) so prefill lengths do not each trigger a timing run. Nothing is
timed while a CUDA graph is captured or ``torch.compile`` traces (``lookup`` gives a cached or persisted
plan, else the untimed ``heuristic``).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from oneshot.models import cache_root
from oneshot.runfolder import atomic_write_text

from ._common import (
    KernelConfig,
    candidate_configs,
    decode_candidates,
    decode_config,
    default_config,
    triton_available,
)

__all__ = [
    "BACKENDS",
    "DECODE_ONLY_FORMATS",
    "PLANS_ENV",
    "DispatchKey",
    "Dispatcher",
    "Plan",
    "default_dispatcher",
    "m_bucket",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "dense", "cusparselt", "reference")
"""Valid ``backend`` values of a ``SparseLinear``; all but ``"auto"`` force one path."""

DECODE_ONLY_FORMATS = frozenset({"2:4-int4"})
"""Formats with only a decode kernel: their Triton candidates are decode configs, for M <= 16 only."""

PLANS_ENV = "ONESHOT_DISPATCH_PLANS"
"""Environment variable: the plan file to use, or ``off`` (also ``0``, ``false``, ``none``) for none."""

PLANS_SCHEMA = "oneshot-dispatch-plans/1"
"""Format of the plan file; bump when the candidates or kernels change what a timing means."""

_OFF = ("off", "0", "false", "no", "none")
_BASELINE = "dense"  # the original dense layer: F.linear on the dense weight
_DECOMPRESS = "decompress"  # a layer's dense fallback without a kept copy: decompress + F.linear


class DispatchKey(NamedTuple):
    """What a plan is chosen for."""

    format: str
    n: int
    k: int
    has_bias: bool
    keeps_dense: bool
    m_bucket: int
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class Plan:
    """How to run one layer call: a backend, the kernel config for ``"triton"``, and what was measured.

    ``timings_ms`` maps every candidate that ran to its median milliseconds (``"dense"``: the original dense
    layer; ``"decompress"``: decompress + ``F.linear``; ``"triton:..."``; ``"cusparselt"``); ``candidate``
    is the chosen one's name (empty for untimed plans).
    """

    backend: str
    config: KernelConfig | None = None
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    candidate: str = ""

    def describe(self) -> str:
        if self.backend == "triton" and self.config is not None:
            c = self.config
            return f"triton[{c.block_m}x{c.block_n}x{c.block_k} split{c.split_k} w{c.num_warps}]"
        return self.backend

    @property
    def ms(self) -> float | None:
        """Measured milliseconds of the chosen candidate (None if untimed)."""
        return self.timings_ms.get(self.candidate)

    @property
    def vs_dense(self) -> float | None:
        """The original dense layer's time over this plan's (> 1: faster than dense); None if untimed."""
        ms, dense = self.ms, self.timings_ms.get(_BASELINE)
        return None if ms is None or dense is None or ms <= 0 else dense / ms


def m_bucket(m: int) -> int:
    """Rows of input that share a plan: exact up to 16, then the next power of two."""
    if m <= 16:
        return max(m, 1)
    return 1 << (m - 1).bit_length()


def _config_name(cfg: KernelConfig) -> str:
    return (
        f"triton:{cfg.block_m}x{cfg.block_n}x{cfg.block_k}:s{cfg.split_k}:g{cfg.group_m}:w{cfg.num_warps}"
        f":st{cfg.num_stages}"
    )


class Dispatcher:
    """Times candidate plans once per ``DispatchKey``, caches the fastest and persists the timings.

    Args:
        warmup: untimed calls per candidate (the first also compiles Triton kernels).
        reps: timed calls per candidate; the median is used.
        flush_l2: overwrite a 256 MiB buffer before each timed call so weights are read from memory, as
            they are in a real decode step where every layer's weights are touched once.
        margin: a sparse plan must beat the layer's dense fallback by this fraction to be chosen, so timing
            noise does not pick a plan that is really no faster.
        persist: read and write timings in ``plans_file``; False keeps them in memory only.
        plans_file: the plan file; if None, ``$ONESHOT_DISPATCH_PLANS`` (``off`` disables persisting) or
            ``dispatch-plans.json`` in the oneshot cache (``$ONESHOT_CACHE``, default ``~/.cache/oneshot``).
    """

    devices: tuple[str, ...] = ("cuda",)
    """Device types whose calls are timed; elsewhere the plan is ``"dense"``, untimed."""

    def __init__(
        self,
        *,
        warmup: int = 3,
        reps: int = 15,
        flush_l2: bool = True,
        margin: float = 0.02,
        persist: bool = True,
        plans_file: str | os.PathLike[str] | None = None,
    ) -> None:
        if warmup < 0 or reps < 1 or not 0.0 <= margin < 1.0:
            raise ValueError(
                f"need warmup >= 0, reps >= 1 and 0 <= margin < 1; got {warmup}, {reps}, {margin}"
            )
        self.warmup = warmup
        self.reps = reps
        self.flush_l2 = flush_l2
        self.margin = margin
        self.persist = persist
        self._plans_file = None if plans_file is None else Path(plans_file)
        self._plans: dict[DispatchKey, Plan] = {}
        self._flush: dict[torch.device, Tensor] = {}
        self._stored: dict[str, dict[str, Any]] | None = None  # the plan file's entries, read once

    @property
    def plans(self) -> dict[DispatchKey, Plan]:
        """The plans in memory (a copy)."""
        return dict(self._plans)

    @property
    def plans_path(self) -> Path | None:
        """The plan file read and written, or None when plans are not persisted."""
        if not self.persist:
            return None
        if self._plans_file is not None:
            return self._plans_file
        env = os.environ.get(PLANS_ENV, "").strip()
        if env and env.lower() in _OFF:
            return None
        return Path(env).expanduser() if env else cache_root() / "dispatch-plans.json"

    def cached(self, key: DispatchKey) -> Plan | None:
        """The plan in memory for ``key``, if any (no timing, no file access)."""
        return self._plans.get(key)

    def lookup(self, key: DispatchKey) -> Plan | None:
        """The plan for ``key`` from memory or the plan file, if either has it (no timing)."""
        plan = self._plans.get(key)
        if plan is None:
            plan = self._from_file(key)
            if plan is not None:
                self._plans[key] = plan
        return plan

    def clear(self) -> None:
        """Forget the plans in memory (the plan file is read again on next use, not deleted)."""
        self._plans.clear()
        self._flush.clear()
        self._stored = None

    def heuristic(self, m: int, n: int, k: int, device: torch.device, format: str = "2:4") -> Plan:
        """An untimed plan: our kernel for small M on CUDA (the decode kernel for ``DECODE_ONLY_FORMATS``),
        dense otherwise."""
        if device.type != "cuda":
            return Plan("dense")
        if m <= 16 and triton_available():
            if format in DECODE_ONLY_FORMATS:
                return Plan("triton", decode_config(m, n, k, device))
            return Plan("triton", default_config(m, n, k, device))
        return Plan("dense")

    def plan(
        self,
        key: DispatchKey,
        m: int,
        run: Callable[[Plan], Tensor],
        *,
        dense: Callable[[], Callable[[], Tensor]],
        allow_cusparselt: bool,
    ) -> Plan:
        """The plan for ``key``: from memory or the plan file, else timing the candidates on this input.

        Args:
            key: what the plan is for (see ``DispatchKey``).
            m: rows of this call's input.
            run: executes a plan on this call's input and returns the output.
            dense: prepares the original dense layer's call on this input (``F.linear`` on the dense weight,
                decompressed here if the layer keeps no copy; not timed) and returns it; that dense weight is
                released as soon as its timing ends, before the other candidates run.
            allow_cusparselt: whether ``"cusparselt"`` is a candidate (2:4 fp16/bf16 weights).
        """
        device = key.device
        if device.type not in self.devices:
            return Plan("dense")
        found = self.lookup(key)
        if found is not None:
            return found
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return self.heuristic(m, key.n, key.k, device, key.format)
        timings, configs = self._measure(key, m, run, dense, allow_cusparselt)
        plan = self._choose(timings, configs, key.keeps_dense)
        fallback = _BASELINE if key.keeps_dense else _DECOMPRESS
        logger.info(
            "dispatch %s -> %s (%.4f ms; original dense layer %.4f ms, %.2fx; fallback %s %.4f ms)",
            tuple(key),
            plan.describe(),
            timings[plan.candidate],
            timings[_BASELINE],
            plan.vs_dense or 0.0,
            fallback,
            timings[fallback],
        )
        self._plans[key] = plan
        self._save(key, timings, configs)
        return plan

    def _measure(
        self,
        key: DispatchKey,
        m: int,
        run: Callable[[Plan], Tensor],
        dense: Callable[[], Callable[[], Tensor]],
        allow_cusparselt: bool,
    ) -> tuple[dict[str, float], dict[str, KernelConfig]]:
        """Median milliseconds of every candidate that runs, and the tile config of each Triton one."""
        device = key.device
        timings = {_BASELINE: self._time_dense(dense, device)}
        candidates: dict[str, Plan] = {}
        if not key.keeps_dense:
            candidates[_DECOMPRESS] = Plan("dense")
        configs: dict[str, KernelConfig] = {}
        if triton_available():
            offered = decode_candidates if key.format in DECODE_ONLY_FORMATS else candidate_configs
            for cfg in offered(m, key.n, key.k, device):
                configs[_config_name(cfg)] = cfg
                candidates[_config_name(cfg)] = Plan("triton", cfg)
        if allow_cusparselt:
            candidates["cusparselt"] = Plan("cusparselt")
        skippable = _candidate_errors()
        for name, candidate in candidates.items():
            try:
                timings[name] = self._time(name, lambda c=candidate: run(c), device)  # type: ignore[misc]
            except skippable as err:
                # Unsupported shape/dtype/arch for this candidate (cuSPARSELt limits, out of shared
                # memory for a tile config, ...): leave it out.
                logger.debug("dispatch %s: candidate %s unavailable: %s", tuple(key), name, err)
        self._flush.pop(device, None)
        if not key.keeps_dense and _DECOMPRESS not in timings:
            raise RuntimeError(f"decompress + F.linear failed for {key}; cannot choose a sparse matmul plan")
        return timings, {name: cfg for name, cfg in configs.items() if name in timings}

    def _choose(
        self, timings: Mapping[str, float], configs: Mapping[str, KernelConfig], keeps_dense: bool
    ) -> Plan:
        """The fastest sparse candidate if it beats the layer's dense fallback by ``margin``, else that."""
        fallback = _BASELINE if keeps_dense else _DECOMPRESS
        sparse = {name: ms for name, ms in timings.items() if name not in (_BASELINE, _DECOMPRESS)}
        best = min(sparse, key=sparse.__getitem__) if sparse else None
        if best is None or sparse[best] > (1.0 - self.margin) * timings[fallback]:
            return Plan("dense", None, dict(timings), fallback)
        if best == "cusparselt":
            return Plan("cusparselt", None, dict(timings), best)
        return Plan("triton", configs[best], dict(timings), best)

    def _time_dense(self, dense: Callable[[], Callable[[], Tensor]], device: torch.device) -> float:
        """Time the original dense layer; its dense weight is freed when this returns."""
        return self._time(_BASELINE, dense(), device)

    def _time(self, name: str, fn: Callable[[], object], device: torch.device) -> float:
        """Median milliseconds of ``fn`` (candidate ``name``) on ``device`` (CUDA events)."""
        for _ in range(self.warmup):
            fn()
        flush = self._flush_buffer(device)
        times = []
        with torch.cuda.device(device):
            for _ in range(self.reps):
                if flush is not None:
                    flush.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        return statistics.median(times)

    def _flush_buffer(self, device: torch.device) -> Tensor | None:
        if not self.flush_l2:
            return None
        if device not in self._flush:
            try:
                self._flush[device] = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
            except torch.cuda.OutOfMemoryError:
                logger.warning("dispatch: no memory for the 256 MiB L2 flush buffer; timing without flushing")
                return None
        return self._flush[device]

    # --- the plan file -------------------------------------------------------------------------------

    def _from_file(self, key: DispatchKey) -> Plan | None:
        path = self.plans_path
        if path is None:
            return None
        if self._stored is None:
            self._stored = _read_plans(path)
        entry = self._stored.get(_file_key(key))
        if entry is None:
            return None
        try:
            timings = {str(name): float(ms) for name, ms in entry["timings_ms"].items()}
            configs = {str(name): KernelConfig(**cfg) for name, cfg in entry.get("configs", {}).items()}
            fallback = _BASELINE if key.keeps_dense else _DECOMPRESS
            if fallback not in timings or any(
                name not in configs for name in timings if name.startswith("triton:")
            ):
                raise ValueError("timings without a dense fallback or tile config")
            return self._choose(timings, configs, key.keeps_dense)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            logger.warning("dispatch: ignoring a malformed entry of %s (%s); timing again", path, err)
            return None

    def _save(
        self, key: DispatchKey, timings: Mapping[str, float], configs: Mapping[str, KernelConfig]
    ) -> None:
        path = self.plans_path
        if path is None:
            return
        entry = {"timings_ms": dict(timings), "configs": {name: asdict(cfg) for name, cfg in configs.items()}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stored = _read_plans(path, quiet=True)  # merge what other processes wrote since
            stored[_file_key(key)] = entry
            # Not sort_keys: the candidates' order (default config first) breaks ties when read back.
            text = json.dumps({"schema": PLANS_SCHEMA, "plans": stored}, indent=1)
            atomic_write_text(path, text + "\n")
            self._stored = stored
        except OSError as err:
            logger.warning(
                "dispatch: cannot write the plan file %s (%s); keeping plans in memory only", path, err
            )
            self.persist = False


def _read_plans(path: Path, *, quiet: bool = False) -> dict[str, dict[str, Any]]:
    """The entries of a plan file; {} (with a warning unless ``quiet``) if it is missing or unusable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        if not quiet:
            logger.warning("dispatch: ignoring the unreadable plan file %s (%s); timing again", path, err)
        return {}
    if (
        not isinstance(data, dict)
        or data.get("schema") != PLANS_SCHEMA
        or not isinstance(data.get("plans"), dict)
    ):
        if not quiet:
            logger.warning(
                "dispatch: ignoring the plan file %s: not a %s file; timing again", path, PLANS_SCHEMA
            )
        return {}
    return {str(k): v for k, v in data["plans"].items() if isinstance(v, dict)}


def _file_key(key: DispatchKey) -> str:
    """The plan file's key for ``key``: the machine and library versions, then the ``DispatchKey``."""
    return "|".join(
        (
            _device_name(key.device),
            f"torch {torch.__version__}",
            f"cuda {torch.version.cuda}",
            f"triton {_version('triton')}",
            f"oneshot {_version('oneshot')}",
            key.format,
            f"{key.n}x{key.k}",
            f"bias {int(key.has_bias)}",
            f"dense kept {int(key.keeps_dense)}",
            f"m {key.m_bucket}",
            str(key.dtype).removeprefix("torch."),
        )
    )


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} ({props.multi_processor_count} SMs)"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _candidate_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (RuntimeError, NotImplementedError, ValueError)
    if triton_available():
        from triton.errors import TritonError

        errors = (*errors, TritonError)
    return errors


_DEFAULT = Dispatcher()


def default_dispatcher() -> Dispatcher:
    """The process-wide dispatcher used by ``SparseLinear`` unless one is passed explicitly."""
    return _DEFAULT
