"""`quantize`: group-wise int2..int8 weights (RTN / AWQ / GPTQ), layer-wise mixed precision, embeddings, int8 activations.

What it rewrites (ops from `kernels.quant`, lowered by `kernels.quant.onnx_lowering` and `kernels.quant.tvm_kernel`):
- `aten.linear` (and GPT-2's `addmm` Conv1D) -> `rewrite::linear_q` with packed weights;
- `aten.conv1d/2d` -> `rewrite::dequantize_q` + reshape feeding the same conv (weight-only);
- `aten.embedding` -> `rewrite::embedding_q` (`embeddings: 2 | 3 | 4 | 8`);
- with `activations` and no `weights`, linears -> `rewrite::linear_a8_dynamic` /
  `linear_a8_static` (W8A8, int8 per-channel weights);
- with `activations: {mode: dynamic}` and `weights`, linears -> `rewrite::linear_qa8_dynamic`:
  the weights are quantized as without activations (any width, method, mixed precision) and
  stored packed; the runtime requantizes them per channel to int8 once and runs its int8 GEMM.
  That is how low-bit weights get faster on CPU: onnxruntime's weight-only 4-bit MatMulNBits
  computes in float and is no faster than the fp32 model at encoder batch sizes.
- with `activations: {mode: dynamic, granularity: group}` and 4/8-bit `weights`, linears ->
  `rewrite::linear_qa8_group`: the activations are quantized per token and per K-group of the
  weight's group size (symmetric int8), the packed codes are the compute weight; exactly
  onnxruntime's MatMulNBits int8 compute (accuracy_level 4), which keeps 4 bits in memory and
  was 2.3-3.6x faster than fp32 on SmolLM2's decode shapes, where the per-tensor path above
  (one range for the whole input) loses more accuracy on LLM activations with outlier channels.

Mixed precision (`allocate: layerwise`, the Layer-Wise Quantization method): layers (the
model's repeated blocks) are ranked by a layer importance (`passes.importance.layer`);
every layer starts at the smallest allowed width >= `average`, and the least important
layers are moved one by one to the next lower width until the parameter-weighted average
reaches the target (so the most important layers keep the most bits). `order: random` /
`reverse` are the ablations. Modules outside the blocks are lowered last.
"""
from __future__ import annotations

import fnmatch
import random
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import Field, model_validator
import torch
import torch.fx as fx

from rewrite.kernels import quant as kq
from rewrite.errors import PassError
from rewrite.pass_base import Need, Pass, PassContext, PassResult, Property, register
from rewrite.calibration import observe
from rewrite.program import Program
from rewrite.rules import Rule, RuleOutcome, apply_rules_at
from rewrite.statistics import token_rows
from rewrite.passes.importance import LayerImportance
from rewrite.spec import StrictModel

from . import quantize_methods as qm

aten = torch.ops.aten
LINEAR_OPS = {aten.linear.default}
ADDMM_OPS = {aten.addmm.default}
CONV_OPS = {aten.conv1d.default, aten.conv2d.default}
EMBED_OPS = {aten.embedding.default}


@dataclass
class Target:
    """One weight the pass may quantize."""

    node: fx.Node
    module: str
    kind: str               # linear | addmm | conv | embedding
    weight: str             # get_attr target
    n: int
    k: int
    unit: str = ""          # the layer (block path) it is allocated with
    bits: int = 0
    group_size: int = 0
    stats_of: fx.Node | None = None

    @property
    def numel(self) -> int:
        return self.n * self.k


def _matches(path: str, kind: str, patterns: list[str]) -> bool:
    for p in patterns:
        if p == kind or (p == "linear" and kind == "addmm") or (p in ("conv1d", "conv2d") and kind == "conv") \
                or fnmatch.fnmatchcase(path, p):
            return True
    return False


def find_targets(program: Program, scope: list[str] | None, exclude: list[str], embeddings: bool) -> list[Target]:
    """Linear/conv (and embedding) ops reading a weight parameter, filtered by scope/exclude globs.

    A token table read by several ops (tied to the LM head) is a target of each of them only when every
    reader is selected (`embeddings` set and the head in scope): each reader then gets
    its own packed copy (the table at the embeddings' width, the head at the weights'), which costs two
    4-bit copies instead of one float table. With any reader left float the weight stays float for all
    of them, so a file never holds a float and a packed copy of the same tensor. Linear weights shared
    by many layers (ALBERT) stay float: one copy per reader would outgrow the float tensor.
    """
    out = _candidate_targets(program, scope, exclude, embeddings)
    chosen = {id(t.node) for t in out}
    tables = {id(t.node) for t in out if t.kind == "embedding"}
    keep = []
    for t in out:
        w = weight_arg(t)
        tied_table = all(id(u) in chosen for u in w.users) and any(id(u) in tables for u in w.users)
        if len(w.users) == 1 or tied_table:
            keep.append(t)
    return keep


def _candidate_targets(program: Program, scope: list[str] | None, exclude: list[str], embeddings: bool) -> list[Target]:
    out: list[Target] = []
    for node in program.nodes("call_function"):
        if node.target in LINEAR_OPS:
            kind, w = "linear", node.args[1]
        elif node.target in ADDMM_OPS:
            kind, w = "addmm", node.args[2]
            if len(node.args) > 3 or node.kwargs or not isinstance(node.args[0], fx.Node) or node.args[0].op != "get_attr":
                continue
        elif node.target in CONV_OPS:
            kind, w = "conv", node.args[1]
        elif node.target in EMBED_OPS and embeddings:
            kind, w = "embedding", node.args[0]
        else:
            continue
        if not isinstance(w, fx.Node) or w.op != "get_attr":
            continue  # computed weights stay float (shared ones: see find_targets)
        weight = program.param(w)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            continue
        path = program.module_path(node) or str(w.target).rsplit(".", 1)[0]
        if kind != "embedding":
            patterns = scope if scope is not None else ["linear", "conv"]
            if not _matches(path, kind, patterns) or (exclude and _matches(path, kind, exclude)):
                continue
        elif exclude and _matches(path, kind, exclude):
            continue
        if kind == "addmm":
            k, n = weight.shape
        else:
            n, k = weight.shape[0], int(weight[0].numel())
        out.append(Target(node, path, kind, str(w.target), n, k))
    return out


def effective_group(k: int, group_size: int) -> int:
    """The spec's group size when it divides K; else the largest power-of-two divisor of K below it
    that is >= 16 (the block sizes onnxruntime's MatMulNBits takes); else one group per row.
    SmolLM2's K = 576 with g = 128 fell back to per-channel scales before (groups of 64 now),
    which cost W4 RTN and GPTQ most of their perplexity increase. -1 (or g >= K): one group per row."""
    if group_size == -1 or group_size >= k:
        return k
    if k % group_size == 0:
        return group_size
    pow2 = [d for d in range(group_size, 15, -1) if k % d == 0 and d & (d - 1) == 0]
    return pow2[0] if pow2 else k


