"""The `oneshot export` job: a run folder -> an export folder for another runtime, read back and checked.

- ``compressed-tensors``: the quantized run's matrices packed in the ``pack-quantized`` layout (codes
  recovered exactly from the fake-quantized checkpoint and ``quantization.safetensors``), the other tensors
  as they are, config.json with ``quantization_config`` (never a ``sparsity_config``), the tokenizer.
- ``gguf``: one ``.gguf`` file (f32, f16 or q8_0) written with the ``gguf`` package's writer, with llama.cpp's
  tensor names and metadata and the tokenizer (`oneshot.exporters.gguf`).

Everything that needs no weights is checked first (the record, the format, the architecture, the group
layout); the output folder is taken like a run folder (`oneshot.output`: locked, test-written, moved into
place at the end, replaced only when it is an earlier export holding nothing else). The written export is
then loaded back with its consumer's loader (transformers with the compressed-tensors package; transformers'
own GGUF reader) and its logits compared with the run's model on the same tokens: beyond the tolerance
(compressed-tensors and GGUF f32) it is an error and nothing is written; f16 and q8_0 differences are
reported. The folder holds ``oneshot-export.json`` (`oneshot.runfolder.ExportManifest`).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oneshot.errors import Interrupted, first_line
from oneshot.exporters import ExportError
from oneshot.output import reserve_output
from oneshot.runfolder import (
    EXPORT_FILE,
    INDEX_FILE,
    QUANT_FILE,
    ExportCheck,
    ExportManifest,
    RecordError,
    RunRecord,
    file_hashes,
    library_versions,
    read_quant_file,
)
from oneshot.solvers.quant import QuantizedWeight, QuantScheme, recover_codes

__all__ = [
    "CT_TOLERANCE",
    "FORMATS",
    "GGUF_F32_TOLERANCE",
    "GGUF_TYPES",
    "ExportResult",
    "run_export",
]

logger = logging.getLogger(__name__)

FORMATS = ("compressed-tensors", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0")
DEFAULT_SHARD_SIZE = "5GB"  # compressed-tensors: the largest weight file (transformers' default)
CT_TOLERANCE = 1e-4  # max |logit difference| of the compressed-tensors read-back (measured: see README)
GGUF_F32_TOLERANCE = 1e-5
CHECK_TEXT = (
    "The quick brown fox jumps over the lazy dog. Quantization stores every weight as a small integer "
    "and a scale per group of weights."
)
CHECK_TOKENS = 48
# files copied as they are from the run folder into a compressed-tensors export
_COPIED = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass
class ExportResult:
    out: Path
    manifest: ExportManifest


def _export_rule(folder: Path) -> str | None:
    """An existing export folder may be replaced when it holds our manifest and only the files it lists."""
    try:
        manifest = ExportManifest.load(folder)
    except RecordError:
        return (
            f"is not an earlier export (no valid {EXPORT_FILE}): --overwrite only replaces folders oneshot "
            "wrote; choose another folder"
        )
    foreign = [
        p.relative_to(folder).as_posix()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != EXPORT_FILE and p.relative_to(folder).as_posix() not in manifest.files
    ]
    if foreign:
        return f"is an earlier export but also holds {', '.join(foreign[:5])}: move them away or choose another folder"
    return None


def _checkpoint(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder (a run's or a compressed-tensors export's; sharded or not)."""
    from safetensors.torch import load_file

    index = run_dir / INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for shard in shards:
        out.update(load_file(str(run_dir / shard)))
    return out


