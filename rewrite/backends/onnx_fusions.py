"""Fusions on an exported ONNX generation graph: rules that hand the KV cache to onnxruntime's kernels.

At opset 23 torch's exporter lowers `scaled_dot_product_attention` to the standard `Attention`
op, and its optimizer already folds RMSNorm and rotary into `RMSNormalization` /
`RotaryEmbedding`. What it leaves is the cache around the attention: per layer the graph
concatenates the past keys and values with the new ones (the `present` outputs), and for
grouped-query attention repeats every KV head `n_rep` times (Unsqueeze, Expand, Reshape, with
their shape arithmetic) before `Attention` sees them. `Attention` does both itself: given
`past_key` / `past_value` it returns the concatenation as `present_key` / `present_value`, and
4-D key/value inputs with fewer heads than the query are grouped-query attention. A decode step
then reads the cache once instead of copying it twice and expanding it `n_rep` times.

Each fusion is a rule (`rewrite.rules.Rule`: a pattern, a check that says why not, a
replacement) over ONNX nodes; refusals come back with their reason and the export record
lists what applied and what refused. After the rules, nodes nothing reads any more are
removed and the graph is put back in topological order. Decoders that do not run attention
through SDPA (eager-only models) have no `Attention` node: nothing applies, and the record says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from rewrite.rules import Rule, RuleOutcome

MIN_OPSET = 23
"""`Attention` (with past_key / past_value and grouped heads) exists from opset 23."""


@dataclass
class OnnxGraph:
    """Who produces and who reads each value of an ONNX graph, its constants and interface."""

    proto: Any
    producer: dict[str, Any] = field(default_factory=dict)
    readers: dict[str, list[Any]] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)
    ranks: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, proto: Any) -> "OnnxGraph":
        from onnx import numpy_helper

        g = cls(proto)
        graph = proto.graph
        for t in graph.initializer:
            if t.data_location != 1 and t.data_type == 7 and np.prod(t.dims) <= 16:  # small int64 shapes/axes only
                g.constants[t.name] = numpy_helper.to_array(t)
        for node in graph.node:
            for out in node.output:
                g.producer[out] = node
            for name in node.input:
                g.readers.setdefault(name, []).append(node)
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                g.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        g.outputs = {o.name for o in graph.output}
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.tensor_type.HasField("shape"):
                g.ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
        return g

    def initializer(self, name: str) -> Any | None:
        if not hasattr(self, "_inits"):
            self._inits = {t.name: t for t in self.proto.graph.initializer}
        return self._inits.get(name)

    def op(self, name: str, op_type: str) -> Any | None:
        """The node producing `name` when it is a standard `op_type`, else None."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    def const(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)

    def only_read_by(self, name: str, node: Any) -> bool:
        return name not in self.outputs and all(r is node for r in self.readers.get(name, []))


def attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# ----------------------------------------------------------------------- attention with the KV cache
@dataclass(frozen=True)
class CachedOperand:
    """A key or value operand of `Attention` traced back to `Concat(past, new)`, with the heads it repeats."""

    past: str
    new: str
    present: str
    concat: Any
    repeats: int


