"""Verification of a run folder before anything leaves the machine (`oneshot push`, `--dry-run`).

`verify_run_folder(run_dir, files)` raises `VerificationError` (one line) at the first failure:

- ``oneshot.json`` is a valid record (`oneshot.runfolder.RunRecord`) that lists the pruned layers;
- ``config.json`` loads (``AutoConfig``) and carries no ``quantization_config`` / ``sparsity_config``
  (nor does any other uploaded config.json): the weights are plain dense float;
- the tokenizer loads (``AutoTokenizer``);
- every uploaded ``*.safetensors`` header is readable; with ``model.safetensors.index.json`` every shard it
  names exists and the tensors it lists are exactly the tensors those shards hold;
- every file ``oneshot prune`` wrote still has the content hash (sha256) and size recorded in
  ``oneshot.json`` at save time (records of older versions have none and say so), and every tensor of
  every uploaded safetensors file is finite: a changed, zeroed or NaN weight is caught;
- a quantized run: ``quantization.safetensors`` is there (and hashed), and every quantized matrix of the
  checkpoint is exactly on its grid (``scale * (code - zero)`` with codes in range) and the card states the
  record's scheme;
- the sparsity the model card states (front matter ``oneshot.sparsity``, `oneshot.card`) matches the
  fraction of zeros measured in the ``<layer>.weight`` tensors of the pruned layers (and the slices of
  fused expert tensors) within 1e-4, and ``oneshot.block_sparsity`` the zeros of every weight matrix of the
  decoder blocks, whatever the names transformers saved them under.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oneshot.card import CARD_KEY
from oneshot.errors import OneshotError, first_line
from oneshot.runfolder import (
    CARD_FILE,
    FORBIDDEN_CONFIG_KEYS,
    INDEX_FILE,
    QUANT_FILE,
    RUN_FILE,
    EvalRecord,
    RecordError,
    RunRecord,
    read_quant_file,
    sha256_of,
)

__all__ = [
    "SPARSITY_TOLERANCE",
    "UploadFile",
    "VerificationError",
    "Verified",
    "collect_files",
    "verify_run_folder",
]

logger = logging.getLogger(__name__)

SPARSITY_TOLERANCE = 1e-4
COMPRESSED_PREFIX = "compressed-"


class VerificationError(OneshotError):
    """The run folder may not be uploaded; the message (one line) says why. Nothing was sent."""


@dataclass(frozen=True)
class UploadFile:
    path: Path  # on disk
    path_in_repo: str  # POSIX path relative to the run folder
    size: int  # bytes


@dataclass(frozen=True)
class Verified:
    """What `verify_run_folder` checked."""

    stated_sparsity: float  # the card's front matter
    measured_sparsity: float | None  # zeros / weights of the pruned layers' tensors; None: not by name
    layers: int  # pruned layers measured
    safetensors_files: int  # headers read
    block_sparsity: float | None = None  # the card's, checked against every weight matrix of the blocks
    params: int | None = None  # shrink runs: the parameter count the card and record state, measured


def collect_files(run_dir: Path, include_compressed: bool = False) -> tuple[list[UploadFile], list[str]]:
    """The files to upload (sorted by path) and the ``compressed-*`` folders left out.

    Hidden files and folders (temporary files of an interrupted write among them) are never uploaded;
    symbolic links and other non-regular files neither.
    """
    files: list[UploadFile] = []
    excluded: list[str] = []
    for root, dirs, names in os.walk(run_dir):
        rel_root = Path(root).relative_to(run_dir)
        keep = []
        for d in sorted(dirs):
            if d.startswith("."):
                continue
            if rel_root == Path(".") and d.startswith(COMPRESSED_PREFIX) and not include_compressed:
                excluded.append(d)
                continue
            keep.append(d)
        dirs[:] = keep
        for name in names:
            path = Path(root) / name
            if name.startswith(".") or path.is_symlink() or not path.is_file():
                continue
            files.append(UploadFile(path, (rel_root / name).as_posix(), path.stat().st_size))
    files.sort(key=lambda f: f.path_in_repo)
    return files, excluded


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise VerificationError(f"{what} is not readable JSON ({first_line(exc)})") from exc


def _record(run_dir: Path) -> RunRecord:
    if not (run_dir / RUN_FILE).is_file():
        raise VerificationError(
            f"{run_dir} is not a run folder: {RUN_FILE} is missing (`oneshot push` uploads folders written "
            "by `oneshot prune`)"
        )
    record = RunRecord.load(run_dir)  # RecordError (one line, naming the file) when broken
    if record.kind in ("shrink", "quantize"):
        return record
    if not record.pruned[1].layers:
        raise VerificationError(
            f"{RUN_FILE} lists no pruned layers (prune.layers): not an `oneshot prune` record"
        )
    return record


def _check_configs(run_dir: Path, files: list[UploadFile]) -> None:
    if not (run_dir / "config.json").is_file():
        raise VerificationError("config.json is missing: the folder holds no transformers checkpoint")
    for f in files:
        if f.path.name != "config.json":
            continue
        data = _read_json(f.path, f.path_in_repo)
        found = [k for k in FORBIDDEN_CONFIG_KEYS if isinstance(data, dict) and k in data]
        if found:
            raise VerificationError(
                f"{f.path_in_repo} carries a {found[0]}: the weights are plain dense float and loaders would "
                "treat them as quantized/compressed; remove the key (oneshot prune never writes it)"
            )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(run_dir))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VerificationError(
            f"config.json does not load with transformers' AutoConfig ({first_line(exc)})"
        ) from exc
    for key in FORBIDDEN_CONFIG_KEYS:
        if getattr(config, key, None) is not None:
            raise VerificationError(f"the loaded config carries a {key}: the weights are plain dense float")


def _check_tokenizer(run_dir: Path) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(str(run_dir))
    except Exception as exc:  # tokenizers raise many types (OSError, ValueError, Rust panics' Exception)
        raise VerificationError(
            f"the tokenizer does not load with transformers' AutoTokenizer ({first_line(exc)})"
        ) from exc


def _safetensors_keys(files: list[UploadFile]) -> dict[str, set[str]]:
    """Tensor names of every uploaded .safetensors file (path_in_repo -> names); a bad header is an error."""
    from safetensors import safe_open

    out: dict[str, set[str]] = {}
    for f in files:
        if not f.path_in_repo.endswith(".safetensors"):
            continue
        try:
            with safe_open(str(f.path), framework="pt") as fh:
                out[f.path_in_repo] = set(fh.keys())
        except Exception as exc:  # safetensors raises its own SafetensorError (not an OSError) on bad headers
            raise VerificationError(
                f"{f.path_in_repo}: the safetensors header is unreadable ({first_line(exc)})"
            ) from exc
    return out


def _weight_locations(run_dir: Path, keys: dict[str, set[str]]) -> dict[str, str]:
    """Tensor name -> shard file of the main checkpoint, after checking the index against the shards."""
    index = run_dir / INDEX_FILE
    if index.is_file():
        data = _read_json(index, INDEX_FILE)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise VerificationError(f"{INDEX_FILE} has no weight_map of tensor name -> shard file")
        for shard in sorted(set(weight_map.values())):
            if shard not in keys:
                raise VerificationError(f"{INDEX_FILE} names the shard {shard}, which is missing")
        for name, shard in weight_map.items():
            if name not in keys[shard]:
                raise VerificationError(
                    f"{INDEX_FILE} maps the tensor {name} to {shard}, which does not hold it"
                )
        held = set().union(*(keys[s] for s in set(weight_map.values())))
        unlisted = sorted(held - set(weight_map))
        if unlisted:
            raise VerificationError(
                f"the shards hold {len(unlisted)} tensor(s) that {INDEX_FILE} does not list (e.g. {unlisted[0]})"
            )
        return {str(k): v for k, v in weight_map.items()}
    if "model.safetensors" in keys:
        return dict.fromkeys(keys["model.safetensors"], "model.safetensors")
    raise VerificationError(f"no weights: model.safetensors (or {INDEX_FILE} and its shards) is missing")


def _check_contents(run_dir: Path, record: RunRecord, keys: dict[str, set[str]]) -> None:
    """The content hashes recorded at save time match; every tensor is finite."""
    from safetensors import safe_open

    if record.files is None:
        logger.warning(
            "%s has no content hashes (written by an older oneshot): file contents are not verified", RUN_FILE
        )
    for rel, facts in sorted((record.files or {}).items()):
        path = run_dir / rel
        if not path.is_file():
            raise VerificationError(f"{rel} is missing: {RUN_FILE} records it as part of the run")
        if path.stat().st_size != facts.bytes or sha256_of(path) != facts.sha256:
            raise VerificationError(
                f"{rel} changed after oneshot wrote it (its sha256 differs from the one in {RUN_FILE}): "
                "the upload would not be the pruned model the record and card describe"
            )
    for rel, names in keys.items():
        with safe_open(str(run_dir / rel), framework="pt") as fh:
            for name in sorted(names):
                tensor = fh.get_tensor(name)
                if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                    raise VerificationError(f"{rel}: tensor {name} holds NaN/Inf values")


def _stated_sparsity(run_dir: Path, key: str = "sparsity") -> float | None:
    """The card's ``oneshot.<key>``; ``sparsity`` must be there, ``block_sparsity`` is None on old cards."""
    from huggingface_hub import ModelCard

    path = run_dir / CARD_FILE
    if not path.is_file():
        raise VerificationError(
            f"{CARD_FILE} (the model card) is missing: write it with `oneshot card {run_dir}`"
        )
    try:
        card = ModelCard.load(path)
    except (ValueError, OSError) as exc:
        raise VerificationError(
            f"{CARD_FILE}: the card's metadata does not parse ({first_line(exc)})"
        ) from exc
    facts = card.data.to_dict().get(CARD_KEY)
    value = facts.get(key) if isinstance(facts, dict) else None
    if key != "sparsity" and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise VerificationError(
            f"{CARD_FILE} states no sparsity (front matter {CARD_KEY}.sparsity): rewrite it with "
            f"`oneshot card {run_dir}`"
        )
    return float(value)


