"""`shrink(model, calibration, config) -> ShrinkReport`: structured pruning to a smaller dense model.

Whole units leave the model, so what remains is an ordinary dense checkpoint with a standard config:

- **MLP channels** (``--intermediate-size``): per layer the channels of the consumer (``down_proj``,
  GPT-2's ``c_proj``) are chosen by `oneshot.structured` scores on its calibration inputs (greedy OBS, or
  activation x weight norm, or per layer the better of both), the producers' rows and the consumer's
  columns are removed, and the consumer is re-fitted by least squares on the kept inputs;
- **GQA groups** (``--num-key-value-heads``): one KV head with its query heads; chosen by group OBS on
  ``o_proj`` (whose kept columns are re-fitted), ``head_dim`` unchanged;
- **blocks** (``--drop-layers``): the blocks that change their input least (1 - cosine of block input and
  output on the calibration tokens, measured on the dense model) are removed; per-layer config lists
  (``layer_types``) follow and the layer indices are renumbered;
- **experts** (``--num-experts``): the experts with the smallest router-weighted output norm on the tokens
  routed to them are removed with their router rows;
- **a parameter budget** (``--params F``): the cost of every width and of dropping any run of adjacent
  blocks is measured on the dense model as the squared error each choice adds to the residual stream,
  relative to the stream (a run of dropped blocks costs what skipping the whole run does, which is far more
  than the sum of skipping each alone); the uniform widths and the dropped blocks with the smallest summed
  cost whose decoder-block parameters fit ``F`` of the original are chosen (`best_drop_sets`: a dynamic
  program over the blocks for every count of dropped blocks).

Where the consumer has a bias, the re-fit is solved on centred inputs and the removed units' mean
contribution moves into the bias. Statistics are accumulated in float64 and solved in float64. Blocks are
shrunk in order, each calibrated on the outputs of the blocks already shrunk (as `oneshot.prune` does).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from oneshot.config import ShrinkConfig
from oneshot.errors import OneshotError
from oneshot.models import max_positions, resolve_device
from oneshot.moe import (
    expert_forward,
    is_supported_experts,
    num_experts,
    routed_tokens,
    routing_inputs,
)
from oneshot.runfolder import BlockReport, ShrinkChoice, ShrinkReport, UnitRemoval
from oneshot.structured import activation_scores, nested_refit_losses, obs_removal_order, refit, refit_loss
from oneshot.walker import capture_block_calls, find_blocks, get_weight, move_non_block_modules, run_block

__all__ = ["ShrinkError", "best_drop_sets", "block_sites", "check_shrink", "shrink"]

logger = logging.getLogger(__name__)

_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token", "top_k")


class ShrinkError(OneshotError, ValueError):
    """A shrink target that does not fit the model, or a model this cannot shrink (the message says why)."""


# --------------------------------------------------------------------------------------------------------
# What can be removed in a block


@dataclass
class MlpSite:
    name: str
    producers: list[nn.Module]  # Linears / Conv1Ds writing the channels (gate_proj, up_proj; c_fc)
    consumer: nn.Module  # the Linear / Conv1D reading them (down_proj; c_proj)
    width: int


@dataclass
class AttnSite:
    name: str
    module: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def per_group(self) -> int:
        return self.heads // self.kv_heads


@dataclass
class MoeSite:
    name: str
    experts: nn.Module
    routers: list[nn.Module]  # siblings whose weight has one row per expert
    parent: nn.Module


@dataclass
class BlockSites:
    mlp: MlpSite | None = None
    attn: AttnSite | None = None
    moe: list[MoeSite] = field(default_factory=list)


def _out_in(layer: nn.Module) -> tuple[int, int]:
    w = get_weight(layer)
    return int(w.shape[0]), int(w.shape[1])


def _is_linear(mod: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(mod, nn.Linear | Conv1D)


def text_config(model: nn.Module) -> Any:
    config: Any = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _width_key(config: Any) -> str | None:
    for key in ("intermediate_size", "n_inner"):
        if hasattr(config, key):
            return key
    return None


def intermediate_width(config: Any) -> int | None:
    key = _width_key(config)
    if key is None:
        return None
    value = getattr(config, key)
    if value is None and key == "n_inner":  # GPT-2: 4 x hidden
        return 4 * int(config.hidden_size)
    return int(value) if isinstance(value, int) else None


def head_geometry(config: Any) -> tuple[int, int, int] | None:
    """(attention heads, KV heads, head_dim) from a config, or None when it does not say."""
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return heads, int(kv), int(head_dim)


def block_sites(block: nn.Module, prefix: str, config: Any) -> BlockSites:
    """The MLP, attention and MoE units of one block that `shrink` knows how to remove (shapes only: works
    on a weightless meta skeleton)."""
    sites = BlockSites()
    for rel, parent in block.named_modules():
        children = dict(parent.named_children())
        experts = [c for c in children.values() if is_supported_experts(c)]
        for ex in experts:
            rows = num_experts(ex)
            routers = [
                sib
                for sib in children.values()
                if sib is not ex
                and isinstance(sib._parameters.get("weight"), Tensor)
                and cast(Tensor, sib._parameters["weight"]).dim() == 2
                and cast(Tensor, sib._parameters["weight"]).shape[0] == rows
            ]
            name = ".".join(p for p in (prefix, rel) if p)
            sites.moe.append(MoeSite(name, ex, routers, parent))
    geometry = head_geometry(config)
    for rel, mod in block.named_modules():
        kids = dict(mod.named_children())
        if geometry is not None and all(
            k in kids and _is_linear(kids[k]) for k in ("q_proj", "k_proj", "v_proj", "o_proj")
        ):
            heads, kv, hd = geometry
            q, k, v, o = (kids[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            if _out_in(q)[0] == heads * hd and _out_in(k)[0] == kv * hd and _out_in(o)[1] == heads * hd:
                sites.attn = AttnSite(f"{prefix}.{rel}", mod, q, k, v, o, heads, kv, hd)
                break
    width = intermediate_width(config)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    if width is not None and not sites.moe:
        for rel, mod in block.named_modules():
            linears = [c for c in mod.children() if _is_linear(c)]
            producers = [c for c in linears if _out_in(c) == (width, hidden)]
            consumers = [c for c in linears if _out_in(c) == (hidden, width)]
            if producers and len(consumers) == 1 and len(producers) + 1 == len(linears):
                sites.mlp = MlpSite(f"{prefix}.{rel}", producers, consumers[0], width)
                break
    return sites


def _top_k(config: Any) -> int | None:
    for key in _TOP_K_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_shrink(config: ShrinkConfig, model: nn.Module) -> None:
    """Every target fits ``model`` (built with weights or on the meta device); `ShrinkError` otherwise."""
    cfg = text_config(model)
    try:
        _, blocks = find_blocks(model)
    except ValueError as exc:
        raise ShrinkError(str(exc)) from exc
    sites = [block_sites(b, f"layer {i}", cfg) for i, b in enumerate(blocks)]
    n = len(blocks)
    arch = getattr(cfg, "model_type", type(model).__name__)
    if config.drop_layers and config.drop_layers >= n:
        raise ShrinkError(
            f"--drop-layers {config.drop_layers} would remove all {n} decoder blocks: at most {n - 1}"
        )
    if config.intermediate_size is not None or config.params is not None:
        width = intermediate_width(cfg)
        if any(s.moe for s in sites) and config.intermediate_size is not None:
            raise ShrinkError(
                f"--intermediate-size: {arch} is a mixture-of-experts model; shrink whole experts with --num-experts"
            )
        if config.intermediate_size is not None:
            if width is None or not all(s.mlp is not None for s in sites):
                raise ShrinkError(
                    f"--intermediate-size: no MLP of the shape (hidden -> {width} -> hidden) found in every "
                    f"block of {arch}; this architecture's MLP width cannot be shrunk"
                )
            if config.intermediate_size >= width:
                raise ShrinkError(
                    f"--intermediate-size {config.intermediate_size} is not smaller than the model's {width}: "
                    f"give a width in [1, {width - 1}]"
                )
    if config.num_key_value_heads is not None:
        if not all(s.attn is not None for s in sites):
            raise ShrinkError(
                f"--num-key-value-heads: {arch} has no separate q_proj/k_proj/v_proj/o_proj attention in every "
                "block; its heads cannot be removed"
            )
        first = cast(AttnSite, sites[0].attn)
        if config.num_key_value_heads >= first.kv_heads:
            raise ShrinkError(
                f"--num-key-value-heads {config.num_key_value_heads} is not smaller than the model's "
                f"{first.kv_heads} KV heads: give a count in [1, {first.kv_heads - 1}]"
            )
    if config.num_experts is not None:
        moe = [m for s in sites for m in s.moe]
        if not moe:
            raise ShrinkError(f"--num-experts: {arch} has no mixture-of-experts layers")
        have = num_experts(moe[0].experts)
        top_k = _top_k(cfg)
        if config.num_experts >= have:
            raise ShrinkError(
                f"--num-experts {config.num_experts} is not smaller than the model's {have} experts per layer"
            )
        if top_k is not None and config.num_experts < top_k:
            raise ShrinkError(
                f"--num-experts {config.num_experts} is below the {top_k} experts each token is routed to "
                f"(top-k): keep at least {top_k}"
            )
    if config.params is not None and not any(s.mlp or s.attn for s in sites) and n < 2:
        raise ShrinkError(f"--params: nothing in {arch} can be shrunk")


# --------------------------------------------------------------------------------------------------------
# Statistics of a consumer's inputs


class _Moments:
    """``sum w x x^T``, ``sum w x``, ``sum w`` and the token count of one layer's inputs ``x`` with per-token
    weights ``w`` (1 unless given), in float64."""

    def __init__(self, cols: int, device: torch.device) -> None:
        self.xtx = torch.zeros(cols, cols, dtype=torch.float64, device=device)
        self.xsum = torch.zeros(cols, dtype=torch.float64, device=device)
        self.wsum = 0.0
        self.n = 0

    def add(self, x: Tensor, weight: Tensor | None = None) -> None:
        """Add the tokens ``x`` (..., cols), each with its ``weight`` (...) when given (else 1): the
        losses of `hessian` are then ``sum_t weight_t ||e_t||^2 / tokens``."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.xtx.device)
        x32 = x if x.dtype == torch.float64 else x.float()  # products in float32 (float64 for float64 models)
        wx = x32 if weight is None else x32 * weight.reshape(-1, 1).to(x32)
        part = (wx.T @ x32).double()
        if not bool(torch.isfinite(part).all()):
            raise ShrinkError("non-finite activations in the calibration inputs (try --dtype float32)")
        self.xtx += part
        self.xsum += wx.sum(dim=0).double()
        self.wsum += x.shape[0] if weight is None else float(weight.double().sum())
        self.n += x.shape[0]

    def hessian(self, centred: bool) -> Tensor:
        if centred:  # about the (weighted) mean
            return (self.xtx - torch.outer(self.xsum, self.xsum) / self.wsum) / self.n
        return self.xtx / self.n

    @property
    def mean(self) -> Tensor:
        return self.xsum / self.wsum


