"""Serial below a work threshold: a parallel loop runs on the calling thread when it has little work.

Why: on llvm every `parallel` loop becomes a launch of TVM's thread pool, split statically over
the workers, and the caller waits for the slowest one. With idle workers asleep (no spinning)
a launch costs a wake-up: 9-18 us on this 2-core VM, and under load more: the caller waits for
the workers with sched_yield, which can hand its core to another process for a scheduler slice.
A transformer graph at a small batch is mostly small ops (MiniLM at 16x34: 221 generated
functions per call, most under 0.3 M elements), so the launches, not the arithmetic, set their cost.

What: every outermost parallel loop of a scheduled PrimFunc gets a serial twin, and the two are
chosen at run time by the loop nest's work: `if work < threshold: serial else parallel`, where
work (`nest_work`) estimates the instructions the nest executes: the operations of each
innermost statement (loads, arithmetic, casts, calls, the store) times the iterations of the
loops around it, a vectorised loop counting once (its lanes are one instruction); an expression
of the function's shape variables (symbolic batch / sequence dims). A nest whose work is a
constant keeps one version.

The default threshold (`SERIAL_BELOW`) comes from a micro-benchmark of the launch itself, not
from any model: `python benchmarks/kernels.py --overhead` times a vectorised elementwise loop
(y = 2x + 1) over n floats serially and as a parallel loop, interleaved, and prints where the
parallel loop starts to win, in units of `nest_work`. On this 2-core VM (2 threads, no spinning;
2026-12-03): in the quietest run (load ~1) it lost at 65,536 units and won at 262,144, so the
threshold is their geometric middle, 131,072. Under load 7-12 a launch cost 8-9 us on average
and the parallel loop won nowhere below 1,048,576 units (memory-bound, the second core adds
little), so there the threshold errs towards parallel; the linear model O T / ((T - 1) c) from
the launch overhead alone (~1 ns per unit) would say ~20,000.
"""
from __future__ import annotations

from typing import Any

# break-even work (`nest_work` units) of a parallel loop on llvm, from
# `benchmarks/kernels.py --overhead` (see the module docstring); 0 disables
SERIAL_BELOW = 131_072

SERIAL_ATTR = "rewrite.serial_below"  # the threshold a function was given (for the benchmark's table)


def serial_below(func: Any, threshold: int = SERIAL_BELOW) -> Any:
    """`func` with each outermost parallel loop run serially when its nest's work is below `threshold`.

    A nest whose work is a constant becomes serial (below) or stays parallel (at or above); a
    symbolic one gets both versions behind a run-time test. Functions without parallel loops,
    or with threshold <= 0, come back unchanged.
    """
    from tvm import s_tir, tirx

    if threshold <= 0 or not isinstance(func, tirx.PrimFunc):
        return func
    body = func.body
    if isinstance(body, s_tir.SBlockRealize):
        block = body.block
        new_body = _rewrite(block.body, threshold)
        if new_body.same_as(block.body):
            return func
        block = s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, new_body, block.init,
                             block.alloc_buffers, block.match_buffers, block.annotations)
        new = s_tir.SBlockRealize(body.iter_values, body.predicate, block)
    else:
        new = _rewrite(body, threshold)
        if new.same_as(body):
            return func
    return _fresh_vars(func.with_body(new).with_attr(SERIAL_ATTR, threshold))


def _fresh_vars(func: Any) -> Any:
    """The two versions of a nest share loop and block variables: give every definition its own
    variable again (TVM's ConvertSSA), as lowering binds each variable once."""
    import tvm
    from tvm import tirx

    return tirx.transform.ConvertSSA()(tvm.IRModule({"main": func}))["main"]


def _rewrite(stmt: Any, threshold: int) -> Any:
    """Replace every outermost parallel loop under `stmt` (through sequences, serial loops, lets)."""
    from tvm import tirx

    if isinstance(stmt, tirx.SeqStmt):
        seq = [_rewrite(s, threshold) for s in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq)
    if isinstance(stmt, tirx.For):
        if stmt.kind == tirx.ForKind.PARALLEL:
            return _guarded(stmt, threshold)
        body = _rewrite(stmt.body, threshold)
        if body.same_as(stmt.body):
            return stmt
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding, stmt.annotations)
    return stmt


def _guarded(loop: Any, threshold: int) -> Any:
    """`if work < threshold: <loop, serial> else: <loop>`, or one of them when work is a constant."""
    from tvm import tirx
    from tvm.sym.analyzer import Analyzer

    work = nest_work(loop)
    serial = tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body, loop.thread_binding,
                      loop.annotations)
    if work is None:
        return loop
    work = Analyzer().simplify(work)
    if isinstance(work, tirx.IntImm):
        return serial if int(work) < threshold else loop
    inner = _bound_vars(loop)
    if any(any(v.same_as(b) for b in inner) for v in tirx.analysis.undefined_vars(work)):
        return loop  # work depends on a variable bound inside the nest: keep the parallel loop
    return tirx.IfThenElse(work < tirx.IntImm(str(work.ty), threshold), serial, loop)


