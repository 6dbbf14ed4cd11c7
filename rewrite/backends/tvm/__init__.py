"""TVM backend: Relax import of the rewritten graph, generated kernels for custom ops, build, run.

    built = build_tvm(program, target="llvm")       # or "cuda", or a TVM target dict
    outputs = built(*args, **kwargs)                 # same call and output structure as program.module
    built.save("model.tvm.so"); again = load("model.tvm.so", program)

Modules: `target` (target names -> tvm.target.Target), `importer` (ExportedProgram -> Relax
through TVM's public frontend and our converters), `build` (schedule + compile), `runtime`
(the Relax VM called like the torch module, save/load).
"""
from .build import build_tvm, schedule_module
from .importer import export_for_tvm, import_program
from .runtime import CudaTorchModule, TVMModule, load, tvm_runs
from .target import device_for, is_gpu, make_target

__all__ = ["CudaTorchModule", "TVMModule", "tvm_runs", "build_tvm", "device_for", "export_for_tvm", "import_program", "is_gpu", "load",
           "make_target", "schedule_module"]
