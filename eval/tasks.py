"""Zero-shot lm-eval tasks, offline from the local files of the data directory.

Every task runs through lm-eval's public API (`lm_eval.simple_evaluate` with an `HFLM` wrapping the
in-memory model; tasks built with ``TaskManager.load``, lm-eval >= 0.4.12). For the nine tasks of the
pruning papers the prompts, choices, targets and metrics are lm-eval's own: lm-eval loads its registered
task of the same name, and only *where the documents come from* is overridden, with the group syntax
lm-eval documents for overriding fields of an existing task (`local_task_spec`). The local file
(shared/data layout, SOURCES.md section 4) is converted back to the field layout of the Hub dataset that
config reads and handed to lm-eval as ``custom_dataset``; the split settings are narrowed to the one
split the file holds. Without a local file, any lm-eval task name runs as usual (documents from the Hub
through ``datasets``).

Local file -> lm-eval fields (``local`` = what the file has):

===============  ==========================================  ============================================
task             local file (split)                          converted to (lm-eval config fields)
===============  ==========================================  ============================================
arc_easy         tasks/arc/arc_easy_test.llmfoundry.jsonl    question (query minus "Question: "),
arc_challenge    tasks/arc/arc_challenge_test...jsonl (test)  choices {text, label A-D}, answerKey
piqa             tasks/piqa/valid.jsonl + valid-labels.lst   goal, sol1, sol2, label (original files)
hellaswag        tasks/hellaswag/hellaswag_val_full.txt.bz2  activity_label, ctx_a (= the rest of the
                 (validation)                                context line), ctx_b = "", endings, label
winogrande       tasks/winogrande/winogrande_dev...jsonl     sentence = shared prefix + "_ " +
                 (winogrande_xl validation)                  continuation, option1/2, answer "1"/"2"
boolq            tasks/boolq/boolq_val.llmfoundry.jsonl      passage, question (the query split at its last
                 (validation)                                "\\nQuestion: ", trailing "?" removed), label
openbookqa       tasks/openbookqa/openbookqa_test...jsonl    question_stem, choices {text, label A-D},
                 (test)                                      answerKey
rte              tasks/rte/val.jsonl (SuperGLUE validation)  sentence1 = premise, sentence2 = hypothesis,
                                                             label 0 = entailment / 1 = not_entailment
lambada_openai   tasks/lambada/lambada_openai_test...jsonl   text = context + " " + continuation
===============  ==========================================  ============================================

Known differences from lm-eval on the Hub data (all from the local files, not from the prompts):

- hellaswag: the local file (llama.cpp's extraction) holds ``activity_label + ": " + ctx`` already
  preprocessed, without the ``ctx_a``/``ctx_b`` boundary. lm-eval builds ``ctx_a + " " +
  ctx_b.capitalize()``, so there the first letter of ``ctx_b`` is upper-cased (and the rest of ``ctx_b``
  lower-cased); here ``ctx_b`` stays as written ("... on a roof. he" instead of "... on a roof. He").
  lm-eval's ``preprocess`` then runs a second time on already-cleaned text (a no-op except for runs of
  three or more spaces). An ending that starts with a WikiHow tag (``"[step] ..."``) keeps a leading
  space in lm-eval (its ``preprocess`` strips before removing the tag: continuation ``"  Water..."``)
  while the extractor trimmed it (``" Water..."``). ``ind``/``source_id``/``split_type`` are absent.
  Accuracies can therefore differ slightly from lm-eval on the Hub copy.
- arc_easy / arc_challenge: the MosaicML conversion has exactly 4 choices per item, whereas a few
  original items have 3 or 5; the answer labels are rebuilt as A-D (only their index matters).
- winogrande, boolq, rte, lambada_openai, openbookqa, piqa: contexts, continuations and targets are
  identical to lm-eval's; fields that only feed decontamination (e.g. winogrande's ``sentence`` spacing
  around the blank) or ids may differ.
- The narrowed splits leave no training split, so few-shot prompting (``num_fewshot > 0``) is not
  offered offline; zero-shot, as in the pruning papers.
"""

from __future__ import annotations

import bz2
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from oneshot.data import read_jsonl
from oneshot.eval.corpora import EvalDataError, find_data_file

__all__ = [
    "LOCAL_TASKS",
    "LocalTask",
    "TaskRun",
    "build_tasks",
    "hub_offline",
    "lm_eval_task_manager",
    "local_task_docs",
    "local_task_paths",
    "local_task_spec",
    "run_tasks",
    "task_summary",
    "validate_task_names",
]

logger = logging.getLogger(__name__)

_LETTERS = "ABCDEFGHIJ"


