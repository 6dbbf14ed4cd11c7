"""TVM backend: Relax import + build (llvm) of plain and custom-op graphs, save/load, errors, CUDA build."""
from __future__ import annotations

import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")

from rewrite.backends.tvm import build_tvm, load  # noqa: E402
from rewrite.kernels import quant  # noqa: E402
from rewrite.kernels import token as _token  # noqa: E402,F401  (registers rewrite::token_select)
from rewrite import zoo  # noqa: E402
from rewrite.errors import ExportError  # noqa: E402
from rewrite.program import Program  # noqa: E402


def _same(a, b, tol=1e-4) -> None:
    import torch.utils._pytree as pytree

    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    assert pytree.tree_structure(a) == pytree.tree_structure(b)
    for x, y in zip(la, lb):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert float((x.double() - y.double()).abs().max()) <= tol * max(1.0, float(x.abs().max()))


def test_plain_graph_dict_output_and_dynamic_batch() -> None:
    z = zoo.load("dict_output")
    program = Program.capture(z.model, z.example)
    built = build_tvm(program, "llvm")
    _same(z.example.call(program.module), z.example.call(built))
    other = torch.randn(3, 7, 16)  # another batch and sequence length: dims stay symbolic
    _same(program.module(other, torch.tensor(0.5)), built(other, torch.tensor(0.5)))


class NormGeluSoftmax(nn.Module):
    """The non-matmul ops of a BERT layer: layer norm, gelu, softmax, a residual add."""

    def __init__(self, d: int = 32, h: int = 48):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.fc(self.ln(x)))
        return torch.softmax(h, dim=-1) + h


def test_cpu_rules_fast_gelu_row_wise_softmax_and_inlined_elementwise() -> None:
    """gelu without per-lane libm erf calls, softmax / layer norm per row, elementwise chains inlined."""
    from rewrite.kernels.tvm_schedule import SCHEDULE_ATTR

    torch.manual_seed(0)
    model = NormGeluSoftmax().eval()
    x = torch.randn(2, 5, 32)
    program = Program.capture(model, (x,))
    built = build_tvm(program, "llvm")
    with torch.no_grad():
        _same(model(x), built(x), tol=1e-5)
        other = torch.randn(3, 7, 32)
        _same(model(other), built(other), tol=1e-5)
    rules = {}
    for gv, func in built.ir.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            rules[gv.name_hint] = str(func.attrs[SCHEDULE_ATTR]) if SCHEDULE_ATTR in func.attrs else None
    gelu = [n for n in rules if "gelu" in n]
    assert gelu and all("T.erf(" not in built.ir[n].script() for n in gelu), rules
    def blocks(name: str) -> int:  # distinct blocks (a nest with a serial twin, kernels.tvm_parallel, repeats them)
        import re

        return len(set(re.findall(r'T\.sblock\("([^"]+)"\)', built.ir[name].script())) - {"root"})

    assert [n for n in gelu if blocks(n) == 1], "gelu's blocks not inlined into one"
    assert any("softmax" in n and r == "rewrite.RowWise" for n, r in rules.items()), rules


class QuantTokenNet(nn.Module):
    """W3 (no bias) and W4 (bias) linears, token selection on a score, gather of the kept tokens."""

    def __init__(self, d: int = 64, h: int = 96):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for name, (n, k, bits, g, bias) in {"up": (h, d, 3, 32, False), "down": (d, h, 4, 32, True)}.items():
            q, s, z = quant.quantize_groups(torch.randn(n, k, generator=gen) * 0.1, bits, g)
            self.register_buffer(f"{name}_q", quant.pack(q, bits))
            self.register_buffer(f"{name}_s", s)
            self.register_buffer(f"{name}_z", z)
            self.register_buffer(f"{name}_b", torch.randn(n, generator=gen) if bias else None)
            setattr(self, f"{name}_cfg", (bits, g))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.ops.rewrite.linear_q(x, self.up_q, self.up_s, self.up_z, None, *self.up_cfg)
        y = torch.ops.rewrite.linear_q(torch.relu(h), self.down_q, self.down_s, self.down_z, self.down_b, *self.down_cfg)
        keep = torch.ops.rewrite.token_select(y.norm(dim=-1), 0.5, 1, 0)
        kept = torch.gather(y, 1, keep.unsqueeze(-1).expand(-1, -1, y.shape[-1]))
        return kept, keep


