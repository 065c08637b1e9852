"""Offline lm-eval tasks: the requests built from the local files equal those lm-eval builds from the
original Hub layout, and `simple_evaluate` runs end to end on a tiny model."""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from oneshot.eval.corpora import EvalDataError
from oneshot.eval.task_compare import compare_tasks
from oneshot.eval.tasks import LOCAL_TASKS, build_tasks, per_document, run_tasks, validate_task_names
from oneshot.runfolder import TaskRecord, from_dict, pack_bits

# --- a few documents of each task in the field layout of the Hub dataset lm-eval reads -------------

ARC = [
    {
        "id": "q1",
        "question": "Which gas do plants take in for photosynthesis?",
        "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
        "answerKey": "B",
    },
    {
        "id": "q2",
        "question": "What happens to water at 100 degrees Celsius at sea level?",
        "choices": {
            "text": ["it freezes", "it melts", "it boils", "it glows"],
            "label": ["1", "2", "3", "4"],
        },
        "answerKey": "3",
    },
]
ORIGINAL: dict[str, list[dict[str, Any]]] = {
    "arc_easy": ARC,
    "arc_challenge": ARC[::-1],
    "piqa": [
        {
            "goal": "How do I dry wet shoes?",
            "sol1": "Stuff them with newspaper.",
            "sol2": "Put them in the freezer.",
            "label": 0,
        },
        {
            "goal": "dresser",
            "sol1": "replace drawer with bobby pin ",
            "sol2": "finish, woodgrain with  bobby pin ",
            "label": 1,
        },
    ],
    "hellaswag": [
        {
            "ind": 4,
            "activity_label": "Removing ice from car",
            "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles.",
            "ctx_b": "",
            "ctx": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles.",
            "endings": [
                ", the man adds wax to the windshield and cuts it.",
                ", a person board a ski lift.",
                ", the man puts on a christmas coat.",
                ", the man continues removing the snow on his car.",
            ],
            "source_id": "activitynet~v_-1IBHYS3L-Y",
            "split": "val",
            "split_type": "zeroshot",
            "label": "3",
        },
        {
            "ind": 9,
            "activity_label": "Home and Garden",
            "ctx_a": "[header] How to grow a cactus [title] Pick a pot. [step] Use one with holes in the bottom.",
            "ctx_b": "",
            "ctx": "[header] How to grow a cactus [title] Pick a pot. [step] Use one with holes in the bottom.",
            "endings": [
                "Water it daily with cold milk.",
                "Fill it with cactus soil. [step] Keep it in the sun.",
                "Paint the pot blue [title] and wait.",
                "Throw the pot away.",
            ],
            "source_id": "wikihow~1",
            "split": "val",
            "split_type": "indomain",
            "label": "1",
        },
    ],
    "winogrande": [
        {
            "sentence": "Sarah was a much better surgeon than Samantha so _ always got the harder cases.",
            "option1": "Sarah",
            "option2": "Samantha",
            "answer": "1",
        },
        {
            "sentence": "The trophy doesn't fit into the brown suitcase because the _ is too large.",
            "option1": "trophy",
            "option2": "suitcase",
            "answer": "1",
        },
        {
            "sentence": "Kevin borrowed Ian's car because _'s own car was in the shop.",
            "option1": "Kevin",
            "option2": "Ian",
            "answer": "1",
        },
    ],
    "boolq": [
        {
            "question": "is the sky blue on a clear day",
            "passage": "Rayleigh scattering makes the daytime sky look blue.",
            "idx": 0,
            "label": 1,
        },
        {
            "question": "did the book win a prize",
            "passage": "The book ``Snakes in\nQuestion: The Answer Book'' sold well.",
            "idx": 1,
            "label": 0,
        },
    ],
    "openbookqa": [
        {
            "id": "7-980",
            "question_stem": "The sun is responsible for",
            "choices": {
                "text": [
                    "puppies learning new tricks",
                    "plants sprouting, blooming and wilting",
                    "the moon's craters",
                    "volcanoes",
                ],
                "label": ["A", "B", "C", "D"],
            },
            "answerKey": "B",
        },
        {
            "id": "7-981",
            "question_stem": "There is most likely going to be fog around:",
            "choices": {
                "text": ["a marsh", "a tundra", "the plains", "a desert"],
                "label": ["A", "B", "C", "D"],
            },
            "answerKey": "A",
        },
    ],
    "rte": [
        {
            "sentence1": "Dana Reeve has died of lung cancer at age 44.",
            "sentence2": "Christopher Reeve had an accident.",
            "label": 1,
            "idx": 0,
        },
        {
            "sentence1": "Bacteria are mutating faster than new antibiotics appear.",
            "sentence2": "Bacteria is winning the war against antibiotics.",
            "label": 0,
            "idx": 1,
        },
    ],
    "lambada_openai": [
        {"text": "He opened the door and there, smiling, stood his old friend Tom"},
        {"text": "She raised her brows when she returned and saw the \n\nrecorder"},
    ],
}
HUB_PATHS = {
    "arc_easy": "allenai/ai2_arc",
    "arc_challenge": "allenai/ai2_arc",
    "piqa": "baber/piqa",
    "hellaswag": "Rowan/hellaswag",
    "winogrande": "allenai/winogrande",
    "boolq": "aps/super_glue",
    "openbookqa": "allenai/openbookqa",
    "rte": "nyu-mll/glue",
    "lambada_openai": "EleutherAI/lambada_openai",
}


