"""Quantized ops of rewritten graphs: packed low-bit linear and embedding, int8-activation linear.

The numerics (the TVM kernels and the ONNX lowering follow exactly this definition):

    torch.ops.rewrite.linear_q(x: f32[..., K], qweight: u8[N, ceil(K*bits/8)], scales: f32[N, K//g],
                               zeros: u8[N, K//g], bias: f32[N] | None, bits: int, group_size: int) -> f32[..., N]
    W[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g];   y = x @ W.T + bias

q is packed along K per row as a little-endian bit stream: value k of a row occupies bits
[k*bits, (k+1)*bits) of that row's bytes (byte 0 holds bits 0..7); for bits=3 a value may
straddle two bytes. Symmetric quantization stores zeros = 2**(bits-1). g divides K.

- `embedding_q(ids, qweight, scales, zeros, bits, group_size)`: rows of a table packed the
  same way, groups along the embedding dim; returns the dequantized rows `W[ids]`.
- `dequantize_q(qweight, scales, zeros, bits, group_size)`: the f32[N, K] weight itself (for
  convolutions, whose weight is reshaped back to [Cout, Cin/groups, kh, kw] in the graph).
- `linear_a8_dynamic(x, qweight: i8[N, K], w_scale: f32[N], bias)`: int8 activations with a
  per-tensor range measured on each call (exactly ONNX DynamicQuantizeLinear: u8, asymmetric,
  range widened to include 0), int8 symmetric per-channel weights, exact integer accumulation.
- `linear_a8_static(x, qweight, w_scale, x_scale: f32[], x_zero: u8[], bias)`: the same with a
  calibrated per-tensor scale and zero point (ONNX QuantizeLinear).
- `linear_qa8_dynamic(x, qweight, scales, zeros, w_scale: f32[N], bias, bits, group_size)`: low-bit
  storage, int8 compute. The packed weight W (as in `linear_q`) is requantized per output channel
  to int8, `clamp(round(W / w_scale[n]), -127, 127)`, and multiplied like `linear_a8_dynamic`.
  A file holds the 2..8-bit codes; a runtime folds the requantization once at load and runs its
  int8 GEMM (weight-only 4-bit kernels on CPU compute in float and are no faster than fp32).
- `linear_qa8_group(x, qweight, scales, zeros, bias, bits, group_size)`: low-bit storage, int8
  compute with activations quantized per token and per K-group of the weight's `group_size`
  (`group_activation_codes`: symmetric, scale = absmax / 127), multiplied with the weight's own
  codes: y[m, n] = sum_b a_scale[m, b] * scales[n, b] * sum_{k in b} a[m, k] * (q[n, k] - zeros[n, b]).
  This is exactly onnxruntime's MatMulNBits with accuracy_level=4 (MLAS SQNBitGemm CompInt8:
  A quantized row by row in blocks of BlkLen, `QuantizeARow_CompInt8`), the integer part exact;
  only the float order of the block sums differs. No requantized int8 weight: the packed codes
  are the compute weight, so the runtime keeps 4 bits in memory as well as on disk.

This package is the ops' definition (reference and fake implementations, FLOP formulas); their
lowerings sit next to it: `onnx_lowering` (ONNX placeholders and their expansion) and `tvm_kernel`
(generated TensorIR kernels and Relax converters), each registered per op with
`kernels.registry.lowering`.
"""
from __future__ import annotations

import math

import torch
import torch.fx

# ----------------------------------------------------------------------------- packing


