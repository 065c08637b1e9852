"""Facts, not formulas: numbers and texts that are known independently of this code.

* WikiText-2 (`slow`, the embedded SmolLM2 tokenizer/model): the raw test set joined as the GPTQ/SparseGPT
  protocol does tokenizes to exactly 304,986 tokens, and the dense perplexity of the first 40 windows of
  2048 tokens is 20.384 (the benchmark's ``runs/bench-recover/eval-dense.json`` measured 20.38398).
* Zero-shot tasks (no marker, they only read the data files): one real document of each offline task,
  converted by `local_task_docs`, is compared with the same document as the Hugging Face Hub dataset that
  lm-eval's task config reads holds it. The Hub texts are quoted literally below, each with where it was
  read. Where the local file differs from the Hub the test states the difference explicitly (BoolQ's
  missing ``"Title -- "`` prefix, HellaSwag's merged ``ctx_a``/``ctx_b``, ids not kept).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from oneshot.eval.tasks import LOCAL_TASKS, local_task_docs, local_task_paths

# --- WikiText-2 --------------------------------------------------------------------------------------

WIKITEXT2_TEST_TOKENS = 304_986  # SmolLM2 tokenizer, rows joined with "\n\n", no BOS added
WIKITEXT2_DENSE_PPL_40x2048 = 20.384


@pytest.mark.slow
def test_smollm2_wikitext2_test_set_token_count(smollm2, data_dir: Path) -> None:
    from oneshot.eval.corpora import ppl_token_ids

    ids = ppl_token_ids("wikitext2", smollm2.tokenizer, data_dir)
    assert tuple(ids.shape) == (1, WIKITEXT2_TEST_TOKENS)


@pytest.mark.slow
def test_smollm2_wikitext2_dense_ppl_40_windows(smollm2, data_dir: Path) -> None:
    """Forty full forward passes of 2048 tokens (about two minutes on 2 CPU cores)."""
    from oneshot.eval.corpora import ppl_token_ids
    from oneshot.eval.perplexity import perplexity

    ids = ppl_token_ids("wikitext2", smollm2.tokenizer, data_dir)
    res = perplexity(smollm2.model, ids, 2048, batch_size=1, limit=40)
    assert res.windows == 40 and res.tokens == 40 * 2047
    assert math.isclose(res.value, WIKITEXT2_DENSE_PPL_40x2048, rel_tol=0.0, abs_tol=1e-3), res.value


# --- zero-shot task documents against their Hub text --------------------------------------------------


def _local(name: str, data_dir: Path) -> list[dict[str, Any]]:
    if local_task_paths(name, data_dir) is None:
        pytest.skip(f"{LOCAL_TASKS[name].files[0]} is not in the data directory {data_dir}")
    return local_task_docs(name, data_dir)


def _fields(doc: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: doc[k] for k in keys}


ARC_KEYS = ("question", "choices", "answerKey")

# allenai/ai2_arc, ARC-Easy, test row 0 (id Mercury_417466). Read in the evalscope ARC page (dataset
# allenai/ai2_arc, "Sample Example", metadata id Mercury_417466, target "A"):
# https://evalscope.readthedocs.io/en/v1.6.0/benchmarks/arc.html, and the same item in ARC's own JSON
# layout (question.stem + choices) quoted in a public benchmark overview.
HUB_ARC_EASY_0 = {
    "id": "Mercury_417466",
    "question": "Which statement best explains why photosynthesis is the foundation of most food webs?",
    "choices": {
        "text": [
            "Sunlight is the source of energy for nearly all ecosystems.",
            "Most ecosystems are found on land instead of in water.",
            "Carbon dioxide is more available than other gases.",
            "The producers in all ecosystems are plants.",
        ],
        "label": ["A", "B", "C", "D"],
    },
    "answerKey": "A",
}

# allenai/ai2_arc, ARC-Challenge, test row 0 (id Mercury_7175875). Quoted in the Hub layout by public code
# that loads `load_dataset("ai2_arc", name)["test"]` (docstring "Example data format") and by lm-eval
# sample dumps (gold "C").
HUB_ARC_CHALLENGE_0 = {
    "id": "Mercury_7175875",
    "question": "An astronomer observes that a planet rotates faster after a meteorite impact. "
    "Which is the most likely effect of this increase in rotation?",
    "choices": {
        "text": [
            "Planetary density will decrease.",
            "Planetary years will become longer.",
            "Planetary days will become shorter.",
            "Planetary gravity will become stronger.",
        ],
        "label": ["A", "B", "C", "D"],
    },
    "answerKey": "C",
}


@pytest.mark.parametrize(
    ("name", "hub"), [("arc_easy", HUB_ARC_EASY_0), ("arc_challenge", HUB_ARC_CHALLENGE_0)]
)
def test_arc_first_document_equals_hub(name: str, hub: dict[str, Any], data_dir: Path) -> None:
    local = _local(name, data_dir)[0]
    assert _fields(local, ARC_KEYS) == _fields(hub, ARC_KEYS)
    # The MosaicML conversion keeps no ids; the local id is only the row number.
    assert local["id"] == "local-0" != hub["id"]


# baber/piqa (lm-eval's piqa.yaml; same as ybisk/piqa), validation row 0. goal/sol1/sol2 are the example of
# the PIQA authors' data README, ybisk/ybisk.github.io piqa/data/README.md ("Each item in the jsonl takes
# the form"), which is valid.jsonl line 1; label 0 is valid-labels.lst line 1 (lm-eval sample dumps: gold 0;
# https://evalscope.readthedocs.io/en/v1.6.0/benchmarks/piqa.html: target "A").
HUB_PIQA_0 = {
    "goal": "How do I ready a guinea pig cage for it's new occupants?",
    "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
    "you will also need to supply it with a water bottle and a food dish.",
    "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, "
    "you will also need to supply it with a water bottle and a food dish.",
    "label": 0,
}


def test_piqa_first_document_equals_hub(data_dir: Path) -> None:
    assert _local("piqa", data_dir)[0] == HUB_PIQA_0


# Rowan/hellaswag, validation row 0 (ind 24). The record of rowanz/hellaswag data/hellaswag_val.jsonl line 1
# as quoted in karpathy/llm.c dev/data/hellaswag.py ("Example HellaSwag json item"); the Hub loader keeps
# the fields and makes `label` a string.
HUB_HELLASWAG_0 = {
    "ind": 24,
    "activity_label": "Roof shingle removal",
    "ctx_a": "A man is sitting on a roof.",
    "ctx_b": "he",
    "ctx": "A man is sitting on a roof. he",
    "split": "val",
    "split_type": "indomain",
    "label": "3",
    "endings": [
        "is using wrap to wrap a pair of skis.",
        "is ripping level tiles off.",
        "is holding a rubik's cube.",
        "starts pulling up roofing on a roof.",
    ],
    "source_id": "activitynet~v_-JhWjGDPHMY",
}


def test_hellaswag_first_document_equals_hub_but_for_the_ctx_split(data_dir: Path) -> None:
    from lm_eval.tasks.hellaswag.utils import preprocess

    local = _local("hellaswag", data_dir)[0]
    hub = HUB_HELLASWAG_0
    for key in ("activity_label", "ctx", "endings", "label", "split"):
        assert local[key] == hub[key], key
    # Documented difference: the llama.cpp extraction has no ctx_a/ctx_b boundary, so ctx_b is folded into
    # ctx_a and stays lower-case; lm-eval capitalises ctx_b on the Hub copy.
    assert local["ctx_a"] == hub["ctx_a"] + " " + hub["ctx_b"] and local["ctx_b"] == ""

    def query(doc: dict[str, Any]) -> str:  # lm-eval's hellaswag process_docs
        return preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())

    assert query(hub) == "Roof shingle removal: A man is sitting on a roof. He"
    assert query(local) == "Roof shingle removal: A man is sitting on a roof. he"
    # ind/source_id/split_type are not in the local file.
    assert (local["ind"], local["source_id"], local["split_type"]) == (0, "", "")


# allenai/winogrande, winogrande_xl, validation row 0 (the validation split is shared by all sizes).
# https://evalscope.readthedocs.io/en/v1.6.0/benchmarks/winogrande.html (metadata "winogrande_xs val 0",
# target "B" = answer "2"); the same record in the Hub layout in lm-eval sample dumps.
HUB_WINOGRANDE_0 = {
    "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
    "option1": "Sarah",
    "option2": "Maria",
    "answer": "2",
}


def test_winogrande_first_document_equals_hub(data_dir: Path) -> None:
    assert _local("winogrande", data_dir)[0] == HUB_WINOGRANDE_0


# aps/super_glue, boolq, validation. SuperGLUE's BoolQ passages start with the Wikipedia title and " -- ";
# the MosaicML conversion dropped it. Both Hub texts are lm-eval prompts of the super_glue boolq task found
# in public repositories: row 0 (its full passage in a tokenizer-debugging script that quotes the lm-eval
# BoolQ context, gold 0) and "can u drive in canada with us license" (a dump of lm-eval documents, gold 1).
HUB_BOOLQ_0 = {
    "question": "does ethanol take more energy make that produces",
    "passage": "Ethanol fuel -- All biomass goes through at least some of these steps: it needs to be grown, "
    "collected, dried, fermented, distilled, and burned. All of these steps require resources and an "
    "infrastructure. The total amount of energy input into the process compared to the energy released by "
    "burning the resulting ethanol fuel is known as the energy balance (or ``energy returned on energy "
    "invested''). Figures compiled in a 2007 report by National Geographic Magazine point to modest results "
    "for corn ethanol produced in the US: one unit of fossil-fuel energy is required to create 1.3 energy "
    "units from the resulting ethanol. The energy balance for sugarcane ethanol produced in Brazil is more "
    "favorable, with one unit of fossil-fuel energy required to create 8 from the ethanol. Energy balance "
    "estimates are not easily produced, thus numerous such reports have been generated that are "
    "contradictory. For instance, a separate survey reports that production of ethanol from sugarcane, "
    "which requires a tropical climate to grow productively, returns from 8 to 9 units of energy for each "
    "unit expended, as compared to corn, which only returns about 1.34 units of fuel energy for each unit "
    "of energy expended. A 2006 University of California Berkeley study, after analyzing six separate "
    "studies, concluded that producing ethanol from corn uses much less petroleum than producing gasoline.",
    "label": 0,
}
HUB_BOOLQ_CANADA = {
    "question": "can u drive in canada with us license",
    "passage": "American entry into Canada by land -- Persons driving into Canada must have their vehicle's "
    "registration document and proof of insurance.",
    "label": 1,
}


@pytest.mark.parametrize(
    ("row", "hub", "title"),
    [(0, HUB_BOOLQ_0, "Ethanol fuel"), (8, HUB_BOOLQ_CANADA, "American entry into Canada by land")],
)
def test_boolq_document_equals_hub_without_the_title(
    row: int, hub: dict[str, Any], title: str, data_dir: Path
) -> None:
    local = _local("boolq", data_dir)[row]
    assert (local["question"], local["label"]) == (hub["question"], hub["label"])
    # Documented difference: the local passage lacks SuperGLUE's "Title -- " prefix.
    assert hub["passage"] == title + " -- " + local["passage"]


# allenai/openbookqa, main, test row 0 (id 8-343). The record of OpenBookQA-V1-Sep2018 Data/Main/test.jsonl
# line 1 quoted in public loaders; in the Hub layout (question_stem, choices {text, label}, answerKey "B")
# in lm-eval sample dumps and dataset notes ("row 0 of config=main, split=test has id 8-343, answerKey B").
HUB_OPENBOOKQA_0 = {
    "id": "8-343",
    "question_stem": "A person wants to start saving money so that they can afford a nice vacation at the end of "
    "the year. After looking over their budget and expenses, they decide the best way to save money is to",
    "choices": {
        "text": [
            "make more phone calls",
            "quit eating lunch out",
            "buy less with monopoly money",
            "have lunch with friends",
        ],
        "label": ["A", "B", "C", "D"],
    },
    "answerKey": "B",
}


def test_openbookqa_first_document_equals_hub(data_dir: Path) -> None:
    local = _local("openbookqa", data_dir)[0]
    keys = ("question_stem", "choices", "answerKey")
    assert _fields(local, keys) == _fields(HUB_OPENBOOKQA_0, keys)
    assert local["id"] == "local-0"  # ids are not in the MosaicML conversion


# nyu-mll/glue, rte, validation row 0 (GLUE RTE dev.tsv index 0, label not_entailment = 1). Quoted in
# dmlc/gluon-nlp src/gluonnlp/data/glue.py (GlueRTE('dev')[0], 277 rows) and fastNLP's RTELoader docstring.
HUB_RTE_0 = {
    "sentence1": "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
    "according to the Christopher Reeve Foundation.",
    "sentence2": "Christopher Reeve had an accident.",
    "label": 1,
    "idx": 0,
}


def test_rte_first_document_equals_hub(data_dir: Path) -> None:
    assert _local("rte", data_dir)[0] == HUB_RTE_0


# EleutherAI/lambada_openai, default, test row 0: printed `dataset["test"][0]["text"]` in a public tutorial
# that loads `load_dataset("EleutherAI/lambada_openai")`; the same text is lm-eval's scored prompt + " signs".
HUB_LAMBADA_0 = {
    "text": "In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel.\n\n"
    '"Figured if you\'re going to be out at night getting hit by cars, you might as well have some backup."'
    "\n\nI look at him, feeling stunned. Like this is some sort of sign. But as I stare at Harlin, his mouth "
    "curved in a confident grin, I don't care about signs"
}


def test_lambada_openai_first_document_equals_hub(data_dir: Path) -> None:
    assert _local("lambada_openai", data_dir)[0] == HUB_LAMBADA_0
