"""Skippable regions of a program: residual blocks and their residual branches, found on the graph.

A region is skippable when its output equals "its residual input plus something" (possibly
followed by a norm or an activation, as in post-norm BERT or ResNet): then routing the
input to where the output went removes exactly that something. Regions are found from
the module hierarchy (`Program.block_lists`) and the dataflow, never from architecture
name lists:

- a *block* is an element of a repeated module list whose input and output shapes match
  and whose output is reached from its input through a chain of residual adds;
- a *branch* is one link of that chain: the add whose one operand is the current residual
  value (through casts/copies) and whose other operand is computed from it inside the
  block. Its output is the add itself (pre-norm: LLaMA, GPT-2, ViT) or the norm/activation
  that is the add's only user inside the block (post-norm: BERT; ResNet's final ReLU).
  A branch holding attention is "attention", else one holding a linear/matmul is "mlp",
  else "conv".

`bypassed` applies skips on a cheap copy (parameters shared) for scoring; `skip_regions`
applies them in place. Both route `stream_in` to the users of `stream_out` and then delete
the dead region, including in-place ops (ResNet's `add_`) that plain dead-code
elimination keeps because they mutate.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.fx as fx

from rewrite.program import Block, Program

aten = torch.ops.aten

ADD_OPS = {aten.add.Tensor, aten.add_.Tensor}
TRANSPARENT_OPS = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.dropout.default,
    aten.type_as.default,
}
TRAILING_OPS = {
    aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default, aten.group_norm.default,
    aten.batch_norm.default, aten.relu.default, aten.relu_.default, aten.gelu.default,
} | TRANSPARENT_OPS
ATTENTION_OPS = {aten.scaled_dot_product_attention.default, aten._softmax.default, aten.softmax.int}
MLP_OPS = {aten.linear.default, aten.matmul.default, aten.mm.default, aten.addmm.default, aten.bmm.default}
CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}
WEIGHT_OPS = {aten.linear.default} | CONV_OPS

ALIAS_NOTE = "skip_alias"
"""Program.notes key: {bypassed stream_out node name: node name now carrying its value}."""


@dataclass(frozen=True)
class Region:
    """Something the skip pass can remove: a whole block or one residual branch of it."""

    key: str
    """Block path ("encoder.layer.3") or "<block path>.attention" / ".mlp" / ".conv"."""
    block: str
    kind: str
    """"block", "attention", "mlp" or "conv"."""
    stream_in: str
    """Name of the node carrying the residual input."""
    stream_out: str
    """Name of the node whose users receive `stream_in` when the region is skipped."""
    nodes: tuple[str, ...]
    """Names of the nodes computed between stream_in and stream_out (removed by a skip)."""
    weights: tuple[str, ...]
    """get_attr targets of the linear/conv weights inside the region."""


@dataclass
class Candidates:
    """The regions found at one granularity, and why other blocks were not candidates."""

    granularity: str
    regions: list[Region] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)

    def keys(self) -> list[str]:
        return [r.key for r in self.regions]

    def by_key(self) -> dict[str, Region]:
        return {r.key: r for r in self.regions}


# ------------------------------------------------------------------------ detection
def _aliases(node: fx.Node, inside: set[fx.Node]) -> set[fx.Node]:
    """`node` and every value inside the block that only casts or copies it."""
    out = {node}
    todo = [node]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in inside and u.op == "call_function" and u.target in TRANSPARENT_OPS and u.args and u.args[0] is n and u not in out:
                out.add(u)
                todo.append(u)
    return out


def _reachable(starts: Iterable[fx.Node], inside: set[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    """Nodes inside the block reached from `starts` by repeated `step` (users: downstream; inputs: upstream)."""
    seen: set[fx.Node] = set()
    todo = list(starts)
    while todo:
        for m in step(todo.pop()):
            if m in inside and m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def _descendants(starts: Iterable[fx.Node], inside: set[fx.Node]) -> set[fx.Node]:
    return _reachable(starts, inside, lambda n: n.users)


def _ancestors(node: fx.Node, inside: set[fx.Node]) -> set[fx.Node]:
    """`node` and everything inside the block it depends on."""
    return {node} | _reachable([node], inside, lambda n: n.all_input_nodes)


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    try:
        return Program.shape(a) == Program.shape(b)
    except KeyError:
        return False


@dataclass
class _Branch:
    stream_in: fx.Node
    merge: fx.Node
    stream_out: fx.Node
    nodes: list[fx.Node]


def residual_chain(block: Block) -> list[_Branch]:
    """The residual adds that carry the block's input to its output, in order."""
    rin = block.residual_in
    if rin is None:
        return []
    inside = set(block.nodes)
    order = {n: i for i, n in enumerate(block.nodes)}
    chain: list[_Branch] = []
    cur = rin
    while True:
        aliases = _aliases(cur, inside)
        below = _descendants(aliases, inside)
        merge = None
        for n in block.nodes:
            if n.op != "call_function" or n.target not in ADD_OPS or n not in below or not _same_shape(n, cur):
                continue
            ops = [a for a in n.args[:2] if isinstance(a, fx.Node)]
            if len(ops) != 2:
                continue
            on_stream = [a in aliases for a in ops]
            if sum(on_stream) != 1:
                continue
            other = ops[on_stream.index(False)]
            if other not in below:  # e.g. a position embedding added to the stream
                continue
            merge = n
            break
        if merge is None:
            break
        out = merge
        while len(out.users) == 1:
            (u,) = out.users
            if u in inside and u.op == "call_function" and u.target in TRAILING_OPS and u.args[0] is out and _same_shape(u, out):
                out = u
            else:
                break
        region = (below & _ancestors(out, inside)) - {cur}
        chain.append(_Branch(cur, merge, out, sorted(region, key=order.__getitem__)))
        cur = out
    return chain


