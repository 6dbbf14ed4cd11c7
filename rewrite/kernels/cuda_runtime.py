"""Generated CUDA kernels run from torch, without a CUDA-enabled TVM runtime.

The PyPI apache-tvm wheel generates CUDA C but cannot launch it. This module takes what TVM
generates for one kernel instance (dlight's GPU schedule, `kernels/tvm_schedule.schedule_gpu`)
and runs it through the CUDA driver directly:

1. `generate(func, arch)`: TVM's own TIR pipeline (public `tvm.tirx.build` steps) with the
   host/device split made explicit; the device module gives the CUDA source, the host function
   gives every kernel launch (`call_ffi_kernel`: kernel name, arguments, grid/block extents as
   expressions of the symbolic shapes). CSE is disabled so launch arguments are buffers and
   shape variables only.
2. `compile_ptx(source, arch)`: nvcc (`--ptx`), or NVRTC through `cuda-python` when no nvcc.
3. `CudaKernel.launch(buffers, shapes)`: cuModuleLoadData + cuLaunchKernel through ctypes on
   libcuda, on torch's current stream, with torch tensors' device pointers.

`rewrite::linear_q` gets a CUDA implementation (torch.library) that generates, compiles and
caches the kernel per (bits, group, K, N, bias, GEMV or GEMM, arch) on first use, so a rewritten
torch module moved to a GPU runs the generated kernels. Where TVM or a CUDA compiler is missing
it computes the op's definition with torch ops instead (logged once). `rewrite::token_select`
on CUDA keeps its torch reference implementation (its generated kernel needs two workspace
buffers; not wired here).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("rewrite.cuda")

_PTR_RE = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\(([^)]*)\)")


class CudaKernelError(RuntimeError):
    """A generated kernel could not be compiled or launched."""


@dataclass
class Launch:
    """One kernel launch of a generated PrimFunc."""

    name: str
    args: list[tuple[str, Any]]  # ("buffer", name) | ("scalar", tirx expr)
    grid: list[Any]  # tirx exprs, x/y/z
    block: list[Any]
    shared_bytes: Any = 0


@dataclass
class CudaKernel:
    """CUDA source + launch plan of one generated kernel; `launch` runs it on torch tensors."""

    source: str
    launches: list[Launch]
    arch: str
    params: list[str] = field(default_factory=list)  # the PrimFunc's buffer names, in order
    ptx: bytes | None = None
    _module: Any = None
    _functions: dict[str, Any] = field(default_factory=dict)
    _types: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able plan (source, PTX, launches as text): runs later with torch + libcuda only, no TVM."""
        self.compile()
        return {"source": self.source, "arch": self.arch, "params": self.params,
                "ptx": (self.ptx or b"").decode(), "types": self._types,
                "launches": [{"name": ln.name,
                              "args": [[k, w if k == "buffer" else expr_text(w)] for k, w in ln.args],
                              "grid": [expr_text(e) for e in ln.grid], "block": [expr_text(e) for e in ln.block],
                              "shared": expr_text(ln.shared_bytes)} for ln in self.launches]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CudaKernel":
        launches = [Launch(ln["name"], [(k, w) for k, w in ln["args"]], ln["grid"], ln["block"], ln["shared"])
                    for ln in d["launches"]]
        kern = cls(source=d["source"], launches=launches, arch=d["arch"], params=list(d["params"]),
                   ptx=d["ptx"].encode())
        kern._types = {k: list(v) for k, v in d["types"].items()}
        return kern

    def compile(self) -> "CudaKernel":
        if self.ptx is None:
            self.ptx = compile_ptx(self.source, self.arch)
            self._types = kernel_param_types(self.source)
        return self

    def launch(self, buffers: dict[str, torch.Tensor], shapes: dict[str, int]) -> None:
        """Launch every kernel in order on torch's current stream (buffers by PrimFunc name)."""
        self.compile()
        driver = _driver()
        if self._module is None:
            self._module = driver.load(self.ptx)
        stream = torch.cuda.current_stream().cuda_stream
        for ln in self.launches:
            fn = self._functions.get(ln.name)
            if fn is None:
                fn = self._functions[ln.name] = driver.function(self._module, ln.name)
            types = self._types.get(ln.name) or ["ptr" if k == "buffer" else "i64" for k, _ in ln.args]
            values = []
            for (kind, what), ty in zip(ln.args, types):
                if kind == "buffer":
                    if what not in buffers:
                        raise CudaKernelError(f"kernel {ln.name} needs buffer {what!r} (have {sorted(buffers)})")
                    values.append(ctypes.c_void_p(buffers[what].data_ptr()))
                else:
                    v = evaluate(what, shapes)
                    values.append(ctypes.c_int32(v) if ty == "i32" else ctypes.c_int64(v))
            dims = [evaluate(e, shapes) for e in ln.grid] + [evaluate(e, shapes) for e in ln.block]
            driver.launch(fn, dims, evaluate(ln.shared_bytes, shapes), stream, values)


def evaluate(expr: Any, shapes: dict[str, int]) -> int:
    """An integer TIR expression (or saved expression text) of the shape variables, for concrete shapes."""
    if isinstance(expr, int):
        return expr
    if isinstance(expr, str):
        return eval_text(expr, shapes)
    import tvm
    from tvm import tirx

    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    if isinstance(expr, tirx.Var):
        if expr.name not in shapes:
            raise CudaKernelError(f"launch needs shape {expr.name!r} (have {sorted(shapes)})")
        return int(shapes[expr.name])
    if isinstance(expr, tirx.Cast):
        return evaluate(expr.value, shapes)
    ops = {tirx.Add: lambda a, b: a + b, tirx.Sub: lambda a, b: a - b, tirx.Mul: lambda a, b: a * b,
           tirx.FloorDiv: lambda a, b: a // b, tirx.FloorMod: lambda a, b: a % b, tirx.Min: min, tirx.Max: max,
           tirx.Div: lambda a, b: int(a / b)}
    for cls, fn in ops.items():
        if isinstance(expr, cls):
            return fn(evaluate(expr.a, shapes), evaluate(expr.b, shapes))
    del tvm
    raise CudaKernelError(f"cannot evaluate launch extent {expr}")


_BINOPS = {"Add": "+", "Sub": "-", "Mul": "*", "FloorDiv": "//", "FloorMod": "%"}


def expr_text(expr: Any) -> str:
    """A launch expression as Python text over the shape names (for plans saved without TVM)."""
    from tvm import tirx

    if isinstance(expr, int):
        return str(expr)
    if isinstance(expr, tirx.IntImm):
        return str(int(expr.value))
    if isinstance(expr, tirx.Var):
        return expr.name
    if isinstance(expr, tirx.Cast):
        return expr_text(expr.value)
    name = type(expr).__name__
    if name in _BINOPS:
        return f"({expr_text(expr.a)} {_BINOPS[name]} {expr_text(expr.b)})"
    if name in ("Min", "Max"):
        return f"{name.lower()}({expr_text(expr.a)}, {expr_text(expr.b)})"
    raise CudaKernelError(f"cannot save launch expression {expr}")


def eval_text(text: str, shapes: dict[str, int]) -> int:
    """Evaluate `expr_text` output: integers, shape names, + - * // %, min, max; nothing else."""
    import ast

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in shapes:
                raise CudaKernelError(f"launch needs shape {node.id!r} (have {sorted(shapes)})")
            return int(shapes[node.id])
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            ops = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}
            if type(node.op) in ops:
                return ops[type(node.op)]
            if isinstance(node.op, ast.FloorDiv):
                return a // b
            if isinstance(node.op, ast.Mod):
                return a % b
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
            vals = [ev(a) for a in node.args]
            return min(vals) if node.func.id == "min" else max(vals)
        raise CudaKernelError(f"unexpected launch expression {text!r}")

    return ev(ast.parse(text, mode="eval").body)


