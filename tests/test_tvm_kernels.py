"""Generated TensorIR kernels (llvm) against the ops' definitions; CUDA code generation for every op."""
from __future__ import annotations

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from rewrite.kernels import quant  # noqa: E402
from rewrite.kernels.token import keep_count, token_select  # noqa: E402
from rewrite.kernels.quant.tvm_kernel import dequant_matmul_primfunc  # noqa: E402
from rewrite.kernels.tvm_schedule import build_kernel, kernel_source, schedule_llvm  # noqa: E402
from rewrite.kernels.token.tvm_kernel import token_select_primfunc  # noqa: E402


def _np_dequant(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, g: int, k: int) -> np.ndarray:
    """Our own reading of the definition: bit stream per row, value k at bits [k*bits, (k+1)*bits)."""
    bitstream = np.unpackbits(packed, axis=1, bitorder="little")[:, : k * bits].reshape(packed.shape[0], k, bits)
    q = (bitstream.astype(np.int64) << np.arange(bits)).sum(-1)
    grp = np.arange(k) // g
    return ((q - zeros[:, grp].astype(np.int64)) * scales[:, grp].astype(np.float64)).astype(np.float64)


def _run_dequant(bits: int, g: int, m: int | None, rows: int, k: int, n: int, bias: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    lib = build_kernel(dequant_matmul_primfunc(m, k, n, bits=bits, group_size=g, bias=bias), "llvm")
    x = torch.randn(rows, k, generator=gen)
    qv = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    packed = quant.pack(qv, bits)
    scales = torch.rand(n, k // g, generator=gen) * 0.1 + 0.01
    zeros = torch.randint(0, 1 << bits, (n, k // g), generator=gen, dtype=torch.uint8)
    b = torch.randn(n, generator=gen)
    args = [x, packed, scales, zeros] + ([b] if bias else [])
    out = tvm.runtime.tensor(np.zeros((rows, n), np.float32))
    lib["main"](*[tvm.runtime.tensor(a.numpy()) for a in args], out)
    got = out.numpy().astype(np.float64)
    # 1. our own numpy reading of the packing
    w = _np_dequant(packed.numpy(), scales.numpy(), zeros.numpy(), bits, g, k)
    want = x.numpy().astype(np.float64) @ w.T + (b.numpy() if bias else 0.0)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 2e-6
    # 2. the op's torch reference
    ref = torch.ops.rewrite.linear_q(x, packed, scales, zeros, b if bias else None, bits, g).numpy()
    assert np.abs(got - ref).max() / scale < 2e-6


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
def test_dequant_gemv_matches_reference(bits: int, group_size: int) -> None:
    _run_dequant(bits, group_size, m=1, rows=1, k=128, n=24, bias=group_size == 32, seed=bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [21, 22])
def test_dequant_gemv_grouped_form_any_channel_count(bits: int, n: int) -> None:
    # several vector steps per group, 4 groups, N not a multiple of the 4-channel step (21: 1, 22: 2)
    _run_dequant(bits, 128, m=1, rows=1, k=512, n=n, bias=n == 21, seed=20 + bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64])
def test_dequant_gemm_symbolic_rows_matches_reference(bits: int, group_size: int) -> None:
    # K=192 is not a multiple of 8 bytes for 3 bits: values straddle bytes, last byte partial
    _run_dequant(bits, group_size, m=None, rows=5, k=192, n=20, bias=group_size == 64, seed=10 + bits)


def test_packing_agrees_with_hand_computation() -> None:
    # 3-bit values 5, 3, 7 -> bits 101 110 111 (little-endian stream): byte0 = 0b11011101, byte1 = 0b1
    packed = quant.pack(torch.tensor([[5, 3, 7]], dtype=torch.uint8), 3)
    assert packed.tolist() == [[0b11011101, 0b1]]
    w = _np_dequant(packed.numpy(), np.array([[2.0]]), np.array([[4]]), 3, 3, 3)
    assert w.tolist() == [[2.0, -2.0, 6.0]]


@pytest.mark.parametrize("B,S,keep,first,last,symbolic", [
    (2, 12, 0.5, 1, 0, False), (3, 17, 0.7, 1, 1, True), (1, 9, 0.3, 2, 2, False), (2, 100, 0.07, 0, 0, True),
])
def test_token_select_matches_reference(B: int, S: int, keep: float, first: int, last: int, symbolic: bool) -> None:
    gen = torch.Generator().manual_seed(S)
    scores = torch.round(torch.randn(B, S, generator=gen) * 2) / 2  # many ties
    scores[-1, -3:] = float("-inf")  # padding
    scores[0, min(S - 1, 4)] = float("inf")
    lib = build_kernel(token_select_primfunc(None if symbolic else B, None if symbolic else S, keep=keep,
                                             keep_first=first, keep_last=last), "llvm")
    k = keep_count(S, keep, first, last)
    out = tvm.runtime.tensor(np.zeros((B, k), np.int64))
    lib["main"](tvm.runtime.tensor(scores.numpy()), out)
    assert torch.equal(torch.from_numpy(out.numpy()), token_select(scores, keep, first, last))


def _cuda_kernels():
    for bits in (2, 3, 4, 8):
        yield f"w{bits}_gemv", dequant_matmul_primfunc(1, 256, 64, bits=bits, group_size=64)
        yield f"w{bits}_gemm", dequant_matmul_primfunc(None, 256, 64, bits=bits, group_size=128, bias=True)
    yield "token_select", token_select_primfunc(None, None, keep=0.5, keep_first=1)


def test_cuda_code_generation_for_every_kernel() -> None:
    for name, func in _cuda_kernels():
        src = kernel_source(build_kernel(func, {"kind": "cuda", "arch": "sm_90"}))
        assert "__global__" in src, name


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [1, None])
def test_llvm_schedule_applies_and_vectorises(bits: int, rows: int | None) -> None:
    """The schedule itself must apply (schedule_kernels would fall back to the plain loop nest silently)."""
    func = schedule_llvm(dequant_matmul_primfunc(rows, 512, 32, bits=bits, group_size=128, bias=True))
    text = func.script()
    assert "T.parallel" in text
    if rows is None:  # many rows: decoded slice + register-tiled outer product, any bit width
        assert "T.vectorized" in text and ("matmul_local" in text or "matmul_pad_local" in text)
        assert "x_pad" in text  # a symbolic row count is padded to whole register tiles
    elif bits != 3:  # one row: packed-byte lanes, per-group partial sums in registers (3-bit: scalar)
        assert "T.vectorized" in text and "group_dot_local" in text and "scaled_sum_local" in text


def test_cpu_threads_default_to_physical_cores_and_respect_env() -> None:
    """TVM halves the CPU count on x86 (assumed SMT); the backend sizes the pool to physical cores."""
    import os
    import subprocess
    import sys

    from rewrite.kernels.tvm_target import physical_cores

    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
    code = ("import tvm; from rewrite.kernels.tvm_target import configure_cpu_threads as c; n = c(); "
            "print(n, tvm.get_global_func('runtime.NumThreads')())")
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(physical_cores())] * 2
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.split()[0] == "1"