def weight_of(node: fx.Node) -> fx.Node | None:
    """The get_attr weight a linear/conv/matmul node multiplies by (GPT-2's Conv1D is addmm)."""
    if node.op != "call_function" or node.target not in WEIGHT_OPS | MLP_OPS:
        return None
    args = node.args[1:2] if node.target in WEIGHT_OPS else node.args
    for w in args:
        if isinstance(w, fx.Node) and w.op == "get_attr" and Program.is_tensor(w) and w.meta["val"].dim() >= 2:
            return w
    return None


def _weights(nodes: Iterable[fx.Node]) -> tuple[str, ...]:
    return tuple(str(w.target) for w in map(weight_of, nodes) if w is not None)


def _branch_kind(nodes: Iterable[fx.Node]) -> str:
    targets = {n.target for n in nodes if n.op == "call_function"}
    if targets & ATTENTION_OPS:
        return "attention"
    if targets & MLP_OPS:
        return "mlp"
    return "conv"


def _contains(outer: str, inner: str) -> bool:
    return inner.startswith(outer + ".")


def find_regions(program: Program, granularity: str = "block") -> Candidates:
    """Skippable blocks (granularity "block") or branches ("attention", "mlp", "conv")."""
    if granularity not in ("block", "attention", "mlp", "conv"):
        raise ValueError(f"granularity must be block, attention, mlp or conv, got {granularity!r}")
    blocks: dict[str, tuple[Block, list[_Branch]]] = {}
    rejected: dict[str, str] = {}
    for blist in program.block_lists().values():
        for b in blist:
            out = b.residual_out
            if out is None:
                rejected[b.path] = "has no floating-point output"
                continue
            if b.residual_in is None:
                shapes = [tuple(Program.concrete_shape(n)) for n in b.inputs if Program.is_tensor(n)]
                rejected[b.path] = (f"its output shape {Program.concrete_shape(out)} matches none of its input shapes {shapes}: "
                                    "removing it would change the shape downstream (a downsampling or projection block)")
                continue
            chain = residual_chain(b)
            if not chain or chain[-1].stream_out is not out:
                rejected[b.path] = "no chain of residual adds carries its input to its output (not a residual block)"
                continue
            blocks[b.path] = (b, chain)
    # keep the innermost residual blocks: a ResNet stage made of residual layers is skipped layer by layer
    inner = {p for p in blocks if not any(_contains(p, q) for q in blocks if q != p)}
    for p in sorted(set(blocks) - inner):
        rejected[p] = "made of smaller skippable blocks, which are the candidates instead"
    for p in list(rejected):
        if any(_contains(p, q) for q in inner) and p not in blocks:
            rejected.pop(p)  # a container (a stage) of candidates: not worth a line
        elif any(_contains(q, p) for q in inner):
            rejected.pop(p)  # a piece of a candidate
    regions: list[Region] = []
    for path in [p for p in blocks if p in inner]:
        b, chain = blocks[path]
        if granularity == "block":
            nodes = [n for n in b.nodes if n in set().union(*(set(c.nodes) for c in chain))]
            regions.append(Region(path, path, "block", b.residual_in.name, b.residual_out.name,
                                  tuple(n.name for n in nodes), _weights(nodes)))
            continue
        seen: dict[str, int] = {}
        for c in chain:
            kind = _branch_kind(c.nodes)
            if kind != granularity:
                continue
            seen[kind] = seen.get(kind, 0) + 1
            key = f"{path}.{kind}" if seen[kind] == 1 else f"{path}.{kind}{seen[kind]}"
            regions.append(Region(key, path, kind, c.stream_in.name, c.stream_out.name,
                                  tuple(n.name for n in c.nodes), _weights(c.nodes)))
    return Candidates(granularity, regions, rejected)


