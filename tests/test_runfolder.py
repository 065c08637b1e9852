"""The run-folder contract: typed records, schema versions, round trips, and what older versions wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oneshot.config import PruneConfig, RunConfig
from oneshot.runfolder import (
    RUN_SCHEMA,
    EvalRecord,
    LayerReport,
    PruneReport,
    RecordError,
    RunRecord,
    Source,
    from_dict,
    to_dict,
)

V1 = {  # oneshot.json as `oneshot prune` wrote it before the configs were split (schema 1)
    "format": "oneshot-run/1",
    "config": {
        "method": "wanda",
        "sparsity": 0.5,
        "pattern": "2:4",
        "calib": "c4",
        "nsamples": 16,
        "seqlen": 512,
        "seed": 3,
        "damp": 0.01,
        "block_size": 128,
        "ignore": ["lm_head"],
        "propagate": "pruned",
        "dtype": "float32",
        "device": "auto",
        "batch_size": 8,
        "layer_loss": True,
        "model": None,
        "data_dir": "/data",
        "extra": {},
    },
    "command": ["oneshot", "prune"],
    "source": {"kind": "default", "path": "/x.gguf", "fingerprint": "ab", "base_model": "org/m"},
    "prune": {
        "config": {"method": "wanda"},
        "layers": [
            {
                "name": "model.layers.0.mlp.up_proj",
                "shape": [8, 4],
                "sparsity": 0.5,
                "loss": None,
                "seconds": 0.1,
            }
        ],
        "blocks": [],
        "pruned_params": 32,
        "zero_params": 16,
        "sparsity": 0.5,
    },
    "quick_eval": {"dense": {"value": 20.0, "nll": 3.0, "windows": 2, "seqlen": 32, "tokens": 62}},
    "total_seconds": 1.0,
    "a_key_of_the_future": {"kept": True},
}


def test_a_schema_1_record_loads_split_into_the_two_configs(tmp_path: Path) -> None:
    (tmp_path / "oneshot.json").write_text(json.dumps(V1))
    record = RunRecord.load(tmp_path)
    assert record.schema == 1
    assert record.config == PruneConfig(
        method="wanda", pattern="2:4", ignore=("lm_head",), layer_loss=True, sink_weight=0.0
    )  # written before the sink weight: every token once
    assert record.run == RunConfig(calib="c4", nsamples=16, seqlen=512, seed=3, data_dir="/data")
    assert record.prune.layers == [LayerReport("model.layers.0.mlp.up_proj", (8, 4), 0.5, None, 0.1)]
    assert record.prune.sparsity == 0.5 and record.files is None and record.quick_eval.pruned is None
    assert record.extra == {"a_key_of_the_future": {"kept": True}}  # unknown keys survive a round trip
    # written back, it is the newest schema and loads to the same record
    record.save(tmp_path)
    again = RunRecord.load(tmp_path)
    assert json.loads((tmp_path / "oneshot.json").read_text())["format"] == f"oneshot-run/{RUN_SCHEMA}"
    assert again.schema == RUN_SCHEMA and again.config == record.config and again.run == record.run
    assert again.prune == record.prune and again.extra == record.extra


def test_records_refuse_what_they_cannot_read(tmp_path: Path) -> None:
    for text, message in (
        ('{"format": "oneshot-run/9"}', "newer than this oneshot reads"),
        ('{"format": "something/1"}', "expected oneshot-run/N"),
        ("[1, 2]", "is not a JSON object"),
        ("{oops", "is not valid JSON"),
        ('{"format": "oneshot-run/2", "config": {"method": "obs"}}', "does not hold a valid run record"),
    ):
        (tmp_path / "oneshot.json").write_text(text)
        with pytest.raises(RecordError, match=message):
            RunRecord.load(tmp_path)
    with pytest.raises(RecordError, match=r"oneshot\.json not found"):
        RunRecord.load(tmp_path / "nowhere")


def test_derived_figures_are_written_and_recomputed_not_trusted() -> None:
    report = PruneReport(pruned_params=10, zero_params=4, matrix_params=20, matrix_zero_params=4)
    data = to_dict(report)
    assert data["sparsity"] == 0.4 and data["block_sparsity"] == 0.2
    data["sparsity"] = 0.99  # a stale or edited figure in the file
    assert from_dict(PruneReport, data).sparsity == 0.4


def test_an_eval_record_round_trips(tmp_path: Path) -> None:
    record = from_dict(
        EvalRecord,
        {
            "model": "m",
            "ppl": {"wikitext2": {"value": 20.0, "windows": 2, "seqlen": 32, "nll": 3.0, "tokens": 62}},
            "tasks": {"piqa": {"acc": 0.6, "acc_stderr": 0.02, "acc_norm": None, "n": 50, "source": "local"}},
        },
    )
    assert record.tasks["piqa"].metrics == {"acc": 0.6} and record.tasks["piqa"].stderr("acc") == 0.02
    record.save(tmp_path / "eval.json")
    assert EvalRecord.load(tmp_path) == record
    assert (
        RunRecord(
            PruneConfig(), RunConfig(), Source("hub", "org/m", base_model="org/m"), PruneReport()
        ).base_model
        == "org/m"
    )
