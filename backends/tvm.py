"""TVM backend: Relax import of the rewritten graph, generated kernels for custom ops, build, run.

    built = build_tvm(program, target="llvm")       # or "cuda", or a TVM target dict
    outputs = built(*args, **kwargs)                 # same call and output structure as program.module
    built.save("model.tvm.so"); again = load("model.tvm.so", program)

The graph is re-exported (`rewrite.capture.export_program`) and imported with
`tvm.relax.frontend.torch.from_exported_program`; every `rewrite::` custom op goes through a
converter from `kernels.registry.TVM_CONVERTERS`, which emits a TensorIR kernel generated
for that op instance (bits, group size, shapes). Dynamic batch/sequence dims stay symbolic:
where TVM's shape inference would lose a shape that torch proved (`min(S, 64)` after slicing a
position table with S <= 64), the importer emits the in-bounds slice torch proved.

Scheduling: our kernels carry their own schedules per target (`kernels/tvm_schedule.py`);
the rest of the graph gets dlight's rules (GPU) or the default CPU lowering (llvm). With
`tune=True` MetaSchedule tunes every kernel within `trials` total trials (static shapes;
needs the `tune` extra, psutil). Caveat: MetaSchedule's search segfaults in the apache-tvm 0.27
wheel installed here, even on a plain 64x64 matmul, so this option is wired but unexercised.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree

from rewrite.capture import export_program
from rewrite.errors import ExportError, VerificationError
from rewrite.inputs import Inputs
from rewrite.program import Program

log = logging.getLogger("rewrite.tvm")

# kernels.registry.TVM_CONVERTERS keys: the fx target's __name__, e.g. "linear_q.default".


# ---------------------------------------------------------------------------- targets
def make_target(target: Any = "llvm") -> Any:
    """A tvm.target.Target from "llvm" (this CPU), "cuda" (sm_90 unless given), a dict, or a Target."""
    import tvm
    from tvm.target import codegen

    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, str):
        name = target.strip()
        if name in ("llvm", "cpu"):
            return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
        if name in ("cuda", "gpu"):
            return tvm.target.Target({"kind": "cuda", "arch": _cuda_arch()})
        if name.startswith("{"):
            import json

            return tvm.target.Target(json.loads(name))
        return tvm.target.Target(name)
    if isinstance(target, dict):
        target = dict(target)
        if target.get("kind") == "cuda" and "arch" not in target:
            target["arch"] = _cuda_arch()
        return tvm.target.Target(target)
    raise ExportError(f"cannot make a TVM target from {target!r}: give 'llvm', 'cuda' or a target dict like "
                      "{'kind': 'cuda', 'arch': 'sm_90'}")


def _cuda_arch() -> str:
    """The local GPU's compute capability, else sm_90 (code generation needs no GPU)."""
    try:
        import tvm

        dev = tvm.cuda(0)
        if dev.exist:
            return "sm_" + str(dev.compute_version).replace(".", "")
    except Exception:  # noqa: BLE001
        pass
    return "sm_90"


def is_gpu(target: Any) -> bool:
    return make_target(target).kind.name in ("cuda", "rocm", "vulkan", "metal", "opencl")


def device_for(target: Any) -> Any:
    import tvm

    kind = make_target(target).kind.name
    return tvm.cpu(0) if kind == "llvm" else tvm.device(kind, 0)


