"""Relax import of a rewritten program through TVM's public ExportedProgram frontend.

The graph is re-exported (`rewrite.capture.export_program`) and imported with
`tvm.relax.frontend.torch.from_exported_program(..., custom_convert_map=...)`: every `rewrite::`
custom op goes through its converter (`kernels.registry.tvm_converters()`), which emits a
TensorIR kernel generated for that op instance. Dynamic batch/sequence dims stay symbolic.

One converter of our own replaces TVM's `slice.Tensor` through the same public map: where
TVM's shape inference would lose a shape that torch proved (`min(S, 64)` after slicing a
position table with S <= 64), it emits the in-bounds slice torch proved, and otherwise returns
exactly what TVM's own converter (taken from `create_convert_map()`) returns. No private
method of the importer is overridden.
"""
from __future__ import annotations

import logging
import weakref
from typing import Any, Callable

import torch

from rewrite.capture import export_program
from rewrite.errors import ExportError
from rewrite.program import Program

log = logging.getLogger("rewrite.tvm")

SLICE = "slice.Tensor"
_DEFAULTS: "weakref.WeakKeyDictionary[Any, dict[str, Callable]]" = weakref.WeakKeyDictionary()


def exact_slice(node: Any, importer: Any) -> Any:
    """slice.Tensor: TVM's conversion, or the in-bounds slice when that keeps torch's proven shape.

    (A generic `match_cast` to torch's shape made TVM 0.27's StaticPlanBlockMemory segfault,
    so only the known case is fixed at its source: in-bounds slices.)
    """
    from tvm import relax

    out = _default_converter(importer, SLICE)(node)
    want = _wanted_shape(node, _sym_vars(importer))
    if want is None or _shape_matches(out, want):
        return out
    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else 0
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    if end is None or not isinstance(step, int):
        return out
    start = importer.env[start] if isinstance(start, torch.fx.Node) else (start or 0)
    end = importer.env[end] if isinstance(end, torch.fx.Node) else end
    exact = importer.block_builder.emit(relax.op.strided_slice(x, [dim], [start], [end], [step], assume_inbound=True))
    return exact if _shape_matches(exact, want) else out


def _default_converter(importer: Any, name: str) -> Callable:
    """TVM's own converter for `name`, bound to this importer (the public `create_convert_map`)."""
    if importer not in _DEFAULTS:
        _DEFAULTS[importer] = importer.create_convert_map()
    return _DEFAULTS[importer][name]


def _sym_vars(importer: Any) -> dict[str, Any]:
    """The shape variables of the graph inputs (placeholders already in the importer's env)."""
    return _collect_sym_vars(v for n, v in importer.env.items() if getattr(n, "op", None) == "placeholder")


def _wanted_shape(node: Any, sym_vars: dict[str, Any]) -> list | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    want = [_to_prim(s, sym_vars) for s in val.shape]
    return None if any(w is None for w in want) else want


def _shape_matches(value: Any, want: list) -> bool:
    import tvm
    from tvm import relax

    ty = getattr(value, "ty", None)
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        return False
    have = ty.shape.values
    ana = tvm.sym.Analyzer()
    return len(have) == len(want) and all(ana.can_prove_equal(h, w) for h, w in zip(have, want))


def _collect_sym_vars(vars_: Any) -> dict[str, Any]:
    from tvm import relax

    out: dict[str, Any] = {}
    for v in vars_:
        ty = getattr(v, "ty", None)
        if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr):
            for d in ty.shape.values:
                for var in _prim_vars(d):
                    out.setdefault(var.name, var)
    return out


def _prim_vars(expr: Any) -> list[Any]:
    import tvm

    if isinstance(expr, tvm.tirx.Var):
        return [expr]
    return list(tvm.tirx.analysis.undefined_vars(expr))


def _to_prim(s: Any, sym_vars: dict[str, Any]) -> Any:
    """A torch size (int or SymInt) as a TIR expression over the input's shape vars, or None."""
    import sympy
    import tvm

    if isinstance(s, int):
        return tvm.tirx.IntImm("int64", s)
    expr = s.node.expr if hasattr(s, "node") else None
    if expr is None:
        return None

    def conv(e: Any) -> Any:
        if isinstance(e, sympy.Integer):
            return tvm.tirx.IntImm("int64", int(e))
        if isinstance(e, sympy.Symbol):
            return sym_vars.get(str(e))
        args = [conv(a) for a in e.args]
        if any(a is None for a in args):
            return None
        if isinstance(e, sympy.Add):
            out = args[0]
            for a in args[1:]:
                out = out + a
            return out
        if isinstance(e, sympy.Mul):
            out = args[0]
            for a in args[1:]:
                out = out * a
            return out
        if isinstance(e, sympy.Min):
            out = args[0]
            for a in args[1:]:
                out = tvm.tirx.min(out, a)
            return out
        if isinstance(e, sympy.Max):
            out = args[0]
            for a in args[1:]:
                out = tvm.tirx.max(out, a)
            return out
        if type(e).__name__ in ("FloorDiv",):
            return tvm.tirx.floordiv(args[0], args[1])
        if type(e).__name__ in ("Mod", "PythonMod"):
            return tvm.tirx.floormod(args[0], args[1])
        return None

    try:
        return conv(expr)
    except Exception:  # noqa: BLE001 - an unknown sympy form: leave TVM's own shape
        return None


def export_for_tvm(program: Program, dynamic: bool | None = None) -> torch.export.ExportedProgram:
    """Re-export the program (decomposed to core ATen; custom ops stay opaque)."""
    dyn = program.dynamic if dynamic is None else dynamic
    ep = export_program(program.module, program.example, dyn)
    try:
        return ep.run_decompositions()
    except Exception as exc:  # noqa: BLE001 - e.g. a view torch cannot decompose with symbolic strides
        log.info("run_decompositions failed (%s); importing the undecomposed program", str(exc).splitlines()[0][:200])
        return ep


def import_program(program: Program, *, dynamic: bool | None = None,
                   extra_converters: dict[str, Callable] | None = None) -> Any:
    """The Relax IRModule of the program; unsupported ops raise ExportError naming op and module."""
    from tvm.relax.frontend.torch import from_exported_program
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    from rewrite.kernels import registry

    registry.load_all()
    ep = export_for_tvm(program, dynamic)
    converters = {SLICE: exact_slice, **registry.tvm_converters(), **(extra_converters or {})}
    _check_supported(ep, {**ExportedProgramImporter().convert_map, **converters})
    try:
        return from_exported_program(ep, custom_convert_map=converters, run_ep_decomposition=False)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"TVM Relax import failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}") from exc


def _check_supported(ep: torch.export.ExportedProgram, convert_map: dict[str, Callable]) -> None:
    missing: dict[str, str] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name not in convert_map and name not in missing:
            missing[name] = _module_of(node)
    if missing:
        parts = []
        for name, where in missing.items():
            ns = _namespace(name, ep)
            parts.append(f"{ns}{name} (from module '{where}')")
        hint = ("register a converter next to the op with kernels.registry.lowering(op, 'tvm') "
                "(e.g. @lowering('rewrite::linear_q', 'tvm'))")
        raise ExportError(f"TVM cannot import operator(s): {', '.join(parts)}; {hint}")


def _namespace(name: str, ep: torch.export.ExportedProgram) -> str:
    for node in ep.graph.nodes:
        if node.op == "call_function" and getattr(node.target, "__name__", "") == name:
            ns = getattr(node.target, "namespace", None)
            return f"{ns}::" if ns else ""
    return ""


def _module_of(node: Any) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<root>"
    path = list(stack.values())[-1][0]
    return path or "<root>"
