"""The report's main table and its sentences (pure rendering, no model needed)."""
import json

from rewrite.measure import Cost, Fidelity
from rewrite.report import ExportRecord, LatencyRecord, Report


def _report(after_ms: float) -> Report:
    r = Report(model="M", before=Cost(params=1000, weight_bytes=4000, flops=10_000),
               after=Cost(params=500, weight_bytes=1000, flops=4_000),
               fidelity=Fidelity(cosine=0.99, rel_error=0.02, max_abs_error=0.3, batches=2))
    r.exports.append(ExportRecord(backend="onnx", path="out/model.onnx", bytes=2000, seconds=1.0, verified=True,
                                  max_abs_error=3.04e-1, rel_error=4.0e-3, cosine=0.9999, provider="CPUExecutionProvider",
                                  tolerance=0.05, quantile=0.99, batches=16))
    r.latency = LatencyRecord(runtime="onnxruntime CPU", shape="input_ids 16x41, attention_mask 16x41",
                              before_ms=10.0, after_ms=after_ms, repeats=20)
    r.add_task_metric("STS-B dev Spearman x100", 86.72, 84.80, key="stsb_dev_spearman")
    return r


def test_main_table_has_latency_and_task_metric_before_after_delta():
    text = _report(4.0).to_table()
    lines = text.splitlines()
    assert any(line.split()[:3] == ["onnxruntime", "CPU", "latency"] and line.endswith("0.40x") for line in lines), text
    assert any(line.startswith("STS-B dev Spearman x100") and line.split()[-3:] == ["86.72", "84.80", "-1.92"] for line in lines), text
    assert "latency 10.00 ms -> 4.00 ms (0.40x, median of 20) at input_ids 16x41, attention_mask 16x41; FLOPs 0.40x" in text
    md = _report(4.0).to_markdown()
    assert "| STS-B dev Spearman x100 | 86.72 | 84.80 | -1.92 |" in md


def test_verification_numbers_come_with_a_sentence():
    text = _report(4.0).to_table()
    assert ("onnxruntime (CPUExecutionProvider) matches the rewritten torch module on 16 held-back sample(s): largest "
            "difference 3.04e-01, which is 4.00e-03 of the largest output value") in text
    assert "requires 99% of output values within 5e-02 of the largest output value: passed." in text
    assert "cosine / rel err: how close" in text


def test_flops_without_speed_is_called_out():
    assert "removes FLOPs but not time" in _report(9.9).to_table()
    assert "removes FLOPs but not time" not in _report(4.0).to_table()


def test_report_json_roundtrips_the_new_fields():
    r = _report(4.0)
    data = json.loads(r.to_json())
    assert data["latency"]["after_ms"] == 4.0 and data["tasks"][0]["before"] == 86.72
    assert data["metrics"] == {"stsb_dev_spearman_original": 86.72, "stsb_dev_spearman_rewritten": 84.8}
    assert Report.model_validate(data).latency.ratio == 0.4
