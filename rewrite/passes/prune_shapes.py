"""Shape constants that must follow pruned widths, as rules (`rewrite.rules`).

Canonical views read their sizes from live tensors (`passes/canonicalize.py`), so most ops need
nothing after pruning. A few carry a width as a literal argument; each is one rule here:

- grouped conv: `groups` scales with its input channels;
- layer norm: `normalized_shape`;
- expand: a broadcast from 1 to a pruned width (MQA's one KV head expanded to every query head);
- split: the sizes of the parts (fused q/k/v, equal or not);
- slice: constant bounds into a pruned dim (Phi-3 slices q, k and v out of one fused projection).

`removed` maps (node, dim) to which of its indices pruning removes (`rewrite.dims.removed_masks`);
`new_sizes` is the width each of those dims keeps.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from rewrite.program import Program
from rewrite.rules import Rule, apply_rules

aten = torch.ops.aten
CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
         aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)


@dataclass
class Widths:
    """The rules' context: the program and which indices of each shrinking (value, dim) go."""

    program: Program
    removed: dict[tuple[Any, int], np.ndarray]
    new_sizes: dict[tuple[Any, int], int] = field(init=False)

    def __post_init__(self) -> None:
        self.new_sizes = {v: int(gone.size - gone.sum()) for v, gone in self.removed.items()}


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


# ------------------------------------------------------------------ slice
def _slice_source(n: fx.Node, w: Widths) -> tuple[Any, int] | None:
    """The (value, dim) vertex the slice reads, as `rewrite.dims` keys it."""
    x = n.args[0]
    if not isinstance(x, fx.Node) or w.program.shape(x) is None:
        return None
    dim = (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) % len(w.program.shape(x))
    return (("param", str(x.target)) if x.op == "get_attr" else x), dim


def _slice_bounds(n: fx.Node, w: Widths) -> tuple[list[Any], list[int]]:
    """(old [start, end], new [start, end]): each bound moves down by the removed indices before it."""
    source = _slice_source(n, w)
    gone = w.removed[source]
    size = gone.size
    start = n.args[2] if len(n.args) > 2 else n.kwargs.get("start", 0)
    end = n.args[3] if len(n.args) > 3 else n.kwargs.get("end", None)
    lo = 0 if start is None else (start + size if start < 0 else min(start, size))
    hi = size if end is None else (end + size if end < 0 else min(end, size))
    return [start, end], [int(lo - gone[:lo].sum()), int(hi - gone[:hi].sum())]


def _slice_check(n: fx.Node, w: Widths) -> str | None:
    step = n.args[4] if len(n.args) > 4 else n.kwargs.get("step", 1)
    bounds = [n.args[i] if len(n.args) > i else None for i in (2, 3)]
    if step not in (1, None) or not all(b is None or isinstance(b, int) for b in bounds):
        return f"{n.name} slices with step {step} or non-constant bounds {bounds}"
    return None


def _slice_replace(n: fx.Node, w: Widths) -> dict[str, Any]:
    old, new = _slice_bounds(n, w)
    dim = _slice_source(n, w)[1]
    n.args, n.kwargs = (n.args[0], dim, new[0], new[1]), {}
    return {"arg": "slice bounds", "old": old, "new": new}


SLICE_BOUNDS = Rule("slice bounds", (aten.slice.Tensor,),
                    match=lambda n, w: _slice_source(n, w) in w.removed,
                    check=_slice_check, replace=_slice_replace)

RULES = (CONV_GROUPS, LAYER_NORM_SHAPE, EXPAND_SIZES, SPLIT_SIZES, SLICE_BOUNDS)


def patch_shape_constants(program: Program, removed: dict[tuple[Any, int], np.ndarray]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rewrite the literal widths and positions of `RULES`' ops to the pruned tensors: (what changed,
    why something could not be changed). `removed`: `rewrite.dims.removed_masks`."""
    outcome = apply_rules(program.graph, RULES, Widths(program, removed))
    program.module.recompile()
    return outcome.applied, outcome.reasons()
