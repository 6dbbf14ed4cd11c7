"""Dimension tracking: the coupled groups of real architectures, checked index by index."""
from __future__ import annotations

import functools

import pytest
import torch

from rewrite.passes.canonicalize import canonicalize
from rewrite import zoo
from rewrite.dims import describe, find_groups
from rewrite.program import Program


@functools.lru_cache(maxsize=None)
def _groups(name: str):
    z = zoo.load(name, calibration_batches=0)
    p = Program.capture(z.model, z.example)
    canonicalize(p)
    return p, find_groups(p)


def _member(g, param, dim=None):
    ms = [m for m in g.members if m.param == param and (dim is None or m.dim == dim)]
    assert len(ms) == 1, (param, g)
    return ms[0]


def _with(groups, param, dim):
    out = [g for g in groups if any(m.param == param and m.dim == dim for m in g.members)]
    return out


def test_bert_heads_couple_qkv_and_output_projection():
    p, groups = _groups("bert")
    heads = [g for g in groups if g.kind == "head"]
    assert [g.layer for g in heads] == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    g = heads[1]
    assert (g.size, g.unit, g.prunable) == (4, 16, True)
    pre = "encoder.layer.1.attention"
    for name in ("query", "key", "value"):
        for suffix in ("weight", "bias"):
            m = _member(g, f"{pre}.self.{name}.{suffix}", 0)
            assert m.role == "producer"
            assert torch.equal(m.indices, torch.arange(64).view(4, 16))  # head h = rows h*16..h*16+15
    out = _member(g, f"{pre}.output.dense.weight", 1)
    assert out.role == "consumer" and out.module == f"{pre}.output.dense"
    assert torch.equal(out.indices, torch.arange(64).view(4, 16))
    assert len(g.members) == 7


def test_bert_ffn_neurons_and_frozen_residual():
    p, groups = _groups("bert")
    g = _with(groups, "encoder.layer.0.intermediate.dense.weight", 0)[0]
    assert (g.kind, g.size, g.unit, g.prunable) == ("neuron", 128, 1, True)
    assert {(m.param, m.dim, m.role) for m in g.members} == {
        ("encoder.layer.0.intermediate.dense.weight", 0, "producer"),
        ("encoder.layer.0.intermediate.dense.bias", 0, "producer"),
        ("encoder.layer.0.output.dense.weight", 1, "consumer"),
    }
    res = _with(groups, "embeddings.word_embeddings.weight", 1)[0]
    assert res.kind == "residual" and not res.prunable and res.reason in ("model output", "residual stream shared by all blocks")
    # the residual width runs through every block's output projection and layer norm
    assert _member(res, "encoder.layer.2.output.LayerNorm.weight", 0).role == "producer"
    assert _member(res, "encoder.layer.0.attention.self.query.weight", 1).role == "consumer"


def test_llama_gqa_kv_head_with_its_query_heads_and_swiglu():
    p, groups = _groups("llama")  # 4 query heads, 2 KV heads, head_dim 16
    kv = [g for g in groups if g.kind == "kv_head"]
    assert len(kv) == 3 and all(g.size == 2 and g.unit == 16 and g.heads_per_unit == 2 for g in kv)
    g = kv[0]
    q = _member(g, "layers.0.self_attn.q_proj.weight", 0)
    k = _member(g, "layers.0.self_attn.k_proj.weight", 0)
    v = _member(g, "layers.0.self_attn.v_proj.weight", 0)
    o = _member(g, "layers.0.self_attn.o_proj.weight", 1)
    # KV head u goes with query heads 2u and 2u+1 (repeat_kv expand + reshape)
    assert torch.equal(q.indices, torch.arange(64).view(2, 32))
    assert torch.equal(k.indices, torch.arange(32).view(2, 16))
    assert torch.equal(v.indices, k.indices)
    assert torch.equal(o.indices, q.indices)
    mlp = _with(groups, "layers.0.mlp.gate_proj.weight", 0)[0]
    assert mlp.kind == "neuron" and mlp.size == 96
    assert {(m.param, m.dim) for m in mlp.members} == {
        ("layers.0.mlp.gate_proj.weight", 0), ("layers.0.mlp.up_proj.weight", 0), ("layers.0.mlp.down_proj.weight", 1)}
    res = _with(groups, "embed_tokens.weight", 1)[0]
    assert not res.prunable
    assert _member(res, "layers.1.input_layernorm.weight", 0).role == "producer"  # RMSNorm scale joins the residual


