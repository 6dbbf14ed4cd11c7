"""Generated TVM kernels: dequant-matmul (W4/W3/W2, group 128) at LLM shapes, and MiniLM end to end.

    python benchmarks/kernels.py                 # GPU table when TVM can run CUDA here, else CPU (llvm)
    python benchmarks/kernels.py --quick         # fewer shapes/rows (CPU smoke run)
    python benchmarks/kernels.py --skip-e2e      # kernels only

Kernels: the generated fused dequantize+matmul (GEMV for 1 row, GEMM otherwise) against torch
dense matmul on the same device (fp16 cuBLAS on GPU; fp32 on CPU, where torch has no fast
fp16 GEMM), with achieved memory bandwidth (bytes of packed weights + scales + zeros +
activations + output / time) against the device peak (GPU: the spec sheet figure for the
device, or --peak-gbs; CPU: a measured large-copy bandwidth). Timings: medians, the two
contenders interleaved (A, B, A, B, ...) because the machine is shared.

End to end: all-MiniLM-L6-v2 with neuron pruning (25%) + W4 (group 128), TVM build vs
onnxruntime on the same exported model (llvm vs the CPU provider; CUDA vs the CUDA
provider when a GPU is there).
"""
from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder comes first on sys.path, and benchmarks/token.py would shadow
# the stdlib `token` module (numpy/inspect import it): put the repository root there instead
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import statistics
import time
from typing import Any, Callable

import numpy as np
import torch


SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # K x N
ROWS = [1, 16, 128]
BITS = [4, 3, 2]
GROUP = 128
PEAK_GBS = {"H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L4": 300.0, "A10": 600.0}


def tvm_cuda_available() -> bool:
    try:
        import tvm

        return bool(tvm.cuda(0).exist)
    except Exception:  # noqa: BLE001
        return False


