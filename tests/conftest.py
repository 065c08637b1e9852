"""Shared fixtures: the data directory, a tiny trained tokenizer, tiny random models, the real SmolLM2.

Also the run conditions of the kernel markers (pyproject.toml lists them; scripts/test.sh runs each set in
its own pytest process):

* ``interpreter``: Triton kernels on the CPU interpreter. Triton reads ``TRITON_INTERPRET`` when it is first
  imported, so the variable has to be in the environment of the whole process (``TRITON_INTERPRET=1 pytest
  -m interpreter``); without it these tests are skipped. No test sets it.
* ``cuda``: compiled Triton kernels on a GPU (``pytest -m cuda``); skipped without CUDA or triton, and while
  ``TRITON_INTERPRET`` is on.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from oneshot.kernels import interpreting

    interpret = interpreting()
    # find_spec, not import: triton reads TRITON_INTERPRET once, when first imported.
    has_triton = importlib.util.find_spec("triton") is not None
    skip_interpreter = skip_cuda = None
    if not has_triton:
        skip_interpreter = skip_cuda = pytest.mark.skip(reason="triton is not installed")
    if not interpret:
        skip_interpreter = pytest.mark.skip(
            reason="needs TRITON_INTERPRET=1 in the environment: TRITON_INTERPRET=1 pytest -m interpreter"
        )
    if interpret:
        skip_cuda = pytest.mark.skip(reason="compiled kernels: `pytest -m cuda` with TRITON_INTERPRET unset")
    elif not torch.cuda.is_available():
        skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if skip_interpreter is not None and item.get_closest_marker("interpreter") is not None:
            item.add_marker(skip_interpreter)
        if skip_cuda is not None and item.get_closest_marker("cuda") is not None:
            item.add_marker(skip_cuda)


TEXT = (
    "The quick brown fox jumps over the lazy dog. Pruning removes weights from a network; "
    "calibration data decides which ones matter. SparseGPT solves a reconstruction problem per layer, "
    "while Wanda scores each weight by its magnitude times the norm of its input. "
) * 40


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("ONESHOT_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (path / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip(f"data directory {path} not available")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A byte-level BPE tokenizer (vocab 300) trained offline on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    return fast


def tiny_llama_config(vocab_size: int = 300, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A saved tiny random Llama with the tiny tokenizer: a local model folder."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer)))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def calib_txt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded default model (dequantized GGUF), loaded once."""
    from oneshot.models import ModelLoadError, load_model

    try:
        return load_model(None)
    except ModelLoadError as exc:
        pytest.skip(str(exc))


def prune_args(model: Path, calib: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    """`oneshot prune` on a tiny model: 6 windows of 32 tokens in batches of 2, no quick check, quiet."""
    return [
        "prune",
        "--model",
        str(model),
        "--calib",
        str(calib),
        "--nsamples",
        "6",
        "--seqlen",
        "32",
        "--batch-size",
        "2",
        "--eval-windows",
        "0",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "-q",
        *extra,
    ]
