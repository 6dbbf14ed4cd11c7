"""ONNX lowering of the quantized ops defined in `kernels/quant`.

Two steps, because the best lowering (onnxruntime's MatMulNBits) has no onnx schema and
needs its weights re-laid out:

1. The exporter's custom translation table turns each `rewrite::*` op into one placeholder
   node in the private domain `rewrite.quant` (schemas registered here), carrying the packed
   initializers and `bits` / `group_size` attributes.
2. `expand_placeholders` (an ONNX post-export step, `registry.postprocess`) replaces every placeholder by real ops:

   - linear_q, 4 or 8 bits, block size a power of two >= 16: `com.microsoft::MatMulNBits`
     (the packed rows are its B input as they are: our bit stream is its nibble order), unless
     the export option `matmulnbits` is off (standard ops only, for runtimes other than onnxruntime);
   - otherwise the weight is dequantized in the graph and fed to MatMul: 4 and 8 bits by a
     standard DequantizeLinear (opset 21, uint4 / uint8 with `block_size`); 2 and 3 bits from
     the packed bytes by Gather + BitShift + BitwiseAnd (+ BitwiseOr for values that straddle
     two bytes), then (q - zero) * scale. All of it depends only on initializers, so
     onnxruntime folds it once at session start and the file keeps the packed bytes.
   - embedding_q: tables up to the export option `decode_tables_at_load_mb` are decoded by foldable ops (once,
     at session start) and gathered as floats; larger ones Gather the packed rows, scales and
     zeros of the ids, then decode those rows only.
   - linear_a8_dynamic: DynamicQuantizeLinear + MatMulInteger + Cast + Mul (+ Add), the
     pattern onnxruntime fuses into its int8 kernels (as `quantize_dynamic` emits it);
     linear_a8_static: QuantizeLinear with the calibrated scale instead.
   - linear_qa8_dynamic: the packed codes are decoded and requantized to int8 by standard
     ops on initializers only (Gather/BitShift/.../Div/Round/Clip/Cast), which onnxruntime
     folds at session start into the int8 weight of the same fused int8 pattern: the file
     keeps 2..8-bit codes, the runtime runs its int8 GEMM.
   - linear_qa8_group (4 or 8 bits, block size a power of two >= 16; the quantize pass refuses
     other widths): `com.microsoft::MatMulNBits` with accuracy_level=4, whose int8 compute
     quantizes the activations per row and per block exactly as the torch op does; the packed
     codes stay packed in memory too. Which lowering a W4A8 linear gets follows from its op
     (per-tensor `linear_qa8_dynamic` or per-group `linear_qa8_group`), not from a switch.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch

from .. import quant  # the ops this module lowers (importing it registers them)
from rewrite.spec import OnnxExportSpec

from ..registry import lowering, postprocess

DOMAIN = "rewrite.quant"
MS_DOMAIN = "com.microsoft"
MATMULNBITS_BITS = (4, 8)  # the weight widths this lowering sends to MatMulNBits (what it packs as its B input)


# -------------------------------------------------------------------- 1. placeholders
def _register_schemas() -> None:
    from onnx import defs

    P = defs.OpSchema.FormalParameter
    opt = defs.OpSchema.FormalParameterOption.Optional
    INT = defs.OpSchema.AttrType.INT

    def schema(name: str, inputs: list[tuple[str, str, bool]], attrs: list[str]) -> None:
        try:
            defs.get_schema(name, 1, DOMAIN)
            return  # already registered (module re-imported)
        except Exception:  # noqa: BLE001
            pass
        params = [P(n, t, param_option=opt) if o else P(n, t) for n, t, o in inputs]
        s = defs.OpSchema(name, DOMAIN, 1, inputs=params, outputs=[P("y", "tensor(float)")],
                          attributes=[defs.OpSchema.Attribute(a, INT, "") for a in attrs])
        defs.register_schema(s)

    f, u8, i8, i64 = "tensor(float)", "tensor(uint8)", "tensor(int8)", "tensor(int64)"
    schema("LinearQ", [("x", f, False), ("qweight", u8, False), ("scales", f, False), ("zeros", u8, False),
                       ("bias", f, True)], ["bits", "group_size"])
    schema("EmbeddingQ", [("ids", i64, False), ("qweight", u8, False), ("scales", f, False), ("zeros", u8, False)],
           ["bits", "group_size"])
    schema("DequantizeQ", [("qweight", u8, False), ("scales", f, False), ("zeros", u8, False)], ["bits", "group_size"])
    schema("LinearA8Dynamic", [("x", f, False), ("qweight", i8, False), ("w_scale", f, False), ("bias", f, True)], [])
    schema("LinearQA8Dynamic", [("x", f, False), ("qweight", u8, False), ("scales", f, False), ("zeros", u8, False),
                                ("w_scale", f, False), ("bias", f, True)], ["bits", "group_size"])
    schema("LinearQA8Group", [("x", f, False), ("qweight", u8, False), ("scales", f, False), ("zeros", u8, False),
                              ("bias", f, True)], ["bits", "group_size"])
    schema("LinearA8Static", [("x", f, False), ("qweight", i8, False), ("w_scale", f, False), ("x_scale", f, False),
                              ("x_zero", u8, False), ("bias", f, True)], [])


def _placeholder_opset() -> Any:
    from onnxscript.values import Opset

    return Opset(DOMAIN, 1)


@lowering("rewrite::linear_q", "onnx")
def linear_q(x, qweight, scales, zeros, bias=None, bits: int = 4, group_size: int = 128):
    return _placeholder_opset().LinearQ(x, qweight, scales, zeros, bias, bits=bits, group_size=group_size)


@lowering("rewrite::embedding_q", "onnx")
def embedding_q(ids, qweight, scales, zeros, bits: int = 4, group_size: int = 128):
    return _placeholder_opset().EmbeddingQ(ids, qweight, scales, zeros, bits=bits, group_size=group_size)


@lowering("rewrite::dequantize_q", "onnx")
def dequantize_q(qweight, scales, zeros, bits: int = 4, group_size: int = 128):
    return _placeholder_opset().DequantizeQ(qweight, scales, zeros, bits=bits, group_size=group_size)


@lowering("rewrite::linear_a8_dynamic", "onnx")
def linear_a8_dynamic(x, qweight, w_scale, bias=None):
    return _placeholder_opset().LinearA8Dynamic(x, qweight, w_scale, bias)


@lowering("rewrite::linear_a8_static", "onnx")
def linear_a8_static(x, qweight, w_scale, x_scale, x_zero, bias=None):
    return _placeholder_opset().LinearA8Static(x, qweight, w_scale, x_scale, x_zero, bias)


@lowering("rewrite::linear_qa8_dynamic", "onnx")
def linear_qa8_dynamic(x, qweight, scales, zeros, w_scale, bias=None, bits: int = 4, group_size: int = 128):
    return _placeholder_opset().LinearQA8Dynamic(x, qweight, scales, zeros, w_scale, bias, bits=bits,
                                                 group_size=group_size)


@lowering("rewrite::linear_qa8_group", "onnx")
def linear_qa8_group(x, qweight, scales, zeros, bias=None, bits: int = 4, group_size: int = 128):
    return _placeholder_opset().LinearQA8Group(x, qweight, scales, zeros, bias, bits=bits, group_size=group_size)


# ------------------------------------------------------------------------ 2. expansion
class _Builder:
    """Collects the nodes and initializers that replace one placeholder."""

    def __init__(self, model: Any, prefix: str, options: Any = None):
        self.model = model
        self.prefix = prefix
        self.options = options
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.n = 0
        self.uses_ms = False

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}/{hint}_{self.n}"

    def const(self, hint: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def raw(self, hint: str, data_type: int, dims: list[int], raw: bytes) -> str:
        from onnx import helper

        name = self.name(hint)
        self.inits.append(helper.make_tensor(name, data_type, dims, raw, raw=True))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs: Any) -> Any:
        from onnx import helper

        outs = outputs if isinstance(outputs, list) else [self.name(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain, **attrs))
        if domain == MS_DOMAIN:
            self.uses_ms = True
        return outs[0] if len(outs) == 1 else outs


def _constants(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = a.t
    return {k: numpy_helper.to_array(v) for k, v in out.items()}


def _need(consts: dict[str, np.ndarray], node: Any, i: int) -> np.ndarray:
    name = node.input[i]
    if name not in consts:
        raise ValueError(f"{node.op_type} placeholder {node.name!r}: input {i} ({name!r}) is not a constant; "
                         "quantized weights must be stored as initializers")
    return consts[name]


def _attr(node: Any, name: str) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    raise ValueError(f"{node.op_type} node {node.name!r} lacks attribute {name!r}")


def _pack_nibbles(values: np.ndarray) -> bytes:
    """uint4 values [..., n] (flattened row-major) -> bytes, low nibble first (ONNX INT4 layout)."""
    flat = values.astype(np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _unpack_rows(qweight: np.ndarray, bits: int, k: int) -> np.ndarray:
    return quant.unpack(torch.from_numpy(np.ascontiguousarray(qweight)), bits, k).numpy()


def _symmetric(zeros: np.ndarray, bits: int) -> bool:
    """Every zero point is the midpoint 2**(bits-1): the codes are symmetric around zero."""
    return bool((zeros.astype(np.int64) == 1 << (bits - 1)).all())


def _decode_codes(b: _Builder, packed: str, bits: int, k: int, row_bytes: int) -> str:
    """Graph value f32[rows, k]: the unsigned codes of packed uint8 rows [rows, row_bytes].

    Rows hold a little-endian bit stream (kernels.quant.pack); each value is read from the
    byte(s) it lies in with Gather + BitShift + BitwiseAnd (+ BitwiseOr across two bytes).
    """
    from onnx import TensorProto

    if bits == 8:
        return b.op("Cast", [packed], to=TensorProto.FLOAT)
    offsets = np.arange(k, dtype=np.int64) * bits
    lo_idx = offsets // 8
    shift = (offsets % 8).astype(np.uint32)
    lo = b.op("Cast", [b.op("Gather", [packed, b.const("lo_idx", lo_idx)], axis=1)], to=TensorProto.UINT32)
    if 8 % bits:  # values may straddle two bytes
        hi_idx = np.minimum(lo_idx + 1, row_bytes - 1)
        hi = b.op("Cast", [b.op("Gather", [packed, b.const("hi_idx", hi_idx)], axis=1)], to=TensorProto.UINT32)
        hi = b.op("BitShift", [hi, b.const("eight", np.array(8, np.uint32))], direction="LEFT")
        lo = b.op("BitwiseOr", [lo, hi])
    v = b.op("BitShift", [lo, b.const("shift", shift)], direction="RIGHT")
    v = b.op("BitwiseAnd", [v, b.const("mask", np.array((1 << bits) - 1, np.uint32))])
    return b.op("Cast", [v], to=TensorProto.FLOAT)


def _scales_const(b: _Builder, scales: np.ndarray) -> str:
    """Scales as an initializer: float16 when that is exact (half the bytes), cast back in the graph."""
    from onnx import TensorProto

    half = scales.astype(np.float16)
    if np.isfinite(half).all() and np.array_equal(half.astype(np.float32), scales.astype(np.float32)):
        return b.op("Cast", [b.const("scales_f16", half)], to=TensorProto.FLOAT)
    return b.const("scales", scales.astype(np.float32))


def _dequantized_weight(b: _Builder, qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, g: int,
                        foldable: bool = False) -> str:
    """Graph value f32[N, K] equal to kernels.quant.dequantize (exact same arithmetic).

    `foldable`: use only ops that onnxruntime constant-folds (not DequantizeLinear, which it
    keeps on purpose), for weights that feed a computation it should see as a constant.
    """
    from onnx import TensorProto

    n, ngroups = scales.shape
    k = ngroups * g
    s_name = _scales_const(b, scales)
    if bits in (4, 8) and not foldable:  # standard blocked DequantizeLinear
        if _symmetric(zeros, bits):
            # every zero point is the midpoint: store signed codes (q - mid) and no zero points
            # (a default of 0); flipping the top bit of each code is exactly that subtraction
            if bits == 4:
                raw = qweight.tobytes() if k % 2 == 0 else _pack_nibbles(_unpack_rows(qweight, 4, k))
                signed = (np.frombuffer(raw, np.uint8) ^ 0x88).tobytes()
                q_name = b.raw("q_i4", TensorProto.INT4, [n, k], signed)
            else:
                q_name = b.const("q_i8", (qweight.astype(np.uint8) ^ 0x80).view(np.int8))
            return b.op("DequantizeLinear", [q_name, s_name], axis=1, block_size=g)
        if bits == 4:
            # ONNX packs uint4 over the flat tensor; our rows are byte-aligned (differs when K is odd)
            raw = qweight.tobytes() if k % 2 == 0 else _pack_nibbles(_unpack_rows(qweight, 4, k))
            q_name = b.raw("q_u4", TensorProto.UINT4, [n, k], raw)
            z_name = b.raw("zeros_u4", TensorProto.UINT4, [n, ngroups], _pack_nibbles(zeros))
        else:
            q_name = b.const("q_u8", qweight.astype(np.uint8))
            z_name = b.const("zeros_u8", zeros.astype(np.uint8))
        return b.op("DequantizeLinear", [q_name, s_name, z_name], axis=1, block_size=g)
    # 2 / 3 bits: decode the bit stream with integer ops
    q = _decode_codes(b, b.const("packed", qweight.astype(np.uint8)), bits, k, qweight.shape[1])
    q = b.op("Reshape", [q, b.const("grouped", np.array([n, ngroups, g], np.int64))])
    if _symmetric(zeros, bits):
        z = b.const("mid", np.array(1 << (bits - 1), np.float32))
    else:
        # uint8 on disk (a quarter of float32), cast in the graph: folded like the rest
        z = b.op("Cast", [b.const("zeros_u8", zeros.astype(np.uint8).reshape(n, ngroups, 1))], to=TensorProto.FLOAT)
    w = b.op("Mul", [b.op("Sub", [q, z]), b.const("scales3", scales.astype(np.float32).reshape(n, ngroups, 1))])
    return b.op("Reshape", [w, b.const("flat", np.array([n, k], np.int64))])


def _matmulnbits_ok(bits: int, g: int, options: OnnxExportSpec) -> bool:
    return options.matmulnbits and bits in MATMULNBITS_BITS and g >= 16 and (g & (g - 1)) == 0


def _matmulnbits(b: _Builder, node: Any, consts: dict[str, np.ndarray], accuracy_level: int) -> str:
    """`com.microsoft::MatMulNBits` over the packed rows (input 0 times the weight); its output name."""
    bits, g = _attr(node, "bits"), _attr(node, "group_size")
    qweight, scales, zeros = (_need(consts, node, i) for i in (1, 2, 3))
    n, ngroups = scales.shape
    k = ngroups * g
    blob = g * bits // 8
    q_name = b.const("B", qweight.reshape(n, ngroups, blob).astype(np.uint8))
    s_name = b.const("scales", scales.astype(np.float32).reshape(-1))
    if _symmetric(zeros, bits):
        z_name = ""  # MatMulNBits' default zero point is the midpoint 2**(bits-1)
    elif bits == 4:
        zp = np.concatenate([zeros.astype(np.uint8), np.zeros((n, ngroups % 2), np.uint8)], axis=1)
        zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
        z_name = b.const("zero_points", zp.reshape(-1))
    else:
        z_name = b.const("zero_points", zeros.astype(np.uint8).reshape(-1))
    inputs = [node.input[0], q_name, s_name] + ([z_name] if z_name else [])
    return b.op("MatMulNBits", inputs, domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=g,
                accuracy_level=accuracy_level)


def _expand_linear_q(b: _Builder, node: Any, consts: dict[str, np.ndarray]) -> None:
    bits, g = _attr(node, "bits"), _attr(node, "group_size")
    qweight, scales, zeros = (_need(consts, node, i) for i in (1, 2, 3))
    n, ngroups = scales.shape
    k = ngroups * g
    bias = node.input[4] if len(node.input) > 4 and node.input[4] else ""
    if _matmulnbits_ok(bits, g, b.options):
        y = _matmulnbits(b, node, consts, accuracy_level=0)
    else:
        w = _dequantized_weight(b, qweight, scales, zeros, bits, g)
        y = b.op("MatMul", [node.input[0], b.op("Transpose", [w], perm=[1, 0])])
    if bias:
        b.op("Add", [y, bias], outputs=[node.output[0]])
    else:
        b.op("Identity", [y], outputs=[node.output[0]])


def _expand_embedding_q(b: _Builder, node: Any, consts: dict[str, np.ndarray]) -> None:
    """A table that decodes to at most the export option `decode_tables_at_load_mb` is decoded by foldable ops
    (onnxruntime decodes it once at session start, then each call is a float Gather); a larger
    one gathers the packed rows (and their scales / zeros) first and decodes only those rows.

    Never dequantize-then-gather with DequantizeLinear: onnxruntime does not constant-fold it,
    so every call would decode the whole table (30k x 384 values for MiniLM).
    """
    from onnx import TensorProto

    bits, g = _attr(node, "bits"), _attr(node, "group_size")
    qweight, scales, zeros = (_need(consts, node, i) for i in (1, 2, 3))
    ngroups = scales.shape[1]
    k = ngroups * g
    if qweight.shape[0] * k * 4 <= b.options.decode_tables_at_load_mb * 2**20:
        table = _dequantized_weight(b, qweight, scales, zeros, bits, g, foldable=True)
        b.op("Gather", [table, node.input[0]], outputs=[node.output[0]], axis=0)
        return
    ids = b.op("Reshape", [node.input[0], b.const("flat", np.array([-1], np.int64))])
    rows = b.op("Gather", [b.const("packed", qweight.astype(np.uint8)), ids], axis=0)
    codes = _decode_codes(b, rows, bits, k, qweight.shape[1])
    codes = b.op("Reshape", [codes, b.const("grouped", np.array([-1, ngroups, g], np.int64))])
    axis2 = b.const("axis2", np.array([2], np.int64))
    if _symmetric(zeros, bits):
        centred = b.op("Sub", [codes, b.const("mid", np.array(1 << (bits - 1), np.float32))])
    else:
        z = b.op("Gather", [b.const("zeros", zeros.astype(np.uint8)), ids], axis=0)
        z = b.op("Unsqueeze", [b.op("Cast", [z], to=TensorProto.FLOAT), axis2])
        centred = b.op("Sub", [codes, z])
    s = b.op("Unsqueeze", [b.op("Gather", [_scales_const(b, scales), ids], axis=0), axis2])
    values = b.op("Mul", [centred, s])
    shape = b.op("Concat", [b.op("Shape", [node.input[0]]), b.const("width", np.array([k], np.int64))], axis=0)
    b.op("Reshape", [values, shape], outputs=[node.output[0]])


def _expand_dequantize_q(b: _Builder, node: Any, consts: dict[str, np.ndarray]) -> None:
    bits, g = _attr(node, "bits"), _attr(node, "group_size")
    qweight, scales, zeros = (_need(consts, node, i) for i in (0, 1, 2))
    w = _dequantized_weight(b, qweight, scales, zeros, bits, g)
    b.op("Identity", [w], outputs=[node.output[0]])


def _expand_qa8(b: _Builder, node: Any, consts: dict[str, np.ndarray]) -> None:
    """Packed codes -> int8 weight by folded ops, then the int8 pattern of `_expand_a8`."""
    from onnx import TensorProto

    bits, g = _attr(node, "bits"), _attr(node, "group_size")
    qweight, scales, zeros = (_need(consts, node, i) for i in (1, 2, 3))
    w_scale = _need(consts, node, 4).astype(np.float32)
    w = _dequantized_weight(b, qweight, scales, zeros, bits, g, foldable=True)
    q = b.op("Div", [w, b.const("w_scale_col", w_scale.reshape(-1, 1))])
    q = b.op("Clip", [b.op("Round", [q]), b.const("lo", np.array(-127, np.float32)), b.const("hi", np.array(127, np.float32))])
    w_t = b.op("Transpose", [b.op("Cast", [q], to=TensorProto.INT8)], perm=[1, 0])
    _int8_linear(b, node, w_t, w_scale, bias_at=5)


def _expand_qa8_group(b: _Builder, node: Any, consts: dict[str, np.ndarray]) -> None:
    """MatMulNBits with int8 compute (accuracy_level=4) on the packed codes, plus the bias."""
    bits, g = _attr(node, "bits"), _attr(node, "group_size")
    if not quant.group_int8_supported(bits, g):
        raise ValueError(f"{node.name!r}: int8 activations per group run on MatMulNBits, which takes 4- or 8-bit "
                         f"weights in power-of-two blocks >= 16, not {bits} bits in groups of {g}")
    y = _matmulnbits(b, node, consts, accuracy_level=4)
    bias = node.input[4] if len(node.input) > 4 and node.input[4] else ""
    b.op("Add" if bias else "Identity", [y, bias] if bias else [y], outputs=[node.output[0]])


def _expand_a8(b: _Builder, node: Any, consts: dict[str, np.ndarray], dynamic: bool) -> None:
    qweight = _need(consts, node, 1)
    w_scale = _need(consts, node, 2).astype(np.float32)
    w_t = b.const("w_t", np.ascontiguousarray(qweight.astype(np.int8).T))
    if dynamic:
        _int8_linear(b, node, w_t, w_scale, bias_at=3)
    else:
        _int8_linear(b, node, w_t, w_scale, bias_at=5, x_scale=_need(consts, node, 3).astype(np.float32))


def _int8_linear(b: _Builder, node: Any, w_t: str, w_scale: np.ndarray, bias_at: int,
                 x_scale: np.ndarray | None = None) -> None:
    """x (node input 0) quantized to uint8 (dynamic, or static at inputs 3/4 when x_scale is given),
    MatMulInteger with the int8 [K, N] weight `w_t`, rescaled, plus the bias at `bias_at`."""
    from onnx import TensorProto

    if x_scale is None:
        xq, xs, xz = b.op("DynamicQuantizeLinear", [node.input[0]], outputs=3)
        scale = b.op("Mul", [xs, b.const("w_scale", w_scale)])
    else:
        xs, xz = node.input[3], node.input[4]
        xq = b.op("QuantizeLinear", [node.input[0], xs, xz])
        scale = b.const("scale", (x_scale * w_scale).astype(np.float32))
    acc = b.op("MatMulInteger", [xq, w_t, xz])
    y = b.op("Mul", [b.op("Cast", [acc], to=TensorProto.FLOAT), scale])
    bias = node.input[bias_at] if len(node.input) > bias_at and node.input[bias_at] else ""
    if bias:
        b.op("Add", [y, bias], outputs=[node.output[0]])
    else:
        b.op("Identity", [y], outputs=[node.output[0]])


_EXPANDERS = {
    "LinearQ": _expand_linear_q,
    "EmbeddingQ": _expand_embedding_q,
    "DequantizeQ": _expand_dequantize_q,
    "LinearA8Dynamic": lambda b, n, c: _expand_a8(b, n, c, True),
    "LinearA8Static": lambda b, n, c: _expand_a8(b, n, c, False),
    "LinearQA8Dynamic": _expand_qa8,
    "LinearQA8Group": _expand_qa8_group,
}


@postprocess("onnx")
def expand_placeholders(model: Any, options: OnnxExportSpec | None = None, consts: Mapping[str, np.ndarray] | None = None,
                        emit: Callable[[list[Any]], None] | None = None) -> None:
    """Post-export step: replace `rewrite.quant` placeholders by runnable ops, in place.

    `consts`: where the placeholders' constant inputs are read (default: every initializer and
    Constant of the model, decoded at once). A streamed export of a model larger than memory
    passes a lazy mapping that reads one tensor from disk when a placeholder asks for it, and
    `emit`, called with each placeholder's new initializers before they join the graph, so it
    can move their bytes to the external-data file (one linear's tensors in memory at a time).
    """
    from onnx import helper

    options = options or OnnxExportSpec()
    graph = model.graph
    if not any(n.domain == DOMAIN for n in graph.node):
        return
    consts = _constants(model) if consts is None else consts
    new_nodes: list[Any] = []
    uses_ms = False
    for i, node in enumerate(graph.node):
        if node.domain != DOMAIN:
            new_nodes.append(node)
            continue
        if node.op_type not in _EXPANDERS:
            raise ValueError(f"no ONNX expansion for {DOMAIN}::{node.op_type}")
        b = _Builder(model, f"{node.name or node.op_type}_{i}", options)
        _EXPANDERS[node.op_type](b, node, consts)
        if emit is not None:
            emit(b.inits)
        new_nodes.extend(b.nodes)
        graph.initializer.extend(b.inits)
        uses_ms |= b.uses_ms
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused_initializers(model)
    imports = [o for o in model.opset_import if o.domain != DOMAIN]
    if uses_ms and not any(o.domain == MS_DOMAIN for o in imports):
        imports.append(helper.make_opsetid(MS_DOMAIN, 1))
    del model.opset_import[:]
    model.opset_import.extend(imports)
    for f in list(model.functions):  # functions can't reference the placeholder domain any more
        if f.domain == DOMAIN:
            model.functions.remove(f)


def _drop_unused_initializers(model: Any) -> None:
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    constant_nodes = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]
    for n in constant_nodes:
        graph.node.remove(n)


_register_schemas()
