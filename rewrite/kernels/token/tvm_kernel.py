"""TensorIR kernel generated per `rewrite::token_select` instance (keep ratio, forced ends).

Definition (kernels/token): k = min(S, max(keep_first + keep_last, ceil(keep * S))) with
ceil(keep*S) = (S*p + q - 1) // q for keep = p/q exactly; the first keep_first and last
keep_last positions always kept, the rest by largest score (ties: lower index); result
sorted ascending.

Sorting is replaced by counting, which parallelises without a sort network and gives the
stable order for free (O(S^2) per row; S is a sequence length, a few hundred):
  prepared[i] = +inf for forced positions, else min(score, FLT_MAX)
  rank[i]     = #{j : s[j] > s[i]  or  (s[j] == s[i] and j < i)}   (the stable-sort position)
  kept        = rank < k
  slot[i]     = #{j < i : kept[j]}                                   (its place in the output)
  out[t]      = the i with kept[i] and slot[i] == t
The row count B and the length S may be symbolic; k is the same integer expression of S.
"""
from __future__ import annotations

from typing import Any

from ..registry import lowering
from ..tvm_attrs import KERNEL_ATTR

FLOAT_MAX = 3.4028234663852886e38


def keep_count_expr(S: Any, keep: float, keep_first: int, keep_last: int) -> Any:
    """k as a TIR expression (or int) of the length S, exactly as kernels.token.keep_count."""
    from tvm import tirx

    from . import keep_fraction

    p, q = keep_fraction(keep)
    if isinstance(S, int):
        return min(S, max(keep_first + keep_last, (S * p + q - 1) // q))
    ceil = tirx.floordiv(S * p + (q - 1), q)
    return tirx.min(S, tirx.max(tirx.IntImm("int64", keep_first + keep_last), ceil))


def token_select_te(scores: Any, *, keep: float, keep_first: int, keep_last: int) -> Any:
    """te: i64[B, k] kept positions, ascending."""
    from tvm import te, tirx

    B, S = scores.shape
    idx_t = "int64"
    k = keep_count_expr(int(S) if isinstance(S, tirx.IntImm) else S, keep, keep_first, keep_last)

    def forced(i: Any) -> Any:
        return tirx.any(i < keep_first, i >= S - keep_last)

    prep = te.compute((B, S), lambda b, i: tirx.if_then_else(forced(i), tirx.max_value("float32"),
                                                             tirx.min(scores[b, i], tirx.const(FLOAT_MAX, "float32"))),
                      name="prepare")
    # forced positions compare above every clamped score: use a flag instead of +inf (exact ties)
    j = te.reduce_axis((0, S), name="j")
    rank = te.compute(
        (B, S),
        lambda b, i: te.sum(tirx.if_then_else(_beats(prep, forced, b, j, i), tirx.const(1, idx_t), tirx.const(0, idx_t)), axis=j),
        name="rank",
    )
    j2 = te.reduce_axis((0, S), name="j2")
    slot = te.compute(
        (B, S),
        lambda b, i: te.sum(tirx.if_then_else(tirx.all(j2 < i, rank[b, j2] < k), tirx.const(1, idx_t), tirx.const(0, idx_t)), axis=j2),
        name="slot",
    )
    i3 = te.reduce_axis((0, S), name="i3")
    return te.compute(
        (B, k),
        lambda b, t: te.sum(tirx.if_then_else(tirx.all(rank[b, i3] < k, slot[b, i3] == t), i3.astype(idx_t),
                                              tirx.const(0, idx_t)), axis=i3),
        name="gather_index",
    )


def _beats(prep: Any, forced: Any, b: Any, j: Any, i: Any) -> Any:
    """Does position j sort before position i (descending score, forced first, ties by index)?"""
    from tvm import tirx

    fj, fi = forced(j), forced(i)
    sj, si = prep[b, j], prep[b, i]
    greater = tirx.any(tirx.all(fj, tirx.Not(fi)), tirx.all(tirx.Not(fj), tirx.Not(fi), sj > si))
    tie = tirx.all(tirx.any(tirx.all(fj, fi), tirx.all(tirx.Not(fj), tirx.Not(fi), sj == si)), j < i)
    return tirx.any(greater, tie)


def token_select_primfunc(B: Any, S: Any, *, keep: float, keep_first: int = 0, keep_last: int = 0) -> Any:
    """A standalone TensorIR PrimFunc (None for a symbolic B or S)."""
    from tvm import te, tirx

    b = tirx.Var("b", "int64") if B is None else B
    s = tirx.Var("s", "int64") if S is None else S
    scores = te.placeholder((b, s), "float32", name="scores")
    out = token_select_te(scores, keep=keep, keep_first=keep_first, keep_last=keep_last)
    return te.create_prim_func([scores, out]).with_attr(KERNEL_ATTR, "token_select")


@lowering("rewrite::token_select", "tvm")
def convert_token_select(node: Any, importer: Any) -> Any:
    """token_select(scores, keep, keep_first, keep_last) -> call_tir of the generated kernel."""
    from tvm import relax

    args = list(node.args)
    names = ["scores", "keep", "keep_first", "keep_last"]
    vals = {n: (args[i] if i < len(args) else node.kwargs.get(n)) for i, n in enumerate(names)}
    scores = importer.env[vals["scores"]]
    if scores.ty.dtype != "float32":
        scores = importer.block_builder.emit(relax.op.astype(scores, "float32"))
    keep, first, last = float(vals["keep"]), int(vals["keep_first"] or 0), int(vals["keep_last"] or 0)
    return importer.block_builder.emit_te(
        lambda s: token_select_te(s, keep=keep, keep_first=first, keep_last=last), scores,
        primfunc_name_hint="token_select", primfunc_attrs={KERNEL_ATTR: "token_select", "op_pattern": 8},
    )

