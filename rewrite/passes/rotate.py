"""Rotate the residual stream by an orthogonal matrix fused into the weights (QuaRot / SpinQuant style).

Why: a decoder's residual stream has a few channels with huge values (outliers). A linear
reading it needs a wide quantization range for those columns and loses the small ones. With
an orthogonal Q, the stream h becomes h Q: outliers are spread over all channels, and the
network computes exactly the same function when every reader of the stream gets W Q and every
writer Q^T W. RMSNorm commutes with Q (it divides by the norm, which Q keeps) once its
per-channel scale is folded into the linears it feeds. Nothing runs online: the result is
plain (different) weights, which then quantize better.

How the graph is read (no architecture names): the stream starts at the embedding lookups;
each node is classified, in graph order, by the op that consumes a rotated value:
- layout ops that keep the last axis (dtype casts, slices and views over other axes), scalar
  and per-token scaling, and sums of rotated values stay rotated;
- `pow(x, 2)` reduced over the last axis (RMSNorm's mean square) is rotation invariant;
- a per-channel constant scale (RMSNorm's weight) is folded into the linears it feeds;
- a linear reading the stream gets `W diag(gamma) Q`; a linear whose output is added to the
  stream (through casts and scalar scaling only) gets `Q^T W` and `b Q`;
- the graph's outputs get an explicit `x Q^T` (a base model returning hidden states).
Anything else (LayerNorm's mean subtraction, a norm on a residual branch such as Gemma's
post-norms) stops the pass with the node named, unless `online: true`, which inserts an
explicit matmul by Q or Q^T there (plain weights, but extra compute: the report counts them).
Embeddings and a lm_head that share one tensor are untied (they get different weights).
"""
from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.fx as fx

from rewrite.errors import PassError
from rewrite.pass_base import Pass, PassContext, PassResult, Property, register
from rewrite.program import Program, _unique_attr
from rewrite.spec import StrictModel

aten = torch.ops.aten

_SAME = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.clone.default,
         aten.contiguous.default, aten.alias.default, aten.detach.default, aten.dropout.default,
         aten.type_as.default, aten.lift_fresh_copy.default}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
          aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.flatten.using_ints}
_LAYOUT = _VIEWS | {aten.slice.Tensor, aten.select.int, aten.transpose.int, aten.permute.default, aten.index.Tensor}
_REDUCE = {aten.mean.dim, aten.sum.dim_IntList}
_IGNORED = {aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_numel.default}