# --- the conversions the local files went through (SOURCES.md section 4) ---------------------------


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _llamacpp_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def write_local(name: str, docs: list[dict[str, Any]], root: Path) -> None:
    """Write ``docs`` (Hub layout) as the local file of ``name`` (MosaicML / original / llama.cpp form)."""
    spec = LOCAL_TASKS[name]
    path = root / spec.files[0]
    if name in ("arc_easy", "arc_challenge", "openbookqa"):
        key = "question" if name.startswith("arc") else "question_stem"
        rows = [
            {
                "query": ("Question: " if name.startswith("arc") else "") + d[key],
                "choices": d["choices"]["text"],
                "gold": d["choices"]["label"].index(d["answerKey"].lstrip()),
            }
            for d in docs
        ]
        _jsonl(path, rows)
    elif name == "piqa":
        _jsonl(path, [{k: d[k] for k in ("goal", "sol1", "sol2")} for d in docs])
        (root / spec.files[1]).write_text("".join(f"{d['label']}\n" for d in docs))
    elif name == "hellaswag":
        lines = []
        for d in docs:
            lines.append(_llamacpp_clean(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"]))
            lines.append(d["label"])
            lines.extend(_llamacpp_clean(e) for e in d["endings"])
        path.parent.mkdir(parents=True, exist_ok=True)
        with bz2.open(path, "wt", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    elif name == "winogrande":
        rows = []
        for d in docs:
            idx = d["sentence"].index("_")
            rows.append(
                {
                    "context_options": [
                        d["sentence"][:idx] + d["option1"],
                        d["sentence"][:idx] + d["option2"],
                    ],
                    "continuation": d["sentence"][idx + 1 :].strip(),
                    "gold": int(d["answer"]) - 1,
                }
            )
        _jsonl(path, rows)
    elif name == "boolq":
        rows = [
            {
                "query": f"Passage: {d['passage']}\nQuestion: {d['question']}?",
                "choices": ["no", "yes"],
                "gold": d["label"],
            }
            for d in docs
        ]
        _jsonl(path, rows)
    elif name == "rte":  # SuperGLUE layout of the same pairs
        labels = ["entailment", "not_entailment"]
        rows = [
            {
                "premise": d["sentence1"],
                "hypothesis": d["sentence2"],
                "label": labels[d["label"]],
                "idx": d["idx"],
            }
            for d in docs
        ]
        _jsonl(path, rows)
    elif name == "lambada_openai":
        rows = []
        for d in docs:
            context, continuation = d["text"].rsplit(" ", 1)
            rows.append({"context": context, "continuation": continuation})
        _jsonl(path, rows)
    else:  # pragma: no cover
        raise KeyError(name)


@pytest.fixture(scope="module")
def lm_eval_manager():
    """lm-eval's full task index (the same default TaskManager() any lm-eval user gets; built once)."""
    from oneshot.eval.tasks import lm_eval_task_manager

    return lm_eval_task_manager()


def reference_task(
    manager: Any, name: str, docs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> Any:
    """lm-eval's own task, built from its registry, reading ``docs`` instead of downloading the Hub dataset."""
    import datasets

    def fake_load_dataset(path: str, name: str | None = None, **kwargs: Any) -> Any:
        assert path == HUB_PATHS[task_name], path
        ds = datasets.Dataset.from_list(docs)
        return datasets.DatasetDict({"train": ds, "validation": ds, "test": ds})

    task_name = name
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return manager.load([name])["tasks"][name]


def _requests(task: Any) -> list[tuple[Any, ...]]:
    task.build_all_requests(limit=None, rank=0, world_size=1)
    return [(i.doc_id, i.idx, i.request_type, i.arguments) for i in task.instances]


@pytest.mark.parametrize("name", list(LOCAL_TASKS))
def test_offline_task_requests_equal_lm_eval(
    name: str, tmp_path: Path, lm_eval_manager: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = ORIGINAL[name]
    write_local(name, docs, tmp_path)
    mine = build_tasks([name], tmp_path)
    assert mine.sources[name] == f"local:{tmp_path / LOCAL_TASKS[name].files[0]}"
    task = mine.tasks[name]
    ref = reference_task(lm_eval_manager, name, docs, monkeypatch)
    assert task.OUTPUT_TYPE == ref.OUTPUT_TYPE
    assert sorted(task._metric_fn_list) == sorted(ref._metric_fn_list)
    assert len(task.eval_docs) == len(ref.eval_docs) == len(docs)
    for a, b in zip(task.eval_docs, ref.eval_docs, strict=True):
        assert task.doc_to_target(a) == ref.doc_to_target(b)
    assert _requests(task) == _requests(ref)


def test_hellaswag_known_differences(
    tmp_path: Path, lm_eval_manager: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = dict(ORIGINAL["hellaswag"][0], ctx_a="A man is sitting on a roof.", ctx_b="he")
    write_local("hellaswag", [doc], tmp_path)
    mine = _requests(build_tasks(["hellaswag"], tmp_path).tasks["hellaswag"])
    ref = _requests(reference_task(lm_eval_manager, "hellaswag", [doc], monkeypatch))
    assert mine != ref
    assert mine[0][3][0].endswith("roof. he") and ref[0][3][0].endswith("roof. He")
    assert [(r[0], r[1], r[3][0].lower(), r[3][1]) for r in mine] == [
        (r[0], r[1], r[3][0].lower(), r[3][1]) for r in ref
    ]
    # an ending that starts with a WikiHow tag keeps a leading space in lm-eval ("  Water"): the
    # extractor trimmed it, so the local continuation has the usual single space
    doc = dict(ORIGINAL["hellaswag"][1], endings=["[title] Water it.", "Dig.", "Run.", "Sing."])
    write_local("hellaswag", [doc], tmp_path)
    mine = _requests(build_tasks(["hellaswag"], tmp_path).tasks["hellaswag"])
    ref = _requests(reference_task(lm_eval_manager, "hellaswag", [doc], monkeypatch))
    assert mine[0][3][1] == " Water it." and ref[0][3][1] == "  Water it."
    assert mine[1:] == ref[1:]


def test_real_files_convert(data_dir: Path) -> None:
    counts = {
        "arc_easy": 2376,
        "arc_challenge": 1172,
        "piqa": 1838,
        "hellaswag": 10042,
        "winogrande": 1267,
        "boolq": 3270,
        "openbookqa": 500,
        "rte": 277,
        "lambada_openai": 5153,
    }
    from oneshot.eval.tasks import local_task_docs

    for name, count in counts.items():
        docs = local_task_docs(name, data_dir)
        assert len(docs) == count, name
    run = build_tasks(list(counts), data_dir, limit=3)
    assert set(run.tasks) == set(counts)
    assert all(src.startswith("local:") for src in run.sources.values())


def test_unknown_and_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown task 'arc_easyy'.*arc_easy, arc_challenge"):
        validate_task_names(["arc_easyy"])
    with pytest.raises(EvalDataError, match=r"expected tasks/piqa/valid\.jsonl"):
        build_tasks(["piqa"], tmp_path)  # HF_HUB_OFFLINE=1 in the tests


def _loglikelihood(model: Any, tok: Any, context: str, continuation: str) -> float:
    """log p(continuation | context), tokenized as HFLM does (whole string, context prefix split off)."""
    ctx = tok(context).input_ids
    whole = tok(context + continuation).input_ids
    cont = whole[len(ctx) :]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (len, vocab)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_simple_evaluate_end_to_end(tiny_llama_dir: Path, data_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    out = run_tasks(model, tok, ["arc_easy", "winogrande"], data_dir=data_dir, limit=2, bootstrap_iters=10)
    assert set(out) == {"arc_easy", "winogrande"}
    for res in out.values():
        assert res["n"] == 2 and res["limit"] == 2 and res["source"].startswith("local:")
        assert res["acc"] in (0.0, 0.5, 1.0) and res["acc_stderr"] is not None
    assert out["winogrande"]["acc_norm"] is None
    # the accuracy lm-eval reports equals an explicit log-likelihood comparison
    task = build_tasks(["arc_easy"], data_dir, limit=2).tasks["arc_easy"]
    task.build_all_requests(limit=2, rank=0, world_size=1)
    correct, correct_norm = 0, 0
    for doc_id, doc in enumerate(list(task.eval_docs)[:2]):
        reqs = sorted((i for i in task.instances if i.doc_id == doc_id), key=lambda i: i.idx)
        lls = [_loglikelihood(model, tok, *r.arguments) for r in reqs]
        norm = [ll / len(r.arguments[1]) for ll, r in zip(lls, reqs, strict=True)]
        gold = task.doc_to_target(doc)
        correct += int(max(range(len(lls)), key=lls.__getitem__) == gold)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == gold)
    assert out["arc_easy"]["acc"] == pytest.approx(correct / 2)
    assert out["arc_easy"]["acc_norm"] == pytest.approx(correct_norm / 2)
    # per-document results: the outcomes lm-eval logged, in document order, and what they were made on
    arc = from_dict(TaskRecord, out["arc_easy"])
    assert arc.outcomes("acc") is not None and sum(arc.outcomes("acc") or []) == correct
    assert sum(arc.outcomes("acc_norm") or []) == correct_norm
    assert arc.chance == pytest.approx(0.25) and arc.num_fewshot == 0 and arc.version is not None
    assert arc.docs_hash and arc.differences == LOCAL_TASKS["arc_easy"].differences
    wino = from_dict(TaskRecord, out["winogrande"])
    assert set(wino.correct) == {"acc"} and wino.chance == pytest.approx(0.5)
    assert wino.get("acc") == pytest.approx(sum(wino.outcomes("acc") or []) / 2)
    # the same documents give the same identity: a second model's record pairs with this one
    again = run_tasks(model, tok, ["arc_easy"], data_dir=data_dir, limit=2, bootstrap_iters=10)
    assert again["arc_easy"]["docs_hash"] == arc.docs_hash
    cmp = compare_tasks({"arc_easy": again["arc_easy"]}, {"arc_easy": arc})
    assert cmp.tasks[0].paired and cmp.tasks[0].discordant == [0, 0]


def test_per_document_from_logged_samples() -> None:
    samples = [  # lm-eval's logged samples, out of order, with a second filter that is ignored
        {"doc_id": 1, "filter": "none", "acc": 0.0, "acc_norm": 1.0, "arguments": [1, 2], "doc_hash": "b"},
        {
            "doc_id": 0,
            "filter": "none",
            "acc": 1.0,
            "acc_norm": 1.0,
            "arguments": [1, 2, 3, 4],
            "doc_hash": "a",
        },
        {"doc_id": 0, "filter": "other", "acc": 0.0, "acc_norm": 0.0, "arguments": [1, 2], "doc_hash": "a"},
    ]
    out = per_document(samples, "multiple_choice")
    assert out["correct"] == {"acc": pack_bits([1, 0]), "acc_norm": pack_bits([1, 1])}
    assert out["chance"] == pytest.approx((1 / 4 + 1 / 2) / 2)
    assert per_document(samples[::-1], "multiple_choice") == out  # document order, not logging order
    swapped = [dict(x, doc_hash="c") if x["doc_id"] == 1 else x for x in samples]
    assert per_document(swapped, "multiple_choice")["docs_hash"] != out["docs_hash"]
    lam = per_document([{"doc_id": 0, "acc": 1, "perplexity": -3.2, "arguments": [1]}], "loglikelihood")
    assert lam["correct"] == {"acc": "8"} and lam["chance"] == 0.0
    assert per_document([], "multiple_choice") == {"correct": {}, "docs_hash": None, "chance": None}
