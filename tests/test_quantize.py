"""The quantize pass: allocation by hand, methods against RTN, spec files and every zoo model in onnxruntime."""
from pathlib import Path

import pytest
import torch

import rewrite
from rewrite.kernels import quant as kq
from rewrite.passes import quantize as qp
from rewrite.passes import quantize_methods as qm
from rewrite import zoo
from tiers import sweep

SPECS = Path(__file__).resolve().parents[1] / "specs"


def test_allocate_layerwise_by_hand():
    units = {"l0": 100, "l1": 100, "l2": 100, "l3": 100}
    scores = {"l0": 0.9, "l1": 0.1, "l2": 0.5, "l3": 0.3}
    a = qp.allocate_layerwise(units, scores, [2, 4, 8], 3.0)
    # start at 4 bits; the two least important (l1, l3) move to 2 -> average exactly 3.0
    assert a.bits == {"l0": 4, "l1": 2, "l2": 4, "l3": 2} and a.average == 3.0
    r = qp.allocate_layerwise(units, scores, [2, 4, 8], 3.0, order="reverse")
    assert r.bits == {"l0": 2, "l1": 4, "l2": 2, "l3": 4}
    # fractional average between 4 and 8, weighted by size: 8-bit start, lower the least important
    b = qp.allocate_layerwise({"a": 300, "b": 100}, {"a": 1.0, "b": 0.0}, [4, 8], 7.0)
    assert b.bits == {"a": 8, "b": 4} and b.average == 7.0
    # protected (unscored) units are lowered last
    c = qp.allocate_layerwise(units, {"l0": 0.9, "l1": 0.8}, [2, 4], 3.5, protected={"l2", "l3"})
    assert c.bits == {"l0": 4, "l1": 2, "l2": 4, "l3": 4}
    rnd = qp.allocate_layerwise(units, scores, [2, 4], 3.0, order="random", seed=1)
    assert sorted(rnd.bits.values()) == [2, 2, 4, 4]


