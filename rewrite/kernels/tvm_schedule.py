"""Schedules for the generated TensorIR kernels (PrimFuncs with attr "rewrite.kernel").

- llvm, one row (GEMV, 1/2/4/8 bits; `_grouped_gemv`): the kernel is swapped for its grouped
  form (`quant.tvm_kernel.grouped_gemv_te`, same parameters): per group, codes times activations are
  summed in registers (one vector load of V packed bytes, P code vectors by shift + mask, no
  subtract or scale per code), the scale multiplies the group's partial sums once and the zero
  point enters as scale * zero * sum(x over the group); 8 output channels per step (AVX-512;
  4 with narrower vectors) give as many independent accumulator chains; parallel over channel blocks.
- llvm, 2-16 rows (`_dequant_matmul`): parallel over output channels; the K loop split into
  [groups of V*P | V lanes | P codes per byte] and the V lanes vectorised through an rfactor,
  so one vector load of V packed bytes feeds P vectors of codes and the scale/zero of the
  group is one broadcast. The activations are re-laid out once per call as x[i, k % P, k // P]
  so their loads are contiguous too: 8 rows x 2 output channels per step, each decoded weight
  vector reused by 8 rows and each activation load by 2 channels, the 16 accumulators in
  registers. 3-bit codes: a scalar schedule (`_dequant_matmul_scalar`; lanes would gather bytes).
- llvm, many rows (more than 16, or symbolic, as in a batch x sequence graph;
  `_dequant_gemm_tiled`): each parallel task decodes its [K, 4V] weight slice once, then an
  outer-product GEMM over all rows in 6 x 4V register tiles; any bit width. A row count that
  is symbolic or not a multiple of 6 is padded to whole tiles (`pad_einsum`), so the tile has
  no bounds test (measured 2x at 544 x 384 x 1152 with a symbolic row count).
- llvm, token selection: the O(S^2) counting blocks parallel over (batch, position).
- GPU targets: dlight's rules (`schedule_gpu`): GEMV / LowBatchGEMV / Matmul / reductions,
  and our cross-thread-reduction GEMV for kernels dlight's GEMV declines (3-bit codes).
- The rest of a graph on llvm (`schedule_cpu_rest`): dlight's cpu GEMV, our `RowWise` rule
  (softmax, layer norm: every block computed per output row), dlight's cpu Reduction, then
  `CpuGeneric` (elementwise chains inlined into one block, parallel + vectorised loops).
  Each function records the rule that scheduled it (attr "rewrite.schedule").
A kernel whose schedule fails keeps its plain loop nest (still correct) with a log line.
"""
from __future__ import annotations

import logging
from typing import Any

from .tvm_attrs import BITS_ATTR, GROUP_ATTR, KERNEL_ATTR
from .tvm_target import configure_cpu_threads, make_target, vector_lanes

log = logging.getLogger("rewrite.tvm")

SCHEDULED_ATTR = "tirx.is_scheduled"
SCHEDULE_ATTR = "rewrite.schedule"  # the rule that scheduled a non-kernel PrimFunc (dlight's or ours)
# rows sharing one decoded weight vector: that many V-lane accumulators stay in registers
# (8 rows x 2 channels = 16 of the 32 zmm registers with AVX-512; measured: 16 rows spilled)
def row_tile(lanes: int) -> int:
    return 8


# above this many rows (or a symbolic row count) weights are decoded once per task into a
# buffer and the GEMM is an outer product (at 544x384x1152: 47 ms vs 108 ms for the rfactor
# form, torch fp32 67 ms; at 16x4096x4096 the rfactor form wins: 117 vs 138 ms)
MANY_ROWS = 16


def outer_product_tile(lanes: int) -> tuple[int, int]:
    """(rows, columns) of the many-row GEMM's accumulator tile: 6 x 4 vectors = 24 of the 32 zmm
    registers with AVX-512 (measured at 544x384x1152: 28 ms vs 45 ms for 8 x 2, 32 ms for
    4 x 4, 47 ms for 16 x 1); 6 x 2 = 12 of the 16 ymm registers with AVX2."""
    return (6, 4 * lanes) if lanes >= 16 else (6, 2 * lanes)


