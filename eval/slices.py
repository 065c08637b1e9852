"""The text slices of the long-tail report: which files each slice reads and how its texts are sampled.

This module owns the slice registry (`SLICES`, `available_slices`) and the reading of the slice files of
the data directory (layout of shared/data, SOURCES.md); it knows nothing about models or tokens.

- ``flores/<lang>`` (ne, si, km, ps) and ``flores/en`` (the aligned English sides of the same sampled
  sentences), ``tatoeba/<lang>`` for every Tatoeba language file and ``tatoeba/eng`` (aligned English),
  ``code/humaneval`` (prompt + canonical solution), ``math/gsm8k`` (question + answer, calculator
  annotations ``<<…>>`` removed) and ``math/competition`` (MATH problem + worked solution).

Sampling is deterministic for a seed: each slice shuffles its sentences / documents with
``random.Random(f"{seed}/{source}")`` and keeps up to ``limit`` of them; sentences are joined with a
newline, documents with a blank line. A missing data file raises `EvalDataError` naming the expected path.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oneshot.data import DataFileError, data_dir_candidates, read_jsonl
from oneshot.eval.corpora import EvalDataError, find_data_file

__all__ = [
    "FLORES_LANGS",
    "SLICES",
    "TATOEBA_LANGS",
    "Builder",
    "SliceText",
    "available_slices",
    "slice_texts",
]

FLORES_DIR = "multilingual/flores_v1"
TATOEBA_DIR = "multilingual/tatoeba"
FLORES_LANGS = ("ne", "si", "km", "ps")
TATOEBA_LANGS = (
    "amh", "ara", "cmn", "deu", "fin", "fra", "heb", "hin", "jpn", "kat", "kaz",
    "kor", "mon", "pol", "rus", "spa", "swh", "tel", "tur", "vie", "xho",
)  # fmt: skip
HUMANEVAL = "code/HumanEval.jsonl.gz"
GSM8K = "math/gsm8k_test.jsonl"
MATH = "math/hendrycks_math_test.llmfoundry.jsonl.gz"


@dataclass
class SliceText:
    """The sampled texts of one slice, in the order they are joined."""

    texts: list[str]
    joiner: str  # "\n" between sentences, "\n\n" between documents
    group: str  # language | code | math
    source: str  # relative path(s) in the data directory
    control: list[str] | None = None  # language slices: the aligned English side of ``texts``, same order
    control_source: str | None = None


Builder = Callable[[Path | None, int, int | None], SliceText]
"""A slice's texts from (data_dir, seed, limit); raises `EvalDataError` when its data file is missing."""


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")


def _sample(n: int, key: str, seed: int, limit: int | None) -> list[int]:
    """Indices 0..n-1 shuffled by a generator seeded with ``f"{seed}/{key}"``, at most ``limit``."""
    rng = random.Random(f"{seed}/{key}")
    k = n if limit is None else min(n, max(0, limit))
    return rng.sample(range(n), k)


def _aligned(src: list[str], tgt: list[str], what: str) -> None:
    if len(src) != len(tgt):
        raise EvalDataError(f"{what}: the two sides are not line-aligned ({len(src)} vs {len(tgt)} lines)")


def _pair(
    key: str, rel_x: str, rel_en: str, data_dir: Path | None, seed: int, limit: int | None
) -> tuple[list[str], list[str]]:
    """The sampled sentences of one parallel pair: (foreign side, English side), aligned line for line."""
    x, en = _lines(find_data_file(rel_x, data_dir)), _lines(find_data_file(rel_en, data_dir))
    _aligned(x, en, rel_x)
    keep = [i for i in _sample(len(x), key, seed, None) if x[i].strip() and en[i].strip()]
    keep = keep if limit is None else keep[:limit]
    return [x[i].strip() for i in keep], [en[i].strip() for i in keep]


def _parallel(
    pairs: list[tuple[str, str, str]], data_dir: Path | None, seed: int, limit: int | None
) -> tuple[list[str], list[str]]:
    """The English sides of every pair found (``pairs``: (key, foreign rel path, English rel path)),
    interleaved, with the paths read."""
    per_pair: list[list[str]] = []
    sources: list[str] = []
    missing: list[str] = []
    for key, rel_x, rel_en in pairs:
        try:
            per_pair.append(_pair(key, rel_x, rel_en, data_dir, seed, limit)[1])
        except EvalDataError as exc:
            missing.append(str(exc))
            continue
        sources.append(rel_en)
    if not per_pair:  # every pair is missing: name the first, count the others
        more = f" (and the other {len(missing) - 1} language pairs alike)" if len(missing) > 1 else ""
        raise EvalDataError((missing[0] if missing else "no parallel files") + more)
    # interleave the pairs so that a token budget takes a fair share of each
    out = [s for group in _interleave(per_pair) for s in group]
    return (out if limit is None else out[:limit]), sources


def _language(key: str, rel_x: str, rel_en: str) -> Builder:
    """A language slice: the sampled foreign sentences, with their English sides as the control."""

    def build(data_dir: Path | None, seed: int, limit: int | None) -> SliceText:
        texts, english = _pair(key, rel_x, rel_en, data_dir, seed, limit)
        return SliceText(texts, "\n", "language", rel_x, control=english, control_source=rel_en)

    return build


