"""The dispatcher: real dense baseline, choice, and the persisted plan file (CPU, timings faked).

``FakeTimer`` times nothing: each candidate's "milliseconds" come from a table, so the choices are exact.
It also times CPU calls (``devices``), so the whole path of a ``SparseLinear`` call (the dense baseline it
prepares, its decompress fallback, the plan file) runs here; Triton candidates are not launched on the CPU,
only their table entry is used.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from oneshot.kernels import BitmaskWeight, Dispatcher, DispatchKey, Plan, Sparse24Weight, SparseLinear
from oneshot.kernels.dispatch import PLANS_ENV, PLANS_SCHEMA
from tests.test_kernels_linear import prune_24_


class FakeTimer(Dispatcher):
    """A dispatcher whose timings come from ``times`` (keys ``dense``, ``decompress``, ``triton``, ...)."""

    devices = ("cpu", "cuda")

    def __init__(self, times: dict[str, float], decompressions: list[int], **kwargs: object) -> None:
        kwargs.setdefault("persist", "plans_file" in kwargs)  # never the real cache unless asked
        super().__init__(flush_l2=False, **kwargs)  # type: ignore[arg-type]
        self.times = times
        self.decompressions = decompressions
        self.calls: dict[str, tuple[int, torch.Tensor | None]] = {}  # name -> (decompressions, output)

    def _time(self, name: str, fn: Callable[[], object], device: torch.device) -> float:
        kind = name.split(":")[0]
        if kind == "triton" and device.type == "cpu":
            self.calls[name] = (0, None)  # not launchable here: only the table entry counts
        else:
            before = self.decompressions[0]
            out = fn()
            self.calls[name] = (
                self.decompressions[0] - before,
                out if isinstance(out, torch.Tensor) else None,
            )
        # Split-K configs a little slower, so the choice among the Triton configs is deterministic.
        return self.times[kind] + (0.01 if kind == "triton" and ":s1:" not in name else 0.0)


@pytest.fixture
def decompressions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts calls of ``decompress`` on either format."""
    count = [0]
    for cls in (Sparse24Weight, BitmaskWeight):
        original = cls.decompress

        def counted(self: object, _original: Callable[..., torch.Tensor] = original) -> torch.Tensor:
            count[0] += 1
            return _original(self)

        monkeypatch.setattr(cls, "decompress", counted)
    yield count


def _layer(timer: Dispatcher, *, keep_dense: bool = False, seed: int = 0) -> tuple[nn.Linear, SparseLinear]:
    torch.manual_seed(seed)
    linear = nn.Linear(64, 48, bias=True)
    prune_24_(linear)
    return linear, SparseLinear.from_linear(linear, "2:4", keep_dense=keep_dense, dispatcher=timer)


def test_dense_candidate_is_the_original_dense_layer(decompressions: list[int]) -> None:
    timer = FakeTimer({"dense": 1.0, "decompress": 3.0, "triton": 5.0}, decompressions)
    linear, layer = _layer(timer)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y, want = layer(x), linear(x)
    assert torch.equal(y, want)
    timed_decompressions, dense_out = timer.calls["dense"]
    assert timed_decompressions == 0  # the timed call is F.linear on a dense weight prepared beforehand
    assert dense_out is not None and torch.equal(dense_out, want)
    assert timer.calls["decompress"][0] == 1  # the fallback without a dense copy, timed as what it costs
    assert any(name.startswith("triton:") for name in timer.calls)
    plan = layer.last_plan
    assert plan is not None and plan.backend == "dense" and plan.candidate == "decompress"
    assert plan.timings_ms["dense"] == 1.0 and plan.vs_dense == pytest.approx(1 / 3)


def test_choice_against_the_dense_layer(decompressions: list[int]) -> None:
    x2 = torch.randn(1, 64)
    # A kernel faster than the dense layer is chosen, with or without a dense copy.
    for keep in (False, True):
        timer = FakeTimer({"dense": 1.0, "decompress": 3.0, "triton": 0.6}, decompressions)
        plan = _layer(timer, keep_dense=keep)[1]._plan(x2)
        assert plan.backend == "triton" and plan.config is not None and plan.config.split_k == 1
        assert plan.vs_dense == pytest.approx(1 / 0.6)
        assert ("decompress" in timer.calls) is not keep  # with a copy the fallback is the dense layer itself
    # Slower than the dense layer: never chosen when the layer keeps a dense copy (the fallback is exact
    # dense); without one it still beats decompress + F.linear, and vs_dense says it is slower than dense.
    timer = FakeTimer({"dense": 1.0, "decompress": 3.0, "triton": 2.0}, decompressions)
    plan = _layer(timer, keep_dense=True)[1]._plan(x2)
    assert (plan.backend, plan.candidate, plan.vs_dense) == ("dense", "dense", 1.0)
    timer = FakeTimer({"dense": 1.0, "decompress": 3.0, "triton": 2.0}, decompressions)
    plan = _layer(timer)[1]._plan(x2)
    assert plan.backend == "triton" and plan.vs_dense == pytest.approx(0.5)
    # Within the margin (2% by default) of the fallback, the fallback wins.
    timer = FakeTimer({"dense": 1.0, "triton": 0.99}, decompressions)
    assert _layer(timer, keep_dense=True)[1]._plan(x2).backend == "dense"