def _cache_operand(g: OnnxGraph, name: str) -> CachedOperand | str:
    """Trace K or V of Attention to the cache concatenation, through an optional GQA repeat
    (`Reshape(Expand(Unsqueeze(x, 2), [1, 1, n, 1, 1]), [B, heads * n, T, H])`); a reason if not."""
    repeats, source = 1, name
    reshape = g.op(name, "Reshape")
    if reshape is not None:
        expand = g.op(reshape.input[0], "Expand")
        unsq = g.op(expand.input[0], "Unsqueeze") if expand is not None else None
        if unsq is None:
            return "the key/value operand is a Reshape that is not the grouped-query repeat (Unsqueeze, Expand, Reshape)"
        axes, shape = g.const(unsq.input[1]) if len(unsq.input) > 1 else None, g.const(expand.input[1])
        if axes is None or list(axes.reshape(-1)) != [2] or shape is None or shape.shape != (5,) \
                or any(int(s) != 1 for i, s in enumerate(shape) if i != 2):
            return "the head repeat is not Unsqueeze(axis 2) + Expand([1, 1, n, 1, 1]) (shape not constant or other axes)"
        target = g.op(reshape.input[1], "Concat")
        pieces = [g.const(p) for p in target.input] if target is not None else [g.const(reshape.input[1])]
        if target is None and (pieces[0] is None or pieces[0].shape != (4,)):
            return "the head repeat's Reshape target is neither constant nor a Concat of 4 dims"
        dims = [p.reshape(-1) if p is not None else None for p in pieces]
        if target is not None and (len(dims) != 4 or any(d is not None and d.size != 1 for d in dims)):
            return "the head repeat's Reshape target is not [batch, heads, length, head_dim]"
        repeats, source = int(shape[2]), unsq.input[0]
        kv_heads = _static_dim(g, source, 1)
        flat = [int(d[0]) if d is not None else None for d in dims] if target is not None else [int(x) for x in dims[0]]
        if kv_heads is None or flat[1] != kv_heads * repeats:
            return (f"the head repeat's Reshape does not merge the {kv_heads} KV heads x {repeats} repeats into the "
                    f"head axis (target dim 1: {flat[1]})")
        for chain in (unsq.output[0], expand.output[0]):
            if chain in g.outputs:
                return "an intermediate of the head repeat is a graph output"
    concat = g.op(source, "Concat")
    if concat is None:
        return "the key/value operand is not a concatenation of the past cache with new keys/values"
    if len(concat.input) != 2:
        return f"the cache Concat has {len(concat.input)} inputs (past + new expected)"
    rank = g.ranks.get(concat.input[0]) or g.ranks.get(concat.output[0])
    axis = attr(concat, "axis")
    if rank != 4 or axis not in (2, -2):
        return f"the cache Concat is not along the sequence axis of a [batch, heads, length, head_dim] tensor (rank {rank}, axis {axis})"
    return CachedOperand(past=concat.input[0], new=concat.input[1], present=concat.output[0], concat=concat, repeats=repeats)


def _static_dim(g: OnnxGraph, name: str, index: int) -> int | None:
    """A static dim of `name`, looked up through its Concat inputs (the cache input's declared shape)."""
    node = g.producer.get(name)
    names = [name] + (list(node.input) if node is not None and node.op_type == "Concat" else [])
    for n in names:
        for vi in list(g.proto.graph.input) + list(g.proto.graph.value_info) + list(g.proto.graph.output):
            if vi.name == n and vi.type.tensor_type.HasField("shape"):
                dims = vi.type.tensor_type.shape.dim
                if len(dims) > index and dims[index].HasField("dim_value"):
                    return int(dims[index].dim_value)
    return None


def _attention_match(node: Any, g: OnnxGraph) -> bool:
    return node.domain in ("", "ai.onnx") and len(node.input) >= 3 and (len(node.input) < 5 or not node.input[4])


def _attention_check(node: Any, g: OnnxGraph) -> str | None:
    if attr(node, "is_causal", 0):
        return "is_causal=1: with a past input its causal alignment moves to the bottom right (the graph's masks differ)"
    if any(o for o in node.output[1:]):
        return "the attention already has present or qk outputs"
    operands = [_cache_operand(g, node.input[i]) for i in (1, 2)]
    for which, op in zip(("key", "value"), operands):
        if isinstance(op, str):
            return f"{which}: {op}"
    k, v = operands
    if k.repeats != v.repeats:
        return f"key and value repeat their heads differently ({k.repeats} vs {v.repeats})"
    return None


def _attention_replace(node: Any, g: OnnxGraph) -> dict[str, Any]:
    from onnx import helper

    k, v = _cache_operand(g, node.input[1]), _cache_operand(g, node.input[2])
    mask = node.input[3] if len(node.input) > 3 else ""
    fused = helper.make_node("Attention", [node.input[0], k.new, v.new, mask, k.past, v.past],
                             [node.output[0], k.present, v.present], name=(node.name or "attention") + "_kv_cache")
    fused.attribute.extend(node.attribute)
    graph = g.proto.graph.node
    index = list(graph).index(node)
    graph.remove(node)
    graph.insert(index, fused)
    for concat in (k.concat, v.concat):
        graph.remove(concat)
    return {"heads repeated": k.repeats}


