"""The report's own record (written as ``report.json``): what `oneshot.eval.report` builds from run and
evaluation records, and what `oneshot.eval.plots` and `oneshot.eval.render` draw and write."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from oneshot.eval.task_compare import TaskTable
from oneshot.runfolder import AllocationRecord, BlockReport, LayerReport, LongtailRecord, to_dict

__all__ = ["FORMAT", "PerplexityRow", "Report", "ReportRun", "RunSummary"]

FORMAT = "oneshot-report/1"


@dataclass
class RunSummary:
    name: str
    dir: str
    model: str
    model_type: str | None
    method: str
    pattern: str
    target_sparsity: float
    sparsity: float
    pruned_params: int
    calibration: str
    prune_seconds: float | None
    peak_memory_bytes: int
    peak_memory_kind: str
    device: str
    started: str | None
    command: str
    has_eval: bool
    evaluation: str  # "eval.json" | "quick check only" | "none"


@dataclass
class PerplexityRow:
    dataset: str
    kind: str  # "eval" (oneshot eval) | "quick" (the quick check of oneshot prune)
    dense: float | None
    dense_from: str | None  # where the dense number came from
    pruned: float
    rel_degradation: float | None
    windows: int
    seqlen: int
    tokens: int | None
    note: str


@dataclass
class ReportRun:
    summary: RunSummary
    config: dict[str, Any]
    perplexity: list[PerplexityRow]
    tasks: TaskTable | None  # every metric of every task, and the comparison with the dense model
    longtail: LongtailRecord | None
    layers: list[LayerReport]
    blocks: list[BlockReport]
    allocation: AllocationRecord | None = None  # `--allocation owl|sensitivity`: the per-matrix sparsities


@dataclass
class Report:
    generated: str
    baseline: str | None
    runs: list[ReportRun]
    plots: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **to_dict(self)}, indent=2) + "\n"
