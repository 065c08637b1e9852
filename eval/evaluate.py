"""`oneshot eval`: perplexity and zero-shot tasks of a model or a run folder, next to a dense baseline.

A *run folder* is what `oneshot prune` writes: ``oneshot.json`` + checkpoint + tokenizer. Anything else
(the embedded default, a model folder, a ``.gguf`` file, a Hub id) goes through `oneshot.models.load_model`.

The result is one JSON-ready dict (format ``oneshot-eval/1``)::

    {"format", "model", "run_dir", "fingerprint", "dtype", "device",
     "ppl": {name: {value, nll, windows, seqlen, tokens, note, source}},
     "tasks": {name: {acc, acc_stderr, acc_norm, acc_norm_stderr, ..., n, limit, source}},
     "baseline": None | {same sections, "model", "fingerprint", "cached"},
     "longtail": None | {...}, "config", "versions", "seconds"}

and is also written to ``RUN_DIR/eval.json`` when the evaluated model is a run folder (whose model card,
``README.md``, is then rewritten with the results: `oneshot.card`).

The dense baseline's results are cached per item (one perplexity dataset, one task) under
``$ONESHOT_CACHE/eval`` (default ``~/.cache/oneshot/eval``), keyed by the model's fingerprint and every
setting that changes the number (seqlen, limit, data file, dtype, device type, library versions). The
fingerprint of a model on disk hashes ``config.json`` and the names, sizes and mtimes of its weight files
(so a cached baseline is not even loaded); other models hash their config and a strided sample of every
weight tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "EVAL_FILE",
    "FORMAT",
    "RUN_FILE",
    "EvalConfig",
    "EvalInputError",
    "Target",
    "check_inputs",
    "evaluate",
    "evaluate_model",
    "file_fingerprint",
    "model_fingerprint",
    "resolve_target",
]

logger = logging.getLogger(__name__)

FORMAT = "oneshot-eval/1"
RUN_FILE = "oneshot.json"
EVAL_FILE = "eval.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_DTYPES = ("float32", "bfloat16", "float16")


class EvalInputError(ValueError):
    """Bad input to `oneshot eval` (a folder that is not a run, a bad option); the message says what."""


@dataclass(frozen=True)
class EvalConfig:
    """What to measure. ``limit`` caps perplexity windows and documents per task (quick checks)."""

    ppl: tuple[str, ...] = ("wikitext2",)
    seqlen: int = 2048
    limit: int | None = None
    tasks: tuple[str, ...] = ()
    baseline: str | None = None  # dense model or run folder evaluated alongside (cached)
    longtail: bool = False
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
            raise EvalInputError(f"--limit must be >= 1 (windows / documents per task), got {self.limit}")
        if self.seqlen < 2:
            raise EvalInputError(f"--seqlen must be >= 2, got {self.seqlen}")
        if self.batch_size is not None and self.batch_size < 1:
            raise EvalInputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise EvalInputError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(_DTYPES)}")
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
        from oneshot.pruner import resolve_device

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


@dataclass
class Target:
    """A model to evaluate: what to pass to `load_model`, and its run folder when it is one."""

    label: str  # as reported in "model"
    spec: str | None  # for oneshot.models.load_model (None = embedded default)
    run_dir: Path | None = None
    record: dict[str, Any] = field(default_factory=dict)  # oneshot.json of a run folder

    def base_model(self) -> str | bool | None:
        """The dense model a run was pruned from (a load_model spec), False when unknown."""
        source = self.record.get("source") or {}
        if source.get("kind") == "default":
            return None
        path = source.get("path")
        return str(path) if path else False


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
            try:
                record = json.loads((path / RUN_FILE).read_text())
            except (OSError, ValueError) as exc:
                raise EvalInputError(f"{path / RUN_FILE} is unreadable ({exc})") from exc
            return Target(str(path.resolve()), str(path), path.resolve(), record)
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


def file_fingerprint(target: Target) -> str | None:
    """Hash of config.json + weight file names/sizes/mtimes (a folder), or of the .gguf file; None for Hub ids."""
    from oneshot.models import ModelLoadError, default_model_path

    h = hashlib.sha256(b"oneshot-fp/1")
    if target.spec is None:
        try:
            files = [default_model_path()]
        except ModelLoadError:
            return None
    else:
        path = Path(target.spec).expanduser()
        if path.is_dir():
            config = path / "config.json"
            if not config.is_file():
                return None
            h.update(config.read_bytes())
            files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
            if not files:
                return None
        elif path.is_file():
            files = [path]
        else:
            return None
    for f in files:
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


@torch.no_grad()
def model_fingerprint(model: Any, samples: int = 4096) -> str:
    """Hash of the config and a strided sample of ``samples`` values of every weight tensor."""
    h = hashlib.sha256(b"oneshot-fp-weights/1")
    cfg = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)  # (numel,)
        step = max(1, flat.numel() // samples)
        sample = flat[::step][:samples].float().cpu()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:20]


def check_inputs(config: EvalConfig) -> None:
    """Fail before any model is loaded: unknown datasets/tasks, missing data files (offline)."""
    from oneshot.eval.corpora import PPL_DATASETS, find_data_file
    from oneshot.eval.tasks import LOCAL_TASKS, _local_paths, _offline, validate_task_names

    for name in config.ppl:
        if name in PPL_DATASETS:
            find_data_file(PPL_DATASETS[name], config.data_dir)
        elif not Path(name).expanduser().is_file():
            raise EvalInputError(
                f"unknown perplexity dataset {name!r}: choose one of {', '.join(PPL_DATASETS)} or an "
                "existing text file (.txt/.raw/.jsonl/.jsonl.gz/.parquet)"
            )
    if config.tasks:
        validate_task_names(config.tasks, config.data_dir)
        for name in config.tasks:
            if name in LOCAL_TASKS and _offline() and _local_paths(name, config.data_dir) is None:
                find_data_file(LOCAL_TASKS[name].files[0], config.data_dir)  # raises: which file, where


def _data_stamp(path: str) -> str:
    st = Path(path).stat()
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"


class _Cache:
    """Per-item results of one model under ``$ONESHOT_CACHE/eval/<fingerprint>/``."""

    def __init__(self, fingerprint: str | None, enabled: bool) -> None:
        from oneshot.models import cache_root

        self.dir = cache_root() / "eval" / fingerprint if fingerprint and enabled else None

    def _path(self, key: dict[str, Any]) -> Path | None:
        if self.dir is None:
            return None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
        return self.dir / f"{key['kind']}-{key['name'].replace('/', '_')[-40:]}-{digest}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data.get("result") if data.get("key") == json.loads(json.dumps(key, default=str)) else None

    def put(self, key: dict[str, Any], result: dict[str, Any]) -> None:
        path = self._path(key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, {"key": key, "result": result})
        except OSError as exc:
            logger.warning("could not write the evaluation cache %s: %s", path, exc)


def _atomic_write(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _versions() -> dict[str, str]:
    from oneshot.run import library_versions

    out = library_versions()
    import importlib.metadata as md

    for pkg in ("datasets",):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def _item_keys(config: EvalConfig, data_sources: dict[str, str]) -> dict[tuple[str, str], dict[str, Any]]:
    """Cache key of every item: everything that changes its number."""
    versions = _versions()
    common = {
        "format": FORMAT,
        "dtype": config.resolved_dtype,
        "device": config.torch_device.type,
        "limit": config.limit,
        "torch": versions.get("torch"),
        "transformers": versions.get("transformers"),
    }
    keys: dict[tuple[str, str], dict[str, Any]] = {}
    for name in config.ppl:
        keys[("ppl", name)] = {
            **common,
            "kind": "ppl",
            "name": name,
            "seqlen": config.seqlen,
            "data": data_sources.get(f"ppl:{name}"),
        }
    for name in config.tasks:
        keys[("task", name)] = {
            **common,
            "kind": "task",
            "name": name,
            "data": data_sources.get(f"task:{name}", "hub"),
            "lm_eval": versions.get("lm_eval"),
            "bootstrap_iters": config.bootstrap_iters,
        }
    return keys


def _data_sources(config: EvalConfig) -> dict[str, str]:
    """Stamps (path, size, mtime) of the data files each item reads."""
    from oneshot.eval.corpora import PPL_DATASETS, find_data_file
    from oneshot.eval.tasks import LOCAL_TASKS, _local_paths

    out: dict[str, str] = {}
    for name in config.ppl:
        path = find_data_file(PPL_DATASETS[name], config.data_dir) if name in PPL_DATASETS else Path(name)
        out[f"ppl:{name}"] = _data_stamp(str(path))
    for name in config.tasks:
        paths = _local_paths(name, config.data_dir) if name in LOCAL_TASKS else None
        out[f"task:{name}"] = ";".join(_data_stamp(str(p)) for p in paths) if paths else "hub"
    return out


def _max_positions(model: Any) -> int | None:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def evaluate_model(
    model: Any,
    tokenizer: Any,
    config: EvalConfig,
    *,
    skip: set[tuple[str, str]] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Perplexities and task metrics of an in-memory model (already on ``config.torch_device``).

    Returns ``{"ppl": {name: {...}}, "tasks": {name: {...}}}``; items in ``skip`` are left out.
    """
    from oneshot.eval.corpora import ppl_data
    from oneshot.eval.perplexity import perplexity
    from oneshot.eval.tasks import run_tasks

    skip = skip or set()
    device = config.torch_device
    out: dict[str, Any] = {"ppl": {}, "tasks": {}}
    max_pos = _max_positions(model)
    for name in config.ppl:
        if ("ppl", name) in skip:
            continue
        if max_pos is not None and config.seqlen > max_pos:
            raise EvalInputError(f"--seqlen {config.seqlen} exceeds the model's context of {max_pos} tokens")
        data = ppl_data(name, tokenizer, config.seqlen, config.data_dir)
        limit = (
            data.max_windows if config.limit is None else min(config.limit, data.max_windows or config.limit)
        )
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
        if config.limit is not None:
            note = f"--limit {config.limit}: first {res.windows} windows only, not the full protocol; {note}"
        out["ppl"][name] = {
            **res.to_dict(),
            "note": note,
            "source": data.source,
            "seconds": time.perf_counter() - t0,
        }
        logger.info("%s perplexity %.4f (%d windows x %d tokens)", name, res.value, res.windows, res.seqlen)
    tasks = [t for t in config.tasks if ("task", t) not in skip]
    if tasks:
        t0 = time.perf_counter()
        out["tasks"] = run_tasks(
            model,
            tokenizer,
            tasks,
            data_dir=config.data_dir,
            limit=config.limit,
            batch_size=config.batch("tasks"),
            bootstrap_iters=config.bootstrap_iters,
        )
        logger.info("tasks done in %.1f s", time.perf_counter() - t0)
    return out


