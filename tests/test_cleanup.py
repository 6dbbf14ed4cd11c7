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


class _ConvReadTwice(nn.Module):
    """A conv whose output feeds a batch norm and a second branch: folding would change the branch."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_a_batch_norm_that_cannot_be_folded_is_kept_and_the_report_says_why():
    model = _ConvReadTwice().eval()
    model.bn.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    out = rewrite.compile(model, {"passes": [{"kind": "cleanup"}]}, example_inputs=(x,))
    rec = out.report.passes[0]
    assert rec.details["batch norms folded"] == 0 and _count(out.module, "batch_norm") == 1
    assert any("skipped batch norm folding: conv2d's output is also read elsewhere" in n for n in rec.notes), rec.notes
    with torch.no_grad():
        assert torch.allclose(out.module(x), model(x), atol=1e-6)
