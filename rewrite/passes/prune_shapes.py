"""Shape constants that must follow pruned widths, as rules (`rewrite.rules`).

Canonical views read their sizes from live tensors (`passes/canonicalize.py`), so most ops need
nothing after pruning. A few carry a width as a literal argument; each is one rule here:

- grouped conv: `groups` scales with its input channels;
- layer norm: `normalized_shape`;
- expand: a broadcast from 1 to a pruned width (MQA's one KV head expanded to every query head);
- split: the sizes of the parts (fused q/k/v, equal or not).

`new_sizes` maps (node, dim) to the width that dim has after pruning (`rewrite.dims.kept_sizes`).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from rewrite.program import Program
from rewrite.rules import Rule, apply_rules

aten = torch.ops.aten
CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
         aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)


@dataclass
class Widths:
    """The rules' context: the program and its new widths."""

    program: Program
    new_sizes: dict[tuple[Any, int], int]


def _readable(sizes: list[Any]) -> list[Any]:
    return [s if isinstance(s, int) else str(s) for s in sizes]


# ------------------------------------------------------------------ grouped conv
def _conv_groups(n: fx.Node) -> int:
    return n.args[6] if len(n.args) > 6 else n.kwargs.get("groups", 1)


def _conv_check(n: fx.Node, w: Widths) -> str | None:
    new, old = w.new_sizes[(n.args[0], 1)], w.program.shape(n.args[0])[1]
    if (_conv_groups(n) * new) % old:
        return f"{new} of {old} input channels is not a whole number of its {_conv_groups(n)} groups"
    return None


def _conv_replace(n: fx.Node, w: Widths) -> dict[str, Any]:
    groups = _conv_groups(n)
    new = groups * w.new_sizes[(n.args[0], 1)] // w.program.shape(n.args[0])[1]
    args = list(n.args) + [1] * (7 - len(n.args))
    args[6] = new
    n.args, n.kwargs = tuple(args), {k: v for k, v in n.kwargs.items() if k != "groups"}
    return {"arg": "groups", "old": groups, "new": new}


CONV_GROUPS = Rule("conv groups", CONVS,
                   match=lambda n, w: _conv_groups(n) != 1 and (n.args[0], 1) in w.new_sizes,
                   check=_conv_check, replace=_conv_replace)


# ------------------------------------------------------------------ layer norm
def _norm_new(n: fx.Node, w: Widths) -> list[Any]:
    rank, norm = len(w.program.shape(n)), list(n.args[1])
    return [w.new_sizes.get((n, rank - len(norm) + d), norm[d]) for d in range(len(norm))]


def _norm_replace(n: fx.Node, w: Widths) -> dict[str, Any]:
    old, new = list(n.args[1]), _norm_new(n, w)
    n.args = (n.args[0], new) + tuple(n.args[2:])
    return {"arg": "normalized_shape", "old": old, "new": new}


LAYER_NORM_SHAPE = Rule("layer norm shape", (aten.layer_norm.default,),
                        match=lambda n, w: _norm_new(n, w) != list(n.args[1]),
                        check=lambda n, w: None, replace=_norm_replace)


# ------------------------------------------------------------------ expand
def _expand_new(n: fx.Node, w: Widths) -> list[Any]:
    return [w.new_sizes.get((n, d), s) if isinstance(s, int) and s not in (-1, 1) else s
            for d, s in enumerate(n.args[1])]


def _expand_replace(n: fx.Node, w: Widths) -> dict[str, Any]:
    old, new = list(n.args[1]), _expand_new(n, w)
    n.args = (n.args[0], new) + tuple(n.args[2:])
    return {"arg": "expand sizes", "old": _readable(old), "new": _readable(new)}


EXPAND_SIZES = Rule("expand sizes", (aten.expand.default,),
                    match=lambda n, w: _expand_new(n, w) != list(n.args[1]),
                    check=lambda n, w: None, replace=_expand_replace)


# ------------------------------------------------------------------ split
def _split_dim(n: fx.Node, w: Widths) -> int:
    dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
    return dim % len(w.program.shape(n.args[0]))


def _split_replace(n: fx.Node, w: Widths) -> dict[str, Any]:
    dim = _split_dim(n, w)
    old = [int(v.shape[dim]) for v in n.meta["val"]]
    sizes = list(old)
    for u in n.users:
        if u.target is operator.getitem:
            sizes[u.args[1]] = w.new_sizes.get((u, dim), sizes[u.args[1]])
    n.target, n.args, n.kwargs = aten.split_with_sizes.default, (n.args[0], sizes, dim), {}
    return {"arg": "split sizes", "old": old, "new": sizes}


SPLIT_SIZES = Rule("split sizes", (aten.split.Tensor, aten.split_with_sizes.default),
                   match=lambda n, w: (n.args[0], _split_dim(n, w)) in w.new_sizes,
                   check=lambda n, w: None, replace=_split_replace)

RULES = (CONV_GROUPS, LAYER_NORM_SHAPE, EXPAND_SIZES, SPLIT_SIZES)


def patch_shape_constants(program: Program, new_sizes: dict[tuple[Any, int], int]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rewrite the literal widths of `RULES`' ops to the pruned sizes: (what changed, why something
    could not be changed)."""
    outcome = apply_rules(program.graph, RULES, Widths(program, new_sizes))
    program.module.recompile()
    return outcome.applied, outcome.reasons()