def _load(target: Target, config: EvalConfig) -> Any:
    from oneshot.models import load_model

    loaded = load_model(target.spec, dtype=config.resolved_dtype)
    loaded.model.to(config.torch_device)
    return loaded


def _cached_or_computed(
    target: Target,
    config: EvalConfig,
    keys: dict[tuple[str, str], dict[str, Any]],
    loaded: Any,
    *,
    use_cache: bool,
    progress: bool,
) -> tuple[dict[str, Any], Any]:
    """Sections of ``target``; cached items are read, the rest computed (loading the model if needed)."""
    fingerprint = file_fingerprint(target) if loaded is None else None
    cache = _Cache(fingerprint, use_cache)
    hits = {k: cache.get(v) for k, v in keys.items()} if fingerprint else {}
    missing = [k for k in keys if hits.get(k) is None]
    if missing and loaded is None:
        loaded = _load(target, config)
    if fingerprint is None:
        fingerprint = file_fingerprint(target) or model_fingerprint(loaded.model)
        cache = _Cache(fingerprint, use_cache)
        hits = {k: cache.get(v) for k, v in keys.items()}
        missing = [k for k in keys if hits.get(k) is None]
    section: dict[str, Any] = {"ppl": {}, "tasks": {}}
    extra: dict[str, Any] = {}
    if missing:
        computed = evaluate_model(
            loaded.model,
            loaded.tokenizer,
            config,
            skip={k for k in keys if k not in missing},
            progress=progress,
        )
        for (kind, name), key in keys.items():
            value = computed["ppl" if kind == "ppl" else "tasks"].get(name)
            if value is not None:
                hits[(kind, name)] = value
                cache.put(key, value)
        # a group or tag name (online) expands to its member tasks: report those (not cached)
        extra = {k: v for k, v in computed["tasks"].items() if ("task", k) not in keys}
    for kind, name in keys:
        if hits.get((kind, name)) is not None:
            section["ppl" if kind == "ppl" else "tasks"][name] = hits[(kind, name)]
    section["tasks"].update(extra)
    section.update(fingerprint=fingerprint, cached=not missing)
    return section, loaded


