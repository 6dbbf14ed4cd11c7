"""One prepared GPU run: generated CUDA kernels checked against their reference and timed vs torch fp16.

    python benchmarks/gpu.py              # on a GPU machine with TVM installed (< 8 minutes)
    python benchmarks/gpu.py --dry-run    # anywhere: generate + compile every kernel to PTX, no launch

    # prepared elsewhere, run on a GPU machine that has torch but no TVM or network:
    python benchmarks/gpu.py --dry-run --save-plans out/gpu_plans.json     # here (TVM + nvcc)
    python benchmarks/gpu.py --plans out/gpu_plans.json                    # there (torch + driver)

Steps (each prints one line; a failed step says what is missing and the script exits non-zero):
1. requirements: torch with CUDA, apache-tvm (>= 0.27, the PyPI wheel: no CUDA runtime needed),
   numpy, and nvcc (or cuda-python for NVRTC). Missing Python packages are pip-installed
   (`--no-install` to skip); torch is installed first as `torch` from PyPI (the CUDA build).
2. correctness: every generated kernel (W4/W3/W2/W8 g128; GEMV for 1 row, GEMM for more) at
   the benchmark shapes against the op's definition computed on the GPU in fp32
   (max relative error < 1e-4), and `torch.ops.rewrite.linear_q` on CUDA tensors (the
   torch.library CUDA implementation that launches the generated kernel) against the same.
3. the kernel table: W4/W3/W2 g128 at K x N = 4096x4096 and 4096x11008, rows 1/16/128:
   generated kernel vs torch fp16 matmul (cuBLAS) on the dequantized weights, medians of CUDA-
   event timings interleaved, achieved bandwidth (packed weights + scales + zeros + fp32
   activations + fp32 output bytes / time) against the device's peak (spec sheet by name,
   else a measured device-to-device copy; `--peak-gbs` overrides).

Kernels are TVM's (dlight gpu rules), compiled with nvcc and launched through the CUDA driver
by kernels/cuda_runtime.py; no CUDA-enabled TVM is involved.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the repo root, not benchmarks/ (token.py)

import argparse
import importlib
import os
import statistics
import subprocess
import time
from typing import Any, Callable

SHAPES = [(4096, 4096), (4096, 11008)]  # K x N
ROWS = [1, 16, 128]
TABLE_BITS = [4, 3, 2]
CHECK_BITS = [4, 3, 2, 8]
GROUP = 128
PEAK_GBS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100-PCIE-80GB": 1935.0,
            "A100": 1555.0, "L40S": 864.0, "L4": 300.0, "A10G": 600.0, "A10": 600.0, "RTX 4090": 1008.0}


def step(msg: str) -> None:
    print(f"[gpu.py {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ensure(args: argparse.Namespace) -> None:
    """Import what the run needs; pip-install what is missing (torch first, then TVM)."""
    wanted = [("torch", "torch"), ("numpy", "numpy")] + ([] if args.plans else [("tvm", "apache-tvm>=0.27")])
    for module, spec in wanted:
        try:
            importlib.import_module(module)
        except ImportError:
            if args.no_install:
                sys.exit(f"missing Python package {spec!r} (run without --no-install to pip-install it)")
            step(f"installing {spec}")
            res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", spec], capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"pip install {spec} failed (no network?): {res.stderr.strip()[-500:]}")
            importlib.invalidate_caches()
            importlib.import_module(module)
    import torch

    from rewrite.kernels.cuda_runtime import nvcc_path

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit(f"torch {torch.__version__} sees no CUDA device (a CPU-only torch, or no GPU): use --dry-run")
    compiler = nvcc_path()
    if args.plans:
        from rewrite.kernels.cuda_runtime import load_plans

        step(f"loaded {load_plans(args.plans)} precompiled kernels from {args.plans} (no TVM or compiler needed)")
        compiler = compiler or "none needed (plans)"
    elif compiler is None:
        try:
            importlib.import_module("cuda.bindings.nvrtc")
            compiler = "NVRTC (cuda-python)"
        except ImportError:
            if args.no_install:
                sys.exit("no nvcc and no cuda-python: install the CUDA toolkit or `pip install cuda-python`")
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "cuda-python"], check=False)
            compiler = "NVRTC (cuda-python)"
    step(f"torch {torch.__version__}, CUDA device: "
         f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (dry run)'}; compiler: {compiler}")


def make_weights(k: int, n: int, bits: int, seed: int) -> tuple[Any, Any, Any]:
    import torch

    from rewrite.kernels import quant

    gen = torch.Generator().manual_seed(seed)
    qv = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
    packed = quant.pack(qv, bits)
    scales = torch.rand(n, k // GROUP, generator=gen) * 0.01 + 0.001
    zeros = torch.randint(0, 1 << bits, (n, k // GROUP), generator=gen, dtype=torch.uint8)
    return packed, scales, zeros


def events_interleaved(fns: list[Callable[[], Any]], repeat: int) -> list[float]:
    """Median seconds per call of each fn (CUDA events), calls interleaved round by round."""
    import torch

    for f in fns:
        f()
    torch.cuda.synchronize()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, f in enumerate(fns):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            f()
            end.record()
            end.synchronize()
            times[i].append(start.elapsed_time(end) / 1e3)
    return [statistics.median(t) for t in times]


def peak_bandwidth(override: float) -> tuple[float, str]:
    import torch

    if override:
        return override, "given"
    name = torch.cuda.get_device_name(0)
    for key, val in PEAK_GBS.items():
        if key in name:
            return val, f"{name} spec sheet"
    a = torch.empty(256 * 1024 * 1024 // 4, device="cuda")
    b = torch.empty_like(a)
    t = events_interleaved([lambda: b.copy_(a)], 20)[0]
    return 2 * a.numel() * 4 / t / 1e9, f"{name} measured device copy"


def kernel_bytes(rows: int, k: int, n: int, bits: int) -> int:
    return n * ((k * bits + 7) // 8) + n * (k // GROUP) * 5 + rows * k * 4 + rows * n * 4


def dry_run(args: argparse.Namespace) -> None:
    """Everything that needs no GPU: generate and compile every kernel, show its launches, save plans."""
    from rewrite.kernels.cuda_runtime import evaluate, generate, plan_key, save_plans
    from rewrite.kernels.quant.tvm_kernel import dequant_matmul_primfunc

    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    plans = {}
    for k, n in SHAPES:
        for bits in sorted(set(TABLE_BITS + CHECK_BITS)):
            for rows in (1, None):
                for arch in archs:
                    t = time.perf_counter()
                    kern = generate(dequant_matmul_primfunc(rows, k, n, bits=bits, group_size=GROUP), arch).compile()
                    plans[plan_key(bits, GROUP, k, n, False, rows == 1, arch)] = kern
                    plan = "; ".join(f"{ln.name} grid={[evaluate(e, {'m': 16}) for e in ln.grid]} "
                                     f"block={[evaluate(e, {'m': 16}) for e in ln.block]}" for ln in kern.launches)
                    step(f"W{bits} {k}x{n} {'gemv' if rows == 1 else 'gemm'}: PTX {len(kern.ptx or b'')} bytes for "
                         f"{arch} in {time.perf_counter() - t:.1f}s; {plan}")
    if args.save_plans:
        Path(args.save_plans).parent.mkdir(parents=True, exist_ok=True)
        save_plans(args.save_plans, plans)
        step(f"wrote {len(plans)} kernel plans to {args.save_plans} ({Path(args.save_plans).stat().st_size / 1e6:.1f} MB)")


def run(args: argparse.Namespace) -> int:
    import torch

    from rewrite.kernels import quant
    from rewrite.kernels.cuda_runtime import device_arch, linear_q_generated

    arch = device_arch()
    peak, peak_label = peak_bandwidth(args.peak_gbs)
    step(f"device {torch.cuda.get_device_name(0)} ({arch}); peak bandwidth {peak:.0f} GB/s ({peak_label})")
    failures = 0
    table = []
    dev = torch.device("cuda")
    for k, n in SHAPES:
        for bits in CHECK_BITS:
            packed, scales, zeros = make_weights(k, n, bits, seed=bits * 7 + n)
            pc, sc, zc = packed.to(dev), scales.to(dev), zeros.to(dev)
            w32 = quant.dequantize(pc, sc, zc, bits, GROUP, k)
            w16 = w32.half()
            for rows in ROWS:
                x = torch.randn(rows, k, device=dev, generator=torch.Generator(device=dev).manual_seed(rows))
                t0 = time.perf_counter()
                try:
                    got = linear_q_generated(x, pc, sc, zc, None, bits, GROUP)
                    torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 - report every kernel, then fail the run
                    failures += 1
                    step(f"check W{bits} {k}x{n} rows {rows}: FAIL {type(exc).__name__}: {str(exc)[:400]}")
                    continue
                first = time.perf_counter() - t0
                want = x @ w32.T
                err = float((got - want).abs().max() / want.abs().max())
                via_op = torch.ops.rewrite.linear_q(x, pc, sc, zc, None, bits, GROUP)
                err_op = float((via_op - want).abs().max() / want.abs().max())
                ok = err < 1e-4 and err_op < 1e-4
                failures += not ok
                step(f"check W{bits} {k}x{n} rows {rows}: max rel err {err:.1e} (op {err_op:.1e}) "
                     f"{'PASS' if ok else 'FAIL'} (generate+compile+first run {first:.1f}s)")
                if bits not in TABLE_BITS:
                    continue
                x16 = x.half()
                t_gen, t_fp16 = events_interleaved(
                    [lambda: linear_q_generated(x, pc, sc, zc, None, bits, GROUP), lambda: x16 @ w16.T], args.repeat)
                gbs = kernel_bytes(rows, k, n, bits) / t_gen / 1e9
                table.append((bits, k, n, rows, t_gen, t_fp16, gbs, 100 * gbs / peak, err))
    print("\n| bits | KxN | rows | generated ms | torch fp16 ms | fp16/generated | GB/s | % peak | max rel err |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for bits, k, n, rows, tg, tf, gbs, pct, err in table:
        print(f"| W{bits} g{GROUP} | {k}x{n} | {rows} | {tg * 1e3:.4f} | {tf * 1e3:.4f} | {tf / tg:.2f}x | "
              f"{gbs:.0f} | {pct:.0f}% | {err:.1e} |")
    w4_1 = [r for r in table if r[0] == 4 and r[3] == 1]
    w_16 = [r for r in table if r[3] == 16]
    if w4_1:
        print(f"\ntargets: W4 1 row >= 70% peak: {'met' if all(r[7] >= 70 for r in w4_1) else 'NOT met'}; "
              f">= 2.5x fp16: {'met' if all(r[5] / r[4] >= 2.5 for r in w4_1) else 'NOT met'}; "
              f"16 rows never slower than fp16: {'met' if all(r[5] >= r[4] for r in w_16) else 'NOT met'}")
    print(f"correctness: {'all kernels PASS' if not failures else f'{failures} FAILED'}")
    return 1 if failures else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="no GPU: generate and compile every kernel only")
    p.add_argument("--archs", default="sm_80,sm_90", help="architectures for --dry-run (comma-separated)")
    p.add_argument("--save-plans", default="", help="--dry-run: write the compiled kernels + launch plans (JSON)")
    p.add_argument("--plans", default="", help="run the kernels from a --save-plans file (no TVM/nvcc needed)")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--peak-gbs", type=float, default=0.0)
    p.add_argument("--no-install", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("REWRITE_CUDA_GENERATED", "1")
    start = time.perf_counter()
    ensure(args)
    if args.dry_run:
        dry_run(args)
        code = 0
    else:
        code = run(args)
    step(f"done in {time.perf_counter() - start:.0f}s")
    sys.exit(code)


if __name__ == "__main__":
    main()
