"""The `oneshot recover` job: a pruned or shrunk run folder fine-tuned toward its dense teacher, written as a
new run folder.

Everything that needs no weights is checked first (the run folder's record, the teacher, the data source,
the output); the output is then taken (`oneshot.output.reserve_output`: locked, test-written, moved into
place at the end). The resumable training state lives beside the output in ``.<out>.recover-state/``: it is
written every ``checkpoint_minutes`` of work, kept when the run is interrupted or fails, read back with
``resume=True``, and removed once the output is in place. The finished folder's pattern is checked from the
weight files against the source run's (`oneshot.verify.compare_patterns`) before anything is committed.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from oneshot.config import RecoverConfig, parse_pattern
from oneshot.data import calibration_windows, load_text_source, resolve_data_dir
from oneshot.errors import Interrupted, first_line
from oneshot.eval.corpora import PPL_DATASETS
from oneshot.jobs.prune import Finish, RunResult, quick_perplexity, write_run_folder
from oneshot.models import (
    ModelLoadError,
    load_model,
    load_model_config,
    max_positions,
    model_location,
    resolve_device,
    resolve_dtype,
)
from oneshot.output import OutputSlot, reserve_output
from oneshot.pruner import peak_memory
from oneshot.recover import RECOVERERS, Checkpointer, RecoverError, block_parameters, sparsity_masks
from oneshot.runfolder import (
    Calibration,
    QuickEval,
    RecoveryRecord,
    RunRecord,
    Source,
    from_dict,
    library_versions,
)

__all__ = ["default_out", "run_recover", "state_folder"]

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
INFO_FILE = "info.json"


def default_out(run_dir: str | os.PathLike[str]) -> Path:
    """``RUN_DIR-recovered`` beside the run folder."""
    path = Path(run_dir).expanduser()
    return path.with_name(f"{path.resolve().name}-recovered")


def state_folder(out: str | os.PathLike[str]) -> Path:
    """Where the resumable state of a recovery into ``out`` is kept: ``.<out>.recover-state`` beside it."""
    path = Path(os.path.abspath(Path(out).expanduser()))
    return path.parent / f".{path.name}.recover-state"


def _read_run(run_dir: Path) -> RunRecord:
    if not run_dir.is_dir():
        raise RecoverError(
            f"{run_dir} is not a folder: give the run folder of `oneshot prune` or `oneshot shrink`"
        )
    record = RunRecord.load(run_dir)
    if not (run_dir / "config.json").is_file():
        raise RecoverError(f"{run_dir} holds a record but no checkpoint (config.json is missing)")
    return record


def _teacher_spec(record: RunRecord, run_dir: Path, teacher: str | None) -> str | None:
    """The teacher: ``teacher`` when given, else the model the run started from (None: the embedded default).
    Checked without loading weights; "no teacher found" when it is not there."""
    spec = teacher if teacher is not None else record.run.model
    try:
        load_model_config(spec)
    except ModelLoadError as exc:
        if teacher is not None:
            raise RecoverError(f"no teacher found: --teacher {teacher}: {exc}") from exc
        recorded = spec if spec is not None else "the embedded SmolLM2-135M-Instruct"
        raise RecoverError(
            f"no teacher found: the base model {run_dir / 'oneshot.json'} records ({recorded}) cannot be "
            f"loaded ({first_line(exc)}); pass --teacher DENSE_MODEL"
        ) from exc
    return spec


def _block_map(record: RunRecord, student_cfg: Any, teacher_cfg: Any) -> list[int]:
    """Student block i -> the teacher block it stands for; the architectures must agree otherwise."""
    s_text = student_cfg.get_text_config() if hasattr(student_cfg, "get_text_config") else student_cfg
    t_text = teacher_cfg.get_text_config() if hasattr(teacher_cfg, "get_text_config") else teacher_cfg
    for key in ("model_type", "hidden_size", "vocab_size"):
        s_val, t_val = getattr(s_text, key, None), getattr(t_text, key, None)
        if s_val != t_val:
            raise RecoverError(
                f"the teacher does not match the run's model: {key} {t_val} against {s_val} (pass the dense model "
                "the run was made from as --teacher)"
            )
    n_student, n_teacher = int(s_text.num_hidden_layers), int(t_text.num_hidden_layers)
    dropped = set(record.shrink.dropped_layers) if record.shrink is not None else set()
    mapping = [j for j in range(n_teacher) if j not in dropped]
    if len(mapping) != n_student:
        raise RecoverError(
            f"the run's model has {n_student} decoder blocks, the teacher {n_teacher}"
            + (f" less the {len(dropped)} the shrink dropped" if dropped else "")
            + ": pass the dense model the run was made from as --teacher"
        )
    return mapping


def _check_data(config: RecoverConfig, data_dir: str | None) -> tuple[list[str], str] | None:
    """Read the training documents now (unreadable data fails before any model); never the evaluation text."""
    if str(config.data).strip().lower() == "self":
        return None
    documents = load_text_source(config.data, data_dir)
    origin = Path(documents[1]).name
    held_out = {Path(rel).name for rel in PPL_DATASETS.values()}
    if origin in held_out:
        raise RecoverError(
            f"--data {config.data} is {origin}, the text perplexity is measured on: recovery must train on "
            "other text (c4 and wikitext2 read their train/validation files)"
        )
    return documents


def _protected(
    run_dir: Path, teacher: str | None, config: RecoverConfig, data_dir: str | None
) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = [("run folder being recovered", run_dir)]
    where = model_location(teacher)
    if where is not None:
        out.append(("teacher model", where))
    data = resolve_data_dir(data_dir)
    if data is not None:
        out.append(("data directory", data))
    path = Path(str(config.data)).expanduser()
    if path.is_file():
        out.append(("data file", path))
    return out


class _State:
    """The resumable state folder of one output."""

    def __init__(self, folder: Path, identity: dict[str, Any]) -> None:
        self.folder, self.identity = folder, identity

    def describe(self) -> str:
        try:
            info = json.loads((self.folder / INFO_FILE).read_text())
            return f"step {info.get('steps')} of {info.get('total_steps', '?')}, saved {info.get('saved')}"
        except (OSError, ValueError):
            return "unreadable"

    def load(self) -> dict[str, Any]:
        try:
            info = json.loads((self.folder / INFO_FILE).read_text())
            state = torch.load(self.folder / STATE_FILE, map_location="cpu", weights_only=False)
        except (OSError, ValueError, RuntimeError, EOFError) as exc:
            raise RecoverError(
                f"the saved recovery state in {self.folder} cannot be read ({first_line(exc)}): delete the folder "
                "and start afresh"
            ) from exc
        if info.get("identity") != self.identity:
            raise RecoverError(
                f"the saved state in {self.folder} belongs to another run folder or teacher: delete it, or resume "
                "with the same run folder and teacher"
            )
        return dict(state)

    def save(self, state: dict[str, Any]) -> None:
        self.folder.mkdir(exist_ok=True)
        tmp = self.folder / f".{STATE_FILE}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.folder / STATE_FILE)
        info = {
            "identity": self.identity,
            "steps": state.get("steps"),
            "total_steps": state.get("total_steps"),
            "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        tmp_info = self.folder / f".{INFO_FILE}.tmp"
        tmp_info.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp_info, self.folder / INFO_FILE)


def run_recover(
    run_dir: str | os.PathLike[str],
    config: RecoverConfig,
    out: str | os.PathLike[str] | None = None,
    *,
    teacher: str | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    eval_windows: int = 8,
    eval_seqlen: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    argv: list[str] | None = None,
    finish: Sequence[Finish] = (),
    on_step: Callable[[int], None] | None = None,
) -> RunResult:
    """Recover the model of ``run_dir`` with ``config`` toward ``teacher`` (default: the base model of the run)
    and save it as a new run folder at ``out`` (default ``RUN_DIR-recovered``).

    ``on_step(global_step)`` runs after every optimizer step (tests interrupt a run with it).
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir).expanduser()
    record = _read_run(run_dir)
    if record.kind == "prune" and record.prune is not None and not record.prune.layers:
        raise RecoverError(f"{run_dir / 'oneshot.json'} lists no pruned matrices")
    if record.quantization is not None:
        raise RecoverError(
            f"{run_dir} is quantized ({record.quantization.label}): training would move its weights off their "
            "grid; recover the run before quantizing, then `oneshot quantize` the recovered run"
        )
    resolve_device(device)
    if isinstance(eval_windows, bool) or not isinstance(eval_windows, int) or eval_windows < 0:
        raise RecoverError(f"--eval-windows must be an integer >= 0, got {eval_windows!r}")
    teacher_spec = _teacher_spec(record, run_dir, teacher)
    student_cfg = load_model_config(str(run_dir))
    teacher_cfg = load_model_config(teacher_spec)
    block_map = _block_map(record, student_cfg, teacher_cfg)
    max_pos = max_positions(student_cfg)
    if max_pos is not None and config.seqlen > max_pos:
        raise RecoverError(f"--seqlen {config.seqlen} exceeds the model's context of {max_pos} tokens")
    documents = _check_data(config, data_dir)
    out = Path(out).expanduser() if out is not None else default_out(run_dir)
    identity = {
        "run": str(run_dir.resolve()),
        "run_files": {k: v.sha256 for k, v in (record.files or {}).items()},
        "teacher": teacher_spec,
    }
    state = _State(state_folder(out), identity)
    if state.folder.exists() and not resume:
        raise RecoverError(
            f"{state.folder} holds the state of an interrupted recovery into {out} ({state.describe()}): pass "
            "--resume to continue it, or delete that folder to start afresh"
        )
    if resume and not (state.folder / STATE_FILE).is_file():
        raise RecoverError(
            f"--resume: there is no saved recovery state for {out} (looked for {state.folder})"
        )
    try:
        slot = reserve_output(
            out, overwrite=overwrite, protected=_protected(run_dir, teacher_spec, config, data_dir)
        )
    except KeyboardInterrupt as exc:
        raise Interrupted(f"interrupted; nothing was written to {out}") from exc
    try:
        return _recover_in_slot(
            slot,
            run_dir,
            record,
            config,
            teacher_spec=teacher_spec,
            block_map=block_map,
            documents=documents,
            data_dir=data_dir,
            device=device,
            eval_windows=eval_windows,
            eval_seqlen=eval_seqlen or config.seqlen,
            state=state,
            resume=resume,
            progress=progress,
            argv=argv,
            finish=finish,
            on_step=on_step,
            t0=t0,
        )
    except KeyboardInterrupt as exc:
        kept = (
            f"; the training state saved at {state.describe()} is kept in {state.folder}: run the same command "
            "with --resume to continue"
            if (state.folder / STATE_FILE).is_file()
            else ""
        )
        raise Interrupted(f"interrupted; {slot.state()}{kept}") from exc
    finally:
        slot.release()


