"""Evaluation corpora read from the data directory (layout of shared/data, see its SOURCES.md).

Perplexity datasets follow the standard (GPTQ / SparseGPT / Wanda) protocol:

- ``wikitext2``: the WikiText-2 raw test rows joined with ``"\\n\\n"``, tokenized once; every
  non-overlapping window of ``seqlen`` tokens is scored (the tail shorter than a window is dropped).
- ``c4``: the first 1100 C4 validation documents joined with ``" "``, tokenized once, and cut to the
  first ``256 * seqlen`` tokens: the protocol's 256 windows, or as many as the text holds (the offline
  copy is a 2000-document sample of the validation split, not the ``c4-validation.00000-of-00008``
  shard the reference code reads; the note in the result says so).
- any local text file (``.txt``/``.raw``/``.md`` read whole, ``.jsonl[.gz]``/``.json``/``.parquet``
  with a ``text`` field joined with ``"\\n\\n"``): all windows.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oneshot.data import CalibrationError, data_dir_candidates, read_jsonl, read_text_file
from oneshot.errors import OneshotError

__all__ = [
    "C4_DOCUMENTS",
    "C4_WINDOWS",
    "PPL_DATASETS",
    "EvalDataError",
    "PplData",
    "encode",
    "find_data_file",
    "ppl_data",
    "ppl_text",
    "ppl_token_ids",
]


class EvalDataError(OneshotError, FileNotFoundError):
    """An evaluation file is missing; the message says which file is expected where (a `OneshotError`:
    the CLI prints it as one line; still a FileNotFoundError for callers that catch that)."""


PPL_DATASETS = {
    "wikitext2": "wikitext-2-raw/wiki.test.raw",
    "c4": "c4/c4-validation.sample2000.jsonl.gz",
}
C4_DOCUMENTS = 1100  # validation documents the protocol joins
C4_WINDOWS = 256  # windows the protocol scores


@dataclass
class PplData:
    """Token stream of a perplexity dataset and how it was built."""

    name: str
    input_ids: torch.Tensor  # (1, tokens) int64
    source: str  # file it was read from
    max_windows: int | None  # protocol cap on the window count (c4: 256), None = all windows
    note: str  # how the text was built, for the result record


def find_data_file(rel: str, data_dir: str | os.PathLike[str] | None) -> Path:
    """``rel`` inside the first data directory that has it; EvalDataError naming every place looked at."""
    looked = []
    for base in data_dir_candidates(data_dir):
        path = base / rel
        looked.append(str(path))
        if path.is_file():
            return path
    raise EvalDataError(
        f"missing evaluation data: expected {rel} in the data directory (looked at "
        f"{', '.join(looked)}); set --data-dir or $ONESHOT_DATA_DIR"
    )


def _check_name(name: str) -> Path | None:
    """None for a named dataset, the path for a local file; ValueError for anything else."""
    if name in PPL_DATASETS:
        return None
    path = Path(name).expanduser()
    if path.is_file():
        return path
    raise ValueError(
        f"unknown perplexity dataset {name!r}: choose one of {', '.join(PPL_DATASETS)} or an existing text file"
    )


def _c4_docs(path: Path) -> list[str]:
    return [str(row["text"]) for row in read_jsonl(path, required=("text",))]


def _file_text(path: Path) -> str:
    try:
        docs = read_text_file(path)
    except CalibrationError as exc:
        raise ValueError(str(exc).replace("calibration file", "perplexity file")) from exc
    return "\n\n".join(d for d in docs if d)


def ppl_text(name: str, data_dir: str | os.PathLike[str] | None = None) -> str:
    """The evaluation text of a perplexity dataset, joined as the standard protocol does.

    For ``c4`` this is every document of the offline sample joined with a space; `ppl_data` keeps the
    protocol's first 1100 documents.
    """
    local = _check_name(name)
    if local is not None:
        return _file_text(local)
    path = find_data_file(PPL_DATASETS[name], data_dir)
    if name == "wikitext2":
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]
        rows = [(line + "\n") if line.strip() else "" for line in lines]
        return "\n\n".join(rows)
    return " ".join(_c4_docs(path))


def _tokenizer_key(tokenizer: Any) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    extra = (
        type(tokenizer).__name__,
        getattr(tokenizer, "add_bos_token", None),
        getattr(tokenizer, "add_eos_token", None),
    )
    return hashlib.sha256((backend.to_str() + repr(extra)).encode()).hexdigest()


# (tokenizer hash, text hash) -> ids: a pruned model and its dense baseline share one tokenization
_ENCODED: dict[tuple[str, str], torch.Tensor] = {}
_ENCODED_MAX = 8


def encode(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize ``text`` once -> (1, tokens) int64 (kept in memory for the same tokenizer and text)."""
    tok_key = _tokenizer_key(tokenizer)
    key = (tok_key, hashlib.sha256(text.encode()).hexdigest()) if tok_key else None
    if key is not None and key in _ENCODED:
        return _ENCODED[key]
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    out = torch.tensor(ids, dtype=torch.long).reshape(1, -1)
    if key is not None:
        if len(_ENCODED) >= _ENCODED_MAX:
            _ENCODED.pop(next(iter(_ENCODED)))
        _ENCODED[key] = out
    return out


def ppl_token_ids(name: str, tokenizer: Any, data_dir: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """(1, tokens) ids of a perplexity dataset (whole text, no window cap)."""
    return encode(tokenizer, ppl_text(name, data_dir))


def ppl_data(
    name: str, tokenizer: Any, seqlen: int, data_dir: str | os.PathLike[str] | None = None
) -> PplData:
    """Token stream of a perplexity dataset under the standard protocol, with its window cap and note.

    ``c4``: the first 1100 validation documents joined with ``" "`` and tokenized; the stream is cut to
    ``256 * seqlen`` tokens. Other datasets keep every full window.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    local = _check_name(name)
    if local is not None:
        ids = encode(tokenizer, _file_text(local))
        note = f"local file {local}: every non-overlapping window of {seqlen} tokens (tail dropped)"
        return PplData(name, ids, str(local.resolve()), None, note)
    path = find_data_file(PPL_DATASETS[name], data_dir)
    if name == "wikitext2":
        ids = ppl_token_ids(name, tokenizer, data_dir)
        note = (
            f"WikiText-2 raw test rows joined with '\\n\\n': every non-overlapping window of {seqlen} "
            f"tokens ({ids.shape[-1]} tokens, tail of {ids.shape[-1] % seqlen} dropped)"
        )
        return PplData(name, ids, str(path), None, note)
    docs = _c4_docs(path)
    used = docs[:C4_DOCUMENTS]
    ids = encode(tokenizer, " ".join(used))
    full = ids.shape[-1] // seqlen
    ids = ids[:, : C4_WINDOWS * seqlen]
    held = min(full, C4_WINDOWS)
    if held >= C4_WINDOWS:
        count = f"the protocol's {C4_WINDOWS} windows"
    else:
        count = f"only {held} windows (the protocol asks for {C4_WINDOWS}; the sample holds no more)"
    note = (
        f"C4 validation: first {len(used)} of {len(docs)} documents of the offline sample joined with ' ', "
        f"first {C4_WINDOWS} x {seqlen} tokens: {count}"
    )
    return PplData(name, ids, str(path), C4_WINDOWS, note)
