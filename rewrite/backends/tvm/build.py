"""Build: legalize, schedule (our kernels, dlight, optional MetaSchedule) and compile a Relax module.

Scheduling: our kernels carry their own schedules per target (`kernels/tvm_schedule.py`); on
llvm the rest of the graph gets dlight's cpu rules and a generic parallel/vectorise schedule
(`schedule_cpu_rest`), on GPUs dlight's gpu rules. With `tune=True` MetaSchedule tunes every
PrimFunc within `trials` total trials (static shapes; needs the `tune` extra, psutil). Caveat:
in the apache-tvm 0.27 wheel here MetaSchedule segfaulted on a plain 64x64 matmul (earlier) and
made no progress in 6 minutes on an 8-trial tune of one small kernel (2026-12; again on
2026-12-03: a 4-trial tune of a 256x64 GEMV, nothing measured in 150 s, no crash), so this
option is wired but unexercised. FuseTIR (`fuse=True`) built and verified MiniLM on 2026-12-03
(about 5% faster, within this machine's noise); it stays off by default.

CUDA without a CUDA-enabled TVM runtime: `build_tvm(..., target="cuda")` returns a
`runtime.CudaTorchModule` when TVM cannot run CUDA but torch can: the rewritten
torch module on the GPU, whose `rewrite::linear_q` runs the CUDA source TVM generated for it,
compiled with nvcc/NVRTC and launched through the CUDA driver (see kernels/cuda_runtime.py).
"""
from __future__ import annotations

import tempfile
import time
from typing import Any, Sequence

from rewrite.errors import ExportError
from rewrite.program import Program

from .importer import import_program
from .runtime import CudaTorchModule, TVMModule, tvm_runs
from .target import is_gpu, make_target


def schedule_module(mod: Any, target: Any, *, tune: bool = False, trials: int = 64,
                    work_dir: str | None = None, fuse: bool = False, cpu_rules: bool = True,
                    serial_below: int | None = None) -> Any:
    """Legalize (and optionally fuse), then schedule every PrimFunc for the target.

    Our kernels are scheduled first (kernels.tvm_schedule), then MetaSchedule (`tune`), then
    dlight's GPU rules for everything left. `fuse` runs Relax FuseOps + FuseTIR; it is off by
    default because TVM 0.27's FuseTIR segfaulted on BERT-style graphs earlier (see above).
    On llvm, every parallel loop nest with less work than `serial_below` element updates runs
    on the calling thread (`kernels.tvm_parallel`; default `SERIAL_BELOW`, from a
    micro-benchmark of a thread-pool launch; 0 keeps every parallel loop).
    """
    import tvm
    from tvm import relax

    from rewrite.kernels import tvm_schedule

    target = make_target(target)
    T = relax.transform
    # llvm: exp/erf/tanh as TVM's vectorisable polynomial approximations (fast_exp, fast_erf),
    # instead of one libm call per lane (softmax and gelu were 15% of MiniLM's time)
    cpu = not is_gpu(target)
    passes = [T.FastMathTransform()] if cpu else []
    passes += [T.LegalizeOps(customize_legalize_map=_FAST_GELU if cpu else None), T.AnnotateTIROpPattern(),
               T.FoldConstant()]
    if fuse:
        passes += [T.FuseOps(), T.FuseTIR()]
    mod = tvm.transform.Sequential(passes)(mod)
    if tune:  # tuned kernels are marked scheduled; the rest get the default schedules below
        mod = _tune(mod, target, trials, work_dir)
    mod = tvm_schedule.schedule_kernels(mod, target)
    if is_gpu(target):
        mod = tvm_schedule.schedule_gpu(mod, target)
    elif cpu_rules:
        mod = tvm_schedule.schedule_cpu_rest(mod, target)
    if not is_gpu(target):
        from rewrite.kernels import tvm_parallel

        mod = tvm_parallel.apply_serial_below(mod, tvm_parallel.SERIAL_BELOW if serial_below is None else serial_below)
    return mod


def _gelu_fast_erf(bb: Any, call: Any) -> Any:
    """nn.gelu with TVM's polynomial fast_erf (float32): FastMathTransform rewrites erf, exp and
    softmax but gelu legalizes straight to erf, which llvm lowers to one libm call per lane
    (measured: gelu 23% of MiniLM's time under TVM)."""
    import tvm
    from tvm import topi

    x = call.args[0]
    if x.ty.dtype != "float32":  # fast_erf is float32 only: TVM's own legalization
        return tvm.ir.Op.get("relax.nn.gelu").get_attr("FLegalize")(bb, call)

    def gelu(t: Any) -> Any:
        return topi.multiply(t, topi.add(topi.multiply(topi.fast_erf(topi.multiply(t, 0.7071067811865476)), 0.5), 0.5))

    return bb.call_te(gelu, x, primfunc_name_hint="gelu")


_FAST_GELU = {"relax.nn.gelu": _gelu_fast_erf}


def _tune(mod: Any, target: Any, trials: int, work_dir: str | None) -> Any:
    """MetaSchedule over every PrimFunc, at most `trials` measured candidates in total.

    Measuring needs the target's device here (llvm: this CPU).
    """
    from tvm.s_tir import meta_schedule as ms

    from rewrite.kernels.tvm_schedule import with_num_cores

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
              rtol: float = 1e-4, serial_below: int | None = None, **options: Any) -> "TVMModule | CudaTorchModule":
    """Import, schedule and build the program; returns a callable like `program.module`.

    `dynamic` (default: the program's) keeps batch/sequence dims symbolic; `tune` runs
    MetaSchedule with `trials` total trials (needs static shapes: dynamic=False).
    `serial_below` (llvm): parallel loop nests with fewer element updates run serially
    (default `kernels.tvm_parallel.SERIAL_BELOW`; 0: always parallel).
    `verify` runs `verify_inputs` (default: the example) through both and raises on mismatch.
    """
    import tvm

    if options:
        raise ExportError(f"build_tvm: unknown option(s) {sorted(options)}; known: dynamic, tune, trials, fuse, verify, "
                          "verify_inputs, rtol, serial_below")
    start = time.perf_counter()
    tgt = make_target(target)
    if tgt.kind.name == "cuda" and not tvm_runs(tgt) and _torch_cuda():
        built = CudaTorchModule(program, tgt)  # TVM's kernels, launched by us; TVM's runtime has no CUDA
        built.build_seconds = time.perf_counter() - start
        if verify:
            err = built.verify(verify_inputs or [program.example], rtol=max(rtol, 1e-3))
            built.verify_note = (f"generated CUDA kernels launched from torch match the CPU torch module "
                                 f"(max relative error {err:.1e})")
        return built
    if tune and dynamic is None:
        dynamic = False
    mod = import_program(program, dynamic=dynamic)
    mod = schedule_module(mod, tgt, tune=tune, trials=trials, fuse=fuse, serial_below=serial_below)
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


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
