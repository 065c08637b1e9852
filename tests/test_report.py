"""`oneshot report`: files written, content, bad input, and report.html in a real headless browser."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from oneshot.eval.longtail import longtail_report
from oneshot.eval.report import write_report
from oneshot.runfolder import RecordError, pack_bits
from tests.conftest import tiny_llama_config
from tests.test_longtail import make_fake_data

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _record(
    sparsity: float, method: str = "sparsegpt", pattern: str = "unstructured", quick: bool = True
) -> dict:
    """An oneshot.json shaped like the one oneshot/run.py writes (2 blocks x 7 linears)."""
    layers = [
        {
            "name": f"model.layers.{b}.{'self_attn' if k.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{k}",
            "shape": [64, 128]
            if k == "down_proj"
            else [128, 64]
            if k in ("gate_proj", "up_proj")
            else [64, 64],
            "sparsity": sparsity + 0.001 * i,
            "loss": (1 + b) * (i + 1) * sparsity * 0.1,
            "seconds": 0.01,
        }
        for b in range(2)
        for i, k in enumerate(KINDS)
    ]
    cfg = {
        "method": method,
        "pattern": pattern,
        "sparsity": sparsity,
        "calib": "c4",
        "nsamples": 4,
        "seqlen": 32,
        "seed": 0,
    }
    qe = {}
    if quick:
        note = "quick check: first 2 windows of the test set, not the full protocol"
        base = {"nll": 5.0, "windows": 2, "seqlen": 32, "tokens": 62, "dataset": "wikitext2", "note": note}
        qe = {"dense": {**base, "value": 150.0}, "pruned": {**base, "value": 150.0 * (1 + sparsity)}}
    return {
        "format": "oneshot-run/1",
        "config": cfg,
        "command": ["oneshot", "prune", "--sparsity", str(sparsity)],
        "started": "2026-11-23T18:00:00+00:00",
        "source": {"kind": "local", "path": "/models/tiny", "base_model": None},
        "model_type": "llama",
        "calibration": {"source": "c4", "nsamples": 4},
        "versions": {"torch": torch.__version__},
        "prune": {
            "config": cfg,
            "layers": layers,
            "blocks": [{"index": b, "seconds": 0.1, "output_error": 0.01 * (b + 1)} for b in range(2)],
            "total_seconds": 1.5,
            "peak_memory_bytes": 300 * 2**20,
            "peak_memory_kind": "process peak RSS",
            "device": "cpu",
            "pruned_params": 1000,
            "zero_params": int(1000 * sparsity),
            "sparsity": sparsity,
        },
        "quick_eval": qe,
        "total_seconds": 2.0,
    }


def _ppl(value: float) -> dict:
    return {"value": value, "nll": 5.0, "windows": 4, "seqlen": 32, "tokens": 124, "note": "first 4 windows"}


@pytest.fixture(scope="module")
def longtail(tiny_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real long-tail record of a tiny random Llama vs a half-zeroed copy, on a small fake data dir."""
    from transformers import LlamaForCausalLM

    data = make_fake_data(tmp_path_factory.mktemp("data"))
    torch.manual_seed(0)
    dense = LlamaForCausalLM(tiny_llama_config(len(tiny_tokenizer))).eval()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        for name, p in pruned.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_((torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) > 0.6).to(p.dtype))
    tasks_p = {
        "arc_easy": {"acc": 0.31, "acc_stderr": 0.02, "n": 50},
        "piqa": {"acc": 0.60, "acc_stderr": 0.02, "n": 50},
    }
    tasks_d = {
        "arc_easy": {"acc": 0.45, "acc_stderr": 0.02, "n": 50},
        "piqa": {"acc": 0.62, "acc_stderr": 0.02, "n": 50},
    }
    rep = longtail_report(
        dense,
        pruned,
        tiny_tokenizer,
        data,
        limit=6,
        max_tokens_per_slice=96,
        seqlen=64,
        reference_tokens=256,
        task_results=tasks_p,
        baseline_task_results=tasks_d,
    )
    # A tiny random model degrades every slice alike, so the significance test flags none (the old rule
    # flagged half of them); to test how a flagged row is rendered, the most significant slice is marked.
    rep["unmarked_flags"] = list(rep["flagged"])
    tested = [s for s in rep["slices"] if s.get("p_value") is not None]
    top = min(tested, key=lambda s: s["p_value"])
    top["flagged"], top["status"] = True, "flagged"
    rep["flagged"] = [s["name"] for s in rep["slices"] if s["flagged"]]
    return rep