def _walk(node: Any, visit: Any) -> None:
    """Pre-order walk over TIR statements and expressions (the fields that hold children)."""
    visit(node)
    for name in ("seq", "body", "then_case", "else_case", "value", "condition", "args", "block"):
        child = getattr(node, name, None) if name in _fields(node) else None
        if child is None:
            continue
        if isinstance(child, (list, tuple)) or type(child).__name__ == "Array":
            for c in child:
                _walk(c, visit)
        elif not isinstance(child, (int, float, str)):
            _walk(child, visit)


def _fields(node: Any) -> set[str]:
    try:
        return set(dir(node))
    except Exception:  # noqa: BLE001
        return set()


# ------------------------------------------------------------------------ generation
def generate(func: Any, arch: str = "sm_90") -> CudaKernel:
    """CUDA source and launch plan of one PrimFunc, scheduled with dlight's GPU rules."""
    import tvm
    from tvm.tirx.build import codegen_build, split_host_device_mods

    from .tvm_schedule import schedule_gpu
    from .tvm_target import make_target

    target = make_target({"kind": "cuda", "arch": arch}).with_host(make_target("llvm"))
    mod = schedule_gpu(tvm.IRModule({"main": func}), make_target({"kind": "cuda", "arch": arch}))
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        mod = tvm.tirx.transform.BindTarget(target)(mod)
        pipeline, _, finalize_device = tvm.tirx.get_default_tir_pipeline(target)
        mod = pipeline(mod)
        host, devices = split_host_device_mods(mod)
        sources = [codegen_build(finalize_device()(dmod), dtarget).inspect_source() for dtarget, dmod in devices.items()]
    launches = _launches(host)
    params = [p.name for p in func.params]
    return CudaKernel(source="\n".join(sources), launches=launches, arch=arch, params=params)


