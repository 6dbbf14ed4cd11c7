"""`Program`: the IR every pass works on, a thin wrapper around a captured GraphModule.

It answers the questions all passes ask, once: which module a node came from, which
parameter a get_attr reads, the shape of a value, which repeated blocks the model has
and where the residual stream runs, and a networkx view of the dataflow.

Annotations: passes write analysis results in one documented place,
`node.meta["rewrite"][key]` (via `annotate`/`annotation`). Node annotations live until the
next `recapture()`; results that must outlive it (per-module scores, the plan a pass
chose) go in `Program.notes`, keyed by module path.
"""
from __future__ import annotations

import copy
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import networkx as nx
import torch
import torch.fx as fx

from .inputs import Inputs

ANNOTATION_KEY = "rewrite"
NARROWED_KEY = "narrowed_inputs"
"""Program.notes key: {list input name: (length it had at capture, indices the graph still takes)}.
A rewrite that drops entries of a list input (a skipped layer's KV-cache entry) records them
here, so batches shaped for the captured interface still run (`Program.fit_inputs`)."""
NARROWED_HEADS_KEY = "narrowed_heads"
"""Program.notes key: {list input name: {"<entry>.<j>": [heads it had at capture, heads the graph
still takes]}}, <entry> the entry's index in the captured list, j the tensor's index within the
entry. Head pruning narrows a generation graph's KV-cache inputs (dim 1) this way
(`rewrite.cache_entries.narrow_cache_heads`); `Program.fit_inputs` slices such tensors when
they come at their captured head count."""
_INDEX = re.compile(r"^(?P<list>.+)\.(?P<index>\d+)$")


@dataclass
class Block:
    """One element of a repeated list of modules (a transformer layer, a ResNet block)."""

    path: str
    list_path: str
    index: int
    type: str
    nodes: list[fx.Node] = field(default_factory=list)
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)

    @property
    def residual_out(self) -> fx.Node | None:
        """The block's main output: the floating-point output with the largest rank.

        Outputs read by something besides the graph's output come first: a generation
        graph's blocks also return their KV-cache tensors (rank 4, straight to the output),
        which are state, not the residual stream."""
        cands = [n for n in self.outputs if _is_float_tensor(n)]
        inside = set(self.nodes)
        inner = [n for n in cands if any(u.op != "output" and u not in inside for u in n.users)]
        return max(inner or cands, key=lambda n: n.meta["val"].dim(), default=None)

    @property
    def residual_in(self) -> fx.Node | None:
        """The input carrying the residual stream: a float input shaped like the output."""
        out = self.residual_out
        if out is None:
            return None
        want = tuple(out.meta["val"].shape)
        for n in self.inputs:
            if _is_float_tensor(n) and tuple(n.meta["val"].shape) == want:
                return n
        return None

    def __repr__(self) -> str:
        return f"Block({self.path!r}, {self.type}, {len(self.nodes)} nodes)"