def test_custom_ops_graph_matches_and_saves(tmp_path) -> None:
    x = torch.randn(2, 10, 64)
    program = Program.capture(QuantTokenNet().eval(), (x,))
    built = build_tvm(program, "llvm")
    assert "dequant_gemm_w3g32" in built.script() and "token_select" in built.script()
    _same(program.module(x), built(x))
    x2 = torch.randn(3, 7, 64)
    _same(program.module(x2), built(x2))
    path = built.save(tmp_path / "model.tvm.so")
    again = load(path, program)
    _same(program.module(x2), again(x2))


class W4A8Net(nn.Module):
    """A 4-bit packed linear run as int8 x int8 (rewrite::linear_qa8_dynamic)."""

    def __init__(self, d: int = 64, n: int = 32):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        q, s, z = quant.quantize_groups(torch.randn(n, d, generator=gen), 4, 16, symmetric=True)
        self.register_buffer("q", quant.pack(q, 4))
        self.register_buffer("s", s)
        self.register_buffer("z", z)
        self.register_buffer("ws", quant.dequantize(self.q, s, z, 4, 16, d).abs().amax(-1) / 127)
        self.register_buffer("b", torch.randn(n, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.rewrite.linear_qa8_dynamic(x, self.q, self.s, self.z, self.ws, self.b, 4, 16)


def test_low_bit_int8_compute_linear_matches() -> None:
    x = torch.randn(2, 5, 64)
    program = Program.capture(W4A8Net().eval(), (x,))
    built = build_tvm(program, "llvm")
    _same(program.module(x), built(x))


def test_unsupported_op_names_op_and_module() -> None:
    @torch.library.custom_op("rewrite_test::mystery", mutates_args=())
    def mystery(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    mystery.register_fake(lambda x: torch.empty_like(x))

    class Inner(nn.Module):
        def forward(self, x):
            return torch.ops.rewrite_test.mystery(x)

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Inner()

        def forward(self, x):
            return self.block(x) + 1

    program = Program.capture(Outer(), (torch.randn(2, 4),), dynamic=False)
    with pytest.raises(ExportError, match=r"rewrite_test::mystery.default \(from module 'block'\)"):
        build_tvm(program, "llvm")


def test_compiled_build_and_cuda_source(tmp_path) -> None:
    import rewrite

    z = zoo.load("mlp")
    compiled = rewrite.compile(z.model, {"passes": [{"kind": "cleanup"}]}, example_inputs=z.example)
    built = compiled.build("tvm", target="llvm", verify=True)
    _same(compiled.module(*z.example.args), built(*z.example.args))
    cuda = compiled.build("tvm", target={"kind": "cuda", "arch": "sm_90"})
    assert "__global__" in cuda.source()


@pytest.mark.slow
def test_minilm_w4_pruned_llvm_matches_compiled_module(minilm) -> None:
    """all-MiniLM-L6-v2, 25% FFN neurons pruned + W4 (group 128) weights, built with llvm."""
    import rewrite
    from rewrite import demo

    model, tok = minilm
    spec = {"passes": [{"kind": "prune", "granularity": "neuron", "amount": 0.25, "importance": "magnitude"},
                       {"kind": "quantize", "weights": {"bits": 4, "group_size": 128}}]}
    compiled = rewrite.compile(model, spec, example_inputs=demo.example_inputs(tok))
    assert any("linear_q" in str(n.target) for n in compiled.module.graph.nodes)
    built = compiled.build("tvm", target="llvm")
    assert "dequant_gemm_w4g128" in built.script()
    batch = tok(["a man is playing a guitar.", "the cat sat on the mat while it rained outside"],
                padding=True, return_tensors="pt")
    inputs = {k: batch[k] for k in compiled.program.example.kwargs}
    _same(compiled.module(**inputs), built(**inputs), tol=1e-4)


def test_cli_backend_tvm_builds_verifies_and_emits_source(tmp_path, monkeypatch, capsys) -> None:
    from rewrite.cli import main

    (tmp_path / "tvm_factory.py").write_text(
        "from rewrite import zoo\n"
        "def mlp():\n"
        "    z = zoo.load('mlp')\n"
        "    return z.model, z.example.args, [b.args for b in z.calibration]\n")
    monkeypatch.chdir(tmp_path)
    rc = main(["compile", "--model", "tvm_factory:mlp", "--backend", "tvm", "--target", "cuda", "--emit-source",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    assert "__global__" in (tmp_path / "out" / "kernels.cu").read_text()
    assert (tmp_path / "out" / "model.tvm.so").stat().st_size > 0
    assert "TVM cuda" in capsys.readouterr().err
