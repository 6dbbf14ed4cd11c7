"""Every pass kind on every zoo model: each cell works (changed as reported, matches in onnxruntime)
or is refused with one of the compiler's own errors naming why. `python -m rewrite.zoo_grid`
prints the same grid as a table."""
import os

import pytest
import torch

import rewrite
import rewrite.errors
from rewrite import PassError, zoo
from rewrite.zoo_grid import _CAPTURED as captured_models
from rewrite.zoo_grid import PASSES, run_cell

pytest.importorskip("transformers")

KINDS = [c for c in PASSES if c != "cleanup"]


def rotated_cells() -> list[tuple[str, str]]:
    """Every zoo model once, every pass kind on every seventh model: model i gets kind i mod 7.

    `zoo.EVERY` lists models by family (encoders, decoders, MoE, encoder-decoders, ViTs,
    hierarchical vision, CNNs, audio, SSM), so each kind lands on ~8 models spread over the
    families. A refused cell also runs `cleanup` for its model (see the test), so every model's
    export is checked."""
    return [(m, KINDS[i % len(KINDS)]) for i, m in enumerate(zoo.EVERY)]


def _select() -> list[tuple[str, str]]:
    """What runs, by REWRITE_ZOO_GRID:
    - unset (CI): every other rotated cell, 29 models over every family and all 7 kinds (~6 min CPU
      measured as ~13 s CPU a model with static export; all 57 would be ~12 min, over CI's budget);
    - `rotated`: all 57 rotated cells;  - `all`: every model x every column (~2 h CPU).
    REWRITE_ZOO_SHARD=i/n keeps the i-th of n slices, to spread a selection over jobs."""
    mode = os.environ.get("REWRITE_ZOO_GRID", "")
    if mode == "all":
        cells = [(m, p) for m in zoo.EVERY for p in PASSES]
    elif mode == "rotated":
        cells = rotated_cells()
    else:
        cells = rotated_cells()[0::2]
    shard = os.environ.get("REWRITE_ZOO_SHARD")
    if shard:
        i, n = (int(x) for x in shard.split("/"))
        cells = cells[i::n]
    return cells


CELLS = _select()
DYNAMIC = os.environ.get("REWRITE_ZOO_GRID") == "all"
"""CI exports with the example's fixed shapes (~2.5x cheaper); the full grid exports like users do,
with symbolic batch/sequence dims (also covered on the core zoo by tests/test_onnx_backend.py)."""


def _assert_clean(cell) -> None:
    """ok: the change check passed and the ONNX file matched torch in onnxruntime; refused: one of the
    compiler's own errors, in a line or two, saying why."""
    assert cell.outcome != "FAIL", cell.message
    if cell.outcome == "ok":
        assert cell.verified, cell
    else:
        name = cell.message.split(":", 1)[0]
        assert isinstance(getattr(rewrite.errors, name, None), type) and issubclass(getattr(rewrite.errors, name),
                                                                                     rewrite.RewriteError), cell.message
        assert len(cell.message.splitlines()) <= 3, cell.message


@pytest.mark.slow
@pytest.mark.parametrize("model,column", CELLS, ids=[f"{m}-{p}" for m, p in CELLS])
def test_cell_works_or_refuses_cleanly(model, column, tmp_path):
    for other in [m for m in captured_models if m != model]:  # a model's capture is shared by its cells only
        captured_models.pop(other)
    cell = run_cell(model, column, workdir=tmp_path, dynamic=DYNAMIC)
    _assert_clean(cell)
    if cell.outcome == "refused" and column != "cleanup":  # the model's export is still checked
        cleanup = run_cell(model, "cleanup", workdir=tmp_path, dynamic=DYNAMIC)
        _assert_clean(cleanup)
        assert cleanup.outcome == "ok", cleanup.message


