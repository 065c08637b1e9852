"""The run folder: the one contract between prune, eval, card, report, push and model loading.

This module owns everything about it: the file names, the config keys a checkpoint must never carry, the
typed records of ``oneshot.json`` (`RunRecord`) and ``eval.json`` (`EvalRecord`) with their schema
versions and load/save, the library versions stamped into them, the content hashes of the files, and the
one atomic file writer (folders are taken and moved by `oneshot.output`).

Records are dataclasses; `to_dict` / `from_dict` convert them to and from JSON. Keys a record does not
know are kept in its ``extra`` field (when it has one) so nothing is lost on a round trip; records written
by earlier versions load (``oneshot-run/1``: one flat config, converted on load).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import tempfile
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from oneshot.config import AllocationConfig, PruneConfig, QuantConfig, RecoverConfig, RunConfig, ShrinkConfig
from oneshot.errors import OneshotError

__all__ = [
    "CARD_FILE",
    "EVAL_FILE",
    "EXPORT_FILE",
    "FORBIDDEN_CONFIG_KEYS",
    "INDEX_FILE",
    "QUANT_FILE",
    "REPORT_DIR",
    "RUN_FILE",
    "SENSITIVITY_FILE",
    "AllocationRecord",
    "BaselineRecord",
    "BlockReport",
    "Calibration",
    "DenseMatrix",
    "EvalRecord",
    "ExportCheck",
    "ExportManifest",
    "ExportRecord",
    "FileHash",
    "FrequencyBucket",
    "FrequencyInfo",
    "LayerReport",
    "LongtailRecord",
    "MaskCheck",
    "PerplexityRecord",
    "PruneReport",
    "QuantLayer",
    "QuantizationRecord",
    "QuickEval",
    "RecordError",
    "RecoveryRecord",
    "RunRecord",
    "SensitivityBlock",
    "SensitivityLayer",
    "SensitivityRecord",
    "ShrinkChoice",
    "ShrinkReport",
    "SkippedSlice",
    "SliceRecord",
    "Source",
    "TaskDelta",
    "TaskFlags",
    "TaskRecord",
    "UnitRemoval",
    "atomic_write_text",
    "file_hashes",
    "from_dict",
    "library_versions",
    "pack_bits",
    "read_quant_file",
    "to_dict",
    "unpack_bits",
    "write_quant_file",
]

RUN_FILE = "oneshot.json"
EVAL_FILE = "eval.json"
CARD_FILE = "README.md"
REPORT_DIR = "report"
INDEX_FILE = "model.safetensors.index.json"
# the grids of a quantized run beside its (fake-quantized, plain float) checkpoint: per quantized matrix
# ``<name>.weight_scale`` (rows, groups), ``<name>.weight_zero_point`` (rows, groups) and ``<name>.weight_g_idx``
# (cols,); the codes are ``round(W / scale) + zero_point`` of the checkpoint's weights (see `read_quant_file`)
QUANT_FILE = "quantization.safetensors"
# the record of `oneshot export` inside an export folder (what was written from which run, and the check)
EXPORT_FILE = "oneshot-export.json"
EXPORT_FORMAT, EXPORT_SCHEMA = "oneshot-export", 1
QUANT_FORMAT = "oneshot-quant/1"
QUANT_TENSORS = ("weight_scale", "weight_zero_point", "weight_g_idx")
# 3: shrink runs (config/prune null, shrink set); 4: quantized runs (``quantization`` set; a run of
# `oneshot quantize` on a plain model has config, prune and shrink null)
RUN_FORMAT, RUN_SCHEMA = "oneshot-run", 4
EVAL_FORMAT, EVAL_SCHEMA = "oneshot-eval", 1
# the output of `oneshot sensitivity`: per-layer reconstruction losses at several sparsities
SENSITIVITY_FILE = "sensitivity.json"
SENSITIVITY_FORMAT, SENSITIVITY_SCHEMA = "oneshot-sensitivity", 1
# keys that would make loaders treat the dense-stored checkpoint as quantized or compressed
FORBIDDEN_CONFIG_KEYS = ("quantization_config", "sparsity_config")
# files `oneshot eval` / `oneshot card` (re)write after the run: not covered by the content hashes
DERIVED = (CARD_FILE, EVAL_FILE, RUN_FILE, REPORT_DIR)

T = TypeVar("T")


class RecordError(OneshotError):
    """A record file is missing, unreadable or of an unknown format (the message names the file)."""


# --------------------------------------------------------------------------------------------------------
# Generic conversion between dataclasses and JSON


def _build(tp: Any, value: Any) -> Any:
    """``value`` (from JSON) as the annotated type ``tp``: nested dataclasses, lists, dicts, tuples."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _build(args[0], value) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value) if isinstance(value, dict) else value
    if origin is list and isinstance(value, list):
        (arg,) = typing.get_args(tp) or (Any,)
        return [_build(arg, v) for v in value]
    if origin is tuple and isinstance(value, list | tuple):
        return tuple(value)
    if origin is dict and isinstance(value, dict):
        _, arg = typing.get_args(tp) or (str, Any)
        return {k: _build(arg, v) for k, v in value.items()}
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """A dataclass from a JSON object: known keys typed, unknown ones into ``extra`` (if the class has it),
    the derived keys the class lists in ``_DERIVED`` dropped (they are recomputed)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    derived = set(getattr(cls, "_DERIVED", ()))
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        if key in names and key != "extra":
            kwargs[key] = _build(hints[key], value)
        elif key not in derived:
            extra[key] = value
    if "extra" in names:
        kwargs["extra"] = extra
    for key, value in getattr(cls, "_ABSENT_MEANS", {}).items():  # fields records written before them lack
        kwargs.setdefault(key, value)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """JSON-ready form of a record (the inverse of `from_dict`): ``extra`` merged back, ``_DERIVED``
    properties written out, tuples as lists, paths as strings, non-finite floats as null."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if not _is_record(obj) and hasattr(obj, "to_dict"):  # the configs serialise themselves
            return obj.to_dict()
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            if f.name != "extra":
                out[f.name] = to_dict(getattr(obj, f.name))
        for name in getattr(type(obj), "_DERIVED", ()):
            out[name] = to_dict(getattr(obj, name))
        out.update(to_dict(getattr(obj, "extra", None) or {}))
        return out
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    return str(obj)  # torch.dtype, torch.device and the like