def _grids(run_dir: Path, record: RunRecord, weights: dict[str, torch.Tensor]) -> dict[str, QuantizedWeight]:
    """The codes of every quantized matrix, recovered from the checkpoint and its grids (exactly: a weight off
    its grid means the checkpoint changed after quantization)."""
    q = record.quantized
    scheme = QuantScheme(
        bits=q.bits,
        group_size=q.group_size,
        symmetric=q.symmetric,
        act_order=q.act_order,
        scale_dtype=q.scale_dtype,
    )
    grids, _ = read_quant_file(run_dir)
    out: dict[str, QuantizedWeight] = {}
    for name, g in grids.items():
        if "[" in name:
            raise ExportError(
                f"{name} is one expert of a fused MoE tensor: compressed-tensors export of fused experts is not "
                "supported (export --format gguf, or quantize a model with per-expert Linear layers)"
            )
        key = f"{name}.weight"
        if key not in weights:
            raise ExportError(f"{QUANT_FILE} names {name}, which the checkpoint does not hold ({key})")
        codes, off = recover_codes(
            weights[key], g["weight_scale"], g["weight_zero_point"], g["weight_g_idx"], scheme
        )
        if off:
            raise ExportError(
                f"{key}: {off} weights are not on their quantization grid (the checkpoint changed after "
                "quantization, e.g. by `oneshot recover`): quantize the run again before exporting"
            )
        out[name] = codes
    return out


def _linear_names(run_dir: Path) -> list[str]:
    """Every nn.Linear of the run's architecture (from a weightless skeleton of its config.json)."""
    from transformers import AutoConfig

    from oneshot.checks import model_skeleton

    skeleton = model_skeleton(AutoConfig.from_pretrained(str(run_dir)))
    if skeleton is None:
        raise ExportError(f"cannot build the architecture of {run_dir / 'config.json'} to list its layers")
    return [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]