# ---------------------------------------------------------------------------- import
def _importer_class() -> type:
    """ExportedProgramImporter keeping torch's exact shapes where TVM's inference would lose them.

    (A generic `match_cast` to torch's shape made TVM 0.27's StaticPlanBlockMemory segfault,
    so only the known case is fixed at its source: in-bounds slices.)
    """
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    class _Importer(ExportedProgramImporter):
        sym_vars: dict[str, Any] = {}

        def _translate_fx_graph(self, graph_module, nodes, inputs_vars, custom_ops=None):  # noqa: ANN001
            self.sym_vars = _collect_sym_vars(inputs_vars.values())
            custom_ops = custom_ops or set()
            output_args = None
            for node in nodes:
                if node.op == "placeholder":
                    if "grapharg" in node.meta and node.meta["grapharg"].fake_tensor is None:
                        continue
                    if node.name in inputs_vars:
                        self.env[node] = inputs_vars[node.name]
                elif node.op == "output":
                    output_args = self.retrieve_args(node)[0]
                    break
                elif node.op == "get_attr":
                    self.env[node] = getattr(graph_module, node.target)
                elif node.op == "call_function":
                    name = node.target.__name__
                    value = self.convert_map[name](node, self) if name in custom_ops else self.convert_map[name](node)
                    self.env[node] = value
                else:
                    raise ValueError(f"Unsupported op {node.op}")
            return self._flatten_output_args(output_args)

        def _slice(self, node: Any) -> Any:
            """Slices torch proved in bounds (e.g. position_ids[:, :S] with S <= 64) keep an exact shape."""
            out = super()._slice(node)
            want = self._wanted_shape(node)
            if want is None or self._shape_matches(out, want):
                return out
            x = self.env[node.args[0]]
            dim = node.args[1] if len(node.args) > 1 else 0
            start = node.args[2] if len(node.args) > 2 else 0
            end = node.args[3] if len(node.args) > 3 else None
            step = node.args[4] if len(node.args) > 4 else 1
            if end is None or not isinstance(step, int):
                return out
            start = self.env[start] if isinstance(start, torch.fx.Node) else (start or 0)
            end = self.env[end] if isinstance(end, torch.fx.Node) else end
            exact = self.block_builder.emit(relax.op.strided_slice(x, [dim], [start], [end], [step], assume_inbound=True))
            return exact if self._shape_matches(exact, want) else out

        def _wanted_shape(self, node: Any) -> list | None:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                return None
            want = [_to_prim(s, self.sym_vars) for s in val.shape]
            return None if any(w is None for w in want) else want

        @staticmethod
        def _shape_matches(value: Any, want: list) -> bool:
            ty = getattr(value, "ty", None)
            if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
                return False
            have = ty.shape.values
            ana = tvm.sym.Analyzer()
            return len(have) == len(want) and all(ana.can_prove_equal(h, w) for h, w in zip(have, want))

    return _Importer


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
    from kernels import registry

    registry.load_all()
    ep = export_for_tvm(program, dynamic)
    converters = dict(registry.TVM_CONVERTERS)
    converters.update(extra_converters or {})
    importer = _importer_class()()
    importer.update_convert_map(converters)
    _check_supported(ep, importer.convert_map)
    try:
        return importer.from_exported_program(ep, False, False, False, converters)
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
        hint = ("register a converter in kernels.registry.TVM_CONVERTERS (key: the op's overload name, "
                "e.g. 'linear_q.default') next to the op")
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


# ---------------------------------------------------------------------------- build
def schedule_module(mod: Any, target: Any, *, tune: bool = False, trials: int = 64,
                    work_dir: str | None = None, fuse: bool = False) -> Any:
    """Legalize (and optionally fuse), then schedule every PrimFunc for the target.

    Our kernels are scheduled first (kernels.tvm_schedule), then MetaSchedule (`tune`), then
    dlight's GPU rules for everything left. `fuse` runs Relax FuseOps + FuseTIR; it is off by
    default because TVM 0.27's FuseTIR segfaults on the BERT-style graphs seen here.
    """
    import tvm
    from tvm import relax

    from kernels import tvm_schedule

    target = make_target(target)
    T = relax.transform
    passes = [T.LegalizeOps(), T.AnnotateTIROpPattern(), T.FoldConstant()]
    if fuse:
        passes += [T.FuseOps(), T.FuseTIR()]
    mod = tvm.transform.Sequential(passes)(mod)
    if tune:  # tuned kernels are marked scheduled; the rest get the default schedules below
        mod = _tune(mod, target, trials, work_dir)
    mod = tvm_schedule.schedule_kernels(mod, target)
    if is_gpu(target):
        mod = tvm_schedule.schedule_gpu(mod, target)
    return mod


