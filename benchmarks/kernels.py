"""Generated TVM kernels on CPU (llvm): W4 g128 dequant-matmul vs torch fp32 and onnxruntime's MatMulNBits; MiniLM end to end.

    python benchmarks/kernels.py                 # W4 at 4096x4096 and 4096x11008, rows 1 and 16, + MiniLM
    python benchmarks/kernels.py --bits 4 3 2    # more bit widths (MatMulNBits: 4 bits only here)
    python benchmarks/kernels.py --skip-e2e      # kernels only
    python benchmarks/kernels.py --overhead      # cost of a thread-pool launch -> kernels.tvm_parallel.SERIAL_BELOW

Kernels: the generated fused dequantize+matmul (GEMV for 1 row, GEMM otherwise), against
torch fp32 dense matmul on the dequantized weights and against onnxruntime's
com.microsoft::MatMulNBits (a one-node model on the same packed weights, scales and zero
points; accuracy_level 0 = fp32 compute, the same numerics), all with 2 threads (`--threads`;
TVM's pool is sized explicitly: by default TVM takes half the logical CPUs on x86). Achieved
bandwidth = bytes of packed weights + scales + zeros + activations + output / time. Timings are
medians with the contenders interleaved (A, B, C, A, B, C, ...) because the machine is shared:
compare the ratios, not the milliseconds. No runtime spins idle threads (see below). On a
shared machine take the timing lock around each timed section (building stays outside it):

    python benchmarks/kernels.py --lock /work/wt/_notes/timing.lock

End to end: all-MiniLM-L6-v2 with neuron pruning (25%) + W4 (group 128), the TVM llvm build
(our kernels; dlight cpu rules and our RowWise / CpuGeneric rules for the rest; gelu with
fast_erf) vs onnxruntime on the same exported model, then where TVM's time goes per function
and which code runs it (generated, or a fallback to a library op: none today). GPU kernels:
benchmarks/gpu.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this folder comes first on sys.path, and benchmarks/token.py would shadow
# the stdlib `token` module (numpy/inspect import it): put the repository root there instead
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import os
import statistics
import time
from typing import Any, Callable

# Three runtimes share 2 cores here (torch's OpenMP, onnxruntime's and TVM's thread pools), and
# by default each keeps its idle workers spinning (TVM's yield in a loop) after a parallel
# region. Interleaved, the next contender's timed call then competes with those workers
# (measured: TVM's GEMV 9 ms alone, 20 ms right after an onnxruntime call; eager torch 12 s
# instead of 0.34 s after TVM). So by default no runtime spins (set here, before torch and TVM
# start their pools, and in onnxruntime's session options): nothing runs between the calls.
# `--spin` keeps each runtime's default and pauses `--gap` seconds before every timed call
# instead; TVM's yielding workers may still be awake then, which can favour TVM.
SPIN = "1" if "--spin" in sys.argv else "0"
if SPIN == "0":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import numpy as np
import torch

from benchmarks.timing_lock import timing_lock


SHAPES = [(4096, 4096), (4096, 11008)]  # K x N
ROWS = [1, 16]
GROUP = 128


def interleaved(fns: list[Callable[[], Any]], repeat: int, sync: Callable[[], None] = lambda: None,
                gap: float = 0.0, stat: Callable[[list[float]], float] = statistics.median) -> list[float]:
    """Median (or `stat`) seconds of each fn, calls interleaved round by round, `gap` seconds before each call."""
    times: list[list[float]] = [[] for _ in fns]
    for f in fns:  # warm up
        f()
    sync()
    for _ in range(repeat):
        for i, f in enumerate(fns):
            sync()
            if gap:
                time.sleep(gap)
            t = time.perf_counter()
            f()
            sync()
            times[i].append(time.perf_counter() - t)
    return [stat(t) for t in times]


def kernel_bytes(rows: int, k: int, n: int, bits: int, group: int) -> int:
    return n * ((k * bits + 7) // 8) + n * (k // group) * 5 + rows * k * 4 + rows * n * 4


def matmulnbits_session(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int, bits: int,
                        group: int, threads: int = 2) -> Any:
    """A one-node onnxruntime session: y = MatMulNBits(x, packed weights, scales, zero points)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n, ngroups = scales.shape
    blob = group * bits // 8
    b = numpy_helper.from_array(packed.numpy().reshape(n, ngroups, blob).astype(np.uint8), "B")
    s = numpy_helper.from_array(scales.numpy().astype(np.float32).reshape(-1), "scales")
    z = zeros.numpy().astype(np.uint8)
    if bits == 4:  # two 4-bit zero points per byte, low nibble first, rows padded to whole bytes
        z = np.concatenate([z, np.zeros((n, ngroups % 2), np.uint8)], axis=1)
        z = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
    zp = numpy_helper.from_array(z.reshape(-1), "zero_points")
    node = helper.make_node("MatMulNBits", ["x", "B", "scales", "zero_points"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=group, accuracy_level=0)
    graph = helper.make_graph([node], "mmnb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], [b, s, zp])
    model = helper.make_model(graph, ir_version=10,
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", SPIN)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def bench_overhead(args: argparse.Namespace) -> float:
    """What a parallel loop costs on llvm beyond its work: y = 2x + 1 (vectorised) over n floats,
    serially and as a parallel loop, interleaved; the break-even work of `kernels.tvm_parallel`.
    Means, not medians: the rare slow launch (a worker not yet running when the caller is done
    and yields its core to another process) is part of what a parallel loop costs on average.

    The break-even is where the parallel loop first beats the serial one (the geometric middle
    of the last size it lost at and the first it won at, in units of `nest_work`): what
    `SERIAL_BELOW` is set from. For comparison it also prints the linear model's O T / ((T - 1) c)
    (O: parallel minus serial time at the smallest n, a launch of the thread pool; c: serial
    seconds per work unit), which assumes the threads scale perfectly; memory-bound loops do
    not, so the measured break-even lies above it."""
    import tvm
    from tvm import s_tir, te

    from tvm.sym.analyzer import Analyzer

    from rewrite.kernels.tvm_parallel import nest_work
    from rewrite.kernels.tvm_target import make_target

    target = make_target("llvm")

    def build(n: int, parallel: bool) -> tuple[Any, int]:
        a = te.placeholder((n,), "float32", name="a")
        b = te.compute((n,), lambda i: a[i] * 2.0 + 1.0, name="b")
        sch = s_tir.Schedule(te.create_prim_func([a, b]))
        io, ii = sch.split(sch.get_loops(sch.get_sblock("b"))[0], [None, 16])
        sch.vectorize(ii)
        if parallel:
            sch.parallel(io)
        return tvm.compile(sch.mod, target=target)["main"], int(Analyzer().simplify(nest_work(sch.mod["main"].body)).value)

    print("| n floats | work units | serial us (mean) | parallel us (mean) | parallel / serial |")
    print("|---:|---:|---:|---:|---:|")
    rows = []
    for n in [4096] + [1 << e for e in range(15, 23)]:
        (fs, work), (fp, _) = build(n, False), build(n, True)
        a = tvm.runtime.tensor(np.random.rand(n).astype("float32"))
        b = tvm.runtime.tensor(np.zeros(n, "float32"))
        with timing_lock(args.lock):
            ts, tp = interleaved([lambda: fs(a, b), lambda: fp(a, b)], max(50, args.repeat * 10), stat=statistics.fmean)
        rows.append((n, work, ts, tp))
        print(f"| {n} | {work} | {ts * 1e6:.1f} | {tp * 1e6:.1f} | {tp / ts:.2f} |", flush=True)
    launch = rows[0][3] - rows[0][2]
    per_unit = rows[-1][2] / rows[-1][1]
    threads = max(2, args.threads)
    model = launch * threads / ((threads - 1) * per_unit)
    wins = [i for i, r in enumerate(rows) if r[3] < r[2]]
    first = wins[0] if wins else None
    measured = (rows[first][1] * rows[first - 1][1]) ** 0.5 if first else float("nan")
    print(f"\nlaunch overhead {launch * 1e6:.1f} us, serial cost {per_unit * 1e9:.3f} ns per work unit, {threads} "
          f"threads; linear model: parallel pays off above {model:,.0f} work units; measured: above "
          f"{measured:,.0f} (kernels.tvm_parallel.SERIAL_BELOW)")
    return measured


def bench_kernels(args: argparse.Namespace) -> list[dict]:
    import tvm

    from rewrite.kernels import quant
    from rewrite.kernels.quant.tvm_kernel import dequant_matmul_primfunc
    from rewrite.kernels.tvm_schedule import build_kernel

    dev = tvm.cpu(0)
    print("| bits | KxN | rows | kernel | TVM ms | torch fp32 ms | MatMulNBits ms | torch/TVM | MatMulNBits/TVM | TVM GB/s | max rel err |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    rows_out = []
    gen = torch.Generator().manual_seed(0)
    for k, n in SHAPES:
        for bits in args.bits:
            qv = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.uint8)
            packed = quant.pack(qv, bits)
            scales = torch.rand(n, k // GROUP, generator=gen) * 0.01
            zeros = torch.randint(0, 1 << bits, (n, k // GROUP), generator=gen, dtype=torch.uint8)
            w_dense = quant.dequantize(packed, scales, zeros, bits, GROUP, k)
            sess = matmulnbits_session(packed, scales, zeros, k, bits, GROUP, args.threads) if bits == 4 else None
            for rows in args.rows:
                lib = build_kernel(dequant_matmul_primfunc(rows, k, n, bits=bits, group_size=GROUP), "llvm")
                x = torch.randn(rows, k, generator=gen)
                tv = [tvm.runtime.tensor(a.numpy(), dev) for a in (x, packed, scales, zeros)]
                out = tvm.runtime.tensor(np.zeros((rows, n), np.float32), dev)
                f = lib["main"]
                xn = x.numpy()
                fns = [lambda: f(*tv, out), lambda: x @ w_dense.T]
                if sess is not None:
                    fns.append(lambda: sess.run(None, {"x": xn}))
                with timing_lock(args.lock):
                    times = interleaved(fns, args.repeat, gap=args.gap if args.spin else 0.0)
                t_tvm, t_ref = times[0], times[1]
                t_nb = times[2] if sess is not None else float("nan")
                want = x @ w_dense.T
                got = torch.from_numpy(out.numpy())
                rel = float((got - want).abs().max() / want.abs().max())
                if sess is not None:
                    nb = torch.from_numpy(sess.run(None, {"x": xn})[0])
                    assert float((nb - want).abs().max() / want.abs().max()) < 1e-4, "MatMulNBits weights differ"
                row = {"bits": bits, "K": k, "N": n, "rows": rows, "kernel": "gemv" if rows == 1 else "gemm",
                       "tvm_ms": t_tvm * 1e3, "ref_ms": t_ref * 1e3, "nb_ms": t_nb * 1e3, "vs_torch": t_ref / t_tvm,
                       "vs_nb": t_nb / t_tvm, "GB/s": kernel_bytes(rows, k, n, bits, GROUP) / t_tvm / 1e9,
                       "max_rel_err": rel}
                rows_out.append(row)
                print(_fmt(row), flush=True)
    return rows_out


def _fmt(r: dict) -> str:
    return (f"| W{r['bits']} g{GROUP} | {r['K']}x{r['N']} | {r['rows']} | {r['kernel']} | {r['tvm_ms']:.3f} | "
            f"{r['ref_ms']:.3f} | {r['nb_ms']:.3f} | {r['vs_torch']:.2f}x | {r['vs_nb']:.2f}x | {r['GB/s']:.1f} | "
            f"{r['max_rel_err']:.1e} |")


def ort_session(path: Path, threads: int = 2) -> Any:
    """onnxruntime CPU session with `threads` threads (spinning: see the note at the top)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", SPIN)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def profile_ops(built: Any, batch: Any, repeat: int) -> list[tuple[str, int, float, str]]:
    """(PrimFunc, calls per run, ms per run, what runs it) for every function the Relax VM calls.

    Times each call through the VM's instrument hook; "what runs it" comes from the scheduled
    IRModule: our generated kernel (rewrite.kernel), the schedule rule that scheduled it
    (rewrite.schedule: dlight's or ours), or a VM builtin / library call (no generated code).
    """
    import collections

    import tvm
    from tvm import relax

    from rewrite.kernels.tvm_schedule import KERNEL_ATTR, SCHEDULE_ATTR
    from rewrite.inputs import Inputs

    how: dict[str, str] = {}
    for gv, func in built.ir.functions_items():
        attrs = func.attrs if func.attrs is not None else {}
        if KERNEL_ATTR in attrs:
            how[gv.name_hint] = f"generated: our kernel {attrs[KERNEL_ATTR]}"
        elif SCHEDULE_ATTR in attrs:
            how[gv.name_hint] = f"generated: {attrs[SCHEDULE_ATTR]}"
        elif isinstance(func, tvm.tirx.PrimFunc):
            how[gv.name_hint] = "generated: unscheduled loop nest"
    flat = [x for x in built.program.flat_inputs(Inputs.of(batch)) if isinstance(x, torch.Tensor)]
    feeds = [tvm.runtime.tensor(x.detach().contiguous().numpy(), built.device) for x in flat]
    vm = relax.VirtualMachine(built.executable, built.device)
    total: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    start: dict[str, float] = {}

    def hook(func: Any, name: str, before: bool, ret: Any, *args: Any) -> int:
        if before:
            start[name] = time.perf_counter()
        else:
            total[name] += time.perf_counter() - start[name]
            calls[name] += 1
        return 0

    vm["main"](*feeds)
    vm.set_instrument(hook)
    for _ in range(repeat):
        vm["main"](*feeds)
    return sorted(((n, calls[n] // repeat, t / repeat * 1e3, how.get(n, "VM builtin (no kernel)"))
                   for n, t in total.items()), key=lambda r: -r[2])


def bench_e2e(args: argparse.Namespace) -> None:
    """MiniLM (25% FFN neurons pruned + W4 g128): TVM llvm build vs onnxruntime CPU on the same rewritten model."""
    import tempfile

    import rewrite
    from rewrite.backends.onnx import OnnxModule
    from rewrite import demo

    model, tok = demo.load_minilm()
    calib = demo.calibration_batches(tok, samples=32, batch_size=16)
    spec = {"calibration": {"samples": 32, "batch_size": 16},
            "passes": [{"kind": "prune", "granularity": "neuron", "amount": 0.25},
                       {"kind": "quantize", "weights": {"bits": 4, "group_size": 128}}]}
    compiled = rewrite.compile(model, spec, example_inputs=demo.example_inputs(tok), calibration=calib)
    batch = compiled.verification_batches()[0]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        compiled.export(onnx_path)
        built = compiled.build("tvm", target="llvm")
        err = built.verify([batch], rtol=1e-3)
        # the same build with every parallel loop kept parallel (kernels.tvm_parallel off), for comparison
        every = compiled.build("tvm", target="llvm", serial_below=0)
        ort = OnnxModule(onnx_path, compiled.program)
        ort.session = ort_session(onnx_path, args.threads)
        fns = [lambda: batch.call(built), lambda: batch.call(every), lambda: batch.call(ort),
               lambda: batch.call(compiled.module)]
        with timing_lock(args.lock):
            t_tvm, t_every, t_ort, t_torch = interleaved(fns, args.repeat, gap=args.gap if args.spin else 0.0)
            ops = profile_ops(built, batch, max(3, args.repeat // 3))
    shape = f"{batch.batch_size()}x{batch.tensors()[0].shape[1]}"
    from rewrite.kernels.tvm_parallel import SERIAL_BELOW

    print("\n| MiniLM W4 + 25% neurons pruned | batch | ms | throughput vs onnxruntime | max rel err vs torch |")
    print("|---|---|---:|---:|---:|")
    print(f"| TVM llvm (default build: generated code for every op, loop nests under {SERIAL_BELOW:,} "
          f"work units serial) | {shape} | {t_tvm * 1e3:.1f} | {t_ort / t_tvm:.2f}x | {err:.1e} |")
    print(f"| TVM llvm, every parallel loop parallel (serial_below=0) | {shape} | {t_every * 1e3:.1f} | "
          f"{t_ort / t_every:.2f}x | |")
    print(f"| onnxruntime CPU (MatMulNBits) | {shape} | {t_ort * 1e3:.1f} | 1.00x | |")
    print(f"| torch (eager, reference kernels) | {shape} | {t_torch * 1e3:.1f} | {t_ort / t_torch:.2f}x | |")
    run_ms = sum(o[2] for o in ops)
    print("\nWhere TVM's time goes (VM instrument, separate runs; fallbacks to torch/onnxruntime ops: "
          f"{'none' if not any(o[3].startswith('fallback') for o in ops) else 'see rows'}):\n")
    print("| function | calls | ms | share | code |")
    print("|---|---:|---:|---:|---|")
    shown = ops[:args.top_ops]
    for name, n, ms, how in shown:
        print(f"| {name} | {n} | {ms:.1f} | {ms / run_ms:.0%} | {how} |")
    rest = ops[args.top_ops:]
    if rest:
        kinds = sorted({o[3] for o in rest})
        print(f"| {len(rest)} more | {sum(o[1] for o in rest)} | {sum(o[2] for o in rest):.1f} | "
              f"{sum(o[2] for o in rest) / run_ms:.0%} | {'; '.join(kinds)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[4])
    p.add_argument("--rows", type=int, nargs="+", default=ROWS)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--overhead", action="store_true", help="only the thread-pool launch micro-benchmark "
                   "(the serial/parallel threshold of kernels.tvm_parallel)")
    p.add_argument("--spin", action="store_true", help="runtimes spin idle threads as by default; pause --gap before each call")
    p.add_argument("--gap", type=float, default=0.05, help="with --spin: seconds of pause before each timed call")
    p.add_argument("--top-ops", type=int, default=12, help="rows of the per-function time table")
    p.add_argument("--threads", type=int, default=2, help="threads of each runtime (torch, onnxruntime, TVM); 1 "
                   "compares the kernels without thread-pool effects (a loaded machine delays a static "
                   "partition's slowest thread, which TVM waits for)")
    p.add_argument("--lock", default="", help="file to flock around each timed section (a shared machine's "
                   "timing lock; building and compiling run outside it)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's thread pool starts
    from rewrite.kernels.tvm_target import configure_cpu_threads

    print(f"threads: torch {torch.get_num_threads()}, onnxruntime {args.threads}, TVM {configure_cpu_threads()} "
          f"(load average at start: {os.getloadavg()[0]:.1f})\n")
    if args.overhead:
        bench_overhead(args)
        return
    if not args.skip_kernels:
        bench_kernels(args)
    if not args.skip_e2e:
        bench_e2e(args)


if __name__ == "__main__":
    main()
