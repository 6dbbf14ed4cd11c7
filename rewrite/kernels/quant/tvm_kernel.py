"""TensorIR kernels generated per `rewrite::linear_q` instance: fused dequantize + matmul.

The kernel is generated from the op's parameters (bits, group size, K, N, bias or not, and
the row count M: static 1 -> GEMV, anything else -> GEMM) and follows exactly the op's
definition in `kernels/quant` (the package's reference):

    W[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g];  y = x @ W.T + bias
    q: little-endian bit stream per row, value k at bits [k*bits, (k+1)*bits)

Three blocks, so schedulers (dlight's GEMV/Matmul rules, MetaSchedule, our llvm schedule in
`kernels/tvm_schedule.py`) recognise the decode + reduction + epilogue pattern:
`dequantize` (injective, reads one byte, or two when a 3-bit value straddles a byte
boundary), `matmul` (reduction over K), `bias_add` (epilogue, only with a bias). On llvm, the one-row
kernel (GEMV) is swapped at schedule time for `grouped_gemv_te`, the same sum regrouped so a
group's scale and zero point cost O(1) instead of O(group size) (same parameters, so the Relax
call is unchanged).

Relax converters for the quantized ops (`linear_q`, `dequantize_q`, `embedding_q`,
`linear_a8_dynamic`, `linear_a8_static`, `linear_qa8_dynamic`) register as each op's `tvm`
lowering (`kernels.registry.lowering`); `linear_qa8_group` has no TVM kernel yet.
"""
from __future__ import annotations

import math
from typing import Any

from ..registry import lowering
from ..tvm_attrs import BITS_ATTR, GROUP_ATTR, KERNEL_ATTR


# ------------------------------------------------------------------------ TE definitions
def decode_te(qweight: Any, scales: Any, zeros: Any, *, bits: int, group_size: int, k: int, name: str = "dequantize") -> Any:
    """te: f32[N, K] weights from the packed bytes (one block, injective)."""
    from tvm import te, tirx

    n = qweight.shape[0]
    width = math.ceil(k * bits / 8)
    mask = (1 << bits) - 1

    def value(i: Any, j: Any) -> Any:
        bit = j * bits
        byte = tirx.floordiv(bit, 8)
        shift = tirx.floormod(bit, 8)
        lo = qweight[i, byte].astype("int32")
        if bits in (1, 2, 4, 8):  # a value never straddles a byte
            word = lo
        else:  # 3 (5, 6, 7) bits: the value may continue in the next byte
            last = qweight.shape[1] - 1  # the index type of the buffer (int64 under Relax)
            hi = tirx.if_then_else(byte < last, qweight[i, tirx.min(byte + 1, last)].astype("int32"), 0)
            word = lo | (hi << 8)
        q = tirx.bitwise_and(tirx.shift_right(word, shift.astype("int32")), mask) if bits != 8 else lo
        grp = tirx.floordiv(j, group_size)
        return (q.astype("float32") - zeros[i, grp].astype("float32")) * scales[i, grp].astype("float32")

    kdim = tirx.IntImm(str(n.ty), k) if isinstance(n, tirx.IntImm) else k  # one index type for both dims
    return te.compute((n, kdim), value, name=name)


def dequant_matmul_te(x: Any, qweight: Any, scales: Any, zeros: Any, bias: Any = None, *, bits: int,
                      group_size: int) -> Any:
    """te: y f32[M, N] = x f32[M, K] @ dequantize(q).T (+ bias)."""
    from tvm import te

    m, k = x.shape
    k_int = int(k)
    n = qweight.shape[0]
    w = decode_te(qweight, scales, zeros, bits=bits, group_size=group_size, k=k_int)
    r = te.reduce_axis((0, k), name="k")  # K's own dtype (int64 under Relax): one index type per buffer
    y = te.compute((m, n), lambda i, j: te.sum(x[i, r] * w[j, r], axis=r), name="matmul")
    if bias is None:
        return y
    return te.compute((m, n), lambda i, j: y[i, j] + bias[j], name="bias_add")


