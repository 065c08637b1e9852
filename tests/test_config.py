"""PruneConfig / RunConfig validation: every bad input is a ValueError that lists what is valid; the
algorithm and the run settings are apart (every field of PruneConfig is read by `oneshot.prune`)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from oneshot.config import PruneConfig, RunConfig, parse_pattern


@pytest.mark.parametrize(
    "text,expected", [("unstructured", None), ("2:4", (2, 4)), ("4:8", (4, 8)), (" 1 : 3 ", (1, 3))]
)
def test_parse_pattern(text: str, expected: tuple[int, int] | None) -> None:
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("bad", ["3:2", "2:0", "a:b", "2:2", "0:4", "2-4", "2:4:8"])
def test_bad_patterns(bad: str) -> None:
    with pytest.raises(ValueError, match="pattern"):
        PruneConfig(pattern=bad)


def test_sparsity_resolution() -> None:
    assert PruneConfig().sparsity == 0.5
    assert PruneConfig(pattern="2:4").sparsity == 0.5
    assert PruneConfig(pattern="1:4").sparsity == 0.25
    assert PruneConfig(sparsity="0.7").sparsity == 0.7
    assert PruneConfig(sparsity=0.5, pattern="4:8").pattern == "4:8"
    with pytest.raises(ValueError, match="contradicts"):
        PruneConfig(sparsity=0.6, pattern="2:4")


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, float("nan"), "abc"])
def test_bad_sparsity(value: object) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        PruneConfig(sparsity=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (PruneConfig, {"method": "obs"}, "magnitude, wanda, sparsegpt"),
        (RunConfig, {"nsamples": 0}, "nsamples"),
        (RunConfig, {"seqlen": -1}, "seqlen"),
        (RunConfig, {"batch_size": 0}, "batch_size"),
        (PruneConfig, {"damp": -1.0}, "damp"),
        (PruneConfig, {"block_size": 0}, "block_size"),
        (PruneConfig, {"propagate": "sideways"}, "pruned, dense"),
        (PruneConfig, {"uncalibrated": "skip"}, "magnitude, dense"),
        (RunConfig, {"dtype": "int8"}, "float32"),
        (RunConfig, {"device": "tpu"}, "auto"),
        (RunConfig, {"eval_windows": -1}, "--eval-windows"),
        (RunConfig, {"eval_seqlen": 1}, "--eval-seqlen must be at least 2"),
        (RunConfig, {"export": "csr"}, "2:4, bitmask"),
    ],
)
def test_bad_fields(cls: type, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_every_algorithm_field_is_read_by_the_pruner() -> None:
    """No dead field: each PruneConfig field name appears in oneshot.pruner's source (as config.<name>)."""
    import oneshot.pruner

    source = inspect.getsource(oneshot.pruner)
    unread = [f.name for f in dataclasses.fields(PruneConfig) if f"config.{f.name}" not in source]
    assert unread in ([], ["pattern"]), unread  # pattern is read as config.nm, its parsed form
    assert "config.nm" in source


def test_frozen_and_roundtrip() -> None:
    cfg = PruneConfig(method="Wanda", pattern="2:4", ignore=["lm_head"])  # type: ignore[arg-type]
    assert cfg.method == "wanda" and cfg.ignore == ("lm_head",)
    with pytest.raises(AttributeError):
        cfg.method = "magnitude"  # type: ignore[misc]
    d = cfg.to_dict()
    d["ignore"] = tuple(d["ignore"])
    assert PruneConfig(**d) == cfg
    assert cfg.replace(method="sparsegpt").method == "sparsegpt"
