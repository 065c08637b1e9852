"""Several processes through ``torch.distributed`` (``torchrun --nproc-per-node N -m oneshot prune ...``).

The block walk (`oneshot.pruner`) uses the default process group when one with more than one process is
initialised: every rank captures and propagates its own share of the calibration windows, the per-layer
input statistics (raw sums ``X^T X``, ``sum x^2``, the cross sums and token counts) are all-reduced before
each solve, the layers of a stage are divided among the ranks (`assign_solves`: layers reading one input
stay together, so a Hessian is factorised once) and each result goes from its rank to all (`exchange`),
and the per-block output error is reduced too. The jobs
(`oneshot.jobs.prune.run_job`) let rank 0 alone take the output, evaluate and write.

`setup` initialises the group from the environment torchrun / ``accelerate launch`` set (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``): gloo on the CPU, NCCL on CUDA devices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch

from oneshot.errors import OneshotError

__all__ = [
    "DistributedError",
    "all_reduce_stats",
    "all_reduce_sum",
    "assign_solves",
    "exchange",
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
    """This rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` in a multi-process run (one GPU per rank);
    a fixed ``cuda:N`` would put every rank on one GPU and is refused."""
    if device.type == "cuda" and world_size() > 1:
        if device.index is not None:
            raise DistributedError(
                f"--device {device} with several processes would put every rank on one GPU: pass --device "
                "cuda (or auto), each rank then takes the GPU of its LOCAL_RANK"
            )
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


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The sums over the ranks of a few numbers (float64, on ``device``: NCCL reduces CUDA tensors only)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
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


def finish() -> None:
    """Close the default group. No barrier: a worker leaves once its walk is done (rank 0 may still be
    writing for a long time), and a rank that failed leaves at once, so that the launcher stops the others
    instead of every rank waiting for it until the collective times out."""
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def assign_solves(
    layers: list[tuple[str, tuple[int, ...]]], shared: Callable[[str], Hashable | None]
) -> dict[str, int]:
    """The rank that solves each layer (name, (rows, cols)) of a stage. Layers whose ``shared(name)`` key is
    the same read one input (q/k/v, gate/up) and go to one rank, so its Hessian is factorised once; groups
    are handed out largest first (cost ~ cols^3 + rows * cols^2 per layer) to the least loaded rank. The
    result depends only on names, shapes and which layers share, so every rank computes the same."""
    size = world_size()
    if size == 1:
        return {name: 0 for name, _ in layers}
    groups: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    first: dict[Hashable, str] = {}
    for name, shape in layers:
        key = shared(name)
        label = name if key is None else first.setdefault(key, name)  # process-independent group label
        groups.setdefault(label, []).append((name, shape))
    order = list(groups)

    def cost(members: list[tuple[str, tuple[int, ...]]]) -> float:
        cols = members[0][1][-1]
        return float(cols) ** 3 + sum(float(shape[0]) * float(shape[-1]) ** 2 for _, shape in members)

    load = [0.0] * size
    owner: dict[str, int] = {}
    for label in sorted(order, key=lambda g: (-cost(groups[g]), order.index(g))):
        r = min(range(size), key=lambda i: (load[i], i))
        load[r] += cost(groups[label])
        for name, _ in groups[label]:
            owner[name] = r
    return owner


def exchange(outcome: Any, owner: int, like: torch.Tensor, make: Callable[..., Any]) -> Any:
    """The owner's ``outcome`` of one layer's solve (a dataclass with a ``weight`` tensor or None) on every
    rank: its other fields as one pickled object, the weight (shaped like ``like``) as a tensor broadcast;
    ``outcome`` is None on the other ranks, which rebuild it with ``make(**fields)``."""
    dist = _dist()
    mine = outcome is not None
    box: list[Any] = [
        {**vars(outcome), "weight": None, "_has_weight": outcome.weight is not None} if mine else None
    ]
    dist.broadcast_object_list(box, src=owner)
    fields = dict(box[0])
    has_weight = bool(fields.pop("_has_weight"))
    if has_weight:
        if mine:
            weight = outcome.weight.contiguous()
        else:
            weight = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        dist.broadcast(weight, src=owner)
        fields["weight"] = weight
    return outcome if mine else make(**fields)
