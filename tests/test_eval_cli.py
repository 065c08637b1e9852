"""`oneshot eval`: bad input (one line, exit 2), a run folder end to end, and the dense-baseline cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from oneshot.cli import main
from oneshot.config import PruneConfig, RunConfig
from oneshot.eval.evaluate import EVAL_FILE, EvalConfig, evaluate
from oneshot.runfolder import PruneReport, RunRecord, Source


@pytest.fixture()
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("ONESHOT_CACHE", str(path))
    return path


def _run_dir(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    RunRecord(PruneConfig(), RunConfig(model=str(src)), Source("local", str(src)), PruneReport()).save(dest)
    return dest


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("oneshot: error: ")
    return err[0]


def test_bad_inputs(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(tiny_llama_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = _error(capsys, ["eval", model, "--ppl", "ptb"])
    assert "unknown perplexity dataset 'ptb'" in msg and "wikitext2, c4" in msg
    msg = _error(capsys, ["eval", model, "--data-dir", str(empty)])
    assert f"expected wikitext-2-raw/wiki.test.raw in the data directory (looked at {empty}" in msg
    msg = _error(capsys, ["eval", model, "--ppl", "none", "--tasks", "piqa", "--data-dir", str(empty)])
    assert "expected tasks/piqa/valid.jsonl" in msg and str(empty) in msg
    msg = _error(capsys, ["eval", str(empty)])
    assert "not a run folder: oneshot.json is missing" in msg
    half = tmp_path / "half"
    half.mkdir()
    (half / "oneshot.json").write_text("{}")
    msg = _error(capsys, ["eval", str(half)])
    assert "has oneshot.json but no checkpoint" in msg and "config.json" in msg
    msg = _error(capsys, ["eval", model, "--limit", "0"])
    assert "--limit must be >= 1" in msg
    msg = _error(capsys, ["eval", model, "--ppl-windows", "0"])
    assert "--ppl-windows must be >= 1" in msg
    msg = _error(capsys, ["eval", model, "--longtail", "--longtail-tokens", "1"])
    assert "--longtail-tokens must be >= 2" in msg
    msg = _error(capsys, ["eval", model, "--ppl", "none"])
    assert "nothing to evaluate" in msg
    msg = _error(capsys, ["eval", str(tmp_path / "nope" / "model")])
    assert "does not exist" in msg
    msg = _error(capsys, ["eval", model, "--longtail"])
    assert "--longtail compares with the dense model: pass --baseline" in msg


def test_unknown_task(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    msg = _error(capsys, ["eval", str(tiny_llama_dir), "--ppl", "none", "--tasks", "arc_easy,arc_easyy"])
    assert "unknown task 'arc_easyy'" in msg
    assert (
        "arc_easy, arc_challenge, piqa, hellaswag, winogrande, boolq, openbookqa, rte, lambada_openai" in msg
    )


def test_run_dir_end_to_end(
    tiny_llama_dir: Path, tmp_path: Path, data_dir: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    from oneshot.eval.corpora import ppl_token_ids
    from oneshot.eval.perplexity import perplexity

    run = _run_dir(tiny_llama_dir, tmp_path / "run")
    out = tmp_path / "results.json"
    argv = ["eval", str(run), "--ppl", "wikitext2,c4", "--seqlen", "32", "--ppl-windows", "2", "--limit", "2"]
    argv += ["--tasks", "arc_easy,lambada_openai", "--baseline", str(tiny_llama_dir)]
    argv += ["--json", str(out), "--bootstrap-iters", "10", "--data-dir", str(data_dir), "-q"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "ppl wikitext2" in stdout and "arc_easy" in stdout
    result = json.loads(out.read_text())
    assert json.loads((run / EVAL_FILE).read_text()) == result
    assert result["format"] == "oneshot-eval/1" and result["model"] == str(run.resolve())
    assert result["dtype"] == "float32" and result["device"] == "cpu"
    assert set(result) >= {"fingerprint", "ppl", "tasks", "baseline", "longtail", "versions", "seconds"}
    for name in ("wikitext2", "c4"):
        ppl = result["ppl"][name]
        assert {"value", "nll", "windows", "seqlen", "tokens", "note"} <= set(ppl)
        assert ppl["windows"] == 2 and ppl["seqlen"] == 32 and ppl["tokens"] == 2 * 31
        assert "--ppl-windows 2" in ppl["note"]
    assert "256" in result["ppl"]["c4"]["note"]
    for name in ("arc_easy", "lambada_openai"):
        task = result["tasks"][name]
        assert {"acc", "acc_stderr", "acc_norm", "n", "limit", "source"} <= set(task)
        assert task["n"] == 2 and task["limit"] == 2 and task["source"].startswith("local:")
    assert result["tasks"]["lambada_openai"]["acc_norm"] is None
    assert result["tasks"]["lambada_openai"]["perplexity"] > 1
    # the reported perplexity is the one of the checkpoint, computed directly
    model = AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    ids = ppl_token_ids("wikitext2", AutoTokenizer.from_pretrained(run), data_dir)
    direct = perplexity(model, ids, 32, limit=2)
    assert result["ppl"]["wikitext2"]["value"] == pytest.approx(direct.value, rel=1e-6)
    # the baseline is the same weights in another folder: same numbers, its own record
    base = result["baseline"]
    assert base["model"] == str(tiny_llama_dir.resolve()) and base["fingerprint"]
    assert base["ppl"]["wikitext2"]["value"] == pytest.approx(direct.value, rel=1e-6)
    assert base["tasks"]["arc_easy"]["acc"] == result["tasks"]["arc_easy"]["acc"]
    # per-document results, n-shot and task version are recorded; the same weights pair with no change
    from oneshot.eval.task_compare import compare_tasks

    arc = result["tasks"]["arc_easy"]
    assert set(arc["correct"]) == {"acc", "acc_norm"} and arc["docs_hash"] and arc["chance"] == 0.25
    assert arc["num_fewshot"] == 0 and arc["version"] and "4 choices" in arc["differences"]
    cmp = compare_tasks(result["tasks"], base["tasks"])
    assert [r.paired for r in cmp.tasks] == [True, True] and cmp.flagged == []
    assert all(r.discordant == [0, 0] for r in cmp.tasks)


def _count_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from transformers import LlamaForCausalLM

    calls = [0]
    original = LlamaForCausalLM.forward

    def counting(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", counting)
    return calls


def test_baseline_cache(
    tiny_llama_dir: Path, tmp_path: Path, data_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dense = tmp_path / "dense"
    shutil.copytree(tiny_llama_dir, dense)
    calls = _count_forwards(monkeypatch)
    config = EvalConfig(
        ppl=("wikitext2",),
        seqlen=32,
        ppl_windows=3,
        limit=3,
        tasks=("arc_easy",),
        baseline=str(dense),
        data_dir=str(data_dir),
        bootstrap_iters=10,
    )
    first = evaluate(str(tiny_llama_dir), config)
    both = calls[0]
    assert first.baseline is not None and first.baseline.cached is False and both > 0
    assert any(cache_dir.joinpath("eval").rglob("*.json"))
    calls[0] = 0
    second = evaluate(str(tiny_llama_dir), config)
    assert second.baseline is not None and second.baseline.cached is True
    assert calls[0] * 2 == both  # only the evaluated model ran; the baseline was not recomputed
    assert second.baseline.ppl == first.baseline.ppl
    assert second.baseline.tasks == first.baseline.tasks
    assert second.baseline.tasks["arc_easy"].outcomes("acc") is not None  # per-document results cached too
    # the cache is keyed by content: a new mtime alone still hits ...
    weights = dense / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    calls[0] = 0
    assert evaluate(str(tiny_llama_dir), config).baseline.cached is True  # type: ignore[union-attr]
    # ... a changed weight (same size, same mtime) recomputes, and so does --no-cache
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] += 1.0
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    calls[0] = 0
    third = evaluate(str(tiny_llama_dir), config)
    assert third.baseline is not None and third.baseline.cached is False and calls[0] == both
    calls[0] = 0
    fourth = evaluate(str(tiny_llama_dir), EvalConfig(**{**config.to_dict(), "cache": False}))
    assert fourth.baseline is not None and fourth.baseline.cached is False and calls[0] == both


def test_a_later_eval_keeps_the_earlier_results_it_does_not_measure_again(
    tiny_llama_dir: Path, tmp_path: Path, data_dir: Path, cache_dir: Path
) -> None:
    """Perplexity today, tasks tomorrow: eval.json holds both; a changed model makes the old results stale."""
    run = _run_dir(tiny_llama_dir, tmp_path / "run")
    common = ["--seqlen", "32", "--ppl-windows", "2", "--data-dir", str(data_dir), "-q"]
    assert main(["eval", str(run), "--ppl", "wikitext2", *common]) == 0
    first = json.loads((run / EVAL_FILE).read_text())
    argv = ["eval", str(run), "--ppl", "c4", "--tasks", "arc_easy", "--limit", "2", "--bootstrap-iters", "10"]
    assert main([*argv, *common]) == 0
    both = json.loads((run / EVAL_FILE).read_text())
    assert set(both["ppl"]) == {"wikitext2", "c4"} and set(both["tasks"]) == {"arc_easy"}
    assert both["ppl"]["wikitext2"] == first["ppl"]["wikitext2"]
    assert both["kept_from_earlier"] == ["ppl wikitext2"]
    # measured again: the new number replaces the old one, nothing is "kept"
    assert main(["eval", str(run), "--ppl", "wikitext2,c4", *common]) == 0
    again = json.loads((run / EVAL_FILE).read_text())
    assert again["kept_from_earlier"] == ["task arc_easy"]
    # another model in the same folder (a weight changed): the earlier results are stale and dropped
    from safetensors.torch import load_file, save_file

    weights = load_file(str(run / "model.safetensors"))
    key = next(k for k in weights if k.endswith("down_proj.weight"))
    weights[key] = weights[key] * 0.5
    save_file(weights, str(run / "model.safetensors"), metadata={"format": "pt"})
    assert main(["eval", str(run), "--ppl", "c4", *common]) == 0
    fresh = json.loads((run / EVAL_FILE).read_text())
    assert set(fresh["ppl"]) == {"c4"} and fresh["tasks"] == {} and "kept_from_earlier" not in fresh
