"""Generated CUDA kernels without a GPU: every kernel's source compiles to PTX (sm_80, sm_90) and its launch plan resolves.

On a GPU machine `benchmarks/gpu.py` runs and times the same kernels; here (CI, no GPU) we
check what can be checked without one: TVM's CUDA source for each kernel is valid CUDA for
both architectures (nvcc), and every launch argument is a buffer of the kernel's signature or
a shape variable, with grid/block extents computable from concrete shapes.
"""
from __future__ import annotations

import pytest

tvm = pytest.importorskip("tvm")

from rewrite.kernels.cuda_runtime import CudaKernelError, compile_ptx, evaluate, generate, kernel_param_types, nvcc_path  # noqa: E402
from rewrite.kernels.quant.tvm_kernel import dequant_matmul_primfunc  # noqa: E402
from rewrite.kernels.token.tvm_kernel import token_select_primfunc  # noqa: E402

KERNELS = {
    **{f"w{b}_gemv": (lambda b=b: dequant_matmul_primfunc(1, 512, 64, bits=b, group_size=128)) for b in (2, 3, 4, 8)},
    **{f"w{b}_gemm": (lambda b=b: dequant_matmul_primfunc(None, 512, 64, bits=b, group_size=128, bias=True))
       for b in (2, 3, 4, 8)},
    "token_select": lambda: token_select_primfunc(None, None, keep=0.5, keep_first=1),
}
WORKSPACE = {"token_select": {"rank", "slot"}}  # intermediate buffers the host code allocates


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_source_compiles_to_ptx_and_launch_plan_resolves(name: str) -> None:
    kern = generate(KERNELS[name](), "sm_90")
    assert "__global__" in kern.source
    types = kernel_param_types(kern.source)
    shapes = {"m": 16, "b": 2, "s": 40}
    for ln in kern.launches:
        assert ln.name in types, f"launch of {ln.name} has no kernel in the source"
        assert len(types[ln.name]) == len(ln.args)
        for (kind, what), ty in zip(ln.args, types[ln.name]):
            assert (kind == "buffer") == (ty == "ptr"), (ln.name, what, ty)
            if kind == "buffer":
                assert what in kern.params or what in WORKSPACE.get(name, set()), (ln.name, what)
        dims = [evaluate(e, shapes) for e in ln.grid + ln.block]
        assert all(d >= 1 for d in dims) and dims[3] * dims[4] * dims[5] <= 1024
    if nvcc_path() is None:
        pytest.skip("nvcc not found (install the CUDA toolkit or put nvcc on PATH): PTX compilation not checked")
    for arch in ("sm_80", "sm_90"):
        ptx = compile_ptx(kern.source, arch).decode()
        assert f".target {arch}" in ptx
        for ln in kern.launches:
            assert f".entry {ln.name}(" in ptx


def test_launch_extent_needs_its_shape() -> None:
    kern = generate(KERNELS["w4_gemm"](), "sm_90")
    with pytest.raises(CudaKernelError, match="'m'"):
        [evaluate(e, {}) for ln in kern.launches for e in ln.grid]


def test_linear_q_has_a_cuda_implementation() -> None:
    import torch

    assert torch._C._dispatch_has_kernel_for_dispatch_key("rewrite::linear_q", "CUDA")


def test_saved_plan_runs_without_tvm_expressions() -> None:
    """A plan saved for a TVM-less GPU machine evaluates its launches exactly like the TIR original."""
    from rewrite.kernels.cuda_runtime import CudaKernel, expr_text

    kern = generate(KERNELS["w4_gemm"](), "sm_90")
    kern.ptx = b"// not compiled in this test"
    again = CudaKernel.from_dict(kern.to_dict())
    for m in (1, 7, 544):
        for a, b in zip(kern.launches, again.launches):
            assert [evaluate(e, {"m": m}) for e in a.grid + a.block] == [evaluate(e, {"m": m}) for e in b.grid + b.block]
            assert [k for k, _ in a.args] == [k for k, _ in b.args]
    with pytest.raises(CudaKernelError):
        evaluate("__import__('os')", {})
    assert expr_text(kern.launches[0].grid[0]) == again.launches[0].grid[0]


def test_gpu_benchmark_dry_run_saves_plans_that_load(tmp_path, monkeypatch) -> None:
    """benchmarks/gpu.py --dry-run (what a GPU machine without TVM/nvcc runs from): every kernel
    generated, compiled and saved; the plans load back. One small shape here, the script's
    own shapes on a GPU."""
    import argparse
    import importlib.util
    import sys
    from pathlib import Path

    from rewrite.kernels import cuda_runtime

    if nvcc_path() is None:
        pytest.skip("nvcc not found: PTX compilation not checked")
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    gpu = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the repo root first
    spec.loader.exec_module(gpu)
    monkeypatch.setattr(gpu, "SHAPES", [(256, 64)])
    monkeypatch.setattr(gpu, "GROUP", 128)
    monkeypatch.setattr(gpu, "TABLE_BITS", [4])
    monkeypatch.setattr(gpu, "CHECK_BITS", [3])
    out = tmp_path / "plans.json"
    gpu.dry_run(argparse.Namespace(archs="sm_90", save_plans=str(out)))
    bits = sorted(set(gpu.TABLE_BITS + gpu.CHECK_BITS))
    monkeypatch.setattr(cuda_runtime, "PRECOMPILED", {})
    assert cuda_runtime.load_plans(str(out)) == len(bits) * 2  # GEMV + GEMM per bit width
    for b in bits:
        for gemv in (True, False):
            kern = cuda_runtime.PRECOMPILED[cuda_runtime.plan_key(b, 128, 256, 64, False, gemv, "sm_90")]
            assert kern.ptx and kern.launches
