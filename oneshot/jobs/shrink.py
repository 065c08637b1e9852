"""The `oneshot shrink` job: the targets checked against a weightless skeleton of the model, then the same
frame as `oneshot prune` (`oneshot.jobs.prune.run_job`: output taken first, quick perplexity before and
after, the run folder written atomically) around `oneshot.shrink.shrink`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from oneshot.checks import model_skeleton
from oneshot.config import RunConfig, ShrinkConfig
from oneshot.jobs.prune import Finish, RunResult, run_job
from oneshot.models import load_model_config, max_positions
from oneshot.shrink import check_shrink, shrink

__all__ = ["run_shrink"]


def _check(config: ShrinkConfig, spec: str | None) -> tuple[int | None, bool]:
    model_config = load_model_config(spec)
    skeleton = model_skeleton(model_config)
    if skeleton is not None:
        check_shrink(config, skeleton)
    return max_positions(model_config), skeleton is not None


def run_shrink(
    config: ShrinkConfig,
    run: RunConfig,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
    argv: list[str] | None = None,
    finish: Sequence[Finish] = (),
) -> RunResult:
    """Load ``run.model``, shrink it to the targets of ``config`` on ``run``'s calibration windows, check a few
    perplexity windows before and after, and save the smaller dense model as a run folder at ``out``."""
    if run.export is not None:
        from oneshot.config import ConfigError

        raise ConfigError(
            "--export writes sparse formats of pruned models; a shrunk model is dense (leave it out)"
        )

    def operate(model: Any, calib: Any) -> dict[str, Any]:
        report = shrink(model, calib, config, device=run.device, batch_size=run.batch_size, progress=progress)
        return {"shrink_config": config, "shrink": report}

    return run_job(
        run,
        out,
        check=lambda spec: _check(config, spec),
        check_loaded=lambda model: check_shrink(config, model),
        operate=operate,
        label="shrunk",
        overwrite=overwrite,
        progress=progress,
        argv=argv,
        finish=finish,
    )
