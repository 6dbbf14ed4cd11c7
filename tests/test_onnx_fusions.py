"""KV-cache fusions on exported generation graphs (rewrite.backends.onnx_fusions).

Zoo decoders (random weights, small configs from test_generation) are exported at opset 23:
the cache concatenation and grouped-query head repeat move into `Attention`'s past/present,
sibling MatMulNBits merge, and onnxruntime still generates the torch module's tokens. Small
hand-built graphs check the refusals and that a merged MatMulNBits computes what its parts did.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rewrite.backends import onnx_fusions as F
from rewrite.decoding import TorchStepper, generate_ids
from test_generation import FAMILIES, compile_decoder, tokens


def _export(name, spec, tmp_path, **kw):
    import onnx

    from rewrite import generation as G

    _, out = compile_decoder(name, spec)
    rec = out.export(tmp_path / "model.onnx", **kw)
    layout = G.GenerationProgramInfo.of(out.program)
    return out, rec, layout, onnx.load(str(tmp_path / "model.onnx"))


def _same_tokens(out, layout, path) -> None:
    from rewrite.backends.onnx_generation import OrtStepper

    ids, mask = tokens(77).values()  # a left-padded row included
    want, _ = generate_ids(TorchStepper(out.module, layout), ids, mask, max_new_tokens=16, eos_token_ids=[])
    got, _ = generate_ids(OrtStepper(path), ids, mask, max_new_tokens=16, eos_token_ids=[])
    assert torch.equal(want, got)


@pytest.mark.parametrize("name", ["llama"] + [pytest.param(n, marks=pytest.mark.slow) for n in FAMILIES if n != "llama"])
def test_attention_takes_the_kv_cache(name, tmp_path):
    """Every zoo family: each layer's Attention reads past_key_values and writes present directly (no Concat of
    the cache, no repeated heads), and the file generates the torch module's tokens."""
    out, rec, layout, m = _export(name, None, tmp_path)
    assert rec.verified
    note = next(n for n in rec.notes if n.startswith("ONNX fusions"))
    assert f"attention with KV cache x{layout.num_layers}" in note, note
    attention = [n for n in m.graph.node if n.op_type == "Attention"]
    assert len(attention) == layout.num_layers
    for i, node in enumerate(sorted(attention, key=lambda n: list(n.output)[1])):
        assert node.input[4].startswith("past_key_values.") and node.output[1].startswith("present.")
    assert not any(n.op_type == "Concat" and any(i.startswith("past_key_values.") for i in n.input) for n in m.graph.node)
    _same_tokens(out, layout, tmp_path / "model.onnx")


@pytest.mark.slow
def test_sibling_matmulnbits_merge_in_a_w4_decoder(tmp_path):
    """q/k/v and gate/up of a W4 (asymmetric) LLaMA become one MatMulNBits each; same tokens, no weight copies left."""
    spec = {"passes": [{"kind": "quantize", "weights": {"bits": 4, "group_size": 32}}]}
    out, rec, layout, m = _export("llama", spec, tmp_path)
    note = next(n for n in rec.notes if n.startswith("ONNX fusions"))
    assert "merge sibling MatMulNBits x4" in note, note  # 2 layers x (qkv, gate/up)
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 4 + 1  # per layer: q+k+v, o, gate+up, down; plus the (untied) LM head
    used = {i for n in m.graph.node for i in n.input}
    assert all(t.name in used for t in m.graph.initializer)
    _same_tokens(out, layout, tmp_path / "model.onnx")


def test_below_opset_23_the_attention_rule_refuses_with_a_reason(tmp_path):
    out, rec, layout, m = _export("llama", None, tmp_path, opset=21)
    note = next(n for n in rec.notes if n.startswith("ONNX fusions"))
    assert "none applied" in note and "opset 21 < 23" in note and "export at opset 23" in note
    assert not any(n.op_type == "Attention" for n in m.graph.node)