def packed_width(k: int, bits: int) -> int:
    """Bytes per row of `k` values of `bits` bits."""
    return math.ceil(k * bits / 8)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """u8[N, K] values < 2**bits -> u8[N, ceil(K*bits/8)], little-endian bit stream per row."""
    _check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"pack expects a 2-D [N, K] tensor, got shape {tuple(q.shape)}")
    if q.numel() and int(q.max()) >= (1 << bits):
        raise ValueError(f"pack: a value {int(q.max())} does not fit in {bits} bits")
    n, k = q.shape
    if bits == 8:
        return q.to(torch.uint8).contiguous()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole values per byte, value j of a byte at bits [j*bits, (j+1)*bits)
        per = 8 // bits
        q = torch.nn.functional.pad(q.to(torch.uint8), (0, packed_width(k, bits) * per - k)).reshape(n, -1, per)
        out = q[..., 0].clone()
        for j in range(1, per):
            out |= q[..., j] << (j * bits)
        return out
    shifts = torch.arange(bits, dtype=torch.int32)
    stream = ((q.to(torch.int32).unsqueeze(-1) >> shifts) & 1).reshape(n, k * bits)
    width = packed_width(k, bits)
    stream = torch.nn.functional.pad(stream, (0, width * 8 - k * bits))
    weights = (1 << torch.arange(8, dtype=torch.int32))
    return (stream.reshape(n, width, 8) * weights).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack`: u8[..., ceil(K*bits/8)] -> u8[..., K]."""
    _check_bits(bits)
    if packed.shape[-1] != packed_width(k, bits):
        raise ValueError(f"unpack: {packed.shape[-1]} bytes per row cannot hold {k} values of {bits} bits "
                         f"(expected {packed_width(k, bits)})")
    if bits == 8:
        return packed.to(torch.uint8)
    lead = packed.shape[:-1]
    if 8 % bits == 0:  # the fast path of `pack`, inverted
        per, mask = 8 // bits, (1 << bits) - 1
        parts = [(packed >> (j * bits)) & mask for j in range(per)]
        return torch.stack(parts, dim=-1).reshape(*lead, -1)[..., :k].to(torch.uint8)
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1)
    stream = stream.reshape(*lead, -1)[..., : k * bits].reshape(*lead, k, bits)
    return (stream << torch.arange(bits, dtype=torch.int32)).sum(-1).to(torch.uint8)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int, k: int) -> torch.Tensor:
    """f32[..., K]: (q - zeros[group]) * scales[group], groups of `group_size` along K."""
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide K={k}")
    q = unpack(qweight, bits, k).to(torch.float32)
    lead = q.shape[:-1]
    q = q.reshape(*lead, k // group_size, group_size)
    w = (q - zeros.to(torch.float32).unsqueeze(-1)) * scales.to(torch.float32).unsqueeze(-1)
    return w.reshape(*lead, k)


def _check_bits(bits: int) -> None:
    if bits not in (1, 2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"bits must be between 1 and 8, got {bits}")


# ------------------------------------------------------------------------ quantizing


def group_params(w: torch.Tensor, bits: int, symmetric: bool, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale f32[...], zero f32[...]) for groups along the last dim of `w` (min/max, optionally clipped).

    Asymmetric: the group's [min, max] (shrunk by `clip`, widened to include 0) maps onto
    [0, 2**bits - 1]. Symmetric: zero = 2**(bits-1) and |w|max maps to the largest positive level.
    """
    qmax = (1 << bits) - 1
    if symmetric:
        amax = w.abs().amax(-1) * clip
        scale = (amax / max((1 << (bits - 1)) - 1, 1)).clamp_min(1e-10)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
        return scale, zero
    lo = (w.amin(-1) * clip).clamp_max(0.0)
    hi = (w.amax(-1) * clip).clamp_min(0.0)
    scale = ((hi - lo) / qmax).clamp_min(1e-10)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer levels (as float) of `w` [..., g] for per-group scale/zero [...]."""
    return torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, (1 << bits) - 1)


def search_group_params(wg: torch.Tensor, bits: int, symmetric: bool, importance: torch.Tensor | None = None,
                        steps: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per group of `wg` [..., g], the group's range shrunk by the ratio in 1.0 .. 0.5
    (`steps` + 1 candidates) with the smallest error sum_j importance_j (w_j - dequant(q_j))^2.

    Why: min/max ranges spend levels on the one outlier of a group; shrinking clips it and rounds
    the other weights finer. `importance` (broadcastable to `wg`, e.g. the inputs' second moment
    diag(X^T X) per column) makes the error the expected OUTPUT error of the group under independent
    inputs, so columns that see large activations are rounded more carefully; None: plain weight MSE.
    """
    def err(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        d = (wg - (quantize_with(wg, s, z, bits) - z.unsqueeze(-1)) * s.unsqueeze(-1)) ** 2
        return (d * importance if importance is not None else d).sum(-1)

    scale, zero = group_params(wg, bits, symmetric)
    best = err(scale, zero)
    for ratio in torch.linspace(1.0, 0.5, steps + 1)[1:].tolist():
        s, z = group_params(wg, bits, symmetric, ratio)
        e = err(s, z)
        better = e < best
        best = torch.where(better, e, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                    clip_search: bool = False, fp16_scales: bool = False,
                    importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: f32[N, K] -> (q u8[N, K], scales f32[N, K//g], zeros u8[N, K//g]).

    `clip_search` tries shrinking each group's range (1.0 down to 0.5) and keeps the ratio
    with the smallest squared weight error (helps at 2-3 bits, where outliers waste levels),
    each column's error weighted by `importance` f32[K] when given (`search_group_params`).
    `fp16_scales` rounds scales to float16-representable values (still f32 tensors) so that a
    backend may store them in half the bytes with identical numerics.
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide K={k}")
    wg = w.detach().to(torch.float32).reshape(n, k // group_size, group_size)
    if clip_search:
        imp = importance.detach().to(torch.float32).reshape(1, k // group_size, group_size) if importance is not None else None
        scale, zero = search_group_params(wg, bits, symmetric, imp)
    else:
        scale, zero = group_params(wg, bits, symmetric)
    if fp16_scales:
        scale = scale.clamp(6.2e-5, 6.0e4).half().float()
    q = quantize_with(wg, scale, zero, bits).reshape(n, k)
    return q.to(torch.uint8), scale, zero.to(torch.uint8)


def quantize_int8_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 for int8-activation linears: (i8[N, K], scale f32[N])."""
    scale = (w.detach().abs().amax(-1) / 127.0).clamp_min(1e-10).to(torch.float32)
    q = torch.clamp(torch.round(w.detach() / scale.unsqueeze(-1)), -127, 127).to(torch.int8)
    return q, scale


def dynamic_activation_params(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear's (scale f32[], zero u8[]) for a tensor."""
    lo = torch.clamp(x.amin(), max=0.0) if x.numel() else x.new_zeros(())
    hi = torch.clamp(x.amax(), min=0.0) if x.numel() else x.new_zeros(())
    scale = (hi - lo) / 255.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-lo / safe), 0, 255)
    return scale.to(torch.float32), zero.to(torch.uint8)


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("rewrite::linear_q", mutates_args=())
def linear_q(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    k = x.shape[-1]
    w = dequantize(qweight, scales, zeros, bits, group_size, k)
    return torch.nn.functional.linear(x, w, bias)


@linear_q.register_fake
def _linear_q_fake(x, qweight, scales, zeros, bias, bits, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("rewrite::embedding_q", mutates_args=())
def embedding_q(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bits: int, group_size: int) -> torch.Tensor:
    d = scales.shape[-1] * group_size
    return dequantize(qweight[ids], scales[ids], zeros[ids], bits, group_size, d)


@embedding_q.register_fake
def _embedding_q_fake(ids, qweight, scales, zeros, bits, group_size):
    return scales.new_empty(*ids.shape, scales.shape[-1] * group_size)


@torch.library.custom_op("rewrite::dequantize_q", mutates_args=())
def dequantize_q(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    return dequantize(qweight, scales, zeros, bits, group_size, scales.shape[-1] * group_size)


@dequantize_q.register_fake
def _dequantize_q_fake(qweight, scales, zeros, bits, group_size):
    return scales.new_empty(scales.shape[0], scales.shape[-1] * group_size)


def _int8_matmul(xq: torch.Tensor, x_zero: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """Exact integer accumulation of (xq - zero) @ qweight.T (float64 holds every partial sum exactly)."""
    a = xq.to(torch.float64) - x_zero.to(torch.float64)
    return (a @ qweight.to(torch.float64).T).to(torch.float32)


def _a8_dynamic(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    scale, zero = dynamic_activation_params(x)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    xq = torch.clamp(torch.round(x / safe) + zero.to(torch.float32), 0, 255)
    y = _int8_matmul(xq, zero, qweight) * (scale * w_scale)
    return y + bias if bias is not None else y


def group_int8_supported(bits: int, group_size: int) -> bool:
    """Whether `linear_qa8_group` runs on the runtime's int8 kernel for packed weights
    (onnxruntime MatMulNBits: 4 or 8 bits, power-of-two blocks of at least 16)."""
    return bits in (4, 8) and group_size >= 16 and group_size & (group_size - 1) == 0


def group_activation_codes(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes f32[..., K//g, g] in [-127, 127], scale f32[..., K//g]) of the activations `x` [..., K].

    onnxruntime's CompInt8 row quantization, operation for operation (float32): per block of g
    values, amax = max|x|, scale = amax / 127, codes = round_half_even(x * (127 / amax)) (0 when
    amax is 0). Multiplying by the reciprocal, not dividing by the scale, is what the runtime does,
    and it rounds differently for a few values, so the reference does the same.
    """
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide K={k}")
    xg = x.to(torch.float32).reshape(*x.shape[:-1], k // group_size, group_size)
    amax = xg.abs().amax(-1)
    inv = torch.where(amax != 0, torch.tensor(127.0, dtype=torch.float32) / amax.clamp_min(1e-38), torch.zeros_like(amax))
    codes = torch.round(xg * inv.unsqueeze(-1)).clamp(-127, 127)
    return codes, amax / torch.tensor(127.0, dtype=torch.float32)


def _qa8_group(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    k = x.shape[-1]
    n, ngroups = scales.shape
    codes, a_scale = group_activation_codes(x.reshape(-1, k), group_size)          # [M, G, g], [M, G]
    w = unpack(qweight, bits, k).to(torch.float32).reshape(n, ngroups, group_size)
    w = w - zeros.to(torch.float32).unsqueeze(-1)                                 # centred integer codes
    # every partial sum is an integer below 127 * 255 * g: exact in float32 while that is < 2**24
    exact = torch.float32 if 127 * 255 * group_size < 2 ** 24 else torch.float64
    y = x.new_zeros(codes.shape[0], n, dtype=torch.float32)
    for b in range(ngroups):
        acc = (codes[:, b].to(exact) @ w[:, b].to(exact).T).to(torch.float32)
        y += acc * (a_scale[:, b, None] * scales[None, :, b].to(torch.float32))
    y = y.reshape(*x.shape[:-1], n)
    return y + bias if bias is not None else y


def requantize_int8(w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """i8[N, K] codes of a float weight on a given per-channel scale (the int8 compute weight)."""
    return torch.clamp(torch.round(w / w_scale.unsqueeze(-1)), -127, 127).to(torch.int8)


@torch.library.custom_op("rewrite::linear_a8_dynamic", mutates_args=())
def linear_a8_dynamic(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _a8_dynamic(x, qweight, w_scale, bias)


@linear_a8_dynamic.register_fake
def _linear_a8_dynamic_fake(x, qweight, w_scale, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("rewrite::linear_qa8_dynamic", mutates_args=())
def linear_qa8_dynamic(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       w_scale: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    w = dequantize(qweight, scales, zeros, bits, group_size, x.shape[-1])
    return _a8_dynamic(x, requantize_int8(w, w_scale), w_scale, bias)


@linear_qa8_dynamic.register_fake
def _linear_qa8_dynamic_fake(x, qweight, scales, zeros, w_scale, bias, bits, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("rewrite::linear_qa8_group", mutates_args=())
def linear_qa8_group(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    return _qa8_group(x, qweight, scales, zeros, bias, bits, group_size)


@linear_qa8_group.register_fake
def _linear_qa8_group_fake(x, qweight, scales, zeros, bias, bits, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("rewrite::linear_a8_static", mutates_args=())
def linear_a8_static(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, x_scale: torch.Tensor,
                     x_zero: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    xq = torch.clamp(torch.round(x / x_scale) + x_zero.to(torch.float32), 0, 255)
    y = _int8_matmul(xq, x_zero, qweight) * (x_scale * w_scale)
    return y + bias if bias is not None else y


@linear_a8_static.register_fake
def _linear_a8_static_fake(x, qweight, w_scale, x_scale, x_zero, bias):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


INT8_ACTIVATION_CHECK = (0.05, 0.99)
"""Default backend check (relative tolerance, fraction of output values within it) for graphs
that quantize activations. Each int8 op matches its reference exactly in onnxruntime
(tests/test_quant_kernels.py), but the graph is piecewise constant: a 1e-7 difference in an
earlier float op (layer norm, GELU, softmax) can flip one activation's rounding, the flips add
up over layers, and after a top-k token selection one flip can swap a kept token, which moves a
whole row of the output. A lowering bug moves most values; rounding flips move a few."""


def rounds_activations(graph: torch.fx.Graph) -> bool:
    """Whether the graph quantizes activations (int8-compute linears)."""
    ops = torch.ops.rewrite
    targets = {ops.linear_a8_dynamic.default, ops.linear_qa8_dynamic.default, ops.linear_qa8_group.default,
               ops.linear_a8_static.default}
    return any(n.op == "call_function" and n.target in targets for n in graph.nodes)


def _register_flops() -> None:
    """Count the quantized linears like the float ones they replace (FLOPs are logical work)."""
    try:
        from torch.utils.flop_counter import register_flop_formula
    except ImportError:  # pragma: no cover
        return
    ops = torch.ops.rewrite
    for op in (ops.linear_q, ops.linear_a8_dynamic, ops.linear_qa8_dynamic, ops.linear_qa8_group, ops.linear_a8_static):
        try:
            register_flop_formula(op)(lambda x_shape, w_shape, *a, out_shape=None, **k: 2 * math.prod(x_shape) * w_shape[0])
        except Exception:  # noqa: BLE001 - already registered on re-import
            pass


_register_flops()
