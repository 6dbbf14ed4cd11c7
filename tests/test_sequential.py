"""Checkpoint folders without materialising the model (`rewrite.load_hf`) and the block-by-block
quantization pipeline (`rewrite.sequential`), checked against the in-memory quantize pass."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

import rewrite  # noqa: E402
from rewrite import sequential  # noqa: E402
from rewrite.calibration import CalibrationData  # noqa: E402
from rewrite.checkpoint import CheckpointError, load_hf  # noqa: E402
from rewrite.errors import CalibrationError, PassError  # noqa: E402
from rewrite.inputs import Inputs  # noqa: E402
from rewrite.program import Program  # noqa: E402
from rewrite.sequential import quantize_sequential  # noqa: E402

torch.set_num_threads(1)


def _llama(tie: bool) -> torch.nn.Module:
    """The zoo's llama config as a causal LM (with an lm_head: untied, it is a linear after the blocks)."""
    from transformers import LlamaForCausalLM

    from rewrite import zoo

    cfg = zoo._llama().config
    cfg.tie_word_embeddings = tie
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    zoo._lived_in(model)
    with torch.no_grad():  # bf16-representable values: the fp32 and bf16 checkpoints hold the same model
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model


def _batches(n: int = 5) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(3, 128, (2, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9 + i % 3:] = 0  # padded tokens: both paths must drop them from the statistics
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path, Program]:
    model = _llama(tie=False)
    root = tmp_path_factory.mktemp("ckpt")
    fp32, bf16 = root / "fp32", root / "bf16"
    model.save_pretrained(fp32, safe_serialization=True)
    model.to(torch.bfloat16).save_pretrained(bf16, safe_serialization=True, max_shard_size="20KB")  # sharded + index
    model.to(torch.float32)
    program = Program.capture(model, Inputs.of(_batches(1)[0]))
    return model, fp32, bf16, program


def _written(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(out / f)))
    assert set(tensors) == set(index["weight_map"])
    return tensors


def _in_memory(program: Program, spec: dict) -> dict[str, torch.Tensor]:
    batches = _batches()
    out = rewrite.compile(program, {"passes": [spec]}, example_inputs=batches[0], calibration=batches)
    return {n: b for n, b in out.module.named_buffers() if n.endswith(("_q", "_scales", "_zeros"))}


def _fit_batches() -> list[dict]:
    """The batches the in-memory pass fits on (its held-back tail removed)."""
    batches = _batches()
    return [b.kwargs for b in CalibrationData.from_user(batches, Inputs.of(batches[0])).batches]


