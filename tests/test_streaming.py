"""Streaming from disk (#15 item 1, ``--offload disk``): the blocks are read from the checkpoint one at a time
and written to the output as they finish; the output is byte for byte that of the same run in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

import oneshot.streaming as streaming
from oneshot.cli import main
from oneshot.output import RESUME_DIR
from oneshot.resume import BlockCheckpoint
from oneshot.runfolder import RUN_FILE
from oneshot.streaming import ShardWriter, StreamedModel, StreamError, saved_state
from tests.conftest import prune_args, tiny_llama_config

LAYERS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A tiny random Llama with 4 blocks and untied embeddings, saved in 3 shards (streamed from the index)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        tiny_llama_config(len(tiny_tokenizer), num_hidden_layers=LAYERS, tie_word_embeddings=False)
    )
    path = tmp_path_factory.mktemp("tiny-llama-sharded")
    model.save_pretrained(path, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file()
    return path


def _files(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder but the record, the card and the report (times, the offload choice)."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        and p.name not in (RUN_FILE, "README.md")
        and p.relative_to(folder).parts[0] != "report"
    }


def _assert_same_files(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name == "quantization.safetensors":  # safetensors orders a header of 2+ metadata keys at random
            _assert_same_tensors(a / name, b / name)
        else:
            assert fa[name] == fb[name], f"{name} differs"


def _assert_same_tensors(a: Path, b: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert fa.metadata() == fb.metadata()
        assert sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():  # noqa: SIM118 - safe_open is not a dict
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), k


def test_header_matches_safetensors_for_mixed_dtypes(tmp_path: Path) -> None:
    """The writer's file equals safetensors' own for tensors of several dtypes (its dtype order, padding)."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "z.weight": torch.randn(5, 3, generator=gen),
        "a.half": torch.randn(7, generator=gen).half(),
        "m.bf16": torch.randn(2, 3, generator=gen).bfloat16(),
        "b.ids": torch.arange(9, dtype=torch.int64),
        "c.i32": torch.arange(4, dtype=torch.int32),
        "d.u8": torch.arange(3, dtype=torch.uint8),
        "e.flag": torch.tensor([True, False]),
        "f.f64": torch.randn(2, generator=gen, dtype=torch.float64),
    }
    writer = ShardWriter(tmp_path, {k: v.to("meta") for k, v in tensors.items()})
    for name in reversed(list(tensors)):  # any order
        writer.write({name: tensors[name]})
    writer.finish()
    assert (tmp_path / "model.safetensors").read_bytes() == save(tensors, metadata={"format": "pt"})


def test_unwritten_or_wrong_tensors_are_refused(tmp_path: Path) -> None:
    writer = ShardWriter(
        tmp_path, {"a": torch.empty(2, 3, device="meta"), "b": torch.empty(4, device="meta")}
    )
    with pytest.raises(StreamError, match="is due"):
        writer.write({"a": torch.zeros(3, 2)})
    with pytest.raises(StreamError, match="not a tensor"):
        writer.write({"c": torch.zeros(1)})
    writer.write({"a": torch.zeros(2, 3)})
    with pytest.raises(StreamError, match=r"never written, e\.g\. b"):
        writer.finish()


