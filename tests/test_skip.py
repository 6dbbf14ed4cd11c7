"""The skip pass: exact against hand-made removals, across the zoo, exported to onnxruntime."""
from pathlib import Path

import pytest
import torch

import rewrite
from rewrite.backends.onnx import export_onnx
from rewrite.passes.canonicalize import canonicalize
from rewrite.passes.importance.layer import mean_output_cosine, output_cosine
from rewrite.passes.skip import SkipPass, beam_search
from rewrite.passes.skip_blocks import Region, find_regions
from rewrite import Program, Spec, zoo
from rewrite.calibration import CalibrationData
from rewrite.errors import PassError
from rewrite.passmanager import PassContext
from tiers import sweep

SPECS = Path(__file__).resolve().parents[1] / "specs"


_CAPTURED: dict[tuple[str, int], tuple[zoo.ZooModel, Program]] = {}


def _zoo(name, batches=2):
    """A zoo model and its canonicalised capture, captured once per test session (capture is the slow part)."""
    if (name, batches) not in _CAPTURED:
        z = zoo.load(name, calibration_batches=batches)
        p = Program.capture(z.model, z.example)
        canonicalize(p)
        _CAPTURED[name, batches] = (z, p)
    return _CAPTURED[name, batches]


def _spec(**kw):
    return Spec.parse({"passes": [{"kind": "skip", **kw}]})


def _skip(z, **kw):
    """Run the skip pass alone (no recapture), as the pass manager would, on a copy of the capture."""
    z, original = _zoo(z.name, len(z.calibration))
    spec = _spec(**kw)
    ctx = PassContext(spec=spec, calibration=CalibrationData.from_user(z.calibration, z.example), original=original)
    res = SkipPass(spec.passes[0]).run(original.clone(), ctx)
    res.program.finalize()
    return original, res


def _weights(p):
    return set(p.params())


@pytest.mark.parametrize("name,layers", sweep([
    ("bert", ["encoder.layer.1"]), ("gpt2", ["h.1"]), ("llama", ["layers.1"]), ("vit", ["layers.0"]),
    ("resnet", ["encoder.stages.0.layers.1"]), ("convnext", ["encoder.stages.1.layers.1"]),
], fast=[("bert", ["encoder.layer.1"]), ("resnet", ["encoder.stages.0.layers.1"])]))
def test_zoo_skip_exports_and_matches_onnxruntime(name, layers, tmp_path):
    z, _ = _zoo(name)
    original, res = _skip(z, layers=layers, importance="outlier_fraction", search="oneshot")
    p = res.program
    assert res.details["removed"] == layers
    gone = {w for w in _weights(original) if w.startswith(layers[0] + ".")}
    assert gone and not gone & _weights(p), "the skipped block's weights must be dead code"
    assert rewrite.measure.count_flops(p) < rewrite.measure.count_flops(original)
    rec = export_onnx(p, tmp_path / "m.onnx", verify_inputs=[z.example, z.calibration[0]])
    assert rec.verified and rec.rel_error < 1e-4


def test_bert_block_skip_equals_removing_the_layer():
    _, res = _skip(_zoo("bert")[0], layers=["encoder.layer.1"], importance="block_influence")
    z = zoo.load("bert", calibration_batches=2)  # a fresh model to cut
    z.model.encoder.layer = torch.nn.ModuleList([m for i, m in enumerate(z.model.encoder.layer) if i != 1])
    b = z.calibration[0]
    with torch.no_grad():
        ref, got = b.call(z.model), res.program.run(b)
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)


def _zero_branch(module):
    """Forward hook: the branch returns zeros (pre-norm: x + 0 = x)."""
    def hook(m, args, kwargs, out):
        first = out[0] if isinstance(out, tuple) else out
        zero = torch.zeros_like(first)
        return (zero,) + tuple(out[1:]) if isinstance(out, tuple) else zero
    return module.register_forward_hook(hook, with_kwargs=True)


