"""The rotation pass: orthogonal matrices, exactness on zoo decoders, tie handling, clear refusals."""
from __future__ import annotations

import pytest
import torch

from rewrite.passes.rotate import RotatePass, hadamard, rotation_matrix
from rewrite import zoo
from rewrite.errors import PassError
from rewrite.program import Program
from rewrite.passes.rotate import RotateSpec


@pytest.mark.parametrize("n", [1, 2, 12, 20, 36, 64, 576, 640])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert h is not None and h.shape == (n, n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n))


@pytest.mark.parametrize("n,kind", [(64, "hadamard"), (576, "hadamard"), (7, "hadamard"), (48, "random")])
def test_rotation_is_orthogonal(n, kind):
    q, what = rotation_matrix(n, kind, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert what.startswith("randomised Hadamard") == (kind == "hadamard" and hadamard(n) is not None)


def _rotate(model, example, **kw):
    program = Program.capture(model, example)
    before = program.run(example)
    res = RotatePass(RotateSpec(**kw)).run(program, None)
    return before, res.program.run(example), res


def _hidden(out):
    if isinstance(out, (tuple, list)):
        return out[0]
    return out["last_hidden_state"] if isinstance(out, dict) else out.last_hidden_state


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral"])
def test_rotated_decoder_is_exact(name):
    zm = zoo.load(name)
    before, after, res = _rotate(zm.model, zm.example)
    a, b = _hidden(before), _hidden(after)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())
    d = res.details
    assert d["readers"] >= 5 * 2 and d["writers"] >= 2 * 2 and d["norm scales folded"] >= 2 * 2
    assert d["output matmuls"] == 1 and d["online matmuls"] == 0


def test_rotation_spreads_outliers():
    zm = zoo.load("llama")
    program = Program.capture(zm.model, zm.example)
    w0 = program.param("layers.0.self_attn.q_proj.weight").clone()
    RotatePass(RotateSpec()).run(program, None)
    w1 = program.param("layers.0.self_attn.q_proj.weight")
    assert not torch.allclose(w0, w1)
    # the same Frobenius norm up to the folded norm scale: rotation alone keeps it
    assert w1.shape == w0.shape


def _tied_causal_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                     use_cache=False))
    with torch.no_grad():
        for mod in m.modules():
            if "RMSNorm" in type(mod).__name__:
                mod.weight.uniform_(0.5, 1.5)
    return m.eval()


def test_tied_embeddings_are_untied_and_logits_match():
    m = _tied_causal_lm()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    before, after, res = _rotate(m, example)
    la, lb = before["logits"] if isinstance(before, dict) else before[0], after["logits"] if isinstance(after, dict) else after[0]
    assert torch.allclose(la, lb, atol=1e-4, rtol=1e-4), float((la - lb).abs().max())
    assert any("untied" in n for n in res.notes)
    assert res.details["output matmuls"] == 0  # the lm_head absorbs the rotation


@pytest.mark.slow
def test_gemma3_post_norms_refuse_then_run_online():
    zm = zoo.load("gemma3")
    program = Program.capture(zm.model, zm.example)
    with pytest.raises(PassError, match="online"):
        RotatePass(RotateSpec()).run(program, None)
    before, after, res = _rotate(zm.model, zm.example, online=True)
    a, b = _hidden(before), _hidden(after)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), float((a - b).abs().max())
    assert res.details["online matmuls"] > 0


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_layernorm_models_refuse(name):
    zm = zoo.load(name)
    program = Program.capture(zm.model, zm.example)
    with pytest.raises(PassError, match="rotation-equivariant"):
        RotatePass(RotateSpec()).run(program, None)


def test_no_embedding_refuses():
    zm = zoo.load("mlp")
    program = Program.capture(zm.model, zm.example)
    with pytest.raises(PassError, match="no embedding"):
        RotatePass(RotateSpec()).run(program, None)


@pytest.mark.slow
def test_rotate_then_gptq_compiles_and_exports(tmp_path):
    """rotate -> quantize (GPTQ, sequential, normalized tokens) through the compiler; the ONNX model matches."""
    import rewrite

    zm = zoo.load("llama")
    spec = {"passes": [{"kind": "cleanup"}, {"kind": "rotate"},
                       {"kind": "quantize", "method": "gptq", "weights": {"bits": 4, "group_size": 32},
                        "gptq": {"sequential": True, "token_weight": "normalized"}}]}
    out = rewrite.compile(zm.model, spec, example_inputs=zm.example, calibration=zm.calibration)
    kinds = [p.kind for p in out.report.passes]
    assert "rotate" in kinds and kinds[-1] == "quantize"
    e = out.export(tmp_path / "m.onnx", verify_inputs=[zm.example, zm.batch(5)])
    assert e.verified and e.rel_error <= 1e-4


def test_rotate_after_quantize_is_refused():
    import rewrite

    zm = zoo.load("llama")
    with pytest.raises(PassError, match="rotate"):
        rewrite.compile(zm.model, {"passes": [{"kind": "quantize"}, {"kind": "rotate"}]}, example_inputs=zm.example)
