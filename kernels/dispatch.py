"""Choose the fastest way to multiply by a compressed weight, by timing once per shape and caching.

A plan is picked per ``(format, N, K, M bucket, dtype, device, bias, dense copy kept)`` among

* ``"triton"``: our kernels (``sparse24_matmul`` / ``bitmask_matmul``) over a few tile configs;
* ``"dense"``: ``F.linear`` with the dense weight (the layer's dense copy if it keeps one, else the weight
  decompressed on the fly, timed with the decompression included);
* ``"cusparselt"``: ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt or CUTLASS), 2:4 only, where
  the device and shape support it (the layer keeps that representation only while a plan uses it).

Dense is always a candidate, so the chosen plan is never slower than it beyond timing noise. Without CUDA
the plan is ``"dense"`` untimed (decompress + ``F.linear``, bit-identical to the dense model); Triton under
``TRITON_INTERPRET=1`` is only used when a layer's backend is forced to ``"triton"``. M is bucketed
(exact up to 16, then powers of two) so prefill lengths do not each trigger a timing run, and no timing
happens while a CUDA graph is being captured.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._common import KernelConfig, candidate_configs, default_config, triton_available

__all__ = [
    "BACKENDS",
    "DispatchKey",
    "Dispatcher",
    "Plan",
    "default_dispatcher",
    "m_bucket",
]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "dense", "cusparselt", "reference")
"""Valid ``backend`` values of a ``SparseLinear``; all but ``"auto"`` force one path."""

DispatchKey = tuple[str, int, int, bool, bool, int, torch.dtype, torch.device]
"""``(format, N, K, has_bias, keeps_dense_copy, M bucket, dtype, device)``."""


@dataclass(frozen=True)
class Plan:
    """How to run one layer call: a backend, the kernel config for ``"triton"``, and what was measured."""

    backend: str
    config: KernelConfig | None = None
    timings_ms: Mapping[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        if self.backend == "triton" and self.config is not None:
            c = self.config
            return f"triton[{c.block_m}x{c.block_n}x{c.block_k} split{c.split_k} w{c.num_warps}]"
        return self.backend


def m_bucket(m: int) -> int:
    """Rows of input that share a plan: exact up to 16, then the next power of two."""
    if m <= 16:
        return max(m, 1)
    return 1 << (m - 1).bit_length()


def _config_name(cfg: KernelConfig) -> str:
    return (
        f"triton:{cfg.block_m}x{cfg.block_n}x{cfg.block_k}:s{cfg.split_k}:w{cfg.num_warps}:st{cfg.num_stages}"
    )


class Dispatcher:
    """Times candidate plans once per ``DispatchKey`` and caches the fastest.

    Args:
        warmup: untimed calls per candidate (the first also compiles Triton kernels).
        reps: timed calls per candidate; the median is used.
        flush_l2: overwrite a 256 MiB buffer before each timed call so weights are read from memory, as
            they are in a real decode step where every layer's weights are touched once.
        margin: a non-dense plan must beat dense by this fraction to be chosen, so timing noise does not
            pick a plan that is really no faster.
    """

    def __init__(
        self, *, warmup: int = 3, reps: int = 15, flush_l2: bool = True, margin: float = 0.02
    ) -> None:
        if warmup < 0 or reps < 1 or not 0.0 <= margin < 1.0:
            raise ValueError(
                f"need warmup >= 0, reps >= 1 and 0 <= margin < 1; got {warmup}, {reps}, {margin}"
            )
        self.warmup = warmup
        self.reps = reps
        self.flush_l2 = flush_l2
        self.margin = margin
        self._plans: dict[DispatchKey, Plan] = {}
        self._flush: dict[torch.device, Tensor] = {}

    @property
    def plans(self) -> dict[DispatchKey, Plan]:
        """The cached plans (a copy)."""
        return dict(self._plans)

    def cached(self, key: DispatchKey) -> Plan | None:
        """The plan cached for ``key``, if any (no timing)."""
        return self._plans.get(key)

    def clear(self) -> None:
        self._plans.clear()
        self._flush.clear()

    def heuristic(self, m: int, n: int, k: int, device: torch.device) -> Plan:
        """An untimed plan: the decode kernel for small M on CUDA, dense otherwise."""
        if device.type != "cuda":
            return Plan("dense")
        if m <= 16 and triton_available():
            return Plan("triton", default_config(m, n, k, device))
        return Plan("dense")

    def plan(
        self,
        key: DispatchKey,
        m: int,
        n: int,
        k: int,
        device: torch.device,
        run: Callable[[Plan], Tensor],
        *,
        allow_cusparselt: bool,
    ) -> Plan:
        """The cached plan for ``key``, timing the candidates with ``run`` on first use.

        Args:
            key: cache key (see ``DispatchKey``).
            m, n, k: problem size of this call.
            device: where the call runs.
            run: executes a plan on the current input and returns the output.
            allow_cusparselt: whether ``"cusparselt"`` is a candidate (2:4 weights).
        """
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        if device.type != "cuda":
            return Plan("dense")
        if torch.cuda.is_current_stream_capturing():
            return self.heuristic(m, n, k, device)
        candidates: dict[str, Plan] = {"dense": Plan("dense")}
        if triton_available():
            for cfg in candidate_configs(m, n, k, device):
                candidates[_config_name(cfg)] = Plan("triton", cfg)
        if allow_cusparselt:
            candidates["cusparselt"] = Plan("cusparselt")
        timings: dict[str, float] = {}
        skippable = _candidate_errors()
        for name, candidate in candidates.items():
            try:
                timings[name] = self._time(lambda c=candidate: run(c), device)  # type: ignore[misc]
            except skippable as err:
                # Unsupported shape/dtype/arch for this candidate (cuSPARSELt limits, out of shared
                # memory for a tile config, ...): leave it out.
                logger.debug("dispatch %s: candidate %s unavailable: %s", key, name, err)
        self._flush.pop(device, None)
        if "dense" not in timings:
            raise RuntimeError(f"dense fallback failed for {key}; cannot choose a sparse matmul plan")
        best = min(timings, key=timings.__getitem__)
        if timings[best] > (1.0 - self.margin) * timings["dense"]:
            best = "dense"
        plan = Plan(candidates[best].backend, candidates[best].config, timings)
        logger.info(
            "dispatch %s -> %s (%.4f ms, dense %.4f ms)",
            key,
            plan.describe(),
            timings[best],
            timings["dense"],
        )
        self._plans[key] = plan
        return plan

    def _time(self, fn: Callable[[], object], device: torch.device) -> float:
        """Median milliseconds of ``fn`` on ``device`` (CUDA events)."""
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
