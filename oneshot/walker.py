"""Model-agnostic walking of decoder blocks.

- `find_blocks`: the ModuleList holding ``config.num_hidden_layers`` decoder layers (any architecture).
- `capture_block_calls`: one cheap forward per calibration batch where every block is replaced by a
  recorder, so the inputs of block 0 and the exact positional and keyword arguments of EVERY block are
  kept verbatim (models such as Gemma 2/3 or Qwen2 pass other masks / rotary tables to other blocks).
- `run_block`: replays a block on stored hidden states.
- `InputCollector`: forward pre-hooks that feed `InputStats`; layers reading the same input tensor (q/k/v,
  gate/up) share one set of statistics; with ``sink_weight`` the attention-input layers (`SINK_LAYERS`)
  weight every sequence's first token and never share statistics with other layers. Hooks are removed in
  ``finally``.
- `record_inputs`: the input of every layer in one forward (the dense model's, paired with the pruned
  model's by `InputCollector(cross=True)` for ``--target dense``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from oneshot.stats import InputStats

__all__ = [
    "SINK_LAYERS",
    "BlockCall",
    "InputCollector",
    "capture_block_calls",
    "find_blocks",
    "find_linears",
    "get_weight",
    "is_sink_layer",
    "matches_ignore",
    "move_non_block_modules",
    "record_inputs",
    "run_block",
    "set_weight",
]

logger = logging.getLogger(__name__)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks of a causal LM: (qualified name, ModuleList).

    The list of ``num_hidden_layers`` modules, preferring one whose elements are a no-split module
    class of the model (its decoder layer) and the shallowest such list.
    """
    config = getattr(model, "config", None)
    text_config = (
        config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    )
    n_layers = getattr(text_config, "num_hidden_layers", None)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = [
        (name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0
    ]

    def rank(item: tuple[str, nn.ModuleList]) -> tuple[bool, bool, int]:
        name, mod = item
        return (len(mod) == n_layers, type(mod[0]).__name__ in no_split, -name.count("."))

    good = [c for c in candidates if rank(c)[0] or rank(c)[1]]
    if not good:
        raise ValueError(
            f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of "
            f"num_hidden_layers={n_layers} modules or of its no-split classes {sorted(no_split)}"
        )
    name, blocks = max(good, key=rank)
    return name, blocks


# Layers that read the attention's input and make its values (fused projections and DeepSeek's latent KV
# path included): their statistics may weight the first token, the attention sink
# (`oneshot.config.QuantConfig.sink_weight`).
SINK_LAYERS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "c_attn",
    "query_key_value",
    "Wqkv",
    "W_pack",
    "att_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
)


def is_sink_layer(name: str) -> bool:
    """Whether the layer ``name`` (``model.layers.3.self_attn.v_proj``) reads the attention's input."""
    return name.rsplit(".", 1)[-1] in SINK_LAYERS


def matches_ignore(name: str, patterns: Sequence[str]) -> bool:
    """Whether a qualified weight name matches one of the ``--ignore`` fnmatch patterns, either whole or as
    a dotted suffix (``down_proj`` matches ``model.layers.0.mlp.down_proj``)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}") for p in patterns)


def find_linears(block: nn.Module, prefix: str, ignore: Sequence[str] = ()) -> dict[str, nn.Module]:
    """Every Linear (and GPT-2 Conv1D) inside a block, keyed by qualified name, minus ignored names."""
    conv1d = _conv1d_type()
    kinds: tuple[type, ...] = (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)
    out: dict[str, nn.Module] = {}
    for rel, mod in block.named_modules():
        if isinstance(mod, kinds) and rel:
            full = f"{prefix}.{rel}"
            if not matches_ignore(full, ignore):
                out[full] = cast(nn.Module, mod)
    return out


def get_weight(layer: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features) — GPT-2's Conv1D stores it transposed."""
    conv1d = _conv1d_type()
    w = cast(torch.Tensor, layer.weight).data
    return w.t() if conv1d is not None and isinstance(layer, conv1d) else w


def set_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Write an (out_features, in_features) weight back in the layer's own layout and dtype."""
    get_weight(layer).copy_(weight)


