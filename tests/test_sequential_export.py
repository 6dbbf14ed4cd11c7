"""The streamed ONNX export of a checkpoint folder (`rewrite.sequential_export`): fake-weight capture,
weights streamed into the external-data file, packed weights kept packed, checked in onnxruntime."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from rewrite import sequential_export as onnx_stream  # noqa: E402
from rewrite.sequential_export import export_checkpoint  # noqa: E402
from rewrite.sequential import quantize_sequential  # noqa: E402

torch.set_num_threads(1)


def _folder(root: Path, tie: bool) -> Path:
    """A tiny random llama saved as a sharded bf16 checkpoint folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    folder = root / ("tied" if tie else "untied")
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True, max_shard_size="40KB")
    return folder


@pytest.fixture(scope="module")
def untied_w4(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    out = root / "w4"
    quantize_sequential(_folder(root, tie=False), {"method": "rtn", "weights": {"bits": 4, "group_size": 32}}, out)
    return out


def test_streamed_export_keeps_packed_weights_and_matches_torch(untied_w4, tmp_path):
    """Every quantized linear (the untied lm_head too) is a MatMulNBits on the packed codes; every
    weight lies in the data file, none in the model file; onnxruntime matches the module-by-module
    torch model on the same folder; the streamed torch reference equals the whole model run at once."""
    path = tmp_path / "m" / "model.onnx"
    rec = export_checkpoint(untied_w4, path, tokens=6)
    assert rec.verified and rec.rel_error < 1e-3 and rec.cosine > 0.9999
    assert path.is_file() and rec.data_path.is_file() and not list(path.parent.glob(".model.onnx.*"))
    proto = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    modules = json.loads((untied_w4 / "quantization.json").read_text())["modules"]
    assert ops.count("MatMulNBits") == len(modules) == 2 * 7 + 1
    assert not any(n.domain == "rewrite.quant" for n in proto.graph.node)
    external = {t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    inline = [t for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert "model.embed_tokens.weight" in external and all(len(t.raw_data) <= onnx_stream.INLINE_BYTES for t in inline)
    assert not any(n.endswith("proj.weight") or n == "lm_head.weight" for n in external)   # no float copy of a linear
    b_inputs = [n.input[1] for n in proto.graph.node if n.op_type == "MatMulNBits"]
    by_name = {t.name: t for t in proto.graph.initializer}
    assert all(by_name[b].data_type == onnx.TensorProto.UINT8 for b in b_inputs)
    # the file is smaller than the float32 weights it replaces would be
    float_bytes = 4 * sum(r["n"] * r["k"] for r in modules)
    assert rec.data_path.stat().st_size < float_bytes / 3
    assert [o.name for o in proto.graph.output] == ["logits"]
    # the streamed reference is the packed torch model itself
    from rewrite.sequential import load_rewritten

    example = onnx_stream.example_for(load_rewritten(untied_w4), 6)
    streamed = onnx_stream.streamed_forward(load_rewritten(untied_w4), example)[0]
    whole = load_rewritten(untied_w4)
    whole.materialize("", torch.float32)
    with torch.no_grad():
        full = whole.model(**example.kwargs).logits
    torch.testing.assert_close(streamed, full)
    # onnxruntime on a new sequence length (dynamic shapes) agrees with the torch model too
    from rewrite.backends.onnx import session

    ids = torch.tensor([[5, 17, 250, 3, 99, 42, 7, 11, 200, 1]])
    got = session(path).run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})[0]
    with torch.no_grad():
        want = whole.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4 * float(want.abs().max()), rtol=0)


