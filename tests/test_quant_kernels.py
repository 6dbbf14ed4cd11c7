"""Quantized ops: packing against hand computations, reference numerics, ONNX lowering in onnxruntime."""
import contextlib
import io

import numpy as np
import pytest
import torch

import rewrite.kernels.quant as kq
from rewrite.kernels import registry
from rewrite.spec import OnnxExportSpec


def test_pack_hand_computed_3bit_stream():
    # values 1..7, 0 at 3 bits: bit stream (LSB first) 001 010 011 100 101 110 111 000
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    packed = kq.pack(q, 3)
    assert packed.tolist() == [[0b11010001, 0b01011000, 0b00011111]]  # value 2 straddles bytes 0/1
    assert kq.unpack(packed, 3, 8).tolist() == q.tolist()


def test_pack_hand_computed_2_4_8bit():
    q = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    assert kq.pack(q, 2).tolist() == [[1 | 2 << 2 | 3 << 4 | 0 << 6, 3]]
    q4 = torch.tensor([[0x1, 0xF, 0x7]], dtype=torch.uint8)
    assert kq.pack(q4, 4).tolist() == [[0xF1, 0x07]]  # low nibble first
    q8 = torch.tensor([[7, 200]], dtype=torch.uint8)
    assert kq.pack(q8, 8).tolist() == [[7, 200]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 1 << bits, (7, 37), generator=g, dtype=torch.uint8)
    packed = kq.pack(q, bits)
    assert packed.shape == (7, (37 * bits + 7) // 8)
    assert torch.equal(kq.unpack(packed, bits, 37), q)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="does not fit"):
        kq.pack(torch.tensor([[4]], dtype=torch.uint8), 2)


def test_dequantize_definition_by_hand():
    # N=1, K=4, g=2, bits=4: W[k] = (q[k] - zeros[k//2]) * scales[k//2]
    q = torch.tensor([[3, 5, 0, 15]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 2.0]])
    zeros = torch.tensor([[4, 8]], dtype=torch.uint8)
    w = kq.dequantize(kq.pack(q, 4), scales, zeros, 4, 2, 4)
    assert w.tolist() == [[-0.5, 0.5, -16.0, 14.0]]


@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, False), (4, True), (8, False)])
def test_quantize_groups_error_bound(bits, symmetric):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q, s, z = kq.quantize_groups(w, bits, 16, symmetric)
    if symmetric:
        assert (z == 1 << (bits - 1)).all()
    deq = kq.dequantize(kq.pack(q, bits), s, z, bits, 16, 64)
    step = s.repeat_interleave(16, 1)
    assert ((deq - w).abs() <= step * 0.5 + 1e-6).all()  # round to nearest within range


def test_linear_q_and_embedding_q_reference():
    torch.manual_seed(0)
    w, b = torch.randn(5, 32), torch.randn(5)
    q, s, z = kq.quantize_groups(w, 3, 8)
    qw = kq.pack(q, 3)
    wd = kq.dequantize(qw, s, z, 3, 8, 32)
    x = torch.randn(2, 4, 32)
    assert torch.allclose(torch.ops.rewrite.linear_q(x, qw, s, z, b, 3, 8), x @ wd.T + b, atol=1e-5)
    ids = torch.tensor([[4, 0, 4]])
    e = torch.ops.rewrite.embedding_q(ids, qw, s, z, 3, 8)
    assert torch.equal(e, wd[ids])


def test_linear_a8_dynamic_matches_onnx_definition():
    x = torch.tensor([[-1.0, 0.5, 2.0]])  # range [-1, 2] -> scale 3/255, zero round(85) = 85
    scale, zero = kq.dynamic_activation_params(x)
    assert abs(float(scale) - 3 / 255) < 1e-9 and int(zero) == 85
    w = torch.tensor([[1.0, -2.0, 0.5]])
    qw, ws = kq.quantize_int8_channel(w)
    assert qw.tolist() == [[64, -127, 32]]  # round(w / (2/127))
    y = torch.ops.rewrite.linear_a8_dynamic(x, qw, ws, None)
    xq = torch.clamp(torch.round(x / scale) + 85, 0, 255) - 85
    assert torch.allclose(y, (xq @ qw.float().T) * (scale * ws))
    assert torch.allclose(y, x @ w.T, atol=0.05)


def test_linear_qa8_dynamic_is_requantized_int8_linear():
    # 4-bit codes, per-channel symmetric: requantizing on the 4-bit scale gives the codes back exactly
    torch.manual_seed(0)
    w = torch.randn(6, 32)
    q, s, z = kq.quantize_groups(w, 4, 32, symmetric=True)
    qw = kq.pack(q, 4)
    x = torch.randn(3, 32)
    y = torch.ops.rewrite.linear_qa8_dynamic(x, qw, s, z, s[:, 0], None, 4, 32)
    codes = q.to(torch.int8) - 8
    assert torch.equal(kq.requantize_int8(kq.dequantize(qw, s, z, 4, 32, 32), s[:, 0]), codes)
    assert torch.equal(y, torch.ops.rewrite.linear_a8_dynamic(x, codes, s[:, 0], None))