def _tune(mod: Any, target: Any, trials: int, work_dir: str | None) -> Any:
    """MetaSchedule over every PrimFunc, at most `trials` measured candidates in total.

    Measuring needs the target's device here (llvm: this CPU).
    """
    from tvm.s_tir import meta_schedule as ms

    from kernels.tvm_schedule import with_num_cores

    target = with_num_cores(target)
    work = work_dir or tempfile.mkdtemp(prefix="rewrite-ms-")
    db = ms.relax_integration.tune_relax(mod=mod, params={}, target=target, work_dir=work,
                                         max_trials_global=trials, num_trials_per_iter=min(64, max(1, trials)))
    return _apply_db(mod, db, target)


def _apply_db(mod: Any, db: Any, target: Any) -> Any:
    from tvm import relax

    with db, target:
        return relax.transform.MetaScheduleApplyDatabase()(mod)


def build_tvm(program: Program, target: Any = "llvm", *, dynamic: bool | None = None, tune: bool = False,
              trials: int = 64, fuse: bool = False, verify: bool = False, verify_inputs: Sequence[Any] | None = None,
              rtol: float = 1e-4, **options: Any) -> "TVMModule":
    """Import, schedule and build the program; returns a callable like `program.module`.

    `dynamic` (default: the program's) keeps batch/sequence dims symbolic; `tune` runs
    MetaSchedule with `trials` total trials (needs static shapes: dynamic=False).
    `verify` runs `verify_inputs` (default: the example) through both and raises on mismatch.
    """
    import tvm

    if options:
        raise ExportError(f"build_tvm: unknown option(s) {sorted(options)}; known: dynamic, tune, trials, fuse, verify, "
                          "verify_inputs, rtol")
    start = time.perf_counter()
    tgt = make_target(target)
    if tune and dynamic is None:
        dynamic = False
    mod = import_program(program, dynamic=dynamic)
    mod = schedule_module(mod, tgt, tune=tune, trials=trials, fuse=fuse)
    try:
        ex = tvm.compile(mod, target=tgt)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"TVM build for {tgt.kind.name} failed: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:300]}") from exc
    built = TVMModule(ex, program, tgt, ir=mod)
    built.build_seconds = time.perf_counter() - start
    if verify and built.vm is not None:
        err = built.verify(verify_inputs or [program.example], rtol=rtol)
        built.verify_note = f"matches the torch module (max relative error {err:.1e})"
    elif verify:
        built.verify_note = f"not verified: no {tgt.kind.name} device here (code generated only)"
    return built