def col_tile(rows: int | None) -> int:
    """Output channels per step for GEMM: two weight rows share every activation load."""
    return 1 if rows == 1 else 2


def schedule_kernels(mod: Any, target: Any) -> Any:
    """Schedule every generated kernel in the IRModule for `target` (llvm only; GPU: `schedule_gpu`)."""
    import tvm

    target = make_target(target)
    if target.kind.name != "llvm":
        return mod
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    for gv, func in mod.functions_items():
        if not _is_kernel(func) or _is_scheduled(func):
            continue
        try:
            out[gv] = schedule_llvm(func, target)
        except Exception as exc:  # noqa: BLE001 - the unscheduled kernel is still correct
            log.info("llvm schedule of %s failed (%s); using the plain loop nest", gv.name_hint,
                     str(exc).strip().splitlines()[-1][:200])
    return out


def _is_kernel(func: Any) -> bool:
    from tvm import tirx

    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and KERNEL_ATTR in func.attrs


def _is_scheduled(func: Any) -> bool:
    return func.attrs is not None and SCHEDULED_ATTR in func.attrs and bool(func.attrs[SCHEDULED_ATTR])


def schedule_llvm(func: Any, target: Any = "llvm") -> Any:
    """A CPU schedule for one generated kernel, chosen by its kind."""
    from tvm import s_tir

    kind = str(func.attrs[KERNEL_ATTR])
    if kind.startswith("dequant_gemv"):
        bits, group = int(func.attrs[BITS_ATTR]), int(func.attrs[GROUP_ATTR])
        v, per = lanes_for(bits, group, vector_lanes(target))
        if v >= 4 and 8 % bits == 0:
            from .quant.tvm_kernel import grouped_gemv_like

            sch = s_tir.Schedule(grouped_gemv_like(func, v))
            _grouped_gemv(sch, _gemv_channels(_static(func.params[1].shape[0]), vector_lanes(target)))
            return sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
    sch = s_tir.Schedule(func)
    if kind.startswith("dequant_gemv") or kind.startswith("dequant_gemm"):
        bits, group = int(func.attrs[BITS_ATTR]), int(func.attrs[GROUP_ATTR])
        _dequant_matmul(sch, bits, group, vector_lanes(target))
    elif kind == "token_select":
        _token_select(sch)
    else:
        _parallel_outer(sch, "dequantize")
    return sch.mod["main"].with_attr(SCHEDULED_ATTR, True)


