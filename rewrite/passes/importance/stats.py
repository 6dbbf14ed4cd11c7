"""Streaming calibration statistics shared by every weight, channel and neuron metric.

One calibration run per compile: `statistics(program, batches, cache=ctx.cache)` watches
the input (and output) of every weight-carrying op and keeps running sums only, so memory
does not grow with the number of batches. The result is cached in `PassContext.cache`
under `CACHE_KEY`, keyed by the module and batch identities, and reused by every metric
(Wanda, Hessian diagonal, activation saliency, WINA, ...). Asking for the full second
moment X^T X (GPTQ) after a run without it re-runs once with it; ask for it up front
(`second_moment=True`) when a later pass will need it.

What is collected, per weight (the parameter target of the op's weight):
- `n`: number of calibration tokens seen (rows of the flattened input; pixels for conv).
- `sum_sq[j]`: sum over tokens of x_j^2 (so the L2 norm over tokens is sqrt(sum_sq), and
  diag(X^T X) = sum_sq), one entry per input feature j.
- `sum_abs[j]`: sum over tokens of |x_j| (mean |x_j| = sum_abs / n, AWQ's saliency).
- `xtx[j, k]` (optional): X^T X summed over tokens.
- `out_sum_abs[i]`, `out_sum_sq[i]`: the same for the op's output features.

Tokens: padded positions (the model's padding mask, carried to each activation by its
symbolic sequence dimension) are excluded, by `rewrite.statistics.token_rows`, the policy
every data-driven pass shares. For conv ops every pixel of every
image is a token and features are input channels (a per-channel simplification of the
unfolded patches: a kernel offset sees the same channel shifted, up to borders).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from rewrite.calibration import observe
from rewrite.inputs import Inputs
from rewrite.program import Program
from rewrite.statistics import token_rows

CACHE_KEY = "importance.stats"

aten = torch.ops.aten
_LINEAR = {aten.linear.default}
_CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
_MATMUL = {aten.addmm.default, aten.mm.default, aten.matmul.default}


@dataclass
class WeightOp:
    """An op that multiplies an activation by a parameter (linear, conv, x @ W)."""

    node: fx.Node
    param: str
    input: fx.Node
    kind: str  # "linear" (W [out, in]) | "conv" (W [out, in/groups, *k]) | "matmul" (W [in, out])
    module: str
    groups: int = 1

    @property
    def in_dim(self) -> int:
        """The weight dimension that runs over input features."""
        return 0 if self.kind == "matmul" else 1


def weight_ops(program: Program, params: Sequence[str] | str | None = None) -> list[WeightOp]:
    """Every linear/conv/matmul whose weight is a parameter (get_attr), in graph order.

    `params` filters by parameter target or module path; entries may be globs.
    """
    out: list[WeightOp] = []
    for n in program.graph.nodes:
        if n.op != "call_function":
            continue
        op = None
        if n.target in _LINEAR or n.target in _CONV:
            x, w = n.args[0], n.args[1]
            kind = "linear" if n.target in _LINEAR else "conv"
            groups = int(n.args[6]) if kind == "conv" and len(n.args) > 6 else int(n.kwargs.get("groups", 1))
            if isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(x, fx.Node):
                op = WeightOp(n, str(w.target), x, kind, program.module_path(n), groups)
        elif n.target in _MATMUL:
            x, w = (n.args[1], n.args[2]) if n.target == aten.addmm.default else (n.args[0], n.args[1])
            if (isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(x, fx.Node)
                    and getattr(program.param(w), "dim", lambda: 0)() == 2):
                op = WeightOp(n, str(w.target), x, "matmul", program.module_path(n))
        if op is not None and _selected(op, params):
            out.append(op)
    return out


def _selected(op: WeightOp, params: Sequence[str] | str | None) -> bool:
    if params is None:
        return True
    pats = [params] if isinstance(params, str) else list(params)
    return any(fnmatch.fnmatchcase(op.param, p) or fnmatch.fnmatchcase(op.module, p) for p in pats)


@dataclass
class FeatureStats:
    """Running sums over tokens for one activation's feature dimension."""

    n: int = 0
    sum_sq: torch.Tensor | None = None
    sum_abs: torch.Tensor | None = None
    xtx: torch.Tensor | None = None

    def update(self, rows: torch.Tensor, second_moment: bool = False) -> None:
        rows = rows.detach().to(torch.float64)
        sq, ab = (rows * rows).sum(0), rows.abs().sum(0)
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq + sq
        self.sum_abs = ab if self.sum_abs is None else self.sum_abs + ab
        if second_moment:
            xtx = rows.T @ rows
            self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.n += rows.shape[0]

    @property
    def l2(self) -> torch.Tensor:
        """L2 norm of each feature over all calibration tokens: ||X[:, j]||_2."""
        return self.sum_sq.sqrt().float()

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.sum_abs / max(self.n, 1)).float()


