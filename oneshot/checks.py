"""Checks of a pruning run that need only the model's config: run before any weight is loaded.

A weightless skeleton of the model (``meta`` device) gives the decoder blocks, their prunable layers and
their widths, so bad ``--ignore`` patterns and N:M patterns that do not divide a layer's width fail in
seconds, whatever the model's size.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from oneshot.config import QUANT_GROUP_SIZES, ConfigError, PruneConfig, QuantConfig
from oneshot.errors import OneshotError
from oneshot.models import load_model_config, max_positions
from oneshot.pruner import plan_block
from oneshot.walker import find_blocks

__all__ = ["ConfigCheckError", "check_prunable", "check_quantizable", "model_skeleton"]

logger = logging.getLogger(__name__)


class ConfigCheckError(OneshotError):
    """The run's settings do not fit the model (a pattern, an --ignore list)."""


def model_skeleton(config: Any) -> torch.nn.Module | None:
    """The causal LM built from ``config`` on the meta device (no memory), or None if that fails."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # an exotic model that cannot be built on meta: `check_layers` after loading
        logger.debug("no meta skeleton for %s: %s", type(config).__name__, exc)
        return None


def prunable_layers(model: torch.nn.Module, ignore: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Name -> (out_features, in_features) of every weight matrix `oneshot.prune` would prune (Linears and
    single experts of fused MoE tensors), from the same plan the pruner follows."""
    try:
        blocks_name, blocks = find_blocks(model)
    except ValueError as exc:
        raise ConfigCheckError(str(exc)) from exc
    out: dict[str, tuple[int, int]] = {}
    for i, block in enumerate(blocks):
        for target in plan_block(block, f"{blocks_name}.{i}", ignore).targets:
            out[target.name] = (int(target.weight.shape[0]), int(target.weight.shape[1]))
    return out


def check_prunable(config: PruneConfig, model: str | None) -> tuple[int | None, bool]:
    """Check ``config`` against the config of the model ``model`` (a spec as for `load_model`); return the
    model's context length (or None) and
    whether the layer checks ran (False when no weightless skeleton could be built: run `check_layers` on
    the loaded model then).

    - every ``--ignore`` pattern matches some layer (a warning names those that do not);
    - at least one layer is left to prune;
    - an N:M pattern divides every pruned layer's input width.
    """
    model_config = load_model_config(model)
    skeleton = model_skeleton(model_config)
    if skeleton is not None:
        check_layers(skeleton, config)
    return max_positions(model_config), skeleton is not None


def check_layers(model: torch.nn.Module, config: PruneConfig) -> None:
    """The `check_prunable` checks on a built model (weights or meta)."""
    every = prunable_layers(model)
    if not every:
        raise ConfigCheckError(f"{type(model).__name__} has no layer oneshot can prune in its decoder blocks")
    for pattern in config.ignore:
        if len(prunable_layers(model, (pattern,))) == len(every):
            logger.warning(
                "--ignore %r matches no prunable layer (names look like %s)", pattern, next(iter(every), "?")
            )
    kept = prunable_layers(model, config.ignore)
    if not kept:
        raise ConfigCheckError(
            f"--ignore {' '.join(repr(p) for p in config.ignore)} keeps all {len(every)} prunable weight "
            "matrices dense: "
            "nothing would be pruned"
        )
    nm = config.nm
    if nm is not None:
        bad = {name: shape for name, shape in kept.items() if shape[1] % nm[1] != 0}
        if bad:
            name, shape = next(iter(bad.items()))
            raise ConfigCheckError(
                f"pattern {config.pattern} needs every pruned layer's input width to be a multiple of {nm[1]}, "
                f"but {name} has {shape[1]} inputs ({len(bad)} layer(s) like it): keep them dense with "
                "--ignore or choose another pattern"
            )


def check_quantizable(model: torch.nn.Module, quant: QuantConfig, ignore: tuple[str, ...] = ()) -> None:
    """The group size divides the input width of every matrix that would be quantized (those `prune` would
    prune, less ``ignore``); the error names a layer and the group sizes that fit every width."""
    group = quant.groups
    layers = prunable_layers(model, ignore)
    if group is None or not layers:
        return
    bad = {name: shape for name, shape in layers.items() if shape[1] % group != 0}
    if not bad:
        return
    name, (_, cols) = next(iter(bad.items()))
    widths = sorted({shape[1] for shape in layers.values()})
    fits = [g for g in QUANT_GROUP_SIZES if all(w % g == 0 for w in widths)]
    advice = (
        f"use --group-size {max(fits)} or -1 (one scale per output channel)"
        if fits
        else "use --group-size -1 (one scale per output channel)"
    )
    raise ConfigError(
        f"--group-size {group} does not fit this model: {name} has {cols} input columns, which is not a multiple "
        f"of {group} ({len(bad)} layer(s) like it; input widths {', '.join(map(str, widths))}); {advice}"
    )
