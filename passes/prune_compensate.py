"""Compensation for pruned inputs: refit the layer that consumed what was removed.

When the input features R of a consuming layer y = W x + b disappear, its output changes
by W[:, R] x_R. Two refits, both from calibration statistics of the consumer's input
(collected on the unpruned model, padded tokens excluded):

- `bias`: add W[:, R] E[x_R] to the bias (exact in expectation; for a conv, the kernel is
  summed over its window, exact away from borders).
- `lstsq`: least squares of the consumer's output on the kept features plus a constant,
  min E|| W x + b - W' x_K - b' ||^2, solved from E[x x^T] and E[x] with a small ridge:
  the kept columns absorb what the removed ones carried when they are correlated
  (linear / x @ W consumers; convs fall back to `bias`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx

from rewrite.calibration import observe
from rewrite.inputs import Inputs
from rewrite.program import Program

aten = torch.ops.aten
_CONV = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}


@dataclass
class ConsumerOp:
    node: fx.Node
    param: str
    kind: str  # linear | conv | matmul (addmm: W [in, out])
    in_dim: int
    bias_index: int  # position of the bias argument

    @property
    def input(self) -> fx.Node:
        return self.node.args[1] if self.kind == "matmul" else self.node.args[0]


def consumer_ops(program: Program, removal: dict[tuple[str, int], set[int]]) -> list[ConsumerOp]:
    """Ops whose input features lose indices (by the weight dim that runs over inputs)."""
    out = []
    for n in program.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target == aten.linear.default:
            kind, w, in_dim, bi = "linear", n.args[1], 1, 2
        elif n.target in _CONV:
            groups = n.args[6] if len(n.args) > 6 else n.kwargs.get("groups", 1)
            if groups != 1:
                continue
            kind, w, in_dim, bi = "conv", n.args[1], 1, 2
        elif n.target == aten.addmm.default:
            kind, w, in_dim, bi = "matmul", n.args[2], 0, 0
        else:
            continue
        if getattr(w, "op", None) == "get_attr" and (str(w.target), in_dim) in removal:
            out.append(ConsumerOp(n, str(w.target), kind, in_dim, bi))
    return out


class _Stats:
    """Running E[x] and (optionally) E[x x^T] over tokens of each watched input."""

    def __init__(self, ops: list[ConsumerOp], second_moment: bool):
        self.kind = {op.input: op.kind for op in ops}
        self.second = {op.input for op in ops if second_moment and op.kind != "conv"}
        self.n: dict[fx.Node, int] = {}
        self.sum: dict[fx.Node, torch.Tensor] = {}
        self.xtx: dict[fx.Node, torch.Tensor] = {}

    def nodes(self, program: Program) -> Iterable[fx.Node]:
        return list(self.kind)

    def update(self, node: fx.Node, value: Any, batch: Inputs) -> None:
        if not isinstance(value, torch.Tensor):
            return
        if self.kind[node] == "conv":
            rows = value.movedim(1, -1).reshape(-1, value.shape[1])
        else:
            rows = value.reshape(-1, value.shape[-1])
            mask = batch.kwargs.get("attention_mask") if batch is not None else None
            if (value.dim() == 3 and isinstance(mask, torch.Tensor) and mask.dim() == 2
                    and tuple(mask.shape) == tuple(value.shape[:2])):
                rows = rows[mask.reshape(-1).bool()]
        rows = rows.detach().double()
        self.n[node] = self.n.get(node, 0) + rows.shape[0]
        s = rows.sum(0)
        self.sum[node] = s if node not in self.sum else self.sum[node] + s
        if node in self.second:
            g = rows.T @ rows
            self.xtx[node] = g if node not in self.xtx else self.xtx[node] + g


def compensate(program: Program, removal: dict[tuple[str, int], set[int]], batches: list[Inputs], mode: str,
               ridge: float = 1e-2) -> tuple[list[dict[str, Any]], list[str]]:
    """Rewrite consumer weights (full size, kept columns refit) and biases in place."""
    ops = consumer_ops(program, removal)
    if not ops:
        return [], []
    stats = _Stats(ops, mode == "lstsq")
    observe(program, batches, [stats], desc="prune compensation")
    rows, notes = [], []
    for op in ops:
        x = op.input
        n = max(stats.n.get(x, 0), 1)
        mu = stats.sum[x] / n
        w = program.param(op.param).detach().double()
        width = w.shape[op.in_dim]
        gone = sorted(removal[(op.param, op.in_dim)])
        keep = [i for i in range(width) if i not in set(gone)]
        bias_node = op.node.args[op.bias_index] if len(op.node.args) > op.bias_index else None
        b = program.param(bias_node).detach().double() if isinstance(bias_node, fx.Node) else None
        out_features = w.shape[1] if op.kind == "matmul" else w.shape[0]
        b0 = b if b is not None else torch.zeros(out_features, dtype=torch.float64)
        method = mode
        if mode == "lstsq" and op.kind != "conv":
            wt = w if op.kind == "matmul" else w.T  # [in, out]
            g = stats.xtx[x] / n
            kk = torch.tensor(keep)
            a = torch.zeros(len(keep) + 1, len(keep) + 1, dtype=torch.float64)
            a[:-1, :-1] = g[kk][:, kk]
            a[:-1, -1] = mu[kk]
            a[-1, :-1] = mu[kk]
            a[-1, -1] = 1.0
            c = torch.zeros(len(keep) + 1, out_features, dtype=torch.float64)
            c[:-1] = g[kk] @ wt + mu[kk, None] * b0[None, :]
            c[-1] = mu @ wt + b0
            lam = ridge * a.diagonal().mean()
            theta = torch.linalg.solve(a + lam * torch.eye(a.shape[0], dtype=torch.float64), c)
            new_wt = wt.clone()
            new_wt[kk] = theta[:-1]
            new_b = theta[-1]
            new_w = new_wt if op.kind == "matmul" else new_wt.T
        else:
            method = "bias"
            r = torch.tensor(gone)
            if op.kind == "linear":
                delta = w[:, r] @ mu[r]
            elif op.kind == "matmul":
                delta = mu[r] @ w[r, :]
            else:
                delta = w[:, r].flatten(2).sum(2) @ mu[r]
            new_w, new_b = w, b0 + delta
        dtype = program.param(op.param).dtype
        program.set_param(op.param, new_w.to(dtype))
        if isinstance(bias_node, fx.Node):
            program.set_param(str(bias_node.target), new_b.to(dtype))
        else:
            name = _add_bias(program, op, new_b.to(dtype))
            out_dim = 1 if op.kind == "matmul" else 0
            if (op.param, out_dim) in removal:  # the new bias follows the op's own pruned outputs
                removal[(name, 0)] = set(removal[(op.param, out_dim)])
        rows.append({"layer": program.module_path(op.node), "method": method, "inputs removed": len(gone),
                     "bias shift (L2)": round(float((new_b - b0).norm()), 4)})
    return rows, notes


def _add_bias(program: Program, op: ConsumerOp, bias: torch.Tensor) -> str:
    """A consumer without a bias (LLaMA o_proj/down_proj) gets one holding the correction."""
    owner = op.param.rpartition(".")[0]
    name = f"{owner}.prune_bias" if owner else "prune_bias"
    program.set_param(name, bias, trainable=True)
    with program.graph.inserting_before(op.node):
        node = program.graph.get_attr(name)
    node.meta["val"] = bias
    args = list(op.node.args)
    while len(args) <= op.bias_index:
        args.append(None)
    args[op.bias_index] = node
    op.node.args = tuple(args)
    return name
