"""kernels.tvm_parallel: parallel loop nests with little work run serially (a run-time test when symbolic)."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from rewrite.kernels.tvm_parallel import SERIAL_ATTR, apply_serial_below, nest_work, serial_below  # noqa: E402
from rewrite.kernels.tvm_target import make_target  # noqa: E402


def _scaled(rows, cols: int = 64):
    """y = 2x + 1 over [rows, cols], rows parallel, 16 lanes vectorised."""
    from tvm import s_tir, te

    a = te.placeholder((rows, cols), "float32", name="a")
    b = te.compute((rows, cols), lambda i, j: a[i, j] * 2.0 + 1.0, name="b")
    sch = s_tir.Schedule(te.create_prim_func([a, b]))
    i, j = sch.get_loops(sch.get_sblock("b"))
    sch.parallel(i)
    sch.vectorize(sch.split(j, [None, 16])[1])
    return sch.mod["main"]


def _loop_kinds(func) -> list[str]:
    text = func.script()
    return [kind for kind in ("T.parallel", "if ") if kind in text]


def test_work_counts_instructions_of_the_nest() -> None:
    from tvm.sym.analyzer import Analyzer

    work = Analyzer().simplify(nest_work(_scaled(10).body))
    # 10 rows x 4 vector steps x (load, multiply, add, store)
    assert int(work.value) == 10 * 4 * 4


def test_symbolic_nest_gets_both_versions_and_both_compute_the_same() -> None:
    from tvm import tirx

    func = serial_below(_scaled(tirx.Var("n", "int64")), threshold=1000)
    assert _loop_kinds(func) == ["T.parallel", "if "] and int(func.attrs[SERIAL_ATTR]) == 1000
    lib = tvm.compile(tvm.IRModule({"main": func}), target=make_target("llvm"))
    for rows in (2, 500):  # 2 x 16 units: serial; 500 x 16: parallel
        x = np.random.default_rng(rows).random((rows, 64), dtype=np.float32)
        y = tvm.runtime.tensor(np.zeros_like(x))
        lib["main"](tvm.runtime.tensor(x), y)
        np.testing.assert_allclose(y.numpy(), 2 * x + 1, rtol=1e-6)


def test_static_nest_keeps_one_version() -> None:
    small, large = serial_below(_scaled(8), threshold=1000), serial_below(_scaled(100), threshold=1000)
    assert _loop_kinds(small) == [] and _loop_kinds(large) == ["T.parallel"]
    func = _scaled(8)
    assert serial_below(func, threshold=0).same_as(func)  # 0: off


def test_reshape_is_left_for_relax_to_turn_into_a_view() -> None:
    from tvm import relax, s_tir, te, tirx, topi

    n = tirx.Var("n", "int64")
    a = te.placeholder((n, 64), "float32", name="a")
    sch = s_tir.Schedule(te.create_prim_func([a, topi.reshape(a, (n * 64,))]))
    block = sch.get_child_blocks(sch.get_sblock("root"))[0]
    sch.parallel(sch.get_loops(block)[0])
    func = sch.mod["main"]
    assert relax.analysis.has_reshape_pattern(func)
    out = apply_serial_below(tvm.IRModule({"reshape": func}), threshold=10 ** 9)["reshape"]
    assert out.same_as(func)
    assert _loop_kinds(serial_below(func, threshold=10 ** 9)) == ["T.parallel", "if "]  # what it would become


def test_backend_build_runs_small_nests_serially_by_default() -> None:
    import torch

    from rewrite.backends.tvm import build_tvm
    from rewrite.program import Program

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU()).eval()
    x = torch.randn(3, 5, 16)
    built = build_tvm(Program.capture(model, (x,)), "llvm")
    marked = [gv.name_hint for gv, f in built.ir.functions_items()
              if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and SERIAL_ATTR in f.attrs]
    assert marked
    with torch.no_grad():
        np.testing.assert_allclose(built(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)