class _AllOps(torch.nn.Module):
    def __init__(self, bits: int, g: int, k: int = 64, n: int = 48, symmetric: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(bits * 100 + g)
        w = torch.randn(n, k, generator=gen)
        q, s, z = kq.quantize_groups(w, bits, g, symmetric)
        self.register_buffer("qw", kq.pack(q, bits))
        self.register_buffer("sc", s)
        self.register_buffer("z", z)
        self.bias = torch.nn.Parameter(torch.randn(n, generator=gen))
        e = torch.randn(50, k, generator=gen)
        q, s, z = kq.quantize_groups(e, bits, g, symmetric)
        self.register_buffer("eq", kq.pack(q, bits))
        self.register_buffer("es", s)
        self.register_buffer("ez", z)
        wi, ws = kq.quantize_int8_channel(torch.randn(n, n, generator=gen))
        self.register_buffer("wi", wi)
        self.register_buffer("ws", ws)
        w8_scale = kq.dequantize(self.qw, self.sc, self.z, bits, g, k).abs().amax(-1) / 127.0
        self.register_buffer("w8s", w8_scale)
        self.register_buffer("xs", torch.tensor(0.05))
        self.register_buffer("xz", torch.tensor(128, dtype=torch.uint8))
        self.bits, self.g = bits, g

    def forward(self, ids):
        h = torch.ops.rewrite.embedding_q(ids, self.eq, self.es, self.ez, self.bits, self.g)
        h = torch.ops.rewrite.linear_q(h, self.qw, self.sc, self.z, self.bias, self.bits, self.g)
        w = torch.ops.rewrite.dequantize_q(self.qw, self.sc, self.z, self.bits, self.g)
        a = torch.ops.rewrite.linear_a8_dynamic(h, self.wi, self.ws, self.bias)
        c = torch.ops.rewrite.linear_a8_static(h @ w[:, :48], self.wi, self.ws, self.xs, self.xz, None)
        d = torch.ops.rewrite.linear_qa8_dynamic(h @ w, self.qw, self.sc, self.z, self.w8s, self.bias, self.bits, self.g)
        return h, a, c, d


def _lower(m: torch.nn.Module, ids: torch.Tensor, options=None):
    ep = torch.export.export(m, (ids,))
    with contextlib.redirect_stdout(io.StringIO()):
        prog = torch.onnx.export(ep, dynamo=True, opset_version=21, optimize=True,
                                 custom_translation_table=registry.onnx_translations())
    proto = prog.model_proto
    for post in registry.onnx_postprocess():
        post(proto, options or OnnxExportSpec())
    return proto


def _assert_onnxruntime_matches(proto, m, ids, path) -> None:
    import onnx
    import onnxruntime as ort

    onnx.save(proto, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        ref = m(ids)
    for g_, r in zip(got, ref):
        r = r.numpy()
        assert np.abs(g_ - r).max() <= 1e-5 * np.abs(r).max()


@pytest.mark.parametrize("bits,g", [(4, 32), (4, 8), (8, 8), (3, 16)])
def test_symmetric_lowering_stores_no_zero_points(bits, g, tmp_path):
    import onnx

    registry.load_all()
    m = _AllOps(bits, g, symmetric=True).eval()
    ids = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(2))
    proto = _lower(m, ids)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            assert len(node.input) == 3  # onnxruntime's default zero point is the midpoint
        if node.op_type == "DequantizeLinear" and bits in (4, 8):
            assert len(node.input) == 2
    types = {t.data_type for t in proto.graph.initializer}
    if bits == 4 and g == 8:  # blocked DequantizeLinear on signed codes
        assert onnx.TensorProto.INT4 in types and onnx.TensorProto.UINT4 not in types
    assert not any("zero" in t.name for t in proto.graph.initializer)
    _assert_onnxruntime_matches(proto, m, ids, tmp_path / "m.onnx")


@pytest.mark.parametrize("bits,g,expect", [(2, 16, "BitShift"), (3, 16, "BitwiseOr"), (4, 32, "MatMulNBits"),
                                           (4, 8, "DequantizeLinear"), (8, 32, "MatMulNBits")])
def test_onnx_lowering_matches_reference(bits, g, expect, tmp_path):
    registry.load_all()
    m = _AllOps(bits, g).eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    proto = _lower(m, ids)
    ops = {n.op_type for n in proto.graph.node}
    assert expect in ops and not any(n.domain == "rewrite.quant" for n in proto.graph.node)
    _assert_onnxruntime_matches(proto, m, ids, tmp_path / "m.onnx")
    # the packed bytes are what the file stores: low-bit weights do not widen on disk beyond uint8 rows
    if bits in (2, 3):
        sizes = {t.name: len(t.raw_data) for t in proto.graph.initializer}
        assert any(v == m.qw.numel() for v in sizes.values())
    # the int8-compute linear keeps its packed codes on disk; only the folded int8 weight feeds MatMulInteger
    stored = {t.name for t in proto.graph.initializer}
    assert [n.input[1] in stored for n in proto.graph.node if n.op_type == "MatMulInteger"] == [True, True, False]


def test_matmulnbits_export_option_off_lowers_with_standard_ops(tmp_path):
    """`matmulnbits: false`: a 4-bit linear that would run on MatMulNBits is dequantized by standard ops."""
    registry.load_all()
    m = _AllOps(4, 32).eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(4))
    assert "MatMulNBits" in {n.op_type for n in _lower(m, ids).graph.node}
    proto = _lower(m, ids, OnnxExportSpec(matmulnbits=False))
    ops = {n.op_type for n in proto.graph.node}
    assert "MatMulNBits" not in ops and "DequantizeLinear" in ops
    _assert_onnxruntime_matches(proto, m, ids, tmp_path / "standard.onnx")


