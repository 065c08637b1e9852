"""Streaming from disk (``--offload disk``): prune a model larger than memory, one block in memory at a time.

- `StreamedModel`: the causal LM built on the ``meta`` device (buffers real), with the modules outside the
  decoder blocks (embeddings, final norm, LM head) loaded from the checkpoint; `load_block` reads one
  block's tensors from the safetensors files (the header parsed, each tensor read with ``pread`` into its
  own buffer: no memory map, so the process holds exactly one block) and `release_block` puts them back on
  ``meta``.
- `ShardWriter`: writes the output checkpoint tensor by tensor as blocks finish, into the shard files and
  index that ``save_pretrained(max_shard_size=...)`` would write for the same model, byte for byte: the
  shard split comes from `huggingface_hub.split_torch_state_dict_into_shards` on the skeleton's state dict
  (sizes only), each file's safetensors header is written first and every tensor lands at its offset.
- `plan_offload`: whether ``--offload auto`` streams (the weights in the run's dtype above a share of the
  available RAM) and why not where a run cannot stream.

Peak memory is one block + the modules outside the blocks + the calibration activations and statistics,
independent of the number of blocks. Only checkpoints whose tensor names are the model's own state-dict
names can stream (no weight-name conversion on load); others are a clear error naming ``--offload none``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from oneshot.config import OFFLOAD_MODES
from oneshot.errors import OneshotError

__all__ = [
    "OFFLOAD_MODES",
    "ShardWriter",
    "StreamError",
    "StreamedModel",
    "checkpoint_tensor_files",
    "load_streamed",
    "open_streamed",
    "plan_offload",
    "weight_bytes",
]

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
MAX_SHARD_SIZE = "2GB"  # what `write_run_folder` passes to save_pretrained


class StreamError(OneshotError):
    """The model cannot be streamed from disk (format, layout or an option that needs it in memory)."""


# --- the checkpoint on disk ---


def checkpoint_tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it, from ``model.safetensors.index.json`` or the
    single ``model.safetensors``; StreamError when the folder has neither (e.g. only ``.bin`` files)."""
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StreamError(f"{index} cannot be read ({exc})") from exc
        files = {str(name): folder / str(file) for name, file in weight_map.items()}
        absent = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if absent:
            raise StreamError(f"{index} names shard files that are not there: {', '.join(absent[:3])}")
        return files
    single = folder / SAFE_WEIGHTS
    if single.is_file():
        try:
            header, _ = safetensors_header(single)
        except (OSError, ValueError) as exc:
            raise StreamError(f"{single} cannot be read ({exc})") from exc
        return {str(name): single for name in header}
    raise StreamError(
        f"{folder} has no safetensors checkpoint ({SAFE_WEIGHTS} or {SAFE_INDEX}): streaming reads "
        "safetensors only; convert it or pass --offload none"
    )


_MAX_HEADER = 100 * 2**20  # what safetensors itself accepts


def safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header of a safetensors file (tensor name -> dtype, shape, data_offsets) and where its data
    starts, read with two small reads (no memory map); ValueError for a malformed or truncated file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise ValueError(f"header length {n} is not plausible")
        raw = f.read(n)
    if len(raw) < n:
        raise ValueError("truncated inside the header")
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"the header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        try:
            lo, hi = (int(v) for v in entry["data_offsets"])
            dtype = str(entry["dtype"])
            shape = [int(d) for d in entry["shape"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the header entry of {name} is malformed") from exc
        end = max(end, hi)
        if hi < lo or lo < 0:
            raise ValueError(f"the header entry of {name} has data_offsets [{lo}, {hi}]")
        bits = _ST_BITS.get(dtype)
        if bits is not None and (hi - lo) * 8 != math.prod(shape) * bits:
            raise ValueError(
                f"{name} holds {hi - lo} bytes, its dtype {dtype} and shape {shape} need another size"
            )
    size = path.stat().st_size
    if size < 8 + n + end:
        raise ValueError(f"truncated: {size} bytes, the header needs {8 + n + end}")
    return header, 8 + n


def _read_tensors(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """These tensors of one safetensors file, each read into its own buffer with ``pread`` (no memory map:
    the process holds exactly the tensors it asked for, also under a memory limit such as RLIMIT_DATA)."""
    header, start = safetensors_header(path)
    dtypes = {v: k for k, v in _ST_DTYPES.items()}
    out: dict[str, torch.Tensor] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for name in names:
            entry = header[name]
            dtype = dtypes.get(str(entry["dtype"]))
            if dtype is None:
                raise StreamError(f"{name} in {path.name}: dtype {entry['dtype']} cannot be streamed")
            lo, hi = (int(v) for v in entry["data_offsets"])
            buf = bytearray(hi - lo)
            view, done = memoryview(buf), 0
            while done < len(buf):
                got = os.preadv(fd, [view[done:]], start + lo + done)
                if got <= 0:
                    raise StreamError(f"{path} ends inside {name}")
                done += got
            shape = [int(d) for d in entry["shape"]]
            tensor = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            out[name] = tensor.reshape(shape)
    finally:
        os.close(fd)
    return out


def weight_bytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters in ``dtype``, from a weightless skeleton (0 when none can be built)."""
    skeleton = _skeleton(config, dtype, check=False)
    if skeleton is None:
        return 0
    seen: set[int] = set()
    total = 0
    for p in skeleton.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (bytes), else the physical memory, else 0."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass
class OffloadPlan:
    stream: bool
    reason: str  # one line for the log and the record


def plan_offload(
    mode: str, config: Any, dtype: torch.dtype, share: float, blockers: Iterable[str] = ()
) -> OffloadPlan:
    """Whether to stream: ``disk`` always, ``none`` never, ``auto`` when the weights in ``dtype`` exceed
    ``share`` x the available RAM. ``blockers``: options of this run that need the whole model in memory;
    with ``disk`` (or ``auto`` deciding to stream) they are a StreamError naming them."""
    blockers = list(blockers)
    if mode == "none":
        return OffloadPlan(False, "--offload none")
    if mode == "auto":
        # several processes on one machine (torchrun) each hold the model: each gets its share of the RAM
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
        need, free = weight_bytes(config, dtype), available_ram() // local
        if need == 0 or free == 0 or need <= share * free:
            return OffloadPlan(
                False, f"--offload auto: weights {_gib(need)} fit {share:g} x available {_gib(free)}"
            )
        reason = f"--offload auto: weights {_gib(need)} exceed {share:g} x available RAM {_gib(free)}"
        if blockers:
            raise StreamError(
                f"the model's weights ({_gib(need)}) exceed {share:g} x the available RAM ({_gib(free)}), so "
                f"it would be streamed from disk, but {blockers[0]} needs the whole model in memory: drop it, "
                "or pass --offload none to load the model anyway"
            )
        return OffloadPlan(True, reason)
    if blockers:
        raise StreamError(
            f"--offload disk cannot be combined with {blockers[0]} (it needs the whole model in memory)"
        )
    return OffloadPlan(True, "--offload disk")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


# --- the streamed model ---


def _skeleton(config: Any, dtype: torch.dtype, *, check: bool = True) -> nn.Module | None:
    """The causal LM of ``config`` with its parameters on ``meta`` (never allocated) and its non-persistent
    buffers real, computed as ``from_pretrained`` computes them (built on ``meta``, the buffers put back on
    the CPU and initialised by the model's own ``initialize_weights``, which skips the parameters)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype)
        for name, buf in list(model.named_non_persistent_buffers()):
            _set_tensor(model, name, torch.empty_like(buf, device="cpu"))
        for p in model.parameters():
            p._is_hf_initialized = True  # nothing to initialise: the checkpoint's values come later
        model.initialize_weights()
    except Exception as exc:
        if not check:
            return None
        raise StreamError(f"cannot build {type(config).__name__} without weights: {exc}") from exc
    return cast(nn.Module, model)


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``name`` (a new Parameter for a parameter)."""
    owner, _, attr = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(
            value, requires_grad=bool(old is not None and old.requires_grad)
        )
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:  # pragma: no cover - names come from the module's own state dict
        raise StreamError(f"{name} is neither a parameter nor a buffer of the model")


class StreamedModel:
    """A causal LM whose decoder blocks stay on disk until `load_block` (see the module docstring)."""

    def __init__(self, folder: Path, config: Any, dtype: torch.dtype) -> None:
        from oneshot.walker import find_blocks

        _bound_heap()
        self.folder = folder
        self.dtype = dtype
        self.writer: ShardWriter | None = None
        self.files = checkpoint_tensor_files(folder)
        model: Any = _skeleton(config, dtype)
        assert model is not None
        model.eval()
        # as from_pretrained records when it converted no weight name (the names are checked below): saving
        # then reverts no conversion, in the same (sorted) order
        model._weight_conversions = []
        if model.can_generate():  # as from_pretrained: the folder's generation config, else config.json's
            from transformers import GenerationConfig

            try:
                model.generation_config = GenerationConfig.from_pretrained(str(folder), _from_auto=True)
            except OSError:
                model.generation_config = GenerationConfig.from_pretrained(
                    str(folder), config_file_name="config.json", _from_auto=True, _from_model_config=True
                )
        self.model = model
        self.blocks_name, self.blocks = find_blocks(model)
        state = model.state_dict(keep_vars=True)
        prefix = f"{self.blocks_name}."
        self.block_names: list[list[str]] = [[] for _ in self.blocks]
        outside: list[str] = []
        for name in state:
            if name.startswith(prefix):
                self.block_names[int(name[len(prefix) :].split(".", 1)[0])].append(name)
            else:
                outside.append(name)
        tied = set(_tied_targets(model))
        wanted = {n for n in state if n not in tied}
        for name in [n for n in self.files if n not in state and _ignored_on_load(model, n)]:
            del self.files[name]  # what from_pretrained drops too (e.g. old per-layer rotary_emb.inv_freq)
        missing = sorted(n for n in wanted if n not in self.files and not _is_nonpersistent(model, n))
        unexpected = sorted(n for n in self.files if n not in state)
        if missing or unexpected:
            what = missing or unexpected
            moe = " (mixture-of-experts models fuse their experts on load)" if _has_experts(model) else ""
            raise StreamError(
                f"the tensor names in {folder} are not the model's own ({len(missing)} missing, "
                f"{len(unexpected)} unknown, e.g. {what[0]}): this checkpoint needs weight conversion on "
                f"load{moe}, which streaming does not do; pass --offload none"
            )
        self._read([n for n in outside if n in self.files])
        model.tie_weights()
        still_meta = [
            n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta and not n.startswith(prefix)
        ]
        if still_meta:
            raise StreamError(f"{still_meta[0]} could not be loaded from {folder}")
        from oneshot.models import check_finite

        check_finite(model, f"{folder} (outside the decoder blocks)")

    def _read(self, names: list[str], files: dict[str, Path] | None = None) -> None:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault((files or self.files)[name], []).append(name)
        current = self.model.state_dict(keep_vars=True)
        for path, group in by_file.items():
            values = _read_tensors(path, group)
            for name in group:
                want = current[name]
                value = values.pop(name)
                if tuple(value.shape) != tuple(want.shape):
                    raise StreamError(
                        f"{name} in {path.name} has shape {tuple(value.shape)}, the config says "
                        f"{tuple(want.shape)}"
                    )
                if value.is_floating_point() and value.dtype != want.dtype:
                    value = value.to(want.dtype)
                _set_tensor(self.model, name, value)

    def load_block(self, index: int, *, written: bool = False) -> nn.Module:
        """Read block ``index``'s tensors from disk into it (on the CPU); returns the block. ``written``: from
        the output being written (`store_block` put it there) instead of the source checkpoint."""
        if written:
            if self.writer is None:
                raise StreamError("no output is being written")
            files = {n: slot.path for n, slot in self.writer.slots.items()}
            self._read([n for n in self.block_names[index] if n in files], files)
        else:
            self._read([n for n in self.block_names[index] if n in self.files])
        block = self.blocks[index]
        for rel, t in block.state_dict(keep_vars=True).items():
            if t.is_meta:
                raise StreamError(f"{self.blocks_name}.{index}.{rel} could not be loaded from {self.folder}")
        return block

    def start_output(self, folder: Path) -> ShardWriter:
        """Lay out the output checkpoint in ``folder`` (what ``save_pretrained`` would write for this model)
        and write the tensors outside the blocks now; `store_block` writes each block as it is done."""
        state = saved_state(self.model)
        self.writer = ShardWriter(folder, state)
        prefix = f"{self.blocks_name}."
        self.writer.write({n: t for n, t in state.items() if not n.startswith(prefix)})
        return self.writer

    def store_block(self, index: int) -> None:
        """Write block ``index`` (pruned) to the output, then release it (only release it without an output:
        a worker of a multi-process run, whose rank 0 writes)."""
        if self.writer is None:
            self.release_block(index)
            return
        keep = set(self.writer.slots)
        prefix = f"{self.blocks_name}.{index}."
        tensors = {
            prefix + rel: t for rel, t in self.blocks[index].state_dict().items() if prefix + rel in keep
        }
        self.writer.write(tensors)
        self.release_block(index)

    def finish_output(self) -> None:
        """Check the output is complete, write its index (sharded) and config files as save_pretrained does."""
        if self.writer is None:
            raise StreamError("finish_output before start_output")
        self.writer.finish(total_parameters=int(self.model.num_parameters()))
        config = self.model.config
        config.dtype = str(self.dtype).split(".")[1]
        config.architectures = [type(self.model).__name__]
        config.save_pretrained(self.writer.folder)
        if self.model.can_generate() and getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(self.writer.folder)

    @torch.no_grad()
    def perplexity(
        self, input_ids: torch.Tensor, seqlen: int, *, limit: int, device: torch.device, written: bool = False
    ) -> Any:
        """The perplexity `oneshot.eval.perplexity.perplexity` gives the whole model (windows of ``seqlen``,
        the first ``limit``), computed block by block: every window's hidden states go through one block at
        a time (read from the source, or with ``written`` from the output), then the model's own head runs
        on them window by window (its blocks replaced by stand-ins that return the final hidden states)."""
        from oneshot.eval.perplexity import perplexity, windows
        from oneshot.walker import capture_block_calls, move_non_block_modules, run_block

        model, blocks = self.model, self.blocks
        chunks = windows(input_ids, seqlen, limit)  # (windows, seqlen)
        batches = list(chunks.split(1))
        move_non_block_modules(model, blocks, device)
        try:
            hidden, calls = capture_block_calls(model, blocks, batches, device, torch.device("cpu"))
            for i in range(len(blocks)):
                block = self.load_block(i, written=written).to(device)
                hidden = [run_block(block, h, calls[i][b], device).to("cpu") for b, h in enumerate(hidden)]
                self.release_block(i)
            originals = list(blocks)
            final = iter(hidden)
            try:
                for i in range(len(blocks)):
                    blocks[i] = _Finished(final, last=i == len(blocks) - 1)
                return perplexity(model, chunks.reshape(1, -1), seqlen, 1, limit=limit, device=device)
            finally:
                for i, blk in enumerate(originals):
                    blocks[i] = blk
        finally:
            move_non_block_modules(model, blocks, torch.device("cpu"))

    def release_block(self, index: int) -> None:
        """Put block ``index``'s parameters back on ``meta`` and hand the freed memory back to the system."""
        block = self.blocks[index]
        loaded = set(self.block_names[index])  # what load_block read: parameters and persistent buffers
        prefix = f"{self.blocks_name}.{index}."
        for rel, module in block.named_modules():
            base = prefix + (f"{rel}." if rel else "")
            for attr, p in list(module._parameters.items()):
                if p is not None and not p.is_meta:
                    module._parameters[attr] = nn.Parameter(
                        torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=p.requires_grad
                    )
            for attr, b in list(module._buffers.items()):
                if b is not None and not b.is_meta and base + attr in loaded and base + attr in self.files:
                    module._buffers[attr] = torch.empty(b.shape, dtype=b.dtype, device="meta")
        _trim_heap()


class _Finished(nn.Module):
    """Stands in for a decoder block in `StreamedModel.perplexity`: passes the hidden states through, and
    the last one replaces them by the next window's final hidden states (computed block by block)."""

    def __init__(self, final: Any, *, last: bool) -> None:
        super().__init__()
        self.final, self.last = final, last

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.last:
            return hidden_states
        return next(self.final).to(hidden_states.device)


def saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` writes, in its order: the state dict less ignored and tied keys, put
    through transformers' reversal of the load-time weight conversions (which also sorts the names)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, cast(Any, model))
    return dict(revert_weight_conversion(cast(Any, model), state))


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
            _LIBC.mallopt  # noqa: B018
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def _bound_heap() -> None:
    """glibc raises its mmap threshold to the largest block freed so far (up to 32 MB), after which tensors
    of a block come from its heap, which fragments as every block brings new ones: the process grew by about
    20 MB a block at width 1280. A fixed threshold of 1 MiB keeps every tensor in its own mapping, returned
    to the system when it is freed, so the footprint stays that of one block whatever the layer count."""
    libc = _libc()
    if libc:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _trim_heap() -> None:
    """Return the heap's free pages to the system (glibc ``malloc_trim``)."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


_LIBC: Any = None


def _tied_targets(model: nn.Module) -> list[str]:
    """State-dict names that are tied to another weight and never saved (``lm_head.weight`` when tied)."""
    keys = getattr(model, "all_tied_weights_keys", None)
    if isinstance(keys, dict):
        return [str(k) for k in keys]
    return []


def _ignored_on_load(model: nn.Module, name: str) -> bool:
    """Checkpoint tensors ``from_pretrained`` ignores: the model's ``_keys_to_ignore_on_load_unexpected``
    patterns and the per-layer ``rotary_emb.inv_freq`` of checkpoints from before transformers 4.31."""
    import re

    patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    return name.endswith("rotary_emb.inv_freq") or any(re.search(p, name) for p in patterns)


def _has_experts(model: nn.Module) -> bool:
    from oneshot.moe import find_experts

    return bool(find_experts(model, "model"))


def _is_nonpersistent(model: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return attr in getattr(module, "_non_persistent_buffers_set", set())


def load_streamed(spec: str | None, dtype: torch.dtype) -> tuple[StreamedModel, Any, dict[str, Any]]:
    """The `StreamedModel`, tokenizer and source record of a model spec as `oneshot.models.load_model`
    takes it: a local folder or a ``.gguf`` file (converted once into the cache, as for loading); a Hub id
    is a StreamError (download it and pass the folder)."""
    from oneshot.models import ModelLoadError, _load_tokenizer, _resolve

    where = _resolve(spec)
    if where.folder is None:
        raise StreamError(
            f"cannot stream {spec!r} from the Hub: download it first (`hf download {spec} --local-dir DIR`) and "
            "pass the folder, or pass --offload none"
        )
    try:
        tok = _load_tokenizer(where.folder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the tokenizer from {where.folder}: {exc}") from exc
    return open_streamed(where.folder, dtype), tok, where.source


def open_streamed(folder: Path, dtype: torch.dtype) -> StreamedModel:
    """`StreamedModel` of a local checkpoint folder (config.json + safetensors)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise StreamError(f"config {folder / 'config.json'} cannot be used: {exc}") from exc
    return StreamedModel(folder, config, dtype)


# --- the output writer ---


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPE_ORDER: list[str] | None = None
# bits per element of safetensors' dtype names (the size check of a header entry; others are not checked)
_ST_BITS = {
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "F32": 32,
    "I32": 32,
    "U32": 32,
    "F16": 16,
    "BF16": 16,
    "I16": 16,
    "U16": 16,
    "I8": 8,
    "U8": 8,
    "BOOL": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
}


def _dtype_order() -> list[str]:
    """Safetensors' own order of dtypes in a file (it sorts entries by dtype, largest first, then name),
    read once from a tiny file it writes, so a header we write is the one it would write."""
    global _DTYPE_ORDER
    if _DTYPE_ORDER is None:
        from safetensors.torch import save

        data = save({str(i): torch.zeros(1, dtype=dt) for i, dt in enumerate(_ST_DTYPES)})
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        header.pop("__metadata__", None)
        _DTYPE_ORDER = [str(entry["dtype"]) for entry in header.values()]
    return _DTYPE_ORDER


@dataclass
class _Slot:
    path: Path
    offset: int  # absolute, in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class ShardWriter:
    """Writes a model's safetensors checkpoint tensor by tensor (see the module docstring)."""

    def __init__(
        self,
        folder: Path,
        state: dict[str, torch.Tensor],
        *,
        max_shard_size: str | int = MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """``state``: the tensors that will be saved, in save order (meta tensors for shapes only)."""
        from huggingface_hub import split_torch_state_dict_into_shards

        self.folder = folder
        split = split_torch_state_dict_into_shards(
            state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
        )
        self.index: dict[str, Any] | None = None
        self.slots: dict[str, _Slot] = {}
        order = {name: i for i, name in enumerate(_dtype_order())}
        meta = {"format": "pt"} if metadata is None else metadata
        for filename, names in split.filename_to_tensors.items():
            for name in names:
                if state[name].dtype not in _ST_DTYPES:
                    raise StreamError(f"{name}: dtype {state[name].dtype} cannot be streamed to safetensors")
            entries = sorted(names, key=lambda n: (order[_ST_DTYPES[state[n].dtype]], n))
            header: dict[str, Any] = {"__metadata__": meta}
            start = 0
            for name in entries:
                t = state[name]
                size = t.numel() * t.element_size()
                header[name] = {
                    "dtype": _ST_DTYPES[t.dtype],
                    "shape": list(t.shape),
                    "data_offsets": [start, start + size],
                }
                start += size
            raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            raw += b" " * ((8 - len(raw) % 8) % 8)
            path = folder / filename
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                f.truncate(8 + len(raw) + start)
            base = 8 + len(raw)
            for name in entries:
                lo, hi = header[name]["data_offsets"]
                t = state[name]
                self.slots[name] = _Slot(path, base + lo, hi - lo, t.dtype, tuple(t.shape))
        if split.is_sharded:
            self.index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
        self.written: set[str] = set()

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write these tensors (any device) at their places; each name once."""
        by_file: dict[Path, list[tuple[_Slot, torch.Tensor]]] = {}
        name_of: dict[int, str] = {}
        for name, t in tensors.items():
            slot = self.slots.get(name)
            if slot is None:
                raise StreamError(f"{name} is not a tensor of the checkpoint being written")
            name_of[id(slot)] = name
            if t.dtype != slot.dtype or tuple(t.shape) != slot.shape:
                raise StreamError(
                    f"{name}: {t.dtype} {tuple(t.shape)} written where {slot.dtype} {slot.shape} is due"
                )
            by_file.setdefault(slot.path, []).append((slot, t))
        for path, items in by_file.items():
            fd = os.open(path, os.O_WRONLY)
            try:
                for slot, t in items:
                    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                    done = 0
                    view = memoryview(cast(Any, data))
                    while done < slot.nbytes:
                        done += os.pwrite(fd, view[done:], slot.offset + done)
                    self.written.add(name_of[id(slot)])
            finally:
                os.close(fd)

    def finish(self, total_parameters: int | None = None) -> None:
        """Check every tensor was written; write the index of a sharded checkpoint."""
        left = sorted(set(self.slots) - self.written)
        if left:
            raise StreamError(f"{len(left)} tensor(s) were never written, e.g. {left[0]}")
        if self.index is not None:
            index = dict(self.index)
            if total_parameters is not None:
                index["metadata"] = {"total_parameters": total_parameters, **index["metadata"]}
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            (self.folder / SAFE_INDEX).write_text(text, encoding="utf-8")