def move_non_block_modules(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside ``blocks`` (embeddings, rotary tables, norms,
    the LM head) to ``device``; blocks stay where they are."""
    inside = {id(m) for m in blocks.modules()}
    for mod in model.modules():
        if id(mod) in inside:
            continue
        for param in mod.parameters(recurse=False):
            if param.device != device:
                param.data = param.data.to(device)
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and buf.device != device:
                mod._buffers[name] = buf.to(device)


@dataclass
class BlockCall:
    """How a block was called for one batch, minus the hidden states."""

    args: tuple[Any, ...]  # positional arguments after the hidden states
    kwargs: dict[str, Any]
    hidden_as_kwarg: bool = False


class _StopForward(Exception):
    """Raised by the last recorder: nothing after the blocks needs to run."""


class _TupleOutputs(Exception):
    """The model indexes block outputs as tuples (older transformers): record again returning tuples."""


class _Recorder(nn.Module):
    """Stands in for a block during capture: records its call and passes the hidden states through."""

    def __init__(
        self,
        index: int,
        block: nn.Module,
        sink: list[list[BlockCall]],
        hidden_in: list[torch.Tensor],
        last: bool,
        as_tuple: bool,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_wrapped", block)
        self.index, self.last, self.as_tuple = index, last, as_tuple
        object.__setattr__(self, "_sink", sink)
        object.__setattr__(self, "_hidden_in", hidden_in)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, rest, as_kwarg = args[0], tuple(args[1:]), False
        else:
            hidden, rest, as_kwarg = kwargs.pop("hidden_states"), (), True
        if self.index == 0:
            self._hidden_in.append(hidden)
        elif hidden.shape != self._hidden_in[-1].shape:
            raise _TupleOutputs
        self._sink[self.index].append(BlockCall(rest, dict(kwargs), as_kwarg))
        if self.last:
            raise _StopForward
        return (hidden,) if self.as_tuple else hidden


@torch.no_grad()
def capture_block_calls(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: Sequence[torch.Tensor],
    device: torch.device,
    store_device: torch.device,
    *,
    progress: bool = False,
) -> tuple[list[torch.Tensor], list[list[BlockCall]]]:
    """Inputs of block 0 per batch (on ``store_device``) and each block's call per batch.

    The model's own forward runs once per batch with every block replaced by a recorder, so whatever the
    architecture computes before and between blocks (masks, rotary tables per layer type, scaling) is
    kept verbatim.
    """
    from tqdm.auto import tqdm

    originals = list(blocks)
    for as_tuple in (False, True):
        hidden_in: list[torch.Tensor] = []
        calls: list[list[BlockCall]] = [[] for _ in originals]
        try:
            for i, blk in enumerate(originals):
                blocks[i] = _Recorder(i, blk, calls, hidden_in, i == len(originals) - 1, as_tuple)
            for ids in tqdm(batches, desc="capturing", unit="batch", disable=not progress, leave=False):
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _StopForward:
                    pass
                else:  # pragma: no cover - a model that skips its blocks
                    raise RuntimeError("the model forward finished without reaching its last decoder block")
        except _TupleOutputs:
            continue
        finally:
            for i, blk in enumerate(originals):
                blocks[i] = blk
        hidden = [h.to(store_device) for h in hidden_in]
        return hidden, calls
    raise RuntimeError("could not replay the decoder blocks: their inputs change shape between blocks")


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall, device: torch.device) -> torch.Tensor:
    """One block forward on one batch of hidden states (moved to ``device``); returns the new hidden states."""
    h = hidden.to(device, non_blocking=True)
    if call.hidden_as_kwarg:
        out = block(*call.args, hidden_states=h, **call.kwargs)
    else:
        out = block(h, *call.args, **call.kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


@dataclass
class InputCollector:
    """Accumulates `InputStats` of the inputs of several layers with forward pre-hooks.

    Layers that receive the very same input tensor (q/k/v projections, gate/up) share one `InputStats`,
    so each distinct input is reduced once. With ``cross``, each batch pairs every layer's input with its
    input in a reference forward of the same tokens (``new_batch(reference=...)``, from `record_inputs`).
    With ``sink_weight``, the `SINK_LAYERS` get statistics with that first-token weight, shared only among
    themselves: a layer of another kind reading the same tensor (the MLP of a parallel-attention block) keeps
    plain statistics of its own.
    """

    layers: dict[str, nn.Module]
    hessian: bool
    device: torch.device
    cross: bool = False
    sink_weight: float = 0.0  # `InputStats.first_token_weight` of the attention's input projections
    stats: dict[str, InputStats] = field(default_factory=dict)  # layer -> its (possibly shared) stats
    owner: dict[str, str] = field(default_factory=dict)  # layer -> layer whose stats it shares
    _seen: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    _reference: dict[str, torch.Tensor] = field(default_factory=dict)

    def new_batch(self, reference: dict[str, torch.Tensor] | None = None) -> None:
        """Start a batch; ``reference``: layer -> its input in the reference forward of this batch."""
        self._seen.clear()
        if self.cross and reference is None:
            raise ValueError("InputCollector(cross=True): every batch needs the reference inputs")
        self._reference = dict(reference or {})

    def _sink_weight_of(self, name: str) -> float:
        return self.sink_weight if is_sink_layer(name) else 0.0

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if name not in self.owner:
                # Holding the tensor for the whole batch keeps its storage from being reused, so identity is exact.
                sink = self._sink_weight_of(name)
                src = next((n for t, n in self._seen if t is x and self._sink_weight_of(n) == sink), None)
                if src is None:
                    self.owner[name] = name
                    self.stats[name] = InputStats(
                        x.shape[-1],
                        hessian=self.hessian,
                        device=self.device,
                        cross=self.cross,
                        first_token_weight=sink,
                    )
                else:
                    self.owner[name] = self.owner[src]
                    self.stats[name] = self.stats[self.owner[src]]
                self._seen.append((x, name))
            if self.owner[name] == name:
                if self.cross:
                    self.stats[name].add(x, self._reference[name])
                else:
                    self.stats[name].add(x)

        return hook

    @contextlib.contextmanager
    def hooks(self) -> Iterator[InputCollector]:
        handles = [mod.register_forward_pre_hook(self._hook(name)) for name, mod in self.layers.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._seen.clear()
            self._reference = {}


@contextlib.contextmanager
def record_inputs(layers: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward pre-hooks that keep the input of every layer of ``layers`` by name, for one forward (run it
    under ``torch.no_grad``); layers reading one tensor keep that same tensor object, so ``is`` tells which
    layers share an input. The tensors are the model's own, not copies. A layer called twice in the forward
    raises ValueError (its inputs could not be paired). Hooks are removed on exit."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def keep(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name in seen:
                raise ValueError(f"{name} runs more than once in one forward of its block")
            seen[name] = args[0]  # the tensor itself: layers reading one input keep the same object

        return keep

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in layers.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