def _task(acc: float, per_document: bool, n: int = 100) -> dict:
    """An arc_easy record of ``n`` documents, the first ``acc * n`` right (with per-document results)."""
    right = round(acc * n)
    out = {"acc": acc, "acc_stderr": 0.02, "acc_norm": None, "n": n, "limit": None, "source": "local:/x"}
    out["differences"] = "Every item has exactly 4 choices. The rest."
    if per_document:
        out.update(correct={"acc": pack_bits([1] * right + [0] * (n - right))}, docs_hash="same-docs")
    return out


@pytest.fixture()
def runs(tmp_path: Path, longtail: dict) -> tuple[list[Path], Path]:
    """Two run dirs with eval.json (one relying on --baseline for dense numbers), one quick-only run, and
    a dense baseline folder."""
    dirs = []
    for i, sp in enumerate((0.3, 0.5)):
        d = tmp_path / f"run-{sp}"
        d.mkdir()
        (d / "oneshot.json").write_text(json.dumps(_record(sp)))
        ev = {
            "format": "oneshot-eval/1",
            "model": str(d),
            "ppl": {"wikitext2": _ppl(20.0 * (1 + sp)), "c4": _ppl(30.0 * (1 + sp))},
            "tasks": {"arc_easy": _task(0.5 - sp / 2, per_document=True)},
            "baseline": None,
            "longtail": longtail if i == 1 else None,
            "versions": {},
            "seconds": 1.0,
        }
        if i == 1:
            ev["baseline"] = {
                "ppl": {"wikitext2": _ppl(20.0)},
                "tasks": {"arc_easy": _task(0.5, per_document=False)},  # an older record: no per-document
            }
        (d / "eval.json").write_text(json.dumps(ev))
        dirs.append(d)
    quick = tmp_path / "run-quick-2of4"
    quick.mkdir()
    (quick / "oneshot.json").write_text(json.dumps(_record(0.5, "wanda", "2:4")))
    dirs.append(quick)
    base = tmp_path / "dense"
    base.mkdir()
    dense_eval = {
        "format": "oneshot-eval/1",
        "ppl": {"wikitext2": _ppl(20.0), "c4": _ppl(30.0)},
        "tasks": {"arc_easy": _task(0.5, per_document=True)},
        "model": "dense-model",
    }
    (base / "eval.json").write_text(json.dumps(dense_eval))
    return dirs, base


def test_report_files_and_content(runs: tuple[list[Path], Path], tmp_path: Path) -> None:
    dirs, base = runs
    out = tmp_path / "report"
    paths = write_report(dirs, baseline=base, out=out)
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "report.html", "plots"}
    assert paths["html"] == out.resolve() / "report.html" and paths["html"].is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    rep = json.loads(paths["json"].read_text())
    assert rep["format"] == "oneshot-report/1" and len(rep["runs"]) == 3
    r0, r1, rq = rep["runs"]
    # dense numbers: run 0 from --baseline, run 1 from its own eval.json baseline, quick run from quick_eval
    wt0 = next(p for p in r0["perplexity"] if p["dataset"] == "wikitext2")
    assert (
        wt0["dense"] == 20.0
        and wt0["dense_from"] == "--baseline"
        and wt0["rel_degradation"] == pytest.approx(0.3)
    )
    assert r1["perplexity"][0]["dense_from"] == "eval.json baseline"
    assert rq["perplexity"][0]["kind"] == "quick" and rq["perplexity"][0]["rel_degradation"] == pytest.approx(
        0.5
    )
    # tasks: run 0 paired with --baseline (both have per-document results), run 1 unpaired with its own
    # eval.json baseline (written without them); both drops (50 -> 35 and 50 -> 25 of 100) are flagged
    t0, t1 = r0["tasks"], r1["tasks"]
    row0, row1 = t0["comparison"]["tasks"][0], t1["comparison"]["tasks"][0]
    assert row0["delta"] == pytest.approx(-0.15) and row0["paired"] and row0["discordant"] == [15, 0]
    assert row0["p_value"] == pytest.approx(0.5**15) and row0["status"] == "flagged"
    assert t0["baseline"].startswith("`oneshot report --baseline ") and "dense-model" in t0["baseline"]
    assert not row1["paired"] and row1["note"] == "unpaired: no per-document results in the dense record"
    assert row1["status"] == "flagged" and "evaluated alongside (`oneshot eval --baseline`)" in t1["baseline"]
    assert [(x["metric"], x["value"], x["dense"]) for x in t0["scores"]] == [("acc", 0.35, 0.5)]
    assert t0["mean"] == {"pruned": 0.35, "dense": 0.5, "tasks": 1}
    assert r1["longtail"]["flagged"] == [s["name"] for s in r1["longtail"]["slices"] if s["flagged"]]
    assert len(r0["layers"]) == 14
    stems = {Path(p).stem for p in rep["plots"]}
    assert {"layers-1", "layers-2", "layers-3", "ppl-vs-sparsity", "longtail-2", "tasks"} <= stems
    for p in rep["plots"]:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = paths["md"].read_text()
    assert (
        "quick check" in md
        and "## Long-tail degradation: run-0.5" in md
        and "(plots/ppl-vs-sparsity.png)" in md
    )
    flagged = r1["longtail"]["flagged"]
    assert flagged and r1["longtail"]["unmarked_flags"] == []  # noise alone flags nothing
    assert all(re.search(rf"\| {re.escape(n)} \|.*\| FLAG \|", md) for n in flagged)

    page = paths["html"].read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(rep["plots"])
    assert not re.search(r"(src|href)=\"(https?:|//|file:)", page) and "<script" not in page
    assert page.count('<tr class="flag">') == len(flagged) + len(t1["comparison"]["flagged"]) + len(
        t0["comparison"]["flagged"]
    )
    assert "## Tasks" in md and "Baseline: `oneshot report --baseline" in md
    assert "| arc_easy | - | - | 100 | - | acc * | 0.5000 |" in md
    assert "Note: arc_easy (local copy): Every item has exactly 4 choices. The rest." in md
    assert "no per-document results in the dense record" in md and "Holm-corrected" in md

    # writing again replaces the previous report; without a baseline the pruned task scores still appear
    write_report(dirs[:1], out=out)
    alone = json.loads(paths["json"].read_text())["runs"]
    assert len(alone) == 1 and alone[0]["tasks"]["comparison"] is None
    assert alone[0]["tasks"]["baseline"] is None and alone[0]["tasks"]["scores"][0]["value"] == 0.35
    md = paths["md"].read_text()
    assert "Baseline: none" in md and "| arc_easy | - | - | 100 | - | acc * | 0.3500 | 0.0200 |" in md


