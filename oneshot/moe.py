"""Mixture-of-experts weights stored as fused 3-D tensors (transformers >= 5 experts modules).

transformers 5 keeps all experts of an MoE block in one module with stacked parameters: ``gate_up_proj``
(E, 2I, H) and ``down_proj`` (E, H, I), or (E, H, 2I) / (E, I, H) when ``is_transposed``; ``up_proj``
instead of ``gate_up_proj`` without a gate; optional ``<name>_bias`` (E, out). The class decorator
``use_experts_implementation`` records the layout on every instance as flags (``has_gate``, ``has_bias``,
``is_transposed``, ``has_post_expert_norm``) and gives it ``_apply_gate`` (GPT-OSS overrides it: interleaved
gate/up with clamping). This module reads those flags to

- view one expert's slice as an ordinary (out_features, in_features) matrix and write it back in place
  (`expert_matrix`, `set_expert_matrix`), so the solvers prune experts like any Linear;
- recompute one expert's math on the tokens routed to it (`expert_activations`: the input of
  ``down_proj``; `expert_forward`: the expert's output; `combine_experts`: the whole module's output),
  because the fused forward never exposes the activations that feed ``down_proj``;
- collect per-expert `InputStats` from exactly the tokens routed to each expert (`ExpertCollector`: a
  forward pre-hook on the experts module reading its hidden states and top-k indices);
- find the router weights next to the experts, which stay dense (`find_routers`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oneshot.stats import InputStats

__all__ = [
    "ExpertCollector",
    "combine_experts",
    "expert_activations",
    "expert_forward",
    "expert_matrix",
    "expert_matrix_name",
    "expert_param_names",
    "find_experts",
    "find_routers",
    "is_experts_module",
    "is_supported_experts",
    "num_experts",
    "routed_tokens",
    "routing_inputs",
    "set_expert_matrix",
]

_FLAGS = ("has_gate", "has_bias", "is_transposed")


def _param3d(module: nn.Module, name: str) -> bool:
    p = module._parameters.get(name)
    return p is not None and p.dim() == 3


def is_experts_module(module: nn.Module) -> bool:
    """A fused experts module: a 3-D ``down_proj`` and a 3-D ``gate_up_proj`` or ``up_proj`` parameter."""
    return _param3d(module, "down_proj") and (_param3d(module, "gate_up_proj") or _param3d(module, "up_proj"))


def is_supported_experts(module: nn.Module) -> bool:
    """An experts module whose layout is described by the ``use_experts_implementation`` flags."""
    return (
        is_experts_module(module)
        and all(isinstance(getattr(module, f, None), bool) for f in _FLAGS)
        and _param3d(module, "gate_up_proj" if module.has_gate else "up_proj")
    )


def num_experts(experts: nn.Module) -> int:
    return int(cast(Tensor, experts.down_proj).shape[0])


def expert_param_names(experts: nn.Module) -> tuple[str, str]:
    """(first projection, second projection): ``("gate_up_proj" | "up_proj", "down_proj")``."""
    return ("gate_up_proj" if experts.has_gate else "up_proj"), "down_proj"


def expert_matrix_name(module_name: str, param: str, expert: int) -> str:
    """Readable name of one expert's matrix, e.g. ``model.layers.0.mlp.experts.gate_up_proj[3]``."""
    return f"{module_name}.{param}[{expert}]"


def find_experts(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Every fused experts module inside a block (supported or not), keyed by qualified name."""
    return {
        f"{prefix}.{rel}" if rel else prefix: m for rel, m in block.named_modules() if is_experts_module(m)
    }


def find_routers(block: nn.Module, prefix: str) -> dict[str, Tensor]:
    """Router weights of the MoE layers of a block, keyed by qualified parameter name.

    A router is a direct sibling module of an experts module (a child of the same parent) whose own 2-D
    ``weight`` has one row per expert, or a single row (a shared-expert gate such as Qwen2-MoE's
    ``shared_expert_gate``). Works for custom router modules and for routers that are nn.Linear.
    """
    out: dict[str, Tensor] = {}
    for rel, parent in block.named_modules():
        children = dict(parent.named_children())
        for child in children.values():
            if not is_experts_module(child):
                continue
            rows = num_experts(child)
            for sib_name, sib in children.items():
                w = sib._parameters.get("weight")
                if sib is not child and w is not None and w.dim() == 2 and w.shape[0] in (rows, 1):
                    out[".".join(p for p in (prefix, rel, sib_name, "weight") if p)] = w
    return out


def expert_matrix(experts: nn.Module, param: str, expert: int) -> Tensor:
    """One expert's slice of a fused tensor as an (out_features, in_features) view sharing its storage."""
    w = cast(Tensor, getattr(experts, param)).data[expert]  # (out, in), or (in, out) when transposed
    return w.t() if experts.is_transposed else w


def set_expert_matrix(experts: nn.Module, param: str, expert: int, weight: Tensor) -> None:
    """Write an (out_features, in_features) weight into one expert's slice, in the module's layout and dtype."""
    expert_matrix(experts, param, expert).copy_(weight)


def _expert_bias(experts: nn.Module, param: str, expert: int) -> Tensor | None:
    return cast(Tensor, getattr(experts, f"{param}_bias"))[expert] if experts.has_bias else None  # (out,)


def expert_activations(experts: nn.Module, expert: int, x: Tensor) -> Tensor:
    """The input of ``down_proj`` for tokens ``x`` (n, in) sent to ``expert``: (n, intermediate).

    ``act(gate) * up`` through the module's own ``_apply_gate`` (so custom gates such as GPT-OSS's
    interleaved, clamped SwiGLU are reproduced), or ``act_fn(up)`` for experts without a gate.
    """
    up, _ = expert_param_names(experts)
    module: Any = experts
    h = F.linear(x, expert_matrix(experts, up, expert), _expert_bias(experts, up, expert))  # (n, 2I | I)
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)