def _measured_block_sparsity(run_dir: Path, layers: list[str], where: dict[str, str]) -> tuple[float, int]:
    """Zeros / weights over every weight matrix (>= 2-D tensor, biases excluded) of the decoder blocks in
    the files, whatever their names on disk (transformers may save fused experts in another layout)."""
    from safetensors import safe_open

    prefix = re.match(r"^(.*?\.)\d+\.", layers[0])
    if prefix is None:
        raise VerificationError(
            f"cannot tell the decoder blocks from the layer name {layers[0]!r} in {RUN_FILE}"
        )
    in_blocks = re.compile(re.escape(prefix.group(1)) + r"\d+\.")
    zeros = total = count = 0
    for name, shard in sorted(where.items()):
        if not in_blocks.match(name) or name.endswith("bias"):
            continue
        with safe_open(str(run_dir / shard), framework="pt") as fh:
            if len(fh.get_slice(name).get_shape()) < 2:
                continue
            weight = fh.get_tensor(name)
        zeros += int((weight == 0).sum())
        total += weight.numel()
        count += 1
    return (zeros / total if total else 0.0), count


def _measured_sparsity(run_dir: Path, layers: list[str], where: dict[str, str]) -> float | None:
    """Zeros / weights of the pruned layers' tensors; None when the files name them differently (fused
    experts saved by transformers in a per-expert layout): then only the block sparsity is checked."""
    from safetensors import safe_open

    by_shard: dict[str, list[tuple[str, int | None]]] = {}
    for layer in layers:
        # a Linear's "<name>.weight", or one expert "<experts>.<param>[e]" of a fused 3-D tensor
        expert = re.fullmatch(r"(.+)\[(\d+)\]", layer)
        tensor, index = (expert.group(1), int(expert.group(2))) if expert else (f"{layer}.weight", None)
        if tensor not in where and expert is not None:
            return None
        if tensor not in where:
            raise VerificationError(
                f"the pruned layer {layer} of {RUN_FILE} has no tensor {tensor} in the checkpoint"
            )
        by_shard.setdefault(where[tensor], []).append((tensor, index))
    zeros = total = 0
    for shard, names in by_shard.items():
        with safe_open(str(run_dir / shard), framework="pt") as fh:
            for name, index in names:
                weight = fh.get_slice(name)[index] if index is not None else fh.get_tensor(name)
                zeros += int((weight == 0).sum())
                total += weight.numel()
    return zeros / total if total else 0.0


