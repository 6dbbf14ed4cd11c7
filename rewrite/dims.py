"""Dimension tracking: which tensor dimensions (and which indices along them) must change together.

Structured pruning removes *units* (a channel, an FFN neuron, an attention head) and every
parameter slice that produces or consumes them. Which slices belong together is a property
of the dataflow, so it is computed once here from the captured graph:

1. Vertices are (value, dim) pairs for every static dimension of every tensor value (a
   parameter is one value however many get_attr nodes read it). Symbolic dims (batch,
   sequence) are never vertices: they are not widths.
2. Each op adds edges with an index map between the elements of its inputs' and outputs'
   dims: elementwise ops and broadcasting tie equal dims one to one; linear/conv/matmul tie
   the contraction dims and map the output dim to the weight's rows; view/reshape map a
   flat index to the *outer* dim of each side (hidden = heads x head_dim: hidden index i
   belongs to head i // head_dim, so a head unit covers head_dim hidden indices); cat and
   split shift index ranges; transpose/permute permute dims; norms tie their weight and
   bias; depthwise conv ties each output channel to its input channel; embedding ties its
   table's columns to the output's last dim; scaled_dot_product_attention ties the head
   dims of q, k, v and the output (a GQA expand + reshape maps query head h to KV head
   h // rep); eager attention (a 4-D q @ k^T that reaches a softmax through scale and mask
   ops) marks the same heads dim, its matmuls tying q, k and v like any batched matmul.
3. The element-level connected components are the *units*; units with the same set of
   (parameter, dim, width) members form a `Group`. The (value, dim) graph itself is a
   networkx graph (`dim_graph`) whose components the groups refine.

Dims that cannot change safely are *frozen* with a reason (a model input or output, an
embedding vocabulary, an indexed dim, the residual stream all blocks share, an op we do not
understand, the inner dim of a reshape): a group touching a frozen element is not prunable.
An embedding table's columns are not frozen by themselves: a word embedding's belong to the
residual width (frozen there), a relative-position bias table's to the heads it biases
(T5, MPNet; Swin indexes its table, `aten.index` with one index tensor), sliced with them.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import networkx as nx
import numpy as np
import torch
import torch.fx as fx

from .program import Program
from .shapes import group_dims

aten = torch.ops.aten


@dataclass(frozen=True)
class Member:
    """One parameter slice of a group: `indices[u]` are the indices along `dim` of unit u."""

    param: str
    dim: int
    indices: torch.Tensor
    role: str  # "producer" | "consumer" | "carried" (a table only views and slices read: sliced along, not scored)
    module: str

    def __repr__(self) -> str:  # tensors make the default repr unreadable
        return f"Member({self.param!r}, dim={self.dim}, k={self.indices.shape[1]}, {self.role}, {self.module!r})"


@dataclass
class Group:
    """Units that must be removed together, with every parameter slice they touch."""

    id: int
    kind: str  # "head" | "kv_head" | "neuron" | "channel" | "residual"
    size: int
    unit: int
    members: list[Member]
    layer: str | None
    prunable: bool
    reason: str
    heads_per_unit: int = 1
    """For kv_head groups: query heads per KV head (the GQA ratio)."""
    ops: list[str] = field(default_factory=list)
    """Module paths of the ops whose weights the group shrinks (producers first)."""
    labels: list[int] = field(default_factory=list, repr=False)
    """Element-component label of each unit in the `DimGraph` it came from (for `removed_masks`)."""

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == "producer"]

    @property
    def consumers(self) -> list[Member]:
        return [m for m in self.members if m.role == "consumer"]

    def params_per_unit(self, program: Program) -> int:
        """Parameter values one unit carries (all members)."""
        total = 0
        for m in self.members:
            shape = list(program.param(m.param).shape)
            other = int(np.prod([s for i, s in enumerate(shape) if i != m.dim])) if len(shape) > 1 else 1
            total += other * m.indices.shape[1]
        return total


# ----------------------------------------------------------------------------- the graph
Key = Any  # fx.Node, or ("param", target) for parameters


class _Builder:
    """Collects vertices, element-level edges and frozen vertices from one pass over the graph."""

    def __init__(self, program: Program):
        self.program = program
        self.offset: dict[tuple[Key, int], int] = {}
        self.size: dict[tuple[Key, int], int] = {}
        self.total = 0
        self.edges_a: list[np.ndarray] = []
        self.edges_b: list[np.ndarray] = []
        self.frozen: dict[tuple[Key, int], str] = {}
        self.frozen_elems: list[tuple[np.ndarray, str]] = []
        self.nx = nx.Graph()
        self.heads: set[tuple[Key, int]] = set()  # head dims of sdpa queries
        self.param_users: dict[tuple[str, int], tuple[str, str]] = {}  # (param, dim) -> (role, module)
        self.producer_dims: set[tuple[str, int]] = set()

    # -- vertices ------------------------------------------------------------------
    def key(self, node: fx.Node) -> Key:
        if node.op == "get_attr":
            return ("param", str(node.target))
        return node

    def shape(self, node: Any) -> tuple | None:
        if not isinstance(node, fx.Node):
            return None
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return tuple(val.shape)
        return None

    def vertex(self, node: fx.Node, dim: int) -> tuple[Key, int] | None:
        """The vertex of a static dim (None for symbolic dims or non-tensors)."""
        shape = self.shape(node)
        if shape is None:
            return None
        dim = dim % len(shape) if shape else dim
        if not shape or not isinstance(shape[dim], int):
            return None
        v = (self.key(node), dim)
        if v not in self.offset:
            self.offset[v] = self.total
            self.size[v] = int(shape[dim])
            self.total += int(shape[dim])
            self.nx.add_node(v)
        return v

    def elems(self, v: tuple[Key, int]) -> np.ndarray:
        return np.arange(self.offset[v], self.offset[v] + self.size[v])

    # -- edges ---------------------------------------------------------------------
    def link(self, a: fx.Node, da: int, b: fx.Node, db: int, ia: np.ndarray | None = None, ib: np.ndarray | None = None, how: str = "=") -> None:
        """Tie element ia[j] of (a, da) to element ib[j] of (b, db); default: one to one."""
        va, vb = self.vertex(a, da), self.vertex(b, db)
        if va is None or vb is None:
            return
        if ia is None and ib is None:
            if self.size[va] != self.size[vb]:
                if self.size[va] == 1 or self.size[vb] == 1:
                    return  # broadcast: nothing is tied
                self.freeze_node(a, f"size mismatch at {b.name}")
                self.freeze_node(b, f"size mismatch at {b.name}")
                return
            ia = ib = np.arange(self.size[va])
        self.edges_a.append(self.offset[va] + np.asarray(ia))
        self.edges_b.append(self.offset[vb] + np.asarray(ib))
        self.nx.add_edge(va, vb, map=how)

    def freeze(self, node: Any, dim: int, reason: str) -> None:
        if not isinstance(node, fx.Node):
            return
        v = self.vertex(node, dim)
        if v is not None and v not in self.frozen:
            self.frozen[v] = reason

    def freeze_node(self, node: Any, reason: str) -> None:
        shape = self.shape(node)
        if shape is None:
            return
        for d in range(len(shape)):
            self.freeze(node, d, reason)

    def use_param(self, p: Any, dim: int, role: str, user: fx.Node) -> None:
        if isinstance(p, fx.Node) and p.op == "get_attr":
            shape = self.shape(p)
            if shape is None:
                return
            key = (str(p.target), dim % len(shape))
            self.param_users.setdefault(key, (role, self.program.module_path(user)))
            if role == "producer":
                self.producer_dims.add(key)


def _args(node: fx.Node) -> list[Any]:
    return list(node.args)


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]


def _hint(s: Any) -> int:
    if isinstance(s, int):
        return s
    return int(s.node.hint) if s.node.hint is not None else int(s.node.shape_env.size_hint(s.node.expr))


# ops that keep every dim of their (first) input: unary elementwise and casts
UNARY = {
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.silu.default, aten.silu_.default, aten.tanh.default,
    aten.sigmoid.default, aten.neg.default, aten.rsqrt.default, aten.sqrt.default, aten.exp.default, aten.abs.default,
    aten.hardtanh.default, aten.hardtanh_.default, aten.hardswish.default, aten.hardsigmoid.default, aten.clamp.default,
    aten.pow.Tensor_Scalar, aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.dropout.default, aten.alias.default, aten.detach.default, aten.cos.default, aten.sin.default,
    aten.leaky_relu.default, aten.elu.default, aten.softplus.default, aten.erf.default, aten.log.default, aten.reciprocal.default,
    aten.mish.default, aten.relu6.default if hasattr(aten, "relu6") else aten.relu.default, aten.type_as.default,
    aten.softmax.int, aten._softmax.default, aten.lift_fresh_copy.default,
}
BINARY = {
    aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.mul_.Tensor, aten.div.Tensor,
    aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.maximum.default, aten.minimum.default, aten.pow.Tensor_Tensor, aten.rsub.Tensor,
    aten.__and__.Tensor, aten.__or__.Tensor, aten.eq.Tensor, aten.ne.Tensor, aten.gt.Tensor, aten.lt.Tensor,
    aten.le.Tensor, aten.ge.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.add.Scalar,
    aten.mul.Scalar, aten.div.Scalar, aten.sub.Scalar, aten.eq.Scalar, aten.ne.Scalar, aten.ge.Scalar,
    aten.le.Scalar, aten.gt.Scalar, aten.lt.Scalar,
}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
         aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}  # .padding: padding="same" (EfficientNet)
POOLS = {aten.adaptive_avg_pool2d.default, aten.max_pool2d.default, aten.avg_pool2d.default,
         aten.adaptive_avg_pool1d.default, aten.max_pool1d.default, aten.avg_pool1d.default, aten._adaptive_avg_pool2d.default}
UPSAMPLES = {getattr(getattr(aten, op), overload) for overload in ("vec", "default") for op in ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
                                              "upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d",
                                              "upsample_trilinear3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa")}
NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction, aten.std.correction}
SOURCES = {aten.arange.default, aten.arange.start, aten.arange.start_step, aten.zeros.default, aten.ones.default,
           aten.full.default, aten.empty.memory_format, aten.scalar_tensor.default, aten.new_ones.default,
           aten.new_zeros.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default}


def _broadcast(b: _Builder, out: fx.Node, inputs: Iterable[Any]) -> None:
    oshape = b.shape(out)
    if oshape is None:
        return
    for x in inputs:
        xs = b.shape(x)
        if xs is None:
            continue
        off = len(oshape) - len(xs)
        for d in range(len(xs)):
            b.link(x, d, out, d + off)
            if isinstance(x, fx.Node) and x.op == "get_attr" and xs[d] != 1:
                b.use_param(x, d, "producer", out)  # a scale or shift (RMSNorm weight, layer scale)


def _reshape(b: _Builder, x: fx.Node, out: fx.Node) -> None:
    """Map flat indices to the outer dim of each run of equal product; freeze inner dims."""
    xs, os_ = b.shape(x), b.shape(out)
    if xs is None or os_ is None:
        return
    runs = group_dims(xs, os_)
    if runs is None:
        b.freeze_node(x, f"reshape {out.name} could not be aligned")
        b.freeze_node(out, f"reshape {out.name} could not be aligned")
        return
    for gi, gj in runs:
        if any(not isinstance(xs[i], int) for i in gi) or any(not isinstance(os_[j], int) for j in gj):
            # a static dim merged with (or split from) a batch/sequence dim ([B, heads, S, d] -> [B*heads, S, d]):
            # element maps cannot follow a symbolic size, so the static dims must not change width
            for i in gi:
                if isinstance(xs[i], int) and xs[i] != 1:
                    b.freeze(x, i, f"merged with a batch/sequence dim by reshape {out.name}")
            for j in gj:
                if isinstance(os_[j], int) and os_[j] != 1:
                    b.freeze(out, j, f"merged with a batch/sequence dim by reshape {out.name}")
            continue
        gi = [i for i in gi if xs[i] != 1]
        gj = [j for j in gj if os_[j] != 1]
        if not gi or not gj:
            continue
        if len(gi) == 1 and len(gj) == 1:
            b.link(x, gi[0], out, gj[0])
            continue
        total = int(np.prod([xs[i] for i in gi]))
        flat = np.arange(total)
        inner_x = int(np.prod([xs[i] for i in gi[1:]]))
        inner_o = int(np.prod([os_[j] for j in gj[1:]]))
        pairs = np.unique(np.stack([flat // inner_x, flat // inner_o], 1), axis=0)
        b.link(x, gi[0], out, gj[0], pairs[:, 0], pairs[:, 1], how="reshape")
        for i in gi[1:]:
            b.freeze(x, i, f"inner dim of reshape {out.name}")
        for j in gj[1:]:
            b.freeze(out, j, f"inner dim of reshape {out.name}")


_RULES: dict[Any, Callable[["_Builder", fx.Node, Any, Any], None]] = {}
"""{op target: rule}: how an op links the dimensions of its inputs and outputs (`_visit` applies them)."""


def _rule(*targets: Any) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a dimension rule for `targets` (the first rule registered for a target wins)."""

    def add(fn: Callable[..., None]) -> Callable[..., None]:
        for target in targets:
            _RULES.setdefault(target, fn)
        return fn

    return add


