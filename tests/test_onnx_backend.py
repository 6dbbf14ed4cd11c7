import pytest
import torch

import rewrite
from rewrite.backends import onnx as onnx_backend
from rewrite import VerificationError, zoo


@pytest.fixture(scope="module")
def compiled_mlp():
    z = zoo.load("mlp")
    return rewrite.compile(z.model, None, example_inputs=z.example), z


def test_failed_verification_leaves_nothing_on_disk(compiled_mlp, tmp_path, monkeypatch):
    compiled, _ = compiled_mlp

    def disagree(*args, **kwargs):
        raise VerificationError("forced mismatch")

    monkeypatch.setattr(onnx_backend, "verify_onnx", disagree)
    with pytest.raises(VerificationError):
        compiled.export(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_external_data_is_written_beside_the_model(compiled_mlp, tmp_path):
    compiled, z = compiled_mlp
    compiled.spec.export.onnx.external_data = True
    try:
        rec = compiled.export(tmp_path / "m.onnx")
    finally:
        compiled.spec.export.onnx.external_data = "auto"
    assert rec.verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_onnx_module_returns_original_structure(tmp_path):
    z = zoo.load("dict_output")
    compiled = rewrite.compile(z.model, None, example_inputs=z.example)
    compiled.export(tmp_path / "d.onnx")
    ort_module = onnx_backend.OnnxModule(tmp_path / "d.onnx", compiled.program)
    got = ort_module(*z.example.args)
    ref = compiled.module(*z.example.args)
    assert set(got) == {"hidden", "stats"} and isinstance(got["stats"], tuple)
    assert torch.allclose(got["hidden"], ref["hidden"], atol=1e-5)


def test_provider_is_cpu_without_a_gpu():
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("a GPU driver is present")
    except OSError:
        pass
    assert onnx_backend.providers() == ["CPUExecutionProvider"]


def _interface(path):
    import onnx

    m = onnx.load(str(path))

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return {vi.name: dims(vi) for vi in m.graph.input}, {vi.name: dims(vi) for vi in m.graph.output}


@pytest.mark.slow
def test_onnx_interface_takes_the_models_names_and_shared_dims(tmp_path):
    z = zoo.load("bert")
    compiled = rewrite.compile(z.model, None, example_inputs=z.example)
    rec = compiled.export(tmp_path / "b.onnx")
    assert rec.verified
    inputs, outputs = _interface(tmp_path / "b.onnx")
    assert inputs == {"input_ids": ["batch_size", "sequence_length"], "attention_mask": ["batch_size", "sequence_length"]}
    hidden = z.model.config.hidden_size
    assert outputs == {"last_hidden_state": ["batch_size", "sequence_length", hidden], "pooler_output": ["batch_size", hidden]}
    # another batch and sequence length runs under the same names
    sess = onnx_backend.session(tmp_path / "b.onnx")
    ids = torch.randint(1, 50, (3, 7))
    out = sess.run(["pooler_output"], {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()})
    assert out[0].shape == (3, hidden)


def test_nested_outputs_are_named_by_their_path(compiled_dict):
    compiled, path = compiled_dict
    inputs, outputs = _interface(path)
    assert list(inputs) == ["x", "scale"] and inputs["x"][:2] == ["batch_size", "sequence_length"]
    assert list(outputs) == ["hidden", "stats.0", "stats.1"]


@pytest.fixture(scope="module")
def compiled_dict(tmp_path_factory):
    z = zoo.load("dict_output")
    compiled = rewrite.compile(z.model, None, example_inputs=z.example)
    path = tmp_path_factory.mktemp("dict") / "d.onnx"
    compiled.export(path)
    return compiled, path


def test_positional_outputs_and_passthrough_outputs_are_named(tmp_path):
    class TwoOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x), x  # the second output is the input itself

    compiled = rewrite.compile(TwoOut(), None, example_inputs=(torch.randn(2, 4),))
    compiled.export(tmp_path / "t.onnx")
    inputs, outputs = _interface(tmp_path / "t.onnx")
    assert list(inputs) == ["x"] and list(outputs) == ["output_0", "output_1"]
    assert outputs["output_0"] == ["batch_size", 4]