# ----------------------------------------------------------------------------- matrices
def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)])
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n by Paley's constructions (q prime: n = q+1, q = 3 mod 4; n = 2(q+1), q = 1 mod 4)."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(n, n)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, _jacobsthal(q)
        return s + torch.eye(n)
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = torch.zeros(q + 1, q + 1)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, _jacobsthal(q)
        return torch.kron(c, torch.tensor([[1.0, 1.0], [1.0, -1.0]])) + torch.kron(torch.eye(q + 1), torch.tensor([[1.0, -1.0], [-1.0, -1.0]]))
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix (entries +-1, H H^T = n I) of order n from Sylvester doublings and Paley blocks, or None."""
    if n == 1:
        return torch.ones(1, 1)
    if n % 2 == 0:
        h = hadamard(n // 2)
        if h is not None:
            return torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]]), h)
    for p in range(4, n + 1, 4):
        if n % p == 0:
            base = _paley(p)
            rest = hadamard(n // p) if base is not None else None
            if rest is not None:
                return torch.kron(base, rest)
    return None


def rotation_matrix(n: int, kind: str, seed: int) -> tuple[torch.Tensor, str]:
    """An orthogonal float64 [n, n]: randomised Hadamard (random signs) where one exists, else random orthogonal."""
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n) if kind == "hadamard" else None
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        return signs[:, None] * h.double() / math.sqrt(n), f"randomised Hadamard of order {n}"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]
    why = "" if kind == "random" else f" (no Hadamard construction of order {n} here)"
    return q, f"random orthogonal of order {n}{why}"


# ----------------------------------------------------------------------------- graph reading
def _shape(n: Any) -> tuple | None:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _const_value(program: Program, n: Any, memo: dict) -> torch.Tensor | None:
    """The value of a node computed from parameters and literals only (e.g. Gemma's `1 + weight`), else None."""
    if not isinstance(n, fx.Node):
        return None
    if n in memo:
        return memo[n]
    out = None
    if n.op == "get_attr":
        out = program.param(n).detach()
    elif n.op == "call_function" and n.target not in _IGNORED:
        args_ok = True

        def sub(a):
            nonlocal args_ok
            if isinstance(a, fx.Node):
                v = _const_value(program, a, memo)
                if v is None:
                    args_ok = False
                return v
            return a
        args = fx.node.map_aggregate(n.args, sub)
        kwargs = fx.node.map_aggregate(n.kwargs, sub)
        if args_ok:
            try:
                out = n.target(*args, **kwargs)
            except Exception:  # not evaluable outside the graph: treat as data
                out = None
            out = out if isinstance(out, torch.Tensor) else None
    memo[n] = out
    return out


def _last(n: fx.Node) -> int | None:
    s = _shape(n)
    return s[-1] if s else None


def _keeps_last_axis(n: fx.Node, d: int) -> bool:
    """A view/slice/permute of a rotated value whose last axis is still the whole stream axis."""
    src = n.args[0]
    sin, sout = _shape(src), _shape(n)
    if not sin or not sout or sin[-1] != d or sout[-1] != d:
        return False
    nd = len(sin)
    t = n.target
    if t in (aten.slice.Tensor, aten.select.int):
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        return dim % nd != nd - 1
    if t == aten.transpose.int:
        return all(int(a) % nd != nd - 1 for a in n.args[1:3])
    if t == aten.permute.default:
        return int(n.args[1][-1]) % nd == nd - 1
    if t == aten.index.Tensor:
        return len(n.args[1]) < nd
    return t in _VIEWS


class _Plan:
    """What the rotation changes: weights (by consumer), folded scales, rewired nodes, boundary matmuls."""

    def __init__(self) -> None:
        self.rot: set[fx.Node] = set()
        self.square: set[fx.Node] = set()
        self.lin_in: dict[fx.Node, torch.Tensor | None] = {}   # linear -> folded per-channel scale (or None)
        self.lin_out: set[fx.Node] = set()
        self.embeds: list[fx.Node] = []
        self.folded: list[tuple[fx.Node, fx.Node]] = []        # (scale mul, its rotated input): bypass the mul
        self.exits: list[tuple[fx.Node, fx.Node]] = []         # (rotated value, consumer): x Q^T before consumer
        self.entries: list[tuple[fx.Node, fx.Node]] = []       # (plain value, consumer): x Q before consumer
        self.problems: list[str] = []
        self.boundary: set[fx.Node] = set()                   # consumers of exits that lead only to graph outputs


def _where(n: fx.Node) -> str:
    return f"{n.target} ({Program.module_path(n) or n.name})"


class _Reader:
    def __init__(self, program: Program, d: int, online: bool):
        self.p, self.d, self.online = program, d, online
        self.plan = _Plan()
        self.memo: dict = {}

    # -- helpers
    def _scalar_like(self, a: Any) -> bool:
        """A number, a one-element tensor or a per-token tensor (last axis 1): scales every channel alike."""
        if isinstance(a, (int, float)):
            return True
        s = _shape(a)
        return s is not None and (len(s) == 0 or s[-1] == 1)

    def _passes(self, u: fx.Node, n: fx.Node) -> bool:
        """`u` carries `n` on unchanged up to layout: a dtype cast, or a slice/view that keeps the channel axis."""
        if u.op != "call_function" or not u.args or u.args[0] is not n:
            return False
        return u.target in _SAME or (u.target in _LAYOUT and _keeps_last_axis(u, self.d))

    def _through_same(self, n: fx.Node) -> list[fx.Node]:
        """Consumers of `n`, looking through casts and channel-keeping slices (those are not returned)."""
        out = []
        for u in n.users:
            if u.op == "call_function" and u.target in _IGNORED:
                continue
            if self._passes(u, n):
                out += self._through_same(u)
            else:
                out.append(u)
        return out

    def _writer(self, o: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
        """The linear whose output reaches `o` through casts and scalar scaling only (each used once)."""
        chain = []
        n = o
        while isinstance(n, fx.Node) and n.op == "call_function":
            if len([u for u in n.users if u.target not in _IGNORED]) != 1:
                return None
            if n.target == aten.linear.default and _last(n) == self.d:
                return n, chain
            chain.append(n)
            if n.target in _SAME:
                n = n.args[0]
            elif n.target in (aten.mul.Tensor, aten.div.Tensor) and self._scalar_like(n.args[1]):
                n = n.args[0]
            elif n.target == aten.mul.Tensor and self._scalar_like(n.args[0]):
                n = n.args[1]
            else:
                return None
        return None

    def _stop(self, value: fx.Node, consumer: fx.Node, why: str) -> None:
        if consumer.op == "output" or self.online:
            self.plan.exits.append((value, consumer))
            if consumer.op == "output":
                self.plan.boundary.add(consumer)
        else:
            self.plan.problems.append(f"{_where(consumer)} {why}")

    # -- the walk
    def read(self, seeds: list[fx.Node]) -> _Plan:
        plan = self.plan
        plan.embeds = seeds
        plan.rot.update(seeds)
        for n in list(self.p.graph.nodes):
            if n in plan.rot or n.op in ("placeholder", "get_attr"):
                continue
            ins = [a for a in n.all_input_nodes if a in plan.rot]
            if not ins:
                continue
            if n.op == "output":
                for a in ins:
                    self._stop(a, n, "")
                continue
            self._classify(n, ins)
        return plan

    def _classify(self, n: fx.Node, ins: list[fx.Node]) -> None:
        plan, t = self.plan, n.target
        x = n.args[0] if n.args else None
        if t in _IGNORED:
            return
        if t in _SAME and x in plan.rot:
            plan.rot.add(n)
        elif x in plan.rot and len(ins) == 1 and t in _LAYOUT:
            if _keeps_last_axis(n, self.d):
                plan.rot.add(n)
            else:
                self._stop(x, n, "reshapes the residual stream's channel axis; a rotation cannot pass it")
        elif t in (aten.add.Tensor, aten.sub.Tensor) and len(n.args) >= 2 and n.kwargs.get("alpha", 1) == 1:
            self._add(n)
        elif (t == aten.pow.Tensor_Scalar and n.args[1] == 2) or (t == aten.mul.Tensor and n.args[0] is n.args[1]):
            reducers = self._through_same(n)
            if all(u.target in _REDUCE and list(u.args[1]) in ([-1], [len(_shape(n)) - 1]) for u in reducers):
                plan.square.add(n)
            else:
                self._stop(x, n, "squares channels without summing them over the channel axis")
        elif t in (aten.mul.Tensor, aten.div.Tensor) and len(ins) == 1:
            r = ins[0]
            other = n.args[1] if n.args[0] is r else n.args[0]
            if t == aten.div.Tensor and n.args[0] is not r:
                self._stop(r, n, "divides by a residual value")
            elif self._scalar_like(other):
                plan.rot.add(n)
            else:
                self._scale(n, r, other)
        elif t == aten.linear.default and x in plan.rot and len(ins) == 1:
            plan.lin_in.setdefault(n, None)
        else:
            for a in ins:
                self._stop(a, n, "is not rotation-equivariant (e.g. LayerNorm subtracts the channel mean)")

    def _add(self, n: fx.Node) -> None:
        plan = self.plan
        a, b = n.args[0], n.args[1]
        if a in plan.rot and b in plan.rot:
            plan.rot.add(n)
            return
        r, o = (a, b) if a in plan.rot else (b, a)
        if not isinstance(o, fx.Node):
            self._stop(r, n, "adds a constant to the residual stream (not rotation-equivariant)")
            return
        w = self._writer(o)
        if w is not None:
            lin, chain = w
            plan.lin_out.add(lin)
            plan.rot.add(lin)
            plan.rot.update(chain)
        elif self.online:
            plan.entries.append((o, n))
        else:
            plan.problems.append(
                f"{_where(n)} adds a branch to the residual stream that is not a linear's output "
                f"(it comes from {_where(o)}, e.g. a norm on the branch); a rotation would need an online "
                "matmul there (set online: true to insert one)")
            return
        plan.rot.add(n)

    def _scale(self, n: fx.Node, r: fx.Node, other: Any) -> None:
        """A per-channel scale of a rotated value: fold it into the linears it feeds, or stop before it."""
        gamma = _const_value(self.p, other, self.memo)
        users = self._through_same(n)
        linears = all(u.target == aten.linear.default and u.args[0] is not None for u in users)
        if gamma is not None and tuple(gamma.shape)[-1:] == (self.d,) and gamma.numel() == self.d and users and linears:
            self.plan.folded.append((n, r))
            self.plan.rot.add(n)
            for u in users:
                self.plan.lin_in[u] = gamma.reshape(self.d).to(torch.float64)
            self._mark_casts(n)
        elif users and all(u.op == "output" for u in users):
            self.plan.exits.append((r, n))     # a final norm's scale on the way out: restore before it
            self.plan.boundary.add(n)
        else:
            self._stop(r, n, "scales channels by a value that is not a constant feeding only linears")

    def _mark_casts(self, n: fx.Node) -> None:
        for u in n.users:
            if self._passes(u, n):
                self.plan.rot.add(u)
                self._mark_casts(u)


# ----------------------------------------------------------------------------- the pass
def residual_width(program: Program) -> tuple[list[fx.Node], int]:
    """The embedding lookups that start the residual stream and its width; PassError when there are none."""
    embeds = [n for n in program.graph.nodes if n.op == "call_function" and n.target == aten.embedding.default]
    widths = {_last(n) for n in embeds}
    if not embeds:
        raise PassError("rotate: no embedding lookup (aten.embedding) starts a residual stream in this graph; "
                        "the rotation pass applies to token-input transformers")
    if len(widths) != 1 or None in widths:
        raise PassError(f"rotate: the embeddings have different widths {sorted(map(str, widths))}; "
                        "one residual width is needed")
    return embeds, widths.pop()


# --------------------------------------------------------------------------- spec
class RotateSpec(StrictModel):
    """Rotate the residual stream by an orthogonal matrix fused into the weights (before quantize)."""

    kind: Literal["rotate"] = "rotate"
    matrix: Literal["hadamard", "random"] = "hadamard"
    """hadamard: randomised Hadamard (random signs; random orthogonal where no construction exists)."""
    seed: int = 0
    online: bool = False
    """Insert explicit matmuls by Q where the stream meets an op that does not commute with a
    rotation (e.g. Gemma's norms on residual branches) instead of refusing."""


@register
class RotatePass(Pass):
    spec_class = RotateSpec
    establishes = frozenset({Property.ROTATED})
    requires_absent = {Property.QUANTIZED: "the weights are already quantized; rotate the float weights first (put rotate "
                                    "before quantize)",
                       "rotated": "the residual stream is already rotated"}

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        s = self.spec
        embeds, d = residual_width(program)
        plan = _Reader(program, d, s.online).read(embeds)
        if plan.problems:
            more = f" (and {len(plan.problems) - 1} more)" if len(plan.problems) > 1 else ""
            raise PassError(f"rotate: {plan.problems[0]}{more}")
        q, what = rotation_matrix(d, s.matrix, s.seed)
        notes: list[str] = [f"residual stream (width {d}) rotated by a {what}"]
        untied = self._apply(program, plan, q)
        if untied:
            notes.append("untied " + ", ".join(untied) + ": they shared one tensor, and the rotation gives them "
                         "different weights (the model grows by that tensor)")
        n_exit = len([1 for _, c in plan.exits if c in plan.boundary])
        n_inner = len(plan.exits) - n_exit + len(plan.entries)
        if n_exit:
            notes.append(f"{n_exit} graph output(s) carry the stream: an x Q^T matmul ({d}x{d}) restores them")
        if n_inner:
            notes.append(f"online: {n_inner} matmul(s) by Q inserted inside the graph where the stream meets ops "
                         "that do not commute with a rotation")
        program.graph.eliminate_dead_code()
        program.finalize()
        details = {"width": d, "matrix": what, "readers": len(plan.lin_in), "writers": len(plan.lin_out),
                   "norm scales folded": len(plan.folded), "embeddings": len(plan.embeds),
                   "output matmuls": n_exit, "online matmuls": n_inner}
        summary = (f"rotated the residual stream ({d}): {len(plan.lin_in)} reading and {len(plan.lin_out)} writing "
                   f"linears, {len(plan.folded)} norm scales folded")
        return PassResult(program, summary=summary, details=details, notes=notes)

    # -- rewriting ------------------------------------------------------------------------
    def _apply(self, program: Program, plan: _Plan, q: torch.Tensor) -> list[str]:
        new: dict[fx.Node, dict[int, torch.Tensor]] = {}   # consumer -> {arg index: new tensor}
        for e in plan.embeds:
            w = program.param(e.args[0]).detach().double()
            new.setdefault(e, {})[0] = w @ q
        for lin in set(plan.lin_in) | plan.lin_out:
            w = program.param(lin.args[1]).detach().double()
            if lin in plan.lin_in:
                gamma = plan.lin_in[lin]
                if gamma is not None:
                    w = w * gamma[None, :]
                w = w @ q
            if lin in plan.lin_out:
                w = q.T @ w
                bias = lin.args[2] if len(lin.args) > 2 else None
                if isinstance(bias, fx.Node):
                    new.setdefault(lin, {})[2] = program.param(bias).detach().double() @ q
            new.setdefault(lin, {})[1] = w
        for mul, r in plan.folded:
            mul.replace_all_uses_with(r)
        untied = self._write(program, new)
        for value, consumer in plan.exits:
            self._matmul_before(program, value, consumer, q.T)
        for value, consumer in plan.entries:
            self._matmul_before(program, value, consumer, q)
        return untied

    @staticmethod
    def _write(program: Program, new: dict[fx.Node, dict[int, torch.Tensor]]) -> list[str]:
        """Store each consumer's new tensor; a tensor read by several consumers gets one copy per consumer."""
        readers: dict[str, list[tuple[fx.Node, int]]] = {}
        for n in program.graph.nodes:
            if n.op == "get_attr":
                for u in n.users:
                    for i, a in enumerate(u.args):
                        if a is n:
                            readers.setdefault(str(n.target), []).append((u, i))
        untied: list[str] = []
        for consumer, by_arg in new.items():
            for i, value in by_arg.items():
                attr = consumer.args[i]
                old = program.param(attr)
                value = value.to(old.dtype)
                target = str(attr.target)
                if len(readers.get(target, [])) == 1:
                    program.set_param(target, value)
                    continue
                name = _unique_attr(program.module, f"{target.replace('.', '_')}_rotated")
                program.module.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
                with program.graph.inserting_before(consumer):
                    node = program.graph.get_attr(name)
                node.meta = dict(attr.meta)
                node.meta["val"] = value
                consumer.update_arg(i, node)
                readers[target] = [(c, j) for c, j in readers[target] if c is not consumer]
                untied.append(f"{target} (read by {Program.module_path(consumer) or consumer.name})")
        return untied

    @staticmethod
    def _matmul_before(program: Program, value: fx.Node, consumer: fx.Node, m: torch.Tensor) -> None:
        dtype = value.meta["val"].dtype if isinstance(value.meta.get("val"), torch.Tensor) else torch.float32
        const = program.add_constant("rotation", m.to(dtype).contiguous(), before=consumer)
        with program.graph.inserting_before(consumer):
            mm = program.graph.call_function(aten.matmul.default, (value, const))
        if isinstance(value.meta.get("val"), torch.Tensor):
            mm.meta["val"] = value.meta["val"]
        consumer.replace_input_with(value, mm)