def _verify_shrunk(run_dir: Path, record: RunRecord, where: dict[str, str], headers: int) -> Verified:
    """A shrink run: config.json has the shrunk figures of the record, and the checkpoint holds exactly the
    parameter count the record and the card state."""
    from safetensors import safe_open

    _, rep = record.shrunk
    config = _read_json(run_dir / "config.json", "config.json")
    text = config.get("text_config", config) if isinstance(config, dict) else {}
    for key, (_, after) in rep.config_changes.items():
        if text.get(key) != after:
            raise VerificationError(
                f"config.json has {key} = {text.get(key)!r} but {RUN_FILE} records the shrunk model's {after!r}"
            )
    total = 0
    for name, shard in where.items():
        with safe_open(str(run_dir / shard), framework="pt") as fh:
            shape = fh.get_slice(name).get_shape()
        total += int(math.prod(shape))
    stated = _stated_sparsity(run_dir, "params_after")
    if total != rep.params_after or stated != rep.params_after:
        raise VerificationError(
            f"the checkpoint holds {total:,} parameters; {RUN_FILE} states {rep.params_after:,} and {CARD_FILE} "
            f"{'none' if stated is None else f'{stated:,.0f}'}: the files do not describe the same model"
        )
    return Verified(0.0, None, 0, headers, None, params=total)


def _card_facts(run_dir: Path) -> dict[str, Any]:
    from huggingface_hub import ModelCard

    try:
        facts = ModelCard.load(run_dir / CARD_FILE).data.to_dict().get(CARD_KEY)
    except (ValueError, OSError) as exc:
        raise VerificationError(
            f"{CARD_FILE}: the card's metadata does not parse ({first_line(exc)})"
        ) from exc
    return facts if isinstance(facts, dict) else {}