def test_dispatcher_skips_failing_candidates_and_caches(
    decompressions: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    import oneshot.kernels._common as common

    monkeypatch.setattr(common, "_sm_count", lambda device: 132)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    key = DispatchKey("2:4", 4096, 4096, False, False, 1, torch.bfloat16, torch.device("cuda", 0))
    ran: list[Plan] = []

    def run(plan: Plan) -> torch.Tensor:
        ran.append(plan)
        if plan.backend == "cusparselt":
            raise RuntimeError("unsupported on this device")
        return torch.zeros(1)

    def dense() -> Callable[[], torch.Tensor]:
        return lambda: torch.ones(1)

    timer = FakeTimer({"dense": 1.0, "decompress": 2.0, "triton": 0.6}, decompressions)
    plan = timer.plan(key, 1, run, dense=dense, allow_cusparselt=True)
    assert plan.backend == "triton" and plan.config is not None and plan.config.split_k == 1
    assert "cusparselt" not in plan.timings_ms and plan.timings_ms["dense"] == 1.0
    assert {p.backend for p in ran} == {"dense", "triton", "cusparselt"}  # dense: the decompress fallback
    count = len(ran)
    assert timer.plan(key, 1, run, dense=dense, allow_cusparselt=True) is plan
    assert len(ran) == count  # cached: nothing re-timed
    # Devices that are not timed get the untimed dense plan.
    cpu_key = key._replace(device=torch.device("cpu"))
    plain = Dispatcher(persist=False)
    assert plain.plan(cpu_key, 1, run, dense=dense, allow_cusparselt=False) == Plan("dense")
    assert len(ran) == count


def test_plans_persist_and_reload_without_timing(
    tmp_path: Path,
    decompressions: list[int],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "cache" / "plans.json"
    times = {"dense": 1.0, "decompress": 3.0, "triton": 2.0}
    x = torch.randn(5, 64)
    first = FakeTimer(times, decompressions, plans_file=path)
    plan = _layer(first)[1]._plan(x)  # the plan only: a Triton plan does not run on the CPU
    assert plan.candidate.startswith("triton:") and first.calls
    data = json.loads(path.read_text())
    assert data["schema"] == PLANS_SCHEMA and len(data["plans"]) == 1
    (file_key,) = data["plans"]
    assert (
        f"torch {torch.__version__}" in file_key and "2:4|48x64|bias 1|dense kept 0|m 5|float32" in file_key
    )
    assert not list(path.parent.glob(".*.tmp"))  # written atomically

    # A new process (a new dispatcher) reads the plan instead of timing.
    again = FakeTimer(times, decompressions, plans_file=path)
    assert _layer(again)[1]._plan(x) == plan and again.calls == {}
    # The choice is made again from the stored timings: a wider margin keeps the decompress fallback.
    wide = FakeTimer(times, decompressions, plans_file=path, margin=0.5)
    assert _layer(wide)[1]._plan(x).candidate == "decompress" and wide.calls == {}
    # Another key (M bucket) misses and is added to the same file.
    _layer(again)[1]._plan(torch.randn(40, 64))
    assert again.calls and len(json.loads(path.read_text())["plans"]) == 2

    # Another torch version misses.
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    other = FakeTimer(times, decompressions, plans_file=path)
    assert _layer(other)[1]._plan(x) == plan and other.calls  # timed again
    assert len(json.loads(path.read_text())["plans"]) == 3
    monkeypatch.undo()

    # A corrupt file is ignored with a warning, and replaced by the next save.
    path.write_text("{ not json")
    corrupt = FakeTimer(times, decompressions, plans_file=path)
    with caplog.at_level(logging.WARNING, logger="oneshot.kernels.dispatch"):
        assert _layer(corrupt)[1]._plan(x) == plan
    assert corrupt.calls and "ignoring the unreadable plan file" in caplog.text
    assert json.loads(path.read_text())["schema"] == PLANS_SCHEMA
    # An entry that is not a plan is ignored too.
    data = json.loads(path.read_text())
    data["plans"] = {k: {"timings_ms": {"triton:nonsense": 1.0}} for k in data["plans"]}
    path.write_text(json.dumps(data))
    caplog.clear()
    malformed = FakeTimer(times, decompressions, plans_file=path)
    with caplog.at_level(logging.WARNING, logger="oneshot.kernels.dispatch"):
        assert _layer(malformed)[1]._plan(x) == plan
    assert malformed.calls and "malformed entry" in caplog.text


def test_plan_file_location_and_switches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PLANS_ENV, raising=False)
    monkeypatch.setenv("ONESHOT_CACHE", str(tmp_path / "cache"))
    assert Dispatcher().plans_path == tmp_path / "cache" / "dispatch-plans.json"
    monkeypatch.setenv(PLANS_ENV, str(tmp_path / "elsewhere.json"))
    assert Dispatcher().plans_path == tmp_path / "elsewhere.json"
    assert Dispatcher(plans_file=tmp_path / "given.json").plans_path == tmp_path / "given.json"
    assert Dispatcher(persist=False, plans_file=tmp_path / "given.json").plans_path is None
    for off in ("off", "0", "OFF"):
        monkeypatch.setenv(PLANS_ENV, off)
        assert Dispatcher().plans_path is None


def test_no_plan_file_when_persisting_is_off(
    tmp_path: Path, decompressions: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONESHOT_CACHE", str(tmp_path))
    monkeypatch.setenv(PLANS_ENV, "off")
    timer = FakeTimer({"dense": 1.0, "decompress": 3.0, "triton": 5.0}, decompressions, persist=True)
    _layer(timer)[1](torch.randn(2, 64))
    assert timer.calls and not list(tmp_path.iterdir())