def float_weight(program: Program, t: Target) -> torch.Tensor:
    w = program.param(t.weight).detach().to(torch.float32)
    return w.T.contiguous() if t.kind == "addmm" else w.reshape(t.n, t.k)


# ----------------------------------------------------------------------------- allocation
@dataclass
class Allocation:
    bits: dict[str, int]                      # unit -> width
    scores: dict[str, float]                  # unit -> importance (nan when unscored)
    rank: dict[str, int]                      # unit -> position in the lowering order (0 = lowered first)
    average: float
    notes: list[str] = field(default_factory=list)


def allocate_layerwise(units: dict[str, int], scores: dict[str, float], widths: list[int], average: float,
                       order: str = "importance", seed: int = 0, protected: set[str] = frozenset()) -> Allocation:
    """Assign a width per unit so that the numel-weighted average is <= `average`, as close as units allow.

    `units`: unit -> number of quantized weights. All units start at the smallest width >= average
    (`hi`); units are moved to the largest width < hi (`lo`) least important first (`order`:
    importance = ascending score, reverse = descending, random = shuffled with `seed`), as long
    as the average stays >= the target; a unit whose move would undershoot is skipped. If the
    target is still not reached, the skipped unit whose move lands closest below it is moved.
    `protected` units (no score, outside the blocks) come after every scored unit.
    """
    widths = sorted(set(widths))
    hi = min(w for w in widths if w >= average - 1e-9)
    lower = [w for w in widths if w < hi]
    lo = max(lower) if lower else hi
    scored = [u for u in units if u not in protected]
    if order == "importance":
        seq = sorted(scored, key=lambda u: (scores.get(u, 0.0), u))
    elif order == "reverse":
        seq = sorted(scored, key=lambda u: (-scores.get(u, 0.0), u))
    elif order == "random":
        seq = sorted(scored)
        random.Random(seed).shuffle(seq)
    else:
        raise PassError(f"unknown order {order!r}: use importance, random or reverse")
    seq += sorted(u for u in units if u in protected)
    bits = {u: hi for u in units}
    total = sum(units.values())

    def avg() -> float:
        return sum(bits[u] * units[u] for u in units) / max(total, 1)

    skipped = []
    for u in seq:  # lower in order while the average stays at or above the target
        if avg() <= average + 1e-9:
            break
        bits[u] = lo
        if avg() < average - 1e-9:
            bits[u] = hi
            skipped.append(u)
    if avg() > average + 1e-9 and skipped:
        # one more unit must go down: the one landing closest below the target (first in order on ties)
        def landing(u: str) -> float:
            return avg() - (hi - lo) * units[u] / max(total, 1)

        bits[max(skipped, key=lambda u: (landing(u), -seq.index(u)))] = lo
    return Allocation(bits, {u: scores.get(u, float("nan")) for u in units}, {u: i for i, u in enumerate(seq)}, avg())


def layer_units(program: Program, targets: list[Target]) -> dict[str, str]:
    """module -> the block it belongs to (its own path when outside every block)."""
    blocks = [b.path for b in program.blocks()]
    out = {}
    for t in targets:
        unit = next((b for b in blocks if t.module == b or t.module.startswith(b + ".")), t.module)
        out[t.module] = unit
    return out


def unit_scores(program: Program, ctx: PassContext, kind: str, units: set[str], modules: list[str]) -> tuple[dict[str, float], str]:
    """Importance per unit from rewrite.passes.importance.layer (blocks), or per module when there are no blocks."""
    from .importance.layer import layer_scores, module_outlier_fraction

    try:
        scores = layer_scores(program, list(ctx.calibration.batches), kind, granularity="block", original=ctx.original)
        scores = {k: v for k, v in scores.items() if k in units}
        if scores:
            return scores, f"layer importance {kind} over {len(scores)} blocks"
    except PassError:
        pass
    scores = module_outlier_fraction(program, modules)
    return {k: v for k, v in scores.items() if k in units}, "per-module outlier_fraction (the model has no repeated blocks)"


# ----------------------------------------------------------------------------- statistics
class _InputCollector:
    """`qm.InputStats` of each linear input over real tokens only: the shared padding policy
    (`rewrite.statistics.token_rows`), so GPTQ's X^T X, AWQ's saliency and sample, SmoothQuant's
    abs-max and static ranges never count padding."""

    def __init__(self, program: Program, inputs: dict[fx.Node, int], want_gram: bool, token_weight: str = "uniform",
                 clip_norms: float = qm.DEFAULT_CLIP_NORMS):
        self.program, self.want_gram = program, want_gram
        self.stats: dict[fx.Node, qm.InputStats] = {n: qm.InputStats(k, token_weight=token_weight, clip_norms=clip_norms)
                                                    for n, k in inputs.items()}

    def nodes(self, program: Program) -> list[fx.Node]:
        return list(self.stats)

    def update(self, node: fx.Node, value: Any, batch: Any) -> None:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            rows = token_rows(self.program, node, value, batch)
            if rows.shape[0]:
                self.stats[node].update(rows, self.want_gram)


def input_statistics(program: Program, batches: list[Any], inputs: dict[fx.Node, int], *,
                     want_gram: bool, token_weight: str = "uniform",
                     clip_norms: float = qm.DEFAULT_CLIP_NORMS) -> dict[fx.Node, qm.InputStats]:
    """One calibration run: `qm.InputStats` per linear input node (node -> its last-dim size K)."""
    col = _InputCollector(program, inputs, want_gram, token_weight, clip_norms)
    observe(program, batches, [col], desc="quantize: calibrating")
    return col.stats


def _out_err(w: torch.Tensor, w_hat: torch.Tensor, hs: qm.InputStats) -> float:
    """Summed squared output error tr(dW X^T X dW^T) on the statistics' tokens."""
    d = (w_hat - w).to(torch.float32)
    return float(((d @ hs.hessian) * d).sum())


GPTQ_TOKENS_PER_INPUT = 1
"""GPTQ's X^T X over K inputs is rank-deficient with fewer than K tokens; the pass warns below that."""


def gptq_damp(k: int, tokens: int, base: float = 0.01) -> float:
    """GPTQ's damping grows as the data shrinks: base x max(1, inputs / tokens)."""
    return base * max(1.0, k / max(tokens, 1))


