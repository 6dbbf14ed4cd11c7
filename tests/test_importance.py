"""Importance metrics against hand computations on tiny models (exact numbers)."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from rewrite.passes import importance as imp
from rewrite.passes.importance import stats as stats_mod
from rewrite.program import Program
from tiers import sweep

try:
    from rewrite.dims import Group, Member
except ImportError:  # dimension tracking not landed: duck-typed stand-ins with the same fields
    @dataclass(frozen=True)
    class Member:  # type: ignore[no-redef]
        param: str
        dim: int
        indices: torch.Tensor
        role: str
        module: str

    @dataclass
    class Group:  # type: ignore[no-redef]
        id: int
        kind: str
        size: int
        unit: int
        members: list
        layer: str | None
        prunable: bool
        reason: str


W1 = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
W2 = torch.tensor([[2.0, -1.0], [0.5, 4.0]])
B1 = torch.tensor([[1.0, 2.0, -1.0], [0.0, -1.0, 3.0]])
B2 = torch.tensor([[2.0, 0.0, 1.0]])


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 2, bias=False)
        self.fc2 = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc1.weight.copy_(W1)
            self.fc2.weight.copy_(W2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture()
def tiny():
    model = Tiny().eval()
    return model, Program.capture(model, (B1,)), [(B1,), (B2,)]


def test_magnitude_l1_l2(tiny):
    _, prog, _ = tiny
    l1 = imp.weight_scores(prog, None, "magnitude_l1")
    l2 = imp.weight_scores(prog, None, "magnitude")
    assert torch.equal(l1["fc1.weight"], torch.tensor([[1.0, 2.0, 0.5], [0.0, 3.0, 1.0]]))
    assert torch.equal(l2["fc1.weight"], torch.tensor([[1.0, 4.0, 0.25], [0.0, 9.0, 1.0]]))


def test_wanda_hessian_activation_by_hand(tiny):
    _, prog, batches = tiny
    cache = {}
    # fc1 input tokens over both batches: (1,2,-1), (0,-1,3), (2,0,1)
    # sum x^2 per feature = (5, 5, 11); sum |x| = (3, 3, 5); 3 tokens
    wanda = imp.weight_scores(prog, batches, "wanda", cache=cache)["fc1.weight"]
    expect = torch.tensor([[1 * 5 ** 0.5, 2 * 5 ** 0.5, 0.5 * 11 ** 0.5], [0.0, 3 * 5 ** 0.5, 11 ** 0.5]])
    assert torch.allclose(wanda, expect, atol=1e-6)
    hess = imp.weight_scores(prog, batches, "hessian", cache=cache)["fc1.weight"]
    assert torch.allclose(hess, torch.tensor([[5.0, 20.0, 2.75], [0.0, 45.0, 11.0]]), atol=1e-5)
    act = imp.weight_scores(prog, batches, "activation", cache=cache)["fc1.weight"]
    assert torch.allclose(act, torch.tensor([[1.0, 1.0, 5 / 3]] * 2), atol=1e-6)
    # fc2 input h = relu(W1 x): relu(1-4-0.5, 0+6+1) = (0, 7); relu(0+2+1.5, -3-3) = (3.5, 0);
    # relu(2+0+0.5, 0+0-1) = (2.5, 0).  sum h^2 = (18.5, 49); sum |h| = (6, 7)
    wanda2 = imp.weight_scores(prog, batches, "wanda", cache=cache)["fc2.weight"]
    assert torch.allclose(wanda2, W2.abs() * torch.tensor([18.5 ** 0.5, 7.0]), atol=1e-5)


def test_wina_neuron_scores_by_hand(tiny):
    _, prog, batches = tiny
    wina = imp.neuron_scores(prog, batches)["fc2.weight"]
    # mean |h| = (6/3, 7/3); column norms of W2 = (sqrt(4.25), sqrt(17))
    assert torch.allclose(wina, torch.tensor([2 * 4.25 ** 0.5, 7 / 3 * 17 ** 0.5]), atol=1e-5)
    per_weight = imp.weight_scores(prog, batches, "wina")
    assert torch.allclose(per_weight["fc2.weight"], wina.expand(2, 2))
    assert per_weight.roles == ("consumer",)


def test_one_streaming_run_shared_and_hessian_is_diag_of_second_moment(tiny, monkeypatch):
    _, prog, batches = tiny
    calls = []
    real = stats_mod.observe
    monkeypatch.setattr(stats_mod, "observe", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = {}
    for kind in ("wanda", "hessian", "activation", "wina"):
        imp.weight_scores(prog, batches, kind, cache=cache)
    assert len(calls) == 1
    st = imp.statistics(prog, batches, second_moment=True, cache=cache)  # needs X^T X: one more run
    assert len(calls) == 2
    x = torch.cat([B1, B2]).double()
    assert torch.allclose(st["fc1.weight"].input.xtx, x.T @ x)
    assert torch.allclose(torch.diagonal(st["fc1.weight"].input.xtx).float(), st["fc1.weight"].input.sum_sq.float())
    imp.weight_scores(prog, batches, "wanda", cache=cache)  # the richer entry serves later metrics
    assert len(calls) == 2
    # streaming: the state has a fixed size whatever the number of batches
    many = imp.statistics(prog, batches * 10)
    assert many["fc1.weight"].input.sum_sq.shape == (3,) and many["fc1.weight"].input.n == 30
    assert torch.allclose(many["fc1.weight"].input.sum_sq, 10 * st["fc1.weight"].input.sum_sq)
    # output statistics: fc1's output (pre-relu) (-3.5, 7), (3.5, -6), (2.5, -1): sum |y| = (9.5, 14)
    assert torch.allclose(st["fc1.weight"].output.sum_abs.float(), torch.tensor([9.5, 14.0]))


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.tensor([[1.0, -1.0]]))

    def forward(self, x, attention_mask):
        return self.proj(x) * attention_mask.unsqueeze(-1)


def test_padding_tokens_are_excluded():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    prog = Program.capture(Masked().eval(), {"x": x, "attention_mask": mask}, dynamic=False)
    st = imp.statistics(prog, [{"x": x, "attention_mask": mask}])
    assert st["proj.weight"].input.n == 3
    assert torch.allclose(st["proj.weight"].input.sum_sq.float(), torch.tensor([35.0, 56.0]))


class GroupedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, groups=2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.arange(1.0, 9.0).reshape(4, 2, 1, 1))

    def forward(self, x):
        return self.conv(x)


def test_grouped_conv_uses_the_right_input_channel():
    x = torch.zeros(1, 4, 1, 2)
    x[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    x[0, :, 0, 1] = torch.tensor([1.0, 0.0, 0.0, 2.0])
    prog = Program.capture(GroupedConv().eval(), (x,), dynamic=False)
    wanda = imp.weight_scores(prog, [(x,)], "wanda")["conv.weight"].reshape(4, 2)
    norms = torch.tensor([2.0, 4.0, 9.0, 20.0]).sqrt()  # per input channel over both pixels
    w = torch.arange(1.0, 9.0).reshape(4, 2)
    expect = torch.stack([w[0] * norms[:2], w[1] * norms[:2], w[2] * norms[2:], w[3] * norms[2:]])
    assert torch.allclose(wanda, expect, atol=1e-5)
    wina = imp.neuron_scores(prog, [(x,)])["conv.weight"]
    mean_abs = torch.tensor([1.0, 1.0, 1.5, 3.0])
    col = torch.tensor([(1 + 9) ** 0.5, (4 + 16) ** 0.5, (25 + 49) ** 0.5, (36 + 64) ** 0.5])
    assert torch.allclose(wina, mean_abs * col, atol=1e-5)


class AddMM(nn.Module):
    """GPT-2's Conv1D layout: y = b + x @ W with W [in, out]."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 1.0]]))
        self.bias = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight)