def _launches(host: Any) -> list[Launch]:
    """Every call_ffi_kernel in the host function(s), in program order."""
    import tvm

    op = tvm.ir.Op.get("tirx.call_ffi_kernel")
    found: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, tvm.ir.Call) and node.op.same_as(op):
            found.append(node)

    for _, fn in host.functions_items():
        if isinstance(fn, tvm.tirx.PrimFunc):
            _walk(fn.body, visit)
    out = []
    for call in found:
        name = str(call.args[0].value)
        tags = [str(t) for t in getattr(call.attrs, "launch_params", None) or _launch_tags(call)]
        rest = list(call.args[1:])
        dyn_shared = "tirx.use_dyn_shared_memory" in tags
        n_extents = len([t for t in tags if t != "tirx.use_dyn_shared_memory"]) + (1 if dyn_shared else 0)
        args, extents = rest[: len(rest) - n_extents], rest[len(rest) - n_extents:]
        grid, block, shared = [1, 1, 1], [1, 1, 1], 0
        for tag, ext in zip([t for t in tags if t != "tirx.use_dyn_shared_memory"], extents):
            axis = "xyz".index(tag[-1])
            (grid if tag.startswith("blockIdx") else block)[axis] = ext
        if dyn_shared:
            shared = extents[-1]
        out.append(Launch(name, [_arg(a) for a in args], grid, block, shared))
    if not out:
        raise CudaKernelError("no kernel launch found in the generated host code")
    return out


def _launch_tags(call: Any) -> list[str]:
    raise CudaKernelError(f"cannot read the launch parameters of {call}")


def _arg(a: Any) -> tuple[str, Any]:
    import tvm

    text = str(a)
    if text.endswith(".data"):  # a buffer's data pointer
        return ("buffer", _buffer_name(text[: -len(".data")]))
    if type(a).__name__ == "Var" and _is_handle(a):
        return ("buffer", _buffer_name(a.name))
    if isinstance(a, tvm.ir.Call) and a.op.name == "tirx.address_of":
        return ("buffer", _buffer_name(a.args[0].buffer.name))
    return ("scalar", a)


