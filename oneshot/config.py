"""The configuration of a pruning run, in two frozen parts.

`PruneConfig` is the algorithm (method, sparsity, pattern, solver settings): everything `oneshot.prune`
reads. `RunConfig` is the data and the execution (model, calibration windows, dtype, device, the quick
check, the export). Every field is validated and normalised in ``__post_init__`` so that a config that
exists is a config that can run; bad input raises `ConfigError` (a ``ValueError``) listing the choices.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from oneshot.errors import OneshotError

__all__ = [
    "ALLOCATIONS",
    "DTYPES",
    "EXPORT_FORMATS",
    "METHODS",
    "MIXED_PRECISION",
    "MLP_BIAS_CHOICES",
    "PROPAGATE",
    "QUANT_CLIPS",
    "QUANT_SCHEMES",
    "RECOVER_METHODS",
    "REFIT_TARGETS",
    "SHRINK_SCORES",
    "TARGETS",
    "UNCALIBRATED",
    "AllocationConfig",
    "ConfigError",
    "PruneConfig",
    "QuantConfig",
    "RecoverConfig",
    "RunConfig",
    "ShrinkConfig",
    "parse_pattern",
]

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl", "sensitivity")  # how the sparsity is spread over the layers
DTYPES = ("float32", "bfloat16", "float16")
PROPAGATE = ("pruned", "dense")
UNCALIBRATED = ("magnitude", "dense")
TARGETS = ("local", "dense")  # what each layer reproduces: its own dense output, or the dense model's
EXPORT_FORMATS = ("2:4", "bitmask")
OFFLOAD_MODES = ("auto", "none", "disk")  # --offload: see oneshot.streaming
DEVICES = ("auto", "cpu", "cuda")
SHRINK_SCORES = ("auto", "obs", "activation")
REFIT_TARGETS = ("dense", "layer")
MLP_BIAS_CHOICES = ("auto", "keep")
RECOVER_METHODS = ("blockwise", "distill")
MIXED_PRECISION = ("no", "bf16", "fp16")
# weight-only integer schemes (compressed-tensors' preset names): bits, default group size (None = one scale
# per output channel); the grids themselves are `oneshot.solvers.quant`
QUANT_SCHEMES: dict[str, tuple[int, int | None]] = {"w4a16": (4, 128), "w8a16": (8, None)}
QUANT_GROUP_SIZES = (32, 64, 128)
QUANT_CLIPS = ("minmax", "mse")  # how a group's range is chosen (`oneshot.solvers.quant`)

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class ConfigError(OneshotError, ValueError):
    """An invalid setting; the message lists the valid choices."""


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """Parse ``"unstructured"`` -> None and ``"N:M"`` -> (N, M) with 0 < N < M.

    N:M means N zeros in every M consecutive input weights of a row (2:4 keeps 2 of 4).
    """
    text = str(pattern).strip().lower()
    if text in ("unstructured", "none", ""):
        return None
    match = _NM_RE.match(text)
    if not match:
        raise ConfigError(
            f"invalid pattern {pattern!r}: expected 'unstructured' or 'N:M' with integers 0 < N < M "
            "(e.g. 2:4, 4:8)"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError(
            f"invalid pattern {pattern!r}: N:M needs 0 < N < M (N zeros in every M weights), e.g. 2:4 or 4:8"
        )
    return n, m


# the first token's extra weight (a fraction of the window length) where pruning and quantization use one
DEFAULT_SINK_WEIGHT = 0.5


def _sink_weight(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0.0 <= float(value) <= 16.0):
        raise ConfigError(
            f"sink_weight must be a number in [0, 16] (a fraction of the window length), got {value!r}"
        )


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class PruneConfig:
    """The pruning algorithm: what decides which weights go and how the others change.

    Defaults follow the standard SparseGPT / Wanda protocol (50 % sparsity, damping 0.01, pruned
    activations propagated to the next block). Data and execution settings are in `RunConfig`.
    """

    method: str = "sparsegpt"
    sparsity: float | None = None  # None -> 0.5 for unstructured, N/M for an N:M pattern
    pattern: str = "unstructured"  # "unstructured" or "N:M"
    damp: float = 0.01  # SparseGPT: damping relative to mean(diag(H))
    block_size: int = 128  # SparseGPT: columns per lazy-update block
    ignore: tuple[str, ...] = ()  # fnmatch patterns of weight names to keep dense
    propagate: str = "pruned"  # feed the pruned ("pruned") or the dense ("dense") block outputs forward
    layer_loss: bool = False  # magnitude/Wanda: also build Hessians to report the exact per-layer loss
    # weights that receive no calibration tokens (an MoE expert no token was routed to, a Linear that never
    # runs): "magnitude" prunes them by magnitude with a warning, "dense" keeps them dense (reported)
    uncalibrated: str = "magnitude"
    # "local": each layer reproduces its own output on the pruned model's inputs; "dense": the dense MODEL's
    # output from those inputs (min ||X_dense W^T - X_pruned W'^T||^2, `oneshot.solvers.target`)
    target: str = "local"
    # --target dense: the ridge of the least-squares target W* toward W, relative to mean(diag H) (SparseGPT's
    # --damp stays for its own solve). 0.1 measured better than 0.01 (over-fits) and 1 on SmolLM2 (README)
    target_damp: float = 0.1
    # extra weight of every calibration window's first token (the attention sink) in the q/k/v statistics, as
    # a fraction of the window length (`QuantConfig.sink_weight`); 0 = every token once (the published
    # algorithms). None = `DEFAULT_SINK_WEIGHT` with calibration statistics and the local target, else 0: with
    # SparseGPT it measured 44.25 -> 40.74 at 50 % and 92.40 -> 83.62 at 2:4, Wanda 50 % 46.91 -> 46.76
    # (BENCHMARKS.md). With quantization in the same pass both must agree (`QuantConfig.check_against`).
    sink_weight: float | None = None
    # records written before the field existed were pruned with every token once
    _ABSENT_MEANS: ClassVar[dict[str, Any]] = {"sink_weight": 0.0}

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        method = str(self.method).strip().lower()
        if method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        set_(self, "method", method)

        nm = parse_pattern(self.pattern)
        set_(self, "pattern", "unstructured" if nm is None else f"{nm[0]}:{nm[1]}")
        sparsity = self.sparsity
        if sparsity is not None:
            try:
                sparsity = float(sparsity)
            except (TypeError, ValueError):
                raise ConfigError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}") from None
            if not math.isfinite(sparsity) or not 0.0 <= sparsity < 1.0:
                raise ConfigError(f"sparsity must be a fraction in [0, 1), got {self.sparsity!r}")
        if nm is not None:
            implied = nm[0] / nm[1]
            if sparsity is not None and abs(sparsity - implied) > 1e-9:
                raise ConfigError(
                    f"sparsity {sparsity} contradicts pattern {self.pattern} (which prunes {implied:g}); "
                    f"pass --sparsity {implied:g} or leave it out"
                )
            sparsity = implied
        set_(self, "sparsity", 0.5 if sparsity is None else sparsity)
        _positive_int("block_size", self.block_size)
        if not math.isfinite(float(self.damp)) or float(self.damp) < 0:
            raise ConfigError(f"damp must be a finite number >= 0, got {self.damp!r}")
        set_(self, "damp", float(self.damp))
        if self.propagate not in PROPAGATE:
            raise ConfigError(f"unknown propagate {self.propagate!r}: choose one of {', '.join(PROPAGATE)}")
        if self.uncalibrated not in UNCALIBRATED:
            raise ConfigError(
                f"unknown uncalibrated {self.uncalibrated!r}: choose one of {', '.join(UNCALIBRATED)}"
            )
        if not math.isfinite(float(self.target_damp)) or float(self.target_damp) < 0:
            raise ConfigError(f"target_damp must be a finite number >= 0, got {self.target_damp!r}")
        set_(self, "target_damp", float(self.target_damp))
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}: choose one of {', '.join(TARGETS)}")
        if self.target == "dense" and method == "magnitude":
            raise ConfigError(
                "--target dense needs calibration statistics: use --method sparsegpt or wanda (magnitude "
                "pruning reads no inputs)"
            )
        sink = self.sink_weight
        if sink is None:  # resolved here: the record always holds a number
            sink = DEFAULT_SINK_WEIGHT if self.weights_sink else 0.0
        _sink_weight(sink)
        set_(self, "sink_weight", float(sink))
        if self.target == "dense" and self.sink_weight:
            raise ConfigError(
                "--sink-weight cannot be combined with --target dense (its statistics pair every token with "
                "the dense model's and weight each once): leave --sink-weight out"
            )
        if self.target == "dense" and self.propagate == "dense":
            raise ConfigError(
                "--target dense with --propagate dense: every layer already sees the dense model's inputs, "
                "so the dense target is the local one; drop one of them"
            )
        set_(self, "ignore", tuple(str(p) for p in self.ignore))

    @property
    def nm(self) -> tuple[int, int] | None:
        """The parsed pattern: (N, M) or None for unstructured."""
        return parse_pattern(self.pattern)

    @property
    def weights_sink(self) -> bool:
        """Whether ``sink_weight`` applies: the pruning reads calibration statistics (not magnitude) and
        solves for the local target (``--target dense`` weights every token once)."""
        return self.method != "magnitude" and self.target == "local"

    def replace(self, **changes: Any) -> PruneConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        out = dataclasses.asdict(self)
        out["ignore"] = list(self.ignore)
        return out


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization (`oneshot prune --quantize`, `oneshot quantize`): the scheme and the GPTQ
    solve. Activations stay in 16 bits.

    ``group_size`` None means the scheme's default (w4a16: 128, w8a16: one scale per output channel); -1 asks
    for per-channel scales explicitly (``groups`` is the resolved value). ``symmetric``: signed codes with
    zero-point 0, else unsigned codes with an integer zero-point (pruned weights stay exactly 0 either way).
    ``act_order``: GPTQ takes the columns by descending diag(H) (quantization alone, not with pruning).
    ``damp`` / ``block_size``: the OBS solve (as SparseGPT's).
    ``sink_weight``: extra weight of every calibration window's first token in the statistics of the layers
    that read the attention input (q/k/v), as a fraction of the window length (`SINK_LAYERS`): that token is
    the attention sink most queries attend to, so an error in its value reaches every later token, while an
    unweighted Hessian counts it once among thousands. 0 turns it off (records written before the field
    existed load with 0, which is what they used).
    ``clip``: ``minmax`` (each group's grid spans its weights; what records written before the field existed
    used) or ``mse`` (per group the shrunken range with the least OBS-weighted rounding error,
    `oneshot.solvers.quant`; measured better for GPTQ and unstructured joint passes, worse for a joint 2:4
    pass, whose pruned weights are not known when a group's grid is fixed: BENCHMARKS.md).
    """

    scheme: str = "w4a16"
    group_size: int | None = None
    symmetric: bool = True
    act_order: bool = False
    damp: float = 0.01
    block_size: int = 128
    sink_weight: float = DEFAULT_SINK_WEIGHT
    clip: str = "minmax"

    _ABSENT_MEANS: ClassVar[dict[str, Any]] = {"sink_weight": 0.0}

    def __post_init__(self) -> None:
        scheme = str(self.scheme).strip().lower().replace("_", "-")
        if scheme not in QUANT_SCHEMES:
            raise ConfigError(
                f"unknown quantization scheme {self.scheme!r}: choose one of {', '.join(QUANT_SCHEMES)}"
            )
        object.__setattr__(self, "scheme", scheme)
        group = self.group_size
        if group is not None and (
            isinstance(group, bool) or not isinstance(group, int) or group not in (*QUANT_GROUP_SIZES, -1)
        ):
            raise ConfigError(
                f"unsupported --group-size {group!r}: choose {', '.join(map(str, QUANT_GROUP_SIZES))} or -1 "
                "(one scale per output channel)"
            )
        for name in ("symmetric", "act_order"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _positive_int("block_size", self.block_size)
        if not math.isfinite(float(self.damp)) or float(self.damp) < 0:
            raise ConfigError(f"damp must be a finite number >= 0, got {self.damp!r}")
        object.__setattr__(self, "damp", float(self.damp))
        _sink_weight(self.sink_weight)
        object.__setattr__(self, "sink_weight", float(self.sink_weight))
        if self.clip not in QUANT_CLIPS:
            raise ConfigError(f"unknown --clip {self.clip!r}: choose one of {', '.join(QUANT_CLIPS)}")

    @property
    def bits(self) -> int:
        return QUANT_SCHEMES[self.scheme][0]

    @property
    def groups(self) -> int | None:
        """Input columns per scale after the scheme's default; None = one scale per output channel."""
        if self.group_size is None:
            return QUANT_SCHEMES[self.scheme][1]
        return None if self.group_size == -1 else self.group_size

    @property
    def label(self) -> str:
        """``w4a16 g64 sym``: the scheme, the group size (``ch`` per channel) and the grid, short."""
        group = f"g{self.groups}" if self.groups else "ch"
        return (
            f"{self.scheme} {group} {'sym' if self.symmetric else 'asym'}"
            + (" act-order" if self.act_order else "")
            + (" mse" if self.clip == "mse" else "")
        )

    def check_against(self, prune: PruneConfig) -> None:
        """Settings that must agree with pruning in the same pass: no act-order (the masks follow the original
        column order), and N:M groups inside quantization groups."""
        if self.act_order:
            raise ConfigError(
                "--act-order cannot be combined with pruning (the masks follow the original column order): "
                "prune first, then `oneshot quantize RUN_DIR --act-order`"
            )
        if prune.weights_sink and prune.sink_weight != self.sink_weight:  # else it holds 0 (unused)
            raise ConfigError(
                f"the pruning's sink weight {prune.sink_weight:g} differs from the quantization's "
                f"{self.sink_weight:g}: one statistics pass serves both, give one value"
            )
        nm = prune.nm
        if nm is not None and self.groups is not None and self.groups % nm[1] != 0:
            raise ConfigError(
                f"--group-size {self.groups} is not a multiple of {nm[1]}: every {prune.pattern} group must lie "
                "inside one quantization group"
            )

    def replace(self, **changes: Any) -> QuantConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def _optional_positive_int(flag: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{flag} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ShrinkConfig:
    """Structured pruning (`oneshot shrink`): the target shape and how units are chosen.

    Targets are named as in the model's config; any combination, at least one. ``params`` keeps a fraction
    of the decoder-block parameters with widths, KV heads and the layers to drop chosen from measured costs
    (it may be combined only with ``num_experts``). ``score`` chooses the MLP channels: ``obs`` (greedy
    optimal brain surgeon on the re-fit ``down_proj``), ``activation`` (``||X_j|| * ||W[:, j]||``) or
    ``auto`` (both, per layer the one whose re-fit leaves the smaller reconstruction error).
    """

    intermediate_size: int | None = None
    num_key_value_heads: int | None = None
    drop_layers: int = 0
    params: float | None = None
    num_experts: int | None = None
    score: str = "auto"
    damp: float = 0.001  # of the re-fit and OBS normal equations, relative to mean(diag(H))
    # the MLP re-fit's target: "layer" = the layer's own output on its current inputs; "dense" = that plus the
    # block's deviation from the unshrunk model's block output (earlier blocks' errors included)
    refit_target: str = "layer"
    # "auto": where the config has an mlp_bias switch that is off (Llama, Granite), shrinking the MLP width
    # switches it on so that the removed channels' mean moves into down_proj's bias; "keep": the config stays
    # as it is (the default: "auto" measured no better on SmolLM2, BENCHMARKS.md, and adds biases)
    mlp_bias: str = "keep"

    def __post_init__(self) -> None:
        _optional_positive_int("--intermediate-size", self.intermediate_size)
        _optional_positive_int("--num-key-value-heads", self.num_key_value_heads)
        _optional_positive_int("--num-experts", self.num_experts)
        if (
            isinstance(self.drop_layers, bool)
            or not isinstance(self.drop_layers, int)
            or self.drop_layers < 0
        ):
            raise ConfigError(f"--drop-layers must be an integer >= 0, got {self.drop_layers!r}")
        if self.params is not None:
            try:
                params = float(self.params)
            except (TypeError, ValueError):
                raise ConfigError(f"--params must be a fraction in (0, 1), got {self.params!r}") from None
            if not math.isfinite(params) or not 0.0 < params < 1.0:
                raise ConfigError(f"--params must be a fraction in (0, 1), got {self.params!r}")
            object.__setattr__(self, "params", params)
            explicit = [
                flag
                for flag, value in (
                    ("--intermediate-size", self.intermediate_size),
                    ("--num-key-value-heads", self.num_key_value_heads),
                    ("--drop-layers", self.drop_layers or None),
                )
                if value is not None
            ]
            if explicit:
                raise ConfigError(
                    f"--params chooses the widths and the layers itself: leave out {', '.join(explicit)} "
                    "(or leave out --params)"
                )
        if (
            self.intermediate_size is None
            and self.num_key_value_heads is None
            and not self.drop_layers
            and self.params is None
            and self.num_experts is None
        ):
            raise ConfigError(
                "nothing to shrink: give at least one of --intermediate-size, --num-key-value-heads, "
                "--drop-layers, --params, --num-experts"
            )
        if self.refit_target not in REFIT_TARGETS:
            raise ConfigError(
                f"unknown refit target {self.refit_target!r}: choose one of {', '.join(REFIT_TARGETS)}"
            )
        if self.mlp_bias not in MLP_BIAS_CHOICES:
            raise ConfigError(
                f"unknown mlp_bias {self.mlp_bias!r}: choose one of {', '.join(MLP_BIAS_CHOICES)}"
            )
        if self.score not in SHRINK_SCORES:
            raise ConfigError(f"unknown score {self.score!r}: choose one of {', '.join(SHRINK_SCORES)}")
        if not math.isfinite(float(self.damp)) or float(self.damp) < 0:
            raise ConfigError(f"damp must be a finite number >= 0, got {self.damp!r}")
        object.__setattr__(self, "damp", float(self.damp))

    def replace(self, **changes: Any) -> ShrinkConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunConfig:
    """Data and execution of a run: the model, the calibration windows, dtype, device, the quick check.

    Defaults: the embedded SmolLM2-135M-Instruct, 128 windows of 2048 tokens from C4 with seed 0, float32,
    the GPU when there is one, a quick WikiText-2 check on 8 windows before and after.
    """

    model: str | None = None  # path, Hub id or .gguf file; None -> embedded SmolLM2-135M-Instruct
    calib: str = "c4"  # c4 | wikitext2 | self | PATH | hf:DATASET_ID
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    data_dir: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    batch_size: int = 8  # calibration windows per block forward
    eval_windows: int = 8  # quick WikiText-2 windows before / after pruning (0 skips)
    eval_seqlen: int | None = None  # their length; None -> seqlen
    export: str | None = None  # also write the compressed form for oneshot.kernels: "2:4" | "bitmask"
    offload: str = "auto"  # auto | none | disk: stream the blocks from disk (`oneshot.streaming`)
    offload_share: float = 0.5  # auto streams when the weights exceed this share of the available RAM

    def __post_init__(self) -> None:
        for name in ("nsamples", "seqlen", "batch_size"):
            _positive_int(name, getattr(self, name))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if not _DEVICE_RE.match(str(self.device)):
            raise ConfigError(
                f"unknown device {self.device!r}: choose one of {', '.join(DEVICES)} or cuda:N (e.g. cuda:0)"
            )
        if not str(self.calib).strip():
            raise ConfigError("calib must name a source: c4, wikitext2, self, a file path or hf:DATASET_ID")
        if (
            isinstance(self.eval_windows, bool)
            or not isinstance(self.eval_windows, int)
            or self.eval_windows < 0
        ):
            raise ConfigError(
                f"--eval-windows must be an integer >= 0 (0 skips the quick check), got {self.eval_windows!r}"
            )
        if self.eval_seqlen is not None and (
            isinstance(self.eval_seqlen, bool)
            or not isinstance(self.eval_seqlen, int)
            or self.eval_seqlen < 2
        ):
            raise ConfigError(
                f"--eval-seqlen must be at least 2 tokens, got {self.eval_seqlen!r} (leave it out to use --seqlen)"
            )
        if self.eval_windows > 0 and self.eval_seqlen is None and self.seqlen < 2:
            raise ConfigError(
                "the quick check needs windows of at least 2 tokens: pass --eval-seqlen or --eval-windows 0"
            )
        if self.offload not in OFFLOAD_MODES:
            raise ConfigError(f"unknown --offload {self.offload!r}: choose one of {', '.join(OFFLOAD_MODES)}")
        share = _positive_number("--offload-share", self.offload_share)
        if share > 1:
            raise ConfigError(f"--offload-share must be in (0, 1], got {self.offload_share!r}")
        if self.export is not None and self.export not in EXPORT_FORMATS:
            raise ConfigError(
                f"unknown export format {self.export!r}: choose one of {', '.join(EXPORT_FORMATS)}"
            )

    def check_against(self, prune: PruneConfig) -> None:
        """Settings that must agree with the algorithm: ``--export 2:4`` needs ``--pattern 2:4``."""
        if self.export == "2:4" and prune.pattern != "2:4":
            raise ConfigError(f"--export 2:4 needs --pattern 2:4 (got {prune.pattern}); use --export bitmask")

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def _positive_number(flag: str, value: Any, *, zero: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0 or (number == 0 and not zero):
        raise ConfigError(f"{flag} must be a finite number {'>=' if zero else '>'} 0, got {value!r}")
    return number


@dataclass(frozen=True)
class RecoverConfig:
    """Recovery fine-tuning (`oneshot recover`) of a pruned or shrunk run toward its dense teacher.

    ``blockwise``: block by block, the recovered block's output is fitted (per-token relative MSE) to the
    teacher block's output on the same inputs, the inputs coming through the blocks recovered before it;
    ``epochs`` passes over the windows per block. ``distill``: end to end, KL(teacher || student) on the
    logits plus ``hidden_weight`` times the normalised hidden-state MSE of every block (SquareHead); one
    pass over the windows. Only the decoder blocks are trained (embeddings, final norm and LM head stay as
    they are); pruned weights stay exactly zero. ``tokens`` = windows x ``seqlen`` drawn with ``seed`` from
    ``data`` (same sources as calibration). AdamW with ``lr``, linear warm-up over ``warmup`` of the steps,
    then cosine decay to 10 % of ``lr``.
    """

    method: str = "blockwise"
    data: str = "c4"
    tokens: int = 2_000_000
    seqlen: int = 512
    seed: int = 0
    lr: float = 1e-4
    batch_size: int = 8  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (distill)
    epochs: int = 1  # passes over the windows (per block for blockwise)
    weight_decay: float = 0.0
    warmup: float = 0.05
    hidden_weight: float = 0.0  # distill: weight of the SquareHead hidden-state term (0: logits only)
    mixed_precision: str = "no"  # distill through accelerate: no | bf16 | fp16
    gradient_checkpointing: bool = True  # distill
    checkpoint_minutes: float = 5.0  # resumable state written this often (0: after every step)

    def __post_init__(self) -> None:
        if self.method not in RECOVER_METHODS:
            raise ConfigError(f"unknown method {self.method!r}: choose one of {', '.join(RECOVER_METHODS)}")
        for flag, name in (
            ("--tokens", "tokens"),
            ("--seqlen", "seqlen"),
            ("--batch-size", "batch_size"),
            ("--grad-accum", "grad_accum"),
            ("--epochs", "epochs"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
        if self.seqlen < 2:
            raise ConfigError(f"--seqlen must be at least 2 tokens, got {self.seqlen}")
        if self.tokens < self.seqlen:
            raise ConfigError(
                f"--tokens {self.tokens} is less than one window of --seqlen {self.seqlen} tokens"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"--seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not str(self.data).strip():
            raise ConfigError("--data must name a source: c4, wikitext2, self, a file path or hf:DATASET_ID")
        object.__setattr__(self, "lr", _positive_number("--lr", self.lr))
        object.__setattr__(
            self, "weight_decay", _positive_number("--weight-decay", self.weight_decay, zero=True)
        )
        object.__setattr__(
            self, "hidden_weight", _positive_number("--hidden-weight", self.hidden_weight, zero=True)
        )
        object.__setattr__(
            self,
            "checkpoint_minutes",
            _positive_number("--checkpoint-minutes", self.checkpoint_minutes, zero=True),
        )
        warmup = _positive_number("--warmup", self.warmup, zero=True)
        if warmup >= 1:
            raise ConfigError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup!r}")
        object.__setattr__(self, "warmup", warmup)
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"unknown mixed precision {self.mixed_precision!r}: choose one of {', '.join(MIXED_PRECISION)}"
            )
        if self.method == "blockwise" and (self.hidden_weight or self.grad_accum != 1):
            raise ConfigError("--hidden-weight and --grad-accum are options of --method distill")

    @property
    def windows(self) -> int:
        """Training windows of ``seqlen`` tokens."""
        return self.tokens // self.seqlen

    def replace(self, **changes: Any) -> RecoverConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    def result_fields(self) -> dict[str, Any]:
        """The fields that determine the result (a resumed run must agree on them)."""
        out = self.to_dict()
        out.pop("checkpoint_minutes")
        return out


@dataclass(frozen=True)
class AllocationConfig:
    """How the target sparsity is spread over the weight matrices (`oneshot.allocation`).

    ``uniform``: every matrix at the target. ``owl``: outlier-weighted layerwise sparsity (Yin et al. 2023):
    blocks with more Wanda-score outliers (``> owl_m`` x the block's mean score) are pruned less, within
    ``[s - owl_lambda, s + owl_lambda]``, the parameter-weighted mean exactly ``s``. ``sensitivity``: per
    matrix from measured reconstruction-loss curves (``sensitivity_file``, a `oneshot sensitivity` output, or
    measured on the fly) so that the summed loss is least under the parameter budget. With an N:M pattern a
    matrix is either N:M or kept dense. ``sparsity``: the overall target over the pruned matrices; None = the
    `PruneConfig`'s (with an N:M pattern it may be below N/M: the allocation keeps some matrices dense).
    """

    method: str = "uniform"
    sparsity: float | None = None
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    sensitivity_file: str | None = None

    def __post_init__(self) -> None:
        if self.method not in ALLOCATIONS:
            raise ConfigError(f"unknown allocation {self.method!r}: choose one of {', '.join(ALLOCATIONS)}")
        if self.sparsity is not None:
            try:
                sparsity = float(self.sparsity)
            except (TypeError, ValueError):
                sparsity = math.nan
            if not math.isfinite(sparsity) or not 0.0 <= sparsity < 1.0:
                raise ConfigError(f"sparsity must be a fraction in [0, 1), got {self.sparsity!r}")
            object.__setattr__(self, "sparsity", sparsity)
        object.__setattr__(self, "owl_m", _positive_number("--owl-m", self.owl_m))
        object.__setattr__(self, "owl_lambda", _positive_number("--owl-lambda", self.owl_lambda, zero=True))
        if self.sensitivity_file is not None and self.method != "sensitivity":
            raise ConfigError("--sensitivity-file needs --allocation sensitivity")

    def target(self, prune: PruneConfig) -> float:
        """The overall target sparsity over the pruned matrices."""
        return float(self.sparsity if self.sparsity is not None else prune.sparsity or 0.0)

    def check_against(self, prune: PruneConfig) -> None:
        """Settings that must agree with the pruning: a pattern caps the target at N/M; OWL's sparsities
        ``s + lambda`` must stay below 1; ``uniform`` takes the pruning's own sparsity."""
        target = self.target(prune)
        nm = prune.nm
        if self.method == "uniform":
            if self.sparsity is not None and abs(self.sparsity - float(prune.sparsity or 0.0)) > 1e-12:
                raise ConfigError(
                    f"--allocation uniform prunes every matrix at {prune.sparsity:g}: a target of "
                    f"{self.sparsity:g} needs --allocation owl or sensitivity"
                )
            return
        if nm is not None:
            if target > nm[0] / nm[1] + 1e-12:
                raise ConfigError(
                    f"target sparsity {target:g} is above what pattern {prune.pattern} allows ({nm[0] / nm[1]:g}): "
                    "with a pattern the allocation can only keep whole matrices dense"
                )
            return
        if self.method == "owl" and target + self.owl_lambda >= 1.0:
            raise ConfigError(
                f"--owl-lambda {self.owl_lambda:g} is too large for sparsity {target:g}: the blocks would reach "
                f"{target + self.owl_lambda:g} >= 1; use --owl-lambda below {1.0 - target:g}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return dataclasses.asdict(self)