def interleaved(fns: list[Callable[[], Any]], repeat: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Median seconds of each fn, calls interleaved round by round."""
    times: list[list[float]] = [[] for _ in fns]
    for f in fns:  # warm up
        f()
    sync()
    for _ in range(repeat):
        for i, f in enumerate(fns):
            sync()
            t = time.perf_counter()
            f()
            sync()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def cpu_copy_bandwidth_gbs() -> float:
    """A large-copy bandwidth (read + write bytes / time), the CPU's practical peak here."""
    a = torch.empty(64 * 1024 * 1024 // 4, dtype=torch.float32).normal_()
    b = torch.empty_like(a)
    t = interleaved([lambda: b.copy_(a)], repeat=10)[0]
    return 2 * a.numel() * 4 / t / 1e9


def kernel_bytes(rows: int, k: int, n: int, bits: int, group: int) -> int:
    return n * ((k * bits + 7) // 8) + n * (k // group) * 5 + rows * k * 4 + rows * n * 4


def bench_kernels(args: argparse.Namespace) -> list[dict]:
    import tvm

    from kernels import quant
    from kernels.tvm_quant import dequant_matmul_primfunc
    from kernels.tvm_schedule import build_kernel

    gpu = tvm_cuda_available() and torch.cuda.is_available() and not args.cpu
    target = {"kind": "cuda"} if gpu else "llvm"
    dev = tvm.cuda(0) if gpu else tvm.cpu(0)
    if gpu:
        name = torch.cuda.get_device_name(0)
        peak = args.peak_gbs or next((v for k, v in PEAK_GBS.items() if k in name), 0.0)
        peak_label = f"{name} spec sheet"
    else:
        name = "CPU"
        peak = args.peak_gbs or cpu_copy_bandwidth_gbs()
        peak_label = "measured large-copy bandwidth"
    print(f"# device: {name}; peak bandwidth {peak:.0f} GB/s ({peak_label}); target {target}", flush=True)
    shapes = SHAPES[:1] + SHAPES[2:] if args.quick else SHAPES
    rows_list = [1, 16] if args.quick else ROWS
    bits_list = [4] if args.quick else BITS
    rows_out = []
    gen = torch.Generator().manual_seed(0)
    for k, n in shapes:
        for bits in bits_list:
            qv = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
            packed = quant.pack(qv, bits)
            scales = torch.rand(n, k // GROUP, generator=gen) * 0.01
            zeros = torch.full((n, k // GROUP), 1 << (bits - 1), dtype=torch.uint8)
            w_dense = quant.dequantize(packed, scales, zeros, bits, GROUP, k)
            for rows in rows_list:
                lib = build_kernel(dequant_matmul_primfunc(rows, k, n, bits=bits, group_size=GROUP), target)
                x = torch.randn(rows, k, generator=gen)
                tv = [tvm.runtime.tensor(a.numpy(), dev) for a in (x, packed, scales, zeros)]
                out = tvm.runtime.tensor(np.zeros((rows, n), np.float32), dev)
                f = lib["main"]
                if gpu:
                    xt, wt = x.half().cuda(), w_dense.half().cuda()
                    sync = torch.cuda.synchronize

                    def run_tvm() -> None:
                        f(*tv, out)
                        dev.sync()

                    t_tvm, t_ref = interleaved([run_tvm, lambda: xt @ wt.T], args.repeat, sync)
                    ref_label = "torch fp16 (cuBLAS)"
                else:
                    xt, wt = x, w_dense
                    t_tvm, t_ref = interleaved([lambda: f(*tv, out), lambda: xt @ wt.T], args.repeat)
                    ref_label = "torch fp32 (CPU)"
                got = torch.from_numpy(out.numpy())
                want = x @ w_dense.T
                rel = float((got - want).abs().max() / want.abs().max())
                gbs = kernel_bytes(rows, k, n, bits, GROUP) / t_tvm / 1e9
                row = {"bits": bits, "K": k, "N": n, "rows": rows, "kernel": "gemv" if rows == 1 else "gemm",
                       "tvm_ms": t_tvm * 1e3, "ref_ms": t_ref * 1e3, "ref": ref_label, "speedup": t_ref / t_tvm,
                       "GB/s": gbs, "peak_%": 100 * gbs / peak if peak else float("nan"), "max_rel_err": rel}
                rows_out.append(row)
                print(_fmt(row), flush=True)
    return rows_out


def _fmt(r: dict) -> str:
    return (f"| W{r['bits']} | {r['K']}x{r['N']} | {r['rows']:>3} | {r['kernel']} | {r['tvm_ms']:9.3f} | "
            f"{r['ref_ms']:9.3f} | {r['speedup']:5.2f}x | {r['GB/s']:7.1f} | {r['peak_%']:5.1f}% | {r['max_rel_err']:.1e} |")


def bench_e2e(args: argparse.Namespace) -> None:
    import tempfile

    import rewrite
    from backends.onnx import OnnxModule
    from rewrite import demo

    model, tok = demo.load_minilm()
    calib = demo.calibration_batches(tok, samples=32, batch_size=16)
    spec = {"calibration": {"samples": 32, "batch_size": 16},
            "passes": [{"kind": "prune", "granularity": "neuron", "amount": 0.25},
                       {"kind": "quantize", "weights": {"bits": 4, "group_size": 128}}]}
    compiled = rewrite.compile(model, spec, example_inputs=demo.example_inputs(tok), calibration=calib)
    batch = compiled.verification_batches()[0]
    gpu = tvm_cuda_available()
    targets = [("llvm", None)] + ([("cuda", ["CUDAExecutionProvider"])] if gpu else [])
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        compiled.export(onnx_path)
        print("\n| backend | batch | TVM ms | onnxruntime ms | ORT/TVM | TVM max rel err |")
        print("|---|---|---|---|---|---|")
        for target, provider in targets:
            built = compiled.build("tvm", target=target)
            err = built.verify([batch], rtol=1e-3)
            ort = OnnxModule(onnx_path, compiled.program, provider=provider or ["CPUExecutionProvider"])
            t_tvm, t_ort = interleaved([lambda: batch.call(built), lambda: batch.call(ort)], args.repeat)
            print(f"| TVM {target} vs ORT {'CUDA' if provider else 'CPU'} | {batch.batch_size()}x"
                  f"{batch.tensors()[0].shape[1]} | {t_tvm * 1e3:.2f} | {t_ort * 1e3:.2f} | {t_ort / t_tvm:.2f}x | {err:.1e} |")
    if not gpu:
        print("(no GPU with a CUDA-enabled TVM runtime here: CUDA rows not measured)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="W4 only, two shapes, rows 1 and 16")
    p.add_argument("--cpu", action="store_true", help="force the llvm (CPU) kernels")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--peak-gbs", type=float, default=0.0, help="device peak memory bandwidth (GB/s)")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-kernels", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    if not args.skip_kernels:
        print("| bits | KxN | rows | kernel | TVM ms | ref ms | ref/TVM | GB/s | % peak | max rel err |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        bench_kernels(args)
    if not args.skip_e2e:
        bench_e2e(args)


if __name__ == "__main__":
    main()
