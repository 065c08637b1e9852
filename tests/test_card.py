"""Model cards: written by `oneshot prune`, refreshed by `oneshot eval`, valid Hub metadata, honest body."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest

from oneshot.card import CARD_KEY, build_card, card_metadata, source_license, write_card
from oneshot.cli import main
from oneshot.config import PruneConfig, RunConfig
from oneshot.runfolder import EvalRecord, PruneReport, RunRecord, Source, from_dict


def _eval(data: dict[str, Any]) -> EvalRecord:
    return from_dict(EvalRecord, {k: v for k, v in data.items() if k != "format"})


BASE_README = "---\nlicense: mit\nlanguage: en\n---\n\n# tiny base model\n"


def make_run(base: Path, tiny_llama_dir: Path, calib_txt: Path, data_dir: Path) -> Path:
    """A pruned run folder of the tiny random Llama (SparseGPT 2:4, quick check on 2 windows, 2:4 export).

    The base folder gets a README whose front matter says ``license: mit``, as a downloaded model has.
    """
    model = base / "base-model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "README.md").write_text(BASE_README)
    out = base / "run"
    argv = ["prune", "--model", str(model), "--method", "sparsegpt", "--pattern", "2:4"]
    argv += ["--calib", str(calib_txt), "--nsamples", "4", "--seqlen", "32", "--eval-windows", "2"]
    argv += ["--data-dir", str(data_dir), "--export", "2:4", "--out", str(out), "-q"]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, calib_txt: Path, data_dir: Path
) -> Path:
    return make_run(tmp_path_factory.mktemp("card"), tiny_llama_dir, calib_txt, data_dir)


def _load(path: Path) -> Any:
    from huggingface_hub import ModelCard

    return ModelCard.load(path)  # parses the front matter, model-index included (raises when invalid)


def _results(card: Any) -> dict[tuple[str, str, str], Any]:
    return {(r.dataset_type, str(r.dataset_config), r.metric_type): r for r in card.data.eval_results or []}


def test_prune_writes_a_valid_card(run_dir: Path) -> None:
    record = json.loads((run_dir / "oneshot.json").read_text())
    text = (run_dir / "README.md").read_text()
    card = _load(run_dir / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"pruned", "sparse", "oneshot", "sparsegpt", "2of4-sparsity"} <= set(data["tags"])
    assert data["license"] == "mit"  # carried from the base folder's README
    assert "base_model" not in data  # a local folder of unknown origin
    facts = data[CARD_KEY]
    assert facts["sparsity"] == record["prune"]["sparsity"] and facts["pattern"] == "2:4"
    assert facts["pruned_layers"] == len(record["prune"]["layers"]) == 14

    # the quick check is the one measured result so far: it parses back from model-index unchanged
    quick = record["quick_eval"]["pruned"]
    (res,) = card.data.eval_results
    assert res.metric_type == "perplexity" and res.metric_value == quick["value"]
    assert res.dataset_type == "Salesforce/wikitext" and res.dataset_split == "test"
    assert res.dataset_args == {"windows": 2, "seqlen": 32, "tokens": quick["tokens"]}
    assert "quick check" in res.dataset_name

    # body: per-layer summary, quick check dense vs pruned, exact command, runtimes, export
    assert "| `self_attn.q_proj` | 2 | 8,192 | 0.5000 | 0.5000 | 0.5000 |" in text
    assert "`mlp.down_proj`" in text
    assert f"{record['quick_eval']['dense']['value']:.3f}" in text and "not the full protocol" in text
    assert shlex.join(record["command"]) in text
    assert "no speedup" in text and "CUDA GPUs" in text and "No mainstream serving engine" in text
    assert "compressed-2of4/" in text
    assert "No full evaluation yet" in text

    cfg = json.loads((run_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and "sparsity_config" not in cfg


def test_eval_refreshes_the_card(
    run_dir: Path, tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONESHOT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    argv = ["eval", str(run), "--ppl", "wikitext2,c4", "--seqlen", "32", "--ppl-windows", "2", "--limit", "2"]
    assert main([*argv, "--data-dir", str(data_dir), "-q"]) == 0
    ev = json.loads((run / "eval.json").read_text())
    card = _load(run / "README.md")
    results = _results(card)
    wiki = results[("Salesforce/wikitext", "wikitext-2-raw-v1", "perplexity")]
    c4 = results[("allenai/c4", "en", "perplexity")]
    assert (
        wiki.metric_value == ev["ppl"]["wikitext2"]["value"] and c4.metric_value == ev["ppl"]["c4"]["value"]
    )
    assert c4.dataset_args == {"windows": 2, "seqlen": 32, "tokens": 62} and c4.dataset_split == "validation"
    assert "--ppl-windows 2, not the full protocol" in c4.dataset_name
    assert (
        len(card.data.eval_results) == 2
    )  # eval.json measured wikitext2 again: the quick check is superseded
    text = (run / "README.md").read_text()
    assert "### Quick check" in text and "### `oneshot eval`" in text and "No full evaluation yet" not in text
    assert card.data.to_dict()["license"] == "mit"


def _eval_with_tasks() -> dict[str, Any]:
    task = {
        "acc": 0.30,
        "acc_stderr": 0.02,
        "acc_norm": 0.35,
        "acc_norm_stderr": 0.021,
        "n": 100,
        "limit": None,
    }
    dense = {
        "acc": 0.40,
        "acc_stderr": 0.02,
        "acc_norm": 0.42,
        "acc_norm_stderr": 0.02,
        "n": 100,
        "limit": None,
    }
    lambada = {"acc": 0.2, "acc_stderr": 0.01, "acc_norm": None, "perplexity": 55.5, "n": 100, "limit": None}
    return {
        "format": "oneshot-eval/1",
        "ppl": {
            "wikitext2": {"value": 20.5, "windows": 141, "seqlen": 2048, "tokens": 288640, "note": "full"}
        },
        "tasks": {
            "arc_easy": {
                **task,
                "source": "local:/data/tasks/arc/arc_easy_test.llmfoundry.jsonl",
                "num_fewshot": 0,
                "version": "1.0",
                "differences": "Every item has exactly 4 choices, where a few Hub items have 3 or 5. More.",
            },
            "lambada_openai": {**lambada, "source": "local"},
        },
        "baseline": {
            "ppl": {"wikitext2": {"value": 18.0, "windows": 141, "seqlen": 2048}},
            "tasks": {"arc_easy": dense, "lambada_openai": {**lambada, "acc": 0.3, "perplexity": 30.0}},
        },
        "longtail": {
            "factor": 2.0,
            "aggregate": {
                "name": "wikitext2",
                "ppl_dense": 18.0,
                "ppl_pruned": 20.5,
                "rel_degradation": 0.139,
            },
            "slices": [
                {
                    "name": "code",
                    "tokens": 4000,
                    "ppl_dense": 3.0,
                    "ppl_pruned": 4.5,
                    "rel_degradation": 0.5,
                    "ratio_to_aggregate": 3.6,
                    "flagged": True,
                },
                {
                    "name": "fra_Latn",
                    "tokens": 4000,
                    "ppl_dense": 9.0,
                    "ppl_pruned": 10.0,
                    "rel_degradation": 0.11,
                    "ratio_to_aggregate": 0.8,
                    "flagged": False,
                },
            ],
            "flagged": ["code"],
            "tasks": {"flagged": ["lambada_openai"]},
        },
        "config": {"limit": None},
    }


def test_tasks_and_longtail_in_metadata_and_body(run_dir: Path) -> None:
    from huggingface_hub import ModelCard

    record = RunRecord.load(run_dir)
    text = build_card(record, _eval(_eval_with_tasks()), license="mit")
    card = ModelCard(text)
    results = _results(card)
    arc_acc = results[("allenai/ai2_arc", "ARC-Easy", "acc")]
    assert arc_acc.metric_value == 0.30 and arc_acc.dataset_split == "test"
    assert arc_acc.dataset_args == {"num_fewshot": 0, "documents": 100}
    assert results[("allenai/ai2_arc", "ARC-Easy", "acc_norm")].metric_value == 0.35
    assert results[("EleutherAI/lambada_openai", "default", "perplexity")].metric_value == 55.5
    assert ("EleutherAI/lambada_openai", "default", "acc_norm") not in results  # None is not a result
    wiki = results[("Salesforce/wikitext", "wikitext-2-raw-v1", "perplexity")]
    assert wiki.metric_value == 20.5 and "(oneshot eval)" in wiki.dataset_name
    assert not any(r.metric_type.endswith("_stderr") for r in card.data.eval_results)
    # the metadata round-trips through huggingface_hub's own model-index conversion
    again = card_metadata(record, _eval(_eval_with_tasks()), license="mit")
    assert again.to_dict() == card.data.to_dict()
    # lm-eval's table: every metric, dense beside, the headline metric (*) averaged in the mean row
    assert "| arc_easy | 1.0 | 0 | 100 | - | acc | 0.4000 | 0.0200 | 0.3000 | 0.0200 | -0.1000 |" in text
    assert (
        "| arc_easy | 1.0 | 0 | 100 | - | acc_norm * | 0.4200 | 0.0200 | 0.3500 | 0.0210 | -0.0700 |" in text
    )
    assert "| lambada_openai | - | - | 100 | - | perplexity | 30.000 | - | 55.500 | - | +25.500 |" in text
    assert "| mean |  |  |  |  | * over 2 tasks | 0.3600 |  | 0.2750 |  | -0.0850 |" in text
    # the comparison (unpaired: these records have no per-document results) and the local copy's note
    assert "| arc_easy | acc_norm | 100 | 0.25 | 0.4200 | 0.3500 | -7.00 |" in text
    assert "two-proportion z (unpaired) | not significant |" in text
    assert "Local task copies" in text and "arc_easy: Every item has exactly 4 choices" in text
    assert "lambada_openai:" not in text.split("Local task copies", 1)[1].split("\n", 1)[0]
    # without a dense baseline the pruned scores still appear
    alone = _eval_with_tasks()
    alone.pop("baseline")
    alone_text = build_card(record, _eval(alone), license="mit")
    assert "| arc_easy | 1.0 | 0 | 100 | - | acc | 0.3000 | 0.0200 |" in alone_text
    assert "| mean |  |  |  |  | * over 2 tasks | 0.2750 |  |" in alone_text and "p (drop)" not in alone_text
    assert "Flagged slices: code. Flagged tasks: lambada_openai." in text
    assert "| code | 4000 | 3.000 | 4.500 | +50.00% | - | 3.60 | - |" in text and "fra_Latn" not in text
    assert "made before flags tested significance" in text  # an old record says its rule was the old one
    # a record with the significance test: NLL increase with its 95 % interval, the p-value, the rule
    ev = _eval_with_tasks()
    lt = ev["longtail"]
    lt["alpha"] = 0.05
    lt["aggregate"].update(delta_nll=0.13, delta_nll_se=0.01)
    lt["slices"][0].update(delta_nll=0.405, delta_nll_se=0.05, p_value=0.0001, status="flagged", blocks=125)
    text = build_card(record, _eval(ev), license="mit")
    assert "| code | 4000 | 3.000 | 4.500 | +50.00% | 0.4050 ± 0.0980 | 3.60 | 0.0001 |" in text
    assert "Holm-corrected over the slices at 0.05" in text and "0.1300 ± 0.0196 nats per token" in text


def test_default_model_metadata(run_dir: Path) -> None:
    record = RunRecord.load(run_dir)
    record.source = Source("default", "/x/SmolLM2-135M-Instruct.Q4_1.gguf")
    license = source_license(record.source)
    assert license == "apache-2.0"
    text = build_card(record, license=license)
    data = _load_text(text).data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and data["license"] == "apache-2.0"
    assert data["model-index"][0]["name"] == "SmolLM2-135M-Instruct-sparsegpt-2of4"
    assert "Q4_1 GGUF" in text
    record.source = Source("hub", "org/model", base_model="org/model")
    assert _load_text(build_card(record)).data.to_dict()["base_model"] == "org/model"
    assert source_license(Source("gguf", "/x/m.gguf")) is None
    record.config = record.config.replace(pattern="unstructured", sparsity=0.6, method="wanda")
    text = build_card(record)
    tags = _load_text(text).data.to_dict()["tags"]
    assert tags == ["pruned", "sparse", "oneshot", "wanda", "unstructured-sparsity"]
    # the settings say how the calibration tokens were weighted (the default weights the attention sink)
    assert "| attention sink | each calibration window's first token counts 1 + 0.5 x window length" in text
    record.config = record.config.replace(sink_weight=0.0)
    assert "| attention sink | off: every calibration token counts once |" in build_card(record)
    record.config = record.config.replace(method="magnitude")
    assert "attention sink" not in build_card(record)  # magnitude pruning reads no inputs
    # a minimal record (nothing pruned, nothing measured) still gives a valid card
    minimal = RunRecord(PruneConfig(), RunConfig(), Source("local", "/nowhere"), PruneReport())
    assert CARD_KEY in _load_text(build_card(minimal)).data.to_dict()


def _load_text(text: str) -> Any:
    from huggingface_hub import ModelCard

    return ModelCard(text)


def test_card_command_rewrites_and_keeps_the_license(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    original = (run / "README.md").read_text()
    (run / "README.md").unlink()
    assert main(["card", str(run)]) == 0
    assert (run / "README.md").read_text() == original  # deterministic
    # the base folder is gone: the license of the card being replaced is kept
    record = json.loads((run / "oneshot.json").read_text())
    record["source"]["path"] = str(tmp_path / "gone")
    (run / "oneshot.json").write_text(json.dumps(record))
    write_card(run)
    assert _load(run / "README.md").data.to_dict()["license"] == "mit"
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    capsys.readouterr()
    assert main(["card", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("oneshot: error: ") and "oneshot.json not found" in err[0]


def test_save_pruned_never_writes_a_sparsity_config(
    run_dir: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oneshot.jobs.prune import save_pruned

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.config.sparsity_config = {"format": "sparse-24-bitmask"}
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    record = RunRecord.load(run_dir)
    record.run = record.run.replace(export=None)
    record.export = None
    out = tmp_path / "saved"
    save_pruned(model, tok, out, record, overwrite=False, finish=[write_card])
    cfg = json.loads((out / "config.json").read_text())
    assert "sparsity_config" not in cfg and "quantization_config" not in cfg
    assert _load(out / "README.md").data.to_dict()[CARD_KEY]["sparsity"] == record.prune.sparsity