def _is_float_tensor(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


class Program:
    """A captured model: a GraphModule plus the inputs it was captured with.

    Passes take a Program and return a new one; `module` is called exactly like the original.

    Example:
        >>> import torch
        >>> from rewrite.program import Program
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
        >>> program = Program.capture(model, (torch.randn(2, 8),))
        >>> x = torch.randn(5, 8)  # the batch dim is captured dynamic
        >>> torch.equal(program.module(x), model(x))
        True
    """

    def __init__(self, module: fx.GraphModule, example: Inputs, *, dynamic: bool = True, name: str = "model"):
        self.module = module
        self.example = example
        self.dynamic = dynamic
        self.name = name
        self.notes: dict[str, Any] = {}

    # -- construction --------------------------------------------------------------
    @classmethod
    def capture(cls, model: torch.nn.Module, example: Inputs | Any, *, dynamic: bool = True, name: str | None = None) -> "Program":
        """Export `model` with torch.export on `example` (batch and sequence dims dynamic) and wrap the graph."""
        from .capture import capture

        example = Inputs.of(example)
        gm = capture(model, example, dynamic=dynamic)
        return cls(gm, example, dynamic=dynamic, name=name or type(model).__name__)

    def recapture(self) -> "Program":
        """Re-export the current graph: re-propagates shapes (fresh meta["val"]) and lints it."""
        from .capture import capture

        gm = capture(self.module, self.example, dynamic=self.dynamic)
        out = Program(gm, self.example, dynamic=self.dynamic, name=self.name)
        out.notes = self.notes
        return out

    def clone(self) -> "Program":
        """A deep copy: passes rewrite a clone, so the caller's program never changes."""
        out = Program(copy.deepcopy(self.module), self.example, dynamic=self.dynamic, name=self.name)
        out.notes = copy.deepcopy(self.notes)
        return out

    # -- running -------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def run(self, inputs: Inputs | Any) -> Any:
        """Call the captured module on one batch without gradients."""
        with torch.no_grad():
            return self.fit_inputs(inputs).call(self.module)

    def fit_inputs(self, inputs: Inputs | Any) -> Inputs:
        """`inputs` for the current interface: list inputs given at their captured length lose the
        entries a rewrite dropped (see NARROWED_KEY), and their entries' tensors given at their
        captured head count are sliced to the heads the graph still takes (NARROWED_HEADS_KEY);
        anything else is returned as is."""
        inputs = Inputs.of(inputs)
        narrowed = self.notes.get(NARROWED_KEY) or {}
        heads = self.notes.get(NARROWED_HEADS_KEY) or {}
        if not narrowed and not heads:
            return inputs
        kwargs = dict(inputs.kwargs)
        for name, (length, keep) in narrowed.items():
            value = kwargs.get(name)
            if isinstance(value, (list, tuple)) and len(value) == length and len(keep) != length:
                kwargs[name] = [value[i] for i in keep]
        for name, rules in heads.items():
            value = kwargs.get(name)
            if not isinstance(value, (list, tuple)):
                continue
            keep = list(narrowed[name][1]) if name in narrowed else None
            entries = keep if keep is not None and len(keep) == len(value) else range(len(value))
            kwargs[name] = [_narrow_heads(item, i, rules) for i, item in zip(entries, value)]
        return Inputs(inputs.args, kwargs)

    def flat_inputs(self, inputs: Inputs | Any) -> list[Any]:
        """The placeholders' values: the flattened (args, kwargs) in the captured order."""
        import torch.utils._pytree as pytree

        inputs = self.fit_inputs(inputs)
        info = getattr(self.graph._codegen, "pytree_info", None)
        if info is None or info.in_spec is None:
            return list(inputs.args) + list(inputs.kwargs.values())
        kw_spec = info.in_spec.child(1) if info.in_spec.num_children == 2 else None
        kwargs = inputs.kwargs
        if kw_spec is not None and kw_spec.context:
            missing = [k for k in kw_spec.context if k not in kwargs]
            if missing:
                raise KeyError(f"missing inputs {missing}")
            kwargs = {k: kwargs[k] for k in kw_spec.context}
        return pytree.tree_leaves((inputs.args, kwargs))

    # -- graph queries -------------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self.module.graph

    def nodes(self, op: str | None = None, target: Any = None) -> list[fx.Node]:
        """Graph nodes, optionally only those with this `op` and/or `target`."""
        out = []
        for n in self.graph.nodes:
            if op is not None and n.op != op:
                continue
            if target is not None and n.target not in (target if isinstance(target, (tuple, list, set)) else (target,)):
                continue
            out.append(n)
        return out

    def placeholders(self) -> list[fx.Node]:
        """The graph's input nodes, in the captured order."""
        return self.nodes("placeholder")

    def output_node(self) -> fx.Node:
        """The graph's single output node."""
        return next(n for n in reversed(self.graph.nodes) if n.op == "output")

    @staticmethod
    def module_stack(node: fx.Node) -> list[tuple[str, str]]:
        """[(module path, module type name)] from the root to the innermost module."""
        stack = node.meta.get("nn_module_stack") or {}
        out = []
        for path, typ in stack.values():
            name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
            out.append((path, name.rsplit(".", 1)[-1]))
        return [(p, t) for p, t in out if not p.startswith("_")]

    @classmethod
    def module_path(cls, node: fx.Node) -> str:
        """Dotted path of the innermost module the node was executed in ('' for the root)."""
        if node.op == "get_attr":
            return str(node.target).rsplit(".", 1)[0] if "." in str(node.target) else ""
        stack = cls.module_stack(node)
        return stack[-1][0] if stack else ""

    @classmethod
    def module_type(cls, node: fx.Node) -> str:
        """The class name of the innermost module that produced `node` ('' for top-level ops)."""
        stack = cls.module_stack(node)
        return stack[-1][1] if stack else ""

    def param(self, node_or_target: fx.Node | str) -> torch.Tensor:
        """The parameter or buffer behind a get_attr node (or its target)."""
        target = node_or_target.target if isinstance(node_or_target, fx.Node) else node_or_target
        obj: Any = self.module
        for part in str(target).split("."):
            obj = getattr(obj, part)
        return obj

    def set_param(self, target: str, value: torch.Tensor, *, trainable: bool | None = None) -> None:
        """Replace the tensor behind `target` (a new object; never mutates the old one in place)."""
        owner_path, _, name = str(target).rpartition(".")
        owner = self.module.get_submodule(owner_path) if owner_path else self.module
        old = getattr(owner, name, None)
        is_param = isinstance(old, torch.nn.Parameter) if trainable is None else trainable
        value = value.detach()
        if is_param and value.is_floating_point():
            if name in owner._buffers:
                del owner._buffers[name]
            owner._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
        else:
            if name in owner._parameters:
                del owner._parameters[name]
            owner.register_buffer(name, value)

    def add_constant(self, base_name: str, value: torch.Tensor, *, before: fx.Node) -> fx.Node:
        """Register a new buffer on the root and return a get_attr node for it."""
        name = _unique_attr(self.module, re.sub(r"[^0-9a-zA-Z_]", "_", base_name))
        self.module.register_buffer(name, value.detach())
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(name)
        node.meta["val"] = value
        return node

    def params(self) -> "OrderedDict[str, torch.Tensor]":
        """Every tensor the graph reads through get_attr, by target."""
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for n in self.nodes("get_attr"):
            val = self.param(n)
            if isinstance(val, torch.Tensor):
                out[str(n.target)] = val
        return out

    @staticmethod
    def shape(node: fx.Node) -> tuple:
        """Shape of a value (ints and SymInts), from meta["val"]."""
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return tuple(val.shape)
        raise KeyError(f"node {node.name} has no tensor value")

    @staticmethod
    def concrete_shape(node: fx.Node) -> tuple[int, ...]:
        """Shape with symbolic sizes replaced by their example hints."""
        return tuple(_hint(s) for s in Program.shape(node))

    @staticmethod
    def is_tensor(node: fx.Node) -> bool:
        """True when `node` produces one tensor (not a tuple, symbol or None)."""
        return isinstance(node.meta.get("val"), torch.Tensor)

    def users_outside(self, node: fx.Node, inside: set[fx.Node]) -> list[fx.Node]:
        """The users of `node` that are not in `inside` (a region's outgoing edges)."""
        return [u for u in node.users if u not in inside]

    # -- module hierarchy: repeated blocks --------------------------------------------
    def block_lists(self) -> "OrderedDict[str, list[Block]]":
        """Repeated blocks found from the module hierarchy: paths like `encoder.layer.3`.

        A list is kept when it has at least two indexed children of the same type. Lists
        are ordered by first appearance; nested lists (ResNet stages and their layers)
        are all returned.
        """
        found: "OrderedDict[str, OrderedDict[int, Block]]" = OrderedDict()
        for node in self.graph.nodes:
            if node.op != "call_function":
                continue
            for path, typ in self.module_stack(node):
                m = _INDEX.match(path)
                if not m:
                    continue
                lst = found.setdefault(m["list"], OrderedDict())
                block = lst.get(int(m["index"]))
                if block is None:
                    block = lst[int(m["index"])] = Block(path, m["list"], int(m["index"]), typ)
                if not block.nodes or block.nodes[-1] is not node:
                    block.nodes.append(node)
        out: "OrderedDict[str, list[Block]]" = OrderedDict()
        for list_path, blocks in found.items():
            members = list(blocks.values())
            if len(members) < 2 or len({b.type for b in members}) != 1:
                continue
            for b in members:
                self._fill_boundary(b)
            out[list_path] = members
        return out

    def blocks(self) -> list[Block]:
        """The main repeated blocks: the list with the most nodes (the model's layers)."""
        lists = self.block_lists()
        if not lists:
            return []
        return max(lists.values(), key=lambda bl: (sum(len(b.nodes) for b in bl), len(bl)))

    def _fill_boundary(self, block: Block) -> None:
        inside = set(block.nodes)
        ins: list[fx.Node] = []
        outs: list[fx.Node] = []
        for n in block.nodes:
            for a in n.all_input_nodes:
                if a not in inside and a.op != "get_attr" and self.is_tensor(a) and a not in ins:
                    ins.append(a)
            if self.is_tensor(n) and any(u not in inside and self.is_tensor(u) for u in n.users):
                outs.append(n)
        block.inputs, block.outputs = ins, outs

    def residual_stream(self) -> list[fx.Node]:
        """The values the main blocks hang on: the first block's input, then each output."""
        blocks = self.blocks()
        if not blocks:
            return []
        stream = [blocks[0].residual_in] if blocks[0].residual_in is not None else []
        stream += [b.residual_out for b in blocks if b.residual_out is not None]
        return stream

    # -- dataflow ------------------------------------------------------------------
    def dataflow(self) -> nx.DiGraph:
        """A networkx DiGraph over node names: edges run from producer to consumer."""
        g = nx.DiGraph()
        for n in self.graph.nodes:
            g.add_node(n.name, op=n.op, target=str(n.target), module=self.module_path(n))
            for a in n.all_input_nodes:
                g.add_edge(a.name, n.name)
        return g

    # -- annotations -----------------------------------------------------------------
    @staticmethod
    def annotate(node: fx.Node, key: str, value: Any) -> None:
        """Attach `value` under `key` to `node` for later passes (kept in node.meta)."""
        node.meta.setdefault(ANNOTATION_KEY, {})[key] = value

    @staticmethod
    def annotation(node: fx.Node, key: str, default: Any = None) -> Any:
        """The value an earlier pass attached to `node` under `key`, else `default`."""
        return node.meta.get(ANNOTATION_KEY, {}).get(key, default)

    # -- housekeeping ------------------------------------------------------------------
    def finalize(self) -> None:
        """After a rewrite: drop dead code and unused attributes, lint, regenerate code."""
        self.graph.eliminate_dead_code()
        self.graph.lint()
        remove_unused_attributes(self.module)
        self.module.recompile()

    def __iter__(self) -> Iterator[fx.Node]:
        return iter(self.graph.nodes)


def _narrow_heads(item: Any, entry: int, rules: dict[str, list]) -> Any:
    """One list entry (a (key, value) pair) with each tensor given at its captured head count (dim 1)
    sliced to the heads the graph still takes (NARROWED_HEADS_KEY)."""
    if not isinstance(item, (list, tuple)):
        return item
    out = []
    for j, t in enumerate(item):
        rule = rules.get(f"{entry}.{j}")
        if rule is not None and isinstance(t, torch.Tensor) and t.dim() > 1 and t.shape[1] == rule[0] != len(rule[1]):
            t = t.index_select(1, torch.tensor(rule[1], dtype=torch.long, device=t.device))
        out.append(t)
    return type(item)(out)


def _hint(s: Any) -> int:
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        hint = s.node.hint
        if hint is None:
            value = s.node.shape_env.size_hint(s.node.expr, allow_none=True)
            if value is None:
                from .errors import PassError

                raise PassError(f"size {s} is data-dependent (computed from tensor values during capture, e.g. a "
                                "relative-position range), so it has no example value, and this pass sizes its work "
                                "from example shapes; passes that only read weights (quantize, cleanup) still apply")
            return int(value)
        return int(hint)
    return int(s)


def _unique_attr(module: torch.nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return name


def remove_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete parameters and buffers no get_attr reads any more (they would be exported)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        owner._parameters.pop(attr, None)
        owner._buffers.pop(attr, None)


def iter_get_attr_users(nodes: Iterable[fx.Node]) -> Iterator[tuple[fx.Node, fx.Node]]:
    for n in nodes:
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                yield a, n
