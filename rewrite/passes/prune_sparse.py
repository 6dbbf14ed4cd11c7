"""Unstructured and N:M pruning: zero weights by mask (nothing shrinks).

Scores are per weight (the importance package's `weight_scores`, higher = keep).
Unstructured removes the lowest `amount` of each weight's scores, compared within each
output row (as Wanda does; rows of different scale are not ranked against each other).
N:M keeps the N highest-scored weights in every M consecutive ones along the input
dimension of each output row (for convs: along the flattened in x kh x kw order).
"""
from __future__ import annotations

from typing import Any

import torch

from rewrite.errors import PassError
from rewrite.program import Program


def weight_targets(program: Program, scope: list[str] | None, exclude: list[str], protected: set[str]) -> list[tuple[str, int]]:
    """(weight target, input dim) of every linear / conv / x @ W weight in scope."""
    from rewrite.passes.prune_plan import _match

    aten = torch.ops.aten
    out = []
    for n in program.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in (aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default):
            w, in_dim = n.args[1], 1
        elif n.target == aten.addmm.default:
            w, in_dim = n.args[2], 0
        else:
            continue
        if getattr(w, "op", None) != "get_attr":
            continue
        mod = program.module_path(n)
        t = str(w.target)
        if t in protected or (scope and not _match(mod, scope)) or (exclude and _match(mod, exclude)):
            continue
        if (t, in_dim) not in out:
            out.append((t, in_dim))
    return out


def _rows(t: torch.Tensor, in_dim: int) -> torch.Tensor:
    """[out, in*...] view with the input dim leading each row's elements."""
    return t.T.contiguous() if in_dim == 0 else t.reshape(t.shape[0], -1)


def _unrows(r: torch.Tensor, like: torch.Tensor, in_dim: int) -> torch.Tensor:
    return r.T.contiguous() if in_dim == 0 else r.reshape(like.shape)


def unstructured_mask(score: torch.Tensor, in_dim: int, amount: float) -> torch.Tensor:
    s = _rows(score, in_dim)
    k = int(amount * s.shape[1])
    mask = torch.ones_like(s, dtype=torch.bool)
    if k > 0:
        idx = torch.argsort(s, dim=1, stable=True)[:, :k]
        mask.scatter_(1, idx, False)
    return _unrows(mask, score, in_dim)


def nm_mask(score: torch.Tensor, in_dim: int, n: int, m: int) -> torch.Tensor:
    s = _rows(score, in_dim)
    if s.shape[1] % m:
        raise PassError(f"N:M needs the input width ({s.shape[1]}) to be a multiple of m={m}; exclude this layer or pick another m")
    blocks = s.reshape(s.shape[0], -1, m)
    top = torch.topk(blocks, n, dim=2).indices
    mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(2, top, True)
    return _unrows(mask.reshape(s.shape), score, in_dim)


def apply_masks(program: Program, targets: list[tuple[str, int]], scores: dict[str, torch.Tensor], granularity: str,
                amount: float | None, n: int | None, m: int | None) -> tuple[list[dict[str, Any]], list[str]]:
    rows, notes = [], []
    for t, in_dim in targets:
        w = program.param(t)
        s = scores.get(t)
        if s is None:
            s = w.detach().float().abs()
        if granularity == "n:m":
            if _rows(w, in_dim).shape[1] % m:
                notes.append(f"{t}: input width {_rows(w, in_dim).shape[1]} is not a multiple of m={m}; left dense")
                continue
            mask = nm_mask(s, in_dim, n, m)
        else:
            mask = unstructured_mask(s, in_dim, amount or 0.0)
        program.set_param(t, w.detach() * mask.to(w.dtype))
        zeros = int((~mask).sum())
        rows.append({"weight": t, "shape": "x".join(map(str, w.shape)), "zeroed": zeros,
                     "sparsity": round(zeros / mask.numel(), 4)})
    return rows, notes