def test_matmul_layout_scores_rows_by_input_feature():
    prog = Program.capture(AddMM().eval(), (B1,), dynamic=False)
    wanda = imp.weight_scores(prog, [(B1,)], "wanda")["weight"]
    norms = torch.tensor([1.0, 5.0, 10.0]).sqrt()
    assert torch.allclose(wanda, prog.param("weight").detach().abs() * norms.reshape(3, 1), atol=1e-6)


def test_taylor_with_task_loss_matches_autograd(tiny):
    model, prog, batches = tiny

    def loss_fn(out, batch):
        return (out ** 2).sum()

    got = imp.weight_scores(prog, batches, "taylor", task_loss=loss_fn)
    ref = Tiny()
    grads = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for (x,) in batches:
        ref.zero_grad()
        loss_fn(ref(x), None).backward()
        for n, p in ref.named_parameters():
            grads[n] += p.grad
    for n, p in ref.named_parameters():
        assert torch.allclose(got[n], (p.detach() * grads[n] / 2).abs(), atol=1e-5), n
    # by hand for fc2: out = W2 h, dL/dW2 = sum_t 2 out_t h_t^T over tokens; tokens h = (0,7), (3.5,0), (2.5,0)
    h = torch.tensor([[0.0, 7.0], [3.5, 0.0], [2.5, 0.0]])
    out = h @ W2.T
    g = 2 * out.T @ h / 2  # mean over the 2 batches
    assert torch.allclose(got["fc2.weight"], (W2 * g).abs(), atol=1e-4)


