import pytest
import torch

import rewrite
from backends import onnx as onnx_backend
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
