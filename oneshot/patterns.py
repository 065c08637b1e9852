"""The structure of a checkpoint read from its weight files alone, against another checkpoint: tensor
shapes, pruned weights that are no longer zero, N:M groups with too few zeros. `oneshot recover` proves with
it that recovery kept the run's structure; it shares no code with the training."""

from __future__ import annotations

import json
from pathlib import Path

from oneshot.errors import OneshotError, first_line
from oneshot.runfolder import INDEX_FILE, MaskCheck

__all__ = ["PatternError", "compare_patterns"]


class PatternError(OneshotError):
    """The weight files cannot be read or do not hold the tensors the record names."""


def _folder_weights(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file of the checkpoint in ``folder`` (sharded: its index; else model.safetensors)."""
    from safetensors import safe_open

    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PatternError(f"{index} has no readable weight_map ({first_line(exc)})") from exc
        return {str(k): str(v) for k, v in weight_map.items()}
    path = folder / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict.fromkeys(fh.keys(), path.name)
    except Exception as exc:  # SafetensorError is not an OSError
        raise PatternError(f"{path}: the weights cannot be read ({first_line(exc)})") from exc


def _pruned_keys(layers: list[str], names: set[str]) -> list[str]:
    """The checkpoint tensors of the pruned matrices a record names (``<name>.weight``, or the fused expert
    tensor ``<experts>.<param>`` of ``<experts>.<param>[e]``); empty when the files use other names."""
    out: set[str] = set()
    for layer in layers:
        base = layer.split("[", 1)[0]
        key = base if "[" in layer else f"{base}.weight"
        if key not in names:
            return []
        out.add(key)
    return sorted(out)


def compare_patterns(
    before: Path, after: Path, layers: list[str] | None, nm: tuple[int, int] | None
) -> MaskCheck:
    """The sparsity pattern of the checkpoint in ``after`` against the one in ``before``, read from the weight
    files alone: every tensor kept its shape; in the pruned matrices (``layers`` of the record; None for a
    shrunk model) no weight that was zero is non-zero now, and with ``nm`` = (N, M) every group of M
    consecutive input weights still holds at least N zeros."""
    from safetensors import safe_open

    b_where, a_where = _folder_weights(before), _folder_weights(after)
    shapes_equal = set(b_where) == set(a_where)
    for key in sorted(set(b_where) & set(a_where)):
        with (
            safe_open(str(before / b_where[key]), framework="pt") as fb,
            safe_open(str(after / a_where[key]), framework="pt") as fa,
        ):
            if list(fb.get_slice(key).get_shape()) != list(fa.get_slice(key).get_shape()):
                shapes_equal = False
    check = MaskCheck(matrices=0, pruned_before=0, zeros_after=0, revived=0, shapes_equal=shapes_equal)
    if layers:
        keys = _pruned_keys(layers, set(b_where) & set(a_where))
        if not keys:
            raise PatternError(
                "the pruned matrices the record names are not in the checkpoint under those names: the pattern "
                "cannot be checked"
            )
        check.nm = f"{nm[0]}:{nm[1]}" if nm is not None else None
        for key in keys:
            with safe_open(str(before / b_where[key]), framework="pt") as fb:
                w_before = fb.get_tensor(key)
            with safe_open(str(after / a_where[key]), framework="pt") as fa:
                w_after = fa.get_tensor(key)
            if w_before.shape != w_after.shape:
                continue
            zero_before = w_before == 0
            check.matrices += 1
            check.pruned_before += int(zero_before.sum())
            check.zeros_after += int((w_after == 0).sum())
            check.revived += int((zero_before & (w_after != 0)).sum())
            if nm is not None and w_after.shape[-1] % nm[1] == 0:
                zeros = (w_after.reshape(-1, nm[1]) == 0).sum(-1)  # (groups,)
                check.nm_groups += zeros.numel()
                check.nm_broken += int((zeros < nm[0]).sum())
    check.exact = check.shapes_equal and check.revived == 0 and check.nm_broken == 0
    return check