def test_gpt2_fused_qkv_split_offsets():
    p, groups = _groups("gpt2")  # c_attn: [64, 192] = [in, q|k|v]; split at 64
    g = [g for g in groups if g.kind == "head" and g.layer == "h.0"][0]
    m = _member(g, "h.0.attn.c_attn.weight", 1)
    assert m.role == "producer" and g.unit == 16
    expected = torch.stack([torch.cat([torch.arange(16) + 16 * h + off for off in (0, 64, 128)]) for h in range(4)])
    assert torch.equal(m.indices, expected)
    assert torch.equal(_member(g, "h.0.attn.c_proj.weight", 0).indices, torch.arange(64).view(4, 16))


def test_resnet_residual_add_couples_channels():
    p, groups = _groups("resnet")
    # stage 0: the stem output, both bottleneck outputs and the shortcut conv share one group
    g = _with(groups, "embedder.embedder.convolution.weight", 0)[0]
    params = {m.param for m in g.members if m.role == "producer" and m.param.endswith("convolution.weight")}
    assert params == {"embedder.embedder.convolution.weight", "encoder.stages.0.layers.0.layer.2.convolution.weight",
                      "encoder.stages.0.layers.1.layer.2.convolution.weight"}
    assert "encoder.stages.0.layers.1.layer.2.convolution.weight" in params
    assert g.kind == "channel" and g.size == 16 and g.prunable
    # the batch norm after each conv follows its channels, running stats included
    assert _member(g, "embedder.embedder.normalization.running_var", 0).role == "producer"
    # the last stage reaches the model output: frozen
    last = _with(groups, "encoder.stages.1.layers.1.layer.2.convolution.weight", 0)[0]
    assert last.kind == "residual" and not last.prunable and last.reason == "model output"
    assert "encoder.stages.1.layers.0.shortcut.convolution.weight" in {m.param for m in last.members}
    # inside a bottleneck, the 1x1 reduce feeds the 3x3: their channels are a group of their own
    inner = _with(groups, "encoder.stages.1.layers.0.layer.0.convolution.weight", 0)[0]
    assert _member(inner, "encoder.stages.1.layers.0.layer.1.convolution.weight", 1).role == "consumer"
    assert inner.size == 8 and inner.prunable


def test_concat_shifts_index_ranges():
    p, groups = _groups("rescat_cnn")  # head consumes cat([branch_a (8), branch_b (12)])
    a = _with(groups, "branch_a.weight", 0)[0]
    b = _with(groups, "branch_b.1.weight", 0)[0]
    assert a.id != b.id and a.size == 8 and b.size == 12
    assert torch.equal(_member(a, "head.weight", 1).indices.flatten(), torch.arange(8))
    assert torch.equal(_member(b, "head.weight", 1).indices.flatten(), torch.arange(8, 20))
    # the residual add ties the stem's output to res.3's and to every consumer of the sum,
    # including the depthwise conv (whose output channels follow its input channels)
    r = _with(groups, "stem.0.weight", 0)[0]
    assert {"res.3.weight", "branch_b.0.weight", "res.4.running_mean"} <= {m.param for m in r.members}
    assert _member(r, "branch_b.0.weight", 0).role == "producer"
    assert _member(r, "branch_a.weight", 1).role == "consumer"
    assert r.prunable
    assert [g for g in groups if not g.prunable] == [g for g in groups if g.members[0].param.startswith("fc.")]