def _save_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> list[str]:
    """``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` shards of at most ``max_shard_size``
    bytes each (a larger single tensor gets a shard of its own) with ``model.safetensors.index.json``, the
    layout transformers loads; the shard split is huggingface_hub's. Returns the file names written."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    try:
        split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    except ValueError as exc:
        raise ExportError(f"--max-shard-size {max_shard_size!r}: {exc}") from None
    names = []
    for filename, keys in split.filename_to_tensors.items():
        save_file(
            {k: tensors[k].contiguous() for k in keys}, str(folder / filename), metadata={"format": "pt"}
        )
        names.append(filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        names.append(INDEX_FILE)
    return names


def _write_compressed_tensors(
    run_dir: Path, record: RunRecord, tmp: Path, max_shard_size: int | str = DEFAULT_SHARD_SIZE
) -> None:
    from oneshot.exporters.compressed_tensors import quantization_config, tensors_of

    q = record.quantized
    weights = _checkpoint(run_dir)
    grids = _grids(run_dir, record, weights)
    linears = _linear_names(run_dir)
    missing = sorted(set(grids) - set(linears))
    if missing:
        raise ExportError(f"{missing[0]} is quantized but is not an nn.Linear of the architecture")
    scale_dtype = next(iter(weights.values())).dtype if weights else torch.float32
    scale_dtype = scale_dtype if scale_dtype.is_floating_point else torch.float32
    out: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        owner = key.rsplit(".", 1)[0]
        if owner in grids and key.endswith(".weight"):
            continue
        out[key] = tensor
    for name, codes in grids.items():
        out.update(tensors_of(name, codes, scale_dtype))
    _save_shards(out, tmp, max_shard_size)
    config = json.loads((run_dir / "config.json").read_text())
    config.pop("sparsity_config", None)
    lm_head = [n for n in linears if n not in grids and n.split(".")[-1] == "lm_head"]
    ignore = lm_head + [n for n in linears if n not in grids and n not in lm_head]
    config["quantization_config"] = quantization_config(q.bits, q.group_size, q.symmetric, ignore)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in _COPIED:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, tmp / name)


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _check_ids(tokenizer: Any, vocab: int) -> torch.Tensor:
    ids = tokenizer(CHECK_TEXT, return_tensors="pt")["input_ids"][:, :CHECK_TOKENS]
    if ids.shape[1] < 2:
        ids = torch.arange(1, CHECK_TOKENS + 1).unsqueeze(0) % vocab
    return ids


def _compare(
    run_dir: Path, load_export: Callable[[], Any], loader: str, tolerance: float | None
) -> ExportCheck:
    """Logits of the export (read back by ``load_export``) against the run's model on the same tokens."""
    from oneshot.models import load_model

    reference = load_model(str(run_dir), dtype="float32")
    ids = _check_ids(reference.tokenizer, int(reference.model.config.get_text_config().vocab_size))
    expected = _logits(reference.model, ids)
    del reference
    try:
        exported = load_export()
    except ImportError as exc:
        return ExportCheck(loader, note=f"not checked: {first_line(exc)}")
    got = _logits(exported, ids)
    if got.shape != expected.shape:
        raise ExportError(
            f"the exported model's logits have shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        )
    diff = float((got - expected).abs().max())
    check = ExportCheck(
        loader,
        tokens=int(ids.numel()),
        max_abs_diff=diff,
        max_abs_logit=float(expected.abs().max()),
        tolerance=tolerance,
        passed=None if tolerance is None else diff <= tolerance,
    )
    if check.passed is False:
        raise ExportError(
            f"the export read back with {loader} gives logits up to {diff:.3g} away from the run's model "
            f"(tolerance {tolerance:g}): nothing was written"
        )
    return check


def _compare_tokenizers(run_dir: Path, folder: Path, name: str) -> str:
    """Whether the tokenizer transformers builds from the GGUF file encodes the check text as the run's does."""
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(str(run_dir))(CHECK_TEXT)["input_ids"]
    try:
        theirs = AutoTokenizer.from_pretrained(str(folder), gguf_file=name)(CHECK_TEXT)["input_ids"]
    except Exception as exc:  # the GGUF tokenizer builders raise many types
        logger.warning("the GGUF file's tokenizer does not load with transformers: %s", first_line(exc))
        return f"tokenizer: does not load with transformers ({first_line(exc)})"
    if ours != theirs:
        logger.warning("the GGUF file's tokenizer encodes the check text differently from the run's")
        return f"tokenizer: encodes the check text differently ({len(theirs)} vs {len(ours)} ids)"
    return f"tokenizer: the same {len(ours)} ids on the check text"


def _ct_version() -> str | None:
    import importlib.metadata as md

    try:
        return md.version("compressed-tensors")
    except md.PackageNotFoundError:
        return None


def _ct_decompressed(folder: Path, run_dir: Path) -> Any:
    """The run's model with every packed matrix replaced by what compressed-tensors' own
    ``PackedQuantizationCompressor.decompress`` makes of the export's tensors."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from oneshot.models import load_model

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    group = config["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
    tensors = _checkpoint(folder)
    model = load_model(str(run_dir), dtype="float32").model
    suffix = ".weight_packed"
    for key in [k for k in tensors if k.endswith(suffix)]:
        name = key[: -len(suffix)]
        parts = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{name}.weight_")}
        weight = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
        model.get_submodule(name).weight.data.copy_(weight)
    return model.eval()


def _ct_loader(folder: Path, run_dir: Path) -> tuple[Callable[[], Any], str]:
    """transformers + compressed-tensors (`from_pretrained` of the export folder). Asymmetric checkpoints:
    transformers' compressed-tensors integration cannot load them (llm-compressor issue #1618: it builds the
    zero-points unpacked while the format packs them), so they are read back with compressed-tensors'
    decompressor into the architecture, and the loader says so."""
    version = _ct_version()
    symmetric = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"
    ]["weights"]["symmetric"]
    label = (
        f"transformers + compressed-tensors {version}"
        if symmetric
        else f"compressed-tensors {version} PackedQuantizationCompressor.decompress (transformers cannot load "
        "asymmetric pack-quantized checkpoints)"
    )

    def load() -> Any:
        if version is None:
            raise ImportError(
                "the compressed-tensors package is not installed (pip install 'oneshot[export]')"
            )
        if not symmetric:
            return _ct_decompressed(folder, run_dir)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()

    return load, label


def run_export(
    run_dir: str | os.PathLike[str],
    fmt: str,
    out: str | os.PathLike[str],
    *,
    gguf_type: str | None = None,
    overwrite: bool = False,
    check: bool = True,
    argv: list[str] | None = None,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> ExportResult:
    """Export the run folder ``run_dir`` as ``fmt`` into the folder ``out`` (see the module docstring).
    ``max_shard_size``: compressed-tensors weights in shards of at most this size (bytes, or "500MB", "5GB")."""
    run_dir = Path(run_dir).expanduser()
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if gguf_type is not None and fmt != "gguf":
        raise ExportError("--gguf-type is an option of --format gguf")
    gguf_type = gguf_type or ("f16" if fmt == "gguf" else None)
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ExportError(f"unknown --gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a folder: give a run folder of oneshot prune/quantize/shrink")
    record = RunRecord.load(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ExportError(f"{run_dir} holds a record but no checkpoint (config.json is missing)")
    q = record.quantization
    if fmt == "compressed-tensors":
        if q is None:
            raise ExportError(
                f"{run_dir} is not quantized: compressed-tensors export packs integer weights; run `oneshot "
                f"quantize {run_dir} --scheme w4a16` first (or export --format gguf)"
            )
        if q.act_order:
            raise ExportError(
                f"{run_dir} was quantized with --act-order: its groups follow a column order (g_idx) that "
                "compressed-tensors no longer reads; quantize without --act-order to export this format"
            )
        if any("[" in layer.name for layer in q.layers):
            raise ExportError(
                "this run quantized fused MoE experts: compressed-tensors export of fused experts is not "
                "supported (export --format gguf)"
            )
    arch = None
    if fmt == "gguf":
        from oneshot.exporters.gguf import check_architecture

        arch = check_architecture(json.loads((run_dir / "config.json").read_text()))
    try:
        slot = reserve_output(
            out, overwrite=overwrite, protected=[("run folder", run_dir)], replaceable=_export_rule
        )
    except KeyboardInterrupt as exc:
        raise Interrupted(f"interrupted; nothing was written to {out}") from exc
    try:
        tmp = slot.tmp
        assert tmp is not None
        manifest = ExportManifest(
            format=fmt,
            source_run=str(run_dir.resolve()),
            scheme=q.label if q is not None else None,
            gguf_type=gguf_type,
            architecture=arch,
            command=list(argv if argv is not None else sys.argv),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            versions=library_versions(),
        )
        if fmt == "compressed-tensors":
            logger.info("packing %d quantized matrices (%s)", len(q.layers) if q else 0, manifest.scheme)
            _write_compressed_tensors(run_dir, record, tmp, max_shard_size)
            load, loader = _ct_loader(tmp, run_dir)
            tolerance: float | None = CT_TOLERANCE
        else:
            from oneshot.exporters.gguf import gguf_loader, write_gguf

            assert gguf_type is not None
            logger.info("writing a %s GGUF file (%s)", gguf_type, arch)
            name = write_gguf(run_dir, tmp, gguf_type, _checkpoint(run_dir))
            load, loader = gguf_loader(tmp, name), "transformers GGUF reader"
            tolerance = GGUF_F32_TOLERANCE if gguf_type == "f32" else None
        if check:
            logger.info("reading the export back with %s to compare logits", loader)
            manifest.check = _compare(run_dir, load, loader, tolerance)
            if fmt == "gguf":
                manifest.check.note = _compare_tokenizers(run_dir, tmp, name)
        manifest.files = file_hashes(tmp)
        manifest.save(tmp)
        slot.commit()
    except KeyboardInterrupt as exc:
        raise Interrupted(f"interrupted; {slot.state()}") from exc
    finally:
        slot.release()
    return ExportResult(slot.out, manifest)