@dataclass
class OpStats:
    op: WeightOp
    input: FeatureStats
    output: FeatureStats


@dataclass
class Statistics:
    """Calibration statistics per weight parameter target."""

    ops: dict[str, OpStats] = field(default_factory=dict)
    second_moment: bool = False
    batches: int = 0

    def __getitem__(self, param: str) -> OpStats:
        return self.ops[param]

    def __contains__(self, param: str) -> bool:
        return param in self.ops


def _rows(program: Program, node: fx.Node, value: torch.Tensor, kind: str, batch: Inputs | None) -> torch.Tensor:
    """[real tokens, features] (features: last dim, or channels for conv); padding dropped by
    the one calibration-statistics policy (`rewrite.statistics.token_rows`)."""
    return token_rows(program, node, value, batch, 1 if kind == "conv" else -1)


class _Collector:
    def __init__(self, program: Program, ops: list[WeightOp], second_moment: bool):
        self.program = program
        self.ops = ops
        self.second_moment = second_moment
        self.inputs: dict[fx.Node, FeatureStats] = {}
        self.outputs: dict[fx.Node, FeatureStats] = {}
        self.kind: dict[fx.Node, str] = {}
        for op in ops:
            self.inputs.setdefault(op.input, FeatureStats())
            self.outputs.setdefault(op.node, FeatureStats())
            self.kind[op.input] = op.kind if self.kind.get(op.input, op.kind) == op.kind else "mixed"
            self.kind[op.node] = op.kind

    def nodes(self, program: Program) -> Iterable[fx.Node]:
        return list(self.inputs) + [n for n in self.outputs if n not in self.inputs]

    def update(self, node: fx.Node, value: Any, batch: Inputs) -> None:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return
        if node in self.inputs:
            self.inputs[node].update(_rows(self.program, node, value, self.kind[node], batch), self.second_moment)
        if node in self.outputs:
            self.outputs[node].update(_rows(self.program, node, value, self.kind[node], batch))


def statistics(program: Program, batches: list[Inputs], *, second_moment: bool = False,
               cache: dict[str, Any] | None = None, progress: bool | None = None) -> Statistics:
    """Input/output feature statistics of every weight op, from one streaming calibration run.

    Reuses `cache[CACHE_KEY]` when it was collected on the same module and batches (and
    holds X^T X if `second_moment` is asked for).
    """
    batches = [Inputs.of(b) for b in batches]
    if not batches:
        raise ValueError("importance statistics need at least one calibration batch")
    # Keyed by object identity; the entry keeps the tensors alive so ids cannot be reused.
    held = [program.module] + [t for b in batches for t in b.tensors()]
    key = tuple(id(t) for t in held)
    if cache is not None:
        hit = cache.get(CACHE_KEY)
        if hit is not None and hit[0] == key and (hit[2].second_moment or not second_moment):
            return hit[2]
    ops = weight_ops(program)
    collector = _Collector(program, ops, second_moment)
    observe(program, batches, [collector], desc="importance statistics", progress=progress)
    stats = Statistics(second_moment=second_moment, batches=len(batches))
    for op in ops:
        stats.ops[op.param] = OpStats(op, collector.inputs[op.input], collector.outputs[op.node])
    if cache is not None:
        cache[CACHE_KEY] = (key, held, stats)
    return stats


def input_view(op: WeightOp, weight: torch.Tensor, per_feature: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-input-feature vector to the weight's shape (W[i, j] gets v[j]).

    Handles the three layouts: linear [out, in], x @ W [in, out], and (grouped) conv
    [out, in/groups, *kernel] where output channel o of group g reads input channels
    g*in_g ... (g+1)*in_g - 1.
    """
    v = per_feature.to(weight.dtype)
    if op.kind == "linear":
        return v.expand_as(weight) if weight.dim() == 1 else v.reshape(1, -1).expand_as(weight)
    if op.kind == "matmul":
        return v.reshape(-1, 1).expand_as(weight)
    out_ch, in_g = weight.shape[0], weight.shape[1]
    per_group = out_ch // op.groups
    group_of = torch.arange(out_ch) // per_group
    idx = group_of.reshape(-1, 1) * in_g + torch.arange(in_g).reshape(1, -1)  # [out, in_g]
    mat = v[idx]
    return mat.reshape(out_ch, in_g, *([1] * (weight.dim() - 2))).expand_as(weight)