def _multiple_choice(query: str, choices: list[str], gold: int) -> dict[str, Any]:
    labels = list(_LETTERS[: len(choices)])
    return {"choices": {"text": list(choices), "label": labels}, "answerKey": labels[int(gold)]}


def _arc(paths: list[Path]) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(read_jsonl(paths[0])):
        question = row["query"].removeprefix("Question: ")
        out.append(
            {
                "id": f"local-{i}",
                "question": question,
                **_multiple_choice(question, row["choices"], row["gold"]),
            }
        )
    return out


def _openbookqa(paths: list[Path]) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(read_jsonl(paths[0])):
        out.append(
            {
                "id": f"local-{i}",
                "question_stem": row["query"],
                **_multiple_choice(row["query"], row["choices"], row["gold"]),
            }
        )
    return out


def _piqa(paths: list[Path]) -> list[dict[str, Any]]:
    rows = read_jsonl(paths[0])
    labels = [line.strip() for line in paths[1].read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != len(rows):
        raise ValueError(f"{paths[1]} has {len(labels)} labels for the {len(rows)} items of {paths[0]}")
    return [
        {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(lab)}
        for r, lab in zip(rows, labels, strict=True)
    ]


def _hellaswag(paths: list[Path]) -> list[dict[str, Any]]:
    with bz2.open(paths[0], "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{paths[0]}: {len(lines)} lines, not 6 per item")
    out = []
    for i in range(0, len(lines), 6):
        head, label, endings = lines[i], lines[i + 1], lines[i + 2 : i + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep:  # no label prefix: keep the whole line as the context
            activity, ctx = "", head
        out.append(
            {
                "ind": i // 6,
                "activity_label": activity,
                "ctx_a": ctx,
                "ctx_b": "",
                "ctx": ctx,
                "endings": endings,
                "source_id": "",
                "split": "val",
                "split_type": "",
                "label": str(int(label)),
            }
        )
    return out


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _winogrande(paths: list[Path]) -> list[dict[str, Any]]:
    out = []
    for row in read_jsonl(paths[0]):
        first, second = row["context_options"]
        prefix = _common_prefix(first, second)
        cut = prefix.rfind(" ") + 1  # the blank starts a word: split at the last shared space
        sentence = first[:cut] + "_ " + row["continuation"]
        out.append(
            {
                "sentence": sentence,
                "option1": first[cut:],
                "option2": second[cut:],
                "answer": str(int(row["gold"]) + 1),
            }
        )
    return out


def _boolq(paths: list[Path]) -> list[dict[str, Any]]:
    out = []
    for i, row in enumerate(read_jsonl(paths[0])):
        passage, sep, question = row["query"].removeprefix("Passage: ").rpartition("\nQuestion: ")
        if not sep:
            raise ValueError(f"{paths[0]}: item {i} has no '\\nQuestion: ' in its query")
        out.append(
            {"passage": passage, "question": question.removesuffix("?"), "label": int(row["gold"]), "idx": i}
        )
    return out


def _rte(paths: list[Path]) -> list[dict[str, Any]]:
    labels = {"entailment": 0, "not_entailment": 1}
    return [
        {
            "sentence1": r["premise"],
            "sentence2": r["hypothesis"],
            "label": labels[r["label"]],
            "idx": int(r["idx"]),
        }
        for r in read_jsonl(paths[0])
    ]


def _lambada(paths: list[Path]) -> list[dict[str, Any]]:
    return [{"text": r["context"] + " " + r["continuation"]} for r in read_jsonl(paths[0])]


@dataclass(frozen=True)
class LocalTask:
    """Where an lm-eval task's documents live offline and how to turn them into lm-eval's fields."""

    files: tuple[str, ...]  # relative to the data directory; the first is the one reported
    config: str  # lm-eval YAML, relative to lm_eval/tasks
    split: str  # the split name the config evaluates ("test" or "validation")
    convert: Callable[[list[Path]], list[dict[str, Any]]]


LOCAL_TASKS: dict[str, LocalTask] = {
    "arc_easy": LocalTask(("tasks/arc/arc_easy_test.llmfoundry.jsonl",), "arc/arc_easy.yaml", "test", _arc),
    "arc_challenge": LocalTask(
        ("tasks/arc/arc_challenge_test.llmfoundry.jsonl",), "arc/arc_challenge.yaml", "test", _arc
    ),
    "piqa": LocalTask(
        ("tasks/piqa/valid.jsonl", "tasks/piqa/valid-labels.lst"), "piqa/piqa.yaml", "validation", _piqa
    ),
    "hellaswag": LocalTask(
        ("tasks/hellaswag/hellaswag_val_full.txt.bz2",), "hellaswag/hellaswag.yaml", "validation", _hellaswag
    ),
    "winogrande": LocalTask(
        ("tasks/winogrande/winogrande_dev.llmfoundry.jsonl",),
        "winogrande/default.yaml",
        "validation",
        _winogrande,
    ),
    "boolq": LocalTask(
        ("tasks/boolq/boolq_val.llmfoundry.jsonl",), "super_glue/boolq/default.yaml", "validation", _boolq
    ),
    "openbookqa": LocalTask(
        ("tasks/openbookqa/openbookqa_test.llmfoundry.jsonl",),
        "openbookqa/openbookqa.yaml",
        "test",
        _openbookqa,
    ),
    "rte": LocalTask(("tasks/rte/val.jsonl",), "glue/rte/default.yaml", "validation", _rte),
    "lambada_openai": LocalTask(
        ("tasks/lambada/lambada_openai_test.llmfoundry.jsonl",),
        "lambada/lambada_openai.yaml",
        "test",
        _lambada,
    ),
}


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set (1/true/yes): no Hub downloads."""
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes")
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


@lru_cache(maxsize=1)
def lm_eval_task_manager() -> Any:
    """lm-eval's `TaskManager` over every task it ships, cached per process (scanning every YAML takes
    several seconds): the index of known task names, and the loader of tasks read from the Hub."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _empty_task_manager() -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False)


@lru_cache(maxsize=16)
def _folder_task_manager(folder: str) -> Any:
    """A `TaskManager` that indexes only the task YAMLs of one folder (milliseconds, not seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=folder, include_defaults=False)


def _local_task_manager(name: str) -> Any:
    """A `TaskManager` that knows the offline task ``name``: the one of its YAML folder (the full index
    when lm-eval moved the file). ValueError when this lm-eval has no task of that name."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / LOCAL_TASKS[name].config
    if path.is_file():
        manager = _folder_task_manager(str(path.parent))
        if name in manager.all_tasks:
            return manager
    manager = lm_eval_task_manager()
    if name not in manager.all_tasks:
        raise ValueError(
            f"this lm-eval version has no task {name!r} (expected lm_eval/tasks/{LOCAL_TASKS[name].config})"
        )
    return manager


def validate_task_names(names: Sequence[str], data_dir: str | os.PathLike[str] | None = None) -> None:
    """ValueError for a name lm-eval does not know (listing the offline tasks and close matches)."""
    unknown = [n for n in names if n not in LOCAL_TASKS]
    if not unknown:
        return
    known = set(lm_eval_task_manager().all_tasks)
    bad = [n for n in unknown if n not in known]
    if bad:
        import difflib

        hints = sorted({m for n in bad for m in difflib.get_close_matches(n, known, n=3)})
        hint = f"; close matches: {', '.join(hints)}" if hints else ""
        raise ValueError(
            f"unknown task {', '.join(repr(b) for b in bad)}: choose from the offline tasks "
            f"{', '.join(LOCAL_TASKS)} or any of the {len(known)} lm-eval task names "
            f"(`python -m lm_eval ls tasks`){hint}"
        )


def local_task_paths(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path] | None:
    """The local files of an offline task (a name in `LOCAL_TASKS`), in the order of `LocalTask.files`.

    None when the first file is not in the data directory (the task then needs the Hub); EvalDataError
    when the first is there but one of the others is missing beside it."""
    spec = LOCAL_TASKS[name]
    try:
        first = find_data_file(spec.files[0], data_dir)
    except EvalDataError:
        return None
    paths = [first]
    for rel in spec.files[1:]:
        path = first.parents[len(Path(spec.files[0]).parts) - 1] / rel
        if not path.is_file():
            raise EvalDataError(f"missing evaluation data for {name}: expected {path} beside {first}")
        paths.append(path)
    return paths


def local_task_docs(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Documents of an offline task in the field layout of lm-eval's Hub dataset."""
    if name not in LOCAL_TASKS:
        raise ValueError(f"no offline data for task {name!r}: offline tasks are {', '.join(LOCAL_TASKS)}")
    paths = local_task_paths(name, data_dir)
    if paths is None:
        find_data_file(LOCAL_TASKS[name].files[0], data_dir)  # raises with the expected location
        raise AssertionError("unreachable")  # pragma: no cover
    return LOCAL_TASKS[name].convert(paths)


def local_task_spec(name: str, docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The config handed to ``TaskManager.load`` for an offline task: lm-eval's registered task ``name``
    with its documents supplied in memory (one split, no download).

    It is a one-member group whose member overrides fields of the registered task, the syntax lm-eval
    documents for "overriding an existing task's specific config value" in a group (new_task_guide.md),
    so lm-eval itself reads and resolves the task's YAML (includes, ``!function``); only the fields below
    change. The group is a wrapper: `build_tasks` keeps the task alone.
    """
    import datasets

    split = LOCAL_TASKS[name].split

    def _dataset(**_: Any) -> Any:
        return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})

    member = {
        "task": name,
        "custom_dataset": _dataset,
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        "fewshot_split": None,
    }
    return {"group": f"oneshot_offline_{name}", "task": [member]}


@dataclass
class TaskRun:
    """Tasks ready for `lm_eval.simple_evaluate`, with where each one's documents come from."""

    tasks: dict[str, Any]  # name -> lm_eval Task
    sources: dict[str, str]  # name -> "local:<path>" | "hub"


def build_tasks(
    names: Sequence[str], data_dir: str | os.PathLike[str] | None = None, *, limit: int | None = None
) -> TaskRun:
    """lm-eval Task objects: offline tasks from the local files, other names from lm-eval's index/the Hub.

    ``limit`` keeps only the first documents of an offline task (lm-eval's ``limit`` takes the first ones
    too, so the requests are the same and large files are not processed whole for a quick check).

    Raises ValueError for an unknown name and EvalDataError when an offline task's file is missing and
    the Hub is unreachable or disabled (``HF_HUB_OFFLINE=1``).
    """
    validate_task_names(names, data_dir)
    tasks: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in names:
        if name in tasks:
            continue
        paths = local_task_paths(name, data_dir) if name in LOCAL_TASKS else None
        if paths is not None:
            docs = LOCAL_TASKS[name].convert(paths)
            if limit is not None:
                docs = docs[:limit]
            built = _local_task_manager(name).load([local_task_spec(name, docs)])
            loaded = {"tasks": {name: built["tasks"][name]}}  # the task without its wrapping group
            sources[name] = f"local:{paths[0]}"
        else:
            if name in LOCAL_TASKS and hub_offline():
                find_data_file(LOCAL_TASKS[name].files[0], data_dir)  # raises: says which file, where
            try:
                loaded = lm_eval_task_manager().load([name])
            except Exception as exc:
                expected = ""
                if name in LOCAL_TASKS:
                    expected = f" and no local copy: expected {LOCAL_TASKS[name].files[0]} in the data directory (--data-dir or $ONESHOT_DATA_DIR)"
                raise EvalDataError(
                    f"could not load task {name!r} from the Hub{expected} ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''})"
                ) from exc
            sources[name] = "hub"
        for task_name, task in loaded["tasks"].items():
            tasks[task_name] = task
    return TaskRun(tasks, sources)


def _metric(result: dict[str, Any], key: str) -> float | None:
    value = result.get(f"{key},none")
    if isinstance(value, (int, float)):
        return float(value)
    return None


def task_summary(name: str, result: dict[str, Any], n: int, limit: int | None, source: str) -> dict[str, Any]:
    """One task's metrics in the oneshot-eval/1 layout (acc, acc_stderr, acc_norm, ...; None when absent)."""
    out: dict[str, Any] = {
        "acc": _metric(result, "acc"),
        "acc_stderr": _metric(result, "acc_stderr"),
        "acc_norm": _metric(result, "acc_norm"),
        "acc_norm_stderr": _metric(result, "acc_norm_stderr"),
    }
    for key in result:  # any further metric (lambada_openai: perplexity)
        metric, _, filt = key.partition(",")
        if filt == "none" and metric not in out and metric != "alias":
            out[metric] = _metric(result, metric)
    out.update(n=int(n), limit=limit, source=source)
    return out


def run_tasks(
    model: Any,
    tokenizer: Any,
    names: Sequence[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    bootstrap_iters: int = 100_000,
    built: TaskRun | None = None,
) -> dict[str, dict[str, Any]]:
    """Zero-shot lm-eval metrics of an in-memory model: ``{task: {acc, acc_stderr, acc_norm, n, ...}}``.

    The model stays where it is (its device and dtype); ``limit`` caps the documents per task.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    run = built if built is not None else build_tasks(names, data_dir, limit=limit)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=list(run.tasks.values()),
        task_manager=_empty_task_manager(),
        limit=limit,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
    )
    if results is None:  # pragma: no cover - only on non-zero ranks
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name in run.tasks:
        n = results.get("n-samples", {}).get(name, {}).get("effective", 0)
        out[name] = task_summary(name, results["results"][name], n, limit, run.sources.get(name, "hub"))
    return out
