"""Block checkpoints: an interrupted `oneshot prune` continues from its last complete block (#15 item 2).

After every block the walk (`oneshot.pruner`) persists, in ``<tmp>/.resume/`` of the output's temporary
folder (`oneshot.output`; a folder holding a checkpoint survives the run's death and is not removed by the
next run on the same output):

- ``block-NNNNN.safetensors``: the tensors of pruned block NNNNN (its ``state_dict``);
- ``grids-NNNNN.safetensors``: the quantization grids of its matrices (quantized runs);
- ``hidden-NNNNN.safetensors``: the inputs of block NNNNN (one tensor per calibration batch) and the RNG
  state, for the next block;
- ``state.json``, replaced atomically last: the configuration fingerprint, the next block and the report
  so far. What it does not name is not part of the checkpoint (a run killed while writing a block leaves
  at most files that the next save overwrites).

A resumed walk loads blocks ``0 .. next-1`` into the model, the next block's inputs, the RNG state and the
report, and continues; the result is bit for bit that of an uninterrupted run. The fingerprint (method,
sparsity, pattern, calibration source and token ids, model source, dtype, device, batch size, library
versions, ...) must match field by field, otherwise `ResumeError` names the first difference.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oneshot.errors import OneshotError
from oneshot.output import RESUME_DIR, RESUME_STATE
from oneshot.runfolder import PruneReport, QuantizationRecord, from_dict, to_dict
from oneshot.solvers.quant import QuantizedWeight, QuantScheme

__all__ = ["FORMAT", "BlockCheckpoint", "ResumeError", "Resumed", "fingerprint_tensor"]

FORMAT = "oneshot-resume/1"
_RNG = "__rng__"
_GRID_PARTS = ("codes", "scales", "zeros", "g_idx")


class ResumeError(OneshotError):
    """A checkpoint that cannot be resumed with this command (another configuration, a damaged file)."""


def fingerprint_tensor(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (e.g. the calibration token ids)."""
    data = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


@dataclass
class Resumed:
    """What a checkpoint restores before block ``next_block``."""

    next_block: int
    hidden: list[torch.Tensor]
    rng: torch.Tensor
    report: PruneReport
    quant: QuantizationRecord | None
    qbits: int
    grids: dict[str, QuantizedWeight] = field(default_factory=dict)
    reference: list[torch.Tensor] | None = None  # --target dense: the dense model's inputs of the block


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file written under a temporary name and renamed (never half a file under ``path``)."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ResumeError(
            f"the checkpoint file {path} cannot be read ({exc}): remove {path.parent.parent} to start over"
        ) from exc


