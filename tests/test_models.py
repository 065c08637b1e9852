"""Model sources: embedded default, .gguf files, local folders, Hub ids offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oneshot.models import ModelLoadError, default_model_path, load_model


def test_missing_and_malformed_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match=r"neither a folder nor a \.gguf"):
        load_model(str(tmp_path / "weights.bin"))


def test_hub_id_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot reach the Hugging Face Hub"):
        load_model("some-org/some-model-that-is-not-cached")


def test_local_folder(tiny_llama_dir: Path) -> None:
    loaded = load_model(str(tiny_llama_dir))
    assert loaded.source["kind"] == "local" and loaded.model.config.model_type == "llama"
    assert loaded.tokenizer.pad_token is not None


@pytest.mark.slow
def test_gguf_file_and_default_share_the_cached_conversion(smollm2, tmp_path: Path) -> None:
    gguf = default_model_path()
    assert smollm2.source["kind"] == "default" and smollm2.source["base_model"]
    again = load_model(str(gguf))
    assert again.source["kind"] == "gguf" and again.source["fingerprint"] == smollm2.source["fingerprint"]
    cfg = again.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert getattr(cfg, "quantization_config", None) is None
    again.model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
