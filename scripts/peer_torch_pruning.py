"""Peer tool for the structured-pruning benchmark: shrink a Llama model's MLP width with torch-pruning.

Runs torch-pruning 1.6.1 (Fang et al., "DepGraph") with its own API and importance criteria, in its own
virtual environment (scripts/setup_peer_venv.sh makes .peer-venv/torch-pruning; torch-pruning is never a
dependency of oneshot). Every decoder layer's MLP goes from intermediate_size I to --intermediate-size
(gate_proj/up_proj output channels and down_proj input channels); attention, hidden size and layer count
stay as they are. The result is a plain Hugging Face folder that AutoModelForCausalLM.from_pretrained loads.

    .peer-venv/torch-pruning/bin/python scripts/peer_torch_pruning.py --model FOLDER --calib-ids calib.pt \\
        --importance taylor|magnitude --intermediate-size 1152 --out OUTFOLDER --json result.json

--calib-ids: a torch.save'd int64 tensor (nsamples, seqlen) of token ids. taylor (tp.importance.
GroupTaylorImportance, |w * dL/dw|) needs it: as in torch-pruning's examples, the LM loss of each window
(batch 1, fp32) is backpropagated and the gradients accumulate over all windows before pruner.step().
magnitude (tp.importance.GroupMagnitudeImportance(p=2), group L2 norm) needs no data.
"""

import argparse
import json
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch_pruning as tp
from transformers import AutoModelForCausalLM, AutoTokenizer


def mlp_shapes_ok(model, inter, hidden, attn_shapes):
    """True when every layer has the pruned MLP shapes and its attention projections unchanged."""
    for layer, attn in zip(model.model.layers, attn_shapes, strict=True):
        mlp = layer.mlp
        if (
            tuple(mlp.gate_proj.weight.shape) != (inter, hidden)
            or tuple(mlp.up_proj.weight.shape) != (inter, hidden)
            or tuple(mlp.down_proj.weight.shape) != (hidden, inter)
        ):
            return False
        if [tuple(p.shape) for p in layer.self_attn.parameters()] != attn:
            return False
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model folder (Llama architecture)")
    ap.add_argument(
        "--calib-ids", help="torch.save'd int64 (nsamples, seqlen) token ids; required for taylor"
    )
    ap.add_argument("--importance", choices=["taylor", "magnitude"], default="taylor")
    ap.add_argument("--intermediate-size", type=int, default=1152)
    ap.add_argument("--out", required=True, help="output folder (save_pretrained)")
    ap.add_argument("--json", help="write a result summary here")
    args = ap.parse_args()
    if args.importance == "taylor" and not args.calib_ids:
        ap.error("--importance taylor needs --calib-ids")

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    cfg = model.config
    hidden, inter0, inter = cfg.hidden_size, cfg.intermediate_size, args.intermediate_size
    if not 0 < inter <= inter0:
        raise SystemExit(f"--intermediate-size must be in (0, {inter0}], got {inter}")
    ratio = 1.0 - inter / inter0  # per-layer (local) pruning ratio of the MLP channel groups
    attn_shapes = [[tuple(p.shape) for p in layer.self_attn.parameters()] for layer in model.model.layers]
    calib = torch.load(args.calib_ids).long() if args.calib_ids else None
    if calib is not None and calib.dim() != 2:
        raise SystemExit(
            f"--calib-ids must be a 2-D (nsamples, seqlen) tensor, got shape {tuple(calib.shape)}"
        )
    example = calib[:1, :32] if calib is not None else torch.arange(1, 33).unsqueeze(0)

    t0 = time.perf_counter()
    if args.importance == "taylor":
        importance = tp.importance.GroupTaylorImportance()
    else:
        importance = tp.importance.GroupMagnitudeImportance(p=2)
    # Only the MLP may be pruned: ignoring every attention projection and the (tied) lm_head makes the
    # attention groups and the hidden-size group (coupled to o_proj by the residual stream) unprunable,
    # so the only groups left are {gate_proj out, up_proj out, down_proj in} of each layer.
    ignored = [model.lm_head, model.model.embed_tokens]
    for layer in model.model.layers:
        ignored += [
            layer.self_attn.q_proj,
            layer.self_attn.k_proj,
            layer.self_attn.v_proj,
            layer.self_attn.o_proj,
        ]
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs=example,
        importance=importance,
        global_pruning=False,
        pruning_ratio=0.0,
        pruning_ratio_dict={layer.mlp.gate_proj: ratio for layer in model.model.layers},
        ignored_layers=ignored,
        output_transform=lambda out: out.logits,
        # RMSNorm weights are plain parameters to torch-pruning; they live on the hidden size (dim 0).
        unwrapped_parameters=[(m.weight, 0) for m in model.modules() if type(m).__name__.endswith("RMSNorm")],
    )
    if args.importance == "taylor":
        # Gradients are needed only on the MLP weights that GroupTaylorImportance reads; freezing the rest
        # saves their weight-gradient work without changing any score.
        mlp_params = {id(p) for layer in model.model.layers for p in layer.mlp.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in mlp_params)
        model.zero_grad()
        for i in range(calib.shape[0]):
            ids = calib[i : i + 1]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            print(
                f"taylor: window {i + 1}/{calib.shape[0]} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    for group in pruner.step(interactive=True):
        group.prune()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)

    if not mlp_shapes_ok(model, inter, hidden, attn_shapes):
        raise SystemExit(f"pruning did not give the intended shapes (MLP -> {inter}, attention unchanged)")
    model.config.intermediate_size = inter
    params = sum(p.numel() for p in model.parameters())
    out = Path(args.out)
    model.save_pretrained(out, safe_serialization=True)
    if any(
        (Path(args.model) / f).exists()
        for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        AutoTokenizer.from_pretrained(args.model).save_pretrained(out)

    # Reload as a plain HF model: no missing, unexpected or mismatched keys, same shapes and same logits.
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise SystemExit(f"reloading {out} reported {bad}")
    if reloaded.config.intermediate_size != inter or not mlp_shapes_ok(
        reloaded.eval(), inter, hidden, attn_shapes
    ):
        raise SystemExit(f"reloaded {out} does not have the pruned shapes")
    with torch.no_grad():
        diff = (model(input_ids=example).logits - reloaded(input_ids=example).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"reloaded {out} gives other logits (max abs diff {diff})")

    result = {
        "tool": "torch-pruning",
        "version": version("torch-pruning"),
        "module_version": tp.__version__,
        "importance": args.importance,
        "seconds": round(seconds, 2),
        "params": params,
        "intermediate_size": inter,
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
