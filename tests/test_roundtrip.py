"""Capture + cleanup + ONNX export, checked in onnxruntime, for every zoo model."""
import pytest
import torch

import rewrite
from rewrite import zoo
from tiers import sweep


@pytest.mark.parametrize("name", sweep(zoo.ALL, fast=["bert", "dict_output"]))
def test_capture_cleanup_onnx_roundtrip(name, tmp_path):
    pytest.importorskip("transformers")
    z = zoo.load(name)
    out = rewrite.compile(z.model, {"passes": [{"kind": "cleanup"}]}, example_inputs=z.example, calibration=z.calibration)
    # the rewritten module is called like the original and returns the same structure
    with torch.no_grad():
        ref = z.example.call(z.model)
        got = z.example.call(out.module)
    assert type(got) is type(ref)
    assert out.report.fidelity is not None and out.report.fidelity.cosine > 0.999999
    # dynamic batch: a different batch size runs
    other = z.batch(7).map(lambda t: torch.cat([t, t, t], 0) if t.dim() > 0 else t)
    with torch.no_grad():
        other.call(out.module)
    rec = out.export(tmp_path / f"{name}.onnx", verify_inputs=[z.example, other])
    assert rec.verified and rec.rel_error <= 1e-4, rec
    assert (tmp_path / f"{name}.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"
    assert "dropout" not in str(out.module.code) or name not in ("bert",)