@pytest.mark.slow
def test_streamed_export_of_a_plain_folder_writes_a_tied_weight_once(tmp_path):
    """A float checkpoint folder (tied embeddings) exports too: the shared table is written once,
    as one initializer that both the embedding and the lm_head read (onnxruntime loads it once)."""
    folder = _folder(tmp_path, tie=True)
    path = tmp_path / "plain" / "model.onnx"
    rec = export_checkpoint(folder, path, tokens=5)
    assert rec.verified
    proto = onnx.load(str(path), load_external_data=False)
    where = {t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer
             if t.data_location == onnx.TensorProto.EXTERNAL}
    tables = [n for n in where if n in ("model.embed_tokens.weight", "lm_head.weight")]
    assert len(tables) == 1   # one initializer, read by the Gather and the lm_head's MatMul
    readers = [n.op_type for n in proto.graph.node if tables[0] in n.input]
    assert len(readers) == 2
    assert rec.data_path.stat().st_size < 4 * (300 * 64 * 1.5 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128))


@pytest.mark.slow
def test_cli_compiles_a_checkpoint_folder_block_by_block(tmp_path, capsys):
    """`rewrite compile SPEC --model hf:DIR` with a block-local quantize spec goes through the pipeline:
    the packed checkpoint, the streamed ONNX file (checked in onnxruntime) and a report with peak RSS per phase."""
    from rewrite.cli import main

    folder = _folder(tmp_path, tie=True)
    spec = tmp_path / "w4.yaml"
    spec.write_text("passes:\n  - kind: cleanup\n  - kind: quantize\n    method: rtn\n"
                    "    weights: {bits: 4, group_size: 32}\n")
    out = tmp_path / "out"
    assert main(["compile", str(spec), "--model", f"hf:{folder}", "--out", str(out), "-q"]) == 0
    assert (out / "model.onnx").is_file() and (out / "model.onnx.data").is_file()
    assert (out / "checkpoint" / "quantization.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["rel_error"] < 1e-3 and report["quantize"]["phases"]
    assert "peak RSS" in (out / "report.md").read_text()


def test_large_tables_stay_in_the_checkpoint_dtype(tmp_path, monkeypatch):
    """A tied table above TABLE_BYTES is written once, in bf16 as the checkpoint stores it: the
    embedding's Gather casts the rows it picks, the lm_head multiplies by float32 casts of row
    chunks (concatenated); onnxruntime under the bounded session settings and under its defaults
    both match the torch model."""
    monkeypatch.setattr(onnx_stream, "TABLE_BYTES", 1)
    monkeypatch.setattr(onnx_stream, "TABLE_CHUNK_ELEMENTS", 64 * 128)   # 300 rows: chunks of 128, 128, 44
    folder = _folder(tmp_path, tie=True)
    path = tmp_path / "narrow" / "model.onnx"
    rec = export_checkpoint(folder, path, tokens=5)
    assert rec.verified and rec.rel_error < 1e-4
    assert any("kept in the checkpoint's dtype" in n for n in rec.notes)
    proto = onnx.load(str(path), load_external_data=False)
    by_name = {t.name: t for t in proto.graph.initializer}
    tables = [n for n in by_name if n in ("model.embed_tokens.weight", "lm_head.weight")]
    assert len(tables) == 1 and by_name[tables[0]].data_type == onnx.TensorProto.BFLOAT16
    readers = sorted(n.op_type for n in proto.graph.node if tables[0] in n.input)
    assert readers == ["Gather", "Slice", "Slice", "Slice"]
    assert not any(n.op_type == "Transpose" and n.input[0] == tables[0] for n in proto.graph.node)
    from rewrite.backends.onnx import session

    ids = np.array([[5, 17, 250, 3, 99, 42, 7]])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    bounded = session(path, config=onnx_stream.BOUNDED_SESSION_CONFIG).run(None, feeds)[0]
    default = session(path).run(None, feeds)[0]
    from rewrite.checkpoint import load_hf

    whole = load_hf(folder)
    whole.materialize("", torch.float32)
    with torch.no_grad():
        want = whole.model(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(1, 7, dtype=torch.long)).logits
    for got in (bounded, default):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5 * float(want.abs().max()), rtol=0)