def _is_handle(var: Any) -> bool:
    for attr in ("ty", "type_annotation", "dtype"):
        try:
            if "handle" in str(getattr(var, attr)) or "Pointer" in str(getattr(var, attr)):
                return True
        except Exception:  # noqa: BLE001
            continue
    return False


def _buffer_name(var_name: str) -> str:
    """`x_1` (the data var of buffer x after lowering) -> `x`."""
    return re.sub(r"_\d+$", "", var_name)


def kernel_param_types(source: str) -> dict[str, list[str]]:
    """{kernel: ["ptr" | "i64" | "i32", ...]} from the extern "C" __global__ signatures."""
    out: dict[str, list[str]] = {}
    for name, params in _PTR_RE.findall(source):
        types = []
        for p in (x.strip() for x in params.split(",") if x.strip()):
            types.append("ptr" if "*" in p else "i64" if "int64" in p or "long" in p else "i32")
        out[name] = types
    return out


# ------------------------------------------------------------------------ compilation
def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if os.path.exists(cand):
            return cand
    return None


def compile_ptx(source: str, arch: str) -> bytes:
    """PTX of CUDA C for `arch` (sm_XX): nvcc when present, else NVRTC (cuda-python)."""
    nvcc = nvcc_path()
    if nvcc:
        with tempfile.TemporaryDirectory(prefix="rewrite-cu-") as tmp:
            cu, ptx = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.ptx")
            with open(cu, "w") as f:
                f.write(source)
            res = subprocess.run([nvcc, "--ptx", f"-arch={arch}", "-O3", "-std=c++17", cu, "-o", ptx],
                                 capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise CudaKernelError(f"nvcc failed for {arch}: {res.stderr.strip()[-1500:]}")
            with open(ptx, "rb") as f:
                return f.read()
    return _nvrtc_ptx(source, arch)


def _nvrtc_ptx(source: str, arch: str) -> bytes:
    try:
        from cuda.bindings import nvrtc  # type: ignore[import-not-found]
    except ImportError as exc:
        raise CudaKernelError("no nvcc on PATH and no cuda-python (pip install cuda-python) for NVRTC") from exc
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"kernel.cu", 0, [], [])
    opts = [f"--gpu-architecture=compute_{arch.split('_')[-1]}".encode(), b"-std=c++17", b"--include-path=/usr/local/cuda/include"]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if int(err) != 0:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        buf = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, buf)
        raise CudaKernelError(f"NVRTC failed for {arch}: {buf.decode(errors='replace')[-1500:]}")
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    buf = b" " * size
    nvrtc.nvrtcGetPTX(prog, buf)
    return buf


# ------------------------------------------------------------------------ driver (ctypes)
class _Driver:
    """The few CUDA driver calls needed, on torch's context."""

    def __init__(self) -> None:
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise CudaKernelError("libcuda.so.1 not found: no NVIDIA driver here") from exc
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # make torch's primary context current on this thread

    def check(self, code: int, what: str) -> None:
        if code != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(code, ctypes.byref(msg))
            raise CudaKernelError(f"{what} failed: CUDA error {code} ({(msg.value or b'').decode()})")

    def load(self, ptx: bytes) -> Any:
        module = ctypes.c_void_p()
        self.check(self.lib.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(ptx + b"\0")), "cuModuleLoadData")
        return module

    def function(self, module: Any, name: str) -> Any:
        fn = ctypes.c_void_p()
        self.check(self.lib.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()), f"cuModuleGetFunction({name})")
        return fn

    def launch(self, fn: Any, dims: list[int], shared: int, stream: int, values: list[Any]) -> None:
        params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
        gx, gy, gz, bx, by, bz = (ctypes.c_uint(d) for d in dims)
        self.check(self.lib.cuLaunchKernel(fn, gx, gy, gz, bx, by, bz, ctypes.c_uint(shared), ctypes.c_void_p(stream),
                                           params, None), "cuLaunchKernel")