def _recover_in_slot(
    slot: OutputSlot,
    run_dir: Path,
    record: RunRecord,
    config: RecoverConfig,
    *,
    teacher_spec: str | None,
    block_map: list[int],
    documents: tuple[list[str], str] | None,
    data_dir: str | None,
    device: str,
    eval_windows: int,
    eval_seqlen: int,
    state: _State,
    resume: bool,
    progress: bool,
    argv: list[str] | None,
    finish: Sequence[Finish],
    on_step: Callable[[int], None] | None,
    t0: float,
) -> RunResult:
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    saved = state.load() if resume else None
    logger.info("loading the run's model from %s", run_dir)
    loaded = load_model(str(run_dir), dtype="float32")  # trained in float32, saved in the run's dtype
    student, tok = loaded.model, loaded.tokenizer
    logger.info("loading the teacher %s", teacher_spec or "(the embedded SmolLM2-135M-Instruct)")
    teacher_loaded = load_model(teacher_spec, dtype="float32")
    teacher = teacher_loaded.model
    windows, data_info = calibration_windows(
        config.data,
        tok,
        nsamples=config.windows,
        seqlen=config.seqlen,
        seed=config.seed,
        data_dir=data_dir,
        model=teacher,
        documents=documents,
    )
    layers = [layer.name for layer in record.prune.layers] if record.prune is not None else None
    masks = sparsity_masks(student, layers)
    eval_run = record.run.replace(
        eval_windows=eval_windows, eval_seqlen=eval_seqlen, data_dir=data_dir, device=device
    )
    ppl_teacher = ppl_before = None
    if eval_windows > 0:
        ppl_teacher = quick_perplexity(teacher, tok, eval_run, eval_seqlen, label="dense", progress=progress)
        ppl_before = quick_perplexity(
            student, tok, eval_run, eval_seqlen, label="unrecovered", progress=progress
        )

    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    checkpointer = Checkpointer(state.save, config.checkpoint_minutes, on_step)
    logger.info(
        "%s recovery: %d windows x %d tokens from %s, %d epoch(s), lr %g",
        config.method,
        windows.shape[0],
        windows.shape[1],
        config.data,
        config.epochs,
        config.lr,
    )
    result = RECOVERERS[config.method](
        student,
        teacher,
        windows,
        config,
        masks=masks,
        block_map=block_map,
        device=dev,
        state=saved,
        checkpointer=checkpointer,
        progress=progress,
    )
    peak, peak_kind = peak_memory(dev)
    teacher_source = dict(teacher_loaded.source)
    del teacher, teacher_loaded
    ppl_after = None
    if eval_windows > 0:
        ppl_after = quick_perplexity(
            student, tok, eval_run, eval_seqlen, label="recovered", progress=progress
        )

    new = RunRecord.load(run_dir)
    rec = RecoveryRecord(
        config=config,
        source_run=str(run_dir.resolve()),
        teacher=from_dict(Source, teacher_source),
        data=from_dict(Calibration, data_info),
        command=list(argv if argv is not None else sys.argv),
        started=started,
        windows=int(windows.shape[0]),
        tokens_seen=result.tokens_seen,
        steps=result.steps,
        seconds=result.seconds,
        device=result.device,
        peak_memory_bytes=peak,
        peak_memory_kind=peak_kind,
        resumed=result.resumed,
        loss_curve=result.curve,
        blocks=result.blocks,
        trained_params=sum(p.numel() for p in block_parameters(student).values()),
        ppl_teacher=ppl_teacher,
        ppl_before=ppl_before,
        ppl_after=ppl_after,
    )
    new.recoveries.append(rec)
    if ppl_teacher is not None and ppl_after is not None:
        new.quick_eval = QuickEval(dense=ppl_teacher, pruned=ppl_after)
    new.versions = library_versions()
    dtype = resolve_dtype(record.run.dtype)
    if dtype != torch.float32:
        student.to(dtype)
    assert slot.tmp is not None
    logger.info("writing %s", slot.out)
    rec.total_seconds = time.perf_counter() - t0
    write_run_folder(student, tok, slot.tmp, new)
    from oneshot.patterns import compare_patterns

    nm = parse_pattern(record.config.pattern) if record.config is not None else None
    rec.masks = compare_patterns(run_dir, slot.tmp, layers, nm)
    if not rec.masks.exact:
        m = rec.masks
        raise RecoverError(
            f"the recovered checkpoint does not keep the run's structure (shapes equal: {m.shapes_equal}, "
            f"revived weights: {m.revived}, broken {m.nm} groups: {m.nm_broken}): nothing was written"
        )
    new.save(slot.tmp)
    for step in finish:
        step(slot.tmp)
    slot.commit()
    shutil.rmtree(state.folder, ignore_errors=True)
    return RunResult(slot.out, new)