def _verify_quantized(run_dir: Path, record: RunRecord, where: dict[str, str]) -> int:
    """Every quantized matrix of the checkpoint lies exactly on the grid of ``quantization.safetensors``, and
    the card states the record's scheme; returns the matrices checked."""
    from safetensors import safe_open

    from oneshot.solvers.quant import QuantScheme, recover_codes

    q = record.quantized
    if record.files is not None and QUANT_FILE not in record.files:
        raise VerificationError(f"{RUN_FILE} records a quantized run but lists no {QUANT_FILE}")
    try:
        grids, _ = read_quant_file(run_dir)
    except RecordError as exc:
        raise VerificationError(str(exc)) from exc
    names = [layer.name for layer in q.layers]
    if sorted(grids) != sorted(names):
        raise VerificationError(
            f"{QUANT_FILE} holds the grids of {len(grids)} matrices, {RUN_FILE} records {len(names)} quantized"
        )
    scheme = QuantScheme(
        bits=q.bits,
        group_size=q.group_size,
        symmetric=q.symmetric,
        act_order=q.act_order,
        scale_dtype=q.scale_dtype,
    )
    for name in names:
        expert = re.fullmatch(r"(.+)\[(\d+)\]", name)
        tensor, index = (expert.group(1), int(expert.group(2))) if expert else (f"{name}.weight", None)
        if tensor not in where:
            raise VerificationError(f"the quantized matrix {name} has no tensor {tensor} in the checkpoint")
        with safe_open(str(run_dir / where[tensor]), framework="pt") as fh:
            weight = fh.get_slice(tensor)[index] if index is not None else fh.get_tensor(tensor)
        g = grids[name]
        try:
            _, off = recover_codes(
                weight, g["weight_scale"], g["weight_zero_point"], g["weight_g_idx"], scheme
            )
        except (KeyError, IndexError, RuntimeError) as exc:
            raise VerificationError(
                f"{QUANT_FILE}: the grid of {name} does not fit its weight ({exc})"
            ) from exc
        if off:
            raise VerificationError(
                f"{name}: {off} weights are not on the grid of {QUANT_FILE}: the weights changed after "
                "quantization (quantize again)"
            )
    stated = _card_facts(run_dir).get("quantization")
    if (
        not isinstance(stated, dict)
        or stated.get("scheme") != q.config.scheme
        or stated.get("bits") != q.bits
    ):
        raise VerificationError(
            f"{CARD_FILE} does not state the quantization scheme of {RUN_FILE} ({q.label}): rewrite it with "
            f"`oneshot card {run_dir}`"
        )
    return len(names)


def verify_run_folder(run_dir: Path, files: list[UploadFile]) -> Verified:
    """Every check of the module docstring, in order; raises `VerificationError` at the first failure."""
    record = _record(run_dir)
    EvalRecord.load_optional(run_dir)  # an eval.json that is uploaded must be a valid record (RecordError)
    _check_configs(run_dir, files)
    _check_tokenizer(run_dir)
    keys = _safetensors_keys(files)
    where = _weight_locations(run_dir, keys)
    _check_contents(run_dir, record, keys)
    if record.quantization is not None:
        checked = _verify_quantized(run_dir, record, where)
        if record.kind == "quantize":
            return Verified(0.0, None, checked, len(keys))
    if record.kind == "shrink":
        return _verify_shrunk(run_dir, record, where, len(keys))
    layers = [layer.name for layer in record.pruned[1].layers]
    stated = _stated_sparsity(run_dir)
    assert stated is not None
    measured = _measured_sparsity(run_dir, layers, where)
    if measured is not None and abs(stated - measured) > SPARSITY_TOLERANCE:
        raise VerificationError(
            f"{CARD_FILE} states sparsity {stated:.6f} but the {len(layers)} pruned layers' weights have "
            f"{measured:.6f} zeros (tolerance {SPARSITY_TOLERANCE:g}): the card does not describe these weights"
        )
    stated_block = _stated_sparsity(run_dir, "block_sparsity")
    if stated_block is None and measured is None:
        raise VerificationError(
            f"{CARD_FILE} states no block_sparsity and the pruned layers are stored under other names: "
            f"rewrite the card with `oneshot card {run_dir}`"
        )
    if stated_block is not None:
        block, matrices = _measured_block_sparsity(run_dir, layers, where)
        if abs(stated_block - block) > SPARSITY_TOLERANCE:
            raise VerificationError(
                f"{CARD_FILE} states block sparsity {stated_block:.6f} but the {matrices} weight matrices of "
                f"the decoder blocks have {block:.6f} zeros (tolerance {SPARSITY_TOLERANCE:g}): the card "
                "does not describe these weights"
            )
    return Verified(stated, measured, len(layers), len(keys), stated_block)
