"""Schedules for the generated TensorIR kernels (PrimFuncs with attr "rewrite.kernel").

- llvm: our own schedules (below): the dequantize block inlined into the reduction for GEMV
  (each weight is decoded once anyway), materialised and parallel for GEMM (decoded once,
  reused by every row); reductions parallel over output columns, the K loop unrolled by 4.
- GPU targets: dlight's rules (`tvm.s_tir.dlight.gpu`: GEMV for one row, Matmul otherwise,
  Reduction/GeneralReduction, Fallback), applied by the backend after this, or MetaSchedule.
A kernel whose schedule fails keeps its plain loop nest (still correct) with a log line.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("rewrite.tvm")

KERNEL_ATTR = "rewrite.kernel"


def schedule_kernels(mod: Any, target: Any) -> Any:
    """Schedule every generated kernel in the IRModule for `target` (llvm only; GPU: dlight later)."""
    import tvm
    from tvm import tirx

    if target.kind.name != "llvm":
        return mod
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs) if hasattr(mod, "attrs") else mod
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or func.attrs is None or KERNEL_ATTR not in func.attrs:
            continue
        if "tirx.is_scheduled" in func.attrs and bool(func.attrs["tirx.is_scheduled"]):
            continue  # tuned by MetaSchedule
        try:
            out[gv] = schedule_llvm(func)
        except Exception as exc:  # noqa: BLE001 - the unscheduled kernel is still correct
            log.info("llvm schedule of %s failed (%s); using the plain loop nest", gv.name_hint, exc)
    return out


def schedule_llvm(func: Any) -> Any:
    """A CPU schedule for one generated kernel, chosen by its kind."""
    from tvm import s_tir

    kind = str(func.attrs[KERNEL_ATTR])
    sch = s_tir.Schedule(func)
    if kind.startswith("dequant_gemv") or kind.startswith("dequant_gemm"):
        _dequant_matmul(sch, gemv=kind.startswith("dequant_gemv"))
    elif kind == "token_select":
        _token_select(sch)
    else:
        for name in ("dequantize",):
            _parallel_outer(sch, name)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _blocks(sch: Any) -> set[str]:
    names = set()
    root = sch.get_sblock("root") if _has(sch, "root") else None
    for b in sch.get_child_blocks(root) if root is not None else []:
        names.add(sch.get(b).name_hint)
    return names


def _has(sch: Any, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # noqa: BLE001
        return False


def _parallel_outer(sch: Any, name: str) -> None:
    if not _has(sch, name):
        return
    loops = sch.get_loops(sch.get_sblock(name))
    sch.parallel(loops[0])


def _dequant_matmul(sch: Any, gemv: bool) -> None:
    mm = sch.get_sblock("matmul")
    if gemv:
        sch.compute_inline(sch.get_sblock("dequantize"))
        i, j, k = sch.get_loops(mm)
        sch.reorder(j, i, k)
        sch.parallel(j)
        ko, ki = sch.split(k, [None, 4])
        sch.unroll(ki)
    else:
        # decode once into a [K, N] buffer, so the row loop reads weights contiguously along N
        dq = sch.get_sblock("dequantize")
        sch.transform_layout(dq, ("write", 0), lambda n, k: (k, n))
        n, kk = sch.get_loops(dq)
        sch.reorder(kk, n)
        sch.parallel(kk)
        i, j, k = sch.get_loops(mm)
        jo, ji = sch.split(j, [None, 16])
        sch.reorder(jo, i, k, ji)
        sch.parallel(jo)
        init = sch.decompose_reduction(mm, k)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.unroll(ji)  # contiguous along N: LLVM vectorises the unrolled update
    if _has(sch, "bias_add"):
        _parallel_outer(sch, "bias_add")


def _token_select(sch: Any) -> None:
    sch.compute_inline(sch.get_sblock("prepare"))
    for name in ("rank", "slot", "gather_index"):
        _parallel_outer(sch, name)


def schedule_gpu(mod: Any, target: Any) -> Any:
    """dlight's GPU rules on every unscheduled PrimFunc (needs no GPU, only the target)."""
    from tvm.s_tir import dlight as dl

    rules = [dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Matmul(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
             dl.gpu.Fallback()]
    with target:
        return dl.ApplyDefaultSchedule(*[_guarded(r) for r in rules])(mod)


def _guarded(rule: Any) -> Any:
    """A dlight rule that declines (None) instead of raising when its analysis trips on a kernel.

    (dlight's GEMV analysis asserts one-element reads; a 3-bit value reads two bytes.)
    """
    from tvm.s_tir import dlight as dl

    class Guarded(dl.ScheduleRule):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            try:
                return rule.apply(func, target, tunable)
            except Exception as exc:  # noqa: BLE001
                log.debug("dlight %s declined: %s", type(rule).__name__, exc)
                return None

    return Guarded()


def build_kernel(func: Any, target: Any = "llvm") -> Any:
    """Schedule and compile one standalone kernel PrimFunc; returns the runtime module (`["main"]`)."""
    import tvm

    from backends.tvm import make_target  # lazy: kernels never import a backend at import time

    tgt = make_target(target)
    mod = tvm.IRModule({"main": func})
    mod = schedule_kernels(mod, tgt) if tgt.kind.name == "llvm" else schedule_gpu(mod, tgt)
    return tvm.compile(mod, target=tgt)


def kernel_source(lib: Any) -> str:
    """Device source (CUDA C) of a compiled kernel library, '' for CPU builds."""
    mod = getattr(lib, "mod", lib)
    todo, texts, seen = [mod], [], set()
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if getattr(m, "kind", "") in ("cuda", "rocm", "opencl", "metal", "vulkan"):
            texts.append(m.inspect_source())
        todo.extend(list(m.imports))
    return "\n".join(texts)


def tune_kernel(func: Any, target: Any = "llvm", trials: int = 32, work_dir: str | None = None) -> Any:
    """MetaSchedule one kernel with at most `trials` measured candidates; returns the compiled module.

    Measuring runs on the target's device (llvm: this CPU; cuda: needs a GPU and a TVM runtime with CUDA).
    """
    import tempfile

    import tvm
    from tvm.s_tir import meta_schedule as ms

    from backends.tvm import make_target

    tgt = with_num_cores(make_target(target))
    mod = tvm.IRModule({"main": func.without_attr(KERNEL_ATTR)})
    work = work_dir or tempfile.mkdtemp(prefix="rewrite-ms-")
    db = ms.tir_integration.tune_tir(mod, tgt, work, max_trials_global=trials,
                                     num_trials_per_iter=min(64, max(1, trials)))
    sch = ms.tir_integration.compile_tir(db, mod, tgt)
    if sch is None:  # nothing valid measured within the budget: the default schedule
        return build_kernel(func, tgt)
    return tvm.compile(sch.mod, target=tgt)


def with_num_cores(target: Any) -> Any:
    """MetaSchedule needs "num-cores" on CPU targets: this machine's physical cores."""
    import os

    import tvm

    if target.kind.name != "llvm" or "num-cores" in target.attrs:
        return target
    cfg = dict(target.export())
    cfg["num-cores"] = max(1, (os.cpu_count() or 2))
    return tvm.target.Target(cfg)