def _is_record(obj: Any) -> bool:
    return type(obj).__module__ == __name__


# --------------------------------------------------------------------------------------------------------
# Files


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step (a hidden temporary file beside it, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RecordError(f"{path} not found: {path.parent} is not {what}") from exc
    except PermissionError as exc:
        raise RecordError(f"cannot read {path}: permission denied") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path} is not valid JSON ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise RecordError(f"{path} is not a JSON object")
    return data


def _schema(path: Path, data: dict[str, Any], name: str, newest: int) -> int:
    fmt = str(data.get("format", ""))
    prefix, _, version = fmt.partition("/")
    if prefix != name or not version.isdigit():
        raise RecordError(f"{path} has format {fmt!r}, expected {name}/N")
    if int(version) > newest:
        raise RecordError(
            f"{path} is {fmt}, newer than this oneshot reads ({name}/{newest}): upgrade oneshot"
        )
    return int(version)


def file_hashes(folder: Path) -> dict[str, FileHash]:
    """sha256 and size of every file of a run folder except hidden ones and the derived ones (card, eval,
    record, report). Recorded in ``oneshot.json`` at save time; `oneshot push` verifies them."""
    out: dict[str, FileHash] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        parts = rel.split("/")
        if (
            any(p.startswith(".") for p in parts)
            or not path.is_file()
            or rel in DERIVED
            or parts[0] in DERIVED
        ):
            continue
        out[rel] = FileHash(sha256_of(path), path.stat().st_size)
    return out


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_quant_file(folder: Path, tensors: dict[str, Any], facts: dict[str, Any]) -> Path:
    """Write ``QUANT_FILE`` into ``folder``: ``tensors`` maps ``<matrix name>.<one of QUANT_TENSORS>`` to a
    tensor; ``facts`` (the scheme: bits, group_size, symmetric, act_order, scale_dtype) go into the header."""
    from safetensors.torch import save_file

    bad = sorted(k for k in tensors if k.rsplit(".", 1)[-1] not in QUANT_TENSORS)
    if bad:
        raise ValueError(f"{QUANT_FILE} holds only {', '.join(QUANT_TENSORS)} tensors, not {bad[0]}")
    path = Path(folder) / QUANT_FILE
    meta = {"format": QUANT_FORMAT, "scheme": json.dumps(facts, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def read_quant_file(folder: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The grids of a quantized run folder: ``{matrix name: {tensor kind: tensor}}`` and the scheme facts.
    `RecordError` naming the file when it is missing, unreadable or of another format."""
    from safetensors import safe_open

    path = Path(folder) / QUANT_FILE
    if not path.is_file():
        raise RecordError(f"{path} not found: {folder} is not a quantized run folder")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:  # safetensors raises its own SafetensorError on a bad header
        raise RecordError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]})") from exc
    if meta.get("format") != QUANT_FORMAT:
        raise RecordError(f"{path} has format {meta.get('format')!r}, expected {QUANT_FORMAT}")
    try:
        facts = json.loads(meta.get("scheme", ""))
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path}: the scheme in its header is not valid JSON") from exc
    out: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, _, kind = key.rpartition(".")
        out.setdefault(name, {})[kind] = tensor
    return out, facts


def library_versions() -> dict[str, str]:
    """Versions of Python and of every library a result depends on (those installed)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in (
        "oneshot",
        "torch",
        "transformers",
        "accelerate",
        "safetensors",
        "gguf",
        "compressed-tensors",
        "triton",
        "lm_eval",
        "datasets",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


# --------------------------------------------------------------------------------------------------------
# The pruning report (written by oneshot.pruner, embedded in oneshot.json)


@dataclass
class LayerReport:
    """One pruned weight matrix (a Linear, or one expert of a fused MoE tensor: ``...down_proj[3]``)."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    sparsity: float  # fraction of zeros after pruning
    loss: float | None  # ||(W - W')X^T||^2 / n on the calibration inputs (None when no Hessian was kept)
    seconds: float


@dataclass
class BlockReport:
    index: int
    seconds: float
    output_error: float | None  # ||Y_dense - Y_pruned||^2 / ||Y_dense||^2 of the block on calibration data


@dataclass
class DenseMatrix:
    """A weight matrix of a decoder block left dense, and why (router, --ignore, no calibration tokens)."""

    name: str
    params: int
    reason: str


@dataclass
class PruneReport:
    """What `oneshot.prune` did: per-matrix results, per-block output errors, the sparsity over the pruned
    matrices and over EVERY weight matrix of the blocks, and what was left dense."""

    _DERIVED = ("sparsity", "block_sparsity")

    layers: list[LayerReport] = field(default_factory=list)
    blocks: list[BlockReport] = field(default_factory=list)
    total_seconds: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    device: str = "cpu"
    pruned_params: int = 0  # weights of the pruned matrices
    zero_params: int = 0  # zeros among them
    matrix_params: int = 0  # weights of every weight matrix of the blocks, pruned or not
    matrix_zero_params: int = 0  # zeros among them
    dense_matrices: list[DenseMatrix] = field(default_factory=list)
    uncalibrated: list[str] = field(default_factory=list)  # no calibration tokens: pruned by magnitude
    streamed: bool = False  # the blocks were read from and written to disk one at a time (--offload disk)

    @property
    def sparsity(self) -> float:
        """Achieved sparsity over the pruned matrices (zeros / weights)."""
        return self.zero_params / self.pruned_params if self.pruned_params else 0.0

    @property
    def block_sparsity(self) -> float:
        """Zeros / weights over every weight matrix of the decoder blocks (routers, skipped ones included)."""
        return self.matrix_zero_params / self.matrix_params if self.matrix_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return typing.cast(dict[str, Any], to_dict(self))


# --------------------------------------------------------------------------------------------------------
# oneshot.json


@dataclass
class UnitRemoval:
    """What `oneshot shrink` removed from one place of the model (a block's MLP, its attention, its experts,
    or a whole block) and what it cost."""

    name: str  # the module, qualified (its index before any block was dropped for kind "block")
    kind: str  # "mlp channels" | "kv groups" | "experts" | "block"
    before: int  # units before (channels, KV groups, experts; 1 for a block)
    after: int
    removed: list[int]  # indices of the removed units (of the original numbering)
    score: str | None  # how they were chosen
    # mlp / attention: the consumer's re-fit reconstruction error ||W X^T - W' X_K^T||^2 / tokens;
    # experts: removed share of the router-weighted output norm; block: 1 - cos(input, output)
    loss: float | None
    losses: dict[str, float] = field(default_factory=dict)  # the same for every score compared
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShrinkChoice:
    """What ``--params`` chose from the measured costs."""

    intermediate_size: int | None  # None: unchanged
    num_key_value_heads: int | None
    drop: list[int]
    predicted_cost: float  # sum of the relative residual errors of the choices (measured on the dense model;
    # a run of adjacent dropped blocks counts once, with the error of skipping the whole run)
    block_params: int
    block_params_before: int
    fraction: float


@dataclass
class ShrinkReport:
    """What `oneshot.shrink` did: every removal with its cost, dropped blocks and their scores, the config
    changes and the parameter counts."""

    removals: list[UnitRemoval] = field(default_factory=list)
    blocks: list[BlockReport] = field(default_factory=list)  # per kept block: output error vs. unshrunk
    dropped_layers: list[int] = field(default_factory=list)
    layer_scores: list[float] = field(default_factory=list)  # per original block: 1 - cos(input, output)
    layer_errors: list[float] = field(default_factory=list)  # per original block: ||out - in||^2 / ||out||^2
    choice: ShrinkChoice | None = None
    config_changes: dict[str, list[Any]] = field(default_factory=dict)  # key -> [before, after]
    params_before: int = 0
    params_after: int = 0
    block_params_before: int = 0
    block_params_after: int = 0
    layers_before: int = 0
    layers_after: int = 0
    total_seconds: float = 0.0
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class PerplexityRecord:
    """A perplexity measurement: exp of the mean token NLL over ``windows`` non-overlapping windows."""

    value: float
    windows: int
    seqlen: int
    nll: float | None = None
    tokens: int | None = None
    dataset: str | None = None
    note: str | None = None
    source: str | None = None
    seconds: float | None = None
    data: str | None = None  # content fingerprint of the data file(s) the windows were cut from
    extra: dict[str, Any] = field(default_factory=dict)

    def mismatch(self, other: PerplexityRecord) -> str | None:
        """Why this measurement and ``other`` are not comparable (other windows, length, tokens, dataset or
        data file), or None when they are. Fields a record lacks (older records) are not compared."""
        reasons = []
        if (self.windows, self.seqlen) != (other.windows, other.seqlen):
            reasons.append(f"{self.windows} x {self.seqlen} vs {other.windows} x {other.seqlen} windows")
        elif self.tokens is not None and other.tokens is not None and self.tokens != other.tokens:
            reasons.append(f"{self.tokens} vs {other.tokens} tokens")
        if self.dataset and other.dataset and self.dataset != other.dataset:
            reasons.append(f"dataset {self.dataset} vs {other.dataset}")
        if self.data and other.data and self.data != other.data:
            reasons.append("different data files")
        return "; ".join(reasons) or None


@dataclass
class QuickEval:
    """The quick WikiText-2 check of `oneshot prune`, dense before and pruned after."""

    dense: PerplexityRecord | None = None
    pruned: PerplexityRecord | None = None


@dataclass
class Source:
    """Where the model came from: the embedded default, a .gguf file, a local folder or a Hub id."""

    kind: str  # default | gguf | local | hub
    path: str | None = None
    fingerprint: str | None = None
    base_model: str | None = None  # the Hub id of the dense model when known


@dataclass
class Calibration:
    source: str
    origin: str | None = None  # the file (or Hub dataset) read
    documents: int | None = None
    corpus_tokens: int | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int | None = None
    tokens: int | None = None  # self-generated calibration
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportRecord:
    format: str
    folder: str
    layers: dict[str, int] = field(default_factory=dict)
    dense_bytes: int = 0  # the converted layers' weights, stored dense
    stored_bytes: int = 0  # the same, compressed


@dataclass
class ExportCheck:
    """The export read back by its consumer's own loader and compared with the run's model on the same
    tokens: the largest absolute logit difference (``None`` when the check could not run: ``note`` says
    why) against the tolerance (``None``: reported only)."""

    loader: str  # e.g. "transformers + compressed-tensors 0.20.1", "transformers GGUF reader"
    tokens: int = 0
    max_abs_diff: float | None = None
    max_abs_logit: float | None = None  # the scale of the logits compared
    tolerance: float | None = None
    passed: bool | None = None
    note: str | None = None


@dataclass
class ExportManifest:
    """``oneshot-export.json``: an export folder of `oneshot export` (which run, which format, the files
    with their hashes, the read-back check)."""

    format: str  # compressed-tensors | gguf
    source_run: str
    scheme: str | None = None  # the run's quantization (its label), None for a float run
    gguf_type: str | None = None
    architecture: str | None = None  # gguf: the llama.cpp architecture written
    files: dict[str, FileHash] = field(default_factory=dict)
    check: ExportCheck | None = None
    command: list[str] = field(default_factory=list)
    created: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> ExportManifest:
        path = Path(folder) / EXPORT_FILE
        data = _read_json(path, "an export folder (written by `oneshot export`)")
        _schema(path, data, EXPORT_FORMAT, EXPORT_SCHEMA)
        data = dict(data)
        data["format"] = data.pop("export_format", None)  # "format" holds the record's own schema
        try:
            return from_dict(cls, data)
        except (TypeError, ValueError) as exc:
            raise RecordError(f"{path} does not hold a valid export record ({exc})") from exc

    def save(self, folder: Path) -> Path:
        data = to_dict(self)
        data["export_format"] = data.pop("format")
        path = Path(folder) / EXPORT_FILE
        text = json.dumps({"format": f"{EXPORT_FORMAT}/{EXPORT_SCHEMA}", **data}, indent=2) + "\n"
        atomic_write_text(path, text)
        return path


@dataclass
class FileHash:
    sha256: str
    bytes: int


@dataclass
class MaskCheck:
    """The sparsity pattern after recovery against the one before, read back from the two checkpoints'
    weight files (independent of the training code)."""

    matrices: int  # weight tensors compared
    pruned_before: int  # zeros in the recovered run's pruned matrices before recovery
    zeros_after: int  # zeros in the same matrices after
    revived: int  # weights zero before and non-zero after (must be 0)
    nm: str | None = None  # the N:M pattern checked, if any
    nm_groups: int = 0  # groups of M consecutive input weights checked
    nm_broken: int = 0  # groups with fewer than N zeros (must be 0)
    shapes_equal: bool = True  # every weight tensor of the checkpoint kept its shape
    exact: bool = True


@dataclass
class RecoveryRecord:
    """One `oneshot recover` pass over a run folder: what was trained on, how long, what it changed."""

    config: RecoverConfig
    source_run: str  # the run folder recovered
    teacher: Source
    data: Calibration
    command: list[str] = field(default_factory=list)
    started: str | None = None
    windows: int = 0
    tokens_seen: int = 0  # tokens through the student's trained part (epochs counted)
    steps: int = 0
    seconds: float = 0.0  # training time (summed over resumed parts)
    total_seconds: float = 0.0  # the whole command of the last part
    device: str = "cpu"
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    resumed: int = 0  # times the run was continued from a saved state
    loss_curve: list[list[float]] = field(default_factory=list)  # [step, tokens seen, mean loss]
    blocks: list[dict[str, Any]] = field(default_factory=list)  # blockwise: per-block relative error
    trained_params: int = 0
    masks: MaskCheck | None = None
    ppl_teacher: PerplexityRecord | None = None
    ppl_before: PerplexityRecord | None = None
    ppl_after: PerplexityRecord | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantLayer:
    """One quantized weight matrix."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    # ||(W - W_q) X^T||^2 / n on the calibration inputs, W the weight before this pass (the dense weight when
    # pruned in the same pass, so pruning and rounding together); None without a Hessian
    loss: float | None
    seconds: float
    rounded_to_zero: int = 0  # weights that were not zero and quantized to exactly 0 (pruned ones stay 0)


@dataclass
class QuantizationRecord:
    """Weight-only quantization of a run (`oneshot prune --quantize`, `oneshot quantize`).

    The checkpoint holds the fake-quantized weights (every quantized weight is ``scale * (code - zero)`` of
    its group, stored as plain float); the grids are in ``file`` (`QUANT_FILE`), listed in the record's
    content hashes. ``group_size`` None = one scale per output channel. ``bits_per_weight``: codes, scales,
    zero-points (asymmetric) and group indices (act-order) of the quantized matrices, per weight.
    A pass of `oneshot quantize` over an earlier run folder keeps that run's record and states here its own
    run, calibration, command and quick perplexity (``source_run`` names the folder).
    """

    config: QuantConfig
    solver: str  # "sparsegpt" (pruned and quantized in one pass) | "gptq" (zeros kept as a fixed mask)
    bits: int
    group_size: int | None
    symmetric: bool
    act_order: bool
    scale_dtype: str = "float16"
    bits_per_weight: float = 0.0
    quantized_params: int = 0
    rounded_to_zero: int = 0
    layers: list[QuantLayer] = field(default_factory=list)
    blocks: list[BlockReport] = field(default_factory=list)  # `oneshot quantize`: per-block output error
    file: str = QUANT_FILE
    packed_bytes: int = 0  # the quantized matrices in the packed form (codes at `bits` bits, scales, ...)
    dense_bytes: int = 0  # the same matrices in the checkpoint's dtype
    checkpoint_bytes: int = 0  # the float checkpoint's safetensors files, as written
    file_bytes: int = 0  # QUANT_FILE
    total_seconds: float = 0.0
    device: str = "cpu"
    source_run: str | None = None
    run: RunConfig | None = None
    calibration: Calibration | None = None
    command: list[str] = field(default_factory=list)
    started: str | None = None
    ppl_before: PerplexityRecord | None = None
    ppl_after: PerplexityRecord | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``w4a16, groups of 64, symmetric``."""
        group = f"groups of {self.group_size}" if self.group_size else "one scale per output channel"
        grid = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"{self.config.scheme}, {group}, {grid}"
            + (", act-order" if self.act_order else "")
            + (", mse clipping" if self.config.clip == "mse" else "")
        )


@dataclass
class AllocationRecord:
    """How `oneshot prune --allocation` spread the target sparsity over the weight matrices.

    ``sparsities``: the chosen sparsity of every matrix the allocation covered (0 for one kept dense under
    an N:M pattern, listed in ``dense``); ``achieved``: zeros / weights over those matrices after pruning.
    ``blocks``: per decoder block its weights, its sparsity and (OWL) its outlier ratio. ``predicted_loss``
    (sensitivity): the summed interpolated reconstruction loss of the choice, ``uniform_loss`` the same for
    every matrix at the target. ``seconds``: the statistics pass (OWL) or the measurement (sensitivity) that
    ran before the pruning walk.
    """

    config: AllocationConfig
    target: float
    sparsities: dict[str, float] = field(default_factory=dict)
    dense: list[str] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    params: int = 0
    zeros: int = 0
    achieved: float | None = None
    predicted_loss: float | None = None
    uniform_loss: float | None = None
    source: str | None = None  # "owl statistics pass", "measured", or the sensitivity file read
    source_sha256: str | None = None
    seconds: float = 0.0
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SensitivityLayer:
    """One weight matrix of `oneshot sensitivity`: its reconstruction loss ``||(W - W')X^T||^2 / n`` at each
    of the record's sparsities (None: no calibration tokens)."""

    name: str
    block: int
    shape: tuple[int, int]  # (out_features, in_features)
    losses: list[float | None] = field(default_factory=list)


@dataclass
class SensitivityBlock:
    index: int
    # ||Y_dense - Y_s||^2 / ||Y_dense||^2 with every matrix of the block pruned at each sparsity (the dense
    # block inputs; on the first ``error_windows`` calibration windows)
    output_error: list[float | None] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class SensitivityRecord:
    """``sensitivity.json``: per-layer loss curves of the dense model (every block calibrated on the dense
    outputs of the block before), read by ``oneshot prune --allocation sensitivity --sensitivity-file``."""

    config: PruneConfig
    sparsities: list[float]
    layers: list[SensitivityLayer] = field(default_factory=list)
    blocks: list[SensitivityBlock] = field(default_factory=list)
    error_windows: int = 0
    run: RunConfig | None = None
    source: Source | None = None
    calibration: Calibration | None = None
    model_type: str | None = None
    command: list[str] = field(default_factory=list)
    started: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    total_seconds: float = 0.0
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def curve(self, name: str) -> list[tuple[float, float]] | None:
        """(sparsity, loss) points of one matrix, sparsity 0 (loss 0) first; None without losses."""
        for layer in self.layers:
            if layer.name == name:
                if any(v is None for v in layer.losses):
                    return None
                return [
                    (0.0, 0.0),
                    *(
                        (s, float(v))
                        for s, v in zip(self.sparsities, layer.losses, strict=True)
                        if v is not None
                    ),
                ]
        return None

    @classmethod
    def load(cls, path: Path) -> SensitivityRecord:
        """A ``sensitivity.json`` (the file, or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / SENSITIVITY_FILE
        data = _read_json(path, "a sensitivity folder (written by `oneshot sensitivity`)")
        _schema(path, data, SENSITIVITY_FORMAT, SENSITIVITY_SCHEMA)
        data = {k: v for k, v in data.items() if k != "format"}
        try:
            record = from_dict(cls, data)
        except (TypeError, ValueError) as exc:
            raise RecordError(f"{path} does not hold a valid sensitivity record ({exc})") from exc
        if not isinstance(record.sparsities, list) or not record.sparsities:
            raise RecordError(f"{path} lists no sparsities")
        if any(len(layer.losses) != len(record.sparsities) for layer in record.layers):
            raise RecordError(
                f"{path}: a layer's losses do not match the {len(record.sparsities)} sparsities"
            )
        return record

    def to_json(self) -> str:
        data = {"format": f"{SENSITIVITY_FORMAT}/{SENSITIVITY_SCHEMA}", **to_dict(self)}
        return json.dumps(data, indent=2) + "\n"

    def save(self, folder: Path) -> Path:
        path = Path(folder) / SENSITIVITY_FILE
        atomic_write_text(path, self.to_json())
        return path


@dataclass
class RunRecord:
    """``oneshot.json``: everything needed to understand, check and repeat a run."""

    config: PruneConfig | None  # None for a shrink run
    run: RunConfig
    source: Source
    prune: PruneReport | None  # None for a shrink run
    command: list[str] = field(default_factory=list)
    started: str | None = None
    model_type: str | None = None
    calibration: Calibration | None = None
    versions: dict[str, str] = field(default_factory=dict)
    quick_eval: QuickEval = field(default_factory=QuickEval)
    total_seconds: float | None = None
    files: dict[str, FileHash] | None = None  # None in records of versions before the hashes
    export: ExportRecord | None = None
    shrink_config: ShrinkConfig | None = None  # `oneshot shrink` runs
    shrink: ShrinkReport | None = None
    recoveries: list[RecoveryRecord] = field(default_factory=list)  # `oneshot recover` passes, in order
    quantization: QuantizationRecord | None = None  # `--quantize` / `oneshot quantize`
    allocation: AllocationRecord | None = None  # `--allocation owl|sensitivity`: the per-matrix sparsities
    schema: int = RUN_SCHEMA  # the version read (records are always written as the newest)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, folder: Path) -> RunRecord:
        """The record of a run folder; `RecordError` naming the file when it is missing or broken."""
        path = Path(folder) / RUN_FILE
        data = _read_json(path, "a run folder (written by `oneshot prune`)")
        schema = _schema(path, data, RUN_FORMAT, RUN_SCHEMA)
        data = dict(data)
        data.pop("format")
        if schema == 1:  # one flat config of both parts; the report repeated it
            flat = dict(data.pop("config", None) or {})
            data["config"] = {k: flat[k] for k in _fields(PruneConfig) if k in flat}
            data["run"] = {k: flat[k] for k in _fields(RunConfig) if k in flat}
            if isinstance(data.get("prune"), dict):
                data["prune"] = {k: v for k, v in data["prune"].items() if k != "config"}
        try:
            record = from_dict(cls, data)
        except (TypeError, ValueError) as exc:
            raise RecordError(f"{path} does not hold a valid run record ({exc})") from exc
        record.schema = schema
        return record

    def to_json(self) -> str:
        data = {"format": f"{RUN_FORMAT}/{RUN_SCHEMA}", **to_dict(self)}
        data.pop("schema")
        return json.dumps(data, indent=2) + "\n"

    def save(self, folder: Path) -> Path:
        path = Path(folder) / RUN_FILE
        atomic_write_text(path, self.to_json())
        return path

    @property
    def base_model(self) -> str | None:
        return self.source.base_model

    @property
    def kind(self) -> str:
        """ "shrink" for an `oneshot shrink` run, "quantize" for `oneshot quantize` of a plain model (no pruning
        or shrinking before), else "prune". A quantized prune or shrink run keeps its kind."""
        if self.shrink is not None:
            return "shrink"
        if self.prune is None and self.quantization is not None:
            return "quantize"
        return "prune"

    @property
    def quantized(self) -> QuantizationRecord:
        """The quantization section; `RecordError` for a run that was not quantized."""
        if self.quantization is None:
            raise RecordError(f"this `oneshot {self.kind}` run was not quantized")
        return self.quantization

    def stored_zeros(self) -> tuple[int, int]:
        """(zeros of the pruned matrices, zeros of every weight matrix of the blocks) in the checkpoint: the
        pruning report's, plus the weights quantization rounded to zero afterwards."""
        _, pr = self.pruned
        q = self.quantization
        if q is None:
            return pr.zero_params, pr.matrix_zero_params
        pruned = {layer.name for layer in pr.layers}
        rounded = sum(layer.rounded_to_zero for layer in q.layers if layer.name in pruned)
        return pr.zero_params + rounded, pr.matrix_zero_params + q.rounded_to_zero

    @property
    def pruned(self) -> tuple[PruneConfig, PruneReport]:
        """(config, report) of a prune run; `RecordError` for a shrink run (which has neither)."""
        if self.config is None or self.prune is None:
            raise RecordError(f"this is a record of an `oneshot {self.kind}` run, not of `oneshot prune`")
        return self.config, self.prune

    @property
    def shrunk(self) -> tuple[ShrinkConfig, ShrinkReport]:
        """(config, report) of a shrink run; `RecordError` for a prune run."""
        if self.shrink_config is None or self.shrink is None:
            raise RecordError(f"this is a record of an `oneshot {self.kind}` run, not of `oneshot shrink`")
        return self.shrink_config, self.shrink


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# --------------------------------------------------------------------------------------------------------
# eval.json


@dataclass
class TaskRecord:
    """One lm-eval task: its metrics (``acc``, ``acc_norm``, ``perplexity``, each with ``<m>_stderr``) are
    the keys besides the fields below.

    ``correct`` holds, for each 0/1 metric (``acc``, ``acc_norm``), whether every document was answered
    correctly, in lm-eval's document order, as a `pack_bits` hex string; ``docs_hash`` identifies those
    documents and their targets, so two records of the same task can be compared document by document.
    Records written before these fields load with them empty (None / {})."""

    n: int | None = None
    limit: int | None = None
    source: str | None = None
    num_fewshot: int | None = None
    version: str | None = None  # the task's version in lm-eval (its config's metadata)
    chance: float | None = None  # accuracy of guessing: mean over documents of 1 / choices; 0 without choices
    correct: dict[str, str] = field(default_factory=dict)  # metric -> per-document 0/1 (`pack_bits`)
    docs_hash: str | None = None  # sha256 over lm-eval's per-document doc and target hashes, in order
    differences: str | None = None  # a local copy: how its documents differ from the Hub version
    extra: dict[str, Any] = field(default_factory=dict)

    def outcomes(self, metric: str) -> list[int] | None:
        """Per-document 0/1 of ``metric`` in document order; None when not recorded (or not ``n`` long)."""
        packed = self.correct.get(metric)
        if packed is None or self.n is None:
            return None
        return unpack_bits(packed, self.n)

    @property
    def metrics(self) -> dict[str, float]:
        """Metric -> finite value (standard errors excluded)."""
        return {
            k: float(v) for k, v in self.extra.items() if not k.endswith("_stderr") and _finite(v) is not None
        }

    def stderr(self, metric: str) -> float | None:
        return _finite(self.extra.get(f"{metric}_stderr"))

    def get(self, metric: str) -> float | None:
        return _finite(self.extra.get(metric))


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def pack_bits(bits: Sequence[int]) -> str:
    """0/1 values as hex, 4 per digit, the first value in the highest bit (the last digit zero-padded)."""
    if any(b not in (0, 1) for b in bits):
        raise ValueError("pack_bits takes 0/1 values only")
    if not bits:
        return ""
    text = "".join(str(int(b)) for b in bits)
    text += "0" * (-len(text) % 4)
    return format(int(text, 2), f"0{len(text) // 4}x")


def unpack_bits(packed: str, n: int) -> list[int] | None:
    """The ``n`` 0/1 values of `pack_bits`; None when ``packed`` is not a hex string of that length."""
    if n < 0 or len(packed) != -(-n // 4):
        return None
    if n == 0:
        return []
    try:
        text = format(int(packed, 16), f"0{4 * len(packed)}b")
    except ValueError:
        return None
    return [int(c) for c in text[:n]]


@dataclass
class BaselineRecord:
    """The dense model evaluated alongside (possibly read from the cache)."""

    model: str | None = None
    ppl: dict[str, PerplexityRecord] = field(default_factory=dict)
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    fingerprint: str | None = None
    cached: bool = False


@dataclass
class SliceRecord:
    """Dense vs pruned on one long-tail slice (or the aggregate): NLL, perplexity, KL and the flag."""

    name: str
    group: str | None = None
    definition: str | None = None  # the aggregate's: what text it is
    tokens: int = 0
    windows: int | None = None
    nll_dense: float | None = None
    nll_pruned: float | None = None
    ppl_dense: float | None = None
    ppl_pruned: float | None = None
    delta_nll: float | None = None
    delta_nll_se: float | None = None
    rel_degradation: float | None = None
    kl: float | None = None
    ratio_to_aggregate: float | None = None
    flagged: bool = False
    blocks: int | None = None  # clusters of the standard error
    texts: int | None = None  # sentences / documents the slice holds
    excess_nll: float | None = None  # delta_nll - factor x the aggregate's
    excess_se: float | None = None
    p_value: float | None = None  # one-sided, before Holm's correction
    status: str | None = None  # flagged | not significant | too small
    vs_control: dict[str, Any] | None = None  # language slices: against the English side
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskDelta:
    """One task, dense vs pruned on its headline metric (`oneshot.eval.task_compare`): the scores, the
    difference with its standard error, the one-sided test of a drop and the status. Rows written before
    the test (``acc_dense``, ``acc_pruned``, ``delta_stderr``) load with those keys in ``extra``."""

    name: str
    metric: str | None = None  # the headline metric: acc_norm where the task has it, else acc
    dense: float | None = None
    pruned: float | None = None
    delta: float | None = None  # pruned - dense (a fraction; x 100 for points)
    se: float | None = None  # standard error of delta (paired when ``paired``)
    p_value: float | None = None  # one-sided p-value of a drop, before Holm's correction
    test: str | None = None  # which test gave p_value
    paired: bool = False  # compared document by document
    n: int | None = None  # documents of the pruned result
    n_dense: int | None = None
    discordant: list[int] | None = None  # paired: [dense right & pruned wrong, dense wrong & pruned right]
    chance: float | None = None  # the chance level of the metric
    p_chance: float | None = None  # one-sided p-value of the dense score being above chance
    status: str | None = None  # flagged | not significant | at chance | not tested
    flagged: bool = False
    note: str | None = None  # why a comparison is unpaired or was not tested
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskFlags:
    """Dense vs pruned per task and the tasks flagged (`oneshot.eval.task_compare`); ``aggregate`` is the
    mean of the headline metric over the compared tasks (``dense``, ``pruned``, ``delta``, ``tasks``);
    ``note`` says what was left out. ``alpha`` is None in records made before the significance test."""

    tasks: list[TaskDelta] = field(default_factory=list)
    aggregate: dict[str, float | None] | None = None
    flagged: list[str] = field(default_factory=list)
    alpha: float | None = None
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FrequencyBucket:
    """Token ids of similar corpus frequency (equal token mass per bucket); ``freq/unseen``: never seen."""

    name: str
    types: int | None = None
    rank_first: int | None = None
    rank_last: int | None = None
    count_min: int | None = None
    count_max: int | None = None
    mass: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FrequencyInfo:
    buckets: list[FrequencyBucket] = field(default_factory=list)
    reference_corpus: str | None = None
    reference_corpus_tokens: int | None = None
    n_buckets: int | None = None
    evaluated_on: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SkippedSlice:
    name: str
    reason: str


@dataclass
class LongtailRecord:
    """The long-tail degradation report (`oneshot.eval.longtail`)."""

    aggregate: SliceRecord | None = None
    slices: list[SliceRecord] = field(default_factory=list)
    controls: list[SliceRecord] = field(default_factory=list)  # English sides of the language slices
    flagged: list[str] = field(default_factory=list)
    factor: float = 2.0
    alpha: float | None = None  # family-wise error of the flags (None: records before the significance test)
    seqlen: int | None = None
    max_tokens_per_slice: int | None = None
    tasks: TaskFlags | None = None
    frequency: FrequencyInfo | None = None
    skipped: list[SkippedSlice] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalRecord:
    """``eval.json``: perplexities and tasks of a model, the dense baseline beside, the long-tail report."""

    model: str | None = None  # what was evaluated (a run folder, a model folder, a Hub id, "default")
    ppl: dict[str, PerplexityRecord] = field(default_factory=dict)
    tasks: dict[str, TaskRecord] = field(default_factory=dict)
    baseline: BaselineRecord | None = None
    longtail: LongtailRecord | None = None
    run_dir: str | None = None
    fingerprint: str | None = None
    dtype: str | None = None
    device: str | None = None
    source: Source | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the EvalConfig that produced it
    versions: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None
    schema: int = EVAL_SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> EvalRecord:
        """An ``eval.json`` (a file, or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / EVAL_FILE
        data = _read_json(path, "an evaluation folder (written by `oneshot eval`)")
        schema = _schema(path, data, EVAL_FORMAT, EVAL_SCHEMA)
        data = {k: v for k, v in data.items() if k != "format"}
        try:
            record = from_dict(cls, data)
        except (TypeError, ValueError) as exc:
            raise RecordError(f"{path} does not hold a valid evaluation record ({exc})") from exc
        record.schema = schema
        return record

    @classmethod
    def load_optional(cls, folder: Path) -> EvalRecord | None:
        """The ``eval.json`` of a run folder, or None before ``oneshot eval`` has written one."""
        return cls.load(folder) if (Path(folder) / EVAL_FILE).is_file() else None

    def to_json(self) -> str:
        data = {"format": f"{EVAL_FORMAT}/{EVAL_SCHEMA}", **to_dict(self)}
        data.pop("schema")
        return json.dumps(data, indent=2) + "\n"

    def save(self, path: Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / EVAL_FILE
        atomic_write_text(path, self.to_json())
        return path