def calibration_warnings(method: str, layers: list[Target], stats: dict[fx.Node, qm.InputStats]) -> list[str]:
    """One note when a fitted method saw too few real tokens for its widest input, naming how many more."""
    short = []
    for t in layers:
        st = stats.get(t.stats_of) if t.stats_of is not None else None
        if st is not None and st.rows < GPTQ_TOKENS_PER_INPUT * t.k:
            short.append((GPTQ_TOKENS_PER_INPUT * t.k - st.rows, t))
    if not short or method not in ("gptq", "awq"):
        return []
    more, t = max(short, key=lambda p: p[0])
    return [f"{method}: {len(short)} layers saw fewer real calibration tokens than inputs ({t.module}: "
            f"{t.k} inputs); about {more} more real tokens would make X^T X full rank (the fit is damped and "
            "checked against RTN until then)"]


# ----------------------------------------------------------------------------- the pass
# --------------------------------------------------------------------------- spec
class QuantWeightsSpec(StrictModel):
    bits: Union[Literal[2, 3, 4, 8], list[Literal[2, 3, 4, 8]]] = 4
    average: Annotated[float | None, Field(ge=2.0, le=8.0)] = None
    """Target average bits over quantized weights (fractional allowed); needs a list of bits."""
    group_size: Annotated[int, Field(ge=-1)] = 128
    """Weights per scale along the input dimension; -1 for one scale per output channel."""
    symmetric: bool = False

    @model_validator(mode="after")
    def _check(self) -> "QuantWeightsSpec":
        if self.group_size == 0:
            raise ValueError("group_size must be positive, or -1 for per-channel")
        if self.average is not None:
            if not isinstance(self.bits, list) or len(self.bits) < 2:
                raise ValueError("average needs bits to be a list of at least two widths, e.g. [2, 4, 8]")
            if not min(self.bits) <= self.average <= max(self.bits):
                raise ValueError(f"average {self.average} is outside the allowed widths {self.bits}")
        return self


class ActivationQuantSpec(StrictModel):
    mode: Literal["static", "dynamic"] = "dynamic"
    bits: Literal[8] = 8
    granularity: Literal["tensor", "group"] = "tensor"
    """tensor: one uint8 range per call (ONNX DynamicQuantizeLinear / QuantizeLinear). group (dynamic,
    with 4- or 8-bit `weights`): symmetric int8 per token and per K-group of the weights' group size,
    onnxruntime's MatMulNBits int8 compute (accuracy_level 4); the packed weight is the compute weight."""
    smoothquant: Annotated[float | None, Field(ge=0.0, le=1.0)] = None
    """Migration strength alpha of SmoothQuant; None disables it."""


class GPTQSpec(StrictModel):
    """Options of `method: gptq`."""

    sequential: bool = False
    """Measure each layer's Hessian on the outputs of the already-quantized layers (the GPTQ paper's
    procedure); false (default): every Hessian from one run of the float model, each layer's fit checked
    against RTN on held-back batches. With `target: float` the held-back batches run alongside on the
    same quantized prefix and each layer keeps the candidate closest to the float output on them (the
    float-target fit, the own-output fit, RTN); plain sequential is not checked yet (it matches the
    block-by-block pipeline's GPTQ exactly). Opt-in (the LLM specs use it); on SmolLM2 W4 (uniform
    token weights) it measured a tie with one-shot RTN (41.36 vs 41.01 ppl)."""
    act_order: bool = False
    """Quantize columns in order of decreasing Hessian diagonal (groups stay contiguous in the original order)."""
    damp: Annotated[float, Field(gt=0.0, le=1.0)] = 0.01
    """Added to the Hessian's diagonal, relative to its mean."""
    clip_search: bool = False
    """Choose each group's range (shrunk from min/max by 1.0 .. 0.5) by the smallest quantization error
    weighted by the Hessian diagonal (the inputs' second moment per column), when the sweep reaches the
    group (with act_order: up front, from the float weights)."""
    target: Literal["quantized", "float"] = "quantized"
    """With sequential: what each layer is fitted to reproduce on the inputs the quantized prefix gives it.
    quantized (the GPTQ paper): its own output on those inputs (W X); float: the float model's output
    (W X_float), so each layer also corrects the drift of the layers before it (the float graph runs
    alongside the calibration, twice the forward work; `quantize_methods.drift_corrected`)."""
    refit_rounds: Annotated[int, Field(ge=0, le=16)] = 0
    """Rounds of refitting each row's group scales to GPTQ's codes by least squares on the calibration
    Hessian, each but the last followed by GPTQ again on the refitted grid (`quantize_methods.gptq_refined`);
    0: plain GPTQ. Each round costs one more GPTQ per layer."""
    token_weight: Literal["uniform", "normalized", "clipped"] = "uniform"
    """How each calibration token counts in X^T X: uniform (plain GPTQ); normalized: every token by
    (median norm / its norm)^2, so GPTQ minimises relative output error per token (decoders' large
    tokens otherwise dominate the fit); clipped: only tokens above `clip_norms` x the median norm are
    scaled down."""
    clip_norms: Annotated[float, Field(gt=0.0)] = qm.DEFAULT_CLIP_NORMS
    """With token_weight clipped: a token counts at most like one at this many times the median token
    norm (its row weight is (clip_norms x median / norm)^2 above that, 1 below)."""


class QuantizeSpec(StrictModel):
    """Weight-only group-wise quantization (mixed precision optional), embeddings, activations."""

    kind: Literal["quantize"] = "quantize"
    weights: QuantWeightsSpec | None = QuantWeightsSpec()
    method: Literal["rtn", "awq", "gptq"] = "rtn"
    gptq: GPTQSpec = GPTQSpec()
    allocate: Literal["uniform", "layerwise"] = "uniform"
    importance: LayerImportance = "outlier_fraction"
    order: Literal["importance", "random", "reverse"] = "importance"
    seed: int = 0
    scope: list[str] | None = None
    exclude: list[str] = []
    embeddings: Literal[None, 2, 3, 4, 8] = None
    embeddings_group_size: Annotated[int | None, Field(ge=-1)] = None
    """Group size of embedding tables along the embedding dim (-1: one group per row); None: weights.group_size."""
    activations: ActivationQuantSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> "QuantizeSpec":
        if self.weights is None and self.embeddings is None and self.activations is None:
            raise ValueError("nothing to quantize: give weights, embeddings or activations")
        if self.allocate == "layerwise" and (self.weights is None or not isinstance(self.weights.bits, list)):
            raise ValueError("allocate 'layerwise' needs weights.bits to be a list, e.g. [2, 4, 8]")
        return self


