import torch

from rewrite.passes.canonicalize import canonicalize, group_dims
from rewrite.passes.cleanup import remove_dropout
from rewrite import Program, zoo


def test_blocks_and_residual_stream_bert():
    z = zoo.load("bert")
    p = Program.capture(z.model, z.example)
    canonicalize(p)
    remove_dropout(p)
    blocks = p.blocks()
    assert [b.path for b in blocks] == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    assert all(b.type == "BertLayer" for b in blocks)
    stream = p.residual_stream()
    assert len(stream) == 4
    assert all(p.module_path(n).endswith("LayerNorm") for n in stream)
    g = p.dataflow()
    assert g.number_of_nodes() == len(p.graph.nodes)
    q = next(n for n in p.nodes("call_function") if p.module_path(n) == "encoder.layer.0.attention.self.query")
    w = next(a for a in q.all_input_nodes if a.op == "get_attr" and str(a.target).endswith("weight"))
    assert tuple(p.param(w).shape) == (64, 64)


def test_blocks_resnet_nested_lists():
    z = zoo.load("resnet")
    p = Program.capture(z.model, z.example)
    lists = p.block_lists()
    assert "encoder.stages" in lists and "encoder.stages.0.layers" in lists


def test_group_dims():
    assert group_dims((2, 8, 64), (2, 8, 4, 16)) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert group_dims((2, 4, 8, 16), (2, 32, 16)) == [([0], [0]), ([1, 2], [1]), ([3], [2])]


def test_canonical_views_follow_a_width_change():
    """After canonicalisation, slicing the q/k/v/o weights to fewer heads needs no view edits."""
    z = zoo.load("bert")
    p = Program.capture(z.model, z.example)
    canonicalize(p)
    keep = torch.arange(48)  # 3 of 4 heads (head_dim 16)
    for i in range(3):
        pre = f"encoder.layer.{i}.attention"
        for name in ("query", "key", "value"):
            p.set_param(f"{pre}.self.{name}.weight", p.param(f"{pre}.self.{name}.weight")[keep])
            p.set_param(f"{pre}.self.{name}.bias", p.param(f"{pre}.self.{name}.bias")[keep])
        p.set_param(f"{pre}.output.dense.weight", p.param(f"{pre}.output.dense.weight")[:, keep])
    out = p.run(z.example)
    assert out.last_hidden_state.shape == (2, 12, 64)
    q = p.recapture()  # shapes re-propagate through a fresh capture
    assert q.run(z.example).last_hidden_state.shape == (2, 12, 64)