class _Cross:
    """``sum e x^T`` and ``sum e`` of a correction ``e`` (tokens, out) the consumer should add to its output,
    against its inputs ``x`` (tokens, n), in float64."""

    def __init__(self, out: int, cols: int, device: torch.device) -> None:
        self.ext = torch.zeros(out, cols, dtype=torch.float64, device=device)
        self.esum = torch.zeros(out, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, e: Tensor, x: Tensor) -> None:
        e2 = e.reshape(-1, e.shape[-1]).to(self.ext.device)
        x2 = x.reshape(-1, x.shape[-1]).to(self.ext.device)
        e32 = e2 if e2.dtype == torch.float64 else e2.float()
        x32 = x2 if x2.dtype == torch.float64 else x2.float()
        self.ext += (e32.T @ x32).double()
        self.esum += e32.sum(dim=0).double()
        self.n += e2.shape[0]

    def term(self, moments: _Moments, centred: bool) -> Tensor:
        """``E^T X / tokens`` (centred: minus ``mean(e) mean(x)^T``), the ``cross`` of `refit`."""
        c = self.ext / self.n
        return c - torch.outer(self.mean, moments.mean) if centred else c

    @property
    def mean(self) -> Tensor:
        return self.esum / self.n


def _run_collecting(
    block: nn.Module,
    hidden: list[Tensor],
    block_calls: list[Any],
    device: torch.device,
    index: int,
    layer: nn.Module,
    moments: _Moments,
    cross: _Cross | None = None,
    reference_out: list[Tensor] | None = None,
) -> list[Tensor]:
    """Run ``block`` on every batch, adding ``layer``'s inputs to ``moments``; with ``cross``, also the
    deviation ``reference_out - output`` of the block's output against those inputs. Returns the outputs."""
    deferred = cross is not None and reference_out is not None  # the deviation needs the block's output
    seen: list[Tensor] = []
    handle = layer.register_forward_pre_hook(
        lambda _m, a: seen.append(a[0]) if deferred else moments.add(a[0])
    )
    outs = []
    try:
        for b, h in enumerate(hidden):
            seen.clear()
            y = _finite(run_block(block, h, block_calls[b], device), index)
            for x in seen:
                moments.add(x)
                cast(_Cross, cross).add(cast(list[Tensor], reference_out)[b].to(y.device) - y, x)
            outs.append(y)
    finally:
        handle.remove()
    return outs


