"""Running a TVM build like the rewritten module: the Relax VM, timing, verification, save/load."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.utils._pytree as pytree

from rewrite.compare import compare
from rewrite.errors import ExportError, VerificationError
from rewrite.inputs import Inputs
from rewrite.program import Program

from .target import device_for, make_target


def tvm_runs(target: Any) -> bool:
    """Can this TVM runtime run code for `target` here (its device exists)?"""
    try:
        return bool(device_for(target).exist)
    except Exception:  # noqa: BLE001 - a wheel built without that runtime
        return False


class CudaTorchModule:
    """The rewritten module on a GPU, every `rewrite::linear_q` running its TVM-generated CUDA kernel.

    For TVM wheels without a CUDA runtime (the PyPI one): the kernels TVM generates are
    compiled and launched by `kernels.cuda_runtime` from the op's CUDA implementation; the rest
    of the graph runs as torch CUDA ops. Called like the module; outputs come back on the GPU.
    """

    def __init__(self, program: Program, target: Any):
        import copy

        from rewrite.kernels import cuda_runtime

        self.program = program
        self.target = make_target(target)
        self.device = torch.device("cuda", 0)
        self.module = copy.deepcopy(program.module).to(self.device)
        self.build_seconds = 0.0
        self.verify_note = "not verified"
        self.path = None
        self._runtime = cuda_runtime

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        def move(x: Any) -> Any:
            return x.to(self.device) if isinstance(x, torch.Tensor) else x

        return self.module(*pytree.tree_map(move, args), **pytree.tree_map(move, kwargs))

    def verify(self, batches: Sequence[Any], rtol: float = 1e-3) -> float:
        """Largest relative error against the CPU torch module (`rewrite.compare`); raises above `rtol`."""
        agreement = compare(_output_pairs(self.program, self, batches), rtol=rtol)
        if not self._runtime._generated_ok():
            raise VerificationError(f"generated CUDA kernels could not run: {self._runtime._STATE['why']}")
        agreement.check("generated CUDA kernels", "the torch module")
        return agreement.max_rel

    def source(self) -> str:
        """CUDA source of every kernel generated so far in this process."""
        return "\n".join(k.source for k in self._runtime.generated_kernels())

    # no save(): it is the torch module plus kernels compiled at first use, not a TVM library


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
        """Largest relative error against the torch module over `batches` (`rewrite.compare`); raises above `rtol`."""
        agreement = compare(_output_pairs(self.program, self, batches), rtol=rtol)
        agreement.check(f"TVM ({self.target.kind.name})")
        return agreement.max_rel

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


def _output_pairs(program: Program, built: Any, batches: Sequence[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(torch reference, built module's output) for every tensor output of every batch."""
    pairs = []
    for batch in batches:
        b = Inputs.of(batch)
        ref = [t for t in pytree.tree_leaves(program.run(b)) if isinstance(t, torch.Tensor)]
        got = [t.cpu() for t in pytree.tree_leaves(b.call(built)) if isinstance(t, torch.Tensor)]
        if len(ref) != len(got):
            raise VerificationError(f"the built module returned {len(got)} outputs, the torch module {len(ref)}")
        pairs += zip(ref, got)
    return pairs
