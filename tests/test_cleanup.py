import torch
from torch import nn

import rewrite
from rewrite import zoo


def _count(gm, name):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target))


def test_batch_norm_folding_is_exact_and_removes_bn():
    torch.manual_seed(0)
    z = zoo.load("rescat_cnn")
    for m in z.model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    out = rewrite.compile(z.model, {"passes": [{"kind": "cleanup"}]}, example_inputs=z.example)
    assert _count(out.original.module, "batch_norm") == 3
    assert _count(out.module, "batch_norm") == 0
    with torch.no_grad():
        ref = z.model(*z.example.args)
        got = out.module(*z.example.args)
    assert torch.allclose(ref, got, atol=1e-5, rtol=1e-5), (ref - got).abs().max()
    assert out.report.passes[0].details["batch norms folded"] == 3


def test_dropout_removed_and_dead_code_gone():
    z = zoo.load("mlp")
    out = rewrite.compile(z.model, {"passes": [{"kind": "cleanup"}]}, example_inputs=z.example)
    assert _count(out.original.module, "dropout") == 1
    assert _count(out.module, "dropout") == 0


def test_cleanup_can_be_disabled_piecewise():
    z = zoo.load("mlp")
    out = rewrite.compile(z.model, {"passes": [{"kind": "cleanup", "dropout": False}]}, example_inputs=z.example)
    assert _count(out.module, "dropout") == 1


def test_cleanup_after_quantize_keeps_weights_packed():
    z = zoo.load("rescat_cnn")
    spec = {"passes": [{"kind": "quantize", "weights": {"bits": 4, "group_size": -1}}, {"kind": "cleanup"}]}
    out = rewrite.compile(z.model, spec, example_inputs=z.example, calibration=z.calibration)
    assert _count(out.module, "rewrite.") > 0
    assert any(t.dtype == torch.uint8 for t in out.program.params().values())