def expert_forward(experts: nn.Module, expert: int, x: Tensor) -> Tensor:
    """One expert's output (before the routing weight) for tokens ``x`` (n, in): (n, out)."""
    _, down = expert_param_names(experts)
    a = expert_activations(experts, expert, x)  # (n, I)
    y = F.linear(a, expert_matrix(experts, down, expert), _expert_bias(experts, down, expert))  # (n, out)
    if getattr(experts, "has_post_expert_norm", False):
        y = cast(Any, experts).post_expert_norm(y)
    return y


def routed_tokens(top_k_index: Tensor, expert: int) -> tuple[Tensor, Tensor]:
    """(token indices, top-k slots) of the tokens routed to ``expert``; ``top_k_index`` is (tokens, k)."""
    tokens, slots = torch.where(top_k_index == expert)
    return tokens, slots


def combine_experts(experts: nn.Module, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The experts module's output recomputed expert by expert: (tokens, out).

    ``sum_k top_k_weights[t, k] * expert_forward(top_k_index[t, k], hidden[t])`` for ``hidden`` (tokens, in),
    ``top_k_index`` and ``top_k_weights`` (tokens, k). Indices outside ``[0, E)`` (expert-parallel
    sentinels) contribute nothing.
    """
    out = hidden.new_zeros(hidden.shape[0], expert_matrix(experts, "down_proj", 0).shape[0])  # (tokens, out)
    for e in range(num_experts(experts)):
        tokens, slots = routed_tokens(top_k_index, e)
        if tokens.numel():
            y = expert_forward(experts, e, hidden[tokens]) * top_k_weights[tokens, slots, None]
            out.index_add_(0, tokens, y.to(out.dtype))
    return out


def routing_inputs(
    experts: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    """(hidden states (tokens, in), top-k expert indices (tokens, k)) from a call of an experts module.

    The experts forward takes ``(hidden_states, top_k_index, top_k_weights)`` under model-specific names
    (GPT-OSS: ``router_indices``, ``routing_weights``), positionally or by keyword; the call is bound to the
    forward's signature and its first two parameters are read.
    """
    signature = inspect.signature(experts.forward)
    try:
        bound = signature.bind(*args, **kwargs).arguments
    except TypeError:
        bound = {}
    values = [bound.get(p) for p in list(signature.parameters)[:2]]
    if len(values) < 2 or not all(isinstance(v, Tensor) for v in values):
        raise RuntimeError(
            f"{type(experts).__name__}: expected a call (hidden_states, top_k_index, top_k_weights), got "
            f"{len(args)} positional arguments and keywords {sorted(kwargs)}"
        )
    hidden, index = cast(list[Tensor], values)
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (tokens, in)
    return hidden, index.reshape(hidden.shape[0], -1)  # (tokens, k)


@dataclass
class ExpertCollector:
    """Per-expert input statistics of fused experts modules, from the tokens routed to each expert.

    A forward pre-hook on every experts module reads the hidden states (tokens, H) and the top-k indices
    (tokens, k) the router chose. For each expert hit by the batch, the routed tokens feed the statistics
    of its first projection (``...gate_up_proj[e]``, input (n, H)) and their gated activations, recomputed
    with `expert_activations`, feed those of ``...down_proj[e]`` (input (n, I)). Statistics exist only for
    the matrices named in ``wanted`` that received at least one token. Hooks are removed in ``finally``.
    """

    experts: dict[str, nn.Module]  # qualified name -> supported experts module
    wanted: set[str]  # matrix names (`expert_matrix_name`) whose statistics are needed
    hessian: bool
    device: torch.device
    stats: dict[str, InputStats] = field(default_factory=dict)  # matrix name -> its statistics

    def _add(self, name: str, x: Tensor) -> None:
        if name not in self.stats:
            self.stats[name] = InputStats(x.shape[-1], hessian=self.hessian, device=self.device)
        self.stats[name].add(x)

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden, index = routing_inputs(module, args, kwargs)
            up, down = expert_param_names(module)
            for e in range(num_experts(module)):
                up_name, down_name = (expert_matrix_name(name, p, e) for p in (up, down))
                if up_name not in self.wanted and down_name not in self.wanted:
                    continue
                tokens, _ = routed_tokens(index, e)
                if tokens.numel() == 0:
                    continue
                x = hidden[tokens]  # (n, H)
                if up_name in self.wanted:
                    self._add(up_name, x)
                if down_name in self.wanted:
                    self._add(down_name, expert_activations(module, e, x))  # (n, I)

        return hook

    @contextlib.contextmanager
    def hooks(self) -> Iterator[ExpertCollector]:
        handles = [
            mod.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            for name, mod in self.experts.items()
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