ATTENTION_KV_CACHE = Rule("attention with KV cache", ("Attention",), match=_attention_match, check=_attention_check,
                          replace=_attention_replace)
"""`Attention(Q, repeat(Concat(past_k, k)), repeat(Concat(past_v, v)), mask)` ->
`Attention(Q, k, v, mask, past_k, past_v) -> (Y, present_k, present_v)`: the cache concatenation
and the grouped-query head repeat move into the kernel (same present outputs, same names)."""


# ----------------------------------------------------------------------- sibling MatMulNBits
MS_DOMAIN = "com.microsoft"
_NBITS_ATTRS = ("K", "bits", "block_size", "accuracy_level")


def _nbits_key(node: Any) -> tuple:
    return (node.input[0],) + tuple(attr(node, a) for a in _NBITS_ATTRS)


def _nbits_siblings(node: Any, g: OnnxGraph) -> list[Any]:
    """MatMulNBits nodes reading the same input with the same K, bits, block and accuracy (node first)."""
    key = _nbits_key(node)
    return [r for r in g.readers.get(node.input[0], []) if r.op_type == "MatMulNBits" and r.domain == MS_DOMAIN
            and _nbits_key(r) == key]


def _merge_match(node: Any, g: OnnxGraph) -> bool:
    siblings = _nbits_siblings(node, g)
    return node.domain == MS_DOMAIN and len(siblings) > 1 and siblings[0] is node


def _merge_check(node: Any, g: OnnxGraph) -> str | None:
    for sib in _nbits_siblings(node, g):
        if len(sib.input) > 4 and any(sib.input[4:]):
            return f"{sib.name or sib.output[0]} has g_idx or bias inputs (only B, scales, zero points are concatenated)"
        if any(g.initializer(n) is None for n in sib.input[1:4] if n):
            return f"{sib.name or sib.output[0]}: its packed weight, scales or zero points are not initializers"
        if attr(sib, "N") is None:
            return f"{sib.name or sib.output[0]} has no N attribute"
    return None