@pytest.mark.parametrize("bits", [3, 4])
def test_embedding_tables_decode_at_load_or_per_call(bits, tmp_path):
    """Small tables decode once (folded: a float Gather per call); above the limit, packed rows are gathered first."""

    registry.load_all()
    m = _AllOps(bits, 16, symmetric=True).eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(3))

    def gathers_packed_rows(proto) -> bool:
        packed = {t.name for t in proto.graph.initializer if t.data_type == 2 and list(t.dims[:1]) == [50]}  # uint8 [50, row bytes]
        row_gathers = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in packed
                       and all(a.i == 0 for a in n.attribute if a.name == "axis")]
        return bool(row_gathers)

    proto = _lower(m, ids)
    assert not gathers_packed_rows(proto)
    _assert_onnxruntime_matches(proto, m, ids, tmp_path / "load.onnx")
    proto = _lower(m, ids, OnnxExportSpec(decode_tables_at_load_mb=0))
    assert gathers_packed_rows(proto)
    _assert_onnxruntime_matches(proto, m, ids, tmp_path / "per_call.onnx")


def test_group_activation_codes_by_hand():
    # one token, two groups of 4: scale = absmax / 127, codes = round-half-even(x * 127 / absmax)
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0, 0.0, 0.0, 0.0, 0.0]])
    codes, scale = kq.group_activation_codes(x, 4)
    assert torch.equal(codes[0, 0], torch.tensor([32.0, -64.0, 16.0, 127.0]))  # 31.75 -> 32, 15.875 -> 16
    assert torch.equal(codes[0, 1], torch.zeros(4)) and scale[0, 1] == 0  # an all-zero group
    assert torch.isclose(scale[0, 0], torch.tensor(4.0 / 127))


@pytest.mark.parametrize("bits,g,symmetric", [(4, 32, True), (4, 64, False), (8, 16, False)])
def test_linear_qa8_group_matches_matmulnbits_int8_compute(bits, g, symmetric, tmp_path):
    """The torch op against onnxruntime's MatMulNBits with accuracy_level=4, one op: equal to float
    rounding (a per-tensor or float reference is ~1% off), with outlier channels in the input."""
    import onnxruntime as ort

    registry.load_all()

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(bits + g)
            q, s, z = kq.quantize_groups(torch.randn(40, 128, generator=gen), bits, g, symmetric)
            self.register_buffer("qw", kq.pack(q, bits))
            self.register_buffer("sc", s)
            self.register_buffer("z", z)
            self.bias = torch.nn.Parameter(torch.randn(40, generator=gen))

        def forward(self, x):
            return torch.ops.rewrite.linear_qa8_group(x, self.qw, self.sc, self.z, self.bias, bits, g)

    m = One().eval()
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.05, 1, 128)
    x[..., 7] *= 40  # an outlier channel: per-group ranges keep the other groups' resolution
    proto = _lower(m, x)
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 1 and {a.name: a.i for a in nbits[0].attribute}["accuracy_level"] == 4
    import onnx

    onnx.save(proto, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = m(x).numpy()
        flt = (x @ kq.dequantize(m.qw, m.sc, m.z, bits, g, 128).T + m.bias).numpy()
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= 1e-5 * scale
    assert np.abs(flt - ref).max() > 100 * np.abs(got - ref).max()  # the activation rounding is really modelled