def _has(sch: Any, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # noqa: BLE001
        return False


def _parallel_outer(sch: Any, name: str, fuse: int = 1) -> None:
    if not _has(sch, name):
        return
    loops = sch.get_loops(sch.get_sblock(name))
    sch.parallel(sch.fuse(*loops[:fuse]) if fuse > 1 else loops[0])


def lanes_for(bits: int, group: int, lanes: int) -> tuple[int, int]:
    """(V, P): vector lanes over packed bytes and codes per byte, with V*P dividing the group."""
    per = 8 // bits if 8 % bits == 0 else 1
    v = lanes
    while v > 1 and group % (v * per):
        v //= 2
    return v, per


def _static(extent: Any) -> int | None:
    try:
        return int(extent)
    except (TypeError, ValueError):
        return None


def _dequant_matmul(sch: Any, bits: int, group: int, lanes: int) -> None:
    rows = _static(sch.get(sch.get_loops(sch.get_sblock("matmul"))[0]).extent)
    if rows is None or rows > MANY_ROWS:  # decode once per task, outer-product GEMM (measured faster here)
        _dequant_gemm_tiled(sch, lanes)
        return
    v, per = lanes_for(bits, group, lanes)
    if v < 4 or (per == 1 and bits != 8):  # 3-bit codes straddle bytes: lanes would gather bytes
        _dequant_matmul_scalar(sch, gemv=_static(sch.get(sch.get_loops(sch.get_sblock("matmul"))[0]).extent) == 1)
        return
    mm = sch.get_sblock("matmul")
    sch.compute_inline(sch.get_sblock("dequantize"))
    if per > 1:  # x[i, k] -> x[i, k % P, k // P]: lane t of code slot p reads x at byte t's code p
        xc = sch.cache_read(mm, 0, "global")
        sch.transform_layout(mm, ("read", 0), lambda i, k: (i, k % per, k // per))
        _parallel_outer(sch, sch.get(xc).name_hint)
    i, j, k = sch.get_loops(mm)
    rows = _static(sch.get(i).extent)
    tile = min(rows, row_tile(lanes)) if rows is not None else row_tile(lanes)
    k_factors = [None, v, per] if per > 1 else [None, v]
    ks = sch.split(k, k_factors)
    io, ii = sch.split(i, [None, tile])
    rf = sch.rfactor(ks[1], 0)  # the lanes become a spatial axis of a partial-sum block
    loops = sch.get_loops(rf)
    io, ii, j, k0, k1 = loops[:5]
    k2 = loops[5] if per > 1 else None
    cols = col_tile(rows)
    jo, ji = sch.split(j, [None, cols]) if cols > 1 else (j, None)
    order = [jo, io, k0] + ([k2] if k2 is not None else []) + ([ji] if ji is not None else []) + [ii, k1]
    sch.reorder(*order)
    sch.parallel(jo)
    if ji is not None:
        sch.unroll(ji)
    sch.reverse_compute_at(mm, io)
    sch.set_scope(rf, 0, "local")
    sch.transform_layout(rf, ("write", 0), lambda a, b, c: (b, c, a))  # lanes innermost: one vector
    sch.vectorize(k1)
    sch.unroll(ii)
    if k2 is not None:
        sch.unroll(k2)
    sch.decompose_reduction(rf, k0)
    if _has(sch, "bias_add"):
        sch.reverse_compute_at(sch.get_sblock("bias_add"), io)


def _gemv_channels(n: int | None, lanes: int = 16) -> int:
    """Output channels per GEMV step: independent accumulator chains (the FMA latency hidden,
    each activation vector loaded once for that many weight rows), fewer when N is not a multiple.

    8 with AVX-512 (16 of the 32 zmm registers: a group partial sum and a scaled sum per
    channel), 4 with narrower vectors (16 registers). Measured 8 vs 4 with AVX-512, CPU time of
    one thread, W4 g128, three interleaved runs on a loaded VM (2026-12-03): 4096x4096 1.34 /
    1.62 / 1.29 ms vs 1.55 / 1.72 / 1.32 ms, 4096x11008 3.50 / 4.67 / 3.96 vs 4.13 / 4.71 / 3.96
    ms: never slower, 0-15% faster (16 channels spill: 1.43 / 3.82 ms in the first run).
    """
    for c in ((8, 4, 2) if lanes >= 16 else (4, 2)):
        if n is not None and n % c == 0:
            return c
    return 1


def _grouped_gemv(sch: Any, channels: int) -> None:
    """Schedule `quant.tvm_kernel.grouped_gemv_te` for one row: parallel over blocks of `channels` output
    channels; per group, `channels` x lanes partial sums in registers (codes unpacked from one
    vector load of packed bytes by shift + mask), then one scale FMA per group and channel; the
    x copy and group sums run once, serially, before the parallel loop (they are tiny, and every
    parallel region costs a wake-up of the thread pool)."""
    out = sch.get_sblock("bias_add") if _has(sch, "bias_add") else sch.get_sblock("matmul")
    i, j = sch.get_loops(out)
    jo, ji = sch.split(j, [None, channels])
    sch.reorder(jo, i, ji)
    sch.parallel(jo)
    blocks = {name: sch.get_sblock(name) for name in ("lane_sum", "zero_term", "scaled_sum", "group_dot")}
    for name in ("lane_sum", "zero_term", "scaled_sum"):
        sch.compute_at(blocks[name], jo)
    acc, part = blocks["scaled_sum"], blocks["group_dot"]
    a = _axis_loops(sch, acc)  # channel "j", lane "t", group "g" (a row loop of extent 1 has none)
    sch.reorder(a["g"], *[a[v] for v in ("i", "j", "t") if v in a])
    sch.compute_at(part, a["g"])
    p = _axis_loops(sch, part, below=a["g"])
    steps = [p[v] for v in ("c", "p") if v in p]
    sch.reorder(*steps, *[p[v] for v in ("i", "j", "t") if v in p])  # the channels x lanes tile innermost
    sch.vectorize(p["t"])
    for loop in steps + [p[v] for v in ("i", "j") if v in p]:
        sch.unroll(loop)
    if steps:
        sch.decompose_reduction(part, steps[0])
    else:
        sch.decompose_reduction(part, p["t"])
    sch.vectorize(a["t"])
    for v in ("i", "j"):
        if v in a:
            sch.unroll(a[v])
    sch.decompose_reduction(acc, a["g"])
    for name, block in blocks.items():
        sch.set_scope(block, 0, "local")


def _axis_loops(sch: Any, block: Any, below: Any = None) -> dict[str, Any]:
    """The block's loops (those under `below`, if given) by the name of the block var each binds
    (a block var "v_t" -> "t"); loops of extent 1 are absent, as compute_at leaves them out."""
    from tvm.s_tir.dlight.analysis.common_analysis import get_sblockrealize
    from tvm import tirx

    loops = sch.get_loops(block)
    if below is not None:
        loops = loops[[sch.get(lp).same_as(sch.get(below)) for lp in loops].index(True) + 1:]
    b = sch.get(block)
    binding = list(get_sblockrealize(sch, block).iter_values)
    out = {}
    for lp in loops:
        lv = sch.get(lp).loop_var
        for iv, val in zip(b.iter_vars, binding):
            used = [val] if isinstance(val, tirx.Var) else tirx.analysis.undefined_vars(val)
            if any(u.same_as(lv) for u in used):
                out[iv.var.name.removeprefix("v_")] = lp
    return out


def _dequant_gemm_tiled(sch: Any, lanes: int) -> None:
    """GEMM for many rows: each parallel task decodes its [K, C] weight slice once into a
    buffer, then runs a register-tiled outer product over all rows (`outer_product_tile`:
    a broadcast of x times C/V contiguous weight vectors per step). No
    horizontal reductions, so short K (a BERT-size 384) costs nothing extra."""
    mm = sch.get_sblock("matmul")
    dq = sch.get_sblock("dequantize")
    rows, cols = outer_product_tile(lanes)
    epilogue = None
    m = _static(sch.get(sch.get_loops(mm)[0]).extent)
    if m is None or m % rows:  # rows padded to whole tiles: no bounds test inside the register tile
        sch.pad_einsum(mm, [rows, 1, 1])
        for block in sch.get_producers(mm):  # the zero-padded copy of x ("<x>_pad")
            if sch.get(block).name_hint.endswith("_pad"):
                sch.parallel(sch.get_loops(block)[0])
        epilogue = sch.get_sblock("matmul_pad")  # the copy of the valid rows out of the padded result
        if _has(sch, "bias_add"):
            sch.compute_inline(epilogue)
            epilogue = None
    i, j, k = sch.get_loops(mm)
    jo, ji = sch.split(j, [None, cols])
    io, ii = sch.split(i, [None, rows])
    sch.reorder(jo, io, k, ii, ji)
    sch.parallel(jo)
    acc = sch.cache_write(mm, 0, "local")
    sch.reverse_compute_at(acc, io)
    sch.compute_at(dq, jo)
    sch.transform_layout(dq, ("write", 0), lambda n, kk: (kk, n))
    dl = sch.get_loops(dq)
    sch.reorder(dl[-1], dl[-2])
    sch.vectorize(ji)
    sch.unroll(ii)
    sch.decompose_reduction(mm, k)
    for block in [epilogue] + ([sch.get_sblock("bias_add")] if _has(sch, "bias_add") else []):
        if block is not None:
            sch.reverse_compute_at(block, io)


def _dequant_matmul_scalar(sch: Any, gemv: bool) -> None:
    """Codes that straddle bytes (3 bits): GEMV decodes in the reduction, GEMM decodes once into [K, N]."""
    mm = sch.get_sblock("matmul")
    if gemv:
        sch.compute_inline(sch.get_sblock("dequantize"))
        i, j, k = sch.get_loops(mm)
        sch.reorder(j, i, k)
        sch.parallel(j)
        _, ki = sch.split(k, [None, 4])
        sch.unroll(ki)
    else:
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
        sch.unroll(ji)
    if _has(sch, "bias_add"):
        _parallel_outer(sch, "bias_add")


def _token_select(sch: Any) -> None:
    sch.compute_inline(sch.get_sblock("prepare"))
    for name in ("rank", "slot", "gather_index"):
        _parallel_outer(sch, name, fuse=2)


def schedule_gpu(mod: Any, target: Any) -> Any:
    """dlight's GPU rules on every unscheduled PrimFunc (needs no GPU, only the target)."""
    from tvm.s_tir import dlight as dl

    rules = [dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), _gpu_gemv_rule()(), dl.gpu.Matmul(), dl.gpu.Reduction(),
             dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    with target:
        return dl.ApplyDefaultSchedule(*[_guarded(r) for r in rules])(mod)


def _gpu_gemv_rule() -> type:
    from tvm import s_tir
    from tvm.s_tir import dlight as dl

    class _DequantGEMV(dl.ScheduleRule):
        tag = "rewrite.DequantGEMV"

        """Our GEMV kernels that dlight's GEMV declines (3-bit codes read two bytes).

        One warp-wide cross-thread reduction per output channel: K split over 32 x 4 threads
        (consecutive threads read consecutive codes, so x and the packed bytes are coalesced),
        8 channels per block.
        """

        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if target.kind.name != "cuda" or not _is_kernel(func) or not str(func.attrs[KERNEL_ATTR]).startswith(
                    "dequant_gemv"):
                return None
            sch = s_tir.Schedule(func)
            sch.compute_inline(sch.get_sblock("dequantize"))
            mm = sch.get_sblock("matmul")
            i, j, k = sch.get_loops(mm)
            threads = 128
            if _static(sch.get(k).extent) is None or _static(sch.get(k).extent) % threads:
                return None
            jo, ji = sch.split(j, [None, 8])
            ko, ki = sch.split(k, [None, threads])
            sch.reorder(i, jo, ji, ki, ko)
            sch.bind(sch.fuse(i, jo), "blockIdx.x")
            sch.bind(ji, "threadIdx.y")
            sch.bind(ki, "threadIdx.x")  # a reduction loop bound to threads: TVM emits the cross-thread reduction
            if _has(sch, "bias_add"):
                bias = sch.get_sblock("bias_add")
                loops = sch.get_loops(bias)
                fused = sch.fuse(*loops)
                bo, bi = sch.split(fused, [None, 256])
                sch.bind(bo, "blockIdx.x")
                sch.bind(bi, "threadIdx.x")
            return sch

    return _DequantGEMV


def _guarded(rule: Any) -> Any:
    """A dlight rule that declines (None) instead of raising when its analysis trips on a kernel.

    (dlight's GEMV analysis asserts one-element reads; a 3-bit value reads two bytes.)
    """
    from tvm.s_tir import dlight as dl

    from tvm import s_tir

    name = getattr(rule, "tag", None) or f"dlight.{type(rule).__module__.split('.')[-2]}.{type(rule).__name__}"

    class Guarded(dl.ScheduleRule):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            try:
                sch = rule.apply(func, target, tunable)
            except Exception as exc:  # noqa: BLE001
                log.debug("dlight %s declined: %s", type(rule).__name__, exc)
                return None
            if not isinstance(sch, s_tir.Schedule):
                return sch
            # which rule scheduled the function, for the benchmark's per-op table
            return s_tir.Schedule(sch.mod["main"].with_attr(SCHEDULE_ATTR, name))

    return Guarded()


def schedule_cpu_rest(mod: Any, target: Any) -> Any:
    """Every PrimFunc not yet scheduled on llvm: dlight's cpu rules (GEMV, Reduction), then `CpuGeneric`."""
    from tvm.s_tir import dlight as dl

    target = make_target(target)
    rules = [dl.cpu.GEMV(), RowWise(), dl.cpu.Reduction(), CpuGeneric(vector_lanes(target))]
    with target:
        return dl.ApplyDefaultSchedule(*[_guarded(r) for r in rules])(mod)


def _cpu_generic_rule() -> type:
    from tvm import s_tir
    from tvm.s_tir import dlight as dl

    class _CpuGeneric(dl.ScheduleRule):
        tag = "rewrite.CpuGeneric"

        """Parallel over the outer spatial loops, vectorise the innermost spatial loop.

        Injective blocks: the innermost loop split by the vector width. Reductions whose
        innermost spatial axis indexes the output contiguously (matmul N, softmax's rows): that
        axis moved inside the reduction and vectorised, so each step of K updates a vector of
        outputs (a broadcast times a contiguous load). Anything else keeps parallel loops only.
        """

        def __init__(self, lanes: int) -> None:
            self.lanes = lanes

        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if target.kind.name != "llvm":
                return None
            sch = s_tir.Schedule(func)
            root = sch.get_sblock("root")
            _inline_elementwise(sch, root)
            for block in sch.get_child_blocks(root):
                self._block(sch, block)
            return sch

        def _block(self, sch: Any, block: Any) -> None:
            loops = sch.get_loops(block)
            kinds = _loop_kinds(sch, block, loops)
            if not loops or kinds is None or kinds[0] != "S":
                return
            n_s = len(kinds) - len(kinds.lstrip("S"))
            tail_static = _static(sch.get(loops[n_s - 1]).extent)
            if "R" not in kinds:  # injective
                if tail_static is not None and tail_static >= self.lanes and tail_static % self.lanes == 0 and n_s > 1:
                    _, inner = sch.split(loops[n_s - 1], [None, self.lanes])
                    sch.vectorize(inner)
                sch.parallel(sch.fuse(*loops[: max(1, min(2, n_s - 1))]) if n_s > 1 else loops[0])
                return
            if kinds != "S" * n_s + "R" * (len(kinds) - n_s) or n_s < 2:
                sch.parallel(loops[0])
                return
            if tail_static is not None and tail_static % self.lanes == 0 and _contiguous_out(sch, block):
                jo, ji = sch.split(loops[n_s - 1], [None, self.lanes])
                sch.reorder(*loops[n_s:], ji)
                sch.parallel(sch.fuse(*loops[: n_s - 1]))
                sch.vectorize(ji)
                sch.decompose_reduction(block, loops[n_s])
                return
            sch.parallel(sch.fuse(*loops[: n_s - 1]) if n_s > 2 else loops[0])

    return _CpuGeneric


def _row_wise_rule() -> type:
    from tvm import s_tir
    from tvm.s_tir import dlight as dl

    class _RowWise(dl.ScheduleRule):
        tag = "rewrite.RowWise"

        """Row-wise reductions (softmax, layer norm): every block computed per row of the output.

        The output's leading spatial loops fused and parallel, every other block computed at
        that loop, so a row's max/sum/exp stay in cache and the intermediates shrink to one row;
        the short inner loops are left to LLVM's vectoriser. (dlight's cpu Reduction vectorised
        them with bounds predicates on a symbolic sequence length: softmax at 34 columns ran
        12 ms per call, this schedule: see benchmarks/kernels.py.)
        """

        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if target.kind.name != "llvm" or _is_kernel(func):
                return None
            sch = s_tir.Schedule(func)
            root = sch.get_sblock("root")
            _inline_elementwise(sch, root)
            blocks = list(sch.get_child_blocks(root))
            kinds = [_loop_kinds(sch, b, sch.get_loops(b)) for b in blocks]
            if len(blocks) < 2 or any(k is None for k in kinds) or not any("R" in k for k in kinds):
                return None
            if "R" in kinds[-1] or len(kinds[-1]) < 2:
                return None
            try:
                loops = sch.get_loops(blocks[-1])
                outer = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
                for block in reversed(blocks[:-1]):
                    sch.compute_at(block, outer)
                sch.parallel(outer)
            except Exception:  # noqa: BLE001 - not a row-wise pattern: the next rule
                return None
            return sch

    return _RowWise


def RowWise() -> Any:  # noqa: N802 - a rule instance, named like dlight's
    return _row_wise_rule()()


def _inline_elementwise(sch: Any, root: Any) -> None:
    """Inline every injective block whose consumers are all injective (gelu's four passes become
    one): no intermediate buffers, one read and one write per element. Producers feeding a
    reduction stay, so e.g. softmax's exp is not computed twice."""
    for block in list(sch.get_child_blocks(root))[:-1]:
        loops = sch.get_loops(block)
        kinds = _loop_kinds(sch, block, loops)
        consumers = sch.get_consumers(block)
        if kinds is None or "R" in kinds or not consumers:
            continue
        if any(_loop_kinds(sch, c, sch.get_loops(c)) is None or "R" in _loop_kinds(sch, c, sch.get_loops(c))
               for c in consumers):
            continue
        try:
            sch.compute_inline(block)
        except Exception:  # noqa: BLE001 - e.g. a block writing a function output: keep it
            pass


def CpuGeneric(lanes: int) -> Any:  # noqa: N802 - a rule instance, named like dlight's
    return _cpu_generic_rule()(lanes)


def _loop_kinds(sch: Any, block: Any, loops: list) -> str | None:
    """'S'/'R' per loop from the block var each loop binds (None when a loop binds several)."""
    from tvm import tirx

    from tvm.s_tir.dlight.analysis.common_analysis import get_sblockrealize

    b = sch.get(block)
    try:
        binding = list(get_sblockrealize(sch, block).iter_values)
    except Exception:  # noqa: BLE001
        return None
    loop_vars = [sch.get(lp).loop_var for lp in loops]
    out = []
    for lv in loop_vars:
        kind = None
        for iv, val in zip(b.iter_vars, binding):
            used = tirx.analysis.undefined_vars(val) if not isinstance(val, tirx.Var) else [val]
            if any(u.same_as(lv) for u in used):
                k = "S" if int(iv.iter_type) == 0 else "R" if int(iv.iter_type) == 2 else "O"
                if kind not in (None, k):
                    return None
                kind = k
        if kind is None or kind == "O":
            return None
        out.append(kind)
    return "".join(out)


def _contiguous_out(sch: Any, block: Any) -> bool:
    """Does the block write one buffer, indexed by its last spatial var in the last dimension?"""
    b = sch.get(block)
    if len(b.writes) != 1:
        return False
    region = b.writes[0].region
    spatial = [iv.var for iv in b.iter_vars if int(iv.iter_type) == 0]
    return bool(spatial) and region[-1].min.same_as(spatial[-1])


def build_kernel(func: Any, target: Any = "llvm") -> Any:
    """Schedule and compile one standalone kernel PrimFunc; returns the runtime module (`["main"]`)."""
    import tvm

    tgt = make_target(target)
    mod = tvm.IRModule({"main": func})
    if tgt.kind.name == "llvm":
        configure_cpu_threads()  # the kernel runs on this CPU: all of its cores
    if tgt.kind.name == "llvm":
        from .tvm_parallel import apply_serial_below

        mod = apply_serial_below(schedule_kernels(mod, tgt))  # as in the backend's build
    else:
        mod = schedule_gpu(mod, tgt)
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
