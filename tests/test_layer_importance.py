"""Layer importance scores against hand computations on the eager HF models."""
import copy

import pytest
import torch

from rewrite.passes.canonicalize import canonicalize
from rewrite.passes.importance.layer import layer_scores, module_outlier_fraction, outlier_fraction
from rewrite.passes.skip_blocks import find_regions
from rewrite import Program, zoo
from rewrite.errors import PassError


@pytest.fixture(scope="module")
def bert():
    z = zoo.load("bert", calibration_batches=2)
    torch.manual_seed(1)
    with torch.no_grad():  # larger weights than the 0.02 init so that blocks visibly change the stream
        for name, prm in z.model.named_parameters():
            if name.endswith("weight") and prm.dim() == 2 and "embeddings" not in name:
                prm.normal_(0, 0.15)
    p = Program.capture(z.model, z.example)
    canonicalize(p)
    return z, p


def _masked_mean_cos(a, b, mask):
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    m = mask.double()
    return float((cos * m).sum() / m.sum())


def test_outlier_fraction_exact():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 10.0, -10.0]])
    # mean 0, std sqrt(200/7) = 5.345: |z| of +-10 is 1.87 > 1, zeros are 0
    assert outlier_fraction([w]) == pytest.approx(2 / 8)
    a, b = torch.randn(50, 40), torch.randn(30, 40) * 3
    pooled = torch.cat([a.reshape(-1), b.reshape(-1)])
    z = (pooled - pooled.mean()) / pooled.std()
    assert outlier_fraction([a, b]) == pytest.approx(float((z.abs() > 1).float().mean()))


def test_module_outlier_fraction_matches_weights(bert):
    z, p = bert
    got = module_outlier_fraction(p)
    linears = {n: m for n, m in z.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(got) == set(linears)
    w = linears["encoder.layer.1.intermediate.dense"].weight.detach()
    zz = (w - w.mean()) / w.std()
    assert got["encoder.layer.1.intermediate.dense"] == pytest.approx(float((zz.abs() > 1).float().mean()))
    assert set(module_outlier_fraction(p, ["*.query"])) == {f"encoder.layer.{i}.attention.self.query" for i in range(3)}
    block = layer_scores(p, [], "outlier_fraction")
    ws = [m.weight for n, m in linears.items() if n.startswith("encoder.layer.2.")]
    assert block["encoder.layer.2"] == pytest.approx(outlier_fraction(ws))


def test_block_influence_matches_hooks(bert):
    z, p = bert
    seen = {}
    layer = z.model.encoder.layer[1]
    h1 = layer.register_forward_pre_hook(lambda m, args, kw: seen.__setitem__("in", args[0] if args else kw["hidden_states"]), with_kwargs=True)
    h2 = layer.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out[0] if isinstance(out, tuple) else out))
    s = n = 0.0
    try:
        for b in z.calibration:
            with torch.no_grad():
                b.call(z.model)
            mask = b.kwargs["attention_mask"]
            s += _masked_mean_cos(seen["in"], seen["out"], mask) * float(mask.sum())
            n += float(mask.sum())
    finally:
        h1.remove(), h2.remove()
    scores = layer_scores(p, z.calibration, "block_influence")
    assert set(scores) == {"encoder.layer.0", "encoder.layer.1", "encoder.layer.2"}
    assert scores["encoder.layer.1"] == pytest.approx(1 - s / n, abs=1e-6)
    assert scores["encoder.layer.1"] > 1e-3


def test_fidelity_drop_matches_module_removal(bert):
    z, p = bert
    scores = layer_scores(p, z.calibration, "fidelity_drop", blocks=["encoder.layer.0"])
    assert list(scores) == ["encoder.layer.0"]
    cut = copy.deepcopy(z.model)
    cut.encoder.layer = torch.nn.ModuleList(list(cut.encoder.layer)[1:])
    s = n = 0.0
    for b in z.calibration:
        with torch.no_grad():
            ref, got = b.call(z.model), b.call(cut)
        mask = b.kwargs["attention_mask"]
        # per-token cosine over last_hidden_state (masked) and per-sample cosine of the pooler output
        s += _masked_mean_cos(ref.last_hidden_state, got.last_hidden_state, mask) * float(mask.sum())
        s += float(torch.nn.functional.cosine_similarity(ref.pooler_output.double(), got.pooler_output.double(), dim=-1).sum())
        n += float(mask.sum()) + ref.pooler_output.shape[0]
    assert scores["encoder.layer.0"] == pytest.approx(1 - s / n, abs=1e-6)
    assert scores["encoder.layer.0"] > 1e-3


def test_branch_keys_and_scores(bert):
    z, p = bert
    att = layer_scores(p, z.calibration, "block_influence", granularity="attention")
    mlp = layer_scores(p, z.calibration, "fidelity_drop", granularity="mlp")
    assert list(att) == [f"encoder.layer.{i}.attention" for i in range(3)]
    assert list(mlp) == [f"encoder.layer.{i}.mlp" for i in range(3)]
    assert all(v > 0 for v in list(att.values()) + list(mlp.values()))
    # the post-norm attention branch ends at attention.output.LayerNorm, found from the graph
    r = find_regions(p, "attention").regions[0]
    out = next(n for n in p.graph.nodes if n.name == r.stream_out)
    assert p.module_path(out) == "encoder.layer.0.attention.output.LayerNorm"


def test_no_block_is_a_clear_error():
    z = zoo.load("mlp", calibration_batches=1)
    p = Program.capture(z.model, z.example)
    with pytest.raises(PassError, match="no skippable block"):
        layer_scores(p, z.calibration, "block_influence")


def test_layer_metrics_on_a_generation_graph_compare_logits_not_cache_state():
    """A KV-cache graph's presents are the next step's input; averaged in, they made the skip search
    remove the last blocks (whose removal leaves every earlier present untouched)."""
    from rewrite.passes.importance.layer import output_cosine
    from rewrite.inputs import Inputs

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ref = {"logits": logits, "present.0.key": torch.randn(2, 2, 5, 4), "present.0.value": torch.randn(2, 2, 5, 4)}
    got = {"logits": logits.clone(), "present.0.key": torch.randn(2, 2, 5, 4), "present.0.value": torch.randn(2, 2, 5, 4)}
    batch = Inputs((), {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long)})
    s, n = output_cosine(ref, got, batch)
    assert n > 0 and abs(s / n - 1.0) < 1e-6  # identical logits: the differing presents do not count
