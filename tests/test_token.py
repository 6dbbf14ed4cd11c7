"""The token pass: scores, planning, merge/restore by hand, and BERT / ViT / LLaMA-prefill end to end.

Each end-to-end test compiles a zoo model with one of the example specs in specs/token-*.yaml,
checks the rewritten module against a hand-written reference built from the model's own
layers (gathering hidden states, masks and rotary tables by the selected indices), and
exports to ONNX with dynamic batch and sequence, checked in onnxruntime on padded batches.
"""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import rewrite
from rewrite.kernels.token import keep_count
from rewrite.passes.importance.token import attention_rank, cls_attention, mean_distance, token_scores
from rewrite.passes.token import (gather_seq, merge_apply, merge_assign, merge_size, merge_tokens, merge_weights, plan_stages,
                          restore_seq, size_bias)
from rewrite import demo, zoo
from rewrite.errors import PassError
from rewrite.inputs import Inputs
from rewrite.program import Program
from rewrite.passes.token import TokenSpec
from rewrite.spec import Spec

SPECS = Path(__file__).resolve().parents[1] / "specs"
select = torch.ops.rewrite.token_select
pytest.importorskip("transformers")


def _blocks(n):
    return [SimpleNamespace(path=f"layer.{i}") for i in range(n)]


def test_plan_stages_semantics():
    six = _blocks(6)
    st = plan_stages(TokenSpec(keep=0.7, after=[2]), six)
    assert [(s.index, s.keep) for s in st] == [(2, 0.7)]
    st = plan_stages(TokenSpec(keep=0.5), six)  # default: after block n//2 - 1
    assert [s.index for s in st] == [2]
    st = plan_stages(TokenSpec(keep=[1.0, 0.8, 0.8, 0.4]), six)  # per-layer cumulative schedule
    assert [(s.index, round(s.keep, 6), s.cumulative) for s in st] == [(1, 0.8, 0.8), (3, 0.5, 0.4)]
    st = plan_stages(TokenSpec(keep=[0.8, 0.4], after=["layer.1", 3]), six)
    assert [(s.index, round(s.keep, 6)) for s in st] == [(1, 0.8), (3, 0.5)]
    st = plan_stages(TokenSpec(keep=0.5, after=[0, 2]), six)  # one ratio: applied at each point
    assert [(s.index, s.keep, s.cumulative) for s in st] == [(0, 0.5, 0.5), (2, 0.5, 0.25)]
    with pytest.raises(PassError, match="after the last block"):
        plan_stages(TokenSpec(keep=0.5, after=[5]), six)
    with pytest.raises(PassError, match="must not increase"):
        plan_stages(TokenSpec(keep=[0.5, 0.7]), six)
    with pytest.raises(PassError, match="names no block"):
        plan_stages(TokenSpec(keep=0.5, after=["encoder.layer.9"]), six)


def test_gather_merge_restore_by_hand():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.0, 3.0], [5.0, 5.0]]])  # [1, 5, 2]
    idx = torch.tensor([[0, 1]])
    assert gather_seq(x, idx, [1]).tolist() == [[[1.0, 0.0], [0.0, 1.0]]]
    m = torch.arange(25.0).reshape(1, 1, 5, 5)
    assert gather_seq(m, idx, [2, 3]).tolist() == [[[[0.0, 1.0], [5.0, 6.0]]]]
    assert gather_seq(torch.arange(5.0).reshape(1, 5, 1), torch.tensor([[1, 3], [0, 4]]), [1], True).squeeze(-1).tolist() == [[1, 3], [0, 4]]
    # merge by key similarity: token 2 ~ token 0, token 3 ~ token 1, token 4 is padding (weight 0)
    keys = x.unsqueeze(1)  # [B, heads=1, S, d]
    valid = torch.tensor([[True, True, True, True, False]])
    got = merge_tokens(x, idx, keys, valid)
    assert torch.allclose(got, torch.tensor([[[1.0, 0.05], [0.0, 2.0]]]))
    base = torch.zeros(1, 5, 2)
    assert restore_seq(base, torch.tensor([[1, 3]]), torch.ones(1, 2, 2))[0, :, 0].tolist() == [0, 1, 0, 1, 0]