class TVMModule:
    """A built Relax executable called like the rewritten module (same output structure)."""

    def __init__(self, executable: Any, program: Program, target: Any, ir: Any = None, path: str | None = None):
        from tvm import relax

        self.executable = executable
        self.program = program
        self.target = make_target(target)
        self.ir = ir
        self.path = path
        self.build_seconds = 0.0
        self.verify_note = "not verified"
        self.device = device_for(self.target)
        self.vm = relax.VirtualMachine(executable, self.device) if self._device_present() else None

    def _device_present(self) -> bool:
        try:
            return bool(self.device.exist)
        except Exception:  # noqa: BLE001
            return False

    # -- running ---------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import tvm

        if self.vm is None:
            raise ExportError(f"no {self.target.kind.name} device here to run the TVM build (save() it and load it on one)")
        flat = [x for x in self.program.flat_inputs(Inputs(tuple(args), dict(kwargs))) if isinstance(x, torch.Tensor)]
        feeds = [tvm.runtime.tensor(x.detach().cpu().contiguous().numpy(), self.device) for x in flat]
        out = self.vm["main"](*feeds)
        tensors = [torch.from_numpy(o.numpy()) for o in _flatten_tvm(out)]
        spec = getattr(self.program.graph._codegen, "pytree_info", None)
        if spec is not None and spec.out_spec is not None and spec.out_spec.num_leaves == len(tensors):
            return pytree.tree_unflatten(tensors, spec.out_spec)
        return tensors[0] if len(tensors) == 1 else tensors

    def time(self, *args: Any, repeat: int = 20, **kwargs: Any) -> float:
        """Median seconds per call of `main` on device-resident inputs (no host copies)."""
        import tvm

        flat = [x for x in self.program.flat_inputs(Inputs(tuple(args), dict(kwargs))) if isinstance(x, torch.Tensor)]
        feeds = [tvm.runtime.tensor(x.detach().cpu().numpy(), self.device) for x in flat]
        f = self.vm.time_evaluator("main", self.device, number=1, repeat=repeat)
        return float(f(*feeds).median)

    def verify(self, batches: Sequence[Any], rtol: float = 1e-4) -> float:
        """Largest relative error against the torch module over `batches`; raises above `rtol`."""
        worst = 0.0
        for batch in batches:
            b = Inputs.of(batch)
            ref = [t for t in pytree.tree_leaves(self.program.run(b)) if isinstance(t, torch.Tensor)]
            got = [t for t in pytree.tree_leaves(b.call(self)) if isinstance(t, torch.Tensor)]
            if len(ref) != len(got):
                raise VerificationError(f"TVM returned {len(got)} outputs, the torch module {len(ref)}")
            for i, (r, g) in enumerate(zip(ref, got)):
                if tuple(r.shape) != tuple(g.shape):
                    raise VerificationError(f"output {i}: TVM shape {tuple(g.shape)} != torch shape {tuple(r.shape)}")
                if not r.is_floating_point():
                    if not torch.equal(r, g.to(r.dtype)):
                        raise VerificationError(f"output {i}: integer outputs differ between TVM and torch")
                    continue
                scale = max(float(r.abs().max()), 1e-3) if r.numel() else 1.0  # near-zero outputs: absolute
                rel = float((r.double() - g.double()).abs().max()) / scale if r.numel() else 0.0
                worst = max(worst, rel)
        if worst > rtol:
            raise VerificationError(f"TVM ({self.target.kind.name}) does not match the rewritten torch module: "
                                    f"max relative error {worst:.2e} > tolerance {rtol:.0e}")
        return worst

    # -- artefacts ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the compiled library (a shared object) atomically; load it back with `load`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            out = tmp / path.name
            self.executable.export_library(str(out))
            os.replace(out, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.path = str(path)
        return path

    def source(self) -> str:
        """Generated device source (CUDA C for cuda targets; LLVM IR / asm text for llvm)."""
        mod = getattr(self.executable, "mod", self.executable)
        texts = []
        for m in _all_modules(mod):
            kind = m.kind
            if kind in ("cuda", "rocm", "opencl", "metal", "vulkan"):
                texts.append(m.inspect_source())
        if texts:
            return "\n".join(texts)
        for m in _all_modules(mod):
            if m.kind == "llvm":
                try:
                    return m.inspect_source("ll")
                except Exception:  # noqa: BLE001
                    pass
        return ""

    def script(self) -> str:
        """The scheduled IRModule as TVMScript (kernels included)."""
        return self.ir.script(show_meta=False) if self.ir is not None else ""


def _all_modules(mod: Any) -> list[Any]:
    seen, out, todo = set(), [], [mod]
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        todo.extend(list(m.imports))
    return out


def _flatten_tvm(out: Any) -> list[Any]:
    import tvm

    if isinstance(out, (list, tuple)) or type(out).__name__ == "Array":
        res = []
        for o in out:
            res.extend(_flatten_tvm(o))
        return res
    return [out]


def load(path: str | os.PathLike, program: Program, target: Any = "llvm") -> TVMModule:
    """Load a library written by `TVMModule.save` for running like `program.module`."""
    import tvm

    lib = tvm.runtime.load_module(str(path))
    return TVMModule(lib, program, target, path=str(path))