@functools.lru_cache(maxsize=1)
def _driver() -> _Driver:
    return _Driver()


# ------------------------------------------------------------------------ torch.library
def device_arch(device: torch.device | None = None) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


_GENERATED: list[CudaKernel] = []


def generated_kernels() -> list[CudaKernel]:
    """Every kernel generated in this process (for source dumps)."""
    return list(_GENERATED)


PRECOMPILED: dict[str, CudaKernel] = {}


def plan_key(bits: int, group_size: int, k: int, n: int, bias: bool, gemv: bool, arch: str) -> str:
    return f"w{bits}g{group_size}_k{k}_n{n}_{'bias' if bias else 'nobias'}_{'gemv' if gemv else 'gemm'}_{arch}"


def load_plans(path: str) -> int:
    """Kernels generated elsewhere (`save_plans`): used before generating, so no TVM is needed here."""
    import json

    with open(path) as f:
        data = json.load(f)
    for key, d in data.items():
        PRECOMPILED[key] = CudaKernel.from_dict(d)
    return len(data)


def save_plans(path: str, kernels: dict[str, CudaKernel]) -> None:
    import json

    with open(path, "w") as f:
        json.dump({key: kern.to_dict() for key, kern in kernels.items()}, f)


@functools.lru_cache(maxsize=None)
def dequant_kernel(bits: int, group_size: int, k: int, n: int, bias: bool, gemv: bool, arch: str) -> CudaKernel:
    """The generated, compiled kernel for one linear_q configuration (cached per process)."""
    key = plan_key(bits, group_size, k, n, bias, gemv, arch)
    if key in PRECOMPILED:
        _GENERATED.append(PRECOMPILED[key])
        return PRECOMPILED[key]
    from .quant.tvm_kernel import dequant_matmul_primfunc

    kern = generate(dequant_matmul_primfunc(1 if gemv else None, k, n, bits=bits, group_size=group_size, bias=bias),
                    arch).compile()
    _GENERATED.append(kern)
    return kern


def linear_q_generated(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """rewrite::linear_q on CUDA through the TVM-generated kernel (fp32 in and out, like the definition)."""
    k, n = x.shape[-1], qweight.shape[0]
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    rows = x2.shape[0]
    kern = dequant_kernel(bits, group_size, k, n, bias is not None, rows == 1, device_arch(x.device))
    out = torch.empty(rows, n, device=x.device, dtype=torch.float32)
    buffers = {"x": x2, "qweight": qweight.contiguous(), "scales": scales.to(torch.float32).contiguous(),
               "zeros": zeros.contiguous(), kern.params[-1]: out}
    if bias is not None:
        buffers["bias"] = bias.to(torch.float32).contiguous()
    kern.launch(buffers, {"m": rows})
    return out.reshape(*x.shape[:-1], n)


def _linear_q_cuda(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bias: torch.Tensor | None = None, bits: int = 4, group_size: int = 128) -> torch.Tensor:
    if _generated_ok():
        try:
            return linear_q_generated(x, qweight, scales, zeros, bias, bits, group_size)
        except (CudaKernelError, ImportError) as exc:
            _disable(str(exc))
    from .quant import dequantize

    w = dequantize(qweight, scales, zeros, bits, group_size, x.shape[-1])
    y = x.to(torch.float32) @ w.T
    return y + bias if bias is not None else y


_STATE = {"ok": os.environ.get("REWRITE_CUDA_GENERATED", "1") != "0", "why": ""}


def _generated_ok() -> bool:
    return bool(_STATE["ok"])


def _disable(why: str) -> None:
    _STATE.update(ok=False, why=why)
    log.warning("generated CUDA kernels disabled, using torch ops for rewrite::linear_q: %s", why)


def _register() -> None:
    from . import quant  # noqa: F401  (defines rewrite::linear_q)

    torch.library.register_kernel("rewrite::linear_q", "cuda", _linear_q_cuda)


_register()
