"""Dropping KV-cache entries from a generation graph's interface (after layers were skipped), and
narrowing them to the kept heads (after heads were pruned: `narrow_cache_heads`, at the end).

A skipped block (or attention branch) leaves its cache update behind: the block's own
key/value projections still feed its `present` outputs, and its `past` inputs still feed
those, although nothing the model computes reads them any more. This module finds such
entries from the dataflow alone, with no per-architecture code: an output is the cache
entry of a removed region when it is computed from a node of that region. Both tensors of
the entry (key and value) then leave the graph boundary:

- the two `present` outputs are removed (the output dict keeps the other layers under
  their model numbers, so the original's and the rewritten graph's outputs pair up by name);
- the region's nodes die with them;
- the two `past` placeholders are removed; a size read from them (torch.export reads the
  past length from the first cache tensor) is read from a kept entry of the same size;
- the module's input/output specs, the example, the shape policy and the cache layout
  (`layer_map`: the model's layer number of each remaining entry) are updated, and batches
  shaped for the captured interface still run (`Program.fit_inputs`).

The ONNX export then numbers the remaining entries 0..n-1 (`past_key_values.{i}.key`,
`present.{i}.key`), as onnxruntime-genai expects, and records the map.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import PassError
from .generation import NOTES_KEY, CacheLayout
from .inputs import Inputs
from .program import NARROWED_HEADS_KEY, NARROWED_KEY, Program

PAST = "past_key_values"
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")


def _descendants(starts: Iterable[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(starts)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(u for u in n.users if u.op != "output")
    return seen


def dead_entries(program: Program, dead: Iterable[str]) -> list[int]:
    """The model layer numbers whose present outputs are computed from the `dead` nodes.

    Raises when a dead node still feeds an output other than a cache entry, or only one of
    an entry's two tensors (both would mean the skip did not remove what it claims to).
    """
    by_name = {n.name: n for n in program.graph.nodes}
    tainted = _descendants(by_name[d] for d in dead if d in by_name)
    keys, leaves = _outputs(program)
    hit: dict[int, set[str]] = {}
    for key, leaf in zip(keys, leaves):
        if not isinstance(leaf, fx.Node) or leaf not in tainted:
            continue
        m = _PRESENT.match(key)
        if m is None:
            raise PassError(f"the removed region still feeds the graph output {key!r}: it cannot be dropped from a "
                            "generation graph's interface (only KV-cache entries can)")
        hit.setdefault(int(m[1]), set()).add(m[2])
    half = {i: kinds for i, kinds in hit.items() if len(kinds) != 2}
    if half:
        raise PassError(f"the removed region feeds only part of the KV-cache entries {sorted(half)} "
                        f"({half}): a cache entry is dropped with both its key and value or not at all")
    return sorted(hit)


def _outputs(program: Program) -> tuple[list[str], list[fx.Node]]:
    info = program.graph._codegen.pytree_info
    spec = info.out_spec
    if spec is None or spec.type is not dict:
        raise PassError("a generation graph returns a dict of logits and present.{i}.key/.value; this one returns "
                        f"{spec}")
    out = program.output_node()
    leaves = list(out.args[0]) if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
    return list(spec.context), leaves


def drop_cache_entries(program: Program, layers: list[int]) -> CacheLayout:
    """Remove the cache entries of model layers `layers` from the interface, in place.

    Returns the new layout (also stored in the program's notes).
    """
    layout = CacheLayout.from_dict(program.notes[NOTES_KEY])
    source = layout.source_layers()
    gone = [i for i in layers if i in source]
    if not gone:
        return layout
    keep_pos = [p for p, i in enumerate(source) if i not in gone]
    if not keep_pos:
        raise PassError("every layer's cache entry would be dropped: a generation graph keeps at least one attention "
                        "layer; skip fewer layers")
    graph = program.graph
    # outputs: drop the entries' present tensors, keep the rest under their names
    keys, leaves = _outputs(program)
    drop_keys = {f"present.{i}.{kind}" for i in gone for kind in ("key", "value")}
    kept = [(k, leaf) for k, leaf in zip(keys, leaves) if k not in drop_keys]
    out = program.output_node()
    out.args = (type(out.args[0])(leaf for _, leaf in kept) if isinstance(out.args[0], (tuple, list)) else kept[0][1],)
    graph.eliminate_dead_code()
    # inputs: the past placeholders of the dropped entries
    example = program.example
    past = list(example.kwargs.get(PAST) or [])
    if len(past) != len(source):
        raise PassError(f"the generation graph's example has {len(past)} cache entries, its layout {len(source)}")
    placeholders = program.placeholders()
    first_past = len(placeholders) - 2 * len(source)
    past_nodes = placeholders[first_past:]
    drop_nodes = [past_nodes[2 * p + j] for p, i in enumerate(source) if i in gone for j in (0, 1)]
    keep_nodes = [n for n in past_nodes if n not in drop_nodes]
    for node in drop_nodes:
        for user in list(node.users):
            _reroute_size(user, node, keep_nodes)
        graph.erase_node(node)
    # specs, example, shape policy, layout
    new_past = [past[p] for p in keep_pos]
    new_example = Inputs(example.args, {**example.kwargs, PAST: new_past})
    in_spec = pytree.tree_structure((new_example.args, new_example.kwargs))
    out_spec = pytree.tree_structure({k: 0 for k, _ in kept})
    if in_spec.num_leaves != len(program.placeholders()):
        raise PassError(f"internal: {in_spec.num_leaves} inputs in the new interface but {len(program.placeholders())} "
                        "graph inputs after dropping cache entries")
    info = graph._codegen.pytree_info
    graph._codegen.pytree_info = info._replace(in_spec=in_spec, out_spec=out_spec)
    for attr, spec in (("_in_spec", in_spec), ("_out_spec", out_spec)):
        if hasattr(program.module, attr):
            setattr(program.module, attr, spec)
    program.example = new_example
    if dataclasses.is_dataclass(program.dynamic) and hasattr(program.dynamic, "num_layers"):
        program.dynamic = dataclasses.replace(program.dynamic, num_layers=len(keep_pos))
    new_layout = dataclasses.replace(layout, layers=[layout.layers[p] for p in keep_pos],
                                     layer_map=[source[p] for p in keep_pos])
    program.notes[NOTES_KEY] = new_layout.to_dict()
    first = layout.layer_map is None
    original_len = len(source) if first else program.notes[NARROWED_KEY][PAST][0]
    program.notes.setdefault(NARROWED_KEY, {})[PAST] = (original_len, list(new_layout.layer_map))
    program.finalize()
    return new_layout


def _reroute_size(user: fx.Node, node: fx.Node, keep: list[fx.Node]) -> None:
    """A size read from a dropped cache tensor: read it from a kept tensor with the same size there."""
    if user.op == "call_function" and user.target is torch.ops.aten.sym_size.int and user.args[0] is node:
        dim = user.args[1]
        want = node.meta["val"].shape[dim]
        for other in keep:
            shape = other.meta["val"].shape
            for d, size in enumerate(shape):
                if str(size) == str(want):
                    user.args = (other, d)
                    return
        if keep and dim in (0, 2):
            # every cache tensor is [batch, heads, past length, head dim] with one batch and one past
            # length for all layers (the interface feeds them so), even where capture gave each layer
            # its own symbol
            user.args = (keep[0], dim)
            return
    raise PassError(f"the dropped cache input {node.name} is still read by {user.name} ({user.target}, args {user.args}), "
                    f"which no kept input ({[tuple(k.meta['val'].shape) for k in keep]}) can stand in for")


# ----------------------------------------------------------------------- pruned heads
# Head pruning removes KV heads (with their query heads under grouped-query attention) from the
# k/v projections; `rewrite.dims` ties the heads dim of each cache tensor at the boundary to them
# (the new keys are concatenated with the past keys along the positions, every other dim equal,
# and the result is the present output), leaving that dim unfrozen on a generation graph. So the
# prune pass knows, per past placeholder, which heads go: the placeholders are narrowed to the
# kept ones here, with no per-architecture code.
def _past_nodes(program: Program, layout: CacheLayout) -> list[fx.Node] | None:
    """The past placeholders, (key, value) per cache entry in order, or None when the graph's
    inputs do not end with them."""
    placeholders = program.placeholders()
    n = 2 * layout.num_layers
    if n == 0 or len(placeholders) < n or len(list(program.example.kwargs.get(PAST) or [])) != layout.num_layers:
        return None
    return placeholders[len(placeholders) - n:]


def cache_tensors(program: Program) -> set[fx.Node]:
    """A generation graph's KV-cache tensors at its boundary: the past placeholders and the nodes of
    its present outputs (empty for any other graph)."""
    d = program.notes.get(NOTES_KEY)
    if not d:
        return set()
    past = _past_nodes(program, CacheLayout.from_dict(d))
    if past is None:
        return set()
    try:
        keys, leaves = _outputs(program)
    except PassError:
        return set()
    present = {leaf for k, leaf in zip(keys, leaves) if isinstance(leaf, fx.Node) and _PRESENT.match(k)}
    return set(past) | present


def narrow_cache_heads(program: Program, removed: dict[tuple[object, int], np.ndarray]) -> list[str]:
    """After head pruning, in place: narrow each past key/value placeholder whose heads (dim 1) lost
    elements (`removed`: `rewrite.dims.removed_masks`) to the kept heads, with the example, the
    cache layout and `Program.fit_inputs` (batches at the captured head count are sliced).

    The present outputs follow from the pruned projections; the next recapture gives every node
    its new shape. Returns one note per narrowed entry (empty when the graph has no cache or no
    cache tensor changed: query heads pruned within their KV group leave the cache as it is).
    """
    d = program.notes.get(NOTES_KEY)
    if not d:
        return []
    layout = CacheLayout.from_dict(d)
    past_nodes = _past_nodes(program, layout)
    if past_nodes is None:
        raise PassError("head pruning on a generation graph: its inputs do not end with the "
                        f"{2 * layout.num_layers} past key/value tensors of its cache layout")
    source = layout.source_layers()
    past = [list(kv) for kv in program.example.kwargs[PAST]]
    layers = [list(map(list, kv)) for kv in layout.layers]
    heads_note = program.notes.setdefault(NARROWED_HEADS_KEY, {})
    rules = dict(heads_note.get(PAST) or {})
    notes = []
    keys, leaves = _outputs(program)
    present = dict(zip(keys, leaves))
    for p, layer in enumerate(source):
        shapes = []
        for j, kind in enumerate(("key", "value")):
            node = past_nodes[2 * p + j]
            gone = removed.get((node, 1))
            out = present.get(f"present.{layer}.{kind}")
            out_gone = removed.get((out, 1)) if isinstance(out, fx.Node) else None
            if (gone is None) != (out_gone is None) or (gone is not None and not np.array_equal(gone, out_gone)):
                raise PassError(f"head pruning on a generation graph: the heads removed from past_key_values "
                                f"(layer {layer}, {kind}) differ from those removed from present.{layer}.{kind}")
            if gone is None or not gone.any():
                continue
            keep = np.flatnonzero(~gone).tolist()
            old = int(gone.size)
            past[p][j] = past[p][j].index_select(1, torch.tensor(keep, dtype=torch.long)).contiguous()
            _narrow_val(node, len(keep))
            layers[p][j][0] = len(keep)
            key = f"{layer}.{j}"
            orig, before = rules.get(key, (old, list(range(old))))
            rules[key] = [orig, [before[k] for k in keep]]
            shapes.append(f"{kind} {old}->{len(keep)}")
        if shapes:
            notes.append(f"layer {layer}: " + ", ".join(shapes) + " heads")
    if not notes:
        return []
    heads_note[PAST] = rules
    program.example = Inputs(program.example.args, {**program.example.kwargs, PAST: [tuple(kv) for kv in past]})
    new_layout = dataclasses.replace(layout, layers=[(tuple(k), tuple(v)) for k, v in layers])
    program.notes[NOTES_KEY] = new_layout.to_dict()
    return ["KV cache narrowed with the pruned KV heads (past/present per layer): " + "; ".join(notes)]


def _narrow_val(node: fx.Node, heads: int) -> None:
    """The placeholder's value (what the module's input check reads until the next recapture) at
    `heads` heads."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return
    mode = getattr(val, "fake_mode", None)
    with mode if mode is not None else contextlib.nullcontext():
        node.meta["val"] = val.narrow(1, 0, heads).contiguous()