# ----------------------------------------------------------------------------- the replacements, as rules
@dataclass
class Replacement:
    """What one target op becomes: the `rewrite::` op `op`, reading `tensors` (stored as buffers next to
    the weight, by suffix, in the op's argument order) after the op's input, then (linears) the bias,
    then `literals` (bits, group size)."""

    target: Target
    op: Any
    tensors: dict[str, torch.Tensor]
    literals: tuple[Any, ...] = ()

    @property
    def stored_bytes(self) -> int:
        """What the rewritten op stores in place of the weight."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def packed_tensors(qz: qm.Quantized, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """A packed weight's stored tensors (codes, scales, zero points), then `extra` (e.g. an int8 weight scale)."""
    return {"q": qz.qweight, "scales": qz.scales, "zeros": qz.zeros, **extra}


def weight_arg(t: Target) -> Any:
    """The argument through which `t`'s op reads its weight."""
    return t.node.args[2] if t.kind == "addmm" else t.node.args[0] if t.kind == "embedding" else t.node.args[1]


def op_input(t: Target) -> Any:
    """The activation (linear, conv) or the ids (embedding) the op reads."""
    return t.node.args[1] if t.kind in ("addmm", "embedding") else t.node.args[0]


def op_bias(t: Target) -> Any:
    """A linear's bias argument (None without one)."""
    args = t.node.args
    return (args[2] if len(args) > 2 else None) if t.kind == "linear" else args[0]


def register_tensors(program: Program, t: Target, tensors: dict[str, torch.Tensor]) -> dict[str, fx.Node]:
    """Register the quantized tensors next to the weight (same module) and read them with get_attr."""
    owner_path = t.weight.rsplit(".", 1)[0] if "." in t.weight else ""
    owner = program.module.get_submodule(owner_path) if owner_path else program.module
    base = t.weight.rsplit(".", 1)[-1]
    nodes = {}
    for suffix, value in tensors.items():
        name = f"{base}_{suffix}"
        while hasattr(owner, name):  # a tied weight's second reader gets its own buffers
            name += "_"
        owner.register_buffer(name, value.detach().contiguous())
        target = f"{owner_path}.{name}" if owner_path else name
        with program.graph.inserting_before(t.node):
            node = program.graph.get_attr(target)
        node.meta["val"] = value
        nodes[suffix] = node
        program.notes.setdefault("logical_numel", {})[target] = t.numel if suffix == "q" else 0
    return nodes


@dataclass
class RewriteContext:
    """The rules' context: the program and what each target node becomes."""

    program: Program
    at: dict[fx.Node, Replacement] = field(default_factory=dict)


def _reads_its_weight(node: fx.Node, ctx: RewriteContext) -> str | None:
    t = ctx.at[node].target
    w = weight_arg(t)
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and w.target == t.weight):
        return f"the op no longer reads its weight {t.weight} directly (an earlier rewrite changed it)"
    return None


def _replace_op(node: fx.Node, ctx: RewriteContext) -> dict[str, Any]:
    """A linear or embedding becomes one `rewrite::` op: (input, *tensors, [bias], *literals)."""
    r = ctx.at[node]
    nodes = register_tensors(ctx.program, r.target, r.tensors)
    bias = (op_bias(r.target),) if r.target.kind in ("linear", "addmm") else ()
    with ctx.program.graph.inserting_before(node):
        new = ctx.program.graph.call_function(r.op, (op_input(r.target), *nodes.values(), *bias, *r.literals))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    ctx.program.graph.erase_node(node)
    return {"op": str(r.op), "bytes": r.stored_bytes}


def _replace_conv_weight(node: fx.Node, ctx: RewriteContext) -> dict[str, Any]:
    """A conv keeps its op and reads its weight dequantized in the graph (`rewrite::dequantize_q`)."""
    r = ctx.at[node]
    graph = ctx.program.graph
    nodes = register_tensors(ctx.program, r.target, r.tensors)
    shape = list(ctx.program.param(r.target.weight).shape)
    with graph.inserting_before(node):
        deq = graph.call_function(r.op, (*nodes.values(), *r.literals))
        deq.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        w = graph.call_function(aten.reshape.default, (deq, shape))
        w.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    old_w = node.args[1]
    node.args = (node.args[0], w, *node.args[2:])
    if not old_w.users:
        graph.erase_node(old_w)
    return {"op": str(r.op), "bytes": r.stored_bytes}


def _targeted(kinds: tuple[str, ...]) -> Callable[[fx.Node, RewriteContext], bool]:
    return lambda node, ctx: node in ctx.at and ctx.at[node].target.kind in kinds


QUANTIZED_OP: Rule[RewriteContext] = Rule(
    "quantized op", (aten.linear.default, aten.addmm.default, aten.embedding.default),
    match=_targeted(("linear", "addmm", "embedding")), check=_reads_its_weight, replace=_replace_op)
QUANTIZED_CONV_WEIGHT: Rule[RewriteContext] = Rule(
    "quantized conv weight", tuple(CONV_OPS), match=_targeted(("conv",)), check=_reads_its_weight,
    replace=_replace_conv_weight)
RULES = (QUANTIZED_OP, QUANTIZED_CONV_WEIGHT)