def _identity_branch(module):
    """Forward hook: the post-norm sub-layer returns its input (LayerNorm(x + branch) -> x)."""
    def hook(m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x
    return module.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("name,granularity,key,module,hook", [
    ("bert", "attention", "encoder.layer.2.attention", "encoder.layer.2.attention", _identity_branch),
    ("llama", "attention", "layers.0.attention", "layers.0.self_attn", _zero_branch),
    ("llama", "mlp", "layers.1.mlp", "layers.1.mlp", _zero_branch),
])
def test_branch_skip_equals_removing_the_branch(name, granularity, key, module, hook, tmp_path):
    z, _ = _zoo(name)
    _, res = _skip(z, layers=[key], granularity=granularity)
    assert res.details["removed"] == [key]
    handle = hook(z.model.get_submodule(module))
    b = z.calibration[1]
    try:
        with torch.no_grad():
            ref, got = b.call(z.model), res.program.run(b)
    finally:
        handle.remove()
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
    if name == "bert":  # the attention's weights are gone, the block's MLP stays
        params = _weights(res.program)
        assert not any(w.startswith(module + ".") for w in params)
        assert "encoder.layer.2.intermediate.dense.weight" in params


def test_greedy_trajectory_rescores_on_the_program_with_earlier_removals():
    z, _ = _zoo("llama", 3)
    original, res = _skip(z, layers=2, importance="fidelity_drop", search="greedy", granularity="mlp")
    traj = res.details["trajectory"]
    assert [t["step"] for t in traj] == [1, 2]
    first, second = traj[0]["removed"], traj[1]["removed"]
    # step 2's score is the fidelity drop of removing both (on calibration batches, against the original)
    calib = CalibrationData.from_user(z.calibration, z.example)
    assert traj[1]["score"] == pytest.approx(1 - mean_output_cosine(original, res.program, calib.batches), abs=1e-5)
    # ... and the chosen second region is the best one given the first
    cands = {r.key for r in find_regions(original, "mlp").regions} - {first}
    drops = {}
    for k in cands:
        _, trial = _skip(z, layers=[first, k], granularity="mlp")
        drops[k] = 1 - mean_output_cosine(original, trial.program, calib.batches)
    assert second == min(drops, key=drops.get)
    # the reported fidelity comes from the held-back batch only
    assert traj[1]["holdout cosine"] == pytest.approx(mean_output_cosine(original, res.program, calib.holdout), abs=1e-5)
    table = {row["candidate"]: row for row in res.details["candidates"]}
    assert set(table) == {f"layers.{i}.mlp" for i in range(3)}
    assert table[first]["removed at step"] == 1 and table[second]["removed at step"] == 2


@pytest.mark.parametrize("name,layers", [("llama", ["layers.1"]), ("bert", ["encoder.layer.1"])])
def test_linear_stand_in_beats_plain_removal_on_held_back_batches_and_exports(name, layers, tmp_path):
    """`compensate: linear` fits x + x M + b to the removed block's output: on the held-back batch the
    model's output is closer to the original than with the block removed (pre-norm LLaMA and post-norm
    BERT), the map is a real linear in the graph, and onnxruntime matches the module."""
    z, _ = _zoo(name, 4)
    original, plain = _skip(z, layers=layers, importance="block_influence")
    _, comp = _skip(z, layers=layers, importance="block_influence", compensate="linear")
    hold = CalibrationData.from_user(z.calibration, z.example).holdout
    cos_plain = mean_output_cosine(original, plain.program, hold)
    cos_comp = mean_output_cosine(original, comp.program, hold)
    assert cos_comp > cos_plain + 0.02
    assert comp.details["holdout cosine with stand-ins"] == pytest.approx(cos_comp, abs=1e-5)
    row = comp.details["stand-ins"][0]
    assert row["region"] == layers[0] and row["stand-in"].startswith("linear") and row["held-back error / removal's"] < 1
    maps = [k for k in comp.program.params() if "skip_map" in k]
    width = comp.program.param(next(k for k in maps if k.endswith("weight"))).shape[0]
    assert len(maps) == 2 and row["params added"] == width * (width + 1)
    gone = {w for w in _weights(original) if w.startswith(layers[0] + ".")}
    assert gone and not gone & _weights(comp.program), "the replaced block's weights must be dead code"
    assert any("1 of 1 removed region(s) replaced" in n for n in comp.notes)
    rec = export_onnx(comp.program, tmp_path / "m.onnx", verify_inputs=[z.example, z.calibration[0]])
    assert rec.verified and rec.rel_error < 1e-4


def test_linear_stand_in_is_dropped_where_fitting_does_not_pay():
    """Where cross-validation prefers no map (or the map loses on held-back batches) the region is removed
    plainly, the row says why, and the program computes exactly what plain removal computes."""
    z, _ = _zoo("llama", 4)
    layers = ["layers.0.mlp", "layers.2.mlp"]
    _, plain = _skip(z, layers=layers, granularity="mlp")
    _, comp = _skip(z, layers=layers, granularity="mlp", compensate="linear")
    rows = {r["region"]: r for r in comp.details["stand-ins"]}
    dropped = [k for k, r in rows.items() if r["stand-in"].startswith("none")]
    assert dropped, rows
    assert all(("cross-validation" in rows[k]["stand-in"]) or ("held-back" in rows[k]["stand-in"]) for k in dropped)
    kept = [k for k in rows if k not in dropped]
    assert len([k for k in comp.program.params() if "skip_map_weight" in k]) == len(kept)
    if not kept:
        torch.testing.assert_close(comp.program.run(z.example), plain.program.run(z.example))


def test_protect_and_fraction():
    z, _ = _zoo("gpt2")
    _, res = _skip(z, layers=0.5, importance="block_influence", search="oneshot", protect=["h.0", "h.2"])
    assert res.details["removed"] == ["h.1"]
    rows = {r["candidate"]: r for r in res.details["candidates"]}
    assert rows["h.0"]["protected"] and rows["h.2"]["protected"]


def test_clear_errors():
    z = zoo.load("mlp", calibration_batches=2)
    with pytest.raises(PassError, match="no skippable block"):
        rewrite.compile(z.model, {"passes": [{"kind": "skip"}]}, example_inputs=z.example, calibration=z.calibration)

    def check(name, **kw):
        zz, p = _zoo(name)
        spec = _spec(**kw)
        ctx = PassContext(spec=spec, calibration=CalibrationData.from_user(zz.calibration, zz.example), original=p)
        SkipPass(spec.passes[0]).check(p, ctx)

    with pytest.raises(PassError, match="no attention branch.*conv branches"):
        check("resnet", granularity="attention")
    with pytest.raises(PassError, match="not skippable block regions"):
        check("bert", layers=["encoder.layer.9"])
    with pytest.raises(PassError, match="only 1 are candidates"):
        check("bert", layers=2, protect=["encoder.layer.0", "encoder.layer.2"])


@pytest.mark.parametrize("spec_file,model", sweep([("skip-blocks.yaml", "bert"), ("skip-branches.yaml", "llama")],
                                                 fast=[("skip-blocks.yaml", "bert")]))
def test_example_specs_compile_export_and_match(spec_file, model, tmp_path):
    z = zoo.load(model, calibration_batches=4)
    out = rewrite.compile(z.model, SPECS / spec_file, example_inputs=z.example, calibration=z.calibration)
    rec = out.report.passes[-1]
    assert rec.kind == "skip" and rec.details["removed"]
    assert rec.cost.flops < out.report.before.flops
    e = out.export(tmp_path / "m.onnx", verify_inputs=[z.example, z.calibration[0]])
    assert e.verified and e.rel_error < 1e-4


def test_output_cosine_masks_padding():
    b = zoo.load("bert", calibration_batches=1).example  # last row is padded
    a = torch.randn(2, 12, 8)
    c = a.clone()
    c[1, -4:] = -a[1, -4:]  # differs only on padding positions
    s, n = output_cosine(a, c, b)
    assert n == float(b.kwargs["attention_mask"].sum()) and s == pytest.approx(n)


def _region(key):
    return Region(key=key, block=key, kind="block", stream_in="", stream_out="", nodes=(), weights=())


def test_beam_search_finds_the_pair_greedy_misses():
    # MiniLM's pattern: L2 is the best single block, but the best pair is (L1, L3)
    regions = [_region(f"L{i}") for i in range(4)]
    pair_drop = {frozenset({"L1", "L3"}): 0.10, frozenset({"L1", "L2"}): 0.12, frozenset({"L2", "L3"}): 0.15}

    def score(removed, left):  # cumulative: the drop with the whole set removed
        if not removed:
            return {"L0": 0.5, "L1": 0.06, "L2": 0.05, "L3": 0.07}
        return {r.key: pair_drop.get(frozenset({removed[0].key, r.key}), 0.9) for r in left}

    greedy, _ = beam_search(regions, 2, score, width=1, cumulative=True)
    beam, history = beam_search(regions, 2, score, width=3, cumulative=True)
    assert [r.key for r, _ in greedy] == ["L2", "L1"]
    assert {r.key for r, _ in beam} == {"L1", "L3"} and beam[-1][1] == pytest.approx(0.10)
    assert len(history) == 2 and set(history[1]) == {"L0", "L2", "L3"}  # the path's second-step scores
    # non-cumulative scores add up along the path
    added, _ = beam_search(regions, 2, lambda removed, left: {r.key: float(r.key[1]) for r in left},
                           width=2, cumulative=False)
    assert [r.key for r, _ in added] == ["L0", "L1"]


def test_beam_search_on_a_model_never_does_worse_than_greedy():
    z, _ = _zoo("llama", 3)
    original, greedy = _skip(z, layers=2, importance="fidelity_drop", search="greedy", granularity="mlp")
    _, beam = _skip(z, layers=2, importance="fidelity_drop", search="beam", beam_width=3, granularity="mlp")
    assert beam.details["search"] == "beam" and len(beam.details["removed"]) == 2
    calib = CalibrationData.from_user(z.calibration, z.example)
    drop = {name: 1 - mean_output_cosine(original, res.program, calib.batches) for name, res in
            (("greedy", greedy), ("beam", beam))}
    assert drop["beam"] <= drop["greedy"] + 1e-6