def no_region_message(program: Program, cands: Candidates) -> str:
    """Why nothing is skippable at this granularity, naming what was looked at."""
    if cands.granularity != "block":
        blocks = find_regions(program, "block")
        if blocks.regions:
            have = [g for g in ("attention", "mlp", "conv") if g != cands.granularity and find_regions(program, g).regions]
            return (f"no {cands.granularity} branch to skip: the residual blocks ({', '.join(blocks.keys()[:3])}, ...) have "
                    f"{' and '.join(have) or 'no other'} branches; use granularity 'block'"
                    + "".join(f" or '{g}'" for g in have if g != "conv") + ".")
    if not program.block_lists():
        return ("no skippable block: the model has no repeated module list (blocks are found as indexed children "
                "of the same type, e.g. encoder.layer.0..N), so there is nothing to skip.")
    lines = "; ".join(f"{k}: {v}" for k, v in list(cands.rejected.items())[:6])
    return f"no skippable block: every repeated block was rejected ({lines})."


def _nodes(program: Program, names: Iterable[str]) -> list[fx.Node]:
    by_name = {n.name: n for n in program.graph.nodes}
    return [by_name[n] for n in names if n in by_name]


def select(cands: Candidates, patterns: Iterable[str]) -> list[Region]:
    """Regions whose key or block path matches one of the globs."""
    pats = list(patterns)
    return [r for r in cands.regions if any(fnmatch.fnmatchcase(r.key, p) or fnmatch.fnmatchcase(r.block, p) for p in pats)]


# ------------------------------------------------------------------------ rewriting
def resolve(program: Program, name: str) -> str:
    """The node now carrying the value `name` carried before earlier skips."""
    alias = program.notes.get(ALIAS_NOTE, {})
    seen = set()
    while name in alias and name not in seen:
        seen.add(name)
        name = alias[name]
    return name


def skip_regions(program: Program, regions: Iterable[Region]) -> int:
    """Route each region's input to its output's users, in place; delete the dead region.

    Returns the number of nodes removed. Records the routing in `program.notes` so that
    regions found before the rewrite can still be located (see `resolve`).
    """
    graph = program.graph
    by_name = {n.name: n for n in graph.nodes}
    order = {n: i for i, n in enumerate(graph.nodes)}
    alias = program.notes.setdefault(ALIAS_NOTE, {})
    todo = sorted(regions, key=lambda r: order[by_name[resolve(program, r.stream_out)]])
    before = len(graph.nodes)
    for r in todo:
        src = by_name[resolve(program, r.stream_in)]
        dst = by_name[resolve(program, r.stream_out)]
        if src is dst:
            continue
        dst.replace_all_uses_with(src)
        alias[dst.name] = src.name
        region = set(_nodes(program, r.nodes)) | {dst}
        for n in reversed(list(graph.nodes)):  # dead region, mutating ops included
            if n in region and not n.users and n.op == "call_function":
                graph.erase_node(n)
    graph.eliminate_dead_code()
    return before - len(graph.nodes)


def bypassed(program: Program, regions: Iterable[Region]) -> Program:
    """A copy of `program` with `regions` skipped; the parameters are shared, not copied."""
    graph = copy.deepcopy(program.graph)
    module = fx.GraphModule(program.module, graph, class_name=type(program.module).__name__)
    out = Program(module, program.example, dynamic=program.dynamic, name=program.name)
    out.notes = {ALIAS_NOTE: dict(program.notes.get(ALIAS_NOTE, {}))}
    skip_regions(out, list(regions))
    module.recompile()
    return out
