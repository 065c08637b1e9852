"""The evaluation job: perplexity and zero-shot tasks of a model or run folder, next to a dense baseline.

`evaluate(model, config)` returns an `oneshot.runfolder.EvalRecord` (format ``oneshot-eval/1``) and, for a
run folder, also writes it to ``RUN_DIR/eval.json`` (the CLI then refreshes the run's model card). What is
evaluated is resolved by `oneshot.eval.targets`; the dense baseline's results come from
`oneshot.eval.cache` when an identical item was measured before.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from oneshot.config import DTYPES
from oneshot.eval.cache import EVAL_CODE, ResultCache
from oneshot.eval.targets import EvalInputError, Target, check_loadable, fingerprint, resolve_target
from oneshot.models import content_fingerprint, max_positions, resolve_device
from oneshot.runfolder import (
    EVAL_FILE,
    BaselineRecord,
    EvalRecord,
    LongtailRecord,
    PerplexityRecord,
    Source,
    TaskRecord,
    from_dict,
    library_versions,
    to_dict,
)

__all__ = ["EVAL_FILE", "EvalConfig", "EvalInputError", "check_inputs", "evaluate", "evaluate_model"]

logger = logging.getLogger(__name__)

ItemKey = tuple[str, str]  # ("ppl" | "task", name)


@dataclass(frozen=True)
class EvalConfig:
    """What to measure. Three separate caps for quick checks: ``ppl_windows`` (perplexity windows),
    ``limit`` (documents per task) and ``longtail_tokens`` (tokens per long-tail slice)."""

    ppl: tuple[str, ...] = ("wikitext2",)
    seqlen: int = 2048
    ppl_windows: int | None = None  # first N perplexity windows (None: the protocol's)
    limit: int | None = None  # first N documents per task (None: all)
    tasks: tuple[str, ...] = ()
    baseline: str | None = None  # dense model or run folder evaluated alongside (cached)
    longtail: bool = False
    longtail_seqlen: int | None = None  # long-tail window length; None: seqlen (capped by the model)
    longtail_tokens: int = 1024  # tokens per long-tail slice
    seed: int = 0
    data_dir: str | None = None
    dtype: str | None = None  # None: bfloat16 on CUDA, float32 on the CPU
    device: str = "auto"
    batch_size: int | None = None  # None: perplexity 1 / tasks 8 on the CPU, 8 / 32 on CUDA
    bootstrap_iters: int = 100_000  # lm-eval's default (stderr of non-mean metrics)
    cache: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "ppl", tuple(self.ppl))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.limit is not None and self.limit < 1:
            raise EvalInputError(f"--limit must be >= 1 (documents per task), got {self.limit}")
        if self.ppl_windows is not None and self.ppl_windows < 1:
            raise EvalInputError(f"--ppl-windows must be >= 1, got {self.ppl_windows}")
        if self.longtail_tokens < 2:
            raise EvalInputError(f"--longtail-tokens must be >= 2, got {self.longtail_tokens}")
        if self.seqlen < 2:
            raise EvalInputError(f"--seqlen must be >= 2, got {self.seqlen}")
        if self.longtail_seqlen is not None and self.longtail_seqlen < 2:
            raise EvalInputError(f"--longtail-seqlen must be >= 2, got {self.longtail_seqlen}")
        if self.batch_size is not None and self.batch_size < 1:
            raise EvalInputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise EvalInputError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise EvalInputError(f"unknown device {self.device!r}: choose cpu, cuda or auto")
        if self.bootstrap_iters < 0:
            raise EvalInputError(f"--bootstrap-iters must be >= 0, got {self.bootstrap_iters}")
        if not self.ppl and not self.tasks and not self.longtail:
            raise EvalInputError("nothing to evaluate: give --ppl, --tasks or --longtail")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def resolved_dtype(self) -> str:
        if self.dtype is not None:
            return self.dtype
        return "bfloat16" if self.torch_device.type == "cuda" else "float32"

    def batch(self, kind: str) -> int:
        if self.batch_size is not None:
            return self.batch_size
        cuda = self.torch_device.type == "cuda"
        return {"ppl": 8 if cuda else 1, "tasks": 32 if cuda else 8}[kind]


def check_inputs(config: EvalConfig) -> None:
    """Fail before any model is loaded: unknown datasets/tasks, missing data files (offline)."""
    from oneshot.eval.corpora import PPL_DATASETS, find_data_file
    from oneshot.eval.tasks import LOCAL_TASKS, hub_offline, local_task_paths, validate_task_names

    for name in config.ppl:
        if name in PPL_DATASETS:
            find_data_file(PPL_DATASETS[name], config.data_dir)
        elif not Path(name).expanduser().is_file():
            raise EvalInputError(
                f"unknown perplexity dataset {name!r}: choose one of {', '.join(PPL_DATASETS)} or an "
                "existing text file (.txt/.raw/.jsonl/.jsonl.gz/.parquet)"
            )
    if config.tasks:
        try:
            validate_task_names(config.tasks, config.data_dir)
        except ValueError as exc:
            raise EvalInputError(str(exc)) from exc
        for name in config.tasks:
            if name in LOCAL_TASKS and hub_offline() and local_task_paths(name, config.data_dir) is None:
                find_data_file(LOCAL_TASKS[name].files[0], config.data_dir)  # raises: which file, where


def _data_fingerprints(config: EvalConfig) -> dict[ItemKey, str]:
    """The content fingerprint of the data files each item reads ("hub" for tasks read from the Hub)."""
    from oneshot.eval.corpora import PPL_DATASETS, find_data_file
    from oneshot.eval.tasks import LOCAL_TASKS, local_task_paths

    out: dict[ItemKey, str] = {}
    for name in config.ppl:
        path = find_data_file(PPL_DATASETS[name], config.data_dir) if name in PPL_DATASETS else Path(name)
        out[("ppl", name)] = content_fingerprint([Path(path)])
    for name in config.tasks:
        paths = local_task_paths(name, config.data_dir) if name in LOCAL_TASKS else None
        out[("task", name)] = content_fingerprint([Path(p) for p in paths]) if paths else "hub"
    return out


def _item_keys(config: EvalConfig) -> dict[ItemKey, dict[str, Any]]:
    """Cache key of every item: everything that changes its number."""
    versions = library_versions()
    data = _data_fingerprints(config)
    common = {
        "code": EVAL_CODE,
        "oneshot": versions.get("oneshot"),
        "dtype": config.resolved_dtype,
        "device": config.torch_device.type,
        "torch": versions.get("torch"),
        "transformers": versions.get("transformers"),
    }
    keys: dict[ItemKey, dict[str, Any]] = {}
    for name in config.ppl:
        keys[("ppl", name)] = {
            **common,
            "kind": "ppl",
            "name": name,
            "seqlen": config.seqlen,
            "windows": config.ppl_windows,
            "data": data[("ppl", name)],
        }
    for name in config.tasks:
        keys[("task", name)] = {
            **common,
            "kind": "task",
            "name": name,
            "limit": config.limit,
            "data": data[("task", name)],
            "lm_eval": versions.get("lm_eval"),
            "bootstrap_iters": config.bootstrap_iters,
        }
    return keys


def evaluate_model(
    model: Any,
    tokenizer: Any,
    config: EvalConfig,
    *,
    skip: set[ItemKey] | None = None,
    progress: bool = False,
) -> tuple[dict[str, PerplexityRecord], dict[str, TaskRecord]]:
    """Perplexities and task metrics of an in-memory model (already on ``config.torch_device``); items in
    ``skip`` are left out."""
    from oneshot.eval.corpora import ppl_data
    from oneshot.eval.perplexity import perplexity
    from oneshot.eval.tasks import run_tasks

    skip = skip or set()
    device = config.torch_device
    ppl: dict[str, PerplexityRecord] = {}
    max_pos = max_positions(model.config)
    data_fingerprints = {n: fp for (kind, n), fp in _data_fingerprints(config).items() if kind == "ppl"}
    for name in config.ppl:
        if ("ppl", name) in skip:
            continue
        if max_pos is not None and config.seqlen > max_pos:
            raise EvalInputError(f"--seqlen {config.seqlen} exceeds the model's context of {max_pos} tokens")
        data = ppl_data(name, tokenizer, config.seqlen, config.data_dir)
        cap = config.ppl_windows
        limit = data.max_windows if cap is None else min(cap, data.max_windows or cap)
        t0 = time.perf_counter()
        res = perplexity(
            model,
            data.input_ids,
            config.seqlen,
            config.batch("ppl"),
            limit=limit,
            device=device,
            progress=progress,
        )
        note = data.note
        if cap is not None:
            note = f"--ppl-windows {cap}: first {res.windows} windows only, not the full protocol; {note}"
        ppl[name] = PerplexityRecord(
            **res.to_dict(),
            note=note,
            source=data.source,
            seconds=time.perf_counter() - t0,
            data=data_fingerprints.get(name),
        )
        logger.info("%s perplexity %.4f (%d windows x %d tokens)", name, res.value, res.windows, res.seqlen)
    tasks: dict[str, TaskRecord] = {}
    names = [t for t in config.tasks if ("task", t) not in skip]
    if names:
        t0 = time.perf_counter()
        results = run_tasks(
            model,
            tokenizer,
            names,
            data_dir=config.data_dir,
            limit=config.limit,
            batch_size=config.batch("tasks"),
            bootstrap_iters=config.bootstrap_iters,
        )
        tasks = {name: from_dict(TaskRecord, res) for name, res in results.items()}
        logger.info("tasks done in %.1f s", time.perf_counter() - t0)
    return ppl, tasks


def _load(target: Target, config: EvalConfig) -> Any:
    from oneshot.models import load_model

    loaded = load_model(target.spec, dtype=config.resolved_dtype)
    loaded.model.to(config.torch_device)
    return loaded


@dataclass
class _Section:
    """The results of one model: computed, or read from the cache."""

    ppl: dict[str, PerplexityRecord]
    tasks: dict[str, TaskRecord]
    fingerprint: str | None
    cached: bool
    loaded: Any  # the loaded model when it had to be loaded, else None


def _cached_or_computed(
    target: Target,
    config: EvalConfig,
    keys: dict[ItemKey, dict[str, Any]],
    loaded: Any,
    *,
    use_cache: bool,
    progress: bool,
) -> _Section:
    """The results of ``target``; items in the cache are read, the rest computed (loading the model only
    when something is missing)."""
    fp = fingerprint(target)
    cache = ResultCache(fp, use_cache)
    hits: dict[ItemKey, dict[str, Any] | None] = {k: cache.get(v) for k, v in keys.items()}
    missing = [k for k in keys if hits[k] is None]
    ppl: dict[str, PerplexityRecord] = {}
    tasks: dict[str, TaskRecord] = {}
    if missing:
        if loaded is None:
            loaded = _load(target, config)
        new_ppl, new_tasks = evaluate_model(
            loaded.model,
            loaded.tokenizer,
            config,
            skip={k for k in keys if k not in missing},
            progress=progress,
        )
        for (kind, name), key in keys.items():
            value: PerplexityRecord | TaskRecord | None = (new_ppl if kind == "ppl" else new_tasks).get(name)
            if value is not None:
                hits[(kind, name)] = to_dict(value)
                cache.put(key, to_dict(value))
        # a group or tag name (online) expands to its member tasks: report those (not cached)
        tasks.update({k: v for k, v in new_tasks.items() if ("task", k) not in keys})
    for (kind, name), hit in hits.items():
        if hit is None:
            continue
        if kind == "ppl":
            ppl[name] = from_dict(PerplexityRecord, hit)
        else:
            tasks[name] = from_dict(TaskRecord, hit)
    return _Section(ppl, tasks, fp, not missing, loaded)


def _longtail(
    dense: Any, pruned: Any, config: EvalConfig, record: EvalRecord, progress: bool
) -> LongtailRecord:
    from oneshot.data import resolve_data_dir
    from oneshot.eval.longtail import longtail_report

    report = longtail_report(
        dense.model,
        pruned.model,
        pruned.tokenizer,
        resolve_data_dir(config.data_dir),
        seed=config.seed,
        max_tokens_per_slice=config.longtail_tokens,
        seqlen=min(
            config.longtail_seqlen or config.seqlen, max_positions(pruned.model.config) or config.seqlen
        ),
        device=config.torch_device,
        task_results={k: to_dict(v) for k, v in record.tasks.items()} or None,
        baseline_task_results={k: to_dict(v) for k, v in record.baseline.tasks.items()} or None
        if record.baseline is not None
        else None,
        progress=progress,
    )
    return from_dict(LongtailRecord, report)


def _keep_earlier(record: EvalRecord, path: Path) -> list[str]:
    """Carry the results of an earlier ``eval.json`` that this evaluation did not measure again into
    ``record`` (a perplexity run today does not erase yesterday's tasks); returns what was kept.

    Only when the earlier record is of the same model content (fingerprint) and its dense baseline, if
    both have one, is the same model too; otherwise the earlier results are stale and are replaced. Every
    kept item carries its own windows / limit / version, so the record stays self-describing; the kept
    names are listed in the record (``kept_from_earlier``)."""
    try:
        earlier = EvalRecord.load_optional(path.parent)
    except Exception:  # an unreadable earlier file is simply replaced
        return []
    if earlier is None or earlier.fingerprint is None or earlier.fingerprint != record.fingerprint:
        return []
    old_base, new_base = earlier.baseline, record.baseline
    if old_base is not None and new_base is not None and old_base.fingerprint != new_base.fingerprint:
        return []
    kept: list[str] = []
    for name, ppl in earlier.ppl.items():
        if name not in record.ppl:
            record.ppl[name] = ppl
            kept.append(f"ppl {name}")
    for name, task in earlier.tasks.items():
        if name not in record.tasks:
            record.tasks[name] = task
            kept.append(f"task {name}")
    if old_base is not None:
        if record.baseline is None:
            record.baseline = BaselineRecord(old_base.model, {}, {}, old_base.fingerprint, old_base.cached)
        for name, ppl in old_base.ppl.items():
            if f"ppl {name}" in kept:
                record.baseline.ppl.setdefault(name, ppl)
        for name, task in old_base.tasks.items():
            if f"task {name}" in kept:
                record.baseline.tasks.setdefault(name, task)
    if record.longtail is None and earlier.longtail is not None:
        record.longtail = earlier.longtail
        kept.append("longtail")
    if kept:
        record.extra["kept_from_earlier"] = kept
    return kept


def evaluate(
    model: str | os.PathLike[str] | None,
    config: EvalConfig | None = None,
    *,
    progress: bool = False,
    write_run_eval: bool = True,
) -> EvalRecord:
    """Evaluate a model or run folder (and ``config.baseline``); an `EvalRecord`.

    Everything that can be checked without a model (datasets, tasks, data files, run folders, the
    baseline's files) is checked first. For a run folder the record is also written to
    ``RUN_DIR/eval.json`` (``write_run_eval``).
    """
    config = config or EvalConfig()
    t0 = time.perf_counter()
    target = resolve_target(model)
    base_target = resolve_target(config.baseline) if config.baseline is not None else None
    dense_target = base_target
    if config.longtail and dense_target is None:
        if target.run_dir is None:
            raise EvalInputError("--longtail compares with the dense model: pass --baseline DENSE_MODEL")
        dense_target = resolve_target(target.dense_spec())
    check_inputs(config)
    check_loadable([target, base_target, dense_target])  # a bad --baseline fails before any evaluation
    keys = _item_keys(config)

    loaded = _load(target, config)
    main = _cached_or_computed(target, config, keys, loaded, use_cache=False, progress=progress)
    record = EvalRecord(
        model=target.label,
        ppl=main.ppl,
        tasks=main.tasks,
        run_dir=str(target.run_dir) if target.run_dir else None,
        fingerprint=main.fingerprint,
        dtype=config.resolved_dtype,
        device=config.torch_device.type,
        source=from_dict(Source, loaded.source),
    )
    dense_loaded = None
    if base_target is not None:
        base = _cached_or_computed(base_target, config, keys, None, use_cache=config.cache, progress=progress)
        dense_loaded = base.loaded
        record.baseline = BaselineRecord(
            base_target.label, base.ppl, base.tasks, base.fingerprint, base.cached
        )
        if base.cached:
            logger.info("baseline results read from the cache (fingerprint %s)", base.fingerprint)
    if config.longtail and dense_target is not None:
        if dense_loaded is None:
            dense_loaded = _load(dense_target, config)
        record.longtail = _longtail(dense_loaded, loaded, config, record, progress)
    record.config = config.to_dict()
    record.versions = library_versions()
    record.seconds = time.perf_counter() - t0
    if target.run_dir is not None and write_run_eval:
        kept = _keep_earlier(record, target.run_dir / EVAL_FILE)
        if kept:
            logger.info("kept earlier results of %s not measured again: %s", EVAL_FILE, ", ".join(kept))
        try:
            record.save(target.run_dir / EVAL_FILE)
        except OSError as exc:
            logger.warning("could not write %s: %s", target.run_dir / EVAL_FILE, exc)
    return record