def _merge_replace(node: Any, g: OnnxGraph) -> dict[str, Any]:
    from onnx import helper, numpy_helper

    siblings = _nbits_siblings(node, g)
    bits, block, k = attr(node, "bits"), attr(node, "block_size"), attr(node, "K")
    ns = [int(attr(s, "N")) for s in siblings]
    arrays = [[numpy_helper.to_array(g.initializer(s.input[i])) for s in siblings] for i in (1, 2)]
    with_zero = any(len(s.input) > 3 and s.input[3] for s in siblings)
    if with_zero:  # a node without zero points uses the default 2**(bits-1): written out where another has them
        n_blocks = -(-k // block)
        zeros = []
        for s, n in zip(siblings, ns):
            if len(s.input) > 3 and s.input[3]:
                zeros.append(numpy_helper.to_array(g.initializer(s.input[3])).reshape(n, -1))
            else:
                mid = 1 << (bits - 1)
                width = -(-n_blocks * bits // 8)
                byte = (mid | (mid << 4)) if bits == 4 else mid
                zeros.append(np.full((n, width), byte, np.uint8))
        arrays.append(zeros)
    base = (node.name or node.output[0]) + "_merged"
    names = []
    for i, parts in enumerate(arrays):
        merged = np.concatenate([p.reshape(n, -1) for p, n in zip(parts, ns)], axis=0)
        shape = (sum(ns),) + parts[0].shape[1:] if i == 0 else (-1,)
        tensor = numpy_helper.from_array(merged.reshape(shape), f"{base}_{('B', 'scales', 'zero_points')[i]}")
        g.proto.graph.initializer.append(tensor)
        names.append(tensor.name)
    fused = helper.make_node("MatMulNBits", [node.input[0]] + names, [base], name=base, domain=MS_DOMAIN)
    fused.attribute.extend(a for a in node.attribute if a.name != "N")
    fused.attribute.append(helper.make_attribute("N", sum(ns)))
    split_sizes = numpy_helper.from_array(np.array(ns, np.int64), base + "_split")
    g.proto.graph.initializer.append(split_sizes)
    split = helper.make_node("Split", [base, split_sizes.name], [o for s in siblings for o in s.output[:1]],
                             name=base + "_split", axis=-1)
    graph = g.proto.graph.node
    index = list(graph).index(node)
    for s in siblings:
        graph.remove(s)
    graph.insert(index, fused)
    graph.insert(index + 1, split)
    return {"merged": len(siblings), "N": ns}


MERGE_MATMULNBITS = Rule("merge sibling MatMulNBits", ("MatMulNBits",), match=_merge_match, check=_merge_check,
                         replace=_merge_replace)
"""MatMulNBits nodes that read the same activation with the same K / bits / block / accuracy (a block's
q, k, v projections; its gate and up projections) -> one MatMulNBits over the rows of all (packed
weights, scales and zero points concatenated along N) and a Split: the activation is read and, with
int8 compute, quantized once instead of once per projection, and a decode step launches fewer kernels.
Each output column is computed as before (same row, same blocks), so the outputs are unchanged."""

GENERATION_RULES: tuple[Rule, ...] = (ATTENTION_KV_CACHE, MERGE_MATMULNBITS)
RULE_OPSET = {ATTENTION_KV_CACHE.name: MIN_OPSET}
"""The opset a rule's ops need (others: any)."""


# ----------------------------------------------------------------------- driver
def opset_of(proto: Any) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def apply_onnx_rules(proto: Any, rules_in: Iterable[Rule] = GENERATION_RULES) -> RuleOutcome:
    """Apply each rule to every node it matches (node list taken before), then drop dead nodes and re-sort.

    The graph index is rebuilt after each replacement (replacements move producers); refusals
    carry the rule's reason."""
    out = RuleOutcome()
    rules, opset = [], opset_of(proto)
    for rule in rules_in:
        if opset < RULE_OPSET.get(rule.name, 0):
            out.refused.append({"rule": rule.name, "node": "graph",
                                "reason": f"opset {opset} < {RULE_OPSET[rule.name]} has no Attention op with a KV cache: "
                                          f"export at opset {RULE_OPSET[rule.name]} (spec export.onnx.opset)"})
        else:
            rules.append(rule)
    g = OnnxGraph.of(proto)
    for node in list(proto.graph.node):
        for rule in rules:
            if node not in proto.graph.node:
                break
            if node.op_type not in rule.roots or node.domain not in ("", "ai.onnx", MS_DOMAIN) or not rule.match(node, g):
                continue
            reason = rule.check(node, g)
            if reason is not None:
                out.refused.append({"rule": rule.name, "node": node.name or node.output[0], "reason": reason})
                continue
            name = node.name or node.output[0]
            out.applied.append({"rule": rule.name, "node": name, **rule.replace(node, g)})
            g = OnnxGraph.of(proto)
    if out.applied:
        remove_dead_nodes(proto)
        topological_sort(proto)
        remove_unused_initializers(proto)
    return out


def remove_dead_nodes(proto: Any) -> int:
    """Drop nodes none of whose outputs is read or a graph output (repeatedly); how many went."""
    graph, removed = proto.graph, 0
    while True:
        read = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
        for node in graph.node:  # subgraphs (If/Loop bodies) read outer values too
            for a in node.attribute:
                for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    read |= {n for sn in sub.node for n in sn.input}
        dead = [n for n in graph.node if not any(o in read for o in n.output if o)]
        if not dead:
            return removed
        for n in dead:
            graph.node.remove(n)
        removed += len(dead)


def remove_unused_initializers(proto: Any) -> None:
    """Drop initializers no node reads (the parts of merged weights), by index (no copies)."""
    graph = proto.graph
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                used |= {n for sn in sub.node for n in sn.input}
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name not in used]):
        del graph.initializer[i]


def topological_sort(proto: Any) -> None:
    """Order nodes so every input is produced before it is read (a fused node may read later values)."""
    graph = proto.graph
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"the ONNX graph has a cycle or an unproduced input at {rest[0].op_type} {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