def _layer_with_inputs(seed=0, n=32, k=64, rows=512):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    # correlated inputs with a few salient channels: where GPTQ and AWQ beat RTN
    x = torch.randn(rows, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    x[:, :4] *= 8
    st = qm.InputStats(k)
    st.update(x, want_gram=True)
    return w, x, st


def test_gptq_and_awq_reduce_output_error_vs_rtn():
    w, x, st = _layer_with_inputs()
    ref = x @ w.T
    err = lambda wq: float(((x @ wq.T - ref) ** 2).sum() / (ref ** 2).sum())  # noqa: E731
    e_rtn = err(qm.rtn(w, 3, 16, False).weight())
    e_gptq = err(qm.gptq(w, st.hessian, 3, 16, False).weight())
    s, alpha, _ = qm.awq_scales([w], st, 3, 16, False)
    e_awq = err(qm.rtn(w * s, 3, 16, False, clip_search=True).weight() / s)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert e_awq < e_rtn and alpha > 0, (e_awq, e_rtn, alpha)


def test_gptq_levels_fit_the_layout():
    w, _, st = _layer_with_inputs(1)
    q = qm.gptq(w, st.hessian, 4, 16, True)
    assert q.qweight.shape == (32, 32) and q.scales.shape == (32, 4) and (q.zeros == 8).all()
    assert torch.equal(kq.pack(kq.unpack(q.qweight, 4, 64), 4), q.qweight)


def test_scale_refit_lowers_output_error_and_keeps_codes_and_zeros():
    """Refitting the scales to GPTQ's codes (least squares under H) lowers the calibration error and on
    rows it never saw; alternating with GPTQ on the refitted grid lowers it further. Codes stay in range,
    zero points and symmetric midpoints unchanged."""
    w, rows, _ = _layer_with_inputs(2, n=48, k=64, rows=1536)
    x, held = rows[:1024], rows[1024:]
    st = qm.InputStats(64)
    st.update(x, want_gram=True)
    err = lambda wq, xs: float(((xs @ (wq - w).T) ** 2).sum())  # noqa: E731
    for sym in (False, True):
        q0 = qm.gptq(w, st.hessian, 3, 16, sym)
        q1 = qm.refit_scales(w, q0, st.hessian)
        q4 = qm.gptq_refined(w, st.hessian, 3, 16, sym, refit_rounds=4)
        assert torch.equal(q1.qweight, q0.qweight) and torch.equal(q1.zeros, q0.zeros)
        assert (q1.scales > 0).all() and (q4.scales > 0).all()
        assert err(q1.weight(), x) < err(q0.weight(), x)
        assert err(q4.weight(), x) < 0.97 * err(q1.weight(), x)
        assert err(q4.weight(), held) < err(q0.weight(), held)
        if sym:
            assert (q4.zeros == 4).all()
    # a group whose codes all sit on its zero point cannot be refitted: that row keeps its scales
    q0 = qm.rtn(torch.cat([torch.zeros(1, 64), w[1:]]), 3, 16, False)
    q1 = qm.refit_scales(torch.cat([torch.zeros(1, 64), w[1:]]), q0, st.hessian)
    assert torch.equal(q1.scales[0], q0.scales[0]) and torch.isfinite(q1.scales).all()
    assert qm.gptq_refined(w, st.hessian, 3, 16, False).weight().equal(qm.gptq(w, st.hessian, 3, 16, False).weight())


def _compile(name, spec, **kw):
    z = zoo.load(name)
    return z, rewrite.compile(z.model, spec, example_inputs=z.example, calibration=z.calibration, **kw)


@pytest.mark.slow
def test_w4_pass_report_cost_and_onnx(tmp_path):
    z, out = _compile("gpt2", rewrite.Spec.from_yaml(SPECS / "quantize-w4.yaml"))
    rec = out.report.passes[-1]
    rows = rec.details["layers"]
    assert {r["op"] for r in rows} >= {"addmm", "embedding"} and all(r["bits"] == 4 for r in rows)
    assert all(r["bytes_after"] < r["bytes_before"] / 5 for r in rows)
    code = str(out.module.code)
    assert "linear_q" in code and "embedding_q" in code and "addmm" not in code
    # logical parameter count is preserved while weight bytes shrink
    before = out.report.passes[0].cost
    assert abs(rec.cost.params - before.params) / before.params < 0.01
    assert rec.cost.weight_bytes < before.weight_bytes / 4
    assert out.report.fidelity.cosine > 0.99
    e = out.export(tmp_path / "w4.onnx", verify_inputs=[z.example, z.batch(5)])
    assert e.verified and e.rel_error <= 1e-4
    import onnx

    m = onnx.load(str(tmp_path / "w4.onnx"))
    ops = {n.op_type for n in m.graph.node}
    assert "MatMulNBits" in ops and "DequantizeLinear" not in ops
    # the 4-bit tables are gathered in packed form, then only the gathered rows are decoded
    inits = {t.name: t for t in m.graph.initializer}
    gathered = [inits[n.input[0]] for n in m.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    cfg = z.model.config
    assert [cfg.vocab_size, cfg.n_embd // 2] in [list(t.dims) for t in gathered if t.data_type == onnx.TensorProto.UINT8]


@pytest.mark.slow
def test_mixed_spec_gptq_block_influence(tmp_path):
    z, out = _compile("llama", rewrite.Spec.from_yaml(SPECS / "quantize-mixed.yaml"))
    rec = out.report.passes[-1]
    alloc = rec.details["allocation"]
    blocks = [a for a in alloc if a["layer"].startswith("layers.")]
    assert len(blocks) == 3 and {a["bits"] for a in alloc} <= {2, 4}
    # the most important block keeps 4 bits, the least important is lowered first
    top = max(blocks, key=lambda a: a["importance"])
    low = min(blocks, key=lambda a: a["importance"])
    assert top["bits"] == 4 and low["bits"] == 2 and low["lowered_rank"] == 0
    methods = {r["method"] for r in rec.details["layers"] if r["op"] == "linear"}
    assert "gptq" in methods and methods <= {"gptq", "rtn (gptq lost on held-back batches)"}  # checked against RTN
    e = out.export(tmp_path / "mixed.onnx", verify_inputs=[z.example, z.batch(5)])
    assert e.verified and e.rel_error <= 1e-4


@pytest.mark.slow
def test_w8a8_spec(tmp_path):
    z, out = _compile("bert", rewrite.Spec.from_yaml(SPECS / "quantize-w8a8.yaml"))
    assert "linear_a8_dynamic" in str(out.module.code)
    assert out.report.fidelity.cosine > 0.999
    e = out.export(tmp_path / "a8.onnx", verify_inputs=[z.example, z.batch(5)])
    assert e.verified and e.rel_error <= 1e-4
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "a8.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops


@pytest.mark.slow
def test_low_bit_weights_with_int8_compute(tmp_path):
    """weights + activations dynamic: mixed 4/8-bit GPTQ weights stored packed, run as int8 x int8 in onnxruntime."""
    import onnx

    spec = {"passes": [{"kind": "quantize", "method": "gptq", "weights": {"bits": [4, 8], "average": 6.0, "group_size": 16},
                        "allocate": "layerwise", "activations": {"mode": "dynamic"}, "embeddings": 3}]}
    z, out = _compile("bert", spec)
    code = str(out.module.code)
    assert "linear_qa8_dynamic" in code and "embedding_q" in code and "aten.linear" not in code
    layers = [r for r in out.report.passes[-1].details["layers"] if r["op"] == "linear"]
    assert {r["bits"] for r in layers} == {4, 8}
    assert all(r["method"] == "gptq, int8 compute (activations dynamic)" for r in layers if r["bits"] == 4)
    assert out.report.fidelity.cosine > 0.98  # tiny random model, 3-bit embeddings: mostly embedding error
    e = out.export(tmp_path / "w4a8.onnx", verify_inputs=[z.example, z.batch(5)])
    assert e.verified and any("int8 activations" in n for n in e.notes)  # the looser default check is reported
    graph = onnx.load(str(tmp_path / "w4a8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulInteger") == len(layers) and "MatMulNBits" not in ops
    # on disk the 4-bit layers keep their packed codes: no int8 or float copy of their weights
    stored = sum(t.ByteSize() for t in graph.initializer)
    w4 = sum(r["bytes_after"] for r in out.report.passes[-1].details["layers"])
    assert stored < 1.3 * w4 + 64 * 1024


def test_static_activations_smoothquant_awq_errors():
    z, out = _compile("mlp", {"passes": [{"kind": "quantize", "weights": None,
                                          "activations": {"mode": "static", "smoothquant": 0.5}}]})
    assert "linear_a8_static" in str(out.module.code)
    assert out.report.fidelity.cosine > 0.99
    with pytest.raises(rewrite.errors.PassError, match="mode: dynamic"):
        _compile("mlp", {"passes": [{"kind": "quantize", "weights": {"bits": 4}, "activations": {"mode": "static"}}]})
    with pytest.raises(rewrite.errors.PassError, match="allocate: layerwise"):
        _compile("mlp", {"passes": [{"kind": "quantize", "weights": {"bits": [2, 4]}}]})
    with pytest.raises(rewrite.errors.CalibrationError, match="calibration"):
        rewrite.compile(zoo.load("mlp").model, {"passes": [{"kind": "quantize", "method": "gptq"}]},
                        example_inputs=zoo.load("mlp").example)


def test_gptq_clip_norms_is_the_cap_of_clipped_token_weights():
    """`gptq.clip_norms` reaches the statistics: rows above clip_norms x the median norm are scaled down
    to count like one at the cap, the others count fully; a cap no row reaches is the plain X^T X."""
    x = torch.ones(8, 4)
    x[0] *= 10.0  # one row at 10x the median norm
    spec = qp.QuantizeSpec(method="gptq", gptq={"token_weight": "clipped", "clip_norms": 2.0})
    stats = qm.InputStats(4, **qp.QuantizePass(spec)._token_weighting())
    stats.update(x, want_gram=True)
    w = torch.tensor([0.2**2] + [1.0] * 7, dtype=torch.float64)  # (2 x median / 10 x median)^2 for row 0
    assert torch.allclose(stats.gram, (x.double() * w[:, None]).T @ x.double())
    never = qm.InputStats(4, token_weight="clipped", clip_norms=1e9)
    never.update(x, want_gram=True)
    assert torch.equal(never.gram, x.double().T @ x.double())
    assert qp.QuantizeSpec().gptq.clip_norms == qm.DEFAULT_CLIP_NORMS == 4.0  # the default did not change


def test_quantized_linear_replacement_is_a_rule_with_a_reason():
    """The replacement of a linear by `rewrite::linear_q` is a rule: applied, the program computes with the
    dequantized weight; where the op does not read the weight it was quantized from, it refuses with the reason."""
    import dataclasses

    from rewrite.program import Program
    from rewrite.rules import apply_rules_at

    z = zoo.load("mlp")
    program = Program.capture(z.model, z.example)
    t = next(t for t in qp.find_targets(program, None, [], False) if t.kind == "linear")
    qz = qm.rtn(qp.float_weight(program, t), 4, 16, False)
    ctx = qp.RewriteContext(program)
    moved = dataclasses.replace(t, weight="elsewhere.weight")
    ctx.at[t.node] = qp.Replacement(moved, torch.ops.rewrite.linear_q.default, qp.packed_tensors(qz), (4, 16))
    refused = apply_rules_at(t.node, qp.RULES, ctx)
    assert not refused.applied and "no longer reads its weight elsewhere.weight" in refused.reasons()[0]
    ctx.at[t.node] = qp.Replacement(t, torch.ops.rewrite.linear_q.default, qp.packed_tensors(qz), (4, 16))
    done = apply_rules_at(t.node, qp.RULES, ctx)
    assert done.counts() == {"quantized op": 1} and done.applied[0]["bytes"] == qz.qweight.numel() + qz.scales.numel() * 4 + qz.zeros.numel()
    program.graph.lint()
    assert any(n.target is torch.ops.rewrite.linear_q.default for n in program.graph.nodes)


COVERAGE = {"kind": "quantize", "weights": {"bits": [4, 8], "average": 6.0, "group_size": 16},
            "allocate": "layerwise", "embeddings": 4}


@pytest.mark.parametrize("name", sweep(zoo.ALL, fast=["mlp"]))
def test_zoo_w4_and_mixed_in_onnxruntime(name, tmp_path):
    """Every zoo model: mixed precision (the most important layers at 8 bits, the rest at 4, average
    6.0 where layer sizes allow; a single-layer model gets 4), 4-bit embeddings; exported and matched against the rewritten module in onnxruntime (default 1e-4).
    Static export shapes keep this under the time budget; dynamic shapes are covered above."""
    spec = {"passes": [COVERAGE], "export": {"onnx": {"dynamic": False}}}
    z, out = _compile(name, spec, dynamic=False)
    rows = out.report.passes[-1].details["layers"]
    widths = {r["bits"] for r in rows if r["op"] != "embedding"}
    assert widths <= {4, 8} and 4 in widths
    avg = sum(r["bits"] * r["bytes_before"] for r in rows if r["op"] != "embedding") / \
        sum(r["bytes_before"] for r in rows if r["op"] != "embedding")
    assert avg <= 6.0 + 1e-6
    if name in ("bert", "gpt2", "llama", "vit"):  # equal blocks: both widths are used
        assert widths == {4, 8}
    assert out.report.passes[-1].cost.weight_bytes < out.report.passes[-1].cost.params * 4
    e = out.export(tmp_path / f"{name}.onnx")
    assert e.verified and e.rel_error <= 1e-4, e