def _bias(layer: nn.Module) -> Tensor | None:
    b = getattr(layer, "bias", None)
    return b if isinstance(b, Tensor) else None


# --------------------------------------------------------------------------------------------------------
# Slicing modules in place


def _set_param(module: nn.Module, name: str, value: Tensor) -> None:
    old = cast(nn.Parameter, getattr(module, name))
    module._parameters[name] = nn.Parameter(value.contiguous().to(old.dtype), requires_grad=old.requires_grad)


def _keep_outputs(layer: nn.Module, keep: Tensor) -> None:
    """Keep only the output units ``keep`` of a Linear / Conv1D (rows of its (out, in) weight)."""
    w = get_weight(layer)[keep]  # (k, in)
    _write_weight(layer, w)
    b = _bias(layer)
    if b is not None:
        _set_param(layer, "bias", b.data[keep])


def _write_weight(layer: nn.Module, w: Tensor) -> None:
    """Replace the weight by an (out, in) tensor of any shape, in the layer's own layout."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(layer, Conv1D):
        _set_param(layer, "weight", w.t())
        layer.nf = w.shape[0]
        layer.nx = w.shape[1]
    else:
        _set_param(layer, "weight", w)
        cast(Any, layer).out_features, cast(Any, layer).in_features = int(w.shape[0]), int(w.shape[1])


def _target_weight(
    w: Tensor, h: Tensor, moments: _Moments, cross: _Cross | None, centred: bool, damp: float
) -> Tensor:
    """The full-width weight that best produces the re-fit's target: ``W`` itself, or with a correction
    ``W + C (H + lam I)^-1``. Choosing and re-fitting units against it does so against the target (the
    losses differ from the target's by a constant)."""
    if cross is None:
        return w
    hd = h + damp * float(torch.diagonal(h).mean()) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return w + torch.linalg.solve(hd, cross.term(moments, centred=centred).T).T


def _refit_consumer(
    layer: nn.Module, moments: _Moments, keep: Tensor, damp: float, cross: _Cross | None = None
) -> tuple[Tensor, float]:
    """The re-fitted (out, k) weight on the kept inputs, and its reconstruction loss per token against the
    target (`_target_weight`). With a bias: solved on centred inputs, the mean moves into the bias."""
    w = get_weight(layer).double()
    has_bias = _bias(layer) is not None
    h = moments.hessian(centred=has_bias)
    target = _target_weight(w, h, moments, cross, has_bias, damp)
    new = refit(target, h, keep, damp=damp)
    loss = refit_loss(target, h, keep, new)
    if has_bias:
        mu = moments.mean.to(w.device)
        b = cast(Tensor, _bias(layer)).data.double()
        shift = cross.mean if cross is not None else 0.0
        _set_param(layer, "bias", b + w @ mu + shift - new @ mu[keep])
    return new, loss


def _switches_on_mlp_bias(model: nn.Module, sites: list[BlockSites], config: ShrinkConfig) -> bool:
    """Whether shrinking the MLPs switches on the config's ``mlp_bias`` (Llama, Granite), so that the removed
    channels' mean contribution can move into ``down_proj``'s bias: ``--mlp-bias auto``, the switch exists
    and is off, every MLP is made of plain Linears, and the architecture really builds those biases when
    the switch is on (checked on a weightless skeleton, so that no saved bias is dropped at load)."""
    import copy

    from oneshot.checks import model_skeleton

    cfg = text_config(model)
    mlps = [s.mlp for s in sites if s.mlp is not None]
    no_width_cut = config.intermediate_size is None and config.params is None
    if config.mlp_bias != "auto" or no_width_cut or getattr(cfg, "mlp_bias", None) is not False or not mlps:
        return False
    if not all(isinstance(x, nn.Linear) and x.bias is None for m in mlps for x in (*m.producers, m.consumer)):
        return False
    switched: Any = copy.deepcopy(model.config)
    (switched.get_text_config() if hasattr(switched, "get_text_config") else switched).mlp_bias = True
    skeleton = model_skeleton(switched)
    if skeleton is not None:
        try:
            _, skeleton_blocks = find_blocks(skeleton)
            built = [block_sites(b, "", text_config(skeleton)).mlp for b in skeleton_blocks]
            if all(
                m is not None and all(_bias(x) is not None for x in (*m.producers, m.consumer)) for m in built
            ):
                return True
        except ValueError:
            pass
    logger.warning(
        "--mlp-bias auto: %s does not build MLP biases from mlp_bias=True; kept as it is",
        type(model).__name__,
    )
    return False


def _add_zero_biases(site: MlpSite) -> None:
    """Give every Linear of the MLP a zero bias (what ``mlp_bias=True`` builds); the re-fit sets the
    consumer's."""
    for layer in (*site.producers, site.consumer):
        w = get_weight(layer)
        cast(nn.Linear, layer).bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))


def _sorted(idx: list[int] | Tensor) -> Tensor:
    return torch.as_tensor(sorted(int(i) for i in idx), dtype=torch.long)