def test_mobilenet_depthwise_ties_expansion_and_projection():
    p, groups = _groups("mobilenetv2")
    g = _with(groups, "layer.1.conv_3x3.convolution.weight", 0)[0]
    names = {(m.param, m.dim, m.role) for m in g.members}
    assert ("layer.1.expand_1x1.convolution.weight", 0, "producer") in names
    assert ("layer.1.conv_3x3.convolution.weight", 0, "producer") in names
    assert ("layer.1.reduce_1x1.convolution.weight", 1, "consumer") in names
    assert g.kind == "channel" and g.prunable and g.size == 48


def test_vit_and_convnext():
    _, vit = _groups("vit")
    heads = [g for g in vit if g.kind == "head"]
    assert len(heads) == 3 and all(g.size == 4 and g.unit == 16 and g.prunable for g in heads)
    assert not _with(vit, "layers.0.mlp.fc2.weight", 0)[0].prunable
    _, cnx = _groups("convnext")
    g = _with(cnx, "encoder.stages.1.layers.0.pwconv1.weight", 0)[0]
    assert g.kind == "neuron" and g.size == 128 and g.prunable
    assert {m.param for m in g.members} == {"encoder.stages.1.layers.0.pwconv1.weight", "encoder.stages.1.layers.0.pwconv1.bias",
                                            "encoder.stages.1.layers.0.pwconv2.weight"}


def test_describe_is_readable():
    _, groups = _groups("llama")
    text = describe(groups)
    assert text.splitlines()[0] == f"{len(groups)} groups ({sum(g.prunable for g in groups)} prunable)"
    assert "kv_head" in text and "query_heads_per_kv=2" in text and "residual size=64    unit=1    layer=-  frozen: model output" in text
    assert "consumer layers.0.self_attn.o_proj.weight dim=1 k=32" in text


