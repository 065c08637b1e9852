"""Quantized run folders: `oneshot prune --quantize` (joint SparseGPT, Wanda + GPTQ with the mask kept) and
`oneshot quantize` (a plain model, an earlier run folder): the record, the grid file, zeros kept exactly, the
checkpoint on its grid and loadable with plain transformers, the card and `oneshot push`'s checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from oneshot.cli import main
from oneshot.runfolder import QUANT_FILE, RunRecord, file_hashes, read_quant_file
from oneshot.solvers.quant import QuantScheme, recover_codes
from oneshot.verify import VerificationError, collect_files, verify_run_folder

SMALL = ["--calib", "{calib}", "--nsamples", "2", "--seqlen", "16", "--eval-windows", "1", "-q"]


def _prune_q(method: str) -> list[str]:
    return ["prune", "--model", "model", "--method", method, "--pattern", "2:4", "--quantize", "w4a16"]


def _run(argv: list[str], calib: Path, data_dir: Path) -> None:
    args = [a.format(calib=calib) for a in argv] + ["--data-dir", str(data_dir)]
    assert main(args) == 0


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _scheme(record: RunRecord) -> QuantScheme:
    q = record.quantized
    return QuantScheme(bits=q.bits, group_size=q.group_size, symmetric=q.symmetric, act_order=q.act_order)


def _assert_on_grid(folder: Path) -> RunRecord:
    """Every quantized matrix is exactly scale * (code - zero) of the grids file; the file is hashed."""
    record = RunRecord.load(folder)
    q = record.quantized
    assert record.files is not None and QUANT_FILE in record.files
    grids, facts = read_quant_file(folder)
    assert facts["bits"] == q.bits and facts["group_size"] == q.group_size
    weights = _weights(folder)
    assert sorted(grids) == sorted(layer.name for layer in q.layers)
    for name, g in grids.items():
        w = weights[f"{name}.weight"]
        codes, off = recover_codes(
            w, g["weight_scale"], g["weight_zero_point"], g["weight_g_idx"], _scheme(record)
        )
        assert off == 0, name
        assert codes.scales.shape == (w.shape[0], 1 if q.group_size is None else w.shape[1] // q.group_size)
    return record


@pytest.fixture()
def ws(tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_llama_dir, tmp_path / "model")
    return tmp_path


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_prune_and_quantize_keeps_the_pattern_and_the_grid(
    method: str, ws: Path, calib_txt: Path, data_dir: Path
) -> None:
    _run(
        [*_prune_q(method), "--group-size", "32", "--asym", "--out", "run", *SMALL],
        calib_txt,
        data_dir,
    )
    record = _assert_on_grid(ws / "run")
    q, (_, pr) = record.quantized, record.pruned
    assert (q.solver, q.bits, q.group_size, q.symmetric) == (
        "sparsegpt" if method == "sparsegpt" else "gptq",
        4,
        32,
        False,
    )
    # codes at 4 bits, a 16-bit scale and a 4-bit zero-point per 32 weights
    assert q.bits_per_weight == pytest.approx(4 + 16 / 32 + 4 / 32)
    assert q.packed_bytes * 8 == pytest.approx(q.bits_per_weight * q.quantized_params)
    assert q.checkpoint_bytes == (ws / "run" / "model.safetensors").stat().st_size
    assert all(layer.loss is not None and layer.loss >= 0 for layer in q.layers)
    weights = _weights(ws / "run")
    zeros = 0
    for layer in pr.layers:
        w = weights[f"{layer.name}.weight"]
        groups = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert bool((groups >= 2).all()), f"{layer.name}: a 2:4 group lost a zero to quantization"
        zeros += int((w == 0).sum())
    assert pr.zero_params == pr.pruned_params // 2  # the pruning's zeros
    assert zeros == pr.zero_params + q.rounded_to_zero  # plus those rounding made
    assert record.stored_zeros()[0] == zeros
    # plain transformers loads it; config.json carries no quantization_config
    from transformers import AutoModelForCausalLM

    config = json.loads((ws / "run" / "config.json").read_text())
    assert "quantization_config" not in config and "sparsity_config" not in config
    model = AutoModelForCausalLM.from_pretrained(ws / "run")
    name = pr.layers[0].name
    assert torch.equal(model.get_submodule(name).weight.detach(), weights[f"{name}.weight"])
    card = (ws / "run" / "README.md").read_text()
    assert "## Quantization" in card and "- quantized" in card and "bits_per_weight: 4.625" in card
    files, _ = collect_files(ws / "run")
    verify_run_folder(ws / "run", files)  # `oneshot push`'s checks pass


def test_quantize_a_pruned_run_keeps_its_zeros_and_its_record(
    ws: Path, calib_txt: Path, data_dir: Path
) -> None:
    _run(
        ["prune", "--model", "model", "--method", "wanda", "--pattern", "2:4", "--out", "pruned", *SMALL],
        calib_txt,
        data_dir,
    )
    _run(
        [
            "quantize",
            "pruned",
            "--scheme",
            "w4a16",
            "--group-size",
            "64",
            "--act-order",
            "--sink-weight",
            "0",
            "--out",
            "q",
            *SMALL,
        ],
        calib_txt,
        data_dir,
    )
    before, after = _weights(ws / "pruned"), _weights(ws / "q")
    source = RunRecord.load(ws / "pruned")
    record = _assert_on_grid(ws / "q")
    q = record.quantized
    assert record.kind == "prune" and record.pruned[0] == source.pruned[0]  # the pruning section is kept
    assert q.source_run == str((ws / "pruned").resolve()) and q.solver == "gptq" and q.act_order
    assert q.run is not None and q.run.model == "pruned" and q.command[:2] == ["oneshot", "quantize"]
    assert q.ppl_before is not None and q.ppl_after is not None
    for layer in source.pruned[1].layers:
        key = f"{layer.name}.weight"
        assert bool((after[key][before[key] == 0] == 0).all()), f"{layer.name}: a pruned weight came back"
    grids, _ = read_quant_file(ws / "q")
    wide = next(layer.name for layer in q.layers if layer.shape[1] == 128)
    g_idx = grids[wide]["weight_g_idx"]
    assert torch.bincount(g_idx.long()).tolist() == [64] * (g_idx.numel() // 64)
    assert not torch.equal(g_idx, torch.arange(g_idx.numel(), dtype=torch.int32) // 64)  # act-order
    files, _ = collect_files(ws / "q")
    verify_run_folder(ws / "q", files)
    # the card keeps the pruning's own sink weight (the default) beside the later quantization's (0)
    card = (ws / "q" / "README.md").read_text()
    pruning_row = card.index("| attention sink | each calibration window's first token counts 1 + 0.5")
    assert pruning_row < card.index("## Quantization") < card.index("| attention sink | off:")
    # the quantized run is not quantized again
    assert main(["quantize", "q", "--calib", str(calib_txt), "--group-size", "64", "--out", "qq"]) == 2
    assert not (ws / "qq").exists()


def test_quantize_a_plain_model_and_push_catches_weights_off_the_grid(
    ws: Path, calib_txt: Path, data_dir: Path
) -> None:
    _run(["quantize", "model", "--scheme", "w8a16", "--out", "q", *SMALL], calib_txt, data_dir)
    record = _assert_on_grid(ws / "q")
    q = record.quantized
    assert record.kind == "quantize" and record.config is None and record.prune is None
    assert q.group_size is None and q.bits_per_weight == pytest.approx(8 + 16 / 64, rel=0.2)
    assert q.blocks and all(b.output_error is not None for b in q.blocks)
    assert q.ppl_after is not None and record.quick_eval.pruned == q.ppl_after
    # its quick-check report is written like a prune run's, and `oneshot report` reads the run
    report = json.loads((ws / "q" / "report" / "report.json").read_text())
    (run,) = report["runs"]
    assert run["summary"]["method"] == "quantize (gptq)" and "w8a16" in run["summary"]["pattern"]
    assert len(run["blocks"]) == len(q.blocks)
    files, _ = collect_files(ws / "q")
    verify_run_folder(ws / "q", files)
    # a weight moved off its grid (and the hashes rewritten to hide it) is caught by the grid check
    tensors = _weights(ws / "q")
    key = f"{q.layers[0].name}.weight"
    tensors[key][0, 0] += 1e-3
    save_file(tensors, ws / "q" / "model.safetensors", metadata={"format": "pt"})
    record.files = file_hashes(ws / "q")
    record.save(ws / "q")
    with pytest.raises(VerificationError, match="not on the grid"):
        verify_run_folder(ws / "q", collect_files(ws / "q")[0])


def test_records_before_quantization_still_load(tmp_path: Path) -> None:
    record = {
        "format": "oneshot-run/3",
        "config": {"method": "wanda"},
        "run": {},
        "source": {"kind": "local"},
        "prune": {"layers": []},
    }
    (tmp_path / "oneshot.json").write_text(json.dumps(record))
    loaded = RunRecord.load(tmp_path)
    assert loaded.quantization is None and loaded.kind == "prune" and loaded.schema == 3


def test_prune_and_quantize_fused_moe_experts(tmp_path: Path, tiny_tokenizer: object) -> None:
    import transformers as tf

    from oneshot.config import PruneConfig, QuantConfig
    from oneshot.pruner import prune_and_quantize

    config = tf.MixtralConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = tf.MixtralForCausalLM(config).eval()
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    report, q = prune_and_quantize(
        model,
        ids,
        PruneConfig(method="wanda", pattern="2:4"),
        QuantConfig(group_size=32),
        device="cpu",
        progress=False,
    )
    experts = [name for name in q.weights if "[" in name]
    assert experts and len(q.weights) == len(report.layers)
    for layer in report.layers:  # every pruned matrix, expert slices included, is on its grid
        assert layer.name in q.weights


@pytest.mark.slow
def test_the_group_size_of_smollm2_is_checked_before_loading() -> None:
    from oneshot.checks import check_quantizable, model_skeleton
    from oneshot.config import ConfigError, QuantConfig
    from oneshot.models import ModelLoadError, load_model_config

    try:
        skeleton = model_skeleton(load_model_config(None))
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    assert skeleton is not None
    with pytest.raises(
        ConfigError, match=r"576 input columns, which is not a multiple of 128.*--group-size 64"
    ):
        check_quantizable(skeleton, QuantConfig("w4a16"))
    check_quantizable(skeleton, QuantConfig("w4a16", group_size=64))


def test_the_sink_weight_reaches_the_attention_input_statistics_and_the_record(
    ws: Path, calib_txt: Path, data_dir: Path
) -> None:
    """Default 0.5: block 0's q/k/v are solved on first-token-weighted statistics (they differ from a run
    with --sink-weight 0), its o/gate/up/down on the same statistics either way (identical weights)."""
    quantize = ["quantize", "model", "--scheme", "w4a16", "--group-size", "32", *SMALL]
    _run([*quantize, "--out", "sink"], calib_txt, data_dir)
    _run([*quantize, "--sink-weight", "0", "--out", "plain"], calib_txt, data_dir)
    assert RunRecord.load(ws / "sink").quantized.config.sink_weight == 0.5
    assert RunRecord.load(ws / "plain").quantized.config.sink_weight == 0.0
    sink, plain = _weights(ws / "sink"), _weights(ws / "plain")
    block0 = [k for k in sink if k.startswith("model.layers.0.") and k.endswith("proj.weight")]
    assert len(block0) == 7
    for key in block0:
        same = torch.equal(sink[key], plain[key])
        assert same == (key.split(".")[-2] not in ("q_proj", "k_proj", "v_proj")), key
    # --target dense pairs every token with the dense model's: the weighting is off and the record says so
    _run(
        [*_prune_q("sparsegpt")[:5], "--target", "dense", "--quantize", "w4a16", "--group-size", "32",
         *SMALL, "--out", "td"],
        calib_txt,
        data_dir,
    )  # fmt: skip
    assert RunRecord.load(ws / "td").quantized.config.sink_weight == 0.0


def test_records_before_the_sink_weight_load_with_it_off() -> None:
    from oneshot.config import QuantConfig
    from oneshot.runfolder import from_dict

    assert from_dict(QuantConfig, {"scheme": "w4a16", "group_size": 64}).sink_weight == 0.0
    assert QuantConfig().sink_weight == 0.5


def test_the_clip_default_and_records_before_it(ws: Path, calib_txt: Path, data_dir: Path) -> None:
    """`--clip mse` changes the grids and is recorded; the default and records written before the field are
    minmax (what they used)."""
    from oneshot.config import QuantConfig
    from oneshot.runfolder import from_dict

    assert from_dict(QuantConfig, {"scheme": "w4a16", "group_size": 64}).clip == "minmax"
    assert QuantConfig().clip == "minmax"
    quantize = ["quantize", "model", "--group-size", "32", *SMALL]
    _run([*quantize, "--clip", "mse", "--out", "mse"], calib_txt, data_dir)
    _run([*quantize, "--out", "minmax"], calib_txt, data_dir)
    searched, spanned = _assert_on_grid(ws / "mse"), _assert_on_grid(ws / "minmax")
    assert searched.quantized.config.clip == "mse" and spanned.quantized.config.clip == "minmax"
    assert "mse clipping" in searched.quantized.label and "mse" not in spanned.quantized.label
    (g_mse, _), (g_minmax, _) = read_quant_file(ws / "mse"), read_quant_file(ws / "minmax")
    name = searched.quantized.layers[0].name
    assert not torch.equal(g_mse[name]["weight_scale"], g_minmax[name]["weight_scale"])


def test_the_sink_weight_of_pruning_alone(ws: Path, calib_txt: Path, data_dir: Path) -> None:
    """`oneshot prune` (default 0.5, as quantization) solves block 0's q/k/v on weighted statistics and
    nothing else (``--sink-weight 0``: every token once); the record keeps it; magnitude pruning and the
    dense target resolve the default to 0; records written before the field load as 0; a pass that also
    quantizes takes one value."""
    from oneshot.config import ConfigError, PruneConfig, QuantConfig
    from oneshot.runfolder import from_dict

    prune = ["prune", "--model", "model", "--method", "sparsegpt", *SMALL]
    _run([*prune, "--out", "sink"], calib_txt, data_dir)
    _run([*prune, "--sink-weight", "0", "--out", "plain"], calib_txt, data_dir)
    assert RunRecord.load(ws / "sink").pruned[0].sink_weight == 0.5
    assert RunRecord.load(ws / "plain").pruned[0].sink_weight == 0.0
    sink, plain = _weights(ws / "sink"), _weights(ws / "plain")
    block0 = [k for k in sink if k.startswith("model.layers.0.") and k.endswith("proj.weight")]
    for key in block0:
        assert torch.equal(sink[key], plain[key]) == (
            key.split(".")[-2] not in ("q_proj", "k_proj", "v_proj")
        )
    assert PruneConfig().sink_weight == PruneConfig(method="wanda").sink_weight == 0.5
    assert PruneConfig(method="magnitude").sink_weight == PruneConfig(target="dense").sink_weight == 0.0
    assert from_dict(PruneConfig, {"method": "sparsegpt", "sparsity": 0.5}).sink_weight == 0.0
    QuantConfig(sink_weight=0.5).check_against(PruneConfig(sink_weight=0.5))
    with pytest.raises(ConfigError, match="one statistics pass serves both"):
        QuantConfig(sink_weight=0.5).check_against(PruneConfig(sink_weight=0.25))
    with pytest.raises(ConfigError, match="one statistics pass serves both"):  # 0 is a value too
        QuantConfig(sink_weight=0.5).check_against(PruneConfig(sink_weight=0.0))
    # pruning that reads no weighted statistics holds 0 and leaves the quantization its weight
    QuantConfig().check_against(PruneConfig(method="magnitude"))
    QuantConfig().check_against(PruneConfig(target="dense"))
