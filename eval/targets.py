"""What `oneshot eval` evaluates: a run folder, a model folder, a .gguf file, a Hub id or the embedded default.

`resolve_target` classifies a spec (reading a run folder's record), `check_loadable` checks every model's
files before any evaluation starts, and `fingerprint` keys a model's cached results by its content
(`oneshot.models.checkpoint_fingerprint`: config, tokenizer and sampled weight bytes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from oneshot.errors import OneshotError
from oneshot.models import checkpoint_fingerprint, default_model_path, load_model_config
from oneshot.runfolder import RUN_FILE, RunRecord

__all__ = ["EvalInputError", "Target", "check_loadable", "fingerprint", "resolve_target"]


class EvalInputError(OneshotError, ValueError):
    """Bad input to `oneshot eval` (a folder that is not a run, a bad option); the message says what."""


@dataclass
class Target:
    """A model to evaluate: what to pass to `load_model`, and its run folder and record when it is one."""

    label: str  # as reported in eval.json's "model"
    spec: str | None  # for oneshot.models.load_model (None = embedded default)
    run_dir: Path | None = None
    record: RunRecord | None = None

    def dense_spec(self) -> str | None:
        """The dense model a run was pruned from, as a `load_model` spec (None: the embedded default)."""
        source = self.record.source if self.record is not None else None
        if (
            source is None
            or source.kind not in ("default", "gguf", "local", "hub")
            or (source.kind != "default" and not source.path)
        ):
            raise EvalInputError("--longtail compares with the dense model: pass --baseline DENSE_MODEL")
        return None if source.kind == "default" else source.path


def resolve_target(spec: str | os.PathLike[str] | None) -> Target:
    """Classify ``spec``: embedded default, run folder, model folder, .gguf file or Hub id.

    A folder without ``config.json`` must be a run folder and so needs ``oneshot.json``; a folder with
    ``oneshot.json`` needs the checkpoint beside it.
    """
    if spec is None or str(spec) == "default":
        return Target("default", None)
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        has_run, has_config = (path / RUN_FILE).is_file(), (path / "config.json").is_file()
        if has_run:
            if not has_config:
                raise EvalInputError(
                    f"run folder {text} has {RUN_FILE} but no checkpoint: config.json and the weights "
                    "(model.safetensors) are missing"
                )
            return Target(str(path.resolve()), str(path), path.resolve(), RunRecord.load(path))
        if not has_config:
            raise EvalInputError(
                f"{text} is not a run folder: {RUN_FILE} is missing (and there is no config.json, so it is "
                "not a model folder either); pass a folder written by `oneshot prune`, a model folder, a "
                ".gguf file or a Hub id"
            )
        return Target(str(path.resolve()), str(path))
    if path.is_file():
        return Target(str(path.resolve()), str(path))
    return Target(text, text)


def check_loadable(targets: list[Target | None]) -> None:
    """Each model's config and weight files, without loading weights (ModelLoadError naming the file)."""
    for target in targets:
        if target is None:
            continue
        if target.spec is None:
            default_model_path()
        elif not str(target.spec).endswith(".gguf"):  # a GGUF file is read (converted) only when needed
            load_model_config(target.spec)


def fingerprint(target: Target) -> str | None:
    """The content fingerprint of ``target``'s files (None: a Hub id not in the local cache)."""
    return checkpoint_fingerprint(target.spec)