def _interleave(lists: list[list[str]]) -> list[list[str]]:
    longest = max(len(x) for x in lists)
    return [[x[i] for x in lists if i < len(x)] for i in range(longest)]


def _flores_pair(lang: str) -> tuple[str, str, str]:
    rel = f"{FLORES_DIR}/wikipedia.devtest.{lang}-en"
    return f"flores/{lang}", f"{rel}.{lang}", f"{rel}.en"


def _flores(lang: str) -> Builder:
    return _language(*_flores_pair(lang))


def _flores_en(data_dir: Path | None, seed: int, limit: int | None) -> SliceText:
    texts, src = _parallel([_flores_pair(lang) for lang in FLORES_LANGS], data_dir, seed, limit)
    return SliceText(texts, "\n", "language", ", ".join(src))


def _tatoeba_pair(lang: str) -> tuple[str, str, str]:
    return (
        f"tatoeba/{lang}",
        f"{TATOEBA_DIR}/tatoeba.{lang}-eng.{lang}",
        f"{TATOEBA_DIR}/tatoeba.{lang}-eng.eng",
    )


def _tatoeba(lang: str) -> Builder:
    return _language(*_tatoeba_pair(lang))


def _tatoeba_langs(data_dir: Path | None) -> list[str]:
    """Known Tatoeba languages plus any other ``tatoeba.xxx-eng.xxx`` file in the data directory."""
    langs = set(TATOEBA_LANGS)
    for base in data_dir_candidates(data_dir):
        folder = base / TATOEBA_DIR
        if folder.is_dir():
            for path in folder.glob("tatoeba.*-eng.*"):
                m = re.fullmatch(r"tatoeba\.([a-z]+)-eng\.([a-z]+)", path.name)
                if m and m.group(1) == m.group(2) and m.group(1) != "eng":
                    langs.add(m.group(1))
            break
    return sorted(langs)


def _tatoeba_en(data_dir: Path | None, seed: int, limit: int | None) -> SliceText:
    pairs = [_tatoeba_pair(lang) for lang in _tatoeba_langs(data_dir)]
    texts, src = _parallel(pairs, data_dir, seed, limit)
    return SliceText(texts, "\n", "language", f"{TATOEBA_DIR}/tatoeba.*-eng.eng ({len(src)} files)")


def _docs(rel: str, key: str, make: Callable[[dict[str, Any]], str], group: str) -> Builder:
    def build(data_dir: Path | None, seed: int, limit: int | None) -> SliceText:
        path = find_data_file(rel, data_dir)
        try:
            rows = [make(r) for r in read_jsonl(path)]
        except DataFileError as exc:  # skipped like a missing file, with the file and line
            raise EvalDataError(str(exc)) from exc
        except (KeyError, TypeError) as exc:
            raise EvalDataError(f"{path}: unexpected record layout ({type(exc).__name__}: {exc})") from exc
        rows = [r for r in rows if r.strip()]
        return SliceText([rows[i] for i in _sample(len(rows), key, seed, limit)], "\n\n", group, rel)

    return build


def _humaneval(r: dict[str, Any]) -> str:
    return str(r["prompt"]) + str(r["canonical_solution"])


def _gsm8k(r: dict[str, Any]) -> str:
    answer = re.sub(r"<<[^>]*>>", "", str(r["answer"]))  # calculator annotations
    return f"{r['question']}\n{answer}"


def _math(r: dict[str, Any]) -> str:
    solution = r.get("chain_of_thought") or r["answer"]
    return f"{r['context']}\n{solution}"


SLICES: dict[str, Builder] = {
    **{f"flores/{lang}": _flores(lang) for lang in FLORES_LANGS},
    "flores/en": _flores_en,
    **{f"tatoeba/{lang}": _tatoeba(lang) for lang in TATOEBA_LANGS},
    "tatoeba/eng": _tatoeba_en,
    "code/humaneval": _docs(HUMANEVAL, "code/humaneval", _humaneval, "code"),
    "math/gsm8k": _docs(GSM8K, "math/gsm8k", _gsm8k, "math"),
    "math/competition": _docs(MATH, "math/competition", _math, "math"),
}
"""Text slices: name -> builder(data_dir, seed, limit). The frequency buckets are computed separately."""


def available_slices(data_dir: str | os.PathLike[str] | None = None) -> dict[str, Builder]:
    """`SLICES` plus a ``tatoeba/<lang>`` slice for every other Tatoeba language file in the data dir."""
    out = dict(SLICES)
    base = Path(data_dir) if data_dir is not None else None
    for lang in _tatoeba_langs(base):
        out.setdefault(f"tatoeba/{lang}", _tatoeba(lang))
    return out


def slice_texts(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, seed: int = 0, limit: int | None = None
) -> SliceText:
    """The sampled texts of one slice (raises `EvalDataError` when its data file is missing)."""
    registry = available_slices(data_dir)
    if name not in registry:
        raise ValueError(f"unknown long-tail slice {name!r}: choose from {', '.join(sorted(registry))}")
    return registry[name](Path(data_dir) if data_dir is not None else None, seed, limit)
