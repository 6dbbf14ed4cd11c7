"""The budget allocator picks rewrites jointly to meet a whole-model budget."""
import pytest


@pytest.mark.slow
def test_flops_budget_is_met_and_the_plan_is_reported(bert_flops_budget, tmp_path):
    _, _, out = bert_flops_budget  # the zoo BERT, budget flops 0.7 (tests/conftest.py)
    record = out.report.passes[-1]
    assert record.kind == "budget"
    plans = record.details["plans (chosen and rejected)"]
    chosen = [p for p in plans if p["verdict"] == "chosen"]
    assert len(chosen) == 1 and chosen[0]["measured_flops"] <= 0.7 * 1.1
    assert out.report.after.flops <= 0.7 * 1.1 * out.report.before.flops
    # every candidate that was cheaper in predicted drop was tried first
    assert chosen[0]["predicted_drop"] <= min(p["predicted_drop"] for p in plans)
    assert {k["technique"] for k in record.details["cost table (each setting alone)"]} >= {"skip", "neuron", "head", "token"}
    assert out.export(tmp_path / "b.onnx").verified


def test_quantize_knobs_follow_the_budget_kind():
    """Latency budgets get only int8-compute settings (weight-only low-bit runs as float matmuls);
    size budgets also weight-only W4; FLOPs budgets none (quantization does not change logical FLOPs)."""
    from rewrite.allocate import quantize_knobs
    from rewrite.spec import BudgetSpec

    def names(**budget):
        return [k.name for k in quantize_knobs(BudgetSpec(**budget))]

    assert names(latency=0.5) == ["W8A8 + emb8", "W4A8 (GPTQ) + emb4"]
    assert names(size_mb=10) == ["W8A8 + emb8", "W4A8 (GPTQ) + emb4", "W4 (GPTQ) + emb4"]
    assert names(flops=0.5) == []
    for knob in quantize_knobs(BudgetSpec(latency=0.5)):
        assert knob.passes[0]["activations"] == {"mode": "dynamic", "bits": 8, "smoothquant": None, "granularity": "tensor"}