def _longtail(
    dense: Any, pruned: Any, config: EvalConfig, result: dict[str, Any], progress: bool
) -> dict[str, Any] | None:
    try:
        from oneshot.eval.longtail import longtail_report  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        logger.warning("--longtail skipped: eval.longtail is not available (%s)", exc)
        return None
    import inspect

    from oneshot.data import resolve_data_dir

    optional: dict[str, Any] = {
        "device": config.torch_device,
        "task_results": result.get("tasks") or None,
        "baseline_task_results": (result.get("baseline") or {}).get("tasks") or None,
        "progress": progress,
    }
    accepted = inspect.signature(longtail_report).parameters
    kwargs = {k: v for k, v in optional.items() if k in accepted}
    data_dir = resolve_data_dir(config.data_dir)
    report: dict[str, Any] = longtail_report(
        dense.model, pruned.model, pruned.tokenizer, data_dir, seed=config.seed, limit=config.limit, **kwargs
    )
    return report


def evaluate(
    model: str | os.PathLike[str] | None,
    config: EvalConfig | None = None,
    *,
    progress: bool = False,
    write_run_eval: bool = True,
) -> dict[str, Any]:
    """Evaluate a model or run folder (and ``config.baseline``); a JSON-ready ``oneshot-eval/1`` dict.

    Everything that can be checked without a model (datasets, tasks, data files, run folders) is checked
    first. The result is also written to ``RUN_DIR/eval.json`` for a run folder (``write_run_eval``).
    """
    config = config or EvalConfig()
    t0 = time.perf_counter()
    target = resolve_target(model)
    base_target = resolve_target(config.baseline) if config.baseline is not None else None
    dense_target = base_target
    if config.longtail and dense_target is None:
        base = target.base_model()
        if base is False or target.run_dir is None:
            raise EvalInputError("--longtail compares with the dense model: pass --baseline DENSE_MODEL")
        dense_target = resolve_target(base if isinstance(base, str) else None)
    check_inputs(config)
    _check_loadable([target, base_target, dense_target])  # a bad --baseline fails before any evaluation
    keys = _item_keys(config, _data_sources(config))

    loaded = _load(target, config)
    result: dict[str, Any] = {
        "format": FORMAT,
        "model": target.label,
        "run_dir": str(target.run_dir) if target.run_dir else None,
        "fingerprint": None,
        "dtype": config.resolved_dtype,
        "device": config.torch_device.type,
        "source": loaded.source,
    }
    main, loaded = _cached_or_computed(target, config, keys, loaded, use_cache=False, progress=progress)
    result["fingerprint"] = main["fingerprint"]
    result["ppl"], result["tasks"] = main["ppl"], main["tasks"]

    result["baseline"] = None
    dense_loaded = None
    if base_target is not None:
        section, dense_loaded = _cached_or_computed(
            base_target, config, keys, None, use_cache=config.cache, progress=progress
        )
        result["baseline"] = {"model": base_target.label, **section}
        if section["cached"]:
            logger.info("baseline results read from the cache (fingerprint %s)", section["fingerprint"])
    result["longtail"] = None
    if config.longtail and dense_target is not None:
        if dense_loaded is None:
            dense_loaded = _load(dense_target, config)
        result["longtail"] = _longtail(dense_loaded, loaded, config, result, progress)
    result["config"] = config.to_dict()
    result["versions"] = _versions()
    result["seconds"] = time.perf_counter() - t0
    if target.run_dir is not None and write_run_eval:
        try:
            _atomic_write(target.run_dir / EVAL_FILE, result)
        except OSError as exc:
            logger.warning("could not write %s: %s", target.run_dir / EVAL_FILE, exc)
        else:
            _refresh_card(target.run_dir)
    return result


def _check_loadable(targets: list[Target | None]) -> None:
    """Each model's config and weight files, without loading weights (ModelLoadError naming the file)."""
    from oneshot.models import default_model_path, load_model_config

    for target in targets:
        if target is None:
            continue
        if target.spec is None:
            default_model_path()
        elif not str(target.spec).endswith(".gguf"):  # a GGUF file is read (converted) only when needed
            load_model_config(target.spec)


def _refresh_card(run_dir: Path) -> None:
    """Rewrite the run's model card (README.md) so it carries the new eval.json results."""
    try:
        from oneshot.card import write_card

        write_card(run_dir)
    except Exception as exc:  # eval.json is written; the card is derived from it and can be rewritten
        logger.warning("could not refresh the model card in %s: %s", run_dir, exc)