@register
class QuantizePass(Pass):
    spec_class = QuantizeSpec
    establishes = frozenset({Property.QUANTIZED})
    requires_absent = {Property.QUANTIZED: "the weights are already quantized (packed); quantize once, last"}

    def needs(self) -> dict[Need, str]:
        """Calibration for a data-driven method, static activation ranges or SmoothQuant, or a
        layerwise allocation by a data-driven layer importance; RTN weights alone need none."""
        s = self.spec
        needs_data = []
        if s.weights is not None and s.method in ("awq", "gptq"):
            needs_data.append(f"method {s.method}")
        if s.activations is not None and (s.activations.mode == "static" or s.activations.smoothquant is not None):
            needs_data.append("static activation ranges / smoothquant")
        if s.allocate == "layerwise" and s.importance != "outlier_fraction":
            needs_data.append(f"layer importance {s.importance}")
        return {Need.CALIBRATION: ", ".join(needs_data)} if needs_data else {}

    def check(self, program: Program, ctx: PassContext) -> None:
        s = self.spec
        w = s.weights
        if s.allocate == "uniform" and w is not None and isinstance(w.bits, list):
            raise PassError(f"weights.bits is a list {w.bits} but allocate is 'uniform': give one width "
                            "(bits: 4) or set allocate: layerwise with an average")
        if s.allocate == "layerwise" and (w is None or w.average is None):
            raise PassError("allocate 'layerwise' needs weights.average (the target average bits, e.g. 3.5)")
        if s.activations is not None and w is not None and s.activations.mode != "dynamic":
            raise PassError("static int8 activations run with int8 per-channel weights only: leave weights out "
                            "(weights: null), or use activations.mode: dynamic to run low-bit weights in int8")
        if s.activations is not None and s.activations.granularity == "group":
            self._check_group_activations()
        if s.method == "gptq" and s.gptq.target == "float" and not s.gptq.sequential:
            raise PassError("gptq.target 'float' fits each layer to the float model's output on the inputs the "
                            "quantized prefix produces: set gptq.sequential: true, or target: quantized")
        if s.activations is not None and s.activations.smoothquant is not None and w is not None and s.method == "awq":
            raise PassError("smoothquant and method 'awq' both rescale input channels: choose one "
                            "(method: rtn or gptq with smoothquant, or drop smoothquant)")

    def _check_group_activations(self) -> None:
        """`granularity: group` quantizes activations per group of the weights' groups, on the
        runtime's int8 kernel for packed 4/8-bit weights: the combinations it cannot run fail here."""
        s = self.spec
        if s.activations.mode != "dynamic":
            raise PassError("activations.granularity 'group' is dynamic (ranges measured per token on each call): "
                            "use activations.mode: dynamic, or granularity: tensor for static ranges")
        if s.weights is None:
            raise PassError("activations.granularity 'group' quantizes activations per group of the weights' "
                            "groups: give weights (bits: 4 or 8, group_size: 128), or use granularity: tensor")
        widths = s.weights.bits if isinstance(s.weights.bits, list) else [s.weights.bits]
        bad = [b for b in widths if not kq.group_int8_supported(b, 16)]
        if bad:
            raise PassError(f"activations.granularity 'group' runs 4- or 8-bit weights (onnxruntime's MatMulNBits "
                            f"int8 compute), not {bad} bits: use weights.bits 4 or 8, or granularity: tensor")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        s = self.spec
        notes: list[str] = []
        logical = program.notes.setdefault("logical_numel", {})
        do_weights = s.weights is not None or s.activations is not None
        targets = find_targets(program, s.scope, s.exclude, embeddings=s.embeddings is not None)
        layers = [t for t in targets if t.kind != "embedding"] if do_weights else []
        embeds = [t for t in targets if t.kind == "embedding"]
        if not layers and not embeds:
            raise PassError("quantize found nothing to quantize: no linear/conv weight matches scope "
                            f"{s.scope or ['linear', 'conv']} (exclude {s.exclude}); check the module globs")
        symmetric = s.weights.symmetric if s.weights is not None else True
        group = s.weights.group_size if s.weights is not None else -1
        rows: list[dict[str, Any]] = []
        assignment: list[dict[str, Any]] = []

        # -- widths per layer (int8 activations without `weights`: plain int8 per-channel weights)
        if s.activations is not None and s.weights is None:
            for t in layers:
                t.bits, t.group_size = 8, t.k
        elif s.allocate == "layerwise":
            unit_of = layer_units(program, layers)
            for t in layers:
                t.unit = unit_of[t.module]
            units: dict[str, int] = {}
            for t in layers:
                units[t.unit] = units.get(t.unit, 0) + t.numel
            scores, how = unit_scores(program, ctx, s.importance, set(units), [t.module for t in layers])
            protected = {u for u in units if u not in scores}
            alloc = allocate_layerwise(units, scores, list(s.weights.bits), s.weights.average, s.order, s.seed, protected)
            for t in layers:
                t.bits = alloc.bits[t.unit]
            notes.append(f"mixed precision: {how}, order {s.order}; average {alloc.average:.3f} bits over "
                         f"{sum(units.values())} weights (target {s.weights.average})"
                         + (f"; {len(protected)} modules outside the blocks lowered last" if protected else ""))
            for u in sorted(units, key=lambda u: alloc.rank[u]):
                assignment.append({"layer": u, "importance": round(alloc.scores[u], 5), "lowered_rank": alloc.rank[u],
                                   "bits": alloc.bits[u], "weights": units[u]})
            program.notes.setdefault("quantize", {})["allocation"] = {u: alloc.bits[u] for u in units}
        else:
            for t in layers:
                t.bits = int(s.weights.bits)
        for t in layers:
            if not t.group_size:
                t.group_size = effective_group(t.k, group)
        if s.activations is not None and s.activations.granularity == "group":
            for t in layers:
                if t.kind in ("linear", "addmm") and not kq.group_int8_supported(t.bits, t.group_size):
                    raise PassError(f"{t.module}: activations.granularity 'group' needs a power-of-two weight group "
                                    f">= 16 dividing K={t.k}, got {t.group_size} (from group_size {group}): set "
                                    "weights.group_size to a power of two dividing K, or exclude the module")
        changed = sorted({(t.k, t.group_size) for t in layers if group != -1 and t.k > group and t.group_size != group})
        if changed:
            notes.append(f"group_size {group} does not divide K for some layers: " +
                         ", ".join(f"K={k} uses groups of {g}" for k, g in changed))

        # -- calibration statistics (one run) for AWQ / GPTQ / activations
        stats: dict[fx.Node, qm.InputStats] = {}
        pre: dict[fx.Node, qm.Quantized] = {}   # GPTQ results computed during the sequential calibration run
        want_stats = (s.weights is not None and s.method in ("awq", "gptq")) or s.activations is not None
        if want_stats and not ctx.calibration.from_example:
            inputs = {op_input(t): t.k for t in layers if t.kind in ("linear", "addmm")}
            if s.weights is not None and s.method == "gptq" and s.gptq.sequential and not self._smoothquant():
                stats, pre = self._sequential_gptq(program, ctx, layers, symmetric)
                notes.append("GPTQ sequential: each layer's Hessian measured on the outputs of the already-quantized layers"
                             + ("; each layer fitted to the float model's output" if s.gptq.target == "float" else ""))
                kept = [m for m in self._seq_methods.values()]
                if self._seq_checked and kept:
                    notes.append(f"sequential GPTQ checked on the held-back batches (same quantized prefix): "
                                 f"{sum(m == 'gptq' for m in kept)} layers kept the fit, "
                                 f"{sum(m.startswith('gptq (') for m in kept)} the own-output fit, "
                                 f"{sum(m.startswith('rtn') for m in kept)} RTN")
            else:
                stats = input_statistics(program, list(ctx.calibration.batches), inputs, want_gram=s.weights is not None,
                                         **self._token_weighting())
        for t in layers:
            if t.kind in ("linear", "addmm"):
                t.stats_of = op_input(t)
        if s.weights is not None and s.method in ("awq", "gptq") and any(t.kind == "conv" for t in layers):
            notes.append(f"convolutions use RTN ({s.method} statistics are collected for linear inputs only)")

        # -- fitting is checked, not trusted: held-back statistics to compare each fit with RTN
        fit_check: dict[str, Any] = {"fitted kept": 0, "unfitted kept": 0, "smoothed": 0, "unsmoothed": 0, "hold": {}}
        if stats and s.weights is not None and s.method in ("awq", "gptq"):
            if pre:  # sequential GPTQ fitted every linear in its own run (and checked them there with target float)
                if not self._seq_checked:
                    notes.append("GPTQ sequential is not checked against RTN on held-back batches "
                                 "(gptq.target: float is, on the same quantized prefix)")
            else:
                fit_check["hold"] = self._holdout_stats(program, ctx, layers, notes)
            notes += calibration_warnings(s.method, layers, stats)
        elif stats and self._smoothquant():
            fit_check["hold"] = self._holdout_stats(program, ctx, layers, notes, "smoothquant")

        # -- input-channel scaling (AWQ, SmoothQuant): one scale vector per shared input
        self._fit_check = fit_check
        scaled: dict[str, torch.Tensor] = {}
        if stats and (self._awq() or self._smoothquant()):
            scaled, fold_counts = self._channel_scaling(program, layers, stats, notes)
            notes.append(f"{'AWQ' if self._awq() else 'SmoothQuant'} scales: {fold_counts['folded']} inputs folded into "
                         f"the preceding layer_norm/linear, {fold_counts['inserted']} by an inserted mul")

        # -- quantize and rewrite each layer (the replacements are rules: `RULES`, refusals named in the notes)
        rule_ctx, outcome = RewriteContext(program), RuleOutcome()

        def apply_replacement(replacement: Replacement) -> int | None:
            """Apply the replacement to its node; the bytes it stores, or None where a rule refused."""
            rule_ctx.at[replacement.target.node] = replacement
            applied = len(outcome.applied)
            apply_rules_at(replacement.target.node, RULES, rule_ctx, outcome)
            return replacement.stored_bytes if len(outcome.applied) > applied else None

        for t in layers:
            w = float_weight(program, t)
            st = stats.get(t.stats_of) if t.stats_of is not None else None
            if t.module in scaled:
                w_eff = w * scaled[t.module]
            else:
                w_eff = w
            before = program.param(t.weight).numel() * program.param(t.weight).element_size()
            int8_compute = s.activations is not None and t.kind in ("linear", "addmm")
            group_a8 = int8_compute and s.activations.granularity == "group"
            if int8_compute and not group_a8 and (s.weights is None or (t.bits == 8 and s.method == "rtn")):
                # plain W8A8 (8-bit RTN weights stored per channel directly: same bytes, one rounding)
                qw, ws = kq.quantize_int8_channel(w_eff)
                w_hat = (qw.float() * ws.unsqueeze(1))
                replacement = self._a8_replacement(t, qw, ws, st, s.activations.mode)
                method = f"int8 per-channel, activations {s.activations.mode}"
            else:
                if t.node in pre:
                    qz, method = pre[t.node], self._seq_methods.get(t.node, "gptq")
                elif s.method == "gptq" and st is not None and st.gram is not None:
                    options = self._gptq_options()
                    options["damp"] = gptq_damp(t.k, st.rows, base=options["damp"])
                    qz = qm.gptq_refined(w_eff, st.hessian, t.bits, t.group_size, symmetric, **options)
                    method = "gptq"
                    qz, method = self._checked(qz, method, w_eff, t, symmetric, fit_check)
                elif s.method == "awq" and t.module in scaled:
                    qz = qm.rtn(w_eff, t.bits, t.group_size, symmetric, clip_search=True)
                    method = "awq"
                else:
                    qz = qm.rtn(w_eff, t.bits, t.group_size, symmetric)
                    method = "rtn"
                w_hat = qz.weight()
                codes = (qz.bits, qz.group_size)
                if group_a8:  # stored and run at t.bits, activations int8 per token and group
                    replacement = Replacement(t, torch.ops.rewrite.linear_qa8_group.default, packed_tensors(qz), codes)
                    method += ", int8 compute (activations per token and group)"
                elif int8_compute:  # stored at t.bits, run as int8 x int8 (the weight requantized per channel)
                    _, ws = kq.quantize_int8_channel(w_hat)
                    w_hat = kq.requantize_int8(w_hat, ws).float() * ws.unsqueeze(1)
                    replacement = Replacement(t, torch.ops.rewrite.linear_qa8_dynamic.default,
                                              packed_tensors(qz, wscale=ws), codes)
                    method += ", int8 compute (activations dynamic)"
                elif t.kind in ("linear", "addmm"):
                    replacement = Replacement(t, torch.ops.rewrite.linear_q.default, packed_tensors(qz), codes)
                else:  # conv: the same conv reads its weight dequantized in the graph
                    replacement = Replacement(t, torch.ops.rewrite.dequantize_q.default, packed_tensors(qz), codes)
            after = apply_replacement(replacement)
            if after is None:  # refused (the reason goes to the notes): the layer stays float
                method, after, w_hat = f"{method} not applied: kept float", before, w_eff
                if t.module in scaled:  # its input is scaled by 1/s already: the float weight takes s
                    program.set_param(t.weight, (w_eff.T if t.kind == "addmm" else w_eff).reshape(
                        program.param(t.weight).shape).to(program.param(t.weight).dtype))
            if t.module in scaled:
                w_hat = w_hat / scaled[t.module]
            rows.append({"module": t.module, "op": t.kind, "bits": t.bits, "group": t.group_size, "method": method,
                         "bytes_before": before, "bytes_after": after, "rel_error": round(qm.output_error(w, w_hat, st), 5)})

        for t in embeds:
            w = float_weight(program, t)
            eg = s.embeddings_group_size if s.embeddings_group_size is not None else group
            g = effective_group(t.k, eg)
            # fp16-exact scales: the ONNX table stores them as float16 (DequantizeLinear path)
            qz = qm.rtn(w, int(s.embeddings), g, symmetric, clip_search=True, fp16_scales=True)
            before = program.param(t.weight).numel() * program.param(t.weight).element_size()
            after = apply_replacement(Replacement(t, torch.ops.rewrite.embedding_q.default, packed_tensors(qz), (qz.bits, qz.group_size)))
            w_hat = qz.weight() if after is not None else w
            rows.append({"module": t.module, "op": "embedding", "bits": int(s.embeddings), "group": g,
                         "method": "rtn" if after is not None else "rtn not applied: kept float",
                         "bytes_before": before, "bytes_after": before if after is None else after,
                         "rel_error": round(float((w_hat - w).norm() / w.norm().clamp_min(1e-12)), 5)})
        notes += [f"not quantized: {reason}" for reason in outcome.reasons()]

        program.graph.eliminate_dead_code()
        if any(r["bits"] in (2, 3) for r in rows):
            notes.append("2- and 3-bit weights are stored packed (uint8 rows) in ONNX and decoded by standard ops "
                         "(Gather/BitShift/BitwiseAnd); onnxruntime folds the decode at session start, so on disk "
                         "they cost their packed bits but in memory they run as fp32 MatMul")
        b0 = sum(r["bytes_before"] for r in rows)
        b1 = sum(r["bytes_after"] for r in rows)
        widths = sorted({r["bits"] for r in rows})
        summary = (f"{len(rows)} tensors quantized ({', '.join(f'{b}-bit' for b in widths)}), "
                   f"{b0 / 1e6:.2f} MB -> {b1 / 1e6:.2f} MB")
        details: dict[str, Any] = {"layers": rows}
        if self._smoothquant() and fit_check["hold"]:
            details["smoothquant check (held-back batches)"] = {"smoothed": fit_check["smoothed"],
                                                                "unsmoothed (smoothing lost)": fit_check["unsmoothed"]}
            notes.append(f"SmoothQuant checked against no smoothing on the held-back batches: smoothed "
                         f"{fit_check['smoothed']} inputs, left {fit_check['unsmoothed']} unsmoothed where smoothing lost")
        if fit_check["hold"] and s.method in ("awq", "gptq"):
            details["fit check (held-back batches)"] = {f"{s.method} kept": fit_check["fitted kept"],
                                                        "rtn kept (fit lost)": fit_check["unfitted kept"]}
            notes.append(f"{s.method} checked against RTN on the held-back batches: the fit kept for "
                         f"{fit_check['fitted kept']}, RTN kept for {fit_check['unfitted kept']} "
                         f"{'inputs' if s.method == 'awq' else 'layers'} where the fit lost")
        if assignment:
            details["allocation"] = assignment
        return PassResult(program, summary=summary, details=details, notes=notes)

    # -- fit checks -----------------------------------------------------------------------
    def _holdout_stats(self, program: Program, ctx: PassContext, layers: list[Target], notes: list[str],
                       what: str | None = None) -> dict[fx.Node, qm.InputStats]:
        hold = list(ctx.calibration.holdout)
        if not hold or any(h is b for h in hold for b in ctx.calibration.batches):
            notes.append(f"{what}: no held-back batches, so smoothing was not checked" if what else
                         f"{self.spec.method}: no held-back batches, so the fit was not checked against RTN")
            return {}
        inputs = {op_input(t): t.k for t in layers if t.kind in ("linear", "addmm")}
        return input_statistics(program, hold, inputs, want_gram=True, **self._token_weighting())

    def _checked(self, qz: qm.Quantized, method: str, w: torch.Tensor, t: Target, symmetric: bool,
                 fit_check: dict[str, Any]) -> tuple[qm.Quantized, str]:
        """The fitted quantization, or RTN where RTN's output error on the held-back batches is lower."""
        hs = fit_check["hold"].get(t.stats_of) if t.stats_of is not None else None
        if hs is None or hs.gram is None:
            return qz, method
        alt = qm.rtn(w, t.bits, t.group_size, symmetric)
        if qm.output_error(w, alt.weight(), hs) < qm.output_error(w, qz.weight(), hs):
            fit_check["unfitted kept"] += 1
            return alt, f"rtn ({method} lost on held-back batches)"
        fit_check["fitted kept"] += 1
        return qz, method

    def _awq_holds(self, weights: list[torch.Tensor], group: list[Target], sc: torch.Tensor, x: fx.Node) -> bool:
        """True when AWQ's scales beat plain RTN on the held-back batches (or there are none to ask)."""
        fit_check = getattr(self, "_fit_check", None) or {"hold": {}}
        hs = fit_check["hold"].get(x)
        if hs is None or hs.gram is None:
            return True
        t0, sym = group[0], self.spec.weights.symmetric
        fit = sum(_out_err(w, qm.rtn(w * sc, t0.bits, t0.group_size, sym, clip_search=True).weight() / sc, hs) for w in weights)
        raw = sum(_out_err(w, qm.rtn(w, t0.bits, t0.group_size, sym).weight(), hs) for w in weights)
        fit_check["fitted kept" if fit <= raw else "unfitted kept"] += 1
        return fit <= raw

    def _smooth_holds(self, weights: list[torch.Tensor], sc: torch.Tensor, x: fx.Node) -> bool:
        """True when SmoothQuant's scales lower the int8 x int8 output error on the held-back batches'
        rows (or there are none to ask). The error is that of per-tensor symmetric int8 activations and
        per-channel int8 weights (the W8A8 path's rounding) against the float output; counted in the report."""
        fit_check = getattr(self, "_fit_check", None) or {"hold": {}}
        hs = fit_check["hold"].get(x)
        if hs is None or not hs.sample:
            return True
        xh = hs.x_sample()
        ref = [xh @ w.T for w in weights]

        def err(scale: torch.Tensor) -> float:
            xs = xh / scale
            a = xs.abs().max().clamp_min(1e-12) / 127.0
            xq = (xs / a).round().clamp(-127, 127) * a
            total = 0.0
            for w, r in zip(weights, ref):
                qw, ws = kq.quantize_int8_channel(w * scale)
                total += float((r - xq @ (qw.float() * ws.unsqueeze(1)).T).pow(2).sum())
            return total

        holds = err(sc) <= err(torch.ones_like(sc))
        fit_check["smoothed" if holds else "unsmoothed"] += 1
        return holds

    # -- helpers --------------------------------------------------------------------------
    def _gptq_options(self) -> dict[str, Any]:
        g = self.spec.gptq
        return {"act_order": g.act_order, "damp": g.damp, "clip_search": g.clip_search, "refit_rounds": g.refit_rounds}

    def _sequential_gptq(self, program: Program, ctx: PassContext, layers: list[Target],
                         symmetric: bool) -> tuple[dict[fx.Node, qm.InputStats], dict[fx.Node, qm.Quantized]]:
        """GPTQ layer after layer on the quantized prefix (see `qm.sequential_input_stats`)."""
        by_node = {t.node: t for t in layers if t.kind in ("linear", "addmm")}
        targets = {n: (op_input(t), weight_arg(t), t.k) for n, t in by_node.items()}
        pre: dict[fx.Node, qm.Quantized] = {}
        self._seq_methods: dict[fx.Node, str] = {}
        # the float target (a fit of the drift) is checked on held-back batches; plain sequential GPTQ is
        # not (yet): it stays identical to the block-by-block pipeline's (`rewrite.sequential`)
        hold = list(ctx.calibration.holdout) if self.spec.gptq.target == "float" else []
        if any(h is b for h in hold for b in ctx.calibration.batches):
            hold = []
        self._seq_checked = bool(hold)

        def requantize(node: fx.Node, st: qm.InputStats, hs: qm.InputStats | None = None) -> torch.Tensor:
            t = by_node[node]
            w = float_weight(program, t)
            cands: list[tuple[str, qm.Quantized]] = []
            if self.spec.gptq.target == "float":
                cands.append(("gptq", qm.gptq_refined(qm.drift_corrected(w, st, self.spec.gptq.damp), st.hessian, t.bits,
                                                      t.group_size, symmetric, **self._gptq_options())))
            if hs is not None or not cands:
                name = "gptq" if not cands else "gptq (own-output target: the float target lost on held-back batches)"
                cands.append((name, qm.gptq_refined(w, st.hessian, t.bits, t.group_size, symmetric, **self._gptq_options())))
            if hs is not None and hs.rows:
                # checked, not trusted: the candidate closest to the target on tokens no fit saw, RTN included
                cands.append(("rtn (gptq lost on held-back batches)", qm.rtn(w, t.bits, t.group_size, symmetric)))
                errs = [qm.target_error(w, qz.weight(), hs) for _, qz in cands]
                method, qz = cands[min(range(len(cands)), key=errs.__getitem__)]
            else:
                method, qz = cands[0]
            pre[node] = qz
            self._seq_methods[node] = method
            w_hat = qz.weight()
            return w_hat.T.contiguous() if t.kind == "addmm" else w_hat

        stats = qm.sequential_input_stats(program, list(ctx.calibration.batches), targets, requantize,
                                          **self._token_weighting(), float_inputs=self.spec.gptq.target == "float",
                                          holdout=hold or None)
        return stats, pre

    def _token_weighting(self) -> dict[str, Any]:
        """How GPTQ counts each token in X^T X (`qm.token_weights`: `token_weight`, `clip_norms` keywords of the
        statistics); AWQ and activations use plain statistics."""
        if self.spec.method != "gptq":
            return {"token_weight": "uniform"}
        return {"token_weight": self.spec.gptq.token_weight, "clip_norms": self.spec.gptq.clip_norms}

    def _awq(self) -> bool:
        return self.spec.weights is not None and self.spec.method == "awq"

    def _smoothquant(self) -> bool:
        return self.spec.activations is not None and self.spec.activations.smoothquant is not None

    @staticmethod
    def _a8_replacement(t: Target, qw: torch.Tensor, ws: torch.Tensor, st: qm.InputStats | None, mode: str) -> Replacement:
        """W8A8: the int8 weight and its per-channel scale; static mode adds the calibrated activation range."""
        if mode == "dynamic":
            return Replacement(t, torch.ops.rewrite.linear_a8_dynamic.default, {"q": qw, "wscale": ws})
        if st is None:
            raise PassError(f"static activation ranges for {t.module} need calibration batches")
        lo, hi = min(st.lo, 0.0), max(st.hi, 0.0)
        scale = max((hi - lo) / 255.0, 1e-8)
        return Replacement(t, torch.ops.rewrite.linear_a8_static.default, {
            "q": qw, "wscale": ws, "xscale": torch.tensor(scale, dtype=torch.float32),
            "xzero": torch.tensor(int(min(max(round(-lo / scale), 0), 255)), dtype=torch.uint8)})

    def _channel_scaling(self, program: Program, layers: list[Target], stats: dict[fx.Node, qm.InputStats],
                         notes: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Per shared input: choose s (AWQ search or SmoothQuant), scale W by s and x by 1/s.

        x/s is folded into the producer when every user of the input is a scaled linear:
        a layer_norm (weight and bias / s) or a linear/addmm (rows and bias / s); otherwise
        an explicit `mul` is inserted before the scaled linears.
        """
        s = self.spec
        by_input: dict[fx.Node, list[Target]] = {}
        for t in layers:
            if t.kind in ("linear", "addmm") and t.stats_of in stats:
                by_input.setdefault(t.stats_of, []).append(t)
        out: dict[str, torch.Tensor] = {}
        counts = {"folded": 0, "inserted": 0}
        for x, group in by_input.items():
            weights = [float_weight(program, t) for t in group]
            if self._awq():
                sc, alpha, ratio = qm.awq_scales(weights, stats[x], group[0].bits, group[0].group_size, s.weights.symmetric)
                if alpha == 0.0:
                    continue  # no scaling helps: plain (clipped) RTN
                if not self._awq_holds(weights, group, sc, x):
                    continue  # the scales lose to plain RTN on the held-back batches
            else:
                sc = qm.smooth_scales(weights, stats[x], float(s.activations.smoothquant))
                if not self._smooth_holds(weights, sc, x):
                    continue  # smoothing loses to none on the held-back batches
            users_all_scaled = {u for u in x.users} <= {t.node for t in group}
            if users_all_scaled and self._fold_into_producer(program, x, sc):
                counts["folded"] += 1
            else:
                inv = program.add_constant(f"_qscale_{x.name}", (1.0 / sc).to(torch.float32), before=group[0].node)
                program.notes.setdefault("logical_numel", {})[str(inv.target)] = 0
                with program.graph.inserting_before(group[0].node):
                    mul = program.graph.call_function(aten.mul.Tensor, (x, inv))
                mul.meta["nn_module_stack"] = group[0].node.meta.get("nn_module_stack", {})
                for t in group:
                    idx = 1 if t.kind == "addmm" else 0
                    args = list(t.node.args)
                    args[idx] = mul
                    t.node.args = tuple(args)
                counts["inserted"] += 1
            # static ranges were measured on x; the scaled input is x / s
            st = stats[x]
            if s.activations is not None:
                scaled_x = st.x_sample() / sc
                st.lo, st.hi = float(scaled_x.min()), float(scaled_x.max())
                full = st.abs_max / sc
                st.lo, st.hi = min(st.lo, -float(full.max())), max(st.hi, float(full.max()))
            for t in group:
                out[t.module] = sc
        return out, counts

    @staticmethod
    def _fold_into_producer(program: Program, x: fx.Node, sc: torch.Tensor) -> bool:
        if x.op != "call_function":
            return False
        if x.target in (aten.layer_norm.default,):
            w, b = (x.args[2] if len(x.args) > 2 else None), (x.args[3] if len(x.args) > 3 else None)
            if not all(isinstance(a, fx.Node) and a.op == "get_attr" and len(a.users) == 1 for a in (w, b)):
                return False
            program.set_param(str(w.target), program.param(w) / sc)
            program.set_param(str(b.target), program.param(b) / sc)
            return True
        if x.target in LINEAR_OPS and len(x.args) > 2:
            w, b = x.args[1], x.args[2]
            if not all(isinstance(a, fx.Node) and a.op == "get_attr" and len(a.users) == 1 for a in (w, b)):
                return False
            program.set_param(str(w.target), program.param(w) / sc.unsqueeze(1))
            program.set_param(str(b.target), program.param(b) / sc)
            return True
        return False
