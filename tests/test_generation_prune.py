"""Head pruning on generation graphs: pruned KV heads narrow the KV cache at the graph boundary.

The prune pass removes a KV head with its query heads (grouped-query attention) or a head with
its key and value (multi-head attention); each layer's past key/value inputs and present outputs
then carry the kept heads only (`rewrite.cache_entries.narrow_cache_heads`), in the torch module,
the cache layout and the exported ONNX file, and torch and onnxruntime generate the same tokens.
"""
from __future__ import annotations

import pytest
import torch

from rewrite import generation as G
from rewrite.decoding import TorchStepper, generate_ids
from rewrite.inputs import Inputs
from test_generation import compile_decoder, decoder, tokens

HEADS = {"kind": "prune", "granularity": "head", "amount": 0.5, "importance": "magnitude"}


def _onnx_heads(path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {v.name: v.type.tensor_type.shape.dim[1].dim_value for v in list(m.graph.input) + list(m.graph.output)
            if v.name.startswith(("past_key_values.", "present."))}


@pytest.mark.parametrize("name,before,after", [("llama", 2, 1), ("gpt2", 4, 2),
                                                pytest.param("mistral", 2, 1, marks=pytest.mark.slow),
                                                pytest.param("qwen2", 2, 1, marks=pytest.mark.slow)])
def test_pruned_heads_narrow_the_cache(name, before, after, tmp_path):
    """llama: 2 KV heads (4 query heads) -> 1 with its 2 query heads; gpt2: 4 heads -> 2."""
    model, out = compile_decoder(name, {"passes": [HEADS]})
    n = model.config.num_hidden_layers
    captured = G.layout_for(decoder(name), Inputs.of(tokens(0)))
    assert all(k[0] == v[0] == before for k, v in captured.layers)
    layout = G.GenerationProgramInfo.of(out.program)
    assert [(k[0], v[0]) for k, v in layout.layers] == [(after, after)] * n
    assert any("KV cache narrowed" in m for m in out.report.passes[0].notes)
    past = [p for p in out.program.placeholders() if p.name.startswith("past_key_values")]
    assert len(past) == 2 * n and all(p.meta["val"].shape[1] == after for p in past)
    rec = out.export(tmp_path / "model.onnx")
    assert rec.verified and any("generation verified" in m and "exactly" in m for m in rec.notes)
    heads = _onnx_heads(tmp_path / "model.onnx")
    assert len(heads) == 4 * n and set(heads.values()) == {after}
    # the torch module generates with the smaller cache, the same tokens as onnxruntime
    import rewrite

    ids, mask = tokens(55).values()
    want, _ = generate_ids(TorchStepper(out.module, layout), ids, mask, max_new_tokens=8, eos_token_ids=[])
    got, _ = generate_ids(rewrite.decoding.stepper_for(str(tmp_path / "model.onnx")), ids, mask, max_new_tokens=8,
                          eos_token_ids=[])
    assert want.shape == (3, 8) and torch.equal(want, got)
    # a batch shaped for the captured interface (every head) still runs: its cache is sliced
    step = G.step_inputs(captured, ids, mask, captured.empty_past(3))
    res = out.program.run(step)
    assert res["logits"].shape[:2] == ids.shape and res["present.0.key"].shape[1] == after


def test_skip_then_prune_heads_on_a_generation_graph(tmp_path):
    """The cache entries a skip drops and the heads a prune removes compose: batches at the captured
    interface (every layer, every head) are narrowed to both."""
    model, out = compile_decoder("llama", {"passes": [{"kind": "skip", "layers": ["model.layers.0"]}, HEADS]})
    layout = G.GenerationProgramInfo.of(out.program)
    assert layout.layer_map == [1] and layout.layers == [((1, 16), (1, 16))]
    captured = G.layout_for(decoder("llama"), Inputs.of(tokens(0)))
    ids, mask = tokens(7).values()
    res = out.program.run(G.step_inputs(captured, ids, mask, captured.empty_past(3)))
    assert set(res) == {"logits", "present.1.key", "present.1.value"} and res["present.1.value"].shape[1] == 1
    rec = out.export(tmp_path / "model.onnx")
    assert rec.verified and set(_onnx_heads(tmp_path / "model.onnx").values()) == {1}


def test_prune_heads_then_quantize_on_a_generation_graph():
    """Passes after the head pruning calibrate on the narrowed cache (prompts are sliced to it)."""
    _, out = compile_decoder("llama", {"passes": [HEADS, {"kind": "quantize", "weights": {"bits": 4, "group_size": 32}}]})
    layout = G.GenerationProgramInfo.of(out.program)
    assert layout.layers == [((1, 16), (1, 16))] * 2
    ids, mask = tokens(3).values()
    logits, present = TorchStepper(out.module, layout)(ids, mask, layout.empty_past(3))
    assert logits.shape[:2] == ids.shape and [k.shape[1] for k, _ in present] == [1, 1]