def test_name_interface_renames_values_symbols_and_expressions():
    import onnx
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["s1", "s2"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["s7", "s2"])
    out = helper.make_tensor_value_info("cat", TensorProto.FLOAT, ["s1", "s2 + s2"])
    graph = helper.make_graph([helper.make_node("Concat", ["a", "b"], ["cat"], axis=1)], "g", [a, b], [out])
    proto = helper.make_model(graph)
    onnx_backend.name_interface(proto, ["past.key", "key"], ["present.key"],
                                {"past.key": {0: "batch_size", 1: "past_sequence_length"}, "key": {0: "batch_size"}})
    onnx.checker.check_model(proto)
    g = proto.graph
    assert [i.name for i in g.input] == ["past.key", "key"] and g.output[0].name == "present.key"
    assert g.node[0].input == ["past.key", "key"] and g.node[0].output == ["present.key"]
    dims = [d.dim_param for d in g.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch_size", "past_sequence_length + past_sequence_length"]
    assert [d.dim_param for d in g.input[1].type.tensor_type.shape.dim] == ["batch_size", "past_sequence_length"]


def test_export_error_carries_the_cause_node_and_source_line(compiled_mlp, tmp_path):
    """A conversion failure deep in the exporter keeps the cause, not only the wrapper's first line."""

    @torch.library.custom_op("rewrite_test::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @twice.register_fake
    def _(x):
        return torch.empty_like(x)

    class NoLowering(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return twice(self.lin(x))  # the line the error must name

    compiled = rewrite.compile(NoLowering(), None, example_inputs=(torch.randn(2, 4),))
    with pytest.raises(rewrite.ExportError) as info:
        compiled.export(tmp_path / "n.onnx")
    msg = str(info.value)
    assert "No ONNX function found" in msg and "rewrite_test.twice" in msg, msg
    assert "node %twice" in msg and "test_onnx_backend.py" in msg and "return twice(self.lin(x))" in msg, msg
    assert "fix:" in msg and "\n" not in msg, msg
    assert list(tmp_path.iterdir()) == []


def test_export_error_keeps_a_decomposition_cause(compiled_mlp, tmp_path, monkeypatch):
    compiled, _ = compiled_mlp

    def fail(*args, **kwargs):
        try:
            raise RuntimeError("Cannot view a tensor with shape torch.Size([2, 8, 4]) and strides (32, 1, 8) as a "
                               "tensor with shape (2, 32)!\nmore detail")
        except RuntimeError as inner:
            raise RuntimeError("Failed to decompose the FX graph for ONNX compatibility. This is step 2/3") from inner

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(rewrite.ExportError) as info:
        compiled.export(tmp_path / "m.onnx")
    msg = str(info.value)
    assert "Cannot view a tensor with shape torch.Size([2, 8, 4]) and strides (32, 1, 8)" in msg, msg
    assert "reshape" in msg and "step 2/3" not in msg, msg


def test_interrupted_export_leaves_no_files(compiled_mlp, tmp_path, monkeypatch):
    compiled, _ = compiled_mlp

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_backend, "verify_onnx", interrupt)
    with pytest.raises(KeyboardInterrupt):
        compiled.export(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_different_sizes_never_share_a_dim_name():
    """An encoder-decoder's source and target lengths are different symbols: they must not both be
    named `sequence_length` (onnxruntime then takes them as one size and fails on unequal ones)."""
    import onnx
    from onnx import TensorProto, helper

    from rewrite.backends.onnx import name_interface

    a = helper.make_tensor_value_info("a", TensorProto.INT64, ["s0", "s1"])
    b = helper.make_tensor_value_info("b", TensorProto.INT64, ["s0", "s2"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["s0", "s2"])
    proto = helper.make_model(helper.make_graph([helper.make_node("Identity", ["b"], ["y"])], "g", [a, b], [y]))
    seq = {0: "batch_size", 1: "sequence_length"}
    name_interface(proto, dim_names={"a": seq, "b": seq})
    dims = {vi.name: [d.dim_param for d in vi.type.tensor_type.shape.dim] for vi in [*proto.graph.input, *proto.graph.output]}
    assert dims["a"] == ["batch_size", "sequence_length"]
    assert dims["b"] == ["batch_size", "b_sequence_length"] == dims["y"]
    onnx.checker.check_model(proto)
