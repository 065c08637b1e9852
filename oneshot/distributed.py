"""Several processes through ``torch.distributed`` (``torchrun --nproc-per-node N -m oneshot prune ...``).

The block walk (`oneshot.pruner`) uses the default process group when one with more than one process is
initialised: every rank captures and propagates its own share of the calibration windows, the per-layer
input statistics (raw sums ``X^T X``, ``sum x^2``, the cross sums and token counts) are all-reduced before
each solve, every rank solves every layer on the same reduced statistics and rank 0's pruned weights are
broadcast (so the ranks never drift apart), and the per-block output error is reduced too. The jobs
(`oneshot.jobs.prune.run_job`) let rank 0 alone take the output, evaluate and write.

`setup` initialises the group from the environment torchrun / ``accelerate launch`` set (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``): gloo on the CPU, NCCL on CUDA devices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch

from oneshot.errors import OneshotError

__all__ = [
    "DistributedError",
    "all_reduce_stats",
    "all_reduce_sum",
    "broadcast_weights",
    "finish",
    "is_main",
    "is_worker_process",
    "local_device",
    "rank",
    "setup",
    "shard",
    "world_size",
]

logger = logging.getLogger(__name__)


class DistributedError(OneshotError):
    """An option or a model that a multi-process run does not support."""


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def world_size() -> int:
    """Processes of the default group (1 when none is initialised)."""
    dist = _dist()
    return int(dist.get_world_size()) if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    dist = _dist()
    return int(dist.get_rank()) if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def is_worker_process() -> bool:
    """Whether the launcher started this process as a rank other than 0 (from the environment, so it still
    holds after the group is closed): such a process prints no summary and writes nothing."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and int(os.environ.get("RANK", "0") or 0) > 0


def setup(device: str = "auto") -> int:
    """Initialise the default process group from the launcher's environment when ``WORLD_SIZE`` > 1 (once);
    returns the world size. NCCL when the run's device is CUDA (``auto`` with a GPU), else gloo."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    dist = _dist()
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        return world_size()
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = torch.cuda.is_available() and str(device) != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    logger.info("process %d of %d (%s)", rank(), world_size(), "nccl" if cuda else "gloo")
    return world_size()


def local_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda`` without an index becomes ``cuda:LOCAL_RANK`` in a multi-process run."""
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration windows (all of them in a single process)."""
    size = world_size()
    if size == 1:
        return windows
    if windows.shape[0] < size:
        raise DistributedError(
            f"{windows.shape[0]} calibration windows cannot be split over {size} processes: pass "
            f"--nsamples {size} or more"
        )
    return windows.tensor_split(size)[rank()]


def all_reduce_sum(values: list[float]) -> list[float]:
    """The sums over the ranks of a few numbers (float64)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    _dist().all_reduce(t)
    return [float(v) for v in t]


def all_reduce_stats(stats: Iterable[Any]) -> None:
    """Sum every `InputStats` (each once, in the given order, the same on every rank) over the ranks."""
    if world_size() == 1:
        return
    seen: set[int] = set()
    for s in stats:
        if id(s) in seen:
            continue
        seen.add(id(s))
        s.all_reduce()


def broadcast_weights(tensors: Iterable[torch.Tensor]) -> None:
    """Rank 0's values of these tensors on every rank (in place)."""
    if world_size() == 1:
        return
    dist = _dist()
    for t in tensors:
        if t.is_contiguous():
            dist.broadcast(t, src=0)
        else:  # a transposed view (GPT-2's Conv1D): through a contiguous copy
            buf = t.contiguous()
            dist.broadcast(buf, src=0)
            t.copy_(buf)


def finish() -> None:
    """Wait for every rank (rank 0 writes the output meanwhile), then close the default group."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