def test_report_on_a_fresh_prune_run_with_quick_eval_only(
    tmp_path: Path, tiny_llama_dir: Path, calib_txt: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from oneshot.cli import main

    run = tmp_path / "pruned"
    args = [
        "prune",
        "--model",
        str(tiny_llama_dir),
        "--method",
        "wanda",
        "--pattern",
        "2:4",
        "--calib",
        str(calib_txt),
    ]
    args += [
        "--nsamples",
        "2",
        "--seqlen",
        "32",
        "--eval-windows",
        "2",
        "--data-dir",
        str(data_dir),
        "--out",
        str(run),
        "-q",
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert not (run / "eval.json").exists()
    paths = write_report([run], out=run / "report")
    rep = json.loads(paths["json"].read_text())
    (row,) = rep["runs"][0]["perplexity"]
    assert row["kind"] == "quick" and row["windows"] == 2 and row["dense"] > 0 and row["pruned"] > 0
    assert rep["plots"] == ["plots/layers-1.png"]
    assert "quick check" in paths["html"].read_text()


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from oneshot.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_and_bad_input(
    runs: tuple[list[Path], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dirs, base = runs
    out = tmp_path / "rep"
    code, stdout, err = _cli(
        ["report", str(dirs[0]), str(dirs[2]), "--baseline", str(base), "--out", str(out)], capsys
    )
    assert code == 0 and str(out / "report.html") in stdout and not err

    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(empty)], "oneshot.json not found"),
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(dirs[0]), "--baseline", str(empty)], "baseline"),
        ([str(dirs[0]), "--out", str(dirs[1])], "holds other files"),
        ([str(dirs[0]), "--out", str(dirs[0])], "is the input run folder"),
    ]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "oneshot.json").write_text("{not json")
    cases.append(([str(bad)], "not valid JSON"))
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "oneshot.json").write_text(json.dumps({"format": "something-else/1", "prune": {}}))
    cases.append(([str(wrong)], "expected oneshot-run/"))
    for argv, msg in cases:
        argv = ["report", *argv] if "--out" in argv else ["report", *argv, "--out", str(tmp_path / "r2")]
        code, stdout, err = _cli(argv, capsys)
        assert code == 2 and err.startswith("oneshot: error: ") and msg in err, (argv, err)
        assert err.count("\n") == 1 and not stdout
    assert not (tmp_path / "r2").exists()
    with pytest.raises(RecordError, match=r"oneshot\.json not found"):
        write_report([empty], out=tmp_path / "r3")