def test_streamed_model_holds_one_block_and_writes_what_save_pretrained_writes(
    tmp_path: Path, model_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = tmp_path / "reference"
    full.save_pretrained(reference, max_shard_size="100KB")

    stream = StreamedModel(model_dir, full.config.__class__.from_pretrained(model_dir), torch.float32)
    materialised = lambda: [i for i, b in enumerate(stream.blocks) if not next(b.parameters()).is_meta]  # noqa: E731
    assert materialised() == []
    assert not stream.model.lm_head.weight.is_meta and not stream.model.model.embed_tokens.weight.is_meta
    out = tmp_path / "streamed"
    out.mkdir()
    stream.writer = ShardWriter(out, saved_state(stream.model), max_shard_size="100KB")
    stream.writer.write(
        {n: t for n, t in saved_state(stream.model).items() if not n.startswith("model.layers.")}
    )
    for i in reversed(range(LAYERS)):  # any order
        block = stream.load_block(i)
        assert materialised() == [i]
        for name, t in block.state_dict().items():
            assert torch.equal(t, full.model.layers[i].state_dict()[name])
        stream.store_block(i)
        assert materialised() == []
    stream.finish_output()
    _assert_same_files(reference, out)
    assert json.loads((out / "model.safetensors.index.json").read_text())["metadata"]["total_parameters"] > 0


@pytest.mark.parametrize(
    "options",
    [
        ["--method", "sparsegpt"],
        ["--method", "wanda", "--pattern", "2:4", "--dtype", "bfloat16"],
        ["--method", "sparsegpt", "--target", "dense"],
        ["--method", "sparsegpt", "--pattern", "2:4", "--quantize", "w4a16", "--group-size", "32"],
    ],
)
def test_streamed_run_writes_the_bytes_of_the_run_in_memory(
    tmp_path: Path,
    model_dir: Path,
    calib_txt: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    options: list[str],
) -> None:
    ref, out = tmp_path / "in-memory", tmp_path / "streamed"
    assert main(prune_args(model_dir, calib_txt, data_dir, ref, *options, "--offload", "none")) == 0
    loads: list[int] = []
    real = StreamedModel.load_block

    def load_block(self: StreamedModel, index: int) -> torch.nn.Module:
        others = [i for i, b in enumerate(self.blocks) if not next(b.parameters()).is_meta]
        assert others == [], f"blocks {others} are still in memory when block {index} is read"
        loads.append(index)
        return real(self, index)

    monkeypatch.setattr(StreamedModel, "load_block", load_block)
    code = main(prune_args(model_dir, calib_txt, data_dir, out, *options, "--offload", "disk"))
    assert code == 0, capsys.readouterr().err
    assert loads == list(range(LAYERS))
    _assert_same_files(ref, out)
    assert json.loads((out / RUN_FILE).read_text())["prune"]["streamed"] is True
    assert json.loads((ref / RUN_FILE).read_text())["prune"]["streamed"] is False


def test_streamed_run_resumes_to_the_same_bytes(
    tmp_path: Path,
    model_dir: Path,
    calib_txt: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref, out = tmp_path / "reference", tmp_path / "pruned"
    assert main(prune_args(model_dir, calib_txt, data_dir, ref, "--offload", "none")) == 0
    real = BlockCheckpoint.save

    def save_then_stop(self: BlockCheckpoint, index: int, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        real(self, index, *args, **kwargs)
        if index == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(BlockCheckpoint, "save", save_then_stop)
        assert main(prune_args(model_dir, calib_txt, data_dir, out, "--offload", "disk")) == 130
    capsys.readouterr()
    assert main(prune_args(model_dir, calib_txt, data_dir, out, "--offload", "disk", "--resume")) == 0
    _assert_same_files(ref, out)
    assert not (out / RESUME_DIR).exists()


def test_auto_streams_when_the_weights_exceed_the_share_of_ram(
    tmp_path: Path,
    model_dir: Path,
    calib_txt: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(streaming, "available_ram", lambda: 1000)  # bytes: far below the tiny model
    out = tmp_path / "auto"
    assert main(prune_args(model_dir, calib_txt, data_dir, out)) == 0
    assert json.loads((out / RUN_FILE).read_text())["prune"]["streamed"] is True
    # an option that needs the whole model is then one clear line, nothing written
    code = main(
        prune_args(model_dir, calib_txt, data_dir, tmp_path / "export", "--pattern", "2:4", "--export", "2:4")
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--export 2:4 needs the whole model" in err and "--offload none" in err
    assert not (tmp_path / "export").exists()


def _foreign_names(tmp_path: Path, model_dir: Path) -> Path:
    """The model folder with its tensors under other names (a checkpoint that needs conversion on load)."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "renamed"
    shutil.copytree(model_dir, folder)
    for f in folder.glob("*.safetensors"):
        save_file({f"transformer.{k}": v for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {f"transformer.{k}": v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize(
    ("case", "extra", "message"),
    [
        (
            "export",
            ["--pattern", "2:4", "--export", "2:4"],
            "--offload disk cannot be combined with --export 2:4",
        ),
        ("self", ["--calib", "self"], "--calib self"),
        ("owl", ["--allocation", "owl"], "--allocation owl"),
        ("hub", ["--model", "someone/some-model"], "cannot stream 'someone/some-model' from the Hub"),
        ("names", [], "needs weight conversion on load"),
        ("share", ["--offload-share", "1.5"], "--offload-share must be in (0, 1]"),
        ("mode", ["--offload", "ram"], "unknown --offload 'ram'"),
    ],
)
def test_what_cannot_stream_is_one_clear_line(
    tmp_path: Path,
    model_dir: Path,
    calib_txt: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    extra: list[str],
    message: str,
) -> None:
    if case == "hub":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr("oneshot.jobs.prune.load_model_config", lambda spec: None)
        monkeypatch.setattr(
            "oneshot.jobs.prune.plan_offload", lambda *a, **k: streaming.OffloadPlan(True, "test")
        )
        monkeypatch.setattr("oneshot.jobs.prune.check_prunable", lambda config, spec: (None, True))
    model = _foreign_names(tmp_path, model_dir) if case == "names" else model_dir
    out = tmp_path / "out"
    args = prune_args(model, calib_txt, data_dir, out, "--offload", "disk")
    if "--model" in extra:
        args[args.index("--model") + 1] = extra[extra.index("--model") + 1]
        extra = []
    code = main([*args, *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_jobs_that_cannot_stream_refuse_disk(
    tmp_path: Path, model_dir: Path, calib_txt: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shrunk"
    args = prune_args(model_dir, calib_txt, data_dir, out, "--offload", "disk", "--intermediate-size", "64")
    args[0] = "shrink"
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "--offload disk is not supported by this job" in err, err
    assert not out.exists()


def test_quantize_streams_to_the_bytes_of_the_run_in_memory(
    tmp_path: Path, model_dir: Path, calib_txt: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outs = {}
    for offload in ("none", "disk"):
        args = prune_args(model_dir, calib_txt, data_dir, tmp_path / offload, "--offload", offload)
        args[0] = "quantize"
        args[1:1] = [str(args.pop(args.index("--model") + 1))]  # the model is positional
        args.remove("--model")
        args += ["--scheme", "w4a16", "--group-size", "32"]
        assert main(args) == 0, capsys.readouterr().err
        outs[offload] = tmp_path / offload
    _assert_same_files(outs["none"], outs["disk"])


def _rewrite_shard(folder: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Rewrite the first shard of a copied model folder through ``change(tensors) -> tensors``."""
    import struct

    shard = sorted(folder.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header = change(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_a_corrupt_shard_is_one_line_before_any_block(
    tmp_path: Path, model_dir: Path, calib_txt: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)

    def shorten(header):  # type: ignore[no-untyped-def]
        name = next(k for k in header if k != "__metadata__")
        lo, hi = header[name]["data_offsets"]
        header[name]["data_offsets"] = [lo, hi - 4]
        return header

    _rewrite_shard(broken, shorten)
    for offload in ("none", "disk"):
        out = tmp_path / f"out-{offload}"
        code = main(prune_args(broken, calib_txt, data_dir, out, "--offload", offload))
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "corrupt or truncated" in err and "need another size" in err, err
        assert not out.exists()


def test_tensors_from_pretrained_ignores_do_not_stop_streaming(
    tmp_path: Path, model_dir: Path, calib_txt: Path, data_dir: Path
) -> None:
    """Checkpoints from before transformers 4.31 carry a rotary_emb.inv_freq per layer, which loading drops."""
    import shutil

    old = tmp_path / "old-layout"
    shutil.copytree(model_dir, old)
    shard = sorted(old.glob("*.safetensors"))[0]
    from safetensors.torch import load_file, save_file

    tensors = load_file(shard)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = old / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["model.layers.0.self_attn.rotary_emb.inv_freq"] = shard.name
    index.write_text(json.dumps(data))
    ref, out = tmp_path / "ref", tmp_path / "streamed"
    assert main(prune_args(old, calib_txt, data_dir, ref, "--offload", "none")) == 0
    assert main(prune_args(old, calib_txt, data_dir, out, "--offload", "disk")) == 0
    _assert_same_files(ref, out)


def test_the_quick_check_is_measured_block_by_block_as_in_memory(
    tmp_path: Path, model_dir: Path, calib_txt: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Streamed, the quick perplexity runs the windows through one block at a time (the source's blocks
    before pruning, the output's after): the same numbers as the whole model in memory."""
    quick = {}
    for offload in ("none", "disk"):
        args = prune_args(model_dir, calib_txt, data_dir, tmp_path / offload, "--offload", offload)
        args[args.index("--eval-windows") + 1] = "3"
        assert main([*args, "--eval-seqlen", "24"]) == 0, capsys.readouterr().err
        quick[offload] = json.loads((tmp_path / offload / RUN_FILE).read_text())["quick_eval"]
    for when in ("dense", "pruned"):
        a, b = quick["none"][when], quick["disk"][when]
        assert a["windows"] == b["windows"] == 3 and a["seqlen"] == b["seqlen"] == 24
        assert b["value"] == pytest.approx(a["value"], rel=1e-6), when
    assert quick["disk"]["pruned"]["value"] != pytest.approx(quick["disk"]["dense"]["value"], rel=1e-3)