def grouped_gemv_te(x: Any, qweight: Any, scales: Any, zeros: Any, bias: Any = None, *, bits: int,
                    group_size: int, lanes: int) -> Any:
    """te: the same y as `dequant_matmul_te`, written so each group's scale and zero point cost O(1).

    sum_k x[k] (q[n,k] - z[n,g]) s[n,g] = sum_g s[n,g] (sum_{k in g} x[k] q[n,k] - z[n,g] sum_{k in g} x[k]):
    the inner loop multiplies raw codes by x (no subtract, no scale per code), the scale multiplies
    a group's partial sums once, and the zero point folds into one term per group from the group
    sums of x (computed once per call). The codes of a group are walked as [C | lanes | P] (P codes
    per byte), so `lanes` consecutive bytes are one vector load and the activations are read
    through a copy laid out as x[i, k % P, k // P] (contiguous per code slot). Blocks:
    `x_relayout`, `x_group_sum`, `group_dot` (per lane), `scaled_sum`, `zero_term`, `lane_sum`,
    then `matmul` (or `bias_add`). For 1/2/4/8 bits with lanes * P dividing the group; rounding
    differs from the plain form only in the order of the sums.
    """
    from tvm import te, tirx

    m, k = x.shape
    n = qweight.shape[0]
    per = 8 // bits
    if 8 % bits or group_size % (lanes * per) or int(k) % group_size:
        raise ValueError(f"grouped GEMV: {bits}-bit codes in {lanes} lanes do not tile group {group_size}")
    idx = k.dtype if hasattr(k, "dtype") else "int64"

    def c(v: int) -> Any:
        return tirx.IntImm(idx, v)

    kk = int(k)
    groups, steps, bytes_per_group = kk // group_size, group_size // (lanes * per), group_size // per
    mask = (1 << bits) - 1
    xr = te.compute((m, c(per), c(kk // per)), lambda i, p, b: x[i, b * per + p], name="x_relayout")
    r = te.reduce_axis((c(0), c(group_size)), name="r")
    xs = te.compute((m, c(groups)), lambda i, g: te.sum(x[i, g * group_size + r], axis=r), name="x_group_sum")

    def code(row: Any, byte: Any, p: Any) -> Any:
        word = qweight[row, byte].astype("int32")
        if per == 1:
            return word.astype("float32")
        return tirx.bitwise_and(tirx.shift_right(word, (p * bits).astype("int32")), mask).astype("float32")

    rc, rp = te.reduce_axis((c(0), c(steps)), name="c"), te.reduce_axis((c(0), c(per)), name="p")
    part = te.compute((m, n, c(groups), c(lanes)), lambda i, j, g, t: te.sum(
        xr[i, rp, g * bytes_per_group + rc * lanes + t] * code(j, g * bytes_per_group + rc * lanes + t, rp),
        axis=[rc, rp]), name="group_dot")
    rg = te.reduce_axis((c(0), c(groups)), name="g")
    acc = te.compute((m, n, c(lanes)), lambda i, j, t: te.sum(part[i, j, rg, t] * scales[j, rg].astype("float32"),
                                                                axis=rg), name="scaled_sum")
    rz = te.reduce_axis((c(0), c(groups)), name="gz")
    corr = te.compute((m, n), lambda i, j: te.sum(
        scales[j, rz].astype("float32") * zeros[j, rz].astype("float32") * xs[i, rz], axis=rz), name="zero_term")
    rt = te.reduce_axis((c(0), c(lanes)), name="t")
    total = te.compute((m, n), lambda i, j: te.sum(acc[i, j, rt], axis=rt), name="lane_sum")
    if bias is None:
        return te.compute((m, n), lambda i, j: total[i, j] - corr[i, j], name="matmul")
    return te.compute((m, n), lambda i, j: total[i, j] - corr[i, j] + bias[j].astype("float32"), name="bias_add")


def grouped_gemv_like(func: Any, lanes: int) -> Any:
    """The `grouped_gemv_te` PrimFunc with the same parameters (order, shapes, dtypes) and attrs as `func`,
    a generated dequant kernel: the llvm schedule swaps it in, so Relax's call_tir is unchanged."""
    from tvm import te

    bufs = list(func.params)  # buffer parameters (shape, dtype, name)
    ins = [te.placeholder(b.shape, b.dtype, name=b.name) for b in bufs[:-1]]
    bits, group_size = int(func.attrs[BITS_ATTR]), int(func.attrs[GROUP_ATTR])
    bias = ins[4] if len(ins) > 4 else None
    y = grouped_gemv_te(*ins[:4], bias, bits=bits, group_size=group_size, lanes=lanes)
    out = te.create_prim_func(ins + [y])
    for key, val in func.attrs.items():
        out = out.with_attr(key, val)
    return out


def kernel_kind(rows: Any) -> str:
    """"gemv" for a single (static) row, "gemm" otherwise (including symbolic row counts)."""
    try:
        return "gemv" if int(rows) == 1 else "gemm"
    except (TypeError, ValueError):
        return "gemm"


def dequant_matmul_primfunc(m: Any, k: int, n: int, *, bits: int, group_size: int, bias: bool = False) -> Any:
    """A standalone TensorIR PrimFunc for one op instance (benchmarks, kernel tests).

    `m` may be an int or None (a symbolic row count).
    """
    from tvm import te, tirx

    from . import packed_width

    _check(k, bits, group_size)
    def i64(v: int) -> Any:  # Relax's index type: the standalone kernel is the one Relax builds
        return tirx.IntImm("int64", v)

    rows = tirx.Var("m", "int64") if m is None else i64(m)
    x = te.placeholder((rows, i64(k)), "float32", name="x")
    q = te.placeholder((i64(n), i64(packed_width(k, bits))), "uint8", name="qweight")
    s = te.placeholder((i64(n), i64(k // group_size)), "float32", name="scales")
    z = te.placeholder((i64(n), i64(k // group_size)), "uint8", name="zeros")
    b = te.placeholder((i64(n),), "float32", name="bias") if bias else None
    y = dequant_matmul_te(x, q, s, z, b, bits=bits, group_size=group_size)
    args = [x, q, s, z] + ([b] if bias else []) + [y]
    func = te.create_prim_func(args)
    for key, val in kernel_attrs(kernel_kind(rows), bits, group_size).items():
        func = func.with_attr(key, val)
    return func


def _kernel_name(kind: str, bits: int, group_size: int) -> str:
    return f"dequant_{kind}_w{bits}g{group_size}"


def kernel_attrs(kind: str, bits: int, group_size: int) -> dict[str, Any]:
    """PrimFunc attributes the schedules read (the kernel kind, bit width and group size)."""
    return {KERNEL_ATTR: _kernel_name(kind, bits, group_size), BITS_ATTR: bits, GROUP_ATTR: group_size}


def _check(k: int, bits: int, group_size: int) -> None:
    if bits not in (2, 3, 4, 8) and not 1 <= bits <= 8:
        raise ValueError(f"linear_q kernel: bits must be 1..8, got {bits}")
    if k % group_size:
        raise ValueError(f"linear_q kernel: group_size {group_size} does not divide K={k}")


# ------------------------------------------------------------------------ Relax converters
def _const_or_var(importer: Any, arg: Any) -> Any:
    return None if arg is None else importer.env[arg]


def _shape(expr: Any) -> list:
    return list(expr.ty.shape.values)


@lowering("rewrite::linear_q", "tvm")
def convert_linear_q(node: Any, importer: Any) -> Any:
    """linear_q(x, qweight, scales, zeros, bias, bits, group_size) -> call_tir of the generated kernel."""
    from tvm import relax

    bb = importer.block_builder
    args = list(node.args) + [None] * (7 - len(node.args))
    x_node, q_node, s_node, z_node, b_node = args[:5]
    bits = int(node.kwargs.get("bits", args[5]))
    group_size = int(node.kwargs.get("group_size", args[6]))
    if "bias" in node.kwargs:
        b_node = node.kwargs["bias"]
    x = importer.env[x_node]
    q, s, z = importer.env[q_node], importer.env[s_node], importer.env[z_node]
    b = _const_or_var(importer, b_node)
    x_shape = _shape(x)
    k = int(x_shape[-1])
    n = int(_shape(q)[0])
    _check(k, bits, group_size)
    lead = x_shape[:-1]
    rows = lead[0] if len(lead) == 1 else _prod(lead)
    x2 = bb.emit(relax.op.reshape(x, [rows, k])) if len(lead) != 1 else x
    kind = kernel_kind(rows)
    name = _kernel_name(kind, bits, group_size)
    te_args = [x2, q, s, z] + ([b] if b is not None else [])

    def fn(*ts: Any) -> Any:
        return dequant_matmul_te(*ts[:4], ts[4] if len(ts) > 4 else None, bits=bits, group_size=group_size)

    y = bb.emit_te(fn, *te_args, primfunc_name_hint=name,
                   primfunc_attrs={**kernel_attrs(kind, bits, group_size), "op_pattern": 8})
    if len(lead) != 1:
        y = bb.emit(relax.op.reshape(y, lead + [n]))
    return y


@lowering("rewrite::dequantize_q", "tvm")
def convert_dequantize_q(node: Any, importer: Any) -> Any:
    """dequantize_q(qweight, scales, zeros, bits, group_size) -> f32[N, K] via the decode kernel."""
    bb = importer.block_builder
    q, s, z = (importer.env[a] for a in node.args[:3])
    bits, group_size = int(node.args[3]), int(node.args[4])
    k = int(_shape(s)[1]) * group_size
    name = f"dequantize_w{bits}g{group_size}"
    return bb.emit_te(lambda qq, ss, zz: decode_te(qq, ss, zz, bits=bits, group_size=group_size, k=k), q, s, z,
                      primfunc_name_hint=name, primfunc_attrs={KERNEL_ATTR: name})


@lowering("rewrite::embedding_q", "tvm")
def convert_embedding_q(node: Any, importer: Any) -> Any:
    """embedding_q(ids, qweight, scales, zeros, bits, group_size): gather packed rows, then decode."""
    from tvm import relax

    bb = importer.block_builder
    ids, q, s, z = (importer.env[a] for a in node.args[:4])
    bits, group_size = int(node.args[4]), int(node.args[5])
    d = int(_shape(s)[1]) * group_size
    id_shape = _shape(ids)
    flat = bb.emit(relax.op.reshape(ids, [_prod(id_shape)]))
    rows = [bb.emit(relax.op.take(t, flat, axis=0)) for t in (q, s, z)]
    name = f"dequantize_w{bits}g{group_size}"
    w = bb.emit_te(lambda qq, ss, zz: decode_te(qq, ss, zz, bits=bits, group_size=group_size, k=d), *rows,
                   primfunc_name_hint=name, primfunc_attrs={KERNEL_ATTR: name})
    return bb.emit(relax.op.reshape(w, id_shape + [d]))


def _int8_linear(importer: Any, x: Any, xq: Any, zero: Any, qweight: Any, scale: Any, bias: Any) -> Any:
    """(xq - zero) @ qweight.T in float64 (exact integer sums), times scale, plus bias."""
    from tvm import relax

    bb = importer.block_builder
    a = bb.emit(relax.op.subtract(relax.op.astype(xq, "float64"), relax.op.astype(zero, "float64")))
    w = bb.emit(relax.op.permute_dims(relax.op.astype(qweight, "float64"), [1, 0]))
    acc = bb.emit(relax.op.astype(relax.op.matmul(a, w), "float32"))
    y = bb.emit(relax.op.multiply(acc, scale))
    return bb.emit(relax.op.add(y, bias)) if bias is not None else y


@lowering("rewrite::linear_a8_dynamic", "tvm")
def convert_linear_a8_dynamic(node: Any, importer: Any) -> Any:
    """int8 activations with a per-call range (ONNX DynamicQuantizeLinear semantics)."""
    x, qw, w_scale = (importer.env[a] for a in node.args[:3])
    bias = _const_or_var(importer, node.args[3] if len(node.args) > 3 else None)
    return _a8_dynamic(importer, x, qw, w_scale, bias)


@lowering("rewrite::linear_qa8_dynamic", "tvm")
def convert_linear_qa8_dynamic(node: Any, importer: Any) -> Any:
    """Packed low-bit weight decoded and requantized to int8 per channel, then the int8 dynamic linear."""
    from tvm import relax

    bb = importer.block_builder
    x, q, s, z, w_scale = (importer.env[a] for a in node.args[:5])
    bias = _const_or_var(importer, node.args[5] if len(node.args) > 5 else None)
    bits, group_size = int(node.args[6]), int(node.args[7])
    k = int(_shape(s)[1]) * group_size
    name = f"dequantize_w{bits}g{group_size}"
    w = bb.emit_te(lambda qq, ss, zz: decode_te(qq, ss, zz, bits=bits, group_size=group_size, k=k), q, s, z,
                   primfunc_name_hint=name, primfunc_attrs={KERNEL_ATTR: name})
    col = bb.emit(relax.op.reshape(w_scale, [-1, 1]))
    qw = bb.emit(relax.op.clip(relax.op.round(relax.op.divide(w, col)), -127, 127))
    return _a8_dynamic(importer, x, qw, w_scale, bias)


def _a8_dynamic(importer: Any, x: Any, qw: Any, w_scale: Any, bias: Any) -> Any:
    from tvm import relax

    bb = importer.block_builder
    zero_f = relax.const(0.0, "float32")
    lo = bb.emit(relax.op.minimum(relax.op.min(x), zero_f))
    hi = bb.emit(relax.op.maximum(relax.op.max(x), zero_f))
    scale = bb.emit(relax.op.divide(relax.op.subtract(hi, lo), relax.const(255.0, "float32")))
    safe = bb.emit(relax.op.where(relax.op.greater(scale, zero_f), scale, relax.const(1.0, "float32")))
    zero = bb.emit(relax.op.clip(relax.op.round(relax.op.divide(relax.op.negative(lo), safe)), 0, 255))
    xq = bb.emit(relax.op.clip(relax.op.add(relax.op.round(relax.op.divide(x, safe)), zero), 0, 255))
    return _int8_linear(importer, x, xq, zero, qw, bb.emit(relax.op.multiply(scale, w_scale)), bias)


@lowering("rewrite::linear_a8_static", "tvm")
def convert_linear_a8_static(node: Any, importer: Any) -> Any:
    """int8 activations with a calibrated scale and zero point (ONNX QuantizeLinear semantics)."""
    from tvm import relax

    bb = importer.block_builder
    x, qw, w_scale, x_scale, x_zero = (importer.env[a] for a in node.args[:5])
    bias = _const_or_var(importer, node.args[5] if len(node.args) > 5 else None)
    zero = bb.emit(relax.op.astype(x_zero, "float32"))
    xq = bb.emit(relax.op.clip(relax.op.add(relax.op.round(relax.op.divide(x, x_scale)), zero), 0, 255))
    return _int8_linear(importer, x, xq, zero, qw, bb.emit(relax.op.multiply(x_scale, w_scale)), bias)


def _prod(dims: list) -> Any:
    out = dims[0]
    for d in dims[1:]:
        out = out * d
    return out
