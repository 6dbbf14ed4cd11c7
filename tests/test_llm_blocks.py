"""The LLM structure benchmark's block tools (benchmarks/llm_blocks.py) on a tiny zoo-style causal decoder:
running blocks from recorded inputs reproduces the model, greedy removal finds the best block and scores
exactly what the model with those blocks removed scores, block influence is ShortGPT's 1 - cos."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

llm_blocks = pytest.importorskip("llm_blocks")


def _decoder(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2, use_cache=False))
    with torch.no_grad():  # random init leaves blocks near identity; make them matter unequally
        for i, layer in enumerate(m.model.layers):
            layer.mlp.down_proj.weight.mul_(1 + 4 * i)
    return m.eval()


def _nll(model, batches) -> float:
    from rewrite import llm_data

    total = count = 0
    with torch.inference_mode():
        for ids in batches:
            s, c = llm_data.window_nll(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, ids)
            total, count = total + s, count + c
    return total / count


def test_runner_reproduces_the_model_and_greedy_removal_is_exact():
    m = _decoder()
    batches = list(torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1)).split(2))
    runner = llm_blocks.BlockRunner(m, batches)
    assert abs(runner.nll(runner.run(runner.h0, range(4))) - _nll(m, batches)) < 1e-5
    # brute force over single removals: greedy's first pick is the best one
    single = {i: _nll(llm_blocks.remove_blocks(copy.deepcopy(m), [i]), batches) for i in range(4)}
    removed, path = llm_blocks.greedy_removal(runner, 2)
    assert removed[0] == min(single, key=single.get)
    assert abs(path[0] - single[removed[0]]) < 1e-5
    # the NLL of the chosen pair is the NLL of the model with both blocks deleted
    pruned = llm_blocks.remove_blocks(copy.deepcopy(m), removed)
    assert len(pruned.model.layers) == 2 and pruned.config.num_hidden_layers == 2
    assert abs(path[1] - _nll(pruned, batches)) < 1e-5


def test_block_influence_is_one_minus_cosine_and_shortgpt_takes_the_lowest():
    m = _decoder()
    batches = list(torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2)).split(1))
    updates: list = []
    bi = llm_blocks.block_influence(llm_blocks.BlockRunner(m, batches), updates)
    seen: dict[int, list] = {}
    hooks = [layer.register_forward_hook(lambda mod, a, o, i=i: seen.setdefault(i, []).append(
        (a[0], o[0] if isinstance(o, tuple) else o))) for i, layer in enumerate(m.model.layers)]
    with torch.inference_mode():
        for ids in batches:
            m(input_ids=ids, attention_mask=torch.ones_like(ids))
    for h in hooks:
        h.remove()
    for i in range(4):
        want = torch.cat([1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).flatten() for x, y in seen[i]]).mean()
        assert abs(bi[i] - float(want)) < 1e-5
        mean = torch.cat([(y - x).reshape(-1, x.shape[-1]) for x, y in seen[i]]).mean(0)
        assert torch.allclose(updates[i], mean, atol=1e-5)
    assert llm_blocks.shortgpt_choice(bi, 2) == sorted(range(4), key=lambda i: bi[i])[:2]
    # a block replaced by its mean update: the model adds that constant where the block was
    ids = batches[0]
    r = llm_blocks.replace_blocks(copy.deepcopy(m), [1], updates)
    with torch.inference_mode():
        kw_runner = llm_blocks.BlockRunner(m, [ids])
        h = kw_runner.run(kw_runner.h0, [0])[0] + updates[1]
        h = kw_runner.run([h], [2, 3])[0]
        want = llm_blocks.final_logits(m, h)
        got = r(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_single_block_sensitivity_undoes_each_change():
    m = _decoder(3)
    batches = [torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))]
    runner = llm_blocks.BlockRunner(m, batches)
    before = {k: v.clone() for k, v in m.state_dict().items()}

    def zero_mlp(i):
        w = m.model.layers[i].mlp.down_proj.weight
        saved = w.detach().clone()
        with torch.no_grad():
            w.zero_()

        def undo():
            with torch.no_grad():
                w.copy_(saved)
        return undo

    sens = llm_blocks.single_block_sensitivity(runner, zero_mlp)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    base = _nll(m, batches)
    for i in range(3):
        undo = zero_mlp(i)
        assert abs(sens[i] - (_nll(m, batches) - base)) < 1e-5
        undo()


def _skip_pass(model, batches, **kw):
    from rewrite.passes.canonicalize import canonicalize
    from rewrite.passes.skip import SkipPass
    from rewrite import Program, Spec
    from rewrite.calibration import CalibrationData
    from rewrite.passmanager import PassContext

    example = {"input_ids": batches[0], "attention_mask": torch.ones_like(batches[0])}
    program = Program.capture(model, example)
    canonicalize(program)
    spec = Spec.parse({"passes": [{"kind": "skip", **kw}]})
    from rewrite.inputs import Inputs

    calib = CalibrationData.from_user([{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in batches],
                                      Inputs.of(example))
    ctx = PassContext(spec=spec, calibration=calib, original=program)
    return SkipPass(spec.passes[0]).run(program.clone(), ctx), [b.kwargs["input_ids"] for b in calib.batches]


def test_skip_pass_next_token_nll_greedy_is_the_benchmark_search():
    """The skip pass with importance next_token_nll and search greedy removes the blocks the benchmark's
    greedy removal picks, and its step scores are the NLL increases over the original."""
    m = _decoder()
    batches = list(torch.randint(0, 96, (6, 16), generator=torch.Generator().manual_seed(4)).split(2))
    res, scored = _skip_pass(m, batches, layers=2, importance="next_token_nll", search="greedy")
    removed, path = llm_blocks.greedy_removal(llm_blocks.BlockRunner(m, scored), 2)  # the pass holds one batch back
    assert res.details["removed"] == [f"model.layers.{i}" for i in removed]
    base = _nll(m, scored)
    steps = [t["score"] for t in res.details["trajectory"]]  # the step scores: NLL increase of the set so far
    assert steps == pytest.approx([p - base for p in path], abs=1e-4)


def test_next_token_nll_refuses_a_model_without_logits():
    from rewrite.errors import PassError

    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    m = LlamaModel(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, use_cache=False)).eval()
    batches = [torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(5))]
    with pytest.raises(PassError, match="next_token_nll needs a causal language model"):
        _skip_pass(m, batches, layers=1, importance="next_token_nll", search="oneshot")


def test_stand_in_greedy_scores_each_candidate_with_its_fitted_map():
    """The first pick's reported NLL is the held-back NLL with that block replaced by the stand-in fitted on
    calibration batches (recomputed here by hand), and it is the best such single replacement."""
    m = _decoder()
    gen = torch.Generator().manual_seed(3)
    calib = llm_blocks.BlockRunner(m, list(torch.randint(0, 96, (8, 24), generator=gen).split(2)))
    held = llm_blocks.BlockRunner(m, list(torch.randint(0, 96, (4, 24), generator=gen).split(2)))
    order, path = llm_blocks.stand_in_greedy(calib, held, 2)
    assert len(set(order)) == 2

    def replaced_nll(i: int) -> float:
        x = llm_blocks.BlockRunner.run(calib, calib.h0, range(i))
        theta = llm_blocks.fit_stand_in(x, calib.run(x, [i]))
        h = llm_blocks._apply_stand_in(held.run(held.h0, range(i)), theta)
        return held.nll(held.run(h, range(i + 1, 4)))

    single = {i: replaced_nll(i) for i in range(4)}
    assert order[0] == min(single, key=single.get)
    assert abs(path[0] - single[order[0]]) < 1e-5