def test_taylor_self_distillation_against_original(tiny):
    _, prog, batches = tiny
    student = prog.clone()
    student.set_param("fc2.weight", W2 + torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    got = imp.weight_scores(student, batches, "taylor", original=prog)
    assert imp.taylor_scores.last_loss == "distillation" and got.loss == "distillation"
    # L_b = mean over the batch's output elements of (y - y0)^2; y - y0 = (0.5 h_0, 0) per token
    # dL/dW2[0,0] = sum_t 2 (0.5 h_t0) h_t0 / (2 * tokens_b); batch 1 tokens h0 = (0, 3.5), batch 2: 2.5
    g00 = ((2 * 0.5 * 12.25) / 4 + (2 * 0.5 * 6.25) / 2) / 2  # = 3.09375
    assert abs(float(got["fc2.weight"][0, 0]) - 2.5 * g00) < 1e-5
    assert float(got["fc2.weight"][1].abs().sum()) == 0.0  # the second output row is unchanged


def test_taylor_on_unchanged_model_uses_the_probe_and_is_deterministic(tiny):
    _, prog, batches = tiny
    a = imp.weight_scores(prog, batches, "taylor", original=prog)
    assert imp.taylor_scores.last_loss == "probe"
    b = imp.weight_scores(prog, batches, "taylor")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert float(a["fc1.weight"].sum()) > 0
    assert not prog.param("fc1.weight").requires_grad or prog.param("fc1.weight").grad is None


def _head_group():
    # two "heads" of width 2 over a [4, 3] producer (rows) and a [2, 4] consumer (columns)
    idx = torch.tensor([[0, 1], [2, 3]])
    return Group(id=7, kind="head", size=2, unit=2, layer="layer.0", prunable=True, reason="", members=[
        Member("q.weight", 0, idx, "producer", "q"),
        Member("q.bias", 0, idx, "producer", "q"),
        Member("o.weight", 1, idx, "consumer", "o"),
    ])


def test_group_scores_reductions_by_hand():
    q = torch.arange(12.0).reshape(4, 3)  # head 0 rows 0-1: 0..5 (sum 15); head 1 rows 2-3: 6..11 (sum 51)
    o = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])  # head 0 cols 0-1: 14; head 1: 22
    scores = {"q.weight": q, "o.weight": o}
    g = _head_group()
    assert torch.equal(imp.group_scores([g], scores, "sum", normalize=False)[7], torch.tensor([29.0, 73.0]))
    assert torch.allclose(imp.group_scores([g], scores, "mean", normalize=False)[7], torch.tensor([29 / 10, 73 / 10]))
    assert torch.equal(imp.group_scores([g], scores, "max", normalize=False)[7], torch.tensor([6.0, 11.0]))
    assert torch.allclose(imp.group_scores([g], scores, "sum")[7], torch.tensor([29.0, 73.0]) / 51.0)
    only_consumer = imp.group_scores([g], scores, "sum", normalize=False, roles=("consumer",))[7]
    assert torch.equal(only_consumer, torch.tensor([14.0, 22.0]))
    assert imp.group_scores([g], {"other": q}) == {}
    rows = imp.group_rows([g], {7: torch.tensor([29.0, 73.0])}, removed={7: [0]})
    assert rows[0]["max removed score"] == 29.0 and rows[0]["min kept score"] == 73.0


