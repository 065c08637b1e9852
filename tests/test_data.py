"""Calibration sources: named corpora offline, local files, windows, errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from oneshot.data import (
    CalibrationError,
    calibration_windows,
    load_text_source,
    read_text_file,
    sample_windows,
)


def test_sample_windows_seeded_and_in_range() -> None:
    stream = torch.arange(1000).reshape(1, -1)
    a = sample_windows(stream, 16, 64, seed=0)
    b = sample_windows(stream, 16, 64, seed=0)
    c = sample_windows(stream, 16, 64, seed=1)
    assert a.shape == (16, 64) and torch.equal(a, b) and not torch.equal(a, c)
    # every window is a contiguous slice of the stream
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(16, 63, dtype=a.dtype))
    assert int(a.max()) < 1000 and int(a.min()) >= 0
    assert sample_windows(stream, 3, 1000, seed=0).shape == (3, 1000)


def test_corpus_shorter_than_a_window() -> None:
    with pytest.raises(CalibrationError, match="shorter than one window"):
        sample_windows(torch.arange(10).reshape(1, -1), 2, 11, seed=0)


def test_local_files(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world")
    rows = [{"text": "one"}, {"text": "two"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2", "p3"]}), tmp_path / "d.parquet")
    assert read_text_file(tmp_path / "a.txt") == ["hello world"]
    assert read_text_file(tmp_path / "b.jsonl") == ["one", "two"]
    assert read_text_file(tmp_path / "c.jsonl.gz") == ["one", "two"]
    assert read_text_file(tmp_path / "d.parquet") == ["p1", "p2", "p3"]
    (tmp_path / "bad.jsonl").write_text('{"content": 1}\n')
    with pytest.raises(CalibrationError, match="no 'text' field"):
        read_text_file(tmp_path / "bad.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CalibrationError, match="unsupported"):
        read_text_file(tmp_path / "x.csv")


def test_named_sources_offline(data_dir: Path) -> None:
    docs, origin = load_text_source("c4", data_dir)
    assert len(docs) == 1000 and origin.endswith("first1000.jsonl.gz")
    assert docs[0].startswith("Beginners BBQ Class")
    docs, origin = load_text_source("wikitext2", data_dir)
    assert origin.endswith("wiki.valid.raw") and len(docs) == 3760


def test_missing_sources_say_where_they_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CalibrationError) as info:
        load_text_source("c4", tmp_path)
    assert str(tmp_path / "c4") in str(info.value)
    with pytest.raises(CalibrationError, match="unknown calibration source"):
        load_text_source(str(tmp_path / "nope.txt"), tmp_path)


def test_calibration_windows_with_tokenizer(tiny_tokenizer, calib_txt: Path) -> None:
    ids, info = calibration_windows(str(calib_txt), tiny_tokenizer, nsamples=4, seqlen=32, seed=0)
    assert ids.shape == (4, 32) and ids.dtype == torch.long
    assert info["corpus_tokens"] > 32 and info["origin"] == str(calib_txt.resolve())


def test_self_calibration_is_seeded(tiny_tokenizer) -> None:
    from transformers import LlamaForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer))).eval()
    a, info = calibration_windows("self", tiny_tokenizer, nsamples=3, seqlen=12, seed=5, model=model)
    b, _ = calibration_windows("self", tiny_tokenizer, nsamples=3, seqlen=12, seed=5, model=model)
    c, _ = calibration_windows("self", tiny_tokenizer, nsamples=3, seqlen=12, seed=6, model=model)
    assert a.shape == (3, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] == tiny_tokenizer.bos_token_id).all() and info["source"] == "self"