class _EagerAttention(torch.nn.Module):
    """Attention written out as matmul, scale, mask, softmax, matmul (MobileViT, DeBERTa, many hand-written
    models), instead of scaled_dot_product_attention."""

    def __init__(self, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.dim = heads, hidden // heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        split = lambda t: t.view(B, S, self.heads, self.dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.dim ** 0.5
        ctx = torch.matmul(scores.softmax(dim=-1), v)
        return x + self.o(ctx.transpose(1, 2).reshape(B, S, -1))


def test_eager_matmul_softmax_attention_has_heads_like_sdpa():
    p = Program.capture(_EagerAttention().eval(), (torch.randn(2, 5, 32),))
    canonicalize(p)
    heads = [g for g in find_groups(p) if g.kind == "head"]
    assert len(heads) == 1 and heads[0].prunable and (heads[0].size, heads[0].unit) == (4, 8), [(g.kind, g.size) for g in find_groups(p)]
    out = _member(heads[0], "o.weight", 1)
    assert out.role == "consumer" and torch.equal(out.indices, torch.arange(32).view(4, 8))


class _RelativeBiasAttention(_EagerAttention):
    """Eager attention plus a learned per-head relative-position bias: an embedding table [buckets, heads]
    looked up by a bucket index (T5, MPNet) or indexed directly (Swin's table[index])."""

    def __init__(self, indexed: bool, seq: int = 5, buckets: int = 9):
        super().__init__()
        self.indexed = indexed
        self.rel = torch.nn.Embedding(buckets, self.heads)
        pos = torch.arange(seq)
        self.register_buffer("bucket", (pos[None, :] - pos[:, None]).clamp(-4, 4) + 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        split = lambda t: t.view(B, S, self.heads, self.dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        table = self.rel.weight[self.bucket] if self.indexed else self.rel(self.bucket)  # [S, S, heads]
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.dim ** 0.5 + table.permute(2, 0, 1)
        ctx = torch.matmul(scores.softmax(dim=-1), v)
        return x + self.o(ctx.transpose(1, 2).reshape(B, S, -1))


@pytest.mark.parametrize("indexed", [False, True], ids=["embedding", "index"])
def test_relative_position_bias_table_is_sliced_with_its_heads(indexed):
    p = Program.capture(_RelativeBiasAttention(indexed).eval(), (torch.randn(2, 5, 32),))
    canonicalize(p)
    heads = [g for g in find_groups(p) if g.kind == "head"]
    assert len(heads) == 1 and heads[0].prunable, find_groups(p)
    table = _member(heads[0], "rel.weight", 1)
    assert table.role == "producer" and torch.equal(table.indices, torch.arange(4).view(4, 1))


class _FusedSliceAttention(torch.nn.Module):
    """Phi-3's layout: one fused q|k|v projection sliced at constant bounds, GPT-J's interleaved
    rotary (`stack` then `flatten`) on [B, S, heads, dim], and BEiT's per-head bias table resized by
    `interpolate` before it is indexed."""

    def __init__(self, hidden: int = 32, heads: int = 4, grid: int = 3):
        super().__init__()
        self.heads, self.dim, self.grid = heads, hidden // heads, grid
        self.qkv, self.o = torch.nn.Linear(hidden, 3 * hidden), torch.nn.Linear(hidden, hidden)
        self.table = torch.nn.Parameter(torch.randn(grid * grid + 1, heads))  # +1: a "cls" row kept as is
        pos = torch.arange(5)
        self.register_buffer("bucket", (pos[None, :] - pos[:, None]).abs().clamp(max=grid * grid))

    def _rotate(self, t: torch.Tensor) -> torch.Tensor:  # [B, S, heads, dim]
        x1, x2 = t[..., ::2], t[..., 1::2]
        return t + torch.stack((-x2, x1), dim=-1).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, hidden = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv[..., :hidden], qkv[..., hidden: 2 * hidden], qkv[..., 2 * hidden:]
        split = lambda t: t.view(B, S, self.heads, self.dim)  # noqa: E731
        q, k = self._rotate(split(q)).transpose(1, 2), self._rotate(split(k)).transpose(1, 2)
        v = split(v).transpose(1, 2)
        spatial = self.table[: self.grid * self.grid].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        spatial = torch.nn.functional.interpolate(spatial, size=(self.grid, self.grid), mode="bilinear")
        table = torch.cat([spatial.permute(0, 2, 3, 1).reshape(self.grid * self.grid, -1), self.table[self.grid * self.grid:]])
        bias = table[self.bucket].permute(2, 0, 1)  # [heads, S, S]
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return x + self.o(ctx.transpose(1, 2).reshape(B, S, -1))


def test_fused_slices_stacked_rotary_and_resized_bias_prune_heads(tmp_path):
    """Constant slices move their bounds (`prune_shapes.SLICE_BOUNDS`), `stack` and `interpolate`
    keep the heads dim, and a table read only through views is sliced along with its heads."""
    import rewrite

    torch.manual_seed(0)
    model = _FusedSliceAttention().eval()
    x = torch.randn(2, 5, 32)
    p = Program.capture(model, (x,))
    canonicalize(p)
    heads = [g for g in find_groups(p) if g.kind == "head"]
    assert len(heads) == 1 and heads[0].prunable and heads[0].size == 4, describe(find_groups(p))
    assert _member(heads[0], "table", 1).role == "carried"
    out = rewrite.compile(model, {"passes": [{"kind": "prune", "granularity": "head", "amount": 0.5,
                                              "importance": "magnitude", "compensate": False}]},
                          example_inputs=(x,))
    assert out.program.param("qkv.weight").shape == (48, 32) and out.program.param("table").shape == (10, 2)
    details = out.report.passes[0].details
    assert {"slice bounds"} <= {c["arg"] for c in details["shape constants rewritten"]}
    # what the pruned model computes: the original with the removed heads' output columns zeroed
    kept = [h for h in range(4) if any(torch.equal(model.table[:, h], t) for t in out.program.param("table").T)]
    assert len(kept) == 2
    reference = _FusedSliceAttention().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for h in set(range(4)) - set(kept):
            reference.o.weight[:, h * 8:(h + 1) * 8] = 0
        torch.testing.assert_close(out.module(x), reference(x), rtol=1e-5, atol=1e-5)
    assert out.export(tmp_path / "fused.onnx").verified
