"""`rewrite::token_select`: reference numerics against hand computations, and its ONNX lowering."""
import math

import numpy as np
import pytest
import torch

from rewrite.kernels.token import keep_count, keep_fraction, token_select  # noqa: F401  (registers the op)
from rewrite.inputs import Inputs
from rewrite.program import Program

select = torch.ops.rewrite.token_select


def test_keep_count_is_exact_integer_ceil():
    assert keep_fraction(0.7) == (7, 10)
    assert keep_count(100, 0.07) == 7  # double arithmetic would give ceil(7.000000000000001) = 8
    assert keep_count(10, 0.7) == 7
    assert keep_count(11, 0.5) == 6
    assert keep_count(3, 0.1, 1, 1) == 2  # at least first + last
    assert keep_count(1, 0.1, 1, 1) == 1  # never more than S
    for S in range(1, 300):
        for keep in (0.25, 0.5, 0.7, 0.9, 1.0):
            assert keep_count(S, keep) == math.ceil(round(keep * S, 9))


def test_reference_by_hand():
    scores = torch.tensor([[0.0, 5.0, 1.0, 3.0, 2.0, -1.0],
                           [9.0, 1.0, 1.0, 1.0, float("-inf"), float("-inf")]])
    # k = ceil(0.5 * 6) = 3; first position forced, then the 2 best of the rest, in order
    got = select(scores, 0.5, 1, 0)
    assert got.dtype == torch.int64
    assert got.tolist() == [[0, 1, 3], [0, 1, 2]]  # row 1: ties among 1.0 -> lower index first
    # keep_last forces position 5 even though it scores lowest
    assert select(scores, 0.5, 1, 1).tolist() == [[0, 1, 5], [0, 1, 5]]
    # keep=1 keeps everything in order
    assert select(scores, 1.0, 0, 0).tolist() == [list(range(6))] * 2
    # +inf scores elsewhere do not displace forced positions
    s = torch.tensor([[0.0, float("inf"), float("inf"), 0.0]])
    assert select(s, 0.5, 1, 0).tolist() == [[0, 1]]


def test_fake_shape_is_symbolic_and_matches():
    class M(torch.nn.Module):
        def forward(self, x):
            idx = select(x.norm(dim=-1), 0.7, 1, 0)
            return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    x = torch.randn(2, 10, 4)
    ep = torch.export.export(M(), (x,), dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},), strict=False)
    for S in (3, 10, 17, 100):
        xs = torch.randn(3, S, 4)
        out = ep.module()(xs)
        assert out.shape == (3, keep_count(S, 0.7, 1, 0), 4)
        assert torch.equal(out, M()(xs))


def test_onnx_lowering_matches_reference(tmp_path):
    from rewrite.backends.onnx import export_onnx

    class M(torch.nn.Module):
        def forward(self, x, mask):
            scores = x.norm(dim=-1).masked_fill(mask == 0, float("-inf"))
            idx = select(scores, 0.5, 1, 1)
            return idx, torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 4, generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    program = Program.capture(M(), Inputs((x, mask), {}))
    batches = []
    for B, S in ((2, 9), (3, 17), (1, 4), (4, 33)):
        xb = torch.randn(B, S, 4, generator=g)
        xb[:, 2] = xb[:, 3]  # exact ties
        mb = torch.ones(B, S, dtype=torch.long)
        mb[0, S // 2:] = 0
        batches.append(Inputs((xb, mb), {}))
    rec = export_onnx(program, tmp_path / "sel.onnx", verify_inputs=batches)
    assert rec.verified and rec.max_abs_error == 0.0
    import onnx

    ops = {n.op_type for n in onnx.load(tmp_path / "sel.onnx").graph.node}
    assert "TopK" in ops
    # the ONNX graph keeps S dynamic: a length not seen at export runs with the right k
    from rewrite.backends.onnx import session

    sess = session(tmp_path / "sel.onnx")
    xb = torch.randn(2, 50, 4, generator=g).numpy()
    mb = np.ones((2, 50), dtype=np.int64)
    idx, _ = sess.run(None, {i.name: v for i, v in zip(sess.get_inputs(), (xb, mb))})
    assert idx.shape == (2, keep_count(50, 0.5, 1, 1))
    assert np.array_equal(idx, select(torch.from_numpy(xb).norm(dim=-1), 0.5, 1, 1).numpy())