class BlockCheckpoint:
    """The checkpoint of one run in ``<tmp>/.resume``; ``key`` is the run's configuration fingerprint."""

    def __init__(self, tmp: Path, key: dict[str, Any]) -> None:
        self.tmp = tmp
        self.folder = tmp / RESUME_DIR
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))  # JSON-normalised

    # --- reading ---

    def state(self) -> dict[str, Any] | None:
        path = self.folder / RESUME_STATE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ResumeError(f"{path} cannot be read ({exc}): remove {self.tmp} to start over") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ResumeError(
                f"{path} is not a checkpoint of this oneshot version: remove {self.tmp} to start over"
            )
        return data

    def check(self, key: dict[str, Any] | None = None) -> None:
        """ResumeError naming the first field where the checkpoint's fingerprint differs from ``key`` (the
        fields ``key`` has; default: this checkpoint's whole key)."""
        state = self.state()
        if state is None:
            return
        saved = state.get("key", {})
        want = self.key if key is None else json.loads(json.dumps(key, sort_keys=True, default=str))
        for name in sorted(set(saved) | set(want)) if key is None else sorted(want):
            if saved.get(name) != want.get(name):
                raise ResumeError(
                    f"cannot resume: the interrupted run in {self.tmp} was made with {name} = "
                    f"{_short(saved.get(name))}, this command has {_short(want.get(name))}; repeat its exact "
                    f"options to resume, or remove {self.tmp} to start over"
                )

    def load(self, blocks: int, scheme: QuantScheme | None) -> Resumed | None:
        """The state to continue from (None when no block was saved yet); checks the whole fingerprint."""
        state = self.state()
        if state is None:
            return None
        self.check()
        if int(state["blocks"]) != blocks:
            raise ResumeError(
                f"cannot resume: the checkpoint in {self.tmp} has {state['blocks']} blocks, the model {blocks}"
            )
        nxt = int(state["next_block"])
        tensors = _load_tensors(self.folder / state["hidden"])
        rng = tensors.pop(_RNG)
        hidden = [tensors[str(b)] for b in range(sum(k.isdigit() for k in tensors))]
        reference = [tensors[f"ref.{b}"] for b in range(len(hidden))] if "ref.0" in tensors else None
        report = from_dict(PruneReport, state["report"])
        quant = None if state.get("quant") is None else from_dict(QuantizationRecord, state["quant"])
        grids: dict[str, QuantizedWeight] = {}
        if scheme is not None:
            for i in range(nxt):
                path = self.folder / f"grids-{i:05d}.safetensors"
                if not path.is_file():
                    continue
                parts = _load_tensors(path)
                for name in {k.rsplit(".", 1)[0] for k in parts}:
                    codes, scales, zeros, g_idx = (parts[f"{name}.{p}"] for p in _GRID_PARTS)
                    grids[name] = QuantizedWeight(codes, scales, zeros, g_idx, scheme)
        return Resumed(nxt, hidden, rng, report, quant, int(state.get("qbits", 0)), grids, reference)

    def restore_block(self, index: int, block: nn.Module) -> None:
        """Load the saved tensors of block ``index`` into ``block`` (in place, bit for bit)."""
        tensors = _load_tensors(self.folder / f"block-{index:05d}.safetensors")
        missing, unexpected = block.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ResumeError(
                f"cannot resume: block {index} of the checkpoint in {self.tmp} does not fit the model"
            )

    # --- writing ---

    def save(
        self,
        index: int,
        block: nn.Module,
        hidden: list[torch.Tensor],
        report: PruneReport,
        *,
        blocks: int,
        quant: QuantizationRecord | None = None,
        qbits: int = 0,
        grids: dict[str, QuantizedWeight] | None = None,
        reference: list[torch.Tensor] | None = None,
    ) -> None:
        """Persist block ``index`` (pruned) and what block ``index + 1`` needs; state.json is replaced last.
        ``reference``: the dense model's inputs of the next block (``--target dense``)."""
        self.folder.mkdir(exist_ok=True)
        _save_tensors(self.folder / f"block-{index:05d}.safetensors", block.state_dict())
        if grids:
            parts = {f"{name}.{p}": getattr(g, p) for name, g in grids.items() for p in _GRID_PARTS}
            _save_tensors(self.folder / f"grids-{index:05d}.safetensors", parts)
        hidden_name = f"hidden-{index + 1:05d}.safetensors"
        _save_tensors(
            self.folder / hidden_name,
            {
                **{str(b): h for b, h in enumerate(hidden)},
                **{f"ref.{b}": r for b, r in enumerate(reference or [])},
                _RNG: torch.get_rng_state(),
            },
        )
        previous = self.state()
        state = {
            "format": FORMAT,
            "key": self.key,
            "blocks": blocks,
            "next_block": index + 1,
            "hidden": hidden_name,
            "report": to_dict(report),
            "quant": None if quant is None else to_dict(quant),
            "qbits": qbits,
        }
        path = self.folder / RESUME_STATE
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        os.replace(tmp, path)
        if previous is not None and previous.get("hidden") != hidden_name:
            (self.folder / str(previous["hidden"])).unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove the checkpoint (the run is complete; the folder becomes the output)."""
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