# --------------------------------------------------------------------------------------------------------
# One kind of unit at a time


def _shrink_mlp(
    site: MlpSite, moments: _Moments, width: int, config: ShrinkConfig, cross: _Cross | None = None
) -> UnitRemoval:
    t0 = time.perf_counter()
    w = get_weight(site.consumer).double()  # (out, I)
    has_bias = _bias(site.consumer) is not None
    h = moments.hessian(centred=has_bias)
    if cross is not None:
        # the full-width weight that best produces the target, W + C (H + lam I)^-1: choosing units against it
        # chooses them against the target (the loss differs from the target's by a constant)
        hd = h + config.damp * float(torch.diagonal(h).mean()) * torch.eye(
            h.shape[0], dtype=h.dtype, device=h.device
        )
        w = w + torch.linalg.solve(hd, cross.term(moments, centred=has_bias).T).T
    remove = site.width - width
    candidates: dict[str, Tensor] = {}
    if config.score in ("auto", "obs"):
        order, _, _ = obs_removal_order(w, h, remove=remove, damp=config.damp)
        candidates["obs"] = _sorted(sorted(set(range(site.width)) - set(order)))
    if config.score in ("auto", "activation"):
        scores = activation_scores(w, torch.diagonal(h))
        candidates["activation"] = _sorted(torch.topk(scores, width).indices)
    losses = {}
    for name, keep in candidates.items():
        new = refit(w, h, keep, damp=config.damp)
        losses[name] = refit_loss(w, h, keep, new)
    chosen = min(losses, key=lambda k: losses[k])
    keep = candidates[chosen]
    new, loss = _refit_consumer(site.consumer, moments, keep, config.damp, cross)
    _write_weight(site.consumer, new)
    for p in site.producers:
        _keep_outputs(p, keep)
    removed = sorted(set(range(site.width)) - set(keep.tolist()))
    return UnitRemoval(
        name=site.name,
        kind="mlp channels",
        before=site.width,
        after=width,
        removed=removed,
        score=chosen,
        loss=loss,
        losses=losses,
        seconds=time.perf_counter() - t0,
    )


def _shrink_attention(site: AttnSite, moments: _Moments, kv_heads: int, config: ShrinkConfig) -> UnitRemoval:
    t0 = time.perf_counter()
    group_cols = site.per_group * site.head_dim
    w = get_weight(site.o).double()  # (out, heads * head_dim)
    has_bias = _bias(site.o) is not None
    h = moments.hessian(centred=has_bias)
    order, _costs, _ = obs_removal_order(
        w, h, remove=site.kv_heads - kv_heads, group=group_cols, damp=config.damp
    )
    kept_groups = [g for g in range(site.kv_heads) if g not in order]
    q_heads = [g * site.per_group + j for g in kept_groups for j in range(site.per_group)]
    q_rows = _sorted([hh * site.head_dim + d for hh in q_heads for d in range(site.head_dim)])
    kv_rows = _sorted([g * site.head_dim + d for g in kept_groups for d in range(site.head_dim)])
    new, loss = _refit_consumer(site.o, moments, q_rows, config.damp)
    _write_weight(site.o, new)
    _keep_outputs(site.q, q_rows)
    _keep_outputs(site.k, kv_rows)
    _keep_outputs(site.v, kv_rows)
    heads_kept = torch.as_tensor(q_heads, dtype=torch.long)
    for pname, p in list(site.module._parameters.items()):  # per-head parameters such as GPT-OSS's sinks
        if p is not None and p.dim() == 1 and p.shape[0] == site.heads:
            _set_param(site.module, pname, p.data[heads_kept])
    for attr in ("num_heads", "num_attention_heads"):
        if getattr(site.module, attr, None) == site.heads:
            setattr(site.module, attr, len(q_heads))
    for attr in ("num_key_value_heads", "num_kv_heads"):
        if getattr(site.module, attr, None) == site.kv_heads:
            setattr(site.module, attr, kv_heads)
    return UnitRemoval(
        name=site.name,
        kind="kv groups",
        before=site.kv_heads,
        after=kv_heads,
        removed=sorted(order),
        score="obs",
        loss=loss,
        losses={"obs": loss},
        seconds=time.perf_counter() - t0,
    )


class _ExpertScores:
    """Router-weighted output norms per expert: ``sum_t g(t, e) * ||E_e(x_t)||`` over routed tokens."""

    def __init__(self, experts: nn.Module) -> None:
        self.experts = experts
        self.score = torch.zeros(num_experts(experts), dtype=torch.float64)
        self.tokens = torch.zeros(num_experts(experts), dtype=torch.long)

    def hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden, index = routing_inputs(module, args, kwargs)
        weights = _routing_weights(module, args, kwargs).reshape(index.shape)  # (tokens, k)
        for e in range(num_experts(module)):
            tokens, slots = routed_tokens(index, e)
            if tokens.numel():
                y = expert_forward(module, e, hidden[tokens])  # (n, out)
                g = weights[tokens, slots].double()
                self.score[e] += float((g.abs() * y.double().norm(dim=-1)).sum())
                self.tokens[e] += tokens.numel()


