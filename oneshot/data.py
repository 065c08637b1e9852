"""Calibration data: named corpora, local files, Hub datasets and model-generated text.

Standard protocol: the corpus is concatenated, tokenized once, and ``nsamples`` random windows of
``seqlen`` tokens are drawn with a seeded generator. Named sources read the offline copies in the data
directory (layout of ``shared/data``: see its SOURCES.md) and otherwise go through ``datasets``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from oneshot.errors import OneshotError
from oneshot.models import kv_cache_arg

__all__ = [
    "NAMED_SOURCES",
    "CalibrationError",
    "DataFileError",
    "calibration_windows",
    "data_dir_candidates",
    "load_text_source",
    "read_jsonl",
    "read_text_file",
    "resolve_data_dir",
    "sample_windows",
    "self_generated_windows",
]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "ONESHOT_DATA_DIR"
DOC_SEPARATOR = "\n\n"

# name -> (relative files tried in order inside the data directory, Hub fallback)
NAMED_SOURCES: dict[str, dict[str, Any]] = {
    "c4": {
        "files": ["c4/c4-train.00000-of-01024.first1000.jsonl.gz", "c4/c4-train.00000-of-01024.json.gz"],
        "hub": ("allenai/c4", None, "train", {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}}),
    },
    "wikitext2": {
        # The protocol calibrates on the train split; offline copies may only hold validation.
        "files": ["wikitext-2-raw/wiki.train.raw", "wikitext-2-raw/wiki.valid.raw"],
        "hub": ("wikitext", "wikitext-2-raw-v1", "train", {}),
    },
}


class CalibrationError(OneshotError, ValueError):
    """Calibration data could not be found or is unusable; the message says where it looked."""


class DataFileError(OneshotError, ValueError):
    """A data file cannot be read or is malformed; the one-line message names the file (and the line)."""


def data_dir_candidates(explicit: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where data is looked for, in order: the explicit setting, $ONESHOT_DATA_DIR, ./data, and the
    ``shared/data`` folder beside a source checkout of this package."""
    out: list[Path] = []
    if explicit:
        return [Path(explicit).expanduser()]
    if os.environ.get(DATA_DIR_ENV):
        return [Path(os.environ[DATA_DIR_ENV]).expanduser()]
    repo = Path(__file__).resolve().parent.parent
    out.append(Path.cwd() / "data")
    out.append(repo.parent / "shared" / "data")
    return out


