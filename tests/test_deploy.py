"""specs/minilm-deploy.yaml: every rewrite composed on the real model, exported and verified."""
from pathlib import Path

import pytest

import rewrite

SPEC = Path(__file__).resolve().parent.parent / "specs" / "minilm-deploy.yaml"


@pytest.mark.slow
def test_deploy_spec_composes_exports_and_matches(minilm, tmp_path):
    from rewrite import demo

    model, tok = minilm
    calib = demo.calibration_batches(tok, samples=48, batch_size=16)
    out = rewrite.compile(model, SPEC, example_inputs=demo.example_inputs(tok), calibration=calib)
    kinds = [p.kind for p in out.report.passes]
    assert kinds == ["cleanup", "skip", "prune", "prune", "token", "quantize"]
    assert len(out.program.blocks()) == 4  # two of six blocks skipped
    assert out.report.after.flops < 0.5 * out.report.before.flops
    rec = out.export(tmp_path / "deploy.onnx", verify_inputs=out.verification_batches())
    assert rec.verified
    assert rec.bytes < 10e6, rec.bytes  # fp32 is 91 MB