def test_per_layer_normalisation_makes_layers_comparable():
    g1, g2 = _head_group(), _head_group()
    g2.id = 8
    big = {"q.weight": torch.arange(12.0).reshape(4, 3) * 100, "o.weight": torch.ones(2, 4) * 100}
    small = {"q.weight": torch.arange(12.0).reshape(4, 3), "o.weight": torch.ones(2, 4)}
    a = imp.group_scores([g1], big)[7]
    b = imp.group_scores([g2], small)[8]
    assert torch.allclose(a, b)  # same shape of importance, whatever the layer's scale
    assert torch.allclose(a.mean(), torch.tensor(1.0))


def test_annotations(tiny):
    _, prog, batches = tiny
    scores = imp.weight_scores(prog, batches, "wanda")
    imp.annotate_weight_scores(prog, scores)
    node = next(n for n in prog.graph.nodes if n.op == "call_function" and "linear" in str(n.target))
    ann = Program.annotation(node, "importance")
    assert ann["wanda"]["param"] == "fc1.weight" and ann["wanda"]["score"].shape == (2, 3)
    mod = prog.notes["importance"]["modules"]["fc1"]["wanda"]
    assert torch.allclose(mod["per_input"], scores["fc1.weight"].sum(0))
    imp.annotate_neuron_scores(prog, imp.neuron_scores(prog, batches))
    assert prog.notes["importance"]["neurons"]["fc2"]["wina"].shape == (2,)


@pytest.mark.parametrize("name", sweep(["bert", "llama", "rescat_cnn", "gpt2"], fast=["bert", "rescat_cnn"]))
def test_every_kind_runs_on_zoo_models(name):
    from rewrite import zoo

    z = zoo.load(name, calibration_batches=2)
    prog = Program.capture(z.model, z.example)
    cache = {}
    for kind in imp.KINDS:
        s = imp.weight_scores(prog, z.calibration, kind, cache=cache)
        assert s and all(v.shape == prog.param(p).shape and torch.isfinite(v).all() for p, v in s.items()), kind
        assert all(float(v.sum()) > 0 for v in s.values()), kind


def test_inspect_kinds_from_spec_and_flags():
    from rewrite.passes.importance.inspect import kinds_from
    from rewrite.errors import RewriteError
    from rewrite.spec import Spec

    spec = Spec.parse({"passes": [{"kind": "prune", "granularity": "head", "amount": 0.2},
                                  {"kind": "skip", "importance": "block_influence"}]})
    assert kinds_from(spec, None) == {"weight": ["wanda"], "layer": ["block_influence"], "token": []}
    assert kinds_from(None, ["hessian", "norm"]) == {"weight": ["hessian"], "layer": [], "token": ["norm"]}
    with pytest.raises(RewriteError, match="valid kinds"):
        kinds_from(None, ["nonsense"])
    obs = Spec.parse({"passes": [{"kind": "prune", "granularity": "neuron", "amount": 0.2, "importance": "obs"},
                                 {"kind": "token", "keep": 0.5, "importance": "pooled_influence"}]})
    assert kinds_from(obs, None) == {"weight": [], "layer": [], "token": ["pooled_influence"]}
    with pytest.raises(RewriteError, match="no standalone scores"):
        kinds_from(None, ["obs"])


def test_rewrite_inspect_writes_tables_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from rewrite.cli import main

    rc = main(["inspect", "--model", "rewrite.zoo_factories:bert", "--importance", "wanda", "--importance", "wina",
               "--out", str(tmp_path), "--groups"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "## heads" in out and "## neurons" in out and "## groups" in out and "## layers" in out
    assert (tmp_path / "layers.png").stat().st_size > 1000
    assert (tmp_path / "heads_wanda.png").stat().st_size > 1000
    import json

    tables = json.loads((tmp_path / "importance.json").read_text())
    assert len(tables["heads"]) == 3 * 4  # 3 layers x 4 heads
    assert abs(sum(r["wanda share"] for r in tables["layers"]) - 1.0) < 0.2  # blocks hold most weights


def test_module_rows_for_the_report(tiny):
    _, prog, batches = tiny
    rows = imp.module_rows(prog, imp.weight_scores(prog, batches, "magnitude_l1"))
    assert rows[0] == {"module": "fc1", "importance": "magnitude_l1", "total": 7.5, "min": 0.0, "median": 1.0, "max": 3.0}