# ----------------------------------------------------------------------------- load_hf
def test_load_hf_builds_on_meta_and_reads_lazily(untied):
    model, _, bf16, _ = untied
    assert (bf16 / "model.safetensors.index.json").is_file()
    ckpt = load_hf(bf16)
    assert ckpt.dtype == torch.bfloat16
    assert all(p.device.type == "meta" for p in ckpt.model.parameters())
    assert ckpt.model.model.rotary_emb.inv_freq.device.type == "cpu"      # computed buffers stay real
    w = ckpt.load("model.layers.1.mlp.down_proj.weight")
    assert w.dtype == torch.bfloat16 and torch.equal(w.float(), model.model.layers[1].mlp.down_proj.weight)
    rows = ckpt.store.rows("model.embed_tokens.weight", 5, 9)
    assert torch.equal(rows.float(), model.model.embed_tokens.weight[5:9])
    ckpt.materialize("model.layers.0", torch.float32)
    layer = ckpt.model.model.layers[0]
    assert torch.equal(layer.self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    assert ckpt.model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    ckpt.release("model.layers.0")
    assert layer.self_attn.q_proj.weight.device.type == "meta"
    full = ckpt.module()          # everything real, in float32: what rewrite.compile takes
    batch = _batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(full(**batch).logits, model(**batch).logits)


def test_load_hf_tied_embedding(tmp_path):
    model = _llama(tie=True)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ckpt = load_hf(tmp_path)
    assert ckpt.tied("lm_head.weight") and ckpt.model.lm_head.weight is ckpt.model.model.embed_tokens.weight
    assert torch.equal(ckpt.load("lm_head.weight"), model.model.embed_tokens.weight)
    ckpt.materialize("lm_head")
    assert ckpt.model.lm_head.weight is ckpt.model.model.embed_tokens.weight
    assert ckpt.model.model.embed_tokens.weight.device.type == "cpu"


def test_load_hf_errors(tmp_path, untied):
    _, fp32, _, _ = untied
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text((fp32 / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no \*.safetensors.*pytorch_model.bin"):
        load_hf(tmp_path)
    tensors = load_file(str(fp32 / "model.safetensors"))
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.layers.2.mlp.up_proj.weight"):
        load_hf(tmp_path)


# ----------------------------------------------------------------------------- sequential == in-memory
def test_sequential_rtn_equals_the_quantize_pass(untied, tmp_path, monkeypatch):
    _, fp32, bf16, program = untied
    spec = {"kind": "quantize", "method": "rtn", "weights": {"bits": 4, "group_size": 32}}
    expected = _in_memory(program, spec)
    monkeypatch.setattr(sequential, "ROW_CHUNK_ELEMENTS", 1000)   # large weights are read in row chunks
    for ckpt in (fp32, bf16):
        res = quantize_sequential(ckpt, spec, tmp_path / ckpt.name)
        got = _written(tmp_path / ckpt.name)
        assert {n for n in got if n.endswith(("_q", "_scales", "_zeros"))} == set(expected)
        for name, value in expected.items():
            assert torch.equal(got[name], value), name
        assert len(res.layers) == len(expected) // 3 and any(r["module"] == "lm_head" for r in res.layers)
        # everything else is carried over as stored (norms, the embedding), in the checkpoint's dtype
        assert got["model.norm.weight"].dtype == (torch.bfloat16 if ckpt == bf16 else torch.float32)
        assert "model.layers.0.self_attn.q_proj.weight" not in got
        report = json.loads((tmp_path / ckpt.name / "quantization.json").read_text())
        assert [p["name"] for p in report["phases"]][:2] == ["load", "block 0"]
        assert all(p["peak_rss_mb"] > 0 for p in report["phases"])


@pytest.mark.slow
@pytest.mark.parametrize("refit", [0, 2])
def test_sequential_gptq_equals_the_sequential_quantize_pass(untied, tmp_path, monkeypatch, refit):
    _, _, bf16, program = untied
    monkeypatch.setattr(sequential, "GPTQ_ROW_CHUNK_ELEMENTS", 2000)   # rows fitted in chunks (rows are independent)
    spec = {"kind": "quantize", "method": "gptq", "weights": {"bits": 4, "group_size": 32},
            "gptq": {"sequential": True, "refit_rounds": refit}}
    expected = _in_memory(program, spec)
    res = quantize_sequential(bf16, spec, tmp_path, calibration=_fit_batches())
    got = _written(tmp_path)
    assert {n for n in got if n.endswith(("_q", "_scales", "_zeros"))} == set(expected)
    for name, value in expected.items():
        if value.dtype == torch.uint8:  # a float-noise rounding flip may move a level; allow very few
            assert (got[name] != value).float().mean() <= 0.01, name
        else:
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert {r["method"] for r in res.layers} == {"gptq"}
    # GPTQ fitted something: its output error differs from RTN's for the same weights
    rtn = quantize_sequential(bf16, {"method": "rtn", "weights": {"bits": 4, "group_size": 32}}, tmp_path / "rtn")
    assert rtn.layers[0]["module"] == res.layers[0]["module"]
    assert not torch.equal(_written(tmp_path / "rtn")["model.layers.0.self_attn.q_proj.weight_q"],
                           got["model.layers.0.self_attn.q_proj.weight_q"])


def test_sequential_refuses_what_it_does_not_do(untied, tmp_path):
    _, fp32, _, _ = untied
    with pytest.raises(PassError, match="method awq"):
        quantize_sequential(fp32, {"method": "awq"}, tmp_path)
    with pytest.raises(CalibrationError, match="gptq needs calibration"):
        quantize_sequential(fp32, {"method": "gptq"}, tmp_path)
    with pytest.raises(PassError, match="is the checkpoint folder itself"):
        quantize_sequential(fp32, {"method": "rtn"}, fp32)


def test_find_blocks_is_generic():
    from transformers import GPT2Config, GPT2Model

    with torch.device("meta"):
        gpt2 = GPT2Model(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    path, blocks = sequential.find_blocks(gpt2)
    assert path == "h" and len(blocks) == 3


def test_rewritten_checkpoint_runs_like_the_compiled_module(untied, tmp_path):
    """The written folder, opened with load_rewritten (packed linears), computes what the quantize pass's module computes."""
    _, fp32, _, program = untied
    spec = {"kind": "quantize", "method": "rtn", "weights": {"bits": 4, "group_size": 32}}
    batch = _batches()[0]
    compiled = rewrite.compile(program, {"passes": [spec]}, example_inputs=batch)
    quantize_sequential(fp32, spec, tmp_path)
    ckpt = sequential.load_rewritten(tmp_path)
    assert isinstance(ckpt.model.model.layers[0].mlp.down_proj, sequential.PackedLinear)
    assert ckpt.model.model.layers[0].mlp.down_proj.weight_q.device.type == "meta"
    ckpt.materialize("", torch.float32)
    with torch.no_grad():
        got = ckpt.model(**batch).logits
        want = compiled.module(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sequential_gpt2_conv1d_equals_the_quantize_pass(tmp_path):
    """A second architecture, with transformers' Conv1D (weight stored [K, N]) and a tied lm_head.

    Unpadded batches: the in-memory sequential GPTQ (`qm.sequential_input_stats`) drops padded
    rows only from 3-D inputs, and GPT-2's Conv1D reads a 2-D view, so with padding the pass
    counts padded tokens there and the pipeline (which drops them, the project's policy) does not.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                       use_cache=False, bos_token_id=1, eos_token_id=2)).eval()
    model.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    batches = [{"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["attention_mask"])} for b in _batches()]
    program = Program.capture(model, Inputs.of(batches[0]))
    fit = [b.kwargs for b in CalibrationData.from_user(batches, Inputs.of(batches[0])).batches]
    spec = {"kind": "quantize", "method": "gptq", "weights": {"bits": 4, "group_size": 32}, "gptq": {"sequential": True}}
    out = rewrite.compile(program, {"passes": [spec]}, example_inputs=batches[0], calibration=batches)
    expected = {n: b for n, b in out.module.named_buffers() if n.endswith(("_q", "_scales", "_zeros"))}
    quantize_sequential(tmp_path / "ckpt", spec, tmp_path / "out", calibration=fit)
    got = _written(tmp_path / "out")
    assert {n for n in got if n.endswith(("_q", "_scales", "_zeros"))} == set(expected)
    assert "lm_head.weight_q" not in got  # tied to the embedding: stays float, as in the pass
    for name, value in expected.items():
        if value.dtype == torch.uint8:
            assert (got[name] != value).float().mean() <= 0.01, name
        else:
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_cli_compiles_a_checkpoint_folder(untied, tmp_path, capsys):
    """`rewrite compile SPEC --model hf:DIR`: the folder's model (bf16 read as float32), 8 example ids
    (no tokenizer in the folder), W4, exported and verified in onnxruntime; a bad folder is one line."""
    from rewrite.cli import main

    model, _, bf16, _ = untied
    out = tmp_path / "out"
    spec = Path(__file__).resolve().parent.parent / "specs" / "quantize-w4.yaml"
    assert main(["compile", str(spec), "--model", f"hf:{bf16}", "--out", str(out), "-q"]) == 0
    assert (out / "model.onnx").is_file()
    assert main(["compile", str(spec), "--model", f"hf:{tmp_path / 'nothing'}", "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "does not exist" in err[-1] and "config.json" in err[-1]


def _reference_factor(h: torch.Tensor, d: float) -> torch.Tensor:
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(d * float(torch.diag(h).mean()))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@pytest.mark.parametrize("scipy_lapack", [True, False])
def test_gptq_factor_in_place_matches_the_three_step_formula(scipy_lapack, monkeypatch):
    """The GPTQ factor computed in H's own storage (SciPy's LAPACK, or torch's out= fallback) equals
    cholesky(cholesky_inverse(cholesky(H + dI)), upper=True), dead channels included; an indefinite
    H is damped more and rebuilt from the caller's H for each try."""
    import builtins

    from rewrite.passes import quantize_methods as qm

    if not scipy_lapack:
        real = builtins.__import__

        def no_scipy(name, *args, **kwargs):
            if name.startswith("scipy"):
                raise ImportError(name)
            return real(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_scipy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 96, generator=g, dtype=torch.float64)
    h = (x.T @ x / 300).float()
    h[5], h[:, 5] = 0.0, 0.0                      # a dead input channel
    f = qm.gptq_factor(h, 0.01)
    torch.testing.assert_close(f.hinv, _reference_factor(h, 0.01), rtol=0, atol=1e-12)
    assert f.dead.nonzero().flatten().tolist() == [5]
    assert torch.equal(h[0, :3], (x.T @ x / 300).float()[0, :3])   # the caller's H is not modified
    indefinite = torch.diag(torch.tensor([2.0, -0.3], dtype=torch.float64))   # positive definite only at damp 1.0
    torch.testing.assert_close(qm.gptq_factor(indefinite, 0.01).hinv, _reference_factor(indefinite, 1.0),
                               rtol=0, atol=1e-12)
    assert indefinite.diagonal().tolist() == [2.0, -0.3]   # a float64 H is copied, not factored in place


def test_take_hessian_is_the_hessian_and_drops_the_float64_sum():
    """`InputStats.take_hessian` gives `hessian`'s values while consuming the in-place accumulated sum."""
    from rewrite.passes import quantize_methods as qm

    g = torch.Generator().manual_seed(0)
    a, b = qm.InputStats(16), qm.InputStats(16)
    for _ in range(3):
        x = torch.randn(7, 16, generator=g)
        a.update(x, want_gram=True)
        b.update(x, want_gram=True)
    want = a.hessian
    got = b.take_hessian()
    assert b.gram is None and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
