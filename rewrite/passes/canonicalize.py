"""Shape canonicalisation: re-express view/reshape/expand sizes from live tensor sizes.

torch.export records `view(x, [s0, s1, 4, 8])` with sizes read off the model inputs or
baked in as constants. After a rewrite changes a width (pruned heads, channels) or a
length (pruned tokens), those sizes are stale. This pass rewrites each size list so that it
follows the tensor being reshaped:

- view/reshape: input and output dims are grouped into runs of equal product (symbolic).
  A 1:1 run becomes `sym_size(x, i)`; a merge (k dims -> 1) becomes -1 or the product of
  live sizes; a split (1 -> k dims, e.g. hidden -> heads x head_dim) keeps its trailing
  constants and derives the leading one (-1 or a floor division of the live size).
- expand: every size that is not a broadcast from 1 becomes -1 ("keep this dim").

Convolutions with a string padding (`padding="same"` / `"valid"`, captured as the
`aten.convNd.padding` overloads) become the plain `aten.convNd.default` with explicit integer
padding (plus a one-sided `constant_pad_nd` where "same" pads unevenly, as torch does: the
extra element goes at the end), so passes, statistics and backends see one conv op.

It also drops `_assert_tensor_metadata` checks, which would pin dead code and stale dtypes,
and turns every `view` back into a `reshape`. Capture decomposes the model's `reshape` into a
`view` whenever the example's strides allow it, and those strides depend on kernels: CPU
scaled_dot_product_attention returns a [B, H, S, d] tensor laid out as [B, S, H, d], so
`out.transpose(1, 2).reshape(B, S, H*d)` is captured as a view (and a `.contiguous()` before
it disappears). The ONNX exporter (and any later rewrite) decomposes attention into plain ops
whose output is contiguous, and that view of the transposed tensor becomes invalid. A reshape
is a view wherever a view is valid and a copy elsewhere; the captured graph is functional
(export removes mutation), so nothing can observe the difference. And because a re-trace
decomposes the reshape again from whatever strides it sees, a reshape of a transpose/permute
that would be invalid as a view on a plainly laid-out input reads an explicit contiguous
copy (`aten.clone`, an Identity in ONNX), so no trace can turn it back into a bad view.
The pipeline runs it after every capture, so passes can assume canonical shapes.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from rewrite.program import Program
from rewrite.shapes import group_dims, hinted, size_expr, size_hint  # noqa: F401  (group_dims re-exported)

aten = torch.ops.aten
VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
EXPAND_OPS = (aten.expand.default,)
ASSERT_OPS = (aten._assert_tensor_metadata.default,)
STRING_PADDED_CONVS = {aten.conv1d.padding: aten.conv1d.default, aten.conv2d.padding: aten.conv2d.default,
                       aten.conv3d.padding: aten.conv3d.default}


def canonicalize(program: Program) -> int:
    """Rewrite every size list in place; returns how many nodes changed."""
    graph = program.graph
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in ASSERT_OPS:
            graph.erase_node(node)
            changed += 1
        elif node.target in VIEW_OPS and _has_tensor_meta(node):
            if node.target is not aten.reshape.default:
                node.target = aten.reshape.default
                changed += 1
            changed += _contiguous_input(graph, node)
            changed += _canonical_view(graph, node)
        elif node.target in EXPAND_OPS and _has_tensor_meta(node):
            changed += _canonical_expand(node)
        elif node.target in STRING_PADDED_CONVS:
            changed += _explicit_conv_padding(graph, node)
    if changed:
        graph.eliminate_dead_code()
        program.module.recompile()
    return changed


def _has_tensor_meta(node: fx.Node) -> bool:
    x = node.args[0]
    return (isinstance(x, fx.Node) and isinstance(x.meta.get("val"), torch.Tensor)
            and isinstance(node.meta.get("val"), torch.Tensor) and _hinted(x.meta["val"].shape, node.meta["val"].shape))


# the size arithmetic lives in the core (rewrite.dims aligns reshapes with the same rule)
_expr, _hint, _hinted = size_expr, size_hint, hinted


def _canonical_view(graph: fx.Graph, node: fx.Node) -> int:
    x = node.args[0]
    sizes = list(node.args[1])
    in_shape = tuple(x.meta["val"].shape)
    out_shape = tuple(node.meta["val"].shape)
    if len(sizes) != len(out_shape):
        return 0
    groups = group_dims(in_shape, out_shape)
    if groups is None:
        return 0
    new: list[Any] = [None] * len(out_shape)
    minus_one_used = False
    # splits first: they are where a width change must be derived (heads = hidden / head_dim)
    order = sorted(range(len(groups)), key=lambda g: 0 if len(groups[g][1]) > 1 else 1)
    with graph.inserting_before(node):
        for g in order:
            gi, gj = groups[g]
            if len(gi) == 1 and len(gj) == 1:
                new[gj[0]] = _size_of(graph, x, gi[0])
                continue
            if len(gj) == 1:  # merge: k input dims -> one output dim
                if not minus_one_used:
                    new[gj[0]] = -1
                    minus_one_used = True
                else:
                    new[gj[0]] = _product(graph, [_size_of(graph, x, i) for i in gi])
                continue
            if any(not isinstance(out_shape[j], int) for j in gj):
                # a split into symbolic dims ([B*S, D] -> [B, S, D]) cannot be read off x alone:
                # keep the sizes the model computed (sym_size nodes of its inputs)
                for j in gj:
                    new[j] = sizes[j]
                continue
            # split of a static dim (hidden -> heads x head_dim): keep the trailing sizes,
            # derive the one that was -1 (or the first) from the live size
            derived = next((j for j in gj if sizes[j] == -1), gj[0])
            for j in gj:
                if j != derived:
                    new[j] = sizes[j] if isinstance(sizes[j], int) else _hint(out_shape[j])
            if not minus_one_used:
                new[derived] = -1
                minus_one_used = True
            else:
                live = _product(graph, [_size_of(graph, x, i) for i in gi])
                rest = 1
                for j in gj:
                    if j != derived:
                        rest *= int(new[j])
                new[derived] = graph.call_function(operator.floordiv, (live, rest))
    if any(v is None for v in new):
        return 0
    _inherit_meta(node, new)
    if _same(new, sizes):
        return 0
    node.args = (x, new) + tuple(node.args[2:])
    return 1


LAYOUT_OPS = (aten.transpose.int, aten.permute.default, aten.t.default)


def _contiguous_input(graph: fx.Graph, node: fx.Node) -> int:
    """Give a reshape of a transpose/permute an explicit contiguous copy when the reshape would
    not be a valid view of that transpose applied to a contiguous tensor (see the module doc)."""
    x = node.args[0]
    if not isinstance(x, fx.Node) or x.target not in LAYOUT_OPS:
        return 0
    base = x.args[0]
    bval, oval = (base.meta.get("val") if isinstance(base, fx.Node) else None), node.meta.get("val")
    if not isinstance(bval, torch.Tensor) or not isinstance(oval, torch.Tensor):
        return 0
    try:
        plain = torch.empty([_hint(d) for d in bval.shape], device="meta")
        x.target(plain, *x.args[1:]).view([_hint(d) for d in oval.shape])
        return 0
    except RuntimeError:
        pass
    with graph.inserting_before(node):
        c = graph.call_function(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})
    c.meta = {k: v for k, v in x.meta.items() if k != "val"}
    c.meta["val"] = x.meta["val"]
    node.replace_input_with(x, c)
    return 1


def _explicit_conv_padding(graph: fx.Graph, node: fx.Node) -> int:
    """conv(x, w, b, stride, "same"|"valid", dilation, groups) -> pad (if uneven) + conv with int padding."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": "valid", "dilation": 1, "groups": 1}
    a = {**defaults, **dict(zip(names, node.args)), **node.kwargs}
    w = a["weight"].meta.get("val") if isinstance(a["weight"], fx.Node) else None
    if not isinstance(w, torch.Tensor) or not isinstance(a["padding"], str):
        return 0
    spatial = w.dim() - 2
    as_list = lambda v: [int(v)] * spatial if isinstance(v, int) else [int(u) for u in v]  # noqa: E731
    dilation, x = as_list(a["dilation"]), a["input"]
    before, after = [0] * spatial, [0] * spatial
    if a["padding"] == "same":
        total = [d * (_hint(k) - 1) for d, k in zip(dilation, w.shape[2:])]
        before = [t // 2 for t in total]
        after = [t - t // 2 for t in total]
    if before != after:  # uneven: pad the extra element at the end (last spatial dim first, as F.pad reads it)
        pad: list[int] = []
        for i in reversed(range(spatial)):
            pad += [0, after[i] - before[i]]
        with graph.inserting_before(node):
            x = graph.call_function(aten.constant_pad_nd.default, (a["input"], pad, 0.0))
        x.meta = {k: v for k, v in node.meta.items() if k != "val"}
        x.meta["val"] = torch.ops.aten.constant_pad_nd.default(a["input"].meta["val"], pad, 0.0)
    node.target = STRING_PADDED_CONVS[node.target]
    node.args = (x, a["weight"], a["bias"], as_list(a["stride"]), before, dilation, int(a["groups"]))
    node.kwargs = {}
    return 1


def _canonical_expand(node: fx.Node) -> int:
    x = node.args[0]
    sizes = list(node.args[1])
    in_shape = tuple(x.meta["val"].shape)
    offset = len(sizes) - len(in_shape)
    new = list(sizes)
    for j in range(len(sizes)):
        i = j - offset
        if i >= 0 and _hint(in_shape[i]) != 1 and sizes[j] != -1:
            new[j] = -1
    if _same(new, sizes):
        return 0
    node.args = (x, new) + tuple(node.args[2:])
    return 1


def _inherit_meta(node: fx.Node, sizes: list[Any]) -> None:
    """Size nodes we created belong to the same module as the view that uses them."""
    stack = node.meta.get("nn_module_stack")
    todo = [s for s in sizes if isinstance(s, fx.Node)]
    while todo:
        n = todo.pop()
        if "nn_module_stack" not in n.meta and stack is not None:
            n.meta["nn_module_stack"] = stack
            todo.extend(a for a in n.all_input_nodes if a.op == "call_function")


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all((x is y) or (isinstance(x, int) and isinstance(y, int) and x == y) for x, y in zip(a, b))


def _size_of(graph: fx.Graph, x: fx.Node, dim: int) -> Any:
    """A live size of x along dim: a sym_size node (static dims stay live too, for pruning)."""
    n = graph.call_function(aten.sym_size.int, (x, dim))
    val = x.meta["val"].shape[dim]
    n.meta["val"] = val
    return n


def _product(graph: fx.Graph, sizes: list[Any]) -> Any:
    out = sizes[0]
    for s in sizes[1:]:
        out = graph.call_function(operator.mul, (out, s))
    return out