def _routing_weights(experts: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    import inspect

    signature = inspect.signature(experts.forward)
    bound = signature.bind(*args, **kwargs).arguments
    return cast(Tensor, bound[list(signature.parameters)[2]])


def _shrink_experts(site: MoeSite, scores: _ExpertScores, keep_n: int) -> UnitRemoval:
    t0 = time.perf_counter()
    before = num_experts(site.experts)
    keep = _sorted(torch.topk(scores.score, keep_n).indices)
    for pname, p in list(site.experts._parameters.items()):
        if p is not None and p.dim() >= 1 and p.shape[0] == before:
            _set_param(site.experts, pname, p.data[keep])
    for router in site.routers:
        for pname, p in list(router._parameters.items()):
            if p is not None and p.shape[0] == before:
                _set_param(router, pname, p.data[keep])
        if isinstance(router, nn.Linear):
            router.out_features = keep_n
    for mod in (site.experts, site.parent, *site.routers):
        for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
            if getattr(mod, attr, None) == before:
                setattr(mod, attr, keep_n)
    removed = sorted(set(range(before)) - set(keep.tolist()))
    return UnitRemoval(
        name=f"{site.name}.{_child_name(site.parent, site.experts)}",
        kind="experts",
        before=before,
        after=keep_n,
        removed=removed,
        score="router-weighted output norm",
        loss=float(scores.score[removed].sum() / max(1.0, float(scores.score.sum()))),
        losses={},
        seconds=time.perf_counter() - t0,
        extra={"tokens_per_expert": scores.tokens.tolist()},
    )


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    return next(n for n, c in parent.named_children() if c is child)


# --------------------------------------------------------------------------------------------------------
# Measured costs for --drop-layers and --params


@dataclass
class _Survey:
    drop_cost: list[float]  # 1 - cosine(block input, block output), mean over tokens
    drop_error: list[float]  # ||out - in||^2 / ||out||^2 (relative residual error of skipping the block)
    # the costs the --params chooser adds up, each the mean over tokens of ||error_t||^2 / ||stream_t||^2:
    mlp_curve: list[list[float]]  # per block: of removing 0, 1, ... channels (re-fitted, cumulative)
    attn_curve: list[list[float]]  # per block: of removing 0, 1, ... KV groups
    # [i][j] (i < j): of the stream h_j after block j - 1 replaced by h_i, the stream before block i (blocks
    # i .. j - 1 skipped), on a fixed sample of the calibration tokens
    span_error: list[list[float]]


def _survey(
    blocks: nn.ModuleList,
    sites: list[BlockSites],
    hidden: list[Tensor],
    calls: list[list[Any]],
    device: torch.device,
    curves: bool,
    damp: float,
    progress: bool,
    new_bias: bool = False,
) -> _Survey:
    from tqdm.auto import tqdm

    n = len(blocks)
    survey = _Survey([], [], [], [], [[0.0] * (n + 1) for _ in range(n + 1)] if curves else [])
    sample = _token_sample(hidden, _SPAN_TOKENS) if curves else None
    states = [sample(hidden)] if sample is not None else []  # the sampled stream before block 0, 1, ...
    for i in tqdm(range(len(blocks)), desc="measuring", unit="block", disable=not progress, leave=False):
        block = blocks[i]
        block.to(device)
        site = sites[i]
        mlp_m = _Moments(site.mlp.width, device) if curves and site.mlp else None
        attn_m = _Moments(site.attn.heads * site.attn.head_dim, device) if curves and site.attn else None
        cos_sum, err, norm, tokens = 0.0, 0.0, 0.0, 0
        new_hidden = []
        watched: list[tuple[nn.Module, _Moments, list[Tensor]]] = [
            (layer, m, [])
            for layer, m in ((site.mlp and site.mlp.consumer, mlp_m), (site.attn and site.attn.o, attn_m))
            if layer is not None and m is not None
        ]
        with contextlib.ExitStack() as stack:
            for layer, _, got in watched:
                handle = layer.register_forward_pre_hook(lambda _m, a, got=got: got.append(a[0]))
                stack.callback(handle.remove)
            for b, h in enumerate(hidden):
                out = _finite(run_block(block, h, calls[i][b], device), i)
                x, y = h.to(device).float().flatten(0, -2), out.float().flatten(0, -2)
                cos_sum += float(torch.nn.functional.cosine_similarity(x, y, dim=-1).sum())
                err += float((y - x).pow(2).sum())
                norm += float(y.pow(2).sum())
                tokens += x.shape[0]
                # errors relative to each token's own stream (the next norm divides by it), not summed
                # over tokens, where the few tokens with massive activations would outweigh the rest
                weight = 1.0 / y.pow(2).sum(dim=-1).clamp_min(1e-30)
                for _, m, got in watched:
                    for inputs in got:
                        m.add(inputs, weight)
                    got.clear()
                new_hidden.append(out.to(h.device))
        hidden[:] = new_hidden
        if sample is not None:
            state = sample(hidden)
            per_token = state.pow(2).sum(dim=-1).clamp_min(1e-30)
            for j, earlier in enumerate(states):
                survey.span_error[j][i + 1] = float(((state - earlier).pow(2).sum(dim=-1) / per_token).mean())
            states.append(state)
        survey.drop_cost.append(1.0 - cos_sum / tokens)
        survey.drop_error.append(err / max(norm, 1e-30))
        if mlp_m is not None and site.mlp is not None:
            w = get_weight(site.mlp.consumer)
            h_ = mlp_m.hessian(centred=new_bias or _bias(site.mlp.consumer) is not None)
            # costs of every width at once: the prefixes of the activation-score order, re-fitted
            order = torch.argsort(activation_scores(w, torch.diagonal(h_)), descending=True)
            losses = nested_refit_losses(w, h_, order, damp=damp)  # (width + 1,) by units kept
            survey.mlp_curve.append([float(v) for v in losses.flip(0)])  # by units removed
        else:
            survey.mlp_curve.append([0.0])
        if attn_m is not None and site.attn is not None:
            a = site.attn
            w = get_weight(a.o)
            h_ = attn_m.hessian(centred=_bias(a.o) is not None)
            _, costs, _ = obs_removal_order(
                w, h_, remove=a.kv_heads - 1, group=a.per_group * a.head_dim, damp=damp
            )
            survey.attn_curve.append([0.0, *(float(c) for c in _cumsum(costs))])
        else:
            survey.attn_curve.append([0.0])
        if device.type != "cpu":
            block.to("cpu")
    return survey


# tokens of the calibration stream kept per block for the costs of dropping runs of blocks
_SPAN_TOKENS = 2048
_MAX_WIDTHS = 64  # MLP widths the --params chooser tries at most (evenly spaced)


def _token_sample(hidden: list[Tensor], count: int) -> Callable[[list[Tensor]], Tensor]:
    """A function taking the per-batch hidden states to the same fixed random sample of about ``count``
    tokens of them, (tokens, hidden) float32 on the CPU (seeded: the same tokens every call)."""
    g = torch.Generator().manual_seed(0)
    total = sum(h[..., 0].numel() for h in hidden)
    picks = []
    for h in hidden:
        t = h[..., 0].numel()
        k = min(t, max(1, math.ceil(t * count / max(total, 1))))
        picks.append(torch.sort(torch.randperm(t, generator=g)[:k]).values)

    def sample(states: list[Tensor]) -> Tensor:
        return torch.cat(
            [
                h.reshape(-1, h.shape[-1])[idx.to(h.device)].float().cpu()
                for h, idx in zip(states, picks, strict=True)
            ]
        )

    return sample


def _cumsum(values: list[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v
        out.append(total)
    return out


def _block_params(
    sites: BlockSites, block: nn.Module, width: int | None, kv: int | None, new_bias: bool = False
) -> int:
    """Parameters of one block with the MLP at ``width`` channels and ``kv`` KV groups (``new_bias``: the
    MLP's Linears gain biases when its width shrinks)."""
    total = sum(p.numel() for p in block.parameters())
    if sites.mlp is not None and width is not None:
        per_channel = sum(_out_in(p)[1] + (1 if _bias(p) is not None else 0) for p in sites.mlp.producers)
        per_channel += _out_in(sites.mlp.consumer)[0]
        total -= (sites.mlp.width - width) * per_channel
        if new_bias and width != sites.mlp.width:
            total += width * len(sites.mlp.producers) + _out_in(sites.mlp.consumer)[0]
    if sites.attn is not None and kv is not None:
        a = sites.attn
        rows_q, rows_kv = a.per_group * a.head_dim, a.head_dim
        per_group = rows_q * (_out_in(a.q)[1] + (_bias(a.q) is not None))
        per_group += rows_kv * (_out_in(a.k)[1] + (_bias(a.k) is not None))
        per_group += rows_kv * (_out_in(a.v)[1] + (_bias(a.v) is not None))
        per_group += rows_q * _out_in(a.o)[0]
        per_group += sum(
            a.per_group
            for p in a.module._parameters.values()
            if p is not None and p.dim() == 1 and p.shape[0] == a.heads
        )
        total -= (a.kv_heads - kv) * per_group
    return total


def _width_step(width: int) -> int:
    for step in (32, 16, 8, 4, 2):
        if width % step == 0 and width // step >= 16:
            return step
    return 1


def best_drop_sets(span: list[list[float]], keep_cost: list[float]) -> list[tuple[float, list[int]]]:
    """For every number ``d`` of dropped blocks (index ``d``, 0 to n - 1), the drop set of least cost and
    that cost: the summed ``keep_cost`` of the blocks kept plus, for every maximal run of dropped blocks
    ``i .. j - 1``, ``span[i][j]`` (the cost of the stream after block ``j - 1`` being replaced by the
    stream before block ``i``). Dynamic programming over the blocks, O(n^3)."""
    n = len(keep_cost)
    inf = math.inf
    # cost[j][d]: least cost of deciding blocks 0 .. j - 1 with block j - 1 kept (or j == 0), d dropped
    cost = [[inf] * (n + 1) for _ in range(n + 1)]
    came: dict[tuple[int, int], tuple[int, int, int]] = {}  # (j, d) -> (previous j, previous d, run start)
    cost[0][0] = 0.0
    best: list[tuple[float, list[int]]] = [(inf, []) for _ in range(n)]

    def drops_to(j: int, d: int) -> list[int]:
        out: list[int] = []
        while (j, d) in came:
            pj, pd, start = came[(j, d)]
            out.extend(range(start, start + (d - pd)))
            j, d = pj, pd
        return sorted(out)

    for j in range(n + 1):
        for d in range(j + 1):
            c = cost[j][d]
            if c == inf:
                continue
            if j == n:
                if d < n and c < best[d][0]:
                    best[d] = (c, drops_to(j, d))
                continue
            if c + keep_cost[j] < cost[j + 1][d]:  # keep block j
                cost[j + 1][d] = c + keep_cost[j]
                came[(j + 1, d)] = (j, d, j)
            for k in range(j + 1, n + 1):  # drop blocks j .. k - 1
                dd = d + k - j
                if k == n:
                    if dd < n and c + span[j][n] < best[dd][0]:
                        best[dd] = (c + span[j][n], sorted(drops_to(j, d) + list(range(j, n))))
                elif c + span[j][k] + keep_cost[k] < cost[k + 1][dd]:
                    cost[k + 1][dd] = c + span[j][k] + keep_cost[k]
                    came[(k + 1, dd)] = (j, d, j)
    return best


def choose_budget(
    survey: _Survey, sites: list[BlockSites], blocks: nn.ModuleList, fraction: float, new_bias: bool = False
) -> ShrinkChoice:
    """The uniform MLP width, KV-group count and dropped blocks of smallest summed measured cost (kept
    blocks: their width costs; each run of dropped blocks: its span cost) whose decoder-block parameters
    are at most ``fraction`` of the original's.

    For each width and KV count, `best_drop_sets` gives the cheapest set per number of dropped blocks; that is
    the cheapest within the budget when the blocks are of one size (every standard config), and may miss a
    cheaper set of blocks of unequal sizes."""
    n = len(blocks)
    base = sum(_block_params(s, b, None, None) for s, b in zip(sites, blocks, strict=False))
    budget = fraction * base
    mlps = [s.mlp for s in sites if s.mlp is not None]
    attns = [s.attn for s in sites if s.attn is not None]
    mlp0 = mlps[0].width if len(mlps) == n else None
    kv0 = attns[0].kv_heads if len(attns) == n else None
    widths: list[int | None] = [None]
    if mlp0 is not None:
        step = _width_step(mlp0)
        widths = [w for w in range(mlp0, 0, -step)]
        if len(widths) > _MAX_WIDTHS:  # a coarser grid keeps the dynamic programs few on wide models
            stride = math.ceil(len(widths) / _MAX_WIDTHS)
            widths = widths[::stride]
    kvs: list[int | None] = [None] if kv0 is None else list(range(kv0, 0, -1))
    best: ShrinkChoice | None = None
    for width in widths:
        for kv in kvs:
            per_block = [
                _block_params(s, b, width, kv, new_bias) for s, b in zip(sites, blocks, strict=False)
            ]
            keep_cost = [
                (survey.mlp_curve[i][mlp0 - width] if width is not None and mlp0 is not None else 0.0)
                + (survey.attn_curve[i][kv0 - kv] if kv is not None and kv0 is not None else 0.0)
                for i in range(n)
            ]
            # for every count of dropped blocks the cheapest set, a run of adjacent blocks costing what
            # skipping the whole run measured (not the sum of skipping each alone)
            for total_cost, drop in best_drop_sets(survey.span_error, keep_cost):
                dropped = set(drop)
                params = sum(p for i, p in enumerate(per_block) if i not in dropped)
                if params <= budget and (best is None or total_cost < best.predicted_cost):
                    best = ShrinkChoice(
                        intermediate_size=width if width != mlp0 else None,
                        num_key_value_heads=kv if kv != kv0 else None,
                        drop=drop,
                        predicted_cost=total_cost,
                        block_params=int(params),
                        block_params_before=int(base),
                        fraction=fraction,
                    )
    if best is None:
        raise ShrinkError(
            f"--params {fraction:g}: no choice of widths and dropped blocks reaches {fraction:.0%} of the "
            "decoder-block parameters"
        )
    return best


# --------------------------------------------------------------------------------------------------------
# Model-level edits


def _drop_blocks(model: nn.Module, blocks: nn.ModuleList, drop: list[int]) -> None:
    cfg = text_config(model)
    n = len(blocks)
    kept = [i for i in range(n) if i not in set(drop)]
    survivors = [blocks[i] for i in kept]
    for _ in range(n):
        del blocks[len(blocks) - 1]
    for b in survivors:
        blocks.append(b)
    for new_idx, block in enumerate(blocks):
        for mod in block.modules():
            if isinstance(getattr(mod, "layer_idx", None), int):
                cast(Any, mod).layer_idx = new_idx
    for key, value in list(vars(cfg).items()):
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(cfg, key, [value[i] for i in kept])
    cfg.num_hidden_layers = len(kept)


def _set_config(cfg: Any, key: str, value: Any, changes: dict[str, list[Any]]) -> None:
    before = getattr(cfg, key, None)
    if before != value:
        changes.setdefault(key, [before, value])
        changes[key][1] = value
        setattr(cfg, key, value)


def _finite(out: Tensor, block: int) -> Tensor:
    if not torch.isfinite(out).all():
        raise ShrinkError(
            f"block {block} produced NaN/Inf activations: the model overflows in this dtype "
            "(try --dtype float32) or its weights are corrupt"
        )
    return out


# --------------------------------------------------------------------------------------------------------
# The job on an in-memory model


@torch.no_grad()
def shrink(
    model: nn.Module,
    calibration: Tensor,
    config: ShrinkConfig,
    *,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    progress: bool = True,
) -> ShrinkReport:
    """Shrink ``model`` in place to the targets of ``config`` (see the module docstring); its config is
    updated so that ``save_pretrained`` writes a checkpoint plain transformers loads.

    ``calibration``: (nsamples, seqlen) int64 token ids. Returns a `ShrinkReport`: every removal with its
    measured cost, the blocks dropped and their scores, the config changes, parameters before and after.
    """
    from tqdm.auto import tqdm

    if calibration.ndim != 2 or calibration.shape[0] < 1:
        raise ShrinkError(
            f"calibration must be (nsamples, seqlen) token ids, got shape {tuple(calibration.shape)}"
        )
    max_pos = max_positions(model.config)
    if max_pos is not None and calibration.shape[1] > max_pos:
        raise ShrinkError(f"seqlen {calibration.shape[1]} exceeds the model's context of {max_pos} tokens")
    check_shrink(config, model)
    start = time.perf_counter()
    dev = resolve_device(device)
    cfg = text_config(model)
    blocks_name, blocks = find_blocks(model)
    report = ShrinkReport(
        device=str(dev),
        params_before=sum(p.numel() for p in model.parameters()),
        block_params_before=sum(p.numel() for p in blocks.parameters()),
        layers_before=len(blocks),
    )
    sites = [block_sites(b, f"{blocks_name}.{i}", cfg) for i, b in enumerate(blocks)]
    model_config: Any = model.config
    prev_cache = getattr(model_config, "use_cache", None)
    was_training = model.training
    model.eval()
    if hasattr(model_config, "use_cache"):
        model_config.use_cache = False
    try:
        move_non_block_modules(model, blocks, dev)
        batches = list(calibration.split(batch_size))
        hidden, calls = capture_block_calls(model, blocks, batches, dev, dev, progress=progress)
        move_non_block_modules(model, blocks, torch.device("cpu"))

        target_width, target_kv, drop = config.intermediate_size, config.num_key_value_heads, []
        # whether a width cut switches on the config's mlp_bias (decided before --params counts parameters)
        new_bias = _switches_on_mlp_bias(model, sites, config)
        if config.drop_layers or config.params is not None:
            survey = _survey(
                blocks,
                sites,
                [h.clone() for h in hidden],
                calls,
                dev,
                curves=config.params is not None,
                new_bias=new_bias,
                damp=config.damp,
                progress=progress,
            )
            report.layer_scores = survey.drop_cost
            report.layer_errors = survey.drop_error
            if config.params is not None:
                choice = choose_budget(survey, sites, blocks, config.params, new_bias)
                report.choice = choice
                target_width, target_kv, drop = (
                    choice.intermediate_size,
                    choice.num_key_value_heads,
                    choice.drop,
                )
                logger.info(
                    "--params %g: intermediate_size %s, num_key_value_heads %s, dropping blocks %s "
                    "(predicted relative residual error %.4g)",
                    config.params,
                    target_width or "unchanged",
                    target_kv or "unchanged",
                    drop or "none",
                    choice.predicted_cost,
                )
            else:
                drop = sorted(
                    sorted(range(len(blocks)), key=lambda i: survey.drop_cost[i])[: config.drop_layers]
                )
        changes: dict[str, list[Any]] = {}
        if drop:
            report.dropped_layers = drop
            for i in drop:
                report.removals.append(
                    UnitRemoval(
                        name=f"{blocks_name}.{i}",
                        kind="block",
                        before=1,
                        after=0,
                        removed=[i],
                        score="1 - cos(input, output)",
                        loss=report.layer_scores[i] if report.layer_scores else None,
                        losses={},
                        seconds=0.0,
                    )
                )
            before_layers = len(blocks)
            kept_idx = [i for i in range(len(blocks)) if i not in set(drop)]
            dropped_blocks = {i: blocks[i] for i in drop}
            dropped_calls = {i: calls[i] for i in drop}
            _drop_blocks(model, blocks, drop)
            changes["num_hidden_layers"] = [before_layers, len(blocks)]
            # a dropped block is skipped: the first kept block reads what block 0 read (the embeddings)
            calls = [calls[i] for i in kept_idx]
            sites = [sites[i] for i in kept_idx]
            for i, s in enumerate(sites):
                for site in (s.mlp, s.attn, *s.moe):
                    if site is not None:
                        site.name = site.name.replace(
                            f"{blocks_name}.{kept_idx[i]}.", f"{blocks_name}.{i}.", 1
                        )
        else:
            kept_idx, dropped_blocks, dropped_calls = list(range(len(blocks))), {}, {}
        # the unshrunk model's hidden states, for re-fits that pull each block back towards them
        reference = [h.clone() for h in hidden] if config.refit_target == "dense" and target_width else None
        position = 0  # original index of the next block the reference stream enters

        def advance(
            reference: list[Tensor], block: nn.Module, block_calls: list[Any], i: int
        ) -> list[Tensor]:
            block.to(dev)
            out = [_finite(run_block(block, h, block_calls[b], dev), i) for b, h in enumerate(reference)]
            if dev.type != "cpu":
                block.to("cpu")
            return out

        widths_to_do = target_width is not None or target_kv is not None or config.num_experts is not None
        bar = tqdm(
            range(len(blocks) if widths_to_do else 0),  # only blocks dropped: nothing to run
            desc="shrinking",
            unit="block",
            disable=not progress,
            dynamic_ncols=True,
        )
        for i in bar:
            t_block = time.perf_counter()
            block = blocks[i]
            block.to(dev)
            s = sites[i]
            dense_out: list[Tensor] | None = None
            reference_out: list[Tensor] | None = None
            if reference is not None:  # through the dropped blocks before this one, then this one unshrunk
                while position < kept_idx[i]:
                    reference = advance(
                        reference, dropped_blocks[position], dropped_calls[position], position
                    )
                    position += 1
                reference_out = [
                    _finite(run_block(block, h, calls[i][b], dev), i) for b, h in enumerate(reference)
                ]
                position += 1

            def run_all(block: nn.Module = block, i: int = i, hidden: list[Tensor] = hidden) -> list[Tensor]:
                return [_finite(run_block(block, h, calls[i][b], dev), i) for b, h in enumerate(hidden)]

            if target_kv is not None and s.attn is not None:
                m = _Moments(s.attn.heads * s.attn.head_dim, dev)
                dense_out = _run_collecting(block, hidden, calls[i], dev, i, s.attn.o, m)
                report.removals.append(_shrink_attention(s.attn, m, target_kv, config))
            if config.num_experts is not None and s.moe:
                collectors = [_ExpertScores(site.experts) for site in s.moe]
                with contextlib.ExitStack() as stack:
                    for site, col in zip(s.moe, collectors, strict=False):
                        handle = site.experts.register_forward_pre_hook(col.hook, with_kwargs=True)
                        stack.callback(handle.remove)
                    out = run_all()
                    dense_out = dense_out or out
                for site, col in zip(s.moe, collectors, strict=False):
                    report.removals.append(_shrink_experts(site, col, config.num_experts))
            if target_width is not None and s.mlp is not None:
                m = _Moments(s.mlp.width, dev)
                cross = None
                if reference is not None:  # the consumer also absorbs the block's deviation from it
                    cross = _Cross(_out_in(s.mlp.consumer)[0], s.mlp.width, dev)
                out = _run_collecting(
                    block, hidden, calls[i], dev, i, s.mlp.consumer, m, cross, reference_out
                )
                dense_out = dense_out or out
                if new_bias:
                    _add_zero_biases(s.mlp)
                report.removals.append(_shrink_mlp(s.mlp, m, target_width, config, cross))
            new_hidden = run_all()
            error = None
            if dense_out is not None:
                num = sum(
                    float((d.float() - o.float()).pow(2).sum())
                    for d, o in zip(dense_out, new_hidden, strict=False)
                )
                den = sum(float(d.float().pow(2).sum()) for d in dense_out)
                error = num / den if den > 0 else None
            hidden = new_hidden
            if reference is not None:
                reference = reference_out
            if dev.type != "cpu":
                block.to("cpu")
            report.blocks.append(BlockReport(i, time.perf_counter() - t_block, error))
        bar.close()
        if target_width is not None:
            key = cast(str, _width_key(cfg))
            _set_config(cfg, key, target_width, changes)
            if new_bias:
                _set_config(cfg, "mlp_bias", True, changes)
        if target_kv is not None:
            per_group = cast(AttnSite, sites[0].attn).per_group
            head_dim = cast(AttnSite, sites[0].attn).head_dim
            _set_config(cfg, "head_dim", head_dim, changes)  # explicit: hidden / heads no longer gives it
            _set_config(cfg, "num_attention_heads", target_kv * per_group, changes)
            _set_config(cfg, "num_key_value_heads", target_kv, changes)
        if config.num_experts is not None:
            for key in _EXPERT_COUNT_KEYS:
                if isinstance(getattr(cfg, key, None), int):
                    _set_config(cfg, key, config.num_experts, changes)
                    break
        report.config_changes = changes
    except torch.OutOfMemoryError as exc:
        raise ShrinkError(
            f"out of memory while shrinking: lower --batch-size (now {batch_size}), --nsamples or --seqlen, "
            "or use --device cpu"
        ) from exc
    finally:
        move_non_block_modules(model, blocks, torch.device("cpu"))
        if prev_cache is not None:
            model_config.use_cache = prev_cache
        model.train(was_training)
    report.params_after = sum(p.numel() for p in model.parameters())
    report.block_params_after = sum(p.numel() for p in blocks.parameters())
    report.layers_after = len(blocks)
    report.total_seconds = time.perf_counter() - start
    if not math.isfinite(report.total_seconds):  # pragma: no cover
        report.total_seconds = 0.0
    return report