def test_merge_is_size_weighted_and_spares_forced_tokens():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.0, 3.0], [5.0, 5.0]]])
    keys = x.unsqueeze(1)
    valid = torch.tensor([[True, True, True, True, False]])
    idx = torch.tensor([[0, 1]])
    size = torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0]])
    # CLS (position 0, forced) absorbs nothing: tokens 2 and 3 both go to token 1 (token 2 is closer to CLS)
    assign = merge_assign(idx, keys, valid, keep_first=1)
    assert assign.tolist() == [[0, 1, 1, 1, 1]]
    w = merge_weights(idx, assign, valid, size, keep_first=1)
    assert w.tolist() == [[1.0, 2.0, 1.0, 3.0, 0.0]]  # dropped padding weighs 0
    new_size = merge_size(assign, w, idx)
    assert new_size.tolist() == [[1.0, 6.0]]
    want = torch.tensor([[[1.0, 0.0], [1.0 / 6, (2.0 + 0.1 + 9.0) / 6]]])
    assert torch.allclose(merge_apply(x, assign, w, new_size), want)
    assert torch.allclose(merge_tokens(x, idx, keys, valid, size, keep_first=1), want)
    # no merge target left (only the forced CLS is real and kept): dropped tokens weigh 0, CLS is unchanged
    idx0 = torch.tensor([[0, 4]])
    got = merge_tokens(x, idx0, keys, valid, None, keep_first=1)
    assert torch.allclose(got[0, 0], x[0, 0]) and torch.allclose(got[0, 1], x[0, 4])


@pytest.mark.parametrize("kind", ["bool", "additive", "none"])
def test_proportional_attention_equals_repeated_keys(kind):
    g = torch.Generator().manual_seed(0)
    B, H, Sq, Sk, d = 2, 3, 4, 3, 8
    q, k, v = (torch.randn(B, H, n, d, generator=g) for n in (Sq, Sk, Sk))
    size = torch.tensor([[1.0, 3.0, 2.0], [2.0, 1.0, 1.0]])
    real = torch.tensor([[True, True, True], [True, True, False]]) if kind != "none" else torch.ones(B, Sk, dtype=torch.bool)
    mask = {"bool": real[:, None, None, :], "none": None,
            "additive": torch.zeros(B, 1, 1, Sk).masked_fill(~real[:, None, None, :], float("-inf"))}[kind]
    got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(mask, size, torch.float32))
    for b in range(B):  # a key of size n attends like n copies of it
        reps = size[b].long() * real[b]
        kk, vv = k[b].repeat_interleave(reps, dim=1), v[b].repeat_interleave(reps, dim=1)
        want = torch.nn.functional.scaled_dot_product_attention(q[b], kk, vv)
        assert torch.allclose(got[b], want, atol=1e-6)


def test_token_scores_match_eager_attention():
    z = zoo.load("bert", calibration_batches=0)
    program = Program.capture(z.model, z.example)
    z.model.set_attn_implementation("eager")
    with torch.no_grad():
        out = z.example.call(lambda **kw: z.model(**kw, output_attentions=True, output_hidden_states=True))
    valid = z.example.kwargs["attention_mask"].bool()
    for layer in (0, 1):
        A = out.attentions[layer]  # [B, H, S, S]
        want = A[:, :, 0, :].mean(1).masked_fill(~valid, float("-inf"))
        got = token_scores(program, z.example, "cls_attention", layer=layer)
        assert torch.allclose(got, want, atol=1e-6)
        # weighted PageRank by hand: s <- A^T s over real tokens, from uniform
        Am = A.mean(1)
        w = valid.float()
        s = w / w.sum(1, keepdim=True)
        for _ in range(10):
            s = torch.einsum("bij,bi->bj", Am, s * w)
        got = token_scores(program, z.example, "attention_rank", layer=layer)
        assert torch.allclose(got, s.masked_fill(~valid, float("-inf")), atol=1e-6)
        got = token_scores(program, z.example, "norm", layer=layer)
        assert torch.allclose(got, out.hidden_states[layer + 1].norm(dim=-1).masked_fill(~valid, float("-inf")), atol=1e-5)
        h = out.hidden_states[layer + 1]
        mean = (h * valid.unsqueeze(-1)).sum(1, keepdim=True) / valid.sum(1)[:, None, None]
        got = token_scores(program, z.example, "mean_distance", layer=layer)
        assert torch.allclose(got, (h - mean).norm(dim=-1).masked_fill(~valid, float("-inf")), atol=1e-5)
        # pooled_influence: the distance, times 1 + the attention each token receives from the real queries
        received = (Am * valid[:, :, None]).sum(1)
        got = token_scores(program, z.example, "pooled_influence", layer=layer)
        want = ((h - mean).norm(dim=-1) * (1 + received)).masked_fill(~valid, float("-inf"))
        assert torch.allclose(got, want, atol=1e-5)
    z.model.set_attn_implementation("sdpa")