def test_minimal_record_and_duplicate_names(tmp_path: Path) -> None:
    """An oneshot.json with a config, a source and an empty prune section still gives a report; two runs
    with the same folder name are told apart by their parent folder."""
    dirs = []
    for parent in ("a", "b"):
        d = tmp_path / parent / "run"
        d.mkdir(parents=True)
        minimal = {
            "format": "oneshot-run/1",
            "config": {"method": "wanda"},
            "source": {"kind": "local"},
            "prune": {},
        }
        (d / "oneshot.json").write_text(json.dumps(minimal))
        dirs.append(d)
    paths = write_report(dirs, out=tmp_path / "rep")
    rep = json.loads(paths["json"].read_text())
    assert [r["summary"]["name"] for r in rep["runs"]] == ["a/run", "b/run"] and rep["plots"] == []
    assert "no perplexity recorded" in paths["md"].read_text() and "<img" not in paths["html"].read_text()


# --------------------------------------------------------------------------------------------------------
# The browser check: Debian's chromium (scripts/setup_browser.sh) loads report.html headless


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _screenshot(html: Path, png: Path, profile: Path) -> str:
    """Load ``html`` in headless chromium, save a 1200x1600 screenshot; returns chromium's log."""
    exe = _chromium()
    assert exe is not None
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={png}",
        "--window-size=1200,1600",
        html.resolve().as_uri(),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and png.is_file(), res.stderr[-2000:]
    return res.stdout + res.stderr


def _console_errors(log: str) -> list[str]:
    """Console lines of chromium's log. This chromium logs every console message, console.error and
    uncaught exceptions included, as ``INFO:CONSOLE``; the report has no script, so any is an error."""
    marks = ("Uncaught", ":CONSOLE", "Failed to load resource", "net::ERR_")
    return [line for line in log.splitlines() if any(m in line for m in marks)]


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (bash scripts/setup_browser.sh)")
def test_report_html_in_headless_chromium(runs: tuple[list[Path], Path], tmp_path: Path) -> None:
    from PIL import Image

    # control: the log check does see console errors when a page has them
    bad = tmp_path / "bad.html"
    script = "console.error('boom'); notDefinedAnywhere();"
    bad.write_text(f"<!DOCTYPE html><html><body><p>x</p><script>{script}</script></body></html>")
    found = _console_errors(_screenshot(bad, tmp_path / "bad.png", tmp_path / "profile-bad"))
    assert any("boom" in x for x in found) and any("Uncaught ReferenceError" in x for x in found), found

    dirs, base = runs
    paths = write_report(dirs, baseline=base, out=tmp_path / "report")
    png = tmp_path / "report.png"
    log = _screenshot(paths["html"], png, tmp_path / "profile")
    assert not _console_errors(log), _console_errors(log)
    img = Image.open(png).convert("RGB")
    assert img.size == (1200, 1600)
    colors = img.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, "screenshot is blank"
    white = max(count for count, _ in colors)
    assert white < 0.97 * img.size[0] * img.size[1], "screenshot is almost all one colour"
    shutil.copy(png, paths["html"].parent / "screenshot.png")  # kept next to the report for a human look


def test_an_incomparable_baseline_is_left_out_and_said(runs: tuple[list[Path], Path], tmp_path: Path) -> None:
    """A dense measurement of other windows (2 x 512 against a run's 10 x 128) or of another data file is
    never turned into a "change": the row keeps the pruned number and says why the dense one is left out."""
    dirs, base = runs
    dense = json.loads((base / "eval.json").read_text())
    dense["ppl"]["wikitext2"].update(windows=2, seqlen=512, tokens=2 * 511)
    dense["ppl"]["c4"]["data"] = "other-file"
    (base / "eval.json").write_text(json.dumps(dense))
    run = json.loads((dirs[0] / "eval.json").read_text())
    run["ppl"]["wikitext2"].update(windows=10, seqlen=128, tokens=10 * 127)
    run["ppl"]["c4"]["data"] = "this-file"
    (dirs[0] / "eval.json").write_text(json.dumps(run))
    paths = write_report(dirs[:1], baseline=base, out=tmp_path / "report")
    rows = {p["dataset"]: p for p in json.loads(paths["json"].read_text())["runs"][0]["perplexity"]}
    for name, why in (("wikitext2", "10 x 128 vs 2 x 512 windows"), ("c4", "different data files")):
        assert rows[name]["dense"] is None and rows[name]["rel_degradation"] is None
        assert f"--baseline not comparable ({why})" in rows[name]["note"]
    assert "not comparable" in paths["md"].read_text()
