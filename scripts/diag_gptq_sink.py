"""Diagnosis behind `--sink-weight` (issue #14): which layers make GPTQ worse than round-to-nearest on the
embedded SmolLM2, and what weighting the attention sink does.

Every decoder Linear is quantized W4A16 g64 (symmetric unless --asym) from the DENSE model's statistics
(one hooked forward of the calibration windows, no propagation, so every variant sees the same Hessians):
GPTQ on the layer types named by a variant, round-to-nearest on the others; then WikiText-2 perplexity on
the first windows of the test set. The weighted variants add ``w * seqlen`` times each window's first token
to the q/k/v statistics, exactly as `oneshot.stats.InputStats(first_token_weight=w)` does.

    python scripts/diag_gptq_sink.py                     # c4 16 x 1024 calibration, WikiText-2 8 x 512
    python scripts/diag_gptq_sink.py --asym --variants "rtn;gptq;gptq:v_proj;gptq:gate_proj,up_proj+sink0.5"
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from oneshot.data import calibration_windows
from oneshot.eval.corpora import ppl_token_ids
from oneshot.eval.perplexity import perplexity
from oneshot.models import load_model
from oneshot.solvers.gptq import quantize_gptq
from oneshot.solvers.quant import QuantScheme, fake_quantize
from oneshot.walker import find_blocks, find_linears, is_sink_layer

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = (
    "rtn",
    "gptq",
    "gptq:q_proj,k_proj",
    "gptq:v_proj",
    "gptq:o_proj",
    "gptq:gate_proj,up_proj,down_proj",
    "gptq+sink0.5",
    "gptq+sink0.25",
    "gptq+sink1",
)


def _parse(variant: str) -> tuple[set[str], float]:
    """'gptq:v_proj+sink0.5' -> (GPTQ layer kinds, sink weight); 'rtn' -> (none, 0)."""
    head, _, sink = variant.partition("+sink")
    if head == "rtn":
        return set(), 0.0
    kinds = set(head.split(":", 1)[1].split(",")) if ":" in head else set(KINDS)
    return kinds, float(sink) if sink else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants",
        default=";".join(VARIANTS),
        help="';'-separated: rtn, gptq (all layers), gptq:KIND,KIND (those layer types), each with +sinkW",
    )
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--asym", action="store_true")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--data-dir", default=os.environ.get("ONESHOT_DATA_DIR"))
    args = parser.parse_args()
    variants = args.variants.split(";")
    for v in variants:
        if v.partition("+sink")[0].partition(":")[0] not in ("rtn", "gptq"):
            parser.error(f"variant {v!r}: rtn, gptq or gptq:KIND,KIND, optionally +sinkW")
        kinds, _ = _parse(v)
        if not kinds <= set(KINDS):
            parser.error(f"unknown layer kinds in {v!r}: choose from {', '.join(KINDS)}")

    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    calib, _ = calibration_windows(
        "c4", tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=0, data_dir=args.data_dir
    )
    _, blocks = find_blocks(model)
    layers = {n: m for i, b in enumerate(blocks) for n, m in find_linears(b, str(i)).items()}
    sums: dict[str, list] = {}  # name -> [sum x^T x, sum x0^T x0, tokens]

    def hook(name: str):
        def run(_module: torch.nn.Module, inputs: tuple) -> None:
            x = inputs[0].detach().float()  # (batch, seq, cols)
            flat, first = x.reshape(-1, x.shape[-1]), x[:, 0]
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0] = s[0] + flat.T @ flat
            s[1] = s[1] + first.T @ first
            s[2] += flat.shape[0]

        return run

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    t0 = time.perf_counter()
    with torch.no_grad():
        for window in calib:
            model(window[None])
    for h in handles:
        h.remove()
    print(f"dense statistics of {len(layers)} layers: {time.perf_counter() - t0:.0f} s", flush=True)

    scheme = QuantScheme(bits=4, group_size=args.group_size, symmetric=not args.asym)
    ids = ppl_token_ids("wikitext2", tok, args.data_dir)
    original = {n: m.weight.detach().clone() for n, m in layers.items()}
    dense = perplexity(model, ids, seqlen=args.eval_seqlen, limit=args.eval_windows).value
    print(
        f"\nW4A16 g{args.group_size} {'asym' if args.asym else 'sym'}, calibration c4 {args.nsamples} x "
        f"{args.seqlen} (dense statistics), WikiText-2 first {args.eval_windows} x {args.eval_seqlen}; "
        f"dense ppl {dense:.2f}\n"
    )
    print("| variant | GPTQ on | q/k/v first-token weight | ppl | x dense |")
    print("|---|---|---:|---:|---:|")
    for variant in variants:
        kinds, sink = _parse(variant)
        with torch.no_grad():
            for name, layer in layers.items():
                kind = name.rsplit(".", 1)[-1]
                if kind in kinds:
                    xx, x0, n = sums[name]
                    weight = sink * args.seqlen if is_sink_layer(name) else 0.0
                    hessian = (xx + weight * x0) / n
                    new = quantize_gptq(original[name], hessian, scheme, damp=args.damp).weight
                else:
                    new = fake_quantize(original[name], scheme)[0]
                layer.weight.copy_(new)
        ppl = perplexity(model, ids, seqlen=args.eval_seqlen, limit=args.eval_windows).value
        on = (
            "none (round-to-nearest)"
            if not kinds
            else ("all" if kinds == set(KINDS) else ", ".join(sorted(kinds)))
        )
        print(f"| {variant} | {on} | {sink:g} | {ppl:.2f} | {ppl / dense:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
