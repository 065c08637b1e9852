"""Evaluation corpora read from the data directory (layout of shared/data, see its SOURCES.md)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import torch

from oneshot.data import data_dir_candidates

__all__ = ["PPL_DATASETS", "EvalDataError", "ppl_text", "ppl_token_ids"]


class EvalDataError(FileNotFoundError):
    """An evaluation file is missing; the message says which file is expected where."""


PPL_DATASETS = {
    "wikitext2": "wikitext-2-raw/wiki.test.raw",
    "c4": "c4/c4-validation.sample2000.jsonl.gz",
}


def _find(rel: str, data_dir: str | os.PathLike[str] | None) -> Path:
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


def ppl_text(name: str, data_dir: str | os.PathLike[str] | None = None) -> str:
    """The evaluation text of a perplexity dataset, joined as the standard protocol does."""
    if name not in PPL_DATASETS:
        path = Path(name).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        raise ValueError(
            f"unknown perplexity dataset {name!r}: choose one of {', '.join(PPL_DATASETS)} or a text file"
        )
    path = _find(PPL_DATASETS[name], data_dir)
    if name == "wikitext2":
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]
        rows = [(line + "\n") if line.strip() else "" for line in lines]
        return "\n\n".join(rows)
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        docs = [json.loads(line)["text"] for line in fh if line.strip()]
    return " ".join(docs)


def ppl_token_ids(name: str, tokenizer: Any, data_dir: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """(1, tokens) ids of a perplexity dataset."""
    return tokenizer(ppl_text(name, data_dir), return_tensors="pt", verbose=False).input_ids