def _compile(name, pass_spec):
    z = zoo.load(name, calibration_batches=2)
    return rewrite.compile(z.model, {"passes": [pass_spec]}, example_inputs=z.example, calibration=z.calibration)


def test_head_pruning_without_heads_is_refused_not_a_silent_success():
    with pytest.raises(PassError, match="no attention heads.*granularity channel"):
        _compile("rescat_cnn", PASSES["prune_head"])


def test_token_pruning_refuses_feature_maps():
    with pytest.raises(PassError, match="not \\[batch, tokens, hidden\\]"):
        _compile("resnet", PASSES["tokens"])


def test_zoo_has_forty_hf_architectures():
    assert len(zoo.HF_MODELS) + len(zoo.WIDE) >= 40
    assert len(set(zoo.EVERY)) == len(zoo.EVERY)


class _SdpaReshape(torch.nn.Module):
    """Attention whose output is transposed and reshaped: CPU SDPA lays its output out so that the
    reshape is captured as a view (on Swin and T5 that view broke the ONNX export once the exporter
    decomposed attention; the grid's swin/t5 cells check the export itself)."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.qkv, self.out, self.heads = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d), heads

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(1, self.heads, S, S))
        return self.out(o.transpose(1, 2).reshape(B, S, D))


def test_reshape_of_a_transposed_tensor_gets_a_contiguous_input_and_exports(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    out = rewrite.compile(_SdpaReshape().eval(), {"passes": [{"kind": "cleanup"}]}, example_inputs=(x,))
    targets = [n.target for n in out.module.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.view.default not in targets
    assert torch.ops.aten.clone.default in targets
    assert out.export(tmp_path / "m.onnx").verified


class _SamePadding(torch.nn.Module):
    """Convolutions with string padding, as EfficientNet writes them: odd and even kernels."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding="same")
        self.b = torch.nn.Conv2d(8, 8, 4, padding="same", groups=8)  # even kernel: torch pads one more at the end
        self.c = torch.nn.Conv2d(8, 4, 3, padding="valid", dilation=2)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.a(x))))


def test_string_padded_convs_become_plain_convs_that_quantize_and_export(tmp_path):
    torch.manual_seed(0)
    model, x = _SamePadding().eval(), torch.randn(2, 3, 12, 12)
    out = rewrite.compile(model, {"passes": [{"kind": "quantize", "weights": {"bits": 8}}]}, example_inputs=(x,))
    targets = [n.target for n in out.original.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.conv2d.default) == 3 and torch.ops.aten.conv2d.padding not in targets
    assert torch.allclose(out.original.module(x), model(x))
    assert out.report.after.weight_bytes < out.report.before.weight_bytes  # all three convs are quantizable now
    assert out.export(tmp_path / "m.onnx").verified


def test_mixture_of_experts_captures_with_an_exportable_experts_kernel():
    from rewrite.capture import EXPORTABLE_EXPERTS

    z = zoo.load("mixtral", calibration_batches=0)
    before = z.model.get_experts_implementation()
    program = rewrite.Program.capture(z.model, z.example)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any(op.startswith("transformers.") for op in ops), ops  # no opaque custom op left for the exporter
    assert z.model.get_experts_implementation() == before != {"": EXPORTABLE_EXPERTS}  # the model's own setting is back
    torch.testing.assert_close(program.module(*z.example.args, **z.example.kwargs).last_hidden_state,
                               z.model(*z.example.args, **z.example.kwargs).last_hidden_state)


def test_multi_query_head_pruning_shrinks_the_broadcast_of_the_one_kv_head(tmp_path):
    """GPTBigCode (MQA) broadcasts its single KV head to every query head with an expand whose size is a
    literal head count; pruning query heads must rewrite that literal (it crashed with 3 vs 4 heads)."""
    cell = run_cell("gpt_bigcode", "prune_head", workdir=tmp_path, dynamic=False)
    _assert_clean(cell)
    assert cell.outcome == "ok", cell.message