# ----------------------------------------------------------------------- hand-built graphs
def _attention_graph(axis: int = 2, is_causal: int = 0):
    from onnx import TensorProto as T
    from onnx import helper as h

    vi = lambda n, shape: h.make_tensor_value_info(n, T.FLOAT, shape)  # noqa: E731
    nodes = [h.make_node("Concat", ["past_k", "k"], ["present_k"], axis=axis),
             h.make_node("Concat", ["past_v", "v"], ["present_v"], axis=axis),
             h.make_node("Attention", ["q", "present_k", "present_v"], ["y"], is_causal=is_causal)]
    g = h.make_graph(nodes, "g", [vi("q", ["b", 2, "s", 4]), vi("k", ["b", 2, "s", 4]), vi("v", ["b", 2, "s", 4]),
                                  vi("past_k", ["b", 2, "p", 4]), vi("past_v", ["b", 2, "p", 4])],
                     [vi("y", None), vi("present_k", None), vi("present_v", None)])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 23)], ir_version=10)


@pytest.mark.parametrize("axis,is_causal,reason", [(3, 0, "not along the sequence axis"), (2, 1, "is_causal=1")])
def test_attention_rule_refusals(axis, is_causal, reason):
    m = _attention_graph(axis, is_causal)
    before = [n.op_type for n in m.graph.node]
    outcome = F.apply_onnx_rules(m)
    assert not outcome.applied and reason in outcome.reasons()[0]
    assert [n.op_type for n in m.graph.node] == before


def test_attention_rule_on_a_hand_built_graph_matches_onnxruntime():
    import onnxruntime as ort

    m = _attention_graph()
    r = np.random.default_rng(0)
    feeds = {n: r.standard_normal((1, 2, 3 if n in "qkv" else 5, 4), dtype=np.float32) for n in ("q", "k", "v", "past_k", "past_v")}
    run = lambda model: ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    want = run(m)
    assert F.apply_onnx_rules(m).counts() == {"attention with KV cache": 1}
    assert [n.op_type for n in m.graph.node] == ["Attention"]
    got = run(m)
    for w, g in zip(want, got):
        np.testing.assert_allclose(w, g, rtol=1e-5, atol=1e-6)


def test_merged_matmulnbits_computes_what_its_parts_did():
    """Three siblings, two with zero points and one on the default midpoint, plus one with another block
    size (not merged): outputs are bit-identical after the merge (same rows, same blocks)."""
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper

    r = np.random.default_rng(1)
    k, inits, nodes = 64, [], []
    for i, (n, zp, block) in enumerate([(24, True, 32), (8, False, 32), (16, True, 32), (8, True, 16)]):
        nb = k // block
        inits += [numpy_helper.from_array(r.integers(0, 256, (n, nb, block // 2), dtype=np.uint8), f"B{i}"),
                  numpy_helper.from_array(r.random(n * nb, dtype=np.float32) * 0.1, f"S{i}")]
        ins = ["x", f"B{i}", f"S{i}"]
        if zp:
            inits.append(numpy_helper.from_array(r.integers(0, 256, n * ((nb + 1) // 2), dtype=np.uint8), f"Z{i}"))
            ins.append(f"Z{i}")
        nodes.append(h.make_node("MatMulNBits", ins, [f"y{i}"], domain="com.microsoft", K=k, N=n, bits=4,
                                 block_size=block, accuracy_level=4))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [3, k])],
                     [h.make_tensor_value_info(f"y{i}", T.FLOAT, None) for i in range(4)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 23), h.make_opsetid("com.microsoft", 1)], ir_version=10)
    x = {"x": r.standard_normal((3, k), dtype=np.float32)}
    run = lambda model: ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)  # noqa: E731
    want = run(m)
    outcome = F.apply_onnx_rules(m)
    assert outcome.counts() == {"merge sibling MatMulNBits": 1} and outcome.applied[0]["N"] == [24, 8, 16]
    assert sorted(n.op_type for n in m.graph.node) == ["MatMulNBits", "MatMulNBits", "Split"]
    assert {t.name for t in m.graph.initializer} >= {"B3", "S3", "Z3"} and "B0" not in {t.name for t in m.graph.initializer}
    for w, got in zip(want, run(m)):
        np.testing.assert_array_equal(w, got)