def _padded_batches(z, lengths=((3, 15), (4, 20))):
    """Batches of other sizes and lengths, each with a padded row."""
    out = []
    for i, (B, S) in enumerate(lengths):
        g = torch.Generator().manual_seed(50 + i)
        ids = torch.randint(1, 128, (B, S), generator=g)
        mask = torch.ones(B, S, dtype=torch.long)
        mask[0, S - S // 3:] = 0
        mask[-1, S - 2:] = 0
        mask[1, 4:] = 0  # mostly padding: some padding must be kept to fill k
        out.append(Inputs((), {"input_ids": ids, "attention_mask": mask}))
    return out


def _heads(lin, h, n):
    B, S, _ = h.shape
    return lin(h).view(B, S, n, -1).transpose(1, 2)


def _bert_reference(model, batch, stages):
    """BERT by hand: run its layers, selecting tokens with CLS attention after the given blocks."""
    ids, mask = batch.kwargs["input_ids"], batch.kwargs["attention_mask"]
    B, S = ids.shape
    h = model.embeddings(input_ids=ids)
    m4 = mask.bool()[:, None, None, :].expand(B, 1, S, S)
    valid = mask.bool()
    n = model.config.num_attention_heads
    for i, layer in enumerate(model.encoder.layer):
        q = _heads(layer.attention.self.query, h, n)
        k = _heads(layer.attention.self.key, h, n)
        h = layer(h, attention_mask=m4)
        if i in stages:
            scores = cls_attention(q, k, m4).masked_fill(~valid, float("-inf"))
            idx = select(scores, stages[i], 1, 0)
            h, m4, valid = gather_seq(h, idx, [1]), gather_seq(m4, idx, [2, 3]), gather_seq(valid, idx, [1])
    return h, valid


@pytest.mark.slow
def test_bert_spec_matches_reference_and_onnx(tmp_path):
    z = zoo.load("bert")
    spec = Spec.from_yaml(SPECS / "token-encoder.yaml")
    out = rewrite.compile(z.model, spec, example_inputs=z.example, calibration=z.calibration)
    rows = out.report.passes[-1].details["selections"]
    assert [r["after"] for r in rows] == ["encoder.layer.0", "encoder.layer.1"]
    batches = [z.example] + _padded_batches(z)
    kept_padding = False
    with torch.no_grad():
        for b in batches:
            got = b.call(out.module)
            want, valid = _bert_reference(z.model, b, {0: 0.7, 1: 0.5 / 0.7})
            S = b.kwargs["input_ids"].shape[1]
            assert got.last_hidden_state.shape[1] == keep_count(keep_count(S, 0.7, 1), 0.5 / 0.7, 1)
            assert torch.allclose(got.last_hidden_state, want, atol=1e-5), (got.last_hidden_state - want).abs().max()
            # demo.mean_pool pools exactly the kept real tokens (padding kept only to fill k is left out)
            m = valid.unsqueeze(-1).float()
            pooled = torch.nn.functional.normalize((want * m).sum(1) / m.sum(1), dim=-1)
            assert torch.allclose(demo.mean_pool(got.last_hidden_state, b.kwargs["attention_mask"]), pooled, atol=1e-5)
            kept_padding = kept_padding or not valid.all()
    assert kept_padding
    rec = out.export(tmp_path / "bert.onnx", verify_inputs=batches)
    assert rec.verified and rec.rel_error <= 1e-4


def _bert_merge_reference(model, batch, stages, importance):
    """BERT by hand with ToMe merging after the given blocks: size-weighted merge, proportional attention."""
    ids, mask = batch.kwargs["input_ids"], batch.kwargs["attention_mask"]
    B, S = ids.shape
    h = model.embeddings(input_ids=ids)
    m4 = mask.bool()[:, None, None, :].expand(B, 1, S, S)
    valid, size = mask.bool(), None
    n = model.config.num_attention_heads
    for i, layer in enumerate(model.encoder.layer):
        k = _heads(layer.attention.self.key, h, n)
        h = layer(h, attention_mask=m4 if size is None else size_bias(m4, size, h.dtype))
        if i in stages:
            scores = {"norm": h.norm(dim=-1), "mean_distance": mean_distance(h, valid)}[importance]
            scores = scores.masked_fill(~valid, float("-inf"))
            idx = select(scores, stages[i], 1, 0)
            assign = merge_assign(idx, k, valid, 1, 0)
            w = merge_weights(idx, assign, valid, size, 1, 0)
            size = merge_size(assign, w, idx)
            h = merge_apply(h, assign, w, size)
            m4, valid = gather_seq(m4, idx, [2, 3]), gather_seq(valid, idx, [1])
    return h, valid, size


MERGE_SPEC = {"passes": [{"kind": "token", "keep": [0.7, 0.5], "importance": "norm", "merge": True}]}


def test_bert_merge_matches_reference():
    z = zoo.load("bert", calibration_batches=0)
    out = rewrite.compile(z.model, MERGE_SPEC, example_inputs=z.example)
    batches = [z.example] + _padded_batches(z)
    with torch.no_grad():
        for b in batches:
            got = b.call(out.module).last_hidden_state
            want, valid, size = _bert_merge_reference(z.model, b, {0: 0.7, 1: 0.5 / 0.7}, "norm")
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
            # every real input token is accounted for by exactly one kept real token
            assert torch.equal((size * valid).sum(1), b.kwargs["attention_mask"].sum(1).float())


@pytest.mark.slow
def test_bert_merge_onnx(tmp_path):
    z = zoo.load("bert", calibration_batches=0)
    out = rewrite.compile(z.model, MERGE_SPEC, example_inputs=z.example)
    rec = out.export(tmp_path / "bert-merge.onnx", verify_inputs=[z.example] + _padded_batches(z))
    assert rec.verified and rec.rel_error <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_pooled_influence_exports_with_padding(name, tmp_path):
    """The score that reads both the attention (q, k, mask) and the hidden states, in the graph:
    onnxruntime matches it on padded batches, for an encoder and a causal decoder (prefill)."""
    z = zoo.load(name, calibration_batches=0)
    spec = {"passes": [{"kind": "token", "keep": 0.5, "after": [1], "importance": "pooled_influence"}]}
    out = rewrite.compile(z.model, spec, example_inputs=z.example)
    S = z.example.kwargs["input_ids"].shape[1]
    assert out.module(**z.example.kwargs)[0].shape[1] == S // 2
    rec = out.export(tmp_path / f"{name}.onnx", verify_inputs=[z.example] + _padded_batches(z))
    assert rec.verified and rec.rel_error <= 1e-4


def _llama_reference(model, batch, after, keep, restore=True):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ids, mask = batch.kwargs["input_ids"], batch.kwargs["attention_mask"]
    B, S = ids.shape
    h = model.embed_tokens(ids)
    pos = torch.arange(S)[None].expand(B, S)
    cos, sin = model.rotary_emb(h, pos)
    m4 = torch.tril(torch.ones(S, S, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    valid = mask.bool()
    cfg = model.config
    saved = None
    for i, layer in enumerate(model.layers):
        x = layer.input_layernorm(h)
        q = _heads(layer.self_attn.q_proj, x, cfg.num_attention_heads)
        k = _heads(layer.self_attn.k_proj, x, cfg.num_key_value_heads)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        h = layer(h, attention_mask=m4, position_embeddings=(cos, sin))
        if i == after:
            scores = cls_attention(q, k, m4, query=-1).masked_fill(~valid, float("-inf"))
            idx = select(scores, keep, 1, 1)
            saved = (h, idx)
            h, m4, valid = gather_seq(h, idx, [1]), gather_seq(m4, idx, [2, 3]), gather_seq(valid, idx, [1])
            cos, sin = gather_seq(cos, idx, [1]), gather_seq(sin, idx, [1])
    if restore:
        h = restore_seq(saved[0], saved[1], h)
    return model.norm(h)


@pytest.mark.slow
def test_llama_prefill_spec_matches_reference_and_onnx(tmp_path):
    z = zoo.load("llama")
    out = rewrite.compile(z.model, Spec.from_yaml(SPECS / "token-llama-prefill.yaml"), example_inputs=z.example,
                          calibration=z.calibration)
    assert any("causal" in n for n in out.report.passes[-1].notes)
    batches = [z.example] + _padded_batches(z)
    with torch.no_grad():
        for b in batches:
            got = b.call(out.module).last_hidden_state
            want = _llama_reference(z.model, b, after=0, keep=0.6)
            assert got.shape == b.kwargs["input_ids"].shape + (64,)  # restored to full length
            assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    rec = out.export(tmp_path / "llama.onnx", verify_inputs=batches)
    assert rec.verified and rec.rel_error <= 1e-4


@pytest.mark.slow
def test_vit_merge_spec_onnx(tmp_path):
    z = zoo.load("vit")
    out = rewrite.compile(z.model, Spec.from_yaml(SPECS / "token-vit-merge.yaml"), example_inputs=z.example,
                          calibration=z.calibration)
    x = z.example.args[0]
    with torch.no_grad():
        got = out.module(x).last_hidden_state
        ref = z.model(x).last_hidden_state
    assert got.shape == (2, keep_count(17, 0.5, 1), 64)
    # CLS (always kept, first) merges only what is most similar to it; the output is not the original's
    assert not torch.allclose(got[:, 0], ref[:, 0])
    assert out.report.after.flops < out.report.before.flops
    other = Inputs((torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3)),), {})
    rec = out.export(tmp_path / "vit.onnx", verify_inputs=[z.example, other])
    assert rec.verified and rec.rel_error <= 1e-4


def test_errors_name_the_fix():
    z = zoo.load("bert", calibration_batches=0)
    with pytest.raises(PassError, match="after the last block"):
        rewrite.compile(z.model, {"passes": [{"kind": "token", "keep": 0.5, "after": [2]}]}, example_inputs=z.example)