def nest_work(stmt: Any) -> Any:
    """Estimated instructions a loop nest executes, or None if unknown: per innermost statement,
    its operations (loads, arithmetic, casts, calls, the store) times the iterations of the loops
    around it; a vectorised loop counts one iteration (its lanes are one instruction). Sums over
    sequences, the larger branch of an `if`. An expression of the shape variables."""
    from tvm import s_tir, tirx

    if isinstance(stmt, tirx.For):
        inner = nest_work(stmt.body)
        if inner is None or stmt.kind == tirx.ForKind.VECTORIZED:
            return inner
        return _as_i64(stmt.extent) * inner
    if isinstance(stmt, tirx.SeqStmt):
        parts = [nest_work(s) for s in stmt.seq]
        if any(p is None for p in parts):
            return None
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total
    if isinstance(stmt, s_tir.SBlockRealize):
        return nest_work(stmt.block)
    if isinstance(stmt, s_tir.SBlock):
        body = nest_work(stmt.body)
        init = nest_work(stmt.init) if stmt.init is not None else tirx.IntImm("int64", 0)
        return None if body is None or init is None else body + init
    if isinstance(stmt, tirx.IfThenElse):
        then = nest_work(stmt.then_case)
        other = nest_work(stmt.else_case) if stmt.else_case is not None else tirx.IntImm("int64", 0)
        return None if then is None or other is None else tirx.Max(then, other)
    if isinstance(stmt, tirx.BufferStore):
        return tirx.IntImm("int64", 1 + expr_ops(stmt.value))
    if isinstance(stmt, tirx.Evaluate):
        return tirx.IntImm("int64", max(1, expr_ops(stmt.value)))
    if hasattr(stmt, "body") and isinstance(stmt.body, tirx.Stmt):  # let, attribute, buffer declaration
        return nest_work(stmt.body)
    return tirx.IntImm("int64", 1)


_EXPR_FIELDS = ("a", "b", "value", "args", "condition", "true_value", "false_value", "body")


def expr_ops(expr: Any) -> int:
    """Operations in an expression: every node but variables and constants; a load counts one
    (its index arithmetic is strength-reduced by the compiler, so it is not counted)."""
    import tvm
    from tvm import tirx

    if isinstance(expr, (tirx.Var, tirx.IntImm, tirx.FloatImm)) or not isinstance(expr, tirx.Expr):
        return 0
    if isinstance(expr, tvm.ir.expr.TensorLoad):  # a buffer load
        return 1
    n = 1
    for field in _EXPR_FIELDS:
        child = getattr(expr, field, None)
        if child is None:
            continue
        for c in (child if isinstance(child, (list, tuple)) or type(child).__name__ == "Array" else [child]):
            n += expr_ops(c)
    return n


def _as_i64(e: Any) -> Any:
    from tvm import tirx

    return e if str(e.ty) == "int64" else tirx.Cast("int64", e)


def _bound_vars(stmt: Any) -> list:
    """Loop and block variables bound inside `stmt` (the parallel loop's own variable included)."""
    from tvm import s_tir, tirx

    out: list = []

    def visit(s: Any) -> None:
        if isinstance(s, tirx.For):
            out.append(s.loop_var)
            visit(s.body)
        elif isinstance(s, tirx.SeqStmt):
            for c in s.seq:
                visit(c)
        elif isinstance(s, s_tir.SBlockRealize):
            visit(s.block)
        elif isinstance(s, s_tir.SBlock):
            out.extend(iv.var for iv in s.iter_vars)
            visit(s.body)
        elif isinstance(s, tirx.IfThenElse):
            visit(s.then_case)
            if s.else_case is not None:
                visit(s.else_case)
        elif isinstance(s, tirx.LetStmt):
            out.append(s.var)
            visit(s.body)
        elif hasattr(s, "body") and isinstance(getattr(s, "body"), tirx.Stmt):
            visit(s.body)

    visit(stmt)
    return out


def apply_serial_below(mod: Any, threshold: int = SERIAL_BELOW) -> Any:
    """`serial_below` on every PrimFunc of an IRModule (Relax functions untouched)."""
    import tvm
    from tvm import tirx

    from tvm import relax

    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in mod.functions_items():
        # a reshape (a copy Relax replaces by a view when it recognises the loop nest) stays as it is
        if isinstance(func, tirx.PrimFunc) and not relax.analysis.has_reshape_pattern(func):
            out[gv] = serial_below(func, threshold)
    return out