def resolve_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The first existing data directory, or None."""
    for cand in data_dir_candidates(explicit):
        if cand.is_dir():
            return cand
    return None


def read_jsonl(path: str | os.PathLike[str], *, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, one JSON object per non-blank line (gzip when the name ends in .gz).

    ``required``: keys every record must have. Every problem is a `DataFileError` naming the file, and the
    line for a record that is not UTF-8, not valid JSON, not an object, or lacks a required key.
    """
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.name.lower().endswith(".gz") else open
    rows: list[dict[str, Any]] = []
    try:
        with opener(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                record = _jsonl_record(path, number, raw, required)
                if record is not None:
                    rows.append(record)
    except DataFileError:
        raise
    except PermissionError as exc:
        raise DataFileError(f"cannot read {path}: permission denied") from exc
    except (OSError, EOFError) as exc:  # missing, not gzip (BadGzipFile is an OSError), truncated (EOFError)
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise DataFileError(f"cannot read {path}: {reason}") from exc
    return rows


def _jsonl_record(path: Path, number: int, raw: bytes, required: Sequence[str]) -> dict[str, Any] | None:
    """The record of line ``number`` (None for a blank line); DataFileError naming the file and line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFileError(
            f"{path}: line {number} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to UTF-8"
        ) from exc
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataFileError(f"{path}: line {number} is not valid JSON ({exc.msg})") from exc
    if not isinstance(row, dict):
        raise DataFileError(f"{path}: line {number} is not a JSON object")
    for key in required:
        if key not in row:
            raise DataFileError(f"{path}: line {number} has no {key!r} field")
    return row


def read_text_file(path: Path) -> list[str]:
    """Documents of a local file: .txt/.raw (whole file), .jsonl[.gz] / .json (a ``text`` field), .parquet.

    Every problem is a `CalibrationError` naming the file (and the line of a JSONL record).
    """
    try:
        return _read_text_file(path)
    except CalibrationError:
        raise
    except DataFileError as exc:
        raise CalibrationError(str(exc)) from exc
    except PermissionError as exc:
        raise CalibrationError(f"cannot read calibration file {path}: permission denied") from exc
    except UnicodeDecodeError as exc:
        raise CalibrationError(
            f"calibration file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to UTF-8"
        ) from exc
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise CalibrationError(f"cannot read calibration file {path}: {exc}") from exc
    except ValueError as exc:  # json.JSONDecodeError and pyarrow's errors
        raise CalibrationError(f"calibration file {path} is malformed: {str(exc).splitlines()[0]}") from exc


def _texts(path: Path, records: Sequence[dict[str, Any]], where: str) -> list[str]:
    """The ``text`` of every record: a string; a null or a number is an error naming the record (never the
    literal text "None")."""
    out = []
    for i, row in enumerate(records, start=1):
        text = row["text"]
        if not isinstance(text, str):
            raise CalibrationError(
                f"{path}: {where} {i} has a 'text' that is {type(text).__name__}, not a string"
            )
        out.append(text)
    return out


def _read_text_file(path: Path) -> list[str]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):  # .json.gz: C4's JSON-lines shards
        return _texts(path, read_jsonl(path, required=("text",)), "line")
    if name.endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        records = data if isinstance(data, list) else data.get("data") if isinstance(data, dict) else None
        if not isinstance(records, list):
            raise CalibrationError(f'{path}: a .json file must hold a list of records or {{"data": [...]}}')
        for i, row in enumerate(records, start=1):
            if not isinstance(row, dict) or "text" not in row:
                raise CalibrationError(f"{path}: record {i} has no 'text' field")
        return _texts(path, records, "record")
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - optional dependency
            raise CalibrationError("reading .parquet needs pyarrow: pip install 'oneshot[data]'") from exc
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise CalibrationError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
        return _texts(path, [{"text": t} for t in table.column("text").to_pylist()], "row")
    if name.endswith((".txt", ".raw", ".md")):
        return [path.read_text(encoding="utf-8")]
    raise CalibrationError(
        f"unsupported calibration file {path}: use .txt, .jsonl, .jsonl.gz, .json or .parquet"
    )


def _wikitext_rows(text: str) -> list[str]:
    """Hugging Face ``text`` rows of a raw WikiText file (blank lines become empty rows)."""
    return [(line + "\n") if line.strip() else "" for line in text.split("\n")[:-1]]


def load_text_source(source: str, data_dir: str | os.PathLike[str] | None = None) -> tuple[list[str], str]:
    """Documents of a calibration source and a description of where they came from.

    ``source``: c4 | wikitext2 | PATH | hf:DATASET_ID[:CONFIG[:SPLIT]].
    """
    source = str(source).strip()
    key = source.lower()
    if key in NAMED_SOURCES:
        spec = NAMED_SOURCES[key]
        looked: list[str] = []
        for base in data_dir_candidates(data_dir):
            for rel in spec["files"]:
                path = base / rel
                looked.append(str(path))
                if path.is_file():
                    docs = read_text_file(path)
                    if key == "wikitext2":
                        docs = _wikitext_rows(docs[0])
                        if "train" not in path.name:
                            logger.warning(
                                "wikitext2 calibration uses %s (no train split in the data directory)", path
                            )
                    return docs, str(path)
        repo, config, split, kwargs = spec["hub"]
        try:
            docs = _load_hub_dataset(repo, config, split, kwargs)
        except Exception as exc:
            raise CalibrationError(
                f"calibration source {source!r} not found: looked for {', '.join(looked)} "
                f"and on the Hub ({repo}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                f"Set --data-dir or ${DATA_DIR_ENV} to a folder with that layout"
            ) from exc
        return docs, f"hub:{repo}"
    if key.startswith("hf:"):
        parts = source[3:].split(":")
        repo = parts[0]
        config = parts[1] if len(parts) > 1 and parts[1] else None
        split = parts[2] if len(parts) > 2 and parts[2] else "train"
        if not repo:
            raise CalibrationError("hf: needs a dataset id, e.g. hf:allenai/c4")
        try:
            return _load_hub_dataset(repo, config, split, {}), f"hub:{repo}"
        except CalibrationError:
            raise
        except Exception as exc:
            raise CalibrationError(
                f"could not load dataset {repo!r} from the Hugging Face Hub (offline?): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
    path = Path(source).expanduser()
    if path.is_file():
        return read_text_file(path), str(path.resolve())
    if path.is_dir():
        raise CalibrationError(f"calibration path {source!r} is a folder; pass a .txt/.jsonl/.parquet file")
    raise CalibrationError(
        f"unknown calibration source {source!r}: use one of {', '.join(NAMED_SOURCES)}, self, "
        "a .txt/.jsonl/.jsonl.gz/.parquet file that exists, or hf:DATASET_ID"
    )


def _load_hub_dataset(repo: str, config: str | None, split: str, kwargs: dict[str, Any]) -> list[str]:
    try:
        import datasets
    except ImportError as exc:
        raise CalibrationError(
            "loading from the Hub needs the datasets package: pip install 'oneshot[data]'"
        ) from exc
    ds = datasets.load_dataset(repo, config, split=split, **kwargs)
    if "text" not in ds.column_names:
        raise CalibrationError(f"dataset {repo} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return [str(t) for t in ds["text"]]


def tokenize_corpus(docs: list[str], tokenizer: Any) -> torch.Tensor:
    """Join documents with a blank line and tokenize once -> (1, tokens) int64."""
    text = DOC_SEPARATOR.join(d for d in docs if d)
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    return ids.to(torch.long)


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from a (1, tokens) stream -> (nsamples, seqlen)."""
    total = ids.shape[-1]
    if total < seqlen:
        raise CalibrationError(
            f"calibration corpus has {total} tokens, shorter than one window of {seqlen}: "
            "lower --seqlen or use a larger source"
        )
    distinct = total // seqlen
    if nsamples > distinct:
        logger.warning(
            "calibration corpus has %d tokens, only %d non-overlapping windows of %d tokens, but %d windows "
            "were requested: the windows overlap and repeat text (use a larger source or fewer --nsamples)",
            total,
            distinct,
            seqlen,
            nsamples,
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=gen)
    flat = ids.reshape(-1)
    return torch.stack([flat[s : s + seqlen] for s in starts.tolist()])


@torch.no_grad()
def self_generated_windows(
    model: Any,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int,
    *,
    temperature: float = 1.0,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Data-free calibration: the model writes its own calibration text.

    Each sample starts from the BOS token (or a random vocabulary token when there is none) and is
    sampled with ``temperature`` under a seeded generator. Returns (nsamples, seqlen) int64.
    """
    from tqdm.auto import tqdm

    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    cache_arg = kv_cache_arg(model)
    bos = tokenizer.bos_token_id
    out = []
    for start in tqdm(range(0, nsamples, batch_size), desc="self-calibration", unit="batch", leave=False):
        b = min(batch_size, nsamples - start)
        if bos is not None:
            seq = torch.full((b, 1), int(bos), dtype=torch.long)
        else:
            seq = torch.randint(0, vocab, (b, 1), generator=gen)
        past = None
        step_input = seq
        for _ in range(seqlen - 1):
            res = model(input_ids=step_input.to(device), **{cache_arg: past}, use_cache=True)
            past = getattr(res, cache_arg)
            logits = res.logits[:, -1, :].float().cpu() / temperature
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            seq = torch.cat([seq, nxt], dim=1)
            step_input = nxt
        out.append(seq)
    return torch.cat(out)[:nsamples]


def calibration_windows(
    source: str,
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    seed: int,
    data_dir: str | os.PathLike[str] | None = None,
    model: Any = None,
    documents: tuple[list[str], str] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Calibration input ids (nsamples, seqlen) and a provenance dict for the run record.

    ``documents``: the ``load_text_source`` result when it was read earlier (to fail before loading a model).
    """
    if str(source).strip().lower() == "self":
        if model is None:
            raise CalibrationError("calib 'self' needs the model to generate text")
        ids = self_generated_windows(model, tokenizer, nsamples, seqlen, seed)
        return ids, {
            "source": "self",
            "origin": "generated by the model (temperature 1.0)",
            "tokens": ids.numel(),
        }
    docs, origin = documents if documents is not None else load_text_source(source, data_dir)
    chars = sum(len(d) for d in docs)
    logger.info("tokenizing the calibration corpus: %d documents, %s characters", len(docs), f"{chars:,}")
    stream = tokenize_corpus(docs, tokenizer)
    ids = sample_windows(stream, nsamples, seqlen, seed)
    return ids, {
        "source": source,
        "origin": origin,
        "documents": len(docs),
        "corpus_tokens": int(stream.shape[-1]),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
    }
