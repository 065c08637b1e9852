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

How each local copy differs from the Hub version lm-eval would read is stated per task in
`LocalTask.differences` (recorded in every `TaskRecord` of a local task and shown under the task tables of
the report and the card). In short:

- boolq: NOT identical. SuperGLUE's passages (lm-eval reads ``aps/super_glue``, ``boolq``; its prompt is
  ``"{{passage}}\nQuestion: {{question}}?\nAnswer:"``, task version 2.0) begin with the Wikipedia
  article title and ``" -- "`` ("Persian language -- Persian (...) is one of ..."); MosaicML's copy has
  no such prefix (none of its 3,270 passages starts with a title; issue #13 counted 3,249 of the 3,270
  Hub passages with one, which could not be re-counted offline). The labels are 2,033 "yes" and 1,237
  "no", so always answering "no" scores 0.378: SmolLM2-135M-Instruct's dense 0.385 here is its bias
  towards "no", not a label-mapping error (labels and scoring were checked against lm-eval's own task).
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
- winogrande, rte, lambada_openai, openbookqa, piqa: the conversion back to lm-eval's fields gives the
  requests lm-eval builds from the Hub layout (checked on examples by the tests); fields that only feed
  decontamination (e.g. winogrande's ``sentence`` spacing around the blank) or ids may differ. The
  documents themselves were not compared item by item with the Hub copies (no network).
- The narrowed splits leave no training split, so few-shot prompting (``num_fewshot > 0``) is not
  offered offline; zero-shot, as in the pruning papers.

`run_tasks` also keeps, per task, whether each document was answered correctly (``acc``, ``acc_norm``),
the documents' identity, the chance level, n-shot and the task version, for the paired dense-vs-pruned
comparison of `oneshot.eval.task_compare`.
"""

from __future__ import annotations

import bz2
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from oneshot.data import read_jsonl
from oneshot.eval.corpora import EvalDataError, find_data_file
from oneshot.runfolder import pack_bits

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
    "per_document",
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
    differences: str  # how the local copy differs from the Hub version; the first sentence sums it up


_ARC_DIFF = (
    "Every item has exactly 4 choices, where a few items of the Hub copy have 3 or 5. MosaicML's "
    "conversion does not record how those few items (of allenai/ai2_arc) were cut or padded; answer labels "
    "are rebuilt as A-D and ids as local-<i> (only the index of the answer matters to lm-eval)."
)
_DIFFERENCES = {
    "arc_easy": _ARC_DIFF,
    "arc_challenge": _ARC_DIFF,
    "piqa": (
        "No known difference. The PIQA authors' original files (valid.jsonl, valid-labels.lst) hold the "
        "goal/sol1/sol2/label fields lm-eval reads from baber/piqa."
    ),
    "hellaswag": (
        "Contexts keep ctx_b lower-case and tag-led endings lose a leading space, so scores can differ "
        "slightly from lm-eval on Rowan/hellaswag. llama.cpp's extraction joined ctx_a and ctx_b, so "
        "'... on a roof. he' stays as written where lm-eval capitalises ctx_b ('He'), and an ending that "
        "started with a WikiHow tag such as '[step]' has one leading space where lm-eval keeps two; "
        "ind/source_id/split_type are absent."
    ),
    "winogrande": (
        "No difference in the requests lm-eval builds. MosaicML's partial-evaluation form (the sentence up "
        "to the blank with each option, then the shared continuation) is turned back into "
        "sentence/option1/option2/answer; only the spacing of the rebuilt sentence around the blank (used "
        "for decontamination) may differ from allenai/winogrande."
    ),
    "boolq": (
        "The passages lack SuperGLUE's 'Title -- ' prefix, so scores are not directly comparable with "
        "lm-eval on the Hub copy. lm-eval's prompt '{{passage}}\\nQuestion: {{question}}?\\nAnswer:' on "
        "aps/super_glue (boolq) begins with the Wikipedia article title ('Persian language -- Persian (...) "
        "is one of ...'); MosaicML's copy has none (0 of its 3,270 passages; issue #13 counted 3,249 of the "
        "3,270 Hub passages with the prefix, which could not be re-counted offline). The labels are 2,033 "
        "yes / 1,237 no: always answering 'no' scores 0.378 and always 'yes' 0.622, so a score near 0.38 is a "
        "bias towards 'no', not a label error (labels and scoring were checked against lm-eval's task)."
    ),
    "openbookqa": (
        "No difference in the requests lm-eval builds. MosaicML's conversion keeps question_stem and the 4 "
        "choice texts of allenai/openbookqa (main); answer labels are rebuilt as A-D and ids as local-<i>."
    ),
    "rte": (
        "No difference in the requests lm-eval builds. SuperGLUE's RTE validation file (nyu-mll/jiant) holds "
        "the same 277 premise/hypothesis pairs as GLUE's (nyu-mll/glue, which lm-eval reads); labels are "
        "mapped entailment -> 0, not_entailment -> 1."
    ),
    "lambada_openai": (
        "No difference in the requests lm-eval builds. MosaicML's context/continuation split is joined back "
        "with one space into the text field lm-eval reads from EleutherAI/lambada_openai (context = all but "
        "the last word, target = the last word)."
    ),
}


LOCAL_TASKS: dict[str, LocalTask] = {
    "arc_easy": LocalTask(
        ("tasks/arc/arc_easy_test.llmfoundry.jsonl",),
        "arc/arc_easy.yaml",
        "test",
        _arc,
        _DIFFERENCES["arc_easy"],
    ),
    "arc_challenge": LocalTask(
        ("tasks/arc/arc_challenge_test.llmfoundry.jsonl",),
        "arc/arc_challenge.yaml",
        "test",
        _arc,
        _DIFFERENCES["arc_challenge"],
    ),
    "piqa": LocalTask(
        ("tasks/piqa/valid.jsonl", "tasks/piqa/valid-labels.lst"),
        "piqa/piqa.yaml",
        "validation",
        _piqa,
        _DIFFERENCES["piqa"],
    ),
    "hellaswag": LocalTask(
        ("tasks/hellaswag/hellaswag_val_full.txt.bz2",),
        "hellaswag/hellaswag.yaml",
        "validation",
        _hellaswag,
        _DIFFERENCES["hellaswag"],
    ),
    "winogrande": LocalTask(
        ("tasks/winogrande/winogrande_dev.llmfoundry.jsonl",),
        "winogrande/default.yaml",
        "validation",
        _winogrande,
        _DIFFERENCES["winogrande"],
    ),
    "boolq": LocalTask(
        ("tasks/boolq/boolq_val.llmfoundry.jsonl",),
        "super_glue/boolq/default.yaml",
        "validation",
        _boolq,
        _DIFFERENCES["boolq"],
    ),
    "openbookqa": LocalTask(
        ("tasks/openbookqa/openbookqa_test.llmfoundry.jsonl",),
        "openbookqa/openbookqa.yaml",
        "test",
        _openbookqa,
        _DIFFERENCES["openbookqa"],
    ),
    "rte": LocalTask(
        ("tasks/rte/val.jsonl",), "glue/rte/default.yaml", "validation", _rte, _DIFFERENCES["rte"]
    ),
    "lambada_openai": LocalTask(
        ("tasks/lambada/lambada_openai_test.llmfoundry.jsonl",),
        "lambada/lambada_openai.yaml",
        "test",
        _lambada,
        _DIFFERENCES["lambada_openai"],
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


PER_DOCUMENT = ("acc", "acc_norm")  # the 0/1 metrics kept per document


def per_document(samples: list[dict[str, Any]], output_type: str | None) -> dict[str, Any]:
    """The per-document part of a task's record from lm-eval's logged samples (``log_samples=True``):
    ``correct`` (metric -> `pack_bits` of the 0/1 outcomes in document order), ``docs_hash`` (lm-eval's
    doc and target hashes, in order) and ``chance`` (mean of 1 / choices for a multiple-choice task, 0 for
    other tasks with an accuracy, None without one)."""
    if not samples:
        return {"correct": {}, "docs_hash": None, "chance": None}
    first = samples[0].get("filter", "none")
    keep = "none" if any(s.get("filter", "none") == "none" for s in samples) else first
    by_doc: dict[int, dict[str, Any]] = {}
    for s in samples:
        if s.get("filter", "none") == keep:
            by_doc.setdefault(int(s["doc_id"]), s)
    docs = [by_doc[k] for k in sorted(by_doc)]
    correct = {}
    for metric in PER_DOCUMENT:
        values = [d.get(metric) for d in docs]
        if all(isinstance(v, (int, float)) and v in (0, 1) for v in values):
            correct[metric] = pack_bits([1 if v else 0 for v in values])
    chance: float | None = None
    if output_type == "multiple_choice":
        chance = sum(1.0 / max(1, len(d.get("arguments") or ())) for d in docs) / len(docs)
    elif correct:
        chance = 0.0  # an exact continuation (lambada) is not hit by guessing among a few options
    ids = "\n".join(f"{d.get('doc_hash', '')}:{d.get('target_hash', '')}" for d in docs)
    return {"correct": correct, "docs_hash": hashlib.sha256(ids.encode()).hexdigest()[:16], "chance": chance}


def task_summary(
    name: str,
    result: dict[str, Any],
    n: int,
    limit: int | None,
    source: str,
    *,
    samples: list[dict[str, Any]] | None = None,
    output_type: str | None = None,
    num_fewshot: int | None = None,
    version: Any = None,
) -> dict[str, Any]:
    """One task's record in the oneshot-eval layout (`TaskRecord`): acc, acc_stderr, acc_norm, ... (None
    when absent), n, limit, source, n-shot, task version, the per-document results (`per_document`) and,
    for a local copy, how it differs from the Hub version."""
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
    out.update(num_fewshot=num_fewshot, version=None if version is None else str(version))
    if samples is not None:
        out.update(per_document(samples, output_type))
    local = source.startswith("local") and name in LOCAL_TASKS
    out["differences"] = LOCAL_TASKS[name].differences if local else None
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
    """Zero-shot lm-eval metrics of an in-memory model: ``{task: {acc, acc_stderr, acc_norm, n, ...}}``
    (`task_summary`), with the per-document results of every task (lm-eval's logged samples).

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
        log_samples=True,
    )
    if results is None:  # pragma: no cover - only on non-zero ranks
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, task in run.tasks.items():
        n = results.get("n-samples", {}).get(name, {}).get("effective", 0)
        out[name] = task_summary(
            name,
            results["results"][name],
            n,
            limit,
            run.sources.get(name, "hub"),
            samples=results.get("samples", {}).get(name),
            output_type=getattr(task, "OUTPUT_TYPE", None),
            num_fewshot=results.get("n-shot", {}).get(name),
            version=results.get("versions", {}).get(name),
        )
    return out