@_rule(*UNARY)
def _unary(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    x = node.args[0]
    if isinstance(x, fx.Node) and shape is not None:
        _broadcast(b, node, [x])


@_rule(*BINARY)
def _binary(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    _broadcast(b, node, [a for a in node.args[:3] if isinstance(a, fx.Node)])


@_rule(aten.linear.default)
def _linear(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    x, w = node.args[0], node.args[1]
    bias = _arg(node, 2, "bias")
    rank = len(shape)
    for d in range(rank - 1):
        b.link(x, d, node, d)
    b.link(x, -1, w, 1)
    b.link(node, -1, w, 0)
    b.use_param(w, 1, "consumer", node)
    b.use_param(w, 0, "producer", node)
    if isinstance(bias, fx.Node):
        b.link(node, -1, bias, 0)
        b.use_param(bias, 0, "producer", node)
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        b.freeze_node(w, "linear weight computed at runtime")


@_rule(aten.addmm.default)  # GPT-2 Conv1D: bias + x @ W[in, out]
def _addmm(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    bias, x, w = node.args[:3]
    b.link(x, 0, node, 0)
    b.link(x, 1, w, 0)
    b.link(node, 1, w, 1)
    b.link(node, 1, bias, -1)
    b.use_param(w, 0, "consumer", node)
    b.use_param(w, 1, "producer", node)
    b.use_param(bias, 0, "producer", node)


@_rule(aten.matmul.default, aten.bmm.default, aten.mm.default)
def _matmul(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    x, y = node.args[:2]
    xs, ys = b.shape(x), b.shape(y)
    if xs is None or ys is None or len(xs) < 2 or len(ys) < 2:
        b.freeze_node(node, f"unsupported matmul {node.name}")
        return
    b.link(x, -1, y, -2)
    b.link(x, -2, node, -2)
    b.link(y, -1, node, -1)
    for a, s in ((x, xs), (y, ys)):
        off = len(shape) - len(s)
        for d in range(len(s) - 2):
            b.link(a, d, node, d + off)
    for a in (x, y):
        if isinstance(a, fx.Node) and a.op == "get_attr":
            b.freeze_node(a, "weight used by a plain matmul")
    if len(shape) == 4 and len(xs) == 4 and isinstance(xs[1], int) and _feeds_softmax(node):
        # eager attention (q @ k^T, scaled and masked, then softmax): dim 1 is the heads dim, as in sdpa
        qv = b.vertex(x, 1)
        if qv is not None:
            b.heads.add(qv)


_PASS_THROUGH = UNARY | BINARY - {aten.softmax.int, aten._softmax.default}


def _feeds_softmax(node: fx.Node, depth: int = 8) -> bool:
    """Whether `node` reaches a softmax over its last dim through elementwise ops only (scale, mask, bias,
    Gemma-2's tanh soft-capping)."""
    for u in node.users:
        if u.op != "call_function":
            continue
        if u.target in (aten.softmax.int, aten._softmax.default) and u.args[0] is node and u.args[1] in (-1, 3):
            return True
        if depth > 0 and u.target in _PASS_THROUGH and _feeds_softmax(u, depth - 1):
            return True
    return False


@_rule(*CONVS)
def _convs(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    x, w = node.args[0], node.args[1]
    bias = _arg(node, 2, "bias")
    groups = _arg(node, 8 if t == aten.convolution.default else 6, "groups", 1)
    ws = b.shape(w)
    b.link(x, 0, node, 0)
    b.link(node, 1, w, 0)
    b.use_param(w, 0, "producer", node)
    if isinstance(bias, fx.Node):
        b.link(node, 1, bias, 0)
        b.use_param(bias, 0, "producer", node)
    if groups == 1:
        b.link(x, 1, w, 1)
        b.use_param(w, 1, "consumer", node)
    elif ws is not None and ws[1] == 1:  # depthwise: output channel o reads input channel o // mult
        mult = ws[0] // groups
        o = np.arange(ws[0])
        b.link(node, 1, x, 1, o, o // mult, how="depthwise")
        if mult != 1:
            b.freeze(node, 1, f"depthwise conv {node.name} with channel multiplier {mult}")
    else:
        b.freeze(x, 1, f"grouped conv {node.name} (groups={groups}) is not supported for pruning")
        b.freeze(node, 1, f"grouped conv {node.name} (groups={groups}) is not supported for pruning")


@_rule(*NORMS)
def _norms(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    x = node.args[0]
    _broadcast(b, node, [x])
    for p in node.args[1:5]:
        if isinstance(p, fx.Node):
            b.link(node, 1, p, 0)
            b.use_param(p, 0, "producer", node)


@_rule(aten.layer_norm.default)
def _layer_norm(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    x, normalized = node.args[0], node.args[1]
    _broadcast(b, node, [x])
    wt, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    for p in (wt, bias):
        if isinstance(p, fx.Node):
            for d in range(len(normalized)):
                b.link(node, len(shape) - len(normalized) + d, p, d)
                b.use_param(p, d, "producer", node)


@_rule(aten.group_norm.default)
def _group_norm(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    x = node.args[0]
    _broadcast(b, node, [x])
    b.freeze(node, 1, f"group norm {node.name}: channel pruning through group norm is not supported")
    for p in node.args[2:4]:
        if isinstance(p, fx.Node):
            b.link(node, 1, p, 0)


@_rule(aten.embedding.default)
def _embedding(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    w = node.args[0]
    b.link(node, -1, w, 1)
    b.use_param(w, 1, "producer", node)
    # the table's columns are a width like any other: a word embedding's are frozen by the residual
    # stream (or the model output) they feed; a relative-position bias table's columns are the
    # attention heads it biases (MPNet, ...), sliced with them
    b.freeze(w, 0, "embedding vocabulary")


@_rule(aten.scaled_dot_product_attention.default)
def _scaled_dot_product_attention(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    q, k, v = node.args[:3]
    qs, ks = b.shape(q), b.shape(k)
    for a in (q, k, v):
        if b.shape(a) is not None and len(b.shape(a)) != 4:
            b.freeze_node(node, f"attention {node.name} is not 4-D")
            return
    hq = qs[1] if qs else None
    hk = ks[1] if ks else None
    if isinstance(hq, int) and isinstance(hk, int) and hq != hk and hk > 0 and hq % hk == 0:
        h = np.arange(hq)
        b.link(q, 1, k, 1, h, h // (hq // hk), how="gqa")
        b.link(q, 1, v, 1, h, h // (hq // hk), how="gqa")
    else:
        b.link(q, 1, k, 1)
        b.link(k, 1, v, 1)
    b.link(q, 1, node, 1)
    b.link(q, 3, k, 3)
    b.link(v, 3, node, 3)
    for d in (0, 2):
        b.link(q, d, node, d)
    b.link(k, 2, v, 2)
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    ms = b.shape(mask)
    if ms is not None:  # a per-head bias (T5/Swin relative positions) is sliced with the heads
        off = 4 - len(ms)
        for d, a, ad in ((1, q, 1), (2, q, 2), (3, k, 2)):
            if d - off >= 0:
                b.link(mask, d - off, a, ad)
    qv = b.vertex(q, 1)
    if qv is not None:
        b.heads.add(qv)
    for d in (3,):
        b.freeze(q, d, "head_dim of attention")
        b.freeze(v, d, "head_dim of attention")


@_rule(*VIEWS, aten.flatten.using_ints)
def _views(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    _reshape(b, node.args[0], node)


@_rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default)
def _squeeze_dim(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    _reshape(b, node.args[0], node)


@_rule(aten.expand.default)
def _expand(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    x = node.args[0]
    _broadcast(b, node, [x])


@_rule(aten.transpose.int)
def _transpose_int(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    x, d0, d1 = node.args[:3]
    rank = len(shape)
    perm = list(range(rank))
    d0, d1 = d0 % rank, d1 % rank
    perm[d0], perm[d1] = perm[d1], perm[d0]
    for od, idim in enumerate(perm):
        b.link(x, idim, node, od)


@_rule(aten.permute.default)
def _permute(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    x, perm = node.args[:2]
    for od, idim in enumerate(perm):
        b.link(x, idim % len(shape), node, od)


@_rule(aten.t.default)
def _t(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    x = node.args[0]
    for od, idim in enumerate(reversed(range(len(shape)))):
        b.link(x, idim, node, od)


@_rule(aten.cat.default)
def _cat(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    xs = node.args[0]
    dim = _arg(node, 1, "dim", 0) % len(shape)
    off = 0
    for x in xs:
        s = b.shape(x)
        if s is None or len(s) != len(shape):
            continue
        for d in range(len(shape)):
            if d != dim:
                b.link(x, d, node, d)
        if off is not None and isinstance(s[dim], int) and isinstance(shape[dim], int):
            n = s[dim]
            b.link(x, dim, node, dim, np.arange(n), off + np.arange(n), how=f"cat+{off}")
            off += n
        else:
            # a cat along a symbolic dim (a KV cache: past + new positions) still ties every other
            # dim of every input to the output's (the new keys' heads to the cached keys')
            off = None  # type: ignore[assignment]


@_rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)
def _split_tensor(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    return  # handled by the getitem users


@_rule(operator.getitem)
def _getitem(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    src, i = node.args
    if not isinstance(src, fx.Node):
        return
    if src.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        x = src.args[0]
        xs = b.shape(x)
        dim = _arg(src, 2, "dim", 0) % len(xs)
        outs = src.meta.get("val")
        sizes = [tuple(o.shape)[dim] for o in outs]
        if any(not isinstance(s, int) for s in sizes):
            for d in range(len(shape)):
                if d != dim:
                    b.link(x, d, node, d)
            return
        off = sum(sizes[:i])
        for d in range(len(shape)):
            if d != dim:
                b.link(x, d, node, d)
        b.link(x, dim, node, dim, off + np.arange(sizes[i]), np.arange(sizes[i]), how=f"split+{off}")
        return  # the prune pass rewrites the split sizes from the kept counts
    if src.target == aten._native_batch_norm_legit_no_training.default and i == 0:
        return
    if shape is not None:
        b.freeze_node(node, f"output {i} of {src.target}")


@_rule(aten.slice.Tensor)
def _slice_tensor(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    x = node.args[0]
    dim = _arg(node, 1, "dim", 0) % len(shape)
    xs = b.shape(x)
    for d in range(len(shape)):
        if d != dim:
            b.link(x, d, node, d)
    if isinstance(xs[dim], int) and isinstance(shape[dim], int):
        if xs[dim] == shape[dim]:
            b.link(x, dim, node, dim)
        else:
            start = _arg(node, 2, "start", 0) or 0
            end = _arg(node, 3, "end", None)
            step = _arg(node, 4, "step", 1) or 1
            if isinstance(start, int):
                start = start % xs[dim] if start < 0 else start
                n = shape[dim]
                b.link(x, dim, node, dim, start + step * np.arange(n), np.arange(n), how="slice")
            # a contiguous slice at constant bounds (phi-3's fused q/k/v) follows pruning: the prune
            # pass moves its bounds to the kept elements (`passes.prune_shapes.SLICE_BOUNDS`)
            if not (isinstance(start, int) and step == 1 and (end is None or isinstance(end, int))):
                b.freeze(x, dim, f"sliced at constant bounds by {node.name}")


@_rule(aten.stack.default)
def _stack(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    """Every input's dim d is the output's dim d (or d + 1 past the new one); the new dim is the list."""
    dim = _arg(node, 1, "dim", 0) % len(shape)
    for x in node.args[0]:
        s = b.shape(x)
        if s is None:
            continue
        for d in range(len(s)):
            b.link(x, d, node, d + (d >= dim))
    b.freeze(node, dim, f"the stacked dim of {node.name}")


@_rule(*UPSAMPLES)
def _upsample(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    """Batch and channels pass through a resize (BEiT's interpolated per-head position bias); the
    resized spatial dims keep their width."""
    x = node.args[0]
    xs = b.shape(x)
    if xs is None or shape is None:
        return
    for d in range(2):
        b.link(x, d, node, d)
    for d in range(2, len(shape)):
        b.freeze(x, d, f"resized by {node.name}")
        b.freeze(node, d, f"resized by {node.name}")


@_rule(aten.select.int)
def _select_int(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    x, dim = node.args[:2]
    xs = b.shape(x)
    dim = dim % len(xs)
    for d in range(len(xs)):
        if d != dim:
            b.link(x, d, node, d - (d > dim))
    b.freeze(x, dim, f"indexed by {node.name}")


@_rule(*REDUCTIONS)
def _reductions(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    x = node.args[0]
    xs = b.shape(x)
    dims = _arg(node, 1, "dim", None)
    dims = list(range(len(xs))) if dims is None else [d % len(xs) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    keep = bool(_arg(node, 2, "keepdim", False))
    j = 0
    for d in range(len(xs)):
        if d in dims:
            b.freeze(x, d, f"reduced over by {node.name}")
            if keep:
                j += 1
            continue
        b.link(x, d, node, j)
        j += 1


@_rule(*POOLS)
def _pools(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    x = node.args[0]
    xs = b.shape(x)
    for d in range(len(xs) - (len(xs) - 2)):
        b.link(x, d, node, d)


@_rule(aten.pad.default, aten.constant_pad_nd.default)
def _pad(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    """Pad amounts run from the last dim backwards, two per dim: a dim padded by (0, 0) passes through
    (MobileBERT pads its shifted trigram copies along the sequence only); a padded dim keeps its width."""
    x, pad = node.args[:2]
    rank = len(shape)
    for d in range(rank):
        back = rank - 1 - d
        amounts = pad[2 * back: 2 * back + 2] if 2 * back < len(pad) else (0, 0)
        if all(isinstance(a, int) and a == 0 for a in amounts):
            b.link(x, d, node, d)
        else:
            b.freeze(node, d, f"padded by {node.name}")
            b.freeze(x, d, f"padded by {node.name}")


@_rule(aten.index.Tensor)
def _index(b: _Builder, node: fx.Node, t: Any, shape: Any) -> None:
    """x[..., idx, ...] with one index tensor (Swin's relative-position bias table[index]): the other
    dims of x pass through; the indexed dim keeps its width (the index values point into it)."""
    x, indices = node.args[0], list(node.args[1])
    tensors = [i for i, a in enumerate(indices) if a is not None]
    xs, idx_shape = b.shape(x), b.shape(indices[tensors[0]]) if len(tensors) == 1 else None
    if xs is None or shape is None or idx_shape is None:
        why = f"used by {t} ({node.name}) with several index tensors, which dimension tracking does not model"
        for a in _tensor_inputs(node):
            b.freeze_node(a, why)
        b.freeze_node(node, why)
        return
    k, r = tensors[0], len(idx_shape)
    for d in range(len(xs)):
        if d == k:
            continue
        b.link(x, d, node, d if d < k else d - 1 + r)
        b.use_param(x, d, "producer", node)  # a parameter table is sliced with what its columns feed
    b.freeze(x, k, f"indexed by {node.name}")
    for i in range(r):
        b.freeze(node, k + i, f"index positions of {node.name}")


def _visit(b: _Builder, node: fx.Node) -> None:
    """Apply the dimension rule of the node's op (`_RULES`); a source, a size, or a node without a
    tensor value adds nothing; any other op freezes every dimension it touches."""
    t = node.target
    rule = _RULES.get(t)
    if rule is not None:
        rule(b, node, t, b.shape(node))
        return
    if t in SOURCES or t == aten.sym_size.int or not isinstance(node.meta.get("val"), (torch.Tensor, list, tuple)):
        if t in SOURCES and b.shape(node) is not None:
            b.freeze_node(node, f"constant shape of {node.name}")
        return
    # an op we do not understand: nothing it touches may change width
    why = f"used by {t} ({node.name}), which dimension tracking does not model"
    for a in _tensor_inputs(node):
        b.freeze_node(a, why)
    b.freeze_node(node, why)


# ----------------------------------------------------------------------------- public API
@dataclass


class DimGraph:
    """The (value, dim) graph and its element-level refinement."""

    graph: nx.Graph
    labels: np.ndarray
    builder: _Builder


def dim_graph(program: Program) -> DimGraph:
    """Build the (value, dim) networkx graph and label every element with its unit."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    b = _Builder(program)
    cache = _cache_boundary(program)
    for node in program.graph.nodes:
        if node.op == "get_attr":
            shape = b.shape(node) or tuple(program.param(node).shape)
            if node.meta.get("val") is None:
                node.meta["val"] = program.param(node)
            for d in range(len(shape)):
                b.vertex(node, d)
        elif node.op == "placeholder":
            if node in cache:
                _freeze_but_heads(b, node, "model input")
            else:
                b.freeze_node(node, "model input")
        elif node.op == "output":
            for a in node.all_input_nodes:
                if a in cache:
                    _freeze_but_heads(b, a, "model output")
                else:
                    b.freeze_node(a, "model output")
        elif node.op == "call_function":
            _visit(b, node)
    for n in _residual_stream(program):
        shape = b.shape(n)
        if shape is not None:
            b.freeze(n, len(shape) - 1 if len(shape) == 3 else (1 if len(shape) == 4 else len(shape) - 1),
                     "residual stream shared by all blocks")
    a = np.concatenate(b.edges_a) if b.edges_a else np.zeros(0, dtype=np.int64)
    c = np.concatenate(b.edges_b) if b.edges_b else np.zeros(0, dtype=np.int64)
    n = max(b.total, 1)
    adj = coo_matrix((np.ones(len(a), dtype=np.int8), (a, c)), shape=(n, n))
    _, labels = connected_components(adj, directed=False)
    return DimGraph(b.nx, labels, b)


def _cache_boundary(program: Program) -> set[fx.Node]:
    """A generation graph's KV-cache tensors at its boundary: the past placeholders and the present
    outputs ([batch, kv heads, positions, head dim]). Their heads dim is no fixed width of the
    interface: pruning heads narrows the cache with them (`rewrite.cache_entries.narrow_cache_heads`)."""
    from .cache_entries import cache_tensors

    return cache_tensors(program)


def _freeze_but_heads(b: _Builder, node: fx.Node, reason: str) -> None:
    shape = b.shape(node)
    if shape is None or len(shape) != 4:
        b.freeze_node(node, reason)
        return
    for d in (0, 2, 3):
        b.freeze(node, d, reason)


def _residual_stream(program: Program) -> list[fx.Node]:
    """The residual stream, when the main blocks really form one (every block keeps its shape)."""
    blocks = program.blocks()
    if len(blocks) < 2:
        return []
    for blk in blocks:
        if blk.residual_in is None or blk.residual_out is None:
            return []
        if not any(u.target in (aten.add.Tensor, aten.add_.Tensor) for u in blk.nodes):
            return []
    return program.residual_stream()


RESIDUAL_LIKE = ("model input", "model output", "embedding", "residual stream")
"""Freeze reasons that make a group the model's residual width (kind "residual"), not a layer's units."""


def find_groups(program: Program) -> list[Group]:
    """Every set of units that must be pruned together, with the parameter slices they cover."""
    return analyse(program)[1]


def analyse(program: Program) -> tuple[DimGraph, list[Group]]:
    """The dimension graph and its groups (the prune pass needs both)."""
    dg = dim_graph(program)
    b, labels = dg.builder, dg.labels
    # frozen reasons by unit label
    frozen: dict[int, str] = {}
    for v, reason in b.frozen.items():
        for lab in np.unique(labels[b.elems(v)]):
            if int(lab) not in frozen or (reason.startswith(RESIDUAL_LIKE) and not frozen[int(lab)].startswith(RESIDUAL_LIKE)):
                frozen[int(lab)] = reason  # a unit of the residual stream says so, whatever else froze it
    # param elements by unit: (param, dim) -> per-unit index lists
    per_unit: dict[int, dict[tuple[str, int], list[int]]] = defaultdict(lambda: defaultdict(list))
    for (key, dim), off in b.offset.items():
        if not (isinstance(key, tuple) and key[0] == "param"):
            continue
        target = key[1]
        if (target, dim) not in b.param_users:
            # read only through views, slices, resizes (BEiT's per-head position-bias table): no layer
            # uses it, but its elements follow their units, so pruning slices it too
            b.param_users[(target, dim)] = ("carried", target.rpartition(".")[0])
        labs = labels[off: off + b.size[(key, dim)]]
        for idx, lab in enumerate(labs.tolist()):
            per_unit[lab][(target, dim)].append(idx)
    # head units: elements of an sdpa query's head dim per unit
    heads_in_unit: dict[int, int] = defaultdict(int)
    for v in b.heads:
        for lab in labels[b.elems(v)].tolist():
            heads_in_unit[lab] += 1
    # units with equal signatures form a group
    by_sig: dict[tuple, list[int]] = defaultdict(list)
    for lab, members in per_unit.items():
        if not any(k in b.producer_dims for k in members):
            continue
        sig = tuple(sorted((k, len(v)) for k, v in members.items()))
        by_sig[sig + (("heads", heads_in_unit.get(lab, 0)),)].append(lab)
    block_paths = sorted({blk.path for bl in program.block_lists().values() for blk in bl}, key=len, reverse=True)
    groups: list[Group] = []
    for sig, labs in by_sig.items():
        labs = sorted(labs, key=lambda lab: min(per_unit[lab][sig[0][0]]))
        members: list[Member] = []
        for (target, dim), k in sig[:-1]:
            idx = torch.tensor([sorted(per_unit[lab][(target, dim)]) for lab in labs], dtype=torch.long)
            role, module = b.param_users[(target, dim)]
            members.append(Member(target, dim, idx, role, module))
        members.sort(key=lambda m: (m.role != "producer", m.module, m.param))
        heads = sig[-1][1]
        reasons = [frozen[lab] for lab in labs if lab in frozen]
        prod = [m for m in members if m.role == "producer"]
        if not reasons and not any(m.role == "consumer" for m in members):
            # the units' values go on (they are no model output, or they would be frozen) but no layer
            # reading them was found: the coupling was lost somewhere, so cutting the producers would
            # leave a later op with the old width
            reasons = [f"no layer reading the outputs of {prod[0].module if prod else '?'} was found "
                       "(the coupling to its consumers is not tracked)"]
        reason = reasons[0] if reasons else ""
        if reasons and any(r.startswith(RESIDUAL_LIKE) for r in reasons):
            kind = "residual"
            reason = next(r for r in reasons if r.startswith(RESIDUAL_LIKE))
        elif heads:
            kind = "kv_head" if heads > 1 else "head"
        elif any(program.param(m.param).dim() >= 3 for m in members):
            kind = "channel"
        else:
            kind = "neuron"
        unit = min((m.indices.shape[1] for m in prod if program.param(m.param).dim() >= 2), default=1)
        if kind in ("head", "kv_head"):
            unit = min(m.indices.shape[1] for m in members)
        modules = [m.module for m in members]
        layer = None
        for path in block_paths:
            if all(mod == path or mod.startswith(path + ".") for mod in modules):
                layer = path
                break
        ops = list(dict.fromkeys(m.module for m in prod)) + list(dict.fromkeys(m.module for m in members if m.role == "consumer"))
        groups.append(Group(id=0, kind=kind, size=len(labs), unit=unit, members=members, layer=layer,
                            prunable=not reasons, reason=reason, heads_per_unit=max(heads, 1), ops=ops, labels=list(labs)))
    groups.sort(key=lambda g: (_order(program, g), g.kind))
    for i, g in enumerate(groups):
        g.id = i
    return dg, groups


def removed_masks(dg: DimGraph, removed_labels: Iterable[int]) -> dict[tuple[Any, int], np.ndarray]:
    """Which indices of every (value, dim) vertex go when these units go (a boolean mask per vertex).

    Keys are (fx.Node or ("param", target), dim); only vertices that lose elements are listed.
    The prune pass uses this to rewrite constant shape arguments that canonicalisation cannot
    derive: widths (split sizes, conv groups, layer-norm shapes) and positions (slice bounds).
    """
    removed = np.zeros(int(dg.labels.max()) + 1 if dg.labels.size else 1, dtype=bool)
    removed[list(removed_labels)] = True
    out: dict[tuple[Any, int], np.ndarray] = {}
    for v, off in dg.builder.offset.items():
        gone = removed[dg.labels[off: off + dg.builder.size[v]]]
        if gone.any():
            out[v] = gone
    return out


def _order(program: Program, g: Group) -> int:
    order = {str(n.target): i for i, n in enumerate(program.nodes("get_attr"))}
    return min(order.get(m.param, 1 << 30) for m in g.members)


def describe(groups: list[Group]) -> str:
    """A readable table: one line per group, then its members."""
    lines = [f"{len(groups)} groups ({sum(g.prunable for g in groups)} prunable)"]
    for g in groups:
        head = f"[{g.id}] {g.kind:<8} size={g.size:<5} unit={g.unit:<4} layer={g.layer or '-'}"
        if g.kind == "kv_head":
            head += f" query_heads_per_kv={g.heads_per_unit}"
        head += "  prunable" if g.prunable else f"  frozen: {g.reason}"
        lines.append(head)
        for m in g.members:
            lines.append(f"      {m.role:<8} {m.param} dim={m.dim} k={m.indices.shape[1]}")
    return "\n".join(lines)
